//! Keys by name, approved before they sign or are published. Approval is the policy's
//! verdict on the device's facts, exactly one public object, and a proof of possession: the
//! device signs a fresh random challenge, which must verify under the public key keybound
//! would publish. A `SigningKey` exists only after that (`Keyring::signing_key`, or a
//! passing `Keyring::audit`), and it is the only way to the device's signing operation.
//! When the device has to find the key again (lost session, stale handle, re-initialised
//! library, replaced key file), the key is approved again, and must still have the public
//! key it was approved with, before it signs.
//!
//! Rotation (`rotation`): a slot's label names its active generation; the others are
//! published or kept as the slot's record says.
//!
//! Over 400 lines: approval, the signing key and its re-approval are one guarantee (a key
//! signs only while approved), kept in one file.

pub mod rotation;

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::jose::{self, Alg, Jwk, JwsSignature, PublicKey, ToBeSigned};
use crate::policy::{self, Finding, PolicyError, Rules, Severity, Verdict};
use crate::token::pkcs11::Pkcs11Token;
#[cfg(feature = "tpm")]
use crate::token::tpm::TpmToken;
use crate::token::{
    Backend, Binding, DeviceSettings, KeyFacts, KeyInfo, KeyName, Label, Listing, Problem, Proof,
    TokenDescription, TokenError, worker,
};

/// Errors of resolving a key for signing.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Rotation(#[from] rotation::RotationError),
    /// The gate ([`SignGate`]) refused before the device signed: the audit trail cannot
    /// be written and `[audit] on_failure = "refuse"`.
    #[error("signing refused: {0}")]
    Gated(String),
}

impl KeyError {
    /// The kind of the error underneath.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            KeyError::Token(e) => e.kind(),
            KeyError::Policy(e) => e.kind(),
            KeyError::Rotation(e) => e.kind(),
            KeyError::Gated(_) => crate::error::ErrorKind::Transient,
        }
    }
}

/// Receives the outcome of a signature queued with [`SigningKey::submit`].
pub type SignReply = Box<dyn FnOnce(Result<JwsSignature, KeyError>) + Send>;

/// The finding's attribute for a failed proof of possession.
pub const POSSESSION: &str = "proof of possession";

/// The configured device and the policy that governs its keys. Cloning shares the device.
#[derive(Clone)]
pub struct Keyring {
    backend: Arc<dyn Backend>,
    rules: Rules,
    observer: Option<SignObserver>,
    gate: Option<SignGate>,
    /// The key names (labels, rotated slots) a JWKS publishes; `None`: every approved key.
    publish: Option<Arc<[String]>>,
    /// A name no JWKS publishes unless `publish` names it (the audit trail's checkpoint
    /// key: it signs checkpoints only, and no server should trust it).
    withheld: Option<Arc<str>>,
}

/// One signature the device made or refused, as an observer sees it.
#[derive(Debug)]
pub struct SignEvent<'a> {
    pub purpose: Purpose,
    pub label: &'a str,
    pub alg: Alg,
    pub ok: bool,
    pub took: Duration,
    /// The key's RFC 7638 thumbprint.
    pub kid: &'a str,
    /// The rotated slot the key is a generation of, when it signed through one.
    pub slot: Option<&'a str>,
    /// Who asked ([`Origin`], captured where the signature was asked for); `None`: the
    /// agent itself (a token fetch, the rotation task, a background refresh) or the CLI.
    pub origin: Option<&'a Origin>,
    /// The exact bytes the device signed (the JWS signing input); [`SignEvent::claims`]
    /// reads the audit fields from them. Never logged or recorded as they are.
    message: &'a [u8],
    /// What the gate handed this signature before the device signed (its reserved place
    /// in the audit queue); the observer takes it ([`SignEvent::take_pass`]), and it is
    /// dropped (released) when no one does.
    pass: std::cell::RefCell<Option<GatePass>>,
}

impl SignEvent<'_> {
    /// The audit fields of the claims this signature covers, read from the very bytes
    /// the device signed (so no caller can describe a signature other than it was).
    pub fn claims(&self) -> SignedClaims {
        SignedClaims::of_signing_input(self.message)
    }

    /// The gate's pass for this signature, once (see [`SignGate`]).
    pub fn take_pass(&self) -> Option<GatePass> {
        self.pass.borrow_mut().take()
    }
}

/// What a [`SignGate`] hands a signature it lets through (e.g. a reserved place in the
/// audit queue): kept until the signature's observer takes it, dropped with the
/// signature otherwise (a dropped pass releases what it holds).
pub struct GatePass(pub Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for GatePass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatePass")
    }
}

/// The fields of a signed JWS's claims an audit trail records: never the whole claims
/// (an `ath` or a nonce stays out), never the signature.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct SignedClaims {
    pub aud: Option<serde_json::Value>,
    pub htm: Option<String>,
    pub htu: Option<String>,
    pub jti: Option<String>,
    pub iat: Option<u64>,
}

impl SignedClaims {
    /// `header.claims` (base64url JSON): the claims' audit fields; empty for a message
    /// that is not a JWS signing input (a proof of possession's challenge).
    pub fn of_signing_input(message: &[u8]) -> SignedClaims {
        let Some(dot) = message.iter().position(|b| *b == b'.') else {
            return SignedClaims::default();
        };
        let Ok(payload) = std::str::from_utf8(&message[dot + 1..]) else {
            return SignedClaims::default();
        };
        jose::b64_decode(payload, "claims")
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default()
    }
}

/// Who asked the agent for a signature: the connection's peer, captured when it was
/// accepted. The agent sets it for each connection's task ([`ORIGIN`]); a signature
/// reads it on the task that asks, before the device's worker thread takes over.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub uid: u32,
    pub pid: Option<i32>,
    /// `readlink /proc/<pid>/exe` at accept time; `None` when the kernel would not say.
    pub exe: Option<String>,
}

tokio::task_local! {
    /// The [`Origin`] of the connection this task serves; `None` inside [`as_agent`].
    pub static ORIGIN: Option<Arc<Origin>>;
}

fn current_origin() -> Option<Arc<Origin>> {
    ORIGIN.try_with(Option::clone).ok().flatten()
}

/// Runs `work` as the agent's own: its signatures have no caller's [`Origin`] (a token
/// fetch a caller set off serves every caller that shares the token).
pub async fn as_agent<F: std::future::Future>(work: F) -> F::Output {
    ORIGIN.scope(None, work).await
}

/// Asked before every JWS signature the device makes (not a proof of possession); an
/// `Err` refuses the signature with that reason before the device is asked. The agent's
/// audit trail refuses here when it cannot be written (`on_failure = "refuse"`), and
/// otherwise hands the signature a [`GatePass`]: its place in the audit queue, reserved
/// before the device signs, which the observer uses to queue the signature's line.
pub type SignGate = Arc<dyn Fn() -> Result<Option<GatePass>, String> + Send + Sync>;

/// Why the device signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A JWS someone asked for (assertion, proof, a token request's).
    Jws,
    /// The keyring's own challenge, proving the device holds the key (approval).
    Possession,
}

/// Called after every signature the device makes with a key of this keyring, proofs of
/// possession included (the agent counts and logs there), so no call site can sign
/// unrecorded. It runs on the thread that signed: keep it short and non-blocking.
pub type SignObserver = Arc<dyn Fn(&SignEvent<'_>) + Send + Sync>;

/// One key as the keyring judged it: the device's facts, the verdict (the policy's findings
/// and the proof of possession's), and the signer when the verdict allows signing.
pub struct Audit {
    key: KeyInfo,
    facts: KeyFacts,
    verdict: Verdict,
    signer: Option<SigningKey>,
    /// The slot and generation state, for a generation of a rotated slot.
    generation: Option<(String, rotation::Generation)>,
}

/// Every key on the device, audited, and the objects that are not usable keys, with the
/// rotation records of the slots that have one.
pub struct Inventory {
    pub audits: Vec<Audit>,
    pub problems: Vec<Problem>,
    pub rotations: Vec<rotation::Rotation>,
    /// The names a JWKS publishes (`Keyring::publish_only`); `None`: every approved key.
    pub publish: Option<Arc<[String]>>,
    /// Left out unless `publish` names it (`Keyring::withhold_from_jwks`).
    pub withheld: Option<Arc<str>>,
}

/// An approved key, with its `kid` (RFC 7638 thumbprint) and public JWK, each computed once.
/// Cheap to clone: the agent hands one to every request; clones share the approval.
#[derive(Clone)]
pub struct SigningKey {
    info: Arc<KeyInfo>,
    /// The rotated slot this key is a generation of, when it was found through one.
    slot: Option<Arc<str>>,
    kid: Arc<str>,
    jwk: Arc<Jwk>,
    keyring: Keyring,
    approval: Arc<Approval>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("label", &self.label())
            .field("slot", &self.slot())
            .field("alg", &self.alg())
            .field("kid", &self.kid())
            .finish()
    }
}

/// The device object the key was approved with, renewed by each re-approval.
struct Approval {
    current: RwLock<Approved>,
    /// One re-approval at a time; the others wait for it and use its result.
    renewing: Mutex<()>,
}

#[derive(Clone)]
struct Approved {
    /// Counts re-approvals, so a signature that saw binding N knows whether someone else
    /// has already renewed it.
    epoch: u64,
    binding: Binding,
}

impl Keyring {
    /// Opens the device named by the config. `sessions` overrides the number of signing
    /// sessions.
    pub fn open(
        token: &DeviceSettings,
        rules: Rules,
        sessions: Option<usize>,
    ) -> Result<Keyring, TokenError> {
        let backend: Arc<dyn Backend> = match token {
            DeviceSettings::Pkcs11(settings) => Arc::new(Pkcs11Token::open(settings, sessions)?),
            // One thread owns the TPM context: `sessions` does not apply.
            #[cfg(feature = "tpm")]
            DeviceSettings::Tpm(settings) => Arc::new(TpmToken::open(settings)?),
        };
        Ok(Keyring {
            backend,
            rules,
            observer: None,
            gate: None,
            publish: None,
            withheld: None,
        })
    }

    /// Opens the device in signer processes (`token::signer`): this process never loads
    /// the module or the TSS, nor reads a PIN file.
    pub fn open_signers(
        spawn: crate::token::signer::SignerSpawn,
        rules: Rules,
    ) -> Result<Keyring, TokenError> {
        Ok(Keyring {
            backend: Arc::new(crate::token::signer::Signers::start(spawn)?),
            rules,
            observer: None,
            gate: None,
            publish: None,
            withheld: None,
        })
    }

    /// The signer processes' state, when the device runs in them.
    pub fn signers(&self) -> Option<crate::token::signer::SignerReport> {
        self.backend.signers()
    }

    /// Ends the signer processes, if the device runs in them (`serve`, before its runtime
    /// shuts down): each finishes what it has and exits; signing fails from then on.
    pub fn stop_signers(&self) {
        self.backend.stop();
    }

    /// Publishes only the keys with these names (a rotated slot's name covers its
    /// generations) in every JWKS this keyring's inventories make: the servers' client
    /// keys, never a DPoP key (Okta refuses a proof signed by a key registered for client
    /// authentication).
    pub fn publish_only(&mut self, names: Option<Vec<String>>) {
        self.publish = names.map(Into::into);
    }

    /// Leaves the key `name` (a label or rotated slot) out of every JWKS this keyring's
    /// inventories make, unless [`Keyring::publish_only`] names it explicitly: the audit
    /// trail's checkpoint key.
    pub fn withhold_from_jwks(&mut self, name: &str) {
        self.withheld = Some(name.into());
    }

    /// Watches every signature of the keys approved from now on (see [`SignObserver`]).
    pub fn set_observer(&mut self, observer: SignObserver) {
        self.observer = Some(observer);
    }

    /// Asks `gate` before every JWS signature of the keys approved from now on (see
    /// [`SignGate`]).
    pub fn set_gate(&mut self, gate: SignGate) {
        self.gate = Some(gate);
    }

    fn pass_gate(&self) -> Result<Option<GatePass>, KeyError> {
        match &self.gate {
            Some(gate) => gate().map_err(KeyError::Gated),
            None => Ok(None),
        }
    }

    /// Which backend and token this is, for logs and `keys audit`.
    pub fn describe(&self) -> TokenDescription {
        self.backend.describe()
    }

    pub fn sessions(&self) -> usize {
        self.backend.sessions()
    }

    /// Is the device there and the login good? Looks for a lost device again.
    pub fn health(&self) -> Result<(), TokenError> {
        self.backend.health()
    }

    /// The keys on the device and the objects that are not usable keys, unaudited.
    pub fn keys(&self) -> Result<Listing, TokenError> {
        self.backend.keys()
    }

    /// The one key a label or `pkcs11:` URI names, unaudited.
    pub fn find(&self, name: &str) -> Result<KeyInfo, TokenError> {
        self.backend.find(&KeyName::parse(name)?)
    }

    /// Generates a key inside the device and audits it. Labels of the form `<slot>#<n>`
    /// are the generations of a rotated slot, made only by `prepare`.
    pub fn generate(&self, label: &Label, alg: Alg) -> Result<Audit, TokenError> {
        if rotation::split_generation(label.as_str()).is_some() {
            return Err(TokenError::BadKeyName {
                name: label.to_string(),
                reason: "labels ending in #<number> are the generations of a rotated key; \
                         `keybound keys rotate` makes them"
                    .into(),
            });
        }
        let key = self.backend.generate(label, alg)?;
        self.audit(&key)
    }

    /// The facts, the policy's verdict and, when the policy allows signing, the proof of
    /// possession for one key. A failed proof is a failing finding of the verdict.
    pub fn audit(&self, key: &KeyInfo) -> Result<Audit, TokenError> {
        let facts = self.backend.facts(key)?;
        let mut verdict = policy::evaluate(&facts, &self.rules);
        let mut signer = None;
        if verdict.allows_signing() {
            match self.prove(key)? {
                Ok(binding) => signer = Some(SigningKey::new(self.clone(), key.clone(), binding)),
                Err(finding) => verdict.findings.push(finding),
            }
        }
        Ok(Audit {
            key: key.clone(),
            facts,
            verdict,
            signer,
            generation: None,
        })
    }

    /// Every key audited, and the objects that are not usable keys. A key whose audit fails
    /// because of its objects (`TokenError::about_the_object`) becomes a problem and the
    /// others go on; any other failure (the device busy, a lost session, a timeout) fails
    /// the whole inventory, so a JWKS never silently leaves out a key that is only
    /// unreachable for the moment.
    ///
    /// Keys of rotated slots carry their generation; a generation key its slot's record
    /// does not list, or the keys of a slot whose record cannot be trusted, are problems
    /// (never published, never signing).
    pub fn inventory(&self) -> Result<Inventory, TokenError> {
        let listing = self.backend.keys()?;
        let (rotations, broken) = self.rotations(&listing)?;
        let mut problems = listing.problems;
        for b in broken.iter().filter(|b| b.readable) {
            problems.push(Problem {
                label: b.slot.clone(),
                id: Vec::new(),
                reason: b.reason.clone(),
            });
        }
        let mut audits = Vec::with_capacity(listing.keys.len());
        for key in listing.keys {
            let slot = rotation::split_generation(key.label()).map_or(key.label(), |(s, _)| s);
            if let Some(b) = broken.iter().find(|b| b.slot == slot && !b.readable) {
                problems.push(Problem {
                    label: key.label().to_string(),
                    id: key.id().to_vec(),
                    reason: b.reason.clone(),
                });
                continue;
            }
            let generation = rotations.iter().find(|r| r.slot == slot).map(|r| {
                // Its label, its id and, once recorded, its kid: a key made again outside
                // keybound under the same label and id is another key.
                let g = r.generations.iter().find(|g| {
                    g.label == key.label()
                        && g.id.as_deref() == Some(&crate::token::hex(key.id()))
                        && g.kid
                            .as_deref()
                            .is_none_or(|k| k == key.public().thumbprint())
                });
                (r.slot.clone(), g.cloned())
            });
            let generation = match generation {
                None if rotation::split_generation(key.label()).is_some() => {
                    problems.push(Problem {
                        label: key.label().to_string(),
                        id: key.id().to_vec(),
                        reason: format!(
                            "a generation label of '{slot}', which has no rotation record"
                        ),
                    });
                    continue;
                }
                None => None,
                Some((slot, Some(g))) => Some((slot, g)),
                Some((slot, None)) => {
                    let recorded = rotations
                        .iter()
                        .flat_map(|r| &r.generations)
                        .find(|g| g.label == key.label() && g.id.is_some());
                    let reason = match recorded {
                        // Same label, another key: replaced outside keybound.
                        Some(g) => format!(
                            "the rotation record of '{slot}' says {}, id {}, but this key \
                             is id {} kid {}: it was replaced outside keybound; never published",
                            g.describe(),
                            g.id.as_deref().unwrap_or("?"),
                            crate::token::hex(key.id()),
                            key.public().thumbprint()
                        ),
                        // A key a stopped `prepare` generated before recording it.
                        None => format!(
                            "not in the rotation record of '{slot}' yet (a rotation that \
                             stopped half-way: `keybound keys rotate --label {slot}` finishes \
                             it)"
                        ),
                    };
                    problems.push(Problem {
                        label: key.label().to_string(),
                        id: key.id().to_vec(),
                        reason,
                    });
                    continue;
                }
            };
            match self.audit(&key) {
                Ok(mut audit) => {
                    if let Some((slot, g)) = generation {
                        audit.signer = audit.signer.map(|k| k.in_slot(&slot));
                        audit.generation = Some((slot, g));
                    }
                    audits.push(audit)
                }
                Err(e) if !e.about_the_object() => return Err(e),
                Err(e) => problems.push(Problem {
                    label: key.label().to_string(),
                    id: key.id().to_vec(),
                    reason: e.to_string(),
                }),
            }
        }
        Ok(Inventory {
            audits,
            problems,
            rotations,
            publish: self.publish.clone(),
            withheld: self.withheld.clone(),
        })
    }

    /// Finds a key by label or `pkcs11:` URI and approves it. A rotated slot's label means
    /// its active generation; another generation is refused (see `rotation`).
    pub fn signing_key(&self, name: &str) -> Result<SigningKey, KeyError> {
        let (info, slot) = self.resolve(name)?;
        let key = self.approve(&info)?;
        Ok(match slot {
            Some(slot) => key.in_slot(&slot),
            None => key,
        })
    }

    /// A key by name, approved, without looking at rotation records (adopting a slot's
    /// first key).
    fn signing_key_unrotated(&self, name: &KeyName) -> Result<SigningKey, KeyError> {
        let info = self.backend.find(name)?;
        self.approve(&info)
    }

    /// Approval: the policy's verdict and the proof of possession (`audit`), on a key the
    /// backend found with exactly one public object.
    pub(crate) fn approve(&self, info: &KeyInfo) -> Result<SigningKey, KeyError> {
        self.audit(info)?.into_signing_key()
    }
}

/// A published key: public material only.
#[derive(Clone, Copy, Debug)]
pub struct Published<'a> {
    /// The slot (or label) it is published for.
    pub name: &'a str,
    pub kid: &'a str,
    pub alg: Alg,
    pub public: &'a PublicKey,
}

impl Inventory {
    /// The keys a JWKS publishes: every approved key (policy and proof of possession) that
    /// is not a retired generation of a rotated slot (so prepared, active and retiring
    /// generations, and keys outside any rotation), of the names the keyring publishes
    /// when it was told (`Keyring::publish_only`).
    ///
    /// Public material only: a prepared or retiring generation is published but may not
    /// sign, so no signing key comes out of here.
    pub fn published(&self) -> impl Iterator<Item = Published<'_>> {
        self.audits
            .iter()
            .filter(|a| {
                a.generation
                    .as_ref()
                    .is_none_or(|(_, g)| g.state.published())
            })
            .filter_map(|a| a.signer.as_ref())
            .filter(|k| match &self.publish {
                Some(names) => names.iter().any(|n| n == k.name()),
                None => self.withheld.as_deref() != Some(k.name()),
            })
            .map(|k| Published {
                name: k.name(),
                kid: k.kid(),
                alg: k.alg(),
                public: k.public(),
            })
    }

    /// The published JWKS document (`{"keys": [...]}`, public members only): what
    /// `keybound jwks`, the agent's `/v1/jwks` and the hosted JWKS URL serve.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<Jwk> = self
            .published()
            .map(|k| k.public.jwks_entry(k.kid, k.alg))
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

impl Audit {
    pub fn key(&self) -> &KeyInfo {
        &self.key
    }

    pub fn facts(&self) -> &KeyFacts {
        &self.facts
    }

    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// The slot and the generation's record, for a generation of a rotated slot.
    pub fn generation(&self) -> Option<(&str, &rotation::Generation)> {
        self.generation.as_ref().map(|(s, g)| (s.as_str(), g))
    }

    /// The approved key, when the verdict allows signing.
    /// A generation of a rotated slot that is not active has none: it may be published,
    /// never sign.
    pub fn signing_key(&self) -> Option<&SigningKey> {
        self.signer.as_ref().filter(|_| self.may_sign())
    }

    /// Outside a rotation, or the active generation of its slot.
    fn may_sign(&self) -> bool {
        self.generation
            .as_ref()
            .is_none_or(|(_, g)| g.state == rotation::GenState::Active)
    }

    /// The approved key, or the refusal naming every failing finding (or, for a
    /// generation that is not active, that only the active one signs).
    pub fn into_signing_key(self) -> Result<SigningKey, KeyError> {
        if let Some(refusal) = self.verdict.refusal(self.key.label()) {
            return Err(refusal.into());
        }
        if let Some((slot, g)) = &self.generation
            && !self.may_sign()
        {
            return Err(rotation::RotationError::NotActive {
                slot: slot.clone(),
                what: g.describe(),
                state: g.state.to_string(),
            }
            .into());
        }
        self.signer.ok_or_else(|| {
            // Unreachable in practice: a verdict without failing findings got its proof.
            PolicyError::Refused {
                label: self.key.label().to_string(),
                reasons: "the key's proof of possession was not made".into(),
            }
            .into()
        })
    }
}

impl SigningKey {
    fn new(keyring: Keyring, info: KeyInfo, binding: Binding) -> SigningKey {
        SigningKey {
            slot: None,
            kid: info.public().thumbprint().into(),
            jwk: Arc::new(info.public().jwk()),
            info: Arc::new(info),
            keyring,
            approval: Arc::new(Approval {
                current: RwLock::new(Approved { epoch: 0, binding }),
                renewing: Mutex::new(()),
            }),
        }
    }

    pub fn label(&self) -> &str {
        self.info.label()
    }

    /// The rotated slot this key is a generation of, when it was found through one.
    pub fn slot(&self) -> Option<&str> {
        self.slot.as_deref()
    }

    /// The name the configuration and the caller rules use for this key: its slot when it
    /// is a generation of one, else its label.
    pub fn name(&self) -> &str {
        self.slot().unwrap_or(self.label())
    }

    /// This key's name ([`SigningKey::name`]) found and approved afresh on its device: a
    /// rotated slot's active generation now, or the key now under its label. Only its own
    /// name, so no holder of a key gets another name's key through it.
    pub fn look_up_again(&self) -> Result<SigningKey, KeyError> {
        self.keyring.signing_key(self.name())
    }

    pub(crate) fn in_slot(mut self, slot: &str) -> SigningKey {
        self.slot = Some(slot.into());
        self
    }

    pub fn alg(&self) -> Alg {
        self.info.alg()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public(&self) -> &PublicKey {
        self.info.public()
    }

    /// The public key as a JWK with only the key members (what a DPoP header carries).
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    /// Signs on the device. Blocking.
    pub fn sign(&self, tbs: ToBeSigned) -> Result<JwsSignature, KeyError> {
        let pass = self.keyring.pass_gate()?;
        let start = Instant::now();
        let origin = current_origin();
        let message = self
            .keyring
            .observer
            .as_ref()
            .map(|_| tbs.message().unwrap_or_default().to_vec());
        let result = self.sign_unobserved(tbs);
        observe(
            &self.keyring.observer,
            &Signed {
                purpose: Purpose::Jws,
                key: &self.info,
                kid: &self.kid,
                slot: self.slot(),
                origin: origin.as_deref(),
                message: message.as_deref().unwrap_or_default(),
            },
            result.is_ok(),
            start,
            pass,
        );
        result
    }

    /// `bench`: the device's raw rate measured inside its signer processes, when it runs in
    /// them (`None`: sign from this process instead).
    pub(crate) fn raw_in_signers(&self, phase: Duration) -> Option<Result<u64, TokenError>> {
        self.keyring.backend.raw(&self.info, phase)
    }

    fn sign_unobserved(&self, tbs: ToBeSigned) -> Result<JwsSignature, KeyError> {
        let seen = self.current();
        let backend = &self.keyring.backend;
        match backend.sign(&self.info, &seen.binding, tbs.clone()) {
            Err(TokenError::Reapprove { .. }) => {
                let renewed = self.renew(seen.epoch)?;
                Ok(backend.sign(&self.info, &renewed.binding, tbs)?)
            }
            other => Ok(other?),
        }
    }

    /// Queues a signature; `reply` gets the outcome on another thread.
    pub fn submit(&self, tbs: ToBeSigned, reply: SignReply) {
        let pass = match self.keyring.pass_gate() {
            Ok(pass) => pass,
            Err(refused) => return reply(Err(refused)),
        };
        // The origin is read here, on the caller's task: the reply runs on a worker thread.
        let (observer, key, origin, message, start) = (
            self.keyring.observer.clone(),
            (self.info.clone(), self.kid.clone(), self.slot.clone()),
            current_origin(),
            // Only an observer reads the signed bytes (the trail's claims fields).
            self.keyring
                .observer
                .as_ref()
                .map(|_| tbs.message().unwrap_or_default().to_vec())
                .unwrap_or_default(),
            Instant::now(),
        );
        // The reply runs on a worker thread: the caller's span goes along, so the
        // observer's log line carries the request's fields (the agent's caller uid).
        let span = tracing::Span::current();
        let reply: SignReply = Box::new(move |result| {
            let _entered = span.enter();
            let (info, kid, slot) = &key;
            observe(
                &observer,
                &Signed {
                    purpose: Purpose::Jws,
                    key: info,
                    kid,
                    slot: slot.as_deref(),
                    origin: origin.as_deref(),
                    message: &message,
                },
                result.is_ok(),
                start,
                pass,
            );
            reply(result);
        });
        let seen = self.current();
        // Weak: the reply may run after everyone else let go of the device, and the last
        // reference to it must not be dropped on its own worker thread.
        let retry = (self.downgrade(), tbs.clone(), seen.epoch);
        self.keyring.backend.submit(
            &self.info,
            &seen.binding,
            tbs,
            Box::new(move |result| match result {
                Err(TokenError::Reapprove { .. }) => {
                    let (weak, tbs, epoch) = retry;
                    let Some(key) = weak.upgrade() else {
                        return reply(Err(TokenError::WorkersGone.into()));
                    };
                    // Approving again signs a challenge on the device's worker threads; this
                    // may be one of them (the TPM has only one), so it must not wait here.
                    let spawned = std::thread::Builder::new()
                        .name("keybound-reapprove".into())
                        .spawn(move || reply(key.resign(epoch, tbs)));
                    if let Err(e) = spawned {
                        // `reply` went with the closure; the caller sees its channel close.
                        tracing::error!("cannot start a thread to approve a key again: {e}");
                    }
                }
                other => reply(other.map_err(KeyError::from)),
            }),
        );
    }

    /// This key without a strong hold on the device.
    fn downgrade(&self) -> WeakSigningKey {
        WeakSigningKey {
            slot: self.slot.clone(),
            info: self.info.clone(),
            kid: self.kid.clone(),
            jwk: self.jwk.clone(),
            backend: Arc::downgrade(&self.keyring.backend),
            rules: self.keyring.rules.clone(),
            observer: self.keyring.observer.clone(),
            gate: self.keyring.gate.clone(),
            approval: self.approval.clone(),
        }
    }

    fn resign(&self, epoch: u64, tbs: ToBeSigned) -> Result<JwsSignature, KeyError> {
        let renewed = self.renew(epoch)?;
        Ok(self
            .keyring
            .backend
            .sign(&self.info, &renewed.binding, tbs)?)
    }

    fn current(&self) -> Approved {
        self.approval
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Approves the key again after the device had to look it up again: found by its label
    /// and id, the same public key as approved, the policy, and a new proof of possession.
    /// `seen` is the approval the failed signature used; if another thread renewed it in the
    /// meantime, that renewal is used.
    fn renew(&self, seen: u64) -> Result<Approved, KeyError> {
        let _one = self
            .approval
            .renewing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.current();
        if current.epoch != seen {
            return Ok(current);
        }
        let label = self.label();
        let found = self
            .keyring
            .backend
            .find(&KeyName::exact(label, self.info.id()))?;
        if found.public() != self.public() || found.alg() != self.alg() {
            tracing::warn!(key = label, kid = %self.kid, "key replaced on the device; refused");
            return Err(PolicyError::Refused {
                label: label.to_string(),
                reasons: format!(
                    "it was replaced on the device after keybound approved it (kid {} is now \
                     kid {}), and keybound does not sign with a key other than the one it \
                     approved, so this signature is refused. The approved key is forgotten: \
                     the next request that names it audits whatever key then has that name \
                     afresh (policy and proof of possession), exactly as a restart would. An \
                     imported replacement is refused by the policy; a key newly generated on \
                     the device under that name is approved (a rotation)",
                    self.kid,
                    found.public().thumbprint()
                ),
            }
            .into());
        }
        let audit = self.keyring.audit(&found)?;
        let binding = audit.into_signing_key()?.current().binding;
        let renewed = Approved {
            epoch: seen + 1,
            binding,
        };
        *self
            .approval
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = renewed.clone();
        tracing::info!(
            key = label,
            "key approved again after the device looked it up again"
        );
        Ok(renewed)
    }
}

/// The proof of possession: the device signs a fresh random challenge with `key`, and the
/// signature must verify under `key.public`, the public key keybound would publish (or, for
/// a TPM key with an auth value, the TPM loaded the key only with that public area). The
/// inner `Err` is the failing finding when it does not (or the device cannot sign with it).
impl Keyring {
    fn prove(&self, key: &KeyInfo) -> Result<Result<Binding, Finding>, TokenError> {
        let backend = &*self.backend;
        let message = crate::token::signer::wire::challenge()?;
        let start = Instant::now();
        let answer =
            worker::wait(|reply| backend.prove(key, key.alg().to_be_signed(&message), reply));
        let finding = |message: String| Finding {
            severity: Severity::Fail,
            attribute: POSSESSION,
            message,
        };
        if let Ok((Proof::Signed(_), _)) | Err(_) = &answer
            && self.observer.is_some()
        {
            let kid = key.public().thumbprint();
            observe(
                &self.observer,
                &Signed {
                    purpose: Purpose::Possession,
                    key,
                    kid: &kid,
                    slot: None,
                    origin: None,
                    message: &message,
                },
                answer.is_ok(),
                start,
                None,
            );
        }
        let (signature, binding) = match answer {
            Ok((Proof::Signed(signature), binding)) => (signature, binding),
            Ok((Proof::LoadedByDevice, binding)) => return Ok(Ok(binding)),
            // Only the key's own objects make a failing finding; the device failing for
            // the moment fails the approval instead.
            Err(e) if !e.about_the_object() => return Err(e),
            Err(e) => {
                return Ok(Err(finding(format!(
                    "the device could not sign a challenge with the key ({e}), so keybound cannot \
                 show that the public key on the token is the key's; do not publish it"
                ))));
            }
        };
        match jose::verify(key.public(), key.alg(), &message, &signature) {
            Ok(()) => Ok(Ok(binding)),
            Err(_) => Ok(Err(finding(format!(
                "the public key on the token does not match the private key (the device's \
             signature over a random challenge does not verify under it): someone replaced \
             the public object; do not publish it (kid {}); regenerate the key with `keybound \
             keys generate`",
                key.public().thumbprint()
            )))),
        }
    }
}

/// What an observer is told about one signature, besides its outcome.
struct Signed<'a> {
    purpose: Purpose,
    key: &'a KeyInfo,
    kid: &'a str,
    slot: Option<&'a str>,
    origin: Option<&'a Origin>,
    message: &'a [u8],
}

fn observe(
    observer: &Option<SignObserver>,
    s: &Signed<'_>,
    ok: bool,
    start: Instant,
    pass: Option<GatePass>,
) {
    if let Some(observer) = observer {
        observer(&SignEvent {
            purpose: s.purpose,
            label: s.key.label(),
            alg: s.key.alg(),
            ok,
            took: start.elapsed(),
            kid: s.kid,
            slot: s.slot,
            origin: s.origin,
            message: s.message,
            pass: std::cell::RefCell::new(pass),
        });
    }
}

/// A [`SigningKey`] that does not keep the device open: what a queued signature's reply
/// holds, so the device is never dropped on its own worker thread.
struct WeakSigningKey {
    slot: Option<Arc<str>>,
    info: Arc<KeyInfo>,
    kid: Arc<str>,
    jwk: Arc<Jwk>,
    backend: std::sync::Weak<dyn Backend>,
    rules: Rules,
    observer: Option<SignObserver>,
    gate: Option<SignGate>,
    approval: Arc<Approval>,
}

impl WeakSigningKey {
    fn upgrade(self) -> Option<SigningKey> {
        Some(SigningKey {
            slot: self.slot,
            info: self.info,
            kid: self.kid,
            jwk: self.jwk,
            keyring: Keyring {
                backend: self.backend.upgrade()?,
                rules: self.rules,
                observer: self.observer,
                gate: self.gate,
                publish: None,
                withheld: None,
            },
            approval: self.approval,
        })
    }
}
