//! Operating the agent: SIGTERM (in-flight requests finish, stuck clients wait out the
//! grace period, the socket is removed), and the shapes of `/metrics`, `/v1/keys`,
//! `/v1/jwks` and `/healthz`.
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agent_support::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncWriteExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_removes_the_socket_and_exits_0() {
    const LOADERS: usize = 8;
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let jwks = Arc::new(published_jwks(&token, &agent).await);
    let kid = kids["dpop"].clone();
    let start = window_start();

    // A request in flight: headers and half the body sent, the rest held back.
    let body = dpop_request("dpop", "POST", "https://a.example/slow").to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut slow = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    let head = format!(
        "POST /v1/dpop HTTP/1.1\r\nHost: keybound\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();

    // Clients signing in a loop on keep-alive connections until the agent is gone.
    let (started_tx, mut started) = tokio::sync::mpsc::channel(LOADERS);
    let mut loaders = Vec::new();
    for _ in 0..LOADERS {
        let socket = agent.socket().to_path_buf();
        let started_tx = started_tx.clone();
        loaders.push(tokio::spawn(async move {
            let request = dpop_request("dpop", "GET", "https://a.example/load");
            let mut answers = Vec::new();
            'outer: for _ in 0..10_000 {
                let Ok(mut conn) = Conn::try_open(&socket).await else {
                    break;
                };
                loop {
                    match conn
                        .send_bytes(Method::POST, "/v1/dpop", request.to_string().into_bytes())
                        .await
                    {
                        Ok(reply) => {
                            if answers.is_empty() {
                                let _ = started_tx.send(()).await;
                            }
                            answers.push(reply);
                        }
                        // Closed by the draining agent: reconnect, which fails once the
                        // listener is gone.
                        Err(_) => continue 'outer,
                    }
                }
            }
            answers
        }));
    }
    for _ in 0..LOADERS {
        started.recv().await.expect("every loader got an answer");
    }
    // Give the agent time to read the slow request's head (so it is in flight, not idle).
    // A precondition, not a measurement.
    tokio::time::sleep(Duration::from_millis(500)).await;

    agent.terminate();
    // It stops accepting while the slow request is still open.
    let mut refused = false;
    for _ in 0..600 {
        match Conn::try_open(agent.socket()).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(mut c) => {
                if c.send_bytes(Method::GET, "/healthz", Vec::new())
                    .await
                    .is_err()
                {
                    refused = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the agent stops accepting after SIGTERM");
    assert!(agent.running(), "the agent waits for the in-flight request");

    // The in-flight request completes, with a good proof.
    slow.write_all(rest.as_bytes()).await.unwrap();
    let reply = read_reply(&mut slow).await;
    let proof = reply.ok_member("the in-flight request", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(&kid, "POST", "https://a.example/slow"),
        window_end(start),
    );

    agent.assert_clean_exit();

    // Everything the loaders got back was a verified 200: nothing cut off with a 5xx.
    let want = want_proof(&kid, "GET", "https://a.example/load");
    let window = window_end(start);
    let mut total = 0;
    for loader in loaders {
        for reply in loader.await.expect("loader task") {
            total += 1;
            let proof = reply.ok_member("a request during shutdown", "proof");
            check_proof(&jwks, &proof, &want, window);
        }
    }
    assert!(total >= LOADERS, "{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stuck_client_exits_0_after_the_grace_period() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text("", "shutdown_grace_secs = 1"));
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    // Headers promising a body that never comes.
    let mut stuck = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    stuck
        .write_all(b"POST /v1/dpop HTTP/1.1\r\nHost: keybound\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    // As above: let the agent read the head first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.terminate();
    let status = agent.wait();
    assert_eq!(status.code(), Some(0), "exit status 0:\n{}", agent.log());
    assert!(
        !agent.socket().exists(),
        "the socket file is removed on exit"
    );
    assert!(
        agent.log().contains("connections still open after 1 s"),
        "the cut-off is logged:\n{}",
        agent.log()
    );
    drop(stuck);
}

/// Imports a P-256 key with pkcs11-tool (so CKA_LOCAL is false): the policy refuses it.
fn import_key(token: &DevToken, label: &str) {
    let pem = token.path(&format!("{label}.pem"));
    let der = token.path(&format!("{label}.der"));
    let public = token.path(&format!("{label}.pub.der"));
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{cmd:?}:\n{}", describe(&out));
    };
    run(std::process::Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(&pem));
    run(std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&der));
    run(std::process::Command::new("openssl")
        .args(["ec", "-pubout", "-outform", "DER", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&public));
    for (file, kind) in [(&der, "privkey"), (&public, "pubkey")] {
        let out = token.pkcs11_tool(&[
            "--write-object",
            file.to_str().unwrap(),
            "--type",
            kind,
            "--label",
            label,
            "--id",
            "0a0b",
        ]);
        assert!(out.status.success(), "pkcs11-tool:\n{}", describe(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_signatures_and_keys_jwks_healthz_have_their_shapes() {
    const PROOFS: usize = 5;
    const ASSERTIONS: usize = 3;
    let (token, kids) = token_with_keys(&[("dpop", "ES256"), ("client-p384", "ES384")]);
    import_key(&token, "imported");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    assert_eq!(
        jwks.keys().collect::<HashSet<_>>(),
        kids.values().collect::<HashSet<_>>(),
        "/v1/jwks lists the two generated keys, not the imported one"
    );

    let mut conn = Conn::open(agent.socket()).await;
    let before = conn.get("/metrics").await;
    assert_eq!(before.status, StatusCode::OK);
    assert_eq!(
        before.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let before = before.text();
    assert!(
        samples(&before, "keybound_signatures_total").is_empty(),
        "{before}"
    );
    assert_eq!(
        metric(&before, "keybound_sign_duration_seconds_count", &[]),
        Some(0.0)
    );

    let start = window_start();
    for i in 0..PROOFS {
        let htu = format!("https://a.example/{i}");
        let proof = conn
            .post("/v1/dpop", &dpop_request("dpop", "GET", &htu))
            .await
            .ok_member("POST /v1/dpop", "proof");
        check_proof(
            &jwks,
            &proof,
            &want_proof(&kids["dpop"], "GET", &htu),
            window_end(start),
        );
    }
    for _ in 0..ASSERTIONS {
        let request = json!({ "key": "client-p384", "client_id": "0oa1",
                              "audience": "https://a.example/token" });
        let assertion = conn
            .post("/v1/assertion", &request)
            .await
            .ok_member("POST /v1/assertion", "assertion");
        check_assertion(
            &jwks,
            &assertion,
            &kids["client-p384"],
            "0oa1",
            "https://a.example/token",
            60,
            window_end(start),
        );
    }
    // Refused before any signature: none of these may count.
    conn.post(
        "/v1/dpop",
        &dpop_request("imported", "GET", "https://a.example/"),
    )
    .await
    .error(403, "policy_refused", &["imported", "CKA_LOCAL"]);
    conn.post("/v1/dpop", &dpop_request("dpop", "GET", "/relative"))
        .await
        .error(400, "invalid_request", &["/relative"]);
    conn.post(
        "/v1/dpop",
        &dpop_request("missing", "GET", "https://a.example/"),
    )
    .await
    .error(404, "unknown_key", &["missing"]);

    let metrics = conn.get("/metrics").await.text();
    let signatures = samples(&metrics, "keybound_signatures_total");
    assert_eq!(
        signatures,
        [
            format!(
                "keybound_signatures_total{{key=\"client-p384\",alg=\"ES384\",outcome=\"ok\"}} {ASSERTIONS}"
            ),
            format!(
                "keybound_signatures_total{{key=\"dpop\",alg=\"ES256\",outcome=\"ok\"}} {PROOFS}"
            ),
        ],
        "{metrics}"
    );
    let n = (PROOFS + ASSERTIONS) as f64;
    assert_eq!(
        metric(&metrics, "keybound_sign_duration_seconds_count", &[]),
        Some(n)
    );
    assert_eq!(
        metric(
            &metrics,
            "keybound_sign_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(n)
    );
    let buckets: Vec<f64> = samples(&metrics, "keybound_sign_duration_seconds_bucket")
        .iter()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(buckets.len() > 2, "{metrics}");
    assert!(
        buckets.windows(2).all(|w| w[0] <= w[1]),
        "histogram buckets are cumulative: {buckets:?}"
    );
    assert!(metric(&metrics, "keybound_sign_duration_seconds_sum", &[]).unwrap() > 0.0);
    assert_eq!(
        metric(&metrics, "keybound_sign_queue_depth", &[]),
        Some(0.0)
    );
    for name in [
        "keybound_signatures_total",
        "keybound_sign_duration_seconds",
        "keybound_sign_queue_depth",
        "keybound_token_fetches_total",
        "keybound_token_cache_total",
        "keybound_upstream_responses_total",
        "keybound_dpop_nonce_challenges_total",
        "keybound_clock_offset_seconds",
        "keybound_breaker_state",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "# TYPE {name} in\n{metrics}"
        );
    }

    // /v1/keys: every key with its verdict, as `keybound keys list --json`.
    let keys = conn.get("/v1/keys").await.ok("GET /v1/keys");
    let keys = keys.as_array().expect("an array").clone();
    let listed: Vec<Value> =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).unwrap();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in &keys {
        assert_members(key, &["label", "id", "alg", "kid", "policy", "reasons"]);
        let label = key["label"].as_str().unwrap();
        let cli = listed
            .iter()
            .find(|k| k["label"] == label)
            .unwrap_or_else(|| panic!("{label} in keys list --json"));
        assert_eq!(key, cli, "/v1/keys and keys list --json agree on {label}");
    }
    let by_label = |label: &str| keys.iter().find(|k| k["label"] == label).unwrap().clone();
    assert_eq!(by_label("dpop")["policy"], "pass");
    assert_eq!(by_label("dpop")["alg"], "ES256");
    assert_eq!(by_label("dpop")["kid"], kids["dpop"].as_str());
    assert_eq!(by_label("client-p384")["alg"], "ES384");
    assert_eq!(by_label("imported")["policy"], "fail");
    assert_mentions(&by_label("imported")["reasons"].to_string(), &["CKA_LOCAL"]);

    // One log line per signature: uid, key, alg, micros.
    let log = agent.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" signature ")).collect();
    assert_eq!(lines.len(), PROOFS + ASSERTIONS, "{log}");
    for line in &lines {
        assert_mentions(
            line,
            &[
                &format!("uid={}", own_uid()),
                "key=",
                "alg=",
                "micros=",
                "outcome=\"ok\"",
            ],
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("key=\"dpop\" alg=ES256"))
            .count(),
        PROOFS
    );

    let health = conn.get("/healthz").await.ok("GET /healthz");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["token"], TOKEN_LABEL);
    assert_eq!(health["keys"], 3);
    assert_eq!(health["queue_depth"], 0);
}
