//! The hosted JWKS (`[jwks]`): `keybound serve` publishes `/.well-known/jwks.json` on a
//! TCP listener of its own (127.0.0.1, port 0), plain or TLS, with ETag, Cache-Control
//! and nothing else; the document equals `keybound jwks`, and every key in it verifies
//! what the agent signs (the independent verifiers of `tests/support`). While the device is
//! away, the last good document stays served and `/healthz` says it is stale.
//!
//! No assertion here is about how long anything took; loops are bounded, timeouts only
//! guard against hangs.

mod agent_support;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent_support::*;
use http::StatusCode;
use serde_json::Value;
use support::*;

/// The agent's JWKS URL, from the line it prints before it is ready.
fn jwks_url(agent: &Agent) -> String {
    let log = agent.log();
    let url = log
        .lines()
        .find_map(|l| l.strip_prefix("keybound JWKS on "))
        .unwrap_or_else(|| panic!("no \"keybound JWKS on\" line:\n{log}"));
    url.to_owned()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(GUARD)
        .build()
        .expect("reqwest client")
}

/// `[jwks]` on 127.0.0.1:0 with `extra` lines; the agent section lets our uid call.
fn jwks_config(token: &DevToken, extra: &str) {
    let section = format!("[jwks]\nlisten = \"127.0.0.1:0\"\n{extra}");
    token.write_config(&config_text(&section, ""));
}

/// GETs `url` until the first document is published (503 until then): bounded, never timed.
async fn first_document(http: &reqwest::Client, url: &str) -> reqwest::Response {
    for _ in 0..200 {
        let r = http.get(url).send().await.expect("GET the hosted JWKS");
        if r.status() != StatusCode::SERVICE_UNAVAILABLE {
            return r;
        }
        assert!(
            r.headers().contains_key("retry-after"),
            "503 has Retry-After"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the hosted JWKS never left 503");
}

/// Checks the 200 of the hosted JWKS (headers and shape); returns its ETag and keys by kid.
async fn check_document(r: reqwest::Response, max_age: u64) -> (String, BTreeMap<String, Value>) {
    assert_eq!(r.status(), StatusCode::OK, "{r:?}");
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        h["cache-control"].to_str().unwrap(),
        format!("public, max-age={max_age}")
    );
    let etag = h["etag"].to_str().unwrap().to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && !etag.starts_with("W/"),
        "a strong ETag: {etag}"
    );
    let body = r.bytes().await.expect("body");
    // The ETag is the body's SHA-256, base64url: a validator of exactly these bytes.
    use sha2::Digest as _;
    assert_eq!(etag, format!("\"{}\"", b64(&sha2::Sha256::digest(&body))));
    let doc: Value = serde_json::from_slice(&body).expect("the JWKS is JSON");
    assert_members(&doc, &["keys"]);
    let keys = doc["keys"].as_array().expect("keys is an array");
    for key in keys {
        assert_jwks_entry(key, key["alg"].as_str().expect("alg"));
    }
    (etag, by_kid(keys))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_jwks_serves_the_published_keys_with_validators_and_nothing_else() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256"), ("client-auth", "ES384")]);
    // One refresh at start, the next in an hour: every device operation below is the
    // socket API's or the test's, never the listener's.
    jwks_config(&token, "max_age_secs = 120\nrefresh_secs = 3600");
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let url = jwks_url(&agent);
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.ends_with("/.well-known/jwks.json"), "{url}");
    let http = http_client();

    let (etag, hosted) = check_document(first_document(&http, &url).await, 120).await;
    // Exactly what `keybound jwks` prints for the same config, and the socket's /v1/jwks.
    assert_eq!(
        hosted,
        by_kid(&token.jwks(&[])),
        "hosted JWKS = `keybound jwks`"
    );
    assert_eq!(hosted, served_jwks(&agent, &token.jwks(&[])).await);
    assert_eq!(hosted.len(), 2);

    // Every key in it verifies what the agent signs with it.
    let start = window_start();
    let jobs = [
        proof_job(0, "dpop", &kids["dpop"], false, false),
        assertion_job(1, "client-auth", &kids["client-auth"], AUDIENCE, None),
    ];
    let mut conn = Conn::open(agent.socket()).await;
    for job in &jobs {
        let reply = match job {
            Job::Proof(request, _) => conn.post("/v1/dpop", request).await,
            Job::Assertion { request, .. } => conn.post("/v1/assertion", request).await,
        };
        check_job(&hosted, job, &reply, window_end(start));
    }

    // Requests to the listener only read the snapshot: however many, the device signs no
    // proof of possession for them (an unauthenticated client cannot make it work).
    let proofs = async || {
        let text = get(agent.socket(), "/metrics").await.text();
        samples(&text, "keybound_possession_proofs_total")
    };
    let proofs_before = proofs().await;
    assert!(!proofs_before.is_empty(), "the audits signed proofs");
    for _ in 0..50 {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(
        proofs().await,
        proofs_before,
        "the listener made the device sign"
    );

    // If-None-Match with the ETag (alone, weak, or in a list): 304, no body, validators.
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
    ] {
        let r = http
            .get(&url)
            .header("if-none-match", &inm)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "If-None-Match: {inm}");
        assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
        assert_eq!(
            r.headers()["cache-control"].to_str().unwrap(),
            "public, max-age=120"
        );
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let r = http
        .get(&url)
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a different ETag gets the document"
    );

    // HEAD: the headers of GET, no body.
    let r = http.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.bytes().await.unwrap().is_empty());

    // Other methods on the path: 405 with Allow.
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::OPTIONS,
    ] {
        let r = http.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(r.headers()["allow"], "GET, HEAD", "{method}");
    }
    // Nothing else on that listener: not the agent's API, not health, not metrics.
    let base = url.trim_end_matches("/.well-known/jwks.json");
    for path in [
        "/",
        "/healthz",
        "/metrics",
        "/v1/jwks",
        "/v1/keys",
        "/.well-known/jwks.json/",
        "/.well-known/openid-configuration",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }

    // The agent reports the listener in /healthz and /metrics (over its socket).
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    let jwks = &health["jwks"];
    assert_eq!(jwks["listen"], url[7..url.len() - 22], "{health}");
    assert_eq!(jwks["keys"], 2, "{health}");
    assert_eq!(jwks["stale"], false, "{health}");
    assert!(jwks["age_secs"].is_u64(), "{health}");
    assert_eq!(jwks["last_error"], Value::Null, "{health}");
    let metrics = get(agent.socket(), "/metrics").await.text();
    assert_eq!(
        metric(&metrics, "keybound_jwks_published_keys", &[]),
        Some(2.0)
    );
    assert!(
        metric(
            &metrics,
            "keybound_jwks_last_success_timestamp_seconds",
            &[]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        metric(&metrics, "keybound_jwks_refresh_failures_total", &[]),
        Some(0.0)
    );
    let count = |status: &str| {
        metric(
            &metrics,
            "keybound_jwks_requests_total",
            &[("status", status)],
        )
        .unwrap_or(-1.0)
    };
    assert!(count("200") >= 53.0, "{metrics}");
    assert_eq!(count("304"), 3.0, "{metrics}");
    assert_eq!(count("405"), 4.0, "{metrics}");
    assert_eq!(count("404"), 7.0, "{metrics}");

    // SIGTERM stops the listener with the agent: a clean exit, the port closed.
    agent.terminate();
    agent.assert_clean_exit();
    let addr = &url["http://".len()..url.len() - "/.well-known/jwks.json".len()];
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the JWKS listener is closed after the agent exits"
    );
}

/// A request the listener must not read a body from, or that is malformed: sent raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_jwks_refuses_bodies_and_oversized_heads() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    jwks_config(&token, "");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let url = jwks_url(&agent);
    first_document(&http_client(), &url).await;
    let addr = &url["http://".len()..url.len() - "/.well-known/jwks.json".len()];
    let exchange = async |request: Vec<u8>| -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(&request).await.expect("send");
        let mut answer = Vec::new();
        tokio::time::timeout(GUARD, s.read_to_end(&mut answer))
            .await
            .expect("the listener answers and closes")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    };
    let with_body =
        b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            .to_vec();
    let answer = exchange(with_body).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let mut huge = b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend(b"\r\n\r\n");
    let answer = exchange(huge).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "an oversized head is refused: {answer}"
    );
}

#[test]
fn a_jwks_listen_address_in_use_stops_the_start() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().unwrap().to_string();
    token.write_config(&config_text(&format!("[jwks]\nlisten = \"{addr}\""), ""));
    let dir = SocketDir::new();
    assert_serve_refuses(&token, &dir, &["jwks.listen", &addr, "in use"]);
    assert!(!dir.socket().exists(), "no socket left behind");
    // An address this machine does not have: the system's reason.
    token.write_config(&config_text("[jwks]\nlisten = \"192.0.2.1:8087\"", ""));
    assert_serve_refuses(&token, &dir, &["jwks.listen", "192.0.2.1:8087", "address"]);
    // Not an address at all: the config is refused, naming the key.
    token.write_config(&config_text("[jwks]\nlisten = \"localhost:8087\"", ""));
    assert_serve_refuses(&token, &dir, &["jwks.listen", "localhost:8087"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_jwks_outlives_the_device_and_says_it_is_stale() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    jwks_config(&token, "refresh_secs = 1");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let url = jwks_url(&agent);
    let http = http_client();
    let (etag, before) = check_document(first_document(&http, &url).await, 300).await;

    let tokens = token.path("tokens");
    let gone = token.path("tokens.gone");
    std::fs::rename(&tokens, &gone).expect("mv tokens tokens.gone");
    // Wait (bounded) for a refresh to fail: /healthz says so.
    let mut health = Value::Null;
    for _ in 0..200 {
        health = get(agent.socket(), "/healthz").await.json();
        if health["jwks"]["stale"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let restore = std::fs::rename(&gone, &tokens);
    eprintln!("/healthz while the device was away: {health}");
    assert_eq!(health["jwks"]["stale"], true, "{health}");
    assert!(
        health["jwks"]["last_error"].is_string(),
        "the reason is shown: {health}"
    );
    assert_eq!(health["jwks"]["keys"], 1, "{health}");
    // Meanwhile the listener still served the last good document, unchanged.
    let (still, served) = check_document(http.get(&url).send().await.unwrap(), 300).await;
    assert_eq!((still, served), (etag.clone(), before.clone()));
    let metrics = get(agent.socket(), "/metrics").await.text();
    assert!(
        metric(&metrics, "keybound_jwks_refresh_failures_total", &[]).unwrap() >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "keybound_jwks_published_keys", &[]),
        Some(1.0)
    );

    // The device back: the next refresh clears the stale flag.
    restore.expect("mv tokens.gone tokens");
    for _ in 0..200 {
        health = get(agent.socket(), "/healthz").await.json();
        if health["jwks"]["stale"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health["jwks"]["stale"], false, "{health}");
    let (after, _) = check_document(http.get(&url).send().await.unwrap(), 300).await;
    assert_eq!(after, etag, "the same keys, the same document");
}

/// `openssl` makes a CA and a server certificate for 127.0.0.1 signed by it, in `dir`.
/// Returns (ca.pem, server.pem, server.key).
fn make_certificates(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=keybound test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    chmod(&dir.join("server.key"), 0o600);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_jwks_over_tls_with_a_certificate_and_a_private_key_file() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let certs = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_certificates(certs.path());
    jwks_config(
        &token,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let url = jwks_url(&agent);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let https = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).expect("CA PEM"),
        )
        .timeout(GUARD)
        .build()
        .expect("https client");
    let (_, hosted) = check_document(first_document(&https, &url).await, 300).await;
    assert_eq!(hosted, by_kid(&token.jwks(&[])));
    // curl, a client that is not Rust, agrees on the certificate.
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--cacert"])
        .arg(&ca)
        .arg(&url)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {}", describe(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("curl got JSON");
    assert_eq!(by_kid(doc["keys"].as_array().unwrap()), hosted);
    // Plain HTTP on the TLS port is not served.
    let plain = http_client()
        .get(url.replacen("https://", "http://", 1))
        .send()
        .await;
    assert!(
        plain
            .as_ref()
            .map_or(true, |r| r.status() != StatusCode::OK),
        "{plain:?}"
    );
}

#[test]
fn a_tls_key_others_can_read_stops_the_start() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let certs = tempfile::tempdir().expect("tempdir");
    let (_, cert, key) = make_certificates(certs.path());
    jwks_config(
        &token,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            key.display()
        ),
    );
    let dir = SocketDir::new();
    chmod(&key, 0o644);
    let key_text = key.display().to_string();
    assert_serve_refuses(
        &token,
        &dir,
        &["jwks.tls_key", &key_text, "644", "chmod 600"],
    );
    chmod(&key, 0o640);
    assert_serve_refuses(&token, &dir, &["jwks.tls_key", &key_text, "640"]);
    // A symbolic link to the key is refused too: name the file itself.
    chmod(&key, 0o600);
    let link = certs.path().join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    jwks_config(
        &token,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert.display(),
            link.display()
        ),
    );
    assert_serve_refuses(&token, &dir, &["jwks.tls_key", "symbolic link"]);
    // Only one of the two: the config names the missing one.
    jwks_config(&token, &format!("tls_cert = \"{}\"", cert.display()));
    assert_serve_refuses(&token, &dir, &["jwks.tls_key", "missing"]);
}

/// One address cannot take every connection slot of the listener: past 8 open
/// connections from it, a new one is closed at once, while another address is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_jwks_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (token, _) = token_with_keys(&[("client-auth", "ES256")]);
    jwks_config(&token, "refresh_secs = 3600");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let url = jwks_url(&agent);
    first_document(&http_client(), &url).await;
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let connect_from = async |source: &str| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.expect("connect")
    };
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect_from("127.0.0.1").await);
    }
    // The ninth from the same address: closed without an answer.
    let mut ninth = connect_from("127.0.0.1").await;
    let _ = ninth
        .write_all(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(GUARD, ninth.read_to_end(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the ninth connection is closed: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.2").await;
    other
        .write_all(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(GUARD, other.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(idle);
}
