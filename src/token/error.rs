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

impl TokenError {
    /// Whether the error is about one key's objects (malformed, duplicated, unusable, gone,
    /// or refused by the device for what the object is), not about the device or the
    /// moment. Only these make a key a problem of a listing or a failing finding of its
    /// audit, so that key is left out of a JWKS; anything else (a failed function, a busy
    /// or lost session, a timeout, an unreachable device) fails the whole request, because
    /// a JWKS answered without a key that is merely unreachable now makes its consumers
    /// drop its kid.
    pub fn about_the_object(&self) -> bool {
        match self {
            TokenError::Unusable { .. }
            | TokenError::BadPublicKey { .. }
            | TokenError::Ambiguous { .. }
            | TokenError::KeyNotFound { .. }
            | TokenError::TpmKey { .. }
            | TokenError::AlgUnavailable { .. }
            | TokenError::Jose(_) => true,
            TokenError::Pkcs11 { rv, .. } => OBJECT_CKR.contains(&rv.as_str()),
            TokenError::Tpm { code, .. } => {
                let name = code.split([',', ' ']).next().unwrap_or_default();
                OBJECT_TPM_RC.contains(&name)
            }
            _ => false,
        }
    }
}

/// PKCS#11 return values that say what the object is, not what the device is doing.
const OBJECT_CKR: &[&str] = &[
    "CKR_KEY_TYPE_INCONSISTENT",
    "CKR_KEY_FUNCTION_NOT_PERMITTED",
    "CKR_KEY_SIZE_RANGE",
    "CKR_MECHANISM_INVALID",
    "CKR_MECHANISM_PARAM_INVALID",
    "CKR_ATTRIBUTE_SENSITIVE",
    "CKR_ATTRIBUTE_TYPE_INVALID",
    "CKR_ATTRIBUTE_VALUE_INVALID",
];

/// TPM response codes for a key blob or public area that is damaged, foreign or unusable
/// (TPM 2.0 Part 2 §6.6.3): what TPM2_Load or TPM2_Sign answer for the key itself.
const OBJECT_TPM_RC: &[&str] = &[
    "TPM_RC_INTEGRITY",
    "TPM_RC_BINDING",
    "TPM_RC_KEY",
    "TPM_RC_KEY_SIZE",
    "TPM_RC_ASYMMETRIC",
    "TPM_RC_ATTRIBUTES",
    "TPM_RC_HASH",
    "TPM_RC_TYPE",
    "TPM_RC_SCHEME",
    "TPM_RC_SIZE",
    "TPM_RC_SYMMETRIC",
    "TPM_RC_CURVE",
    "TPM_RC_ECC_POINT",
    "TPM_RC_VALUE",
    "TPM_RC_SENSITIVE",
    "TPM_RC_KDF",
    "TPM_RC_MGF",
];

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

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(rv: &str) -> TokenError {
        TokenError::Pkcs11 {
            function: "C_Sign".into(),
            rv: rv.into(),
            hint: String::new(),
        }
    }

    fn tpm(code: &str) -> TokenError {
        TokenError::Tpm {
            function: "TPM2_Load".into(),
            code: code.into(),
            meaning: String::new(),
            hint: String::new(),
        }
    }

    #[test]
    fn only_errors_about_the_object_leave_a_key_out() {
        let object = [
            TokenError::Unusable {
                label: "k".into(),
                id: "01".into(),
                reason: "2 public key objects".into(),
            },
            TokenError::BadPublicKey {
                label: "k".into(),
                reason: "empty CKA_EC_POINT".into(),
            },
            TokenError::Ambiguous {
                name: "'k'".into(),
                token: "t".into(),
                ids: vec![],
                uris: vec![],
            },
            TokenError::KeyNotFound {
                name: "'k'".into(),
                token: "t".into(),
                known: vec![],
            },
            TokenError::TpmKey {
                label: "k".into(),
                reason: "another storage key".into(),
            },
            TokenError::Jose(JoseError::BadSignature {
                alg: Alg::ES256,
                reason: "63 bytes".into(),
            }),
            ck("CKR_KEY_FUNCTION_NOT_PERMITTED"),
            ck("CKR_KEY_TYPE_INCONSISTENT"),
            tpm("TPM_RC_INTEGRITY, parameter 1 (0x19f)"),
            tpm("TPM_RC_BINDING (0x1a5, from the resource manager)"),
            tpm("TPM_RC_KEY (0x1dc)"),
        ];
        for e in &object {
            assert!(e.about_the_object(), "{e}");
        }
        // The device or the moment: the request fails (the agent answers 503) instead.
        let device = [
            ck("CKR_FUNCTION_FAILED"),
            ck("CKR_GENERAL_ERROR"),
            ck("CKR_SESSION_HANDLE_INVALID"),
            ck("CKR_SESSION_CLOSED"),
            ck("CKR_SESSION_COUNT"),
            ck("CKR_OBJECT_HANDLE_INVALID"),
            ck("CKR_KEY_HANDLE_INVALID"),
            ck("CKR_OPERATION_ACTIVE"),
            ck("CKR_DEVICE_MEMORY"),
            ck("CKR_HOST_MEMORY"),
            ck("CKR_CANT_LOCK"),
            tpm("TPM_RC_RETRY (0x922)"),
            tpm("TPM_RC_OBJECT_MEMORY (0x902)"),
            tpm("TPM_RC_KEY_SIZEX (0x0)"),
            tpm("TSS2_TCTI_RC_IO_ERROR (0xa000a)"),
            tpm("TSS2_ESYS_RC_TRY_AGAIN (0x70009)"),
            tpm("TPM_RC_AUTH_FAIL, session 1 (0x98e)"),
            TokenError::Unavailable {
                reason: "timed out".into(),
            },
            TokenError::WorkersGone,
            TokenError::Reapprove { label: "k".into() },
            TokenError::PinIncorrect { token: "t".into() },
            TokenError::PinLocked { token: "t".into() },
            TokenError::Rng("no entropy".into()),
            TokenError::TpmStore {
                path: "/s".into(),
                reason: "mode 777".into(),
            },
        ];
        for e in &device {
            assert!(!e.about_the_object(), "{e}");
        }
    }
}
