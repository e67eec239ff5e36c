//! Signing: the digest comes from software (SHA-256/384 in `jose`), `TPM2_Sign` signs it with
//! the key's own scheme and a NULL hashcheck ticket (the key is not restricted, so the TPM
//! needs no proof that it hashed the data itself), and the TPM's answer becomes JWS bytes:
//! ECDSA r and s left-padded to the curve size (`jose`), RSA as it is.

use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Digest, HashScheme, HashcheckTicket, Signature, SignatureScheme};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::context::Tpm;
use super::errors::{Recovery, Tag as _, TpmFailure};
use super::store::StoredKey;
use crate::jose::{Alg, JoseError, JwsSignature, RawSignature, ToBeSigned};
use crate::token::TokenError;

/// One JWS signature with `key`.
pub(super) fn sign(
    tpm: &mut Tpm,
    key: &StoredKey,
    tbs: &ToBeSigned,
) -> Result<JwsSignature, TokenError> {
    crate::token::check_alg(&key.label, key.alg, tbs)?;
    let raw = tpm.retrying(|t| sign_raw(t, key, tbs))?;
    Ok(tbs.alg().to_jws_signature(raw)?)
}

fn sign_raw(tpm: &mut Tpm, key: &StoredKey, tbs: &ToBeSigned) -> Result<RawSignature, TpmFailure> {
    let handle = tpm.load(key)?;
    tpm.authorize(key, handle)?;
    let digest = Digest::try_from(tbs.digest().as_bytes()).tag("preparing the digest")?;
    let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    })
    .tag("preparing the NULL hashcheck ticket")?;
    let scheme = scheme(key.alg);
    let signed = tpm
        .ctx()?
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.sign(handle, digest, scheme, validation)
        })
        .tag("TPM2_Sign");
    let signature = match signed {
        Ok(s) => s,
        Err(f) => {
            if f.recovery() == Recovery::AuthRejected {
                tpm.refuse(key);
            }
            return Err(f);
        }
    };
    match signature {
        Signature::EcDsa(s) => Ok(RawSignature::EcdsaParts {
            r: s.signature_r().value().to_vec(),
            s: s.signature_s().value().to_vec(),
        }),
        Signature::RsaSsa(s) | Signature::RsaPss(s) => {
            Ok(RawSignature::Rsa(s.signature().value().to_vec()))
        }
        other => Err(TokenError::Jose(JoseError::BadSignature {
            alg: key.alg,
            reason: format!("the TPM returned a {:?} signature", other.algorithm()),
        })
        .into()),
    }
}

/// The TPM signature scheme of a JWS algorithm (RFC 7518 §3.1). PS256: the TPM's RSAPSS uses
/// a salt as long as the digest (TPM 2.0 Part 1 §B.7 in current revisions), which is what
/// RFC 7518 §3.5 requires; the test suite checks it with an independent verifier.
fn scheme(alg: Alg) -> SignatureScheme {
    let hash_scheme = HashScheme::new(match alg {
        Alg::ES384 => HashingAlgorithm::Sha384,
        Alg::ES256 | Alg::RS256 | Alg::PS256 => HashingAlgorithm::Sha256,
    });
    match alg {
        Alg::ES256 | Alg::ES384 => SignatureScheme::EcDsa { hash_scheme },
        Alg::RS256 => SignatureScheme::RsaSsa { hash_scheme },
        Alg::PS256 => SignatureScheme::RsaPss { hash_scheme },
    }
}
