//! Keys in the TPM: the storage primary's template, the signing-key templates, key creation,
//! public keys for JWKs, and the facts the policy judges, read from the key's public area as
//! the TPM reports it. Nothing here reads, wraps or exports a private key: `TPM2_Create`
//! returns only a blob encrypted under the storage key, useless outside this TPM.

use tss_esapi::Error;
use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    EccParameter, EccPoint, EccScheme, HashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, RsaScheme,
    SymmetricDefinitionObject,
};

use super::context::Tpm;
use super::errors::{Tag as _, TpmFailure};
use super::store::StoredKey;
use crate::jose::{Alg, Curve, PublicKey};
use crate::token::{Fact, KeyFacts, KeyInfo, TokenError};

/// The TCG storage root key template for ECC (TCG TPM v2.0 Provisioning Guidance §7.5.1):
/// P-256, AES-128-CFB, restricted decryption, `noDA`, unique = 32 zero bytes for x and y.
/// `TPM2_CreatePrimary` derives the same key from it every time for a given owner seed, so
/// it needs no storage of its own, and it matches an SRK others persisted from the same
/// template (e.g. `tpm2_createprimary -G ecc256:aes128cfb` with a zero unique).
pub(super) fn primary_template() -> Result<Public, Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let zero = || EccParameter::try_from(vec![0u8; 32]);
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zero()?, zero()?))
        .build()
}

/// A signing key: `fixedTPM fixedParent sensitiveDataOrigin userWithAuth sign`, not
/// decrypt, not restricted, its scheme fixed to the JWS algorithm's (ECDSA-SHA256,
/// RSASSA-SHA256, RSAPSS-SHA256), so the TPM itself refuses any other use.
pub(super) fn key_template(alg: Alg, rsa_bits: u32) -> Result<Public, Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .with_restricted(false)
        .build()?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    let sha = |h| HashScheme::new(h);
    match alg {
        Alg::ES256 | Alg::ES384 => {
            let (curve, hash) = match alg {
                Alg::ES384 => (EccCurve::NistP384, HashingAlgorithm::Sha384),
                _ => (EccCurve::NistP256, HashingAlgorithm::Sha256),
            };
            builder
                .with_public_algorithm(PublicAlgorithm::Ecc)
                .with_ecc_parameters(
                    PublicEccParametersBuilder::new_unrestricted_signing_key(
                        EccScheme::EcDsa(sha(hash)),
                        curve,
                    )
                    .build()?,
                )
                .with_ecc_unique_identifier(EccPoint::default())
                .build()
        }
        Alg::RS256 | Alg::PS256 => {
            let scheme = match alg {
                Alg::PS256 => RsaScheme::RsaPss(sha(HashingAlgorithm::Sha256)),
                _ => RsaScheme::RsaSsa(sha(HashingAlgorithm::Sha256)),
            };
            let bits = match rsa_bits {
                3072 => RsaKeyBits::Rsa3072,
                4096 => RsaKeyBits::Rsa4096,
                _ => RsaKeyBits::Rsa2048,
            };
            builder
                .with_public_algorithm(PublicAlgorithm::Rsa)
                .with_rsa_parameters(
                    PublicRsaParametersBuilder::new_unrestricted_signing_key(
                        scheme,
                        bits,
                        RsaExponent::ZERO_EXPONENT,
                    )
                    .build()?,
                )
                .with_rsa_unique_identifier(PublicKeyRsa::default())
                .build()
        }
    }
}

/// What `TPM2_Create` made: the blobs, whether it has an auth value, and its parent's name.
pub(super) struct Created {
    pub public: Public,
    pub private: Private,
    pub auth: bool,
    pub parent: Vec<u8>,
}

/// Creates a key inside the TPM under the storage primary.
pub(super) fn create(tpm: &mut Tpm, alg: Alg, rsa_bits: u32) -> Result<Created, TpmFailure> {
    let template = key_template(alg, rsa_bits).tag("building the key template")?;
    let auth = tpm.auth_value()?;
    let has_auth = auth.is_some();
    let (parent, parent_name) = tpm.primary()?;
    let created = tpm
        .ctx()?
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create(parent, template, auth, None, None, None)
        })
        .tag("TPM2_Create")?;
    Ok(Created {
        public: created.out_public,
        private: created.out_private,
        auth: has_auth,
        parent: parent_name,
    })
}

/// The facts of a key as the TPM reports them: loaded under this TPM's storage key (which
/// proves the stored public area is the one bound to the private blob), then read back.
pub(super) fn facts(tpm: &mut Tpm, key: &StoredKey) -> Result<KeyFacts, TpmFailure> {
    let handle = tpm.load(key)?;
    let (public, _, _) = tpm
        .ctx()?
        .execute_without_session(|c| c.read_public(handle))
        .tag("TPM2_ReadPublic")?;
    Ok(facts_of(public.object_attributes()))
}

/// TPM object attributes (TPM 2.0 Part 2 §8.3) in the policy's terms. A key leaves the TPM
/// only by duplication, which `fixedTPM` (and `fixedParent`, which it implies) forbids; its
/// private area is never readable otherwise. `sensitiveDataOrigin` says the TPM generated it.
pub(super) fn facts_of(a: ObjectAttributes) -> KeyFacts {
    let fact = |value: bool, source: &'static str| Fact {
        value: Some(value),
        source,
    };
    let duplicable = !(a.fixed_tpm() && a.fixed_parent());
    KeyFacts {
        extractable: fact(duplicable, "duplicable"),
        never_extractable: fact(a.fixed_tpm(), "fixedTPM"),
        sensitive: fact(true, "TPM private area"),
        always_sensitive: fact(true, "TPM private area"),
        generated_on_device: fact(a.sensitive_data_origin(), "sensitiveDataOrigin"),
        // The public area is part of the key blob, checked by TPM2_Load: no separate object.
        public_generated_on_device: None,
        can_sign: fact(a.sign_encrypt(), "sign"),
        // A TPM key is used with its own auth value (key_auth_*), not a login.
        needs_login: None,
        other_usages: vec![fact(a.decrypt(), "decrypt")],
        attributes: vec![
            ("fixedTPM", Some(a.fixed_tpm())),
            ("fixedParent", Some(a.fixed_parent())),
            ("sensitiveDataOrigin", Some(a.sensitive_data_origin())),
            ("userWithAuth", Some(a.user_with_auth())),
            ("adminWithPolicy", Some(a.admin_with_policy())),
            ("noDA", Some(a.no_da())),
            ("encryptedDuplication", Some(a.encrypted_duplication())),
            ("restricted", Some(a.restricted())),
            ("sign", Some(a.sign_encrypt())),
            ("decrypt", Some(a.decrypt())),
        ],
        meanings: Vec::new(),
    }
}

/// Label, id, algorithm and public key of a stored key, checked against its algorithm.
pub(super) fn key_info(key: &StoredKey) -> Result<KeyInfo, TokenError> {
    let bad = |reason: String| TokenError::BadPublicKey {
        label: key.label.clone(),
        reason,
    };
    let public = match (&key.public, key.alg) {
        (
            Public::Ecc {
                parameters, unique, ..
            },
            Alg::ES256 | Alg::ES384,
        ) => {
            let curve = match parameters.ecc_curve() {
                EccCurve::NistP256 => Curve::P256,
                EccCurve::NistP384 => Curve::P384,
                other => {
                    return Err(bad(format!(
                        "curve {other:?} is not one keybound signs with"
                    )));
                }
            };
            if curve.alg() != key.alg {
                return Err(bad(format!(
                    "a {} key cannot make {} signatures",
                    curve.name(),
                    key.alg
                )));
            }
            let mut point = vec![0x04];
            point.extend(left_pad(unique.x().value(), curve.field_len()).map_err(&bad)?);
            point.extend(left_pad(unique.y().value(), curve.field_len()).map_err(&bad)?);
            PublicKey::from_uncompressed(curve, &point).map_err(|e| bad(e.to_string()))?
        }
        (
            Public::Rsa {
                parameters, unique, ..
            },
            Alg::RS256 | Alg::PS256,
        ) => {
            let fits = match parameters.rsa_scheme() {
                RsaScheme::Null => true,
                RsaScheme::RsaSsa(h) => {
                    key.alg == Alg::RS256 && h.hashing_algorithm() == HashingAlgorithm::Sha256
                }
                RsaScheme::RsaPss(h) => {
                    key.alg == Alg::PS256 && h.hashing_algorithm() == HashingAlgorithm::Sha256
                }
                _ => false,
            };
            if !fits {
                return Err(bad(format!(
                    "its TPM scheme {:?} cannot make {} signatures",
                    parameters.rsa_scheme(),
                    key.alg
                )));
            }
            // TPM 2.0 Part 2 §12.2.3.5: exponent 0 means 2^16 + 1.
            let e = match parameters.exponent().value() {
                0 => 65537u32,
                e => e,
            };
            PublicKey::rsa(unique.value(), &e.to_be_bytes()).map_err(|e| bad(e.to_string()))?
        }
        (_, alg) => return Err(bad(format!("its public area is not a {alg} key"))),
    };
    Ok(KeyInfo {
        label: key.label.clone(),
        id: key.id.clone(),
        alg: key.alg,
        public,
    })
}

/// A TPM ECC coordinate at the curve's full width (the TPM may drop leading zeros).
fn left_pad(bytes: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let bytes = &bytes[first..];
    if bytes.len() > len {
        return Err(format!(
            "a coordinate of {} bytes exceeds {len}",
            bytes.len()
        ));
    }
    let mut out = vec![0u8; len - bytes.len()];
    out.extend_from_slice(bytes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{self, Outcome, Rules};

    #[test]
    fn keybound_keys_pass_and_duplicable_keys_fail() {
        let generated = key_template(Alg::ES256, 2048).unwrap();
        let v = policy::evaluate(&facts_of(generated.object_attributes()), &Rules::default());
        assert_eq!(v.outcome(), Outcome::Pass, "{:?}", v.findings);

        // What `tpm2_create -a 'sign|sensitivedataorigin|userwithauth'` makes: duplicable.
        let duplicable = ObjectAttributesBuilder::new()
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .build()
            .unwrap();
        let v = policy::evaluate(&facts_of(duplicable), &Rules::default());
        let msg = v.refusal("k").unwrap().to_string();
        assert!(msg.contains("duplicable=true"), "{msg}");
        assert!(msg.contains("fixedTPM=false"), "{msg}");
        let allow = Rules {
            danger_allow_imported_keys: true,
        };
        assert_eq!(
            policy::evaluate(&facts_of(duplicable), &allow).outcome(),
            Outcome::Fail
        );

        // Imported into the TPM: not generated there.
        let imported = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .build()
            .unwrap();
        let v = policy::evaluate(&facts_of(imported), &Rules::default());
        let msg = v.refusal("k").unwrap().to_string();
        assert!(msg.contains("sensitiveDataOrigin=false"), "{msg}");
    }

    #[test]
    fn templates_build_for_every_alg() {
        for alg in Alg::ALL {
            let t = key_template(alg, 2048).unwrap();
            let a = t.object_attributes();
            assert!(a.fixed_tpm() && a.fixed_parent() && a.sensitive_data_origin());
            assert!(a.sign_encrypt() && !a.decrypt() && !a.restricted());
        }
        let p = primary_template().unwrap().object_attributes();
        assert!(p.restricted() && p.decrypt() && !p.sign_encrypt() && p.no_da());
    }

    #[test]
    fn coordinates_are_left_padded() {
        assert_eq!(left_pad(&[1, 2], 4).unwrap(), vec![0, 0, 1, 2]);
        assert_eq!(left_pad(&[0, 0, 1], 2).unwrap(), vec![0, 1]);
        assert!(left_pad(&[1, 2, 3], 2).is_err());
    }
}
