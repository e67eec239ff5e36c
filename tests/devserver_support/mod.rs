//! Harness for the dev-server tests.
//!
//! * [`Hsm`]: a throwaway SoftHSM2 token (own tempdir, `softhsm2.conf`, `keybound.toml`),
//!   driven only through the real `keybound` binary: keys, JWKS, assertions, DPoP proofs.
//! * [`SoftKey`]: a software P-256 key for the assertions the CLI refuses to make (expired,
//!   too long-lived, `iat` in the future).
//! * [`Server`]: `keybound_devserver` in-process on 127.0.0.1:0, stopped through a oneshot.
//! * [`Reply`]: an HTTP response read once (status, headers, JSON body) with the assertions
//!   the tests share; [`Jwt`] and [`thumbprint`] to look inside tokens independently.

// Each test uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keybound_devserver::{DevServer, Endpoints, Settings};
use p256::ecdsa::signature::Signer as _;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const CLIENT_ID: &str = "0oa-devserver-test";
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const READ: &str = "okta.users.read";
pub const MANAGE: &str = "okta.users.manage";
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN_LABEL: &str = "devserver-test";
const SO_PIN: &str = "87654321";
const USER_PIN: &str = "123456";

// ---------------------------------------------------------------------------
// SoftHSM2 token + keybound binary
// ---------------------------------------------------------------------------

/// A freshly initialised SoftHSM2 token only this test uses.
pub struct Hsm {
    dir: TempDir,
}

impl Hsm {
    pub fn new() -> Hsm {
        let dir = tempfile::Builder::new()
            .prefix("keybound-devserver-")
            .tempdir()
            .expect("create tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("create token dir");
        std::fs::create_dir(dir.path().join("cwd")).expect("create cwd");
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        std::fs::write(
            dir.path().join("keybound.toml"),
            format!(
                "[token]\nbackend = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{TOKEN_LABEL}\"\n"
            ),
        )
        .expect("write keybound.toml");
        let hsm = Hsm { dir };
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN_LABEL])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .env("SOFTHSM2_CONF", hsm.path("softhsm2.conf"))
            .output()
            .expect("run softhsm2-util (is softhsm2 installed?)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        hsm
    }

    /// A token with the two ES256 keys of a keybound client: `client-auth` and `dpop`.
    pub fn with_client_keys() -> Hsm {
        let hsm = Hsm::new();
        hsm.generate("client-auth", "ES256");
        hsm.generate("dpop", "ES256");
        hsm
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `keybound <args>` against this token. The PIN and config reach the child through
    /// its environment only.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybound"));
        cmd.args(args)
            .current_dir(self.path("cwd"))
            .env("SOFTHSM2_CONF", self.path("softhsm2.conf"))
            .env("KEYBOUND_CONFIG", self.path("keybound.toml"))
            .env("KEYBOUND_PIN", USER_PIN)
            .env("HOME", self.dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("RUST_LOG");
        cmd
    }

    /// Runs `keybound <args>`, asserts success, returns stdout without the final newline.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("spawn keybound");
        let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
        assert!(
            out.status.success(),
            "keybound {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.trim_end().to_string()
    }

    pub fn generate(&self, label: &str, alg: &str) {
        self.run(&["keys", "generate", "--label", label, "--alg", alg]);
    }

    /// The JWKS entry `keybound jwks --label <label>` prints.
    pub fn jwk(&self, label: &str) -> Value {
        let doc: Value =
            serde_json::from_str(&self.run(&["jwks", "--label", label])).expect("jwks JSON");
        doc["keys"][0].clone()
    }

    /// `keybound jwks --label ...` written to `jwks.json`: the client's registered keys.
    pub fn write_jwks(&self, labels: &[&str]) -> PathBuf {
        let mut args = vec!["jwks"];
        for label in labels {
            args.extend(["--label", label]);
        }
        let path = self.path("jwks.json");
        std::fs::write(&path, self.run(&args)).expect("write jwks.json");
        path
    }

    /// A client assertion for [`CLIENT_ID`] signed by `key` (default lifetime, 60 s).
    pub fn assertion(&self, key: &str, audience: &str) -> String {
        self.run(&[
            "assertion",
            "--key",
            key,
            "--client-id",
            CLIENT_ID,
            "--audience",
            audience,
        ])
    }

    /// A DPoP proof signed by `key`; `access_token` is bound through `ath`.
    pub fn dpop(
        &self,
        key: &str,
        method: &str,
        url: &str,
        nonce: Option<&str>,
        access_token: Option<&str>,
    ) -> String {
        let mut args = vec!["dpop", "--key", key, "--method", method, "--url", url];
        // `--nonce=N`, not `--nonce N`: a base64url nonce may start with '-', which clap
        // would take for a flag.
        let nonce = nonce.map(|n| format!("--nonce={n}"));
        if let Some(nonce) = &nonce {
            args.push(nonce);
        }
        let token_file = self.path("access-token");
        let token_file = token_file.to_str().expect("UTF-8 tempdir");
        if let Some(token) = access_token {
            std::fs::write(token_file, token).expect("write access token file");
            args.extend(["--access-token-file", token_file]);
        }
        self.run(&args)
    }
}

// ---------------------------------------------------------------------------
// Software key for hand-made assertions
// ---------------------------------------------------------------------------

/// A software P-256 key, registered in a JWKS file the test writes itself.
pub struct SoftKey {
    key: p256::ecdsa::SigningKey,
    pub kid: String,
}

impl SoftKey {
    pub fn new(kid: &str) -> SoftKey {
        SoftKey {
            key: p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
            kid: kid.into(),
        }
    }

    /// The JWKS entry: `kty crv x y kid alg use`.
    pub fn jwk(&self) -> Value {
        let point = self.key.verifying_key().to_encoded_point(false);
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": b64(point.x().expect("x")),
            "y": b64(point.y().expect("y")),
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        })
    }

    /// A compact ES256 JWS over `header` and `claims`.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature: p256::ecdsa::Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", b64(&signature.to_bytes()))
    }

    /// A client assertion for [`CLIENT_ID`] with the given times and a fresh `jti`.
    pub fn assertion(&self, audience: &str, iat: i64, exp: i64) -> String {
        self.sign(
            &json!({ "typ": "JWT", "alg": "ES256", "kid": self.kid }),
            &json!({
                "iss": CLIENT_ID, "sub": CLIENT_ID, "aud": audience,
                "iat": iat, "exp": exp, "jti": random_id(),
            }),
        )
    }
}

/// Writes `{"keys": [...]}` to `dir/name`.
pub fn write_jwks(dir: &Path, name: &str, keys: &[Value]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write JWKS");
    path
}

// ---------------------------------------------------------------------------
// The dev-server in-process
// ---------------------------------------------------------------------------

/// A dev-server on 127.0.0.1:0, shut down when dropped (or by [`Server::stop`]).
pub struct Server {
    pub endpoints: Endpoints,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), keybound_devserver::DevServerError>>>,
}

impl Server {
    pub async fn start(settings: Settings) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let server = DevServer::new(listener, settings)
            .await
            .expect("dev-server starts");
        let endpoints = server.endpoints().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async {
            let _ = rx.await;
        }));
        Server {
            endpoints,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `issuer` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoints.issuer)
    }

    /// Stops the server and checks that it ended cleanly.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task joins")
                .expect("server ends without error");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// A reqwest client for 127.0.0.1: no proxy, no redirects.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

/// A token request: client credentials with a client assertion, the proof if any.
pub async fn post_token(
    http: &reqwest::Client,
    server: &Server,
    assertion: &str,
    proof: Option<&str>,
    scope: &str,
) -> Reply {
    let form = [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", assertion),
        ("scope", scope),
    ];
    post_form(http, server, &form, proof).await
}

/// A form POST to the token endpoint, the proof if any.
pub async fn post_form(
    http: &reqwest::Client,
    server: &Server,
    form: &[(&str, &str)],
    proof: Option<&str>,
) -> Reply {
    let body = serde_urlencoded::to_string(form).expect("form");
    let mut request = http
        .post(&server.endpoints.token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(proof) = proof {
        request = request.header("DPoP", proof);
    }
    Reply::read(request.send().await.expect("token request")).await
}

/// `GET url`, asserting 200 and a JSON body.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let reply = Reply::read(http.get(url).send().await.expect("GET")).await;
    assert_eq!(reply.status, 200, "GET {url}: {reply:?}");
    reply.body
}

/// An API request with `Authorization: DPoP <token>` and the proof.
pub async fn call_api(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    access_token: &str,
    proof: &str,
    body: Option<&str>,
) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = http
        .request(method, url)
        .header("Authorization", format!("DPoP {access_token}"))
        .header("DPoP", proof);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    Reply::read(request.send().await.expect("API request")).await
}

/// A response read once: status, headers, body as JSON (`Null` when it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("response body");
        Reply {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// Every value of a repeated header, in order.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII header").to_string())
            .collect()
    }

    /// The `DPoP-Nonce` header, which every token-endpoint and API response carries.
    pub fn nonce(&self) -> String {
        self.header("dpop-nonce")
            .unwrap_or_else(|| panic!("no DPoP-Nonce header: {self:?}"))
            .to_string()
    }

    /// An RFC 6749 §5.2 error: status, `error`, and a fragment of `error_description`.
    pub fn assert_oauth_error(&self, status: u16, error: &str, description_contains: &str) {
        assert_eq!(self.status, status, "status of {self:?}");
        assert_eq!(self.body["error"], error, "{self:?}");
        let description = self.body["error_description"]
            .as_str()
            .unwrap_or_else(|| panic!("no error_description: {self:?}"));
        assert!(
            description.contains(description_contains),
            "error_description {description:?} lacks {description_contains:?}"
        );
        assert_eq!(self.header("cache-control"), Some("no-store"), "{self:?}");
        self.nonce();
    }

    /// An Okta API error: status, `errorCode`, the full body shape and `DPoP-Nonce`.
    pub fn assert_okta_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "status of {self:?}");
        let mut members: Vec<&str> = self
            .body
            .as_object()
            .unwrap_or_else(|| panic!("Okta error body is an object: {self:?}"))
            .keys()
            .map(String::as_str)
            .collect();
        members.sort_unstable();
        assert_eq!(
            members,
            [
                "errorCauses",
                "errorCode",
                "errorId",
                "errorLink",
                "errorSummary"
            ]
        );
        assert_eq!(self.body["errorCode"], code, "{self:?}");
        assert_eq!(self.body["errorLink"], code, "{self:?}");
        assert!(
            self.body["errorId"]
                .as_str()
                .is_some_and(|id| id.starts_with("oae")),
            "{self:?}"
        );
        assert_eq!(self.body["errorCauses"], json!([]));
        self.nonce();
    }

    /// An Okta API error with a `WWW-Authenticate: DPoP error="<error>", ...` challenge whose
    /// description contains `description_contains`.
    pub fn assert_dpop_challenge(
        &self,
        status: u16,
        code: &str,
        error: &str,
        description_contains: &str,
    ) {
        self.assert_okta_error(status, code);
        let challenge = self.www_authenticate();
        let prefix = format!("DPoP error=\"{error}\", error_description=\"");
        assert!(challenge.starts_with(&prefix), "{challenge}");
        assert!(
            challenge.contains(description_contains),
            "{challenge} lacks {description_contains:?}"
        );
    }

    pub fn www_authenticate(&self) -> &str {
        self.header("www-authenticate")
            .unwrap_or_else(|| panic!("no WWW-Authenticate: {self:?}"))
    }
}

// ---------------------------------------------------------------------------
// JOSE, independently of keybound and of the dev-server
// ---------------------------------------------------------------------------

/// A compact JWS split into its parts.
pub struct Jwt {
    pub header: Value,
    pub claims: Value,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

impl Jwt {
    pub fn decode(compact: &str) -> Jwt {
        let parts: Vec<&str> = compact.split('.').collect();
        assert_eq!(parts.len(), 3, "compact JWS: {compact}");
        let json = |part: &str| -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url"))
                .expect("JSON part")
        };
        Jwt {
            header: json(parts[0]),
            claims: json(parts[1]),
            signing_input: format!("{}.{}", parts[0], parts[1]),
            signature: URL_SAFE_NO_PAD
                .decode(parts[2])
                .expect("base64url signature"),
        }
    }

    /// Verifies an ES256 signature with the P-256 key in `jwk` (p256, raw r||s).
    pub fn verify_es256(&self, jwk: &Value) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        let mut point = vec![0x04];
        point.extend(b64_decode(jwk["x"].as_str().expect("x")));
        point.extend(b64_decode(jwk["y"].as_str().expect("y")));
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("P-256 point");
        p256::ecdsa::Signature::from_slice(&self.signature)
            .is_ok_and(|sig| key.verify(self.signing_input.as_bytes(), &sig).is_ok())
    }
}

/// RFC 7638 thumbprint of an EC or RSA JWK, built by hand (the shared test harness's).
pub use crate::support::jwk_thumbprint as thumbprint;

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64_decode(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url")
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// 128 random bits, base64url: a jti.
pub fn random_id() -> String {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut bytes);
    b64(&bytes)
}

// ---------------------------------------------------------------------------
// A client's JWKS URL
// ---------------------------------------------------------------------------

/// A client's JWKS URL on 127.0.0.1:0 that the test controls: the keys, the
/// `Cache-Control` header, whether it sends an `ETag` (and answers 304 to a matching
/// `If-None-Match`), whether it is up (503 when not). It counts what it answered.
pub struct JwksHost {
    pub url: url::Url,
    state: std::sync::Arc<std::sync::Mutex<HostState>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct HostState {
    keys: Vec<Value>,
    /// Bumped with every change of `keys`: the ETag is `"v<version>"`.
    version: u32,
    cache_control: Option<String>,
    etag: bool,
    down: bool,
    /// Sent with the 503s while down.
    retry_after: Option<u32>,
    /// Up once this many 503s were answered.
    up_after_failed: Option<usize>,
    counts: HostCounts,
}

/// What a [`JwksHost`] answered so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCounts {
    /// 200 with the JWKS.
    pub served: usize,
    /// 304 to a matching `If-None-Match`.
    pub not_modified: usize,
    /// 503 while down.
    pub failed: usize,
    /// Every `If-None-Match` received, in order.
    pub if_none_match: Vec<String>,
}

impl JwksHost {
    pub async fn start(keys: &[Value], cache_control: Option<&str>, etag: bool) -> JwksHost {
        use axum::http::{HeaderMap, StatusCode, header};
        use axum::response::IntoResponse as _;
        let state = std::sync::Arc::new(std::sync::Mutex::new(HostState {
            keys: keys.to_vec(),
            version: 1,
            cache_control: cache_control.map(str::to_owned),
            etag,
            ..HostState::default()
        }));
        let app = {
            let state = state.clone();
            axum::Router::new().route(
                "/jwks",
                axum::routing::get(move |headers: HeaderMap| async move {
                    let mut s = state.lock().expect("lock");
                    let inm = headers
                        .get(header::IF_NONE_MATCH)
                        .map(|v| v.to_str().expect("ASCII If-None-Match").to_string());
                    s.counts.if_none_match.extend(inm.clone());
                    if s.up_after_failed.is_some_and(|n| s.counts.failed >= n) {
                        s.down = false;
                    }
                    if s.down {
                        s.counts.failed += 1;
                        let mut reply = HeaderMap::new();
                        if let Some(secs) = s.retry_after {
                            reply.insert(header::RETRY_AFTER, secs.into());
                        }
                        return (StatusCode::SERVICE_UNAVAILABLE, reply).into_response();
                    }
                    let etag = format!("\"v{}\"", s.version);
                    let mut reply = HeaderMap::new();
                    if let Some(cc) = &s.cache_control {
                        reply.insert(header::CACHE_CONTROL, cc.parse().expect("Cache-Control"));
                    }
                    if s.etag {
                        reply.insert(header::ETAG, etag.parse().expect("ETag"));
                        if inm.as_deref() == Some(etag.as_str()) {
                            s.counts.not_modified += 1;
                            return (StatusCode::NOT_MODIFIED, reply).into_response();
                        }
                    }
                    s.counts.served += 1;
                    (reply, axum::Json(json!({ "keys": s.keys }))).into_response()
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        JwksHost {
            url: url::Url::parse(&url).expect("URL"),
            state,
            task,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HostState) -> T) -> T {
        f(&mut self.state.lock().expect("lock"))
    }

    /// Publishes these keys (a new ETag).
    pub fn set_keys(&self, keys: &[Value]) {
        self.with(|s| {
            s.keys = keys.to_vec();
            s.version += 1;
        });
    }

    pub fn set_cache_control(&self, value: Option<&str>) {
        self.with(|s| s.cache_control = value.map(str::to_owned));
    }

    /// Down: every request gets 503.
    pub fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
    }

    /// Down, answering 503 with `Retry-After: secs` (none: without it).
    pub fn set_retry_after(&self, secs: Option<u32>) {
        self.with(|s| s.retry_after = secs);
    }

    /// Up again once it has answered 503 `failed` times in all.
    pub fn up_after_failed(&self, failed: usize) {
        self.with(|s| s.up_after_failed = Some(failed));
    }

    pub fn counts(&self) -> HostCounts {
        self.with(|s| s.counts.clone())
    }
}

impl Drop for JwksHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}
