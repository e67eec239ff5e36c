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
    let mut url = absolute_http_url("URL", url)?;
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.to_string())
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
