//! Key rotation on the TPM backend (a real swtpm per test): the life cycle through the CLI,
//! a kill (SIGKILL from the debug binary's crash points) at the steps that touch the TPM
//! and the record files, then the same step again; a record file edited or lost. The
//! records are `<state_dir>/rotation/<slot>/<seq>.json`. Proofs are verified with p256
//! from the JWK in their header, never by keybound.
#![cfg(feature = "tpm")]

mod support;
mod tpm_support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use serde_json::Value;
use support::{Jws, Verifier, assert_signature, jwk_thumbprint};
use tpm_support::{TpmHome, tpm2_ok};

fn home() -> (TpmHome, String) {
    let home = TpmHome::new();
    home.write_config(&home.config_text("[rotation]\nretire_after = \"1h\"\n"));
    home.generate("client-auth", "ES256");
    let kid = home.generate("dpop", "ES256");
    (home, kid)
}

/// label -> state ("-" outside a rotation, "problem" for an unusable object).
fn states(home: &TpmHome) -> BTreeMap<String, String> {
    let list: Vec<Value> =
        serde_json::from_str(&home.run_ok(&["keys", "list", "--json"])).expect("list --json");
    list.iter()
        .map(|e| {
            let state = match (&e["state"], &e["policy"]) {
                (Value::String(s), _) => s.clone(),
                (_, p) if p == "fail" => "problem".to_string(),
                _ => "-".to_string(),
            };
            (e["label"].as_str().expect("label").to_string(), state)
        })
        .collect()
}

fn state_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(l, s)| ((*l).to_string(), (*s).to_string()))
        .collect()
}

fn published(home: &TpmHome) -> Vec<String> {
    let doc: Value = serde_json::from_str(&home.run_ok(&["jwks"])).expect("jwks");
    doc["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

/// `keybound dpop --key dpop`, verified with p256 from its header JWK: that JWK's kid.
fn dpop_kid(home: &TpmHome) -> String {
    let out = home.run_ok(&[
        "dpop",
        "--key",
        "dpop",
        "--method",
        "POST",
        "--url",
        "https://example.okta.com/oauth2/v1/token",
    ]);
    let jws = Jws::parse(out.trim_end());
    assert_eq!(jws.header["alg"], "ES256");
    assert_signature(&Verifier::new("ES256", &jws.header["jwk"]), &jws);
    jwk_thumbprint(&jws.header["jwk"])
}

/// After anything: `keys list` works, everything published is prepared/active/retiring in
/// it, and `dpop` signs with the generation it shows active.
fn assert_consistent(home: &TpmHome, what: &str) -> BTreeMap<String, String> {
    let list: Vec<Value> =
        serde_json::from_str(&home.run_ok(&["keys", "list", "--json"])).expect("list --json");
    for kid in published(home) {
        let e = list
            .iter()
            .find(|e| e["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("{what}: published {kid} not listed: {list:#?}"));
        assert!(
            e["state"].is_null()
                || ["prepared", "active", "retiring"].contains(&e["state"].as_str().unwrap()),
            "{what}: {e}"
        );
    }
    let signing = dpop_kid(home);
    let e = list
        .iter()
        .find(|e| e["kid"] == signing.as_str())
        .unwrap_or_else(|| panic!("{what}: signs with unlisted {signing}"));
    assert!(
        e["state"].is_null() || e["state"] == "active",
        "{what}: {e}"
    );
    states(home)
}

fn records(home: &TpmHome) -> Vec<PathBuf> {
    let dir = home.state_dir().join("rotation").join("dpop");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "json"));
    files.sort();
    files
}

fn key_files(home: &TpmHome) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(home.state_dir().join("keys"))
        .expect("keys dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn the_life_cycle_on_the_tpm() {
    let (home, kid1) = home();
    let out = home.run_ok(&["keys", "rotate", "--label", "dpop"]);
    let kid2 = out
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("prepared generation 2 of 'dpop': label 'dpop#2', kid "))
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    assert!(out.contains("on token 'tpm'"), "{out}");
    assert_eq!(
        records(&home).len(),
        1,
        "one record file: {:?}",
        records(&home)
    );
    assert!(published(&home).contains(&kid2));
    assert_eq!(dpop_kid(&home), kid1);

    let (_, err) = home.run_fail(&["keys", "rotate", "--label", "dpop"], 1);
    assert!(
        err.contains("already in progress")
            && err.contains(&format!("generation 2 ('dpop#2', kid {kid2}) is prepared")),
        "{err}"
    );
    let (_, err) = home.run_fail(
        &[
            "dpop",
            "--key",
            "dpop#2",
            "--method",
            "GET",
            "--url",
            "https://a.example/",
        ],
        1,
    );
    assert!(err.contains("only the active generation signs"), "{err}");

    let out = home.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    assert!(out.contains("nothing to prove"), "{out}");
    assert_eq!(dpop_kid(&home), kid2);
    let (_, err) = home.run_fail(&["keys", "rotate", "--label", "dpop", "--retire"], 1);
    assert!(err.contains("less than retire_after (3600 s)"), "{err}");
    home.run_ok(&["keys", "rotate", "--label", "dpop", "--retire", "--force"]);
    assert!(!published(&home).contains(&kid1));
    let (_, err) = home.run_fail(&["keys", "destroy", "--label", "dpop", "--kid", &kid2], 1);
    assert!(
        err.contains("only a retired generation can be destroyed"),
        "{err}"
    );
    let out = home.run_ok(&["keys", "destroy", "--label", "dpop", "--kid", &kid1]);
    assert!(
        out.contains("destroyed: generation 1 ('dpop', kid"),
        "{out}"
    );
    assert_eq!(
        key_files(&home),
        ["client-auth.json", "dpop%232.json"],
        "the key file is gone"
    );
    assert_eq!(
        states(&home),
        state_map(&[("client-auth", "-"), ("dpop#2", "active")])
    );
    assert_eq!(dpop_kid(&home), kid2);
}

/// The steps, the crash points tested on the TPM, the state each whole step ends in.
#[test]
fn a_kill_at_the_tpm_steps_is_resumed() {
    let steps: [(&[&str], &[&str]); 4] = [
        (
            &["keys", "rotate", "--label", "dpop"],
            &[
                "rotate-adopted",
                "rotate-pending-written",
                "rotate-key-generated",
                "rotate-prepared-written",
            ],
        ),
        (
            &["keys", "rotate", "--label", "dpop", "--activate"],
            &["activate-written"],
        ),
        (
            &["keys", "rotate", "--label", "dpop", "--retire", "--force"],
            &["retire-written"],
        ),
        (
            &["keys", "destroy", "--label", "dpop", "--kid", "KID1"],
            &["destroy-intent-written", "destroy-key-deleted"],
        ),
    ];
    let ends = [
        state_map(&[
            ("client-auth", "-"),
            ("dpop", "active"),
            ("dpop#2", "prepared"),
        ]),
        state_map(&[
            ("client-auth", "-"),
            ("dpop", "retiring"),
            ("dpop#2", "active"),
        ]),
        state_map(&[
            ("client-auth", "-"),
            ("dpop", "retired"),
            ("dpop#2", "active"),
        ]),
        state_map(&[("client-auth", "-"), ("dpop#2", "active")]),
    ];
    let only: Option<String> = std::env::var("KEYBOUND_TEST_FAULTS").ok();
    let mut report = Vec::new();
    for (step, (args, points)) in steps.iter().enumerate() {
        for point in *points {
            if only
                .as_deref()
                .is_some_and(|o| !o.split(',').any(|p| p == *point))
            {
                continue;
            }
            let (home, kid1) = home();
            let fill = |a: &[&str]| -> Vec<String> {
                a.iter()
                    .map(|s| {
                        if *s == "KID1" {
                            kid1.clone()
                        } else {
                            (*s).to_string()
                        }
                    })
                    .collect()
            };
            for (before, _) in &steps[..step] {
                home.run_ok(&fill(before));
            }
            let args = fill(args);
            let out = home
                .command(&args)
                .env("KEYBOUND_FAULT", point)
                .output()
                .expect("spawn");
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{point}: SIGKILL\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // What the kernel's resource manager (/dev/tpmrm0) does for a process that
            // dies: swtpm has none, so the killed process's loaded objects are flushed
            // here, or a few kills fill the TPM's object slots (TPM_RC_OBJECT_MEMORY).
            tpm2_ok(&home.tpm, "flushcontext", &["-t"]);
            let left = assert_consistent(&home, point);
            let again = home.keybound(&args);
            let said = if again.status.success() {
                String::from_utf8_lossy(&again.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            } else {
                let err = String::from_utf8_lossy(&again.stderr).into_owned();
                assert_eq!(again.status.code(), Some(1), "{point}: {err}");
                assert!(!err.contains("panicked"), "{point}: {err}");
                err.lines().last().unwrap_or_default().to_string()
            };
            assert_eq!(
                assert_consistent(&home, point),
                ends[step],
                "{point}: {said}"
            );
            assert_eq!(records(&home).len(), 1, "{point}: one record file");
            let files = key_files(&home);
            assert_eq!(
                files.iter().filter(|f| f.starts_with("dpop%232")).count(),
                1,
                "{point}: {files:?}"
            );
            for (later, _) in &steps[step + 1..] {
                home.run_ok(&fill(later));
            }
            assert_eq!(states(&home), ends[3], "{point}: rotation finished");
            report.push(format!("{point}: left {left:?}; re-run: {said}"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn an_edited_or_lost_record_file_is_refused() {
    let (home, _) = home();
    home.run_ok(&["keys", "rotate", "--label", "dpop"]);
    let files = records(&home);
    assert_eq!(files.len(), 1, "{files:?}");
    let original = fs::read_to_string(&files[0]).expect("record");
    assert!(original.contains("\"prepared\""), "{original}");
    fs::write(
        &files[0],
        original.replacen("\"prepared\"", "\"active\"", 1),
    )
    .expect("edit");
    let why = "the rotation record of 'dpop' cannot be trusted: a stored record: its digest \
               does not match its content (it was edited)";
    for args in [
        &[
            "dpop",
            "--key",
            "dpop",
            "--method",
            "GET",
            "--url",
            "https://a.example/",
        ][..],
        &["keys", "rotate", "--label", "dpop"],
        &["keys", "rotate", "--label", "dpop", "--activate"],
    ] {
        let (_, err) = home.run_fail(args, 1);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(
        states(&home),
        state_map(&[
            ("client-auth", "-"),
            ("dpop", "problem"),
            ("dpop#2", "problem")
        ]),
        "keys list still lists client-auth"
    );
    // Lost: the file removed while dpop#2 is on the TPM.
    fs::remove_file(&files[0]).expect("remove");
    let lost = "the rotation record of 'dpop' is missing, but keys of its generations are on \
                the device (dpop#2)";
    for args in [
        &[
            "dpop",
            "--key",
            "dpop",
            "--method",
            "GET",
            "--url",
            "https://a.example/",
        ][..],
        &["keys", "rotate", "--label", "dpop", "--activate"],
    ] {
        let (_, err) = home.run_fail(args, 1);
        assert!(err.contains(lost), "{args:?}: {err}");
    }
    assert_eq!(states(&home)["client-auth"], "-");
    // Restored: works again.
    fs::write(&files[0], &original).expect("restore");
    home.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
}

#[test]
fn a_generation_key_file_deleted_outside_keybound_is_named() {
    let (home, kid1) = home();
    let out = home.run_ok(&["keys", "rotate", "--label", "dpop"]);
    assert!(out.starts_with("prepared generation 2 of 'dpop'"), "{out}");
    fs::remove_file(home.key_file("dpop%232")).expect("remove the key file of dpop#2");
    for args in [
        &["keys", "rotate", "--label", "dpop"][..],
        &["keys", "rotate", "--label", "dpop", "--activate", "--force"],
    ] {
        let (_, err) = home.run_fail(args, 1);
        assert!(
            err.contains("cannot be trusted")
                && err
                    .contains("is prepared, but no usable key labelled 'dpop#2' is on the device"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        states(&home),
        state_map(&[("client-auth", "-"), ("dpop", "problem")])
    );
    assert_eq!(dpop_kid(&home), kid1, "the active generation still signs");
}

/// The client-authentication key rotated on the TPM with the activation proven against
/// the dev-server (pasted keys): refused while the server knows only the old key, done
/// once the admin pasted the JWKS; `keybound token` then signs its assertion with the new
/// generation, and after retirement and a new paste the old key is gone from the server.
#[test]
fn the_client_key_rotates_on_the_tpm_with_the_activation_proven() {
    let (home, _) = home();
    let jwks_file = home.dir().join("app-keys.json");
    let published = || home.run_ok(&["jwks"]);
    fs::write(&jwks_file, home.run_ok(&["jwks", "--label", "client-auth"])).unwrap();
    let server = keybound_devserver::Background::start(
        0,
        keybound_devserver::Settings::new(
            "0oa-tpm-dev",
            keybound_devserver::JwksSource::File(jwks_file.clone()),
        ),
    )
    .expect("the dev-server starts");
    let base = server.base().to_owned();
    home.write_config(&home.config_text(&format!(
        "[rotation]\nretire_after = \"1h\"\n\n[[client]]\nname = \"dev\"\nserver = \"okta\"\n\
         token_endpoint = \"{base}/oauth2/v1/token\"\nclient_id = \"0oa-tpm-dev\"\n\
         assertion_key = \"client-auth\"\ndpop_key = \"dpop\"\nscopes = [\"okta.users.read\"]\n\
         allowed_scopes = [\"okta.users.read\"]\n"
    )));
    home.run_ok(&["token", "--client", "dev"]);
    let old = Jws::parse(
        home.run_ok(&[
            "assertion",
            "--key",
            "client-auth",
            "--client-id",
            "x",
            "--audience",
            "https://a.example/",
        ])
        .trim(),
    )
    .header["kid"]
        .as_str()
        .expect("kid")
        .to_owned();

    let out = home.run_ok(&["keys", "rotate", "--label", "client-auth"]);
    assert!(out.contains("client-auth#2"), "{out}");
    let new = states_kid(&home, "client-auth", "prepared");
    let (_, err) = home.run_fail(
        &["keys", "rotate", "--label", "client-auth", "--activate"],
        77,
    );
    assert!(
        err.contains("activation refused, nothing changed") && err.contains(&new),
        "{err}"
    );
    assert_eq!(states_kid(&home, "client-auth", "active"), old);

    fs::write(&jwks_file, published()).unwrap();
    let out = home.run_ok(&["keys", "rotate", "--label", "client-auth", "--activate"]);
    assert!(
        out.contains("issued a token") && out.contains(&new),
        "{out}"
    );
    home.run_ok(&["token", "--client", "dev"]);
    let assertion = home.run_ok(&[
        "assertion",
        "--key",
        "client-auth",
        "--client-id",
        "0oa-tpm-dev",
        "--audience",
        &format!("{base}/oauth2/v1/token"),
    ]);
    let jws = Jws::parse(assertion.trim());
    assert_eq!(jws.header["kid"], new.as_str());

    home.run_ok(&[
        "keys",
        "rotate",
        "--label",
        "client-auth",
        "--retire",
        "--force",
    ]);
    let now = published();
    assert!(!now.contains(&old) && now.contains(&new), "{now}");
    fs::write(&jwks_file, now).unwrap();
    home.run_ok(&["keys", "destroy", "--label", "client-auth", "--kid", &old]);
    home.run_ok(&["token", "--client", "dev"]);
    drop(server);
}

/// The kid of `slot`'s generation in `state`, from `keys list --json`.
fn states_kid(home: &TpmHome, slot: &str, state: &str) -> String {
    let list: Vec<Value> =
        serde_json::from_str(&home.run_ok(&["keys", "list", "--json"])).expect("list --json");
    list.iter()
        .find(|k| k["slot"] == slot && k["state"] == state)
        .and_then(|k| k["kid"].as_str())
        .unwrap_or_else(|| panic!("no {state} generation of {slot}: {list:#?}"))
        .to_owned()
}
