//! `keybound call`, `token` and `token --check` through a running agent (the default when
//! one answers on `[agent] socket` or `KEYBOUND_AGENT_SOCK`), against `--no-agent`.
//!
//! The built binary on a per-test SoftHSM2 token, `keybound serve` spawned from it, and the
//! dev-server on 127.0.0.1:0, whose own counters (`GET /dev/stats`) say how many token
//! requests and nonce challenges the processes cost together. Every DPoP proof and client
//! assertion is verified by the dev-server (RustCrypto, not keybound's code); the access
//! tokens handed out are verified here with p256 against the dev-server's JWKS.

mod agent_support;
mod support;

use std::path::Path;
use std::process::{Command, Output};

use agent_support::*;
use serde_json::Value;
use support::*;

const BOTH_SCOPES: &str = r#"scopes = ["okta.users.read", "okta.users.manage"]
allowed_scopes = ["okta.users.read", "okta.users.manage"]"#;

/// A `[[client]]` named `name` for the dev-server at `base`, read and write.
fn client(name: &str, base: &str) -> String {
    format!(
        r#"
[[client]]
name = "{name}"
server = "okta"
token_endpoint = "{base}/oauth2/v1/token"
client_id = "{DEV_CLIENT_ID}"
assertion_key = "client-auth"
dpop_key = "dpop"
{BOTH_SCOPES}
"#
    )
}

/// A token with `client-auth` and `dpop`, the dev-server knowing the client, and a config
/// whose `[agent] socket` is `dir`'s socket, with `agent_lines` after it.
fn setup(dir: &SocketDir, clients: &[&str], agent_lines: &str) -> (DevToken, DevServer) {
    let (token, _) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let server = DevServer::for_client_auth(&token, |_| {});
    let sections: String = clients.iter().map(|c| client(c, &server.base)).collect();
    token.write_config(&config_text(
        &sections,
        &format!(
            "socket = \"{}\"\n{}",
            dir.socket().display(),
            agent_lines.trim()
        ),
    ));
    (token, server)
}

/// The dev-server's request counters.
fn stats(server: &DevServer) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .arg(format!("{}/dev/stats", server.base))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl /dev/stats: {}", describe(&out));
    serde_json::from_slice(&out.stdout).expect("stats JSON")
}

/// `after - before`, counter by counter.
fn delta(before: &Value, after: &Value) -> Value {
    let mut d = serde_json::Map::new();
    for (k, v) in after.as_object().expect("stats object") {
        let was = before[k].as_u64().unwrap_or(0);
        d.insert(k.clone(), Value::from(v.as_u64().unwrap_or(0) - was));
    }
    Value::Object(d)
}

fn counts(d: &Value) -> [u64; 5] {
    [
        "token_requests",
        "tokens_issued",
        "as_nonce_challenges",
        "rs_nonce_challenges",
        "api_requests",
    ]
    .map(|k| d[k].as_u64().expect(k))
}

/// Three `keybound call` processes and one `keybound token`, one after the other, with
/// `extra` arguments; returns the dev-server's counters for them.
fn three_calls_and_a_token(token: &DevToken, server: &DevServer, extra: &[&str]) -> Value {
    let before = stats(server);
    let users = format!("{}/api/v1/users?limit=3", server.base);
    for i in 0..3 {
        let mut args = vec!["call"];
        args.extend_from_slice(extra);
        args.push(&users);
        let out = token.keybound(&args);
        assert_exit(&out, 0, &format!("call #{i} {extra:?}"));
        let page: Vec<Value> = serde_json::from_str(&stdout(&out)).expect("a JSON page");
        assert_eq!(page.len(), 3);
    }
    let mut args = vec!["token", "--json"];
    args.extend_from_slice(extra);
    let out = token.keybound(&args);
    assert_exit(&out, 0, &format!("token {extra:?}"));
    check_access_token(token, server, &stdout(&out));
    delta(&before, &stats(server))
}

/// The access token `token --json` printed: signed by the dev-server (verified with p256
/// against its JWKS) and bound to the DPoP key.
fn check_access_token(token: &DevToken, server: &DevServer, printed: &str) {
    let t: Value = serde_json::from_str(printed).expect("token JSON");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .arg(format!("{}/oauth2/v1/keys", server.base))
        .output()
        .expect("run curl");
    let jwks: Value = serde_json::from_slice(&out.stdout).expect("JWKS");
    let access = Jws::parse(t["access_token"].as_str().expect("access_token"));
    assert_verifies(&jwks["keys"][0], &access);
    let kid = token.jwk("dpop")["kid"].clone();
    assert_eq!(access.claims["cnf"]["jkt"], kid);
    assert_eq!(t["cnf_jkt"], kid);
}

#[test]
fn processes_share_one_token_and_one_nonce_through_the_agent() {
    let dir = SocketDir::new();
    let (token, server) = setup(&dir, &["dev"], &allow_uid(own_uid(), ""));
    let agent = Agent::start(&token, &dir.socket());

    let shared = three_calls_and_a_token(&token, &server, &[]);
    // One token for all four processes: the AS nonce challenge and the grant (2 HTTP
    // exchanges), then one resource-server nonce challenge, learned by the first call and
    // used by the next ones.
    let [token_requests, issued, as_nonce, rs_nonce, api] = counts(&shared);
    eprintln!("through the agent: {shared}");
    assert_eq!(
        (token_requests, issued, as_nonce),
        (2, 1, 1),
        "one token request (2 exchanges) for 4 processes: {shared}"
    );
    assert_eq!((rs_nonce, api), (1, 4), "{shared}");
    let log = agent.log();
    assert_eq!(log.matches("call relayed").count(), 3, "{log}");

    agent_out_of_the_way(agent);
    let alone = three_calls_and_a_token(&token, &server, &["--no-agent"]);
    let [token_requests, issued, as_nonce, rs_nonce, api] = counts(&alone);
    eprintln!("--no-agent: {alone}");
    // Each process pays for itself: 4 tokens of 2 exchanges each, and each call its own
    // resource-server nonce challenge.
    assert_eq!((token_requests, issued, as_nonce), (8, 4, 4), "{alone}");
    assert_eq!((rs_nonce, api), (3, 6), "{alone}");
}

/// Stops the agent, so `--no-agent` runs are not mistaken for anything the agent did.
fn agent_out_of_the_way(mut agent: Agent) {
    agent.terminate();
    agent.assert_clean_exit();
}

/// exit code, stdout, stderr; an Okta error's `errorId` (random per answer) left out.
fn result(out: &Output) -> (Option<i32>, String, String) {
    let mut text = stdout(out);
    if let Ok(Value::Object(mut error)) = serde_json::from_str::<Value>(&text)
        && error.remove("errorId").is_some()
    {
        text = Value::Object(error).to_string();
    }
    (out.status.code(), text, stderr(out))
}

#[test]
fn calls_through_the_agent_print_what_calls_in_process_print() {
    let dir = SocketDir::new();
    let (token, server) = setup(&dir, &["dev"], &allow_uid(own_uid(), ""));
    let agent = Agent::start(&token, &dir.socket());
    let users = format!("{}/api/v1/users", server.base);
    let list = token.keybound(&["call", "--paginate", &format!("{users}?limit=2")]);
    assert_exit(&list, 0, &"call --paginate");
    let all: Vec<Value> = serde_json::from_str(&stdout(&list)).expect("one JSON array");
    assert_eq!(all.len(), 7, "every page gathered: {}", stdout(&list));
    let one = format!("{users}/{}", all[0]["id"].as_str().expect("id"));
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "paginate",
            vec!["--paginate".into(), format!("{users}?limit=2")],
        ),
        (
            "POST -d",
            vec![
                "-d".into(),
                r#"{"profile":{"firstName":"Ada (updated)"}}"#.into(),
                one.clone(),
            ],
        ),
        (
            "one user with -H",
            vec!["-H".into(), "X-Trace: 7".into(), one],
        ),
        ("HTTP error", vec![format!("{users}/00unope")]),
    ];
    for (what, args) in &cases {
        let mut via = vec!["call".to_owned()];
        via.extend(args.iter().cloned());
        let mut alone = via.clone();
        alone.insert(1, "--no-agent".into());
        let through = token.keybound(&via);
        let in_process = token.keybound(&alone);
        assert_eq!(
            result(&through),
            result(&in_process),
            "{what}: the same exit code, stdout and stderr through the agent and in-process"
        );
        let want = if *what == "HTTP error" { 4 } else { 0 };
        assert_exit(&through, want, what);
    }
    let missing = stderr(&token.keybound(&["call", &format!("{users}/00unope")]));
    assert!(
        missing.starts_with("error: HTTP 404 Not Found: E0000007"),
        "{missing}"
    );
    let log = agent.log();
    assert_eq!(log.matches("call relayed").count(), 6, "{log}");
    for line in log.lines().filter(|l| l.contains("call relayed")) {
        assert!(
            line.contains("url=") && !line.contains('?'),
            "the call's log line names the URL without its query: {line}"
        );
    }

    // keybound's own refusals read as they do in-process (no rule to change).
    let foreign = token.keybound(&["call", "https://api.example/v1/x"]);
    let line = assert_error(&foreign, &"call to an origin outside api_origins");
    assert_mentions(&line, &["api_origins"]);
    assert!(!line.contains("[[agent.allow]]"), "{line}");

    // The agent sets Authorization and DPoP; a caller may not, with the CLI or without.
    let out = token.keybound(&["call", "-H", "DPoP: x", &users]);
    let line = assert_error(&out, &"call -H DPoP");
    assert_mentions(&line, &["dpop", "-H"]);
    // Nor what would change the request upstream on a shared connection.
    for name in [
        "Authorization",
        "dpop",
        "Host",
        "Transfer-Encoding",
        "X-HTTP-Method-Override",
        "X-Forwarded-Host",
    ] {
        let (status, answer) = agent_post(
            agent.socket(),
            "/v1/call",
            &serde_json::json!({"client": "dev", "method": "GET", "url": users, "headers": [[name, "x"]]}),
        );
        assert_eq!(status, 400, "{answer}");
        assert_mentions(
            answer["message"].as_str().unwrap_or(""),
            &["set by keybound"],
        );
    }
    // The answer carries the response, never the token.
    let (status, answer) = agent_post(
        agent.socket(),
        "/v1/call",
        &serde_json::json!({"client": "dev", "method": "GET", "url": users}),
    );
    assert_eq!(
        (status, answer["status"].as_u64()),
        (200, Some(200)),
        "{answer}"
    );
    let (_, t) = agent_post(
        agent.socket(),
        "/v1/token",
        &serde_json::json!({"client": "dev"}),
    );
    let access = t["access_token"].as_str().expect("access_token");
    assert!(!answer.to_string().contains(access), "{answer}");
    assert!(!agent.log().contains(access), "the token is never logged");
}

/// `POST path` to the agent with curl: status and JSON answer.
fn agent_post(socket: &Path, path: &str, body: &Value) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(socket)
        .args([
            "-H",
            "content-type: application/json",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://keybound{path}"))
        .arg("--data-binary")
        .arg(body.to_string())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').expect("status line");
    (
        code.trim().parse().expect("status"),
        serde_json::from_str(json).unwrap_or_else(|_| panic!("JSON answer: {text}")),
    )
}

#[test]
fn token_check_through_the_agent_prints_the_same_fields() {
    let dir = SocketDir::new();
    let (token, _server) = setup(&dir, &["dev"], &allow_uid(own_uid(), ""));
    let agent = Agent::start(&token, &dir.socket());
    let in_process = token.run_ok(&["token", "--check", "--no-agent"]);
    let fetched = token.run_ok(&["token", "--check"]);
    let cached = token.run_ok(&["token", "--check"]);
    let field = |text: &str, name: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no '{name}' line in:\n{text}"))
            .to_owned()
    };
    for name in [
        "client ",
        "token endpoint ",
        "assertion key ",
        "dpop key ",
        "token_type ",
        "dpop-bound ",
        "scopes granted ",
        "scope guard ",
        "read-only ",
        "clock offset ",
    ] {
        assert_eq!(
            field(&fetched, name),
            field(&in_process, name),
            "'{name}' through the agent"
        );
        assert_eq!(field(&cached, name), field(&in_process, name));
    }
    assert!(field(&fetched, "dpop-bound ").contains("yes"), "{fetched}");
    assert!(field(&fetched, "expires_in ").ends_with(" s"), "{fetched}");
    assert_eq!(
        field(&in_process, "round trips "),
        "round trips     2",
        "{in_process}"
    );
    assert_eq!(
        field(&fetched, "round trips "),
        "round trips     2 (fetched by the agent for this request)"
    );
    assert!(
        field(&cached, "round trips ").starts_with("round trips     2 (")
            && cached.contains("came from the agent's cache"),
        "{cached}"
    );
    assert_eq!(agent.log().matches("token handed out").count(), 2);
}

#[test]
fn a_socket_named_in_the_environment_must_answer_the_configured_one_need_not() {
    let dir = SocketDir::new();
    let (token, server) = setup(&dir, &["dev"], "");
    let users = format!("{}/api/v1/users?limit=1", server.base);
    let nowhere = dir.root().join("nowhere.sock");
    for args in [
        vec!["call", users.as_str()],
        vec!["token"],
        vec!["token", "--check"],
    ] {
        let out = token
            .command(&args)
            .env("KEYBOUND_AGENT_SOCK", &nowhere)
            .output()
            .expect("spawn keybound");
        let line = assert_error(&out, &args);
        assert_mentions(
            &line,
            &[
                &nowhere.display().to_string(),
                "KEYBOUND_AGENT_SOCK",
                "--no-agent",
            ],
        );
    }
    // No agent on the configured socket: in-process, nothing said at the default level.
    let out = token.keybound(&["call", &users]);
    assert_exit(&out, 0, &"call without an agent running");
    assert_eq!(stderr(&out), "", "no note at the default log level");
    let out = token.keybound(&["-v", "token"]);
    assert_exit(&out, 0, &"token -v without an agent running");
    assert!(
        stderr(&out).contains("no agent at") && stderr(&out).contains("in-process"),
        "{}",
        stderr(&out)
    );
}

/// `keybound <args>` as `who`, through the agent named by `KEYBOUND_AGENT_SOCK` only (the
/// other user cannot read the token's directory, nor its config).
fn keybound_as(who: As, socket: &Path, args: &[&str]) -> Output {
    let mut cmd = who.command();
    cmd.arg(env!("CARGO_BIN_EXE_keybound"))
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/")
        .env("KEYBOUND_CONFIG", "/nonexistent/keybound.toml")
        .env("KEYBOUND_AGENT_SOCK", socket)
        .current_dir("/");
    output_with_guard(cmd)
}

#[test]
fn another_uid_goes_through_the_agent_as_its_rule_allows() {
    let dir = SocketDir::new();
    let rules = format!(
        "{}{}{}",
        allow_uid(own_uid(), ""),
        allow_uid(NOBODY, "clients = [\"other\"]"),
        // Every client, but not the assertion key: no token, so no call either.
        allow_uid(NOBODY - 2, "keys = [\"dpop\"]")
    );
    let (token, server) = setup(&dir, &["dev", "other"], &rules);
    let agent = Agent::start(&token, &dir.socket());
    expose_socket(&dir);
    let users = format!("{}/api/v1/users?limit=1", server.base);
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };

    // The rule allows "other": the call is made, without the token or the config.
    let out = keybound_as(
        nobody,
        agent.socket(),
        &["call", "--client", "other", &users],
    );
    assert_exit(&out, 0, &"call as nobody, client allowed");
    let page: Vec<Value> = serde_json::from_str(&stdout(&out)).expect("a JSON page");
    assert_eq!(page.len(), 1);

    // Not "dev": a clear refusal naming the rule to change, never a fallback.
    let before = stats(&server);
    for args in [
        vec!["call", "--client", "dev", users.as_str()],
        vec!["token", "--client", "dev"],
    ] {
        let out = keybound_as(nobody, agent.socket(), &args);
        let line = assert_error(&out, &args);
        assert_mentions(
            &line,
            &[
                "client 'dev' is not allowed",
                "[[agent.allow]]",
                &format!("uid {NOBODY}"),
                "--no-agent",
            ],
        );
    }
    let dpop_only = As::Setpriv {
        uid: NOBODY - 2,
        gid: NOBODY - 2,
    };
    for args in [
        vec!["call", "--client", "dev", users.as_str()],
        vec!["token", "--client", "dev"],
    ] {
        let out = keybound_as(dpop_only, agent.socket(), &args);
        let line = assert_error(&out, &args);
        assert_mentions(
            &line,
            &[
                "key 'client-auth' is not allowed",
                &format!("uid {}", NOBODY - 2),
                "--no-agent",
            ],
        );
    }
    assert_eq!(
        counts(&delta(&before, &stats(&server))),
        [0; 5],
        "nothing sent upstream"
    );

    // A uid no rule names: the agent closes the connection; the error says why.
    let stranger = As::Setpriv {
        uid: NOBODY - 1,
        gid: NOBODY - 1,
    };
    let out = keybound_as(stranger, agent.socket(), &["token", "--client", "other"]);
    let line = assert_error(&out, &"token as a uid without a rule");
    assert_mentions(
        &line,
        &[
            "closed the connection",
            "[[agent.allow]]",
            &format!("uid ({})", NOBODY - 1),
        ],
    );
}

#[test]
fn an_answer_over_max_call_bytes_is_refused_by_name() {
    let dir = SocketDir::new();
    let (token, server) = setup(
        &dir,
        &["dev"],
        &format!("max_call_bytes = 1024\n{}", allow_uid(own_uid(), "")),
    );
    let _agent = Agent::start(&token, &dir.socket());
    let users = format!("{}/api/v1/users", server.base);
    for args in [
        vec!["call", "--paginate", &format!("{users}?limit=2")],
        vec!["call", &users],
    ] {
        let out = token.keybound(&args);
        let line = assert_error(&out, &args);
        assert_mentions(&line, &["agent.max_call_bytes", "1024", "--no-agent"]);
    }
    // In-process there is no such bound.
    let out = token.keybound(&["call", "--no-agent", &users]);
    assert_exit(&out, 0, &"call --no-agent");

    // A request body over the agent's max_body_bytes (base64 in JSON): named, with the way
    // around it.
    let big = token.write_file("big.json", &format!("\"{}\"", "x".repeat(100_000)));
    let data = format!("@{}", big.display());
    let out = token.keybound(&["call", "-X", "PUT", "-d", &data, &users]);
    let line = assert_error(&out, &"call with a body over max_body_bytes");
    assert_mentions(&line, &["413", "max_body_bytes", "--no-agent"]);
}

/// The authorization server refusing keybound's credentials exits 77 (README "Exit
/// codes") whether the token is fetched in-process or by the agent.
#[test]
fn a_refused_client_exits_alike_through_the_agent() {
    let dir = SocketDir::new();
    let (token, server) = setup(&dir, &[], &allow_uid(own_uid(), ""));
    let stranger = client("dev", &server.base).replace(DEV_CLIENT_ID, "0oa-not-registered");
    token.write_config(&config_text(
        &stranger,
        &format!(
            "socket = \"{}\"\n{}",
            dir.socket().display(),
            allow_uid(own_uid(), "")
        ),
    ));
    let in_process = token.command(&["token", "--no-agent"]).output().unwrap();
    let agent = Agent::start(&token, &dir.socket());
    let through = token.command(&["token"]).output().unwrap();
    assert_eq!(in_process.status.code(), Some(77), "{in_process:?}");
    assert_eq!(through.status.code(), Some(77), "{through:?}");
    let said = String::from_utf8_lossy(&through.stderr);
    assert!(said.contains("invalid_client"), "{said}");
    agent_out_of_the_way(agent);
}

/// `/v1/call` signs a proof for the URL it calls: a rule's `htu_prefixes` hold there as
/// they do for `/v1/dpop`, and a URL outside them is refused before anything is sent.
#[test]
fn a_call_outside_the_rules_htu_prefixes_is_refused_before_it_is_sent() {
    let dir = SocketDir::new();
    let (token, server) = setup(&dir, &["dev"], &allow_uid(own_uid(), ""));
    token.write_config(&config_text(
        &client("dev", &server.base),
        &format!(
            "socket = \"{}\"\n{}",
            dir.socket().display(),
            allow_uid(
                own_uid(),
                &format!("htu_prefixes = [\"{}/api/v1/users\"]", server.base)
            )
        ),
    ));
    let agent = Agent::start(&token, &dir.socket());
    let call = |url: String| serde_json::json!({ "client": "dev", "method": "GET", "url": url });
    let (status, _) = agent_post(
        agent.socket(),
        "/v1/call",
        &call(format!("{}/api/v1/users?limit=1", server.base)),
    );
    assert_eq!(status, 200);
    let before = stats(&server);
    let (status, answer) = agent_post(
        agent.socket(),
        "/v1/call",
        &call(format!("{}/api/v1/groups", server.base)),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("htu_prefixes"),
        "{answer}"
    );
    let sent = delta(&before, &stats(&server));
    assert_eq!(sent["api_requests"], 0, "{sent}");
    agent_out_of_the_way(agent);
}
