//! Key management on a real SoftHSM2 token: `keys generate` makes sign-only,
//! non-extractable keys (checked from outside with pkcs11-tool), and
//! `keys list --json`, `keys audit --json`, `jwks` and `bench --json`
//! describe them consistently.

mod support;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use support::*;

/// One key per algorithm; `--alg` is left out for ES256 (the default).
/// Returns (label, alg, kid) per key.
fn generate_one_of_each(token: &DevToken) -> Vec<(String, &'static str, String)> {
    ALGS.iter()
        .map(|&alg| {
            let label = alg.to_lowercase();
            let kid = if alg == "ES256" {
                let out = token.run_ok(&["keys", "generate", "--label", &label]);
                parse_generated_line(&out, &label, alg)
            } else {
                token.generate(&label, alg)
            };
            (label, alg, kid)
        })
        .collect()
}

#[test]
fn generated_keys_are_sign_only_and_never_extractable_per_pkcs11_tool() {
    let token = DevToken::new();
    let keys = generate_one_of_each(&token);

    let out = token.pkcs11_tool(&["--list-objects"]);
    assert!(out.status.success(), "pkcs11-tool\n{}", describe(&out));
    let objects = parse_pkcs11_tool_objects(&stdout(&out));
    let listed: Vec<Value> =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).expect("keys list --json");

    for (label, alg, _) in &keys {
        let with_label = |kind: &str| {
            let found: Vec<_> = objects
                .iter()
                .filter(|o| o.heading.starts_with(kind) && o.fields["label"] == *label)
                .collect();
            assert_eq!(found.len(), 1, "one {kind} labelled {label}: {objects:#?}");
            found[0]
        };
        let private = with_label("Private Key Object");
        let public = with_label("Public Key Object");
        let key_type = if alg.starts_with("ES") { "EC" } else { "RSA" };
        assert!(private.heading.contains(key_type), "{label}: {private:?}");

        assert_eq!(private.fields["Usage"], "sign", "{label} is sign-only");
        let access: BTreeSet<&str> = private.fields["Access"].split(", ").collect();
        assert_eq!(
            access,
            BTreeSet::from([
                "sensitive",
                "always sensitive",
                "never extractable",
                "local"
            ]),
            "{label} access flags"
        );
        let mechanisms = private.fields.get("Allowed mechanisms").map(String::as_str);
        match *alg {
            "PS256" => assert!(
                mechanisms.is_some_and(|m| m.contains("RSA-PKCS-PSS")),
                "PS256 is recorded as CKA_ALLOWED_MECHANISMS RSA-PKCS-PSS: {private:?}"
            ),
            "RS256" => assert!(
                !mechanisms.is_some_and(|m| m.contains("RSA-PKCS-PSS")),
                "an RS256 key must not allow RSA-PKCS-PSS: {private:?}"
            ),
            _ => {}
        }

        // The public key is paired by CKA_ID; keys list reports the same id.
        assert_eq!(
            private.fields["ID"], public.fields["ID"],
            "{label} CKA_ID pair"
        );
        let entry = listed
            .iter()
            .find(|k| k["label"] == label.as_str())
            .unwrap_or_else(|| panic!("keys list --json lacks {label}: {listed:?}"));
        assert_eq!(
            entry["id"].as_str().map(str::to_lowercase),
            Some(private.fields["ID"].to_lowercase()),
            "{label}: keys list id is the hex CKA_ID"
        );
    }
}

#[test]
fn keys_list_audit_and_jwks_agree_on_generated_keys() {
    let token = DevToken::new();
    let keys = generate_one_of_each(&token);
    let kids: BTreeSet<&str> = keys.iter().map(|(_, _, kid)| kid.as_str()).collect();
    assert_eq!(kids.len(), 4, "distinct keys have distinct kids");

    // jwks: every passing key when no label is named, else just those named.
    let jwks = token.jwks(&[]);
    assert_eq!(jwks.len(), 4, "{jwks:?}");
    for (label, alg, kid) in &keys {
        let jwk = jwks
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("jwks lacks {label} ({kid}): {jwks:?}"));
        assert_jwks_entry(jwk, alg);
    }
    let two = token.jwks(&["es384", "ps256"]);
    let two_kids: BTreeSet<&str> = two.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(
        two_kids,
        BTreeSet::from([kid_of(&keys, "es384"), kid_of(&keys, "ps256")])
    );

    // keys list
    let text = token.run_ok(&["keys", "list"]);
    for (label, _, _) in &keys {
        assert!(
            text.contains(label.as_str()),
            "keys list names {label}:\n{text}"
        );
    }
    let listed = json_array(&token.run_ok(&["keys", "list", "--json"]), 4);
    let mut ids = BTreeSet::new();
    for entry in &listed {
        assert_members(entry, &["label", "id", "alg", "kid", "policy", "reasons"]);
        let (label, alg, kid) = key_named(&keys, entry);
        assert_eq!(entry["alg"], *alg, "{label}");
        assert_eq!(entry["kid"], kid.as_str(), "{label}");
        assert_eq!(entry["policy"], "pass", "{label}");
        assert_eq!(entry["reasons"], json!([]), "{label}");
        let id = entry["id"].as_str().expect("id is a string");
        assert!(
            !id.is_empty()
                && id.len().is_multiple_of(2)
                && id.chars().all(|c| c.is_ascii_hexdigit()),
            "id is hex: {id:?}"
        );
        ids.insert(id.to_owned());
    }
    assert_eq!(ids.len(), 4, "CKA_IDs are unique");

    // keys audit
    let out = token.keybound(&["keys", "audit", "--json"]);
    assert_exit(&out, 0, &"keys audit --json");
    let audited = json_array(&stdout(&out), 4);
    for entry in &audited {
        assert_members(
            entry,
            &[
                "label",
                "id",
                "alg",
                "kid",
                "token",
                "attributes",
                "verdict",
                "findings",
            ],
        );
        assert_members(
            &entry["token"],
            &[
                "label",
                "manufacturer",
                "model",
                "serial",
                "profile",
                "profile_tested_live",
            ],
        );
        assert_eq!(entry["token"]["profile"], "softhsm2");
        assert_eq!(entry["token"]["profile_tested_live"], true);
        let (label, alg, kid) = key_named(&keys, entry);
        let listed_entry = listed
            .iter()
            .find(|l| l["label"] == entry["label"])
            .unwrap();
        assert_eq!(entry["id"], listed_entry["id"], "{label}");
        assert_eq!(entry["alg"], *alg, "{label}");
        assert_eq!(entry["kid"], kid.as_str(), "{label}");
        assert_eq!(entry["attributes"], generated_key_attributes(), "{label}");
        assert_eq!(entry["verdict"], "pass", "{label}");
        assert_eq!(entry["findings"], json!([]), "{label}");
    }
    let out = token.keybound(&["keys", "audit", "--label", "rs256", "--json"]);
    assert_exit(&out, 0, &"keys audit --label rs256 --json");
    let one = json_array(&stdout(&out), 1);
    assert_eq!(one[0]["label"], "rs256");
    assert_exit(&token.keybound(&["keys", "audit"]), 0, &"keys audit");
}

/// One label rule for every backend (`token::Label`): a PKCS#11 token refuses what the TPM
/// store refuses, before anything is created on the token.
#[test]
fn bad_labels_are_refused_with_the_rule() {
    let token = DevToken::new();
    for bad in ["", "pkcs11:object=x", "tab\there"] {
        let out = token.keybound(&["keys", "generate", "--label", bad]);
        assert_exit(&out, 1, &format!("keys generate --label {bad:?}"));
        let err = stderr(&out);
        assert!(
            err.contains("non-empty, printable and not start with 'pkcs11:'"),
            "{bad:?}: {err}"
        );
    }
    let listed: Vec<Value> =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).expect("keys list --json");
    assert!(listed.is_empty(), "no key was created: {listed:?}");
}

#[test]
fn bench_json_reports_positive_rates() {
    let token = DevToken::new();
    token.generate("bench", "ES256");
    let out = token.run_ok(&[
        "bench",
        "--key",
        "bench",
        "--sessions",
        "2",
        "--seconds",
        "1",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).expect("bench --json prints JSON");
    for field in ["raw_per_s", "pipeline_per_s", "ratio"] {
        let value = report[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} is a number: {report}"));
        assert!(value.is_finite() && value > 0.0, "{field} > 0: {report}");
    }
}

/// What `keys audit` must read back from a key keybound generated.
fn generated_key_attributes() -> Value {
    json!({
        "CKA_EXTRACTABLE": false,
        "CKA_SENSITIVE": true,
        "CKA_ALWAYS_SENSITIVE": true,
        "CKA_NEVER_EXTRACTABLE": true,
        "CKA_LOCAL": true,
        "CKA_SIGN": true,
        "CKA_DECRYPT": false,
        "CKA_UNWRAP": false,
        "CKA_DERIVE": false,
        "CKA_PRIVATE": true,
        "CKA_TOKEN": true,
        "public CKA_LOCAL": true,
    })
}

fn json_array(text: &str, len: usize) -> Vec<Value> {
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{text}"));
    let array = value
        .as_array()
        .unwrap_or_else(|| panic!("a JSON array: {value}"));
    assert_eq!(array.len(), len, "{value:#}");
    array.clone()
}

fn kid_of<'a>(keys: &'a [(String, &str, String)], label: &str) -> &'a str {
    &keys.iter().find(|(l, _, _)| l == label).unwrap().2
}

fn key_named<'a>(
    keys: &'a [(String, &'static str, String)],
    entry: &Value,
) -> &'a (String, &'static str, String) {
    keys.iter()
        .find(|(label, _, _)| entry["label"] == label.as_str())
        .unwrap_or_else(|| panic!("unexpected key {entry}"))
}

/// keybound's processes at one SoftHSM token at once: every one opens the token, logs in
/// and lists the keys. SoftHSM rewrites its token file at every login and lets go of its
/// file lock before the bytes reach the file, so without keybound's own lock across
/// processes 3 to 5 of 240 such runs failed (`C_Login`: CKR_USER_PIN_NOT_INITIALIZED
/// or CKR_GENERAL_ERROR, seen on this machine); with it, none does. Meanwhile new keys
/// are generated one after another: a listing sees each or not yet, never a broken one.
#[test]
fn processes_at_one_token_at_once_all_open_log_in_and_list() {
    const WORKERS: usize = 4;
    const RUNS: usize = 80;
    let token = DevToken::new();
    token.generate("dpop", "ES256");
    let failures = std::sync::Mutex::new(Vec::new());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let listers: Vec<_> = (0..WORKERS)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..RUNS {
                        let out = token.keybound(&["keys", "list", "--json"]);
                        if !out.status.success()
                            || !String::from_utf8_lossy(&out.stdout).contains("\"dpop\"")
                        {
                            failures.lock().unwrap().push(describe(&out));
                        }
                    }
                })
            })
            .collect();
        s.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 8 {
                n += 1;
                let label = format!("churn-{n}");
                let out = token.keybound(&["keys", "generate", "--label", &label]);
                if !out.status.success() {
                    failures.lock().unwrap().push(describe(&out));
                }
            }
        });
        for l in listers {
            l.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} runs failed; the first:\n{}",
        failures.len(),
        WORKERS * RUNS,
        failures[0]
    );
}
