//! The OAuth client: a `[[client]]`'s keys, its server state, token cache and breaker,
//! and what every request shares (signing with a key looked up again after a rotation,
//! DPoP proofs, what responses teach, the token checks). The jobs live next to it, one
//! file each: `discovery` (where the token endpoint is), `token_endpoint` (one token
//! request), `nonce` (the one nonce and clock retry policy), `retry` (attempts, backoff,
//! breaker) and `api` (resource servers).

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use tokio::sync::OnceCell;
use url::Url;

use super::cache::{AccessToken, Lookup, TokenCache};
use super::http::HttpClient;
use super::nonce::NoncePeer;
use super::observe::{NoObserver, UpstreamObserver};
use super::resilience::{Breaker, BreakerState};
use super::response::TokenResponse;
use super::secret::SecretString;
use super::settings::ClientConfig;
use super::state::{Role, ServerState};
use super::transport::Transport;
use super::{OAuthError, dpop, sign_async, unix_now};
use crate::jose::Header;
use crate::keyring::{Keyring, SigningKey};
use secrecy::ExposeSecret as _;

pub struct OAuthClient {
    pub(super) config: ClientConfig,
    /// Kept to look the keys up again by their configured names after a rotation.
    keyring: Keyring,
    assertion_key: RwLock<SigningKey>,
    pub(super) dpop_key: Option<RwLock<SigningKey>>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) observer: Arc<dyn UpstreamObserver>,
    pub(super) state: Arc<ServerState>,
    cache: TokenCache,
    pub(super) breaker: Breaker,
    pub(super) endpoint: OnceCell<Url>,
    /// Signs only with the keys it was made with, never looking them up again (the
    /// activation proof of a prepared key must not fall back to the active one).
    pinned: bool,
}

impl OAuthClient {
    /// Resolves the client's keys through the policy and checks them against the server.
    pub fn new(config: ClientConfig, keyring: &Keyring) -> Result<OAuthClient, OAuthError> {
        let (assertion_key, dpop_key) = resolve_keys(&config, keyring)?;
        Ok(OAuthClient {
            transport: Arc::new(HttpClient::new(config.connect_timeout, config.timeout)?),
            observer: Arc::new(NoObserver),
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
            pinned: false,
        })
    }

    /// Asks this client's token endpoint for a token with an assertion signed by `key`
    /// instead of the configured assertion key (a prepared key generation): `Ok` only when
    /// the server issued one, which proves it knows `key`. The token is dropped, never
    /// cached or used. Nonces and clock offsets are shared with the client.
    pub async fn prove_assertion_key(&self, key: SigningKey) -> Result<(), OAuthError> {
        let accepted = self.config.server.assertion_algs();
        if !accepted.contains(&key.alg()) {
            let names: Vec<&str> = accepted.iter().map(|a| a.name()).collect();
            return Err(OAuthError::AssertionAlg {
                client: self.config.name.clone(),
                key: key.label().to_string(),
                alg: key.alg().to_string(),
                server: self.config.server.name(),
                accepted: names.join(", "),
            });
        }
        let endpoint = OnceCell::new();
        if let Some(u) = self.endpoint.get() {
            let _ = endpoint.set(u.clone());
        } else if let Some(u) = &self.config.token_endpoint {
            let _ = endpoint.set(u.clone());
        }
        let probe = OAuthClient {
            config: self.config.clone(),
            keyring: self.keyring.clone(),
            assertion_key: RwLock::new(key),
            dpop_key: self.dpop_key().map(RwLock::new),
            transport: self.transport.clone(),
            observer: self.observer.clone(),
            state: self.state.clone(),
            cache: TokenCache::default(),
            breaker: Breaker::new(self.config.breaker_failures, self.config.breaker_cooldown),
            endpoint,
            pinned: true,
        };
        let scopes = self.config.scopes.clone();
        probe.fetch(&scopes).await.map(drop)
    }

    /// Reports this client's exchanges to `observer` (the agent's metrics).
    pub fn with_observer(mut self, observer: Arc<dyn UpstreamObserver>) -> OAuthClient {
        self.observer = observer;
        self
    }

    /// Sends through `transport` instead of the reqwest adapter (an in-memory server in
    /// tests). Redirects must stay unfollowed.
    pub fn with_transport(mut self, transport: Arc<dyn Transport>) -> OAuthClient {
        self.transport = transport;
        self
    }

    /// Looks both keys up again by their configured names (blocking device calls run off
    /// the reactor): after a key was deleted and generated anew under the same name, the
    /// client signs with the new one without a restart.
    pub async fn reresolve_keys(&self) -> Result<(), OAuthError> {
        let (config, keyring) = (self.config.clone(), self.keyring.clone());
        let (assertion_key, dpop_key) =
            tokio::task::spawn_blocking(move || resolve_keys(&config, &keyring))
                .await
                .map_err(|e| OAuthError::Stopped {
                    what: "the key lookup",
                    reason: e.to_string(),
                })??;
        tracing::info!(client = %self.config.name, assertion_kid = assertion_key.kid(),
            dpop_kid = dpop_key.as_ref().map(SigningKey::kid), "client keys looked up again");
        *self
            .assertion_key
            .write()
            .unwrap_or_else(PoisonError::into_inner) = assertion_key;
        if let (Some(slot), Some(key)) = (&self.dpop_key, dpop_key) {
            let old = std::mem::replace(
                &mut *slot.write().unwrap_or_else(PoisonError::into_inner),
                key.clone(),
            );
            // After a keybound rotation, new tokens are bound to the new generation and a
            // cached token keeps the key it is bound to (`AccessToken::dpop_key`), which
            // stays on the device while the token lives. A key replaced outside keybound
            // (deleted, generated anew under its label) is gone: its tokens can never be
            // proven again, so they are dropped.
            if old.kid() != key.kid() && key.slot() != Some(old.name()) {
                self.cache.clear();
            }
        }
        Ok(())
    }

    /// Signs with one of the client's keys (`dpop` picks which); a key gone from the
    /// device is looked up again by name, and the signature tried once more.
    pub(super) async fn sign_with<C: serde::Serialize>(
        &self,
        dpop: bool,
        header: impl Fn(&SigningKey) -> Header,
        claims: &C,
    ) -> Result<String, OAuthError> {
        self.sign_with_key(dpop, header, claims)
            .await
            .map(|(jws, _)| jws)
    }

    /// [`Self::sign_with`], and the key that signed.
    pub(super) async fn sign_with_key<C: serde::Serialize>(
        &self,
        dpop: bool,
        header: impl Fn(&SigningKey) -> Header,
        claims: &C,
    ) -> Result<(String, SigningKey), OAuthError> {
        let key = |this: &Self| {
            if dpop {
                this.dpop_key()
            } else {
                Some(this.assertion_key())
            }
            .ok_or_else(|| OAuthError::DpopOff {
                client: this.config.name.clone(),
            })
        };
        let first = key(self)?;
        match sign_async(&first, &header(&first), claims).await {
            Err(e) if e.key_gone() && !self.pinned => {
                self.reresolve_keys().await?;
                let again = key(self)?;
                let jws = sign_async(&again, &header(&again), claims).await?;
                Ok((jws, again))
            }
            other => other.map(|jws| (jws, first)),
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
        Ok(self.token_lookup(scopes).await?.token)
    }

    /// [`OAuthClient::token_for`], and whether the token came from the cache (`hit`) or
    /// was fetched for this call (`token --check` says which).
    pub async fn token_lookup(&self, scopes: &[String]) -> Result<Lookup, OAuthError> {
        self.scope_guard(scopes)?;
        let lookup = self
            .cache
            .get(scopes, self.config.refresh_ahead, || {
                // Called on a miss only, whatever the fetch then brings.
                self.observer.token_cache(&self.config.name, false);
                async {
                    let started = Instant::now();
                    // The agent's own signatures: the token serves every caller.
                    let result = crate::keyring::as_agent(self.fetch(scopes)).await;
                    self.observer
                        .token_fetch(&self.config.name, result.is_ok(), started.elapsed());
                    if let Ok(t) = &result {
                        self.note_bound(t);
                    }
                    result
                }
            })
            .await?;
        if lookup.hit {
            self.observer.token_cache(&self.config.name, true);
        }
        Ok(lookup)
    }

    /// Records on the device, in the background, how long a token bound to a rotated DPoP
    /// key generation is held, so that generation is not retired or destroyed under it.
    fn note_bound(&self, token: &AccessToken) {
        let (Some(key), Some(secs)) = (&token.dpop_key, token.expires_in) else {
            return;
        };
        if self.pinned {
            return;
        }
        // An expiry past what the clock holds is none: nothing to hold the key for (a
        // record saying "until the end of time" would stop its rotation for good).
        if token.expires_at().is_none() || !token.valid_for(std::time::Duration::ZERO) {
            return;
        }
        let (keyring, key) = (self.keyring.clone(), key.clone());
        // The token's own expiry, the same however often this runs.
        // A lifetime past any real token's (400 days) would hold the key for good.
        let left = secs
            .saturating_sub(token.received.elapsed().as_secs())
            .min(400 * 86_400);
        let until = unix_now().saturating_add(left);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = keyring.note_bound_token(&key, until) {
                tracing::warn!(
                    key = key.label(),
                    kid = key.kid(),
                    "cannot record the token bound to this key in its rotation record: {e}"
                );
            }
        });
    }

    /// Records every cached token's binding in its key's rotation record (after a slot's
    /// record changed: a token fetched before the slot's first rotation was bound to a key
    /// that had no record yet).
    pub fn note_cached_tokens(&self) {
        for token in self.cache.tokens() {
            self.note_bound(&token);
        }
    }

    /// Forgets the cached token (an API said it is no longer valid).
    pub async fn invalidate(&self) {
        self.cache.invalidate(&self.config.scopes).await;
    }

    /// A DPoP proof for a request with `token`: signed by the key the token is bound to
    /// (never another: after a rotation the token keeps its key until it expires), or
    /// `None` for a Bearer token.
    pub async fn token_proof(
        &self,
        token: &AccessToken,
        method: &str,
        url: &str,
        origin: &str,
        nonce: Option<&str>,
    ) -> Result<Option<String>, OAuthError> {
        let Some(key) = &token.dpop_key else {
            return Ok(None);
        };
        let claims = dpop::claims(
            method,
            url,
            nonce,
            Some(token.secret.expose_secret()),
            self.state.iat_for(origin, unix_now()),
            super::new_jti()?,
        )?;
        sign_async(key, &dpop::header(key.alg(), key.jwk()), &claims)
            .await
            .map(Some)
    }

    /// A DPoP proof with this client's key, or `None` when DPoP is off.
    pub async fn proof(
        &self,
        method: &str,
        url: &str,
        origin: &str,
        nonce: Option<&str>,
        access_token: Option<&SecretString>,
    ) -> Result<Option<String>, OAuthError> {
        Ok(self
            .proof_with_key(method, url, origin, nonce, access_token)
            .await?
            .map(|(jws, _)| jws))
    }

    /// [`Self::proof`], and the key that signed it (a token the proof obtains is bound to
    /// exactly that key).
    pub(super) async fn proof_with_key(
        &self,
        method: &str,
        url: &str,
        origin: &str,
        nonce: Option<&str>,
        access_token: Option<&SecretString>,
    ) -> Result<Option<(String, SigningKey)>, OAuthError> {
        if self.dpop_key.is_none() {
            return Ok(None);
        }
        let claims = dpop::claims(
            method,
            url,
            nonce,
            access_token.map(|t| t.expose_secret()),
            self.state.iat_for(origin, unix_now()),
            super::new_jti()?,
        )?;
        self.sign_with_key(true, |k| dpop::header(k.alg(), k.jwk()), &claims)
            .await
            .map(Some)
    }

    /// Nonce and clock offset from a response, any response: 200s, refusals, 5xx. Returns
    /// the offset its `Date` shows, if it has one.
    pub fn observe(&self, origin: &str, role: Role, headers: &http::HeaderMap) -> Option<i64> {
        self.state.observe(role, origin, headers)
    }

    /// This client's side of an exchange with the server at `origin` in `role`.
    pub(super) fn peer<'a>(&'a self, role: Role, origin: &'a str) -> NoncePeer<'a> {
        NoncePeer {
            transport: &*self.transport,
            state: &self.state,
            observer: &*self.observer,
            client: &self.config.name,
            role,
            origin,
        }
    }

    /// Token response checks: DPoP downgrade, scope guard.
    /// `dpop_key`: the key whose proof obtained the token (its `cnf.jkt`).
    pub(super) fn accept(
        &self,
        response: TokenResponse,
        requested: &[String],
        dpop_key: Option<SigningKey>,
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
            secret: SecretString::from(response.access_token),
            token_type: response.token_type,
            expires_in: response.expires_in,
            scopes,
            received: Instant::now(),
            round_trips: 0,
            dpop_key,
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
        return Err(OAuthError::AssertionAlg {
            client: config.name.clone(),
            key: assertion_key.label().to_string(),
            alg: assertion_key.alg().to_string(),
            server: config.server.name(),
            accepted: names.join(", "),
        });
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
        return Err(OAuthError::SameKey {
            client: config.name.clone(),
            kid: d.kid().to_string(),
            server: config.server.name(),
        });
    }
    Ok((assertion_key, dpop_key))
}
