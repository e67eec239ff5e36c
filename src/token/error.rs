//! `TokenError`: every way a device or its configuration can fail, each a sentence with
//! the next step.

use std::path::PathBuf;

use crate::jose::{Alg, JoseError};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "PKCS#11 module not found; tried: {}. Install the vendor's module or set token.module",
        list_paths(.tried)
    )]
    ModuleNotFound { tried: Vec<PathBuf> },
    #[error("cannot load PKCS#11 module {}: {reason}", .path.display())]
    ModuleLoad { path: PathBuf, reason: String },
    #[error(
        "no token {wanted} in {}; tokens seen: {}. Check token_label/token_serial in the config{}",
        .module.display(),
        list_or_none(.seen),
        if .seen.is_empty() { " (for SoftHSM, is SOFTHSM2_CONF set to the right file?)" } else { "" }
    )]
    TokenNotFound {
        wanted: String,
        module: PathBuf,
        seen: Vec<String>,
    },
    #[error("the config selects no token: set token.token_label or token.token_serial")]
    NoTokenSelector,
    #[error("no PIN: set the environment variable {env} or token.pin_file in the config")]
    PinMissing { env: String },
    #[error("cannot read PIN file {}: {reason}", .path.display())]
    PinFile { path: PathBuf, reason: String },
    #[error(
        "PIN file {} is open to group or others (mode {mode:o}); run: chmod 600 {}",
        .path.display(), .path.display()
    )]
    PinFilePermissions { path: PathBuf, mode: u32 },
    #[error(
        "the PIN for token '{token}' was rejected (CKR_PIN_INCORRECT); check the PIN source. \
         keybound does not retry, to keep the token from locking"
    )]
    PinIncorrect { token: String },
    #[error(
        "the user PIN of token '{token}' is locked (CKR_PIN_LOCKED); unlock it with the SO PIN"
    )]
    PinLocked { token: String },
    #[error(
        "no key {name} on token '{token}'; known keys: {}. Create it with `keybound keys generate --label <label>`",
        list_or_none(.known)
    )]
    KeyNotFound {
        name: String,
        token: String,
        known: Vec<String>,
    },
    #[error(
        "{name} names {} keys on token '{token}' (ids {}); name one of them by id: {}, or delete the extras",
        .ids.len(), .ids.join(", "), .uris.join(" or ")
    )]
    Ambiguous {
        name: String,
        token: String,
        /// Hex CKA_IDs.
        ids: Vec<String>,
        /// A `pkcs11:` URI for each.
        uris: Vec<String>,
    },
    #[error("key '{label}' (id {id}) cannot be used: {reason}")]
    Unusable {
        label: String,
        id: String,
        reason: String,
    },
    #[error(
        "key '{label}' had to be looked up on the device again and must be approved again; retry"
    )]
    Reapprove { label: String },
    #[error(
        "a key labelled '{label}' already exists on token '{token}'; choose another label or use the existing key"
    )]
    LabelExists { label: String, token: String },
    #[error("key name '{name}' is not valid: {reason}")]
    BadKeyName { name: String, reason: String },
    #[error("key '{name}' names token '{named}', but the configured token is '{configured}'")]
    OtherToken {
        name: String,
        named: String,
        configured: String,
    },
    #[error("{alg} is not available with profile '{profile}': {reason}")]
    AlgUnavailable {
        alg: Alg,
        profile: String,
        reason: String,
    },
    #[error("key '{label}' has an unusable public key: {reason}")]
    BadPublicKey { label: String, reason: String },
    #[error("{function} failed: {rv}{}", if .hint.is_empty() { String::new() } else { format!("; {}", .hint) })]
    Pkcs11 {
        function: String,
        rv: String,
        hint: String,
    },
    #[error(
        "{function} failed: {code}: {meaning}{}",
        if .hint.is_empty() { String::new() } else { format!(". {}", .hint) }
    )]
    Tpm {
        function: String,
        code: String,
        meaning: String,
        hint: String,
    },
    #[error("TPM key store {}: {reason}", .path.display())]
    TpmStore { path: PathBuf, reason: String },
    #[error("TPM key '{label}' cannot be used: {reason}")]
    TpmKey { label: String, reason: String },
    #[error(
        "no TPM key auth value: set the environment variable {env}, or token.key_auth_file, or remove token.key_auth_env"
    )]
    TpmKeyAuthMissing { env: String },
    #[error("the device is unavailable ({reason}); keybound reconnects when it is back")]
    Unavailable { reason: String },
    #[error("{what} is not supported by the {backend} backend")]
    NotSupported {
        what: &'static str,
        backend: &'static str,
    },
    #[error("hsm-profile error: {0}")]
    Profile(String),
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
    #[error("the signing workers stopped; restart keybound")]
    WorkersGone,
    #[error(transparent)]
    Jose(#[from] JoseError),
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    let v: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    list_or_none(&v)
}
