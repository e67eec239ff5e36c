//! What the OAuth engine reports as it works, through an interface: the agent's metrics
//! implement it, the CLI passes [`NoObserver`]. The engine keeps no counters of its own.

use std::time::Duration;

use http::StatusCode;

/// Told about every upstream exchange of a client, by the client's configured name.
/// Every method defaults to doing nothing.
pub trait UpstreamObserver: Send + Sync {
    /// A response from the client's authorization or resource server.
    fn response(&self, _client: &str, _status: StatusCode) {}
    /// A `use_dpop_nonce` challenge answered with a retry.
    fn nonce_challenge(&self, _client: &str) {}
    /// A token fetch ended (retries included), and how long it took.
    fn token_fetch(&self, _client: &str, _ok: bool, _took: Duration) {}
    /// A token asked of the cache: there and fresh (`hit`), or fetched.
    fn token_cache(&self, _client: &str, _hit: bool) {}
    /// One token request ended at the token endpoint (its nonce and clock retries
    /// included): what the audit trail records.
    fn token_exchange(&self, _e: &TokenExchange<'_>) {}
}

/// One token request as [`UpstreamObserver::token_exchange`] sees it.
pub struct TokenExchange<'a> {
    pub client: &'a str,
    pub endpoint: &'a str,
    /// The last answer's status; `None` when none came.
    pub status: Option<u16>,
    pub round_trips: u32,
    /// The access token obtained (an observer hashes it; never keep or log it).
    pub token: Option<&'a str>,
}

/// Observes nothing: the CLI's one-shot commands have no metrics.
pub struct NoObserver;

impl UpstreamObserver for NoObserver {}
