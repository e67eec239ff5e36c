//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid).
//!
//! Every proof and assertion the agent hands out is verified independently
//! ([`check_proof`], [`check_assertion`]: the p256/p384/rsa verifiers of `tests/support`)
//! against the JWKS the agent publishes, which must equal `keybound jwks`. No assertion
//! here is about how long anything took.

mod agent_support;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::FileTypeExt as _;
use std::sync::Arc;
use std::time::Duration;

use agent_support::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncWriteExt as _;

/// A token with `keys` (label, alg) generated on it; returns the kid of each label.
fn token_with_keys(keys: &[(&str, &str)]) -> (DevToken, BTreeMap<String, String>) {
    let token = DevToken::new();
    let kids = keys
        .iter()
        .map(|(label, alg)| ((*label).to_owned(), token.generate(label, alg)))
        .collect();
    (token, kids)
}

/// `/v1/jwks` by kid, after checking it equals `keybound jwks` and each entry's shape.
async fn published_jwks(token: &DevToken, agent: &Agent) -> BTreeMap<String, Value> {
    served_jwks(agent, &token.jwks(&[])).await
}

/// One good request and its verification: the agent still signs correctly.
async fn assert_still_signs(conn: &mut Conn, jwks: &BTreeMap<String, Value>, kid: &str) {
    let start = window_start();
    let reply = conn
        .post(
            "/v1/dpop",
            &dpop_request("dpop", "GET", "https://a.example/ok"),
        )
        .await;
    let proof = reply.ok_member("a good request", "proof");
    check_proof(
        jwks,
        &proof,
        &want_proof(kid, "GET", "https://a.example/ok"),
        window_end(start),
    );
}

// ---------------------------------------------------------------------------
// 1. Concurrency
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// 2. Callers by uid and gid
// ---------------------------------------------------------------------------

/// Opens the socket to everyone, as a misconfigured system might: the traversal bits on the
/// temp dir and on `run/`, rw on the socket. The uid check must still hold.
fn expose_socket(dir: &SocketDir) {
    chmod(dir.root(), 0o711);
    chmod(&dir.run_dir(), 0o711);
    chmod(&dir.socket(), 0o666);
}

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
        let start = window_start();
        let reply = curl_as(
            nobody,
            agent.socket(),
            "/v1/dpop",
            &dpop_request("dpop", "GET", htu),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        let proof = reply.json()["proof"].as_str().expect("proof").to_owned();
        check_proof(
            &jwks,
            &proof,
            &want_proof(&kids["dpop"], "GET", want),
            window_end(start),
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

// ---------------------------------------------------------------------------
// 3. The socket: modes, planted paths, stale and live sockets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_dir_is_0700_socket_is_0600_both_owned_by_the_agent() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    assert!(std::fs::symlink_metadata(dir.run_dir()).unwrap().is_dir());
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o700, own_uid()));
    let meta = std::fs::symlink_metadata(agent.socket()).unwrap();
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(mode_and_owner(agent.socket()), (0o600, own_uid()));
}

/// `keybound serve` on `dir` must fail at start: exit 1, one `error:` line naming `needles`.
fn assert_serve_refuses(token: &DevToken, dir: &SocketDir, needles: &[&str]) {
    let socket = dir.socket();
    let args = [OsArg::from("serve"), "--socket".into(), socket.into()];
    let out = output_with_guard(token.command(&args));
    let line = assert_error(&out, &args);
    assert_mentions(&line, needles);
}

#[test]
fn out_of_range_agent_settings_are_named_at_start() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    for (line, needles) in [
        (
            "async_threads = 0",
            &["agent.async_threads", "0", "1 to 64"][..],
        ),
        ("max_queue = 0", &["agent.max_queue", "0"][..]),
        ("max_body_bytes = 10", &["agent.max_body_bytes", "10"][..]),
    ] {
        token.write_config(&config_text("", line));
        assert_serve_refuses(&token, &SocketDir::new(), needles);
    }
}

#[test]
fn planted_or_unsafe_socket_paths_are_refused() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let socket_text = |dir: &SocketDir| dir.socket().display().to_string();
    let run_text = |dir: &SocketDir| dir.run_dir().display().to_string();

    // A symlink planted at the socket path (its target must stay untouched).
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    let target = dir.root().join("target");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, dir.socket()).unwrap();
    assert_serve_refuses(&token, &dir, &[&socket_text(&dir), "symbolic link"]);
    assert!(
        std::fs::symlink_metadata(dir.socket())
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");

    // A dangling symlink at the socket path.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    std::os::unix::fs::symlink(dir.root().join("nowhere"), dir.socket()).unwrap();
    assert_serve_refuses(&token, &dir, &[&socket_text(&dir), "symbolic link"]);
    assert!(!dir.root().join("nowhere").exists());

    // The socket directory itself a symlink (to a 0700 dir we own).
    let dir = SocketDir::new();
    let elsewhere = dir.root().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    chmod(&elsewhere, 0o700);
    std::os::unix::fs::symlink(&elsewhere, dir.run_dir()).unwrap();
    assert_serve_refuses(&token, &dir, &[&run_text(&dir), "symbolic link"]);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // A directory group or others can enter.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o755);
    assert_serve_refuses(&token, &dir, &[&run_text(&dir), "755", "chmod 700"]);

    // A directory owned by another uid.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    std::os::unix::fs::chown(dir.run_dir(), Some(NOBODY), Some(NOBODY)).unwrap();
    assert_serve_refuses(&token, &dir, &[&run_text(&dir), "uid 65534"]);

    // A regular file at the socket path.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    std::fs::write(dir.socket(), "not a socket").unwrap();
    assert_serve_refuses(&token, &dir, &[&socket_text(&dir), "not a socket"]);
    assert_eq!(
        std::fs::read_to_string(dir.socket()).unwrap(),
        "not a socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_a_live_one_is_refused() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    // A socket file nobody listens on: what a killed agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(dir.socket()).unwrap());
    assert!(
        std::os::unix::net::UnixStream::connect(dir.socket()).is_err(),
        "the stale socket has no listener"
    );

    let agent = Agent::start(&token, &dir.socket());
    assert!(
        agent.log().contains("replacing a stale socket"),
        "{}",
        agent.log()
    );
    assert_eq!(mode_and_owner(agent.socket()), (0o600, own_uid()));
    let jwks = published_jwks(&token, &agent).await;
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;

    // A second agent on the live socket fails, and leaves the first one's socket alone.
    assert_serve_refuses(
        &token,
        &dir,
        &[
            "another keybound agent is listening",
            &dir.socket().display().to_string(),
        ],
    );
    assert!(dir.socket().exists());
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;
}

// ---------------------------------------------------------------------------
// 4. Bad input
// ---------------------------------------------------------------------------

/// A JSON body of exactly `len` bytes: a valid proof request padded in the htu's query
/// (which the proof drops).
fn padded_request(len: usize) -> Vec<u8> {
    let head = r#"{"key":"dpop","htm":"GET","htu":"https://a.example/p?pad="#;
    let tail = r#""}"#;
    let pad = len - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "a".repeat(pad));
    assert_eq!(body.len(), len);
    body.into_bytes()
}

/// A bad request and the answer it must get.
struct Bad {
    what: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    mentions: &'static [&'static str],
}

fn bad(
    what: &'static str,
    path: &'static str,
    body: impl AsRef<[u8]>,
    status: u16,
    code: &'static str,
    mentions: &'static [&'static str],
) -> Bad {
    Bad {
        what,
        path,
        body: body.as_ref().to_vec(),
        status,
        code,
        mentions,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_4xx_with_a_reason_and_the_agent_keeps_serving() {
    const LIMIT: usize = 65536; // agent.max_body_bytes by default
    let (token, kids) = token_with_keys(&[("dpop", "ES256"), ("client-auth", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let kid = &kids["dpop"];

    let assertion = |extra: Value| {
        let mut r = json!({ "key": "client-auth", "client_id": "0oa1",
                            "audience": "https://a.example/token" });
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r.to_string().into_bytes()
    };
    let oversized = padded_request(LIMIT + 1);
    let cases = [
        bad(
            "malformed JSON",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GET","#,
            400,
            "invalid_request",
            &["malformed JSON"],
        ),
        bad(
            "empty body",
            "/v1/dpop",
            b"",
            400,
            "invalid_request",
            &["JSON"],
        ),
        bad(
            "JSON that is not an object",
            "/v1/dpop",
            b"[1,2]",
            400,
            "invalid_request",
            &["JSON"],
        ),
        bad(
            "missing htu",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GET"}"#,
            400,
            "invalid_request",
            &["htu"],
        ),
        bad(
            "unknown field",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GET","htu":"https://a.example/","scope":"x"}"#,
            400,
            "invalid_request",
            &["unknown field", "scope"],
        ),
        bad(
            "htu not absolute",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GET","htu":"/token"}"#,
            400,
            "invalid_request",
            &["/token"],
        ),
        bad(
            "htu not http(s)",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GET","htu":"ftp://a.example/x"}"#,
            400,
            "invalid_request",
            &["ftp"],
        ),
        bad(
            "htu with credentials",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GET","htu":"https://u:p@a.example/"}"#,
            400,
            "invalid_request",
            &["credentials"],
        ),
        bad(
            "htm not a method token",
            "/v1/dpop",
            br#"{"key":"dpop","htm":"GE T","htu":"https://a.example/"}"#,
            400,
            "invalid_request",
            &["GE T"],
        ),
        bad(
            "unknown key",
            "/v1/dpop",
            br#"{"key":"no-such-key","htm":"GET","htu":"https://a.example/"}"#,
            404,
            "unknown_key",
            &["no-such-key", "dpop"],
        ),
        bad(
            "unknown client",
            "/v1/dpop",
            br#"{"client":"no-such-client","htm":"GET","htu":"https://a.example/"}"#,
            404,
            "unknown_client",
            &["no-such-client"],
        ),
        bad(
            "neither key nor client",
            "/v1/dpop",
            br#"{"htm":"GET","htu":"https://a.example/"}"#,
            400,
            "invalid_request",
            &["exactly one of", "client", "key"],
        ),
        bad(
            "both key and client",
            "/v1/dpop",
            br#"{"key":"dpop","client":"c","htm":"GET","htu":"https://a.example/"}"#,
            400,
            "invalid_request",
            &["exactly one of"],
        ),
        bad(
            "assertion lifetime 3601",
            "/v1/assertion",
            assertion(json!({ "lifetime": 3601 })),
            400,
            "invalid_request",
            &["lifetime 3601 s", "1 to 3600"],
        ),
        bad(
            "assertion lifetime 0",
            "/v1/assertion",
            assertion(json!({ "lifetime": 0 })),
            400,
            "invalid_request",
            &["lifetime 0 s", "1 to 3600"],
        ),
        bad(
            "assertion lifetime negative",
            "/v1/assertion",
            assertion(json!({ "lifetime": -5 })),
            400,
            "invalid_request",
            &["-5"],
        ),
        bad(
            "assertion with key but no client_id",
            "/v1/assertion",
            br#"{"key":"client-auth","audience":"https://a.example/token"}"#,
            400,
            "invalid_request",
            &["client_id"],
        ),
        bad(
            "assertion with key but no audience",
            "/v1/assertion",
            br#"{"key":"client-auth","client_id":"0oa1"}"#,
            400,
            "invalid_request",
            &["audience"],
        ),
        bad(
            "assertion audience not a URL",
            "/v1/assertion",
            assertion(json!({ "audience": "token" })),
            400,
            "invalid_request",
            &["audience"],
        ),
        bad(
            "token without client",
            "/v1/token",
            b"{}",
            400,
            "invalid_request",
            &["client"],
        ),
        bad(
            "body over agent.max_body_bytes",
            "/v1/dpop",
            oversized,
            413,
            "too_large",
            &["max_body_bytes"],
        ),
        bad(
            "unknown path",
            "/v1/sign",
            b"{}",
            404,
            "not_found",
            &["no such endpoint"],
        ),
    ];
    for Bad {
        what,
        path,
        body,
        status,
        code,
        mentions,
    } in cases
    {
        let mut conn = Conn::open(agent.socket()).await;
        let reply = conn
            .send_bytes(Method::POST, path, body)
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        let message = reply.error(status, code, mentions);
        assert!(
            !message.contains(USER_PIN),
            "{what}: the message leaks the PIN: {message}"
        );
        // Same connection when the agent kept it open, and a fresh one in any case.
        if status != 413 {
            assert_still_signs(&mut conn, &jwks, kid).await;
        }
        assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, kid).await;
    }

    // The limit itself is allowed.
    let start = window_start();
    let reply = Conn::open(agent.socket())
        .await
        .send_bytes(Method::POST, "/v1/dpop", padded_request(LIMIT))
        .await
        .expect("answer");
    let proof = reply.ok_member("a body of exactly max_body_bytes", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(kid, "GET", "https://a.example/p"),
        window_end(start),
    );

    // Over the limit without Content-Length (chunked): still 413.
    let oversized = padded_request(LIMIT + 1);
    let mut request = b"POST /v1/dpop HTTP/1.1\r\nHost: keybound\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for chunk in oversized.chunks(8192) {
        request.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    raw_exchange(agent.socket(), &request)
        .await
        .error(413, "too_large", &["max_body_bytes"]);

    // Not HTTP at all: the connection is dropped, the agent lives on.
    let garbage = raw_exchange_lossy(agent.socket(), b"\x16\x03\x01\x02\x00hello\r\n\r\n").await;
    assert!(!garbage.contains("200 OK"), "{garbage}");
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, kid).await;
}

/// Writes `bytes`, returns whatever comes back before the agent closes.
async fn raw_exchange_lossy(socket: &std::path::Path, bytes: &[u8]) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// xorshift64*: a fixed-seed generator, so a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A JSON value of any type, nested at most `depth` deep.
    fn value(&mut self, depth: u32) -> Value {
        const STRINGS: [&str; 12] = [
            "",
            "dpop",
            "client-auth",
            "GET",
            "https://a.example/x?q=1#f",
            "/relative",
            "ftp://a.example/",
            "https://user:pw@a.example/",
            "\u{0}\u{7f}\"\\",
            "ü😀\u{202e}",
            "pkcs11:token=keybound-dev;object=dpop",
            "https://[::1]:99999/",
        ];
        match self.below(if depth == 0 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => json!(self.below(2) == 0),
            2 => json!(self.next() as i64),
            3 => json!(f64::from(self.next() as u32) / 7.0),
            4 => json!(self.pick(&STRINGS)),
            5 => json!("x".repeat(self.below(3000))),
            6 => Value::Array((0..self.below(4)).map(|_| self.value(depth - 1)).collect()),
            _ => {
                let names = ["key", "client", "htm", "htu", "nonce", "zzz", "audience"];
                let mut map = serde_json::Map::new();
                for _ in 0..self.below(4) {
                    map.insert((*self.pick(&names)).to_owned(), self.value(depth - 1));
                }
                Value::Object(map)
            }
        }
    }

    /// `valid` changed the way a buggy or hostile caller would change it.
    fn mutate(&mut self, valid: &Value) -> Vec<u8> {
        let mut object = valid.as_object().cloned().unwrap_or_default();
        let names: Vec<String> = object.keys().cloned().collect();
        match self.below(6) {
            // A member's value replaced by anything.
            0 => {
                let name = self.pick(&names).clone();
                object.insert(name, self.value(2));
            }
            // A member dropped, or an unknown one added.
            1 => {
                let name = self.pick(&names).clone();
                object.remove(&name);
            }
            2 => {
                object.insert("unexpected".into(), self.value(1));
            }
            // Byte-level damage to the serialised request.
            _ => {
                let mut bytes = valid.to_string().into_bytes();
                for _ in 0..=self.below(4) {
                    let at = self.below(bytes.len().max(1));
                    match self.below(4) {
                        0 => bytes.truncate(at),
                        1 if at < bytes.len() => bytes[at] = self.next() as u8,
                        2 => bytes.insert(at.min(bytes.len()), *self.pick(b"{}[]\",:\\0e-.")),
                        _ => {
                            let end = (at + self.below(8)).min(bytes.len());
                            bytes.drain(at.min(end)..end);
                        }
                    }
                }
                return bytes;
            }
        }
        Value::Object(object).to_string().into_bytes()
    }
}

/// Request decoding, fuzzed from the outside: thousands of damaged or ill-typed bodies on
/// the signing and token endpoints each get 200 with a signature that verifies, or a 4xx
/// JSON error with a message; never a 5xx, a dropped connection or a panic. (A stable
/// stand-in for a `cargo fuzz` target: no nightly toolchain is needed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_request_bodies_get_a_verified_answer_or_a_4xx_never_a_crash() {
    const CASES: usize = 4000;
    let (token, kids) = token_with_keys(&[("dpop", "ES256"), ("client-auth", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let valid = [
        (
            "/v1/dpop",
            dpop_request("dpop", "POST", "https://a.example/token"),
        ),
        (
            "/v1/assertion",
            json!({ "key": "client-auth", "client_id": "0oa1",
                    "audience": "https://a.example/token", "lifetime": 60 }),
        ),
        ("/v1/token", json!({ "client": "none", "scopes": ["a"] })),
    ];
    let mut rng = Rng(0x6b65_7962_6f75_6e64);
    let mut conn = Conn::open(agent.socket()).await;
    let (mut signed, mut refused) = (0, 0);
    for case in 0..CASES {
        let (path, request) = rng.pick(&valid);
        let body = rng.mutate(request);
        let shown = String::from_utf8_lossy(&body)
            .chars()
            .take(300)
            .collect::<String>();
        let reply = conn
            .send_bytes(Method::POST, path, body.clone())
            .await
            .unwrap_or_else(|e| panic!("case {case}: POST {path} {shown:?}: connection lost: {e}"));
        let what = format!("case {case}: POST {path} {shown:?} -> {reply:?}");
        match reply.status.as_u16() {
            200 => {
                let answer = reply.json();
                let compact = answer["proof"]
                    .as_str()
                    .or(answer["assertion"].as_str())
                    .unwrap_or_else(|| panic!("{what}"));
                let jws = Jws::parse(compact);
                let kid = match jws.header.get("kid") {
                    Some(kid) => kid.as_str().expect("kid").to_owned(),
                    None => jwk_thumbprint(&jws.header["jwk"]),
                };
                assert_verifies(jwks.get(&kid).unwrap_or_else(|| panic!("{what}")), &jws);
                signed += 1;
            }
            400 | 403 | 404 | 413 => {
                assert_eq!(
                    reply.header("content-type"),
                    Some("application/json"),
                    "{what}"
                );
                let answer = reply.json();
                assert!(
                    answer["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{what}"
                );
                assert!(
                    answer["message"]
                        .as_str()
                        .is_some_and(|m| !m.trim().is_empty()),
                    "{what}"
                );
                refused += 1;
            }
            _ => panic!("{what}"),
        }
    }
    // Both kinds happened: the mutations are neither all harmless nor all fatal.
    assert!(
        signed > 50 && refused > 1000,
        "signed {signed}, refused {refused}"
    );
    assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;
    let log = agent.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// A value of the wrong type: the message must say which member, not only where in the
/// text (a caller's JSON is rarely laid out the way the column number assumes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_the_wrong_type_is_named_in_the_message() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    for (path, body, member) in [
        (
            "/v1/assertion",
            json!({ "key": "dpop", "client_id": "0oa1",
                    "audience": "https://a.example/token", "lifetime": "60" }),
            "lifetime",
        ),
        (
            "/v1/dpop",
            json!({ "key": "dpop", "htm": "GET", "htu": 5 }),
            "htu",
        ),
        (
            "/v1/token",
            json!({ "client": "dev", "scopes": "a b" }),
            "scopes",
        ),
    ] {
        let mut conn = Conn::open(agent.socket()).await;
        conn.post(path, &body)
            .await
            .error(400, "invalid_request", &[member]);
        assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405_with_a_json_reason() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    for (method, path) in [
        (Method::GET, "/v1/dpop"),
        (Method::GET, "/v1/assertion"),
        (Method::GET, "/v1/token"),
        (Method::POST, "/v1/jwks"),
        (Method::DELETE, "/healthz"),
    ] {
        let mut conn = Conn::open(agent.socket()).await;
        let reply = conn
            .send_bytes(method.clone(), path, Vec::new())
            .await
            .expect("answer");
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert!(
            reply.header("allow").is_some(),
            "405 names the allowed method"
        );
        reply.error(405, "method_not_allowed", &[path]);
        assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;
    }
}

// ---------------------------------------------------------------------------
// 5. A full signing queue
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_503_with_retry_after_then_serves_again() {
    const CONCURRENT: usize = 64;
    const MAX_ROUNDS: usize = 20;
    // RSA: a slow signature on SoftHSM, so that 64 requests released together overlap.
    let (token, kids) = token_with_keys(&[("rsa", "RS256")]);
    token.write_config(&config_text("", "max_queue = 1"));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let kid = kids["rsa"].clone();
    let request = dpop_request("rsa", "POST", "https://a.example/token");
    let want = want_proof(&kid, "POST", "https://a.example/token");

    let (mut ok, mut full, mut rounds) = (0, 0, 0);
    let start = window_start();
    while rounds < MAX_ROUNDS && (ok == 0 || full == 0) {
        rounds += 1;
        // Connect everyone first, then release all requests at once.
        let mut conns = Vec::new();
        for _ in 0..CONCURRENT {
            conns.push(Conn::open(agent.socket()).await);
        }
        let gate = Arc::new(tokio::sync::Barrier::new(CONCURRENT));
        let mut tasks = Vec::new();
        for mut conn in conns {
            let gate = Arc::clone(&gate);
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                gate.wait().await;
                conn.post("/v1/dpop", &request).await
            }));
        }
        for task in tasks {
            let reply = task.await.expect("client task");
            match reply.status.as_u16() {
                200 => {
                    ok += 1;
                    let proof = reply.ok_member("a queued request", "proof");
                    check_proof(&jwks, &proof, &want, (start, unix_now() + 1));
                }
                503 => {
                    full += 1;
                    reply.error(503, "unavailable", &["queue is full"]);
                    let retry = reply.retry_after().expect("503 carries Retry-After");
                    assert!(retry >= 1, "{reply:?}");
                }
                _ => panic!("only 200 or 503 under a full queue: {reply:?}"),
            }
        }
    }
    eprintln!(
        "queue of 1, {CONCURRENT} concurrent RS256 requests: {ok} x 200, {full} x 503 in {rounds} round(s)"
    );
    assert!(
        ok > 0 && full > 0,
        "after {rounds} rounds of {CONCURRENT} concurrent requests on a queue of 1: {ok} x 200, {full} x 503"
    );

    // The queue drains: one at a time, everything succeeds again.
    let mut conn = Conn::open(agent.socket()).await;
    for _ in 0..20 {
        let start = window_start();
        let proof = conn
            .post("/v1/dpop", &request)
            .await
            .ok_member("a request after the burst", "proof");
        check_proof(&jwks, &proof, &want, window_end(start));
    }
    let metrics = get(agent.socket(), "/metrics").await.text();
    assert_eq!(
        metric(&metrics, "keybound_sign_queue_depth", &[]),
        Some(0.0)
    );
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    assert_eq!(health["queue_depth"], 0, "{health}");
}

// ---------------------------------------------------------------------------
// 6. The device goes away and comes back
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// 7. SIGTERM
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// 8. /v1/token against the dev-server
// ---------------------------------------------------------------------------

const DEV_CLIENT_ID: &str = "0oa-agent-dev";

fn dev_client(base: &str) -> String {
    format!(
        r#"
[[client]]
name = "dev"
server = "okta"
token_endpoint = "{base}/oauth2/v1/token"
client_id = "{DEV_CLIENT_ID}"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.read"]
allowed_scopes = ["okta.users.read"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_caches_answers_nonce_challenges_and_obeys_client_rules() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let jwks_file = token.write_file(
        "client-jwks.json",
        &json!({ "keys": token.jwks(&["client-auth"]) }).to_string(),
    );
    let server = DevServer::start(DEV_CLIENT_ID, &jwks_file);
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
    let jwks_file = token.write_file(
        "client-jwks.json",
        &json!({ "keys": token.jwks(&["client-auth"]) }).to_string(),
    );
    let server = DevServer::start_with(DEV_CLIENT_ID, &jwks_file, |settings| {
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
    .error(502, "upstream_error", &["invalid_client", "clock"]);
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

// ---------------------------------------------------------------------------
// 9. /metrics, /v1/keys, /v1/jwks, /healthz
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// 10. Issue 9: slots and timeouts, half-close, Expect, names, rules, sockets, rotation,
//     tokens under key limits
// ---------------------------------------------------------------------------

/// A small client run as another uid: opens `n` connections to the socket and sends
/// nothing; prints `opened N`, then `closed K` each time the agent closes one more.
struct SilentConnections {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

const SILENT_CLIENT: &str = r#"
import select, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    socks.append(s)
print("opened", n, flush=True)
closed = 0
while socks:
    ready, _, _ = select.select(socks, [], [], 120)
    if not ready:
        break
    for s in ready:
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        if data == b"":
            socks.remove(s)
            closed += 1
            print("closed", closed, flush=True)
"#;

impl SilentConnections {
    fn start(who: As, socket: &std::path::Path, n: usize) -> SilentConnections {
        use std::io::BufRead as _;
        let mut cmd = who.command();
        // The system's python3, not one from this user's PATH (other uids cannot run it).
        cmd.args(["/usr/bin/python3", "-c", SILENT_CLIENT])
            .arg(socket)
            .arg(n.to_string())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir("/")
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn python3 as another uid");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let silent = SilentConnections { child, lines };
        silent.wait_for(&format!("opened {n}"));
        silent
    }

    /// Waits (GUARD as a safety net) until the client prints `line`.
    fn wait_for(&self, line: &str) {
        loop {
            match self.lines.recv_timeout(GUARD) {
                Ok(l) if l == line => return,
                Ok(_) => {}
                Err(e) => panic!("the silent client never printed {line:?} ({e})"),
            }
        }
    }
}

impl Drop for SilentConnections {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET /healthz from the agent's own uid, with a safety net instead of a hang.
async fn healthz_is_served(agent: &Agent, while_what: &str) {
    let reply = tokio::time::timeout(GUARD, get(agent.socket(), "/healthz"))
        .await
        .unwrap_or_else(|_| panic!("/healthz starved {while_what}"));
    assert_eq!(reply.ok("GET /healthz")["status"], "ok");
}

/// F3: connections from a uid no rule names are closed at accept; they hold no slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_an_unruled_uid_do_not_starve_healthz() {
    const SILENT: usize = 20;
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text("", "max_connections = 8"));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    expose_socket(&dir);
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };
    let silent = SilentConnections::start(nobody, agent.socket(), SILENT);
    healthz_is_served(&agent, "by silent connections from uid 65534").await;
    silent.wait_for(&format!("closed {SILENT}"));
    healthz_is_served(&agent, "after the silent connections").await;
    // Every refusal is counted; the log gets a line at 1, 2, 4, 8, 16 refusals only.
    let metrics = Conn::open(agent.socket())
        .await
        .get("/metrics")
        .await
        .text();
    assert_eq!(
        metric(
            &metrics,
            "keybound_refused_connections_total",
            &[("reason", "no_rule")]
        ),
        Some(SILENT as f64),
        "{metrics}"
    );
    let lines = agent.log().matches("refused caller").count();
    assert_eq!(lines, 5, "{}", agent.log());
}

/// F3: a uid a rule names gets at most max_connections_per_uid connections; the rest are
/// closed at accept, and the other uids keep their slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_take_every_connection_slot() {
    const SILENT: usize = 20;
    const PER_UID: usize = 4;
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        &format!(
            "max_connections = 8\nmax_connections_per_uid = {PER_UID}\nheader_timeout_secs = 300\n{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(NOBODY, "keys = [\"dpop\"]")
        ),
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    expose_socket(&dir);
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };
    let silent = SilentConnections::start(nobody, agent.socket(), SILENT);
    // All but PER_UID are closed at once; those PER_UID stay open (header timeout 300 s).
    silent.wait_for(&format!("closed {}", SILENT - PER_UID));
    healthz_is_served(&agent, "while uid 65534 holds its 4 connections").await;
    assert!(
        agent.log().contains("agent.max_connections_per_uid"),
        "{}",
        agent.log()
    );
}

/// Reads until the agent closes the connection (GUARD as a safety net).
async fn read_until_closed(stream: &mut tokio::net::UnixStream, what: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut bytes = Vec::new();
    match tokio::time::timeout(GUARD, stream.read_to_end(&mut bytes)).await {
        Ok(Ok(_)) => {}
        // A reset is a close too.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: the agent never closed the connection"),
    }
    bytes
}

/// F3: a partial request head, an idle keep-alive connection and a body that stops
/// arriving are closed after their timeouts (asserted on the close, not on a clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_heads_idle_connections_and_stalled_bodies_are_closed() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        "header_timeout_secs = 1\nbody_timeout_secs = 1",
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());

    let mut stream = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keybound\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, "a partial head").await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "nothing, or 408, for a partial head: {text:?}"
    );

    // Keep-alive: one answer, then the idle connection is closed.
    let mut stream = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keybound\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, "an idle keep-alive connection").await;
    assert_eq!(parse_reply(&answer).ok("GET /healthz")["status"], "ok");

    // A body that stops arriving: 408, then closed.
    let mut stream = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /v1/dpop HTTP/1.1\r\nHost: keybound\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"key\":",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, "a stalled body").await;
    parse_reply(&answer).error(408, "timeout", &["agent.body_timeout_secs"]);

    // And the agent serves on.
    healthz_is_served(&agent, "after the timeouts").await;
}

/// F14: a client that shuts down its write side after the request still gets the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_connection_gets_its_answer() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let body = dpop_request("dpop", "POST", "https://a.example/half").to_string();
    for _ in 0..5 {
        let start = window_start();
        let mut stream = tokio::net::UnixStream::connect(agent.socket())
            .await
            .unwrap();
        let request = format!(
            "POST /v1/dpop HTTP/1.1\r\nHost: keybound\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let answer = read_until_closed(&mut stream, "a half-closed request").await;
        let proof = parse_reply(&answer).ok_member("POST /v1/dpop, half-closed", "proof");
        check_proof(
            &jwks,
            &proof,
            &want_proof(&kids["dpop"], "POST", "https://a.example/half"),
            window_end(start),
        );
    }
}

/// Minor: `Expect: 100-continue` with a Content-Length over max_body_bytes gets 413, not
/// `100 Continue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_over_the_body_limit_gets_413_not_100() {
    use tokio::io::AsyncReadExt as _;
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut stream = tokio::net::UnixStream::connect(agent.socket())
        .await
        .unwrap();
    stream
        .write_all(
            b"POST /v1/dpop HTTP/1.1\r\nHost: keybound\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    // The first status line the agent sends (the body is never written).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        let n = tokio::time::timeout(GUARD, stream.read(&mut byte))
            .await
            .expect("an answer before the safety net")
            .expect("read");
        assert!(n == 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    assert_eq!(
        String::from_utf8_lossy(&head),
        "HTTP/1.1 413 Payload Too Large\r\n"
    );
    healthz_is_served(&agent, "after the refused body").await;
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
        let name = format!("pkcs11:object=dpop;manufacturer={i:0>400}");
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

/// F7: with socket_mode 0666 and a rule for uid 65534, that uid is served; a uid without
/// a rule is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_0666_lets_a_ruled_uid_in() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        &format!(
            "socket_mode = \"0666\"\n{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(NOBODY, "keys = [\"dpop\"]")
        ),
    ));
    let dir = SocketDir::new();
    // Only the temp dir above the agent's own directory is opened by the test.
    chmod(dir.root(), 0o711);
    let agent = Agent::start(&token, &dir.socket());
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o711, own_uid()));
    assert_eq!(mode_and_owner(agent.socket()), (0o666, own_uid()));
    let jwks = served_jwks(&agent, &token.jwks(&[])).await;

    let start = window_start();
    let reply = curl_as(
        As::Setpriv {
            uid: NOBODY,
            gid: NOBODY,
        },
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    check_proof(
        &jwks,
        reply.json()["proof"].as_str().expect("proof"),
        &want_proof(&kids["dpop"], "GET", "https://o.example/api"),
        window_end(start),
    );
    curl_as(
        As::Setpriv {
            uid: NOBODY - 1,
            gid: NOBODY - 1,
        },
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    )
    .assert_closed();
}

/// F7 (review): the agent never widens a directory it shares with other files (a user's
/// runtime directory guards other sockets), and a second agent refused as `Live` changes
/// nothing of the running one's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_directories_are_never_widened() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        &format!(
            "socket_mode = \"0666\"\n{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(NOBODY, "keys = [\"dpop\"]")
        ),
    ));
    // A directory the agent did not create, holding another program's socket.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).expect("mkdir run");
    chmod(&dir.run_dir(), 0o700);
    let other = std::os::unix::net::UnixListener::bind(dir.run_dir().join("other.sock"))
        .expect("bind another program's socket");
    assert_serve_refuses(&token, &dir, &["holds other files", "does not widen"]);
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o700, own_uid()));
    drop(other);

    // The agent's own directory: a second agent is refused and leaves it as it was.
    let dir = SocketDir::new();
    chmod(dir.root(), 0o711);
    let agent = Agent::start(&token, &dir.socket());
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o711, own_uid()));
    assert_serve_refuses(&token, &dir, &["another keybound agent is listening"]);
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o711, own_uid()));
    assert_eq!(mode_and_owner(agent.socket()), (0o666, own_uid()));
}

/// F7: with socket_mode 0660 and socket_group, members of the group reach the socket
/// (and their rule decides); others cannot connect at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_group_lets_its_members_in() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let member = NOBODY - 2;
    token.write_config(&config_text(
        "",
        &format!(
            "socket_mode = \"0660\"\nsocket_group = \"{NOBODY}\"\n{}{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(member, "keys = [\"dpop\"]"),
            allow_uid(NOBODY - 3, "keys = [\"dpop\"]"),
        ),
    ));
    let dir = SocketDir::new();
    chmod(dir.root(), 0o711);
    let agent = Agent::start(&token, &dir.socket());
    assert_eq!(mode_and_owner(&dir.run_dir()).0, 0o710);
    assert_eq!(mode_and_owner(agent.socket()).0, 0o660);
    let group = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(p).unwrap().gid()
    };
    assert_eq!(group(&dir.run_dir()), NOBODY);
    assert_eq!(group(agent.socket()), NOBODY);
    let jwks = served_jwks(&agent, &token.jwks(&[])).await;

    let start = window_start();
    let reply = curl_as(
        As::SetprivInGroup {
            uid: member,
            gid: member,
            group: NOBODY,
        },
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    check_proof(
        &jwks,
        reply.json()["proof"].as_str().expect("proof"),
        &want_proof(&kids["dpop"], "GET", "https://o.example/api"),
        window_end(start),
    );
    // A ruled uid outside the group: the file modes keep it out (curl cannot connect).
    let outside = curl_as(
        As::Setpriv {
            uid: NOBODY - 3,
            gid: NOBODY - 3,
        },
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    );
    assert_eq!((outside.exit, outside.status), (Some(7), 0), "{outside:?}");
}

/// F12: a client's key deleted and generated anew under its name is looked up again:
/// the client's proofs and an uncached token work without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_key_is_found_again_without_a_restart() {
    let (token, kids) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let jwks_file = token.write_file(
        "client-jwks.json",
        &json!({ "keys": token.jwks(&["client-auth"]) }).to_string(),
    );
    let server = DevServer::start(DEV_CLIENT_ID, &jwks_file);
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

/// F13: /v1/token checks the client's keys against the caller's rule, and the
/// signatures a token fetch makes are counted and logged like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_obey_key_limits_and_their_signatures_are_recorded() {
    let (token, _) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let jwks_file = token.write_file(
        "client-jwks.json",
        &json!({ "keys": token.jwks(&["client-auth"]) }).to_string(),
    );
    let server = DevServer::start(DEV_CLIENT_ID, &jwks_file);
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
