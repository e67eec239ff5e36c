//! The egress gateway end to end: the built `keybound serve` on a per-test SoftHSM2 token,
//! the dev-server (`keybound-devserver`, in-process on 127.0.0.1:0) as the upstream, and
//! the application as a plain HTTP client on the agent's socket that holds no token.
//!
//! The DPoP proofs and tokens the agent sends are verified by the dev-server itself, with
//! its own RustCrypto verifier (`crates/keybound-devserver/src/verify.rs`, a crate that does
//! not depend on keybound): a request it answers 200 carried a token it issued and a proof
//! signed by the key that token is bound to, for that method and URL. Its request log says
//! what reached it. The other upstreams (slow, down, answering 500) are tiny servers on
//! 127.0.0.1:0 in this file. No assertion here is about how long anything took.

mod agent_support;
mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use agent_support::*;
use http::Method;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::*;
use tokio::net::UnixStream;

/// One request on a fresh connection with the given extra headers.
async fn send(
    socket: &std::path::Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "keybound");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = sender.send_request(request).await.expect("send");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A one-thread HTTP/1.1 server on 127.0.0.1:0 that reads each request head, records it,
/// optionally waits (`delay_ms`) and answers `answer`.
struct TinyServer {
    base: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl TinyServer {
    fn start(answer: &'static str, delay_ms: u64) -> TinyServer {
        Self::start_paced(vec![answer], delay_ms)
    }

    /// Writes each part of the answer after a pause of `pause_ms`.
    fn start_paced(parts: Vec<&'static str>, pause_ms: u64) -> TinyServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (seen, parts) = (seen.clone(), parts.clone());
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf).into_owned());
                    for part in &parts {
                        std::thread::sleep(std::time::Duration::from_millis(pause_ms));
                        if stream.write_all(part.as_bytes()).is_err() {
                            return;
                        }
                        let _ = stream.flush();
                    }
                    // An answer cut short: the connection stays open, silent.
                    if parts.iter().any(|p| p.ends_with(STALL)) {
                        std::thread::sleep(std::time::Duration::from_secs(120));
                    }
                });
            }
        });
        TinyServer { base, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

const BROKEN_ANSWER: &str = "HTTP/1.1 500 Internal Server Error\r\n\
    Content-Type: application/json\r\n\
    Content-Length: 47\r\n\
    Connection: close, x-hop\r\n\
    X-Hop: secret-of-this-hop\r\n\
    Set-Cookie: session=upstream-session\r\n\
    X-End: kept\r\n\
    \r\n\
    {\"errorCode\":\"E0000009\",\"errorSummary\":\"boom\"}\n";

/// An answer whose head comes after 2 s and whose body pauses 2 s midway: longer than
/// the `paced` client's `timeout_secs` (1), well within its route's (300).
const PACED_ANSWER: [&str; 2] = [
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\n\r\n[\"first\",",
    "\"next\"]",
];

/// A 401 with a challenge and a body of 100 000 bytes, over what the agent reads of a
/// challenge before a retry (64 KiB).
fn big_challenge() -> &'static str {
    let body = "x".repeat(100_000);
    let answer = format!(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: DPoP error=\"use_dpop_nonce\"\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Box::leak(answer.into_boxed_str())
}

/// Ends an answer after which [`TinyServer`] keeps the connection open and silent.
const STALL: &str = "[1,";

/// A head and the start of a body, then nothing.
const STALLED_BODY: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[1,";

const SLOW_ANSWER: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]";

/// The agent's token, the dev-server, the tiny upstreams, and routes to each.
struct Setup {
    token: DevToken,
    dir: SocketDir,
    dev: DevServer,
    agent: Agent,
    broken: TinyServer,
    slow: TinyServer,
    _paced: TinyServer,
    challenge: TinyServer,
    _stuck: TinyServer,
}

fn setup() -> Setup {
    setup_with("")
}

/// [`setup`] with `agent_lines` added to `[agent]`.
fn setup_with(agent_lines: &str) -> Setup {
    let (token, _) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    let dev = DevServer::for_client_auth(&token, |s| s.users = 7);
    let broken = TinyServer::start(BROKEN_ANSWER, 0);
    let slow = TinyServer::start(SLOW_ANSWER, 20_000);
    let paced = TinyServer::start_paced(PACED_ANSWER.to_vec(), 2_000);
    let challenge = TinyServer::start(big_challenge(), 0);
    let stuck = TinyServer::start(STALLED_BODY, 0);
    let down = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let base = &dev.base;
    let sections = format!(
        r#"{}api_origins = ["{base}", "{broken}", "{slow}", "{down}", "{challenge}", "{stuck}"]
backoff_initial_ms = 1
backoff_max_ms = 5
{write}

[[route]]
name = "okta"
client = "dev"
upstream = "{base}"
allow = ["GET /api/v1/users", "GET /api/v1/users/*"]

[[route]]
name = "okta-write"
client = "devw"
upstream = "{base}"
allow = ["POST /api/v1/users/*"]

[[route]]
name = "broken"
client = "dev"
upstream = "{broken}/base"
allow = ["GET /**"]

[[route]]
name = "slow"
client = "dev"
upstream = "{slow}"
allow = ["GET /**"]
timeout_secs = 1

[[route]]
name = "stalled"
client = "dev"
upstream = "{slow}"
allow = ["GET /**"]
timeout_secs = 300

[[client]]
name = "paced"
server = "okta"
token_endpoint = "{base}/oauth2/v1/token"
client_id = "{DEV_CLIENT_ID}"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.read"]
allowed_scopes = ["okta.users.read"]
api_origins = ["{paced}"]
timeout_secs = 1

[[route]]
name = "paced"
client = "paced"
upstream = "{paced}"
allow = ["GET /**"]
timeout_secs = 300

[[route]]
name = "challenge"
client = "dev"
upstream = "{challenge}"
allow = ["GET /**"]

[[route]]
name = "stuck"
client = "dev"
upstream = "{stuck}"
allow = ["GET /**"]
timeout_secs = 1

[[route]]
name = "down"
client = "dev"
upstream = "{down}"
allow = ["GET /**"]
"#,
        dev_client(base),
        write = write_client(base),
        broken = broken.base,
        slow = slow.base,
        paced = paced.base,
        challenge = challenge.base,
        stuck = stuck.base,
    );
    let allow = format!(
        "{agent_lines}\n{}{}",
        allow_uid(own_uid(), ""),
        allow_uid(NOBODY, "routes = [\"broken\"]")
    );
    token.write_config(&config_text(&sections, &allow));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    Setup {
        token,
        dir,
        dev,
        agent,
        broken,
        slow,
        _paced: paced,
        challenge,
        _stuck: stuck,
    }
}

/// A second client of the same dev-server registration, for the users API's writes.
fn write_client(base: &str) -> String {
    format!(
        r#"
[[client]]
name = "devw"
server = "okta"
token_endpoint = "{base}/oauth2/v1/token"
client_id = "{DEV_CLIENT_ID}"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.manage"]
allowed_scopes = ["okta.users.manage"]
"#
    )
}

/// The API requests the dev-server got (token requests left out).
fn api_requests(dev: &DevServer) -> Vec<keybound_devserver::SeenRequest> {
    dev.requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/"))
        .collect()
}

/// No credential in what the application got back.
fn assert_no_credentials(reply: &Reply, dev: &DevServer) {
    for name in ["authorization", "dpop", "dpop-nonce", "set-cookie"] {
        assert!(reply.headers.get(name).is_none(), "{name} in {reply:?}");
    }
    let text = reply.text();
    for seen in api_requests(dev) {
        if let Some(auth) = seen.authorization {
            let token = auth.trim_start_matches("DPoP ");
            assert!(!text.contains(token), "the token reached the application");
        }
    }
}

fn next_target(reply: &Reply) -> Option<String> {
    let links: Vec<&str> = reply
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    for l in &links {
        assert!(l.contains("</gw/okta/api/v1/users"), "rewritten: {l}");
        assert!(!l.contains("127.0.0.1"), "no upstream origin left: {l}");
    }
    links
        .iter()
        .flat_map(|l| l.split(','))
        .find(|l| l.contains("rel=\"next\""))
        .map(|l| {
            let start = l.find('<').unwrap() + 1;
            let end = l.find('>').unwrap();
            l[start..end].to_owned()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paginated_list_and_one_user_through_the_gateway_without_a_token() {
    let s = setup();
    let socket = s.agent.socket();
    // The application sends no credential; following rel="next" stays on the gateway.
    let mut path = "/gw/okta/api/v1/users?limit=2".to_owned();
    let mut users: Vec<Value> = Vec::new();
    for _ in 0..20 {
        let reply = send(socket, Method::GET, &path, &[], "").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_no_credentials(&reply, &s.dev);
        users.extend(reply.json().as_array().expect("a page").clone());
        match next_target(&reply) {
            Some(next) => path = next,
            None => break,
        }
    }
    assert_eq!(users.len(), 7, "every user, across pages of 2");
    // Every request reached the dev-server with the agent's DPoP token and a proof, which
    // the dev-server verified (it answered 200).
    let seen = api_requests(&s.dev);
    assert!(seen.iter().all(|r| {
        r.dpop
            && r.authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("DPoP "))
    }));
    assert!(
        seen.iter()
            .any(|r| r.query.as_deref().is_some_and(|q| q.contains("after="))),
        "the next pages were asked with the upstream's cursor: {seen:?}"
    );

    let id = users[3]["id"].as_str().expect("id");
    let one = send(
        socket,
        Method::GET,
        &format!("/gw/okta/api/v1/users/{id}"),
        &[],
        "",
    )
    .await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(one.json()["id"], id);
    assert_no_credentials(&one, &s.dev);
    // HEAD comes with GET.
    let head = send(
        socket,
        Method::HEAD,
        &format!("/gw/okta/api/v1/users/{id}"),
        &[],
        "",
    )
    .await;
    assert_eq!(head.status, 200, "{head:?}");

    // The route's metrics and health.
    let metrics = get(socket, "/metrics").await.text();
    let ok = metric(
        &metrics,
        "keybound_gateway_responses_total",
        &[("route", "okta"), ("class", "2xx")],
    );
    assert!(ok.is_some_and(|n| n >= 5.0), "{metrics}");
    assert!(
        metric(
            &metrics,
            "keybound_gateway_request_seconds_count",
            &[("route", "okta")]
        )
        .is_some_and(|n| n >= 5.0),
        "{metrics}"
    );
    let health = get(socket, "/healthz").await.json();
    let names: Vec<&str> = health["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "broken",
            "challenge",
            "down",
            "okta",
            "okta-write",
            "paced",
            "slow",
            "stalled",
            "stuck"
        ]
    );
    let log = s.agent.log();
    assert!(
        log.contains("gateway request") && log.contains("/api/v1/users"),
        "{log}"
    );
    assert!(!log.contains("after="), "the query is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_hop_by_hop_headers_from_the_application_are_stripped() {
    let s = setup();
    let socket = s.agent.socket();
    let reply = send(
        socket,
        Method::GET,
        "/gw/okta/api/v1/users?limit=1",
        &[
            ("authorization", "DPoP app-token"),
            ("dpop", "app-proof"),
            ("cookie", "sid=app"),
        ],
        "",
    )
    .await;
    // The dev-server would refuse the application's token and proof: it got the agent's
    // (twice: its nonce challenge, answered once).
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = api_requests(&s.dev);
    assert_eq!(seen.len(), 2, "{seen:?}");
    for r in &seen {
        let auth = r.authorization.as_deref().expect("Authorization");
        assert!(
            auth.starts_with("DPoP ") && !auth.contains("app-token"),
            "{auth}"
        );
    }

    // What another upstream sees, and what comes back from it: hop-by-hop headers (and
    // those Connection names) are dropped both ways, end-to-end ones kept.
    let reply = send(
        socket,
        Method::GET,
        "/gw/broken/x?q=1",
        &[
            ("authorization", "Bearer app-token"),
            ("dpop", "app-proof"),
            ("cookie", "sid=app"),
            ("connection", "x-app-hop"),
            ("x-app-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("x-request-id", "r-1"),
        ],
        "",
    )
    .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    let heads = s.broken.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = heads[0].to_ascii_lowercase();
    assert!(head.starts_with("get /base/x?q=1 http/1.1"), "{head}");
    assert!(head.contains("\r\nauthorization: dpop "), "{head}");
    assert!(head.contains("\r\ndpop: ey"), "{head}");
    for gone in [
        "app-token",
        "app-proof",
        "cookie:",
        "x-app-hop",
        "keep-alive",
        "\r\nte:",
        "proxy-authorization",
    ] {
        assert!(!head.contains(gone), "{gone} reached the upstream: {head}");
    }
    assert!(head.contains("x-request-id: r-1"), "{head}");
    // The answer: status and body passed through; hop-by-hop and the cookie dropped.
    assert_eq!(reply.json()["errorCode"], "E0000009");
    assert_eq!(reply.headers["x-end"], "kept");
    assert!(reply.headers.get("x-hop").is_none(), "{reply:?}");
    assert!(reply.headers.get("set-cookie").is_none(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outside_the_allow_list_and_unsafe_paths_never_reach_the_upstream() {
    let s = setup();
    let socket = s.agent.socket();
    let post = send(
        socket,
        Method::POST,
        "/gw/okta/api/v1/users",
        &[("content-type", "application/json")],
        r#"{"profile":{"login":"x@example.com"}}"#,
    )
    .await;
    post.error(403, "not_allowed", &["okta", "POST", "/api/v1/users"]);
    for (method, path) in [
        (Method::DELETE, "/gw/okta/api/v1/users/00u1"),
        (Method::GET, "/gw/okta/api/v1/groups"),
        (Method::GET, "/gw/okta/api/v1/users/00u1/roles"),
    ] {
        send(socket, method, path, &[], "")
            .await
            .error(403, "not_allowed", &["okta"]);
    }
    // Each of these matches "GET /api/v1/users/*" as written, and an upstream (or the
    // URL parser on the way) would resolve it to another path.
    for path in [
        "/gw/okta/api/v1/users/..",
        "/gw/okta/api/v1/users/%2e%2E",
        "/gw/okta/api/v1/users/.",
        "/gw/okta/api/v1/users/..%2Fadmin",
        "/gw/okta/api/v1/users/x%2fy",
        "/gw/okta/api/v1/users/x%5cy",
        "/gw/okta/api/v1//users",
        "/gw/okta/api/v1/users/..;",
        "/gw/okta/api/v1/users/%2e%2e;x",
        "/gw/okta/api/v1/users/%C0%AE%C0%AE",
        "/gw/okta/api/v1/users/a%00",
    ] {
        let reply = send(socket, Method::GET, path, &[], "").await;
        assert_eq!(reply.status, 400, "{path}: {reply:?}");
    }
    assert_eq!(
        api_requests(&s.dev),
        [],
        "nothing refused reached the dev-server"
    );
    send(socket, Method::GET, "/gw/nope/x", &[], "")
        .await
        .error(404, "unknown_route", &["nope"]);
    let metrics = get(socket, "/metrics").await.text();
    assert!(
        metric(
            &metrics,
            "keybound_gateway_responses_total",
            &[("route", "okta"), ("class", "403")]
        )
        .is_some_and(|n| n >= 4.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_slow_or_failing_gets_502_504_or_its_own_answer() {
    let s = setup();
    let socket = s.agent.socket();
    let down = send(socket, Method::GET, "/gw/down/x", &[], "").await;
    down.error(502, "upstream_unreachable", &["down", "connect"]);
    let slow = send(socket, Method::GET, "/gw/slow/x", &[], "").await;
    slow.error(504, "upstream_timeout", &["slow", "1 s"]);
    let broken = send(socket, Method::GET, "/gw/broken/y", &[], "").await;
    assert_eq!(broken.status, 500, "{broken:?}");
    assert_eq!(broken.json()["errorSummary"], "boom");
    let metrics = get(socket, "/metrics").await.text();
    for (route, class) in [("down", "502"), ("slow", "504"), ("broken", "5xx")] {
        assert_eq!(
            metric(
                &metrics,
                "keybound_gateway_responses_total",
                &[("route", route), ("class", class)]
            ),
            Some(1.0),
            "{route} {class}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_uses_only_its_routes_and_never_gets_the_token() {
    let s = setup();
    expose_socket(&s.dir);
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };
    let socket = s.agent.socket();
    curl_method_as(nobody, socket, "GET", "/gw/okta/api/v1/users", None).error(
        403,
        "forbidden",
        &["route 'okta'"],
    );
    assert_eq!(api_requests(&s.dev), [], "nothing reached the dev-server");
    // Its own route works for it.
    let broken = curl_method_as(nobody, socket, "GET", "/gw/broken/z", None);
    assert_eq!(broken.status, 500, "{broken:?}");
    // A rule that names routes gets no client it does not name: no token, no proofs.
    curl_method_as(
        nobody,
        socket,
        "POST",
        "/v1/token",
        Some(r#"{"client":"dev"}"#),
    )
    .error(403, "forbidden", &["dev"]);
    curl_method_as(
        nobody,
        socket,
        "POST",
        "/v1/dpop",
        Some(r#"{"client":"dev","htm":"GET","htu":"https://o.example/"}"#),
    )
    .error(403, "forbidden", &["dev"]);
    // /healthz lists only its routes.
    let health = curl_method_as(nobody, socket, "GET", "/healthz", None).json();
    assert_eq!(
        health["routes"].as_array().map(Vec::len),
        Some(1),
        "{health}"
    );
}

/// `keybound bench --gateway`: both sides measured in one run, through the agent and
/// directly with a cached token; the rates are reported, never asserted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_gateway_mode_reports_both_rates() {
    let s = setup();
    let out = s.token.run_ok(&[
        "bench",
        "--gateway",
        "okta",
        "--path",
        "/api/v1/users?limit=2",
        "--clients",
        "2",
        "--seconds",
        "2",
        "--socket",
        s.agent.socket().to_str().unwrap(),
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).expect("bench --json prints JSON");
    for field in ["direct_per_s", "gateway_per_s", "ratio"] {
        let value = report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field}: {report}"));
        assert!(value.is_finite() && value > 0.0, "{field} > 0: {report}");
    }
    eprintln!("bench --gateway: {report}");
}

/// `curl` to the loopback TCP listener, as `who` (or as this process), with extra args.
fn curl_tcp(who: Option<As>, url: &str, extra: &[&str]) -> CurlReply {
    let mut cmd = match who {
        Some(who) => who.command(),
        None => std::process::Command::new("env"),
    };
    cmd.arg("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir("/");
    CurlReply::of(cmd)
}

/// `gateway_listen`: the same rules on loopback TCP, each connection's uid read from the
/// kernel's TCP table; only /gw/ is served there, and never to a browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loopback_tcp_listener_applies_the_rules_of_the_connecting_uid() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let s = setup_with(&format!("gateway_listen = \"127.0.0.1:{port}\""));
    let base = format!("http://127.0.0.1:{port}");
    // This uid: every route.
    let users = curl_tcp(None, &format!("{base}/gw/okta/api/v1/users?limit=2"), &[]);
    assert_eq!(users.status, 200, "{users:?}");
    assert_eq!(users.json().as_array().map(Vec::len), Some(2));
    // nobody: its rule allows only "broken"; it is told so for "okta", which gets nothing.
    let nobody = As::Setpriv {
        uid: NOBODY,
        gid: NOBODY,
    };
    let before = api_requests(&s.dev).len();
    curl_tcp(Some(nobody), &format!("{base}/gw/okta/api/v1/users"), &[]).error(
        403,
        "forbidden",
        &["route 'okta'"],
    );
    assert_eq!(
        api_requests(&s.dev).len(),
        before,
        "nothing reached the dev-server"
    );
    let broken = curl_tcp(Some(nobody), &format!("{base}/gw/broken/z"), &[]);
    assert_eq!(broken.status, 500, "{broken:?}");
    // A uid no rule names: closed at once.
    curl_tcp(
        Some(As::Setpriv {
            uid: NOBODY - 1,
            gid: NOBODY - 1,
        }),
        &format!("{base}/gw/broken/z"),
        &[],
    )
    .assert_closed();
    // Only the gateway, and not for a browser (any web page can reach 127.0.0.1).
    curl_tcp(None, &format!("{base}/v1/keys"), &[]).error(404, "not_found", &["/gw/"]);
    curl_tcp(
        None,
        &format!("{base}/gw/okta/api/v1/users"),
        &["-H", "Origin: https://evil.example"],
    )
    .error(403, "forbidden", &["browser"]);
    curl_tcp(
        None,
        &format!("{base}/gw/okta/api/v1/users"),
        &["-H", "Host: evil.example"],
    )
    .error(421, "misdirected", &["evil.example"]);
}

/// A POST gets the nonce retry with its body sent again (and no other retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_sent_again_with_its_body_after_the_nonce_challenge() {
    let s = setup();
    let socket = s.agent.socket();
    let list = send(
        socket,
        Method::GET,
        "/gw/okta/api/v1/users?limit=1",
        &[],
        "",
    )
    .await;
    let id = list.json()[0]["id"].as_str().expect("id").to_owned();
    let before = api_requests(&s.dev).len();
    let path = format!("/gw/okta-write/api/v1/users/{id}");
    let body = r#"{"profile":{"firstName":"Grace-Updated"}}"#;
    let reply = send(
        socket,
        Method::POST,
        &path,
        &[("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["profile"]["firstName"], "Grace-Updated");
    let posts: Vec<_> = api_requests(&s.dev)[before..]
        .iter()
        .filter(|r| r.method == "POST")
        .cloned()
        .collect();
    // The write client has no nonce of the resource server yet (each client keeps its
    // own): the challenge, then the retry that carried the body, both with its token.
    assert_eq!(posts.len(), 2, "{posts:?}");
    assert!(posts.iter().all(|r| r.dpop && r.authorization.is_some()));
}

/// Headers that make a server or a proxy in front of it take another method or path
/// (`X-HTTP-Method-Override`, `X-Original-URL`, `Forwarded`...) never reach the upstream:
/// the allow-list is checked on what the upstream will act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_change_the_method_or_path_upstream_are_dropped() {
    let s = setup();
    let socket = s.agent.socket();
    let rewriting = [
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("forwarded", "for=10.0.0.1;host=admin.example"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "admin.example"),
        ("x-forwarded-prefix", "/admin"),
        ("x-real-ip", "10.0.0.1"),
    ];
    let mut headers = rewriting.to_vec();
    headers.push(("x-request-id", "r-2"));
    headers.push(("accept", "application/json"));
    let reply = send(
        socket,
        Method::GET,
        "/gw/okta/api/v1/users?limit=1",
        &headers,
        "",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = api_requests(&s.dev);
    assert!(!seen.is_empty());
    for r in &seen {
        assert_eq!(r.method, "GET", "{r:?}");
        for (name, _) in rewriting {
            assert!(
                !r.header_names.iter().any(|n| n == name),
                "{name} reached the upstream: {r:?}"
            );
        }
        for kept in ["x-request-id", "accept"] {
            assert!(r.header_names.iter().any(|n| n == kept), "{kept}: {r:?}");
        }
    }
}

/// A query may carry personal data (a search, a cursor): after upstream failures it is in
/// none of the 502 answers, the breaker's 503 (which every caller of the route sees), the
/// health, the metrics or the agent's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_never_appears_in_failures_health_metrics_or_the_log() {
    let s = setup();
    let socket = s.agent.socket();
    let secret = "grace.hopper%40example.com";
    let mut answers = Vec::new();
    // The breaker opens after the client's breaker_failures: bounded, whatever it is.
    for _ in 0..50 {
        let reply = send(
            socket,
            Method::GET,
            &format!("/gw/down/api/v1/users?search={secret}"),
            &[],
            "",
        )
        .await;
        let status = reply.status;
        answers.push(reply);
        if status == 503 {
            break;
        }
    }
    let open = answers.last().expect("answers");
    open.error(503, "unavailable", &["down", "last: cannot connect to"]);
    for reply in &answers {
        let text = reply.text();
        assert!(!text.contains("grace.hopper"), "{text}");
        assert!(!text.contains("search="), "{text}");
    }
    assert!(
        answers[0].text().contains("/api/v1/users"),
        "{:?}",
        answers[0]
    );
    let health = get(socket, "/healthz").await.text();
    let metrics = get(socket, "/metrics").await.text();
    let log = s.agent.log();
    for (what, text) in [("healthz", &health), ("metrics", &metrics), ("log", &log)] {
        assert!(
            !text.contains("grace.hopper") && !text.contains("search="),
            "{what}: {text}"
        );
    }
}

/// A request whose handler is dropped before its answer (the agent stopping past
/// `shutdown_grace_secs` while the upstream is asked) still leaves its log line and audit
/// line: status 499. (A caller that only goes away is not noticed before the answer: the
/// agent serves half-closed connections, so it sends the answer and logs its status.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_dropped_before_its_answer_is_logged_as_499() {
    let mut s = setup_with("shutdown_grace_secs = 1");
    let socket = s.agent.socket().to_owned();
    let pending = tokio::spawn(async move {
        let stream = UnixStream::connect(&socket).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = http::Request::builder()
            .uri("/gw/stalled/x?q=1")
            .header(http::header::HOST, "keybound")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let _ = sender.send_request(request).await;
    });
    // The upstream (which answers only after 20 s) has the request: the agent waits on it.
    for _ in 0..600 {
        if !s.slow.heads().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(s.slow.heads().len(), 1, "the request reached the upstream");
    s.agent.terminate();
    s.agent.wait();
    pending.abort();
    let log = s.agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("gateway request") && l.contains("route=\"stalled\""))
        .unwrap_or_else(|| panic!("a log line for the dropped request: {log}"));
    assert!(
        line.contains("status=499") && line.contains("path=\"/x\""),
        "{line}"
    );
}

/// A route's `timeout_secs` is the upstream's time to answer, and a streamed answer is not
/// cut while it flows: neither is bounded by the client's shorter `timeout_secs` (1 s here;
/// the upstream takes 2 s to answer and pauses 2 s in its body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_above_the_clients_applies_to_the_head_and_the_body_streams() {
    let s = setup();
    let reply = send(s.agent.socket(), Method::GET, "/gw/paced/x", &[], "").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json(), serde_json::json!(["first", "next"]));
}

/// A 401 challenge whose body is longer than what the agent reads before a retry is passed
/// through whole and not retried (it was a 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_with_a_large_body_is_passed_through_unretried() {
    let s = setup();
    let reply = send(s.agent.socket(), Method::GET, "/gw/challenge/x", &[], "").await;
    assert_eq!(reply.status, 401, "{:?}", reply.status);
    assert_eq!(reply.body.len(), 100_000);
    assert!(reply.body.iter().all(|b| *b == b'x'));
    assert_eq!(s.challenge.heads().len(), 1, "not retried");
}

/// An answer whose upstream goes silent mid-body is ended after the route's `timeout_secs`
/// without a byte (there is no bound on the whole body): the application gets the start of
/// it and the end of the connection, not a wait without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_upstream_stops_sending_is_cut_after_the_routes_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = setup();
    let mut stream = UnixStream::connect(s.agent.socket())
        .await
        .expect("connect");
    stream
        .write_all(b"GET /gw/stuck/x HTTP/1.1\r\nHost: keybound\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    // A safety net only: the agent ends it after 1 s without a byte.
    let ended = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        stream.read_to_end(&mut got),
    )
    .await;
    assert!(ended.is_ok(), "the answer never ended");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("[1,"), "{text}");
}
