//! The token-endpoint client: `client_credentials` with `private_key_jwt` (RFC 7523 §2.2)
//! and DPoP (RFC 9449 §5). Nonce retry with a fresh assertion, one retry in the server's
//! time when a refusal's `Date` shows its clock off, retries with backoff, circuit
//! breaker, downgrade refusal, scope guard, single-flight cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use tokio::sync::OnceCell;
use url::Url;

use super::cache::{AccessToken, TokenCache};
use super::http::HttpClient;
use super::resilience::{Breaker, BreakerState, backoff};
use super::response::{ErrorBody, TokenResponse, excerpt, retry_after, server_time};
use super::secret::Secret;
use super::server::AudienceRule;
use super::settings::{ClientConfig, endpoint_url, origin};
use super::state::{ClockNote, Role, ServerState, drift_matters};
use super::{OAuthError, assertion, dpop, names_time_claim, sign_async, unix_now};
use crate::jose::Header;
use crate::keyring::{Keyring, SigningKey};

/// Longest `Retry-After` keybound waits out; a longer one ends the attempt with its value.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

pub struct OAuthClient {
    config: ClientConfig,
    /// Kept to look the keys up again by their configured names after a rotation.
    keyring: Keyring,
    assertion_key: RwLock<SigningKey>,
    dpop_key: Option<RwLock<SigningKey>>,
    http: HttpClient,
    state: Arc<ServerState>,
    cache: TokenCache,
    breaker: Breaker,
    endpoint: OnceCell<Url>,
    pub stats: UpstreamStats,
}

/// Counters for the agent's metrics.
#[derive(Default)]
pub struct UpstreamStats {
    /// Responses from this client's servers by status class: 2xx, 3xx, 4xx, 5xx.
    pub responses: [AtomicU64; 4],
    pub nonce_challenges: AtomicU64,
    pub fetch_ok: AtomicU64,
    pub fetch_failed: AtomicU64,
    pub fetch_micros: AtomicU64,
}

impl UpstreamStats {
    pub fn response(&self, status: StatusCode) {
        let class = match status.as_u16() {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// One failed exchange, and how long the server asked us to wait.
struct Failure {
    error: OAuthError,
    retry_after: Option<Duration>,
}

impl From<OAuthError> for Failure {
    fn from(error: OAuthError) -> Self {
        Failure {
            error,
            retry_after: None,
        }
    }
}

impl OAuthClient {
    /// Resolves the client's keys through the policy and checks them against the server.
    pub fn new(config: ClientConfig, keyring: &Keyring) -> Result<OAuthClient, OAuthError> {
        let (assertion_key, dpop_key) = resolve_keys(&config, keyring)?;
        Ok(OAuthClient {
            http: HttpClient::new(config.connect_timeout, config.timeout)?,
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            endpoint: match &config.token_endpoint {
                Some(u) => OnceCell::new_with(Some(u.clone())),
                None => OnceCell::new(),
            },
            config,
            keyring: keyring.clone(),
            assertion_key: RwLock::new(assertion_key),
            dpop_key: dpop_key.map(RwLock::new),
            state: Arc::new(ServerState::default()),
            cache: TokenCache::default(),
            stats: UpstreamStats::default(),
        })
    }

    /// Looks both keys up again by their configured names (blocking device calls run off
    /// the reactor): after a key was deleted and generated anew under the same name, the
    /// client signs with the new one without a restart.
    pub async fn reresolve_keys(&self) -> Result<(), OAuthError> {
        let (config, keyring) = (self.config.clone(), self.keyring.clone());
        let (assertion_key, dpop_key) =
            tokio::task::spawn_blocking(move || resolve_keys(&config, &keyring))
                .await
                .map_err(|e| OAuthError::Config(format!("key lookup stopped: {e}")))??;
        tracing::info!(client = %self.config.name, assertion_kid = assertion_key.kid(),
            dpop_kid = dpop_key.as_ref().map(SigningKey::kid), "client keys looked up again");
        *self
            .assertion_key
            .write()
            .unwrap_or_else(PoisonError::into_inner) = assertion_key;
        if let (Some(slot), Some(key)) = (&self.dpop_key, dpop_key) {
            let old = std::mem::replace(
                &mut *slot.write().unwrap_or_else(PoisonError::into_inner),
                key,
            );
            if Some(old.kid()) != self.dpop_key().as_ref().map(SigningKey::kid) {
                // Cached tokens are bound to the old key (cnf.jkt): proofs by the new key
                // would not match them.
                self.cache.clear();
            }
        }
        Ok(())
    }

    /// Signs with one of the client's keys (`dpop` picks which); a key gone from the
    /// device is looked up again by name, and the signature tried once more.
    async fn sign_with<C: serde::Serialize>(
        &self,
        dpop: bool,
        header: impl Fn(&SigningKey) -> Header,
        claims: &C,
    ) -> Result<String, OAuthError> {
        let key = |this: &Self| {
            if dpop {
                this.dpop_key()
            } else {
                Some(this.assertion_key())
            }
            .ok_or_else(|| OAuthError::Config("this client has dpop = \"off\"".into()))
        };
        let first = key(self)?;
        match sign_async(&first, &header(&first), claims).await {
            Err(e) if e.key_gone() => {
                self.reresolve_keys().await?;
                let again = key(self)?;
                sign_async(&again, &header(&again), claims).await
            }
            other => other,
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn dpop_key(&self) -> Option<SigningKey> {
        self.dpop_key
            .as_ref()
            .map(|k| k.read().unwrap_or_else(PoisonError::into_inner).clone())
    }

    pub fn assertion_key(&self) -> SigningKey {
        self.assertion_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn state(&self) -> &ServerState {
        &self.state
    }

    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// A token for the configured scopes, from the cache when it is fresh.
    pub async fn token(&self) -> Result<Arc<AccessToken>, OAuthError> {
        let scopes = self.config.scopes.clone();
        self.token_for(&scopes).await
    }

    /// A token for `scopes`, which must lie inside `allowed_scopes`.
    pub async fn token_for(&self, scopes: &[String]) -> Result<Arc<AccessToken>, OAuthError> {
        self.scope_guard(scopes)?;
        self.cache
            .get(scopes, self.config.refresh_ahead, || async {
                let started = Instant::now();
                let result = self.fetch(scopes).await;
                let counter = match &result {
                    Ok(_) => &self.stats.fetch_ok,
                    Err(_) => &self.stats.fetch_failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.stats.fetch_micros.fetch_add(
                    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                result
            })
            .await
    }

    /// Forgets the cached token (an API said it is no longer valid).
    pub async fn invalidate(&self) {
        self.cache.invalidate(&self.config.scopes).await;
    }

    /// The token endpoint: configured, or discovered from the issuer (RFC 8414 §3).
    pub async fn endpoint(&self) -> Result<&Url, OAuthError> {
        self.endpoint.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Url, OAuthError> {
        let Some(issuer) = &self.config.issuer else {
            return Err(OAuthError::Config("no token_endpoint and no issuer".into()));
        };
        let base = issuer.as_str().trim_end_matches('/');
        let mut last = String::new();
        for doc in ["oauth-authorization-server", "openid-configuration"] {
            let url = format!("{base}/.well-known/{doc}");
            let request = Request::get(&url)
                .body(Vec::new())
                .map_err(|e| OAuthError::Config(e.to_string()))?;
            let response = self.http.send(request).await?;
            self.observe(
                &origin(issuer),
                Role::AuthorizationServer,
                response.headers(),
            );
            if !response.status().is_success() {
                last = format!("{url} answered {}", response.status());
                continue;
            }
            let meta: serde_json::Value = serde_json::from_slice(response.body())
                .map_err(|e| OAuthError::Config(format!("{url} is not JSON metadata: {e}")))?;
            let endpoint = meta["token_endpoint"]
                .as_str()
                .ok_or_else(|| OAuthError::Config(format!("{url} has no token_endpoint")))?;
            return endpoint_url(endpoint).map_err(OAuthError::Config);
        }
        Err(OAuthError::Config(format!(
            "cannot discover the token endpoint of {issuer}: {last}; set token_endpoint"
        )))
    }

    /// Fetches a new token: breaker, bounded attempts, backoff with full jitter, Retry-After.
    async fn fetch(&self, scopes: &[String]) -> Result<AccessToken, OAuthError> {
        let endpoint = self.endpoint().await?.clone();
        // Counted per fetch: two fetches at once (different scopes) must not add up.
        let mut round_trips = 0u32;
        let mut attempt = 0;
        loop {
            if let Err(open) = self.breaker.admit() {
                return Err(OAuthError::BreakerOpen {
                    endpoint: endpoint.to_string(),
                    failures: open.failures,
                    retry_in_secs: open.retry_in.as_secs_f64().ceil() as u64,
                    last: open.last,
                });
            }
            attempt += 1;
            match self.exchange(&endpoint, scopes, &mut round_trips).await {
                Ok(mut token) => {
                    self.breaker.success();
                    token.round_trips = round_trips;
                    tracing::info!(client = %self.config.name, token = %token.secret.redacted(),
                        expires_in = ?token.expires_in, round_trips = token.round_trips, "token received");
                    return Ok(token);
                }
                Err(f) if f.error.retryable() => {
                    self.breaker.failure(&f.error.to_string());
                    if self.breaker.state() == BreakerState::Open {
                        // This failure opened the breaker: the loop's admit reports it.
                        continue;
                    }
                    if attempt >= self.config.max_attempts {
                        return Err(OAuthError::Exhausted {
                            attempts: attempt,
                            last: Box::new(f.error),
                        });
                    }
                    let mut wait = backoff(
                        attempt - 1,
                        self.config.backoff_initial,
                        self.config.backoff_max,
                    );
                    if let Some(asked) = f.retry_after {
                        if asked > MAX_RETRY_AFTER {
                            return Err(OAuthError::RetryTooLate {
                                secs: asked.as_secs(),
                                last: Box::new(f.error),
                            });
                        }
                        wait = wait.max(asked);
                    }
                    tracing::warn!(client = %self.config.name, attempt, wait_ms = wait.as_millis() as u64,
                        "token request failed, retrying: {}", f.error);
                    tokio::time::sleep(wait).await;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    /// One token request. A nonce challenge gets exactly one retry, with a new proof carrying
    /// the nonce and a new assertion (the server consumed the first one's `jti`). A refusal
    /// whose `Date` shows the server's clock too far from the time the request was made in
    /// gets exactly one retry too, in the server's time, with a fresh `jti` and proof: at
    /// first contact keybound has no `Date` yet. Both may happen: at most three requests.
    async fn exchange(
        &self,
        endpoint: &Url,
        scopes: &[String],
        round_trips: &mut u32,
    ) -> Result<AccessToken, Failure> {
        let origin = origin(endpoint);
        let mut challenged = false;
        let mut clock_retried = false;
        loop {
            let nonce = self.state.nonce(Role::AuthorizationServer, &origin);
            // The offset this request's iat/exp are stated with (0: this machine's clock).
            let assumed = self.state.offset(&origin).unwrap_or(0);
            let request = self
                .token_request(endpoint, &origin, scopes, nonce.as_deref())
                .await?;
            *round_trips = round_trips.saturating_add(1);
            let response = self.http.send(request).await.map_err(OAuthError::from)?;
            self.stats.response(response.status());
            let (parts, body) = response.into_parts();
            let (status, headers, body) = (parts.status, parts.headers, body.as_slice());
            let measured = self.observe(&origin, Role::AuthorizationServer, &headers);
            tracing::info!(client = %self.config.name, status = status.as_u16(), "token endpoint answered");
            if status.is_success() {
                let parsed: TokenResponse =
                    serde_json::from_slice(body).map_err(|e| OAuthError::Parse {
                        url: endpoint.to_string(),
                        status: status.as_u16(),
                        reason: e.to_string(),
                        body: excerpt(body),
                    })?;
                return Ok(self.accept(parsed, scopes)?);
            }
            let error: Option<ErrorBody> = serde_json::from_slice(body).ok();
            if let Some(e) = &error
                && e.error == "use_dpop_nonce"
                && self.dpop_key.is_some()
            {
                let fresh = self.state.nonce(Role::AuthorizationServer, &origin);
                if challenged || fresh.is_none() || fresh == nonce {
                    return Err(OAuthError::NonceLoop { origin }.into());
                }
                challenged = true;
                self.stats.nonce_challenges.fetch_add(1, Ordering::Relaxed);
                tracing::info!(client = %self.config.name, "DPoP nonce challenge; retrying once with the nonce");
                continue;
            }
            let clock = measured.map(|offset| ClockNote {
                offset,
                drift: offset - assumed,
                retried: clock_retried,
            });
            if let (Some(e), Some(c)) = (&error, &clock)
                && !clock_retried
                && refused_for_time(status, e)
                && drift_matters(c.drift, self.config.assertion_lifetime)
            {
                clock_retried = true;
                tracing::warn!(client = %self.config.name, offset = c.offset, error = %e.error,
                    "token request refused, and the server's clock is {:+} s from this machine's; retrying once with iat/exp in the server's time", c.offset);
                continue;
            }
            let failure = match (error, status) {
                (_, s) if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                    OAuthError::Status {
                        url: endpoint.to_string(),
                        status: s.as_u16(),
                        body: excerpt(body),
                    }
                }
                (Some(e), s) => OAuthError::Server {
                    url: endpoint.to_string(),
                    status: s.as_u16(),
                    clock,
                    error: e.error,
                    description: e.error_description,
                },
                (None, s) if s.is_redirection() => OAuthError::Redirected {
                    url: endpoint.to_string(),
                    status: s.as_u16(),
                    location: headers
                        .get(http::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("(none)")
                        .to_string(),
                },
                (None, s) => OAuthError::Parse {
                    url: endpoint.to_string(),
                    status: s.as_u16(),
                    reason: "not an RFC 6749 §5.2 error body".into(),
                    body: excerpt(body),
                },
            };
            return Err(Failure {
                error: failure,
                retry_after: retry_after(&headers),
            });
        }
    }

    async fn token_request(
        &self,
        endpoint: &Url,
        origin: &str,
        scopes: &[String],
        nonce: Option<&str>,
    ) -> Result<Request<Vec<u8>>, OAuthError> {
        let now = unix_now();
        let iat = self.state.iat_for(origin, now);
        let audience = self.audience_for(endpoint);
        let claims = assertion::claims(
            &self.config.client_id,
            &audience,
            self.config.assertion_lifetime,
            self.config.server.max_assertion_lifetime(),
            iat,
            super::new_jti()?,
        )?;
        let client_assertion = self
            .sign_with(false, |k| assertion::header(k.alg(), k.kid()), &claims)
            .await?;
        let mut form = vec![
            ("grant_type", "client_credentials".to_string()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
            ),
            ("client_assertion", client_assertion),
        ];
        if !scopes.is_empty() {
            form.push(("scope", scopes.join(" ")));
        }
        let body =
            serde_urlencoded::to_string(&form).map_err(|e| OAuthError::Config(e.to_string()))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(endpoint.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some(proof) = self
            .proof("POST", endpoint.as_str(), origin, nonce, None)
            .await?
        {
            request = request.header("DPoP", proof);
        }
        request
            .body(body.into_bytes())
            .map_err(|e| OAuthError::Config(e.to_string()))
    }

    /// The `aud` of this client's assertions: configured, or by the server's rule.
    pub async fn assertion_audience(&self) -> Result<String, OAuthError> {
        let endpoint = self.endpoint().await?;
        Ok(self.audience_for(endpoint))
    }

    fn audience_for(&self, endpoint: &Url) -> String {
        match (&self.config.audience, self.config.server.audience_rule()) {
            (Some(a), _) => a.clone(),
            (None, AudienceRule::Issuer) => self
                .config
                .issuer
                .as_ref()
                .map_or_else(|| endpoint.to_string(), Url::to_string),
            (None, AudienceRule::TokenEndpoint) => endpoint.to_string(),
        }
    }

    /// A DPoP proof with this client's key, or `None` when DPoP is off.
    pub async fn proof(
        &self,
        method: &str,
        url: &str,
        origin: &str,
        nonce: Option<&str>,
        access_token: Option<&Secret>,
    ) -> Result<Option<String>, OAuthError> {
        if self.dpop_key.is_none() {
            return Ok(None);
        }
        let claims = dpop::claims(
            method,
            url,
            nonce,
            access_token.map(Secret::expose),
            self.state.iat_for(origin, unix_now()),
            super::new_jti()?,
        )?;
        self.sign_with(true, |k| dpop::header(k.alg(), k.jwk()), &claims)
            .await
            .map(Some)
    }

    /// Nonce and clock offset from a response, any response: 200s, refusals, 5xx. Returns
    /// the offset its `Date` shows, if it has one.
    pub fn observe(&self, origin: &str, role: Role, headers: &http::HeaderMap) -> Option<i64> {
        if let Some(n) = headers.get("dpop-nonce").and_then(|v| v.to_str().ok()) {
            self.state.set_nonce(role, origin, n);
        }
        let server_now = server_time(headers)?;
        Some(self.state.observe_clock(origin, server_now, unix_now()))
    }

    /// Token response checks: DPoP downgrade, scope guard.
    fn accept(
        &self,
        response: TokenResponse,
        requested: &[String],
    ) -> Result<AccessToken, OAuthError> {
        if self.dpop_key.is_some() && !response.token_type.eq_ignore_ascii_case("DPoP") {
            return Err(OAuthError::Downgrade {
                token_type: response.token_type,
            });
        }
        let scopes: Vec<String> = match &response.scope {
            Some(s) => s.split_whitespace().map(str::to_string).collect(),
            None => requested.to_vec(),
        };
        self.scope_guard(&scopes)?;
        Ok(AccessToken {
            secret: Secret::new(response.access_token),
            token_type: response.token_type,
            expires_in: response.expires_in,
            scopes,
            received: Instant::now(),
            round_trips: 0,
        })
    }

    /// The scope guard: every scope must be in `allowed_scopes`; the error names the others.
    fn scope_guard(&self, scopes: &[String]) -> Result<(), OAuthError> {
        let extra: Vec<String> = scopes
            .iter()
            .filter(|s| !self.config.allowed_scopes.contains(s))
            .cloned()
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        Err(OAuthError::ScopeGuard {
            extra,
            allowed: self.config.allowed_scopes.clone(),
        })
    }
}

/// A refusal that a request made in the wrong time can cause: the client assertion
/// (`invalid_client`) or the proof (`invalid_dpop_proof`) refused, or a 400 naming a time
/// claim.
fn refused_for_time(status: StatusCode, e: &ErrorBody) -> bool {
    matches!(e.error.as_str(), "invalid_client" | "invalid_dpop_proof")
        || (status == StatusCode::BAD_REQUEST
            && names_time_claim(&e.error, e.error_description.as_deref()))
}

/// The client's keys by their configured names, approved by the policy and checked
/// against the server: the assertion key's algorithm, and two distinct keys where the
/// server requires them.
fn resolve_keys(
    config: &ClientConfig,
    keyring: &Keyring,
) -> Result<(SigningKey, Option<SigningKey>), OAuthError> {
    let assertion_key = keyring.signing_key(&config.assertion_key)?;
    let accepted = config.server.assertion_algs();
    if !accepted.contains(&assertion_key.alg()) {
        let names: Vec<&str> = accepted.iter().map(|a| a.name()).collect();
        return Err(OAuthError::Config(format!(
            "client '{}': key '{}' is {}, which {} does not accept for client assertions (accepted: {})",
            config.name,
            assertion_key.label(),
            assertion_key.alg(),
            config.server.name(),
            names.join(", ")
        )));
    }
    let dpop_key = config
        .dpop_key
        .as_deref()
        .map(|k| keyring.signing_key(k))
        .transpose()?;
    if let Some(d) = &dpop_key
        && config.server.requires_distinct_keys()
        && d.kid() == assertion_key.kid()
    {
        return Err(OAuthError::Config(format!(
            "client '{}': the DPoP key and the assertion key are the same key (kid {}); {} requires two keys",
            config.name,
            d.kid(),
            config.server.name()
        )));
    }
    Ok((assertion_key, dpop_key))
}
