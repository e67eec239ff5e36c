//! What kind of failure an error is, across layers: what a caller can do about it. The
//! agent's HTTP statuses and the CLI's exit codes are meant to follow from the kind.

/// The kinds of failure, each with what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
