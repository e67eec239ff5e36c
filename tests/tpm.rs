//! The TPM 2.0 backend end to end, on a real swtpm per test (never a mock): keys generated in
//! the TPM, `keys list/audit`, `jwks`, private_key_jwt assertions and DPoP proofs, each
//! signature checked by an independent verifier (p256, p384, rsa) from the JWKS keybound
//! printed; swtpm restarted under a running keybound; a duplicable key made with tpm2-tools
//! refused; 1,000 signatures and error paths without leaking one of swtpm's 3 object slots;
//! the OAuth flow against the dev-server (`keybound-devserver`) with both keys in the TPM.
#![cfg(feature = "tpm")]

mod support;
mod tpm_support;

use std::fs;
use std::process::Stdio;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keybound::config::Config;
use keybound::jose::Alg;
use keybound::keyring::Keyring;
use serde_json::Value;
use support::{Jws, Verifier, assert_jwks_entry, assert_signature, assert_verifies};
use tpm_support::{TpmHome, tpm2_ok, transient_handles, wait_until_nothing_loaded};

const CLIENT_ID: &str = "0oa-tpm-test";
const AUDIENCE: &str = "https://example.okta.com/oauth2/v1/token";

/// `keybound jwks --label <label>`: the one entry.
fn jwk_of(home: &TpmHome, label: &str) -> Value {
    let doc: Value = serde_json::from_str(&home.run_ok(&["jwks", "--label", label])).expect("jwks");
    let keys = doc["keys"].as_array().expect("keys array");
    assert_eq!(keys.len(), 1, "{doc}");
    keys[0].clone()
}

fn assertion(home: &TpmHome, label: &str) -> Jws {
    let out = home.run_ok(&[
        "assertion",
        "--key",
        label,
        "--client-id",
        CLIENT_ID,
        "--audience",
        AUDIENCE,
    ]);
    Jws::parse(out.trim_end())
}

fn dpop(home: &TpmHome, label: &str) -> Jws {
    let out = home.run_ok(&[
        "dpop",
        "--key",
        label,
        "--method",
        "POST",
        "--url",
        "https://example.okta.com/oauth2/v1/token?x=1",
        "--nonce",
        "n-1",
    ]);
    Jws::parse(out.trim_end())
}

/// generate → list → audit → jwks → assertion + DPoP proof, verified independently.
fn round_trip(alg: &str) {
    let home = TpmHome::new();
    let label = format!("key-{}", alg.to_lowercase());
    let kid = home.generate(&label, alg);

    let listed: Vec<Value> =
        serde_json::from_str(&home.run_ok(&["keys", "list", "--json"])).expect("list --json");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["label"], label.as_str());
    assert_eq!(listed[0]["alg"], alg);
    assert_eq!(listed[0]["kid"], kid.as_str());
    assert_eq!(listed[0]["policy"], "pass");

    let audit: Vec<Value> =
        serde_json::from_str(&home.run_ok(&["keys", "audit", "--json"])).expect("audit --json");
    let attrs = &audit[0]["attributes"];
    for (name, want) in [
        ("fixedTPM", true),
        ("fixedParent", true),
        ("sensitiveDataOrigin", true),
        ("userWithAuth", true),
        ("sign", true),
        ("decrypt", false),
        ("restricted", false),
    ] {
        assert_eq!(attrs[name], want, "{name} in {attrs}");
    }
    assert_eq!(audit[0]["verdict"], "pass", "{}", audit[0]);
    assert_eq!(audit[0]["token"]["label"], "tpm");
    let text = home.run_ok(&["keys", "audit", "--label", &label]);
    for name in ["fixedTPM", "fixedParent", "sensitiveDataOrigin"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(name) && l.ends_with("true")),
            "audit prints {name}: {text}"
        );
    }

    let jwk = jwk_of(&home, &label);
    assert_jwks_entry(&jwk, alg);
    assert_eq!(jwk["kid"], kid.as_str());

    let jws = assertion(&home, &label);
    assert_eq!(jws.header["kid"], kid.as_str());
    assert_eq!(jws.claims["iss"], CLIENT_ID);
    assert_verifies(&jwk, &jws);

    let proof = dpop(&home, &label);
    assert_eq!(proof.header["typ"], "dpop+jwt");
    assert_eq!(
        proof.claims["htu"],
        "https://example.okta.com/oauth2/v1/token"
    );
    // The proof carries its own public key; it must be the key of the JWKS.
    for member in ["kty", "crv", "x", "y", "n", "e"] {
        assert_eq!(proof.header["jwk"][member], jwk[member], "jwk.{member}");
    }
    assert_verifies(&jwk, &proof);

    // Nothing keybound loaded is left in the TPM once it exits.
    assert_eq!(transient_handles(&home.tpm), Vec::<String>::new());
}

#[test]
fn es256_generate_list_audit_jwks_assertion_dpop() {
    round_trip("ES256");
}

#[test]
fn rs256_generate_list_audit_jwks_assertion_dpop() {
    round_trip("RS256");
}

/// The TPM's RSAPSS salt is the digest length (32), as RFC 7518 §3.5 requires: the
/// independent verifier accepts exactly salt 32.
#[test]
fn ps256_generate_list_audit_jwks_assertion_dpop() {
    round_trip("PS256");
}

#[test]
fn es384_generate_list_audit_jwks_assertion_dpop() {
    round_trip("ES384");
}

#[test]
fn key_files_are_private_and_survive_like_the_tpm_does() {
    use std::os::unix::fs::PermissionsExt as _;
    let home = TpmHome::new();
    home.generate("dpop", "ES256");
    let mode = |p: &std::path::Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&home.key_file("dpop")), 0o600);
    assert_eq!(mode(&home.state_dir().join("keys")), 0o700);
    let file: Value =
        serde_json::from_str(&fs::read_to_string(home.key_file("dpop")).expect("read")).unwrap();
    assert_eq!(file["label"], "dpop");
    assert_eq!(file["alg"], "ES256");
    // The public blob is a TPM2B_PUBLIC, as tpm2-tools writes it: tpm2_print reads it.
    let public = STANDARD.decode(file["public"].as_str().unwrap()).unwrap();
    let pub_path = home.path("dpop.pub");
    fs::write(&pub_path, &public).unwrap();
    let printed = tpm2_ok(
        &home.tpm,
        "print",
        &["-t", "TPM2B_PUBLIC", pub_path.to_str().unwrap()],
    );
    assert!(
        printed.contains("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"),
        "{printed}"
    );
    // The same label twice is refused.
    let (_, err) = home.run_fail(&["keys", "generate", "--label", "dpop"], 1);
    assert!(err.contains("already exists"), "{err}");
}

/// swtpm killed and started again (what a reboot does to a TPM) while keybound runs:
/// the same key signs again, with the same kid, without restarting keybound; and a fresh
/// keybound process after the restart uses the key file as before.
#[test]
fn swtpm_restart_mid_test_same_key_same_kid() {
    let mut home = TpmHome::in_process();
    let kid = home.generate("client-auth", "ES256");
    let jwk = jwk_of(&home, "client-auth");
    let before = assertion(&home, "client-auth");
    assert_verifies(&jwk, &before);

    // In process: one Keyring across the restart.
    let keyring = open(&home);
    let key = keyring.signing_key("client-auth").expect("signing key");
    assert_eq!(key.kid(), kid);
    let verifier = Verifier::from_jwk(&jwk);
    sign_and_verify(&key, &verifier, "before the restart");

    // Spawning swtpm while keybound's thread is mid-command would hand the child that
    // connection (see tpm_support::loaded_objects): let it go idle first.
    wait_until_nothing_loaded(&home.tpm);
    home.tpm.restart();
    sign_and_verify(&key, &verifier, "after the restart");

    // While the TPM is gone the error says so, with the action; once it is back, keybound
    // carries on by itself.
    wait_until_nothing_loaded(&home.tpm);
    keyring.health().expect("healthy");
    home.tpm.stop();
    assert!(keyring.health().is_err(), "health while the TPM is down");
    let err = key
        .sign(Alg::ES256.to_be_signed(b"while down"))
        .expect_err("no TPM");
    let text = err.to_string();
    assert!(
        text.contains("No TPM answers through tcti") && text.contains("reconnects"),
        "{text}"
    );
    home.tpm.restart();
    keyring.health().expect("healthy again");
    sign_and_verify(&key, &verifier, "after coming back");
    wait_until_nothing_loaded(&home.tpm);
    drop(keyring);

    // A new process: same kid in the JWKS, assertion verifies with the JWK from before.
    assert_eq!(jwk_of(&home, "client-auth"), jwk);
    let after = assertion(&home, "client-auth");
    assert_eq!(after.header["kid"], kid.as_str());
    assert_verifies(&jwk, &after);
    assert_eq!(transient_handles(&home.tpm), Vec::<String>::new());
}

/// A key made outside keybound with tpm2-tools, under the same storage key but without
/// fixedTPM and fixedParent (duplicable, so exportable), is refused: `keys audit` exits 3
/// naming the attributes, `assertion` refuses to sign, `jwks` leaves it out.
#[test]
fn a_duplicable_key_made_with_tpm2_tools_is_refused() {
    let home = TpmHome::new();
    let good = home.generate("good", "ES256");
    let primary = home.path("primary.ctx");
    let (public, private) = (home.path("dup.pub"), home.path("dup.priv"));
    // keybound's storage primary is the TCG SRK template: ECC P-256, AES-128-CFB, unique
    // = 64 zero bytes.
    let mut create_primary = tpm_support::tpm2(&home.tpm, "createprimary")
        .args(["-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb"])
        .args([
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
        ])
        .args(["-u", "-", "-c"])
        .arg(&primary)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tpm2_createprimary");
    std::io::Write::write_all(create_primary.stdin.as_mut().expect("stdin"), &[0u8; 64])
        .expect("write unique");
    drop(create_primary.stdin.take());
    assert!(create_primary.wait().expect("wait").success());
    tpm2_ok(
        &home.tpm,
        "create",
        &[
            "-C",
            primary.to_str().unwrap(),
            "-g",
            "sha256",
            "-G",
            "ecc256:ecdsa-sha256",
            "-a",
            "sign|sensitivedataorigin|userwithauth",
            "-u",
            public.to_str().unwrap(),
            "-r",
            private.to_str().unwrap(),
        ],
    );
    // tpm2-tools leaves its primary loaded on a TPM without resource manager.
    tpm2_ok(&home.tpm, "flushcontext", &["-t"]);

    // Into keybound's state directory, in its file format (tpm2-tools' blobs as they are).
    let b64 = |p: &std::path::Path| STANDARD.encode(fs::read(p).expect("read blob"));
    let file = serde_json::json!({
        "version": 1, "label": "dup", "alg": "ES256",
        "public": b64(&public), "private": b64(&private),
    });
    fs::write(home.key_file("dup"), file.to_string()).expect("write key file");

    let (out, _) = home.run_fail(&["keys", "audit", "--label", "dup"], 3);
    for needle in [
        "fixedTPM                 false",
        "fixedParent              false",
        "sensitiveDataOrigin      true",
        "FAIL: duplicable=true",
        "FAIL: fixedTPM=false",
        "verdict: fail",
    ] {
        assert!(out.contains(needle), "audit mentions {needle:?}:\n{out}");
    }
    home.run_fail(&["keys", "audit"], 3);
    let (_, err) = home.run_fail(
        &[
            "assertion",
            "--key",
            "dup",
            "--client-id",
            CLIENT_ID,
            "--audience",
            AUDIENCE,
        ],
        1,
    );
    assert!(
        err.contains("key 'dup' may not sign") && err.contains("duplicable=true"),
        "{err}"
    );
    let listed = home.run_ok(&["keys", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("dup ") && l.split_whitespace().nth(3) == Some("fail")),
        "{listed}"
    );
    let out = home.keybound(&["jwks"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("jwks");
    let kids: Vec<&str> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [good.as_str()], "only 'good' is published: {doc}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("key 'dup' left out of the JWKS"));
}

/// Flush discipline on a bare swtpm (3 object slots): 1,000 signatures in a row from one
/// process, each a separate request (storage key and signing key loaded and flushed every
/// time), interleaved with error paths (a corrupted blob, an unknown key, a wrong algorithm),
/// never fail with TPM_RC_OBJECT_MEMORY and leave nothing loaded.
#[test]
fn flush_discipline_1000_signatures_and_error_paths() {
    let home = TpmHome::in_process();
    home.generate("k", "ES256");
    home.generate("victim", "ES256");
    // Corrupt the victim's private blob: TPM2_Load fails its integrity check.
    let path = home.key_file("victim");
    let mut file: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let mut private = STANDARD.decode(file["private"].as_str().unwrap()).unwrap();
    private[40] ^= 0x01;
    file["private"] = STANDARD.encode(&private).into();
    fs::write(&path, file.to_string()).unwrap();

    // No child processes while the Keyring lives (see tpm_support::loaded_objects).
    let verifier = Verifier::from_jwk(&jwk_of(&home, "k"));
    let keyring = open(&home);
    let key = keyring.signing_key("k").expect("k");
    let victim = keyring
        .keys()
        .unwrap()
        .keys
        .into_iter()
        .find(|k| k.label() == "victim")
        .unwrap();
    let started = Instant::now();
    for i in 0..1000 {
        sign_and_verify(&key, &verifier, &format!("signature {i}"));
        if i % 100 == 0 {
            let err = keyring.audit(&victim).err().expect("corrupted blob");
            let text = err.to_string();
            assert!(
                text.contains("TPM2_Load failed: TPM_RC_INTEGRITY")
                    && text.contains("generate a new one"),
                "{text}"
            );
            assert!(keyring.signing_key("no-such-key").is_err());
            assert!(key.sign(Alg::RS256.to_be_signed(b"wrong alg")).is_err());
            let err = keyring
                .signing_key("victim")
                .err()
                .expect("a corrupted blob is not approved");
            assert!(!err.to_string().contains("OBJECT_MEMORY"), "{err}");
            wait_until_nothing_loaded(&home.tpm);
        }
    }
    eprintln!(
        "1,000 separate signatures in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    wait_until_nothing_loaded(&home.tpm);
    drop(keyring);
    assert_eq!(transient_handles(&home.tpm), Vec::<String>::new());

    // And back to back on one loaded key: `bench` signs for a few seconds without a leak.
    // (How many signatures that is depends on the machine, so it is not asserted.)
    let out = home.run_ok(&["bench", "--key", "k", "--seconds", "4", "--json"]);
    let report: Value = serde_json::from_str(&out).expect("bench json");
    assert!(report["raw_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["pipeline_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(transient_handles(&home.tpm), Vec::<String>::new());
}

/// A key auth value from the environment: needed to sign, never sent again once refused.
#[test]
fn key_auth_value_from_the_environment() {
    let home = TpmHome::with_token_lines("key_auth_env = \"KEYBOUND_TPM_KEY_AUTH\"");
    let with_auth = |auth: Option<&str>, args: &[&str]| {
        let mut cmd = home.command(args);
        match auth {
            Some(a) => cmd.env("KEYBOUND_TPM_KEY_AUTH", a),
            None => cmd.env_remove("KEYBOUND_TPM_KEY_AUTH"),
        };
        cmd.output().expect("spawn keybound")
    };
    let out = with_auth(Some("s3cret"), &["keys", "generate", "--label", "authed"]);
    assert!(out.status.success(), "{out:?}");
    let file: Value =
        serde_json::from_str(&fs::read_to_string(home.key_file("authed")).unwrap()).unwrap();
    assert_eq!(file["auth"], true);
    let sign = [
        "assertion",
        "--key",
        "authed",
        "--client-id",
        "c",
        "--audience",
        AUDIENCE,
    ];
    let out = with_auth(Some("s3cret"), &sign);
    assert!(out.status.success(), "{out:?}");
    let jws = Jws::parse(String::from_utf8_lossy(&out.stdout).trim_end());
    // Listing, auditing and publishing use no auth value: a wrong one changes nothing there
    // (and costs no dictionary-attack strike).
    let jwk = jwk_with(&home, "wrong", "authed");
    assert_verifies(&jwk, &jws);

    let out = with_auth(None, &sign);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("no TPM key auth value") && err.contains("KEYBOUND_TPM_KEY_AUTH"),
        "{err}"
    );

    let out = with_auth(Some("wrong"), &sign);
    let err = String::from_utf8_lossy(&out.stderr);
    // The key's authorization refused: EX_NOPERM.
    assert_eq!(out.status.code(), Some(77));
    assert!(
        err.contains("TPM_RC_AUTH_FAIL") && err.contains("does not send a refused value again"),
        "{err}"
    );
    // The right value still works (one failure is far from the lockout threshold).
    let out = with_auth(Some("s3cret"), &sign);
    assert!(out.status.success(), "{out:?}");

    // Without key_auth_* in the config the key is still listed, but does not sign.
    let config = fs::read_to_string(home.config_path()).unwrap();
    home.write_config(&config.replace("key_auth_env = \"KEYBOUND_TPM_KEY_AUTH\"", ""));
    assert!(home.run_ok(&["keys", "list"]).contains("authed"));
    let (_, err) = home.run_fail(&sign, 1);
    assert!(err.contains("it was created with an auth value"), "{err}");
}

fn jwk_with(home: &TpmHome, auth: &str, label: &str) -> Value {
    let out = home
        .command(&["jwks", "--label", label])
        .env("KEYBOUND_TPM_KEY_AUTH", auth)
        .output()
        .expect("jwks");
    assert!(out.status.success(), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["keys"][0].clone()
}

/// `primary_handle`: the storage key persisted at 0x81000001 on first use, reused after a
/// TPM restart.
#[test]
fn persistent_primary_handle() {
    let mut home = TpmHome::with_token_lines("primary_handle = 0x81000001");
    let kid = home.generate("p", "ES256");
    let persistent = tpm2_ok(&home.tpm, "getcap", &["handles-persistent"]);
    assert!(persistent.contains("0x81000001"), "{persistent}");
    home.tpm.restart();
    let jwk = jwk_of(&home, "p");
    assert_eq!(jwk["kid"], kid.as_str());
    assert_verifies(&jwk, &assertion(&home, "p"));
    assert_eq!(transient_handles(&home.tpm), Vec::<String>::new());
}

/// Errors in words, with the action: nothing listening at the TCTI.
#[test]
fn unreachable_tpm_is_reported_with_the_action() {
    let mut home = TpmHome::new();
    home.tpm.stop();
    // The TPM may come back: EX_TEMPFAIL.
    let (_, err) = home.run_fail(&["keys", "list"], 75);
    assert!(
        err.contains("TSS2_TCTI_RC_IO_ERROR") && err.contains(&home.tpm.tcti()),
        "{err}"
    );
}

/// The OAuth flow of the OAuth issue with both keys in the TPM: the dev-server knows
/// the client by the JWKS of its TPM key; `token` and `call` succeed.
#[test]
fn oauth_end_to_end_with_both_keys_in_the_tpm() {
    let home = TpmHome::new();
    home.generate("client-auth", "ES256");
    home.generate("dpop", "ES256");
    let jwks_path = home.path("jwks.json");
    fs::write(&jwks_path, home.run_ok(&["jwks", "--label", "client-auth"])).unwrap();
    let server = keybound_devserver::Background::start(
        0,
        keybound_devserver::Settings::new(
            CLIENT_ID,
            keybound_devserver::JwksSource::File(jwks_path.clone()),
        ),
    )
    .unwrap_or_else(|e| panic!("the dev-server did not start: {e}"));
    let base = server.base().to_owned();

    home.write_config(&home.config_text(&format!(
        "[[client]]\nname = \"dev\"\nserver = \"okta\"\n\
         token_endpoint = \"{base}/oauth2/v1/token\"\nclient_id = \"{CLIENT_ID}\"\n\
         assertion_key = \"client-auth\"\ndpop_key = \"dpop\"\n\
         scopes = [\"okta.users.read\"]\nallowed_scopes = [\"okta.users.read\"]\n"
    )));
    let token: Value =
        serde_json::from_str(&home.run_ok(&["token", "--json"])).expect("token json");
    assert_eq!(token["token_type"], "DPoP", "{token}");
    let dpop_jwk = jwk_of(&home, "dpop");
    assert_eq!(token["cnf_jkt"], dpop_jwk["kid"], "{token}");
    let users: Value =
        serde_json::from_str(&home.run_ok(&["call", &format!("{base}/api/v1/users")]))
            .expect("users json");
    assert!(users.as_array().is_some_and(|u| !u.is_empty()), "{users}");
    drop(server);
    assert_eq!(transient_handles(&home.tpm), Vec::<String>::new());
}

/// The key store is trusted like the PIN file (review of issue #9): a key file another user
/// owns or can write, or a state directory others can write, is refused by everything that
/// reads the store (`keys list`, `jwks`, signing), with the file and the fix named. A key
/// file planted there (for instance one made with tpm2-tools under the same storage key,
/// which passes the policy and TPM2_Load) never becomes a published key.
#[test]
fn an_untrusted_key_store_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let home = TpmHome::new();
    home.generate("k", "ES256");
    let file = home.key_file("k");
    let chmod = |p: &std::path::Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod")
    };
    let sign = [
        "assertion",
        "--key",
        "k",
        "--client-id",
        "c",
        "--audience",
        AUDIENCE,
    ];
    let refused_everywhere = |needles: &[&str]| {
        for args in [&["keys", "list"][..], &["jwks"][..], &sign[..]] {
            let out = home.keybound(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} accepted it: {out:?}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            for needle in needles {
                assert!(stderr.contains(needle), "{args:?}: {needle:?} in {stderr}");
            }
        }
    };
    let file_name = file.display().to_string();

    chmod(&file, 0o666);
    refused_everywhere(&[&file_name, "writable by group or others", "chmod go-w"]);
    chmod(&file, 0o600);
    home.run_ok(&["jwks"]);

    // Giving a file away takes root (tests run as root in CI).
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&file, Some(65534), None).expect("chown 65534");
        refused_everywhere(&[&file_name, "owned by uid 65534"]);
        std::os::unix::fs::chown(&file, Some(0), None).expect("chown back");
        home.run_ok(&["jwks"]);
    }

    let state = home.state_dir();
    chmod(&state, 0o777);
    refused_everywhere(&[&state.display().to_string(), "mode 777", "chmod go-w"]);
    // Generating a key refuses it too, instead of writing into it with a warning.
    let (_, err) = home.run_fail(&["keys", "generate", "--label", "new"], 1);
    assert!(err.contains("mode 777"), "{err}");
    chmod(&state, 0o700);
    let out = home.run_ok(&["keys", "list"]);
    assert!(out.contains('k') && !out.contains("new"), "{out}");

    // No key directory yet: an open state directory is refused all the same.
    fs::remove_dir_all(state.join("keys")).expect("remove keys/");
    chmod(&state, 0o777);
    let (_, err) = home.run_fail(&["keys", "list"], 1);
    assert!(err.contains("mode 777"), "{err}");
}

// ---------------------------------------------------------------------------

/// A key file replaced under its label while a keyring holds the key approved (issue #9
/// F5): the approved key signs only as long as the file holds it; after the store is read
/// again the key is refused, never signed with another key than the one approved. (The
/// TPM backend names a key by a digest of its public area, so it refused this before the
/// re-approval existed too; this keeps it so.)
#[test]
fn a_key_file_replaced_under_a_running_keyring_is_refused() {
    let home = TpmHome::in_process();
    home.generate("k", "ES256");
    home.generate("other", "ES256");
    let verifier = Verifier::from_jwk(&jwk_of(&home, "k"));
    let other_file = fs::read_to_string(home.key_file("other")).expect("other.json");

    // No child processes while the Keyring lives (see tpm_support::loaded_objects).
    let keyring = open(&home);
    let key = keyring.signing_key("k").expect("k");
    sign_and_verify(&key, &verifier, "before");
    let mut replaced: Value = serde_json::from_str(&other_file).expect("JSON");
    replaced["label"] = "k".into();
    fs::write(home.key_file("k"), replaced.to_string()).expect("replace k.json");
    // Anything that lists the keys reads the store again.
    let listed = keyring.keys().expect("keys");
    assert!(listed.keys.iter().any(|k| k.label() == "k"), "{listed:?}");
    let err = key
        .sign(Alg::ES256.to_be_signed(b"after"))
        .expect_err("a replaced key does not sign")
        .to_string();
    assert!(err.contains("no key") && err.contains("object=k"), "{err}");
    wait_until_nothing_loaded(&home.tpm);
    drop(keyring);
}

/// The library's view of the test config: one Keyring, opened in this process.
fn open(home: &TpmHome) -> Keyring {
    let text = fs::read_to_string(home.config_path()).expect("read config");
    let config = Config::parse(&text).expect("config");
    Keyring::open(&config.token, config.policy, None).expect("open the TPM")
}

fn sign_and_verify(key: &keybound::keyring::SigningKey, verifier: &Verifier, message: &str) {
    // A compact JWS by hand: header and payload are any base64url text here.
    let header = support::b64(format!(r#"{{"alg":"ES256","m":"{message}"}}"#).as_bytes());
    let input = format!("{header}.{}", support::b64(b"{}"));
    let sig = key
        .sign(Alg::ES256.to_be_signed(input.as_bytes()))
        .unwrap_or_else(|e| panic!("{message}: {e}"));
    let jws = Jws::parse(&format!("{input}.{}", support::b64(sig.as_bytes())));
    assert_signature(verifier, &jws);
}
