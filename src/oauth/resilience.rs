//! Retries with exponential backoff and full jitter, and a circuit breaker per token
//! endpoint: after N consecutive failures it fails fast for a cool-down, then lets one
//! probe through.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand_core::RngCore as _;

/// Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): a uniform delay
/// in [0, min(max, initial * 2^attempt)], so retrying clients spread out.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let cap = initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rand_core::OsRng.next_u64() % (millis + 1))
}

/// The breaker's view of an endpoint's health.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    consecutive: u32,
    open_until: Option<Instant>,
    /// Half-open: one probe is in flight; everyone else still fails fast.
    probing: bool,
    last: String,
}

/// Why the breaker refused a request.
#[derive(Clone, Debug)]
pub struct Open {
    pub failures: u32,
    pub retry_in: Duration,
    pub last: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold,
            cooldown,
            state: Mutex::new(State::default()),
        }
    }

    /// May a request go out now? The answer is an [`Admission`] to report the outcome
    /// through; dropped without one (the request's future was cancelled), a half-open
    /// probe frees its slot, so the next request probes instead of being refused forever.
    pub fn admit(&self) -> Result<Admission<'_>, Open> {
        let mut s = self.lock();
        let Some(until) = s.open_until else {
            return Ok(Admission {
                breaker: self,
                probe: false,
            });
        };
        let now = Instant::now();
        if now < until || s.probing {
            return Err(Open {
                failures: s.consecutive,
                retry_in: until.saturating_duration_since(now),
                last: s.last.clone(),
            });
        }
        s.probing = true;
        Ok(Admission {
            breaker: self,
            probe: true,
        })
    }

    fn success(&self) {
        *self.lock() = State::default();
    }

    fn failure(&self, what: &str) {
        let mut s = self.lock();
        s.consecutive += 1;
        s.last = what.to_string();
        if s.probing || s.consecutive >= self.threshold {
            s.open_until = Some(Instant::now() + self.cooldown);
            s.probing = false;
        }
    }

    pub fn state(&self) -> BreakerState {
        let s = self.lock();
        match s.open_until {
            None => BreakerState::Closed,
            Some(_) if s.probing => BreakerState::HalfOpen,
            Some(until) if Instant::now() >= until => BreakerState::HalfOpen,
            Some(_) => BreakerState::Open,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One admitted request. Its outcome is reported through it; a half-open probe dropped
/// without an outcome (its future was cancelled) is a drop guard that frees the probe slot.
#[must_use = "report the outcome, or drop it to release a half-open probe"]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    /// This request holds the half-open slot (`State::probing`) until it reports.
    probe: bool,
}

impl Admission<'_> {
    pub fn success(mut self) {
        self.probe = false;
        self.breaker.success();
    }

    pub fn failure(mut self, what: &str) {
        self.probe = false;
        self.breaker.failure(what);
    }
}

impl std::fmt::Debug for Admission<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("probe", &self.probe)
            .finish()
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe {
            // Only one probe at a time, and it is this one: nobody else set the flag.
            // The breaker stays open, its cool-down over: the next request probes.
            self.breaker.lock().probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let (i, m) = (Duration::from_millis(100), Duration::from_millis(1000));
        for attempt in 0..30 {
            assert!(backoff(attempt, i, m) <= m);
        }
        assert!(backoff(0, i, m) <= i);
    }

    #[test]
    fn opens_after_threshold_then_lets_one_probe_through() {
        let b = Breaker::new(2, Duration::ZERO);
        b.failure("500");
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure("500");
        // Cool-down of zero: the next admit is the single probe.
        let probe = b.admit().unwrap();
        assert!(b.admit().is_err(), "only one probe while half-open");
        probe.failure("500 again");
        let probe = b.admit().unwrap();
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit().is_ok());

        let b = Breaker::new(1, Duration::from_secs(60));
        b.failure("timeout");
        let open = b.admit().unwrap_err();
        assert_eq!(open.failures, 1);
        assert!(open.retry_in > Duration::from_secs(50));
    }

    /// A half-open probe whose future is dropped (the caller timed out, the connection
    /// closed) reports nothing: the half-open slot must be free again, not taken forever.
    #[test]
    fn a_dropped_probe_frees_the_half_open_slot() {
        use std::future::Future as _;
        use std::task::{Context, Waker};

        let b = Breaker::new(1, Duration::ZERO);
        b.failure("timeout");
        {
            let probe = async {
                let _admitted = b.admit().unwrap();
                std::future::pending::<()>().await;
            };
            let mut probe = std::pin::pin!(probe);
            // Polled once: admitted, now waiting on the server; then dropped.
            assert!(
                probe
                    .as_mut()
                    .poll(&mut Context::from_waker(Waker::noop()))
                    .is_pending()
            );
        }
        assert!(
            b.admit().is_ok(),
            "the breaker refuses forever after a dropped probe"
        );
    }
}
