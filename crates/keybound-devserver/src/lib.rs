//! keybound-devserver: a strict Okta-like authorization and resource server for developing
//! and testing keybound. Not an authorization server for production, and not part of the
//! product: keybound's own build does not depend on this crate (only its tests do).
//!
//! The authorization server (`token_endpoint`) grants `client_credentials` to one client that
//! authenticates with `private_key_jwt` (RFC 7523, `assertion`) and binds its token with DPoP
//! (RFC 9449, `dpop`), server nonces included (`nonce`). The resource server (`api`) serves an
//! in-memory Okta users API (`users`) to DPoP-bound access tokens (`access_token`). Every
//! signature is checked with RustCrypto in `verify`; this crate does not depend on keybound.
//!
//! For tests the server's clock can run off (`Settings::clock_offset_secs`): everything it
//! does with time reads [`App::now`], and its `Date` header says that same clock.

#![forbid(unsafe_code)]

mod access_token;
mod api;
mod assertion;
mod background;
mod client_keys;
mod dpop;
mod nonce;
mod replay;
mod token_endpoint;
mod users;
mod verify;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::RngCore as _;
use serde_json::json;
use tokio::net::TcpListener;
use url::Url;

pub use self::background::Background;
use self::client_keys::ClientKeys;
use self::nonce::NonceRing;
use self::replay::ReplayCache;
use self::verify::SigAlg;

/// Scopes granted to the client unless the settings say otherwise.
pub const DEFAULT_SCOPES: [&str; 2] = ["okta.users.read", "okta.users.manage"];
/// Access-token lifetime in seconds (Okta's default for the org authorization server).
pub const DEFAULT_TOKEN_LIFETIME: u64 = 3600;
/// Longest access-token lifetime the settings accept (Okta's maximum, one day).
pub const MAX_TOKEN_LIFETIME: u64 = 86_400;
/// Generated users unless the settings say otherwise.
pub const DEFAULT_USERS: usize = 7;
/// Most users the dev-server generates.
pub const MAX_USERS: usize = 10_000;
/// Largest clock offset the settings accept, seconds (one year either way).
pub const MAX_CLOCK_OFFSET: i64 = 366 * 86_400;
/// Fewest seconds between two JWKS fetches an unknown `kid` causes, unless the settings say
/// otherwise.
pub const DEFAULT_JWKS_REFETCH_INTERVAL: u64 = 10;
/// Longest JWKS refetch interval the settings accept, seconds.
pub const MAX_JWKS_REFETCH_INTERVAL: u64 = 3600;

const TOKEN_PATH: &str = "/oauth2/v1/token";
const KEYS_PATH: &str = "/oauth2/v1/keys";
const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";
const USERS_PATH: &str = "/api/v1/users";
const API_PREFIX: &str = "/api/";
const STATS_PATH: &str = "/dev/stats";
/// Live `jti` entries per replay cache; beyond this, requests are refused, not forgotten.
const REPLAY_CAPACITY: usize = 100_000;

/// Where the client's public keys come from.
#[derive(Clone, Debug)]
pub enum JwksSource {
    /// A JWKS file, as `keybound jwks` prints it ("paste this JWKS"): read at start, and
    /// again whenever it changed, so that rewriting it adds and removes keys. A file that
    /// became unusable keeps the last good keys.
    File(PathBuf),
    /// A JWKS URL ("Use a URL to fetch keys dynamically"): fetched at start, again once the
    /// response's `Cache-Control: max-age` has passed (bounded to 0..=3600 s, 300 s when
    /// absent), with `If-None-Match`, and again when an assertion names an unknown `kid`
    /// (at most once per [`Settings::jwks_refetch_interval`]).
    Uri(Url),
}

/// What the dev-server accepts and grants.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The one OAuth client: `iss` and `sub` of its client assertions.
    pub client_id: String,
    /// The client's registered public keys.
    pub jwks: JwksSource,
    /// URL mode: fewest seconds between two fetches an unknown `kid` causes, and between
    /// retries of a failed fetch (0 to 3600).
    pub jwks_refetch_interval: u64,
    /// Scopes the client may request.
    pub granted_scopes: Vec<String>,
    /// Access-token lifetime in seconds (1 to 86400).
    pub token_lifetime: u64,
    /// How many users the users API holds.
    pub users: usize,
    /// Status of the resource server's `use_dpop_nonce` challenge: 401 (RFC 9449 §9) or 400
    /// (what Okta sends).
    pub rs_nonce_status: u16,
    /// For tests: how far the server's clock runs ahead of the machine's (negative: behind),
    /// in seconds. It shifts the `Date` header, every `iat`/`exp` check, the access tokens'
    /// `iat`/`exp` and nonce rotation alike.
    pub clock_offset_secs: i64,
    /// Every request's method, path, query and credentials headers, for tests that check
    /// what a client sent (a gateway must send its own token, and nothing it refused).
    pub requests: RequestLog,
}

/// What the dev-server was sent, in order (at most [`RequestLog::CAPACITY`] requests).
#[derive(Clone, Debug, Default)]
pub struct RequestLog(Arc<Mutex<Vec<SeenRequest>>>);

/// One request as the dev-server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The whole `Authorization` header (a test server's own tokens).
    pub authorization: Option<String>,
    /// Whether a `DPoP` header came.
    pub dpop: bool,
    /// The names of every header that came, lower-case, in order (values left out).
    pub header_names: Vec<String>,
}

impl RequestLog {
    pub const CAPACITY: usize = 10_000;

    /// The requests so far.
    pub fn snapshot(&self) -> Vec<SeenRequest> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, seen: SeenRequest) {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() < Self::CAPACITY {
            log.push(seen);
        }
    }
}

/// The dev-server's URLs, all under `http://127.0.0.1:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// The issuer: `iss` and `aud` of access tokens.
    pub issuer: String,
    /// The token endpoint: the `aud` of client assertions and the `htu` of token proofs.
    pub token: String,
    /// The access-token signing keys.
    pub jwks: String,
    /// RFC 8414 authorization-server metadata.
    pub metadata: String,
    /// The users collection of the resource server.
    pub users: String,
}

/// Why the dev-server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    #[error("the client id is empty; pass the OAuth client id the assertions will name")]
    EmptyClientId,
    #[error("no scopes are granted; grant at least one, e.g. okta.users.read")]
    NoScopes,
    #[error("scope '{0}' is not a valid scope token (RFC 6749 §3.3)")]
    BadScope(String),
    #[error("token lifetime {0} s is out of range: use 1 to {MAX_TOKEN_LIFETIME} seconds")]
    BadLifetime(u64),
    #[error("{0} users are too many; the dev-server generates at most {MAX_USERS}")]
    TooManyUsers(usize),
    #[error("resource-server nonce status {0} is not supported; use 401 or 400")]
    BadNonceStatus(u16),
    #[error(
        "clock offset {0} s is out of range: use -{MAX_CLOCK_OFFSET} to {MAX_CLOCK_OFFSET} seconds"
    )]
    BadClockOffset(i64),
    #[error(
        "JWKS refetch interval {0} s is out of range: use 0 to {MAX_JWKS_REFETCH_INTERVAL} seconds"
    )]
    BadRefetchInterval(u64),
    #[error("the listener is bound to {0}; the dev-server serves on 127.0.0.1 only")]
    NotLoopback(SocketAddr),
    #[error("cannot read the listener's address: {0}")]
    Listener(std::io::Error),
    #[error("cannot read the client JWKS file {}: {reason}", .path.display())]
    JwksRead { path: PathBuf, reason: String },
    #[error("cannot fetch the client JWKS from {url}: {reason}")]
    JwksFetch { url: Url, reason: String },
    #[error("the client JWKS from {origin} is not usable: {reason}")]
    JwksInvalid { origin: String, reason: String },
    #[error("cannot build the HTTP client for the JWKS URI: {0}")]
    HttpClient(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("cannot make the access-token signing key: {0}")]
    IssuerKey(String),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot run the dev-server thread: {0}")]
    Thread(std::io::Error),
}

/// A dev-server with its keys loaded and its listener bound, not yet serving. Split from
/// [`run`] so the CLI can refuse a bad JWKS before it announces anything.
pub struct DevServer {
    listener: TcpListener,
    app: Arc<App>,
}

/// State shared by all requests.
struct App {
    endpoints: Endpoints,
    client_id: String,
    granted_scopes: Vec<String>,
    token_lifetime: i64,
    rs_nonce_status: StatusCode,
    /// Seconds the server's clock runs ahead of the machine's (`Settings::clock_offset_secs`).
    clock_offset: i64,
    client_keys: ClientKeys,
    issuer: access_token::Issuer,
    as_nonce: NonceRing,
    rs_nonce: NonceRing,
    /// Client-assertion `jti`s, until the assertion's `exp`.
    assertion_jtis: ReplayCache,
    /// DPoP proof `jti`s per key thumbprint, until the proof's `iat` leaves the window.
    proof_jtis: ReplayCache,
    /// `Mutex`: held for a lookup or an update, never across `.await`.
    users: Mutex<users::Directory>,
    stats: Stats,
    requests: RequestLog,
}

/// What the dev-server was asked, for tests that count requests (`GET /dev/stats`): how
/// many token requests and nonce challenges a number of clients cost together.
#[derive(Default)]
struct Stats {
    /// Requests to the token endpoint, whatever their answer.
    token_requests: AtomicU64,
    /// Tokens granted (200 from the token endpoint).
    tokens_issued: AtomicU64,
    /// `use_dpop_nonce` answers of the token endpoint.
    as_nonce_challenges: AtomicU64,
    /// Requests to the users API, whatever their answer.
    api_requests: AtomicU64,
    /// `use_dpop_nonce` answers of the users API.
    rs_nonce_challenges: AtomicU64,
}

impl Stats {
    fn count(&self, path: &str, status: u16, refusal: Option<&str>) {
        let nonce = refusal == Some("use_dpop_nonce");
        let add = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        if path == TOKEN_PATH {
            add(&self.token_requests);
            if status == 200 {
                add(&self.tokens_issued);
            }
            if nonce {
                add(&self.as_nonce_challenges);
            }
        } else if path.starts_with(API_PREFIX) {
            add(&self.api_requests);
            if nonce {
                add(&self.rs_nonce_challenges);
            }
        }
    }

    fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "token_requests": get(&self.token_requests),
            "tokens_issued": get(&self.tokens_issued),
            "as_nonce_challenges": get(&self.as_nonce_challenges),
            "api_requests": get(&self.api_requests),
            "rs_nonce_challenges": get(&self.rs_nonce_challenges),
        })
    }
}

/// Attached to a refused response so that the request log can name the error.
#[derive(Clone, Debug)]
struct Refusal {
    code: &'static str,
    description: String,
}

impl Settings {
    /// Settings with the defaults: both Okta user scopes, 3600 s tokens, 7 users, 401.
    pub fn new(client_id: impl Into<String>, jwks: JwksSource) -> Settings {
        Settings {
            client_id: client_id.into(),
            jwks,
            jwks_refetch_interval: DEFAULT_JWKS_REFETCH_INTERVAL,
            granted_scopes: DEFAULT_SCOPES.map(String::from).to_vec(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            users: DEFAULT_USERS,
            rs_nonce_status: 401,
            clock_offset_secs: 0,
            requests: RequestLog::default(),
        }
    }

    fn validate(&self) -> Result<(), DevServerError> {
        if self.client_id.trim().is_empty() {
            return Err(DevServerError::EmptyClientId);
        }
        if self.granted_scopes.is_empty() {
            return Err(DevServerError::NoScopes);
        }
        // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        let scope_char = |c: char| matches!(c, '\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e');
        if let Some(bad) = self
            .granted_scopes
            .iter()
            .find(|s| s.is_empty() || !s.chars().all(scope_char))
        {
            return Err(DevServerError::BadScope(bad.clone()));
        }
        if !(1..=MAX_TOKEN_LIFETIME).contains(&self.token_lifetime) {
            return Err(DevServerError::BadLifetime(self.token_lifetime));
        }
        if self.users > MAX_USERS {
            return Err(DevServerError::TooManyUsers(self.users));
        }
        if !matches!(self.rs_nonce_status, 400 | 401) {
            return Err(DevServerError::BadNonceStatus(self.rs_nonce_status));
        }
        if !(-MAX_CLOCK_OFFSET..=MAX_CLOCK_OFFSET).contains(&self.clock_offset_secs) {
            return Err(DevServerError::BadClockOffset(self.clock_offset_secs));
        }
        if self.jwks_refetch_interval > MAX_JWKS_REFETCH_INTERVAL {
            return Err(DevServerError::BadRefetchInterval(
                self.jwks_refetch_interval,
            ));
        }
        Ok(())
    }
}

impl Endpoints {
    fn new(port: u16) -> Endpoints {
        let issuer = format!("http://127.0.0.1:{port}");
        Endpoints {
            token: format!("{issuer}{TOKEN_PATH}"),
            jwks: format!("{issuer}{KEYS_PATH}"),
            metadata: format!("{issuer}{METADATA_PATH}"),
            users: format!("{issuer}{USERS_PATH}"),
            issuer,
        }
    }
}

impl DevServer {
    /// Checks the settings, loads the client's JWKS and makes the access-token key.
    /// The listener must be bound to 127.0.0.1.
    pub async fn new(
        listener: TcpListener,
        settings: Settings,
    ) -> Result<DevServer, DevServerError> {
        let addr = listener.local_addr().map_err(DevServerError::Listener)?;
        if addr.ip() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
            return Err(DevServerError::NotLoopback(addr));
        }
        settings.validate()?;
        let endpoints = Endpoints::new(addr.port());
        let client_keys = ClientKeys::load(
            settings.jwks,
            std::time::Duration::from_secs(settings.jwks_refetch_interval),
        )
        .await?;
        let now = unix_now() + settings.clock_offset_secs;
        let random = |e: rand_core::Error| DevServerError::Random(e.to_string());
        let app = App {
            issuer: access_token::Issuer::generate(&endpoints.issuer)
                .map_err(DevServerError::IssuerKey)?,
            users: Mutex::new(users::Directory::generate(settings.users, &endpoints.users)),
            client_id: settings.client_id,
            granted_scopes: settings.granted_scopes,
            token_lifetime: i64::try_from(settings.token_lifetime)
                .map_err(|_| DevServerError::BadLifetime(settings.token_lifetime))?,
            rs_nonce_status: StatusCode::from_u16(settings.rs_nonce_status)
                .map_err(|_| DevServerError::BadNonceStatus(settings.rs_nonce_status))?,
            clock_offset: settings.clock_offset_secs,
            client_keys,
            as_nonce: NonceRing::new(now).map_err(random)?,
            rs_nonce: NonceRing::new(now).map_err(random)?,
            assertion_jtis: ReplayCache::new(REPLAY_CAPACITY),
            proof_jtis: ReplayCache::new(REPLAY_CAPACITY),
            stats: Stats::default(),
            requests: settings.requests,
            endpoints,
        };
        Ok(DevServer {
            listener,
            app: Arc::new(app),
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.app.endpoints
    }

    pub fn client_id(&self) -> &str {
        &self.app.client_id
    }

    pub fn granted_scopes(&self) -> &[String] {
        &self.app.granted_scopes
    }

    pub fn clock_offset_secs(&self) -> i64 {
        self.app.clock_offset
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DevServerError> {
        axum::serve(self.listener, router(self.app))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(DevServerError::Serve)
    }
}

/// Runs a dev-server on `listener` (bound to 127.0.0.1) until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DevServerError> {
    DevServer::new(listener, settings)
        .await?
        .serve(shutdown)
        .await
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(TOKEN_PATH, post(token_endpoint::token))
        .route(KEYS_PATH, get(keys))
        .route(METADATA_PATH, get(metadata))
        .route(STATS_PATH, get(stats))
        .merge(api::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), stamp_and_log))
        .with_state(app)
}

/// Stamps `Date` from the server's clock on every response (hyper keeps a `Date` that is
/// already there) and `DPoP-Nonce` on every token-endpoint and API response (RFC 9449 §8,
/// §9), and logs one line per request: method, path, status, and the error code when
/// refused. Tokens, assertions and proofs are never logged.
async fn stamp_and_log(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    app.requests.record(SeenRequest {
        method: method.to_string(),
        path: path.clone(),
        query: request.uri().query().map(str::to_owned),
        authorization: request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        dpop: request.headers().contains_key("dpop"),
        header_names: request
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .collect(),
    });
    let mut response = next.run(request).await;
    if let Ok(date) = HeaderValue::from_str(&http_date(app.now())) {
        response.headers_mut().insert(header::DATE, date);
    }
    let nonce = if path == TOKEN_PATH {
        Some(&app.as_nonce)
    } else if path.starts_with(API_PREFIX) {
        Some(&app.rs_nonce)
    } else {
        None
    };
    if let Some(value) = nonce.and_then(|n| HeaderValue::from_str(&n.current(app.now())).ok()) {
        response.headers_mut().insert("dpop-nonce", value);
    }
    let status = response.status().as_u16();
    let refusal = response.extensions().get::<Refusal>();
    app.stats.count(&path, status, refusal.map(|r| r.code));
    match refusal {
        // Debug formatting escapes control characters a client may have slipped into a
        // description (an alg or kid name echoed back).
        Some(r) => {
            tracing::warn!(%method, %path, status, error = r.code, reason = ?r.description, "refused")
        }
        None => tracing::info!(%method, %path, status, "served"),
    }
    response
}

/// The access-token signing key as a JWKS.
/// The request counters (see [`Stats`]).
async fn stats(State(app): State<Arc<App>>) -> Response {
    Json(app.stats.json()).into_response()
}

async fn keys(State(app): State<Arc<App>>) -> Response {
    Json(app.issuer.jwks()).into_response()
}

/// RFC 8414 authorization-server metadata, with RFC 9449 §5.1's DPoP member.
async fn metadata(State(app): State<Arc<App>>) -> Response {
    let algs: Vec<&str> = SigAlg::ALL.iter().map(|a| a.name()).collect();
    let e = &app.endpoints;
    Json(json!({
        "issuer": e.issuer,
        "token_endpoint": e.token,
        "jwks_uri": e.jwks,
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": [],
        "scopes_supported": app.granted_scopes,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": algs,
        "dpop_signing_alg_values_supported": algs,
    }))
    .into_response()
}

async fn not_found(request: Request) -> Response {
    api::OktaError::new(
        StatusCode::NOT_FOUND,
        "E0000007",
        format!(
            "Not found: Resource not found: {} (Endpoint)",
            request.uri().path()
        ),
    )
    .into_response()
}

async fn method_not_allowed() -> Response {
    api::OktaError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "E0000022",
        "The endpoint does not support the provided HTTP method".into(),
    )
    .into_response()
}

impl App {
    /// The server's clock, seconds since the Unix epoch: the machine's, shifted by the
    /// configured offset. Every time check and every time the server states reads this.
    fn now(&self) -> i64 {
        unix_now() + self.clock_offset
    }
}

/// RFC 9110 §5.6.7 IMF-fixdate for `Date`.
fn http_date(unix: i64) -> String {
    let secs = u64::try_from(unix).unwrap_or(0);
    httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Seconds since the Unix epoch by the machine's clock.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `N` random bytes from the OS, base64url.
fn random_b64<const N: usize>() -> Result<String, rand_core::Error> {
    let mut bytes = [0u8; N];
    rand_core::OsRng.try_fill_bytes(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Locks a mutex. A poisoned lock still guards consistent data here: nothing panics while
/// holding one of the dev-server's locks, so recovering the guard is safe.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
