//! The hardware seam: one trait every key store implements (`pkcs11`; `tpm` with the `tpm`
//! feature), the one device worker their device calls run on (`worker`), key names and
//! labels, the key facts the policy judges, and the errors a device can give.

pub mod pkcs11;
pub mod profile;
#[cfg(feature = "tpm")]
pub mod tpm;

mod error;
mod name;
mod pin;
pub mod signer;
pub(crate) mod trust;
pub(crate) mod worker;

pub use error::TokenError;
pub use name::{KeyName, Label};
pub use pin::{Pin, PinSource};

use crate::jose::{Alg, JwsSignature, PublicKey, ToBeSigned};

/// `[token]`: the device to open, chosen by its `backend` key. The token layer owns it;
/// `config` only parses it into this shape.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum DeviceSettings {
    Pkcs11(pkcs11::Pkcs11Settings),
    #[cfg(feature = "tpm")]
    Tpm(tpm::TpmSettings),
}

/// RSA modulus size for generated keys unless `token.rsa_bits` says otherwise.
pub(crate) fn default_rsa_bits() -> u32 {
    2048
}

/// A key on the device, as found: never the private part, only where it is and what it is.
/// Only backends make one; everyone else reads it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyInfo {
    label: String,
    /// The backend's stable identifier (PKCS#11 `CKA_ID`).
    id: Vec<u8>,
    alg: Alg,
    public: PublicKey,
}

impl KeyInfo {
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The backend's stable identifier (PKCS#11 `CKA_ID`; TPM: part of the key's name).
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// The public key as the device reports it; trusted only after the keyring's proof of
    /// possession.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }
}

/// What a backend found: the keys it can use, and the objects that would be keys but are
/// not usable (each with what is wrong). One bad object never hides the others.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Listing {
    pub keys: Vec<KeyInfo>,
    pub problems: Vec<Problem>,
}

/// An object keybound cannot use as a key, and why: reported by `keys list`, `keys audit`
/// and the agent's `/v1/keys`, never fatal to the other keys.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    pub label: String,
    pub id: Vec<u8>,
    /// A sentence naming the object's attribute and what to do.
    pub reason: String,
}

/// Which device object an approval covers, in the terms of the backend that proved it (a
/// PKCS#11 object handle of one library generation; a TPM key blob). Signing uses exactly
/// this object; a backend that would have to look the key up again answers
/// [`TokenError::Reapprove`] instead, so a key replaced on the device is approved again
/// (policy, proof of possession, same public key) before it signs.
#[derive(Clone)]
pub(crate) struct Binding(std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl Binding {
    pub(crate) fn new<T: std::any::Any + Send + Sync>(value: T) -> Binding {
        Binding(std::sync::Arc::new(value))
    }

    /// The backend's own value; `None` if another backend made the binding.
    pub(crate) fn get<T: std::any::Any + Send + Sync>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

/// One security-relevant fact about a key, with the device's own name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fact {
    /// `None` when the device did not report it.
    pub value: Option<bool>,
    /// The device attribute this came from, e.g. `CKA_EXTRACTABLE` or `fixedTPM`.
    pub source: &'static str,
}

impl<'de> serde::Deserialize<'de> for Fact {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Fact, D::Error> {
        #[derive(serde::Deserialize)]
        struct Owned {
            value: Option<bool>,
            source: String,
        }
        let o = Owned::deserialize(de)?;
        Ok(Fact {
            value: o.value,
            source: crate::jose::interned::intern(&o.source),
        })
    }
}

/// What a backend reports about a key for the policy (ARCHITECTURE.md, backend contract).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyFacts {
    pub extractable: Fact,
    pub never_extractable: Fact,
    pub sensitive: Fact,
    pub always_sensitive: Fact,
    /// Generated inside the device (PKCS#11 `CKA_LOCAL`; TPM `sensitiveDataOrigin`).
    pub generated_on_device: Fact,
    /// The separate public-key object was generated with the key (PKCS#11 `CKA_LOCAL` of
    /// the public object). `None` where the public key is not a separate object (TPM: the
    /// public area is bound to the key blob).
    pub public_generated_on_device: Option<Fact>,
    pub can_sign: Fact,
    /// Usable only in a session that logged in (PKCS#11 `CKA_PRIVATE`): else anyone who can
    /// open the token signs with it, and SoftHSM lets a session that never logged in create
    /// such a key. `None` where the device has no such attribute (TPM: the key's own auth).
    pub needs_login: Option<Fact>,
    /// Usages beyond signing; keybound generates keys without them.
    pub other_usages: Vec<Fact>,
    /// Every attribute read, in the device's terms, for `keys audit`.
    #[serde(with = "crate::jose::interned::pairs")]
    pub attributes: Vec<(&'static str, Option<bool>)>,
    /// What an attribute means on this device where its profile says (attribute name,
    /// meaning): the policy's findings and `keys audit` name it.
    #[serde(with = "crate::jose::interned::pairs")]
    pub meanings: Vec<(&'static str, String)>,
}

impl KeyFacts {
    /// What `attribute` means on this device, if its profile says.
    pub fn meaning(&self, attribute: &str) -> Option<&str> {
        self.meanings
            .iter()
            .find(|(name, _)| *name == attribute)
            .map(|(_, m)| m.as_str())
    }
}

/// What a backend is and which token it reached, for logs and `keys audit`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenDescription {
    /// A log label such as "pkcs11"; callers never branch on it.
    #[serde(with = "crate::jose::interned")]
    pub backend: crate::jose::interned::Str,
    pub token_label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub profile: String,
    /// False for a profile written from vendor documentation, never tried on the device.
    pub profile_tested_live: bool,
    /// The PKCS#11 module loaded, for `pkcs11:` URIs that name it; `None` for a backend
    /// that loads none (TPM).
    pub module: Option<ModuleDescription>,
}

/// The PKCS#11 module a backend loaded and how it logs in: what the library and query
/// attributes of a `pkcs11:` URI (RFC 7512 §2.3) are checked against.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleDescription {
    /// The module file as the config (or the profile) names it, first, and the file it
    /// resolves to (symbolic links followed), which is the one loaded.
    pub paths: Vec<std::path::PathBuf>,
    /// `C_GetInfo`: `manufacturerID`, `libraryDescription`, `libraryVersion`.
    pub library_manufacturer: String,
    pub library_description: String,
    pub library_version: (u8, u8),
    /// The config's PIN file; `None` when the PIN comes from an environment variable.
    pub pin_file: Option<std::path::PathBuf>,
    /// The slot the configured token is in now (`C_GetSlotInfo`).
    pub slot_id: u64,
    pub slot_description: String,
    pub slot_manufacturer: String,
}

/// Receives the outcome of a signature made on a worker thread.
pub(crate) type Reply = worker::Reply<JwsSignature>;

/// What a backend offers as proof that the device holds the private half of a key's public
/// key.
pub(crate) enum Proof {
    /// The device's signature over the challenge; the keyring verifies it under the public
    /// key it would publish.
    Signed(JwsSignature),
    /// The device itself refused to use the key with any other public key: a TPM loads a
    /// key blob only with its own public area (`TPM2_Load` checks the private area's
    /// integrity over the public area's name). For keys whose signatures need an
    /// authorization value, which listing and publishing do not use (no dictionary-attack
    /// strike for a wrong one).
    #[cfg_attr(not(feature = "tpm"), allow(dead_code))]
    LoadedByDevice,
}

/// Receives a proof of possession and the binding it was made with.
pub(crate) type ProofReply = worker::Reply<(Proof, Binding)>;

/// A key store. Methods a device family lacks answer "not supported" (Parsec style).
/// Implementations are blocking; the agent calls them off the async reactor. Crate-private:
/// outside the crate, a device signs only through a `keyring::SigningKey`.
pub(crate) trait Backend: Send + Sync {
    fn describe(&self) -> TokenDescription;

    /// How many signatures the backend makes in parallel.
    fn sessions(&self) -> usize {
        1
    }

    /// Generates a sign-only, non-extractable key pair inside the device.
    fn generate(&self, label: &Label, alg: Alg) -> Result<KeyInfo, TokenError> {
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

    /// Every signing key on the device that has a label, and the objects that would be
    /// keys but cannot be used.
    fn keys(&self) -> Result<Listing, TokenError>;

    /// The one key a name refers to. Errors: no key (listing those that exist), several
    /// keys (listing their ids), or an object that is not usable (saying why).
    fn find(&self, name: &KeyName) -> Result<KeyInfo, TokenError> {
        let described = self.describe();
        name.check_token(&described)?;
        let token = described.token_label;
        let listing = self.keys()?;
        let keys: Vec<&KeyInfo> = listing
            .keys
            .iter()
            .filter(|k| name.matches(&k.label, &k.id))
            .collect();
        let bad: Vec<&Problem> = listing
            .problems
            .iter()
            .filter(|p| name.matches(&p.label, &p.id))
            .collect();
        match (keys.as_slice(), bad.as_slice()) {
            ([one], []) => Ok((*one).clone()),
            ([], [one]) => Err(TokenError::Unusable {
                label: one.label.clone(),
                id: hex(&one.id),
                reason: one.reason.clone(),
            }),
            ([], []) => Err(TokenError::KeyNotFound {
                name: name.to_string(),
                token,
                known: listing.keys.into_iter().map(|k| k.label).collect(),
            }),
            _ => {
                let found = keys
                    .iter()
                    .map(|k| (k.label.as_str(), k.id.as_slice()))
                    .chain(bad.iter().map(|p| (p.label.as_str(), p.id.as_slice())));
                Err(TokenError::Ambiguous {
                    name: name.to_string(),
                    token,
                    ids: found.clone().map(|(_, id)| hex(id)).collect(),
                    uris: found.map(|(l, id)| KeyName::uri(l, id)).collect(),
                })
            }
        }
    }

    /// Every rotation record of `slot` stored with the keys (opaque bytes, in no order; the
    /// keyring parses them and takes the newest). Devices without a place for them answer
    /// "not supported".
    fn records(&self, slot: &Label) -> Result<Vec<Vec<u8>>, TokenError> {
        let _ = slot;
        Err(TokenError::NotSupported {
            what: "key rotation records",
            backend: self.describe().backend,
        })
    }

    /// Stores a new record of `slot` with sequence number `seq`, whole or not at all.
    /// [`TokenError::RecordConflict`] when the device can tell that another writer already
    /// stored `seq` (the keyring also checks by reading back, for devices that cannot).
    fn put_record(&self, slot: &Label, seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        let _ = (slot, seq, bytes);
        Err(TokenError::NotSupported {
            what: "key rotation records",
            backend: self.describe().backend,
        })
    }

    /// Removes the record of `slot` stored as `seq` with these bytes (an older one, or one
    /// that lost to another writer's).
    fn remove_record(&self, slot: &Label, seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        let _ = (slot, seq, bytes);
        Err(TokenError::NotSupported {
            what: "key rotation records",
            backend: self.describe().backend,
        })
    }

    /// Deletes a key from the device for good (a retired generation, after the rotation
    /// record says so). Never exports or wraps it.
    fn destroy(&self, key: &KeyInfo) -> Result<(), TokenError> {
        let _ = key;
        Err(TokenError::NotSupported {
            what: "destroying keys",
            backend: self.describe().backend,
        })
    }

    /// The attributes the policy judges.
    fn facts(&self, key: &KeyInfo) -> Result<KeyFacts, TokenError>;

    /// Looks the key's private object up afresh and signs `tbs` with it; replies with the
    /// signature (the keyring verifies it under `key.public`), or the device's own binding
    /// where signing needs a secret the caller may not have, and the binding that later
    /// signatures with this approval use.
    fn prove(&self, key: &KeyInfo, tbs: ToBeSigned, reply: ProofReply);

    /// Signs with the approved object and returns the JWS-ready signature. Blocking.
    fn sign(
        &self,
        key: &KeyInfo,
        binding: &Binding,
        tbs: ToBeSigned,
    ) -> Result<JwsSignature, TokenError> {
        worker::wait(|reply| self.submit(key, binding, tbs, reply))
    }

    /// Queues a signature with the approved object and calls `reply` with the outcome,
    /// possibly on another thread.
    fn submit(&self, key: &KeyInfo, binding: &Binding, tbs: ToBeSigned, reply: Reply);

    /// The signer processes' state, for a backend that runs the device in them.
    fn signers(&self) -> Option<signer::SignerReport> {
        None
    }

    /// `bench`: the raw rate measured inside the signer processes, for a backend that runs
    /// the device in them (`None`: measure by signing from this process).
    fn raw(&self, key: &KeyInfo, phase: std::time::Duration) -> Option<Result<u64, TokenError>> {
        let _ = (key, phase);
        None
    }

    /// Ends the device's processes now, as dropping the backend would (signer processes;
    /// nothing for the others): for a caller whose runtime reads their answers and must
    /// stop them before it shuts down.
    fn stop(&self) {}
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
    base16ct::lower::encode_string(bytes)
}
