//! The token on another host: a SoftHSM2 token made by the test, exported by a real
//! `p11-kit server` on a Unix socket in the test's temp dir, and keybound loading
//! `p11-kit-client.so` with `P11_KIT_SERVER_ADDRESS`. The built binary generates, audits,
//! publishes and signs through it; every signature is verified with the p256/p384/rsa
//! verifiers of `tests/support` from the published JWK; `keybound token` runs against the
//! dev-server (in-process), and the agent signs through the forwarded token.
//!
//! Needs the Debian packages `p11-kit` and `p11-kit-modules` (scripts/install-deps.sh,
//! group softhsm).

mod agent_support;
mod support;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use agent_support::{Agent, DevServer, SocketDir, check_proof, dpop_request, post, want_proof};
use serde_json::Value;
use support::*;

/// The client module of package `p11-kit-modules`, where Debian puts it.
const CLIENT_MODULES: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
];
/// The server prints its address at once; this only keeps a broken server from hanging
/// the test.
const GUARD: Duration = Duration::from_secs(60);

fn client_module() -> &'static str {
    CLIENT_MODULES
        .into_iter()
        .find(|m| Path::new(m).is_file())
        .expect("p11-kit-client.so not found: run scripts/install-deps.sh softhsm")
}
const CLIENT_ID: &str = "0oa-p11kit";

/// `p11-kit server` exporting the test's SoftHSM token on `<tempdir>/p11kit.sock`, in the
/// foreground; killed and reaped on drop.
struct P11KitServer {
    child: Child,
    /// `unix:path=...`, as the server printed it for `P11_KIT_SERVER_ADDRESS`.
    address: String,
}

impl P11KitServer {
    fn start(token: &DevToken) -> P11KitServer {
        let socket = token.path("p11kit.sock");
        let mut child = Command::new("p11-kit")
            .args(["server", "--foreground", "--sh", "--name"])
            .arg(&socket)
            .args(["--provider", MODULE])
            .arg(format!("pkcs11:token={TOKEN_LABEL}"))
            .env("SOFTHSM2_CONF", token.softhsm_conf())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run p11-kit server (are p11-kit and p11-kit-modules installed?)");
        // The server prints `P11_KIT_SERVER_ADDRESS=unix:path=...; export ...;` once its
        // socket listens, or exits (stdout closes) when it cannot start.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(GUARD).unwrap_or_default();
        let address = line
            .strip_prefix("P11_KIT_SERVER_ADDRESS=")
            .and_then(|rest| rest.split(';').next())
            .map(str::to_owned);
        let Some(address) = address else {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("p11-kit server did not print its address: {line:?}\n{err}");
        };
        assert_eq!(address, format!("unix:path={}", socket.display()));
        P11KitServer { child, address }
    }
}

impl Drop for P11KitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevToken, its p11-kit server, and keybound configured with the client module.
struct Remote {
    token: DevToken,
    server: P11KitServer,
}

impl Remote {
    fn new() -> Remote {
        let token = DevToken::new();
        let server = P11KitServer::start(&token);
        token.write_config(&client_config(""));
        Remote { token, server }
    }

    /// `keybound <args>` through the client module, not yet run.
    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = self.token.command(args);
        cmd.env("P11_KIT_SERVER_ADDRESS", &self.server.address)
            // The client must reach the token only through the server.
            .env_remove("SOFTHSM2_CONF");
        cmd
    }

    fn keybound<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("spawn keybound")
    }

    fn run_ok<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> String {
        assert_success(&self.keybound(args), &args)
    }

    fn generate(&self, label: &str, alg: &str) -> String {
        let out = self.run_ok(&["keys", "generate", "--label", label, "--alg", alg]);
        parse_generated_line(&out, label, alg)
    }

    fn jwks(&self) -> Vec<Value> {
        let doc: Value = serde_json::from_str(&self.run_ok(&["jwks"])).expect("jwks JSON");
        doc["keys"].as_array().expect("keys").clone()
    }

    fn jwk(&self, kid: &str) -> Value {
        self.jwks()
            .into_iter()
            .find(|k| k["kid"] == kid)
            .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS"))
    }

    fn sign<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> Jws {
        let out = self.run_ok(args);
        Jws::parse(out.trim_end_matches('\n'))
    }
}

/// The default test config with the p11-kit client module instead of SoftHSM's.
fn client_config(more: &str) -> String {
    let mut text = Config {
        module: client_module().to_owned(),
        ..Config::default()
    }
    .render();
    text.push_str(more);
    text
}

#[test]
fn keys_generated_audited_published_and_signing_through_p11_kit() {
    let remote = Remote::new();
    let mut kids = BTreeMap::new();
    for (label, alg) in [
        ("client-auth", "ES256"),
        ("dpop-p384", "ES384"),
        ("client-rsa", "RS256"),
    ] {
        kids.insert(label, (alg, remote.generate(label, alg)));
    }

    // The forwarded token reports SoftHSM's manufacturer; the module picks the profile.
    let audit = remote.keybound(&["keys", "audit"]);
    let text = assert_success(&audit, &"keys audit");
    assert!(
        text.contains("SoftHSM project SoftHSM v2") && text.contains("profile p11-kit-client"),
        "{text}"
    );
    assert!(!text.contains("not tested live"), "{text}");
    assert_eq!(text.matches("verdict: pass").count(), 3, "{text}");

    let jwks = remote.jwks();
    assert_eq!(jwks.len(), 3, "{jwks:?}");
    for (label, (alg, kid)) in &kids {
        let jwk = remote.jwk(kid);
        assert_jwks_entry(&jwk, alg);
        let assertion = remote.sign(&assertion_args(label));
        assert_eq!(assertion.header["alg"], *alg);
        assert_eq!(assertion.header["kid"], *kid);
        assert_verifies(&jwk, &assertion);
        let proof = remote.sign(&[
            "dpop",
            "--key",
            label,
            "--method",
            "POST",
            "--url",
            "https://server.example.com/token",
        ]);
        assert_eq!(proof.header["jwk"], required_public_members(&jwk));
        assert_verifies(&jwk, &proof);
    }

    // The keys are on the SoftHSM token behind the server: SoftHSM's own module, with its
    // own profile, sees the same keys (and reads CKA_ALLOWED_MECHANISMS there).
    remote.token.write_config(&Config::default().render());
    let direct = remote.token.jwks(&[]);
    let direct_kids: Vec<&str> = direct.iter().filter_map(|k| k["kid"].as_str()).collect();
    for (_, kid) in kids.values() {
        assert!(direct_kids.contains(&kid.as_str()), "{direct_kids:?}");
    }
    let direct_audit = remote.token.run_ok(&["keys", "audit"]);
    assert!(direct_audit.contains("profile softhsm2"), "{direct_audit}");
}

/// p11-kit 0.24.1 cannot read CKA_ALLOWED_MECHANISMS, by which keybound tells a PS256 key
/// from an RS256 one: PS256 is unavailable through it, and a PSS-only key made on the token
/// directly is not mistaken for a signing RS256 key (its proof of possession fails, so it
/// is never published). The same key through SoftHSM's own module is still PS256.
#[test]
fn ps256_is_unavailable_and_a_pss_key_made_elsewhere_is_not_published() {
    let remote = Remote::new();
    let out = remote.keybound(&["keys", "generate", "--label", "pss", "--alg", "PS256"]);
    let line = assert_error(&out, &"generate PS256 through p11-kit");
    assert_mentions(
        &line,
        &["PS256 is not available with profile 'p11-kit-client'"],
    );

    remote.token.write_config(&Config::default().render());
    let pss_kid = remote.token.generate("pss", "PS256");
    let direct = remote.token.run_ok(&["keys", "audit", "--label", "pss"]);
    assert!(
        direct.contains("PS256") && direct.contains("verdict: pass"),
        "{direct}"
    );

    remote.token.write_config(&client_config(""));
    remote.generate("client-auth", "ES256");
    let audit = remote.keybound(&["keys", "audit"]);
    assert_exit(&audit, 3, &"keys audit with the PSS key through p11-kit");
    let text = stdout(&audit);
    assert!(text.contains("CKR_MECHANISM_INVALID"), "{text}");
    assert!(text.contains("verdict: fail"), "{text}");
    let published: Vec<Value> = remote.jwks();
    assert_eq!(published.len(), 1, "only the ES256 key: {published:?}");
    assert!(published.iter().all(|k| k["kid"] != pss_kid.as_str()));
}

/// `keybound token`: client assertion and DPoP proof both signed through p11-kit, the
/// access token verified with p256 from the dev-server's JWKS.
#[test]
fn token_end_to_end_through_p11_kit() {
    let remote = Remote::new();
    remote.generate("client-auth", "ES256");
    let dpop_kid = remote.generate("dpop", "ES256");
    let jwks = remote.run_ok(&["jwks", "--label", "client-auth"]);
    let jwks_path = remote.token.write_file("client-jwks.json", &jwks);
    let server = DevServer::start_with(CLIENT_ID, &jwks_path, |s| {
        s.granted_scopes = ["okta.users.read".to_owned()].into_iter().collect();
    });
    remote.token.write_config(&client_config(&format!(
        "[[client]]\nname = \"dev\"\nclient_id = \"{CLIENT_ID}\"\nassertion_key = \
         \"client-auth\"\ndpop_key = \"dpop\"\ntoken_endpoint = \"{}/oauth2/v1/token\"\nscopes = \
         [\"okta.users.read\"]\n",
        server.base
    )));

    let out = remote.keybound(&["token", "--json"]);
    assert_exit(&out, 0, &"keybound token --json");
    let t: Value = serde_json::from_str(&stdout(&out)).expect("token JSON");
    assert_eq!(t["token_type"], "DPoP");
    assert_eq!(t["cnf_jkt"], dpop_kid.as_str());
    let access = Jws::parse(t["access_token"].as_str().expect("access_token"));
    assert_verifies(&access_token_jwk(&server.base), &access);
    assert_eq!(access.claims["cnf"]["jkt"], dpop_kid.as_str());
    assert_eq!(access.claims["sub"], CLIENT_ID);
}

/// The agent (`keybound serve`) on the forwarded token: a proof from `/v1/dpop` verifies
/// with the key `keybound jwks` publishes through the same server.
#[tokio::test]
async fn the_agent_signs_through_p11_kit() {
    let remote = Remote::new();
    let kid = remote.generate("dpop", "ES256");
    let jwks: BTreeMap<String, Value> = remote
        .jwks()
        .into_iter()
        .map(|k| (k["kid"].as_str().unwrap_or_default().to_owned(), k))
        .collect();
    let dir = SocketDir::new();
    let socket = dir.socket();
    let agent = Agent::start_command(
        remote.command(&[
            OsStr::new("serve"),
            OsStr::new("--socket"),
            socket.as_os_str(),
        ]),
        &socket,
    );
    let start = agent_support::window_start();
    let reply = post(
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "POST", "https://api.example.com/v1/things"),
    )
    .await;
    let proof = reply.ok_member("a proof", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(&kid, "POST", "https://api.example.com/v1/things"),
        agent_support::window_end(start),
    );
}

/// A profile marked `tested_live = false` makes `keys audit` say so (here SoftHSM's own
/// profile, copied into profiles_dir and marked untested).
#[test]
fn audit_says_when_the_profile_was_not_tested_live() {
    let token = DevToken::new();
    token.generate("client-auth", "ES256");
    let plain = token.run_ok(&["keys", "audit"]);
    assert!(!plain.contains("profile not tested live"), "{plain}");

    let dir = token.path("profiles");
    fs::create_dir(&dir).expect("mkdir profiles");
    let text = include_str!("../hsm-profiles/softhsm2.toml").replacen(
        "description =",
        "tested_live = false\ndescription =",
        1,
    );
    write_private(&dir.join("softhsm2.toml"), &text);
    set_mode(&dir, 0o755);
    token.write_config(
        &Config {
            extra_token_lines: format!("profiles_dir = \"{}\"", dir.display()),
            ..Config::default()
        }
        .render(),
    );
    let out = token.keybound(&["keys", "audit"]);
    let text = assert_success(&out, &"keys audit, untested profile");
    let line = text
        .lines()
        .find(|l| l.starts_with("profile not tested live"))
        .unwrap_or_else(|| panic!("no 'profile not tested live' line:\n{text}"));
    assert_mentions(line, &["softhsm2", "documentation"]);
    let json: Value =
        serde_json::from_str(&token.run_ok(&["keys", "audit", "--json"])).expect("audit JSON");
    assert_eq!(json[0]["token"]["profile_tested_live"], false, "{json}");
}

/// The dev-server's access-token key, from its published JWKS (fetched with curl).
fn access_token_jwk(base: &str) -> Value {
    let out = Command::new("curl")
        .args(["-sS", "--fail", &format!("{base}/oauth2/v1/keys")])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "{}", describe(&out));
    let jwks: Value = serde_json::from_slice(&out.stdout).expect("JWKS");
    jwks["keys"][0].clone()
}

fn write_private(path: &Path, text: &str) {
    fs::write(path, text).expect("write profile");
    set_mode(path, 0o644);
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}
