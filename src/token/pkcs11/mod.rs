//! The PKCS#11 backend (cryptoki): any token with a PKCS#11 module. One file per operation
//! family: `connection` (module, token, login), `key_management` (generate, find, facts),
//! `asym_sign` (mechanisms and the session-owning signing workers).

mod asym_sign;
mod connection;
mod errors;
mod host_lock;
mod key_management;
mod records;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;

use super::profile::Profiles;
use super::{
    Backend, Binding, KeyFacts, KeyInfo, Label, Listing, PinSource, ProofReply, Reply,
    TokenDescription, TokenError,
};
use crate::error::InvalidSetting;
use crate::jose::{Alg, ToBeSigned};
use asym_sign::Pool;
use connection::Connection;

/// `[token]` settings for `backend = "pkcs11"` (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    pub module: Option<PathBuf>,
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    #[serde(default = "default_pin_env")]
    pub pin_env: String,
    pub pin_file: Option<PathBuf>,
    pub sessions: Option<usize>,
    pub profile: Option<String>,
    pub profiles_dir: Option<PathBuf>,
    #[serde(default = "crate::token::default_rsa_bits")]
    pub rsa_bits: u32,
}

fn default_pin_env() -> String {
    "KEYBOUND_PIN".into()
}

impl Pkcs11Settings {
    /// Checks what TOML types cannot; each message names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.token_label.is_none() && self.token_serial.is_none() {
            return Err(InvalidSetting::new(
                "token",
                "set token_label or token_serial",
            ));
        }
        // A relative path would follow the working directory, which whoever starts
        // keybound chooses: the module is code run with the PIN in memory, the profiles
        // name modules, and the PIN file is the PIN.
        super::trust::absolute_paths(&[
            ("module", self.module.as_deref()),
            ("profiles_dir", self.profiles_dir.as_deref()),
            ("pin_file", self.pin_file.as_deref()),
        ])?;
        if let Some(n) = self.sessions
            && !(1..=64).contains(&n)
        {
            return Err(InvalidSetting::new(
                "token.sessions",
                format!("{n} is out of range 1 to 64"),
            ));
        }
        if ![2048, 3072, 4096].contains(&self.rsa_bits) {
            return Err(InvalidSetting::new(
                "token.rsa_bits",
                format!("{} is not one of 2048, 3072, 4096", self.rsa_bits),
            ));
        }
        Ok(())
    }

    pub fn pin_source(&self) -> PinSource {
        match &self.pin_file {
            Some(path) => PinSource::File(path.clone()),
            None => PinSource::Env(self.pin_env.clone()),
        }
    }
}

/// A logged-in PKCS#11 token.
pub struct Pkcs11Token {
    /// Signing workers start on the first signature: listing keys needs none. Declared
    /// first so it drops first: the workers are joined before the connection finalises.
    pool: OnceLock<Pool>,
    /// Held while the pool is being started.
    starting: std::sync::Mutex<()>,
    conn: Arc<Connection>,
    sessions: usize,
    rsa_bits: u32,
    inline: bool,
}

impl Pkcs11Token {
    /// Loads the module, finds the token, logs in. `sessions` overrides the configured
    /// number of signing sessions (for `bench --sessions`).
    pub fn open(
        settings: &Pkcs11Settings,
        sessions: Option<usize>,
    ) -> Result<Pkcs11Token, TokenError> {
        let profiles = Profiles::load(settings.profiles_dir.as_deref())?;
        let conn = Connection::open(settings, &profiles)?;
        let limits = conn.profile.sessions;
        let sessions = sessions
            .or(settings.sessions)
            .unwrap_or(limits.default)
            .clamp(1, limits.max.max(1));
        Ok(Pkcs11Token {
            conn: Arc::new(conn),
            sessions,
            rsa_bits: settings.rsa_bits,
            pool: OnceLock::new(),
            inline: false,
            starting: std::sync::Mutex::new(()),
        })
    }

    /// The algorithms whose profile mechanism hashes on the device (a signer process must
    /// be sent their signing input, not only the digest).
    pub(crate) fn whole_input(&self) -> Vec<Alg> {
        Alg::ALL
            .into_iter()
            .filter(|alg| {
                self.conn
                    .profile
                    .mechanism(*alg)
                    .is_ok_and(|m| m.hashes_on_token())
            })
            .collect()
    }

    /// Sessions per signer process, from the profile (`[sessions] per_signer`).
    pub(crate) fn per_signer(&self) -> Option<usize> {
        self.conn.profile.sessions.per_signer
    }

    /// Signs on the caller's thread with one session (a signer process, whose one thread
    /// reads requests and may as well sign them); only before the first signature.
    pub(crate) fn sign_inline(&mut self) {
        if self.pool.get().is_none() {
            self.sessions = 1;
            self.inline = true;
        }
    }

    /// Signs with `n` sessions instead (a signer process holding its share); only before
    /// the first signature.
    pub(crate) fn limit_sessions(&mut self, n: usize) {
        if self.pool.get().is_none() {
            self.sessions = n.clamp(1, self.sessions.max(1));
        }
    }

    fn pool(&self) -> Result<&Pool, TokenError> {
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        // One starter at a time: a second pool would be started for nothing and then
        // joined on the caller's thread, which may be the async reactor.
        let _one = self
            .starting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pool) = self.pool.get() {
            return Ok(pool);
        }
        let pool = if self.inline {
            Pool::start_inline(self.conn.clone())
        } else {
            Pool::start(self.conn.clone(), self.sessions)?
        };
        let _ = self.pool.set(pool);
        self.pool.get().ok_or(TokenError::WorkersGone)
    }
}

impl Backend for Pkcs11Token {
    fn describe(&self) -> TokenDescription {
        self.conn.description.clone()
    }

    fn sessions(&self) -> usize {
        self.sessions
    }

    fn generate(&self, label: &Label, alg: Alg) -> Result<KeyInfo, TokenError> {
        key_management::generate(&self.conn, label, alg, self.rsa_bits)
    }

    fn keys(&self) -> Result<Listing, TokenError> {
        key_management::keys(&self.conn)
    }

    fn records(&self, slot: &Label) -> Result<Vec<Vec<u8>>, TokenError> {
        records::records(&self.conn, slot.as_str())
    }

    fn put_record(&self, slot: &Label, _seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        records::put(&self.conn, slot.as_str(), bytes)
    }

    fn remove_record(&self, slot: &Label, _seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        records::remove(&self.conn, slot.as_str(), bytes)
    }

    fn destroy(&self, key: &KeyInfo) -> Result<(), TokenError> {
        records::destroy(&self.conn, key)
    }

    fn health(&self) -> Result<(), TokenError> {
        self.conn.reconnect_if_gone()?;
        self.conn.probe()
    }

    fn facts(&self, key: &KeyInfo) -> Result<KeyFacts, TokenError> {
        key_management::facts(&self.conn, key)
    }

    fn prove(&self, key: &KeyInfo, tbs: ToBeSigned, reply: ProofReply) {
        match self.pool() {
            Ok(pool) => pool.prove(key, tbs, reply),
            Err(e) => reply(Err(e)),
        }
    }

    fn submit(&self, key: &KeyInfo, binding: &Binding, tbs: ToBeSigned, reply: Reply) {
        match self.pool() {
            Ok(pool) => pool.submit(key, binding, tbs, reply),
            Err(e) => reply(Err(e)),
        }
    }
}
