//! What keybound learns about each server as it talks to it: the current DPoP nonce
//! (RFC 9449 §8, §9), kept separately for the authorization server and resource servers of
//! the same origin, and the clock offset read from `Date`.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Which role a nonce belongs to: Okta's org authorization server and its API share an
/// origin but issue different nonces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    AuthorizationServer,
    ResourceServer,
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

    /// Records `server_now - local_now` from a response's `Date` header.
    pub fn observe_clock(&self, origin: &str, server_now: u64, local_now: u64) {
        let offset = i64::try_from(server_now).unwrap_or(i64::MAX)
            - i64::try_from(local_now).unwrap_or(i64::MAX);
        lock(&self.offsets).insert(origin.to_string(), offset);
    }

    /// `iat` for a server: never ahead of its clock (Okta rejects a future `iat`). `Date`
    /// has one-second resolution and truncates, so the estimate errs on the early side.
    pub fn iat_for(&self, origin: &str, local_now: u64) -> u64 {
        match self.offset(origin) {
            Some(off) if off < 0 => local_now.saturating_sub(off.unsigned_abs()),
            _ => local_now,
        }
    }
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
    fn iat_follows_a_slow_server_only() {
        let s = ServerState::default();
        s.observe_clock("a", 1000, 1030);
        assert_eq!(s.iat_for("a", 1030), 1000);
        s.observe_clock("b", 1030, 1000);
        assert_eq!(s.iat_for("b", 1000), 1000);
        assert_eq!(s.iat_for("c", 5), 5);
    }
}
