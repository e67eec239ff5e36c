//! `keybound bench`: the device's raw signing rate and the full JWS pipeline's rate on the
//! same sessions, measured in one run, interleaved so machine noise hits both alike.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::keyring::SigningKey;
use crate::oauth::{self, OAuthError, dpop};

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub key: String,
    pub alg: String,
    pub sessions: usize,
    /// Concurrent pipeline callers: twice the sessions, so a session never waits for JOSE work.
    pub callers: usize,
    pub seconds: f64,
    pub raw_per_s: f64,
    pub pipeline_per_s: f64,
    /// pipeline / raw.
    pub ratio: f64,
    pub pipeline_p50_us: u64,
    pub pipeline_p99_us: u64,
}

/// Alternates raw and pipeline phases of about half a second each for `seconds` in all:
/// on a shared machine, noise then lands on both sides alike.
pub fn run(key: &SigningKey, sessions: usize, seconds: f64) -> Result<Report, OAuthError> {
    let rounds = (seconds.round() as u32).clamp(1, 600);
    let phase = Duration::from_secs_f64((seconds / f64::from(2 * rounds)).max(0.05));
    let callers = 2 * sessions;
    // Warm up: sessions opened, logged in, key handles cached, before anything is timed.
    pipeline(key, callers, Duration::from_millis(50))?;

    let tbs = key
        .alg()
        .to_be_signed(b"keybound bench: raw device signature");
    let (mut raw, mut piped, mut latencies) = (0u64, 0u64, Vec::new());
    for _ in 0..rounds {
        raw += key_backend_raw(key, &tbs, phase)?;
        let (n, mut lat) = pipeline(key, callers, phase)?;
        piped += n;
        latencies.append(&mut lat);
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let measured = phase.as_secs_f64() * f64::from(rounds);
    let raw_per_s = raw as f64 / measured;
    let pipeline_per_s = piped as f64 / measured;
    Ok(Report {
        key: key.label().into(),
        alg: key.alg().to_string(),
        sessions,
        callers,
        seconds: 2.0 * measured,
        raw_per_s,
        pipeline_per_s,
        ratio: if raw_per_s > 0.0 {
            pipeline_per_s / raw_per_s
        } else {
            0.0
        },
        pipeline_p50_us: pct(0.50),
        pipeline_p99_us: pct(0.99),
    })
}

fn key_backend_raw(
    key: &SigningKey,
    tbs: &crate::jose::ToBeSigned,
    phase: Duration,
) -> Result<u64, OAuthError> {
    Ok(key.raw_rate(tbs, phase)?)
}

/// `callers` threads each building, signing and serialising DPoP proofs until the deadline.
/// Returns the count and every latency in microseconds.
fn pipeline(
    key: &SigningKey,
    callers: usize,
    phase: Duration,
) -> Result<(u64, Vec<u64>), OAuthError> {
    let until = Instant::now() + phase;
    let header = dpop::header(key.alg(), key.public());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..callers)
            .map(|_| {
                let header = &header;
                scope.spawn(move || -> Result<Vec<u64>, OAuthError> {
                    let mut lat = Vec::new();
                    while Instant::now() < until {
                        let start = Instant::now();
                        let claims = dpop::claims(
                            "POST",
                            "https://bench.keybound.invalid/oauth2/v1/token",
                            None,
                            None,
                            oauth::unix_now(),
                            oauth::new_jti()?,
                        )?;
                        oauth::sign(key, header, &claims)?;
                        lat.push(start.elapsed().as_micros() as u64);
                    }
                    Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            match h.join() {
                Ok(lat) => all.extend(lat?),
                Err(_) => return Err(OAuthError::Token(crate::token::TokenError::WorkersGone)),
            }
        }
        Ok((all.len() as u64, all))
    })
}
