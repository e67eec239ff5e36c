//! OAuth on top of JOSE and the token: `private_key_jwt` assertions (RFC 7523) and DPoP
//! proofs (RFC 9449). Claim builders are pure; `sign` is the one place a JWS meets a key.

pub mod assertion;
pub mod dpop;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::jose::{self, Header, JoseError};
use crate::keyring::SigningKey;
use crate::token::TokenError;

/// Errors of the OAuth layer.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{what} '{value}' is not an absolute http(s) URL: {reason}")]
    BadUrl {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("lifetime {secs} s is out of range: use 1 to {max} seconds ({why})")]
    BadLifetime {
        secs: u64,
        max: u64,
        why: &'static str,
    },
    #[error("HTTP method '{0}' is not a valid method token (RFC 9110 §9.1)")]
    BadMethod(String),
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
    #[error(transparent)]
    Jose(#[from] JoseError),
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Signs header and claims with a policy-approved key: signing input, device, compact form.
pub fn sign<C: Serialize>(
    key: &SigningKey,
    header: &Header,
    claims: &C,
) -> Result<String, OAuthError> {
    let input = jose::signing_input(header, claims)?;
    let signature = key.sign(key.alg().to_be_signed(input.as_bytes()))?;
    Ok(jose::compact(&input, &signature))
}

/// A fresh `jti`: 128 random bits from the OS, base64url (22 characters).
pub fn new_jti() -> Result<String, OAuthError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| OAuthError::Rng(e.to_string()))?;
    Ok(jose::b64(bytes))
}

/// Seconds since the Unix epoch, for `iat`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
