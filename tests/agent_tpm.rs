//! `keybound serve` on the TPM backend, end to end: the built binary against a real swtpm
//! started by each test (loopback ports, its own state directory, killed on drop), driven
//! over its Unix socket.
//!
//! Every proof and assertion the agent hands out is verified independently
//! ([`check_proof`], [`check_assertion`]: the p256/rsa verifiers of `tests/support`, nothing
//! from keybound) against the JWKS the agent publishes, which must equal `keybound jwks`.
//! swtpm is killed under the running agent and started again on the same state: the agent
//! answers 503 + Retry-After meanwhile and signs again afterwards without a restart.
//!
//! This test process never opens the TPM itself: only the agent and `keybound` CLI
//! subprocesses do (the TSS opens swtpm sockets without close-on-exec, so a process holding
//! a TPM context must not spawn children). No assertion here is about how long anything
//! took; deadlines only guard against hangs.
#![cfg(feature = "tpm")]

mod agent_support;
mod support;
mod tpm_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agent_support::*;
use http::StatusCode;
use serde_json::{Value, json};
use support::*;
use tpm_support::{TpmHome, transient_handles};

const AUDIENCE: &str = "https://example.okta.com/oauth2/v1/token";

/// How long swtpm may take to serve the agent again after its restart. A guard, not a
/// measurement.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);

/// A swtpm with `keys` (label, alg) generated in it through `keybound keys generate`;
/// returns the kid of each label.
fn tpm_with_keys(keys: &[(&str, &str)]) -> (TpmHome, BTreeMap<String, String>) {
    let home = TpmHome::new();
    let kids = keys
        .iter()
        .map(|(label, alg)| ((*label).to_owned(), home.generate(label, alg)))
        .collect();
    (home, kids)
}

/// `keybound jwks` for the same config: the `keys` array, each entry's shape checked.
fn cli_jwks(home: &TpmHome) -> Vec<Value> {
    let stdout = home.run_ok(&["jwks"]);
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("keybound jwks printed invalid JSON ({e}):\n{stdout}"));
    assert_members(&doc, &["keys"]);
    let keys = doc["keys"].as_array().expect("keys is an array").clone();
    for key in &keys {
        assert_jwks_entry(key, key["alg"].as_str().expect("alg"));
    }
    keys
}

/// `keybound serve --socket <dir>/run/agent.sock` against the TPM config, ready.
fn start_agent(home: &TpmHome, dir: &SocketDir) -> Agent {
    let socket = dir.socket();
    Agent::start_command(
        home.command(&[
            OsArg::from("serve"),
            "--socket".into(),
            socket.clone().into(),
        ]),
        &socket,
    )
}

/// `/v1/jwks` by kid, after checking it equals `cli` (what `keybound jwks` printed) and each
/// entry's shape; every key of `kids` is in it under its kid.
async fn published_jwks(
    agent: &Agent,
    cli: &[Value],
    kids: &BTreeMap<String, String>,
) -> BTreeMap<String, Value> {
    let served = served_jwks(agent, cli).await;
    assert_eq!(served.len(), kids.len(), "{served:?}");
    for kid in kids.values() {
        assert!(served.contains_key(kid), "kid {kid} in {served:?}");
    }
    served
}

/// SIGTERM: exit 0, the socket removed, nothing panicked; then nothing the agent loaded is
/// left in the TPM (asked with tpm2-tools from this process, which holds no TPM context).
fn terminate_cleanly(mut agent: Agent, home: &TpmHome) {
    assert!(agent.running(), "the agent is still running before SIGTERM");
    agent.terminate();
    agent.assert_clean_exit();
    assert_eq!(
        transient_handles(&home.tpm),
        Vec::<String>::new(),
        "the agent left objects loaded in the TPM"
    );
}

// ---------------------------------------------------------------------------
// 1. Concurrent clients, independent verification
// ---------------------------------------------------------------------------

/// Request `n`: of every five, three DPoP proofs (ES256 `dpop` twice, RS256 `rsa` once,
/// some with a nonce, some with an access token, `htm`/`htu` needing normalisation) and two
/// client assertions by `key` + `client_id` + `audience` (ES256 `client-auth`, RS256 `rsa`).
fn job(n: usize, kids: &BTreeMap<String, String>) -> Job {
    if n % 5 >= 3 {
        let key = if n % 5 == 3 { "client-auth" } else { "rsa" };
        let lifetime = [None, Some(300)][n / 5 % 2];
        return assertion_job(n, key, &kids[key], AUDIENCE, lifetime);
    }
    let key = if n % 5 == 2 { "rsa" } else { "dpop" };
    proof_job(n, key, &kids[key], n % 4 == 1, n % 7 < 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_get_tpm_proofs_and_assertions_that_verify_independently() {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 10;
    let (home, kids) = tpm_with_keys(&[
        ("dpop", "ES256"),
        ("client-auth", "ES256"),
        ("rsa", "RS256"),
    ]);
    // Before the agent runs: the CLI and the agent never talk to swtpm at the same time.
    let cli = cli_jwks(&home);
    let dir = SocketDir::new();
    let agent = start_agent(&home, &dir);
    let jwks = published_jwks(&agent, &cli, &kids).await;

    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["token"], "tpm", "{health}");
    assert_eq!(health["keys"], 3, "{health}");

    let listed = get(agent.socket(), "/v1/keys").await.ok("GET /v1/keys");
    let listed = listed.as_array().expect("/v1/keys is an array");
    assert_eq!(listed.len(), 3, "{listed:?}");
    for key in listed {
        let label = key["label"].as_str().expect("label");
        assert_eq!(key["kid"], kids[label].as_str(), "{key}");
        assert_eq!(key["policy"], "pass", "{key}");
    }

    let start = window_start();
    let job_kids = kids.clone();
    let answers = run_jobs(agent.socket(), CLIENTS, PER_CLIENT, move |n| {
        job(n, &job_kids)
    })
    .await;
    let window = window_end(start);

    let mut jtis = std::collections::HashSet::new();
    let mut signed: BTreeMap<(String, &str), usize> = BTreeMap::new();
    for (job, reply) in &answers {
        let jws = check_job(&jwks, job, reply, window);
        let label = job.key();
        let alg = if label == "rsa" { "RS256" } else { "ES256" };
        assert_eq!(jws.header["alg"], alg, "{}", jws.header);
        *signed.entry((label.to_owned(), alg)).or_default() += 1;
        let jti = jws.claims["jti"].as_str().expect("jti").to_owned();
        assert!(jtis.insert(jti), "every jti is fresh: {}", jws.claims);
    }
    assert_eq!(answers.len(), CLIENTS * PER_CLIENT);

    // The metrics count exactly these signatures, all ok.
    let metrics = get(agent.socket(), "/metrics").await.text();
    for ((label, alg), n) in &signed {
        let labels = [("key", label.as_str()), ("alg", *alg), ("outcome", "ok")];
        assert_eq!(
            metric(&metrics, "keybound_signatures_total", &labels),
            Some(*n as f64),
            "{:?}",
            samples(&metrics, "keybound_signatures_total")
        );
    }
    assert_eq!(
        metric(&metrics, "keybound_sign_queue_depth", &[]),
        Some(0.0)
    );

    terminate_cleanly(agent, &home);
    // The key files and the TPM are untouched by the agent: the CLI publishes the same JWKS.
    assert_eq!(by_kid(&cli_jwks(&home)), jwks);
}

// ---------------------------------------------------------------------------
// 2. swtpm killed and restarted under the running agent
// ---------------------------------------------------------------------------

/// The phases of the outage test, in order. A loader's answer is tagged with the phase
/// when the phase was the same when it sent the request and when the answer came, else
/// with [`ACROSS`]: only then is "swtpm was down all along" certain.
const UP: u8 = 0;
const DOWN: u8 = 1;
const RESTARTING: u8 = 2;
const ACROSS: u8 = 9;

/// The 503 contract for a signing request while the TPM is gone: `unavailable`, a message
/// naming the TPM, Retry-After.
fn assert_tpm_unavailable(reply: &Reply, what: &str) {
    let message = reply.error(503, "unavailable", &[]);
    assert!(
        message.contains("TPM") || message.contains("tcti"),
        "{what}: the 503 message names the TPM: {message}"
    );
    let retry = reply
        .retry_after()
        .unwrap_or_else(|| panic!("{what}: 503 carries Retry-After: {reply:?}"));
    assert!(retry >= 1, "{what}: Retry-After {retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swtpm_killed_mid_run_is_503_then_signing_resumes_after_its_restart() {
    const LOADERS: usize = 4;
    let (mut home, kids) = tpm_with_keys(&[("dpop", "ES256"), ("client-auth", "ES256")]);
    let cli = cli_jwks(&home);
    let dir = SocketDir::new();
    let mut agent = start_agent(&home, &dir);
    let jwks = Arc::new(published_jwks(&agent, &cli, &kids).await);
    let dpop_kid = kids["dpop"].clone();
    let htu = "https://a.example/outage";
    let request = json!({ "key": "dpop", "htm": "GET", "htu": htu });
    let want = want_proof(&dpop_kid, "GET", htu);
    let start = window_start();

    // Up: healthy, and signing verifies.
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["token"], "tpm", "{health}");
    let mut conn = Conn::open(agent.socket()).await;
    for _ in 0..3 {
        let proof = conn
            .post("/v1/dpop", &request)
            .await
            .ok_member("up", "proof");
        check_proof(&jwks, &proof, &want, (start, unix_now() + 1));
    }

    // Loaders sign in a loop on keep-alive connections through the whole outage, each
    // answer tagged with its phase.
    let phase = Arc::new(AtomicU8::new(UP));
    let stop = Arc::new(AtomicBool::new(false));
    let seen_down = Arc::new(AtomicUsize::new(0));
    let (started_tx, mut started) = tokio::sync::mpsc::channel(LOADERS);
    let mut loaders = Vec::new();
    for _ in 0..LOADERS {
        let socket = agent.socket().to_path_buf();
        let (phase, stop, seen_down) = (phase.clone(), stop.clone(), seen_down.clone());
        let started_tx = started_tx.clone();
        let request = request.clone();
        loaders.push(tokio::spawn(async move {
            let mut conn = Conn::open(&socket).await;
            let mut answers: Vec<(u8, Reply)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let sent_in = phase.load(Ordering::SeqCst);
                let reply = conn.post("/v1/dpop", &request).await;
                let tag = if phase.load(Ordering::SeqCst) == sent_in {
                    sent_in
                } else {
                    ACROSS
                };
                if answers.is_empty() {
                    let _ = started_tx.send(()).await;
                }
                if tag == DOWN {
                    seen_down.fetch_add(1, Ordering::SeqCst);
                }
                let failed = reply.status != StatusCode::OK;
                answers.push((tag, reply));
                if failed {
                    // Retry-After says 5 s; a loader only needs to keep the agent busy.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            answers
        }));
    }
    drop(started_tx);
    for _ in 0..LOADERS {
        started.recv().await.expect("every loader got an answer");
    }

    // Down: swtpm killed under load (like pulling the plug).
    home.tpm.stop();
    phase.store(DOWN, Ordering::SeqCst);
    let mut down = Vec::new();
    for i in 0..5 {
        let reply = conn.post("/v1/dpop", &request).await;
        assert_tpm_unavailable(&reply, &format!("POST /v1/dpop #{i} with swtpm down"));
        down.push(reply.text());
    }
    let assertion =
        json!({ "key": "client-auth", "client_id": "0oa-outage", "audience": AUDIENCE });
    let assertion_job = Job::Assertion {
        request: assertion.clone(),
        kid: kids["client-auth"].clone(),
        client_id: "0oa-outage".to_owned(),
        audience: AUDIENCE.to_owned(),
        lifetime: 60,
    };
    let reply = conn.post("/v1/assertion", &assertion).await;
    assert_tpm_unavailable(&reply, "POST /v1/assertion with swtpm down");
    let health = get(agent.socket(), "/healthz").await;
    assert_eq!(
        health.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/healthz with swtpm down: {health:?}"
    );
    assert_eq!(health.header("content-type"), Some("application/json"));
    assert!(health.retry_after().is_some(), "{health:?}");
    let body = health.json();
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["token"], "tpm", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    // What the agent answers without the device (not asserted: the keys are files).
    let jwks_down = get(agent.socket(), "/v1/jwks").await;
    eprintln!(
        "swtpm down: /v1/dpop -> {}\n/healthz -> {}\n/v1/jwks -> {} {}",
        down[0],
        body,
        jwks_down.status,
        jwks_down.text()
    );
    // The loaders get answers while swtpm is down (bounded wait, a precondition).
    let deadline = Instant::now() + GUARD;
    while seen_down.load(Ordering::SeqCst) < LOADERS {
        assert!(Instant::now() < deadline, "loaders stuck with swtpm down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(agent.running(), "the agent survives the TPM going away");

    // Back: swtpm restarted on the same state and ports; the same agent signs again.
    phase.store(RESTARTING, Ordering::SeqCst);
    home.tpm.restart();
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    let mut waiting = Vec::new();
    let proof = loop {
        let reply = conn.post("/v1/dpop", &request).await;
        if reply.status == StatusCode::OK {
            break reply.ok_member("after the restart", "proof");
        }
        assert_tpm_unavailable(&reply, "POST /v1/dpop while swtpm restarts");
        waiting.push(reply.text());
        assert!(
            Instant::now() < deadline,
            "no signature within {RECOVERY_DEADLINE:?} of swtpm's restart; answers: {waiting:#?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "503s after swtpm's restart before the first signature: {}",
        waiting.len()
    );
    check_proof(&jwks, &proof, &want, (start, unix_now() + 1));
    let start_after = window_start();
    let reply = conn.post("/v1/assertion", &assertion).await;
    check_job(&jwks, &assertion_job, &reply, window_end(start_after));
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    assert_eq!(health["status"], "ok", "{health}");
    // The same keys, the same kids: the TPM restarted, its owner seed did not change.
    published_jwks(&agent, &cli, &kids).await;

    stop.store(true, Ordering::SeqCst);
    let window = (start, unix_now() + 1);
    let mut counts: BTreeMap<(u8, u16), usize> = BTreeMap::new();
    for loader in loaders {
        for (tag, reply) in loader.await.expect("loader task") {
            *counts.entry((tag, reply.status.as_u16())).or_default() += 1;
            match (tag, reply.status) {
                (DOWN, _) => assert_tpm_unavailable(&reply, "a loader with swtpm down"),
                (_, StatusCode::OK) => {
                    let proof = reply.ok_member("a loader", "proof");
                    check_proof(&jwks, &proof, &want, window);
                }
                _ => assert_tpm_unavailable(&reply, "a loader around the outage"),
            }
        }
    }
    eprintln!("loader answers by (phase, status; phase 9 = across a change): {counts:?}");
    assert!(counts.get(&(UP, 200)).is_some_and(|&n| n >= LOADERS));

    let metrics = get(agent.socket(), "/metrics").await.text();
    let errors = metric(
        &metrics,
        "keybound_signatures_total",
        &[("key", "dpop"), ("alg", "ES256"), ("outcome", "error")],
    );
    assert!(
        errors.is_some_and(|n| n >= 5.0),
        "failed signatures are counted: {:?}",
        samples(&metrics, "keybound_signatures_total")
    );

    // A restart the agent never saw fail (swtpm killed and started again between two
    // requests): the request that finds the stale connection is retried once on a fresh
    // one, so it succeeds at the first try (README: "keybound reconnects on the next
    // request").
    home.tpm.restart();
    let start = window_start();
    let proof = conn
        .post("/v1/dpop", &request)
        .await
        .ok_member("the first request after an unseen swtpm restart", "proof");
    check_proof(&jwks, &proof, &want, window_end(start));
    let reply = conn.post("/v1/assertion", &assertion).await;
    check_job(&jwks, &assertion_job, &reply, window_end(start));

    terminate_cleanly(agent, &home);
}
