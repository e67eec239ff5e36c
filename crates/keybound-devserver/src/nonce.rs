//! Server-provided DPoP nonces (RFC 9449 §8 for the authorization server, §9 for the
//! resource server): random 128-bit values, rotated every 5 minutes, the previous one still
//! accepted so that a client racing a rotation is not refused.

use std::sync::Mutex;

use super::{lock, random_b64};

/// Seconds between rotations.
pub const ROTATE_EVERY: i64 = 300;

/// The current and previous nonce. `Mutex`: held for a comparison, never across `.await`.
#[derive(Debug)]
pub struct NonceRing {
    inner: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    current: String,
    previous: Option<String>,
    rotated_at: i64,
}

impl NonceRing {
    pub fn new(now: i64) -> Result<NonceRing, rand_core::Error> {
        Ok(NonceRing {
            inner: Mutex::new(Ring {
                current: random_b64::<16>()?,
                previous: None,
                rotated_at: now,
            }),
        })
    }

    /// The nonce to send in `DPoP-Nonce`.
    pub fn current(&self, now: i64) -> String {
        let mut ring = lock(&self.inner);
        ring.rotate_if_due(now, random_b64::<16>);
        ring.current.clone()
    }

    /// Whether a proof's `nonce` is the current or the previous one.
    pub fn accepts(&self, nonce: Option<&str>, now: i64) -> bool {
        let Some(nonce) = nonce else {
            return false;
        };
        let mut ring = lock(&self.inner);
        ring.rotate_if_due(now, random_b64::<16>);
        ring.current == nonce || ring.previous.as_deref() == Some(nonce)
    }
}

impl Ring {
    fn rotate_if_due(
        &mut self,
        now: i64,
        fresh: impl FnOnce() -> Result<String, rand_core::Error>,
    ) {
        let elapsed = now - self.rotated_at;
        if elapsed < ROTATE_EVERY {
            return;
        }
        match fresh() {
            Ok(fresh) => {
                let old = std::mem::replace(&mut self.current, fresh);
                // The previous nonce stays valid for one period after it was replaced; after
                // two idle periods it would be older than that.
                self.previous = (elapsed < 2 * ROTATE_EVERY).then_some(old);
                self.rotated_at = now;
            }
            // Keeping the old nonce a while longer is better than refusing every request.
            Err(e) => tracing::error!("cannot rotate the DPoP nonce: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_previous_nonce_for_one_period() {
        let ring = NonceRing::new(1000).unwrap();
        let first = ring.current(1000);
        assert_eq!(first.len(), 22, "128 bits, base64url");
        assert!(ring.accepts(Some(&first), 1299));
        assert!(!ring.accepts(None, 1000));
        assert!(!ring.accepts(Some("other"), 1000));

        let second = ring.current(1300);
        assert_ne!(first, second);
        assert!(ring.accepts(Some(&first), 1300));
        assert!(ring.accepts(Some(&second), 1300));

        let third = ring.current(1600);
        assert!(!ring.accepts(Some(&first), 1600));
        assert!(ring.accepts(Some(&second), 1600));
        assert!(ring.accepts(Some(&third), 1600));
    }

    #[test]
    fn after_a_long_idle_only_the_fresh_nonce_counts() {
        let ring = NonceRing::new(0).unwrap();
        let old = ring.current(0);
        let fresh = ring.current(10_000);
        assert!(!ring.accepts(Some(&old), 10_000));
        assert!(ring.accepts(Some(&fresh), 10_000));
    }
}
