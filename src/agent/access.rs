//! The one way from a request to a key, a client or the device: every door takes the
//! request's [`Caller`], which only a connection that a rule names carries (see `authz`).
//! The fields are private to this module, so a handler cannot go around the doors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::http::StatusCode;

use super::api::ApiError;
use super::authz::Caller;
use super::gateway::RouteState;
use crate::keyring::{Inventory, Keyring, SigningKey};
use crate::oauth::client::OAuthClient;
use crate::token::KeyName;

/// The longest key name accepted, in bytes: labels and `pkcs11:` URIs are far shorter.
pub const MAX_KEY_NAME_BYTES: usize = 512;

/// More keys than a device holds in practice; past it the cache starts over.
const MAX_CACHED_KEYS: usize = 64;

pub struct Access {
    keyring: Keyring,
    clients: HashMap<String, OAuthClient>,
    /// Keys already found and approved by the policy, one entry per key on the device
    /// (never per name a caller used: see `cached`), at most `MAX_CACHED_KEYS`.
    keys: Mutex<Vec<SigningKey>>,
    /// Device lookups and approvals (each signs a proof of possession) run one at a time,
    /// outside the signing queue: callers cannot make the device sign without bound by
    /// naming keys or asking for the JWKS.
    lookups: tokio::sync::Semaphore,
    /// The last audit of every key, and when it started.
    inventory: Mutex<Option<(Instant, Arc<Inventory>)>>,
    /// `[[route]]`s of the gateway, by name.
    routes: HashMap<String, Arc<RouteState>>,
    /// The audit trail's checkpoint key (name, kid): no caller gets it, by any name.
    reserved: Option<(String, String)>,
}

/// A gateway route the caller's rule allows, with the client whose token it sends: built
/// only by [`Access::route`], after the check.
pub struct PermittedRoute<'a> {
    state: Arc<RouteState>,
    client: &'a OAuthClient,
}

impl PermittedRoute<'_> {
    pub fn state(&self) -> Arc<RouteState> {
        self.state.clone()
    }

    /// The route's client. The caller may not have its token or keys (a rule may name
    /// only routes): the gateway sends with them on its behalf and never hands them out.
    pub fn client(&self) -> &OAuthClient {
        self.client
    }
}

impl Access {
    pub fn new(keyring: Keyring, clients: Vec<OAuthClient>) -> Access {
        Access {
            keyring,
            clients: clients
                .into_iter()
                .map(|c| (c.config().name.clone(), c))
                .collect(),
            keys: Mutex::new(Vec::new()),
            lookups: tokio::sync::Semaphore::new(1),
            inventory: Mutex::new(None),
            routes: HashMap::new(),
            reserved: None,
        }
    }

    /// Reserves the key `name` with `kid` (the audit trail's checkpoint key): [`Access::key`]
    /// refuses it to every caller, whether named by label, slot or `pkcs11:` URI.
    pub fn reserve_key(&mut self, name: &str, kid: &str) {
        self.reserved = Some((name.to_owned(), kid.to_owned()));
    }

    fn refuse_reserved(&self, name: &str, key: Option<&SigningKey>) -> Result<(), ApiError> {
        let Some((reserved, kid)) = &self.reserved else {
            return Ok(());
        };
        let hit = name == reserved
            || key.is_some_and(|k| k.name() == reserved || k.kid() == kid.as_str());
        if hit {
            return Err(ApiError::forbidden(format!(
                "key '{name}' is the audit trail's checkpoint key ([audit] checkpoint_key                  '{reserved}'): it signs checkpoints only, never for a caller; name another key"
            )));
        }
        Ok(())
    }

    /// The gateway's routes; each must name a client of this agent.
    pub fn set_routes(
        &mut self,
        routes: Vec<super::gateway::Route>,
    ) -> Result<(), crate::error::InvalidSetting> {
        let mut map = HashMap::new();
        for (i, route) in routes.into_iter().enumerate() {
            let Some(client) = self.clients.get(&route.client) else {
                return Err(crate::error::InvalidSetting::new(
                    format!("route[{i}].client"),
                    format!("no [[client]] is named '{}'", route.client),
                ));
            };
            let state = RouteState::new(route, client.config());
            map.insert(state.route().name.clone(), Arc::new(state));
        }
        self.routes = map;
        Ok(())
    }

    /// A gateway route the caller's rule allows, by name.
    pub fn route(&self, caller: &Caller, name: &str) -> Result<PermittedRoute<'_>, ApiError> {
        let Some(state) = self.routes.get(name) else {
            let known: Vec<&str> = self
                .routes(caller)
                .map(|s| s.route().name.as_str())
                .collect();
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!(
                    "no route '{name}' for this caller (routes: {}); see [[route]] in the agent's config",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        self.route_allowed(caller, state)
            .map_err(ApiError::forbidden)?;
        let client = self.clients.get(&state.route().client).ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "configuration",
                format!("route '{name}' names a client this agent does not have"),
            )
        })?;
        Ok(PermittedRoute {
            state: state.clone(),
            client,
        })
    }

    /// The rule's verdict on a route, which signs with its client's keys.
    fn route_allowed(
        &self,
        caller: &Caller,
        state: &RouteState,
    ) -> Result<(), super::authz::NotAllowed> {
        let route = state.route();
        let keys: Vec<SigningKey> = self
            .clients
            .get(&route.client)
            .map(|c| {
                std::iter::once(c.assertion_key())
                    .chain(c.dpop_key())
                    .collect()
            })
            .unwrap_or_default();
        let names: Vec<&str> = keys.iter().map(SigningKey::name).collect();
        caller.check_route(&route.name, &route.client, &names)
    }

    /// The routes the caller's rule allows, by name (for `/healthz` and `/metrics`).
    pub fn routes<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> impl Iterator<Item = &'a Arc<RouteState>> + 'a {
        let mut list: Vec<&Arc<RouteState>> = self
            .routes
            .values()
            .filter(|s| self.route_allowed(caller, s).is_ok())
            .collect();
        list.sort_by(|a, b| a.route().name.cmp(&b.route().name));
        list.into_iter()
    }

    /// Every key audited (policy and proof of possession) and the unusable objects. One
    /// audit at a time; requests that arrive while one runs share the next one, which
    /// starts after they arrived (single flight: never older than the request, and a flood
    /// of requests costs the device one audit at a time, not one each).
    pub async fn inventory(&self, _caller: &Caller) -> Result<Arc<Inventory>, ApiError> {
        self.audit().await
    }

    /// The published JWKS (`Inventory::jwks`: public members only), for the hosted JWKS
    /// listener's background refresh. Needs no [`Caller`] because it hands out only what
    /// is public anyway; it shares the single flight of [`Access::inventory`], so the
    /// refresher and the socket API together still cost the device one audit at a time.
    /// Never call it from a request of the unauthenticated listener: its requests read
    /// the refresher's snapshot and must not make the device sign proofs of possession.
    pub async fn audit_for_publishing(&self) -> Result<serde_json::Value, String> {
        match self.audit().await {
            Ok(inventory) => Ok(inventory.jwks()),
            Err(e) => Err(e.message().to_owned()),
        }
    }

    /// One audit at a time (see [`Access::inventory`]).
    async fn audit(&self) -> Result<Arc<Inventory>, ApiError> {
        let asked = Instant::now();
        let _one = self.lookups.acquire().await;
        if let Some((started, inv)) = self
            .inventory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && *started >= asked
        {
            return Ok(inv.clone());
        }
        let started = Instant::now();
        let keyring = self.keyring.clone();
        let inv = Arc::new(tokio::task::spawn_blocking(move || keyring.inventory()).await??);
        *self
            .inventory
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((started, inv.clone()));
        Ok(inv)
    }

    /// A client the caller's rule allows, by name.
    pub fn client(&self, caller: &Caller, name: &str) -> Result<&OAuthClient, ApiError> {
        caller.check_client(name).map_err(ApiError::forbidden)?;
        self.clients.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.clients.keys().map(String::as_str).collect();
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

    /// A client whose tokens the caller may have: the client signs with its keys on the
    /// caller's behalf, so the rule must allow them as if the caller signed itself.
    pub fn token_client(&self, caller: &Caller, name: &str) -> Result<&OAuthClient, ApiError> {
        let c = self.client(caller, name)?;
        check_key(caller, &c.assertion_key())?;
        if let Some(k) = c.dpop_key() {
            check_key(caller, &k)?;
        }
        Ok(c)
    }

    /// A policy-approved key by name that the caller's rule allows; found on the device,
    /// then cached by the key it is.
    pub async fn key(&self, caller: &Caller, name: &str) -> Result<SigningKey, ApiError> {
        if name.len() > MAX_KEY_NAME_BYTES {
            return Err(ApiError::bad(format!(
                "key name is {} bytes; the longest accepted is {MAX_KEY_NAME_BYTES}: use the key's label or a short pkcs11: URI",
                name.len()
            )));
        }
        caller.check_key(name).map_err(ApiError::forbidden)?;
        self.refuse_reserved(name, None)?;
        let key = match self.cached(name) {
            Some(k) => k,
            None => {
                let _one = self.lookups.acquire().await;
                // Callers that asked together waited here for the first one's lookup:
                // they take its key, rather than each approving it again in turn.
                match self.cached(name) {
                    Some(k) => k,
                    None => {
                        let keyring = self.keyring.clone();
                        let owned = name.to_string();
                        // Finding a key and reading its attributes are blocking device calls.
                        let key = tokio::task::spawn_blocking(move || keyring.signing_key(&owned))
                            .await??;
                        self.remember(&key);
                        key
                    }
                }
            }
        };
        self.refuse_reserved(name, Some(&key))?;
        check_key(caller, &key)?;
        Ok(key)
    }

    /// The device, for what every caller may read (public keys, verdicts, health).
    pub fn device(&self, _caller: &Caller) -> &Keyring {
        &self.keyring
    }

    /// The clients the caller's rule allows, for their counters in `/metrics`: a caller
    /// limited to some clients does not learn the others' names.
    pub fn clients<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> impl Iterator<Item = (&'a String, &'a OAuthClient)> + 'a {
        self.clients
            .iter()
            .filter(|(name, _)| caller.check_client(name).is_ok())
    }

    /// The cached key a name means: a label, or a `pkcs11:` URI matched against each
    /// cached key's label and id (never cached by its text: its attributes are many and
    /// free-form, and caching by text let callers fill the memory with names of one key).
    fn cached(&self, name: &str) -> Option<SigningKey> {
        let uri = match name.starts_with("pkcs11:") {
            true => {
                let uri = KeyName::parse(name).ok()?;
                uri.check_token(&self.keyring.describe()).ok()?;
                Some(uri)
            }
            false => None,
        };
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let mut named = keys.iter().filter(|k| match &uri {
            Some(uri) => uri.matches(k.label(), k.info().id()),
            // A rotated slot's label means its active generation, whatever its own label.
            None => k.name() == name,
        });
        match (named.next(), named.next()) {
            (Some(k), None) => Some(k.clone()),
            // Two keys with one label: let the device lookup say what is ambiguous.
            _ => None,
        }
    }

    /// Caches `key` by its identity (label and kid, the public key's thumbprint), not by
    /// the name a caller used.
    fn remember(&self, key: &SigningKey) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let same = |k: &SigningKey| k.name() == key.name() && k.kid() == key.kid();
        if let Some(old) = keys.iter_mut().find(|k| same(k)) {
            *old = key.clone();
            return;
        }
        if keys.len() >= MAX_CACHED_KEYS {
            keys.clear();
        }
        keys.push(key.clone());
    }

    /// Drops every cached key and the last audit (a key was deleted or replaced on the
    /// device).
    pub fn forget_keys(&self) {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        *self
            .inventory
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Every client, for the agent's own rotation task (never for a request: requests go
    /// through [`Access::client`] and [`Access::clients`]).
    pub(super) fn every_client(&self) -> impl Iterator<Item = &OAuthClient> {
        self.clients.values()
    }

    /// The device, for the agent's own rotation task (never for a request).
    pub(super) fn own_keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The rotated slots of the keys in the cache.
    pub(super) fn cached_slots(&self) -> Vec<String> {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|k| k.slot().map(str::to_owned))
            .collect()
    }

    /// Keys in the cache (for `/healthz` and `/metrics`).
    pub fn cached_keys(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The caller's rule allows `key` (by its name: a rotated slot's label for each of its
/// generations, else the key's label on the device).
pub fn check_key(caller: &Caller, key: &SigningKey) -> Result<(), ApiError> {
    caller.check_key(key.name()).map_err(ApiError::forbidden)
}
