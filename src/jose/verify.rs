//! Verifying a JWS signature under a public key (ring): how the keyring checks that the
//! device holds the private half of the public key it would publish (proof of possession).

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

use super::{Alg, JoseError, JwsSignature, PublicKey};

/// Verifies `signature` (JWS form: ECDSA fixed `r || s`, RSA as is) over `message` with
/// `alg` (RFC 7518 §3.3 to §3.5: SHA-256/384, PKCS#1 v1.5, PSS with MGF1 and a salt as long
/// as the hash).
pub fn verify(
    public: &PublicKey,
    alg: Alg,
    message: &[u8],
    signature: &JwsSignature,
) -> Result<(), JoseError> {
    public.check_alg(alg)?;
    let sig = signature.as_bytes();
    let verified = match public {
        PublicKey::Ec { x, y, .. } => {
            let algorithm = match alg {
                Alg::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
                _ => &signature::ECDSA_P256_SHA256_FIXED,
            };
            let mut point = Vec::with_capacity(1 + x.len() + y.len());
            point.push(0x04);
            point.extend_from_slice(x);
            point.extend_from_slice(y);
            UnparsedPublicKey::new(algorithm, point).verify(message, sig)
        }
        PublicKey::Rsa { n, e } => {
            let params = match alg {
                Alg::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                _ => &signature::RSA_PKCS1_2048_8192_SHA256,
            };
            RsaPublicKeyComponents { n, e }.verify(params, message, sig)
        }
    };
    verified.map_err(|_| JoseError::BadSignature {
        alg,
        reason: format!(
            "it does not verify under the {} public key",
            public.describe()
        ),
    })
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Signer as _;

    use super::*;

    fn p256_pair() -> (p256::ecdsa::SigningKey, PublicKey) {
        let secret = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let point = secret.verifying_key().to_encoded_point(false);
        let public = PublicKey::from_uncompressed(crate::jose::Curve::P256, point.as_bytes())
            .expect("a P-256 point");
        (secret, public)
    }

    #[test]
    fn es256_verifies_only_under_its_own_key() {
        let (secret, public) = p256_pair();
        let (_, other) = p256_pair();
        let sig: p256::ecdsa::Signature = secret.sign(b"challenge");
        let jws = Alg::ES256
            .to_jws_signature(crate::jose::RawSignature::EcdsaFixed(
                sig.to_bytes().to_vec(),
            ))
            .expect("64 bytes");
        verify(&public, Alg::ES256, b"challenge", &jws).expect("verifies");
        assert!(verify(&public, Alg::ES256, b"other", &jws).is_err());
        assert!(verify(&other, Alg::ES256, b"challenge", &jws).is_err());
        assert!(verify(&public, Alg::ES384, b"challenge", &jws).is_err());
    }
}
