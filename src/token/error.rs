//! `TokenError`: every way a device or its configuration can fail, each a sentence with
//! the next step.

use std::path::PathBuf;

use cryptoki::error::RvError;

use crate::error::ErrorKind;
use crate::jose::{Alg, JoseError};

/// Serde: errors cross from a signer process to the agent whole (`token::signer`), so
/// kinds, recovery and messages are the same on both sides.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
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
    #[error(
        "another keybound changed the rotation record of '{slot}' at the same moment (record \
         {seq}); nothing was changed by this one. Look at `keybound keys list` and run the step \
         again if it is still needed"
    )]
    RecordConflict { slot: String, seq: u64 },
    #[error("key name '{name}' is not valid: {reason}")]
    BadKeyName { name: String, reason: String },
    #[error("key '{name}' names token '{named}', but the configured token is '{configured}'")]
    OtherToken {
        name: String,
        named: String,
        configured: String,
    },
    #[error("key '{name}' does not name the configured token: {reason}")]
    UriMismatch {
        name: String,
        /// The URI attribute that does not match (`serial`, `module-path`, ...).
        #[serde(with = "crate::jose::interned")]
        attribute: crate::jose::interned::Str,
        reason: String,
    },
    #[error("{alg} is not available with profile '{profile}': {reason}")]
    AlgUnavailable {
        alg: Alg,
        profile: String,
        reason: String,
    },
    #[error("key '{label}' has an unusable public key: {reason}")]
    BadPublicKey { label: String, reason: String },
    #[error("{function} failed: {}{}", rv_name(*.rv), if .hint.is_empty() { String::new() } else { format!("; {}", .hint) })]
    Pkcs11 {
        function: String,
        /// The PKCS#11 return value, typed: kinds and recovery match on it, never on text.
        #[serde(with = "rv_serde")]
        rv: RvError,
        hint: String,
    },
    #[error("cryptoki failed: {reason}")]
    Cryptoki { reason: String },
    #[error(
        "{function} failed: {code}: {meaning}{}",
        if .hint.is_empty() { String::new() } else { format!(". {}", .hint) }
    )]
    Tpm {
        function: String,
        code: String,
        meaning: String,
        hint: String,
        /// Classified where the response code is still typed (`token::tpm::errors`).
        kind: ErrorKind,
        /// The code is about the key object itself (a damaged or foreign blob).
        about_the_object: bool,
    },
    #[error("TPM key store {}: {reason}", .path.display())]
    TpmStore { path: PathBuf, reason: String },
    #[error("TPM key '{label}' cannot be used: {reason}")]
    TpmKey { label: String, reason: String },
    /// The TPM refused the key's auth value once; keybound never sends it again.
    #[error(
        "TPM key '{label}' cannot be used: the TPM refused its auth value earlier; keybound does not send it again, to keep the TPM out of dictionary-attack lockout. Fix token.key_auth_env / token.key_auth_file and restart keybound"
    )]
    KeyAuthRefused { label: String },
    #[error(
        "no TPM key auth value: set the environment variable {env}, or token.key_auth_file, or remove token.key_auth_env"
    )]
    TpmKeyAuthMissing { env: String },
    #[error("the device is unavailable ({reason}); keybound reconnects when it is back")]
    Unavailable { reason: String },
    #[error("{what} is not supported by the {backend} backend")]
    NotSupported {
        #[serde(with = "crate::jose::interned")]
        what: crate::jose::interned::Str,
        #[serde(with = "crate::jose::interned")]
        backend: crate::jose::interned::Str,
    },
    #[error("hsm-profile error: {0}")]
    Profile(String),
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
    #[error("the signing workers stopped; restart keybound")]
    WorkersGone,
    /// A bug: reported, never trusted.
    #[error("internal error: {0}; please report it")]
    Internal(String),
    #[error(transparent)]
    Jose(#[from] JoseError),
}

impl TokenError {
    /// What kind of failure this is (see [`ErrorKind`]): what the agent answers and what a
    /// caller can do.
    pub fn kind(&self) -> ErrorKind {
        use TokenError as E;
        match self {
            E::ModuleNotFound { .. }
            | E::ModuleLoad { .. }
            | E::NoTokenSelector
            | E::PinMissing { .. }
            | E::PinFile { .. }
            | E::PinFilePermissions { .. }
            | E::KeyNotFound { .. }
            | E::Ambiguous { .. }
            | E::LabelExists { .. }
            | E::BadKeyName { .. }
            | E::OtherToken { .. }
            | E::UriMismatch { .. }
            | E::AlgUnavailable { .. }
            | E::TpmStore { .. }
            | E::TpmKey { .. }
            | E::TpmKeyAuthMissing { .. }
            | E::NotSupported { .. }
            | E::Profile(_)
            | E::Jose(_) => ErrorKind::Configuration,
            // A token that is not there may be unplugged: it can come back.
            E::TokenNotFound { .. } | E::Cryptoki { .. } | E::Rng(_) | E::WorkersGone => {
                ErrorKind::Device
            }
            E::PinIncorrect { .. } | E::PinLocked { .. } | E::KeyAuthRefused { .. } => {
                ErrorKind::Authentication
            }
            // A malformed or duplicated object: keybound refuses to sign with it.
            E::Unusable { .. } | E::BadPublicKey { .. } => ErrorKind::Refused,
            E::Reapprove { .. } | E::Unavailable { .. } | E::RecordConflict { .. } => {
                ErrorKind::Transient
            }
            E::Internal(_) => ErrorKind::Internal,
            E::Pkcs11 { rv, .. } => match rv {
                RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::PinExpired
                | RvError::PinInvalid
                | RvError::PinLenRange => ErrorKind::Authentication,
                RvError::SessionCount
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::OperationActive
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent => ErrorKind::Transient,
                rv if OBJECT_CKR.contains(rv) => ErrorKind::Configuration,
                _ => ErrorKind::Device,
            },
            E::Tpm { kind, .. } => *kind,
        }
    }

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
            TokenError::Pkcs11 { rv, .. } => OBJECT_CKR.contains(rv),
            TokenError::Tpm {
                about_the_object, ..
            } => *about_the_object,
            _ => false,
        }
    }
}

/// PKCS#11 return values that say what the object is, not what the device is doing.
const OBJECT_CKR: &[RvError] = &[
    RvError::KeyTypeInconsistent,
    RvError::KeyFunctionNotPermitted,
    RvError::KeySizeRange,
    RvError::MechanismInvalid,
    RvError::MechanismParamInvalid,
    RvError::AttributeSensitive,
    RvError::AttributeTypeInvalid,
    RvError::AttributeValueInvalid,
];

/// `PinIncorrect` → `CKR_PIN_INCORRECT`.
pub(crate) fn rv_name(rv: RvError) -> String {
    let camel = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ck(rv: RvError) -> TokenError {
        TokenError::Pkcs11 {
            function: "C_Sign".into(),
            rv,
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
            ck(RvError::KeyFunctionNotPermitted),
            ck(RvError::KeyTypeInconsistent),
        ];
        for e in &object {
            assert!(e.about_the_object(), "{e}");
        }
        // TPM response codes are classified where they are typed (token::tpm::errors).
        // The device or the moment: the request fails (the agent answers 503) instead.
        let device = [
            ck(RvError::FunctionFailed),
            ck(RvError::GeneralError),
            ck(RvError::SessionHandleInvalid),
            ck(RvError::SessionClosed),
            ck(RvError::SessionCount),
            ck(RvError::ObjectHandleInvalid),
            ck(RvError::KeyHandleInvalid),
            ck(RvError::OperationActive),
            ck(RvError::DeviceMemory),
            ck(RvError::HostMemory),
            ck(RvError::CantLock),
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

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn kinds_follow_what_a_caller_can_do() {
        let pin = TokenError::PinIncorrect { token: "t".into() };
        assert_eq!(pin.kind(), ErrorKind::Authentication);
        let locked = TokenError::PinLocked { token: "t".into() };
        assert_eq!(locked.kind(), ErrorKind::Authentication);
        let refused = TokenError::KeyAuthRefused { label: "k".into() };
        assert_eq!(refused.kind(), ErrorKind::Authentication);
        let gone = TokenError::Unavailable {
            reason: "removed".into(),
        };
        assert_eq!(gone.kind(), ErrorKind::Transient);
        let ck = |rv| TokenError::Pkcs11 {
            function: "C_Login".into(),
            rv,
            hint: String::new(),
        };
        assert_eq!(ck(RvError::PinIncorrect).kind(), ErrorKind::Authentication);
        assert_eq!(
            ck(RvError::SessionHandleInvalid).kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            ck(RvError::MechanismInvalid).kind(),
            ErrorKind::Configuration
        );
        assert_eq!(ck(RvError::GeneralError).kind(), ErrorKind::Device);
        assert_eq!(
            ck(RvError::PinIncorrect).to_string(),
            "C_Login failed: CKR_PIN_INCORRECT"
        );
    }
}

/// A PKCS#11 return value by its name (`RvError`'s `Debug`): every named value of
/// cryptoki 0.12 is listed, so reading one back never goes through `Rv::from`, which logs
/// an error for every code it does not know. Vendor and unknown codes keep their number.
mod rv_serde {
    use cryptoki::error::RvError;
    use serde::{Deserialize, Deserializer, Serializer};

    const NAMED: &[RvError] = &[
        RvError::Cancel,
        RvError::HostMemory,
        RvError::SlotIdInvalid,
        RvError::GeneralError,
        RvError::FunctionFailed,
        RvError::ArgumentsBad,
        RvError::NoEvent,
        RvError::NeedToCreateThreads,
        RvError::CantLock,
        RvError::AttributeReadOnly,
        RvError::AttributeSensitive,
        RvError::AttributeTypeInvalid,
        RvError::AttributeValueInvalid,
        RvError::ActionProhibited,
        RvError::DataInvalid,
        RvError::DataLenRange,
        RvError::DeviceError,
        RvError::DeviceMemory,
        RvError::DeviceRemoved,
        RvError::EncryptedDataInvalid,
        RvError::EncryptedDataLenRange,
        RvError::FunctionCanceled,
        RvError::FunctionNotParallel,
        RvError::FunctionNotSupported,
        RvError::CurveNotSupported,
        RvError::KeyHandleInvalid,
        RvError::KeySizeRange,
        RvError::KeyTypeInconsistent,
        RvError::KeyNotNeeded,
        RvError::KeyChanged,
        RvError::KeyNeeded,
        RvError::KeyIndigestible,
        RvError::KeyFunctionNotPermitted,
        RvError::KeyNotWrappable,
        RvError::KeyUnextractable,
        RvError::MechanismInvalid,
        RvError::MechanismParamInvalid,
        RvError::ObjectHandleInvalid,
        RvError::OperationActive,
        RvError::OperationNotInitialized,
        RvError::PinIncorrect,
        RvError::PinInvalid,
        RvError::PinLenRange,
        RvError::PinExpired,
        RvError::PinLocked,
        RvError::SessionClosed,
        RvError::SessionCount,
        RvError::SessionHandleInvalid,
        RvError::SessionParallelNotSupported,
        RvError::SessionReadOnly,
        RvError::SessionExists,
        RvError::SessionReadOnlyExists,
        RvError::SessionReadWriteSoExists,
        RvError::SignatureInvalid,
        RvError::SignatureLenRange,
        RvError::TemplateIncomplete,
        RvError::TemplateInconsistent,
        RvError::TokenNotPresent,
        RvError::TokenNotRecognized,
        RvError::TokenWriteProtected,
        RvError::UnwrappingKeyHandleInvalid,
        RvError::UnwrappingKeySizeRange,
        RvError::UnwrappingKeyTypeInconsistent,
        RvError::UserAlreadyLoggedIn,
        RvError::UserNotLoggedIn,
        RvError::UserPinNotInitialized,
        RvError::UserTypeInvalid,
        RvError::UserAnotherAlreadyLoggedIn,
        RvError::UserTooManyTypes,
        RvError::WrappedKeyInvalid,
        RvError::WrappedKeyLenRange,
        RvError::WrappingKeyHandleInvalid,
        RvError::WrappingKeySizeRange,
        RvError::WrappingKeyTypeInconsistent,
        RvError::RandomSeedNotSupported,
        RvError::RandomNoRng,
        RvError::DomainParamsInvalid,
        RvError::BufferTooSmall,
        RvError::SavedStateInvalid,
        RvError::InformationSensitive,
        RvError::StateUnsaveable,
        RvError::CryptokiNotInitialized,
        RvError::CryptokiAlreadyInitialized,
        RvError::MutexBad,
        RvError::MutexNotLocked,
        RvError::NewPinMode,
        RvError::NextOtp,
        RvError::ExceededMaxIterations,
        RvError::FipsSelfTestFailed,
        RvError::LibraryLoadFailed,
        RvError::PinTooWeak,
        RvError::PublicKeyInvalid,
        RvError::FunctionRejected,
    ];

    pub fn serialize<S: Serializer>(rv: &RvError, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&format!("{rv:?}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<RvError, D::Error> {
        let name = String::deserialize(de)?;
        let code = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|n| n.parse::<u64>().ok())
        };
        if let Some(c) = code("VendorDefined(") {
            return Ok(RvError::VendorDefined(c as _));
        }
        if let Some(c) = code("UnknownErrorCode(") {
            return Ok(RvError::UnknownErrorCode(c as _));
        }
        Ok(NAMED
            .iter()
            .copied()
            .find(|rv| format!("{rv:?}") == name)
            .unwrap_or(RvError::GeneralError))
    }
}
