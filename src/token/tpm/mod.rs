//! The TPM 2.0 backend (tss-esapi): keys generated inside the TPM under a storage primary,
//! kept as blobs in a state directory, every TPM command on the one thread of a
//! `token::worker` that owns the ESAPI context. One file per operation family: `jobs` (what
//! the worker is asked), `context` (the context, loading and flushing, reconnecting),
//! `key_management` (templates, creation, facts), `asym_sign` (schemes and `TPM2_Sign`),
//! `store` (the key files), `errors` (response codes in words).
//!
//! Over 400 lines with its tests: the TPM settings and the `Backend` implementation that
//! routes each call to those files are the seam the rest of keybound sees.

mod asym_sign;
mod context;
mod errors;
mod jobs;
mod key_management;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use tss_esapi::TctiNameConf;

use super::worker::{Threads, Workers as _};
use super::{
    Backend, Binding, KeyFacts, KeyInfo, Label, Listing, Pin, PinSource, Problem, ProofReply,
    Reply, TokenDescription, TokenError,
};
use crate::error::InvalidSetting;
use crate::jose::{Alg, ToBeSigned};
use context::Tpm;
use jobs::{Answer, Job, mismatch};
use store::{Store, StoredKey};

/// `[token]` settings for `backend = "tpm"` (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TpmSettings {
    #[serde(default = "default_tcti")]
    pub tcti: String,
    pub state_dir: Option<PathBuf>,
    pub primary_handle: Option<u32>,
    pub key_auth_env: Option<String>,
    pub key_auth_file: Option<PathBuf>,
    #[serde(default = "crate::token::default_rsa_bits")]
    pub rsa_bits: u32,
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}

/// The owner's persistent handle range (TPM 2.0 Part 2 §7.5, TCG handle registry).
const PERSISTENT_OWNER: std::ops::RangeInclusive<u32> = 0x8100_0000..=0x817f_ffff;

impl TpmSettings {
    /// Checks what TOML types cannot; each message names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        parse_tcti(&self.tcti).map_err(|e| InvalidSetting::new("token.tcti", e))?;
        // As for PKCS#11: the working directory is whoever starts keybound's choice. The
        // state directory holds the key blobs, the auth file the keys' authorization.
        crate::token::trust::absolute_paths(&[
            ("state_dir", self.state_dir.as_deref()),
            ("key_auth_file", self.key_auth_file.as_deref()),
        ])?;
        if let Some(h) = self.primary_handle
            && !PERSISTENT_OWNER.contains(&h)
        {
            return Err(InvalidSetting::new(
                "token.primary_handle",
                format!("{h:#x} is not an owner persistent handle (0x81000000 to 0x817fffff)"),
            ));
        }
        if ![2048, 3072].contains(&self.rsa_bits) {
            return Err(InvalidSetting::new(
                "token.rsa_bits",
                format!(
                    "{} is not one of 2048, 3072 (the RSA sizes TPMs offer)",
                    self.rsa_bits
                ),
            ));
        }
        if self.key_auth_env.as_deref() == Some("") {
            return Err(InvalidSetting::new(
                "token.key_auth_env",
                "empty; name an environment variable",
            ));
        }
        Ok(())
    }

    /// Where the key auth value comes from; `None` for keys without one.
    pub fn key_auth_source(&self) -> Option<PinSource> {
        match (&self.key_auth_file, &self.key_auth_env) {
            (Some(path), _) => Some(PinSource::File(path.clone())),
            (None, Some(env)) => Some(PinSource::Env(env.clone())),
            (None, None) => None,
        }
    }

    /// `state_dir`, else `$XDG_STATE_HOME/keybound/tpm`, else `~/.local/state/keybound/tpm`.
    pub fn state_dir(&self) -> Result<PathBuf, TokenError> {
        if let Some(dir) = &self.state_dir {
            return Ok(dir.clone());
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".local").join("state"))
            })
            .ok_or_else(|| TokenError::TpmStore {
                path: PathBuf::from("$HOME"),
                reason: "neither XDG_STATE_HOME nor HOME is set; set token.state_dir".into(),
            })?;
        Ok(base.join("keybound").join("tpm"))
    }
}

/// tss-esapi's TCTI syntax, with the one form it cannot express explained.
fn parse_tcti(text: &str) -> Result<TctiNameConf, String> {
    if text.starts_with("swtpm:") && text.contains("path=") {
        return Err(format!(
            "'{text}': a unix-socket swtpm cannot be reached through tss-esapi 7.7 (it can only \
             pass host= and port=); start swtpm with --server type=tcp and use \
             swtpm:host=127.0.0.1,port=P"
        ));
    }
    TctiNameConf::from_str(text).map_err(|_| {
        format!(
            "'{text}' is not a TCTI; use device:/dev/tpmrm0, tabrmd, \
             swtpm:host=127.0.0.1,port=2321 or mssim:host=…,port=…"
        )
    })
}

/// A TPM reached through its TCTI, with keybound's keys in the state directory.
pub struct TpmToken {
    worker: Threads<Tpm>,
    store: Store,
    rsa_bits: u32,
    description: TokenDescription,
    /// The keys last read from the store, by label; re-read on a miss.
    known: Mutex<HashMap<String, Arc<StoredKey>>>,
}

impl TpmToken {
    /// Connects to the TPM (so a wrong TCTI or a missing device is reported at start) and
    /// derives the storage primary once.
    pub fn open(settings: &TpmSettings) -> Result<TpmToken, TokenError> {
        let tcti = parse_tcti(&settings.tcti).map_err(|e| TokenError::Tpm {
            function: "reading token.tcti".into(),
            code: "invalid TCTI".into(),
            meaning: e,
            hint: String::new(),
            kind: crate::error::ErrorKind::Configuration,
            about_the_object: false,
        })?;
        let key_auth = match settings.key_auth_source() {
            None => None,
            Some(source) => Some(Pin::read(&source).map_err(|e| match e {
                TokenError::PinMissing { env } => TokenError::TpmKeyAuthMissing { env },
                other => other,
            })?),
        };
        let store = Store::new(&settings.state_dir()?);
        let worker = jobs::start(Tpm::new(
            tcti,
            settings.tcti.clone(),
            settings.primary_handle,
            key_auth,
        ))?;
        let Answer::Identified {
            manufacturer,
            model,
            primary,
        } = worker.call(Job::Identify)?
        else {
            return Err(mismatch("identify"));
        };
        let description = TokenDescription {
            backend: "tpm",
            token_label: "tpm".into(),
            manufacturer,
            model,
            // The storage key's name identifies this TPM's owner seed: it changes when the
            // TPM is cleared, and with it every key becomes unloadable.
            serial: super::hex(primary.get(2..10).unwrap_or(&primary)),
            profile: format!("tpm2 (tcti {})", settings.tcti),
            profile_tested_live: true,
            module: None,
        };
        tracing::debug!(tcti = %settings.tcti, state = %store.dir().display(), "TPM opened");
        Ok(TpmToken {
            worker,
            store,
            rsa_bits: settings.rsa_bits,
            description,
            known: Mutex::new(HashMap::new()),
        })
    }

    /// The stored key behind `key`: same label, same public key.
    fn stored(&self, key: &KeyInfo) -> Result<Arc<StoredKey>, TokenError> {
        let lookup = |token: &TpmToken| {
            token
                .known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key.label)
                .filter(|k| k.id == key.id)
                .cloned()
        };
        if let Some(k) = lookup(self) {
            return Ok(k);
        }
        self.keys()?;
        lookup(self).ok_or_else(|| TokenError::KeyNotFound {
            name: format!("'{}'", key.label),
            token: self.description.token_label.clone(),
            known: Vec::new(),
        })
    }

    /// The key file under `stored`'s label still holds the key that was approved (the id is
    /// a digest of the public area); re-reads the store once when it does not seem to.
    fn still_stored(&self, stored: &StoredKey) -> bool {
        let same = |token: &TpmToken| {
            token
                .known
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&stored.label)
                .is_some_and(|k| k.id == stored.id)
        };
        same(self) || (self.keys().is_ok() && same(self))
    }
}

impl Backend for TpmToken {
    fn describe(&self) -> TokenDescription {
        self.description.clone()
    }

    fn generate(&self, label: &Label, alg: Alg) -> Result<KeyInfo, TokenError> {
        let label = label.as_str();
        let listing = self.keys()?;
        let labels = listing.keys.iter().map(|k| &k.label);
        if labels
            .chain(listing.problems.iter().map(|p| &p.label))
            .any(|l| l == label)
        {
            return Err(TokenError::LabelExists {
                label: label.into(),
                token: self.description.token_label.clone(),
            });
        }
        let rsa_bits = self.rsa_bits;
        let Answer::Created(created) = self.worker.call(Job::Create { alg, rsa_bits })? else {
            return Err(mismatch("create"));
        };
        let stored = StoredKey::new(
            label,
            alg,
            created.public,
            created.private,
            created.auth,
            created.parent,
            self.store.path_of(label),
        )
        .map_err(|reason| TokenError::BadPublicKey {
            label: label.into(),
            reason,
        })?;
        let info = key_management::key_info(&stored)?;
        self.store.save(&stored, crate::jose::unix_now())?;
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(stored.label.clone(), Arc::new(stored));
        Ok(info)
    }

    /// The TPM answers a command (reconnecting if it went away).
    fn health(&self) -> Result<(), TokenError> {
        match self.worker.call(Job::Ping)? {
            Answer::Pong => Ok(()),
            _ => Err(mismatch("ping")),
        }
    }

    fn keys(&self) -> Result<Listing, TokenError> {
        let mut listing = Listing::default();
        let mut known = HashMap::new();
        let (stored, damaged) = self.store.list()?;
        for (path, reason) in damaged {
            listing.problems.push(Problem {
                label: path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                id: Vec::new(),
                reason: format!("key file {} cannot be read: {reason}", path.display()),
            });
        }
        for key in stored {
            match key_management::key_info(&key) {
                Ok(info) => {
                    // Labels and ids name one key each; a copied file would make them ambiguous.
                    if let Some(other) = listing
                        .keys
                        .iter()
                        .find(|k| k.label == info.label || k.id == info.id)
                    {
                        listing.problems.push(Problem {
                            reason: format!(
                                "key file {} has the label or the public key of '{}'; remove the copy",
                                key.path.display(),
                                other.label
                            ),
                            label: info.label,
                            id: info.id,
                        });
                        continue;
                    }
                    known.insert(key.label.clone(), Arc::new(key));
                    listing.keys.push(info);
                }
                Err(e) => listing.problems.push(Problem {
                    label: key.label.clone(),
                    id: key.id.clone(),
                    reason: format!("key file {}: {e}", key.path.display()),
                }),
            }
        }
        *self.known.lock().unwrap_or_else(PoisonError::into_inner) = known;
        Ok(listing)
    }

    fn records(&self, slot: &Label) -> Result<Vec<Vec<u8>>, TokenError> {
        self.store.records(slot.as_str())
    }

    fn put_record(&self, slot: &Label, seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        self.store.put_record(slot.as_str(), seq, bytes)
    }

    fn remove_record(&self, slot: &Label, seq: u64, _bytes: &[u8]) -> Result<(), TokenError> {
        self.store.remove_record(slot.as_str(), seq)
    }

    /// Deletes the key file. The TPM never stored the key: the file's blob is the only way
    /// to load it (a backup copy of the file still loads into this TPM until its owner
    /// seed changes, `tpm2_clear`).
    fn destroy(&self, key: &KeyInfo) -> Result<(), TokenError> {
        self.store.remove_key(key.label(), key.id())?;
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key.label());
        Ok(())
    }

    fn facts(&self, key: &KeyInfo) -> Result<KeyFacts, TokenError> {
        match self.worker.call(Job::Facts(self.stored(key)?))? {
            Answer::Facts(facts) => Ok(facts),
            _ => Err(mismatch("facts")),
        }
    }

    fn prove(&self, key: &KeyInfo, tbs: ToBeSigned, reply: ProofReply) {
        let stored = match self.stored(key) {
            Ok(k) => k,
            Err(e) => return reply(Err(e)),
        };
        let binding = Binding::new(stored.clone());
        self.worker.submit(
            Job::Prove(stored, tbs),
            Box::new(move |answer| {
                reply(match answer {
                    Ok(Answer::Proved(proof)) => Ok((proof, binding)),
                    Ok(_) => Err(mismatch("prove")),
                    Err(e) => Err(e),
                })
            }),
        );
    }

    /// Signs with the approved blob. If the key file under its label now holds another key,
    /// the key must be approved again, which refuses it: approval looks the key up by label
    /// and id, and a TPM key's id is a digest of its public area.
    fn submit(&self, key: &KeyInfo, binding: &Binding, tbs: ToBeSigned, reply: Reply) {
        let stored = match binding.get::<Arc<StoredKey>>() {
            Some(k) if self.still_stored(k) => k.clone(),
            _ => {
                return reply(Err(TokenError::Reapprove {
                    label: key.label.clone(),
                }));
            }
        };
        self.worker.submit(
            Job::Sign(stored, tbs),
            Box::new(move |answer| {
                reply(match answer {
                    Ok(Answer::Signed(signature)) => Ok(signature),
                    Ok(_) => Err(mismatch("sign")),
                    Err(e) => Err(e),
                })
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tcti: &str) -> TpmSettings {
        TpmSettings {
            tcti: tcti.into(),
            state_dir: None,
            primary_handle: None,
            key_auth_env: None,
            key_auth_file: None,
            rsa_bits: 2048,
        }
    }

    #[test]
    fn tcti_forms() {
        for ok in [
            "device:/dev/tpmrm0",
            "tabrmd",
            "tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=system",
            "swtpm:host=127.0.0.1,port=2321",
            "mssim:host=localhost,port=2321",
        ] {
            settings(ok).validate().unwrap();
        }
        let e = settings("swtpm:path=/run/swtpm.sock")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unix-socket") && e.contains("token.tcti"), "{e}");
        let e = settings("tpm0").validate().unwrap_err().to_string();
        assert!(e.starts_with("token.tcti: 'tpm0' is not a TCTI"), "{e}");
    }

    #[test]
    fn handles_and_sizes_are_checked() {
        let mut s = settings("tabrmd");
        s.primary_handle = Some(0x8100_0001);
        s.validate().unwrap();
        s.primary_handle = Some(0x8180_0001);
        assert_eq!(s.validate().unwrap_err().key, "token.primary_handle");
        let mut s = settings("tabrmd");
        s.rsa_bits = 4096;
        assert_eq!(s.validate().unwrap_err().key, "token.rsa_bits");
    }

    #[test]
    fn key_auth_file_wins_over_env() {
        let mut s = settings("tabrmd");
        assert_eq!(s.key_auth_source(), None);
        s.key_auth_env = Some("K".into());
        assert_eq!(s.key_auth_source(), Some(PinSource::Env("K".into())));
        s.key_auth_file = Some("/k".into());
        assert_eq!(s.key_auth_source(), Some(PinSource::File("/k".into())));
        s.state_dir = Some("/s".into());
        assert_eq!(s.state_dir().unwrap(), PathBuf::from("/s"));
    }
}
