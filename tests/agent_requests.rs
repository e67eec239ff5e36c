//! Bad input: malformed, oversized, mistyped and fuzzed requests, and wrong methods, each
//! get a 4xx with a reason (or a verified answer), and the agent keeps serving.
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use agent_support::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncWriteExt as _;

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
