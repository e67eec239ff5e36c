//! What keybound learns about each server as it talks to it: the current DPoP nonce
//! (RFC 9449 §8, §9), kept separately for the authorization server and resource servers of
//! the same origin, and the clock offset read from `Date` (RFC 9110 §6.6.1), refusals
//! included: `iat`/`exp` are stated in each server's own time.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Clock skew, in seconds, that keybound assumes any server absorbs. `Date` has a one-second
/// resolution and the exchange takes a moment, so smaller differences are noise; larger ones
/// may be refused by a strict server (Okta refuses an `iat` in its future).
pub const TOLERATED_SKEW_SECS: u64 = 5;

/// Which role a nonce belongs to: Okta's org authorization server and its API share an
/// origin but issue different nonces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    AuthorizationServer,
    ResourceServer,
}

/// What keybound knew of a server's clock when the server refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockNote {
    /// Server clock minus this machine's, seconds, from the refusal's `Date`.
    pub offset: i64,
    /// How far the refused request's `iat` was off the server's clock: the offset now
    /// minus the one the request was made with (0 when it was made in the server's time).
    pub drift: i64,
    /// keybound already retried once with `iat`/`exp` in the server's time.
    pub retried: bool,
}

#[derive(Default)]
pub struct ServerState {
    nonces: Mutex<HashMap<(Role, String), String>>,
    /// server clock minus local clock, seconds.
    offsets: Mutex<HashMap<String, i64>>,
}

impl ServerState {
    pub fn nonce(&self, role: Role, origin: &str) -> Option<String> {
        lock(&self.nonces).get(&(role, origin.to_string())).cloned()
    }

    pub fn set_nonce(&self, role: Role, origin: &str, nonce: &str) {
        lock(&self.nonces).insert((role, origin.to_string()), nonce.to_string());
    }

    pub fn offset(&self, origin: &str) -> Option<i64> {
        lock(&self.offsets).get(origin).copied()
    }

    /// Every origin's last measured offset, for the metrics.
    pub fn offsets(&self) -> Vec<(String, i64)> {
        lock(&self.offsets)
            .iter()
            .map(|(o, off)| (o.clone(), *off))
            .collect()
    }

    /// Records `server_now - local_now` from a response's `Date` header; returns it.
    pub fn observe_clock(&self, origin: &str, server_now: u64, local_now: u64) -> i64 {
        let offset = offset(server_now, local_now);
        lock(&self.offsets).insert(origin.to_string(), offset);
        offset
    }

    /// Nonce and clock offset from a response, any response: 200s, refusals, 5xx. Returns
    /// the offset its `Date` shows, if it has one.
    pub fn observe(&self, role: Role, origin: &str, headers: &http::HeaderMap) -> Option<i64> {
        if let Some(n) = headers.get("dpop-nonce").and_then(|v| v.to_str().ok()) {
            self.set_nonce(role, origin, n);
        }
        let server_now = super::response::server_time(headers)?;
        Some(self.observe_clock(origin, server_now, super::unix_now()))
    }

    /// `iat` for a server: this machine's clock moved by the offset last measured to that
    /// server, so that `iat`/`exp` are right in the server's time whichever clock is wrong.
    /// `Date` truncates to the second and is stamped before the response travels, so the
    /// estimate errs on the early side: never ahead of the server's clock (Okta refuses a
    /// future `iat`).
    ///
    /// An offset beyond [`MAX_FOLLOWED_OFFSET_SECS`] is not followed: a far-off `Date` (a
    /// broken proxy or error page) must not make keybound sign assertions and proofs that
    /// only become valid hours from now. Such a server refuses, and the error says the
    /// offset.
    pub fn iat_for(&self, origin: &str, local_now: u64) -> u64 {
        match self.applied_offset(origin) {
            off if off < 0 => local_now.saturating_sub(off.unsigned_abs()),
            off => local_now.saturating_add(off.unsigned_abs()),
        }
    }

    /// The offset `iat_for` states times with: the measured one, or 0 when there is none
    /// or it is beyond [`MAX_FOLLOWED_OFFSET_SECS`].
    pub fn applied_offset(&self, origin: &str) -> i64 {
        self.offset(origin)
            .filter(|off| followable(*off))
            .unwrap_or(0)
    }
}

/// The largest server clock offset keybound states `iat`/`exp` in (2 hours): a server that
/// far off is broken, not merely drifting.
pub const MAX_FOLLOWED_OFFSET_SECS: u64 = 2 * 3600;

/// Whether keybound states times in a server's clock that is `offset` seconds off.
pub fn followable(offset: i64) -> bool {
    offset.unsigned_abs() <= MAX_FOLLOWED_OFFSET_SECS
}

/// `server - local` in seconds.
pub fn offset(server_now: u64, local_now: u64) -> i64 {
    i64::try_from(server_now).unwrap_or(i64::MAX) - i64::try_from(local_now).unwrap_or(i64::MAX)
}

/// Whether a request whose times were `drift` seconds off the server's clock (the offset
/// a refusal's `Date` shows minus the one the request was made with) may have been refused
/// for it: ahead, an assertion of `lifetime` seconds is expired once `drift` reaches it;
/// either way a strict server may refuse more than [`TOLERATED_SKEW_SECS`].
pub fn drift_matters(drift: i64, lifetime: u64) -> bool {
    let limit = TOLERATED_SKEW_SECS.min(lifetime.max(1));
    drift.unsigned_abs() >= limit
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_per_role_and_origin() {
        let s = ServerState::default();
        s.set_nonce(Role::AuthorizationServer, "https://o.example", "as");
        s.set_nonce(Role::ResourceServer, "https://o.example", "rs");
        assert_eq!(
            s.nonce(Role::AuthorizationServer, "https://o.example")
                .as_deref(),
            Some("as")
        );
        assert_eq!(
            s.nonce(Role::ResourceServer, "https://o.example")
                .as_deref(),
            Some("rs")
        );
        assert_eq!(s.nonce(Role::ResourceServer, "https://p.example"), None);
    }

    #[test]
    fn iat_follows_the_server_clock_both_ways() {
        let s = ServerState::default();
        assert_eq!(s.observe_clock("a", 1000, 1030), -30);
        assert_eq!(s.iat_for("a", 1030), 1000);
        assert_eq!(s.observe_clock("b", 1030, 1000), 30);
        assert_eq!(s.iat_for("b", 1000), 1030);
        assert_eq!(s.iat_for("c", 5), 5);
        // Beyond two hours the offset is reported, not followed.
        assert_eq!(s.observe_clock("d", 1_000_000, 1_000_000 - 7201), 7201);
        assert_eq!(s.iat_for("d", 5000), 5000);
        assert_eq!(s.observe_clock("e", 1_000_000, 1_000_000 + 7200), -7200);
        assert_eq!(s.iat_for("e", 9000), 1800);
        assert_eq!(s.offset("a"), Some(-30));
        let mut all = s.offsets();
        all.sort();
        assert_eq!(all[..2], [("a".to_string(), -30), ("b".to_string(), 30)]);
    }

    #[test]
    fn drift_that_matters() {
        assert!(!drift_matters(0, 60));
        assert!(!drift_matters(4, 60));
        assert!(!drift_matters(-4, 60));
        assert!(drift_matters(5, 60));
        assert!(drift_matters(-120, 60));
        assert!(drift_matters(3600, 60));
        // A 2-second assertion is expired after 2 seconds.
        assert!(drift_matters(2, 2));
    }
}
