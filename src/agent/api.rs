//! The agent's HTTP API. Errors are JSON `{error, message}` with the status that says what
//! to do: 400 fix the request, 403 not allowed, 404 unknown name, 413 too large,
//! 500 an operator must fix the config or the device's PIN, 502 the upstream server
//! failed, 503 (+ Retry-After) try again later. Statuses follow the error's
//! [`ErrorKind`] (`ApiError::of_kind`).
//!
//! Over 400 lines: every route, its request type and its error mapping, read top to bottom
//! like docs/agent-api.yaml.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::Agent;
use super::access::check_key;
use super::authz::Caller;
use crate::error::ErrorKind;
use crate::jose::Header;
use crate::keyring::{KeyError, ORIGIN, Origin, SigningKey};
use crate::oauth::client::OAuthClient;
use crate::oauth::secret::Redacted as _;
use crate::oauth::{self, OAuthError, assertion, dpop};
use crate::token::TokenError;
use secrecy::ExposeSecret as _;

pub fn router(agent: Arc<Agent>) -> Router {
    let limit = agent.settings.max_body_bytes;
    Router::new()
        .route("/v1/assertion", post(assertion_handler))
        .route("/v1/dpop", post(dpop_handler))
        .route("/v1/token", post(token_handler))
        .route("/v1/call", post(super::call::call_handler))
        .route("/v1/jwks", get(jwks_handler))
        .route("/v1/keys", get(keys_handler))
        .route("/healthz", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .route("/gw/{route}", any(super::gateway::handler))
        .route("/gw/{route}/", any(super::gateway::handler))
        .route("/gw/{route}/{*path}", any(super::gateway::handler))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see docs/agent-api.yaml",
            )
        })
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{method} is not allowed on {}; see docs/agent-api.yaml",
                        uri.path()
                    ),
                )
            },
        )
        .layer(DefaultBodyLimit::max(limit))
        .with_state(agent)
}

/// Where a connection came in.
#[derive(Clone, Copy, Debug)]
pub(super) enum Door {
    /// The agent's Unix socket: every endpoint.
    Socket,
    /// `gateway_listen`, this loopback TCP address: [`tcp_guard`] first.
    Tcp(std::net::SocketAddr),
}

/// Every request of a connection, in this order: [`tcp_guard`] on the TCP listener; then,
/// under the connection's [`Origin`] (the task's, which the keyring reads when a signature
/// is asked for, so the audit trail names the caller of every signature without a
/// handler passing it on), [`body_guard`]; then `router`. The caller goes with the
/// request for its extractor. Done here once per request, not as layers around every
/// route (which axum clones for each request).
pub(super) async fn serve(
    mut router: Router,
    agent: Arc<Agent>,
    door: Door,
    caller: Caller,
    origin: Arc<Origin>,
    mut request: hyper::Request<hyper::body::Incoming>,
) -> Response {
    request.extensions_mut().insert(caller);
    let request = request.map(Body::new);
    if let Door::Tcp(listen) = door
        && let Err(refused) = tcp_guard(listen, &request)
    {
        return refused.into_response();
    }
    ORIGIN
        .scope(Some(origin), async move {
            match body_guard(&agent, request).await {
                Ok(request) => match tower_service::Service::call(&mut router, request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                },
                Err(refused) => refused,
            }
        })
        .await
}

/// On the loopback TCP listener, only `/gw/` is served, and never to a browser: any web
/// page the user opens can send requests to 127.0.0.1 under the user's uid, so a request
/// with `Origin` or `Sec-Fetch-Site` is refused, and so is a `Host` other than
/// `keybound`, the listen address or `localhost:<port>` (DNS rebinding).
fn tcp_guard(listen: std::net::SocketAddr, request: &Request) -> Result<(), ApiError> {
    if !request.uri().path().starts_with("/gw/") {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "agent.gateway_listen serves only /gw/<route>/...; use the agent's Unix socket for the rest",
        ));
    }
    let headers = request.headers();
    if headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-site") {
        return Err(ApiError::forbidden(
            "a browser's request (Origin or Sec-Fetch-Site) is refused on agent.gateway_listen",
        ));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let allowed = [
        "keybound".to_owned(),
        listen.to_string(),
        format!("localhost:{}", listen.port()),
    ];
    if !allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            format!("Host '{host}' is not served here; send Host: keybound or {listen}"),
        ));
    }
    Ok(())
}

/// The caller's rule, the only way a handler gets one: the accept loop attaches a
/// [`Caller`] to a connection only when a rule names its peer (and closes the others), and
/// every door of `Access` (keys, clients, the device) and `sign` takes a `&Caller`, so a
/// handler that skips this extractor does not compile.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Caller, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::forbidden("this connection has no caller rule; add an [[agent.allow]] rule")
        })
    }
}

/// Reads the whole body before a handler runs: 413 from `Content-Length` alone (before
/// hyper answers `Expect: 100-continue`), 413 past `max_body_bytes` while reading, 408 when
/// the body takes longer than `body_timeout_secs`.
async fn body_guard(agent: &Agent, request: Request) -> Result<Request, Response> {
    let limit = agent.settings.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds agent.max_body_bytes ({limit} bytes)"),
        )
        .closing()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let (parts, body) = request.into_parts();
    let secs = agent.settings.body_timeout_secs;
    let bytes =
        match tokio::time::timeout(Duration::from_secs(secs), axum::body::to_bytes(body, limit))
            .await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                let inner: &(dyn std::error::Error + 'static) = &e;
                let over = std::iter::successors(Some(inner), |e| e.source())
                    .any(|e| e.is::<http_body_util::LengthLimitError>());
                if over {
                    return Err(too_large());
                }
                return Err(ApiError::bad(format!("cannot read the request body: {e}")).closing());
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "the request body did not arrive within agent.body_timeout_secs ({secs} s)"
                    ),
                )
                .closing());
            }
        };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        error: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    /// What went wrong, for a log line or a status report.
    pub(super) fn message(&self) -> &str {
        &self.message
    }

    pub(super) fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(super) fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// The answer, and the connection closed after it (a body left unread).
    fn closing(self) -> Response {
        let mut r = self.into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }

    pub(super) fn unavailable(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({ "error": self.error, "message": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

impl ApiError {
    /// The answer a kind of failure gets (docs/agent-api.yaml, "Errors"): 503 +
    /// Retry-After when waiting helps (transient, device), 500 `configuration` when an
    /// operator must fix keybound's config, 500 `authentication` when the device refused
    /// its PIN or key auth (no Retry-After: waiting does not help, and a retry must not
    /// spend PIN attempts), 502 when a server answered something unusable or refused
    /// keybound's credentials, 403 when keybound's own rules refused.
    fn of_kind(kind: ErrorKind, message: String) -> ApiError {
        match kind {
            ErrorKind::Transient | ErrorKind::Device => ApiError::unavailable(message, 5),
            ErrorKind::Configuration => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "configuration", message)
            }
            ErrorKind::Authentication => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "authentication", message)
            }
            ErrorKind::Upstream => {
                ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", message)
            }
            ErrorKind::Refused => ApiError::new(StatusCode::FORBIDDEN, "policy_refused", message),
            ErrorKind::Internal => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        // A caller learns which attribute of its URI does not match, not the configured
        // token's serial, module path or PIN file: those go to the agent's log only.
        if let TokenError::UriMismatch {
            name, attribute, ..
        } = &e
        {
            tracing::info!("key name refused: {e}");
            return ApiError::bad(format!(
                "key '{name}' does not name the configured token: its {attribute} does not \
                 match (the agent's log has the details)"
            ));
        }
        let message = e.to_string();
        match e.kind() {
            // Names in the request: the caller fixes them.
            _ if matches!(e, TokenError::KeyNotFound { .. }) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_key", message)
            }
            _ if matches!(
                e,
                TokenError::BadKeyName { .. }
                    | TokenError::OtherToken { .. }
                    | TokenError::UriMismatch { .. }
                    | TokenError::Ambiguous { .. }
            ) =>
            {
                ApiError::bad(message)
            }
            ErrorKind::Transient | ErrorKind::Device => {
                ApiError::unavailable(format!("the token is unavailable: {message}"), 5)
            }
            kind => ApiError::of_kind(kind, message),
        }
    }
}

/// A blocking task that panicked or was cancelled.
impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Token(t) => t.into(),
            KeyError::Policy(p) => ApiError::of_kind(p.kind(), p.to_string()),
            KeyError::Rotation(r) => ApiError::of_kind(r.kind(), r.to_string()),
            // The audit trail cannot be written (`[audit] on_failure = "refuse"`).
            KeyError::Gated(reason) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    format!("signing refused: {reason}"),
                )
            },
        }
    }
}

impl From<OAuthError> for ApiError {
    fn from(e: OAuthError) -> Self {
        let message = e.to_string();
        match e {
            OAuthError::Token(t) => t.into(),
            OAuthError::Key(k) => k.into(),
            // Values in the request: the caller fixes them.
            OAuthError::BadUrl { .. }
            | OAuthError::BadLifetime { .. }
            | OAuthError::BadMethod(_)
            | OAuthError::Empty { .. } => ApiError::bad(message),
            OAuthError::ScopeGuard { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "scope_not_allowed", message)
            }
            OAuthError::BreakerOpen { retry_in_secs, .. } => {
                ApiError::unavailable(message, retry_in_secs.max(1))
            }
            // The server's own Retry-After, longer than keybound waits itself.
            OAuthError::RetryTooLate { secs, .. } => ApiError::unavailable(message, secs.max(1)),
            // The authorization server refused keybound's credentials: relayed as a
            // gateway's failure, the server's error code in the message; named apart from
            // other upstream failures so a CLI through the agent exits as it would alone.
            OAuthError::Server { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "server_refused", message)
            }
            e => ApiError::of_kind(e.kind(), message),
        }
    }
}

/// The request body as `T`: 413 past the size limit, 400 naming what is wrong.
pub(super) fn parse<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body exceeds agent.max_body_bytes",
            )
        } else {
            ApiError::bad(format!("cannot read the request body: {r}"))
        }
    })?;
    // The fast path; only a request that fails is decoded again to name the bad field.
    if let Ok(value) = serde_json::from_slice(&bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => {
                ApiError::bad(format!("invalid JSON request: {path}: {inner}"))
            }
            serde_json::error::Category::Data => {
                ApiError::bad(format!("invalid JSON request: {inner}"))
            }
            _ => ApiError::bad(format!("malformed JSON: {inner}")),
        }
    })
}

/// Queues one signature under the per-device bound. The keyring's observer counts and
/// logs it (`super::sign_observer`).
async fn sign<C: serde::Serialize>(
    agent: &Agent,
    caller: &Caller,
    key: &SigningKey,
    header: &Header,
    claims: &C,
) -> Result<String, ApiError> {
    check_key(caller, key)?;
    let Ok(_permit) = agent.queue.try_acquire() else {
        return Err(ApiError::unavailable(
            format!(
                "the signing queue is full ({} requests); retry shortly",
                agent.settings.max_queue
            ),
            1,
        ));
    };
    let result = oauth::sign_async(key, header, claims).await;
    if let Err(e) = &result
        && (e.key_gone() || matches!(e, OAuthError::Key(KeyError::Policy(_))))
    {
        // The key was deleted or replaced on the device: find it afresh next time.
        agent.access.forget_keys();
    }
    Ok(result?)
}

/// The key is gone from the device (deleted, or rotated under the same name).
fn key_gone(e: &ApiError) -> bool {
    e.error == "unknown_key"
}

/// Signs with a key by name. A cached key gone from the device (rotated under its name)
/// is found afresh, and the signature tried once more.
async fn sign_as_key<C: serde::Serialize>(
    agent: &Agent,
    caller: &Caller,
    name: &str,
    header: impl Fn(&SigningKey) -> Header,
    claims: &C,
) -> Result<String, ApiError> {
    let first = agent.access.key(caller, name).await?;
    match sign(agent, caller, &first, &header(&first), claims).await {
        Err(e) if key_gone(&e) => {
            let again = agent.access.key(caller, name).await?;
            sign(agent, caller, &again, &header(&again), claims).await
        }
        other => other,
    }
}

/// Which of a client's keys signs.
#[derive(Clone, Copy)]
enum ClientKey {
    Assertion,
    Dpop,
}

/// Signs with a client's key. A key gone from the device makes the client look its keys
/// up again by their configured names (a rotation), and the signature is tried once more.
async fn sign_as_client<C: serde::Serialize>(
    agent: &Agent,
    caller: &Caller,
    (c, name): (&OAuthClient, &str),
    which: ClientKey,
    header: impl Fn(&SigningKey) -> Header,
    claims: &C,
) -> Result<String, ApiError> {
    let key = || match which {
        ClientKey::Assertion => Ok(c.assertion_key()),
        ClientKey::Dpop => c
            .dpop_key()
            .ok_or_else(|| ApiError::bad(format!("client '{name}' has dpop = \"off\""))),
    };
    let first = key()?;
    match sign(agent, caller, &first, &header(&first), claims).await {
        Err(e) if key_gone(&e) => {
            c.reresolve_keys().await?;
            let again = key()?;
            sign(agent, caller, &again, &header(&again), claims).await
        }
        other => other,
    }
}

/// A signing answer, `{"proof": "<jws>"}` or `{"assertion": "<jws>"}`, written without a
/// JSON serialiser: a compact JWS is base64url and dots, which a JSON string carries as
/// they are. Anything else (never a JWS of this crate's) is quoted by serde_json.
struct JwsAnswer {
    field: &'static str,
    jws: String,
}

impl JwsAnswer {
    fn proof(jws: String) -> JwsAnswer {
        JwsAnswer {
            field: "proof",
            jws,
        }
    }

    fn assertion(jws: String) -> JwsAnswer {
        JwsAnswer {
            field: "assertion",
            jws,
        }
    }
}

impl IntoResponse for JwsAnswer {
    fn into_response(self) -> Response {
        let JwsAnswer { field, jws } = self;
        // Every byte tested, with no early exit: the compiler checks many at once.
        let plain = jws.bytes().fold(true, |all, b| {
            all & (((b | 0x20).wrapping_sub(b'a') < 26)
                | (b.wrapping_sub(b'0') < 10)
                | (b == b'-')
                | (b == b'_')
                | (b == b'.'))
        });
        if !plain {
            return Json(json!({ field: jws })).into_response();
        }
        let mut body = Vec::with_capacity(field.len() + jws.len() + 8);
        for piece in [
            &b"{\""[..],
            field.as_bytes(),
            b"\":\"",
            jws.as_bytes(),
            b"\"}",
        ] {
            body.extend_from_slice(piece);
        }
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssertionRequest {
    client: Option<String>,
    key: Option<String>,
    client_id: Option<String>,
    audience: Option<String>,
    lifetime: Option<u64>,
}

async fn assertion_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<JwsAnswer, ApiError> {
    let req: AssertionRequest = parse(body)?;
    let lifetime = req.lifetime.unwrap_or(assertion::DEFAULT_LIFETIME_SECS);
    if let Some(cap) = caller.max_assertion_lifetime()
        && lifetime > cap
    {
        return Err(ApiError::bad(format!(
            "lifetime {lifetime} s exceeds this caller's max_assertion_lifetime ({cap} s)"
        )));
    }
    let header = |k: &SigningKey| assertion::header(k.alg(), k.kid());
    let jws = match (&req.client, &req.key) {
        (Some(name), None) => {
            let c = agent.access.client(&caller, name)?;
            let audience = match req.audience {
                Some(a) => a,
                None => c.assertion_audience().await?,
            };
            let client_id = req.client_id.as_deref().unwrap_or(&c.config().client_id);
            let claims = assertion::claims(
                client_id,
                &audience,
                lifetime,
                c.config().server.max_assertion_lifetime(),
                oauth::unix_now(),
                oauth::new_jti()?,
            )?;
            sign_as_client(
                &agent,
                &caller,
                (c, name),
                ClientKey::Assertion,
                header,
                &claims,
            )
            .await?
        }
        (None, Some(name)) => {
            let client_id = req
                .client_id
                .ok_or_else(|| ApiError::bad("with \"key\", \"client_id\" is required"))?;
            let audience = req
                .audience
                .ok_or_else(|| ApiError::bad("with \"key\", \"audience\" is required"))?;
            let claims = assertion::claims(
                &client_id,
                &audience,
                lifetime,
                assertion::MAX_LIFETIME_SECS,
                oauth::unix_now(),
                oauth::new_jti()?,
            )?;
            sign_as_key(&agent, &caller, name, header, &claims).await?
        }
        _ => return Err(ApiError::bad("give exactly one of \"client\" and \"key\"")),
    };
    Ok(JwsAnswer::assertion(jws))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DpopRequest {
    client: Option<String>,
    key: Option<String>,
    htm: String,
    htu: String,
    nonce: Option<String>,
    access_token: Option<String>,
}

async fn dpop_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<JwsAnswer, ApiError> {
    let req: DpopRequest = parse(body)?;
    let claims = dpop::claims(
        &req.htm,
        &req.htu,
        req.nonce.as_deref(),
        req.access_token.as_deref(),
        oauth::unix_now(),
        oauth::new_jti()?,
    )?;
    caller.check_htu(&claims.htu).map_err(ApiError::forbidden)?;
    let header = |k: &SigningKey| dpop::header(k.alg(), k.jwk());
    let jws = match (&req.client, &req.key) {
        (Some(name), None) => {
            let c = agent.access.client(&caller, name)?;
            // A token from this agent is proven by the key it is bound to, which after a
            // rotation is not the client's active DPoP key until the token expires.
            match req
                .access_token
                .as_deref()
                .and_then(|t| c.cache().bound_key(t))
            {
                Some(key) => sign(&agent, &caller, &key, &header(&key), &claims).await?,
                None => {
                    sign_as_client(&agent, &caller, (c, name), ClientKey::Dpop, header, &claims)
                        .await?
                }
            }
        }
        (None, Some(name)) => sign_as_key(&agent, &caller, name, header, &claims).await?,
        _ => return Err(ApiError::bad("give exactly one of \"client\" and \"key\"")),
    };
    Ok(JwsAnswer::proof(jws))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    client: String,
    scopes: Option<Vec<String>>,
    /// Add `details` (what `keybound token --check` prints).
    #[serde(default)]
    details: bool,
}

async fn token_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: TokenRequest = parse(body)?;
    let c = agent.access.token_client(&caller, &req.client)?;
    let scopes = req.scopes.unwrap_or_else(|| c.config().scopes.clone());
    let lookup = c.token_lookup(&scopes).await?;
    let token = &lookup.token;
    let remaining = token.expires_in.map(|s| {
        Duration::from_secs(s)
            .saturating_sub(token.received.elapsed())
            .as_secs()
    });
    tracing::info!(client = %req.client, token = %token.secret.redacted(), "token handed out");
    let mut answer = json!({
        "access_token": token.secret.expose_secret(),
        "token_type": token.token_type,
        "expires_in": remaining,
        "scope": token.scopes.join(" "),
    });
    if req.details {
        answer["details"] = super::call::token_details(c, &lookup).await?;
    }
    Ok(Json(answer))
}

/// Every key audited (policy and proof of possession) and the unusable objects (blocking
/// device calls).
async fn audited(
    agent: &Arc<Agent>,
    caller: &Caller,
) -> Result<Arc<crate::keyring::Inventory>, ApiError> {
    agent.access.inventory(caller).await
}

async fn jwks_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(audited(&agent, &caller).await?.jwks()))
}

async fn keys_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let inventory = audited(&agent, &caller).await?;
    let keys = inventory.audits.iter().map(|a| {
        let (k, v) = (a.key(), a.verdict());
        json!({
            "label": k.label(),
            "id": crate::token::hex(k.id()),
            "alg": k.alg().name(),
            "kid": k.public().thumbprint(),
            "policy": v.outcome(),
            "reasons": v.findings.iter().map(|f| f.message.clone()).collect::<Vec<_>>(),
        })
    });
    // Objects that are not usable keys travel with the keys, as failing entries.
    let problems = inventory.problems.iter().map(|p| {
        json!({
            "label": p.label,
            "id": crate::token::hex(&p.id),
            "alg": null,
            "kid": null,
            "policy": crate::policy::Outcome::Fail,
            "reasons": [p.reason],
        })
    });
    Ok(Json(Value::Array(keys.chain(problems).collect())))
}

/// 200 when the device answers and the login holds; 503 otherwise.
async fn health_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let keyring = agent.access.device(&caller).clone();
    let probe = tokio::task::spawn_blocking(move || {
        keyring
            .health()
            .and_then(|()| keyring.keys())
            .map(|listing| listing.keys.len())
    });
    let token = agent.access.device(&caller).describe().token_label;
    let probed = match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(keys)) => keys.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the device did not answer within 5 s".to_owned()),
    };
    let mut answer = match probed {
        Ok(keys) => (
            StatusCode::OK,
            json!({ "status": "ok", "token": token, "keys": keys, "cached_keys": agent.access.cached_keys(), "queue_depth": agent.queue_depth(), "rotation": agent.rotation.health() }),
        ),
        Err(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "unavailable", "token": token, "message": message, "rotation": agent.rotation.health() }),
        ),
    };
    if let Some(host) = &agent.jwks {
        answer.1["jwks"] = host.health();
    }
    answer.1["routes"] = super::gateway::health(&agent, &caller);
    if let Some(signers) = agent.access.device(&caller).signers() {
        answer.1["signers"] = json!(signers);
    }
    if let Some(trail) = &agent.trail {
        answer.1["audit"] = trail.health();
        // Refusing to sign is being unavailable; continuing without a trail is not.
        if !trail.healthy() && trail.gate()().is_err() && answer.0 == StatusCode::OK {
            answer.0 = StatusCode::SERVICE_UNAVAILABLE;
            answer.1["status"] = "unavailable".into();
            answer.1["message"] = "the audit trail cannot be written; signing is refused".into();
        }
    }
    let mut r = (answer.0, Json(answer.1)).into_response();
    if answer.0 != StatusCode::OK {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5u64));
    }
    Ok(r)
}

async fn metrics_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::metrics::render(&agent, &caller),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signing_answer_is_the_json_serde_would_write() {
        async fn body(answer: JwsAnswer) -> (Option<String>, Value) {
            let r = answer.into_response();
            let kind = r
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned());
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            (kind, serde_json::from_slice(&bytes).unwrap())
        }
        let json = Some("application/json".to_owned());
        let jws = "eyJhbGciOiJFUzI1NiJ9.eyJpYXQiOjF9.AB-_cd".to_owned();
        assert_eq!(
            body(JwsAnswer::proof(jws.clone())).await,
            (json.clone(), json!({ "proof": jws }))
        );
        assert_eq!(
            body(JwsAnswer::assertion(jws.clone())).await,
            (json.clone(), json!({ "assertion": jws }))
        );
        // Not a compact JWS: quoted by serde_json, never spliced into the JSON.
        let odd = "a\"}, \"x\": \"\\\n".to_owned();
        assert_eq!(
            body(JwsAnswer::proof(odd.clone())).await,
            (json, json!({ "proof": odd }))
        );
    }

    fn answer(e: impl Into<ApiError>) -> (u16, &'static str, Option<u64>) {
        let e = e.into();
        (e.status.as_u16(), e.error, e.retry_after)
    }

    #[test]
    fn statuses_follow_the_kind() {
        // The device refused its PIN or a key's auth value: an operator must act, and a
        // retry would spend PIN attempts. Not "503, retry in 5 s".
        let locked = TokenError::PinLocked { token: "t".into() };
        assert_eq!(answer(locked), (500, "authentication", None));
        let wrong = TokenError::PinIncorrect { token: "t".into() };
        assert_eq!(answer(wrong), (500, "authentication", None));
        let refused = TokenError::KeyAuthRefused { label: "k".into() };
        assert_eq!(answer(refused), (500, "authentication", None));
        // A device that is gone comes back: 503 + Retry-After.
        let gone = TokenError::Unavailable {
            reason: "removed".into(),
        };
        assert_eq!(answer(gone), (503, "unavailable", Some(5)));
        // Discovery failed: the server's fault, not an internal error.
        let discovery = OAuthError::Discovery {
            issuer: "https://as.example".into(),
            last: "HTTP 404".into(),
        };
        assert_eq!(answer(discovery), (502, "upstream_error", None));
        // keybound's config lacks what the request needs.
        let no_endpoint = OAuthError::NoEndpoint { client: "c".into() };
        assert_eq!(answer(no_endpoint), (500, "configuration", None));
        let unknown = TokenError::KeyNotFound {
            name: "'k'".into(),
            token: "t".into(),
            known: vec![],
        };
        assert_eq!(answer(unknown), (404, "unknown_key", None));
        let refused = OAuthError::Server {
            url: "u".into(),
            status: 401,
            error: "invalid_client".into(),
            description: None,
            clock: None,
        };
        assert_eq!(answer(refused), (502, "server_refused", None));
        // The server said to come back later than keybound waits: its time, passed on.
        let late = OAuthError::RetryTooLate {
            secs: 120,
            last: Box::new(OAuthError::Status {
                url: "u".into(),
                status: 503,
                body: String::new(),
            }),
        };
        assert_eq!(answer(late), (503, "unavailable", Some(120)));
    }
}
