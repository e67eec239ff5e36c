//! The egress gateway: `/gw/<route>/<path>` on the agent's socket. The application sends
//! plain HTTP; the agent checks the route's allow-list, strips the caller's credentials
//! and hop-by-hop headers, sends the request with the client's DPoP-bound token and a
//! fresh proof (`OAuthClient::call_streaming`: the same nonce, clock and `invalid_token`
//! policy as `keybound call`), and streams the answer back with `Link` targets rewritten
//! to the gateway. The application never sees the token or a proof.
//!
//! A route is reached only through `Access::route`, which takes the request's [`Caller`]
//! and returns a [`PermittedRoute`](super::access::PermittedRoute): a handler cannot send
//! on a route the caller's rule does not allow.

pub mod route;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use super::Agent;
use super::api::ApiError;
use super::authz::Caller;
use crate::oauth::OAuthError;
use crate::oauth::api::{ApiRequest, StreamedResponse};
use crate::oauth::resilience::{Breaker, backoff};
use crate::oauth::settings::ClientConfig;
use crate::oauth::transport::TransportError;
pub use route::{Route, RouteSettings};

/// Upper bounds of the gateway latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A route with what the agent keeps for it while it runs.
pub struct RouteState {
    route: Route,
    /// Idempotent requests only: consecutive connection failures, timeouts and 5xx open it.
    breaker: Breaker,
    /// `[[client]]` `max_attempts`, `backoff_initial_ms`, `backoff_max_ms`.
    attempts: u32,
    backoff: (Duration, Duration),
    /// Default timeout: the client's.
    timeout: Duration,
    metrics: RouteMetrics,
}

impl RouteState {
    pub fn new(route: Route, client: &ClientConfig) -> RouteState {
        RouteState {
            breaker: Breaker::new(client.breaker_failures, client.breaker_cooldown),
            attempts: client.max_attempts.max(1),
            backoff: (client.backoff_initial, client.backoff_max),
            timeout: route.timeout.unwrap_or(client.timeout),
            route,
            metrics: RouteMetrics::default(),
        }
    }

    pub fn route(&self) -> &Route {
        &self.route
    }
}

#[derive(Default)]
struct RouteMetrics {
    /// Requests per latency bucket (not cumulative; `render` sums them).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    micros: AtomicU64,
    /// Answers by class: the upstream's status class ("2xx"...), or the agent's own status
    /// when it answered itself ("403", "502", "504"...).
    classes: Mutex<BTreeMap<String, u64>>,
}

impl RouteMetrics {
    fn answered(&self, class: String) {
        *self
            .classes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(class)
            .or_default() += 1;
    }

    fn took(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// Request headers never sent upstream: the caller's credentials (the agent attaches its
/// own; a cookie is a credential the application would hold besides the token), the host
/// (the upstream's is set from its URL), the length (set from the body), the hop-by-hop
/// headers of RFC 9110 §7.6.1, and the headers with which a server, a framework or a
/// proxy in front of the upstream takes another method, path or client than the request
/// line's (`X-HTTP-Method-Override`, `X-Original-URL`, `Forwarded`...): the allow-list is
/// checked on the request line, so nothing may change it on the way. Every `X-Forwarded-*`
/// is dropped too ([`REQUEST_DROPPED_PREFIX`]).
const REQUEST_DROPPED: [&str; 24] = [
    "authorization",
    "dpop",
    "cookie",
    "host",
    "content-length",
    "expect",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
];

/// Request headers never sent upstream by prefix (`X-Forwarded-For`, `-Host`, `-Prefix`,
/// `-Proto`, `-Uri`...).
const REQUEST_DROPPED_PREFIX: &str = "x-forwarded-";

/// Response headers never passed back: hop-by-hop (RFC 9110 §7.6.1), a session cookie (a
/// credential for the upstream the application must not hold), the upstream's DPoP nonce
/// (the agent's business) and `Link` (rewritten separately).
const RESPONSE_DROPPED: [&str; 12] = [
    "set-cookie",
    "dpop-nonce",
    "link",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Headers of `headers` that pass: not in `dropped`, not starting with `prefix`, nor named
/// by `Connection`.
/// A request header the agent sets itself or never forwards (credentials, hop-by-hop,
/// and the ones that change the method, path or client upstream): `/v1/call` refuses
/// these as the gateway drops them.
pub(super) fn not_forwarded(name: &HeaderName) -> bool {
    REQUEST_DROPPED.contains(&name.as_str()) || name.as_str().starts_with(REQUEST_DROPPED_PREFIX)
}

fn end_to_end(
    headers: &HeaderMap,
    dropped: &[&str],
    prefix: Option<&str>,
) -> Vec<(HeaderName, HeaderValue)> {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !dropped.contains(&n)
                && !prefix.is_some_and(|p| n.starts_with(p))
                && !listed.iter().any(|l| l == n)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A finished gateway request, for the log and the audit trail.
struct Finished<'a> {
    route: &'a str,
    method: &'a Method,
    /// Without its query.
    path: &'a str,
    status: u16,
    bytes: u64,
    took: Duration,
    uid: u32,
}

/// The one place a finished gateway request is logged, and recorded in the audit trail
/// (`[audit]`). Never the token, a proof or the query (it may carry personal data).
fn log_finished(f: &Finished<'_>, trail: Option<&crate::trail::Trail>) {
    if let Some(trail) = trail {
        trail.gateway(crate::trail::GatewayRequest::new(
            f.uid,
            f.route,
            f.method.as_str(),
            f.path,
            f.status,
            f.bytes,
            f.took,
        ));
    }
    tracing::info!(
        route = f.route,
        method = %f.method,
        path = f.path,
        status = f.status,
        bytes = f.bytes,
        micros = u64::try_from(f.took.as_micros()).unwrap_or(u64::MAX),
        uid = f.uid,
        "gateway request"
    );
}

/// What a request is, for its log line and metrics once it is answered.
struct Ledger {
    route: Option<Arc<RouteState>>,
    route_name: String,
    method: Method,
    path: String,
    uid: u32,
    started: Instant,
    trail: Option<crate::trail::Trail>,
    /// Set once the request is logged, or handed to the [`StreamGuard`] that logs it; a
    /// ledger dropped before (the caller went away while the upstream was asked) logs
    /// [`CANCELLED`].
    settled: bool,
}

/// The status logged and counted for a request whose caller went away before its answer
/// (nginx's 499).
const CANCELLED: u16 = 499;

impl Ledger {
    /// Counts and logs an answer that has no body to stream (the agent's own, or an empty
    /// upstream one).
    fn close(&mut self, status: StatusCode, class: String, bytes: u64) {
        self.settled = true;
        let took = self.started.elapsed();
        if let Some(r) = &self.route {
            r.metrics.answered(class);
            r.metrics.took(took);
        }
        log_finished(
            &Finished {
                route: &self.route_name,
                method: &self.method,
                path: &self.path,
                status: status.as_u16(),
                bytes,
                took,
                uid: self.uid,
            },
            self.trail.as_ref(),
        );
    }

    /// The agent's own answer.
    fn refuse(&mut self, e: ApiError) -> Response {
        let r = e.into_response();
        self.close(r.status(), r.status().as_u16().to_string(), 0);
        r
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let took = self.started.elapsed();
        if let Some(r) = &self.route {
            r.metrics.answered(CANCELLED.to_string());
            r.metrics.took(took);
        }
        log_finished(
            &Finished {
                route: &self.route_name,
                method: &self.method,
                path: &self.path,
                status: CANCELLED,
                bytes: 0,
                took,
                uid: self.uid,
            },
            self.trail.as_ref(),
        );
    }
}

/// Logs the request when the streamed body ends or the caller goes away.
struct StreamGuard {
    ledger: Ledger,
    status: StatusCode,
    bytes: u64,
}

impl StreamGuard {
    fn count(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let took = self.ledger.started.elapsed();
        if let Some(r) = &self.ledger.route {
            r.metrics.took(took);
        }
        log_finished(
            &Finished {
                route: &self.ledger.route_name,
                method: &self.ledger.method,
                path: &self.ledger.path,
                status: self.status.as_u16(),
                bytes: self.bytes,
                took,
                uid: self.ledger.uid,
            },
            self.ledger.trail.as_ref(),
        );
    }
}

/// `/gw/<route>/<path>`.
pub(super) async fn handler(
    State(agent): State<Arc<Agent>>,
    caller: Caller,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let raw = parts.uri.path();
    let after = raw.strip_prefix("/gw/").unwrap_or_default();
    let (name, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    let mut ledger = Ledger {
        route: None,
        route_name: name.to_owned(),
        method: parts.method.clone(),
        path: rest.to_owned(),
        uid: caller.peer().uid(),
        started: Instant::now(),
        trail: agent.trail().cloned(),
        settled: false,
    };
    let permitted = match agent.access.route(&caller, name) {
        Ok(p) => p,
        Err(e) => return ledger.refuse(e),
    };
    let (state, client) = (permitted.state(), permitted.client());
    ledger.route = Some(state.clone());
    let route = state.route();
    let path = match route::safe_path(rest) {
        Ok(p) => p,
        Err(why) => {
            return ledger.refuse(ApiError::bad(format!(
                "route '{name}': {why}; send the path as the upstream should see it"
            )));
        }
    };
    ledger.path = path.clone();
    if !route.allows(&parts.method, &path) {
        return ledger.refuse(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_allowed",
            format!(
                "route '{name}' does not allow {} {path} (allowed: {})",
                parts.method,
                route.allow_list()
            ),
        ));
    }
    // body_guard already read it within agent.max_body_bytes.
    let limit = route
        .max_body_bytes
        .unwrap_or(agent.settings.max_body_bytes);
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return ledger.refuse(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body exceeds route '{name}''s max_body_bytes ({limit} bytes)"),
            ));
        }
    };
    let url = match route.upstream_url(&path, parts.uri.query()) {
        Ok(u) => u,
        Err(why) => return ledger.refuse(ApiError::bad(format!("route '{name}': {why}"))),
    };
    let api = ApiRequest {
        method: parts.method.clone(),
        url: url.clone(),
        headers: end_to_end(
            &parts.headers,
            &REQUEST_DROPPED,
            Some(REQUEST_DROPPED_PREFIX),
        ),
        body: (!body.is_empty()).then(|| body.to_vec()),
    };
    let answer = match send(&state, client, &api).await {
        Ok(a) => a,
        Err(e) => return ledger.refuse(e),
    };
    respond(answer, route, &url, state.timeout, ledger)
}

/// Idempotent methods: the breaker, and connection failures retried with backoff. POST
/// and PATCH: one exchange (and the nonce retry `call_streaming` makes).
async fn send(
    state: &RouteState,
    client: &crate::oauth::client::OAuthClient,
    api: &ApiRequest,
) -> Result<StreamedResponse, ApiError> {
    let idempotent = matches!(
        api.method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    );
    let name = &state.route.name;
    // The token first, outside the route's timer (a fetch has the client's own timeout):
    // `timeout_secs` is the upstream's time to answer. `call_streaming` takes it from the
    // cache.
    client.token().await.map_err(ApiError::from)?;
    let mut attempt = 0;
    loop {
        let admission = match idempotent {
            true => Some(state.breaker.admit().map_err(|open| {
                ApiError::unavailable(
                    format!(
                        "route '{name}': the upstream failed {} times in a row (last: {}); not sending for {} s",
                        open.failures,
                        open.last,
                        open.retry_in.as_secs().max(1)
                    ),
                    open.retry_in.as_secs().max(1),
                )
            })?),
            false => None,
        };
        attempt += 1;
        let outcome = tokio::time::timeout(state.timeout, client.call_streaming(api)).await;
        let failed = |admission: Option<crate::oauth::resilience::Admission<'_>>, what: &str| {
            if let Some(a) = admission {
                a.failure(what);
            }
        };
        match outcome {
            Err(_) => {
                let secs = state.timeout.as_secs();
                failed(admission, "timeout");
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "route '{name}': the upstream did not answer within {secs} s (timeout_secs)"
                    ),
                ));
            }
            Ok(Ok(r)) => {
                if r.status.is_server_error() {
                    failed(admission, &format!("HTTP {}", r.status.as_u16()));
                } else if let Some(a) = admission {
                    a.success();
                }
                return Ok(r);
            }
            Ok(Err(OAuthError::Transport(t))) => {
                failed(admission, &t.to_string());
                let retry = idempotent
                    && matches!(t, TransportError::Connect { .. })
                    && attempt < state.attempts;
                if retry {
                    let wait = backoff(attempt - 1, state.backoff.0, state.backoff.1);
                    tracing::warn!(route = %name, attempt, wait_ms = wait.as_millis() as u64,
                        "upstream unreachable, retrying: {t}");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return Err(match t {
                    TransportError::Timeout { .. } => ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!("route '{name}': {t}"),
                    ),
                    _ => ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unreachable",
                        format!("route '{name}': {t}"),
                    ),
                });
            }
            // The token, the proof or the nonce policy failed: the OAuth client's answer.
            Ok(Err(e)) => {
                drop(admission);
                return Err(ApiError::from(e));
            }
        }
    }
}

/// The upstream's answer with end-to-end headers, `Link` rewritten, the body streamed.
fn respond(
    answer: StreamedResponse,
    route: &Route,
    url: &url::Url,
    idle: Duration,
    mut ledger: Ledger,
) -> Response {
    let status = answer.status;
    let class = format!("{}xx", status.as_u16() / 100);
    let mut out = Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        for (k, v) in end_to_end(&answer.headers, &RESPONSE_DROPPED, None) {
            h.append(k, v);
        }
        let links: Vec<&str> = answer
            .headers
            .get_all(header::LINK)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if let Some(rewritten) = route::rewrite_links(route, url, &links)
            && let Ok(v) = HeaderValue::from_str(&rewritten)
        {
            h.insert(header::LINK, v);
        }
    }
    if let Some(r) = &ledger.route {
        r.metrics.answered(class);
    }
    // The guard logs it from now on, when the body ends or the caller goes away.
    ledger.settled = true;
    let mut guard = StreamGuard {
        ledger,
        status,
        bytes: 0,
    };
    let body = Idle::new(answer.body, idle, url).map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            guard.count(data.len());
        }
        frame
    });
    match out.body(Body::new(body)) {
        Ok(r) => r,
        Err(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("cannot pass the upstream's answer on: {e}"),
        )
        .into_response(),
    }
}

/// A streamed answer's body that ends with a timeout error when the upstream sends nothing
/// for `limit` (the route's `timeout_secs`): no bound on the whole body, which may stream
/// for as long as it flows.
struct Idle {
    inner: crate::oauth::transport::StreamBody,
    limit: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Without the query, for the error.
    url: String,
}

impl Idle {
    fn new(inner: crate::oauth::transport::StreamBody, limit: Duration, url: &url::Url) -> Idle {
        Idle {
            inner,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            url: format!("{}{}", crate::oauth::settings::origin(url), url.path()),
        }
    }
}

impl hyper::body::Body for Idle {
    type Data = bytes::Bytes;
    type Error = TransportError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.limit;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(TransportError::Timeout {
                    url: this.url.clone(),
                    secs: this.limit.as_secs_f64(),
                }))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Routes in `/healthz`: the ones the caller may use.
pub(super) fn health(agent: &Agent, caller: &Caller) -> serde_json::Value {
    agent
        .access
        .routes(caller)
        .map(|s| {
            serde_json::json!({
                "name": s.route.name,
                "client": s.route.client,
                "upstream": format!("{}{}", s.route.origin, s.route.base_path),
                "breaker": format!("{:?}", s.breaker.state()).to_ascii_lowercase(),
            })
        })
        .collect()
}

/// The routes' metrics the caller may see, in Prometheus text.
pub(super) fn render(agent: &Agent, caller: &Caller, out: &mut String) {
    let routes: Vec<&Arc<RouteState>> = agent.access.routes(caller).collect();
    if routes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP keybound_gateway_request_seconds Gateway requests, from arrival to the last byte of the answer.\n# TYPE keybound_gateway_request_seconds histogram"
    );
    for s in &routes {
        let m = &s.metrics;
        let name = super::metrics::escape(&s.route.name);
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += m.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "keybound_gateway_request_seconds_bucket{{route=\"{name}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = m.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "keybound_gateway_request_seconds_bucket{{route=\"{name}\",le=\"+Inf\"}} {count}\nkeybound_gateway_request_seconds_sum{{route=\"{name}\"}} {}\nkeybound_gateway_request_seconds_count{{route=\"{name}\"}} {count}",
            m.micros.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "# HELP keybound_gateway_responses_total Gateway answers by route and class: the upstream's status class (2xx, 4xx, 5xx...), or the agent's own status when it answered itself (400, 403, 502, 503, 504...), 499 when the caller went away before the answer.\n# TYPE keybound_gateway_responses_total counter"
    );
    for s in &routes {
        let name = super::metrics::escape(&s.route.name);
        for (class, n) in s
            .metrics
            .classes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "keybound_gateway_responses_total{{route=\"{name}\",class=\"{class}\"}} {n}"
            );
        }
    }
}
