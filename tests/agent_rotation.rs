//! Rotation inside `keybound serve`: the `[rotation]` schedule prepares, activates (after
//! the server accepted the prepared key) and retires a client key on its own while tokens
//! keep flowing; an activation the server refuses waits with backoff and says why; a
//! rotation made by the CLI in another process reaches the running agent without a restart.
//!
//! The dev-server learns the client's keys from a JWKS URL, as Okta does in URL mode: a
//! small server in the test ([`JwksUrl`]) that answers with the agent's own `/v1/jwks`
//! (prepared keys included), or with a fixed JWKS while the test keeps the new key from
//! the server. Every proof and assertion is verified independently (`check_proof`,
//! `check_assertion`: p256 from the JWKS entry and the proof's header). Nothing here
//! asserts on how long anything took; the loops are bounded by [`GUARD`]-like limits.

mod agent_support;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agent_support::*;
use http::StatusCode;
use serde_json::{Value, json};
use support::*;

/// How long a rotation step may take to show before the test gives up (a guard against a
/// hang, not a measurement).
const STEP_GUARD: Duration = Duration::from_secs(60);

/// What the JWKS URL answers.
struct JwksState {
    /// Served until the agent is known and `learn` is set.
    fixed: Value,
    agent: Option<PathBuf>,
    learn: bool,
    /// Kids left out of the agent's JWKS: the DPoP key, which a server refuses as a DPoP
    /// key once it is registered for client authentication.
    exclude: Vec<String>,
}

/// A JWKS URL on 127.0.0.1:0 on a thread of its own: the agent's `/v1/jwks` once `learn`
/// is set (what a hosted JWKS serves), else a fixed JWKS.
struct JwksUrl {
    url: String,
    state: Arc<Mutex<JwksState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksUrl {
    fn start(fixed: Value) -> JwksUrl {
        let state = Arc::new(Mutex::new(JwksState {
            fixed,
            agent: None,
            learn: false,
            exclude: Vec::new(),
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for the JWKS URL");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the JWKS URL");
                addr_tx
                    .send(listener.local_addr().expect("local addr"))
                    .expect("send addr");
                let app = axum::Router::new().route(
                    "/jwks.json",
                    axum::routing::get(move || {
                        let shared = shared.clone();
                        async move {
                            let (fixed, agent, exclude) = {
                                let s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                                let agent = s.agent.clone().filter(|_| s.learn);
                                (s.fixed.clone(), agent, s.exclude.clone())
                            };
                            let body = match agent {
                                Some(socket) => {
                                    let mut all = get(&socket, "/v1/jwks").await.ok("GET /v1/jwks");
                                    if let Some(keys) = all["keys"].as_array_mut() {
                                        keys.retain(|k| {
                                            !exclude.iter().any(|x| k["kid"] == x.as_str())
                                        });
                                    }
                                    all
                                }
                                None => fixed,
                            };
                            axum::Json(body)
                        }
                    }),
                );
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("serve the JWKS URL");
            });
        });
        let addr = addr_rx.recv_timeout(GUARD).expect("the JWKS URL started");
        JwksUrl {
            url: format!("http://{addr}/jwks.json"),
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// From now on the URL serves the agent's published JWKS, without the kids `exclude`.
    fn learn(&self, agent: &Agent, exclude: &str) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.agent = Some(agent.socket().to_path_buf());
        s.learn = true;
        s.exclude = vec![exclude.to_owned()];
    }
}

impl Drop for JwksUrl {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A dev-server that fetches the client's keys from `jwks` (Okta's URL mode), with
/// tokens of `lifetime` seconds so that token requests keep signing assertions.
fn url_mode_server(jwks: &JwksUrl, lifetime: u64) -> UrlServer {
    let settings = {
        let mut s = keybound_devserver::Settings::new(
            DEV_CLIENT_ID,
            keybound_devserver::JwksSource::Uri(jwks.url.parse().expect("JWKS URL")),
        );
        s.token_lifetime = lifetime;
        s
    };
    let server = keybound_devserver::Background::start(0, settings)
        .unwrap_or_else(|e| panic!("the dev-server did not start: {e}"));
    UrlServer {
        base: server.base().to_owned(),
        _server: server,
    }
}

/// The dev-server in URL mode, stopped on drop.
struct UrlServer {
    base: String,
    _server: keybound_devserver::Background,
}

/// The generations of `slot` in the agent's metrics: generation -> (kid, state).
fn generations(metrics: &str, slot: &str) -> BTreeMap<u32, (String, String)> {
    samples(metrics, "keybound_key_generation_state")
        .iter()
        .filter_map(|line| {
            let labels = line.split_once('{')?.1.rsplit_once('}')?.0;
            let get = |name: &str| {
                labels.split(',').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == name).then(|| v.trim_matches('"').to_owned())
                })
            };
            (get("slot")? == slot).then_some(())?;
            Some((
                get("generation")?.parse().ok()?,
                (get("kid")?, get("state")?),
            ))
        })
        .collect()
}

async fn metrics_text(agent: &Agent) -> String {
    let reply = get(agent.socket(), "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text()
}

/// Every key the agent has published so far, by kid (a kid's key never changes).
/// The public keys to verify with: the agent's published JWKS (the clients' assertion
/// keys) and, from the CLI, every other passing key the agent may sign with (DPoP keys are
/// never published).
///
/// No equality between the agent's and the CLI's view is asserted here: a rotation runs
/// while these tests read, and the two may be a step apart.
async fn learn_jwks(agent: &Agent, token: &DevToken, seen: &mut BTreeMap<String, Value>) {
    let body = get(agent.socket(), "/v1/jwks").await.ok("GET /v1/jwks");
    seen.extend(by_kid(body["keys"].as_array().expect("keys")));
    for label in signing_labels(token) {
        // A key may change state between the listing and this: skip what is refused now.
        let out = token.keybound(&["jwks", "--label", &label]);
        if let Ok(doc) = serde_json::from_slice::<Value>(&out.stdout)
            && let Some(keys) = doc["keys"].as_array()
        {
            seen.extend(by_kid(keys));
        }
    }
}

/// The kid of `slot`'s generation in `state`, from `keybound keys list --json`.
fn kid_in_state(token: &DevToken, slot: &str, state: &str) -> Option<String> {
    let list: Value = serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).ok()?;
    list.as_array()?
        .iter()
        .find(|k| k["slot"] == slot && k["state"] == state)
        .and_then(|k| k["kid"].as_str().map(str::to_owned))
}

fn rotation_config(base: &str, rotation: &str) -> String {
    config_text(
        &format!("{}\n[rotation]\n{}\n", dev_client(base), rotation.trim()),
        "",
    )
}

/// The schedule rotates the client key on its own while a client keeps fetching tokens:
/// prepared, activated only after the server accepted the prepared key, retired; the
/// assertions switch to the new kid without a restart and no token request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_the_client_key_while_tokens_flow() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let old = kids["client-auth"].clone();
    let jwks_url = JwksUrl::start(json!({ "keys": token.jwks(&["client-auth"]) }));
    let server = url_mode_server(&jwks_url, 2);
    token.write_config(&rotation_config(
        &server.base,
        r#"interval = "6s"
publish_lead = "2s"
retire_after = "2s"
check = "1s"
slots = ["client-auth"]"#,
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    jwks_url.learn(&agent, &kids["dpop"]);

    let aud = format!("{}/oauth2/v1/token", server.base);
    let mut seen = BTreeMap::new();
    let (mut tokens, mut failed) = (0, Vec::new());
    let mut assertion_kids: Vec<String> = Vec::new();
    let deadline = Instant::now() + STEP_GUARD;
    let (new, metrics) = loop {
        let reply = post(agent.socket(), "/v1/token", &json!({ "client": "dev" })).await;
        tokens += 1;
        if reply.status != StatusCode::OK {
            failed.push(reply.text());
        }
        learn_jwks(&agent, &token, &mut seen).await;
        let start = window_start();
        let assertion = post(agent.socket(), "/v1/assertion", &json!({ "client": "dev" }))
            .await
            .ok_member("POST /v1/assertion for the client", "assertion");
        let kid = Jws::parse(&assertion).header["kid"]
            .as_str()
            .expect("kid")
            .to_owned();
        check_assertion(
            &seen,
            &assertion,
            &kid,
            DEV_CLIENT_ID,
            &aud,
            60,
            window_end(start),
        );
        if assertion_kids.last() != Some(&kid) {
            assertion_kids.push(kid);
        }
        let metrics = metrics_text(&agent).await;
        let gens = generations(&metrics, "client-auth");
        if let (Some((k1, s1)), Some((k2, s2))) = (gens.get(&1), gens.get(&2))
            && s1 == "retired"
            && (s2 == "active" || s2 == "retiring")
            && assertion_kids.contains(k2)
        {
            assert_eq!(k1, &old, "generation 1 is the adopted key");
            break (k2.clone(), metrics);
        }
        assert!(
            Instant::now() < deadline,
            "no rotation within {STEP_GUARD:?}; generations {gens:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{tokens} token requests, assertion kids in order: {assertion_kids:?}");
    assert!(
        failed.is_empty(),
        "{} of {tokens} token requests failed across the rotation: {failed:?}\n{}",
        failed.len(),
        agent.log()
    );
    // The old key signed first, then the new one, never the old one again.
    assert_eq!(assertion_kids.first(), Some(&old), "{assertion_kids:?}");
    let switched = assertion_kids
        .iter()
        .position(|k| k == &new)
        .expect("new kid seen");
    assert!(
        !assertion_kids[switched..].contains(&old),
        "the retired key signed after the switch: {assertion_kids:?}"
    );
    assert_ne!(new, old);
    // The metrics tell the story.
    for step in ["prepare", "activate", "retire"] {
        assert!(
            metric(
                &metrics,
                "keybound_rotation_last_result",
                &[("slot", "client-auth"), ("step", step), ("result", "ok")]
            )
            .is_some(),
            "{step} ok in the metrics:\n{}",
            samples(&metrics, "keybound_rotation_last_result").join("\n")
        );
    }
    assert!(
        metric(
            &metrics,
            "keybound_key_age_seconds",
            &[("slot", "client-auth"), ("generation", "2"), ("kid", &new)]
        )
        .is_some(),
        "{}",
        samples(&metrics, "keybound_key_age_seconds").join("\n")
    );
    // /healthz: the old key is retired, and it is no longer published.
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    let rot = &health["rotation"]["client-auth"];
    assert_eq!(rot["scheduled"], true, "{health}");
    assert_ne!(rot["active_kid"], old.as_str(), "{health}");
    assert!(rot["next_step"]["step"].is_string(), "{health}");
    let g1 = rot["generations"]
        .as_array()
        .expect("generations")
        .iter()
        .find(|g| g["generation"] == 1)
        .cloned()
        .expect("generation 1 in /healthz");
    assert_eq!(g1["state"], "retired", "{health}");
    let published = get(agent.socket(), "/v1/jwks").await.ok("GET /v1/jwks");
    assert!(
        !by_kid(published["keys"].as_array().expect("keys")).contains_key(&old),
        "a retired key is not published: {published}"
    );
    // The log says each step with its kid.
    let log = agent.log();
    for needle in [
        "key generation prepared",
        "key generation activated by the schedule",
        "key generation retired",
        new.as_str(),
    ] {
        assert!(log.contains(needle), "the log names {needle}:\n{log}");
    }
    // Nothing is destroyed: generation 1 is still on the device.
    let listing = token.run_ok(&["keys", "list", "--json"]);
    assert!(listing.contains(&old), "{listing}");
}

/// While the server does not know the prepared key, the schedule does not activate it: the
/// old key stays active and signs, the failure is in the metrics and the log names the
/// kid; once the server can fetch the new key, the activation succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_waits_until_the_server_knows_the_key() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let old = kids["client-auth"].clone();
    let jwks_url = JwksUrl::start(json!({ "keys": token.jwks(&["client-auth"]) }));
    let server = url_mode_server(&jwks_url, 3600);
    token.write_config(&rotation_config(
        &server.base,
        r#"interval = "1h"
publish_lead = "2s"
retire_after = "1h"
check = "1s"
[rotation.slot.client-auth]
interval = "6s""#,
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());

    // Refused: the server fetches a JWKS without the prepared key.
    let deadline = Instant::now() + STEP_GUARD;
    let (prepared, metrics) = loop {
        let metrics = metrics_text(&agent).await;
        let failures = metric(
            &metrics,
            "keybound_rotation_failures_total",
            &[("slot", "client-auth"), ("step", "activate")],
        );
        if failures.is_some_and(|n| n >= 2.0) {
            let gens = generations(&metrics, "client-auth");
            let (kid, state) = gens.get(&2).cloned().expect("generation 2 in the metrics");
            assert_eq!(state, "prepared", "{gens:?}");
            break (kid, metrics);
        }
        assert!(
            Instant::now() < deadline,
            "no refused activation within {STEP_GUARD:?}:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        generations(&metrics, "client-auth").get(&1),
        Some(&(old.clone(), "active".to_owned()))
    );
    assert!(
        metric(
            &metrics,
            "keybound_rotation_last_result",
            &[
                ("slot", "client-auth"),
                ("step", "activate"),
                ("result", "error")
            ]
        )
        .is_some(),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "keybound_rotation_next_step_timestamp_seconds",
            &[("slot", "client-auth"), ("step", "activate")]
        )
        .is_some(),
        "{metrics}"
    );
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("rotation step failed")
            && l.contains("activation refused")
            && l.contains(&prepared)),
        "a warning names the prepared kid:\n{log}"
    );
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    let rot = &health["rotation"]["client-auth"];
    assert_eq!(rot["active_kid"], old.as_str(), "{health}");
    assert_eq!(rot["last_error"]["step"], "activate", "{health}");
    assert!(
        rot["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&prepared)),
        "{health}"
    );
    // The old key still signs the client's assertions.
    let mut seen = BTreeMap::new();
    learn_jwks(&agent, &token, &mut seen).await;
    let start = window_start();
    let assertion = post(agent.socket(), "/v1/assertion", &json!({ "client": "dev" }))
        .await
        .ok_member(
            "POST /v1/assertion while the activation is refused",
            "assertion",
        );
    let aud = format!("{}/oauth2/v1/token", server.base);
    check_assertion(
        &seen,
        &assertion,
        &old,
        DEV_CLIENT_ID,
        &aud,
        60,
        window_end(start),
    );
    post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token while the activation is refused");

    // The server learns the key (its next fetch of the URL): the schedule activates it.
    jwks_url.learn(&agent, &kids["dpop"]);
    let deadline = Instant::now() + STEP_GUARD;
    loop {
        let metrics = metrics_text(&agent).await;
        let gens = generations(&metrics, "client-auth");
        if gens.get(&2).is_some_and(|(_, s)| s == "active") {
            assert_eq!(gens.get(&1), Some(&(old.clone(), "retiring".to_owned())));
            assert!(
                metric(
                    &metrics,
                    "keybound_rotation_last_result",
                    &[
                        ("slot", "client-auth"),
                        ("step", "activate"),
                        ("result", "ok")
                    ]
                )
                .is_some(),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not activated within {STEP_GUARD:?} after the server learnt the key; {gens:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The agent signs with it now (the switch follows the agent's own step at once).
    let deadline = Instant::now() + STEP_GUARD;
    loop {
        learn_jwks(&agent, &token, &mut seen).await;
        let start = window_start();
        let assertion = post(agent.socket(), "/v1/assertion", &json!({ "client": "dev" }))
            .await
            .ok_member("POST /v1/assertion after the activation", "assertion");
        let kid = Jws::parse(&assertion).header["kid"]
            .as_str()
            .expect("kid")
            .to_owned();
        check_assertion(
            &seen,
            &assertion,
            &kid,
            DEV_CLIENT_ID,
            &aud,
            60,
            window_end(start),
        );
        if kid == prepared {
            break;
        }
        assert!(Instant::now() < deadline, "still {kid}:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    assert_eq!(
        health["rotation"]["client-auth"]["active_kid"],
        prepared.as_str(),
        "{health}"
    );
}

/// `keybound keys rotate --label dpop`, then `--activate`, in another process: the running
/// agent's proofs (by key name and for the client) switch to the new kid within a few
/// checks, without a restart; before the activation they stay with the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_rotation_reaches_the_running_agent() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let old = kids["dpop"].clone();
    let server = DevServer::for_client_auth(&token, |_| {});
    token.write_config(&rotation_config(&server.base, "check = \"1s\""));
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let htu = format!("{}/api/v1/users", server.base);
    let mut seen = BTreeMap::new();

    // One proof by key name and one for the client; each verified; returns their kids.
    let proofs = async |seen: &mut BTreeMap<String, Value>| -> Vec<String> {
        learn_jwks(&agent, &token, seen).await;
        let mut got = Vec::new();
        for body in [
            dpop_request("dpop", "GET", &htu),
            json!({ "client": "dev", "htm": "GET", "htu": htu }),
        ] {
            let start = window_start();
            let proof = post(agent.socket(), "/v1/dpop", &body)
                .await
                .ok_member("POST /v1/dpop", "proof");
            let kid = jwk_thumbprint(&Jws::parse(&proof).header["jwk"]);
            check_proof(
                seen,
                &proof,
                &want_proof(&kid, "GET", &htu),
                window_end(start),
            );
            got.push(kid);
        }
        got
    };
    assert_eq!(proofs(&mut seen).await, [old.clone(), old.clone()]);
    let first = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token before the rotation");

    token.run_ok(&["keys", "rotate", "--label", "dpop"]);
    let new = kid_in_state(&token, "dpop", "prepared").expect("a prepared generation");
    assert_ne!(new, old);
    // Prepared only: the agent has seen the record change, and still signs with the old key.
    let deadline = Instant::now() + STEP_GUARD;
    loop {
        let metrics = metrics_text(&agent).await;
        if generations(&metrics, "dpop").get(&2) == Some(&(new.clone(), "prepared".to_owned())) {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(proofs(&mut seen).await, [old.clone(), old.clone()]);

    token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    let deadline = Instant::now() + STEP_GUARD;
    loop {
        let got = proofs(&mut seen).await;
        if got == [new.clone(), new.clone()] {
            break;
        }
        assert!(
            got.iter().all(|k| *k == old || *k == new),
            "{got:?} is neither the old nor the new key"
        );
        assert!(
            Instant::now() < deadline,
            "the agent still signs with {got:?} after the activation:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        agent.running(),
        "the same agent process switched, without a restart"
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("rotation record changed") && l.contains(&new)),
        "the log names the new active kid:\n{log}"
    );
    // The cached token stays bound to the old key and is used until it expires, always
    // with proofs by the key it is bound to, never by another: a proof for it (the agent
    // knows the token) is signed by the old key, a proof without it by the new one.
    let again = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token after the rotation");
    let jkt =
        |t: &Value| Jws::parse(t["access_token"].as_str().unwrap()).claims["cnf"]["jkt"].clone();
    assert_eq!(jkt(&first), old.as_str());
    assert_eq!(again["access_token"], first["access_token"]);
    let bound = post(
        agent.socket(),
        "/v1/dpop",
        &json!({ "client": "dev", "htm": "GET", "htu": htu,
                 "access_token": first["access_token"] }),
    )
    .await
    .ok_member("POST /v1/dpop for the cached token", "proof");
    let bound = Jws::parse(&bound);
    assert_eq!(jwk_thumbprint(&bound.header["jwk"]), old);
    assert_verifies(&seen[&old], &bound);
    assert!(bound.claims["ath"].is_string(), "{}", bound.claims);

    // The agent recorded that binding on generation 1, so the old key is not destroyed
    // under its token: a forced retirement goes through, the destruction is refused.
    let deadline = Instant::now() + STEP_GUARD;
    loop {
        let list: Value = serde_json::from_str(&token.run_ok(&["keys", "list", "--json"]))
            .expect("keys list --json");
        let recorded = list
            .as_array()
            .expect("array")
            .iter()
            .any(|k| k["kid"] == old.as_str() && k["dates"]["tokens_until"].as_i64().is_some());
        if recorded {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no tokens_until on the old generation: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    token.run_ok(&["keys", "rotate", "--label", "dpop", "--retire", "--force"]);
    let err = token.run_err(&["keys", "destroy", "--label", "dpop", "--kid", &old]);
    assert_mentions(&err, &["access token bound to it", "cnf.jkt"]);

    // Recording the binding is itself a record change the agent sees: it must not record
    // it again (a new record every check, for ever). Over several checks the record stays.
    let seq = async || {
        let health = get(agent.socket(), "/healthz").await.json();
        health["rotation"]["dpop"]["seq"].as_u64().expect("seq")
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = seq().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        seq().await,
        before,
        "the agent keeps rewriting the record:\n{}",
        agent.log()
    );
}

/// Two agents on one token both run the schedule of `dpop`: the slot is rotated once per
/// interval (no generation twice, exactly one active), a step the other agent took first
/// is not a failure, and both agents sign with the new key without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_sharing_a_token_rotate_it_once() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let old = kids["dpop"].clone();
    token.write_config(&config_text(
        r#"[rotation]
interval = "6s"
publish_lead = "2s"
retire_after = "2s"
check = "1s"
slots = ["dpop"]"#,
        "",
    ));
    let (dir_a, dir_b) = (SocketDir::new(), SocketDir::new());
    let a = Agent::start(&token, &dir_a.socket());
    let b = Agent::start(&token, &dir_b.socket());
    let htu = "https://a.example/two";
    let mut seen = BTreeMap::new();
    let proof_kid = async |agent: &Agent, seen: &mut BTreeMap<String, Value>| -> String {
        learn_jwks(agent, &token, seen).await;
        let start = window_start();
        let proof = post(
            agent.socket(),
            "/v1/dpop",
            &dpop_request("dpop", "GET", htu),
        )
        .await
        .ok_member("POST /v1/dpop", "proof");
        let kid = jwk_thumbprint(&Jws::parse(&proof).header["jwk"]);
        check_proof(
            seen,
            &proof,
            &want_proof(&kid, "GET", htu),
            window_end(start),
        );
        kid
    };
    assert_eq!(proof_kid(&a, &mut seen).await, old);
    assert_eq!(proof_kid(&b, &mut seen).await, old);

    let deadline = Instant::now() + STEP_GUARD;
    let mut switched = [false, false];
    while switched != [true, true] {
        for (i, agent) in [&a, &b].into_iter().enumerate() {
            let kid = proof_kid(agent, &mut seen).await;
            let metrics = metrics_text(agent).await;
            let gens = generations(&metrics, "dpop");
            // One record, read by both: one active generation, each generation once.
            let active: Vec<_> = gens.values().filter(|(_, s)| s == "active").collect();
            assert!(active.len() <= 1, "{gens:?}");
            let mut kids_seen: Vec<_> = gens.values().map(|(k, _)| k).collect();
            kids_seen.dedup();
            assert_eq!(kids_seen.len(), gens.len(), "{gens:?}");
            if kid != old && active.first().is_some_and(|(k, _)| *k == kid) {
                switched[i] = true;
            }
        }
        assert!(
            Instant::now() < deadline,
            "not both switched within {STEP_GUARD:?}: {switched:?}\n--- a ---\n{}\n--- b ---\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Whatever step the other agent took first was not counted as a failure.
    for agent in [&a, &b] {
        let metrics = metrics_text(agent).await;
        for step in ["prepare", "activate", "retire"] {
            assert_eq!(
                metric(
                    &metrics,
                    "keybound_rotation_failures_total",
                    &[("slot", "dpop"), ("step", step)]
                ),
                Some(0.0),
                "{}\n{}",
                samples(&metrics, "keybound_rotation_failures_total").join("\n"),
                agent.log()
            );
        }
    }
    // Neither agent resumed the other's preparation: no second key under one label, no
    // record that one of them cannot trust.
    for agent in [&a, &b] {
        let log = agent.log();
        assert!(!log.contains("cannot read the rotation record"), "{log}");
    }
    let listing = token.run_ok(&["keys", "list", "--json"]);
    eprintln!("{listing}");
}
