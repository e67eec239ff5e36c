//! Public JWKs (RFC 7517, RFC 7518 §6) and their RFC 7638 thumbprints.

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::alg::{der_take, strip_leading_zeros};
use super::{Alg, Curve, JoseError, b64, b64_decode};

/// A public key as the device reported it. There is no private variant: keybound never
/// holds private key material.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PublicKey {
    Ec {
        curve: Curve,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
}

/// The JSON form of a public JWK. Only public members exist in this type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    pub kty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl PublicKey {
    /// From PKCS#11 `CKA_EC_POINT`: a DER OCTET STRING around `04 || X || Y` (SoftHSM,
    /// tpm2-pkcs11), or the raw uncompressed point (some tokens). Both are accepted.
    pub fn from_ec_point(curve: Curve, point: &[u8]) -> Result<Self, JoseError> {
        let n = curve.field_len();
        if point.len() == 2 * n + 1 && point[0] == 0x04 {
            Self::from_uncompressed(curve, point)
        } else {
            Self::from_ec_point_der(curve, point)
        }
    }

    /// From a DER OCTET STRING around `04 || X || Y` only.
    pub fn from_ec_point_der(curve: Curve, der: &[u8]) -> Result<Self, JoseError> {
        match der_take(der, 0x04) {
            Ok((inner, [])) => Self::from_uncompressed(curve, inner),
            Ok(_) => Err(ec_err(curve, "trailing bytes after the OCTET STRING")),
            Err(e) => Err(ec_err(curve, &e)),
        }
    }

    /// From `04 || X || Y`.
    pub fn from_uncompressed(curve: Curve, raw: &[u8]) -> Result<Self, JoseError> {
        let n = curve.field_len();
        match raw {
            [0x04, xy @ ..] if xy.len() == 2 * n => Ok(PublicKey::Ec {
                curve,
                x: xy[..n].to_vec(),
                y: xy[n..].to_vec(),
            }),
            _ => Err(ec_err(
                curve,
                &format!(
                    "{} bytes, expected 04 || X || Y of {}",
                    raw.len(),
                    2 * n + 1
                ),
            )),
        }
    }

    /// From PKCS#11 `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT` (big-endian).
    pub fn rsa(n: &[u8], e: &[u8]) -> Result<Self, JoseError> {
        let (n, e) = (strip_leading_zeros(n), strip_leading_zeros(e));
        if n.len() < 256 {
            return Err(JoseError::BadRsaKey(format!(
                "modulus of {} bits; at least 2048 are required",
                n.len() * 8
            )));
        }
        if e.is_empty() {
            return Err(JoseError::BadRsaKey("public exponent is zero".into()));
        }
        Ok(PublicKey::Rsa {
            n: n.to_vec(),
            e: e.to_vec(),
        })
    }

    /// Parses a public JWK (e.g. a DPoP header `jwk`); refuses private members.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, JoseError> {
        let field = |v: &Option<String>, name: &str| -> Result<Vec<u8>, JoseError> {
            let s = v
                .as_deref()
                .ok_or_else(|| JoseError::BadJwk(format!("member '{name}' is missing")))?;
            b64_decode(s, name)
        };
        match jwk.kty.as_str() {
            "EC" => {
                let crv = jwk.crv.as_deref().unwrap_or_default();
                let curve = Curve::from_name(crv)
                    .ok_or_else(|| JoseError::BadJwk(format!("unsupported crv '{crv}'")))?;
                let mut raw = vec![0x04];
                let (x, y) = (field(&jwk.x, "x")?, field(&jwk.y, "y")?);
                if x.len() != curve.field_len() || y.len() != curve.field_len() {
                    return Err(JoseError::BadJwk(format!(
                        "x and y must be {} bytes for {crv}",
                        curve.field_len()
                    )));
                }
                raw.extend(x);
                raw.extend(y);
                Self::from_uncompressed(curve, &raw)
            }
            "RSA" => Self::rsa(&field(&jwk.n, "n")?, &field(&jwk.e, "e")?),
            other => Err(JoseError::BadJwk(format!("unsupported kty '{other}'"))),
        }
    }

    /// Checks that `alg` can be used with this key.
    pub fn check_alg(&self, alg: Alg) -> Result<(), JoseError> {
        match (self, alg.curve()) {
            (PublicKey::Ec { curve, .. }, Some(c)) if *curve == c => Ok(()),
            (PublicKey::Rsa { .. }, None) => Ok(()),
            _ => Err(JoseError::KeyAlgMismatch {
                alg,
                expected: alg.curve().map_or("an RSA key", Curve::name),
                found: self.describe(),
            }),
        }
    }

    /// "EC P-256", "RSA 2048".
    pub fn describe(&self) -> String {
        match self {
            PublicKey::Ec { curve, .. } => format!("EC {}", curve.name()),
            PublicKey::Rsa { n, .. } => format!("RSA {}", n.len() * 8),
        }
    }

    /// The public JWK with only the key members (the form a DPoP header carries).
    pub fn jwk(&self) -> Jwk {
        let mut jwk = Jwk {
            kty: String::new(),
            crv: None,
            x: None,
            y: None,
            n: None,
            e: None,
            kid: None,
            alg: None,
            use_: None,
        };
        match self {
            PublicKey::Ec { curve, x, y } => {
                jwk.kty = "EC".into();
                jwk.crv = Some(curve.name().into());
                jwk.x = Some(b64(x));
                jwk.y = Some(b64(y));
            }
            PublicKey::Rsa { n, e } => {
                jwk.kty = "RSA".into();
                jwk.n = Some(b64(n));
                jwk.e = Some(b64(e));
            }
        }
        jwk
    }

    /// The JWK for a JWKS: key members plus `kid`, `alg` and `use: sig`.
    pub fn jwks_entry(&self, kid: &str, alg: Alg) -> Jwk {
        Jwk {
            kid: Some(kid.into()),
            alg: Some(alg.name().into()),
            use_: Some("sig".into()),
            ..self.jwk()
        }
    }

    /// RFC 7638 §3: the required members in lexicographic order, no white space.
    pub fn thumbprint_input(&self) -> String {
        match self {
            PublicKey::Ec { curve, x, y } => format!(
                r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
                curve.name(),
                b64(x),
                b64(y)
            ),
            PublicKey::Rsa { n, e } => {
                format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64(e), b64(n))
            }
        }
    }

    /// RFC 7638 SHA-256 thumbprint, base64url: keybound's default `kid`, and DPoP's `jkt`.
    pub fn thumbprint(&self) -> String {
        b64(sha2::Sha256::digest(self.thumbprint_input().as_bytes()))
    }
}

fn ec_err(curve: Curve, reason: &str) -> JoseError {
    JoseError::BadEcPoint {
        curve: curve.name(),
        reason: reason.to_string(),
    }
}
