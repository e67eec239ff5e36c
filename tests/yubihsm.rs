//! keybound on a YubiHSM 2 through Yubico's PKCS#11 module (`yubihsm_pkcs11.so`), tested
//! live against the `yubihsm` crate's MockHsm behind a test connector on 127.0.0.1:0
//! (tests/yubihsm_support). Every signature is verified with the p256 crate from the
//! published JWK (tests/support's `Verifier`), never by keybound's code; the OAuth flow is
//! checked by the dev-server, and its access token with p256 from the dev-server's JWKS.

mod agent_support;
mod support;
mod yubihsm_support;

use std::collections::BTreeMap;

use serde_json::{Value, json};

use agent_support::*;
use support::*;
use yubihsm_support::*;

/// `keys generate --alg ES256` on the MockHsm; returns the kid it announces.
fn generate(hsm: &MockYubiHsm, label: &str) -> String {
    let args = ["keys", "generate", "--label", label, "--alg", "ES256"];
    let out = assert_success(&hsm.keybound(&args), &args);
    let line = out.trim_end();
    let prefix = format!("generated ES256 key '{label}' (kid ");
    let suffix = format!(") on token '{YUBIHSM_TOKEN}'");
    line.strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("unexpected keys generate line {line:?}"))
        .to_owned()
}

/// The `keys` of `keybound jwks [--label L]...`.
fn jwks(hsm: &MockYubiHsm, labels: &[&str]) -> Vec<Value> {
    let mut args = vec!["jwks"];
    for label in labels {
        args.extend(["--label", label]);
    }
    let out = assert_success(&hsm.keybound(&args), &args);
    let doc: Value = serde_json::from_str(&out).expect("jwks prints JSON");
    doc["keys"].as_array().expect("keys is an array").clone()
}

/// A signing command's one compact JWS.
fn sign(hsm: &MockYubiHsm, args: &[&str]) -> Jws {
    let out = assert_success(&hsm.keybound(args), &args);
    Jws::parse(out.trim_end())
}

/// A key made with the crate's own client, not by keybound: P-256, sign-ecdsa plus
/// `extra` capabilities, labelled `label`. Returns its object id.
fn device_key(hsm: &MockYubiHsm, id: u16, label: &str, extra: yubihsm::Capability) -> u16 {
    hsm.client()
        .generate_asymmetric_key(
            id,
            label.into(),
            yubihsm::Domain::DOM1,
            yubihsm::Capability::SIGN_ECDSA | extra,
            yubihsm::asymmetric::Algorithm::EcP256,
        )
        .expect("generate a key with the yubihsm client")
}

#[test]
fn generate_audit_jwks_assertion_and_dpop_verify_independently() {
    let hsm = MockYubiHsm::start();
    let kid = generate(&hsm, "client-auth");

    // The audit passes and names what each attribute means on a YubiHSM 2.
    let args = ["keys", "audit"];
    let audit = assert_success(&hsm.keybound(&args), &args);
    for needle in [
        "profile yubihsm2",
        "Yubico (www.yubico.com)",
        "verdict: pass",
        "exportable-under-wrap",
        "not a history",
        "generated on this device",
    ] {
        assert!(audit.contains(needle), "audit says {needle:?}:\n{audit}");
    }
    let args = ["keys", "audit", "--json"];
    let json: Value =
        serde_json::from_str(&assert_success(&hsm.keybound(&args), &args)).expect("audit --json");
    let key = &json[0];
    assert_eq!(key["verdict"], "pass", "{key}");
    assert_eq!(key["token"]["profile"], "yubihsm2");
    for (name, value) in [
        ("CKA_EXTRACTABLE", false),
        ("CKA_NEVER_EXTRACTABLE", true),
        ("CKA_SENSITIVE", true),
        ("CKA_LOCAL", true),
        ("CKA_SIGN", true),
    ] {
        assert_eq!(key["attributes"][name], value, "{name}: {key}");
    }
    assert!(
        key["meanings"]["CKA_EXTRACTABLE"]
            .as_str()
            .is_some_and(|m| m.contains("exportable-under-wrap")),
        "{key}"
    );

    let keys = jwks(&hsm, &[]);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let jwk = &keys[0];
    assert_jwks_entry(jwk, "ES256");
    assert_eq!(jwk["kid"], kid.as_str());
    assert_eq!(jwks(&hsm, &["client-auth"]), keys);

    // CKM_ECDSA on the YubiHSM returns raw r||s: the Verifier takes exactly 64 bytes.
    let assertion = sign(&hsm, &assertion_args("client-auth"));
    assert_eq!(assertion.signature.len(), 64);
    assert_verifies(jwk, &assertion);
    assert_eq!(assertion.header["kid"], kid.as_str());
    assert_eq!(assertion.claims["aud"], AUDIENCE);

    let proof = sign(
        &hsm,
        &[
            "dpop",
            "--key",
            "client-auth",
            "--method",
            "post",
            "--url",
            "https://Server.example.com/token?x=1",
        ],
    );
    assert_verifies(jwk, &proof);
    assert_eq!(proof.header["typ"], "dpop+jwt");
    assert_eq!(proof.header["jwk"], required_public_members(jwk));
    assert_eq!(proof.claims["htm"], "POST");
    assert_eq!(proof.claims["htu"], "https://server.example.com/token");
}

/// A key with the exportable-under-wrap capability (CKA_EXTRACTABLE=true on this module)
/// does not sign and is not published, though the device made it (CKA_LOCAL=true); an
/// imported key (CKA_LOCAL=false) is refused too. keybound's own key beside them passes.
#[test]
fn a_key_exportable_under_wrap_is_refused() {
    let hsm = MockYubiHsm::start();
    let good = generate(&hsm, "good");
    device_key(
        &hsm,
        0x0100,
        "exportable",
        yubihsm::Capability::EXPORTABLE_UNDER_WRAP,
    );
    hsm.client()
        .put_asymmetric_key(
            0x0101,
            "imported".into(),
            yubihsm::Domain::DOM1,
            yubihsm::Capability::SIGN_ECDSA,
            yubihsm::asymmetric::Algorithm::EcP256,
            [0x11u8; 32].to_vec(),
        )
        .expect("import a key with the yubihsm client");

    let args = ["keys", "audit"];
    let out = hsm.keybound(&args);
    assert_exit(&out, 3, &args);
    let audit = stdout(&out);
    assert!(
        audit.contains(
            "CKA_EXTRACTABLE=true (YubiHSM 2: the key's exportable-under-wrap capability"
        ),
        "the finding names the YubiHSM meaning:\n{audit}"
    );
    assert!(
        audit.contains("CKA_LOCAL=false (YubiHSM 2: generated on this device"),
        "the imported key is refused by its origin:\n{audit}"
    );
    let args = ["keys", "audit", "--json"];
    let out = hsm.keybound(&args);
    assert_exit(&out, 3, &args);
    let verdicts: BTreeMap<String, (Value, Value)> =
        serde_json::from_str::<Vec<Value>>(&stdout(&out))
            .expect("audit --json")
            .into_iter()
            .map(|k| {
                (
                    k["label"].as_str().unwrap_or_default().to_owned(),
                    (k["verdict"].clone(), k["attributes"].clone()),
                )
            })
            .collect();
    assert_eq!(verdicts["good"].0, "pass");
    assert_eq!(verdicts["exportable"].0, "fail");
    assert_eq!(verdicts["exportable"].1["CKA_EXTRACTABLE"], true);
    assert_eq!(verdicts["exportable"].1["CKA_NEVER_EXTRACTABLE"], false);
    assert_eq!(verdicts["exportable"].1["CKA_LOCAL"], true);
    assert_eq!(verdicts["imported"].0, "fail");
    assert_eq!(verdicts["imported"].1["CKA_LOCAL"], false);

    for label in ["exportable", "imported"] {
        let args = assertion_args(label);
        let line = assert_error(&hsm.keybound(&args), &args);
        assert!(
            line.contains(&format!("key '{label}' may not sign")),
            "{label}: {line}"
        );
        let args = ["dpop", "--key", label, "--method", "GET", "--url", AUDIENCE];
        assert_error(&hsm.keybound(&args), &args);
    }
    let out = hsm.keybound(&["jwks"]);
    let keys =
        serde_json::from_str::<Value>(&assert_success(&out, &"jwks")).expect("jwks JSON")["keys"]
            .clone();
    assert_eq!(keys.as_array().map(Vec::len), Some(1), "{keys}");
    assert_eq!(keys[0]["kid"], good.as_str());
    assert!(
        stderr(&out).contains("key 'exportable' left out of the JWKS"),
        "{}",
        describe(&out)
    );
}

/// `keybound token` with the assertion key and the DPoP key both on the YubiHSM: the
/// dev-server checks the assertion and the proof and issues a DPoP-bound token.
#[test]
fn oauth_token_with_both_keys_on_the_yubihsm() {
    let hsm = MockYubiHsm::start();
    generate(&hsm, "client-auth");
    let dpop_kid = generate(&hsm, "dpop");
    let jwks_file = hsm.write_file(
        "client-jwks.json",
        &json!({ "keys": jwks(&hsm, &["client-auth"]) }).to_string(),
    );
    let server = DevServer::start(DEV_CLIENT_ID, &jwks_file);
    hsm.write_config(&format!(
        "{}\n{}",
        hsm.config_text(),
        dev_client(&server.base)
    ));

    let args = ["token", "--json"];
    let t: Value =
        serde_json::from_str(&assert_success(&hsm.keybound(&args), &args)).expect("token JSON");
    assert_eq!(t["token_type"], "DPoP");
    assert_eq!(
        t["cnf_jkt"],
        dpop_kid.as_str(),
        "bound to the YubiHSM DPoP key"
    );
    let access = Jws::parse(t["access_token"].as_str().expect("access_token"));
    assert_eq!(access.claims["cnf"]["jkt"], dpop_kid.as_str());
    assert_eq!(access.claims["sub"], DEV_CLIENT_ID);
    // The dev-server's own access-token key, fetched by curl, verifies the token.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", &format!("{}/oauth2/v1/keys", server.base)])
        .output()
        .expect("run curl");
    let keys: Value = serde_json::from_slice(&out.stdout).expect("the dev-server's JWKS");
    assert_verifies(&keys["keys"][0], &access);
}

/// `keybound serve` on the YubiHSM: proofs and assertions from the agent verify with the
/// published keys, and a token comes from the dev-server through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_signs_on_the_yubihsm() {
    let hsm = MockYubiHsm::start();
    let mut kids = BTreeMap::new();
    for label in ["client-auth", "dpop"] {
        kids.insert(label, generate(&hsm, label));
    }
    let jwks_file = hsm.write_file(
        "client-jwks.json",
        &json!({ "keys": jwks(&hsm, &["client-auth"]) }).to_string(),
    );
    let server = DevServer::start(DEV_CLIENT_ID, &jwks_file);
    hsm.write_config(&format!(
        "{}\n{}\n[agent]\n{}\n",
        hsm.config_text(),
        dev_client(&server.base),
        allow_uid(own_uid(), "")
    ));
    let cli = jwks(&hsm, &[]);
    let dir = SocketDir::new();
    let mut cmd = hsm.command(&["serve", "--socket"]);
    cmd.arg(dir.socket());
    let agent = Agent::start_command(cmd, &dir.socket());
    served_jwks(&agent, &cli).await;
    // Both public keys, as `keybound jwks --label` prints them (the DPoP key is not in the
    // client's JWKS).
    let published = by_kid(&jwks(&hsm, &["client-auth", "dpop"]));

    let start = window_start();
    let proof = post(
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://a.example/x?y=1"),
    )
    .await
    .ok_member("POST /v1/dpop", "proof");
    check_proof(
        &published,
        &proof,
        &want_proof(&kids["dpop"], "GET", "https://a.example/x"),
        window_end(start),
    );

    let start = window_start();
    let request = json!({ "key": "client-auth", "client_id": "0oa1",
                          "audience": "https://a.example/token" });
    let assertion = post(agent.socket(), "/v1/assertion", &request)
        .await
        .ok_member("POST /v1/assertion", "assertion");
    check_assertion(
        &published,
        &assertion,
        &kids["client-auth"],
        "0oa1",
        "https://a.example/token",
        60,
        window_end(start),
    );

    let token = post(agent.socket(), "/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token");
    assert_eq!(token["token_type"], "DPoP");
    let claims = Jws::parse(token["access_token"].as_str().expect("access_token")).claims;
    assert_eq!(claims["cnf"]["jkt"], kids["dpop"].as_str(), "{claims}");
}

/// `keybound bench` runs on the YubiHSM (one session, as the profile says) and reports raw
/// and pipeline rates; nothing is asserted about speed. `KEYBOUND_BENCH_SECONDS` (default
/// 2) sets the measuring time.
#[test]
fn bench_runs_on_the_yubihsm() {
    let hsm = MockYubiHsm::start();
    generate(&hsm, "bench");
    let seconds = std::env::var("KEYBOUND_BENCH_SECONDS").unwrap_or_else(|_| "2".into());
    let args = ["bench", "--key", "bench", "--seconds", &seconds, "--json"];
    let out = assert_success(&hsm.keybound(&args), &args);
    eprintln!("keybound bench on the mock YubiHSM:\n{out}");
    let report: Value = serde_json::from_str(&out).expect("bench --json");
    assert!(report.is_object(), "{report}");
}

/// Why the profile leaves CKA_ALLOWED_MECHANISMS out: the same profile with it in the
/// template (`omit = []`) cannot generate on the YubiHSM; the module answers
/// CKR_ATTRIBUTE_TYPE_INVALID, and keybound says so in one line.
#[test]
fn the_module_refuses_allowed_mechanisms_in_a_template() {
    let hsm = MockYubiHsm::start();
    let dir = hsm.path("profiles");
    std::fs::create_dir(&dir).expect("create profiles dir");
    let profile = include_str!("../hsm-profiles/yubihsm2.toml")
        .replace("omit = [\"allowed-mechanisms\"]", "omit = []");
    assert!(profile.contains("omit = []"));
    std::fs::write(dir.join("yubihsm2.toml"), profile).expect("write profile");
    hsm.write_config(&hsm.config_text().replace(
        "sessions = 1\n",
        &format!("sessions = 1\nprofiles_dir = \"{}\"\n", dir.display()),
    ));
    let args = ["keys", "generate", "--label", "k", "--alg", "ES256"];
    let line = assert_error(&hsm.keybound(&args), &args);
    assert!(line.contains("CKR_ATTRIBUTE_TYPE_INVALID"), "{line}");
}
