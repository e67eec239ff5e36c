//! DPoP proofs (RFC 9449 §4): header, claims, `htu` and `htm` rules, `ath`.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use url::Url;

use super::OAuthError;
use crate::jose::{self, Alg, Header, Jwk};

/// RFC 9449 §4.2 claims. `nonce` and `ath` only when present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofClaims {
    pub jti: String,
    pub htm: String,
    pub htu: String,
    pub iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
}

/// RFC 9449 §4.2: `typ: dpop+jwt`, `alg`, and the public key as `jwk` (a key's JWK is
/// computed once, `SigningKey::jwk`).
pub fn header(alg: Alg, jwk: &Jwk) -> Header {
    Header {
        typ: Some("dpop+jwt".into()),
        alg,
        kid: None,
        jwk: Some(jwk.clone()),
    }
}

/// Builds the claims from an HTTP method and request URL; `iat` and `jti` come from the
/// caller. `access_token`, when given, is bound through `ath`.
pub fn claims(
    method: &str,
    url: &str,
    nonce: Option<&str>,
    access_token: Option<&str>,
    iat: u64,
    jti: String,
) -> Result<ProofClaims, OAuthError> {
    Ok(ProofClaims {
        jti,
        htm: htm(method)?,
        htu: htu(url)?,
        iat,
        nonce: nonce.map(str::to_string),
        ath: access_token.map(ath),
    })
}

/// RFC 9449 §4.2: `htu` is the request URI without query and fragment; scheme and host
/// lowercased and the default port dropped (RFC 3986 §6.2.2, §6.2.3).
pub fn htu(url: &str) -> Result<String, OAuthError> {
    // A caller asks for proofs for the same few URLs again and again: the last ones this
    // thread normalised are kept, keyed by the exact URL given (the result is a function of
    // it alone). Only good URLs are kept; a bad one is refused afresh each time.
    const KEPT: usize = 8;
    thread_local! {
        static RECENT: std::cell::RefCell<Vec<(String, String)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    if let Some(hit) = RECENT.with_borrow(|kept| {
        kept.iter()
            .rev()
            .find(|(given, _)| given == url)
            .map(|(_, htu)| htu.clone())
    }) {
        return Ok(hit);
    }
    let htu = match plain_htu(url) {
        Some(htu) => htu,
        None => {
            let mut parsed = absolute_http_url("URL", url)?;
            parsed.set_query(None);
            parsed.set_fragment(None);
            parsed.to_string()
        }
    };
    RECENT.with_borrow_mut(|kept| {
        if kept.len() == KEPT {
            kept.remove(0);
        }
        kept.push((url.to_owned(), htu.clone()));
    });
    Ok(htu)
}

/// [`htu`] without the URL parser, for a URL whose parsed form is the URL itself up to
/// its query or fragment (so the parser would change nothing): a lower-case `http` or
/// `https` scheme; a host that is a lower-case DNS name of plain labels (its last one
/// starting with a letter, no `xn--`) or a dotted-quad IPv4 address in its usual form; no
/// user; a port other than the scheme's default; a path of plain characters with no dot
/// segment. Any other URL goes to the parser (`None`). Most request URLs are plain, and
/// the parser is the larger part of a proof's JOSE work.
fn plain_htu(url: &str) -> Option<String> {
    let (default_port, after) = match url.strip_prefix("https://") {
        Some(rest) => ("443", rest),
        None => ("80", url.strip_prefix("http://")?),
    };
    let rest = &after[..after.find(['?', '#']).unwrap_or(after.len())];
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let label = |l: &str| {
        !l.is_empty()
            && !l.starts_with("xn--")
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let octet = |o: &str| {
        !o.is_empty()
            && o.len() <= 3
            && o.bytes().all(|b| b.is_ascii_digit())
            && (o == "0" || !o.starts_with('0'))
            && o.parse::<u16>().is_ok_and(|v| v <= 255)
    };
    let dns = host.split('.').all(label)
        && host
            .rsplit('.')
            .next()
            .is_some_and(|last| last.starts_with(|c: char| c.is_ascii_lowercase()));
    let ipv4 = host.split('.').count() == 4 && host.split('.').all(octet);
    if !(dns || ipv4) {
        return None;
    }
    if let Some(port) = port {
        let plain = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && !port.starts_with('0')
            && port.parse::<u16>().is_ok()
            && port != default_port;
        if !plain {
            return None;
        }
    }
    let plain_path = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&()*+,;=:@/".contains(&b))
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..");
    if !plain_path {
        return None;
    }
    let scheme_and_authority = &url[..url.len() - after.len() + authority.len()];
    Some(if path.is_empty() {
        format!("{scheme_and_authority}/")
    } else {
        format!("{scheme_and_authority}{path}")
    })
}

/// `htm`: an HTTP method token (RFC 9110 §9.1). Standard methods are case-insensitive here
/// and sent in upper case.
pub fn htm(method: &str) -> Result<String, OAuthError> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    if let Some(m) = STANDARD.iter().find(|m| m.eq_ignore_ascii_case(method)) {
        return Ok((*m).to_string());
    }
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if method.is_empty() || !method.chars().all(tchar) {
        return Err(OAuthError::BadMethod(method.into()));
    }
    Ok(method.into())
}

/// RFC 9449 §4.2: `ath` = base64url(SHA-256(ASCII(access token))).
pub fn ath(access_token: &str) -> String {
    jose::b64(sha2::Sha256::digest(access_token.as_bytes()))
}

/// Parses `value` as an absolute `http`/`https` URL with a host; `what` names it in errors.
pub fn absolute_http_url(what: &'static str, value: &str) -> Result<Url, OAuthError> {
    let bad = |reason: &str| OAuthError::BadUrl {
        what,
        value: value.into(),
        reason: reason.into(),
    };
    let url = Url::parse(value).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(&format!(
            "scheme '{}' is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it carries user credentials"));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `htu` keeps for a URL is what it gives for it afresh, however many URLs come
    /// and go; a bad URL is refused every time.
    #[test]
    fn htu_kept_answers_are_the_fresh_ones() {
        let urls: Vec<String> = (0..20)
            .map(|i| format!("HTTPS://Host{}.Example:443/p/{i}?q={i}#f", i % 3))
            .collect();
        for _ in 0..3 {
            for (i, u) in urls.iter().enumerate() {
                assert_eq!(
                    htu(u).unwrap(),
                    format!("https://host{}.example/p/{i}", i % 3)
                );
                assert!(htu("ftp://a.example/x").is_err());
            }
        }
    }

    #[test]
    fn htu_normalisation() {
        assert_eq!(
            htu("HTTPS://Resource.Example.org:443/path?q=1#f").unwrap(),
            "https://resource.example.org/path"
        );
        assert_eq!(
            htu("http://127.0.0.1:8080/token").unwrap(),
            "http://127.0.0.1:8080/token"
        );
        assert_eq!(htu("https://a.example").unwrap(), "https://a.example/");
        for bad in [
            "/token",
            "ftp://a.example/x",
            "token",
            "https://u:p@a.example/",
        ] {
            assert!(htu(bad).is_err(), "{bad}");
        }
    }

    /// The parser-free path gives what the parser gives, or leaves the URL to it.
    #[test]
    fn plain_htu_agrees_with_the_parser() {
        let slow = |u: &str| {
            absolute_http_url("URL", u).ok().map(|mut url| {
                url.set_query(None);
                url.set_fragment(None);
                url.to_string()
            })
        };
        let schemes = ["https://", "http://", "HTTPS://", "Http://", "ftp://", ""];
        let hosts = [
            "a.example",
            "A.example",
            "localhost",
            "127.0.0.1",
            "127.1",
            "0x7f.0.0.1",
            "1.2.3.04",
            "256.1.1.1",
            "a.example.",
            "-a.example",
            "a-.b",
            "xn--nxasmq6b.example",
            "xn--a.example",
            "a..b",
            "1.2.3",
            "a.123",
            "ex_ample.org",
            "[::1]",
            "",
            "u@a.example",
            "u:p@a.example",
            "%41.example",
            "a.example\\x",
        ];
        let ports = [
            "", ":443", ":80", ":8080", ":0", ":08080", ":65535", ":65536", ":", ":x",
        ];
        let paths = [
            "",
            "/",
            "/token",
            "/a/b/",
            "/./a",
            "/a/../b",
            "/a/.",
            "/%2e/",
            "/a b",
            "/a%20b",
            "/~user/x;y=1,z",
            "/a?q=1",
            "/a#f",
            "?q",
            "#f",
            "/a\\b",
            "/\u{e9}",
            "//x",
            "/a:b@c",
            "/{x}",
            "/a|b",
            "/a'b",
            "/.well-known/x",
        ];
        let mut plain = 0;
        for scheme in schemes {
            for host in hosts {
                for port in ports {
                    for path in paths {
                        let url = format!("{scheme}{host}{port}{path}");
                        if let Some(fast) = plain_htu(&url) {
                            plain += 1;
                            assert_eq!(Some(fast), slow(&url), "{url}");
                        }
                    }
                }
            }
        }
        // The common forms do take the fast path.
        assert!(plain > 400, "{plain}");
        for url in [
            "https://dev-123.okta.com/oauth2/v1/token",
            "http://127.0.0.1:8080/token",
            "https://api.example.com/v1/users",
        ] {
            assert!(plain_htu(url).is_some(), "{url}");
        }
    }

    #[test]
    fn htm_rules() {
        assert_eq!(htm("post").unwrap(), "POST");
        assert_eq!(htm("PROPFIND").unwrap(), "PROPFIND");
        assert!(htm("GE T").is_err());
        assert!(htm("").is_err());
    }

    #[test]
    fn claims_are_exact() {
        let c = claims(
            "post",
            "https://server.example.com/token?x#y",
            Some("n1"),
            None,
            1562262616,
            "-BwC3ESc6acc2lTc".into(),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"jti":"-BwC3ESc6acc2lTc","htm":"POST","htu":"https://server.example.com/token","iat":1562262616,"nonce":"n1"}"#
        );
    }
}
