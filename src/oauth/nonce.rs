//! The one retry policy for a request that carries a DPoP proof, used by the token
//! endpoint (`token_endpoint`) and by API calls (`api`):
//!
//! - a `use_dpop_nonce` challenge (RFC 9449 §8, §9) gets exactly one retry, with a new
//!   proof carrying the nonce the challenge brought; a second challenge, or one without a
//!   new nonce, is a [`OAuthError::NonceLoop`];
//! - a refusal whose `Date` shows the server's clock too far from the time the request was
//!   stated in gets exactly one retry, in the server's time (at first contact keybound has
//!   no `Date` yet);
//!
//! so one request costs at most three exchanges. Each retry builds the request anew: a
//! fresh `jti`, a fresh proof, a fresh assertion (the server consumed the first one's).

use http::{Request, Response};

use super::OAuthError;
use super::client::OAuthClient;
use super::state::{ClockNote, Role, drift_matters};

/// Exchanges one logical request may cost: the first, one nonce retry, one clock retry.
pub const MAX_EXCHANGES: u32 = 3;

/// What a response asks of the policy; the caller reads its own protocol's error shape
/// (an RFC 6749 §5.2 body, a `WWW-Authenticate` challenge).
pub enum Ask {
    /// Nothing to retry: the response is the answer.
    Nothing,
    /// `use_dpop_nonce`.
    Nonce,
    /// A refusal the clock can cause, of a request whose times are valid `lifetime`
    /// seconds (`u64::MAX` for a proof, which has no lifetime of its own).
    Clock { lifetime: u64 },
}

/// The retries spent so far; one budget per logical request.
#[derive(Debug, Default)]
pub struct Budget {
    nonce: bool,
    clock: bool,
}

/// The answer, and what was known of the server's clock when it came.
pub struct Answer {
    pub response: Response<Vec<u8>>,
    /// Offset from this response's `Date`, and the drift of the request's times from it.
    pub clock: Option<ClockNote>,
}

impl OAuthClient {
    /// Sends the request `build` makes for the current nonce of (`role`, `origin`) under
    /// the policy of this module; `ask` reads each response. Every response is observed
    /// (nonce, clock, metrics); `exchanges` counts each one sent.
    pub(super) async fn send_with_nonce<B, Fut>(
        &self,
        role: Role,
        origin: &str,
        budget: &mut Budget,
        exchanges: &mut u32,
        mut build: B,
        ask: impl Fn(&Response<Vec<u8>>) -> Ask,
    ) -> Result<Answer, OAuthError>
    where
        B: FnMut(Option<String>) -> Fut,
        Fut: Future<Output = Result<Request<Vec<u8>>, OAuthError>>,
    {
        loop {
            let nonce = self.state.nonce(role, origin);
            // The offset this request's times are stated with (0: this machine's clock).
            let assumed = self.state.offset(origin).unwrap_or(0);
            let request = build(nonce.clone()).await?;
            *exchanges = exchanges.saturating_add(1);
            let response = self.transport.send(request).await?;
            self.observer.response(&self.config.name, response.status());
            let measured = self.observe(origin, role, response.headers());
            let clock = measured.map(|offset| ClockNote {
                offset,
                drift: offset - assumed,
                retried: budget.clock,
            });
            match ask(&response) {
                Ask::Nonce => {
                    let fresh = self.state.nonce(role, origin);
                    if budget.nonce || fresh.is_none() || fresh == nonce {
                        return Err(OAuthError::NonceLoop {
                            origin: origin.to_string(),
                        });
                    }
                    budget.nonce = true;
                    self.observer.nonce_challenge(&self.config.name);
                    tracing::info!(client = %self.config.name, %origin,
                        "DPoP nonce challenge; retrying once with the nonce");
                }
                Ask::Clock { lifetime }
                    if !budget.clock && clock.is_some_and(|c| drift_matters(c.drift, lifetime)) =>
                {
                    budget.clock = true;
                    tracing::warn!(client = %self.config.name, %origin, offset = ?measured,
                        "request refused, and the server's clock is off from this machine's; retrying once with iat/exp in the server's time");
                }
                _ => {
                    return Ok(Answer { response, clock });
                }
            }
        }
    }
}
