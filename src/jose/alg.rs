//! JWS algorithms (RFC 7518 §3): digest in software, device output to JWS signature bytes.
//!
//! Over 400 lines with its tests: the four algorithms, their curves and hashes and the
//! conversion of every device output shape are one table, tested together.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::JoseError;

/// The signing algorithms keybound issues: what Okta and Auth0 accept, plus PS256.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Alg {
    ES256,
    ES384,
    RS256,
    PS256,
}

/// Named elliptic curves (RFC 7518 §6.2.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Curve {
    P256,
    P384,
}

/// The hash that precedes the private-key operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashAlg {
    Sha256,
    Sha384,
}

/// A message digest computed in software.
#[derive(Clone)]
pub struct Digest {
    hash: HashAlg,
    /// The first `hash.output_len()` bytes are the digest, the rest zero (kept inline: one
    /// is made for every signature, and cloned for its retry).
    bytes: [u8; MAX_DIGEST],
}

/// The longest digest of a [`HashAlg`] (SHA-384).
const MAX_DIGEST: usize = 48;

/// What the device is asked to sign: the JWS signing input and its software digest.
/// Devices that sign a digest use `digest`; hash-and-sign mechanisms use `message`.
#[derive(Clone, Debug)]
pub struct ToBeSigned {
    alg: Alg,
    /// The signing input the digest was computed from; `None` when only the digest is
    /// known ([`ToBeSigned::of_digest`]). Shared: a signature's retry keeps a clone.
    message: Option<Arc<[u8]>>,
    digest: Digest,
}

/// A signature as a device returned it, before JWS encoding.
#[derive(Clone, Debug)]
pub enum RawSignature {
    /// ECDSA as fixed-width `r || s` (PKCS#11 `CKM_ECDSA` on most tokens).
    EcdsaFixed(Vec<u8>),
    /// ECDSA as a DER `ECDSA-Sig-Value`: some PKCS#11 modules return it against the
    /// standard (profile `ecdsa_signature = "der"`), and device protocols do (a YubiHSM 2's
    /// native protocol). Yubico's PKCS#11 module is not one of them: it converts to raw
    /// `r‖s` (hsm-profiles/yubihsm2.toml).
    EcdsaDer(Vec<u8>),
    /// ECDSA as separate big-endian integers (TPM 2.0).
    EcdsaParts { r: Vec<u8>, s: Vec<u8> },
    /// RSASSA-PKCS1-v1_5 or RSASSA-PSS output, already the JWS form.
    Rsa(Vec<u8>),
}

/// Signature bytes in the form JWS requires (RFC 7518 §3.4: ECDSA is `r || s`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwsSignature(Vec<u8>);

impl Alg {
    pub const ALL: [Alg; 4] = [Alg::ES256, Alg::ES384, Alg::RS256, Alg::PS256];

    pub fn name(self) -> &'static str {
        match self {
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::RS256 => "RS256",
            Alg::PS256 => "PS256",
        }
    }

    /// The curve an ECDSA algorithm signs with; `None` for RSA.
    pub fn curve(self) -> Option<Curve> {
        match self {
            Alg::ES256 => Some(Curve::P256),
            Alg::ES384 => Some(Curve::P384),
            Alg::RS256 | Alg::PS256 => None,
        }
    }

    pub fn is_rsa(self) -> bool {
        self.curve().is_none()
    }

    pub fn hash(self) -> HashAlg {
        match self {
            Alg::ES384 => HashAlg::Sha384,
            Alg::ES256 | Alg::RS256 | Alg::PS256 => HashAlg::Sha256,
        }
    }

    pub fn digest(self, message: &[u8]) -> Digest {
        self.hash().digest(message)
    }

    /// Prepares a JWS signing input for the device: the bytes and their digest.
    pub fn to_be_signed(self, signing_input: &[u8]) -> ToBeSigned {
        ToBeSigned {
            alg: self,
            message: Some(signing_input.into()),
            digest: self.digest(signing_input),
        }
    }

    /// Turns a device's raw output into the JWS signature (RFC 7518 §3.4 for ECDSA).
    pub fn to_jws_signature(self, raw: RawSignature) -> Result<JwsSignature, JoseError> {
        let bad = |reason: String| JoseError::BadSignature { alg: self, reason };
        match (self.curve(), raw) {
            (Some(curve), RawSignature::EcdsaFixed(bytes)) => {
                if bytes.len() != 2 * curve.field_len() {
                    return Err(bad(format!(
                        "r||s is {} bytes, expected {}",
                        bytes.len(),
                        2 * curve.field_len()
                    )));
                }
                Ok(JwsSignature(bytes))
            }
            // RustCrypto parses the DER (strict, r and s in 1..n) and gives the fixed width;
            // a device whose firmware pads or forgets a sign byte gets the lenient reading.
            (Some(curve), RawSignature::EcdsaDer(der)) => {
                strict_der(curve, &der).or_else(|strict| match lenient_der(curve, &der) {
                    Ok(sig) => {
                        warn_once_lenient_der();
                        Ok(sig)
                    }
                    Err(_) => Err(bad(strict)),
                })
            }
            (Some(curve), RawSignature::EcdsaParts { r, s }) => {
                fixed_width(curve, &r, &s).map_err(bad)
            }
            (None, RawSignature::Rsa(bytes)) => {
                if bytes.is_empty() {
                    return Err(bad("empty RSA signature".into()));
                }
                Ok(JwsSignature(bytes))
            }
            (_, raw) => Err(bad(format!("unexpected signature kind {}", raw.kind()))),
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Alg {
    type Err = JoseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Alg::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| JoseError::UnknownAlg(s.to_string()))
    }
}

impl Curve {
    /// The JWK `crv` name.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    /// Bytes in a field element (and in each of r and s).
    pub fn field_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }

    /// DER encoding of the named-curve OID, as PKCS#11 `CKA_EC_PARAMS` holds it.
    pub fn oid_der(self) -> &'static [u8] {
        match self {
            // 1.2.840.10045.3.1.7 (prime256v1)
            Curve::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            // 1.3.132.0.34 (secp384r1)
            Curve::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
        }
    }

    pub fn from_oid_der(der: &[u8]) -> Option<Curve> {
        [Curve::P256, Curve::P384]
            .into_iter()
            .find(|c| c.oid_der() == der)
    }

    pub fn from_name(name: &str) -> Option<Curve> {
        [Curve::P256, Curve::P384]
            .into_iter()
            .find(|c| c.name() == name)
    }

    /// The ECDSA algorithm that uses this curve.
    pub fn alg(self) -> Alg {
        match self {
            Curve::P256 => Alg::ES256,
            Curve::P384 => Alg::ES384,
        }
    }
}

impl HashAlg {
    pub fn digest(self, message: &[u8]) -> Digest {
        let mut bytes = [0; MAX_DIGEST];
        match self {
            HashAlg::Sha256 => bytes[..32].copy_from_slice(&sha2::Sha256::digest(message)),
            HashAlg::Sha384 => bytes.copy_from_slice(&sha2::Sha384::digest(message)),
        }
        Digest { hash: self, bytes }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
        }
    }

    /// The DER `DigestInfo` prefix for RSASSA-PKCS1-v1_5 (RFC 8017 §9.2, note 1).
    pub fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            HashAlg::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            HashAlg::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
        }
    }
}

/// Equal hash and digest bytes (the unused rest of the array is not compared).
impl PartialEq for Digest {
    fn eq(&self, other: &Digest) -> bool {
        self.hash == other.hash && self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Digest {}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digest")
            .field("hash", &self.hash)
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

impl Digest {
    pub fn hash(&self) -> HashAlg {
        self.hash
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.hash.output_len()]
    }

    /// `DigestInfo || digest`, the input of a raw `CKM_RSA_PKCS` signature.
    pub fn to_digest_info(&self) -> Vec<u8> {
        let mut out = self.hash.digest_info_prefix().to_vec();
        out.extend_from_slice(self.as_bytes());
        out
    }
}

impl ToBeSigned {
    /// A digest someone else computed (a signer process gets only the digest): exactly the
    /// length of `alg`'s hash. Only prehash mechanisms can sign it; [`ToBeSigned::message`]
    /// is `None`.
    pub fn of_digest(alg: Alg, digest: &[u8]) -> Result<ToBeSigned, JoseError> {
        let hash = alg.hash();
        if digest.len() != hash.output_len() {
            return Err(JoseError::KeyAlgMismatch {
                alg,
                expected: "a digest of its hash's length",
                found: format!("{} bytes", digest.len()),
            });
        }
        let mut bytes = [0; MAX_DIGEST];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(ToBeSigned {
            alg,
            message: None,
            digest: Digest { hash, bytes },
        })
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The signing input; `None` when only its digest is known.
    pub fn message(&self) -> Option<&[u8]> {
        self.message.as_deref()
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl RawSignature {
    fn kind(&self) -> &'static str {
        match self {
            RawSignature::EcdsaFixed(_) => "ECDSA r||s",
            RawSignature::EcdsaDer(_) => "ECDSA DER",
            RawSignature::EcdsaParts { .. } => "ECDSA (r, s)",
            RawSignature::Rsa(_) => "RSA",
        }
    }
}

impl JwsSignature {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A JWS signature as read from a compact JWS, for a verifier.
impl From<Vec<u8>> for JwsSignature {
    fn from(bytes: Vec<u8>) -> Self {
        JwsSignature(bytes)
    }
}

/// Left-pads r and s to the field length and concatenates them.
fn fixed_width(curve: Curve, r: &[u8], s: &[u8]) -> Result<JwsSignature, String> {
    let n = curve.field_len();
    let mut out = vec![0u8; 2 * n];
    for (i, int) in [r, s].into_iter().enumerate() {
        let int = strip_leading_zeros(int);
        if int.len() > n {
            return Err(format!("integer of {} bytes exceeds {n}", int.len()));
        }
        let end = (i + 1) * n;
        out[end - int.len()..end].copy_from_slice(int);
    }
    Ok(JwsSignature(out))
}

/// A DER `ECDSA-Sig-Value` as RFC 3279 §2.2.3 and X.690 want it: minimal integers, r and s
/// in 1..n.
fn strict_der(curve: Curve, der: &[u8]) -> Result<JwsSignature, String> {
    match curve {
        Curve::P256 => p256::ecdsa::Signature::from_der(der)
            .map(|sig| JwsSignature(sig.to_bytes().to_vec()))
            .map_err(|e| format!("not a DER ECDSA P-256 signature: {e}")),
        Curve::P384 => p384::ecdsa::Signature::from_der(der)
            .map(|sig| JwsSignature(sig.to_bytes().to_vec()))
            .map_err(|e| format!("not a DER ECDSA P-384 signature: {e}")),
    }
}

/// The same, read as some smart-card and HSM firmwares write it: an integer padded with
/// extra zero bytes, or one whose high bit is set without the sign byte. The structure must
/// still be exact (one SEQUENCE of two INTEGERs, nothing after), and r and s in 1..n.
fn lenient_der(curve: Curve, der: &[u8]) -> Result<JwsSignature, String> {
    let (seq, after) = der_take(der, 0x30)?;
    let (r, rest) = der_take(seq, 0x02)?;
    let (s, rest) = der_take(rest, 0x02)?;
    if !after.is_empty() || !rest.is_empty() {
        return Err("bytes after the signature".into());
    }
    let sig = fixed_width(curve, r, s)?;
    let in_range = match curve {
        Curve::P256 => p256::ecdsa::Signature::from_slice(&sig.0).is_ok(),
        Curve::P384 => p384::ecdsa::Signature::from_slice(&sig.0).is_ok(),
    };
    if !in_range {
        return Err("r or s is 0 or not below the curve order".into());
    }
    Ok(sig)
}

fn warn_once_lenient_der() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "the device's DER ECDSA signatures are not minimal DER (padded or unsigned \
             integers); keybound reads them leniently"
        );
    }
}

pub(super) fn strip_leading_zeros(mut bytes: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

/// Takes one DER element with the given tag; returns its contents and what follows.
pub(super) fn der_take(input: &[u8], tag: u8) -> Result<(&[u8], &[u8]), String> {
    let [t, first, rest @ ..] = input else {
        return Err("DER element truncated".into());
    };
    if *t != tag {
        return Err(format!("expected DER tag {tag:#04x}, found {t:#04x}"));
    }
    let (len, rest) = match *first {
        l if l < 0x80 => (l as usize, rest),
        0x81 => match rest {
            [l, rest @ ..] => (*l as usize, rest),
            [] => return Err("DER length truncated".into()),
        },
        0x82 => match rest {
            [a, b, rest @ ..] => ((*a as usize) << 8 | *b as usize, rest),
            _ => return Err("DER length truncated".into()),
        },
        l => return Err(format!("unsupported DER length form {l:#04x}")),
    };
    if rest.len() < len {
        return Err(format!(
            "DER element says {len} bytes, {} remain",
            rest.len()
        ));
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_its_hash_and_bytes_alone() {
        for alg in [Alg::ES256, Alg::ES384] {
            let made = alg.to_be_signed(b"header.claims");
            let given = ToBeSigned::of_digest(alg, made.digest().as_bytes()).unwrap();
            assert_eq!(made.digest().as_bytes().len(), alg.hash().output_len());
            assert_eq!(made.digest(), given.digest());
            assert_eq!(given.message(), None);
            assert_eq!(made.message(), Some(&b"header.claims"[..]));
            assert!(ToBeSigned::of_digest(alg, &[0; 47]).is_err());
        }
        assert_ne!(
            HashAlg::Sha256.digest(b"a"),
            HashAlg::Sha256.digest(b"b"),
            "different input"
        );
    }

    #[test]
    fn der_signature_becomes_fixed_width() {
        // r with a leading 0x00 (high bit set), s short (needs left padding).
        let mut r = vec![0x00, 0x80];
        r.extend([0x11; 31]);
        let s = vec![0x01, 0x02];
        let mut der = vec![0x30, (2 + r.len() + 2 + s.len()) as u8, 0x02, r.len() as u8];
        der.extend(&r);
        der.extend([0x02, s.len() as u8]);
        der.extend(&s);
        let sig = Alg::ES256
            .to_jws_signature(RawSignature::EcdsaDer(der))
            .unwrap();
        let b = sig.as_bytes();
        assert_eq!(b.len(), 64);
        assert_eq!(b[0], 0x80);
        assert_eq!(&b[1..32], &[0x11; 31]);
        assert_eq!(&b[32..62], &[0u8; 30]);
        assert_eq!(&b[62..], &[0x01, 0x02]);
    }

    /// `SEQUENCE { INTEGER r, INTEGER s }` with short-form lengths.
    fn der_sig(r: &[u8], s: &[u8]) -> Vec<u8> {
        let mut der = vec![0x30, (2 + r.len() + 2 + s.len()) as u8, 0x02, r.len() as u8];
        der.extend(r);
        der.extend([0x02, s.len() as u8]);
        der.extend(s);
        der
    }

    #[test]
    fn der_p384_signature_becomes_fixed_width() {
        let r = vec![0x7f; 48];
        let sig = Alg::ES384
            .to_jws_signature(RawSignature::EcdsaDer(der_sig(&r, &[0x05])))
            .unwrap();
        let b = sig.as_bytes();
        assert_eq!(b.len(), 96);
        assert_eq!(&b[..48], &r[..]);
        assert_eq!(&b[48..95], &[0u8; 47]);
        assert_eq!(b[95], 0x05);
    }

    #[test]
    fn malformed_der_signatures_are_errors() {
        let good = der_sig(&[0x01], &[0x02]);
        assert!(
            Alg::ES256
                .to_jws_signature(RawSignature::EcdsaDer(good.clone()))
                .is_ok()
        );
        let mut trailing = good.clone();
        trailing.push(0);
        for (alg, der) in [
            (Alg::ES256, trailing),
            // r = 0 is outside 1..n.
            (Alg::ES256, der_sig(&[0x00], &[0x02])),
            // r wider than the P-256 field.
            (Alg::ES256, der_sig(&[0x01; 33], &[0x02])),
            (Alg::ES384, vec![0x30, 0x00]),
            // s = 0, even when read leniently.
            (Alg::ES384, der_sig(&[0x00, 0x01], &[0x00, 0x00])),
        ] {
            assert!(
                alg.to_jws_signature(RawSignature::EcdsaDer(der.clone()))
                    .is_err(),
                "{alg} accepted {der:02x?}"
            );
        }
    }

    /// Firmware that pads an INTEGER or leaves out the sign byte still gets its r||s.
    #[test]
    fn non_minimal_der_from_a_device_is_read_leniently() {
        for (alg, r, s, width) in [
            // Padded with a zero byte before a byte below 0x80.
            (Alg::ES384, vec![0x00, 0x01], vec![0x02], 48),
            // High bit set without the 0x00 sign byte ("negative").
            (Alg::ES256, vec![0x80; 32], vec![0x05], 32),
            // The correct form for a high-bit P-384 integer, for comparison.
            (
                Alg::ES384,
                [&[0x00][..], &[0x90; 48]].concat(),
                vec![0x05],
                48,
            ),
        ] {
            let sig = alg
                .to_jws_signature(RawSignature::EcdsaDer(der_sig(&r, &s)))
                .unwrap_or_else(|e| panic!("{alg} refused r={r:02x?}: {e}"));
            let bytes = sig.as_bytes();
            assert_eq!(bytes.len(), 2 * width);
            let r = strip_leading_zeros(&r);
            assert_eq!(&bytes[width - r.len()..width], r);
            let s = strip_leading_zeros(&s);
            assert_eq!(&bytes[2 * width - s.len()..], s);
        }
    }

    #[test]
    fn tpm_parts_are_left_padded() {
        let sig = Alg::ES384
            .to_jws_signature(RawSignature::EcdsaParts {
                r: vec![7; 47],
                s: vec![9; 48],
            })
            .unwrap();
        assert_eq!(sig.as_bytes().len(), 96);
        assert_eq!(sig.as_bytes()[0], 0);
        assert_eq!(sig.as_bytes()[95], 9);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        assert!(
            Alg::ES256
                .to_jws_signature(RawSignature::EcdsaFixed(vec![0; 63]))
                .is_err()
        );
        assert!(
            Alg::ES256
                .to_jws_signature(RawSignature::EcdsaDer(vec![0x30, 0x05, 0x02]))
                .is_err()
        );
        assert!(
            Alg::RS256
                .to_jws_signature(RawSignature::EcdsaFixed(vec![0; 64]))
                .is_err()
        );
        assert!(
            Alg::ES256
                .to_jws_signature(RawSignature::EcdsaParts {
                    r: vec![1; 33],
                    s: vec![1]
                })
                .is_err()
        );
    }

    #[test]
    fn digest_info_matches_rfc8017() {
        let d = Alg::RS256.digest(b"abc");
        let di = d.to_digest_info();
        assert_eq!(di.len(), 19 + 32);
        assert_eq!(&di[19..], d.as_bytes());
    }

    #[test]
    fn alg_names_round_trip() {
        for a in Alg::ALL {
            assert_eq!(a.name().parse::<Alg>().unwrap(), a);
        }
        assert_eq!("es256".parse::<Alg>().unwrap(), Alg::ES256);
        assert!("EdDSA".parse::<Alg>().is_err());
    }
}
