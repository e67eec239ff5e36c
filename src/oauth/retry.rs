//! A token fetch's attempts: the circuit breaker first, then bounded attempts with
//! exponential backoff and full jitter (`resilience`), honouring `Retry-After` up to a
//! limit. Each attempt is one `exchange` (`token_endpoint`).

use std::time::Duration;

use super::OAuthError;
use super::cache::AccessToken;
use super::client::OAuthClient;
use super::resilience::{BreakerState, backoff};
use super::secret::Redacted as _;

/// Longest `Retry-After` keybound waits out; a longer one ends the attempt with its value.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One failed exchange, and how long the server asked us to wait.
pub(super) struct AttemptFailure {
    pub(super) error: OAuthError,
    pub(super) retry_after: Option<Duration>,
}

impl From<OAuthError> for AttemptFailure {
    fn from(error: OAuthError) -> Self {
        AttemptFailure {
            error,
            retry_after: None,
        }
    }
}

impl OAuthClient {
    /// Fetches a new token: breaker, bounded attempts, backoff with full jitter, Retry-After.
    pub(super) async fn fetch(&self, scopes: &[String]) -> Result<AccessToken, OAuthError> {
        let endpoint = self.endpoint().await?.clone();
        // Counted per fetch: two fetches at once (different scopes) must not add up.
        let mut round_trips = 0u32;
        let mut attempt = 0;
        loop {
            let admission = match self.breaker.admit() {
                Ok(admission) => admission,
                Err(open) => {
                    return Err(OAuthError::BreakerOpen {
                        endpoint: endpoint.to_string(),
                        failures: open.failures,
                        retry_in_secs: open.retry_in.as_secs_f64().ceil() as u64,
                        last: open.last,
                    });
                }
            };
            attempt += 1;
            match self.exchange(&endpoint, scopes, &mut round_trips).await {
                Ok(mut token) => {
                    admission.success();
                    token.round_trips = round_trips;
                    tracing::info!(client = %self.config.name, token = %token.secret.redacted(),
                        expires_in = ?token.expires_in, round_trips = token.round_trips, "token received");
                    return Ok(token);
                }
                Err(f) if f.error.retryable() => {
                    admission.failure(&f.error.to_string());
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
}
