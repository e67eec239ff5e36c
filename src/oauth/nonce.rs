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
use super::observe::UpstreamObserver;
use super::state::{ClockNote, Role, ServerState, drift_matters, followable};
use super::transport::Transport;

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
pub struct NonceAnswer<T = Vec<u8>> {
    pub response: Response<T>,
    /// Offset from this response's `Date`, and the drift of the request's times from it.
    pub clock: Option<ClockNote>,
}

/// Who talks to whom: the client's transport, server state and observer, and the
/// server (`role` at `origin`) the request goes to.
pub struct NoncePeer<'a> {
    pub transport: &'a dyn Transport,
    pub state: &'a ServerState,
    pub observer: &'a dyn UpstreamObserver,
    /// The client's configured name, for the observer and the log.
    pub client: &'a str,
    pub role: Role,
    pub origin: &'a str,
}

impl NoncePeer<'_> {
    /// Sends the request `build` makes for the current nonce under the policy of this
    /// module; `ask` reads each response. Every response is observed (nonce, clock,
    /// observer); `exchanges` counts each one sent.
    pub async fn send<B, Fut>(
        &self,
        budget: &mut Budget,
        exchanges: &mut u32,
        build: B,
        ask: impl Fn(&Response<Vec<u8>>) -> Ask,
    ) -> Result<NonceAnswer, OAuthError>
    where
        B: FnMut(Option<String>) -> Fut,
        Fut: Future<Output = Result<Request<Vec<u8>>, OAuthError>>,
    {
        let transport = self.transport;
        self.send_via(budget, exchanges, build, |r| transport.send(r), ask)
            .await
    }

    /// [`Self::send`] through `transmit`, which may return the body unread (the gateway
    /// streams it): a response that is retried is dropped, its body with it.
    pub async fn send_via<T, B, Fut, S, SFut>(
        &self,
        budget: &mut Budget,
        exchanges: &mut u32,
        mut build: B,
        transmit: S,
        ask: impl Fn(&Response<T>) -> Ask,
    ) -> Result<NonceAnswer<T>, OAuthError>
    where
        B: FnMut(Option<String>) -> Fut,
        Fut: Future<Output = Result<Request<Vec<u8>>, OAuthError>>,
        S: Fn(Request<Vec<u8>>) -> SFut,
        SFut: Future<Output = Result<Response<T>, super::transport::TransportError>>,
    {
        let (role, origin, client) = (self.role, self.origin, self.client);
        loop {
            let nonce = self.state.nonce(role, origin);
            // The offset this request's times are stated with (0: this machine's clock).
            let assumed = self.state.applied_offset(origin);
            let request = build(nonce.clone()).await?;
            *exchanges = exchanges.saturating_add(1);
            let response = transmit(request).await?;
            self.observer.response(client, response.status());
            let measured = self.state.observe(role, origin, response.headers());
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
                    self.observer.nonce_challenge(client);
                    tracing::info!(%client, %origin, "DPoP nonce challenge; retrying once with the nonce");
                }
                Ask::Clock { lifetime }
                    if !budget.clock
                        && clock.is_some_and(|c| {
                            followable(c.offset) && drift_matters(c.drift, lifetime)
                        }) =>
                {
                    budget.clock = true;
                    tracing::warn!(%client, %origin, offset = ?measured,
                        "request refused, and the server's clock is off from this machine's; retrying once with iat/exp in the server's time");
                }
                _ => return Ok(NonceAnswer { response, clock }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::oauth::observe::NoObserver;
    use crate::oauth::transport::Sending;

    /// An in-memory server: answers from a script, records what it was sent.
    #[derive(Default)]
    struct Scripted {
        replies: Mutex<VecDeque<Response<Vec<u8>>>>,
        sent: Mutex<Vec<Request<Vec<u8>>>>,
    }

    impl Transport for Scripted {
        fn send(&self, request: Request<Vec<u8>>) -> Sending<'_> {
            self.sent.lock().unwrap().push(request);
            let reply = self.replies.lock().unwrap().pop_front();
            Box::pin(async move { Ok(reply.expect("a scripted reply for every request")) })
        }
    }

    /// A reply asking for `ask` ("nonce", "clock" or nothing), with a `DPoP-Nonce` and
    /// a `Date` `skew` seconds off this machine's clock when given.
    fn reply(status: u16, ask: &str, nonce: Option<&str>, skew: Option<i64>) -> Response<Vec<u8>> {
        let mut r = Response::builder().status(status).header("x-ask", ask);
        if let Some(n) = nonce {
            r = r.header("dpop-nonce", n);
        }
        if let Some(s) = skew {
            let shift = Duration::from_secs(s.unsigned_abs());
            let now = SystemTime::now();
            let at = if s < 0 { now - shift } else { now + shift };
            r = r.header("date", httpdate::fmt_http_date(at));
        }
        r.body(Vec::new()).unwrap()
    }

    /// Runs one logical request against `replies`: its result, and the nonce each
    /// request sent carried.
    async fn run(
        replies: Vec<Response<Vec<u8>>>,
    ) -> (Result<NonceAnswer, OAuthError>, u32, Vec<Option<String>>) {
        let transport = Scripted {
            replies: Mutex::new(replies.into()),
            ..Scripted::default()
        };
        let state = ServerState::default();
        let peer = NoncePeer {
            transport: &transport,
            state: &state,
            observer: &NoObserver,
            client: "c",
            role: Role::AuthorizationServer,
            origin: "https://as.example",
        };
        let mut exchanges = 0;
        let result = peer
            .send(
                &mut Budget::default(),
                &mut exchanges,
                |nonce| async move {
                    let mut r = Request::post("https://as.example/token");
                    if let Some(n) = nonce {
                        r = r.header("x-nonce", n);
                    }
                    Ok(r.body(Vec::new()).unwrap())
                },
                |response| match response.headers()["x-ask"].to_str().unwrap() {
                    "nonce" => Ask::Nonce,
                    "clock" => Ask::Clock { lifetime: 60 },
                    _ => Ask::Nothing,
                },
            )
            .await;
        let nonces = transport
            .sent
            .into_inner()
            .unwrap()
            .iter()
            .map(|r| {
                r.headers()
                    .get("x-nonce")
                    .map(|v| v.to_str().unwrap().to_string())
            })
            .collect();
        (result, exchanges, nonces)
    }

    #[tokio::test]
    async fn a_nonce_challenge_is_answered_once_with_its_nonce() {
        let (r, n, nonces) = run(vec![
            reply(400, "nonce", Some("n1"), None),
            reply(200, "", None, None),
        ])
        .await;
        assert_eq!(r.unwrap().response.status(), 200);
        assert_eq!((n, nonces), (2, vec![None, Some("n1".into())]));

        let (r, n, _) = run(vec![
            reply(400, "nonce", Some("n1"), None),
            reply(400, "nonce", Some("n2"), None),
        ])
        .await;
        assert!(
            matches!(r, Err(OAuthError::NonceLoop { .. })),
            "{:?}",
            r.err()
        );
        assert_eq!(n, 2);
        // A challenge that brings no new nonce is not retried at all.
        let (r, n, _) = run(vec![reply(400, "nonce", None, None)]).await;
        assert!(matches!(r, Err(OAuthError::NonceLoop { .. })));
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn a_clock_refusal_is_retried_once_and_only_when_the_date_says_so() {
        // No Date: nothing to retry in.
        let (r, n, _) = run(vec![reply(401, "clock", None, None)]).await;
        assert_eq!((r.unwrap().clock, n), (None, 1));
        // In step with this machine: not the clock.
        let (r, n, _) = run(vec![reply(401, "clock", None, Some(0))]).await;
        assert_eq!(n, 1);
        assert!(!r.unwrap().clock.unwrap().retried);
        // Two minutes ahead: one retry; refused again, the answer says it was retried.
        let (r, n, _) = run(vec![
            reply(401, "clock", None, Some(120)),
            reply(401, "clock", None, Some(120)),
        ])
        .await;
        let clock = r.unwrap().clock.unwrap();
        assert_eq!(n, 2);
        assert!(clock.retried && clock.offset >= 118, "{clock:?}");
        // Over two hours off: reported, not followed, so no retry that could not help.
        let (r, n, _) = run(vec![
            reply(401, "clock", None, Some(7300)),
            reply(401, "clock", None, Some(7300)),
        ])
        .await;
        let clock = r.unwrap().clock.unwrap();
        assert_eq!(n, 1);
        assert!(!clock.retried && clock.offset >= 7298, "{clock:?}");
    }

    /// Both retries in either order, then the third answer stands: at most three
    /// exchanges for one request.
    #[tokio::test]
    async fn at_most_three_exchanges() {
        let (r, n, nonces) = run(vec![
            reply(401, "clock", None, Some(-120)),
            reply(400, "nonce", Some("n1"), Some(-120)),
            reply(401, "clock", None, Some(-120)),
            reply(200, "", None, None),
        ])
        .await;
        assert_eq!(r.unwrap().response.status(), 401);
        assert_eq!(n, MAX_EXCHANGES);
        assert_eq!(nonces, [None, None, Some("n1".into())]);

        let (r, n, _) = run(vec![
            reply(400, "nonce", Some("n1"), None),
            reply(401, "clock", None, Some(300)),
            reply(400, "nonce", Some("n2"), Some(300)),
            reply(200, "", None, None),
        ])
        .await;
        assert!(matches!(r, Err(OAuthError::NonceLoop { .. })));
        assert_eq!(n, MAX_EXCHANGES);
    }
}
