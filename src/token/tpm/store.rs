//! The key store in the state directory: one JSON file per key, `keys/<label>.json`, holding
//! the label, the algorithm and the key's two blobs as the TPM returned them from
//! `TPM2_Create`. The private blob is the key's sensitive area encrypted and integrity-protected
//! by the TPM's storage key: it loads only into the TPM that made it, under that storage key,
//! and cannot be decrypted anywhere else. Files are written atomically (temporary file, then
//! a link that fails if the label is taken), directory 0700, files 0600.
//!
//! File format (version 1):
//! ```json
//! { "version": 1, "label": "dpop", "alg": "ES256",
//!   "public": "<base64 TPM2B_PUBLIC>", "private": "<base64 TPM2B_PRIVATE>",
//!   "auth": false, "parent": "<hex name of the storage key>", "created": 1700000000 }
//! ```
//! The blobs are the same bytes `tpm2_create -u key.pub -r key.priv` writes, so keys can be
//! inspected with tpm2-tools (`tpm2_print -t TPM2B_PUBLIC`).

use std::fs::{self, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::{Marshall as _, UnMarshall as _};

use crate::jose::Alg;
use crate::token::TokenError;
use crate::token::trust::{self, Owners};

const VERSION: u32 = 1;

/// The state directory's key folder.
#[derive(Clone, Debug)]
pub(super) struct Store {
    dir: PathBuf,
}

/// One key as stored: what the TPM needs to load it, and its label.
#[derive(Clone, Debug)]
pub(super) struct StoredKey {
    pub label: String,
    pub alg: Alg,
    pub public: Public,
    pub private: Private,
    /// Whether the key was created with an authorization value (token.key_auth_*).
    pub auth: bool,
    /// The name of the storage key it was created under, when recorded.
    pub parent: Option<Vec<u8>>,
    /// The first 16 bytes of the key's TPM name digest (SHA-256 of its public area).
    pub id: Vec<u8>,
    pub path: PathBuf,
}

/// A key file that does not parse, and why.
pub(super) type Damaged = (PathBuf, String);

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    label: String,
    alg: Alg,
    public: String,
    private: String,
    #[serde(default)]
    auth: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<u64>,
}

impl Store {
    pub(super) fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("keys"),
        }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every readable key file, sorted by label, and every file that does not parse with
    /// the reason, so one damaged file does not hide the other keys. The store is trusted
    /// like the PIN file, or not read at all: the key directory, the state directory and
    /// every directory above them no other user can write, and each key file a regular file
    /// of the effective user's that group and others cannot write. A key file someone else
    /// could plant (one made with tpm2-tools under the same storage key passes the policy
    /// and TPM2_Load) is refused with the file and the fix named, never skipped or warned.
    pub(super) fn list(&self) -> Result<(Vec<StoredKey>, Vec<Damaged>), TokenError> {
        let mut damaged = Vec::new();
        let real = match fs::symlink_metadata(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No keys yet; a state directory others can write is refused all the same.
                if let Some(state) = self.dir.parent()
                    && fs::symlink_metadata(state).is_ok()
                {
                    trust::check_dir(state).map_err(|reason| self.untrusted(state, reason))?;
                }
                return Ok((Vec::new(), damaged));
            }
            _ => self.trusted_dir()?,
        };
        let entries = fs::read_dir(&real).map_err(|e| self.error(&real, e.to_string()))?;
        let mut keys = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| self.error(&real, e.to_string()))?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let file = open_trusted(&path).map_err(|reason| self.error(&path, reason))?;
            match read(file, &path) {
                Ok(key) => keys.push(key),
                Err(reason) => {
                    tracing::warn!(file = %path.display(), "TPM key file skipped: {reason}");
                    damaged.push((path, reason));
                }
            }
        }
        keys.sort_by(|a, b| a.label.cmp(&b.label));
        Ok((keys, damaged))
    }

    /// The key directory, resolved, when it and every directory above it pass
    /// `trust::check_dir`.
    fn trusted_dir(&self) -> Result<PathBuf, TokenError> {
        trust::check_dir(&self.dir).map_err(|reason| self.untrusted(&self.dir, reason))
    }

    fn untrusted(&self, dir: &Path, reason: String) -> TokenError {
        self.error(
            dir,
            format!(
                "{reason}. keybound does not use TPM keys from a directory another user can \
                 write: they could plant a key of theirs there"
            ),
        )
    }

    /// Writes a new key file; fails if the label is taken (atomically: no two writers can
    /// both win).
    pub(super) fn save(&self, key: &StoredKey, created: u64) -> Result<PathBuf, TokenError> {
        create_private_dir(self.dir.parent().unwrap_or(&self.dir))
            .and_then(|()| create_private_dir(&self.dir))
            .map_err(|e| self.error(&self.dir, e))?;
        self.trusted_dir()?;
        let file = KeyFile {
            version: VERSION,
            label: key.label.clone(),
            alg: key.alg,
            public: STANDARD.encode(tpm2b(&key.public.marshall().map_err(|e| {
                self.error(&self.dir, format!("cannot encode the public area: {e}"))
            })?)),
            private: STANDARD.encode(tpm2b(key.private.value())),
            auth: key.auth,
            parent: key.parent.as_deref().map(crate::token::hex),
            created: Some(created),
        };
        let text = serde_json::to_string_pretty(&file)
            .map_err(|e| self.error(&self.dir, e.to_string()))?;
        let path = self.path_of(&key.label);
        let temp = self.dir.join(format!(
            ".{}.{}.tmp",
            file_stem(&key.label),
            std::process::id()
        ));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.write_all(b"\n")?;
                f.sync_all()
            });
        // A hard link never replaces an existing file: the label check and the write are
        // one step.
        let linked = written.and_then(|()| fs::hard_link(&temp, &path));
        // The temporary name is gone either way; a failure to remove it changes nothing.
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(TokenError::LabelExists {
                    label: key.label.clone(),
                    token: "tpm".into(),
                })
            }
            Err(e) => Err(self.error(&path, e.to_string())),
        }
    }

    /// The rotation records of `slot`: `<state>/rotation/<slot>/<seq>.json`, each written
    /// once (temporary file, then a hard link that fails if another writer took the
    /// sequence number: a compare-and-swap two agents sharing the directory cannot both
    /// win), trusted like key files.
    fn records_dir(&self, slot: &str) -> PathBuf {
        self.dir
            .parent()
            .unwrap_or(&self.dir)
            .join("rotation")
            .join(file_stem(slot))
    }

    pub(super) fn records(&self, slot: &str) -> Result<Vec<Vec<u8>>, TokenError> {
        let dir = self.records_dir(slot);
        if fs::symlink_metadata(&dir).is_err() {
            return Ok(Vec::new());
        }
        let real = trust::check_dir(&dir).map_err(|reason| self.untrusted(&dir, reason))?;
        let mut out = Vec::new();
        for entry in fs::read_dir(&real).map_err(|e| self.error(&real, e.to_string()))? {
            let path = entry.map_err(|e| self.error(&real, e.to_string()))?.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let mut file = open_trusted(&path).map_err(|reason| self.error(&path, reason))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .map_err(|e| self.error(&path, e.to_string()))?;
            out.push(bytes);
        }
        Ok(out)
    }

    pub(super) fn put_record(&self, slot: &str, seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        let dir = self.records_dir(slot);
        let state = self.dir.parent().unwrap_or(&self.dir).to_path_buf();
        create_private_dir(&state)
            .and_then(|()| create_private_dir(&state.join("rotation")))
            .and_then(|()| create_private_dir(&dir))
            .map_err(|e| self.error(&dir, e))?;
        trust::check_dir(&dir).map_err(|reason| self.untrusted(&dir, reason))?;
        let path = dir.join(format!("{seq:020}.json"));
        let temp = dir.join(format!(".{seq}.{}.tmp", std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            });
        let linked = written.and_then(|()| fs::hard_link(&temp, &path));
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => {
                // The new name must survive a power cut before anything relies on it.
                if let Ok(d) = fs::File::open(&dir) {
                    let _ = d.sync_all();
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(TokenError::RecordConflict {
                    slot: slot.into(),
                    seq,
                })
            }
            Err(e) => Err(self.error(&path, e.to_string())),
        }
    }

    pub(super) fn remove_record(&self, slot: &str, seq: u64) -> Result<(), TokenError> {
        let path = self.records_dir(slot).join(format!("{seq:020}.json"));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(self.error(&path, e.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Deletes the key file of `label` if it still holds the key `id` names.
    pub(super) fn remove_key(&self, label: &str, id: &[u8]) -> Result<(), TokenError> {
        let path = self.path_of(label);
        let file = match open_trusted(&path) {
            Ok(f) => f,
            Err(_) if fs::symlink_metadata(&path).is_err() => return Ok(()),
            Err(reason) => return Err(self.error(&path, reason)),
        };
        let key = read(file, &path).map_err(|reason| self.error(&path, reason))?;
        if key.id != id {
            return Err(self.error(
                &path,
                "it holds another key than the one to destroy; nothing was deleted".into(),
            ));
        }
        fs::remove_file(&path).map_err(|e| self.error(&path, e.to_string()))
    }

    /// Where the key labelled `label` lives.
    pub(super) fn path_of(&self, label: &str) -> PathBuf {
        self.dir.join(format!("{}.json", file_stem(label)))
    }

    fn error(&self, path: &Path, reason: String) -> TokenError {
        TokenError::TpmStore {
            path: path.to_path_buf(),
            reason,
        }
    }
}

impl StoredKey {
    /// Builds the in-memory key from what `TPM2_Create` returned.
    pub(super) fn new(
        label: &str,
        alg: Alg,
        public: Public,
        private: Private,
        auth: bool,
        parent: Vec<u8>,
        path: PathBuf,
    ) -> Result<StoredKey, String> {
        let id = key_id(&public)?;
        Ok(StoredKey {
            label: label.into(),
            alg,
            public,
            private,
            auth,
            parent: Some(parent),
            id,
            path,
        })
    }
}

/// The stable id: the first 16 bytes of SHA-256 over the marshalled public area, which is
/// the digest part of the key's TPM name (nameAlg SHA-256), so `tpm2_readpublic` shows it.
pub(super) fn key_id(public: &Public) -> Result<Vec<u8>, String> {
    let bytes = public
        .marshall()
        .map_err(|e| format!("cannot encode the public area: {e}"))?;
    Ok(sha2::Sha256::digest(&bytes)[..16].to_vec())
}

/// A key file opened for reading: a regular file (not a symbolic link, not a FIFO) of the
/// effective user's, which group and others cannot write.
fn open_trusted(path: &Path) -> Result<fs::File, String> {
    let (file, meta) = trust::open_regular(path, true)?;
    trust::check_file(path, &meta, Owners::User).map_err(|reason| {
        format!(
            "{reason}. keybound does not use a key file another user could have written: it \
             may hold their key; if you did not create it, delete it"
        )
    })?;
    Ok(file)
}

fn read(mut file: fs::File, path: &Path) -> Result<StoredKey, String> {
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    if file.version != VERSION {
        return Err(format!(
            "version {} is not {VERSION}; a newer keybound wrote it",
            file.version
        ));
    }
    let decode = |what: &str, b64: &str| {
        STANDARD
            .decode(b64)
            .map_err(|e| format!("{what} is not base64: {e}"))
    };
    let public_bytes = untpm2b(&decode("public", &file.public)?).ok_or("public is truncated")?;
    let public = Public::unmarshall(&public_bytes)
        .map_err(|e| format!("public is not a TPM2B_PUBLIC: {e}"))?;
    let private = Private::try_from(
        untpm2b(&decode("private", &file.private)?).ok_or("private is truncated")?,
    )
    .map_err(|e| format!("private is not a TPM2B_PRIVATE: {e}"))?;
    let parent = match &file.parent {
        Some(h) => Some(unhex(h).ok_or("parent is not hex")?),
        None => None,
    };
    Ok(StoredKey {
        id: key_id(&public)?,
        label: file.label,
        alg: file.alg,
        public,
        private,
        auth: file.auth,
        parent,
        path: path.to_path_buf(),
    })
}

/// Creates a missing directory, only the owner can enter it. An existing one is checked by
/// the caller (`Store::trusted_dir`), which refuses one that others can write.
fn create_private_dir(dir: &Path) -> Result<(), String> {
    match fs::symlink_metadata(dir) {
        Ok(_) => Ok(()),
        Err(_) => {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot make it private: {e}"))
        }
    }
}

/// A file name for any label: letters, digits, `-` and `_` as they are, every other byte
/// %-escaped, so names are reversible and never contain a path separator.
fn file_stem(label: &str) -> String {
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');
    utf8_percent_encode(label, KEEP).to_string()
}

/// A TPM2B: big-endian u16 size, then the bytes.
fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    // TPM structures are far below 64 KiB; a longer input cannot come from the TPM.
    out.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn untpm2b(bytes: &[u8]) -> Option<Vec<u8>> {
    let [a, b, rest @ ..] = bytes else {
        return None;
    };
    let n = usize::from(u16::from_be_bytes([*a, *b]));
    (rest.len() == n).then(|| rest.to_vec())
}

/// Strict hex (two digits a byte, no sign, no space), either case.
fn unhex(text: &str) -> Option<Vec<u8>> {
    base16ct::mixed::decode_vec(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe_and_distinct() {
        assert_eq!(file_stem("client-auth"), "client-auth");
        assert_eq!(file_stem("../x"), "%2E%2E%2Fx");
        assert_eq!(file_stem("a b"), "a%20b");
        assert_ne!(file_stem("a.b"), file_stem("a_b"));
    }

    #[test]
    fn tpm2b_round_trips() {
        assert_eq!(untpm2b(&tpm2b(b"abc")).unwrap(), b"abc");
        assert!(untpm2b(&[0, 4, 1]).is_none());
        assert_eq!(
            unhex(&crate::token::hex(&[0, 255, 16])).unwrap(),
            vec![0, 255, 16]
        );
        assert!(unhex("abc").is_none());
        assert_eq!(unhex("00FFab").unwrap(), vec![0, 255, 0xab]);
        for bad in ["+1", "-1", " 1", "0x", "zz", "é1"] {
            assert!(unhex(bad).is_none(), "{bad}");
        }
    }
}
