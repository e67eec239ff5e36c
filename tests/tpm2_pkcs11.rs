//! tpm2-pkcs11 (`libtpm2_pkcs11.so.1`) over a swtpm, through keybound's PKCS#11 backend and
//! the `tpm2-pkcs11` hsm-profile (picked by the token's manufacturer and model): the
//! template quirks (no `CKA_DECRYPT=false`/`CKA_ENCRYPT=false`), ES256 with `CKM_ECDSA`,
//! RS256 with `CKM_SHA256_RSA_PKCS`, no PS256. Every signature is verified independently
//! from the JWKS keybound printed. `keybound serve` signs with both keys through its signer
//! processes (RS256's mechanism hashes on the device: its `Sign` carries the input).

mod agent_support;
mod support;
mod tpm_support;

use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use support::{Jws, assert_jwks_entry, assert_verifies};
use tempfile::TempDir;
use tpm_support::{Swtpm, transient_handles};

const MODULE: &str = "/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1";
const LABEL: &str = "keybound-tpm2";
const SO_PIN: &str = "87654321";
const USER_PIN: &str = "123456";

/// A tpm2-pkcs11 token on its own swtpm, with its own store.
struct Tpm2Token {
    tpm: Swtpm,
    dir: TempDir,
}

impl Tpm2Token {
    /// Creates the token through PKCS#11 (C_InitToken on the free slot, C_InitPIN in an SO
    /// session, by pkcs11-tool): `tpm2_ptool addtoken` leaks objects on a TPM without
    /// resource manager.
    fn new() -> Tpm2Token {
        let token = Tpm2Token {
            tpm: Swtpm::start(),
            dir: tempfile::Builder::new()
                .prefix("keybound-tpm2-pkcs11-")
                .tempdir()
                .expect("tempdir"),
        };
        fs::create_dir(token.store()).expect("create store");
        fs::create_dir(token.dir.path().join("cwd")).expect("create cwd");
        token.tool(&[
            "--init-token",
            "--slot-index",
            "0",
            "--label",
            LABEL,
            "--so-pin",
            SO_PIN,
        ]);
        token.tool(&[
            "--token-label",
            LABEL,
            "--login",
            "--login-type",
            "so",
            "--so-pin",
            SO_PIN,
            "--init-pin",
            "--pin",
            USER_PIN,
        ]);
        // C_InitToken leaves its primary key loaded on a TPM without resource manager.
        tpm_support::tpm2_ok(&token.tpm, "flushcontext", &["-t"]);
        fs::write(
            token.config(),
            format!(
                "[token]\nbackend = \"pkcs11\"\nmodule = \"{MODULE}\"\ntoken_label = \"{LABEL}\"\n"
            ),
        )
        .expect("write keybound.toml");
        token
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("keybound.toml")
    }

    /// The module finds its store and TPM through the environment.
    fn env(&self, cmd: &mut Command) {
        cmd.env("TPM2_PKCS11_STORE", self.store())
            .env("TPM2_PKCS11_TCTI", self.tpm.tcti())
            .env("TSS2_LOG", "all+none");
    }

    fn tool(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("pkcs11-tool");
        cmd.args(["--module", MODULE]).args(args);
        self.env(&mut cmd);
        let out = cmd
            .output()
            .expect("run pkcs11-tool (is opensc installed?)");
        assert!(out.status.success(), "pkcs11-tool {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `keybound <args>` with this token's config, PIN and module environment, not yet run.
    fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybound"));
        cmd.args(args)
            .current_dir(self.dir.path().join("cwd"))
            .env("KEYBOUND_CONFIG", self.config())
            .env("KEYBOUND_PIN", USER_PIN)
            .env("HOME", self.dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("RUST_LOG");
        self.env(&mut cmd);
        cmd
    }

    fn keybound<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("spawn keybound")
    }

    fn run_ok<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> String {
        let out = self.keybound(args);
        assert!(
            out.status.success(),
            "{args:?}: {}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }
}

#[test]
fn tpm2_pkcs11_token_signs_es256_and_rs256_with_its_profile() {
    let token = Tpm2Token::new();
    for (label, alg) in [("es", "ES256"), ("rs", "RS256")] {
        let out = token.run_ok(&["keys", "generate", "--label", label, "--alg", alg]);
        assert!(
            out.starts_with(&format!("generated {alg} key '{label}'"))
                && out.trim_end().ends_with(&format!("on token '{LABEL}'")),
            "{out}"
        );
    }
    // No RSA-PSS in tpm2-pkcs11: refused by the profile before touching the token.
    let out = token.keybound(&["keys", "generate", "--label", "ps", "--alg", "PS256"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("PS256 is not available with profile 'tpm2-pkcs11'"),
        "{err}"
    );

    let audit: Vec<Value> =
        serde_json::from_str(&token.run_ok(&["keys", "audit", "--json"])).expect("audit json");
    assert_eq!(audit.len(), 2, "{audit:?}");
    for key in &audit {
        assert_eq!(key["token"]["profile"], "tpm2-pkcs11", "{key}");
        assert_eq!(key["token"]["manufacturer"], "IBM", "{key}");
        let a = &key["attributes"];
        assert_eq!(a["CKA_EXTRACTABLE"], false, "{key}");
        assert_eq!(a["CKA_NEVER_EXTRACTABLE"], true, "{key}");
        assert_eq!(a["CKA_SENSITIVE"], true, "{key}");
        assert_eq!(a["CKA_LOCAL"], true, "{key}");
        // tpm2-pkcs11 makes decrypt+sign keys whatever the template says: a warning.
        assert_eq!(key["verdict"], "warn", "{key}");
    }

    let jwks: Value = serde_json::from_str(&token.run_ok(&["jwks"])).expect("jwks");
    let jwk = |alg: &str| -> Value {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["alg"] == alg)
            .unwrap_or_else(|| panic!("no {alg} key in {jwks}"))
            .clone()
    };
    for (label, alg) in [("es", "ES256"), ("rs", "RS256")] {
        let jwk = jwk(alg);
        assert_jwks_entry(&jwk, alg);
        let out = token.run_ok(&[
            "assertion",
            "--key",
            label,
            "--client-id",
            "0oa-tpm2-pkcs11",
            "--audience",
            "https://example.okta.com/oauth2/v1/token",
        ]);
        assert_verifies(&jwk, &Jws::parse(out.trim_end()));
        let out = token.run_ok(&[
            "dpop",
            "--key",
            label,
            "--method",
            "GET",
            "--url",
            "https://example.okta.com/api/v1/users",
        ]);
        let proof = Jws::parse(out.trim_end());
        assert_eq!(proof.header["typ"], "dpop+jwt");
        assert_verifies(&jwk, &proof);
    }
    // The agent, its device in signer processes, signs with both keys.
    let dir = agent_support::SocketDir::new();
    let mut cmd = token.command(&["serve", "--socket"]);
    cmd.arg(dir.socket());
    let agent = agent_support::Agent::start_command(cmd, &dir.socket());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (label, alg) in [("es", "ES256"), ("rs", "RS256")] {
        let request = serde_json::json!({"key": label, "htm": "GET",
            "htu": "https://example.okta.com/api/v1/users"});
        let reply = runtime.block_on(agent_support::post(agent.socket(), "/v1/dpop", &request));
        let proof = reply.ok_member(&format!("a {alg} proof from the agent"), "proof");
        assert_verifies(&jwk(alg), &Jws::parse(&proof));
    }
    drop(agent);

    // keybound's use left nothing loaded in the TPM.
    assert_eq!(transient_handles(&token.tpm), Vec::<String>::new());
}
