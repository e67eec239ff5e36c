//! Harness for the agent tests: `keybound serve` spawned from the built binary on a
//! per-test SoftHSM2 token ([`DevToken`]), its socket in a temp dir of its own, and a small
//! HTTP/1.1 client over that socket that keeps status, headers and body.
//!
//! * [`SocketDir`]: `<tmp>/keybound-agent-XXXX/run/agent.sock`; `run/` is the agent's to
//!   create (0700), so the tests see what the agent itself makes.
//! * [`Agent`]: the running agent, ready once it prints `keybound agent listening on`,
//!   SIGKILLed on drop (its stderr is printed when the test failed).
//! * [`Conn`], [`Reply`], [`raw_exchange`]: requests over the socket.
//! * [`curl_as`]: the same request from another uid, through `setpriv` or `runuser` + curl.
//! * [`check_proof`], [`check_assertion`]: every JWS the agent hands out, verified with the
//!   independent [`Verifier`] of `tests/support` against the published JWKS.
//! * [`DevServer`]: the dev-server on 127.0.0.1:0, in-process.
//! * [`metric`]: one sample of the Prometheus text.

// Each test uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::support::*;

/// How long a child may take to report ready or to exit before the test gives up. A guard
/// against hangs, never a measurement: nothing asserts on how long anything took.
pub const GUARD: Duration = Duration::from_secs(60);

/// The uid and gid of `nobody` on Debian: the "other user" of these tests.
pub const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// This process's uid (the owner of `/proc/self`): the agent's own uid in these tests.
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid()
}

/// The harness's default `[token]` and `[policy]`, then `sections` (`[[client]]` tables),
/// then `[agent]` with `agent_lines` (keys and `[[agent.allow]]` tables).
pub fn config_text(sections: &str, agent_lines: &str) -> String {
    format!(
        "{}\n{}\n[agent]\n{}\n",
        Config::default().render(),
        sections.trim(),
        agent_lines.trim()
    )
}

/// `[[agent.allow]]` for `uid` with the given extra lines (`keys = [...]`, ...).
pub fn allow_uid(uid: u32, lines: &str) -> String {
    format!("[[agent.allow]]\nuid = {uid}\n{}\n", lines.trim())
}

// ---------------------------------------------------------------------------
// Socket directory
// ---------------------------------------------------------------------------

/// A temp dir holding the agent's socket directory `run/` (not created here).
pub struct SocketDir {
    dir: TempDir,
}

impl SocketDir {
    pub fn new() -> SocketDir {
        SocketDir {
            dir: tempfile::Builder::new()
                .prefix("keybound-agent-")
                .tempdir()
                .expect("create socket tempdir"),
        }
    }

    /// The temp dir itself (0700, ours).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `<root>/run`: the directory the agent creates.
    pub fn run_dir(&self) -> PathBuf {
        self.root().join("run")
    }

    /// `<root>/run/agent.sock`.
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("agent.sock")
    }
}

/// `chmod <mode> <path>`.
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Permission bits and owner of `path` (not following a symlink).
pub fn mode_and_owner(path: &Path) -> (u32, u32) {
    let m =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid())
}

// ---------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------

/// `keybound serve --socket <path>` on a [`DevToken`] ([`Agent::start`]) or from a command
/// prepared by the test ([`Agent::start_command`], e.g. against a TPM).
pub struct Agent {
    child: Child,
    socket: PathBuf,
    /// Everything the agent wrote to stderr so far.
    log: Arc<Mutex<String>>,
    /// Fires once when the ready line appears; disconnects at EOF on stderr.
    ready: mpsc::Receiver<()>,
}

impl Agent {
    /// Starts the agent and waits for its ready line.
    pub fn start(token: &DevToken, socket: &Path) -> Agent {
        let agent = Agent::spawn(token, socket);
        agent.wait_ready();
        agent
    }

    /// Starts the agent without waiting.
    pub fn spawn(token: &DevToken, socket: &Path) -> Agent {
        Agent::spawn_command(
            token.command(&[OsArg::from("serve"), "--socket".into(), socket.into()]),
            socket,
        )
    }

    /// Starts `cmd`, a `keybound serve --socket <socket>` prepared by the caller (any
    /// backend: its config, environment and working directory are the caller's), and
    /// waits for its ready line.
    pub fn start_command(cmd: Command, socket: &Path) -> Agent {
        let agent = Agent::spawn_command(cmd, socket);
        agent.wait_ready();
        agent
    }

    /// Starts `cmd` (see [`Agent::start_command`]) without waiting.
    pub fn spawn_command(mut cmd: Command, socket: &Path) -> Agent {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keybound serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        let ready_line = format!("keybound agent listening on {}", socket.display());
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line == ready_line {
                    let _ = ready_tx.send(());
                }
                let mut log = sink.lock().unwrap_or_else(PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
        });
        Agent {
            child,
            socket: socket.to_path_buf(),
            log,
            ready,
        }
    }

    pub fn wait_ready(&self) {
        match self.ready.recv_timeout(GUARD) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("keybound serve exited before it was ready:\n{}", self.log())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "keybound serve printed no ready line within {GUARD:?}:\n{}",
                self.log()
            ),
        }
        assert!(
            self.socket.exists(),
            "ready line printed, but {} does not exist",
            self.socket.display()
        );
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sends SIGTERM (through kill(1): the crate has no libc binding to borrow).
    pub fn terminate(&self) {
        signal(self.pid(), "TERM");
    }

    /// Waits for the agent to exit (SIGKILL and panic after [`GUARD`]).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for keybound serve") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "keybound serve did not exit within {GUARD:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Still running?
    /// Waits for the exit after SIGTERM: status 0, the socket removed, the stop logged,
    /// nothing panicked.
    pub fn assert_clean_exit(&mut self) {
        let status = self.wait();
        let log = self.log();
        assert_eq!(status.code(), Some(0), "exit status 0:\n{log}");
        assert!(!self.socket.exists(), "the socket file is removed on exit");
        assert!(log.contains("keybound agent stopped"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    pub fn running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("poll keybound serve")
            .is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- keybound serve (pid {}) stderr ---\n{}",
                self.child.id(),
                self.log()
            );
        }
    }
}

/// An argument for [`DevToken::command`], which takes one type for all.
pub type OsArg = std::ffi::OsString;

/// Sends `sig` (`"TERM"`, `"INT"`, `"KILL"`) to `pid` through the kill(2) system call, so
/// the tests need no `kill` program (procps) on the machine.
pub fn signal(pid: u32, sig: &str) {
    crate::support::send_signal(pid, sig);
}

/// Runs `cmd` to completion (a `keybound serve` expected to fail at start); SIGKILLs it and
/// panics if it is still running after [`GUARD`].
pub fn output_with_guard(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(GUARD) {
        Ok(out) => out.expect("wait for the child"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("{cmd:?} still running after {GUARD:?}; expected it to fail at start");
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP over the socket
// ---------------------------------------------------------------------------

/// One answer, read in full.
#[derive(Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.status, self.headers, self.text())
    }
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("agent answered non-JSON ({e}): {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` as whole seconds (the only form the agent sends).
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("Retry-After is not delay-seconds: {v:?}"))
        })
    }

    /// 200 with a JSON body; returns it.
    pub fn ok(&self, what: &str) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{what}: {self:?}");
        assert_json_content_type(self, what);
        self.json()
    }

    /// The string member `name` of a 200 JSON answer.
    pub fn ok_member(&self, what: &str, name: &str) -> String {
        let body = self.ok(what);
        assert_members(&body, &[name]);
        body[name]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {name} is a string: {body}"))
            .to_owned()
    }

    /// The error contract: `status`, JSON with exactly `error` and `message`, `error` equal
    /// to `code`, a message naming every one of `mentions`. Returns the message.
    pub fn error(&self, status: u16, code: &str, mentions: &[&str]) -> String {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_json_content_type(self, "an error answer");
        let body = self.json();
        assert_members(&body, &["error", "message"]);
        assert_eq!(body["error"], code, "{self:?}");
        let message = body["message"].as_str().expect("message is a string");
        assert!(!message.trim().is_empty(), "empty message: {self:?}");
        assert_mentions(message, mentions);
        message.to_owned()
    }
}

fn assert_json_content_type(reply: &Reply, what: &str) {
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{what}: {reply:?}"
    );
}

/// One keep-alive HTTP/1.1 connection to the agent.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(socket: &Path) -> Conn {
        Conn::try_open(socket)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
    }

    pub async fn try_open(socket: &Path) -> Result<Conn, String> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            // Ends when either side closes; errors then are the test's to see on `send`.
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Reply {
        self.send_bytes(Method::POST, path, body.to_string().into_bytes())
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send_bytes(Method::GET, path, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Any method, any bytes; transport errors returned, not panicked on.
    pub async fn send_bytes(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "keybound")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// `POST path` on a fresh connection.
pub async fn post(socket: &Path, path: &str, body: &Value) -> Reply {
    Conn::open(socket).await.post(path, body).await
}

/// `GET path` on a fresh connection.
pub async fn get(socket: &Path, path: &str) -> Reply {
    Conn::open(socket).await.get(path).await
}

/// Writes `request` (a whole HTTP/1.1 request, normally with `Connection: close`) and
/// reads until the agent closes the connection; the answer parsed by hand.
pub async fn raw_exchange(socket: &Path, request: &[u8]) -> Reply {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    read_reply(&mut stream).await
}

/// Reads one answer until EOF and parses it (`Content-Length` or close-delimited body).
pub async fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .await
        .expect("read the answer");
    parse_reply(&bytes)
}

pub fn parse_reply(bytes: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete HTTP answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let code: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes()).expect("header name"),
            value.trim().parse().expect("header value"),
        );
    }
    let body = match headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        Some(n) => body.as_bytes()[..n].to_vec(),
        None => body.as_bytes().to_vec(),
    };
    Reply {
        status: StatusCode::from_u16(code).expect("status code"),
        headers,
        body: Bytes::from(body),
    }
}

// ---------------------------------------------------------------------------
// Another uid: curl through setpriv / runuser
// ---------------------------------------------------------------------------

/// How to become another user.
#[derive(Clone, Copy, Debug)]
pub enum As {
    /// `setpriv --reuid --regid --clear-groups`: any uid/gid pair.
    Setpriv { uid: u32, gid: u32 },
    /// `runuser -u nobody --`.
    RunuserNobody,
    /// `setpriv --reuid --regid --groups`: a uid/gid pair with one supplementary group.
    SetprivInGroup { uid: u32, gid: u32, group: u32 },
}

impl As {
    /// The command prefix that runs what follows as this user.
    pub fn command(self) -> Command {
        match self {
            As::Setpriv { uid, gid } => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--");
                c
            }
            As::SetprivInGroup { uid, gid, group } => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg(format!("--groups={group}"))
                    .arg("--");
                c
            }
            As::RunuserNobody => {
                let mut c = Command::new("runuser");
                c.args(["-u", "nobody", "--"]);
                c
            }
        }
    }
}

/// What curl got: its exit code, the HTTP status (0 when none) and the body.
#[derive(Debug)]
pub struct CurlReply {
    pub exit: Option<i32>,
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

impl CurlReply {
    /// No HTTP answer at all: the agent closed the connection as soon as it accepted it
    /// (curl: 7 could not connect, 52 empty reply, 56 connection reset).
    pub fn assert_closed(&self) {
        assert!(
            self.status == 0 && matches!(self.exit, Some(7 | 52 | 56)),
            "the agent closes the connection without answering: {self:?}"
        );
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("curl got non-JSON ({e}): {self:?}"))
    }

    /// An error answer: `status`, `error` = `code`, a message naming `mentions`.
    pub fn error(&self, status: u16, code: &str, mentions: &[&str]) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_members(&body, &["error", "message"]);
        assert_eq!(body["error"], code, "{self:?}");
        let message = body["message"].as_str().expect("message").to_owned();
        assert_mentions(&message, mentions);
        message
    }
}

/// `curl --unix-socket <socket> -X POST http://keybound<path> -d <body>` as another user.
pub fn curl_as(who: As, socket: &Path, path: &str, body: &Value) -> CurlReply {
    let mut cmd = who.command();
    cmd.arg("curl")
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(socket)
        .args(["-H", "content-type: application/json"])
        .args(["-w", "\n%{http_code}", "-X", "POST"])
        .arg(format!("http://keybound{path}"))
        .arg("--data-binary")
        .arg(body.to_string())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir("/");
    let out = output_with_guard(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    CurlReply {
        exit: out.status.code(),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// Checking what the agent signed
// ---------------------------------------------------------------------------

/// The JWKS entries by kid.
pub fn by_kid(keys: &[Value]) -> BTreeMap<String, Value> {
    keys.iter()
        .map(|k| {
            (
                k["kid"].as_str().expect("kid is a string").to_owned(),
                k.clone(),
            )
        })
        .collect()
}

/// What a DPoP proof must say.
#[derive(Clone, Debug)]
pub struct WantProof {
    /// The kid (RFC 7638 thumbprint) of the key that must have signed it.
    pub kid: String,
    pub htm: String,
    /// The normalised `htu`, written out by the test.
    pub htu: String,
    pub nonce: Option<String>,
    pub access_token: Option<String>,
}

/// RFC 9449 §4.2 checks on `compact`, signature verified with the JWKS entry of `want.kid`
/// (not with the key in the proof's own header). `window` bounds `iat` (unix seconds).
pub fn check_proof(
    jwks: &BTreeMap<String, Value>,
    compact: &str,
    want: &WantProof,
    window: (i64, i64),
) -> Jws {
    let jws = Jws::parse(compact);
    let jwk = jwks
        .get(&want.kid)
        .unwrap_or_else(|| panic!("kid {} is not in the JWKS {jwks:?}", want.kid));
    assert_members(&jws.header, &["typ", "alg", "jwk"]);
    assert_eq!(jws.header["typ"], "dpop+jwt", "{}", jws.header);
    assert_eq!(
        jws.header["jwk"],
        required_public_members(jwk),
        "the proof's jwk is exactly the public key of {}",
        want.kid
    );
    assert_eq!(jwk_thumbprint(&jws.header["jwk"]), want.kid);
    assert_verifies(jwk, &jws);

    let mut members = vec!["jti", "htm", "htu", "iat"];
    if want.nonce.is_some() {
        members.push("nonce");
    }
    if want.access_token.is_some() {
        members.push("ath");
    }
    assert_members(&jws.claims, &members);
    assert_eq!(jws.claims["htm"], want.htm.as_str(), "{}", jws.claims);
    assert_eq!(jws.claims["htu"], want.htu.as_str(), "{}", jws.claims);
    if let Some(nonce) = &want.nonce {
        assert_eq!(jws.claims["nonce"], nonce.as_str());
    }
    if let Some(token) = &want.access_token {
        assert_eq!(
            jws.claims["ath"],
            b64(&Sha256::digest(token.as_bytes())),
            "ath is base64url(SHA-256(access token)) (RFC 9449 §4.2)"
        );
    }
    check_iat_and_jti(&jws.claims, window);
    jws
}

/// `htm`/`htu` as a caller may send them, and as a proof must carry them (RFC 9449 §4.2:
/// method in upper case, URI without query and fragment, scheme and host lowercased,
/// default port dropped, empty path as "/").
pub const HTU_CASES: [(&str, &str, &str, &str); 4] = [
    (
        "post",
        "https://Resource.Example.org:443/token?x=1#f",
        "POST",
        "https://resource.example.org/token",
    ),
    (
        "GET",
        "HTTPS://o.example/api/v1/users?limit=3",
        "GET",
        "https://o.example/api/v1/users",
    ),
    (
        "PATCH",
        "http://127.0.0.1:8080/api/v1/users/00u1",
        "PATCH",
        "http://127.0.0.1:8080/api/v1/users/00u1",
    ),
    ("get", "https://a.example", "GET", "https://a.example/"),
];

/// The agent's `/v1/jwks` by kid, after checking each entry's shape and that it equals
/// `cli`, what `keybound jwks` printed for the same config.
pub async fn served_jwks(agent: &Agent, cli: &[Value]) -> BTreeMap<String, Value> {
    let body = get(agent.socket(), "/v1/jwks").await.ok("GET /v1/jwks");
    assert_members(&body, &["keys"]);
    let keys = body["keys"].as_array().expect("keys is an array");
    for key in keys {
        assert_jwks_entry(key, key["alg"].as_str().expect("alg"));
    }
    let served = by_kid(keys);
    assert_eq!(
        served,
        by_kid(cli),
        "GET /v1/jwks and `keybound jwks` publish the same keys"
    );
    served
}

/// `{key, htm, htu}`: a `/v1/dpop` request.
pub fn dpop_request(key: &str, htm: &str, htu: &str) -> Value {
    serde_json::json!({ "key": key, "htm": htm, "htu": htu })
}

/// A proof from `kid` for `htm`/`htu` as the proof must carry them, without nonce or `ath`.
pub fn want_proof(kid: &str, htm: &str, htu: &str) -> WantProof {
    WantProof {
        kid: kid.to_owned(),
        htm: htm.to_owned(),
        htu: htu.to_owned(),
        nonce: None,
        access_token: None,
    }
}

/// Request `n` as a DPoP proof with `key` (`kid`): `htm`/`htu` from [`HTU_CASES`], with a
/// nonce and an access token to bind when asked.
pub fn proof_job(n: usize, key: &str, kid: &str, nonce: bool, access_token: bool) -> Job {
    let (htm, htu, want_htm, want_htu) = HTU_CASES[n % HTU_CASES.len()];
    let mut request = dpop_request(key, htm, htu);
    let mut want = want_proof(kid, want_htm, want_htu);
    if nonce {
        let nonce = format!("nonce-{n}");
        request["nonce"] = nonce.clone().into();
        want.nonce = Some(nonce);
    }
    if access_token {
        let token = format!("eyJ.access-token-{n}.sig");
        request["access_token"] = token.clone().into();
        want.access_token = Some(token);
    }
    Job::Proof(request, want)
}

/// Request `n` as a client assertion by `key` (`kid`) for `audience`, with `lifetime`
/// asked for or left to the default (60 s).
pub fn assertion_job(n: usize, key: &str, kid: &str, audience: &str, lifetime: Option<i64>) -> Job {
    let client_id = format!("0oa-agent-{n}");
    let mut request =
        serde_json::json!({ "key": key, "client_id": client_id, "audience": audience });
    if let Some(l) = lifetime {
        request["lifetime"] = l.into();
    }
    Job::Assertion {
        request,
        kid: kid.to_owned(),
        client_id,
        audience: audience.to_owned(),
        lifetime: lifetime.unwrap_or(60),
    }
}

/// A request a test client makes, and what the answer must be.
pub enum Job {
    Proof(Value, WantProof),
    Assertion {
        request: Value,
        kid: String,
        client_id: String,
        audience: String,
        lifetime: i64,
    },
}

impl Job {
    /// The key label the request names.
    pub fn key(&self) -> &str {
        match self {
            Job::Proof(request, _) | Job::Assertion { request, .. } => {
                request["key"].as_str().expect("key")
            }
        }
    }
}

/// `clients` keep-alive connections at once, each sending `per_client` requests: request
/// `n` is `job(n)`. Every request with its answer.
pub async fn run_jobs(
    socket: &Path,
    clients: usize,
    per_client: usize,
    job: impl Fn(usize) -> Job + Send + Sync + 'static,
) -> Vec<(Job, Reply)> {
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (socket, job) = (socket.to_path_buf(), Arc::clone(&job));
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&socket).await;
            let mut answers = Vec::new();
            for i in 0..per_client {
                let job = job(c * per_client + i);
                let reply = match &job {
                    Job::Proof(request, _) => conn.post("/v1/dpop", request).await,
                    Job::Assertion { request, .. } => conn.post("/v1/assertion", request).await,
                };
                answers.push((job, reply));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.expect("client task"));
    }
    answers
}

/// `reply` must be a 200 whose proof or assertion [`check_proof`] or [`check_assertion`]
/// accepts for `job`; returns it parsed.
pub fn check_job(
    jwks: &BTreeMap<String, Value>,
    job: &Job,
    reply: &Reply,
    window: (i64, i64),
) -> Jws {
    match job {
        Job::Proof(request, want) => {
            let proof = reply.ok_member(&format!("POST /v1/dpop {request}"), "proof");
            check_proof(jwks, &proof, want, window)
        }
        Job::Assertion {
            request,
            kid,
            client_id,
            audience,
            lifetime,
        } => {
            let assertion = reply.ok_member(&format!("POST /v1/assertion {request}"), "assertion");
            check_assertion(
                jwks, &assertion, kid, client_id, audience, *lifetime, window,
            )
        }
    }
}

/// RFC 7523 §3 checks on `compact`, verified with the JWKS entry of `kid`.
pub fn check_assertion(
    jwks: &BTreeMap<String, Value>,
    compact: &str,
    kid: &str,
    client_id: &str,
    audience: &str,
    lifetime: i64,
    window: (i64, i64),
) -> Jws {
    let jws = Jws::parse(compact);
    let jwk = jwks
        .get(kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS {jwks:?}"));
    assert_members(&jws.header, &["typ", "alg", "kid"]);
    assert_eq!(jws.header["typ"], "JWT");
    assert_eq!(jws.header["kid"], kid);
    assert_verifies(jwk, &jws);
    assert_members(&jws.claims, &["iss", "sub", "aud", "iat", "exp", "jti"]);
    assert_eq!(jws.claims["iss"], client_id);
    assert_eq!(jws.claims["sub"], client_id);
    assert_eq!(jws.claims["aud"], audience);
    assert_eq!(
        int_claim(&jws.claims, "exp") - int_claim(&jws.claims, "iat"),
        lifetime,
        "{}",
        jws.claims
    );
    check_iat_and_jti(&jws.claims, window);
    jws
}

fn check_iat_and_jti(claims: &Value, (from, to): (i64, i64)) {
    let iat = int_claim(claims, "iat");
    assert!(
        (from..=to).contains(&iat),
        "iat {iat} is outside the test's run [{from}, {to}]: {claims}"
    );
    let jti = claims["jti"].as_str().expect("jti is a string");
    assert!(
        jti.len() >= 16 && is_base64url(jti),
        "jti is a random base64url string: {jti:?}"
    );
}

/// `(now - 1, ...)`: the lower end of an `iat` window; close it with [`window_end`].
pub fn window_start() -> i64 {
    unix_now() - 1
}

pub fn window_end(start: i64) -> (i64, i64) {
    (start, unix_now() + 1)
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// The value of the sample `name{labels}` (labels exactly these, in any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, got) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let mut got: Vec<String> = if got.is_empty() {
                Vec::new()
            } else {
                got.split(',').map(str::to_owned).collect()
            };
            got.sort();
            (got == want).then(|| value.parse().expect("sample value is a number"))
        })
}

/// Every sample line of `name` (labels included), for messages.
pub fn samples(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        })
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// The dev-server, in-process
// ---------------------------------------------------------------------------

/// The dev-server (`keybound-devserver`) on 127.0.0.1:0, on a thread and runtime of its
/// own; stopped on drop.
pub struct DevServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _server: keybound_devserver::Background,
}

impl DevServer {
    /// A dev-server that knows the client `client_id` by the JWKS file `jwks`.
    pub fn start(client_id: &str, jwks: &Path) -> DevServer {
        DevServer::start_with(client_id, jwks, |_| {})
    }

    /// `start` with settings changed by `adjust` (a clock offset).
    pub fn start_with(
        client_id: &str,
        jwks: &Path,
        adjust: impl FnOnce(&mut keybound_devserver::Settings),
    ) -> DevServer {
        let mut settings = keybound_devserver::Settings::new(
            client_id,
            keybound_devserver::JwksSource::File(jwks.to_owned()),
        );
        adjust(&mut settings);
        let server = keybound_devserver::Background::start(0, settings)
            .unwrap_or_else(|e| panic!("the dev-server did not start: {e}"));
        DevServer {
            base: server.base().to_owned(),
            _server: server,
        }
    }
}
