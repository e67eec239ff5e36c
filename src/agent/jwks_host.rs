//! The hosted JWKS (`[jwks]`): `GET /.well-known/jwks.json` on a TCP listener of its own,
//! plain or TLS, for an authorization server that fetches the client's keys from a URL
//! (Okta's "Use a URL to fetch keys dynamically"). Nothing else is on that listener.
//!
//! Requests only read a snapshot: the document is [`Inventory::jwks`] as a background task
//! last computed it (every `refresh_secs`, or at once after [`JwksHost::refresh_now`]), so
//! an unauthenticated client can never make the device work, let alone sign a proof of
//! possession. While the device is away the last good document stays published, and
//! `/healthz` and `/metrics` say it is stale.
//!
//! [`Inventory::jwks`]: crate::keyring::Inventory::jwks

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use base64::Engine as _;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use super::Agent;
use crate::error::InvalidSetting;
use crate::token::trust::{self, Owners};

/// The one path this listener serves (RFC 8414 §2 `jwks_uri`, as Okta's URL mode fetches).
pub const PATH: &str = "/.well-known/jwks.json";

/// Open connections at most; more wait in the kernel's backlog. Fetchers of a JWKS are a
/// handful of servers polling every few minutes, not a crowd.
const MAX_CONNECTIONS: usize = 64;
/// Connections one address may hold open at once: a server fetching the JWKS needs one
/// or two, and one address cannot take every slot.
const MAX_PER_ADDRESS: usize = 8;
/// The longest a connection stays open, keep-alive included: a client that keeps its
/// connections busy with requests still gives its slots back.
const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// Seconds a connection (or its TLS handshake) has to deliver a complete request head; also
/// the keep-alive idle limit.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's read buffer, and so the largest request head: a GET with a few headers fits in
/// far less.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Before the first document, failed audits are retried at least this often (and 503
/// answers say `Retry-After` this long at most).
const FIRST_RETRY: Duration = Duration::from_secs(5);

/// The longest `max_age_secs` accepted: a day.
const MAX_MAX_AGE_SECS: u64 = 86_400;

/// `[jwks]` in the config (see keybound.example.toml). The section's presence enables the
/// listener; `listen` is then required.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksSettings {
    /// `IP:port` to listen on, e.g. `127.0.0.1:8087`.
    pub listen: String,
    /// PEM certificate chain for TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the web server (not a client key), checked like the PIN file.
    pub tls_key: Option<PathBuf>,
    /// `Cache-Control: max-age`, before the rotation schedule's bound ([`Self::max_age`]).
    #[serde(default = "defaults::max_age_secs")]
    pub max_age_secs: u64,
    /// How often the agent audits the keys again for the published document.
    #[serde(default = "defaults::refresh_secs")]
    pub refresh_secs: u64,
    /// The keys (labels or rotated slots) to publish; default: every `[[client]]`'s
    /// `assertion_key`. Never list a DPoP key: Okta refuses proofs signed by a key
    /// registered for client authentication.
    pub keys: Option<Vec<String>>,
}

mod defaults {
    pub fn max_age_secs() -> u64 {
        300
    }
    pub fn refresh_secs() -> u64 {
        60
    }
}

impl JwksSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.addr()?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(InvalidSetting::new(
                    "jwks.tls_key",
                    "missing: tls_cert is set; set both tls_cert and tls_key, or neither for plain HTTP behind a reverse proxy",
                ));
            }
            (None, Some(_)) => {
                return Err(InvalidSetting::new(
                    "jwks.tls_cert",
                    "missing: tls_key is set; set both tls_cert and tls_key, or neither for plain HTTP behind a reverse proxy",
                ));
            }
            _ => {}
        }
        for (key, path) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(InvalidSetting::new(
                    format!("jwks.{key}"),
                    format!(
                        "'{}' is relative; give an absolute path (a relative one would follow the working directory)",
                        path.display()
                    ),
                ));
            }
        }
        if self.max_age_secs > MAX_MAX_AGE_SECS {
            return Err(InvalidSetting::new(
                "jwks.max_age_secs",
                format!(
                    "{} is out of range 0 to {MAX_MAX_AGE_SECS}",
                    self.max_age_secs
                ),
            ));
        }
        if !(1..=3600).contains(&self.refresh_secs) {
            return Err(InvalidSetting::new(
                "jwks.refresh_secs",
                format!("{} is out of range 1 to 3600", self.refresh_secs),
            ));
        }
        Ok(())
    }

    /// The listen address.
    pub fn addr(&self) -> Result<SocketAddr, InvalidSetting> {
        self.listen.parse().map_err(|_| {
            InvalidSetting::new(
                "jwks.listen",
                format!(
                    "'{}' is not an IP address and port; write e.g. \"127.0.0.1:8087\" or \"[::1]:8087\"",
                    self.listen
                ),
            )
        })
    }

    /// `Cache-Control: max-age` in seconds: `max_age_secs`, and never longer than the
    /// rotation schedule's `publish_lead`, so that a fetcher's cached copy cannot outlive
    /// the lead a prepared key is published before it signs.
    pub fn max_age(&self, publish_lead: Option<Duration>) -> u64 {
        match publish_lead {
            Some(lead) => self.max_age_secs.min(lead.as_secs()),
            None => self.max_age_secs,
        }
    }

    /// TLS when `tls_cert` and `tls_key` are set: both read and checked now (at start).
    pub fn tls(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let certs = read_certs(cert)?;
        let key = read_key(key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("jwks: cannot set up TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "jwks.tls_cert/jwks.tls_key: the certificate and key do not make a TLS server identity: {e}"
                )
            })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}

/// The certificate chain, PEM. A certificate is public: it must only be a readable file.
fn read_certs(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject as _;
    let err = |reason: String| format!("jwks.tls_cert: cannot use {}: {reason}", path.display());
    let (mut file, _) = trust::open_regular(path, false).map_err(err)?;
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(|e| err(e.to_string()))?;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "it holds no PEM CERTIFICATE block; give the server certificate (then its chain)"
                .into(),
        ));
    }
    Ok(certs)
}

/// The web server's private key, PEM, checked like the PIN file: a regular file (no
/// symbolic link), owned by the agent's user, no access for group or others, in
/// directories no other user can write. The opened file is the one checked and read.
fn read_key(path: &Path) -> Result<rustls_pki_types::PrivateKeyDer<'static>, String> {
    use rustls_pki_types::pem::PemObject as _;
    let err = |reason: String| format!("jwks.tls_key: cannot use {}: {reason}", path.display());
    let (mut file, meta) = trust::open_regular(path, true).map_err(err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "group or others may access it (mode {mode:o}); run: chmod 600 {}",
            path.display()
        )));
    }
    trust::check_file(path, &meta, Owners::User).map_err(err)?;
    trust::check_dirs_of(path, &meta).map_err(err)?;
    let mut pem = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut pem).map_err(|e| err(e.to_string()))?;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        err(format!(
            "no PEM private key in it ({e}); give a PKCS#8, SEC1 or PKCS#1 key"
        ))
    })
}

/// Binds `listen` (before the agent says it is ready): the error names the setting, the
/// address and the system's reason. Needs the async runtime.
fn bind(settings: &JwksSettings) -> Result<TcpListener, String> {
    let addr = settings.addr().map_err(|e| e.to_string())?;
    let fail = |e: std::io::Error| format!("jwks.listen: cannot listen on {addr}: {e}");
    let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    TcpListener::from_std(listener).map_err(fail)
}

/// The hosted JWKS, bound and ready to start: `keybound serve` binds it before it says it
/// is ready, gives [`Hosted::host`] to the agent ([`Agent::with_jwks`]), then
/// [`Hosted::spawn`]s it.
pub struct Hosted {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    host: Arc<JwksHost>,
    url: String,
}

impl Hosted {
    /// Binds `settings.listen` with `tls` ([`JwksSettings::tls`], read before); `max_age`
    /// from [`JwksSettings::max_age`].
    pub fn bind(
        settings: &JwksSettings,
        tls: Option<tokio_rustls::TlsAcceptor>,
        max_age: u64,
    ) -> Result<Hosted, String> {
        let listener = bind(settings)?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("jwks.listen: no local address: {e}"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Hosted {
            listener,
            tls,
            host: Arc::new(JwksHost::new(settings, addr, max_age)),
            url: format!("{scheme}://{addr}{PATH}"),
        })
    }

    pub fn host(&self) -> Arc<JwksHost> {
        self.host.clone()
    }

    /// The document's URL on the bound address (port 0 resolved).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Starts the refresher and the listener; both end when `stop` turns true.
    pub fn spawn(
        self,
        agent: &Arc<Agent>,
        stop: &watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(refresh(agent.clone(), self.host.clone(), stop.clone())),
            tokio::spawn(run(self.listener, self.tls, self.host, stop.clone())),
        ]
    }
}

/// What the listener serves, and how the refreshes went.
pub struct JwksHost {
    /// Where it listens (the bound address: port 0 resolved), for `/healthz`.
    listen: SocketAddr,
    max_age: u64,
    refresh: Duration,
    /// Wakes the refresher before its next turn (after a rotation step).
    wake: Notify,
    state: Mutex<State>,
    refresh_failures: AtomicU64,
    /// Answers by status: 200, 304, 404, 405, 400 or 413, 503.
    requests: [AtomicU64; STATUSES.len()],
}

/// The statuses the listener answers with, in the order of [`JwksHost::requests`].
const STATUSES: [u16; 7] = [200, 304, 400, 404, 405, 413, 503];

#[derive(Default)]
struct State {
    /// The last good document, once there is one.
    published: Option<Published>,
    /// Why the last refresh failed; `None` once one succeeds again.
    last_error: Option<String>,
}

struct Published {
    body: Bytes,
    /// Strong validator (RFC 9110 §8.8.3): base64url SHA-256 of the body, quoted.
    etag: HeaderValue,
    keys: usize,
    /// When the audit that made it finished.
    at: SystemTime,
    since: Instant,
}

impl JwksHost {
    /// `listen` is the address the listener is bound to; `max_age` from
    /// [`JwksSettings::max_age`].
    pub fn new(settings: &JwksSettings, listen: SocketAddr, max_age: u64) -> JwksHost {
        JwksHost {
            listen,
            max_age,
            refresh: Duration::from_secs(settings.refresh_secs),
            wake: Notify::new(),
            state: Mutex::new(State::default()),
            refresh_failures: AtomicU64::new(0),
            requests: Default::default(),
        }
    }

    /// Asks for a new audit now (e.g. after a rotation step), without waiting for it.
    pub fn refresh_now(&self) {
        self.wake.notify_one();
    }

    /// How long until the next refresh: `refresh_secs`, or sooner while nothing was
    /// published yet.
    fn next_wait(&self) -> Duration {
        match self.state().published {
            Some(_) => self.refresh,
            None => self.first_wait(),
        }
    }

    fn first_wait(&self) -> Duration {
        self.refresh.min(FIRST_RETRY)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the result of one refresh.
    fn record(&self, result: Result<Value, String>) {
        match result {
            Ok(jwks) => {
                let keys = jwks["keys"].as_array().map_or(0, Vec::len);
                let body = Bytes::from(jwks.to_string());
                let digest = Sha256::digest(&body);
                let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
                // base64url characters are all valid in a header value.
                let Ok(etag) = HeaderValue::from_str(&format!("\"{tag}\"")) else {
                    return;
                };
                let mut state = self.state();
                state.published = Some(Published {
                    body,
                    etag,
                    keys,
                    at: SystemTime::now(),
                    since: Instant::now(),
                });
                state.last_error = None;
            }
            Err(reason) => {
                self.refresh_failures.fetch_add(1, Ordering::Relaxed);
                self.state().last_error = Some(reason);
            }
        }
    }

    fn count(&self, status: StatusCode) {
        if let Some(i) = STATUSES.iter().position(|s| *s == status.as_u16()) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `jwks` object of `/healthz`.
    pub fn health(&self) -> Value {
        let state = self.state();
        let published = state.published.as_ref();
        json!({
            "listen": self.listen.to_string(),
            "keys": published.map(|p| p.keys),
            "age_secs": published.map(|p| p.since.elapsed().as_secs()),
            // The document is older than the last refresh (or there is none yet).
            "stale": published.is_none() || state.last_error.is_some(),
            "last_error": state.last_error,
        })
    }

    /// The `keybound_jwks_*` series of `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        let head = |name: &str, kind: &str, help: &str, out: &mut String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let (keys, at) = {
            let state = self.state();
            let p = state.published.as_ref();
            (
                p.map_or(0, |p| p.keys),
                p.and_then(|p| p.at.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs()),
            )
        };
        head(
            "keybound_jwks_published_keys",
            "gauge",
            "Keys in the JWKS the hosted listener serves.",
            out,
        );
        let _ = writeln!(out, "keybound_jwks_published_keys {keys}");
        head(
            "keybound_jwks_last_success_timestamp_seconds",
            "gauge",
            "When the served JWKS was last computed from the device (Unix time; 0: never).",
            out,
        );
        let _ = writeln!(out, "keybound_jwks_last_success_timestamp_seconds {at}");
        head(
            "keybound_jwks_refresh_failures_total",
            "counter",
            "Refreshes of the hosted JWKS that failed (the last good one stays served).",
            out,
        );
        let _ = writeln!(
            out,
            "keybound_jwks_refresh_failures_total {}",
            self.refresh_failures.load(Ordering::Relaxed)
        );
        head(
            "keybound_jwks_requests_total",
            "counter",
            "Requests to the hosted JWKS listener by status.",
            out,
        );
        for (status, n) in STATUSES.iter().zip(&self.requests) {
            let _ = writeln!(
                out,
                "keybound_jwks_requests_total{{status=\"{status}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }

    /// The answer to one request: only [`PATH`], only GET and HEAD, no body.
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let r = self.route(request);
        self.count(r.status());
        r
    }

    fn route(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.uri().path() != PATH {
            return plain(
                StatusCode::NOT_FOUND,
                "not found; the JWKS is at /.well-known/jwks.json\n",
            );
        }
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => {
                let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                return r;
            }
        };
        // No request here has a body; one that announces one is not read, and the
        // connection is closed after the answer.
        let headers = request.headers();
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
        if declared || headers.contains_key(header::TRANSFER_ENCODING) {
            let mut r = plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "a JWKS request has no body\n",
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        let state = self.state();
        let Some(published) = &state.published else {
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the keys have not been read from the device yet; try again later\n",
            );
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.first_wait().as_secs().max(1)),
            );
            return r;
        };
        let fresh = headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .any(|v| matches_etag(v, &published.etag));
        let (status, body) = match (fresh, head) {
            (true, _) => (StatusCode::NOT_MODIFIED, Bytes::new()),
            (false, true) => (StatusCode::OK, Bytes::new()),
            (false, false) => (StatusCode::OK, published.body.clone()),
        };
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(header::ETAG, published.etag.clone());
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_str(&format!("public, max-age={}", self.max_age))
                .unwrap_or_else(|_| HeaderValue::from_static("no-cache")),
        );
        if status == StatusCode::OK {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            // HEAD: the length GET would send (hyper leaves an explicit one alone).
            h.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(published.body.len()),
            );
        }
        r
    }
}

/// RFC 9110 §13.1.2: `If-None-Match` is `*` or a list of entity tags, compared weakly
/// (a `W/` prefix is ignored).
fn matches_etag(value: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Keeps the published document current: one audit now, then one every `refresh_secs` or
/// when [`JwksHost::refresh_now`] asks, until `stop` turns true.
async fn refresh(agent: Arc<Agent>, host: Arc<JwksHost>, mut stop: watch::Receiver<bool>) {
    loop {
        let result = agent.access.audit_for_publishing().await;
        if let Err(reason) = &result {
            tracing::warn!(
                "hosted JWKS not refreshed, the last good one stays published: {reason}"
            );
        }
        host.record(result);
        tokio::select! {
            _ = tokio::time::sleep(host.next_wait()) => {}
            _ = host.wake.notified() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// Serves the listener until `stop` turns true; connections in flight are then closed
/// gracefully (they only ever wait for the client).
async fn run(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    host: Arc<JwksHost>,
    mut stop: watch::Receiver<bool>,
) {
    // One permit per open connection: at the cap, new ones wait in the backlog.
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: PerAddress = Arc::default();
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("jwks listener: accept failed: {e}");
                    continue;
                }
            },
        };
        let Some(slot) = AddressSlot::take(&per_address, peer.ip()) else {
            tracing::debug!(%peer, "jwks listener: {MAX_PER_ADDRESS} connections from this address already; closed");
            continue;
        };
        let host = host.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_connection(stream, host, stop).await,
                Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(stream, host, stop).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "jwks listener: TLS handshake failed: {e}")
                    }
                    Err(_) => tracing::debug!(%peer, "jwks listener: TLS handshake timed out"),
                },
            }
            drop(permit);
        });
    }
}

type PerAddress = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One open connection counted against its address; dropping it gives the slot back.
struct AddressSlot {
    open: PerAddress,
    ip: std::net::IpAddr,
}

impl AddressSlot {
    fn take(open: &PerAddress, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut map = open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(ip).or_default();
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            open: open.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn serve_connection<S>(stream: S, host: Arc<JwksHost>, mut stop: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let r = host.answer(&request);
        async move { Ok::<_, std::convert::Infallible>(r) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("jwks connection ended: {e}");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
        }
        _ = tokio::time::sleep(MAX_CONNECTION_LIFE) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<JwksSettings, String> {
        let s: JwksSettings = toml::from_str(text).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn settings_are_checked_at_load() {
        let s = settings("listen = \"127.0.0.1:8087\"").expect("minimal");
        assert_eq!((s.max_age_secs, s.refresh_secs), (300, 60));
        let bad = |text: &str, key: &str| {
            let e = settings(text).expect_err(text);
            assert!(e.contains(key), "{text}: {e}");
        };
        bad("listen = \"localhost:8087\"", "jwks.listen");
        bad("listen = \"127.0.0.1\"", "jwks.listen");
        bad(
            "listen = \"127.0.0.1:1\"\ntls_cert = \"/c.pem\"",
            "jwks.tls_key",
        );
        bad(
            "listen = \"127.0.0.1:1\"\ntls_key = \"/k.pem\"",
            "jwks.tls_cert",
        );
        bad(
            "listen = \"127.0.0.1:1\"\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"",
            "jwks.tls_cert",
        );
        bad(
            "listen = \"127.0.0.1:1\"\nmax_age_secs = 86401",
            "jwks.max_age_secs",
        );
        bad(
            "listen = \"127.0.0.1:1\"\nrefresh_secs = 0",
            "jwks.refresh_secs",
        );
        bad(
            "listen = \"127.0.0.1:1\"\nrefresh_secs = 3601",
            "jwks.refresh_secs",
        );
    }

    /// The commented `[jwks]` of keybound.example.toml, uncommented, is a valid section
    /// naming every setting.
    #[test]
    fn the_example_config_documents_every_setting() {
        let example = include_str!("../../keybound.example.toml");
        let (_, section) = example
            .split_once("\n# [jwks]\n")
            .expect("a [jwks] section");
        let lines: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .collect();
        let s = settings(&lines.join("\n")).expect("the example [jwks] is valid");
        assert!(s.tls_cert.is_some() && s.tls_key.is_some());
        assert_eq!(s.keys, Some(vec!["client-auth".to_string()]));
        assert_eq!(lines.len(), 6, "{lines:?}");
    }

    #[test]
    fn max_age_is_bounded_by_the_publish_lead() {
        let s = settings("listen = \"127.0.0.1:1\"\nmax_age_secs = 600").expect("valid");
        assert_eq!(s.max_age(None), 600);
        assert_eq!(s.max_age(Some(Duration::from_secs(120))), 120);
        assert_eq!(s.max_age(Some(Duration::from_secs(3600))), 600);
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = HeaderValue::from_static("\"abc\"");
        let m = |v: &'static str| matches_etag(&HeaderValue::from_static(v), &etag);
        assert!(m("\"abc\""));
        assert!(m("W/\"abc\""));
        assert!(m("\"x\", \"abc\""));
        assert!(m("*"));
        assert!(!m("\"abd\""));
        assert!(!m("abc"));
    }
}
