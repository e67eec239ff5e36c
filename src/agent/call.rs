//! `POST /v1/call`: an API call the agent makes for a caller that may hold the client's
//! token (`keybound call` goes through it): every process shares the agent's token cache,
//! nonces and clock offsets, and the answer carries the response, never the token. Also
//! the `details` that `POST /v1/token` adds for `keybound token --check`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;

use super::Agent;
use super::api::{ApiError, parse};
use super::authz::Caller;
use crate::keyring::SigningKey;
use crate::oauth::api::{ApiRequest, ApiResponse};
use crate::oauth::cache::Lookup;
use crate::oauth::client::OAuthClient;
use crate::oauth::settings::{endpoint_url, origin};
use crate::oauth::{OAuthError, dpop};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CallRequest {
    client: String,
    method: String,
    url: String,
    /// `[name, value]` pairs; never `Authorization` or `DPoP` (the agent sets them).
    #[serde(default)]
    headers: Vec<(String, String)>,
    /// The request body, base64 (standard alphabet, padded).
    body: Option<String>,
    /// Follow `Link: rel="next"` (GET only) and answer every page's items.
    #[serde(default)]
    paginate: bool,
}

/// The upstream's answer. With `paginate`: `items` of every page, and the last response's
/// status and headers (its `body` too when its status is an error, for the error line).
#[derive(Serialize)]
pub(super) struct CallAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    items: Option<Vec<Value>>,
    /// HTTP exchanges of the last call, the token fetch excluded.
    round_trips: u32,
    /// The resource server's clock minus the agent's, seconds, from its `Date`.
    clock_offset: Option<i64>,
}

pub(super) async fn call_handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<CallAnswer>, ApiError> {
    let req: CallRequest = parse(body)?;
    // Whoever may hold the client's token may make the call: the same gate as /v1/token.
    let c = agent.access.token_client(&caller, &req.client)?;
    let request = api_request(&req)?;
    let limit = agent.settings.max_call_bytes;
    let (method, url) = (request.method.clone(), request.url.clone());
    // The proofs are for these URLs: the rule's htu_prefixes hold as they do for /v1/dpop,
    // for the first URL and every page a `paginate` follows.
    let allowed = |url: &Url| -> Result<(), OAuthError> {
        caller
            .check_htu(&dpop::htu(url.as_str())?)
            .map_err(|e| OAuthError::NotAllowed(String::from(e)))
    };
    if let Err(e) = allowed(&url) {
        return Err(match e {
            OAuthError::NotAllowed(m) => ApiError::forbidden(m),
            e => e.into(),
        });
    }
    let result = relay(c, request, req.paginate, limit, allowed).await;
    log_call(&caller, &req.client, (&method, url), &result);
    Ok(Json(result?))
}

/// Makes the call (or walks its pages) and shapes the answer, bounded by `limit` bytes.
async fn relay(
    c: &OAuthClient,
    request: ApiRequest,
    paginate: bool,
    limit: usize,
    allowed: impl Fn(&Url) -> Result<(), OAuthError>,
) -> Result<CallAnswer, ApiError> {
    let url = request.url.to_string();
    let too_large = || {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "answer_too_large",
            format!(
                "the answer of {url} exceeds agent.max_call_bytes ({limit} bytes); raise it in the agent's config, or call with --no-agent"
            ),
        )
    };
    if paginate {
        let (items, last) = match c.paginate_within(request, limit, allowed).await {
            Err(OAuthError::PagesTooLarge { .. }) => return Err(too_large()),
            other => other?,
        };
        let body = (!last.status.is_success()).then(|| STANDARD.encode(&last.body));
        return Ok(answer(&last, body, Some(items)));
    }
    let response = c.call(&request).await?;
    if response.body.len() > limit {
        return Err(too_large());
    }
    let body = Some(STANDARD.encode(&response.body));
    Ok(answer(&response, body, None))
}

fn answer(r: &ApiResponse, body: Option<String>, items: Option<Vec<Value>>) -> CallAnswer {
    CallAnswer {
        status: r.status.as_u16(),
        headers: r
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        items,
        round_trips: r.round_trips,
        clock_offset: r.clock_offset,
    }
}

/// The request as `OAuthClient::call` takes it; 400 naming the field that is wrong.
fn api_request(req: &CallRequest) -> Result<ApiRequest, ApiError> {
    let method = Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| ApiError::bad(format!("'{}' is not an HTTP method", req.method)))?;
    if req.paginate && method != Method::GET {
        return Err(ApiError::bad("paginate follows links of GET requests only"));
    }
    let url = endpoint_url(&req.url).map_err(ApiError::bad)?;
    let mut headers = Vec::with_capacity(req.headers.len());
    for (name, value) in &req.headers {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| ApiError::bad(format!("'{}' is not a header name", name.trim())))?;
        if super::gateway::not_forwarded(&name) {
            return Err(ApiError::bad(format!(
                "header '{name}' is set by keybound or never forwarded (credentials, \
                 hop-by-hop, method or path overrides); do not pass it"
            )));
        }
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| ApiError::bad(format!("the value of header '{name}' is not valid")))?;
        headers.push((name, value));
    }
    let body = req
        .body
        .as_deref()
        .map(|b| {
            STANDARD
                .decode(b)
                .map_err(|e| ApiError::bad(format!("body is not base64: {e}")))
        })
        .transpose()?;
    Ok(ApiRequest {
        method,
        url,
        headers,
        body,
    })
}

/// The one log line of a relayed call (no token, no query string).
fn log_call(
    caller: &Caller,
    client: &str,
    (method, mut url): (&Method, Url),
    result: &Result<CallAnswer, ApiError>,
) {
    url.set_query(None);
    url.set_fragment(None);
    let uid = caller.peer().uid();
    match result {
        Ok(a) => tracing::info!(
            uid,
            client,
            method = %method,
            url = %url,
            status = a.status,
            round_trips = a.round_trips,
            pages = a.items.as_ref().map(Vec::len),
            "call relayed"
        ),
        Err(e) => tracing::info!(
            uid,
            client,
            method = %method,
            url = %url,
            error = e.message(),
            "call failed"
        ),
    }
}

/// What `keybound token --check` prints besides the token itself: where the token came
/// from, the keys that got it, and what it cost.
pub(super) async fn token_details(c: &OAuthClient, lookup: &Lookup) -> Result<Value, ApiError> {
    let endpoint = c.endpoint().await?.clone();
    let key = |k: &SigningKey| json!({ "label": k.label(), "alg": k.alg().name(), "kid": k.kid() });
    // The key the token is bound to: after a rotation, not the active one until it expires.
    let dpop = lookup.token.dpop_key.clone().or_else(|| c.dpop_key());
    let config = c.config();
    Ok(json!({
        "client": config.name,
        "server": config.server.name(),
        "token_endpoint": endpoint.as_str(),
        "assertion_key": key(&c.assertion_key()),
        "dpop_key": dpop.as_ref().map(key),
        "allowed_scopes": config.allowed_scopes,
        "round_trips": lookup.token.round_trips,
        "cached": lookup.hit,
        "clock_offset": c.state().offset(&origin(&endpoint)),
    }))
}
