//! The agent's limits: settings out of range at start, a full signing queue, connection
//! slots per uid, header and body timeouts, half-closed connections, `Expect: 100-continue`
//! over the body limit.
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use std::sync::Arc;

use agent_support::*;
use support::*;
use tokio::io::AsyncWriteExt as _;

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
