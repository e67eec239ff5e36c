//! Key rotation: a slot (`client-auth`, `dpop`) holds generations, each its own
//! non-extractable key on the device with its own kid, each in one state:
//!
//! | state      | signs | published | next                                  |
//! |------------|-------|-----------|---------------------------------------|
//! | pending    | no    | no        | prepared, once its key is generated   |
//! | prepared   | no    | yes       | active (after the server accepted it) |
//! | active     | yes   | yes       | retiring (when the next one activates)|
//! | retiring   | no    | yes       | retired (after `retire_after`)        |
//! | retired    | no    | no        | destroying (only when asked)          |
//! | destroying | no    | no        | destroyed, once its key is deleted    |
//! | destroyed  | -     | no        | (kept as history)                     |
//!
//! Generation 1 is the key the slot's label named before its first rotation; generation
//! n > 1 has the label `<slot>#<n>`. The states live in a *record* stored with the keys (a
//! PKCS#11 data object on the token; a file next to the TPM key files), so agents sharing
//! a device agree. A record is never changed in place: each step writes a new record with
//! the next sequence number, then removes the old one; the newest whole record wins. Every
//! step is one record write, or two around one device operation with the first one saying
//! what is about to happen (`pending`, `destroying`), so a crash at any point leaves a
//! record the next run resumes from. A record carries a digest of its content, and is
//! checked against the keys on the device before anything trusts it: a damaged, edited or
//! lost record is refused with the fix named, never guessed around.
//!
//! Over 400 lines: the record, its checks and every step of the state machine are one
//! guarantee (a crash never leaves a state the next run cannot read), kept in one file.

use std::collections::BTreeSet;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::{KeyError, Keyring, SigningKey};
use crate::jose::{Alg, unix_now};
use crate::token::{KeyInfo, KeyName, Label, Listing, TokenError, hex};

const VERSION: u32 = 1;

/// Where a generation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenState {
    Pending,
    Prepared,
    Active,
    Retiring,
    Retired,
    Destroying,
    Destroyed,
}

impl GenState {
    /// In the published JWKS: prepared (the server learns it before it is used), active,
    /// retiring (assertions in flight still verify).
    pub fn published(self) -> bool {
        matches!(
            self,
            GenState::Prepared | GenState::Active | GenState::Retiring
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            GenState::Pending => "pending",
            GenState::Prepared => "prepared",
            GenState::Active => "active",
            GenState::Retiring => "retiring",
            GenState::Retired => "retired",
            GenState::Destroying => "destroying",
            GenState::Destroyed => "destroyed",
        }
    }
}

impl std::fmt::Display for GenState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One generation of a slot, as its record keeps it. Times are Unix seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    pub n: u32,
    pub label: String,
    pub state: GenState,
    /// The key's `CKA_ID` (hex), once it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// RFC 7638 thumbprint of its public key, once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<u64>,
    /// The latest expiry of an access token bound to this key (DPoP `cnf.jkt`) that a
    /// keybound holds: the key is not retired or destroyed before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_until: Option<u64>,
}

impl Generation {
    fn id_bytes(&self) -> Option<Vec<u8>> {
        self.id
            .as_deref()
            .and_then(|h| base16ct::mixed::decode_vec(h).ok())
    }

    /// What a user reads about it in errors: `generation 2 ('dpop#2', kid …) is prepared`.
    pub fn describe(&self) -> String {
        format!(
            "generation {} ('{}', kid {}) is {}",
            self.n,
            self.label,
            self.kid.as_deref().unwrap_or("not yet known"),
            self.state
        )
    }
}

/// A slot's record: its generations and their states.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    pub version: u32,
    pub slot: String,
    /// Increases by one with every step.
    pub seq: u64,
    pub alg: Alg,
    pub generations: Vec<Generation>,
}

/// The record as stored: the content and a digest of it (SHA-256 of its JSON), so an
/// edit by mistake is caught instead of trusted.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    rotation: Rotation,
    digest: String,
}

impl Rotation {
    pub fn active(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .find(|g| g.state == GenState::Active)
    }

    /// The generation being prepared or prepared, if any.
    pub fn next(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .find(|g| matches!(g.state, GenState::Pending | GenState::Prepared))
    }

    pub fn in_state(&self, state: GenState) -> impl Iterator<Item = &Generation> {
        self.generations.iter().filter(move |g| g.state == state)
    }

    pub fn by_kid(&self, kid: &str) -> Option<&Generation> {
        self.generations
            .iter()
            .find(|g| g.kid.as_deref() == Some(kid))
    }

    /// One line per generation, for errors that show the state.
    pub fn summary(&self) -> String {
        self.generations
            .iter()
            .filter(|g| g.state != GenState::Destroyed)
            .map(Generation::describe)
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn encode(&self) -> Result<Vec<u8>, KeyError> {
        let content = serde_json::to_vec(self).map_err(internal)?;
        let stored = Stored {
            rotation: self.clone(),
            digest: digest(&content),
        };
        serde_json::to_vec_pretty(&stored).map_err(internal)
    }

    fn decode(slot: &str, bytes: &[u8]) -> Result<Rotation, String> {
        let stored: Stored =
            serde_json::from_slice(bytes).map_err(|e| format!("it does not parse ({e})"))?;
        let content = serde_json::to_vec(&stored.rotation).map_err(|e| e.to_string())?;
        if digest(&content) != stored.digest {
            return Err("its digest does not match its content (it was edited)".into());
        }
        let r = stored.rotation;
        if r.version != VERSION {
            return Err(format!(
                "version {} is not {VERSION}; a newer keybound wrote it",
                r.version
            ));
        }
        if r.slot != slot {
            return Err(format!("it is the record of '{}'", r.slot));
        }
        Ok(r)
    }

    fn mutate(&self, f: impl FnOnce(&mut Rotation)) -> Rotation {
        let mut next = self.clone();
        next.seq += 1;
        f(&mut next);
        next
    }

    fn generation_mut(&mut self, n: u32) -> Option<&mut Generation> {
        self.generations.iter_mut().find(|g| g.n == n)
    }

    /// The record agrees with the keys on the device: one active generation, at most one
    /// on its way in, and every generation whose key must exist has it, with the id and
    /// kid the record says (compared with the device's public key; the proof of
    /// possession comes with approval).
    fn check(&self, listing: &Listing) -> Result<(), String> {
        let count = |s: GenState| self.in_state(s).count();
        if count(GenState::Active) != 1 {
            return Err(format!(
                "it has {} active generations, not one",
                count(GenState::Active)
            ));
        }
        if count(GenState::Pending) + count(GenState::Prepared) > 1 {
            return Err("it has more than one generation being prepared".into());
        }
        let mut numbers = BTreeSet::new();
        for g in &self.generations {
            if !numbers.insert(g.n) || g.label != generation_label(&self.slot, g.n) {
                return Err(format!(
                    "generation {} appears twice or has the label '{}'",
                    g.n, g.label
                ));
            }
            // The recorded key (label and id), else any key of that label.
            let mut labelled = listing.keys.iter().filter(|k| k.label() == g.label);
            let on_device = labelled
                .clone()
                .find(|k| Some(hex(k.id())) == g.id)
                .or_else(|| labelled.next());
            let settled = !matches!(
                g.state,
                GenState::Pending | GenState::Destroying | GenState::Destroyed
            );
            match (on_device, settled) {
                (None, true) => {
                    return Err(format!(
                        "{}, but no usable key labelled '{}' is on the device (deleted outside \
                         keybound?)",
                        g.describe(),
                        g.label
                    ));
                }
                (Some(k), true)
                    if Some(hex(k.id())) != g.id
                        || Some(k.public().thumbprint()) != g.kid
                        || k.alg() != self.alg =>
                {
                    return Err(format!(
                        "{}, but the key labelled '{}' on the device is id {} kid {} ({}): it \
                         was replaced outside keybound",
                        g.describe(),
                        g.label,
                        hex(k.id()),
                        k.public().thumbprint(),
                        k.alg()
                    ));
                }
                (Some(_), false) if g.state == GenState::Destroyed => {
                    return Err(format!(
                        "{}, but a key labelled '{}' is on the device again",
                        g.describe(),
                        g.label
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A slot's rotation record could not be used, or a step is not possible now.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(
        "the rotation record of '{slot}' cannot be trusted: {reason}. keybound does not guess \
         which key is active. Restore the record from the token's backup, or undo the change \
         on the device; `keybound keys list` shows the keys"
    )]
    Inconsistent { slot: String, reason: String },
    #[error(
        "the rotation record of '{slot}' is missing, but keys of its generations are on the \
         device ({labels}). keybound does not guess which is active: restore the record from \
         the token's backup, or delete the generation keys that are not in use"
    )]
    Lost { slot: String, labels: String },
    #[error("'{slot}' has no key to rotate: {source}")]
    NoKey {
        slot: String,
        #[source]
        source: Box<KeyError>,
    },
    #[error(
        "a rotation of '{slot}' is already in progress: {state}. Activate it (`keybound keys \
         rotate --label {slot} --activate`) before preparing another"
    )]
    InProgress { slot: String, state: String },
    #[error(
        "'{slot}' has no prepared generation ({state}); run `keybound keys rotate --label {slot}` first"
    )]
    NothingPrepared { slot: String, state: String },
    #[error("'{slot}' has no retiring generation to retire ({state})")]
    NothingRetiring { slot: String, state: String },
    #[error(
        "'{slot}': {what}, for only {age} s, less than retire_after ({retire_after} s): \
         assertions signed before the switch may still be in flight. Wait, or pass --force"
    )]
    TooYoung {
        slot: String,
        what: String,
        age: u64,
        retire_after: u64,
    },
    #[error(
        "'{slot}': {what}, and an access token bound to it (DPoP cnf.jkt) is held until {until} \
         (in {left} s); it is used with this key until it expires. Wait{force}"
    )]
    TokensBound {
        slot: String,
        what: String,
        until: u64,
        left: u64,
        force: &'static str,
    },
    #[error("'{slot}' has no generation with kid {kid}; its generations: {state}")]
    UnknownKid {
        slot: String,
        kid: String,
        state: String,
    },
    #[error(
        "only a retired generation can be destroyed, and {what}; retire it first (`keybound keys rotate --label {slot} --retire`)"
    )]
    NotRetired { slot: String, what: String },
    #[error(
        "'{slot}': {what}, and only the active generation signs ({state}); name the key by its slot, '{slot}'"
    )]
    NotActive {
        slot: String,
        what: String,
        state: String,
    },
    #[error("the activation proof was made with kid {proven}, but '{slot}' has {what}")]
    WrongProof {
        slot: String,
        proven: String,
        what: String,
    },
}

impl RotationError {
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            RotationError::NoKey { source, .. } => source.kind(),
            RotationError::Inconsistent { .. }
            | RotationError::Lost { .. }
            | RotationError::NotActive { .. } => ErrorKind::Refused,
            _ => ErrorKind::Configuration,
        }
    }
}

/// Proof that the servers accept a prepared generation, which `Keyring::activate` needs:
/// made by `rotation::prove` after each client's token endpoint issued a token for an
/// assertion signed with that generation, or made explicitly with `--force`.
#[derive(Clone, Debug)]
pub struct Accepted {
    kid: String,
    /// Who accepted it, for the log: client names, or "nobody (forced)".
    by: Vec<String>,
    forced: bool,
}

impl Accepted {
    /// The servers accepted `key`: crate-private, so only the proof can make one.
    pub(crate) fn by_servers(key: &SigningKey, clients: Vec<String>) -> Accepted {
        Accepted {
            kid: key.kid().to_string(),
            by: clients,
            forced: false,
        }
    }

    /// Activation without a proof (`--force`): the caller says so loudly.
    pub fn forced(kid: &str) -> Accepted {
        Accepted {
            kid: kid.to_string(),
            by: Vec::new(),
            forced: true,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn clients(&self) -> &[String] {
        &self.by
    }

    pub fn is_forced(&self) -> bool {
        self.forced
    }
}

/// The label of generation `n` of `slot`: generation 1 keeps the slot's own label.
pub fn generation_label(slot: &str, n: u32) -> String {
    if n == 1 {
        slot.to_string()
    } else {
        format!("{slot}#{n}")
    }
}

/// The slot and generation a label of the form `<slot>#<n>` (n > 1) names.
pub fn split_generation(label: &str) -> Option<(&str, u32)> {
    let (slot, n) = label.rsplit_once('#')?;
    let n: u32 = n.parse().ok()?;
    (n > 1 && !slot.is_empty() && generation_label(slot, n) == label).then_some((slot, n))
}

fn digest(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(bytes))
}

fn internal(e: impl std::fmt::Display) -> KeyError {
    TokenError::Internal(e.to_string()).into()
}

fn slot_label(slot: &str) -> Result<Label, KeyError> {
    Ok(Label::parse(slot)?)
}

/// What `prepare` did.
pub struct Prepared {
    pub rotation: Rotation,
    /// The prepared generation.
    pub generation: Generation,
    /// It was already prepared (or half-prepared by a run that stopped) and this run only
    /// finished or reported it.
    pub resumed: bool,
}

impl Keyring {
    /// The newest record of `slot` and its bytes, unchecked against the device; `None` when
    /// the slot was never rotated.
    fn read_record(&self, slot: &Label) -> Result<Option<(Rotation, Vec<u8>)>, KeyError> {
        let mut best: Option<(Rotation, Vec<u8>)> = None;
        for bytes in self.backend.records(slot)? {
            let r = Rotation::decode(slot.as_str(), &bytes).map_err(|reason| {
                RotationError::Inconsistent {
                    slot: slot.to_string(),
                    reason: format!("a stored record: {reason}"),
                }
            })?;
            // Two writers of one sequence number: the smaller digest wins, everywhere.
            let better = match &best {
                None => true,
                Some((b, bb)) => {
                    (r.seq, std::cmp::Reverse(digest(&bytes)))
                        > (b.seq, std::cmp::Reverse(digest(bb)))
                }
            };
            if better {
                best = Some((r, bytes));
            }
        }
        Ok(best)
    }

    /// The rotation record of `slot`, checked against the keys on the device; `None` when
    /// the slot was never rotated (and no generation keys of it are on the device).
    pub fn rotation(&self, slot: &str) -> Result<Option<Rotation>, KeyError> {
        let slot = slot_label(slot)?;
        let listing = self.backend.keys()?;
        Ok(self.checked(&slot, &listing)?.map(|(r, _)| r))
    }

    fn checked(
        &self,
        slot: &Label,
        listing: &Listing,
    ) -> Result<Option<(Rotation, Vec<u8>)>, KeyError> {
        match self.read_record(slot)? {
            Some((r, bytes)) => {
                r.check(listing)
                    .map_err(|reason| RotationError::Inconsistent {
                        slot: slot.to_string(),
                        reason,
                    })?;
                Ok(Some((r, bytes)))
            }
            None => {
                not_lost(slot, listing)?;
                Ok(None)
            }
        }
    }

    /// Takes this slot's turn among the keybound processes of this host: held for a whole
    /// step (read, device operation, writes). A device shared across hosts relies on the
    /// record writes alone (`write_record`); on one host this lock also covers a device
    /// whose library shows a process the objects another created only later (SoftHSM's
    /// file store does, seen in tests/rotation.rs). Waits at most 30 s for another step.
    fn step_lock(&self, slot: &Label) -> Result<std::fs::File, KeyError> {
        use std::os::unix::fs::{
            DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
        };
        let t = self.describe();
        let uid = rustix::process::geteuid().as_raw();
        // The same directory for the agent and for a command of the same user, whatever
        // their environment: the agent's runtime directory under systemd
        // (`RuntimeDirectory=keybound`, which `PrivateTmp` does not hide) when it is ours,
        // else the user's runtime directory, else the temp directory.
        let ours = |d: &std::path::Path| {
            std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir() && m.uid() == uid)
        };
        let run = std::path::PathBuf::from("/run/keybound");
        let base = if ours(&run) {
            run
        } else {
            std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|d| !d.is_empty())
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    Some(std::path::PathBuf::from(format!("/run/user/{uid}"))).filter(|d| ours(d))
                })
                .unwrap_or_else(std::env::temp_dir)
        };
        let dir = base.join(format!("keybound-{uid}"));
        let unusable = |why: String| {
            internal(format!(
                "cannot take the rotation lock in {}: {why}",
                dir.display()
            ))
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(unusable(e.to_string()));
            }
            _ => {}
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(|e| unusable(e.to_string()))?;
        if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
            return Err(unusable(
                "it must be a directory of this user that no one else can open".into(),
            ));
        }
        let name =
            digest(format!("{}\0{}\0{}\0{slot}", t.backend, t.token_label, t.serial).as_bytes());
        let path = dir.join(format!("rotation-{name}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| unusable(e.to_string()))?;
        for _ in 0..600 {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(file),
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(unusable(e.to_string())),
            }
        }
        Err(TokenError::RecordConflict {
            slot: slot.to_string(),
            seq: 0,
        }
        .into())
    }

    /// Stores `next` (whose `seq` is one past `old`'s), then removes `old`. Reads back
    /// first: if another writer stored the same sequence number and its record wins, ours
    /// is removed and the step reported as a conflict, so two agents never both believe
    /// their step happened.
    fn write_record(
        &self,
        slot: &Label,
        old: Option<&[u8]>,
        old_seq: u64,
        next: &Rotation,
    ) -> Result<(), KeyError> {
        let bytes = next.encode()?;
        self.backend.put_record(slot, next.seq, &bytes)?;
        // Where the device has no compare-and-swap (PKCS#11 objects), two writers of one
        // sequence number can each read back before the other wrote: so any other record
        // of this number or a later one makes this write lose. Of two such writers, the
        // one that reads last sees both and backs off; at most one goes on.
        let contested = self
            .backend
            .records(slot)?
            .iter()
            .filter(|b| **b != bytes)
            .any(|b| Rotation::decode(slot.as_str(), b).map_or(true, |r| r.seq >= next.seq));
        match self.read_record(slot)? {
            Some((winner, won)) if !contested && winner.seq == next.seq && won == bytes => {}
            _ => {
                let _ = self.backend.remove_record(slot, next.seq, &bytes);
                return Err(TokenError::RecordConflict {
                    slot: slot.to_string(),
                    seq: next.seq,
                }
                .into());
            }
        }
        if let Some(old) = old {
            // A leftover old record loses to the new one; removing it is tidiness.
            if let Err(e) = self.backend.remove_record(slot, old_seq, old) {
                tracing::warn!(slot = %slot, "the previous rotation record stays: {e}");
            }
        }
        tracing::info!(slot = %slot, seq = next.seq, state = %next.summary(), "rotation record written");
        Ok(())
    }

    /// Step 1: generates the slot's next generation on the device and makes it `prepared`
    /// (published, not signing). The first rotation of a slot adopts its existing key as
    /// generation 1, active. A run that stopped half-way is finished; a generation already
    /// prepared is an error that shows the state.
    pub fn prepare(&self, slot: &str) -> Result<Prepared, KeyError> {
        let slot = slot_label(slot)?;
        let _turn = self.step_lock(&slot)?;
        let listing = self.backend.keys()?;
        let (mut rotation, mut bytes) = match self.checked(&slot, &listing)? {
            Some(found) => found,
            None => self.adopt(&slot)?,
        };
        if rotation.in_state(GenState::Prepared).next().is_some() {
            return Err(RotationError::InProgress {
                slot: slot.to_string(),
                state: rotation.summary(),
            }
            .into());
        }
        let resumed = rotation.next().is_some();
        let pending = match rotation.next() {
            Some(g) => g.clone(),
            None => {
                let n = rotation.generations.iter().map(|g| g.n).max().unwrap_or(1) + 1;
                let g = Generation {
                    n,
                    label: generation_label(slot.as_str(), n),
                    state: GenState::Pending,
                    id: None,
                    kid: None,
                    created: unix_now(),
                    prepared: None,
                    activated: None,
                    retiring_since: None,
                    retired: None,
                    destroyed: None,
                    tokens_until: None,
                };
                let next = rotation.mutate(|r| r.generations.push(g.clone()));
                self.write_record(&slot, Some(&bytes), rotation.seq, &next)?;
                bytes = next.encode()?;
                rotation = next;
                crate::fault::point("rotate-pending-written");
                g
            }
        };
        let label = Label::parse(&pending.label)?;
        let (key, generated) = match listing.keys.iter().find(|k| k.label() == pending.label) {
            // A run stopped after the device made the key.
            Some(k) => (k.clone(), false),
            None => {
                let k = match self.backend.generate(&label, rotation.alg) {
                    // Another run, resuming the same pending generation, made it just now.
                    Err(TokenError::LabelExists { .. }) => {
                        return Err(TokenError::RecordConflict {
                            slot: slot.to_string(),
                            seq: rotation.seq + 1,
                        }
                        .into());
                    }
                    made => made?,
                };
                crate::fault::point("rotate-key-generated");
                (k, true)
            }
        };
        let approved = self.approve(&key)?;
        let next = rotation.mutate(|r| {
            if let Some(g) = r.generation_mut(pending.n) {
                g.state = GenState::Prepared;
                g.id = Some(hex(key.id()));
                g.kid = Some(approved.kid().to_string());
                g.prepared = Some(unix_now());
            }
        });
        if let Err(e) = self.write_record(&slot, Some(&bytes), rotation.seq, &next) {
            // Another run finished this generation with its own key: ours is nobody's,
            // unless the newest record names it after all (another writer built on ours).
            let named = || {
                self.read_record(&slot)
                    .ok()
                    .flatten()
                    .is_some_and(|(r, _)| {
                        r.generations
                            .iter()
                            .any(|g| g.id.as_deref() == Some(hex(key.id()).as_str()))
                    })
            };
            if generated
                && matches!(e, KeyError::Token(TokenError::RecordConflict { .. }))
                && !named()
                && let Err(d) = self.backend.destroy(&key)
            {
                tracing::warn!(slot = %slot, label = %pending.label, "the key this run generated stays: {d}");
            }
            return Err(e);
        }
        crate::fault::point("rotate-prepared-written");
        let generation = next
            .generations
            .iter()
            .find(|g| g.n == pending.n)
            .cloned()
            .ok_or_else(|| internal("the prepared generation vanished"))?;
        Ok(Prepared {
            rotation: next,
            generation,
            resumed,
        })
    }

    /// The first record of a slot: its one key, approved, as generation 1, active.
    fn adopt(&self, slot: &Label) -> Result<(Rotation, Vec<u8>), KeyError> {
        let key = self
            .signing_key_unrotated(&KeyName::parse(slot.as_str())?)
            .map_err(|e| RotationError::NoKey {
                slot: slot.to_string(),
                source: Box::new(e),
            })?;
        let now = unix_now();
        let first = Rotation {
            version: VERSION,
            slot: slot.to_string(),
            seq: 1,
            alg: key.alg(),
            generations: vec![Generation {
                n: 1,
                label: slot.to_string(),
                state: GenState::Active,
                id: Some(hex(key.info().id())),
                kid: Some(key.kid().to_string()),
                created: now,
                prepared: None,
                activated: Some(now),
                retiring_since: None,
                retired: None,
                destroyed: None,
                tokens_until: None,
            }],
        };
        self.write_record(slot, None, 0, &first)?;
        crate::fault::point("rotate-adopted");
        let bytes = first.encode()?;
        Ok((first, bytes))
    }

    /// The prepared generation's key, approved (policy and proof of possession), for the
    /// activation proof only: it signs one assertion per client, never anything else.
    pub(crate) fn prepared_key(&self, slot: &str) -> Result<SigningKey, KeyError> {
        let slot = slot_label(slot)?;
        let listing = self.backend.keys()?;
        let Some((rotation, _)) = self.checked(&slot, &listing)? else {
            return Err(RotationError::NothingPrepared {
                slot: slot.to_string(),
                state: "it was never rotated".into(),
            }
            .into());
        };
        let g = rotation
            .in_state(GenState::Prepared)
            .next()
            .ok_or_else(|| RotationError::NothingPrepared {
                slot: slot.to_string(),
                state: rotation.summary(),
            })?;
        self.generation_key(&rotation, g)
    }

    /// A generation's key, found exactly (label and id) and approved, with the kid the
    /// record says.
    fn generation_key(&self, rotation: &Rotation, g: &Generation) -> Result<SigningKey, KeyError> {
        let id = g.id_bytes().ok_or_else(|| RotationError::Inconsistent {
            slot: rotation.slot.clone(),
            reason: format!("{} without a key id", g.describe()),
        })?;
        let info = self.backend.find(&KeyName::exact(&g.label, &id))?;
        let key = self.approve(&info)?;
        if Some(key.kid()) != g.kid.as_deref() {
            return Err(RotationError::Inconsistent {
                slot: rotation.slot.clone(),
                reason: format!(
                    "{}, but the device's key has kid {}",
                    g.describe(),
                    key.kid()
                ),
            }
            .into());
        }
        Ok(key.in_slot(&rotation.slot))
    }

    /// Step 2: the prepared generation becomes `active` and the active one `retiring`, in
    /// one record write. Needs the servers' acceptance of exactly that generation.
    pub fn activate(&self, slot: &str, accepted: &Accepted) -> Result<Rotation, KeyError> {
        let slot = slot_label(slot)?;
        let _turn = self.step_lock(&slot)?;
        let listing = self.backend.keys()?;
        let Some((rotation, bytes)) = self.checked(&slot, &listing)? else {
            return Err(RotationError::NothingPrepared {
                slot: slot.to_string(),
                state: "it was never rotated".into(),
            }
            .into());
        };
        let prepared = rotation
            .in_state(GenState::Prepared)
            .next()
            .cloned()
            .ok_or_else(|| RotationError::NothingPrepared {
                slot: slot.to_string(),
                state: rotation.summary(),
            })?;
        if prepared.kid.as_deref() != Some(accepted.kid()) {
            return Err(RotationError::WrongProof {
                slot: slot.to_string(),
                proven: accepted.kid().to_string(),
                what: prepared.describe(),
            }
            .into());
        }
        let now = unix_now();
        let next = rotation.mutate(|r| {
            for g in &mut r.generations {
                if g.state == GenState::Active {
                    g.state = GenState::Retiring;
                    g.retiring_since = Some(now);
                } else if g.n == prepared.n {
                    g.state = GenState::Active;
                    g.activated = Some(now);
                }
            }
        });
        self.write_record(&slot, Some(&bytes), rotation.seq, &next)?;
        crate::fault::point("activate-written");
        tracing::warn!(slot = %slot, kid = accepted.kid(), forced = accepted.is_forced(),
            proven_by = ?accepted.clients(), "key generation activated");
        Ok(next)
    }

    /// Step 3: every `retiring` generation becomes `retired` (unpublished, still on the
    /// device), once it has been retiring for `retire_after` seconds and no token bound to
    /// it is held, unless `force`.
    pub fn retire(&self, slot: &str, retire_after: u64, force: bool) -> Result<Rotation, KeyError> {
        let slot = slot_label(slot)?;
        let _turn = self.step_lock(&slot)?;
        let listing = self.backend.keys()?;
        let Some((rotation, bytes)) = self.checked(&slot, &listing)? else {
            return Err(RotationError::NothingRetiring {
                slot: slot.to_string(),
                state: "it was never rotated".into(),
            }
            .into());
        };
        let now = unix_now();
        let retiring: Vec<Generation> = rotation.in_state(GenState::Retiring).cloned().collect();
        if retiring.is_empty() {
            return Err(RotationError::NothingRetiring {
                slot: slot.to_string(),
                state: rotation.summary(),
            }
            .into());
        }
        if !force {
            for g in &retiring {
                let since = g.retiring_since.unwrap_or(0);
                let age = now.saturating_sub(since);
                if age < retire_after {
                    return Err(RotationError::TooYoung {
                        slot: slot.to_string(),
                        what: g.describe(),
                        age,
                        retire_after,
                    }
                    .into());
                }
                bound_tokens(&slot, g, now, ", or pass --force")?;
            }
        }
        let next = rotation.mutate(|r| {
            for g in &mut r.generations {
                if g.state == GenState::Retiring {
                    g.state = GenState::Retired;
                    g.retired = Some(now);
                }
            }
        });
        self.write_record(&slot, Some(&bytes), rotation.seq, &next)?;
        crate::fault::point("retire-written");
        Ok(next)
    }

    /// Step 4: deletes a `retired` generation's key from the device, for good. Any other
    /// state is refused, and so is a key an access token held somewhere is bound to.
    pub fn destroy(&self, slot: &str, kid: &str) -> Result<Rotation, KeyError> {
        let slot = slot_label(slot)?;
        let _turn = self.step_lock(&slot)?;
        let listing = self.backend.keys()?;
        let Some((mut rotation, mut bytes)) = self.checked(&slot, &listing)? else {
            return Err(RotationError::UnknownKid {
                slot: slot.to_string(),
                kid: kid.to_string(),
                state: "it was never rotated".into(),
            }
            .into());
        };
        let g = rotation
            .by_kid(kid)
            .cloned()
            .ok_or_else(|| RotationError::UnknownKid {
                slot: slot.to_string(),
                kid: kid.to_string(),
                state: rotation.summary(),
            })?;
        match g.state {
            GenState::Retired => {
                bound_tokens(&slot, &g, unix_now(), "")?;
                let next = rotation.mutate(|r| {
                    if let Some(g) = r.generation_mut(g.n) {
                        g.state = GenState::Destroying;
                    }
                });
                self.write_record(&slot, Some(&bytes), rotation.seq, &next)?;
                bytes = next.encode()?;
                rotation = next;
                crate::fault::point("destroy-intent-written");
            }
            GenState::Destroying => {}
            _ => {
                return Err(RotationError::NotRetired {
                    slot: slot.to_string(),
                    what: g.describe(),
                }
                .into());
            }
        }
        if let Some(key) = listing.keys.iter().find(|k| k.label() == g.label) {
            if Some(hex(key.id())) != g.id {
                return Err(RotationError::Inconsistent {
                    slot: slot.to_string(),
                    reason: format!(
                        "{}, but the key labelled '{}' has id {}; nothing was deleted",
                        g.describe(),
                        g.label,
                        hex(key.id())
                    ),
                }
                .into());
            }
            self.backend.destroy(key)?;
            crate::fault::point("destroy-key-deleted");
        }
        let next = rotation.mutate(|r| {
            if let Some(g) = r.generation_mut(g.n) {
                g.state = GenState::Destroyed;
                g.destroyed = Some(unix_now());
            }
            // The record stays small (a device's data objects may be small: 2 KB on some):
            // of the destroyed generations only the latest is kept, as history.
            let latest = r
                .in_state(GenState::Destroyed)
                .map(|g| g.n)
                .max()
                .unwrap_or(0);
            r.generations
                .retain(|g| g.state != GenState::Destroyed || g.n == latest);
        });
        self.write_record(&slot, Some(&bytes), rotation.seq, &next)?;
        Ok(next)
    }

    /// Records that an access token bound to `key` (a generation of a rotated slot) is
    /// held until `until`, so the generation is not retired or destroyed under it. Writes
    /// only when that moves the recorded time later; keys outside a rotation are skipped.
    pub fn note_bound_token(&self, key: &SigningKey, until: u64) -> Result<(), KeyError> {
        // A key approved before its slot's first rotation has no slot yet: its label is
        // the slot's (generation 1).
        let Ok(slot) = slot_label(key.name()) else {
            return Ok(());
        };
        if self.read_record(&slot)?.is_none() {
            return Ok(());
        }
        let _turn = self.step_lock(&slot)?;
        let Some((rotation, bytes)) = self.read_record(&slot)? else {
            return Ok(());
        };
        let Some(g) = rotation.by_kid(key.kid()) else {
            return Ok(());
        };
        // A minute's slack: the same token noted again (after every record change) must
        // not write a record again, which would be a change of its own.
        if g.tokens_until
            .is_some_and(|t| t.saturating_add(60) >= until)
        {
            return Ok(());
        }
        let n = g.n;
        let next = rotation.mutate(|r| {
            if let Some(g) = r.generation_mut(n) {
                g.tokens_until = Some(until);
            }
        });
        self.write_record(&slot, Some(&bytes), rotation.seq, &next)
    }

    /// The active generation's key of a slot with a record, found exactly and with the
    /// kid the record says.
    fn active_key(&self, slot: &Label, rotation: &Rotation) -> Result<KeyInfo, KeyError> {
        let g = rotation
            .active()
            .ok_or_else(|| RotationError::Inconsistent {
                slot: slot.to_string(),
                reason: "it has no active generation".into(),
            })?;
        let id = g.id_bytes().unwrap_or_default();
        let info = match self.backend.find(&KeyName::exact(&g.label, &id)) {
            Err(TokenError::KeyNotFound { .. }) => {
                return Err(RotationError::Inconsistent {
                    slot: slot.to_string(),
                    reason: format!(
                        "{}, but no usable key labelled '{}' is on the device (deleted \
                 outside keybound?)",
                        g.describe(),
                        g.label
                    ),
                }
                .into());
            }
            found => found?,
        };
        if Some(info.public().thumbprint()) != g.kid {
            return Err(RotationError::Inconsistent {
                slot: slot.to_string(),
                reason: format!(
                    "{}, but the device's key has kid {}",
                    g.describe(),
                    info.public().thumbprint()
                ),
            }
            .into());
        }
        Ok(info)
    }

    /// The key a name means, rotation included: a slot's label means its active
    /// generation; a generation's own label or a `pkcs11:` URI that names one is refused
    /// unless it is the active one. Names outside any rotation resolve as before.
    ///
    /// Also returns the slot the key is a generation of, when the name went through a
    /// rotation record by the slot's label or named a generation `<slot>#<n>`.
    pub(super) fn resolve(&self, name: &str) -> Result<(KeyInfo, Option<String>), KeyError> {
        let parsed = KeyName::parse(name)?;
        // A plain label read without a record here is not read again below.
        let mut unrotated: Option<Label> = None;
        if !name.starts_with("pkcs11:")
            && let Ok(slot) = Label::parse(name)
            && split_generation(name).is_none()
        {
            match self.read_record(&slot)? {
                Some((rotation, _)) => {
                    let info = self.active_key(&slot, &rotation)?;
                    return Ok((info, Some(slot.to_string())));
                }
                None => unrotated = Some(slot),
            }
        }
        let info = self.backend.find(&parsed)?;
        let generation_of = split_generation(info.label()).map(|(s, _)| s.to_string());
        let (slot, n) = match split_generation(info.label()) {
            Some((slot, n)) => (slot.to_string(), n),
            None => (info.label().to_string(), 1),
        };
        let Ok(slot_label) = Label::parse(&slot) else {
            return Ok((info, generation_of));
        };
        let record = match &unrotated {
            Some(l) if *l == slot_label => None,
            _ => self.read_record(&slot_label)?,
        };
        match record {
            None => {
                // Without its record, a slot whose generation keys are on the device has
                // lost which one is active: never guessed (the label alone would name
                // generation 1, perhaps long retired).
                not_lost(&slot_label, &self.backend.keys()?)?;
                Ok((info, generation_of))
            }
            Some((rotation, _)) => match rotation.generations.iter().find(|g| g.n == n) {
                Some(g)
                    if g.state == GenState::Active
                        && g.id == Some(hex(info.id()))
                        && g.kid.as_deref() == Some(info.public().thumbprint().as_str()) =>
                {
                    Ok((info, generation_of))
                }
                // The active generation's label, but another key (a second object under
                // that label, named by its id).
                Some(g) if g.state == GenState::Active => Err(RotationError::Inconsistent {
                    slot,
                    reason: format!(
                        "{}, but the key named is id {} kid {}",
                        g.describe(),
                        hex(info.id()),
                        info.public().thumbprint()
                    ),
                }
                .into()),
                found => Err(RotationError::NotActive {
                    slot,
                    what: found.map_or_else(
                        || format!("'{}' is not in its rotation record", info.label()),
                        Generation::describe,
                    ),
                    state: rotation.summary(),
                }
                .into()),
            },
        }
    }

    /// The rotation records of every slot with keys on the device, checked, and the slots
    /// whose record cannot be trusted (with why).
    pub(super) fn rotations(
        &self,
        listing: &Listing,
    ) -> Result<(Vec<Rotation>, Vec<Untrusted>), TokenError> {
        let mut slots: BTreeSet<String> = BTreeSet::new();
        for label in listing
            .keys
            .iter()
            .map(KeyInfo::label)
            .chain(listing.problems.iter().map(|p| p.label.as_str()))
        {
            slots.insert(
                split_generation(label)
                    .map_or(label, |(s, _)| s)
                    .to_string(),
            );
        }
        let mut found = Vec::new();
        let mut broken = Vec::new();
        for slot in slots {
            let Ok(label) = Label::parse(&slot) else {
                continue;
            };
            match self.checked(&label, listing) {
                Ok(Some((r, _))) => found.push(r),
                Ok(None) => {}
                Err(KeyError::Token(e)) if !e.about_the_object() => return Err(e),
                Err(e) => {
                    // A record that reads but disagrees with the device (a generation's
                    // key missing or replaced) still says which keys are which: the keys
                    // that match it stay published and the active one keeps signing, so
                    // one broken generation is no outage. Steps refuse until it is fixed.
                    let readable = match self.read_record(&label) {
                        Ok(Some((r, _))) => {
                            found.push(r);
                            true
                        }
                        _ => false,
                    };
                    broken.push(Untrusted {
                        slot,
                        reason: e.to_string(),
                        readable,
                    });
                }
            }
        }
        Ok((found, broken))
    }
}

/// A slot without a record has no generation keys on the device (`<slot>#<n>`): if it
/// has, its record was lost, and which key is active is unknown.
fn not_lost(slot: &Label, listing: &Listing) -> Result<(), KeyError> {
    let orphans: Vec<&str> = listing
        .keys
        .iter()
        .map(KeyInfo::label)
        .chain(listing.problems.iter().map(|p| p.label.as_str()))
        .filter(|l| split_generation(l).is_some_and(|(s, _)| s == slot.as_str()))
        .collect();
    if orphans.is_empty() {
        Ok(())
    } else {
        Err(RotationError::Lost {
            slot: slot.to_string(),
            labels: orphans.join(", "),
        }
        .into())
    }
}

/// A slot whose record cannot be trusted, and why; `readable` when the record itself
/// parsed (it disagrees with the device) and the inventory still follows it.
pub(super) struct Untrusted {
    pub slot: String,
    pub reason: String,
    pub readable: bool,
}

/// Refuses while a token bound to `g` is held.
fn bound_tokens(
    slot: &Label,
    g: &Generation,
    now: u64,
    force: &'static str,
) -> Result<(), KeyError> {
    match g.tokens_until {
        Some(until) if until > now => Err(RotationError::TokensBound {
            slot: slot.to_string(),
            what: g.describe(),
            until,
            left: until - now,
            force,
        }
        .into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_labels_round_trip() {
        assert_eq!(generation_label("dpop", 1), "dpop");
        assert_eq!(generation_label("dpop", 3), "dpop#3");
        assert_eq!(split_generation("dpop#3"), Some(("dpop", 3)));
        assert_eq!(split_generation("a#b#12"), Some(("a#b", 12)));
        for not in [
            "dpop", "dpop#1", "dpop#0", "#2", "dpop#02", "dpop#x", "dpop#+2",
        ] {
            assert_eq!(split_generation(not), None, "{not}");
        }
    }

    #[test]
    fn records_are_checked_for_edits() {
        let r = Rotation {
            version: VERSION,
            slot: "dpop".into(),
            seq: 3,
            alg: Alg::ES256,
            generations: Vec::new(),
        };
        let bytes = r.encode().unwrap();
        assert_eq!(Rotation::decode("dpop", &bytes).unwrap(), r);
        let edited = String::from_utf8(bytes.clone())
            .unwrap()
            .replace("\"seq\": 3", "\"seq\": 4");
        let e = Rotation::decode("dpop", edited.as_bytes()).unwrap_err();
        assert!(e.contains("edited"), "{e}");
        let e = Rotation::decode("other", &bytes).unwrap_err();
        assert!(e.contains("record of 'dpop'"), "{e}");
        assert!(
            Rotation::decode("dpop", b"{")
                .unwrap_err()
                .contains("parse")
        );
    }
}
