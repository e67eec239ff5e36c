//! The agent signs, end to end: concurrent clients get DPoP proofs and client assertions,
//! names resolve to keys, and `/v1/token` against the dev-server (cached answers, nonce
//! challenges, client rules, a skewed clock, key limits).
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use std::collections::{BTreeMap, HashSet};

use agent_support::*;
use serde_json::{Value, json};
use support::*;

/// Request `n` of the concurrency test: mostly DPoP proofs over three keys (ES256, ES384,
/// PS256) with `htm`/`htu` needing normalisation, some with a nonce, some with an access
/// token, some with both (the moduli are chosen so that every combination occurs); every
/// sixth a client assertion (ES256 or RS256) with one of three lifetimes.
fn job(n: usize, kids: &BTreeMap<String, String>) -> Job {
    if n % 6 == 5 {
        let key = ["client-auth", "client-rsa"][n / 6 % 2];
        let lifetime = [None, Some(300), Some(3600)][n / 6 % 3];
        return assertion_job(
            n,
            key,
            &kids[key],
            "https://example.okta.com/oauth2/v1/token",
            lifetime,
        );
    }
    let key = ["dpop", "dpop-p384", "dpop-pss"][n % 3];
    proof_job(n, key, &kids[key], n % 5 < 2, (n / 4).is_multiple_of(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_get_proofs_and_assertions_that_verify_independently() {
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 12; // 10 proofs and 2 assertions each
    let (token, kids) = token_with_keys(&[
        ("dpop", "ES256"),
        ("dpop-p384", "ES384"),
        ("dpop-pss", "PS256"),
        ("client-auth", "ES256"),
        ("client-rsa", "RS256"),
    ]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let start = window_start();
    let answers = run_jobs(agent.socket(), CLIENTS, PER_CLIENT, move |n| job(n, &kids)).await;
    let window = window_end(start);

    let mut jtis = HashSet::new();
    let (mut proofs, mut assertions) = (0, 0);
    for (job, reply) in &answers {
        match job {
            Job::Proof(..) => proofs += 1,
            Job::Assertion { .. } => assertions += 1,
        }
        let jws = check_job(&jwks, job, reply, window);
        let jti = jws.claims["jti"].as_str().expect("jti").to_owned();
        assert!(jtis.insert(jti.clone()), "jti {jti} was handed out twice");
    }
    assert_eq!(proofs, CLIENTS * 10);
    assert_eq!(assertions, CLIENTS * 2);
    assert_eq!(jtis.len(), CLIENTS * PER_CLIENT, "every jti is unique");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_caches_answers_nonce_challenges_and_obeys_client_rules() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let server = DevServer::for_client_auth(&token, |_| {});
    token.write_config(&config_text(&dev_client(&server.base), ""));
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;

    let first = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token");
    assert_members(
        &first,
        &["access_token", "token_type", "expires_in", "scope"],
    );
    assert_eq!(first["token_type"], "DPoP");
    assert_eq!(first["scope"], "okta.users.read");
    let expires_in = first["expires_in"].as_u64().expect("expires_in");
    assert!((1..=3600).contains(&expires_in), "{first}");
    let second = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token again");
    let access_token = first["access_token"].as_str().expect("access_token");
    assert_eq!(
        second["access_token"], access_token,
        "the second call hits the cache"
    );
    assert!(
        !agent.log().contains(access_token),
        "the access token never appears in the log"
    );

    // The token is bound to the dpop key (cnf.jkt, RFC 9449 §6.1) ...
    let claims = Jws::parse(access_token).claims;
    assert_eq!(claims["cnf"]["jkt"], kids["dpop"].as_str(), "{claims}");
    // ... and a proof from the agent for the client opens the dev-server's API with it.
    let users = format!("{}/api/v1/users?limit=2", server.base);
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut nonce: Option<String> = None;
    let mut answered = None;
    for _ in 0..2 {
        let mut request = json!({ "client": "dev", "htm": "GET", "htu": users,
                                  "access_token": access_token });
        if let Some(n) = &nonce {
            request["nonce"] = json!(n);
        }
        let start = window_start();
        let proof = post(agent.socket(), "/v1/dpop", &request)
            .await
            .ok_member("POST /v1/dpop for the client", "proof");
        check_proof(
            &jwks,
            &proof,
            &WantProof {
                nonce: nonce.clone(),
                access_token: Some(access_token.to_owned()),
                ..want_proof(
                    &kids["dpop"],
                    "GET",
                    &format!("{}/api/v1/users", server.base),
                )
            },
            window_end(start),
        );
        let response = http
            .get(&users)
            .header("authorization", format!("DPoP {access_token}"))
            .header("dpop", proof)
            .send()
            .await
            .expect("call the dev-server API");
        if let Some(n) = response.headers().get("dpop-nonce") {
            nonce = Some(n.to_str().unwrap().to_owned());
        }
        if response.status() == 200 {
            let text = response.text().await.unwrap();
            answered = Some(serde_json::from_str::<Value>(&text).unwrap());
            break;
        }
        assert_eq!(response.status(), 401, "only a nonce challenge comes first");
    }
    let users = answered.expect("the API accepts the agent's proof");
    assert_eq!(users.as_array().map(Vec::len), Some(2), "{users}");

    // An assertion for the client: its audience is the token endpoint.
    let start = window_start();
    let assertion = post(agent.socket(), "/v1/assertion", &json!({ "client": "dev" }))
        .await
        .ok_member("POST /v1/assertion for the client", "assertion");
    check_assertion(
        &jwks,
        &assertion,
        &kids["client-auth"],
        DEV_CLIENT_ID,
        &format!("{}/oauth2/v1/token", server.base),
        60,
        window_end(start),
    );

    let metrics = get(agent.socket(), "/metrics").await.text();
    let sample = |name: &str, labels: &[(&str, &str)]| {
        metric(&metrics, name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{metrics}"))
    };
    let client = ("client", "dev");
    assert!(sample("keybound_token_cache_total", &[client, ("result", "hit")]) >= 1.0);
    assert!(sample("keybound_token_cache_total", &[client, ("result", "miss")]) >= 1.0);
    assert!(sample("keybound_dpop_nonce_challenges_total", &[client]) >= 1.0);
    assert_eq!(
        sample("keybound_token_fetches_total", &[client, ("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        sample(
            "keybound_token_fetches_total",
            &[client, ("outcome", "error")]
        ),
        0.0
    );
    assert!(
        sample(
            "keybound_upstream_responses_total",
            &[client, ("class", "2xx")]
        ) >= 1.0
    );
    assert!(
        sample(
            "keybound_upstream_responses_total",
            &[client, ("class", "4xx")]
        ) >= 1.0
    );
    assert_eq!(sample("keybound_breaker_state", &[client]), 0.0);
    assert!(
        !samples(&metrics, "keybound_clock_offset_seconds").is_empty(),
        "the dev-server's Date header gives a clock offset:\n{metrics}"
    );

    // Unknown client: 404 naming the configured ones.
    post(agent.socket(), "/v1/token", &json!({ "client": "nope" }))
        .await
        .error(404, "unknown_client", &["nope", "dev"]);

    // A caller whose rule lists other clients gets none of this client's services.
    agent.terminate();
    assert_eq!(agent.wait().code(), Some(0));
    let other = dev_client(&server.base).replace("name = \"dev\"", "name = \"other\"");
    token.write_config(&config_text(
        &format!("{}\n{other}", dev_client(&server.base)),
        &allow_uid(own_uid(), "clients = [\"other\"]"),
    ));
    let agent = Agent::start(&token, &dir.socket());
    for (path, body) in [
        ("/v1/token", json!({ "client": "dev" })),
        (
            "/v1/dpop",
            json!({ "client": "dev", "htm": "GET", "htu": "https://a.example/" }),
        ),
        ("/v1/assertion", json!({ "client": "dev" })),
    ] {
        post(agent.socket(), path, &body).await.error(
            403,
            "forbidden",
            &["client 'dev' is not allowed", "other"],
        );
    }
}

/// A server whose clock runs 2 minutes ahead: the agent's first token request is refused
/// in this machine's time and retried once in the server's; the offset gauge says +120,
/// fed by refusals too (a client whose key the server does not know is only ever refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_server_is_survived_and_its_offset_exported() {
    let (token, _) = token_with_keys(&[
        ("client-auth", "ES256"),
        ("dpop", "ES256"),
        ("stranger", "ES256"),
    ]);
    let server = DevServer::for_client_auth(&token, |settings| {
        settings.clock_offset_secs = 120;
    });
    let stranger = dev_client(&server.base)
        .replace("name = \"dev\"", "name = \"stranger\"")
        .replace(
            "assertion_key = \"client-auth\"",
            "assertion_key = \"stranger\"",
        );
    token.write_config(&config_text(
        &format!("{}{stranger}", dev_client(&server.base)),
        "",
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let gauge = |metrics: &str| {
        metric(
            metrics,
            "keybound_clock_offset_seconds",
            &[("server", server.base.as_str())],
        )
        .unwrap_or_else(|| panic!("no clock offset for {} in\n{metrics}", server.base))
    };

    post(
        agent.socket(),
        "/v1/token",
        &json!({ "client": "stranger" }),
    )
    .await
    .error(502, "server_refused", &["invalid_client", "clock"]);
    let metrics = get(agent.socket(), "/metrics").await.text();
    let offset = gauge(&metrics);
    assert!((118.0..=121.0).contains(&offset), "{offset}\n{metrics}");

    let granted = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token to a server 2 minutes ahead");
    assert_eq!(granted["token_type"], "DPoP");
    let metrics = get(agent.socket(), "/metrics").await.text();
    let offset = gauge(&metrics);
    assert!((118.0..=121.0).contains(&offset), "{offset}\n{metrics}");
}

/// F4: names are cached by the key they resolve to, not by their text; a name longer than
/// a key name can sensibly be is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_names_for_one_key_cache_one_entry_and_an_over_long_name_is_400() {
    const NAMES: usize = 100;
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let mut conn = Conn::open(agent.socket()).await;
    for i in 0..NAMES {
        // Distinct names of one key: an `x-` vendor attribute changes nothing (RFC 7512).
        let name = format!("pkcs11:object=dpop;x-n={i:0>400}");
        let start = window_start();
        let proof = conn
            .post(
                "/v1/dpop",
                &dpop_request(&name, "GET", "https://a.example/n"),
            )
            .await
            .ok_member("a proof by a long pkcs11: name", "proof");
        if i % 25 == 0 {
            check_proof(
                &jwks,
                &proof,
                &want_proof(&kids["dpop"], "GET", "https://a.example/n"),
                window_end(start),
            );
        }
    }
    assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;
    let metrics = conn.get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "keybound_cached_keys", &[]),
        Some(1.0),
        "{NAMES} names of one key, one cache entry:\n{metrics}"
    );
    assert_eq!(
        conn.get("/healthz").await.ok("GET /healthz")["cached_keys"],
        1
    );
    // Nor does each name cost a device lookup: the key was proven once for the JWKS and
    // once when first named, never again per name.
    let proofs = metric(
        &metrics,
        "keybound_possession_proofs_total",
        &[("key", "dpop"), ("outcome", "ok")],
    );
    assert!(
        proofs.is_some_and(|n| n <= 2.0),
        "{NAMES} names of one key, proofs of possession: {proofs:?}\n{metrics}"
    );

    let long = format!("pkcs11:object=dpop;manufacturer={}", "m".repeat(10_000));
    conn.post(
        "/v1/dpop",
        &dpop_request(&long, "GET", "https://a.example/n"),
    )
    .await
    .error(400, "invalid_request", &["key name is", "512"]);
    let metrics = conn.get("/metrics").await.text();
    assert_eq!(metric(&metrics, "keybound_cached_keys", &[]), Some(1.0));
}

/// F13: /v1/token checks the client's keys against the caller's rule, and the
/// signatures a token fetch makes are counted and logged like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_obey_key_limits_and_their_signatures_are_recorded() {
    let (token, _) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let server = DevServer::for_client_auth(&token, |_| {});
    token.write_config(&config_text(
        &dev_client(&server.base),
        &format!(
            "{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(NOBODY, "keys = [\"dpop\"]")
        ),
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    expose_socket(&dir);

    let refused = curl_as(
        As::Setpriv {
            uid: NOBODY,
            gid: NOBODY,
        },
        agent.socket(),
        "/v1/token",
        &json!({ "client": "dev" }),
    );
    refused.error(403, "forbidden", &["key 'client-auth' is not allowed"]);

    let mut conn = Conn::open(agent.socket()).await;
    conn.post("/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token");
    let metrics = conn.get("/metrics").await.text();
    let count = |key: &str| {
        metric(
            &metrics,
            "keybound_signatures_total",
            &[("key", key), ("alg", "ES256"), ("outcome", "ok")],
        )
        .unwrap_or(0.0)
    };
    let log = agent.log();
    let logged = |key: &str| {
        log.lines()
            .filter(|l| l.contains(" signature ") && l.contains(&format!("key=\"{key}\"")))
            .inspect(|l| assert_mentions(l, &[&format!("uid={}", own_uid()), "micros="]))
            .count() as f64
    };
    for key in ["client-auth", "dpop"] {
        assert!(count(key) >= 1.0, "{key} counted:\n{metrics}");
        assert_eq!(
            count(key),
            logged(key),
            "{key}: one log line per signature\n{log}"
        );
    }
}
