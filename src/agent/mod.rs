//! `keybound serve`: the local signing agent. HTTP/1.1 + JSON on a Unix socket; callers
//! identified by peer credentials; signatures queued per device with a bound; tokens from
//! the OAuth client's cache; Prometheus metrics.

mod access;
mod api;
pub mod authz;
mod call;
pub mod gateway;
pub mod jwks_host;
pub mod metrics;
pub mod rotation;
pub mod socket;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument as _;

use crate::error::InvalidSetting;
use crate::keyring::{Keyring, Origin, Purpose, SignEvent, SignObserver};
use crate::oauth::client::OAuthClient;
use authz::{Peer, Policy};
use metrics::Metrics;
use socket::SocketMode;

/// `[agent]` in the config (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    pub socket: Option<PathBuf>,
    /// Who may open the socket besides the agent's own uid (see `socket::SocketMode`).
    #[serde(default)]
    pub socket_mode: SocketMode,
    /// The socket's group (a name or a gid), with `socket_mode = "0660"`.
    pub socket_group: Option<String>,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Default: half of `max_connections` (at least 1).
    pub max_connections_per_uid: Option<usize>,
    /// Seconds a connection has to deliver a complete request head, from its opening or
    /// from the previous answer (so also the keep-alive idle limit).
    #[serde(default = "defaults::header_timeout_secs")]
    pub header_timeout_secs: u64,
    /// Seconds a request has to deliver its whole body once its head arrived.
    #[serde(default = "defaults::body_timeout_secs")]
    pub body_timeout_secs: u64,
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
    /// The largest answer `/v1/call` relays (a body, or all pages of a `paginate`).
    #[serde(default = "defaults::max_call_bytes")]
    pub max_call_bytes: usize,
    /// A loopback TCP address that also serves the gateway (`/gw/` only), for
    /// applications that cannot open a Unix socket; each connection's uid is looked up in
    /// the kernel's TCP table (`authz::Peer::of_tcp`).
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// Where the device runs: in signer processes (the default), or in this process.
    #[serde(default)]
    pub signers: Signers,
    /// Seconds a signer process may hold signatures without answering any before it is
    /// taken for hung (a module stuck in the device), killed and restarted; also how long
    /// a restarted one may take to open the device (plus 15 s), or to end when stopped.
    #[serde(default = "defaults::signer_timeout_secs")]
    pub signer_timeout_secs: u64,
}

/// `[agent] signers`: where the agent's device runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Signers {
    /// Child processes that open the module, log in and sign (`token::signer`): the
    /// agent never loads the module nor reads a PIN file, and a crashing module costs a
    /// restart of one process, not the agent.
    #[default]
    Processes,
    /// In the agent's own process, as the CLI does (one process to debug).
    InProcess,
}

mod defaults {
    pub fn max_connections() -> usize {
        256
    }
    pub fn header_timeout_secs() -> u64 {
        10
    }
    pub fn body_timeout_secs() -> u64 {
        10
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
    pub fn max_call_bytes() -> usize {
        8 * 1024 * 1024
    }
    pub fn signer_timeout_secs() -> u64 {
        30
    }
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            socket: None,
            socket_mode: SocketMode::default(),
            socket_group: None,
            max_connections: defaults::max_connections(),
            max_connections_per_uid: None,
            header_timeout_secs: defaults::header_timeout_secs(),
            body_timeout_secs: defaults::body_timeout_secs(),
            max_queue: defaults::max_queue(),
            max_body_bytes: defaults::max_body_bytes(),
            shutdown_grace_secs: defaults::shutdown_grace_secs(),
            async_threads: defaults::async_threads(),
            allow: Vec::new(),
            max_call_bytes: defaults::max_call_bytes(),
            gateway_listen: None,
            signers: Signers::default(),
            signer_timeout_secs: defaults::signer_timeout_secs(),
        }
    }
}

impl AgentSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let range = |key: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(InvalidSetting::new(
                    format!("agent.{key}"),
                    format!("{v} is out of range {lo} to {hi}"),
                ))
            }
        };
        range("max_connections", self.max_connections, 1, 65_536)?;
        range(
            "max_connections_per_uid",
            self.per_uid_cap(),
            1,
            self.max_connections,
        )?;
        let secs = |key: &str, v: u64| range(key, usize::try_from(v).unwrap_or(usize::MAX), 1, 300);
        secs("header_timeout_secs", self.header_timeout_secs)?;
        secs("body_timeout_secs", self.body_timeout_secs)?;
        self.socket_mode.check_group(self.socket_group.as_deref())?;
        range("max_queue", self.max_queue, 1, 1_000_000)?;
        range("max_body_bytes", self.max_body_bytes, 256, 16 << 20)?;
        range("async_threads", self.async_threads, 1, 64)?;
        range("max_call_bytes", self.max_call_bytes, 1024, 64 << 20)?;
        range(
            "signer_timeout_secs",
            usize::try_from(self.signer_timeout_secs).unwrap_or(usize::MAX),
            1,
            3600,
        )?;
        if let Some(addr) = self.gateway_listen
            && !(addr.is_ipv4() && addr.ip().is_loopback())
        {
            return Err(InvalidSetting::new(
                "agent.gateway_listen",
                format!(
                    "{addr} is not an IPv4 loopback address: the caller's uid is known only for \
                     connections from this host; use e.g. \"127.0.0.1:8787\""
                ),
            ));
        }
        Ok(())
    }

    /// Connections one uid may hold open at once.
    pub fn per_uid_cap(&self) -> usize {
        self.max_connections_per_uid
            .unwrap_or((self.max_connections / 2).max(1))
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(socket::default_path)
    }
}

/// Everything a request handler needs.
pub struct Agent {
    /// Keys, clients and the device, reached only with the request's `Caller`.
    access: access::Access,
    /// Signing requests in flight; `try_acquire` failing is the "queue full" answer.
    queue: Semaphore,
    settings: AgentSettings,
    authz: Policy,
    metrics: Arc<Metrics>,
    /// Open connections per uid, for `max_connections_per_uid`.
    per_uid: Mutex<HashMap<u32, usize>>,
    /// The hosted JWKS (`[jwks]`), reported in `/healthz` and `/metrics`.
    jwks: Option<Arc<jwks_host::JwksHost>>,
    /// What the rotation task knows of each slot (see `rotation`).
    rotation: rotation::Status,
    /// The audit trail (`[audit]`), reported in `/healthz` and `/metrics`.
    trail: Option<crate::trail::Trail>,
}

/// The signature observer the agent gives its keyring before any key is approved (the
/// OAuth clients' keys included): every signature counted in `metrics`, logged, and
/// recorded in the audit trail when there is one.
pub fn sign_observer(metrics: &Arc<Metrics>, trail: Option<crate::trail::Trail>) -> SignObserver {
    let metrics = metrics.clone();
    Arc::new(move |e: &SignEvent<'_>| {
        if let Some(trail) = &trail {
            trail.signature(e);
        }
        let outcome = if e.ok { "ok" } else { "error" };
        let micros = u64::try_from(e.took.as_micros()).unwrap_or(u64::MAX);
        match e.purpose {
            Purpose::Jws => {
                metrics.signature(e.label, e.alg.name(), outcome, e.took);
                tracing::info!(key = e.label, alg = %e.alg, micros, outcome, "signature");
            }
            Purpose::Possession => {
                metrics.possession_proof(e.label, outcome);
                tracing::info!(key = e.label, alg = %e.alg, micros, outcome, "proof of possession signed");
            }
        }
    })
}

impl Agent {
    /// `keyring` should already carry [`sign_observer`] of `metrics`.
    pub fn new(
        keyring: Keyring,
        clients: Vec<OAuthClient>,
        settings: AgentSettings,
        own_uid: u32,
        metrics: Arc<Metrics>,
    ) -> Result<Agent, InvalidSetting> {
        settings.validate()?;
        let names: Vec<&str> = clients.iter().map(|c| c.config().name.as_str()).collect();
        Policy::check_clients(&settings.allow, &names)?;
        let authz = Policy::new(settings.allow.clone(), own_uid);
        Ok(Agent {
            access: access::Access::new(keyring, clients),
            queue: Semaphore::new(settings.max_queue),
            settings,
            authz,
            metrics,
            per_uid: Mutex::new(HashMap::new()),
            jwks: None,
            rotation: rotation::Status::default(),
            trail: None,
        })
    }

    /// Serves `routes` at `/gw/<route>/` (the egress gateway, see `gateway`). A rule naming
    /// a route that is not among them is refused here, like an unknown client.
    pub fn with_routes(mut self, routes: Vec<gateway::Route>) -> Result<Agent, InvalidSetting> {
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        Policy::check_routes(&self.settings.allow, &names)?;
        for (i, r) in routes.iter().enumerate() {
            if let Some(n) = r.max_body_bytes
                && n > self.settings.max_body_bytes
            {
                return Err(InvalidSetting::new(
                    format!("route[{i}].max_body_bytes"),
                    format!(
                        "{n} exceeds agent.max_body_bytes ({}), which bounds every request; \
                         lower it or raise agent.max_body_bytes",
                        self.settings.max_body_bytes
                    ),
                ));
            }
        }
        self.access.set_routes(routes)?;
        Ok(self)
    }

    /// Reports `trail` in `/healthz` and `/metrics`; its observer and gate are the
    /// keyring's already (`sign_observer`, `Trail::gate`).
    pub fn with_trail(mut self, trail: Option<crate::trail::Trail>) -> Agent {
        if let Some((name, kid)) = trail.as_ref().map(|t| t.checkpoint_key()) {
            self.access.reserve_key(name, kid);
        }
        self.trail = trail;
        self
    }

    /// The audit trail, to record events in (`Trail::gateway`, `Trail::token_fetch`).
    pub fn trail(&self) -> Option<&crate::trail::Trail> {
        self.trail.as_ref()
    }

    /// Reports `host` in `/healthz` and `/metrics` (see [`jwks_host::refresh`]).
    pub fn with_jwks(mut self, host: Arc<jwks_host::JwksHost>) -> Agent {
        self.jwks = Some(host);
        self
    }

    /// A slot's rotation record changed (a step by this agent, by `keybound keys rotate`
    /// or by another agent on the token): forgets the cached keys, looks every client's
    /// keys up again, so the agent signs with the active generations from now on, and
    /// refreshes the hosted JWKS at once.
    pub async fn rotation_changed(&self) {
        self.access.forget_keys();
        if let Some(host) = &self.jwks {
            host.refresh_now();
        }
        for c in self.access.every_client() {
            c.note_cached_tokens();
            if let Err(e) = c.reresolve_keys().await {
                tracing::warn!(client = %c.config().name, "cannot look the client's keys up again after a rotation: {e}");
            }
        }
    }

    /// Signing requests queued or in progress.
    pub fn queue_depth(&self) -> usize {
        self.settings.max_queue - self.queue.available_permits()
    }
}

/// Serves `listener` until `shutdown` resolves; then stops accepting, lets in-flight
/// requests finish for up to `shutdown_grace_secs`, and returns.
pub async fn run(listener: UnixListener, agent: Arc<Agent>, shutdown: impl Future<Output = ()>) {
    run_with_tcp(listener, None, agent, shutdown).await;
}

/// A connection accepted on the socket or on `gateway_listen`.
enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// Accepts on `tcp`, or never when there is none.
async fn accept_tcp(tcp: Option<&TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match tcp {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// [`run`], and `gateway_listen`'s loopback TCP listener when given: each TCP connection's
/// uid is looked up in the kernel's TCP table ([`Peer::of_tcp`]) and the same rules apply;
/// only `/gw/` is served there ([`api::tcp_guard`]).
pub async fn run_with_tcp(
    listener: UnixListener,
    tcp: Option<TcpListener>,
    agent: Arc<Agent>,
    shutdown: impl Future<Output = ()>,
) {
    // One permit per open connection: at the limit the agent stops accepting and new
    // connections wait in the kernel's backlog.
    let connections = Arc::new(Semaphore::new(agent.settings.max_connections));
    let (stop, stopping) = watch::channel(false);
    let router = api::router(agent.clone());
    let tcp_door = tcp
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(api::Door::Tcp);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted.map(|(s, _)| Accepted::Unix(s)),
            accepted = accept_tcp(tcp.as_ref()) => accepted.map(Accepted::Tcp),
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        // Who the peer is, whether a rule names it and its uid's slot are settled in the
        // connection's own task: the TCP table is read off the runtime's threads, so a
        // flood on `gateway_listen` cannot hold up accepting on the socket.
        tokio::spawn(connection(
            agent.clone(),
            stream,
            permit,
            stopping.clone(),
            router.clone(),
            tcp_door,
        ));
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

/// One accepted connection: its peer, the rule that names it (none: closed, counted), its
/// uid's slot (none: closed, counted), then HTTP until it ends.
async fn connection(
    agent: Arc<Agent>,
    stream: Accepted,
    permit: tokio::sync::OwnedSemaphorePermit,
    stopping: watch::Receiver<bool>,
    router: axum::Router,
    tcp_door: Option<api::Door>,
) {
    let (stream, peer) = match stream {
        Accepted::Unix(s) => {
            let peer = Peer::of(&s);
            (Accepted::Unix(s), peer)
        }
        // `/proc/net/tcp` is read whole: a blocking read.
        Accepted::Tcp(s) => match tokio::task::spawn_blocking(move || {
            let peer = Peer::of_tcp(&s);
            (s, peer)
        })
        .await
        {
            Ok((s, peer)) => (Accepted::Tcp(s), peer),
            Err(e) => {
                tracing::warn!("looking up a TCP connection's owner failed, dropped: {e}");
                return;
            }
        },
    };
    let peer = match peer {
        Ok(peer) => peer,
        Err(e) => {
            tracing::warn!("no peer credentials on a connection, dropped: {e}");
            return;
        }
    };
    // A peer no rule names is closed before any HTTP is read: it holds no slot and
    // cannot starve the callers who are allowed.
    let caller = match agent.authz.caller(peer) {
        Ok(caller) => caller,
        Err(reason) => {
            let n = agent.metrics.refused(metrics::Refusal::NoRule);
            // Logged at 1, 2, 4, 8, ... refusals: a flood of connections cannot flood
            // the log; the metric counts every one.
            if n.is_power_of_two() {
                tracing::warn!(uid = peer.uid(), gid = peer.gid(), pid = ?peer.pid(), refused = n, "refused caller, connection closed: {reason}");
            }
            return;
        }
    };
    let Some(uid_slot) = UidSlot::take(&agent, peer.uid()) else {
        let n = agent.metrics.refused(metrics::Refusal::PerUidCap);
        if n.is_power_of_two() {
            tracing::warn!(
                uid = peer.uid(),
                pid = ?peer.pid(),
                refused = n,
                "uid {} already has {} connections open (agent.max_connections_per_uid); closing a new one",
                peer.uid(),
                agent.settings.per_uid_cap()
            );
        }
        return;
    };
    // Who signs what in the audit trail: the peer, and its executable read now.
    let origin = Arc::new(Origin {
        uid: peer.uid(),
        pid: peer.pid(),
        exe: match (peer.pid(), &agent.trail) {
            (Some(pid), Some(_)) => tokio::task::spawn_blocking(move || {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .ok()
                    .map(|p| p.display().to_string())
            })
            .await
            .ok()
            .flatten(),
            _ => None,
        },
    });
    let (tx, span) = (
        ConnectionTasks {
            stopping,
            header_timeout: Duration::from_secs(agent.settings.header_timeout_secs),
            uid_slot,
            permit,
        },
        tracing::info_span!("connection", uid = peer.uid()),
    );
    let door = match (&stream, tcp_door) {
        (Accepted::Unix(_), _) => api::Door::Socket,
        (Accepted::Tcp(_), Some(door)) => door,
        (Accepted::Tcp(_), None) => return,
    };
    let service = hyper::service::service_fn(move |request| {
        let (router, agent, caller, origin) = (
            router.clone(),
            agent.clone(),
            caller.clone(),
            origin.clone(),
        );
        async move {
            Ok::<_, std::convert::Infallible>(
                api::serve(router, agent, door, caller, origin, request).await,
            )
        }
    });
    match stream {
        Accepted::Unix(s) => tx.serve(s, service).instrument(span).await,
        Accepted::Tcp(s) => tx.serve(s, service).instrument(span).await,
    }
}

/// What a served connection holds until it ends.
struct ConnectionTasks {
    stopping: watch::Receiver<bool>,
    header_timeout: Duration,
    uid_slot: UidSlot,
    permit: tokio::sync::OwnedSemaphorePermit,
}

impl ConnectionTasks {
    /// Serves HTTP/1.1 on `stream` until it ends or the agent stops.
    async fn serve<S, T>(mut self, stream: S, service: T)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: hyper::service::Service<
                hyper::Request<hyper::body::Incoming>,
                Response = axum::response::Response,
            > + Send
            + 'static,
        T::Future: Send + 'static,
        T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // Also the keep-alive idle limit: hyper restarts it for every request.
            .header_read_timeout(self.header_timeout)
            // A client may shut down its write side after a request and still read the
            // answer.
            .half_close(true)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
            }
            _ = self.stopping.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
        drop(self.uid_slot);
        drop(self.permit);
    }
}

/// One open connection counted against its uid; dropping it gives the slot back.
struct UidSlot {
    agent: Arc<Agent>,
    uid: u32,
}

impl UidSlot {
    fn take(agent: &Arc<Agent>, uid: u32) -> Option<UidSlot> {
        let mut open = agent.per_uid.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(uid).or_default();
        if *n >= agent.settings.per_uid_cap() {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            agent: agent.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut open = self
            .agent
            .per_uid
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
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
