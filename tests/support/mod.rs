//! Shared harness for keybound's integration tests.
//!
//! * [`DevToken`]: a throwaway SoftHSM2 token (its own tempdir, `softhsm2.conf`
//!   and `keybound.toml`) plus helpers that run the real `keybound` binary
//!   against it.
//! * Output checks: [`assert_success`], [`assert_error`], [`assert_exit`].
//! * JOSE helpers: [`Jws`] parsing, [`jwk_thumbprint`] (RFC 7638) and an
//!   independent signature [`Verifier`] built only from a JWK (p256, p384 and
//!   rsa crates; nothing from keybound).
//! * openssl helpers: [`p256_spki_pem`], [`ecdsa_raw_to_der`].

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN_LABEL: &str = "keybound-test";
pub const SO_PIN: &str = "87654321";
pub const USER_PIN: &str = "123456";
pub const PIN_ENV: &str = "KEYBOUND_PIN";
pub const ALGS: [&str; 4] = ["ES256", "ES384", "RS256", "PS256"];
/// The token endpoint the CLI tests sign assertions and proofs for.
pub const AUDIENCE: &str = "https://server.example.com/token";

/// `keybound assertion --key <key>` for [`AUDIENCE`] and client id `client`.
pub fn assertion_args(key: &str) -> [&str; 7] {
    [
        "assertion",
        "--key",
        key,
        "--client-id",
        "client",
        "--audience",
        AUDIENCE,
    ]
}

// ---------------------------------------------------------------------------
// Configuration text
// ---------------------------------------------------------------------------

/// The `keybound.toml` the harness writes. `Config::default().render()` is
/// exactly the configuration given in the test plan; tests change one field
/// to provoke one error.
#[derive(Clone, Debug)]
pub struct Config {
    pub module: String,
    pub token_label: String,
    /// The PIN source line of `[token]`, e.g. `pin_env = "KEYBOUND_PIN"` or
    /// `pin_file = "/path"`.
    pub pin_line: String,
    /// Raw TOML value of `sessions`.
    pub sessions: String,
    /// Extra raw lines appended to `[token]`.
    pub extra_token_lines: String,
    pub danger_allow_imported_keys: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            module: MODULE.to_owned(),
            token_label: TOKEN_LABEL.to_owned(),
            pin_line: format!("pin_env = \"{PIN_ENV}\""),
            sessions: "2".to_owned(),
            extra_token_lines: String::new(),
            danger_allow_imported_keys: false,
        }
    }
}

impl Config {
    pub fn render(&self) -> String {
        let mut text = format!(
            "[token]\n\
             backend = \"pkcs11\"\n\
             module = \"{}\"\n\
             token_label = \"{}\"\n\
             {}\n\
             sessions = {}\n",
            self.module, self.token_label, self.pin_line, self.sessions
        );
        if !self.extra_token_lines.is_empty() {
            text.push_str(self.extra_token_lines.trim_end());
            text.push('\n');
        }
        text.push_str(&format!(
            "[policy]\ndanger_allow_imported_keys = {}\n",
            self.danger_allow_imported_keys
        ));
        text
    }
}

// ---------------------------------------------------------------------------
// DevToken
// ---------------------------------------------------------------------------

/// A freshly initialised SoftHSM2 token that only this test uses.
///
/// Layout of the tempdir: `softhsm2.conf`, `tokens/` (the token store),
/// `keybound.toml`, and `cwd/` (an empty working directory for the binary:
/// keybound never reads a config from there, and tests/hardening.rs checks it).
pub struct DevToken {
    dir: TempDir,
}

impl DevToken {
    /// Creates the token (`softhsm2-util --init-token --free`) and writes the
    /// default `keybound.toml`.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("keybound-test-")
            .tempdir()
            .expect("create tempdir");
        let tokens = dir.path().join("tokens");
        fs::create_dir(&tokens).expect("create token dir");
        fs::create_dir(dir.path().join("cwd")).expect("create cwd");
        fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let token = DevToken { dir };
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", TOKEN_LABEL])
            .args(["--so-pin", SO_PIN, "--pin", USER_PIN])
            .env("SOFTHSM2_CONF", token.softhsm_conf())
            .output()
            .expect("run softhsm2-util (is softhsm2 installed?)");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed:\n{}",
            describe(&out)
        );
        token.write_config(&Config::default().render());
        token
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn softhsm_conf(&self) -> PathBuf {
        self.path("softhsm2.conf")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("keybound.toml")
    }

    /// Replaces `keybound.toml` with `text`.
    pub fn write_config(&self, text: &str) {
        fs::write(self.config_path(), text).expect("write keybound.toml");
    }

    /// Rewrites the default config with `danger_allow_imported_keys` set.
    pub fn set_danger_allow_imported_keys(&self, allow: bool) {
        self.write_config(
            &Config {
                danger_allow_imported_keys: allow,
                ..Config::default()
            }
            .render(),
        );
    }

    /// `keybound <args>` with this token's environment, not yet run.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybound"));
        cmd.args(args)
            .current_dir(self.path("cwd"))
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .env("KEYBOUND_CONFIG", self.config_path())
            .env(PIN_ENV, USER_PIN)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("RUST_LOG")
            // Only the agent a test starts and names: no agent of the real session.
            .env_remove("KEYBOUND_AGENT_SOCK")
            // Hermetic: no ~/.config/keybound fallback from the real home.
            .env("HOME", self.dir());
        cmd
    }

    /// Runs `keybound <args>` and returns its output, whatever the status.
    pub fn keybound<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("spawn keybound")
    }

    /// Runs `keybound <args>` with `input` on stdin.
    pub fn keybound_with_stdin<S: AsRef<OsStr>>(&self, args: &[S], input: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keybound");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("wait for keybound")
    }

    /// Runs `keybound <args>`, asserts exit 0, returns stdout.
    pub fn run_ok<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> String {
        assert_success(&self.keybound(args), &args)
    }

    /// Runs `keybound <args>`, asserts the error contract (exit 1, one
    /// `error: ` line, no panic) and returns that line.
    pub fn run_err<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> String {
        assert_error(&self.keybound(args), &args)
    }

    /// `keys generate --label <label> --alg <alg>`; checks the one-line
    /// report and returns the kid it announces.
    pub fn generate(&self, label: &str, alg: &str) -> String {
        let stdout = self.run_ok(&["keys", "generate", "--label", label, "--alg", alg]);
        parse_generated_line(&stdout, label, alg)
    }

    /// `keybound jwks [--label L]...`: checks the envelope and returns the
    /// `keys` array.
    pub fn jwks(&self, labels: &[&str]) -> Vec<Value> {
        let mut args = vec!["jwks"];
        for label in labels {
            args.extend(["--label", label]);
        }
        let stdout = self.run_ok(&args);
        let doc: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("jwks printed invalid JSON ({e}):\n{stdout}"));
        let obj = doc.as_object().expect("jwks output is an object");
        assert_eq!(
            obj.keys().collect::<Vec<_>>(),
            ["keys"],
            "jwks output has exactly one member, \"keys\": {doc}"
        );
        obj["keys"].as_array().expect("keys is an array").clone()
    }

    /// The single JWK `jwks --label <label>` prints.
    pub fn jwk(&self, label: &str) -> Value {
        let keys = self.jwks(&[label]);
        assert_eq!(
            keys.len(),
            1,
            "jwks --label {label} prints one key: {keys:?}"
        );
        keys.into_iter().next().unwrap()
    }

    /// Runs a signing command (`assertion ...`, `dpop ...`) and parses the
    /// compact JWS it prints (exactly one line).
    pub fn sign<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> Jws {
        let stdout = self.run_ok(args);
        let compact = stdout
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("{args:?}: stdout must end with a newline: {stdout:?}"));
        assert!(
            !compact.contains(['\n', '\r', ' ']),
            "{args:?}: stdout must be one compact JWS line: {stdout:?}"
        );
        Jws::parse(compact)
    }

    /// `pkcs11-tool --module <softhsm> --login --pin 123456 <args>` on this
    /// token.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .args(["--module", MODULE, "--token-label", TOKEN_LABEL])
            .args(["--login", "--pin", USER_PIN])
            .args(args)
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .output()
            .expect("run pkcs11-tool (is opensc installed?)")
    }

    /// Writes `contents` to `<tempdir>/<name>` and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, contents).expect("write file");
        path
    }
}

/// Checks `generated <alg> key '<label>' (kid <kid>) on token 'keybound-test'`
/// and returns `<kid>`.
pub fn parse_generated_line(stdout: &str, label: &str, alg: &str) -> String {
    let line = stdout
        .strip_suffix('\n')
        .filter(|l| !l.contains('\n'))
        .unwrap_or_else(|| panic!("keys generate prints exactly one line: {stdout:?}"));
    let prefix = format!("generated {alg} key '{label}' (kid ");
    let suffix = format!(") on token '{TOKEN_LABEL}'");
    let kid = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| {
            panic!("unexpected keys generate line {line:?}, want {prefix}<kid>{suffix}")
        });
    assert_eq!(kid.len(), 43, "kid is a base64url SHA-256: {kid:?}");
    assert!(is_base64url(kid), "kid is base64url: {kid:?}");
    kid.to_owned()
}

// ---------------------------------------------------------------------------
// Output checks
// ---------------------------------------------------------------------------

/// Status, stdout and stderr, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        status_text(out),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn status_text(out: &Output) -> String {
    match (out.status.code(), out.status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{:?}", out.status),
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8")
}

/// Neither a Rust panic (message, exit code 101) nor a crash (signal).
fn assert_no_panic(out: &Output, what: &dyn Debug) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && out.status.code() != Some(101),
        "{what:?}: keybound panicked\n{}",
        describe(out)
    );
    assert!(
        out.status.signal().is_none(),
        "{what:?}: keybound crashed\n{}",
        describe(out)
    );
}

/// Exit 0, no panic; returns stdout.
pub fn assert_success(out: &Output, what: &dyn Debug) -> String {
    assert_no_panic(out, what);
    assert!(
        out.status.success(),
        "{what:?}: expected success\n{}",
        describe(out)
    );
    stdout(out)
}

/// Exactly exit code `code`, no panic.
pub fn assert_exit(out: &Output, code: i32, what: &dyn Debug) {
    assert_no_panic(out, what);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what:?}: expected exit code {code}\n{}",
        describe(out)
    );
}

/// The error contract: exit code 1, stderr is exactly one line starting with
/// `error: `, no panic. Returns that line (without the newline).
pub fn assert_error(out: &Output, what: &dyn Debug) -> String {
    assert_error_code(out, 1, what)
}

/// [`assert_error`] for a failure whose kind has its own exit status (README "Exit codes":
/// 75 try again later, 77 credentials refused).
pub fn assert_error_code(out: &Output, code: i32, what: &dyn Debug) -> String {
    assert_exit(out, code, what);
    let err = stderr(out);
    let line = err.strip_suffix('\n').unwrap_or(&err);
    assert!(
        line.starts_with("error: ") && !line.contains('\n'),
        "{what:?}: stderr must be exactly one line starting with \"error: \"\n{}",
        describe(out)
    );
    line.to_owned()
}

/// Asserts that `line` contains every one of `needles`.
pub fn assert_mentions(line: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            line.contains(needle),
            "expected the message to mention {needle:?}:\n{line}"
        );
    }
}

// ---------------------------------------------------------------------------
// JOSE
// ---------------------------------------------------------------------------

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strict base64url without padding.
pub fn b64_decode(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text)
        .unwrap_or_else(|e| panic!("not base64url without padding ({e}): {text:?}"))
}

pub fn is_base64url(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A parsed compact JWS.
#[derive(Clone, Debug)]
pub struct Jws {
    pub compact: String,
    pub header: Value,
    pub claims: Value,
    /// `BASE64URL(header) || '.' || BASE64URL(payload)`, the signed bytes.
    pub signing_input: String,
    pub signature: Vec<u8>,
}

impl Jws {
    pub fn parse(compact: &str) -> Jws {
        let parts: Vec<&str> = compact.split('.').collect();
        assert_eq!(parts.len(), 3, "compact JWS has three parts: {compact:?}");
        let json_part = |part: &str, what: &str| -> Value {
            let value: Value = serde_json::from_slice(&b64_decode(part))
                .unwrap_or_else(|e| panic!("JWS {what} is not JSON ({e}): {compact}"));
            assert!(value.is_object(), "JWS {what} is a JSON object: {value}");
            value
        };
        Jws {
            compact: compact.to_owned(),
            header: json_part(parts[0], "header"),
            claims: json_part(parts[1], "payload"),
            signing_input: format!("{}.{}", parts[0], parts[1]),
            signature: b64_decode(parts[2]),
        }
    }

    /// The same JWS with one bit of the payload's signed bytes flipped
    /// (the signature left as is): must never verify.
    pub fn tampered(&self) -> Jws {
        let mut copy = self.clone();
        let mut bytes = copy.signing_input.into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        copy.signing_input = String::from_utf8(bytes).unwrap();
        copy
    }
}

/// Member names of a JSON object, sorted.
pub fn member_names(value: &Value) -> Vec<String> {
    let mut names: Vec<String> = value
        .as_object()
        .unwrap_or_else(|| panic!("expected a JSON object: {value}"))
        .keys()
        .cloned()
        .collect();
    names.sort();
    names
}

/// Asserts that `value` is an object whose member names are exactly `names`.
pub fn assert_members(value: &Value, names: &[&str]) {
    let mut want: Vec<&str> = names.to_vec();
    want.sort_unstable();
    assert_eq!(member_names(value), want, "member names of {value}");
}

/// The RFC 7638 required members of a public JWK (EC: crv kty x y; RSA: e kty
/// n), as an object.
pub fn required_public_members(jwk: &Value) -> Value {
    let names: &[&str] = match jwk["kty"].as_str() {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("RSA") => &["e", "kty", "n"],
        other => panic!("unsupported kty {other:?} in {jwk}"),
    };
    let map: serde_json::Map<String, Value> = names
        .iter()
        .map(|n| {
            let v = jwk
                .get(*n)
                .unwrap_or_else(|| panic!("JWK lacks {n}: {jwk}"));
            ((*n).to_owned(), v.clone())
        })
        .collect();
    Value::Object(map)
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic
/// order without whitespace, base64url. Built by hand rather than through a
/// JSON serializer so that member order is explicit.
pub fn jwk_thumbprint(jwk: &Value) -> String {
    let s = |name: &str| -> &str {
        jwk[name]
            .as_str()
            .unwrap_or_else(|| panic!("JWK member {name} is a string: {jwk}"))
    };
    let canonical = match s("kty") {
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            s("crv"),
            s("x"),
            s("y")
        ),
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e"), s("n")),
        other => panic!("unsupported kty {other}"),
    };
    b64(&Sha256::digest(canonical.as_bytes()))
}

/// Checks the members of a JWKS entry for `alg` (exact member set, sizes of
/// the key material, `use`, `alg`, kid = RFC 7638 thumbprint).
pub fn assert_jwks_entry(jwk: &Value, alg: &str) {
    match alg {
        "ES256" | "ES384" => {
            assert_members(jwk, &["kty", "crv", "x", "y", "kid", "alg", "use"]);
            let (crv, len) = if alg == "ES256" {
                ("P-256", 32)
            } else {
                ("P-384", 48)
            };
            assert_eq!(jwk["kty"], "EC", "{jwk}");
            assert_eq!(jwk["crv"], crv, "{jwk}");
            for c in ["x", "y"] {
                let bytes = b64_decode(jwk[c].as_str().expect("coordinate is a string"));
                assert_eq!(bytes.len(), len, "{c} is {len} bytes (left-padded): {jwk}");
            }
        }
        "RS256" | "PS256" => {
            assert_members(jwk, &["kty", "n", "e", "kid", "alg", "use"]);
            assert_eq!(jwk["kty"], "RSA", "{jwk}");
            let n = b64_decode(jwk["n"].as_str().expect("n is a string"));
            assert!(n.len() >= 256, "RSA modulus is at least 2048 bits: {jwk}");
            assert_ne!(n[0], 0, "n has no leading zero octet (RFC 7518 6.3.1.1)");
            let e = b64_decode(jwk["e"].as_str().expect("e is a string"));
            assert!(!e.is_empty() && e[0] != 0, "e is minimal big-endian: {jwk}");
        }
        other => panic!("unknown alg {other}"),
    }
    assert_eq!(jwk["alg"], alg, "{jwk}");
    assert_eq!(jwk["use"], "sig", "{jwk}");
    assert_eq!(
        jwk["kid"].as_str().expect("kid is a string"),
        jwk_thumbprint(jwk),
        "kid is the RFC 7638 thumbprint of {jwk}"
    );
}

// ---------------------------------------------------------------------------
// Independent verifier
// ---------------------------------------------------------------------------

/// DigestInfo prefix for SHA-256 (RFC 8017 section 9.2 note 1).
const SHA256_DIGEST_INFO_PREFIX: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// A signature verifier built from a public JWK alone.
pub enum Verifier {
    Es256(p256::ecdsa::VerifyingKey),
    Es384(p384::ecdsa::VerifyingKey),
    Rs256(rsa::RsaPublicKey),
    Ps256(rsa::RsaPublicKey),
}

impl Verifier {
    /// For a JWKS entry (its `alg` member names the algorithm).
    pub fn from_jwk(jwk: &Value) -> Verifier {
        Verifier::new(jwk["alg"].as_str().expect("JWK has alg"), jwk)
    }

    /// For `alg` over the public key in `jwk`.
    pub fn new(alg: &str, jwk: &Value) -> Verifier {
        let member = |name: &str| -> Vec<u8> {
            b64_decode(
                jwk[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("JWK member {name} is a string: {jwk}")),
            )
        };
        let sec1 = || -> Vec<u8> {
            let mut point = vec![0x04];
            point.extend(member("x"));
            point.extend(member("y"));
            point
        };
        let rsa_key = || -> rsa::RsaPublicKey {
            assert_eq!(jwk["kty"], "RSA", "{alg} needs an RSA key: {jwk}");
            rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(&member("n")),
                rsa::BigUint::from_bytes_be(&member("e")),
            )
            .expect("valid RSA public key")
        };
        match alg {
            "ES256" => {
                assert_eq!((&jwk["kty"], &jwk["crv"]), (&json!("EC"), &json!("P-256")));
                Verifier::Es256(
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1()).expect("valid P-256 point"),
                )
            }
            "ES384" => {
                assert_eq!((&jwk["kty"], &jwk["crv"]), (&json!("EC"), &json!("P-384")));
                Verifier::Es384(
                    p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1()).expect("valid P-384 point"),
                )
            }
            "RS256" => Verifier::Rs256(rsa_key()),
            "PS256" => Verifier::Ps256(rsa_key()),
            other => panic!("unsupported alg {other}"),
        }
    }

    pub fn alg(&self) -> &'static str {
        match self {
            Verifier::Es256(_) => "ES256",
            Verifier::Es384(_) => "ES384",
            Verifier::Rs256(_) => "RS256",
            Verifier::Ps256(_) => "PS256",
        }
    }

    /// Verifies `jws.signature` over `jws.signing_input`. ECDSA signatures
    /// must be raw `r||s` of exactly 64 (ES256) or 96 (ES384) bytes; PSS uses
    /// MGF1-SHA-256 with a salt of exactly 32 bytes.
    pub fn verify(&self, jws: &Jws) -> Result<(), String> {
        use p256::ecdsa::signature::Verifier as _;
        let msg = jws.signing_input.as_bytes();
        let sig = &jws.signature;
        match self {
            Verifier::Es256(key) => {
                let sig = p256::ecdsa::Signature::from_slice(sig)
                    .map_err(|e| format!("ES256 signature is not 64-byte r||s: {e}"))?;
                key.verify(msg, &sig).map_err(|e| e.to_string())
            }
            Verifier::Es384(key) => {
                let sig = p384::ecdsa::Signature::from_slice(sig)
                    .map_err(|e| format!("ES384 signature is not 96-byte r||s: {e}"))?;
                key.verify(msg, &sig).map_err(|e| e.to_string())
            }
            Verifier::Rs256(key) => {
                let scheme = rsa::Pkcs1v15Sign {
                    hash_len: Some(32),
                    prefix: SHA256_DIGEST_INFO_PREFIX.to_vec().into_boxed_slice(),
                };
                check_rsa_len(key, sig)?;
                key.verify(scheme, &Sha256::digest(msg), sig)
                    .map_err(|e| e.to_string())
            }
            Verifier::Ps256(key) => {
                check_rsa_len(key, sig)?;
                let key = rsa::pss::VerifyingKey::<Sha256>::new_with_salt_len(key.clone(), 32);
                let sig =
                    rsa::pss::Signature::try_from(sig.as_slice()).map_err(|e| e.to_string())?;
                key.verify(msg, &sig).map_err(|e| e.to_string())
            }
        }
    }
}

fn check_rsa_len(key: &rsa::RsaPublicKey, sig: &[u8]) -> Result<(), String> {
    use rsa::traits::PublicKeyParts;
    if sig.len() == key.size() {
        Ok(())
    } else {
        Err(format!(
            "RSA signature is {} bytes, modulus is {}",
            sig.len(),
            key.size()
        ))
    }
}

/// Asserts that `jws` is signed by the key in the JWKS entry `jwk`: header
/// `alg` matches, the signature verifies, and a tampered copy does not.
pub fn assert_verifies(jwk: &Value, jws: &Jws) {
    let verifier = Verifier::from_jwk(jwk);
    assert_eq!(jws.header["alg"], verifier.alg(), "header alg vs JWK alg");
    assert_signature(&verifier, jws);
}

/// The signature of `jws` verifies under `verifier`, and a tampered copy
/// does not (so a verifier that accepts everything cannot pass a test).
pub fn assert_signature(verifier: &Verifier, jws: &Jws) {
    if let Err(e) = verifier.verify(jws) {
        panic!(
            "{} signature does not verify: {e}\n{}",
            verifier.alg(),
            jws.compact
        );
    }
    assert!(
        verifier.verify(&jws.tampered()).is_err(),
        "a tampered {} JWS verified",
        verifier.alg()
    );
}

// ---------------------------------------------------------------------------
// openssl helpers
// ---------------------------------------------------------------------------

/// PEM SubjectPublicKeyInfo for a P-256 JWK, built by hand: the fixed DER
/// prefix (SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING })
/// followed by the uncompressed point `04||X||Y`.
pub fn p256_spki_pem(jwk: &Value) -> String {
    const PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";
    let mut der = hex_decode(PREFIX);
    der.push(0x04);
    der.extend(b64_decode(jwk["x"].as_str().expect("x")));
    der.extend(b64_decode(jwk["y"].as_str().expect("y")));
    assert_eq!(der.len(), 91, "P-256 SPKI is 91 bytes");
    let body = base64::engine::general_purpose::STANDARD.encode(&der);
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PUBLIC KEY-----\n");
    pem
}

/// DER `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` from a JWS
/// raw `r||s` signature.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Vec<u8> {
    assert!(raw.len().is_multiple_of(2) && raw.len() <= 132, "raw r||s");
    let integer = |bytes: &[u8]| -> Vec<u8> {
        let first = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1);
        let mut value = bytes[first..].to_vec();
        if value[0] & 0x80 != 0 {
            value.insert(0, 0);
        }
        let mut out = vec![0x02, value.len() as u8];
        out.extend(value);
        out
    };
    let (r, s) = raw.split_at(raw.len() / 2);
    let body = [integer(r), integer(s)].concat();
    let mut der = vec![0x30];
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend(body);
    der
}

pub fn hex_decode(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "even-length hex: {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

// ---------------------------------------------------------------------------
// pkcs11-tool
// ---------------------------------------------------------------------------

/// One object from `pkcs11-tool --list-objects`: its heading line (e.g.
/// `Private Key Object; EC`) and its `name: value` fields.
#[derive(Debug)]
pub struct ToolObject {
    pub heading: String,
    pub fields: BTreeMap<String, String>,
}

pub fn parse_pkcs11_tool_objects(text: &str) -> Vec<ToolObject> {
    let mut objects: Vec<ToolObject> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with("Using slot") {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            objects.push(ToolObject {
                heading: line.trim().to_owned(),
                fields: BTreeMap::new(),
            });
        } else if let (Some(object), Some((name, value))) =
            (objects.last_mut(), line.split_once(':'))
        {
            object
                .fields
                .insert(name.trim().to_owned(), value.trim().to_owned());
        }
    }
    objects
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// The published test vectors (RFC 7638, RFC 9449), kept next to the tests.
pub fn vectors() -> Value {
    serde_json::from_str(include_str!("../vectors/rfc-vectors.json")).expect("vectors JSON")
}

/// Integer claim `name` of `claims`.
pub fn int_claim(claims: &Value, name: &str) -> i64 {
    claims[name]
        .as_i64()
        .unwrap_or_else(|| panic!("claim {name} is an integer: {claims}"))
}

/// Makes a FIFO (mode 0600) at `path`, with mknod(2): no `mkfifo` program needed.
pub fn mkfifo(path: &std::path::Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// Sends `sig` (`"TERM"`, `"INT"`, `"KILL"`, `"STOP"`) to `pid` with kill(2): the tests run no `kill`
/// program, so a machine without procps runs them too.
pub fn send_signal(pid: u32, sig: &str) {
    use rustix::process::{Pid, Signal, kill_process};
    let sig = match sig {
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "KILL" => Signal::KILL,
        "STOP" => Signal::STOP,
        other => panic!("send_signal: unsupported signal {other}"),
    };
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .unwrap_or_else(|| panic!("send_signal: {pid} is not a process id"));
    kill_process(pid, sig).unwrap_or_else(|e| panic!("kill({pid:?}, {sig:?}) failed: {e}"));
}
