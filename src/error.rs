//! What kind of failure an error is, across layers: what a caller can do about it. Every
//! error enum has a `kind()` next to its variants. The agent answers by kind
//! (`agent::api`, docs/agent-api.yaml): transient and device 503 + Retry-After,
//! configuration 500 `configuration`, authentication 500 `authentication` (no
//! Retry-After: a retry would spend PIN attempts), upstream 502, refused 403; a few
//! variants that name the caller's own input answer 400/404 instead; internal 500
//! `internal`. The CLI's exit status follows the kind too (README "Exit codes"): 75
//! (`EX_TEMPFAIL`) for transient and device failures, 77 (`EX_NOPERM`) for refused
//! credentials (PIN, key authorization, the server's refusal), 1 for the rest; 2, 3 and 4
//! stay about usage, the audit and `call`.

/// The kinds of failure, each with what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorKind {
    /// Likely to pass if tried again later: timeouts, 5xx, 429, an open breaker.
    Transient,
    /// keybound's configuration or the request is wrong: fix it; retrying will not help.
    Configuration,
    /// The signing device (token, TPM) or this machine failed.
    Device,
    /// A server answered something keybound cannot use (bad body, redirect, nonce loop).
    Upstream,
    /// keybound's own rules refused (policy, scope guard, origins, a downgraded token).
    Refused,
    /// The server refused the client's credentials or request (RFC 6749 §5.2 error).
    Authentication,
    /// A bug in keybound (a task that panicked, a worker's answer of the wrong type):
    /// neither waiting nor the config will fix it; report it.
    Internal,
}

/// A setting that is not valid, found when the config is loaded: the key as written in the
/// file (`token.sessions`, `agent.max_queue`, `client[0].scopes`) and why. Each layer's
/// settings validate themselves with it; `config` adds the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct InvalidSetting {
    pub key: String,
    pub reason: String,
}

impl InvalidSetting {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> InvalidSetting {
        InvalidSetting {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Always [`ErrorKind::Configuration`]: fix the file.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Configuration
    }
}
