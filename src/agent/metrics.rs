//! Prometheus text exposition (format 0.0.4), kept by hand: a few counters, gauges and one
//! latency histogram do not need a metrics framework. (`prometheus-client` writes
//! OpenMetrics instead: a counter's `# TYPE` without `_total`, `# EOF`, another content
//! type; the gauges read at scrape time would each need a custom collector.) The OAuth
//! clients' counters come in through [`UpstreamObserver`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::StatusCode;

use super::Agent;
use super::authz::Caller;
use crate::keyring::rotation::GenState;
use crate::oauth::observe::UpstreamObserver;
use crate::oauth::resilience::BreakerState;

/// Upper bounds of the sign-latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// (alg, outcome) of a signature.
type AlgOutcome = (&'static str, &'static str);

#[derive(Default)]
pub struct Metrics {
    /// key → (alg, outcome) → count: a signature allocates only for a key's first one.
    signatures: Mutex<BTreeMap<String, BTreeMap<AlgOutcome, u64>>>,
    /// Signatures per latency bucket (not cumulative; `render` sums them).
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_micros: AtomicU64,
    /// Connections closed at accept: no rule names the peer, or its uid is at its cap.
    refused_no_rule: AtomicU64,
    refused_per_uid_cap: AtomicU64,
    /// key → outcome → count of the challenges signed to approve a key.
    possession: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    /// client → what its exchanges with its servers came to (see `UpstreamObserver`).
    upstream: Mutex<BTreeMap<String, Upstream>>,
}

/// One client's upstream counters.
#[derive(Clone, Copy, Default)]
struct Upstream {
    /// Responses by status class: 2xx, 3xx, 4xx, 5xx.
    responses: [u64; 4],
    nonce_challenges: u64,
    fetch_ok: u64,
    fetch_failed: u64,
    fetch_micros: u64,
    cache_hits: u64,
    cache_misses: u64,
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    NoRule,
    PerUidCap,
}

impl Metrics {
    /// Counts a refused connection; returns how many of its kind so far.
    pub fn refused(&self, why: Refusal) -> u64 {
        let counter = match why {
            Refusal::NoRule => &self.refused_no_rule,
            Refusal::PerUidCap => &self.refused_per_uid_cap,
        };
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn possession_proof(&self, key: &str, outcome: &'static str) {
        let mut proofs = self
            .possession
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *proofs
            .entry(key.to_owned())
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }

    pub fn signature(&self, key: &str, alg: &'static str, outcome: &'static str, took: Duration) {
        {
            let mut signatures = self
                .signatures
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match signatures.get_mut(key) {
                Some(counts) => *counts.entry((alg, outcome)).or_default() += 1,
                None => {
                    signatures.insert(key.to_owned(), BTreeMap::from([((alg, outcome), 1)]));
                }
            }
        }
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|bound| secs <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Metrics {
    fn upstream(&self, client: &str, count: impl FnOnce(&mut Upstream)) {
        let mut upstream = self.upstream.lock().unwrap_or_else(PoisonError::into_inner);
        match upstream.get_mut(client) {
            Some(u) => count(u),
            None => count(upstream.entry(client.to_owned()).or_default()),
        }
    }

    /// A client's counters as they are now (zeros before its first exchange).
    fn upstream_of(&self, client: &str) -> Upstream {
        self.upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(client)
            .copied()
            .unwrap_or_default()
    }
}

impl UpstreamObserver for Metrics {
    fn response(&self, client: &str, status: StatusCode) {
        let class = match status.as_u16() {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        self.upstream(client, |u| u.responses[class] += 1);
    }

    fn nonce_challenge(&self, client: &str) {
        self.upstream(client, |u| u.nonce_challenges += 1);
    }

    fn token_fetch(&self, client: &str, ok: bool, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.upstream(client, |u| {
            if ok {
                u.fetch_ok += 1;
            } else {
                u.fetch_failed += 1;
            }
            u.fetch_micros = u.fetch_micros.saturating_add(micros);
        });
    }

    fn token_cache(&self, client: &str, hit: bool) {
        self.upstream(client, |u| {
            if hit {
                u.cache_hits += 1;
            } else {
                u.cache_misses += 1;
            }
        });
    }
}

/// The whole exposition for `GET /metrics`.
pub fn render(agent: &Agent, caller: &Caller) -> String {
    let m = &agent.metrics;
    let mut out = String::new();
    let head = |name: &str, kind: &str, help: &str, out: &mut String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(
        "keybound_signatures_total",
        "counter",
        "Signatures by key, algorithm and outcome.",
        &mut out,
    );
    for (key, counts) in m
        .signatures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        for ((alg, outcome), n) in counts {
            let _ = writeln!(
                out,
                "keybound_signatures_total{{key=\"{}\",alg=\"{alg}\",outcome=\"{outcome}\"}} {n}",
                escape(key)
            );
        }
    }
    head(
        "keybound_possession_proofs_total",
        "counter",
        "Challenges the device signed to prove it holds a key (approval), by key and outcome.",
        &mut out,
    );
    for (key, counts) in m
        .possession
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        for (outcome, n) in counts {
            let _ = writeln!(
                out,
                "keybound_possession_proofs_total{{key=\"{}\",outcome=\"{outcome}\"}} {n}",
                escape(key)
            );
        }
    }
    head(
        "keybound_sign_duration_seconds",
        "histogram",
        "Time from queueing a signature to its JWS.",
        &mut out,
    );
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().enumerate() {
        cumulative += m.buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "keybound_sign_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = m.latency_count.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "keybound_sign_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "keybound_sign_duration_seconds_sum {}\nkeybound_sign_duration_seconds_count {count}",
        m.latency_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    head(
        "keybound_sign_queue_depth",
        "gauge",
        "Signing requests queued or in progress.",
        &mut out,
    );
    let _ = writeln!(out, "keybound_sign_queue_depth {}", agent.queue_depth());
    head(
        "keybound_refused_connections_total",
        "counter",
        "Connections closed as soon as they were accepted, by reason.",
        &mut out,
    );
    for (reason, counter) in [
        ("no_rule", &m.refused_no_rule),
        ("per_uid_cap", &m.refused_per_uid_cap),
    ] {
        let _ = writeln!(
            out,
            "keybound_refused_connections_total{{reason=\"{reason}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    head(
        "keybound_cached_keys",
        "gauge",
        "Approved keys the agent keeps, one per key on the device.",
        &mut out,
    );
    let _ = writeln!(out, "keybound_cached_keys {}", agent.access.cached_keys());

    head(
        "keybound_token_fetches_total",
        "counter",
        "Token fetches by client and outcome.",
        &mut out,
    );
    for (name, _) in agent.access.clients(caller) {
        let s = m.upstream_of(name);
        let _ = writeln!(
            out,
            "keybound_token_fetches_total{{client=\"{0}\",outcome=\"ok\"}} {1}\nkeybound_token_fetches_total{{client=\"{0}\",outcome=\"error\"}} {2}",
            escape(name),
            s.fetch_ok,
            s.fetch_failed
        );
    }
    head(
        "keybound_token_fetch_seconds_total",
        "counter",
        "Time spent fetching tokens.",
        &mut out,
    );
    for (name, _) in agent.access.clients(caller) {
        let _ = writeln!(
            out,
            "keybound_token_fetch_seconds_total{{client=\"{}\"}} {}",
            escape(name),
            m.upstream_of(name).fetch_micros as f64 / 1e6
        );
    }
    head(
        "keybound_token_cache_total",
        "counter",
        "Token cache lookups by result.",
        &mut out,
    );
    for (name, _) in agent.access.clients(caller) {
        let s = m.upstream_of(name);
        let _ = writeln!(
            out,
            "keybound_token_cache_total{{client=\"{0}\",result=\"hit\"}} {1}\nkeybound_token_cache_total{{client=\"{0}\",result=\"miss\"}} {2}",
            escape(name),
            s.cache_hits,
            s.cache_misses
        );
    }
    head(
        "keybound_upstream_responses_total",
        "counter",
        "HTTP responses from authorization and resource servers by status class.",
        &mut out,
    );
    for (name, _) in agent.access.clients(caller) {
        let responses = m.upstream_of(name).responses;
        for (class, n) in ["2xx", "3xx", "4xx", "5xx"].iter().zip(responses) {
            let _ = writeln!(
                out,
                "keybound_upstream_responses_total{{client=\"{}\",class=\"{class}\"}} {n}",
                escape(name),
            );
        }
    }
    head(
        "keybound_dpop_nonce_challenges_total",
        "counter",
        "use_dpop_nonce challenges answered.",
        &mut out,
    );
    for (name, _) in agent.access.clients(caller) {
        let _ = writeln!(
            out,
            "keybound_dpop_nonce_challenges_total{{client=\"{}\"}} {}",
            escape(name),
            m.upstream_of(name).nonce_challenges
        );
    }
    head(
        "keybound_clock_offset_seconds",
        "gauge",
        "Server clock minus local clock, from the last Date header of each server (authorization and resource servers, refusals included).",
        &mut out,
    );
    // One series per server: clients that share a server measured the same clock.
    let offsets: BTreeMap<String, i64> = agent
        .access
        .clients(caller)
        .flat_map(|(_, c)| c.state().offsets())
        .collect();
    for (server, offset) in &offsets {
        let _ = writeln!(
            out,
            "keybound_clock_offset_seconds{{server=\"{}\"}} {offset}",
            escape(server)
        );
    }
    head(
        "keybound_breaker_state",
        "gauge",
        "Circuit breaker per client: 0 closed, 1 open, 2 half-open.",
        &mut out,
    );
    for (name, c) in agent.access.clients(caller) {
        let state = match c.breaker_state() {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        let _ = writeln!(
            out,
            "keybound_breaker_state{{client=\"{}\"}} {state}",
            escape(name)
        );
    }
    if let Some(host) = &agent.jwks {
        host.render_metrics(&mut out);
    }
    render_rotation(agent, &mut out);
    super::gateway::render(agent, caller, &mut out);
    if let Some(trail) = &agent.trail {
        trail.render_metrics(&mut out);
    }
    if let Some(s) = agent.access.device(caller).signers() {
        render_signers(&s, &mut out);
    }
    out
}

/// The signer processes (`[agent] signers = "processes"`).
fn render_signers(s: &crate::token::signer::SignerReport, out: &mut String) {
    let series = [
        (
            "keybound_signer_processes",
            "gauge",
            "Signer processes configured.",
            s.processes as u64,
        ),
        (
            "keybound_signer_processes_up",
            "gauge",
            "Signer processes running and logged in.",
            s.up as u64,
        ),
        (
            "keybound_signer_restarts_total",
            "counter",
            "Signer processes started again after one ended.",
            s.restarts,
        ),
        (
            "keybound_signer_exits_total",
            "counter",
            "Signer processes that ended while the agent ran.",
            s.exits,
        ),
        (
            "keybound_signer_retried_total",
            "counter",
            "Signatures retried on another signer process after theirs ended.",
            s.retried,
        ),
        (
            "keybound_signer_unavailable_total",
            "counter",
            "Signatures answered unavailable because no signer process could make them.",
            s.unavailable,
        ),
        (
            "keybound_signer_hung_total",
            "counter",
            "Signer processes killed as stuck (agent.signer_timeout_secs): holding signatures without answering, not ready after a restart, or not ended after being stopped.",
            s.hung,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// The rotation series: per slot the agent uses and per generation on the device (never the
/// destroyed ones), so their number stays small.
fn render_rotation(agent: &Agent, out: &mut String) {
    use super::rotation::Step;
    let slots = agent.rotation.snapshot();
    let now = crate::jose::unix_now();
    let head = |name: &str, kind: &str, help: &str, out: &mut String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let generations = || {
        slots.iter().flat_map(|(slot, s)| {
            s.record
                .iter()
                .flat_map(|r| r.generations.iter())
                .filter(|g| g.state != GenState::Destroyed)
                .map(move |g| (slot, g))
        })
    };
    head(
        "keybound_key_age_seconds",
        "gauge",
        "Seconds since each key generation was created (generated, or adopted as generation 1).",
        out,
    );
    for (slot, g) in generations() {
        let _ = writeln!(
            out,
            "keybound_key_age_seconds{{slot=\"{}\",generation=\"{}\",kid=\"{}\"}} {}",
            escape(slot),
            g.n,
            escape(g.kid.as_deref().unwrap_or("")),
            now.saturating_sub(g.created)
        );
    }
    head(
        "keybound_key_generation_state",
        "gauge",
        "1 for the state each key generation is in (prepared, active, retiring, retired, ...).",
        out,
    );
    for (slot, g) in generations() {
        let _ = writeln!(
            out,
            "keybound_key_generation_state{{slot=\"{}\",generation=\"{}\",kid=\"{}\",state=\"{}\"}} 1",
            escape(slot),
            g.n,
            escape(g.kid.as_deref().unwrap_or("")),
            g.state.name()
        );
    }
    head(
        "keybound_rotation_last_result",
        "gauge",
        "Unix time of the last attempt of each rotation step the agent's schedule took, by result.",
        out,
    );
    for (slot, s) in &slots {
        for (step, a) in &s.last {
            let result = if a.error.is_some() { "error" } else { "ok" };
            let _ = writeln!(
                out,
                "keybound_rotation_last_result{{slot=\"{}\",step=\"{}\",result=\"{result}\"}} {}",
                escape(slot),
                step.name(),
                a.at
            );
        }
    }
    head(
        "keybound_rotation_failures_total",
        "counter",
        "Failed attempts of each rotation step of the agent's schedule.",
        out,
    );
    for (slot, s) in slots.iter().filter(|(_, s)| s.scheduled) {
        for step in [Step::Prepare, Step::Activate, Step::Retire] {
            let _ = writeln!(
                out,
                "keybound_rotation_failures_total{{slot=\"{}\",step=\"{}\"}} {}",
                escape(slot),
                step.name(),
                s.failures.get(&step).copied().unwrap_or(0)
            );
        }
    }
    head(
        "keybound_rotation_next_step_timestamp_seconds",
        "gauge",
        "Unix time at which the schedule takes a slot's next step (a failing step: its next retry).",
        out,
    );
    for (slot, s) in &slots {
        if let Some((step, at)) = s.next {
            let _ = writeln!(
                out,
                "keybound_rotation_next_step_timestamp_seconds{{slot=\"{}\",step=\"{}\"}} {at}",
                escape(slot),
                step.name()
            );
        }
    }
}

/// Label values: backslash, quote and newline escaped.
pub(super) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
