//! Caller rules: another uid is refused by default, `[[agent.allow]]` limits a uid or gid
//! to its keys, clients, `htu_prefixes` and lifetimes, and a bad rule stops the agent at
//! start, named.
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use agent_support::*;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_is_refused_by_default_even_with_the_socket_opened_to_everyone() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let request = dpop_request("dpop", "GET", "https://o.example/api");

    // First line of defence, the file modes the agent set: with only the temp dir above
    // opened, the 0700 socket directory keeps nobody out; with that opened too, the 0600
    // socket does (connect(2) needs write permission on it).
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };
    chmod(dir.root(), 0o711);
    for layer in ["the 0700 directory", "the 0600 socket"] {
        let blocked = curl_as(nobody, agent.socket(), "/v1/dpop", &request);
        assert_eq!(
            (blocked.exit, blocked.status),
            (Some(7), 0),
            "{layer} keeps nobody from connecting: {blocked:?}"
        );
        chmod(&dir.run_dir(), 0o711);
    }

    // Second line: with the socket reachable, the peer uid decides: a uid no rule names
    // is closed as soon as it is accepted, before any HTTP.
    expose_socket(&dir);
    for who in [nobody, As::RunuserNobody] {
        curl_as(who, agent.socket(), "/v1/dpop", &request).assert_closed();
    }
    // Assertions too.
    curl_as(
        As::RunuserNobody,
        agent.socket(),
        "/v1/assertion",
        &json!({ "key": "dpop", "client_id": "x", "audience": "https://a.example/" }),
    )
    .assert_closed();
    let log = agent.log();
    assert!(
        log.contains("refused caller")
            && log.contains("uid 65534")
            && log.contains("[[agent.allow]]"),
        "the refusal is logged with its reason:\n{log}"
    );

    // The agent's own uid is still served, on the same exposed socket.
    let jwks = published_jwks(&token, &agent).await;
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_rules_limit_another_uid_to_its_keys_and_htu_prefixes() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256"), ("client-auth", "ES256")]);
    // uid rules win over gid rules: uid 65534 gets the dpop rule, uid 65533 in group 65534
    // the gid rule (client-auth only).
    token.write_config(&config_text(
        "",
        &format!(
            "{}{}[[agent.allow]]\ngid = {NOBODY}\nkeys = [\"client-auth\"]\n",
            allow_uid(own_uid(), "max_assertion_lifetime = 300"),
            allow_uid(
                NOBODY,
                "keys = [\"dpop\"]\nhtu_prefixes = [\"https://o.example/\"]"
            ),
        ),
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    expose_socket(&dir);
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };

    // Allowed: the dpop key under the prefix, compared after normalisation (upper-case
    // host, default port, query dropped).
    for (htu, want) in [
        (
            "https://o.example/api/v1/users",
            "https://o.example/api/v1/users",
        ),
        ("HTTPS://O.EXAMPLE:443/api?limit=3", "https://o.example/api"),
    ] {
        proof_as(
            nobody,
            agent.socket(),
            &jwks,
            ("dpop", &kids["dpop"]),
            htu,
            want,
        );
    }
    // Refused: another htu, a look-alike host, the client-auth key (for a proof or an
    // assertion).
    for htu in [
        "https://evil.example/api",
        "https://o.example.evil.example/",
    ] {
        let reply = curl_as(
            nobody,
            agent.socket(),
            "/v1/dpop",
            &dpop_request("dpop", "GET", htu),
        );
        reply.error(403, "forbidden", &["htu_prefixes", "https://o.example/"]);
    }
    let reply = curl_as(
        nobody,
        agent.socket(),
        "/v1/dpop",
        &dpop_request("client-auth", "GET", "https://o.example/api"),
    );
    reply.error(403, "forbidden", &["key 'client-auth' is not allowed"]);
    let assertion = json!({
        "key": "client-auth", "client_id": "0oa1", "audience": "https://o.example/token",
    });
    let reply = curl_as(nobody, agent.socket(), "/v1/assertion", &assertion);
    reply.error(403, "forbidden", &["key 'client-auth' is not allowed"]);

    // uid 65533, group 65534: the gid rule, which allows client-auth and nothing else.
    let group_member = As::Setpriv {
        uid: NOBODY - 1,
        gid: NOBODY,
    };
    let start = window_start();
    let reply = curl_as(group_member, agent.socket(), "/v1/assertion", &assertion);
    assert_eq!(reply.status, 200, "{reply:?}");
    check_assertion(
        &jwks,
        reply.json()["assertion"].as_str().expect("assertion"),
        &kids["client-auth"],
        "0oa1",
        "https://o.example/token",
        60,
        window_end(start),
    );
    let reply = curl_as(
        group_member,
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    );
    reply.error(403, "forbidden", &["key 'dpop' is not allowed"]);
    // uid 65533 in its own group: no rule at all, the connection is closed.
    curl_as(
        As::Setpriv {
            uid: NOBODY - 1,
            gid: NOBODY - 1,
        },
        agent.socket(),
        "/v1/assertion",
        &assertion,
    )
    .assert_closed();

    // The agent's own uid has its own rule: any key, assertions up to 300 s.
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;
    let mut conn = Conn::open(agent.socket()).await;
    let start = window_start();
    let mut request = assertion.clone();
    request["lifetime"] = json!(300);
    let signed = conn
        .post("/v1/assertion", &request)
        .await
        .ok_member("an assertion at the rule's limit", "assertion");
    check_assertion(
        &jwks,
        &signed,
        &kids["client-auth"],
        "0oa1",
        "https://o.example/token",
        300,
        window_end(start),
    );
    request["lifetime"] = json!(301);
    conn.post("/v1/assertion", &request).await.error(
        400,
        "invalid_request",
        &["lifetime 301 s", "max_assertion_lifetime (300 s)"],
    );
}

/// F6: an htu prefix is an origin matched exactly and a path matched on segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htu_prefixes_match_origins_exactly_and_paths_by_segment() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        &allow_uid(
            own_uid(),
            r#"htu_prefixes = ["https://example.okta.com", "https://api.example/v1/"]"#,
        ),
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let mut conn = Conn::open(agent.socket()).await;
    for htu in [
        "https://example.okta.com/oauth2/v1/token",
        "https://EXAMPLE.okta.com:443/",
        "https://api.example/v1",
        "https://api.example/v1/users",
    ] {
        let start = window_start();
        let proof = conn
            .post("/v1/dpop", &dpop_request("dpop", "POST", htu))
            .await
            .ok_member(htu, "proof");
        let want = Jws::parse(&proof).claims["htu"]
            .as_str()
            .unwrap()
            .to_owned();
        check_proof(
            &jwks,
            &proof,
            &want_proof(&kids["dpop"], "POST", &want),
            window_end(start),
        );
    }
    for htu in [
        "https://example.okta.com.evil.com/oauth2/v1/token",
        "https://example.okta.com:8443/oauth2/v1/token",
        "http://example.okta.com/oauth2/v1/token",
        "https://api.example/v10/users",
        "https://api.example/",
        // An encoded separator is one segment here and two at a server that decodes it.
        "https://api.example/v1/..%2f..%2fadmin",
        "https://api.example/v1/x%5C..%5C..%5Cadmin",
        "https://api.example/v1/%2e%2e/admin",
        // Path parameters on a dot segment: Tomcat and Jetty resolve `..;` as `..`.
        "https://api.example/v1/..;/admin",
        "https://api.example/v1/%2e%2e;x/admin",
    ] {
        conn.post("/v1/dpop", &dpop_request("dpop", "POST", htu))
            .await
            .error(
                403,
                "forbidden",
                &["htu_prefixes", "https://example.okta.com"],
            );
    }
}

/// F6 and F7: a bad rule or socket setting stops the agent at start, named.
#[test]
fn bad_rules_and_socket_settings_are_named_at_start() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    for (lines, needles) in [
        (
            allow_uid(
                NOBODY,
                r#"htu_prefixes = ["https://ok.example/", "example.okta.com"]"#,
            ),
            &[
                "agent.allow[0].htu_prefixes[1]",
                "example.okta.com",
                "absolute URL",
            ][..],
        ),
        (
            allow_uid(NOBODY, r#"htu_prefixes = ["https://o.example/?x=1"]"#),
            &["agent.allow[0].htu_prefixes[0]", "query"][..],
        ),
        (
            allow_uid(NOBODY, "max_assertion_lifetime = 0"),
            &["agent.allow[0].max_assertion_lifetime", "out of range"][..],
        ),
        (
            "[[agent.allow]]\nkeys = [\"dpop\"]".to_owned(),
            &["agent.allow[0]", "set uid or gid"][..],
        ),
        (
            allow_uid(NOBODY, r#"clients = ["okat"]"#),
            &["agent.allow[0].clients[0]", "okat", "no [[client]]"][..],
        ),
        (
            "socket_mode = \"0644\"".to_owned(),
            &["agent.socket_mode", "0644", "0660"][..],
        ),
        (
            "socket_mode = \"0660\"".to_owned(),
            &["agent.socket_mode", "agent.socket_group"][..],
        ),
        (
            "socket_group = \"nogroup\"".to_owned(),
            &["agent.socket_group", "0660"][..],
        ),
        (
            "max_connections = 8\nmax_connections_per_uid = 9".to_owned(),
            &["agent.max_connections_per_uid", "9", "1 to 8"][..],
        ),
        (
            "header_timeout_secs = 0".to_owned(),
            &["agent.header_timeout_secs", "0"][..],
        ),
    ] {
        token.write_config(&config_text("", &lines));
        assert_serve_refuses(&token, &SocketDir::new(), needles);
    }
}
