//! The device under the agent: a token removed and restored mid-run, a client key rotated
//! on the token and found again without a restart.
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use std::time::Duration;

use agent_support::*;
use http::StatusCode;
use serde_json::{Value, json};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_removed_then_restored_mid_run() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let kid = &kids["dpop"];
    let request = dpop_request("dpop", "GET", "https://a.example/d");
    let want = want_proof(kid, "GET", "https://a.example/d");
    let start = window_start();

    // Every answer is logged; every 200 verified, whatever the phase.
    let mut log = Vec::new();
    let observe = async |phase: &str, path: &str, log: &mut Vec<String>| -> Reply {
        let reply = if path == "/v1/dpop" {
            post(agent.socket(), path, &request).await
        } else {
            get(agent.socket(), path).await
        };
        let body = if reply.status == StatusCode::OK && path == "/v1/dpop" {
            let proof = reply.ok_member("a proof", "proof");
            check_proof(&jwks, &proof, &want, (start, unix_now() + 1));
            "(proof verified)".to_owned()
        } else {
            reply.text()
        };
        log.push(format!(
            "{phase}: {path} -> {} retry-after={:?} {body}",
            reply.status.as_u16(),
            reply.retry_after(),
        ));
        reply
    };

    for _ in 0..3 {
        assert_eq!(observe("before", "/v1/dpop", &mut log).await.status, 200);
    }
    assert_eq!(observe("before", "/healthz", &mut log).await.status, 200);

    let tokens = token.path("tokens");
    let gone = token.path("tokens.gone");
    std::fs::rename(&tokens, &gone).expect("mv tokens tokens.gone");
    let mut removed = Vec::new();
    for _ in 0..5 {
        removed.push(observe("removed", "/v1/dpop", &mut log).await);
    }
    let health_removed = observe("removed", "/healthz", &mut log).await;
    std::fs::rename(&gone, &tokens).expect("mv tokens.gone tokens");

    // Back: allow a few requests for the agent to reconnect; none may be a wrong signature.
    let mut restored = None;
    for _ in 0..20 {
        let reply = observe("restored", "/v1/dpop", &mut log).await;
        if reply.status == StatusCode::OK {
            restored = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health_restored = observe("restored", "/healthz", &mut log).await;
    let log = log.join("\n");
    eprintln!("observed:\n{log}");

    // The token directory itself came back intact: a restarted agent signs with it.
    agent.terminate();
    assert_eq!(agent.wait().code(), Some(0), "{}", agent.log());
    let restarted = Agent::start(&token, &dir.socket());
    assert_still_signs(&mut Conn::open(restarted.socket()).await, &jwks, kid).await;

    // While removed: either SoftHSM keeps serving from memory (200, verified above) or the
    // agent says "try later" (503 + Retry-After); /healthz agrees with what signing did.
    let all_signed = removed.iter().all(|r| r.status == StatusCode::OK);
    for reply in &removed {
        if reply.status != StatusCode::OK {
            assert_eq!(
                reply.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "a removed device is 503 (try later), not a refusal or an unknown key; observed:\n{log}"
            );
            assert!(
                reply.retry_after().is_some(),
                "503 carries Retry-After:\n{log}"
            );
            assert_eq!(reply.json()["error"], "unavailable", "{log}");
        }
    }
    if all_signed {
        assert_eq!(health_removed.status, StatusCode::OK, "{log}");
    } else {
        assert_eq!(
            health_removed.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "/healthz reports the removed device; observed:\n{log}"
        );
        assert!(health_removed.retry_after().is_some(), "{log}");
        assert_eq!(health_removed.json()["status"], "unavailable", "{log}");
    }
    assert!(
        restored.is_some(),
        "signing works again after the token directory is back, without a restart; observed:\n{log}"
    );
    assert_eq!(health_restored.status, StatusCode::OK, "{log}");
    assert_eq!(health_restored.json()["status"], "ok", "{log}");
}

/// F12: a client's key deleted and generated anew under its name is looked up again:
/// the client's proofs and an uncached token work without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_key_is_found_again_without_a_restart() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let server = DevServer::for_client_auth(&token, |_| {});
    let second = dev_client(&server.base).replace("name = \"dev\"", "name = \"dev2\"");
    token.write_config(&config_text(
        &format!("{}\n{second}", dev_client(&server.base)),
        "",
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let first = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token before the rotation");
    let jkt =
        |t: &Value| Jws::parse(t["access_token"].as_str().unwrap()).claims["cnf"]["jkt"].clone();
    assert_eq!(jkt(&first), kids["dpop"].as_str());
    // The agent's own key cache holds dpop too.
    let jwks = published_jwks(&token, &agent).await;
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;

    // Rotate dpop: delete both objects, generate a new key under the same label.
    for kind in ["privkey", "pubkey"] {
        let out = token.pkcs11_tool(&["--delete-object", "--type", kind, "--label", "dpop"]);
        assert!(out.status.success(), "pkcs11-tool:\n{}", describe(&out));
    }
    let new_kid = token.generate("dpop", "ES256");
    assert_ne!(new_kid, kids["dpop"]);
    let jwks = published_jwks(&token, &agent).await;

    // By name, through the agent's cache: the first request after the rotation signs.
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &new_kid).await;

    let htu = format!("{}/api/v1/users", server.base);
    let start = window_start();
    let proof = post(
        agent.socket(),
        "/v1/dpop",
        &json!({ "client": "dev", "htm": "GET", "htu": htu }),
    )
    .await
    .ok_member("POST /v1/dpop for the client after the rotation", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(&new_kid, "GET", &htu),
        window_end(start),
    );

    // dev2 has fetched nothing yet: its token is signed now, bound to the new key.
    let token2 = post(agent.socket(), "/v1/token", &json!({ "client": "dev2" }))
        .await
        .ok("POST /v1/token, uncached, after the rotation");
    assert_eq!(jkt(&token2), new_kid.as_str());
    // dev's cached token was bound to the old key: it is dropped with the old key, and
    // the next one is bound to the new key, like the proofs dev now gets.
    let again = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token for dev after the rotation");
    assert_ne!(again["access_token"], first["access_token"]);
    assert_eq!(jkt(&again), new_kid.as_str());
}
