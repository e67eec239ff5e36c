//! `keybound bench`: the device's raw signing rate against the full JWS pipeline in this
//! process, or against the running agent, on the same token, measured in one run and
//! interleaved so that machine noise hits both sides alike. The `--agent` load generator
//! is in `load`.

mod gateway;
mod load;

pub use gateway::{GatewayReport, run_gateway};

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::jose::ToBeSigned;
use crate::keyring::SigningKey;
use crate::oauth::{self, OAuthError, dpop};
use crate::token::signer::{depth_of, signed_until};

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
    /// Where the CPU went (`--agent` only, from `/proc`); see [`CpuSplit`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuSplit>,
    /// The agent's resident memory in KiB (`--agent` only): before the run, and its peak
    /// (`VmHWM`) after it. A bounded queue keeps the peak flat however hard it is driven.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_rss_kib: Option<(u64, u64)>,
}

/// CPU time per operation, in microseconds, measured from the threads' own counters
/// (`/proc/<pid>/task/*/schedstat`). On a machine where the device computes on the same
/// cores as the agent (SoftHSM), `agent / raw` is about
/// `raw_sign_us / (agent_device_us + agent_async_us + client_us)`. In the pipeline mode
/// the "agent" fields are this process's: its device (signer processes or device threads)
/// and its other threads (the pipeline's async thread, and the rest, which is idle
/// then), and `client_us` is 0.
#[derive(Clone, Debug, Serialize)]
pub struct CpuSplit {
    /// This process's device threads, per raw signature.
    pub raw_sign_us: f64,
    /// The agent's device threads (`keybound-sign-*`, `keybound-tpm`), per proof.
    pub agent_device_us: f64,
    /// The agent's other threads (HTTP, JSON, JOSE, logging, metrics), per proof.
    pub agent_async_us: f64,
    /// This process (the load generator) during the agent phases, per proof.
    pub client_us: f64,
}

impl CpuSplit {
    /// Per operation, from the CPU the counted phases took: `raw` in the raw phases,
    /// `measured` (device, other) and `client` in the measured ones; `None` when nothing
    /// was counted (no signatures, or counters that could not be read).
    fn of(report: &Report, raw: Cpu, measured: Cpu, client: Cpu) -> Option<CpuSplit> {
        let secs = report.seconds / 2.0;
        let (raws, proofs) = (report.raw_per_s * secs, report.pipeline_per_s * secs);
        (raws > 0.0 && proofs > 0.0 && measured.device > 0.0).then(|| CpuSplit {
            raw_sign_us: raw.device / raws * 1e6,
            agent_device_us: measured.device / proofs * 1e6,
            agent_async_us: measured.other / proofs * 1e6,
            client_us: client.total() / proofs * 1e6,
        })
    }
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

/// One caller's clock in a phase: `while clock.going() { call().await?; clock.answered() }`
/// keeps the latency of each call answered by the deadline, in microseconds. The calls in
/// flight at the deadline are answered after it and not counted: counted, they would add a
/// whole round of callers to a phase whose length is the deadline's (at 48 callers about
/// 0.4 % more proofs than the device signed in a half-second raw phase). A call begins
/// when the last one is answered: one clock read per call (in the pipeline, this thread's
/// time is the pipeline's).
struct CallerClock {
    until: Instant,
    start: Instant,
    lat: Vec<u64>,
}

impl CallerClock {
    fn new(until: Instant) -> CallerClock {
        CallerClock {
            until,
            start: Instant::now(),
            lat: Vec::new(),
        }
    }

    /// The deadline has not passed: the caller makes another call.
    fn going(&self) -> bool {
        self.start < self.until
    }

    /// The call begun last was answered now.
    fn answered(&mut self) {
        let done = Instant::now();
        if done <= self.until {
            self.lat.push((done - self.start).as_micros() as u64);
        }
        self.start = done;
    }
}

/// The JWS pipeline in this process: as many proofs in flight as one-session signer
/// processes take ([`depth_of`] one session, per session), so a session (or a signer
/// process) never waits for JOSE work and requests and answers travel in batches.
pub fn run(key: &SigningKey, sessions: usize, seconds: f64) -> Result<Report, BenchError> {
    let callers = depth_of(1) * sessions.max(1);
    let own = Some(std::process::id());
    // CPU across the counted phases: the device's (signer processes or device threads)
    // and this process's other threads (the pipeline), as in `run_agent`. The signer
    // processes are found once: a scan of /proc at every phase would be counted as the
    // pipeline's.
    let signers = children(std::process::id());
    let tree = || Cpu::of_with(own, &signers);
    let (mut piped, mut raw_cpu, mut warm) = (Cpu::default(), Cpu::default(), true);
    let mut report = measure_with(
        key,
        sessions,
        callers,
        seconds,
        "pipeline",
        |phase| {
            let before = tree();
            let made = pipeline(key, callers, phase)?;
            if !std::mem::take(&mut warm) {
                piped += tree() - before;
            }
            Ok(made)
        },
        |raw| {
            let before = tree();
            let n = raw()?;
            raw_cpu += tree() - before;
            Ok(n)
        },
    )?;
    report.cpu = CpuSplit::of(&report, raw_cpu, piped, Cpu::default());
    Ok(report)
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
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Agent(format!("cannot start the async runtime: {e}")))?;
    let agent_pid = runtime.block_on(agent_pid(socket))?;
    let rss_before = proc_status_kib(agent_pid, "VmRSS:");
    let own_pid = Some(std::process::id());
    // CPU totals across the counted phases: (device threads, other threads) per process.
    let (mut agent_cpu, mut client_cpu, mut raw_cpu) =
        (Cpu::default(), Cpu::default(), Cpu::default());
    let mut warm = true;
    let mut report = measure_with(
        key,
        sessions,
        clients,
        seconds,
        "agent",
        |phase| {
            let (agent0, own0) = (Cpu::of_tree(agent_pid), Cpu::of_tree(own_pid));
            let made = runtime.block_on(load::agent_phase(socket, key.label(), clients, phase))?;
            if !std::mem::take(&mut warm) {
                agent_cpu += Cpu::of_tree(agent_pid) - agent0;
                client_cpu += Cpu::of_tree(own_pid) - own0;
            }
            Ok(made)
        },
        |raw| {
            let own0 = Cpu::of_tree(own_pid);
            let n = raw()?;
            raw_cpu += Cpu::of_tree(own_pid) - own0;
            Ok(n)
        },
    )?;
    report.agent_rss_kib = rss_before.zip(proc_status_kib(agent_pid, "VmHWM:"));
    report.cpu = CpuSplit::of(&report, raw_cpu, agent_cpu, client_cpu);
    Ok(report)
}

/// `bench --agent --audit-socket`: the same load against two agents on the same token,
/// one without `[audit]` and one with it, phases alternating, in one run.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub key: String,
    pub callers: usize,
    pub seconds: f64,
    /// Proofs per second from the agent without an audit trail.
    pub off_per_s: f64,
    /// Proofs per second from the agent with its audit trail on.
    pub on_per_s: f64,
    /// on / off.
    pub ratio: f64,
    pub off_p50_us: u64,
    pub on_p50_us: u64,
    pub off_p99_us: u64,
    pub on_p99_us: u64,
}

/// Alternates proof phases between the agent at `off` (no audit) and the one at `on`
/// (audit on), `clients` connections each, so machine noise hits both alike.
pub fn run_audit(
    key: &SigningKey,
    off: &Path,
    on: &Path,
    clients: usize,
    seconds: f64,
) -> Result<AuditReport, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Agent(format!("cannot start the async runtime: {e}")))?;
    let rounds = (seconds.round() as u32).clamp(1, 600);
    let phase = Duration::from_secs_f64((seconds / f64::from(2 * rounds)).max(0.05));
    let run = |socket: &Path, phase| {
        runtime.block_on(load::agent_phase(socket, key.label(), clients, phase))
    };
    // Warm both (keys approved, connections' first requests).
    run(off, Duration::from_millis(100))?;
    run(on, Duration::from_millis(100))?;
    let (mut off_n, mut on_n, mut off_lat, mut on_lat) = (0, 0, Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so neither always follows the other.
        for side in [round % 2, 1 - round % 2] {
            let (socket, n, lat) = match side {
                0 => (off, &mut off_n, &mut off_lat),
                _ => (on, &mut on_n, &mut on_lat),
            };
            let (made, mut l) = run(socket, phase)?;
            *n += made;
            lat.append(&mut l);
        }
    }
    let secs = phase.as_secs_f64() * f64::from(rounds);
    let (off_per_s, on_per_s) = (off_n as f64 / secs, on_n as f64 / secs);
    Ok(AuditReport {
        key: key.label().into(),
        callers: clients,
        seconds: 2.0 * secs,
        off_per_s,
        on_per_s,
        ratio: if off_per_s > 0.0 {
            on_per_s / off_per_s
        } else {
            0.0
        },
        off_p50_us: percentile(&mut off_lat, 0.5),
        on_p50_us: percentile(&mut on_lat, 0.5),
        off_p99_us: percentile(&mut off_lat, 0.99),
        on_p99_us: percentile(&mut on_lat, 0.99),
    })
}

/// A `kB` line of `/proc/<pid>/status`, e.g. `VmRSS:`.
fn proc_status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The agent's pid, from the socket's peer credentials.
async fn agent_pid(socket: &Path) -> Result<Option<u32>, BenchError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| BenchError::Agent(format!("cannot connect to {}: {e}", socket.display())))?;
    Ok(stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok()))
}

/// CPU seconds of one process's threads, split into device threads and the rest.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    device: f64,
    other: f64,
}

impl Cpu {
    /// Reads `/proc/<pid>/task/*/{comm,schedstat}`; zero where unreadable (another
    /// user's agent, no procfs), which leaves the split out of the report.
    fn of(pid: Option<u32>) -> Cpu {
        let mut cpu = Cpu::default();
        let Some(pid) = pid else { return cpu };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return cpu;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let (Ok(comm), Ok(stat)) = (
                std::fs::read_to_string(dir.join("comm")),
                std::fs::read_to_string(dir.join("schedstat")),
            ) else {
                continue;
            };
            let Some(ns) = stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<f64>().ok())
            else {
                continue;
            };
            if comm.starts_with("keybound-sign") || comm.starts_with("keybound-tpm") {
                cpu.device += ns / 1e9;
            } else {
                cpu.other += ns / 1e9;
            }
        }
        cpu
    }

    /// [`Cpu::of`] with the process's children (its signer processes) counted as device.
    fn of_tree(pid: Option<u32>) -> Cpu {
        Cpu::of_with(pid, &pid.map(children).unwrap_or_default())
    }

    /// [`Cpu::of`] with `signers` (processes of its device) counted as device.
    fn of_with(pid: Option<u32>, signers: &[u32]) -> Cpu {
        let mut cpu = Cpu::of(pid);
        for child in signers {
            cpu.device += Cpu::of(Some(*child)).total();
        }
        cpu
    }

    fn total(self) -> f64 {
        self.device + self.other
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, rhs: Cpu) -> Cpu {
        // A thread that ended between two readings would make a difference negative.
        Cpu {
            device: (self.device - rhs.device).max(0.0),
            other: (self.other - rhs.other).max(0.0),
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, rhs: Cpu) {
        self.device += rhs.device;
        self.other += rhs.other;
    }
}

/// The `p` quantile (0 to 1) of `lat` in microseconds, 0 for none; sorts `lat`.
fn percentile(lat: &mut [u64], p: f64) -> u64 {
    lat.sort_unstable();
    let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
    lat.get(i).copied().unwrap_or(0)
}

/// The pids whose parent is `pid` (`/proc/*/stat`, field 4).
fn children(pid: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.get(stat.rfind(')')? + 2..)?;
                    after.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Alternates raw and measured phases of about half a second each for `seconds` in all,
/// after a short warm-up (sessions opened, handles cached) that is not counted;
/// `around_raw` is wrapped around each raw phase (it must call it once).
fn measure_with(
    key: &SigningKey,
    sessions: usize,
    callers: usize,
    seconds: f64,
    mode: &'static str,
    mut measured: impl FnMut(Duration) -> Result<Phase, BenchError>,
    mut around_raw: impl FnMut(&mut dyn FnMut() -> Result<u64, BenchError>) -> Result<u64, BenchError>,
) -> Result<Report, BenchError> {
    let rounds = (seconds.round() as u32).clamp(1, 600);
    let phase = Duration::from_secs_f64((seconds / f64::from(2 * rounds)).max(0.05));
    measured(Duration::from_millis(100))?;
    let tbs = key
        .alg()
        .to_be_signed(b"keybound bench: raw device signature");
    let (mut raw, mut made, mut latencies) = (0u64, 0u64, Vec::new());
    for _ in 0..rounds {
        raw += around_raw(&mut || raw_phase(key, sessions, &tbs, phase))?;
        let (n, mut lat) = measured(phase)?;
        made += n;
        latencies.append(&mut lat);
    }
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
        pipeline_p50_us: percentile(&mut latencies, 0.50),
        pipeline_p99_us: percentile(&mut latencies, 0.99),
        cpu: None,
        agent_rss_kib: None,
    })
}

/// The device's own rate: `sessions` threads each calling [`SigningKey::sign`] on the same
/// prepared input until the deadline (the public signing path, no JOSE work).
fn raw_phase(
    key: &SigningKey,
    sessions: usize,
    tbs: &ToBeSigned,
    phase: Duration,
) -> Result<u64, BenchError> {
    if let Some(made) = key.raw_in_signers(phase) {
        return made.map_err(|e| BenchError::from(OAuthError::Token(e)));
    }
    let until = Instant::now() + phase;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..sessions.max(1))
            .map(|_| {
                scope.spawn(move || {
                    signed_until(until, || {
                        key.sign(tbs.clone()).map(drop).map_err(OAuthError::from)
                    })
                })
            })
            .collect();
        let mut made = 0;
        for h in handles {
            match h.join() {
                Ok(n) => made += n?,
                Err(_) => return Err(OAuthError::Token(crate::token::TokenError::WorkersGone)),
            }
        }
        Ok(made)
    })
    .map_err(BenchError::from)
}

/// `callers` tasks on one thread, each building a DPoP proof, awaiting its signature
/// ([`oauth::sign_async`], as the agent's requests do) and serialising it, until the
/// deadline; what is answered by it counts ([`CallerClock`]).
fn pipeline(key: &SigningKey, callers: usize, phase: Duration) -> Result<Phase, OAuthError> {
    let until = Instant::now() + phase;
    let header = std::sync::Arc::new(dpop::header(key.alg(), key.jwk()));
    let work = async {
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (key, header) = (key.clone(), header.clone());
                tokio::spawn(async move {
                    let mut clock = CallerClock::new(until);
                    while clock.going() {
                        let claims = dpop::claims(
                            "POST",
                            "https://bench.keybound.invalid/oauth2/v1/token",
                            None,
                            None,
                            oauth::unix_now(),
                            oauth::new_jti()?,
                        )?;
                        oauth::sign_async(&key, &header, &claims).await?;
                        clock.answered();
                    }
                    Ok::<_, OAuthError>(clock.lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            match t.await {
                Ok(lat) => all.extend(lat?),
                Err(_) => return Err(OAuthError::Token(crate::token::TokenError::WorkersGone)),
            }
        }
        Ok((all.len() as u64, all))
    };
    // On the runtime the signer processes' answers are read on (`keybound bench` enters
    // it), so the tasks wake where the agent's do; else on one of its own.
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(work),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| OAuthError::Token(crate::token::TokenError::Internal(e.to_string())))?
            .block_on(work),
    }
}
