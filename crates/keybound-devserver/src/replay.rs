//! Replay caches for `jti` values (RFC 7523 §3 item 7, RFC 9449 §11.1). An entry lives until
//! the moment its token could no longer be accepted anyway, so the cache stays bounded by
//! the request rate times the acceptance window; a hard cap guards against floods.

use std::collections::HashMap;
use std::sync::Mutex;

use super::lock;

/// How often expired entries are swept, in seconds.
const SWEEP_EVERY: i64 = 10;

/// Remembers keys until their expiry. `Mutex` (not an async lock): held only for a map
/// operation, never across `.await`.
#[derive(Debug)]
pub struct ReplayCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// key -> Unix time from which the entry no longer counts.
    seen: HashMap<String, i64>,
    next_sweep: i64,
}

/// The outcome of [`ReplayCache::first_use`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Not seen before; now recorded.
    First,
    /// Seen before and not yet expired.
    Replayed,
    /// The cache is full of live entries; the caller should refuse, not forget.
    Full,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> ReplayCache {
        ReplayCache {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    /// Records `key` until `expires_at` unless a live entry for it exists.
    pub fn first_use(&self, key: String, expires_at: i64, now: i64) -> Use {
        let mut inner = lock(&self.inner);
        if now >= inner.next_sweep || inner.seen.len() >= self.capacity {
            inner.seen.retain(|_, exp| *exp > now);
            inner.next_sweep = now + SWEEP_EVERY;
        }
        if inner.seen.get(&key).is_some_and(|exp| *exp > now) {
            return Use::Replayed;
        }
        if inner.seen.len() >= self.capacity {
            return Use::Full;
        }
        inner.seen.insert(key, expires_at);
        Use::First
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_caught_until_expiry() {
        let cache = ReplayCache::new(10);
        assert_eq!(cache.first_use("a".into(), 100, 50), Use::First);
        assert_eq!(cache.first_use("a".into(), 100, 99), Use::Replayed);
        assert_eq!(cache.first_use("b".into(), 100, 99), Use::First);
        // Once expired, the entry is gone: the token itself would be refused by then.
        assert_eq!(cache.first_use("a".into(), 200, 100), Use::First);
    }

    #[test]
    fn expired_entries_are_swept_and_the_cap_holds() {
        let cache = ReplayCache::new(3);
        for key in ["a", "b", "c"] {
            assert_eq!(cache.first_use(key.into(), 10, 0), Use::First);
        }
        assert_eq!(cache.first_use("d".into(), 10, 1), Use::Full);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.first_use("d".into(), 30, 10), Use::First);
        assert_eq!(cache.len(), 1);
    }
}
