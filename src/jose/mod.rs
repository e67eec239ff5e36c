//! JOSE in software: algorithms, public JWKs and RFC 7638 thumbprints, the JWS compact form.
//! Pure: no I/O, no clock, no device. The token layer hands back raw signatures; this turns
//! them into JWS bytes.

mod alg;
pub(crate) mod interned;
mod jwk;
mod jws;
mod verify;

pub use alg::{Alg, Curve, Digest, HashAlg, JwsSignature, RawSignature, ToBeSigned};
pub use jwk::{Jwk, PublicKey};
pub use jws::{Decoded, Header, compact, decode, signing_input, signing_input_of};
pub use verify::verify;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Errors of the pure JOSE layer. Each says what was wrong with which input.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum JoseError {
    #[error("unknown algorithm '{0}'; use one of ES256, ES384, RS256, PS256")]
    UnknownAlg(String),
    #[error("{alg} needs {expected}, but the key is {found}")]
    KeyAlgMismatch {
        alg: Alg,
        #[serde(with = "interned")]
        expected: crate::jose::interned::Str,
        found: String,
    },
    #[error("EC point is not an uncompressed {curve} point: {reason}")]
    BadEcPoint {
        #[serde(with = "interned")]
        curve: crate::jose::interned::Str,
        reason: String,
    },
    #[error("RSA public key is malformed: {0}")]
    BadRsaKey(String),
    #[error("the device returned a malformed {alg} signature: {reason}")]
    BadSignature { alg: Alg, reason: String },
    #[error("JWK is malformed: {0}")]
    BadJwk(String),
    #[error("not a compact JWS: {0}")]
    BadCompact(String),
    #[error("JSON encoding failed: {0}")]
    Json(
        #[from]
        #[serde(with = "interned::json_error")]
        serde_json::Error,
    ),
}

/// base64url without padding (RFC 7515 §2).
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// base64url without padding, appended to `out`.
pub fn b64_append(bytes: &[u8], out: &mut String) {
    URL_SAFE_NO_PAD.encode_string(bytes, out);
}

/// Decodes base64url without padding; `what` names the input in the error.
pub fn b64_decode(s: &str, what: &str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| JoseError::BadCompact(format!("{what} is not base64url: {e}")))
}

/// Seconds since the Unix epoch (`iat`, `exp`, a key's creation time).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
