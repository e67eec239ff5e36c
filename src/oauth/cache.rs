//! The in-process token cache: one entry per scope set, refreshed ahead of expiry; callers
//! that arrive while a fetch is under way wait for it instead of starting their own
//! (single-flight).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::OAuthError;
use super::secret::SecretString;

/// A token as the server granted it.
#[derive(Debug)]
pub struct AccessToken {
    pub secret: SecretString,
    pub token_type: String,
    pub expires_in: Option<u64>,
    /// Granted scopes (the requested ones when the response omitted `scope`).
    pub scopes: Vec<String>,
    pub received: Instant,
    /// HTTP exchanges this token cost, nonce challenges and retries included.
    pub round_trips: u32,
    /// The DPoP key the token is bound to (its `cnf.jkt`): every proof sent with this token
    /// is signed by this key, even after the slot rotated to another generation, so a
    /// token is never sent with a proof from another key.
    pub dpop_key: Option<crate::keyring::SigningKey>,
}

impl AccessToken {
    /// `None`: no expiry given, or one past what an `Instant` holds (a server's
    /// `expires_in` of 2^64 - 1), which is no expiry either.
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_in
            .and_then(|s| self.received.checked_add(Duration::from_secs(s)))
    }

    /// Still usable `margin` from now.
    pub fn valid_for(&self, margin: Duration) -> bool {
        self.expires_at().is_none_or(|e| {
            Instant::now()
                .checked_add(margin)
                .is_some_and(|then| then < e)
        })
    }
}

/// One scope set's entry. Its async mutex is held for the whole fetch: holding it is the
/// single flight, and late callers wait on it for the result.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<AccessToken>>>>;

#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<Vec<String>, Slot>>,
}

/// A token from the cache, and whether it was there (`hit`) or fetched for this call.
pub struct Lookup {
    pub token: Arc<AccessToken>,
    pub hit: bool,
}

impl TokenCache {
    /// The cached token for `scopes` if it is good beyond `refresh_ahead`, else `fetch`'s.
    /// When a refresh fails but the old token is still valid, the old one is returned.
    pub async fn get<F, Fut>(
        &self,
        scopes: &[String],
        refresh_ahead: Duration,
        fetch: F,
    ) -> Result<Lookup, OAuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<AccessToken, OAuthError>>,
    {
        let slot = self.slot(scopes);
        let mut entry = slot.lock().await;
        if let Some(t) = entry.as_ref().filter(|t| t.valid_for(refresh_ahead)) {
            return Ok(Lookup {
                token: t.clone(),
                hit: true,
            });
        }
        let token = match fetch().await {
            Ok(t) => {
                let t = Arc::new(t);
                *entry = Some(t.clone());
                Ok(t)
            }
            Err(e) => match entry
                .as_ref()
                .filter(|t| t.valid_for(Duration::from_secs(5)))
            {
                Some(old) => {
                    tracing::warn!("token refresh failed, using the still-valid token: {e}");
                    Ok(old.clone())
                }
                None => Err(e),
            },
        };
        token.map(|token| Lookup { token, hit: false })
    }

    /// Forgets the token for `scopes` (the server said it is no longer valid).
    pub async fn invalidate(&self, scopes: &[String]) {
        *self.slot(scopes).lock().await = None;
    }

    /// The DPoP key a cached token (by its secret) is bound to. A slot whose fetch is under
    /// way is skipped.
    pub fn bound_key(&self, secret: &str) -> Option<crate::keyring::SigningKey> {
        use secrecy::ExposeSecret as _;
        self.tokens()
            .into_iter()
            .find(|t| t.secret.expose_secret() == secret)
            .and_then(|t| t.dpop_key.clone())
    }

    /// Every cached token (a slot whose fetch is under way is skipped).
    pub fn tokens(&self) -> Vec<Arc<AccessToken>> {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .filter_map(|slot| slot.try_lock().ok()?.clone())
            .collect()
    }

    /// Forgets every token. A fetch in flight keeps its own slot, so nothing waits here.
    pub fn clear(&self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn slot(&self, scopes: &[String]) -> Slot {
        let mut key = scopes.to_vec();
        key.sort();
        key.dedup();
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn token(expires_in: u64) -> AccessToken {
        AccessToken {
            secret: SecretString::from("t"),
            token_type: "DPoP".into(),
            expires_in: Some(expires_in),
            scopes: vec![],
            received: Instant::now(),
            round_trips: 1,
            dpop_key: None,
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&["a".into()], Duration::from_secs(60), || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(token(3600))
                    })
                    .await
                    .map(|lookup| lookup.hit)
            }));
        }
        let (mut hits, mut misses) = (0, 0);
        for t in tasks {
            match t.await.unwrap().unwrap() {
                true => hits += 1,
                false => misses += 1,
            }
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(misses, 1);
        assert_eq!(hits, 15);
    }

    #[tokio::test]
    async fn refreshes_ahead_of_expiry() {
        let cache = TokenCache::default();
        let s = ["a".to_string()];
        cache
            .get(&s, Duration::from_secs(60), || async { Ok(token(30)) })
            .await
            .unwrap();
        // 30 s left is inside the 60 s refresh window: fetch again.
        let t = cache
            .get(&s, Duration::from_secs(60), || async { Ok(token(3600)) })
            .await
            .unwrap();
        assert_eq!(t.token.expires_in, Some(3600));
        // A failed refresh keeps a still-valid token.
        let t = cache
            .get(&s, Duration::from_secs(7200), || async {
                Err(OAuthError::Empty { what: "x" })
            })
            .await
            .unwrap();
        assert_eq!(t.token.expires_in, Some(3600));
    }
}
