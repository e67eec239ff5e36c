//! Key rotation as a user runs it, on a real SoftHSM2 token: `keys rotate` (prepare,
//! `--activate`, `--retire`), `keys destroy`, `keys list [--json]`, `jwks` and signing
//! through a rotated slot, each step killed (SIGKILL at every crash point of the debug
//! binary) and resumed, records edited or lost on the token with pkcs11-tool, two
//! rotations at once, and the activation proof against the dev-server. Every proof is
//! verified with p256 from the JWK in its header, never by keybound.

#[allow(dead_code)]
#[path = "agent_support/devserver.rs"]
mod agent_support_devserver;
mod support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{Output, Stdio};

use agent_support_devserver::{DEV_CLIENT_ID, DevServer, dev_client};
use serde_json::{Value, json};
use support::*;

const RECORD_LABEL: &str = "keybound rotation: dpop";

/// A token with `client-auth` and `dpop` (ES256) and `[rotation] retire_after = "1h"`.
/// Returns the token and the kid of `dpop`.
fn setup() -> (DevToken, String) {
    let token = DevToken::new();
    token.write_config(&config(""));
    token.generate("client-auth", "ES256");
    let kid = token.generate("dpop", "ES256");
    (token, kid)
}

fn config(rest: &str) -> String {
    format!(
        "{}\n[rotation]\nretire_after = \"1h\"\n{rest}",
        Config::default().render()
    )
}

fn list_json(token: &DevToken) -> Vec<Value> {
    let text = token.run_ok(&["keys", "list", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("keys list --json ({e}):\n{text}"))
}

fn entry<'a>(list: &'a [Value], label: &str) -> &'a Value {
    list.iter()
        .find(|e| e["label"] == label)
        .unwrap_or_else(|| panic!("keys list --json has no '{label}': {list:#?}"))
}

/// label -> state ("-" outside a rotation, "problem" for an unusable object), from
/// `keys list --json`.
fn states(token: &DevToken) -> BTreeMap<String, String> {
    list_json(token)
        .iter()
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

/// The kids `keybound jwks` publishes.
fn published(token: &DevToken) -> Vec<String> {
    token
        .jwks(&[])
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

/// `keybound dpop --key <key>`: the proof, verified with p256 from its header JWK; returns
/// the RFC 7638 thumbprint of that JWK.
fn dpop_kid(token: &DevToken, key: &str) -> String {
    let jws = token.sign(&dpop_args(key));
    assert_eq!(jws.header["typ"], "dpop+jwt");
    let jwk = &jws.header["jwk"];
    assert_eq!(jws.header["alg"], "ES256");
    assert_signature(&Verifier::new("ES256", jwk), &jws);
    jwk_thumbprint(jwk)
}

fn dpop_out(token: &DevToken, key: &str) -> Output {
    token.keybound(&dpop_args(key))
}

/// `dpop --key <key>` for one fixed request.
fn dpop_args(key: &str) -> [&str; 7] {
    [
        "dpop",
        "--key",
        key,
        "--method",
        "POST",
        "--url",
        "https://server.example.com/token",
    ]
}

/// `keys rotate --label <slot>`: checks the report and returns the new kid.
fn prepare(token: &DevToken, slot: &str, n: u32) -> String {
    let out = token.run_ok(&["keys", "rotate", "--label", slot]);
    let head = format!("prepared generation {n} of '{slot}': label '{slot}#{n}', kid ");
    let first = out.lines().next().unwrap_or_default();
    let rest = first
        .strip_prefix(&head)
        .unwrap_or_else(|| panic!("keys rotate: first line {first:?}, want {head}…\n{out}"));
    let kid = rest.split(' ').next().unwrap_or_default().to_string();
    assert_eq!(kid.len(), 43, "{out}");
    assert!(
        rest.ends_with(&format!("(ES256), on token '{TOKEN_LABEL}'")),
        "{out}"
    );
    assert_mentions(
        &out,
        &[
            "It is published from now on and does not sign until it is activated.",
            &format!("Then: keybound keys rotate --label {slot} --activate"),
        ],
    );
    kid
}

fn pkcs11_labels(token: &DevToken, heading: &str) -> Vec<String> {
    let out = token.pkcs11_tool(&["--list-objects"]);
    assert!(out.status.success(), "{}", describe(&out));
    parse_pkcs11_tool_objects(&stdout(&out))
        .into_iter()
        .filter(|o| o.heading.starts_with(heading))
        .filter_map(|o| {
            o.fields
                .get("label")
                .map(|l| l.trim_matches('\'').to_string())
        })
        .collect()
}

#[test]
fn the_whole_life_cycle_of_a_dpop_slot() {
    let (token, kid1) = setup();
    let auth_kid = token.jwk("client-auth")["kid"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(dpop_kid(&token, "dpop"), kid1);

    // Prepare.
    let out = token.run_ok(&["keys", "rotate", "--label", "dpop"]);
    assert_mentions(
        &out,
        &["No [[client]] signs assertions with 'dpop' (a DPoP key has nothing to register)"],
    );
    let kid2 = {
        let first = out.lines().next().unwrap();
        let rest = first
            .strip_prefix("prepared generation 2 of 'dpop': label 'dpop#2', kid ")
            .unwrap_or_else(|| panic!("{out}"));
        rest.split(' ').next().unwrap().to_string()
    };
    assert_ne!(kid2, kid1);
    let list = list_json(&token);
    let g1 = entry(&list, "dpop");
    let g2 = entry(&list, "dpop#2");
    assert_eq!(
        (
            &g1["slot"],
            &g1["generation"],
            &g1["state"],
            &g1["published"]
        ),
        (&json!("dpop"), &json!(1), &json!("active"), &json!(true)),
        "{list:#?}"
    );
    assert_eq!(
        (
            &g2["slot"],
            &g2["generation"],
            &g2["state"],
            &g2["published"]
        ),
        (&json!("dpop"), &json!(2), &json!("prepared"), &json!(true)),
        "{list:#?}"
    );
    assert_eq!(g2["kid"], kid2.as_str());
    let now = unix_now();
    for (e, date) in [(g1, "activated"), (g1, "created"), (g2, "prepared")] {
        let t = e["dates"][date].as_i64().unwrap_or_else(|| panic!("{e}"));
        assert!((now - 600..=now + 5).contains(&t), "{date} {t} vs {now}");
    }
    assert!(g2["dates"]["activated"].is_null(), "{g2}");
    assert!(entry(&list, "client-auth")["state"].is_null());
    let text = token.run_ok(&["keys", "list"]);
    assert_mentions(&text, &["STATE", "SINCE"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("dpop#2 "))
        .expect(&text);
    assert_mentions(line, &[kid2.as_str(), "prepared", "Z (", "ago"]);

    let mut jwks = published(&token);
    jwks.sort();
    let mut want = vec![auth_kid.clone(), kid1.clone(), kid2.clone()];
    want.sort();
    assert_eq!(jwks, want, "jwks holds prepared and active");
    assert_eq!(dpop_kid(&token, "dpop"), kid1, "a prepared key never signs");

    // Activate: a DPoP slot has no client to prove it with.
    let out = token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    assert_mentions(
        &out,
        &[
            "no [[client]] signs assertions with 'dpop': nothing to prove",
            &format!("activated: generation 2 ('dpop#2', kid {kid2}) is active"),
            &format!("retiring: generation 1 ('dpop', kid {kid1}) is retiring"),
            "retire_after (3600 s): keybound keys rotate --label dpop --retire",
        ],
    );
    assert_eq!(
        dpop_kid(&token, "dpop"),
        kid2,
        "the active generation signs"
    );
    assert_eq!(
        states(&token),
        state_map(&[
            ("client-auth", "-"),
            ("dpop", "retiring"),
            ("dpop#2", "active")
        ])
    );
    assert_eq!(published(&token).len(), 3, "retiring stays published");

    // Retire: too young, then forced.
    let args = ["keys", "rotate", "--label", "dpop", "--retire"];
    let err = token.run_err(&args);
    assert_mentions(
        &err,
        &[
            &format!("'dpop': generation 1 ('dpop', kid {kid1}) is retiring, for only"),
            "less than retire_after (3600 s)",
            "Wait, or pass --force",
        ],
    );
    assert_eq!(states(&token)["dpop"], "retiring", "nothing changed");
    let out = token.run_ok(&["keys", "rotate", "--label", "dpop", "--retire", "--force"]);
    assert_mentions(
        &out,
        &[
            &format!("retired: generation 1 ('dpop', kid {kid1}) is retired; no longer published"),
            &format!("keybound keys destroy --label dpop --kid {kid1}"),
        ],
    );
    let jwks = published(&token);
    assert!(!jwks.contains(&kid1), "a retired key is not published");
    assert!(jwks.contains(&kid2) && jwks.contains(&auth_kid), "{jwks:?}");

    // Destroy: the active one refused.
    let err = token.run_err(&["keys", "destroy", "--label", "dpop", "--kid", &kid2]);
    assert_mentions(
        &err,
        &[
            "only a retired generation can be destroyed",
            &format!("generation 2 ('dpop#2', kid {kid2}) is active"),
        ],
    );
    // A retiring one refused: rotate once more so that generation 2 is retiring.
    let kid3 = prepare(&token, "dpop", 3);
    token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    assert_eq!(dpop_kid(&token, "dpop"), kid3);
    let err = token.run_err(&["keys", "destroy", "--label", "dpop", "--kid", &kid2]);
    assert_mentions(
        &err,
        &[
            "only a retired generation can be destroyed",
            &format!("generation 2 ('dpop#2', kid {kid2}) is retiring"),
            "keybound keys rotate --label dpop --retire",
        ],
    );
    assert!(published(&token).contains(&kid2));
    // The retired one goes.
    let out = token.run_ok(&["keys", "destroy", "--label", "dpop", "--kid", &kid1]);
    assert_mentions(
        &out,
        &[&format!(
            "destroyed: generation 1 ('dpop', kid {kid1}) is destroyed; its key is deleted from the device"
        )],
    );
    for heading in ["Private Key Object", "Public Key Object"] {
        let labels = pkcs11_labels(&token, heading);
        assert!(!labels.contains(&"dpop".to_string()), "{labels:?}");
        assert!(labels.contains(&"dpop#3".to_string()), "{labels:?}");
    }
    assert_eq!(
        states(&token),
        state_map(&[
            ("client-auth", "-"),
            ("dpop#2", "retiring"),
            ("dpop#3", "active")
        ])
    );
    assert!(!token.run_ok(&["keys", "list"]).contains(&kid1));
    // Destroyed is history: asked again, nothing to do.
    let err = token.run_err(&["keys", "destroy", "--label", "dpop", "--kid", &kid1]);
    assert_mentions(&err, &["is destroyed"]);
    assert_eq!(dpop_kid(&token, "dpop"), kid3);
}

#[test]
fn a_second_rotate_while_one_is_prepared_shows_the_state_and_changes_nothing() {
    let (token, kid1) = setup();
    let kid2 = prepare(&token, "dpop", 2);
    let before = list_json(&token);
    let records = pkcs11_labels(&token, "Data object");
    let err = token.run_err(&["keys", "rotate", "--label", "dpop"]);
    assert_mentions(
        &err,
        &[
            "a rotation of 'dpop' is already in progress",
            &format!("generation 1 ('dpop', kid {kid1}) is active"),
            &format!("generation 2 ('dpop#2', kid {kid2}) is prepared"),
            "keybound keys rotate --label dpop --activate",
        ],
    );
    assert_eq!(list_json(&token), before, "nothing changed");
    assert_eq!(pkcs11_labels(&token, "Data object"), records);
    assert_eq!(pkcs11_labels(&token, "Private Key Object").len(), 3);
}

#[test]
fn a_generation_that_is_not_active_cannot_be_named_to_sign() {
    let (token, kid1) = setup();
    let kid2 = prepare(&token, "dpop", 2);
    for name in ["dpop#2", "pkcs11:object=dpop%232"] {
        let out = dpop_out(&token, name);
        let err = assert_error(&out, &name);
        assert_mentions(
            &err,
            &[
                &format!("generation 2 ('dpop#2', kid {kid2}) is prepared"),
                "only the active generation signs",
                "name the key by its slot, 'dpop'",
            ],
        );
    }
    assert_eq!(dpop_kid(&token, "dpop"), kid1);
    // After activation the old generation, by its label, is refused the same way.
    token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    let err = assert_error(&dpop_out(&token, "pkcs11:object=dpop"), &"old by URI");
    assert_mentions(
        &err,
        &[&format!("generation 1 ('dpop', kid {kid1}) is retiring")],
    );
    assert_eq!(
        dpop_kid(&token, "dpop#2"),
        kid2,
        "the active one by its own label"
    );
}

#[test]
fn generation_labels_are_reserved() {
    let token = DevToken::new();
    for label in ["x#2", "dpop#17"] {
        let err = token.run_err(&["keys", "generate", "--label", label]);
        assert_mentions(
            &err,
            &[
                label,
                "generations of a rotated key",
                "keybound keys rotate",
            ],
        );
    }
    assert!(pkcs11_labels(&token, "Private Key Object").is_empty());
    // `#1` is not a generation label (generation 1 keeps the slot's label).
    token.generate("x#1", "ES256");
}

// ---------------------------------------------------------------------------
// Kill at every step
// ---------------------------------------------------------------------------

/// The steps of one rotation, in order, and the crash points each passes.
const STEPS: [(&[&str], &[&str]); 4] = [
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
    // The kid is filled in: generation 1's.
    (
        &["keys", "destroy", "--label", "dpop", "--kid", "KID1"],
        &["destroy-intent-written", "destroy-key-deleted"],
    ),
];

fn step_args<'a>(args: &[&'a str], kid1: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|a| if *a == "KID1" { kid1 } else { a })
        .collect()
}

/// The state after each whole step, as `states` shows it.
fn after_step(i: usize) -> BTreeMap<String, String> {
    let (g1, g2) = match i {
        0 => ("active", "prepared"),
        1 => ("retiring", "active"),
        2 => ("retired", "active"),
        _ => ("", "active"),
    };
    let mut m = state_map(&[("client-auth", "-"), ("dpop#2", g2)]);
    if !g1.is_empty() {
        m.insert("dpop".into(), g1.into());
    }
    m
}

/// After a kill: `keys list` works, everything published is prepared, active or retiring
/// in it, and `dpop` still signs with a generation that `keys list` shows active.
fn assert_consistent(token: &DevToken, point: &str) -> BTreeMap<String, String> {
    let list = list_json(token);
    let s = states(token);
    for kid in published(token) {
        let e = list
            .iter()
            .find(|e| e["kid"] == kid.as_str())
            .unwrap_or_else(|| panic!("{point}: published kid {kid} not listed: {list:#?}"));
        assert!(
            e["state"].is_null() || e["published"] == true,
            "{point}: published {e}"
        );
        assert!(
            e["state"].is_null()
                || ["prepared", "active", "retiring"].contains(&e["state"].as_str().unwrap()),
            "{point}: {e}"
        );
    }
    let signing = dpop_kid(token, "dpop");
    let active = list
        .iter()
        .find(|e| e["kid"] == signing.as_str())
        .unwrap_or_else(|| panic!("{point}: signing kid {signing} not listed"));
    assert!(
        active["state"].is_null() || active["state"] == "active",
        "{point}: signs with {active}"
    );
    s
}

#[test]
fn a_kill_at_every_step_leaves_a_state_the_next_run_resumes() {
    let mut report = Vec::new();
    for (step, (args, points)) in STEPS.iter().enumerate() {
        for point in *points {
            let (token, kid1) = setup();
            for (before, _) in &STEPS[..step] {
                token.run_ok(&step_args(before, &kid1));
            }
            let args = step_args(args, &kid1);
            let out = token
                .command(&args)
                .env("KEYBOUND_FAULT", point)
                .output()
                .unwrap();
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{point}: killed by SIGKILL\n{}",
                describe(&out)
            );
            let left = assert_consistent(&token, point);
            // The same step again, without the fault.
            let again = token.keybound(&args);
            let resumed = if again.status.success() {
                stdout(&again)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            } else {
                assert_error(&again, point)
            };
            let end = assert_consistent(&token, point);
            assert_eq!(end, after_step(step), "{point}: the end state\n{resumed}");
            let keys = pkcs11_labels(&token, "Private Key Object");
            assert_eq!(
                keys.iter().filter(|l| *l == "dpop#2").count(),
                1,
                "{point}: one dpop#2 key: {keys:?}"
            );
            assert_eq!(
                pkcs11_labels(&token, "Data object")
                    .iter()
                    .filter(|l| *l == RECORD_LABEL)
                    .count(),
                1,
                "{point}: one record object"
            );
            // The rest of the rotation runs from there.
            for (later, _) in &STEPS[step + 1..] {
                token.run_ok(&step_args(later, &kid1));
            }
            assert_eq!(states(&token), after_step(3), "{point}: rotation finished");
            report.push(format!("{point}: left {left:?}; re-run: {resumed}"));
        }
    }
    eprintln!("{}", report.join("\n"));
}

// ---------------------------------------------------------------------------
// Records that cannot be trusted
// ---------------------------------------------------------------------------

fn read_record(token: &DevToken) -> String {
    let out = token.pkcs11_tool(&["--read-object", "--type", "data", "--label", RECORD_LABEL]);
    assert!(out.status.success(), "{}", describe(&out));
    stdout(&out)
}

fn delete_record(token: &DevToken) {
    let out = token.pkcs11_tool(&["--delete-object", "--type", "data", "--label", RECORD_LABEL]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!pkcs11_labels(token, "Data object").contains(&RECORD_LABEL.to_string()));
}

fn write_record(token: &DevToken, text: &str) {
    let file = token.write_file("record.json", text);
    let out = token.pkcs11_tool(&[
        "--write-object",
        file.to_str().unwrap(),
        "--type",
        "data",
        "--label",
        RECORD_LABEL,
        "--application-label",
        "keybound rotation",
        "--private",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
}

/// `keys list` still works, lists client-auth as a key, and the slot's keys as problems
/// with `reason` in them.
fn assert_listed_as_problems(token: &DevToken, labels: &[&str], reason: &str) {
    let list = list_json(token);
    assert_eq!(entry(&list, "client-auth")["policy"], "pass");
    for label in labels {
        let e = entry(&list, label);
        assert_eq!(e["policy"], "fail", "{e}");
        assert!(e["reasons"][0].as_str().unwrap().contains(reason), "{e}");
    }
    let text = token.run_ok(&["keys", "list"]);
    for label in labels {
        assert!(
            text.contains(&format!("unusable object '{label}'")),
            "{text}"
        );
    }
    let jwks = published(token);
    assert_eq!(jwks.len(), 1, "only client-auth is published: {jwks:?}");
}

#[test]
fn an_edited_record_is_refused_with_the_reason() {
    let (token, _) = setup();
    prepare(&token, "dpop", 2);
    let text = read_record(&token);
    assert!(text.contains("\"prepared\""), "{text}");
    delete_record(&token);
    write_record(&token, &text.replacen("\"prepared\"", "\"active\"", 1));
    let why = "the rotation record of 'dpop' cannot be trusted: a stored record: its digest \
               does not match its content (it was edited)";
    let err = assert_error(&dpop_out(&token, "dpop"), &"dpop");
    assert_mentions(&err, &[why, "Restore the record"]);
    for step in [&[][..], &["--activate"], &["--retire", "--force"]] {
        let mut args = vec!["keys", "rotate", "--label", "dpop"];
        args.extend(step);
        let err = token.run_err(&args);
        assert_mentions(&err, &[why]);
    }
    assert_listed_as_problems(&token, &["dpop", "dpop#2"], "cannot be trusted");
    // Undo the edit: everything works again.
    delete_record(&token);
    write_record(&token, &text);
    token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
}

#[test]
fn a_lost_record_is_refused_naming_the_generation_keys() {
    let (token, _) = setup();
    let kid2 = prepare(&token, "dpop", 2);
    token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    assert_eq!(dpop_kid(&token, "dpop"), kid2);
    delete_record(&token);
    let lost = "the rotation record of 'dpop' is missing, but keys of its generations are on \
                the device (dpop#2)";
    for args in [
        &["keys", "rotate", "--label", "dpop"][..],
        &["keys", "rotate", "--label", "dpop", "--activate"],
    ] {
        assert_mentions(&token.run_err(args), &[lost]);
    }
    // Signing must not fall back to generation 1 (retiring when the record was lost).
    let err = assert_error(&dpop_out(&token, "dpop"), &"dpop");
    assert_mentions(&err, &[lost]);
    assert_listed_as_problems(&token, &["dpop", "dpop#2"], "is missing");
}

#[test]
fn a_generation_key_deleted_outside_keybound_is_named() {
    let (token, kid1) = setup();
    let kid2 = prepare(&token, "dpop", 2);
    for class in ["privkey", "pubkey"] {
        let out = token.pkcs11_tool(&["--delete-object", "--type", class, "--label", "dpop#2"]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let gone = format!(
        "generation 2 ('dpop#2', kid {kid2}) is prepared, but no usable key labelled 'dpop#2' \
         is on the device (deleted outside keybound?)"
    );
    for args in [
        &["keys", "rotate", "--label", "dpop"][..],
        &["keys", "rotate", "--label", "dpop", "--activate", "--force"],
    ] {
        assert_mentions(&token.run_err(args), &["cannot be trusted", &gone]);
    }
    // The slot is listed as a problem with the reason; the active generation, intact, is
    // still listed, published and signing (one broken generation is no outage): only the
    // steps are refused.
    let list = list_json(&token);
    let problem = list
        .iter()
        .find(|e| e["label"] == "dpop" && e["policy"] == "fail")
        .unwrap_or_else(|| panic!("no problem entry for the slot: {list:#?}"));
    assert!(
        problem["reasons"][0].as_str().unwrap().contains(&gone),
        "{problem}"
    );
    let active = list
        .iter()
        .find(|e| e["label"] == "dpop" && e["state"] == "active")
        .unwrap_or_else(|| panic!("no active generation listed: {list:#?}"));
    assert_eq!(active["kid"], kid1.as_str());
    assert!(
        token
            .run_ok(&["keys", "list"])
            .contains("unusable object 'dpop'")
    );
    assert!(published(&token).contains(&kid1));
    assert!(!published(&token).contains(&kid2));
    assert_eq!(dpop_kid(&token, "dpop"), kid1);
    // The active key deleted: signing names it.
    let (token, kid1) = setup();
    let kid2 = prepare(&token, "dpop", 2);
    token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    for class in ["privkey", "pubkey"] {
        let out = token.pkcs11_tool(&["--delete-object", "--type", class, "--label", "dpop#2"]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let err = assert_error(&dpop_out(&token, "dpop"), &"dpop");
    assert_mentions(
        &err,
        &[
            "the rotation record of 'dpop' cannot be trusted",
            &format!(
                "generation 2 ('dpop#2', kid {kid2}) is active, but no usable key labelled \
                 'dpop#2' is on the device (deleted outside keybound?)"
            ),
        ],
    );
    // Generation 1 is not a fallback.
    let err = assert_error(&dpop_out(&token, "pkcs11:object=dpop"), &"gen 1");
    assert_mentions(
        &err,
        &[&format!("generation 1 ('dpop', kid {kid1}) is retiring")],
    );
}

/// A generation's key deleted and made again outside keybound under the same label and
/// `CKA_ID` is another key (another kid): never published nor signing, although its label
/// and id still match the record.
#[test]
fn a_generation_key_made_again_under_its_label_and_id_is_not_published() {
    let (token, kid1) = setup();
    let kid2 = prepare(&token, "dpop", 2);
    let id = entry(&list_json(&token), "dpop#2")["id"]
        .as_str()
        .expect("dpop#2's id")
        .to_owned();
    for class in ["privkey", "pubkey"] {
        let out = token.pkcs11_tool(&["--delete-object", "--type", class, "--label", "dpop#2"]);
        assert!(out.status.success(), "{}", describe(&out));
    }
    let out = token.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "dpop#2",
        "--id",
        &id,
        "--usage-sign",
        "--sensitive",
        "--private",
    ]);
    assert!(out.status.success(), "pkcs11-tool\n{}", describe(&out));
    let list = list_json(&token);
    let again = list
        .iter()
        .find(|e| e["label"] == "dpop#2" && e["policy"] == "fail")
        .unwrap_or_else(|| panic!("dpop#2 is not a problem: {list:#?}"));
    let reason = again["reasons"][0].as_str().unwrap_or_default();
    assert!(
        reason.contains("replaced outside keybound") && reason.contains(&format!("id {id} kid ")),
        "{again}"
    );
    let jwks = published(&token);
    assert!(jwks.contains(&kid1) && !jwks.contains(&kid2), "{jwks:?}");
    assert_eq!(
        jwks.len(),
        2,
        "client-auth and dpop (generation 1) only: {jwks:?}"
    );
    assert_eq!(dpop_kid(&token, "dpop"), kid1);
}

// ---------------------------------------------------------------------------
// Two processes at once
// ---------------------------------------------------------------------------

#[test]
fn two_rotations_at_once_prepare_exactly_one_generation() {
    for round in 0..6 {
        let (token, _) = setup();
        if round % 2 == 1 {
            // The first rotation adopts; the race is then on the pending write.
            prepare(&token, "dpop", 2);
            token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
        }
        let n = if round % 2 == 1 { 3 } else { 2 };
        let args = ["keys", "rotate", "--label", "dpop"];
        let children: Vec<_> = (0..2)
            .map(|_| {
                token
                    .command(&args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        let outs: Vec<Output> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("wait"))
            .collect();
        let mut ok = 0;
        let mut unopened = 0;
        for out in &outs {
            if out.status.success() {
                ok += 1;
                assert!(
                    stdout(out).contains(&format!("generation {n} of 'dpop'")),
                    "{}",
                    describe(out)
                );
            } else if ["no token labelled 'keybound-test'", "C_Login failed"]
                .iter()
                .any(|m| stderr(out).contains(m))
            {
                // SoftHSM's file store, read by one process while another rewrites it, can
                // look empty or fail the login for a moment: that process did nothing.
                eprintln!(
                    "round {round}: one process could not open SoftHSM: {}",
                    stderr(out)
                );
                unopened += 1;
            } else {
                // In progress: exit 1; a record conflict: 75 (try again).
                // (SoftHSM may make keybound log that it reopened its session first.)
                let code = out.status.code().unwrap_or(-1);
                let text = stderr(out);
                let err = text.lines().last().unwrap_or_default();
                assert!(
                    err.starts_with("error: ") && !text.contains("panicked"),
                    "round {round}: {}",
                    describe(out)
                );
                assert!(
                    (code == 1 && err.contains("already in progress"))
                        || (code == 75 && err.contains("at the same moment")),
                    "round {round}: {err}"
                );
            }
        }
        // Steps of one slot take turns on one host (a lock), so the second sees the first's
        // prepared generation; across hosts the record writes back off (see `write_record`).
        for _ in 0..unopened {
            // Run again now: it finds the state the other left.
            let out = token.keybound(&args);
            if ok == 0 && out.status.success() {
                ok = 1;
            } else {
                assert_mentions(&assert_error(&out, &"again"), &["already in progress"]);
            }
        }
        assert_eq!(ok, 1, "round {round}: exactly one prepares: {outs:?}");
        let s = states(&token);
        let prepared: Vec<_> = s.iter().filter(|(_, v)| *v == "prepared").collect();
        assert_eq!(prepared.len(), 1, "round {round}: {s:?}");
        assert!(
            !s.values().any(|v| v == "problem"),
            "round {round}: no leftover key: {s:?}"
        );
        let keys = pkcs11_labels(&token, "Private Key Object");
        assert_eq!(keys.len(), n as usize + 1, "round {round}: {keys:?}");
        let _ = assert_consistent(&token, "race");
    }
}

// ---------------------------------------------------------------------------
// The activation proof against the dev-server
// ---------------------------------------------------------------------------

fn serve(token: &DevToken, kids: &[&str]) -> DevServer {
    let keys: Vec<Value> = token
        .jwks(&[])
        .into_iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .collect();
    assert_eq!(keys.len(), kids.len());
    let file = token.write_file("client-jwks.json", &json!({ "keys": keys }).to_string());
    let server = DevServer::start(DEV_CLIENT_ID, &file);
    token.write_config(&config(&dev_client(&server.base)));
    server
}

fn assertion_kid(token: &DevToken) -> String {
    let jws = token.sign(&assertion_args("client-auth"));
    let kid = jws.header["kid"].as_str().expect("kid").to_string();
    let jwk = token
        .jwks(&[])
        .into_iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("published");
    assert_verifies(&jwk, &jws);
    kid
}

#[test]
fn activation_is_proven_against_the_server_first() {
    let (token, _) = setup();
    let kid1 = token.jwk("client-auth")["kid"]
        .as_str()
        .unwrap()
        .to_string();
    let server = serve(&token, &[&kid1]);
    let out = token.run_ok(&["keys", "rotate", "--label", "client-auth"]);
    assert_mentions(
        &out,
        &[
            "Next, the server must learn the new key (client dev):",
            "nothing to do: your JWKS URL",
            "replace the app's public keys with this",
        ],
    );
    let kid2 = token
        .run_ok(&["keys", "list", "--json"])
        .contains("prepared")
        .then(|| {
            list_json(&token)
                .iter()
                .find(|e| e["label"] == "client-auth#2")
                .map(|e| e["kid"].as_str().unwrap().to_string())
        })
        .flatten()
        .expect("client-auth#2");
    assert!(
        out.contains(&kid2),
        "the JWKS printed holds the new key:\n{out}"
    );

    // The server knows only the old key: refused, nothing changed.
    let before = list_json(&token);
    let out = token.keybound(&["keys", "rotate", "--label", "client-auth", "--activate"]);
    let err = assert_error_code(&out, 77, &"activate unknown");
    assert_mentions(&err, &["dev", &kid2]);
    assert!(
        err.contains("nothing changed") || err.contains("not activated"),
        "says nothing changed: {err}"
    );
    assert_eq!(list_json(&token), before);
    assert_eq!(states(&token)["client-auth#2"], "prepared");
    assert_eq!(assertion_kid(&token), kid1);
    drop(server);

    // The server knows both: activated after the proof.
    let server = serve(&token, &[&kid1, &kid2]);
    let out = token.run_ok(&["keys", "rotate", "--label", "client-auth", "--activate"]);
    assert_mentions(
        &out,
        &[
            &format!(
                "the token endpoint issued a token for an assertion signed by kid {kid2} (client dev)"
            ),
            &format!("activated: generation 2 ('client-auth#2', kid {kid2}) is active"),
        ],
    );
    assert_eq!(assertion_kid(&token), kid2);
    let t: Value = serde_json::from_str(&token.run_ok(&["token", "--json"])).expect("token");
    assert_eq!(t["token_type"], "DPoP", "{t}");

    // --force with a key the server does not know: activated, loudly.
    let kid3 = prepare(&token, "client-auth", 3);
    let out = token.keybound(&[
        "keys",
        "rotate",
        "--label",
        "client-auth",
        "--activate",
        "--force",
    ]);
    let text = assert_success(&out, &"--force");
    assert_mentions(
        &stderr(&out),
        &[&format!(
            "WARNING: --force: kid {kid3} was activated WITHOUT asking any server whether it knows it"
        )],
    );
    assert_mentions(
        &text,
        &[&format!(
            "activated: generation 3 ('client-auth#3', kid {kid3}) is active"
        )],
    );
    assert_eq!(assertion_kid(&token), kid3);
    drop(server);
}

// ---------------------------------------------------------------------------
// Activation without a server that can prove it
// ---------------------------------------------------------------------------

/// With clients configured, a slot none of them uses (neither for assertions nor DPoP)
/// cannot be proven against any server: activation is refused, not silently skipped,
/// unless forced. The DPoP key of a client has nothing to register.
#[test]
fn a_slot_no_configured_client_uses_is_not_activated_unproven() {
    let (token, _) = setup();
    let spare = token.generate("spare", "ES256");
    token.write_config(&config(&dev_client("http://127.0.0.1:9")));
    token.run_ok(&["keys", "rotate", "--label", "spare"]);
    let err = token.run_err(&["keys", "rotate", "--label", "spare", "--activate"]);
    assert_mentions(
        &err,
        &[
            "no [[client]] in this config signs assertions or DPoP proofs with 'spare'",
            "--force",
        ],
    );
    let list = list_json(&token);
    let active = list
        .iter()
        .find(|k| k["slot"] == "spare" && k["state"] == "active")
        .expect("spare still has an active generation");
    assert_eq!(active["kid"], spare.as_str(), "nothing changed");
    let out = token.run_ok(&[
        "keys",
        "rotate",
        "--label",
        "spare",
        "--activate",
        "--force",
    ]);
    assert_mentions(&out, &["activated: generation 2"]);
    // A client's DPoP key: nothing to register, no server asked (the endpoint is down).
    token.run_ok(&["keys", "rotate", "--label", "dpop"]);
    let out = token.run_ok(&["keys", "rotate", "--label", "dpop", "--activate"]);
    assert_mentions(&out, &["nothing to prove", "is a DPoP key"]);
}

/// A DPoP key in `[jwks] keys` is refused when the config is loaded: it would be
/// registered for client authentication, and Okta then refuses every DPoP proof.
#[test]
fn a_dpop_key_in_the_published_keys_is_refused_at_load() {
    let (token, _) = setup();
    token.write_config(&format!(
        "{}[jwks]\nlisten = \"127.0.0.1:0\"\nkeys = [\"client-auth\", \"dpop\"]\n",
        config(&dev_client("http://127.0.0.1:9"))
    ));
    let err = token.run_err(&["jwks"]);
    assert_mentions(
        &err,
        &["jwks.keys", "'dpop' is the dpop_key of [[client]] 'dev'"],
    );
}
