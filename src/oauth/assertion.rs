//! `private_key_jwt` client assertions (RFC 7523 §2.2, §3; OpenID Connect Core §9).

use serde::{Deserialize, Serialize};

use super::OAuthError;
use crate::jose::{Alg, Header};

/// Okta's limit on `exp - iat` for client assertions; the default cap.
pub const MAX_LIFETIME_SECS: u64 = 3600;
/// Default assertion lifetime: short, since an assertion is a bearer credential until it expires.
pub const DEFAULT_LIFETIME_SECS: u64 = 60;

/// RFC 7523 §3 claims. `iss` and `sub` are both the client id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

/// The header: `alg`, `kid`, `typ: JWT`.
pub fn header(alg: Alg, kid: &str) -> Header {
    Header {
        typ: Some("JWT".into()),
        alg,
        kid: Some(kid.into()),
        jwk: None,
    }
}

/// Builds the claims; `iat` and `jti` come from the caller so the result is reproducible.
/// `max_lifetime` is the server's limit (Okta 3600 s).
pub fn claims(
    client_id: &str,
    audience: &str,
    lifetime: u64,
    max_lifetime: u64,
    iat: u64,
    jti: String,
) -> Result<AssertionClaims, OAuthError> {
    if client_id.trim().is_empty() {
        return Err(OAuthError::Empty { what: "client id" });
    }
    if lifetime == 0 || lifetime > max_lifetime {
        return Err(OAuthError::BadLifetime {
            secs: lifetime,
            max: max_lifetime,
            why: "the authorization server's maximum assertion lifetime",
        });
    }
    // Validated, but sent verbatim: servers compare `aud` as a string (RFC 7523 §3 item 3).
    super::dpop::absolute_http_url("audience", audience)?;
    Ok(AssertionClaims {
        iss: client_id.into(),
        sub: client_id.into(),
        aud: audience.into(),
        iat,
        exp: iat + lifetime,
        jti,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exact() {
        let c = claims(
            "0oa1",
            "https://example.okta.com/oauth2/v1/token",
            60,
            MAX_LIFETIME_SECS,
            1_700_000_000,
            "j".into(),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"iss":"0oa1","sub":"0oa1","aud":"https://example.okta.com/oauth2/v1/token","iat":1700000000,"exp":1700000060,"jti":"j"}"#
        );
    }

    #[test]
    fn lifetime_and_audience_are_checked() {
        let c = |life, aud| claims("c", aud, life, MAX_LIFETIME_SECS, 0, "j".into());
        assert!(c(3600, "https://a.example/t").is_ok());
        assert!(matches!(
            c(3601, "https://a.example/t"),
            Err(OAuthError::BadLifetime { .. })
        ));
        assert!(c(0, "https://a.example/t").is_err());
        assert!(matches!(c(60, "/token"), Err(OAuthError::BadUrl { .. })));
        assert!(claims(" ", "https://a.example/", 60, 3600, 0, "j".into()).is_err());
    }
}
