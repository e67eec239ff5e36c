//! `keybound bench`: the device's raw signing rate against the full JWS pipeline in this
//! process, or against the running agent, on the same token, measured in one run and
//! interleaved so that machine noise hits both sides alike.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::jose::ToBeSigned;
use crate::keyring::SigningKey;
use crate::oauth::{self, OAuthError, dpop};

/// What one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// "pipeline" (JWS pipeline in this process) or "agent" (proofs from `keybound serve`).
    pub mode: &'static str,
    pub key: String,
    pub alg: String,
    pub sessions: usize,
    /// Concurrent callers on the measured side.
    pub callers: usize,
    pub seconds: f64,
    pub raw_per_s: f64,
    /// Proofs per second of the measured side (pipeline or agent).
    pub pipeline_per_s: f64,
    /// measured side / raw.
    pub ratio: f64,
    pub pipeline_p50_us: u64,
    pub pipeline_p99_us: u64,
}

/// Errors of a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    #[error("{0}")]
    Agent(String),
}

/// Proofs made in one phase, and each one's latency in microseconds.
type Phase = (u64, Vec<u64>);

/// The in-process pipeline: `2 * sessions` callers, so a session never waits for JOSE work.
pub fn run(key: &SigningKey, sessions: usize, seconds: f64) -> Result<Report, BenchError> {
    let callers = 2 * sessions;
    measure(key, sessions, callers, seconds, "pipeline", |phase| {
        Ok(pipeline(key, callers, phase)?)
    })
}

/// The running agent: `clients` connections to its socket, each asking for DPoP proofs
/// with `key` in a loop. The raw side signs on this process's own `sessions` sessions.
pub fn run_agent(
    key: &SigningKey,
    sessions: usize,
    socket: &Path,
    clients: usize,
    seconds: f64,
) -> Result<Report, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Agent(format!("cannot start the async runtime: {e}")))?;
    measure(key, sessions, clients, seconds, "agent", |phase| {
        runtime.block_on(agent_phase(socket, key.label(), clients, phase))
    })
}

/// Alternates raw and measured phases of about half a second each for `seconds` in all,
/// after a short warm-up (sessions opened, handles cached) that is not counted.
fn measure(
    key: &SigningKey,
    sessions: usize,
    callers: usize,
    seconds: f64,
    mode: &'static str,
    mut measured: impl FnMut(Duration) -> Result<Phase, BenchError>,
) -> Result<Report, BenchError> {
    let rounds = (seconds.round() as u32).clamp(1, 600);
    let phase = Duration::from_secs_f64((seconds / f64::from(2 * rounds)).max(0.05));
    measured(Duration::from_millis(100))?;
    let tbs = key
        .alg()
        .to_be_signed(b"keybound bench: raw device signature");
    let (mut raw, mut made, mut latencies) = (0u64, 0u64, Vec::new());
    for _ in 0..rounds {
        raw += raw_phase(key, &tbs, phase)?;
        let (n, mut lat) = measured(phase)?;
        made += n;
        latencies.append(&mut lat);
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).copied().unwrap_or(0)
    };
    let secs = phase.as_secs_f64() * f64::from(rounds);
    let raw_per_s = raw as f64 / secs;
    let made_per_s = made as f64 / secs;
    Ok(Report {
        mode,
        key: key.label().into(),
        alg: key.alg().to_string(),
        sessions,
        callers,
        seconds: 2.0 * secs,
        raw_per_s,
        pipeline_per_s: made_per_s,
        ratio: if raw_per_s > 0.0 {
            made_per_s / raw_per_s
        } else {
            0.0
        },
        pipeline_p50_us: pct(0.50),
        pipeline_p99_us: pct(0.99),
    })
}

fn raw_phase(key: &SigningKey, tbs: &ToBeSigned, phase: Duration) -> Result<u64, BenchError> {
    Ok(key.raw_rate(tbs, phase).map_err(OAuthError::from)?)
}

/// `callers` threads each building, signing and serialising DPoP proofs until the deadline.
fn pipeline(key: &SigningKey, callers: usize, phase: Duration) -> Result<Phase, OAuthError> {
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

/// `clients` keep-alive connections asking the agent for proofs until the deadline.
async fn agent_phase(
    socket: &Path,
    key: &str,
    clients: usize,
    phase: Duration,
) -> Result<Phase, BenchError> {
    let until = tokio::time::Instant::now() + phase;
    let body = serde_json::json!({
        "key": key, "htm": "POST", "htu": "https://bench.keybound.invalid/oauth2/v1/token",
    });
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (socket, body) = (socket.to_path_buf(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = crate::agent::client::AgentConnection::connect(&socket)
                .await
                .map_err(|e| BenchError::Agent(e.to_string()))?;
            let mut lat = Vec::new();
            while tokio::time::Instant::now() < until {
                let start = Instant::now();
                let (status, reply) = conn
                    .request(http::Method::POST, "/v1/dpop", Some(&body))
                    .await
                    .map_err(|e| BenchError::Agent(e.to_string()))?;
                if !status.is_success() {
                    return Err(BenchError::Agent(format!(
                        "the agent answered {status}: {}",
                        String::from_utf8_lossy(&reply)
                    )));
                }
                lat.push(start.elapsed().as_micros() as u64);
            }
            Ok::<_, BenchError>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let lat = t
            .await
            .map_err(|e| BenchError::Agent(format!("a bench client failed: {e}")))??;
        all.extend(lat);
    }
    Ok((all.len() as u64, all))
}
