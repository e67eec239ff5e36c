//! JWS compact serialisation (RFC 7515 §3.1, §7.1).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Alg, JoseError, Jwk, JwsSignature, b64_append, b64_decode};

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
///
/// The string has room for the signature, so [`compact`] appends it without a copy.
pub fn signing_input<H: Serialize, C: Serialize>(
    header: &H,
    claims: &C,
) -> Result<String, JoseError> {
    Ok(joined(&encoded(header)?, &serde_json::to_vec(claims)?))
}

/// `BASE64URL(UTF8(json))`.
fn encoded<T: Serialize>(value: &T) -> Result<String, JoseError> {
    let mut out = String::new();
    b64_append(&serde_json::to_vec(value)?, &mut out);
    Ok(out)
}

/// The signing input from the header's base64url and the claims' JSON. The string has
/// room for the signature: base64url of n bytes takes at most 4n/3 + 1 characters; 700
/// covers a '.' and an RSA-4096 signature.
fn joined(header_b64: &str, claims: &[u8]) -> String {
    let mut input = String::with_capacity(header_b64.len() + claims.len() * 4 / 3 + 2 + 700);
    input.push_str(header_b64);
    input.push('.');
    b64_append(claims, &mut input);
    input
}

/// [`signing_input`] for keybound's own [`Header`]: the header's base64url is kept per
/// thread for the last few headers, since a key signs under the same header again and
/// again (a DPoP key's carries its whole JWK, the larger half of the signing input).
pub fn signing_input_of<C: Serialize>(header: &Header, claims: &C) -> Result<String, JoseError> {
    thread_local! {
        /// The claims' JSON on its way to base64url: one buffer per thread, reused.
        static CLAIMS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CLAIMS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut c) => {
            // Claims a caller made large once do not keep their room on this thread.
            if c.capacity() > 16 * 1024 {
                *c = Vec::new();
            }
            c.clear();
            serde_json::to_writer(&mut *c, claims)?;
            input_with(header, &c)
        }
        // Claims whose serialisation makes a signing input of its own: a buffer of theirs.
        Err(_) => input_with(header, &serde_json::to_vec(claims)?),
    })
}

/// [`signing_input_of`] with the claims' JSON made.
fn input_with(header: &Header, c: &[u8]) -> Result<String, JoseError> {
    const KEPT: usize = 4;
    thread_local! {
        static ENCODED: std::cell::RefCell<Vec<(Header, String)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    ENCODED.with_borrow_mut(|kept| {
        // The most recently used last; the least recently used goes when one more comes.
        match kept.iter().position(|(h, _)| h == header) {
            Some(i) => {
                let hit = kept.remove(i);
                kept.push(hit);
            }
            None => {
                let header_b64 = encoded(header)?;
                if kept.len() == KEPT {
                    kept.remove(0);
                }
                kept.push((header.clone(), header_b64));
            }
        }
        Ok(joined(&kept[kept.len() - 1].1, c))
    })
}

/// The compact form: signing input, '.', base64url signature.
pub fn compact(signing_input: String, signature: &JwsSignature) -> String {
    let mut jws = signing_input;
    jws.push('.');
    b64_append(signature.as_bytes(), &mut jws);
    jws
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_header_gives_the_same_signing_input() {
        let headers: Vec<Header> = (0..6)
            .map(|i| Header {
                typ: Some(format!("t{i}")),
                alg: Alg::ES256,
                kid: Some(format!("k{i}")),
                jwk: None,
            })
            .collect();
        let claims = serde_json::json!({ "iat": 1, "jti": "x" });
        // Twice round, so kept headers are found and evicted ones made again.
        for header in headers.iter().chain(&headers).chain(headers.iter().rev()) {
            assert_eq!(
                signing_input_of(header, &claims).unwrap(),
                signing_input(header, &claims).unwrap()
            );
        }
    }
}
