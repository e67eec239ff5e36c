//! `call`, `token` and `token --check` through a running agent: its socket is
//! `KEYBOUND_AGENT_SOCK`, else `[agent] socket` (or its default). Every process then shares
//! the agent's token cache, nonces and clock offsets; `--no-agent` keeps them in-process.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keybound::config::Config;
use keybound::error::ErrorKind;
use serde_json::Value;

/// The environment variable naming the agent's socket.
pub const SOCKET_ENV: &str = "KEYBOUND_AGENT_SOCK";

/// The largest answer read from the agent (its own bound, `agent.max_call_bytes`, is on
/// the raw body; base64 and JSON make the answer larger).
const MAX_ANSWER_BYTES: usize = 128 << 20;

/// A connection to a running agent, opened before any work is done.
pub struct AgentSocket {
    path: PathBuf,
    stream: UnixStream,
}

/// Where the command runs: a reachable agent, else in-process (`None`). With
/// `KEYBOUND_AGENT_SOCK` set, an agent that does not answer is an error (the user asked for
/// it); the configured socket without an agent just means none runs.
pub fn reach(config: Option<&Config>, no_agent: bool) -> anyhow::Result<Option<AgentSocket>> {
    if no_agent {
        return Ok(None);
    }
    if let Some(path) = std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        return match UnixStream::connect(&path) {
            Ok(stream) => Ok(Some(AgentSocket { path, stream })),
            Err(e) => anyhow::bail!(
                "{SOCKET_ENV} names {}, but no agent answers there ({e}); start `keybound serve` on it, fix or unset {SOCKET_ENV}, or pass --no-agent",
                path.display()
            ),
        };
    }
    let Some(config) = config else {
        return Ok(None);
    };
    let path = config.agent.socket_path();
    match UnixStream::connect(&path) {
        Ok(stream) => {
            tracing::info!("through the agent at {}", path.display());
            Ok(Some(AgentSocket { path, stream }))
        }
        Err(e) => {
            tracing::info!("no agent at {} ({e}); working in-process", path.display());
            Ok(None)
        }
    }
}

/// The agent refused or failed a request: its `{error, message}`, with what to do.
#[derive(Debug, thiserror::Error)]
#[error("the agent at {} answered {status}: {message}{hint}", socket.display())]
pub struct AgentError {
    socket: PathBuf,
    status: u16,
    error: String,
    message: String,
    hint: String,
}

impl AgentError {
    /// The kind of failure, for the exit status (README "Exit codes").
    pub fn kind(&self) -> ErrorKind {
        match (self.status, self.error.as_str()) {
            (503, _) => ErrorKind::Transient,
            (_, "authentication" | "server_refused") => ErrorKind::Authentication,
            (403, _) => ErrorKind::Refused,
            (400 | 404 | 413, _) => ErrorKind::Configuration,
            _ => ErrorKind::Upstream,
        }
    }
}

impl AgentSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// POSTs `body` as JSON to `path` and returns the JSON answer; an error status is an
    /// [`AgentError`].
    pub async fn post(self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let AgentSocket {
            path: socket,
            stream,
        } = self;
        let shown = socket.display().to_string();
        stream
            .set_nonblocking(true)
            .with_context(|| format!("cannot use the agent's socket {shown}"))?;
        let stream = tokio::net::UnixStream::from_std(stream)
            .with_context(|| format!("cannot use the agent's socket {shown}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("cannot talk HTTP to the agent at {shown}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("agent connection ended: {e}");
            }
        });
        let request = http::Request::post(path)
            .header(http::header::HOST, "keybound")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))
            .context("cannot build the request to the agent")?;
        let response = sender.send_request(request).await.map_err(|e| {
            let uid = rustix::process::getuid().as_raw();
            // The agent closes a connection no [[agent.allow]] rule names before it reads
            // any HTTP: no answer at all.
            anyhow::anyhow!(
                "the agent at {shown} closed the connection without answering ({e}): most likely no [[agent.allow]] rule names this uid ({uid}); add one to the agent's config, or pass --no-agent"
            )
        })?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the agent's answer from {shown}: {e}"))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the agent at {shown} answered HTTP {status} without JSON (is it keybound serve?)"
            )
        })?;
        if status.is_success() {
            return Ok(value);
        }
        let text = |k: &str| value[k].as_str().unwrap_or_default().to_owned();
        let (error, message) = (text("error"), text("message"));
        // "forbidden" is the caller's rule; other 403s (policy_refused, scope_not_allowed)
        // are keybound's own checks, the same in-process.
        let hint = if error == "forbidden" {
            let uid = rustix::process::getuid().as_raw();
            format!(
                "; allow it in the agent's [[agent.allow]] rule for uid {uid} (its clients and keys), or pass --no-agent"
            )
        } else if status == http::StatusCode::PAYLOAD_TOO_LARGE {
            "; pass --no-agent to send it in-process".to_owned()
        } else if error == "unknown_client" {
            // The agent runs with another config than this command reads.
            "; pass --no-agent to use this config's client in-process".to_owned()
        } else {
            String::new()
        };
        Err(AgentError {
            socket,
            status: status.as_u16(),
            error,
            message,
            hint,
        }
        .into())
    }
}
