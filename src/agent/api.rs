//! The agent's HTTP API. Errors are JSON `{error, message}` with the status that says what
//! to do: 400 fix the request, 403 not allowed, 404 unknown name, 413 too large,
//! 502 the upstream server failed, 503 (+ Retry-After) try again later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Agent;
use super::authz::{Peer, Rule};
use crate::jose::Header;
use crate::keyring::{KeyError, SigningKey};
use crate::oauth::client::OAuthClient;
use crate::oauth::{self, OAuthError, assertion, dpop};
use crate::token::TokenError;

pub fn router(agent: Arc<Agent>) -> Router {
    let limit = agent.settings.max_body_bytes;
    Router::new()
        .route("/v1/assertion", post(assertion_handler))
        .route("/v1/dpop", post(dpop_handler))
        .route("/v1/token", post(token_handler))
        .route("/v1/jwks", get(jwks_handler))
        .route("/v1/keys", get(keys_handler))
        .route("/healthz", get(health_handler))
        .route("/metrics", get(metrics_handler))
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

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    fn unavailable(message: impl Into<String>, retry_after: u64) -> ApiError {
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

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let message = e.to_string();
        match e {
            TokenError::KeyNotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_key", message)
            }
            TokenError::BadKeyName { .. }
            | TokenError::OtherToken { .. }
            | TokenError::Ambiguous { .. } => ApiError::bad(message),
            TokenError::Unusable { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "policy_refused", message)
            }
            TokenError::AlgUnavailable { .. } | TokenError::Jose(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
            // The device is gone, busy or lost its session: the request may succeed later.
            _ => ApiError::unavailable(format!("the token is unavailable: {message}"), 5),
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
            KeyError::Policy(p) => {
                ApiError::new(StatusCode::FORBIDDEN, "policy_refused", p.to_string())
            }
        }
    }
}

impl From<OAuthError> for ApiError {
    fn from(e: OAuthError) -> Self {
        let message = e.to_string();
        match e {
            OAuthError::Token(t) => t.into(),
            OAuthError::Key(k) => k.into(),
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
            OAuthError::Config(_) | OAuthError::Rng(_) | OAuthError::Jose(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
            _ => ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", message),
        }
    }
}

/// The request body as `T`: 413 past the size limit, 400 naming what is wrong.
fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
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

fn rule<'a>(agent: &'a Agent, peer: &Peer) -> Result<&'a Rule, ApiError> {
    agent.authz.rule_for(peer).map_err(|m| {
        tracing::warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "refused caller");
        ApiError::forbidden(m)
    })
}

fn client<'a>(agent: &'a Agent, rule: &Rule, name: &str) -> Result<&'a OAuthClient, ApiError> {
    rule.check_client(name).map_err(ApiError::forbidden)?;
    agent.clients.get(name).ok_or_else(|| {
        let mut known: Vec<&str> = agent.clients.keys().map(String::as_str).collect();
        known.sort_unstable();
        let configured = if known.is_empty() {
            "none is configured; add a [[client]] to the agent's config".to_owned()
        } else {
            format!("configured: {}", known.join(", "))
        };
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_client",
            format!("no client '{name}'; {configured}"),
        )
    })
}

/// A policy-approved key by name; found on the device once, then remembered.
async fn signing_key(agent: &Arc<Agent>, name: &str) -> Result<SigningKey, ApiError> {
    if let Some(k) = agent.cached_key(name) {
        return Ok(k);
    }
    let keyring = agent.keyring.clone();
    let owned = name.to_string();
    // Finding a key and reading its attributes are blocking device calls.
    let key = tokio::task::spawn_blocking(move || keyring.signing_key(&owned)).await??;
    agent.remember_key(name, key.clone());
    Ok(key)
}

/// Queues one signature under the per-device bound, records it, logs one line.
async fn sign<C: serde::Serialize>(
    agent: &Agent,
    peer: &Peer,
    key: &SigningKey,
    header: &Header,
    claims: &C,
) -> Result<String, ApiError> {
    let Ok(_permit) = agent.queue.try_acquire() else {
        return Err(ApiError::unavailable(
            format!(
                "the signing queue is full ({} requests); retry shortly",
                agent.settings.max_queue
            ),
            1,
        ));
    };
    let start = Instant::now();
    let result = oauth::sign_async(key, header, claims).await;
    let took = start.elapsed();
    let outcome = if result.is_ok() { "ok" } else { "error" };
    agent
        .metrics
        .signature(key.label(), key.alg().name(), outcome, took);
    tracing::info!(uid = peer.uid, key = key.label(), alg = %key.alg(), micros = took.as_micros() as u64, outcome, "signature");
    if let Err(
        OAuthError::Token(TokenError::KeyNotFound { .. })
        | OAuthError::Key(KeyError::Token(TokenError::KeyNotFound { .. }) | KeyError::Policy(_)),
    ) = &result
    {
        // The key was deleted or replaced on the device: find it afresh next time.
        agent.forget_keys();
    }
    Ok(result?)
}

/// The signing answers are typed so the hot path serialises without a JSON tree.
#[derive(Serialize)]
struct AssertionAnswer {
    assertion: String,
}

#[derive(Serialize)]
struct ProofAnswer {
    proof: String,
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
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<AssertionAnswer>, ApiError> {
    let rule = rule(&agent, &peer)?;
    let req: AssertionRequest = parse(body)?;
    let (key, client_id, audience, server_max) = match (&req.client, &req.key) {
        (Some(name), None) => {
            let c = client(&agent, rule, name)?;
            let audience = match req.audience {
                Some(a) => a,
                None => c.assertion_audience().await?,
            };
            let key = c.assertion_key().clone();
            let id = req
                .client_id
                .unwrap_or_else(|| c.config().client_id.clone());
            (
                key,
                id,
                audience,
                c.config().server.max_assertion_lifetime(),
            )
        }
        (None, Some(name)) => {
            rule.check_key(name).map_err(ApiError::forbidden)?;
            let id = req
                .client_id
                .ok_or_else(|| ApiError::bad("with \"key\", \"client_id\" is required"))?;
            let audience = req
                .audience
                .ok_or_else(|| ApiError::bad("with \"key\", \"audience\" is required"))?;
            (
                signing_key(&agent, name).await?,
                id,
                audience,
                assertion::MAX_LIFETIME_SECS,
            )
        }
        _ => return Err(ApiError::bad("give exactly one of \"client\" and \"key\"")),
    };
    rule.check_key(key.label()).map_err(ApiError::forbidden)?;
    let lifetime = req.lifetime.unwrap_or(assertion::DEFAULT_LIFETIME_SECS);
    if let Some(cap) = rule.max_assertion_lifetime
        && lifetime > cap
    {
        return Err(ApiError::bad(format!(
            "lifetime {lifetime} s exceeds this caller's max_assertion_lifetime ({cap} s)"
        )));
    }
    let claims = assertion::claims(
        &client_id,
        &audience,
        lifetime,
        server_max,
        oauth::unix_now(),
        oauth::new_jti()?,
    )?;
    let jws = sign(
        &agent,
        &peer,
        &key,
        &assertion::header(key.alg(), key.kid()),
        &claims,
    )
    .await?;
    Ok(Json(AssertionAnswer { assertion: jws }))
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
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ProofAnswer>, ApiError> {
    let rule = rule(&agent, &peer)?;
    let req: DpopRequest = parse(body)?;
    let key = match (&req.client, &req.key) {
        (Some(name), None) => client(&agent, rule, name)?
            .dpop_key()
            .cloned()
            .ok_or_else(|| ApiError::bad(format!("client '{name}' has dpop = \"off\"")))?,
        (None, Some(name)) => {
            rule.check_key(name).map_err(ApiError::forbidden)?;
            signing_key(&agent, name).await?
        }
        _ => return Err(ApiError::bad("give exactly one of \"client\" and \"key\"")),
    };
    rule.check_key(key.label()).map_err(ApiError::forbidden)?;
    let claims = dpop::claims(
        &req.htm,
        &req.htu,
        req.nonce.as_deref(),
        req.access_token.as_deref(),
        oauth::unix_now(),
        oauth::new_jti()?,
    )?;
    rule.check_htu(&claims.htu).map_err(ApiError::forbidden)?;
    let jws = sign(
        &agent,
        &peer,
        &key,
        &dpop::header(key.alg(), key.public()),
        &claims,
    )
    .await?;
    Ok(Json(ProofAnswer { proof: jws }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    client: String,
    scopes: Option<Vec<String>>,
}

async fn token_handler(
    State(agent): State<Arc<Agent>>,
    Extension(peer): Extension<Peer>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let rule = rule(&agent, &peer)?;
    let req: TokenRequest = parse(body)?;
    let c = client(&agent, rule, &req.client)?;
    let scopes = req.scopes.unwrap_or_else(|| c.config().scopes.clone());
    let token = c.token_for(&scopes).await?;
    let remaining = token.expires_in.map(|s| {
        Duration::from_secs(s)
            .saturating_sub(token.received.elapsed())
            .as_secs()
    });
    tracing::info!(uid = peer.uid, client = %req.client, token = %token.secret.redacted(), "token handed out");
    Ok(Json(json!({
        "access_token": token.secret.expose(),
        "token_type": token.token_type,
        "expires_in": remaining,
        "scope": token.scopes.join(" "),
    })))
}

/// Every key audited (policy and proof of possession) and the unusable objects (blocking
/// device calls).
async fn audited(agent: &Arc<Agent>) -> Result<crate::keyring::Inventory, ApiError> {
    let keyring = agent.keyring.clone();
    Ok(tokio::task::spawn_blocking(move || keyring.inventory()).await??)
}

async fn jwks_handler(
    State(agent): State<Arc<Agent>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Value>, ApiError> {
    rule(&agent, &peer)?;
    let keys: Vec<Value> = audited(&agent)
        .await?
        .audits
        .iter()
        .filter_map(|a| a.signing_key())
        .map(|k| json!(k.public().jwks_entry(k.kid(), k.alg())))
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

async fn keys_handler(
    State(agent): State<Arc<Agent>>,
    Extension(peer): Extension<Peer>,
) -> Result<Json<Value>, ApiError> {
    rule(&agent, &peer)?;
    let inventory = audited(&agent).await?;
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
    Extension(peer): Extension<Peer>,
) -> Result<Response, ApiError> {
    rule(&agent, &peer)?;
    let keyring = agent.keyring.clone();
    let probe = tokio::task::spawn_blocking(move || {
        keyring
            .health()
            .and_then(|()| keyring.keys())
            .map(|listing| listing.keys.len())
    });
    let token = agent.keyring.describe().token_label;
    let probed = match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Ok(Ok(keys)) => keys.map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the device did not answer within 5 s".to_owned()),
    };
    let answer = match probed {
        Ok(keys) => (
            StatusCode::OK,
            json!({ "status": "ok", "token": token, "keys": keys, "queue_depth": agent.queue_depth() }),
        ),
        Err(message) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "unavailable", "token": token, "message": message }),
        ),
    };
    let mut r = (answer.0, Json(answer.1)).into_response();
    if answer.0 != StatusCode::OK {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(5u64));
    }
    Ok(r)
}

async fn metrics_handler(
    State(agent): State<Arc<Agent>>,
    Extension(peer): Extension<Peer>,
) -> Result<Response, ApiError> {
    rule(&agent, &peer)?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::metrics::render(&agent),
    )
        .into_response())
}
