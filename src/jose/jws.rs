//! JWS compact serialisation (RFC 7515 §3.1, §7.1).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Alg, JoseError, Jwk, JwsSignature, b64, b64_decode};

/// The protected header keybound writes: `typ`, `alg`, and `kid` or `jwk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    pub alg: Alg,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwk: Option<Jwk>,
}

/// An unverified view of a compact JWS, for display and for verifiers.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub header: Value,
    pub claims: Value,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

/// RFC 7515 §5.1: `BASE64URL(UTF8(header)) || '.' || BASE64URL(payload)`.
pub fn signing_input<H: Serialize, C: Serialize>(
    header: &H,
    claims: &C,
) -> Result<String, JoseError> {
    let h = serde_json::to_vec(header)?;
    let c = serde_json::to_vec(claims)?;
    Ok(format!("{}.{}", b64(h), b64(c)))
}

/// The compact form: signing input, '.', base64url signature.
pub fn compact(signing_input: &str, signature: &JwsSignature) -> String {
    format!("{signing_input}.{}", b64(signature.as_bytes()))
}

/// Splits and decodes a compact JWS without verifying it.
pub fn decode(compact: &str) -> Result<Decoded, JoseError> {
    let compact = compact.trim();
    let mut parts = compact.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JoseError::BadCompact(
            "expected three base64url parts separated by '.'".into(),
        ));
    };
    let json = |part: &str, what: &str| -> Result<Value, JoseError> {
        serde_json::from_slice(&b64_decode(part, what)?)
            .map_err(|e| JoseError::BadCompact(format!("{what} is not JSON: {e}")))
    };
    Ok(Decoded {
        header: json(h, "header")?,
        claims: json(c, "claims")?,
        signing_input: format!("{h}.{c}"),
        signature: b64_decode(s, "signature")?,
    })
}
