//! Keys changed underneath keybound with raw PKCS#11 from this test process, the way
//! someone who can open the token does it (issue #9, F1, F5, F10, F11):
//!
//! * a public-key object replaced or added WITHOUT the PIN (SoftHSM lets an R/W session
//!   that never logged in create and destroy public objects): keybound proves possession
//!   (the device signs a random challenge, verified under the public key it would publish)
//!   and refuses a key whose public object does not belong to it;
//! * one malformed object does not break the listing, the JWKS or signing with other keys;
//! * a label shared by several keys is an error naming their CKA_IDs;
//! * a key replaced while `keybound serve` runs is refused, never signed with.
//!
//! Every signature is verified with the independent verifiers of `tests/support`.

mod agent_support;
mod raw_support;
mod support;

use agent_support::*;
use std::collections::HashSet;

use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use p256::elliptic_curve::rand_core::OsRng;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use raw_support::*;
use serde_json::{Value, json};
use support::*;

/// `keybound dpop --key <key>` for a GET of [`AUDIENCE`].
fn dpop_args(key: &str) -> [&str; 7] {
    ["dpop", "--key", key, "--method", "GET", "--url", AUDIENCE]
}

/// Lower-case hex, as keybound prints CKA_IDs.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `keybound <args> --json`, which exits `code`; its JSON array.
fn json_array(token: &DevToken, args: &[&str], code: i32) -> Vec<Value> {
    let out = token.keybound(args);
    assert_exit(&out, code, &args);
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{args:?} prints a JSON array ({e})\n{}", describe(&out)))
}

fn entry<'a>(entries: &'a [Value], label: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["label"] == label)
        .unwrap_or_else(|| panic!("no entry for {label}: {entries:#?}"))
}

fn has_finding(entry: &Value, severity: &str, attribute: &str) -> bool {
    entry["findings"].as_array().is_some_and(|f| {
        f.iter()
            .any(|f| f["severity"] == severity && f["attribute"] == attribute)
    })
}

/// The RFC 7638 thumbprint of a P-256 public key.
fn p256_kid(public: &p256::PublicKey) -> String {
    let point = public.to_encoded_point(false);
    jwk_thumbprint(&json!({
        "kty": "EC",
        "crv": "P-256",
        "x": b64(point.x().unwrap()),
        "y": b64(point.y().unwrap()),
    }))
}

/// The kids `keybound jwks` publishes.
fn published_kids(token: &DevToken) -> Vec<String> {
    token
        .jwks(&[])
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_owned())
        .collect()
}

/// `assertion` and `dpop` with `key` both fail with one error line naming every needle.
fn assert_signing_refused(token: &DevToken, key: &str, needles: &[&str]) {
    for args in [assertion_args(key), dpop_args(key)] {
        let line = token.run_err(&args);
        assert_mentions(&line, needles);
    }
}

// ---------------------------------------------------------------------------
// F1: proof of possession
// ---------------------------------------------------------------------------

#[test]
fn public_object_replaced_without_the_pin_is_refused_and_never_published() {
    let token = DevToken::new();
    token.generate("victim", "ES256");
    let other = token.generate("other", "ES256");
    let id = key_id(&token, "victim");
    let attacker = p256::SecretKey::random(&mut OsRng);
    let attacker_kid = p256_kid(&attacker.public_key());
    with_public_session(&token, |s| {
        let publics = public_keys(s, &id);
        assert_eq!(publics.len(), 1, "one public object before");
        s.destroy_object(publics[0])
            .expect("C_DestroyObject of a public object without C_Login");
        create_p256_public(s, "victim", &id, p256_ec_point(&attacker.public_key()));
    });

    let out = token.keybound(&["keys", "audit"]);
    assert_exit(&out, 3, &"keys audit");
    assert_mentions(
        &stdout(&out),
        &["victim", "does not match the private key", "do not publish"],
    );
    let audited = json_array(&token, &["keys", "audit", "--label", "victim", "--json"], 3);
    let victim = entry(&audited, "victim");
    assert_eq!(victim["verdict"], "fail", "{victim:#}");
    assert!(
        has_finding(victim, "fail", "proof of possession"),
        "{victim:#}"
    );
    let listed = json_array(&token, &["keys", "list", "--json"], 0);
    assert_eq!(entry(&listed, "victim")["policy"], "fail");
    assert_eq!(entry(&listed, "other")["policy"], "pass");

    assert_eq!(published_kids(&token), std::slice::from_ref(&other));
    let jwks = token.run_ok(&["jwks"]);
    assert!(!jwks.contains(&attacker_kid), "{jwks}");
    let line = token.run_err(&["jwks", "--label", "victim"]);
    assert_mentions(&line, &["does not match the private key"]);
    assert_signing_refused(
        &token,
        "victim",
        &["victim", "does not match the private key"],
    );

    // The untouched key is not affected.
    let jws = token.sign(&dpop_args("other"));
    assert_eq!(jwk_thumbprint(&jws.header["jwk"]), other);
    assert_verifies(&token.jwk("other"), &jws);
}

/// A key pair generated in a session that never logged in, marked `CKA_PRIVATE=false`
/// (SoftHSM allows it): local, always sensitive, never extractable, and the device proves
/// possession, but anyone who can open the token signs with it. Refused, never published.
#[test]
fn a_key_usable_without_the_pin_is_refused_and_never_published() {
    let token = DevToken::new();
    let other = token.generate("other", "ES256");
    with_public_session(&token, |s| {
        generate_pair(
            s,
            &cryptoki::mechanism::Mechanism::EccKeyPairGen,
            "planted",
            &[7; 16],
            &[Attribute::EcParams(P256_PARAMS.to_vec())],
            &[Attribute::Private(false)],
        )
    });
    let listed = json_array(&token, &["keys", "list", "--json"], 0);
    assert_eq!(entry(&listed, "planted")["policy"], "fail", "{listed:#?}");
    let audited = json_array(
        &token,
        &["keys", "audit", "--label", "planted", "--json"],
        3,
    );
    let planted = entry(&audited, "planted");
    assert!(has_finding(planted, "fail", "CKA_PRIVATE"), "{planted:#}");
    assert_eq!(published_kids(&token), std::slice::from_ref(&other));
    assert_signing_refused(&token, "planted", &["planted", "CKA_PRIVATE=false"]);
}

/// A rotation record planted without the PIN (a public data object under the record's
/// application and label) is never read: not even garbage stops a key that has no record.
#[test]
fn a_rotation_record_planted_without_the_pin_is_ignored() {
    let token = DevToken::new();
    let victim = token.generate("victim", "ES256");
    with_public_session(&token, |s| {
        s.create_object(&[
            Attribute::Class(cryptoki::object::ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Application(b"keybound rotation".to_vec()),
            Attribute::Label(b"keybound rotation: victim".to_vec()),
            Attribute::Value(b"x".to_vec()),
        ])
        .expect("C_CreateObject of a public data object without C_Login")
    });
    let jws = token.sign(&dpop_args("victim"));
    assert_eq!(jwk_thumbprint(&jws.header["jwk"]), victim);
    assert_verifies(&token.jwk("victim"), &jws);
    let listed = json_array(&token, &["keys", "list", "--json"], 0);
    assert_eq!(entry(&listed, "victim")["policy"], "pass", "{listed:#?}");
}

#[test]
fn a_second_public_object_with_the_same_id_is_refused() {
    let token = DevToken::new();
    token.generate("victim", "ES256");
    let other = token.generate("other", "ES256");
    let id = key_id(&token, "victim");
    let attacker = p256::SecretKey::random(&mut OsRng);
    with_public_session(&token, |s| {
        create_p256_public(s, "victim", &id, p256_ec_point(&attacker.public_key()));
        assert_eq!(public_keys(s, &id).len(), 2);
    });

    let out = token.keybound(&["keys", "audit"]);
    assert_exit(&out, 3, &"keys audit");
    assert_mentions(&stdout(&out), &["victim", &hex(&id), "public key objects"]);
    let listed = json_array(&token, &["keys", "list", "--json"], 0);
    assert_eq!(entry(&listed, "victim")["policy"], "fail", "{listed:#?}");
    assert_eq!(entry(&listed, "victim")["id"], hex(&id));
    assert_eq!(published_kids(&token), [other]);
    assert_signing_refused(&token, "victim", &[&hex(&id), "public key objects"]);
}

#[test]
fn a_public_object_not_generated_on_the_device_is_reported() {
    let token = DevToken::new();
    let kid = token.generate("victim", "ES256");
    let id = key_id(&token, "victim");
    // Destroyed and created again with the same, correct point: it still belongs to the
    // key, but it was not generated with it.
    with_public_session(&token, |s| {
        let publics = public_keys(s, &id);
        let point = match &s
            .get_attributes(publics[0], &[AttributeType::EcPoint])
            .unwrap()[..]
        {
            [Attribute::EcPoint(p)] => p.clone(),
            other => panic!("CKA_EC_POINT: {other:?}"),
        };
        s.destroy_object(publics[0]).expect("C_DestroyObject");
        create_p256_public(s, "victim", &id, point);
    });

    let audited = json_array(&token, &["keys", "audit", "--label", "victim", "--json"], 0);
    let victim = entry(&audited, "victim");
    assert_eq!(victim["verdict"], "warn", "{victim:#}");
    assert!(
        has_finding(victim, "warn", "public CKA_LOCAL"),
        "{victim:#}"
    );
    assert_eq!(
        victim["attributes"]["public CKA_LOCAL"], false,
        "{victim:#}"
    );
    assert_eq!(published_kids(&token), [kid]);
    let jws = token.sign(&dpop_args("victim"));
    assert_verifies(&token.jwk("victim"), &jws);
}

// ---------------------------------------------------------------------------
// F10: one bad object
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_objects_are_reported_and_unrelated_keys_keep_working() {
    let token = DevToken::new();
    let good = token.generate("good", "ES256");
    token.generate("victim", "ES256");
    token.generate("copied", "ES256");
    let (victim_id, copied_id) = (key_id(&token, "victim"), key_id(&token, "copied"));
    // A public object with an empty CKA_EC_POINT, planted without the PIN.
    with_public_session(&token, |s| {
        let publics = public_keys(s, &victim_id);
        s.destroy_object(publics[0]).expect("C_DestroyObject");
        create_p256_public(s, "victim", &victim_id, Vec::new());
    });
    // A token copy of a private key (same label, same CKA_ID).
    with_session(&token, |s| {
        s.copy_object(private_key(s, "copied"), &[])
            .expect("C_CopyObject");
    });

    let text = token.run_ok(&["keys", "list"]);
    assert_mentions(&text, &["good", &good, "victim", "copied", "CKA_EC_POINT"]);
    let listed = json_array(&token, &["keys", "list", "--json"], 0);
    assert_eq!(entry(&listed, "good")["policy"], "pass");
    for (label, id, needle) in [
        ("victim", &victim_id, "CKA_EC_POINT"),
        ("copied", &copied_id, "private key"),
    ] {
        let e = entry(&listed, label);
        assert_eq!(e["policy"], "fail", "{e}");
        assert_eq!(e["id"], hex(id), "{e}");
        assert_mentions(&e["reasons"].to_string(), &[needle]);
    }
    let out = token.keybound(&["keys", "audit"]);
    assert_exit(&out, 3, &"keys audit");
    assert_mentions(
        &stdout(&out),
        &[
            "good",
            "victim",
            &hex(&victim_id),
            "copied",
            &hex(&copied_id),
        ],
    );
    assert_eq!(published_kids(&token), std::slice::from_ref(&good));
    let jws = token.sign(&dpop_args("good"));
    assert_verifies(&token.jwk("good"), &jws);
    assert_signing_refused(&token, "victim", &["victim", "CKA_EC_POINT"]);

    // The agent: healthy, signs with the good key, lists the bad objects.
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let health = get(agent.socket(), "/healthz").await.ok("GET /healthz");
    assert_eq!(health["status"], "ok", "{health}");
    let jwks = served_jwks(&agent, &token.jwks(&[])).await;
    let start = window_start();
    let proof = post(
        agent.socket(),
        "/v1/dpop",
        &dpop_request("good", "GET", "https://a.example/x"),
    )
    .await
    .ok_member("/v1/dpop with the good key", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(&good, "GET", "https://a.example/x"),
        window_end(start),
    );
    let keys = get(agent.socket(), "/v1/keys").await.ok("GET /v1/keys");
    let keys = keys.as_array().expect("an array");
    assert_eq!(entry(keys, "good")["policy"], "pass");
    assert_eq!(entry(keys, "victim")["policy"], "fail");
    assert_eq!(entry(keys, "copied")["policy"], "fail");
}

// ---------------------------------------------------------------------------
// F11: duplicate labels
// ---------------------------------------------------------------------------

#[test]
fn an_ambiguous_label_is_an_error_listing_the_ids() {
    let token = DevToken::new();
    with_session(&token, |s| {
        for id in [[0x01u8], [0x02], [0x03]] {
            generate_p256(s, "dpop", &id);
        }
    });
    assert_eq!(json_array(&token, &["keys", "list", "--json"], 0).len(), 3);
    assert_signing_refused(
        &token,
        "dpop",
        &[
            "'dpop'",
            "01",
            "02",
            "03",
            "pkcs11:object=dpop;id=%02",
            "delete",
        ],
    );
    let line = token.run_err(&["jwks", "--label", "dpop"]);
    assert_mentions(&line, &["01", "02", "03"]);

    // Named by id, one of them signs.
    let name = "pkcs11:object=dpop;id=%02";
    let jwk = token.jwk(name);
    let jws = token.sign(&dpop_args(name));
    assert_eq!(jws.header["jwk"], required_public_members(&jwk));
    assert_verifies(&jwk, &jws);
}

// ---------------------------------------------------------------------------
// F5: a key replaced while the agent runs
// ---------------------------------------------------------------------------

/// Asks the running agent for a proof with `key` after its key was replaced: the first
/// answer is a policy refusal; no later answer is ever a proof that does not verify under
/// the `jwk` in its own header.
async fn assert_replaced_key_refused(agent: &Agent, key: &str) {
    let request = dpop_request(key, "GET", "https://a.example/after");
    let first = post(agent.socket(), "/v1/dpop", &request).await;
    first.error(403, "policy_refused", &[key]);
    for _ in 0..3 {
        let reply = post(agent.socket(), "/v1/dpop", &request).await;
        if reply.status.is_success() {
            let jws = Jws::parse(&reply.ok_member("/v1/dpop", "proof"));
            let alg = jws.header["alg"].as_str().expect("alg").to_owned();
            Verifier::new(&alg, &jws.header["jwk"])
                .verify(&jws)
                .unwrap_or_else(|e| panic!("a proof that its own jwk does not verify: {e}"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_key_replaced_after_approval() {
    let token = DevToken::new();
    let kid = token.generate("dpop", "ES256");
    let other = token.generate("other", "ES256");
    token.generate("imported", "ES256");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = served_jwks(&agent, &token.jwks(&[])).await;
    for (key, kid) in [("dpop", &kid), ("other", &other)] {
        let start = window_start();
        let proof = post(
            agent.socket(),
            "/v1/dpop",
            &dpop_request(key, "GET", "https://a.example/before"),
        )
        .await
        .ok_member("a proof before the replacement", "proof");
        check_proof(
            &jwks,
            &proof,
            &want_proof(kid, "GET", "https://a.example/before"),
            window_end(start),
        );
    }
    // "imported" approved too: replaced below by an imported pair, it is refused whether the
    // agent approves its held key again or resolves the name afresh.
    post(
        agent.socket(),
        "/v1/dpop",
        &dpop_request("imported", "GET", "https://a.example/before"),
    )
    .await
    .ok("imported before");

    // With the PIN: both halves deleted and a new pair made on the device under the same
    // CKA_ID and label (it passes the policy; only its public key differs), and a pair
    // imported in place of "imported" (C_CreateObject).
    let (dpop_id, imported_id) = (key_id(&token, "dpop"), key_id(&token, "imported"));
    with_session(&token, |s| {
        for id in [&dpop_id, &imported_id] {
            for object in objects_with_id(s, id) {
                s.destroy_object(object).expect("C_DestroyObject");
            }
        }
        generate_p256(s, "dpop", &dpop_id);
        let secret = p256::SecretKey::random(&mut OsRng);
        import_p256(s, "imported", &imported_id, &secret, true, false);
    });

    assert_replaced_key_refused(&agent, "dpop").await;
    assert_replaced_key_refused(&agent, "imported").await;
    let later = post(
        agent.socket(),
        "/v1/dpop",
        &dpop_request("imported", "GET", "https://a.example/after"),
    )
    .await;
    later.error(403, "policy_refused", &["CKA_LOCAL"]);

    // The untouched key still signs, and verifies.
    let start = window_start();
    let proof = post(
        agent.socket(),
        "/v1/dpop",
        &dpop_request("other", "GET", "https://a.example/after"),
    )
    .await
    .ok_member("the untouched key", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(&other, "GET", "https://a.example/after"),
        window_end(start),
    );
}

/// F5's detection relies on the token never handing out an object handle again for a new
/// object within one library session (C_Initialize to C_Finalize): a replaced key must come
/// back under a handle keybound has not seen, so its signature fails with
/// CKR_KEY_HANDLE_INVALID and the key is approved afresh. SoftHSM's handle manager counts
/// handles up and never reuses one (src/lib/handle_mgr/HandleManager.cpp); this checks it
/// on the installed SoftHSM, deleting and making keys under one label and CKA_ID, and public
/// objects without the PIN, in one library session each.
#[test]
fn softhsm_never_reuses_an_object_handle_in_one_library_session() {
    let token = DevToken::new();
    let id = b"handle-reuse".to_vec();
    fn fresh(seen: &mut HashSet<u64>, handles: &[ObjectHandle]) {
        for h in handles {
            assert!(
                seen.insert(h.handle()),
                "handle {} issued again",
                h.handle()
            );
        }
    }
    with_session(&token, |s| {
        let mut seen = HashSet::new();
        for _ in 0..25 {
            generate_p256(s, "k", &id);
            let handles = objects_with_id(s, &id);
            assert_eq!(handles.len(), 2);
            fresh(&mut seen, &handles);
            for h in handles {
                s.destroy_object(h).expect("C_DestroyObject");
            }
        }
    });
    let point = p256_ec_point(&p256::SecretKey::random(&mut OsRng).public_key());
    // Only handles within one library session are compared.
    with_public_session(&token, |s| {
        let mut seen = HashSet::new();
        for _ in 0..25 {
            create_p256_public(s, "k", &id, point.clone());
            let handles = public_keys(s, &id);
            assert_eq!(handles.len(), 1);
            fresh(&mut seen, &handles);
            s.destroy_object(handles[0]).expect("C_DestroyObject");
        }
    });
}
