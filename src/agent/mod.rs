//! `keybound serve`: the local signing agent. HTTP/1.1 + JSON on a Unix socket; callers
//! identified by peer credentials; signatures queued per device with a bound; tokens from
//! the OAuth client's cache; Prometheus metrics.

mod api;
pub mod authz;
pub mod metrics;
pub mod socket;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, watch};

use crate::keyring::{Keyring, SigningKey};
use crate::oauth::client::OAuthClient;
use authz::{Peer, Policy};
use metrics::Metrics;

/// `[agent]` in the config (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub socket: Option<PathBuf>,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    #[serde(default = "defaults::max_queue")]
    pub max_queue: usize,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "defaults::shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    #[serde(default = "defaults::async_threads")]
    pub async_threads: usize,
    #[serde(default)]
    pub allow: Vec<authz::Rule>,
}

mod defaults {
    pub fn max_connections() -> usize {
        256
    }
    pub fn max_queue() -> usize {
        512
    }
    pub fn max_body_bytes() -> usize {
        64 * 1024
    }
    pub fn shutdown_grace_secs() -> u64 {
        10
    }
    pub fn async_threads() -> usize {
        1
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            socket: None,
            max_connections: defaults::max_connections(),
            max_queue: defaults::max_queue(),
            max_body_bytes: defaults::max_body_bytes(),
            shutdown_grace_secs: defaults::shutdown_grace_secs(),
            async_threads: defaults::async_threads(),
            allow: Vec::new(),
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        let range = |key: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("agent.{key}: {v} is out of range {lo} to {hi}"))
            }
        };
        range("max_connections", self.max_connections, 1, 65_536)?;
        range("max_queue", self.max_queue, 1, 1_000_000)?;
        range("max_body_bytes", self.max_body_bytes, 256, 16 << 20)?;
        range("async_threads", self.async_threads, 1, 64)?;
        Ok(())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(socket::default_path)
    }
}

/// Everything a request handler needs.
pub struct Agent {
    keyring: Keyring,
    clients: HashMap<String, OAuthClient>,
    /// Keys already found and approved by the policy, by the name callers used.
    keys: Mutex<HashMap<String, SigningKey>>,
    /// Signing requests in flight; `try_acquire` failing is the "queue full" answer.
    queue: Semaphore,
    settings: Settings,
    authz: Policy,
    metrics: Metrics,
}

impl Agent {
    pub fn new(
        keyring: Keyring,
        clients: Vec<OAuthClient>,
        settings: Settings,
        own_uid: u32,
    ) -> Result<Agent, String> {
        settings.validate()?;
        let authz = Policy::new(settings.allow.clone(), own_uid)?;
        Ok(Agent {
            keyring,
            clients: clients
                .into_iter()
                .map(|c| (c.config().name.clone(), c))
                .collect(),
            keys: Mutex::new(HashMap::new()),
            queue: Semaphore::new(settings.max_queue),
            settings,
            authz,
            metrics: Metrics::default(),
        })
    }

    fn cached_key(&self, name: &str) -> Option<SigningKey> {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn remember_key(&self, name: &str, key: SigningKey) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), key);
    }

    fn forget_keys(&self) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Signing requests queued or in progress.
    pub fn queue_depth(&self) -> usize {
        self.settings.max_queue - self.queue.available_permits()
    }
}

/// Serves `listener` until `shutdown` resolves; then stops accepting, lets in-flight
/// requests finish for up to `shutdown_grace_secs`, and returns.
pub async fn run(listener: UnixListener, agent: Arc<Agent>, shutdown: impl Future<Output = ()>) {
    // One permit per open connection: at the limit the agent stops accepting and new
    // connections wait in the kernel's backlog.
    let connections = Arc::new(Semaphore::new(agent.settings.max_connections));
    let (stop, stopping) = watch::channel(false);
    let router = api::router(agent.clone());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            Err(e) => {
                tracing::warn!("no peer credentials on a connection, dropped: {e}");
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(peer)));
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(uid = peer.uid, "connection ended: {e}");
                    }
                }
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let all = u32::try_from(agent.settings.max_connections).unwrap_or(u32::MAX);
    let grace = Duration::from_secs(agent.settings.shutdown_grace_secs);
    if tokio::time::timeout(grace, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {} s; exiting anyway",
            grace.as_secs()
        );
    }
}

/// Tells systemd the agent is ready (`Type=notify`), when `NOTIFY_SOCKET` is set.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(b"READY=1", &addr)?;
        } else {
            sock.send_to(b"READY=1", &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("sd_notify READY=1 failed: {e}");
    }
}
