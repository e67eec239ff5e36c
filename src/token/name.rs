//! Naming a key: a label, or an RFC 7512 `pkcs11:` URI (`pkcs11:token=keybound-dev;object=dpop`).

use std::fmt;
use std::path::{Path, PathBuf};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::{TokenDescription, TokenError};

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

/// A parsed key name: a label, or an RFC 7512 `pkcs11:` URI read as p11-kit reads it.
/// Every attribute a URI holds is either checked against the token, the module or the
/// key ([`KeyName::check_token`], [`KeyName::matches`]) or refused when parsed: none is
/// accepted and then ignored, except `x-` vendor attributes (RFC 7512 §2.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyName {
    text: String,
    label: Option<String>,
    id: Option<Vec<u8>>,
    token: Option<String>,
    /// The other token, library and query attributes, checked by [`KeyName::check_token`].
    wants: Wants,
}

/// What a URI names besides the object: compared with the token and module keybound opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Wants {
    manufacturer: Option<String>,
    serial: Option<String>,
    model: Option<String>,
    library_manufacturer: Option<String>,
    library_description: Option<String>,
    library_version: Option<(u8, u8)>,
    module_path: Option<String>,
    module_name: Option<String>,
    pin_source: Option<PathBuf>,
    slot_id: Option<u64>,
    slot_description: Option<String>,
    slot_manufacturer: Option<String>,
}

/// The path attributes of RFC 7512 §2.3 keybound reads, and p11-kit's `object-type`.
const PATH_ATTRIBUTES: &str = "token, manufacturer, serial, model, library-manufacturer, \
    library-description, library-version, slot-id, slot-description, slot-manufacturer, \
    object, id, type (or object-type), x-*";
/// Every path attribute name of RFC 7512 §2.3 (`type` standing for `object-type` too).
const PATH_KEYS: &[&str] = &[
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "object",
    "id",
    "type",
    "slot-id",
    "slot-description",
    "slot-manufacturer",
];
/// Every query attribute name of RFC 7512 §2.3.
const QUERY_KEYS: &[&str] = &["pin-source", "pin-value", "module-path", "module-name"];
/// The query attributes of RFC 7512 §2.3 keybound reads.
const QUERY_ATTRIBUTES: &str = "module-path, module-name, pin-source, x-*";

impl KeyName {
    pub fn parse(text: &str) -> Result<KeyName, TokenError> {
        let bad = |reason: &str| TokenError::BadKeyName {
            name: redacted(text),
            reason: reason.into(),
        };
        let Some(rest) = text.strip_prefix("pkcs11:") else {
            if text.is_empty() {
                return Err(bad("it is empty"));
            }
            return Ok(KeyName {
                text: text.into(),
                label: Some(text.into()),
                id: None,
                token: None,
                wants: Wants::default(),
            });
        };
        // RFC 7512 §2.3: pk11-path [ "?" pk11-query ]. The first '?' ends the path: a
        // path value may not hold one unescaped, a query value may.
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let mut name = KeyName {
            text: text.into(),
            label: None,
            id: None,
            token: None,
            wants: Wants::default(),
        };
        let mut seen: Vec<&str> = Vec::new();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, raw) = attr
                .split_once('=')
                .ok_or_else(|| bad(&format!("attribute '{attr}' has no '='")))?;
            if is_vendor(k) {
                // RFC 7512 §2.3: vendor attributes; keybound knows none and ignores them,
                // but a malformed one is still malformed.
                pct_decode(raw, PATH_CHARS).map_err(|why| bad(&format!("{k}: {why}")))?;
                continue;
            }
            // p11-kit reads `object-type` as `type`: one attribute under two names.
            let key = if k == "object-type" { "type" } else { k };
            if seen.contains(&key) {
                return Err(bad(&format!(
                    "attribute '{k}' appears twice (RFC 7512 §2.3: each attribute at most \
                     once; object-type is another name of type)"
                )));
            }
            seen.push(key);
            if !PATH_KEYS.contains(&key) {
                return Err(bad(&format!(
                    "unknown path attribute '{k}'; known: {PATH_ATTRIBUTES}"
                )));
            }
            let v = pct_decode(raw, PATH_CHARS).map_err(|why| bad(&format!("{k}: {why}")))?;
            let text = |v: Vec<u8>| utf8(v).ok_or_else(|| bad(&format!("{k} is not UTF-8")));
            match key {
                "object" => name.label = Some(text(v)?),
                "token" => name.token = Some(text(v)?),
                "id" => name.id = Some(v),
                "manufacturer" => name.wants.manufacturer = Some(text(v)?),
                "serial" => name.wants.serial = Some(text(v)?),
                "model" => name.wants.model = Some(text(v)?),
                "library-manufacturer" => name.wants.library_manufacturer = Some(text(v)?),
                "library-description" => name.wants.library_description = Some(text(v)?),
                "library-version" => {
                    let v = text(v)?;
                    name.wants.library_version = Some(version(&v).ok_or_else(|| {
                        bad(&format!(
                            "library-version '{v}' is not <major>[.<minor>] (numbers up to 255)"
                        ))
                    })?);
                }
                "type" => match text(v)?.as_str() {
                    "private" => {}
                    kind @ ("public" | "cert" | "secret-key" | "data") => {
                        return Err(bad(&format!(
                            "{k}={kind} names no private key, and keybound signs only with \
                             private keys; write {k}=private or leave {k} out"
                        )));
                    }
                    other => {
                        return Err(bad(&format!(
                            "{k} '{other}' is not one of private, public, cert, secret-key, data"
                        )));
                    }
                },
                // Checked against the slot the configured token is in now (slot numbers
                // change when a token is plugged in again: prefer token= or serial=).
                "slot-id" => {
                    let v = text(v)?;
                    name.wants.slot_id = Some(v.parse().map_err(|_| {
                        bad(&format!("slot-id '{v}' is not a decimal slot number"))
                    })?);
                }
                "slot-description" => name.wants.slot_description = Some(text(v)?),
                "slot-manufacturer" => name.wants.slot_manufacturer = Some(text(v)?),
                other => {
                    return Err(bad(&format!(
                        "unknown path attribute '{other}'; known: {PATH_ATTRIBUTES}"
                    )));
                }
            }
        }
        let mut seen_query: Vec<&str> = Vec::new();
        for attr in query.into_iter().flat_map(|q| q.split('&')) {
            if attr.is_empty() {
                continue;
            }
            let (k, raw) = attr
                .split_once('=')
                .ok_or_else(|| bad(&format!("attribute '{attr}' has no '='")))?;
            if is_vendor(k) {
                pct_decode(raw, QUERY_CHARS).map_err(|why| bad(&format!("{k}: {why}")))?;
                continue;
            }
            if seen_query.contains(&k) {
                return Err(bad(&format!(
                    "attribute '{k}' appears twice (RFC 7512 §2.3: each attribute at most once)"
                )));
            }
            seen_query.push(k);
            if !QUERY_KEYS.contains(&k) {
                return Err(bad(&format!(
                    "unknown query attribute '{k}'; known: {QUERY_ATTRIBUTES} \
                     (pin-value is refused)"
                )));
            }
            let v = pct_decode(raw, QUERY_CHARS).map_err(|why| bad(&format!("{k}: {why}")))?;
            let text = |v: Vec<u8>| utf8(v).ok_or_else(|| bad(&format!("{k} is not UTF-8")));
            match k {
                "pin-value" => {
                    return Err(bad(
                        "pin-value is refused: a PIN never sits in a URI (URIs end up in logs, \
                         shell history and process lists); keybound reads the PIN from the \
                         config's pin_env or pin_file",
                    ));
                }
                "pin-source" => {
                    name.wants.pin_source = Some(pin_source(&text(v)?).map_err(|w| bad(&w))?)
                }
                "module-path" => name.wants.module_path = Some(text(v)?),
                "module-name" => name.wants.module_name = Some(text(v)?),
                other => {
                    return Err(bad(&format!(
                        "unknown query attribute '{other}'; known: {QUERY_ATTRIBUTES} \
                         (pin-value is refused)"
                    )));
                }
            }
        }
        if name.label.is_none() && name.id.is_none() {
            return Err(bad("it needs object=<label> or id=<%-encoded CKA_ID>"));
        }
        Ok(name)
    }

    /// Errors unless every token, library and query attribute of the name describes the
    /// token and module keybound opened: a URI naming serial X never matches a token with
    /// serial Y, and a URI never chooses the module or the PIN (the config does).
    pub fn check_token(&self, opened: &TokenDescription) -> Result<(), TokenError> {
        if let Some(t) = &self.token
            && *t != opened.token_label
        {
            return Err(TokenError::OtherToken {
                name: self.text.clone(),
                named: t.clone(),
                configured: opened.token_label.clone(),
            });
        }
        let w = &self.wants;
        let mismatch = |attribute: &'static str, reason: String| TokenError::UriMismatch {
            name: self.text.clone(),
            attribute,
            reason,
        };
        for (attr, named, found) in [
            ("manufacturer", &w.manufacturer, &opened.manufacturer),
            ("serial", &w.serial, &opened.serial),
            ("model", &w.model, &opened.model),
        ] {
            if let Some(named) = named
                && named != found
            {
                return Err(mismatch(
                    attr,
                    format!(
                        "it names {attr} '{named}', but the configured token's {attr} is '{found}'"
                    ),
                ));
            }
        }
        let wants_module = w.library_manufacturer.is_some()
            || w.slot_id.is_some()
            || w.slot_description.is_some()
            || w.slot_manufacturer.is_some()
            || w.library_description.is_some()
            || w.library_version.is_some()
            || w.module_path.is_some()
            || w.module_name.is_some()
            || w.pin_source.is_some();
        if !wants_module {
            return Ok(());
        }
        let Some(module) = &opened.module else {
            return Err(mismatch(
                "module",
                format!(
                    "it names a PKCS#11 module, library or pin-source, and the {} backend loads \
                 no PKCS#11 module",
                    opened.backend
                ),
            ));
        };
        if let Some(id) = w.slot_id
            && id != module.slot_id
        {
            return Err(mismatch(
                "slot-id",
                format!(
                    "it names slot-id {id}, but the configured token is in slot {} (slot numbers \
                 change when a token is plugged in again: name the token with token= or serial=)",
                    module.slot_id
                ),
            ));
        }
        for (attr, named, found) in [
            (
                "slot-description",
                &w.slot_description,
                &module.slot_description,
            ),
            (
                "slot-manufacturer",
                &w.slot_manufacturer,
                &module.slot_manufacturer,
            ),
            (
                "library-manufacturer",
                &w.library_manufacturer,
                &module.library_manufacturer,
            ),
            (
                "library-description",
                &w.library_description,
                &module.library_description,
            ),
        ] {
            if let Some(named) = named
                && named != found
            {
                return Err(mismatch(
                    attr,
                    format!("it names {attr} '{named}', but the module's is '{found}'"),
                ));
            }
        }
        if let Some((major, minor)) = w.library_version
            && (major, minor) != module.library_version
        {
            let (m, n) = module.library_version;
            return Err(mismatch(
                "library-version",
                format!("it names library-version {major}.{minor}, but the module's is {m}.{n}"),
            ));
        }
        // keybound loads one module, the one its config names (checked for who may change
        // it): a name a caller sends can only confirm that module, never choose another.
        let config_module = module
            .paths
            .first()
            .map_or_else(String::new, |p| p.display().to_string());
        if let Some(path) = &w.module_path
            && !module.paths.iter().any(|p| p == Path::new(path))
        {
            return Err(mismatch(
                "module-path",
                format!(
                    "it names module-path '{path}', but keybound loads only the module of its \
                 config, '{config_module}'; a key name never makes keybound load a library"
                ),
            ));
        }
        if let Some(named) = &w.module_name
            && !module.paths.iter().any(|p| module_name_matches(named, p))
        {
            return Err(mismatch(
                "module-name",
                format!(
                    "it names module-name '{named}', but keybound loads only the module of its \
                 config, '{config_module}'; a key name never makes keybound load a library"
                ),
            ));
        }
        // The PIN is read once, from the config's pin_env or pin_file (with the trust checks
        // of `Pin::read`). A pin-source in a name may only repeat that file: keybound never
        // opens a file a key name points to, since names also come from agent callers, who
        // could otherwise probe files with keybound's rights or switch its login.
        if let Some(path) = &w.pin_source {
            let configured = match &module.pin_file {
                Some(file) => format!("pin_file '{}'", file.display()),
                None => "no pin_file (the PIN comes from pin_env)".into(),
            };
            if module.pin_file.as_deref() != Some(path.as_path()) {
                return Err(mismatch(
                    "pin-source",
                    format!(
                        "it names pin-source '{}', but the config has {configured}; keybound logs \
                     in with the PIN its config names and never reads a file a key name \
                     points to",
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The name of exactly the key with this label and id.
    pub(crate) fn exact(label: &str, id: &[u8]) -> KeyName {
        KeyName {
            text: KeyName::uri(label, id),
            label: Some(label.into()),
            id: Some(id.to_vec()),
            token: None,
            wants: Wants::default(),
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

/// RFC 7512 §2.3 `pk11-pchar` besides unreserved characters and escapes: a path value
/// holds no unescaped `;`, `/`, `?`, `#`, `%`, space or non-ASCII byte.
const PATH_CHARS: &[u8] = b":[]@!$'()*+,=&";
/// RFC 7512 §2.3 `pk11-qchar` besides unreserved characters and escapes (no `&`).
const QUERY_CHARS: &[u8] = b":[]@!$'()*+,=/?|";

/// Decodes a value per RFC 3986 §2.1: `%` and two hex digits. A malformed escape (`%zz`,
/// `%+1`, `%1`, a lone `%`) or a character the grammar leaves out is an error, never text.
fn pct_decode(s: &str, allowed: &[u8]) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    "a '%' must be followed by two hex digits (RFC 3986 §2.1); write %25 for '%'"
                        .to_string()
                })?;
            out.push(hex);
            i += 3;
            continue;
        }
        let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if !unreserved && !allowed.contains(&b) {
            return Err(
                match char::from_u32(u32::from(b)).filter(|_| b.is_ascii()) {
                    Some(c) => format!("'{c}' must be %-encoded (RFC 7512 §2.3)"),
                    None => {
                        "non-ASCII characters must be %-encoded as UTF-8 (RFC 7512 §2.3)".into()
                    }
                },
            );
        }
        out.push(b);
        i += 1;
    }
    Ok(out)
}

/// `text` with the value of every `pin-value` attribute replaced: an error repeats the name
/// it refuses, and a PIN never reaches a log or a reply.
fn redacted(text: &str) -> String {
    // Everything from the first pin-value on (any case): a value may hold `?` and more,
    // and what follows a PIN is not worth the risk of echoing part of it.
    match text.to_ascii_lowercase().find("pin-value") {
        Some(at) => format!("{}pin-value=[redacted]", text.get(..at).unwrap_or_default()),
        None => text.to_string(),
    }
}

/// RFC 7512 §2.3 `pk11-v-attr-nm-char`: `x-` and letters, digits, `-`, `_`.
fn is_vendor(key: &str) -> bool {
    key.strip_prefix("x-").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// RFC 7512 §2.3 `pk11-lib-ver`: `1*DIGIT [ "." 1*DIGIT ]`; a missing minor is 0.
fn version(v: &str) -> Option<(u8, u8)> {
    let digits = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u8>().ok())
            .flatten()
    };
    match v.split_once('.') {
        Some((major, minor)) => Some((digits(major)?, digits(minor)?)),
        None => Some((digits(v)?, 0)),
    }
}

/// RFC 7512 §2.3 `pin-source`: an absolute path, or a `file:` URI of one.
fn pin_source(v: &str) -> Result<PathBuf, String> {
    let path = match v.strip_prefix("file:") {
        Some(rest) => rest
            .strip_prefix("//localhost")
            .or_else(|| rest.strip_prefix("//"))
            .unwrap_or(rest),
        None => v,
    };
    if !path.starts_with('/') {
        return Err(format!(
            "pin-source '{v}' is not an absolute path or a file: URI of one"
        ));
    }
    Ok(PathBuf::from(path))
}

/// RFC 7512 §2.3 `module-name`: the module's file name without directory, `lib` prefix
/// and `.so` suffix (`softhsm2` for `/usr/lib/softhsm/libsofthsm2.so`).
fn module_name_matches(named: &str, path: &Path) -> bool {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    let stem = file.split(".so").next().unwrap_or(file);
    !named.is_empty() && (stem == named || stem.strip_prefix("lib") == Some(named))
}

fn utf8(v: Vec<u8>) -> Option<String> {
    String::from_utf8(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::ModuleDescription;

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
        assert!(n.check_token(&opened()).is_ok());
        let other = TokenDescription {
            token_label: "other".into(),
            ..opened()
        };
        assert!(n.check_token(&other).is_err());
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

    /// The token and module keybound opened, as SoftHSM describes them.
    fn opened() -> TokenDescription {
        TokenDescription {
            backend: "pkcs11",
            token_label: "keybound-dev".into(),
            manufacturer: "SoftHSM project".into(),
            model: "SoftHSM v2".into(),
            serial: "5c4bd1b2a1f0e3d7".into(),
            profile: "softhsm2".into(),
            profile_tested_live: true,
            module: Some(ModuleDescription {
                paths: vec![
                    "/usr/lib/softhsm/libsofthsm2.so".into(),
                    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so".into(),
                ],
                library_manufacturer: "SoftHSM".into(),
                library_description: "Implementation of PKCS11".into(),
                library_version: (2, 6),
                pin_file: Some("/etc/keybound/pin".into()),
                slot_id: 1_234_567,
                slot_description: "SoftHSM slot ID 0x12d687".into(),
                slot_manufacturer: "SoftHSM project".into(),
            }),
        }
    }

    fn refusal(uri: &str) -> String {
        match KeyName::parse(uri) {
            Ok(n) => match n.check_token(&opened()) {
                Ok(()) => panic!("{uri} was accepted"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_token_and_library_attribute_is_checked() {
        let ok = [
            "pkcs11:token=keybound-dev;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;\
             serial=5c4bd1b2a1f0e3d7;object=dpop;type=private",
            "pkcs11:library-manufacturer=SoftHSM;library-description=Implementation%20of%20\
             PKCS11;library-version=2.6;object=dpop",
            "pkcs11:object=dpop?module-path=/usr/lib/softhsm/libsofthsm2.so",
            "pkcs11:object=dpop?module-path=/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "pkcs11:object=dpop?module-name=softhsm2",
            "pkcs11:object=dpop?module-name=libsofthsm2&x-vendor=1",
            "pkcs11:object=dpop?pin-source=/etc/keybound/pin",
            "pkcs11:object=dpop?pin-source=file:///etc/keybound/pin",
            "pkcs11:object=dpop;x-foo=bar;object-type=private",
            "pkcs11:slot-id=1234567;slot-description=SoftHSM%20slot%20ID%200x12d687;\
             slot-manufacturer=SoftHSM%20project;object=dpop",
        ];
        for uri in ok {
            let n = KeyName::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            n.check_token(&opened())
                .unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert!(n.matches("dpop", b"x"), "{uri}");
        }
        for (uri, says) in [
            (
                "pkcs11:serial=0000000000000000;object=dpop",
                "serial '0000000000000000', but the configured token's serial is '5c4bd1b2a1f0e3d7'",
            ),
            (
                "pkcs11:manufacturer=Yubico;object=dpop",
                "manufacturer 'Yubico'",
            ),
            ("pkcs11:model=YubiHSM;object=dpop", "model 'YubiHSM'"),
            (
                "pkcs11:slot-id=1;object=dpop",
                "slot-id 1, but the configured token is in slot 1234567",
            ),
            (
                "pkcs11:slot-description=other;object=dpop",
                "slot-description 'other'",
            ),
            (
                "pkcs11:slot-manufacturer=Acme;object=dpop",
                "slot-manufacturer 'Acme'",
            ),
            ("pkcs11:token=other;object=dpop", "names token 'other'"),
            (
                "pkcs11:library-manufacturer=Yubico;object=dpop",
                "library-manufacturer 'Yubico'",
            ),
            (
                "pkcs11:library-description=x;object=dpop",
                "library-description 'x'",
            ),
            (
                "pkcs11:library-version=2;object=dpop",
                "library-version 2.0, but the module's is 2.6",
            ),
            (
                "pkcs11:object=dpop?module-path=/tmp/evil.so",
                "module-path '/tmp/evil.so', but keybound loads only the module of its config, \
                 '/usr/lib/softhsm/libsofthsm2.so'",
            ),
            (
                "pkcs11:object=dpop?module-name=opensc-pkcs11",
                "module-name 'opensc-pkcs11'",
            ),
            ("pkcs11:object=dpop?module-name=", "module-name ''"),
            (
                "pkcs11:object=dpop?pin-source=/home/me/pin",
                "pin-source '/home/me/pin', but the config has pin_file '/etc/keybound/pin'",
            ),
        ] {
            let e = refusal(uri);
            assert!(e.contains(says), "{uri}: {e}");
        }
        // A backend without a module: no library or query attribute can hold.
        let tpm = TokenDescription {
            module: None,
            ..opened()
        };
        let n = KeyName::parse("pkcs11:object=dpop?module-name=softhsm2").unwrap();
        assert!(
            n.check_token(&tpm)
                .unwrap_err()
                .to_string()
                .contains("loads no PKCS#11 module")
        );
        // A PIN from the environment: no pin-source names it.
        let env = TokenDescription {
            module: opened().module.map(|m| ModuleDescription {
                pin_file: None,
                ..m
            }),
            ..opened()
        };
        let n = KeyName::parse("pkcs11:object=dpop?pin-source=/etc/keybound/pin").unwrap();
        assert!(
            n.check_token(&env)
                .unwrap_err()
                .to_string()
                .contains("no pin_file")
        );
    }

    #[test]
    fn refused_attributes_say_why() {
        for (uri, says) in [
            (
                "pkcs11:object=a?pin-value=1234",
                "a PIN never sits in a URI",
            ),
            (
                "pkcs11:object=a?pin-value=1234&module-name=x",
                "'pkcs11:object=a?pin-value=[redacted]'",
            ),
            (
                "pkcs11:object=a;pin-value=1234;id=%01",
                "'pkcs11:object=a;pin-value=[redacted]'",
            ),
            // A `?` may sit inside a query value: nothing after pin-value is echoed.
            (
                "pkcs11:object=a?pin-value=12?34",
                "'pkcs11:object=a?pin-value=[redacted]'",
            ),
            (
                "pkcs11:object=a?PIN-VALUE=12?34",
                "'pkcs11:object=a?pin-value=[redacted]'",
            ),
            (
                "pkcs11:object=a;pin-value=1234",
                "unknown path attribute 'pin-value'",
            ),
            (
                "pkcs11:object=a;foo=1",
                "unknown path attribute 'foo'; known: token, manufacturer",
            ),
            (
                "pkcs11:object=a?foo=1",
                "unknown query attribute 'foo'; known: module-path",
            ),
            (
                "pkcs11:object=a?object=b",
                "unknown query attribute 'object'",
            ),
            (
                "pkcs11:object=a;module-path=/x",
                "unknown path attribute 'module-path'",
            ),
            ("pkcs11:object=a;object=b", "'object' appears twice"),
            (
                "pkcs11:object=a;type=private;object-type=private",
                "'object-type' appears twice",
            ),
            (
                "pkcs11:object=a;serial=1;serial=1",
                "'serial' appears twice",
            ),
            (
                "pkcs11:object=a?module-name=x&module-name=x",
                "'module-name' appears twice",
            ),
            (
                "pkcs11:object=a;type=public",
                "type=public names no private key",
            ),
            (
                "pkcs11:object=a;object-type=cert",
                "object-type=cert names no private key",
            ),
            (
                "pkcs11:object=a;type=secret-key",
                "keybound signs only with private keys",
            ),
            ("pkcs11:object=a;type=data", "names no private key"),
            (
                "pkcs11:object=a;type=privat",
                "'privat' is not one of private",
            ),
            (
                "pkcs11:object=a;slot-id=x1",
                "slot-id 'x1' is not a decimal slot number",
            ),
            (
                "pkcs11:object=a;library-version=2.x",
                "is not <major>[.<minor>]",
            ),
            (
                "pkcs11:object=a;library-version=256",
                "is not <major>[.<minor>]",
            ),
            ("pkcs11:object=a?pin-source=pin.txt", "not an absolute path"),
            (
                "pkcs11:object=a?pin-source=|/bin/cat",
                "not an absolute path",
            ),
            (
                "pkcs11:object=a?pin-source=https://x/pin",
                "not an absolute path",
            ),
            // Malformed escapes and characters the grammar leaves out (RFC 7512 §2.3).
            ("pkcs11:id=%+1", "two hex digits"),
            (
                "pkcs11:id=%01;x-a=%zz",
                "x-a: a '%' must be followed by two hex digits",
            ),
            (
                "pkcs11:id=%01?x-a=%2",
                "x-a: a '%' must be followed by two hex digits",
            ),
            ("pkcs11:id=%1", "two hex digits"),
            ("pkcs11:id=%zz", "two hex digits"),
            ("pkcs11:id=%", "two hex digits"),
            ("pkcs11:object=a/b", "'/' must be %-encoded"),
            ("pkcs11:object=a b", "' ' must be %-encoded"),
            ("pkcs11:object=a#b", "'#' must be %-encoded"),
            (
                "pkcs11:object=clé",
                "non-ASCII characters must be %-encoded",
            ),
            (
                "pkcs11:object=a?module-name=a&b",
                "attribute 'b' has no '='",
            ),
            ("pkcs11:object=a?module-path=/a b", "' ' must be %-encoded"),
        ] {
            let e = refusal(uri);
            assert!(e.contains(says), "{uri}: {e}");
        }
    }

    #[test]
    fn values_decode_per_rfc_3986() {
        // '&' may stand in a path value, '/', '?' and '|' in a query value (RFC 7512 §2.3).
        let n = KeyName::parse(
            "pkcs11:object=a&b:c@d;id=%00%FF?module-path=/usr/lib/softhsm/libsofthsm2.so&x-q=a?b|c",
        )
        .unwrap();
        assert!(n.matches("a&b:c@d", &[0, 0xff]));
        n.check_token(&opened()).unwrap();
        // '?' ends the path; object names before and after it stay apart.
        let n = KeyName::parse("pkcs11:object=a%3Fb").unwrap();
        assert!(n.matches("a?b", b""));
        assert!(KeyName::parse("pkcs11:object=a?b").is_err());
        // An empty object matches only an empty label (an empty value is a value).
        let n = KeyName::parse("pkcs11:object=").unwrap();
        assert!(n.matches("", b""));
        assert!(!n.matches("a", b""));
        // x- attributes hold any grammatical value and change nothing.
        assert_eq!(
            KeyName::parse("pkcs11:object=a;x-a=1;x-b_2=%41")
                .unwrap()
                .wants,
            Wants::default()
        );
        // A name like "x-" alone is not a vendor attribute.
        assert!(refusal("pkcs11:object=a;x-=1").contains("unknown path attribute 'x-'"));
    }
}
