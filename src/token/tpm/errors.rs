//! TPM and TSS errors in words: which command failed, the response code decoded (layer, name,
//! handle/parameter/session number), what it means and what to do. "The wrapper refused"
//! (tss-esapi) is kept apart from "the TPM said no".
//!
//! Over 400 lines: most of it is the table of response codes and hints in words.

use bitfield::BitRange;
use tss_esapi::constants::{Tss2ResponseCode, Tss2ResponseCodeKind};
use tss_esapi::{Error, WrapperErrorKind};

use crate::error::ErrorKind;
use crate::token::TokenError;

/// A failure inside one TPM operation: a TSS/TPM code (maybe worth a retry on a fresh
/// context) or keybound's own verdict.
#[derive(Debug)]
pub(super) enum TpmFailure {
    Tss {
        /// The TPM command or TSS call, e.g. `TPM2_Sign`.
        function: &'static str,
        error: Error,
    },
    Token(TokenError),
}

impl From<TokenError> for TpmFailure {
    fn from(e: TokenError) -> Self {
        TpmFailure::Token(e)
    }
}

/// Tags a tss-esapi result with the command it came from.
pub(super) trait Tag<T> {
    fn tag(self, function: &'static str) -> Result<T, TpmFailure>;
}

impl<T> Tag<T> for Result<T, Error> {
    fn tag(self, function: &'static str) -> Result<T, TpmFailure> {
        self.map_err(|error| TpmFailure::Tss { function, error })
    }
}

/// How keybound reacts to a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recovery {
    /// The TPM cannot be reached or lost its state: drop the context, reconnect, retry once.
    Reconnect,
    /// A handle keybound held is gone (the TPM restarted under us): reload, retry once.
    Reload,
    /// The key's auth value was refused: never send it again (dictionary-attack lockout).
    AuthRejected,
    /// Anything else: report.
    Report,
}

/// Layers of a TSS2_RC (tss2_common.h): bits 16..23.
const LAYER_TPM: u32 = 0;
const LAYER_ESAPI: u32 = 7;
const LAYER_SYS: u32 = 8;
const LAYER_MU: u32 = 9;
const LAYER_TCTI: u32 = 10;
const LAYER_RESMGR: u32 = 11;
const LAYER_RESMGR_TPM: u32 = 12;

impl TpmFailure {
    /// The raw TSS2_RC, if the TSS or the TPM produced this failure.
    pub(super) fn code(&self) -> Option<u32> {
        match self {
            TpmFailure::Tss {
                error: Error::Tss2Error(rc),
                ..
            } => raw(*rc),
            _ => None,
        }
    }

    /// One line for logs.
    pub(super) fn summary(&self) -> String {
        match self {
            TpmFailure::Token(e) => e.to_string(),
            TpmFailure::Tss {
                function,
                error: Error::Tss2Error(rc),
            } => match raw(*rc) {
                Some(raw) => format!("{function}: {}", decode(raw, *rc).0),
                None => format!("{function}: {rc}"),
            },
            TpmFailure::Tss { function, error } => format!("{function}: {error}"),
        }
    }

    pub(super) fn recovery(&self) -> Recovery {
        use Tss2ResponseCodeKind as K;
        let Some(rc) = self.code() else {
            return Recovery::Report;
        };
        let (layer, base) = ((rc >> 16) & 0xff, rc & 0xffff);
        match layer {
            // The TCTI could not talk to the TPM (IO_ERROR, NO_CONNECTION, GENERAL_FAILURE,
            // TRY_AGAIN), or a response arrived cut off: the connection is suspect.
            LAYER_TCTI => Recovery::Reconnect,
            LAYER_ESAPI | LAYER_SYS if matches!(base, 1 | 8 | 9 | 10 | 17 | 19) => {
                Recovery::Reconnect
            }
            // ESYS_RC_BAD_TR: an ESYS handle for an object that is gone.
            LAYER_ESAPI if base == 24 => Recovery::Reload,
            LAYER_TPM | LAYER_RESMGR_TPM => match tpm_kind(base) {
                // Not started (a restarted simulator without startup-clear) or needs reboot.
                Some(K::Initialize | K::Reboot) => Recovery::Reconnect,
                Some(K::Handle | K::ReferenceH0 | K::ReferenceH1 | K::ReferenceH2) => {
                    Recovery::Reload
                }
                // keybound's own objects may hold slots: flushing them first can help.
                Some(K::ObjectMemory) => Recovery::Reload,
                Some(K::AuthFail | K::BadAuth) if session_error(base) => Recovery::AuthRejected,
                _ => Recovery::Report,
            },
            _ => Recovery::Report,
        }
    }

    /// The error for the user: the command, the decoded code, its meaning and the action.
    /// `tcti` names the configured TCTI for connection hints.
    pub(super) fn into_token_error(self, tcti: &str) -> TokenError {
        let (function, error) = match self {
            TpmFailure::Token(e) => return e,
            TpmFailure::Tss { function, error } => (function, error),
        };
        let rc = match error {
            Error::WrapperError(kind) => {
                return TokenError::Tpm {
                    function: function.into(),
                    code: format!("tss-esapi refused the call ({kind:?})"),
                    meaning: kind.to_string(),
                    hint: wrapper_hint(kind).into(),
                    kind: ErrorKind::Device,
                    about_the_object: false,
                };
            }
            Error::Tss2Error(rc) => rc,
        };
        let Some(raw) = raw(rc) else {
            return TokenError::Tpm {
                function: function.into(),
                code: "an unreadable response code".into(),
                meaning: rc.to_string(),
                hint: String::new(),
                kind: ErrorKind::Device,
                about_the_object: false,
            };
        };
        let (code, meaning) = decode(raw, rc);
        let (kind, about_the_object) = classify(raw);
        TokenError::Tpm {
            function: function.into(),
            code,
            meaning,
            hint: capitalized(hint(function, raw, tcti)),
            kind,
            about_the_object,
        }
    }
}

/// The numeric TSS2_RC. tss-esapi 7.7 has no getter for it, but its code types are
/// `bitfield` structs over the raw value: all 32 bits of that range are the code.
fn raw(rc: Tss2ResponseCode) -> Option<u32> {
    match rc {
        Tss2ResponseCode::Success => Some(0),
        Tss2ResponseCode::FormatZero(c) => Some(c.bit_range(31, 0)),
        Tss2ResponseCode::FormatOne(c) => Some(c.bit_range(31, 0)),
    }
}

/// tss-esapi's classification of a TPM 2.0 response code (the layer bits removed); `None`
/// for TPM 1.2 codes, which tss-esapi would read as TPM 2.0 ones, and for unknown codes.
fn tpm_kind(base: u32) -> Option<Tss2ResponseCodeKind> {
    let format_one = base & 0x80 != 0;
    let tpm2 = base & 0x100 != 0;
    if !format_one && !tpm2 {
        return None;
    }
    Tss2ResponseCode::from(base).kind()
}

/// The [`ErrorKind`] of a TSS2_RC, and whether it is about the key object itself (a
/// damaged, foreign or unusable blob or public area, TPM 2.0 Part 2 §6.6.3). TPM codes are
/// classified by tss-esapi's own [`Tss2ResponseCodeKind`]; the TSS layers by their layer.
fn classify(raw: u32) -> (ErrorKind, bool) {
    use Tss2ResponseCodeKind as K;
    let (layer, base) = ((raw >> 16) & 0xff, raw & 0xffff);
    match layer {
        // The connection to the TPM: keybound reconnects on the next request.
        LAYER_TCTI => (ErrorKind::Transient, false),
        LAYER_ESAPI | LAYER_SYS if matches!(base, 8 | 9 | 10 | 17 | 19) => {
            (ErrorKind::Transient, false)
        }
        LAYER_TPM | LAYER_RESMGR_TPM => match tpm_kind(base) {
            Some(K::AuthFail | K::BadAuth | K::Lockout) => (ErrorKind::Authentication, false),
            Some(
                K::Retry
                | K::Yielded
                | K::Testing
                | K::Canceled
                | K::NvRate
                | K::NvUnavailable
                | K::ContextGap
                | K::ObjectMemory
                | K::SessionMemory
                | K::Memory
                | K::Initialize
                | K::Reboot
                | K::Handle
                | K::ReferenceH0
                | K::ReferenceH1
                | K::ReferenceH2,
            ) => (ErrorKind::Transient, false),
            Some(
                K::Integrity
                | K::Binding
                | K::Key
                | K::KeySize
                | K::Asymmetric
                | K::Attributes
                | K::Hash
                | K::Type
                | K::Scheme
                | K::Size
                | K::Symmetric
                | K::Curve
                | K::EccPoint
                | K::Value
                | K::Sensitive
                | K::Kdf
                | K::Mgf,
            ) => (ErrorKind::Configuration, true),
            _ => (ErrorKind::Device, false),
        },
        _ => (ErrorKind::Device, false),
    }
}

/// `TPM_RC_OBJECT_MEMORY (0x902)` and what it means.
fn decode(raw: u32, rc: Tss2ResponseCode) -> (String, String) {
    let (layer, base) = ((raw >> 16) & 0xff, raw & 0xffff);
    match layer {
        LAYER_TPM | LAYER_RESMGR_TPM => {
            let (name, number) = tpm_name(base);
            let via = if layer == LAYER_RESMGR_TPM {
                ", from the resource manager"
            } else {
                ""
            };
            let code = format!("{name}{number} ({raw:#x}{via})");
            // tss-esapi's text is the specification's wording for TPM codes; the handle or
            // parameter number is already in `code`.
            let meaning = if layer == LAYER_TPM {
                let text = rc.to_string();
                match text.find(" (associated with") {
                    Some(i) => text[..i].to_string(),
                    None => text,
                }
            } else {
                String::from("a TPM error reported by the resource manager")
            };
            (code, meaning)
        }
        _ => {
            let layer_name = match layer {
                LAYER_ESAPI => "TSS2_ESYS",
                LAYER_SYS => "TSS2_SYS",
                LAYER_MU => "TSS2_MU",
                LAYER_TCTI => "TSS2_TCTI",
                LAYER_RESMGR => "TSS2_RESMGR",
                6 => "TSS2_FEATURE",
                _ => "TSS2",
            };
            let (name, meaning) = base_name(base);
            (
                format!("{layer_name}_RC_{name} ({raw:#x})"),
                meaning.to_string(),
            )
        }
    }
}

/// A TPM 2.0 response code's name and, for format-one codes, what it refers to.
fn tpm_name(base: u32) -> (&'static str, String) {
    if base & 0x80 != 0 {
        // Format one: error in bits 0..5, parameter/handle/session number in 8..11.
        let n = (base >> 8) & 0xf;
        let which = if base & 0x40 != 0 {
            format!(", parameter {n}")
        } else if n == 0 {
            String::new()
        } else if n < 8 {
            format!(", handle {n}")
        } else {
            format!(", session {}", n - 8)
        };
        let name = match 0x80 + (base & 0x3f) {
            0x81 => "TPM_RC_ASYMMETRIC",
            0x82 => "TPM_RC_ATTRIBUTES",
            0x83 => "TPM_RC_HASH",
            0x84 => "TPM_RC_VALUE",
            0x85 => "TPM_RC_HIERARCHY",
            0x87 => "TPM_RC_KEY_SIZE",
            0x88 => "TPM_RC_MGF",
            0x89 => "TPM_RC_MODE",
            0x8a => "TPM_RC_TYPE",
            0x8b => "TPM_RC_HANDLE",
            0x8c => "TPM_RC_KDF",
            0x8d => "TPM_RC_RANGE",
            0x8e => "TPM_RC_AUTH_FAIL",
            0x8f => "TPM_RC_NONCE",
            0x90 => "TPM_RC_PP",
            0x92 => "TPM_RC_SCHEME",
            0x95 => "TPM_RC_SIZE",
            0x96 => "TPM_RC_SYMMETRIC",
            0x97 => "TPM_RC_TAG",
            0x98 => "TPM_RC_SELECTOR",
            0x9a => "TPM_RC_INSUFFICIENT",
            0x9b => "TPM_RC_SIGNATURE",
            0x9c => "TPM_RC_KEY",
            0x9d => "TPM_RC_POLICY_FAIL",
            0x9f => "TPM_RC_INTEGRITY",
            0xa0 => "TPM_RC_TICKET",
            0xa1 => "TPM_RC_RESERVED_BITS",
            0xa2 => "TPM_RC_BAD_AUTH",
            0xa3 => "TPM_RC_EXPIRED",
            0xa4 => "TPM_RC_POLICY_CC",
            0xa5 => "TPM_RC_BINDING",
            0xa6 => "TPM_RC_CURVE",
            0xa7 => "TPM_RC_ECC_POINT",
            _ => "TPM_RC_(unknown format-one code)",
        };
        return (name, which);
    }
    if base & 0x100 == 0 {
        return ("TPM 1.2 response code", String::new());
    }
    if base & 0x400 != 0 {
        return ("TPM_RC_VENDOR (vendor-specific)", String::new());
    }
    let name = match base & 0x97f {
        0x100 => "TPM_RC_INITIALIZE",
        0x101 => "TPM_RC_FAILURE",
        0x103 => "TPM_RC_SEQUENCE",
        0x10b => "TPM_RC_PRIVATE",
        0x119 => "TPM_RC_HMAC",
        0x120 => "TPM_RC_DISABLED",
        0x121 => "TPM_RC_EXCLUSIVE",
        0x124 => "TPM_RC_AUTH_TYPE",
        0x125 => "TPM_RC_AUTH_MISSING",
        0x126 => "TPM_RC_POLICY",
        0x127 => "TPM_RC_PCR",
        0x128 => "TPM_RC_PCR_CHANGED",
        0x12d => "TPM_RC_UPGRADE",
        0x12e => "TPM_RC_TOO_MANY_CONTEXTS",
        0x12f => "TPM_RC_AUTH_UNAVAILABLE",
        0x130 => "TPM_RC_REBOOT",
        0x131 => "TPM_RC_UNBALANCED",
        0x142 => "TPM_RC_COMMAND_SIZE",
        0x143 => "TPM_RC_COMMAND_CODE",
        0x144 => "TPM_RC_AUTHSIZE",
        0x145 => "TPM_RC_AUTH_CONTEXT",
        0x146 => "TPM_RC_NV_RANGE",
        0x147 => "TPM_RC_NV_SIZE",
        0x148 => "TPM_RC_NV_LOCKED",
        0x149 => "TPM_RC_NV_AUTHORIZATION",
        0x14a => "TPM_RC_NV_UNINITIALIZED",
        0x14b => "TPM_RC_NV_SPACE",
        0x14c => "TPM_RC_NV_DEFINED",
        0x150 => "TPM_RC_BAD_CONTEXT",
        0x151 => "TPM_RC_CPHASH",
        0x152 => "TPM_RC_PARENT",
        0x153 => "TPM_RC_NEEDS_TEST",
        0x154 => "TPM_RC_NO_RESULT",
        0x155 => "TPM_RC_SENSITIVE",
        0x901 => "TPM_RC_CONTEXT_GAP",
        0x902 => "TPM_RC_OBJECT_MEMORY",
        0x903 => "TPM_RC_SESSION_MEMORY",
        0x904 => "TPM_RC_MEMORY",
        0x905 => "TPM_RC_SESSION_HANDLES",
        0x906 => "TPM_RC_OBJECT_HANDLES",
        0x907 => "TPM_RC_LOCALITY",
        0x908 => "TPM_RC_YIELDED",
        0x909 => "TPM_RC_CANCELED",
        0x90a => "TPM_RC_TESTING",
        0x910 => "TPM_RC_REFERENCE_H0",
        0x911 => "TPM_RC_REFERENCE_H1",
        0x912 => "TPM_RC_REFERENCE_H2",
        0x918 => "TPM_RC_REFERENCE_S0",
        0x920 => "TPM_RC_NV_RATE",
        0x921 => "TPM_RC_LOCKOUT",
        0x922 => "TPM_RC_RETRY",
        0x923 => "TPM_RC_NV_UNAVAILABLE",
        _ => "TPM_RC_(unknown format-zero code)",
    };
    (name, String::new())
}

/// Whether a format-one code names a session (where authorization failures are reported).
fn session_error(base: u32) -> bool {
    base & 0x80 != 0 && base & 0x40 == 0 && (base >> 8) & 0xf >= 8
}

/// TSS2_BASE_RC_* (tss2_common.h), shared by every TSS layer.
fn base_name(base: u32) -> (&'static str, &'static str) {
    match base {
        1 => (
            "GENERAL_FAILURE",
            "the TSS failed without a more specific reason",
        ),
        2 => ("NOT_IMPLEMENTED", "not implemented by this TSS"),
        3 => ("BAD_CONTEXT", "the TSS context is not valid"),
        4 => ("ABI_MISMATCH", "the TSS libraries do not match"),
        5 => ("BAD_REFERENCE", "a required pointer was missing"),
        6 => ("INSUFFICIENT_BUFFER", "a buffer was too small"),
        7 => ("BAD_SEQUENCE", "calls were made in the wrong order"),
        8 => ("NO_CONNECTION", "no connection to the TPM"),
        9 => ("TRY_AGAIN", "the TPM did not answer in time"),
        10 => ("IO_ERROR", "input/output error talking to the TPM"),
        11 => ("BAD_VALUE", "a value was out of range"),
        12 => ("NOT_PERMITTED", "the operation is not permitted"),
        13 => ("INVALID_SESSIONS", "the sessions do not fit the command"),
        16 => ("BAD_SIZE", "a size was wrong"),
        17 => ("MALFORMED_RESPONSE", "the TPM's response was malformed"),
        18 => ("INSUFFICIENT_CONTEXT", "the context structure is too small"),
        19 => ("INSUFFICIENT_RESPONSE", "the TPM's response was cut short"),
        20 => ("INCOMPATIBLE_TCTI", "the TCTI does not fit this TSS"),
        21 => ("NOT_SUPPORTED", "not supported"),
        22 => ("BAD_TCTI_STRUCTURE", "the TCTI structure is not valid"),
        23 => ("MEMORY", "out of memory"),
        24 => ("BAD_TR", "an ESYS handle refers to no object"),
        27 => (
            "RSP_AUTH_FAILED",
            "the TPM's response failed the session check",
        ),
        _ => ("UNKNOWN", "an unknown TSS error"),
    }
}

/// What to do about it.
fn hint(function: &str, raw: u32, tcti: &str) -> String {
    let (layer, base) = ((raw >> 16) & 0xff, raw & 0xffff);
    let unreachable = || {
        format!(
            "no TPM answers through tcti '{tcti}': is the device there, and may this user \
             open it (group tss for /dev/tpmrm0)? Is tpm2-abrmd or swtpm running? keybound \
             reconnects on the next request"
        )
    };
    if layer == LAYER_TCTI || (matches!(layer, LAYER_ESAPI | LAYER_SYS) && matches!(base, 8 | 10)) {
        return unreachable();
    }
    if !matches!(layer, LAYER_TPM | LAYER_RESMGR_TPM) {
        return String::new();
    }
    use Tss2ResponseCodeKind as K;
    let text = match tpm_kind(base) {
        Some(K::ObjectMemory | K::Memory) => {
            "the TPM has no free object slot: another program left objects loaded. Use the \
             kernel resource manager (tcti device:/dev/tpmrm0) or tpm2-abrmd, or flush them \
             with `tpm2_flushcontext -t`"
        }
        Some(K::SessionMemory | K::SessionHandles) => {
            "the TPM has no free session slot; flush sessions with `tpm2_flushcontext -s`, or \
             use a resource manager (device:/dev/tpmrm0, tabrmd)"
        }
        Some(K::Lockout) => {
            "the TPM is in dictionary-attack lockout after failed authorizations; wait for it \
             to recover, or reset it with `tpm2_dictionarylockout -c -p <lockout auth>`"
        }
        Some(K::AuthFail | K::BadAuth) if function == "TPM2_CreatePrimary" => {
            "the owner hierarchy has an authorization value; keybound creates its storage key \
             with an empty owner auth. Persist a storage key once (`tpm2_createprimary` + \
             `tpm2_evictcontrol`) and set token.primary_handle to it"
        }
        Some(K::AuthFail | K::BadAuth) => {
            "the key's authorization value was refused: check token.key_auth_env / \
             token.key_auth_file. keybound does not send a refused value again, to keep the \
             TPM out of dictionary-attack lockout"
        }
        Some(K::Integrity | K::Binding | K::Sensitive) => {
            "the key blob does not fit this TPM's storage key: the TPM was cleared, the state \
             directory comes from another machine, or the file was altered. The key cannot be \
             recovered; generate a new one"
        }
        Some(K::Hierarchy) => "the owner hierarchy is disabled; enable it (firmware settings)",
        Some(K::Initialize | K::Reboot) => {
            "the TPM was not started: run `tpm2_startup -c` (swtpm: --flags startup-clear); \
             keybound retries on the next request"
        }
        Some(K::NvSpace) => {
            "the TPM has no room for another persistent object; remove one with \
             `tpm2_evictcontrol`"
        }
        Some(K::NvDefined) => "another object already occupies token.primary_handle",
        Some(K::Curve | K::KeySize | K::Scheme | K::Asymmetric) if function == "TPM2_Create" => {
            "this TPM does not offer that algorithm or key size; use ES256 (every TPM 2.0 \
             has P-256), or rsa_bits = 2048 for RS256/PS256"
        }
        Some(K::Handle | K::ReferenceH0) => {
            "an object keybound used is gone (the TPM restarted); keybound reloads it on the \
             next request"
        }
        Some(K::Retry | K::Yielded | K::Testing | K::NvRate) => "the TPM is busy; try again",
        Some(K::Failure) => "the TPM is in failure mode; it needs a reset (reboot the machine)",
        _ => "",
    };
    text.to_string()
}

fn capitalized(text: String) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => text,
    }
}

fn wrapper_hint(kind: WrapperErrorKind) -> &'static str {
    match kind {
        WrapperErrorKind::WrongValueFromTpm => "the TPM returned something keybound cannot use",
        WrapperErrorKind::WrongParamSize | WrapperErrorKind::InvalidParam => {
            "a key blob or digest has the wrong size; the state file may be damaged"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(raw: u32) -> TpmFailure {
        // Round-trip through tss-esapi's own type, as the TSS hands it over.
        let error = tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(raw));
        TpmFailure::Tss {
            function: "TPM2_Load",
            error,
        }
    }

    #[test]
    fn codes_are_decoded_with_numbers_and_hints() {
        assert_eq!(rc(0x902).code(), Some(0x902));
        let e = rc(0x902).into_token_error("swtpm").to_string();
        assert!(e.contains("TPM_RC_OBJECT_MEMORY (0x902)"), "{e}");
        assert!(e.contains("tpm2_flushcontext -t"), "{e}");
        // TPM_RC_INTEGRITY on parameter 1 of TPM2_Load (a foreign or altered blob).
        let e = rc(0x1df).into_token_error("swtpm").to_string();
        assert!(e.contains("TPM_RC_INTEGRITY, parameter 1 (0x1df)"), "{e}");
        assert!(e.contains("generate a new one"), "{e}");
        assert!(
            e.contains("(0x1df): integrity check failed. The key blob"),
            "{e}"
        );
        // TCTI IO error: a connection problem, with the tcti in the hint.
        let f = rc(0xa000a);
        assert_eq!(f.recovery(), Recovery::Reconnect);
        let e = f
            .into_token_error("swtpm:host=127.0.0.1,port=1")
            .to_string();
        assert!(e.contains("TSS2_TCTI_RC_IO_ERROR (0xa000a)"), "{e}");
        assert!(e.contains("swtpm:host=127.0.0.1,port=1"), "{e}");
    }

    #[test]
    fn kinds_and_objects_come_from_the_typed_code() {
        let of = |raw| match rc(raw).into_token_error("swtpm") {
            TokenError::Tpm {
                kind,
                about_the_object,
                ..
            } => (kind, about_the_object),
            other => panic!("{other}"),
        };
        // About the key object: TPM_RC_INTEGRITY parameter 1, TPM_RC_BINDING from the
        // resource manager, TPM_RC_KEY.
        assert_eq!(of(0x19f), (ErrorKind::Configuration, true));
        assert_eq!(of(0x1df), (ErrorKind::Configuration, true));
        assert_eq!(of(0xc01a5), (ErrorKind::Configuration, true));
        assert_eq!(of(0x1dc), (ErrorKind::Configuration, true));
        // The device or the moment.
        assert_eq!(of(0x922), (ErrorKind::Transient, false));
        assert_eq!(of(0x902), (ErrorKind::Transient, false));
        assert_eq!(of(0xa000a), (ErrorKind::Transient, false));
        assert_eq!(of(0x70009), (ErrorKind::Transient, false));
        assert_eq!(of(0x101), (ErrorKind::Device, false));
        // The key's auth value refused, and dictionary-attack lockout: authentication.
        assert_eq!(of(0x98e), (ErrorKind::Authentication, false));
        assert_eq!(of(0x921), (ErrorKind::Authentication, false));
    }

    #[test]
    fn recovery_classes() {
        // TPM_RC_AUTH_FAIL on session 1: 0x98e.
        assert_eq!(rc(0x98e).recovery(), Recovery::AuthRejected);
        // TPM_RC_HANDLE on handle 1: 0x18b.
        assert_eq!(rc(0x18b).recovery(), Recovery::Reload);
        assert_eq!(rc(0x910).recovery(), Recovery::Reload);
        assert_eq!(rc(0x100).recovery(), Recovery::Reconnect);
        assert_eq!(rc(0x1df).recovery(), Recovery::Report);
        assert_eq!(rc(0x902).recovery(), Recovery::Reload);
        assert_eq!(rc(0x921).recovery(), Recovery::Report);
    }
}
