//! Independent JWS verification: JWKs parsed into RustCrypto keys, RFC 7638 thumbprints,
//! `ath`, `htu` normalisation, the compact-form split. Nothing comes from keybound: every
//! check that could hide a keybound bug (signature, thumbprint, hash) is computed here.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// The JWS algorithms the dev-server accepts: Okta's asymmetric set as keybound signs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigAlg {
    Es256,
    Es384,
    Rs256,
    Ps256,
}

/// A public key from a JWK, ready to verify, with its RFC 7638 thumbprint.
#[derive(Clone, Debug)]
pub struct PublicJwk {
    key: KeyMaterial,
    thumbprint: String,
}

#[derive(Clone, Debug)]
enum KeyMaterial {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
}

/// A compact JWS split into JSON objects; nothing about it is verified yet.
#[derive(Debug)]
pub struct Jws {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

/// Why a JWK cannot be used; each message names the member at fault.
#[derive(Debug, thiserror::Error)]
pub enum JwkError {
    #[error("the JWK is not a JSON object")]
    NotObject,
    #[error("the JWK contains the private key member '{0}'")]
    Private(&'static str),
    #[error("the JWK kty '{0}' is not supported; use EC or RSA")]
    Kty(String),
    #[error("the JWK crv '{0}' is not supported; use P-256 or P-384")]
    Crv(String),
    #[error("the JWK member '{0}' is missing or not a string")]
    Missing(&'static str),
    #[error("the JWK member '{0}' is not base64url")]
    Base64(&'static str),
    #[error("the JWK is not a valid {0} public key")]
    Invalid(&'static str),
    #[error("the JWK RSA modulus has {0} bits; at least 2048 are required")]
    WeakRsa(usize),
}

/// Private members of EC, RSA and symmetric JWKs (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

impl SigAlg {
    pub const ALL: [SigAlg; 4] = [SigAlg::Es256, SigAlg::Es384, SigAlg::Rs256, SigAlg::Ps256];

    /// RFC 7515 §4.1.1: `alg` is case-sensitive, so "es256" is not ES256.
    pub fn from_name(name: &str) -> Option<SigAlg> {
        SigAlg::ALL.into_iter().find(|a| a.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            SigAlg::Es256 => "ES256",
            SigAlg::Es384 => "ES384",
            SigAlg::Rs256 => "RS256",
            SigAlg::Ps256 => "PS256",
        }
    }

    /// "ES256 ES384 RS256 PS256", for `algs=` challenges and error messages.
    pub fn names() -> String {
        SigAlg::ALL.map(SigAlg::name).join(" ")
    }
}

impl PublicJwk {
    /// Parses a public JWK (RFC 7517, RFC 7518 §6); refuses any private member.
    pub fn parse(jwk: &Value) -> Result<PublicJwk, JwkError> {
        let jwk = jwk.as_object().ok_or(JwkError::NotObject)?;
        if let Some(private) = PRIVATE_MEMBERS.into_iter().find(|m| jwk.contains_key(*m)) {
            return Err(JwkError::Private(private));
        }
        let text = |name: &'static str| -> Result<&str, JwkError> {
            jwk.get(name)
                .and_then(Value::as_str)
                .ok_or(JwkError::Missing(name))
        };
        let bytes = |name: &'static str| -> Result<Vec<u8>, JwkError> {
            URL_SAFE_NO_PAD
                .decode(text(name)?)
                .map_err(|_| JwkError::Base64(name))
        };
        match text("kty")? {
            "EC" => {
                let crv = text("crv")?;
                let mut point = vec![0x04];
                point.extend(bytes("x")?);
                point.extend(bytes("y")?);
                // RFC 7518 §6.2.1.2: x and y are exactly the field size, so the length of the
                // point pins the curve and from_sec1_bytes checks that it lies on it.
                let key = match (crv, point.len()) {
                    ("P-256", 65) => p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                        .map(KeyMaterial::P256)
                        .map_err(|_| JwkError::Invalid("P-256"))?,
                    ("P-384", 97) => p384::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                        .map(KeyMaterial::P384)
                        .map_err(|_| JwkError::Invalid("P-384"))?,
                    ("P-256" | "P-384", _) => return Err(JwkError::Invalid("EC")),
                    (other, _) => return Err(JwkError::Crv(other.into())),
                };
                let thumbprint = thumbprint(&[
                    ("crv", crv),
                    ("kty", "EC"),
                    ("x", text("x")?),
                    ("y", text("y")?),
                ]);
                Ok(PublicJwk { key, thumbprint })
            }
            "RSA" => {
                let n = rsa::BigUint::from_bytes_be(&bytes("n")?);
                let e = rsa::BigUint::from_bytes_be(&bytes("e")?);
                let key = rsa::RsaPublicKey::new(n, e).map_err(|_| JwkError::Invalid("RSA"))?;
                let bits = rsa::traits::PublicKeyParts::size(&key) * 8;
                if bits < 2048 {
                    return Err(JwkError::WeakRsa(bits));
                }
                let thumbprint =
                    thumbprint(&[("e", text("e")?), ("kty", "RSA"), ("n", text("n")?)]);
                Ok(PublicJwk {
                    key: KeyMaterial::Rsa(key),
                    thumbprint,
                })
            }
            other => Err(JwkError::Kty(other.into())),
        }
    }

    /// RFC 7638 SHA-256 thumbprint, base64url: DPoP's `jkt` (RFC 9449 §6.1).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// Whether this key type and curve can verify `alg` (RFC 7518 §3.1).
    pub fn fits(&self, alg: SigAlg) -> bool {
        matches!(
            (&self.key, alg),
            (KeyMaterial::P256(_), SigAlg::Es256)
                | (KeyMaterial::P384(_), SigAlg::Es384)
                | (KeyMaterial::Rsa(_), SigAlg::Rs256 | SigAlg::Ps256)
        )
    }

    /// Verifies a JWS signature. ECDSA must be raw `r || s` (RFC 7518 §3.4); PSS uses
    /// MGF1-SHA-256 with a 32-byte salt (RFC 7518 §3.5). Any mismatch is `false`.
    pub fn verify(&self, alg: SigAlg, message: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        match (&self.key, alg) {
            (KeyMaterial::P256(key), SigAlg::Es256) => {
                p256::ecdsa::Signature::from_slice(signature)
                    .is_ok_and(|sig| key.verify(message, &sig).is_ok())
            }
            (KeyMaterial::P384(key), SigAlg::Es384) => {
                p384::ecdsa::Signature::from_slice(signature)
                    .is_ok_and(|sig| key.verify(message, &sig).is_ok())
            }
            (KeyMaterial::Rsa(key), SigAlg::Rs256) => {
                let key = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key.clone());
                rsa::pkcs1v15::Signature::try_from(signature)
                    .is_ok_and(|sig| key.verify(message, &sig).is_ok())
            }
            (KeyMaterial::Rsa(key), SigAlg::Ps256) => {
                let key = rsa::pss::VerifyingKey::<Sha256>::new(key.clone());
                rsa::pss::Signature::try_from(signature)
                    .is_ok_and(|sig| key.verify(message, &sig).is_ok())
            }
            _ => false,
        }
    }
}

impl Jws {
    /// Splits a compact JWS (RFC 7515 §7.1): three base64url parts without padding; header
    /// and claims must be JSON objects. Surrounding white space is ignored.
    pub fn parse(compact: &str) -> Option<Jws> {
        let mut parts = compact.trim().split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let object = |part: &str| -> Option<Map<String, Value>> {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
        };
        Some(Jws {
            header: object(h)?,
            claims: object(c)?,
            signing_input: format!("{h}.{c}"),
            signature: URL_SAFE_NO_PAD.decode(s).ok()?,
        })
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name).and_then(Value::as_str)
    }

    pub fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// A NumericDate claim (RFC 7519 §2): seconds, fractions dropped.
    pub fn claim_time(&self, name: &str) -> Option<i64> {
        let value = self.claims.get(name)?;
        value.as_i64().or_else(|| {
            value
                .as_f64()
                .filter(|f| f.is_finite() && f.abs() < 1e15)
                .map(|f| f.floor() as i64)
        })
    }
}

/// RFC 7638 §3: the required members in lexicographic order, no white space, SHA-256,
/// base64url. `members` must already be in that order.
fn thumbprint(members: &[(&str, &str)]) -> String {
    let body: Vec<String> = members
        .iter()
        .map(|(name, value)| format!("{}:{}", Value::from(*name), Value::from(*value)))
        .collect();
    let canonical = format!("{{{}}}", body.join(","));
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// RFC 9449 §4.2: `ath` = base64url(SHA-256(ASCII(access token))).
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(access_token.as_bytes()))
}

/// RFC 9449 §4.3 item 9: compare `htu` without query and fragment, after RFC 3986 §6.2.2
/// and §6.2.3 normalisation (scheme and host lowercased, default port dropped, which the
/// WHATWG parser in `url` does for http and https). `None` for anything not http(s).
pub fn normalize_htu(value: &str) -> Option<String> {
    let mut url = url::Url::parse(value).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return None;
    }
    url.set_query(None);
    url.set_fragment(None);
    Some(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../../tests/vectors/rfc-vectors.json")).unwrap()
    }

    #[test]
    fn rfc7638_rsa_thumbprint() {
        let v = &vectors()["rfc7638_rsa_thumbprint"];
        let jwk = PublicJwk::parse(&v["jwk"]).unwrap();
        assert_eq!(jwk.thumbprint(), v["thumbprint"]);
        assert!(jwk.fits(SigAlg::Rs256) && jwk.fits(SigAlg::Ps256));
        assert!(!jwk.fits(SigAlg::Es256));
    }

    #[test]
    fn rfc9449_ec_thumbprint() {
        let v = &vectors()["rfc9449_ec_thumbprint"];
        let jwk = PublicJwk::parse(&v["jwk"]).unwrap();
        assert_eq!(jwk.thumbprint(), v["thumbprint"]);
        assert!(jwk.fits(SigAlg::Es256) && !jwk.fits(SigAlg::Es384));
    }

    #[test]
    fn canonical_json_matches_the_vector() {
        let v = &vectors()["rfc9449_ec_thumbprint"];
        let j = &v["jwk"];
        let s = |n: &str| j[n].as_str().unwrap().to_string();
        let digest = Sha256::digest(v["canonical_json"].as_str().unwrap().as_bytes());
        assert_eq!(
            thumbprint(&[
                ("crv", &s("crv")),
                ("kty", "EC"),
                ("x", &s("x")),
                ("y", &s("y"))
            ]),
            URL_SAFE_NO_PAD.encode(digest)
        );
    }

    #[test]
    fn rfc9449_example_proof_verifies() {
        let v = &vectors()["rfc9449_example_proof"];
        let jws = Jws::parse(v["compact"].as_str().unwrap()).unwrap();
        let jwk = PublicJwk::parse(&jws.header["jwk"]).unwrap();
        assert!(jwk.verify(SigAlg::Es256, jws.signing_input.as_bytes(), &jws.signature));
        let mut tampered = jws.signing_input.clone();
        tampered.push('x');
        assert!(!jwk.verify(SigAlg::Es256, tampered.as_bytes(), &jws.signature));
        assert!(!jwk.verify(SigAlg::Es384, jws.signing_input.as_bytes(), &jws.signature));
        assert_eq!(jws.claim_time("iat"), Some(1562262616));
    }

    #[test]
    fn rfc9449_ath() {
        let v = &vectors()["rfc9449_ath"];
        assert_eq!(ath(v["access_token"].as_str().unwrap()), v["ath"]);
    }

    #[test]
    fn rfc9449_htu_cases() {
        for case in vectors()["rfc9449_htu"]["cases"].as_array().unwrap() {
            assert_eq!(
                normalize_htu(case["request"].as_str().unwrap()).as_deref(),
                case["htu"].as_str(),
                "{case}"
            );
        }
        assert_eq!(
            normalize_htu("HTTP://127.0.0.1:80/oauth2/v1/token?x=1"),
            Some("http://127.0.0.1/oauth2/v1/token".into())
        );
        assert_eq!(normalize_htu("/oauth2/v1/token"), None);
        assert_eq!(normalize_htu("ftp://127.0.0.1/x"), None);
    }

    #[test]
    fn private_and_malformed_jwks_are_refused() {
        let v = vectors();
        let mut jwk = v["rfc9449_ec_thumbprint"]["jwk"].clone();
        jwk["d"] = Value::from("AAAA");
        assert!(matches!(
            PublicJwk::parse(&jwk),
            Err(JwkError::Private("d"))
        ));
        let mut short = v["rfc9449_ec_thumbprint"]["jwk"].clone();
        short["x"] = Value::from("AAAA");
        assert!(PublicJwk::parse(&short).is_err());
        let oct = serde_json::json!({"kty": "oct", "k": "AAAA"});
        assert!(PublicJwk::parse(&oct).is_err());
        let small_rsa = serde_json::json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xc3; 128]), "e": "AQAB"});
        assert!(matches!(
            PublicJwk::parse(&small_rsa),
            Err(JwkError::WeakRsa(1024))
        ));
    }

    #[test]
    fn alg_names_are_case_sensitive() {
        assert_eq!(SigAlg::from_name("PS256"), Some(SigAlg::Ps256));
        assert_eq!(SigAlg::from_name("es256"), None);
        assert_eq!(SigAlg::from_name("none"), None);
        assert_eq!(SigAlg::from_name("HS256"), None);
        assert_eq!(SigAlg::names(), "ES256 ES384 RS256 PS256");
    }
}
