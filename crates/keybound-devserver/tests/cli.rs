//! The `keybound-devserver` binary: its banner, serving until SIGTERM, and the flags and
//! JWKS files it refuses. The server itself is tested in-process by keybound's
//! `tests/devserver.rs`, with keys in a real SoftHSM2 token.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

const CLIENT_ID: &str = "0oa-devserver-test";
const READ: &str = "okta.users.read";

/// A software P-256 key, registered in a JWKS file the test writes itself.
struct SoftKey {
    key: p256::ecdsa::SigningKey,
    kid: String,
}

impl SoftKey {
    fn new(kid: &str) -> SoftKey {
        SoftKey {
            key: p256::ecdsa::SigningKey::random(&mut rand_core::OsRng),
            kid: kid.into(),
        }
    }

    /// The JWKS entry: `kty crv x y kid alg use`.
    fn jwk(&self) -> Value {
        let point = self.key.verifying_key().to_encoded_point(false);
        json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
            "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
            "kid": self.kid,
            "alg": "ES256",
            "use": "sig",
        })
    }
}

/// Writes `{"keys": [...]}` to `dir/name`.
fn write_jwks(dir: &Path, name: &str, keys: &[Value]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, json!({ "keys": keys }).to_string()).expect("write JWKS");
    path
}

/// A reqwest client for 127.0.0.1: no proxy, no redirects.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("reqwest client")
}

async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let response = http.get(url).send().await.expect("GET");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "GET {url}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {text}"))
}

/// Sends SIGTERM to `pid` with kill(2), so a machine without procps runs the test too.
fn terminate(pid: u32) {
    use rustix::process::{Pid, Signal, kill_process};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .unwrap_or_else(|| panic!("{pid} is not a process id"));
    kill_process(pid, Signal::TERM).unwrap_or_else(|e| panic!("kill({pid:?}, TERM) failed: {e}"));
}

/// A spawned `keybound-devserver`, killed if the test ends before it stops.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_prints_the_banner_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = SoftKey::new("soft-1");
    let jwks = write_jwks(dir.path(), "jwks.json", &[key.jwk()]);
    let mut child = Spawned(
        Command::new(env!("CARGO_BIN_EXE_keybound-devserver"))
            .args(["--port", "0", "--client-id", CLIENT_ID])
            .arg("--jwks")
            .arg(&jwks)
            .args(["--scopes", READ, "--users", "3"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keybound-devserver"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let lines: Vec<String> = (0..7)
        .map(|_| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read banner");
            line.trim_end().to_string()
        })
        .collect();
    let base = lines[1]
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("banner: {lines:#?}"))
        .to_string();
    let port: u16 = base
        .strip_prefix("http://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("listening on 127.0.0.1: {base}"));
    assert_ne!(port, 0);
    assert_eq!(
        lines,
        [
            "keybound dev-server — development only, not an authorization server for production"
                .to_string(),
            format!("listening on {base}"),
            format!("issuer          {base}"),
            format!("token endpoint  {base}/oauth2/v1/token"),
            format!("jwks            {base}/oauth2/v1/keys"),
            format!("users api       {base}/api/v1/users"),
            format!("client          {CLIENT_ID} (granted: {READ})"),
        ]
    );

    let meta = get_json(
        &http(),
        &format!("{base}/.well-known/oauth-authorization-server"),
    )
    .await;
    assert_eq!(meta["issuer"], base.as_str());
    assert_eq!(meta["scopes_supported"], json!([READ]));

    terminate(child.0.id());
    let status = child.0.wait().expect("wait for dev-server");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn cli_refuses_bad_flags_and_unusable_jwks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut private = SoftKey::new("k").jwk();
    private["d"] = json!("AAAA");
    let bad_jwks = write_jwks(dir.path(), "private.json", &[private]);
    let good_jwks = write_jwks(dir.path(), "good.json", &[SoftKey::new("k").jwk()]);
    let missing = dir.path().join("missing.json");
    let (bad, good, missing) = (
        bad_jwks.to_str().expect("UTF-8"),
        good_jwks.to_str().expect("UTF-8"),
        missing.to_str().expect("UTF-8"),
    );
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_keybound-devserver"))
            .args(["--port", "0", "--client-id", CLIENT_ID])
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("spawn keybound-devserver");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    for (args, code, message) in [
        (
            vec!["--jwks", missing],
            1,
            "error: cannot read the client JWKS file",
        ),
        (vec!["--jwks", bad], 1, "private key member 'd'"),
        (
            vec!["--jwks", good, "--scopes", ""],
            1,
            "no scopes are granted",
        ),
        (vec![], 2, "--jwks"),
        (
            vec!["--jwks", good, "--jwks-uri", "http://127.0.0.1:9/jwks"],
            2,
            "cannot be used with",
        ),
        (vec!["--jwks", good, "--rs-nonce-status", "403"], 2, "403"),
        (
            vec!["--jwks", good, "--jwks-refetch-interval", "1"],
            2,
            "cannot be used with",
        ),
        (
            vec![
                "--jwks-uri",
                "http://127.0.0.1:9/jwks",
                "--jwks-refetch-interval",
                "3601",
            ],
            2,
            "3601",
        ),
    ] {
        let (status, stderr) = run(&args);
        assert_eq!(status, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `--jwks FILE` follows edits: a broken file is warned about on stderr (the file and the
/// fault) and keeps the last good keys; a repaired one is read again, and `-v` logs its kids.
#[tokio::test(flavor = "multi_thread")]
async fn cli_follows_jwks_file_edits_and_warns_about_a_broken_one() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = write_jwks(dir.path(), "jwks.json", &[SoftKey::new("soft-1").jwk()]);
    let mut child = Spawned(
        Command::new(env!("CARGO_BIN_EXE_keybound-devserver"))
            .args(["-v", "--port", "0", "--client-id", CLIENT_ID])
            .arg("--jwks")
            .arg(&jwks)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keybound-devserver"),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut base = None;
    for _ in 0..7 {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read banner");
        if let Some(url) = line.trim_end().strip_prefix("listening on ") {
            base = Some(url.to_string());
        }
    }
    let token_url = format!("{}/oauth2/v1/token", base.expect("listening on"));
    // Refused at the key lookup, before the signature: a header naming a kid is enough.
    let b64 = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let assertion = format!(
        "{}.{}.AAAA",
        b64(json!({ "alg": "ES256", "kid": "soft-2" })),
        b64(json!({ "iss": CLIENT_ID })),
    );
    let form = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.as_str()),
    ];
    let post = || async {
        let response = http()
            .post(&token_url)
            .form(&form)
            .send()
            .await
            .expect("POST token");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).expect("JSON body");
        (
            status,
            body["error_description"].as_str().unwrap_or("").to_string(),
        )
    };

    std::fs::write(&jwks, "{\"keys\": [").expect("break the file");
    let (status, description) = post().await;
    assert_eq!(status, 401, "{description}");
    assert!(
        description.contains("kid 'soft-2'") && description.contains("not JSON"),
        "{description}"
    );

    write_jwks(
        dir.path(),
        "jwks.json",
        &[SoftKey::new("soft-1").jwk(), SoftKey::new("soft-2").jwk()],
    );
    let (status, description) = post().await;
    assert_eq!(status, 401, "{description}");
    assert!(
        description.contains("signature is invalid"),
        "soft-2 is known now: {description}"
    );

    terminate(child.0.id());
    let status = child.0.wait().expect("wait for dev-server");
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    let path = jwks.display().to_string();
    let warned = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("not JSON"));
    let warned = warned.unwrap_or_else(|| panic!("no warning about the file: {stderr}"));
    assert!(
        warned.contains(&format!("the client JWKS from {path} is not usable"))
            && warned.contains("keeping the last good keys")
            && warned.contains("soft-1"),
        "{warned}"
    );
    let reread = stderr
        .lines()
        .find(|l| l.contains("client JWKS file read again"))
        .unwrap_or_else(|| panic!("no info line for the reread: {stderr}"));
    assert!(reread.contains(r#"["soft-1", "soft-2"]"#), "{reread}");
}
