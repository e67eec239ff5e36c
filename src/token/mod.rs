//! The hardware seam: one trait every key store implements (PKCS#11; TPM 2.0 with the `tpm` feature),
//! the key facts the policy judges, and the errors a device can give.

pub mod pkcs11;
pub mod profile;
#[cfg(feature = "tpm")]
pub mod tpm;

mod error;
mod name;
mod pin;
pub(crate) mod trust;

use std::sync::mpsc;
use std::time::Duration;

pub use error::TokenError;
pub use name::KeyName;
pub use pin::{Pin, PinSource};

use crate::jose::{Alg, JwsSignature, PublicKey, ToBeSigned};

/// RSA modulus size for generated keys unless `token.rsa_bits` says otherwise.
pub(crate) fn default_rsa_bits() -> u32 {
    2048
}

/// A key on the device, as found: never the private part, only where it is and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub label: String,
    /// The backend's stable identifier (PKCS#11 `CKA_ID`).
    pub id: Vec<u8>,
    pub alg: Alg,
    pub public: PublicKey,
}

/// One security-relevant fact about a key, with the device's own name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fact {
    /// `None` when the device did not report it.
    pub value: Option<bool>,
    /// The device attribute this came from, e.g. `CKA_EXTRACTABLE` or `fixedTPM`.
    pub source: &'static str,
}

/// What a backend reports about a key for the policy (ARCHITECTURE.md, backend contract).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFacts {
    pub extractable: Fact,
    pub never_extractable: Fact,
    pub sensitive: Fact,
    pub always_sensitive: Fact,
    /// Generated inside the device (PKCS#11 `CKA_LOCAL`; TPM `sensitiveDataOrigin`).
    pub generated_on_device: Fact,
    pub can_sign: Fact,
    /// Usages beyond signing; keybound generates keys without them.
    pub other_usages: Vec<Fact>,
    /// Every attribute read, in the device's terms, for `keys audit`.
    pub attributes: Vec<(&'static str, Option<bool>)>,
}

/// What a backend is and which token it reached, for logs and `keys audit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenDescription {
    /// A log label such as "pkcs11"; callers never branch on it.
    pub backend: &'static str,
    pub token_label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub profile: String,
}

/// Receives the outcome of a signature made on a worker thread.
pub type Reply = Box<dyn FnOnce(Result<JwsSignature, TokenError>) + Send>;

/// A key store. Methods a device family lacks answer "not supported" (Parsec style).
/// Implementations are blocking; the agent calls them off the async reactor.
pub trait Backend: Send + Sync {
    fn describe(&self) -> TokenDescription;

    /// How many signatures the backend makes in parallel.
    fn sessions(&self) -> usize {
        1
    }

    /// Generates a sign-only, non-extractable key pair inside the device.
    fn generate(&self, label: &str, alg: Alg) -> Result<KeyInfo, TokenError> {
        let _ = (label, alg);
        Err(TokenError::NotSupported {
            what: "key generation",
            backend: self.describe().backend,
        })
    }

    /// Is the device there and the login good? Looks for a lost device again. Callers that
    /// also want the keys call [`Backend::keys`] after it rather than twice.
    fn health(&self) -> Result<(), TokenError> {
        self.keys().map(|_| ())
    }

    /// Every signing key on the device that has a label.
    fn keys(&self) -> Result<Vec<KeyInfo>, TokenError>;

    /// The key a name refers to; the error lists the keys that do exist.
    fn find(&self, name: &KeyName) -> Result<KeyInfo, TokenError> {
        let token = self.describe().token_label;
        name.check_token(&token)?;
        let keys = self.keys()?;
        let found = keys.iter().find(|k| name.matches(&k.label, &k.id)).cloned();
        found.ok_or_else(|| TokenError::KeyNotFound {
            name: name.to_string(),
            token,
            known: keys.into_iter().map(|k| k.label).collect(),
        })
    }

    /// The attributes the policy judges.
    fn facts(&self, key: &KeyInfo) -> Result<KeyFacts, TokenError>;

    /// Signs on the device and returns the JWS-ready signature. Blocking.
    fn sign(&self, key: &KeyInfo, tbs: ToBeSigned) -> Result<JwsSignature, TokenError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            key,
            tbs,
            Box::new(move |result| {
                // The receiver waits below; a failed send means it is gone, nothing to do.
                let _ = tx.send(result);
            }),
        );
        rx.recv().map_err(|_| TokenError::WorkersGone)?
    }

    /// Queues a signature and calls `reply` with the outcome, possibly on another thread.
    fn submit(&self, key: &KeyInfo, tbs: ToBeSigned, reply: Reply);

    /// The device's own speed: signs the same prepared input on every signing session in
    /// parallel for `duration`, with no JOSE work, and returns how many signatures were made.
    fn bench_raw(
        &self,
        key: &KeyInfo,
        tbs: &ToBeSigned,
        duration: Duration,
    ) -> Result<u64, TokenError> {
        let _ = (key, tbs, duration);
        Err(TokenError::NotSupported {
            what: "raw benchmarking",
            backend: self.describe().backend,
        })
    }
}

/// `tbs` was prepared for `alg`, the algorithm of the key `label`: a signature from one
/// key must never be produced over input hashed for another algorithm.
pub(crate) fn check_alg(label: &str, alg: Alg, tbs: &ToBeSigned) -> Result<(), TokenError> {
    if tbs.alg() == alg {
        return Ok(());
    }
    Err(crate::jose::JoseError::KeyAlgMismatch {
        alg: tbs.alg(),
        expected: "a key of that algorithm",
        found: format!("'{label}', a {alg} key"),
    }
    .into())
}

/// Lower-case hex, for key ids (`CKA_ID`) and serial numbers.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
