//! Naming a key: a label, or an RFC 7512 `pkcs11:` URI (`pkcs11:token=keybound-dev;object=dpop`).

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use super::TokenError;

/// The label of a key keybound creates: non-empty, printable (no control characters: it
/// is shown in logs and names a TPM key file) and not a `pkcs11:` URI (names starting
/// with `pkcs11:` are parsed as URIs). One rule for every backend; parse it where a label
/// comes in.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Label(String);

impl Label {
    pub fn parse(text: &str) -> Result<Label, TokenError> {
        let bad = |reason: &str| TokenError::BadKeyName {
            name: text.into(),
            reason: format!(
                "{reason}; a label must be non-empty, printable and not start with 'pkcs11:'"
            ),
        };
        if text.is_empty() {
            return Err(bad("it is empty"));
        }
        if text.starts_with("pkcs11:") {
            return Err(bad("it starts with 'pkcs11:'"));
        }
        if text.chars().any(char::is_control) {
            return Err(bad("it contains a control character"));
        }
        Ok(Label(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Label {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Label, TokenError> {
        Label::parse(s)
    }
}

/// A parsed key name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyName {
    text: String,
    label: Option<String>,
    id: Option<Vec<u8>>,
    token: Option<String>,
}

impl KeyName {
    pub fn parse(text: &str) -> Result<KeyName, TokenError> {
        let bad = |reason: &str| TokenError::BadKeyName {
            name: text.into(),
            reason: reason.into(),
        };
        let Some(path) = text.strip_prefix("pkcs11:") else {
            if text.is_empty() {
                return Err(bad("it is empty"));
            }
            return Ok(KeyName {
                text: text.into(),
                label: Some(text.into()),
                id: None,
                token: None,
            });
        };
        // RFC 7512 §2.3: path attributes are ';'-separated; query attributes after '?'
        // (pin-source, module-path) are not honoured: the config decides those.
        let path = path.split('?').next().unwrap_or_default();
        let mut name = KeyName {
            text: text.into(),
            label: None,
            id: None,
            token: None,
        };
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(&format!("attribute '{attr}' has no '='")))?;
            let v = pct_decode(v).ok_or_else(|| bad(&format!("bad %-escape in '{attr}'")))?;
            match k {
                "object" => name.label = Some(utf8(v).ok_or_else(|| bad("object is not UTF-8"))?),
                "token" => name.token = Some(utf8(v).ok_or_else(|| bad("token is not UTF-8"))?),
                "id" => name.id = Some(v),
                "type" if utf8(v.clone()).as_deref() == Some("private") => {}
                "type" => return Err(bad("only type=private names a signing key")),
                // Further identification of the token or library is accepted and left
                // to the configuration, which selects exactly one token.
                "manufacturer"
                | "model"
                | "serial"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer"
                | "slot-id" => {}
                other => return Err(bad(&format!("unknown attribute '{other}'"))),
            }
        }
        if name.label.is_none() && name.id.is_none() {
            return Err(bad("it needs object=<label> or id=<%-encoded CKA_ID>"));
        }
        Ok(name)
    }

    /// Errors if the name pins a token other than the configured one.
    pub fn check_token(&self, configured: &str) -> Result<(), TokenError> {
        match &self.token {
            Some(t) if t != configured => Err(TokenError::OtherToken {
                name: self.text.clone(),
                named: t.clone(),
                configured: configured.into(),
            }),
            _ => Ok(()),
        }
    }

    /// The name of exactly the key with this label and id.
    pub(crate) fn exact(label: &str, id: &[u8]) -> KeyName {
        KeyName {
            text: KeyName::uri(label, id),
            label: Some(label.into()),
            id: Some(id.to_vec()),
            token: None,
        }
    }

    /// `pkcs11:object=<label>;id=%xx%xx`: a name for one key when its label is shared.
    pub fn uri(label: &str, id: &[u8]) -> String {
        let mut uri = String::from("pkcs11:object=");
        uri.extend(utf8_percent_encode(label, NOT_UNRESERVED));
        uri.push_str(";id=");
        for b in id {
            uri.push_str(&format!("%{b:02x}"));
        }
        uri
    }

    pub fn matches(&self, label: &str, id: &[u8]) -> bool {
        self.label.as_deref().is_none_or(|l| l == label)
            && self.id.as_deref().is_none_or(|i| i == id)
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", self.text)
    }
}

/// RFC 3986 unreserved characters: everything else in a label is %-encoded in a URI.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Decodes `%XX` escapes. `percent-encoding` passes a malformed escape (`%zz`, `%+1`, a
/// trailing `%`) through as text; in a key name that is an error, so it is refused first.
fn pct_decode(s: &str) -> Option<Vec<u8>> {
    let well_formed = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    well_formed.then(|| percent_decode_str(s).collect())
}

fn utf8(v: Vec<u8>) -> Option<String> {
    String::from_utf8(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_one_rule() {
        for ok in ["dpop", "client-auth", "a b", "clé"] {
            assert_eq!(Label::parse(ok).unwrap().as_str(), ok);
        }
        for (bad, why) in [
            ("", "empty"),
            ("pkcs11:object=x", "pkcs11:"),
            ("a\nb", "control"),
            ("\u{7f}", "control"),
        ] {
            let e = Label::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn labels_and_uris() {
        let n = KeyName::parse("dpop").unwrap();
        assert!(n.matches("dpop", b"x"));
        let n = KeyName::parse("pkcs11:token=keybound-dev;object=dp%6Fp;type=private").unwrap();
        assert!(n.matches("dpop", b"x"));
        assert!(n.check_token("keybound-dev").is_ok());
        assert!(n.check_token("other").is_err());
        let n = KeyName::parse("pkcs11:id=%01%02").unwrap();
        assert!(n.matches("anything", &[1, 2]));
        assert!(!n.matches("anything", &[1]));
        let n = KeyName::parse("pkcs11:object=%41%2fb%2F%7e~;id=%Ff%00").unwrap();
        assert!(n.matches("A/b/~~", &[0xff, 0]));
        let label = "clé-1._~ a/b%";
        assert_eq!(
            KeyName::uri(label, &[]),
            "pkcs11:object=cl%C3%A9-1._~%20a%2Fb%25;id="
        );
        assert!(
            KeyName::parse(&KeyName::uri(label, &[7]))
                .unwrap()
                .matches(label, &[7])
        );
        let uri = KeyName::uri("dp op;x", &[1, 0xab]);
        assert_eq!(uri, "pkcs11:object=dp%20op%3Bx;id=%01%ab");
        assert!(KeyName::parse(&uri).unwrap().matches("dp op;x", &[1, 0xab]));
        assert!(KeyName::exact("dpop", &[2]).matches("dpop", &[2]));
        assert!(!KeyName::exact("dpop", &[2]).matches("dpop", &[3]));
        for bad in [
            "",
            "pkcs11:",
            "pkcs11:object",
            "pkcs11:foo=1",
            "pkcs11:id=%zz",
            // Malformed escapes are errors, not text and not a lenient parse.
            "pkcs11:id=%+1",
            "pkcs11:id=%-1",
            "pkcs11:id=%1",
            "pkcs11:id=%",
            "pkcs11:object=a%",
            "pkcs11:object=a%2",
            "pkcs11:object=%%41",
            "pkcs11:object=%é1",
            // Decodes to bytes that are not UTF-8.
            "pkcs11:object=%ff",
            "pkcs11:object=a;type=public",
        ] {
            assert!(KeyName::parse(bad).is_err(), "{bad}");
        }
    }
}
