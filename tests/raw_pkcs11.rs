//! keybound against keys it did not make, placed on the token with raw
//! PKCS#11 (cryptoki) from this test process: imported keys (C_CreateObject,
//! so CKA_LOCAL is false), a key generated extractable, and well-made keys of
//! another tool. Also reads keybound's own keys back with raw PKCS#11. The raw
//! PKCS#11 helpers (and why they hold a lock) are in `tests/raw_support`.

mod raw_support;
mod support;

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType};
use p256::elliptic_curve::rand_core::OsRng;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use raw_support::*;
use serde_json::{Value, json};
use support::*;

// ---------------------------------------------------------------------------
// keybound's own keys, read back with raw PKCS#11
// ---------------------------------------------------------------------------

#[test]
fn generated_private_keys_cannot_be_read_out() {
    let token = DevToken::new();
    token.generate("kb-ec", "ES256");
    token.generate("kb-rsa", "RS256");
    with_session(&token, |session| {
        for (label, secret) in [
            ("kb-ec", AttributeType::Value),
            ("kb-rsa", AttributeType::PrivateExponent),
        ] {
            let key = private_key(session, label);
            let info = session.get_attribute_info(key, &[secret]).unwrap();
            assert!(
                matches!(info[..], [AttributeInfo::Sensitive]),
                "{label}: reading the secret {secret:?} must be refused: {info:?}"
            );
            let attrs = session
                .get_attributes(
                    key,
                    &[
                        AttributeType::Extractable,
                        AttributeType::Sensitive,
                        AttributeType::AlwaysSensitive,
                        AttributeType::NeverExtractable,
                        AttributeType::Local,
                        AttributeType::Sign,
                        AttributeType::Decrypt,
                        AttributeType::Unwrap,
                        AttributeType::Derive,
                    ],
                )
                .unwrap();
            assert_eq!(
                attrs,
                [
                    Attribute::Extractable(false),
                    Attribute::Sensitive(true),
                    Attribute::AlwaysSensitive(true),
                    Attribute::NeverExtractable(true),
                    Attribute::Local(true),
                    Attribute::Sign(true),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(false),
                    Attribute::Derive(false),
                ],
                "{label} attributes"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// Keys keybound must refuse (or accept only when told to)
// ---------------------------------------------------------------------------

#[test]
fn imported_extractable_key_is_refused_even_with_danger_flag() {
    let token = DevToken::new();
    let good_kid = token.generate("good", "ES256");
    let secret = p256::SecretKey::random(&mut OsRng);
    with_session(&token, |session| {
        import_p256(session, "imported", b"imported", &secret, false, true);
    });

    let entry = audit_one(&token, "imported", 3);
    assert_eq!(entry["verdict"], "fail");
    assert_attributes(
        &entry,
        &[
            ("CKA_EXTRACTABLE", true),
            ("CKA_SENSITIVE", false),
            ("CKA_LOCAL", false),
        ],
    );
    assert_finding(&entry, "fail", "CKA_EXTRACTABLE");
    let out = token.keybound(&["keys", "audit", "--label", "imported"]);
    assert_exit(&out, 3, &"keys audit --label imported");
    assert_mentions(&describe(&out), &["CKA_EXTRACTABLE"]);
    assert_exit(&token.keybound(&["keys", "audit"]), 3, &"keys audit (all)");

    let listed: Vec<Value> =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).unwrap();
    let policy = |label: &str| {
        let entry = listed.iter().find(|k| k["label"] == label).unwrap();
        (entry["policy"].clone(), entry["reasons"].to_string())
    };
    assert_eq!(policy("good").0, "pass");
    let (verdict, reasons) = policy("imported");
    assert_eq!(verdict, "fail");
    assert_mentions(&reasons, &["CKA_EXTRACTABLE"]);

    let kids: Vec<Value> = token.jwks(&[]).iter().map(|k| k["kid"].clone()).collect();
    assert_eq!(kids, [json!(good_kid)], "jwks lists only keys that pass");
    assert_refused(&token, "imported", "CKA_EXTRACTABLE");

    // Extractable keys stay refused whatever danger_allow_imported_keys says.
    token.set_danger_allow_imported_keys(true);
    assert_eq!(audit_one(&token, "imported", 3)["verdict"], "fail");
    assert_refused(&token, "imported", "CKA_EXTRACTABLE");
}

#[test]
fn imported_sensitive_key_is_refused_unless_danger_flag_is_set() {
    let token = DevToken::new();
    let secret = p256::SecretKey::random(&mut OsRng);
    with_session(&token, |session| {
        import_p256(session, "imported", b"imported", &secret, true, false);
    });

    let entry = audit_one(&token, "imported", 3);
    assert_eq!(entry["verdict"], "fail");
    assert_attributes(
        &entry,
        &[
            ("CKA_EXTRACTABLE", false),
            ("CKA_SENSITIVE", true),
            ("CKA_LOCAL", false),
        ],
    );
    assert_finding(&entry, "fail", "CKA_LOCAL");
    assert_refused(&token, "imported", "CKA_LOCAL");

    token.set_danger_allow_imported_keys(true);
    let entry = audit_one(&token, "imported", 0);
    assert_ne!(entry["verdict"], "fail", "{entry}");
    let jwk = token.jwk("imported");
    assert_jwks_entry(&jwk, "ES256");
    let point = secret.public_key().to_encoded_point(false);
    assert_eq!(
        (jwk["x"].as_str(), jwk["y"].as_str()),
        (
            Some(b64(point.x().unwrap()).as_str()),
            Some(b64(point.y().unwrap()).as_str())
        ),
        "the JWKS holds the imported key's public half"
    );
    let jws = token.sign(&assertion_args("imported"));
    assert_eq!(jws.header["kid"], jwk["kid"]);
    assert_verifies(&jwk, &jws);
}

#[test]
fn key_generated_extractable_on_the_token_is_refused() {
    let token = DevToken::new();
    with_session(&token, |session| {
        generate_pair(
            session,
            &Mechanism::EccKeyPairGen,
            "extractable",
            b"extractable",
            &[Attribute::EcParams(P256_PARAMS.to_vec())],
            &[
                Attribute::Extractable(true),
                Attribute::AllowedMechanisms(vec![MechanismType::ECDSA]),
            ],
        );
    });

    let entry = audit_one(&token, "extractable", 3);
    assert_eq!(entry["verdict"], "fail");
    assert_attributes(
        &entry,
        &[
            ("CKA_EXTRACTABLE", true),
            ("CKA_NEVER_EXTRACTABLE", false),
            ("CKA_LOCAL", true),
        ],
    );
    assert_finding(&entry, "fail", "CKA_EXTRACTABLE");
    assert_refused(&token, "extractable", "CKA_EXTRACTABLE");
}

// ---------------------------------------------------------------------------
// Well-made keys from another tool
// ---------------------------------------------------------------------------

/// Keys found by label and paired with their public key by CKA_ID; the
/// RSA algorithm comes from CKA_ALLOWED_MECHANISMS.
#[test]
fn keys_from_another_tool_are_found_and_their_algorithm_inferred() {
    let token = DevToken::new();
    let rsa_public = [
        Attribute::ModulusBits(2048.into()),
        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
    ];
    let p384_public = [Attribute::EcParams(P384_PARAMS.to_vec())];
    let made = [
        ("tool-pss", 1, &rsa_public[..], MechanismType::RSA_PKCS_PSS),
        ("tool-pkcs1", 2, &rsa_public[..], MechanismType::RSA_PKCS),
        ("tool-p384", 3, &p384_public[..], MechanismType::ECDSA),
    ];
    with_session(&token, |session| {
        for (label, id, public, allowed) in made {
            let mechanism = if allowed == MechanismType::ECDSA {
                Mechanism::EccKeyPairGen
            } else {
                Mechanism::RsaPkcsKeyPairGen
            };
            let private = [Attribute::AllowedMechanisms(vec![allowed])];
            generate_pair(session, &mechanism, label, &[id], public, &private);
        }
    });

    let listed: Vec<Value> =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).unwrap();
    for (label, alg, id) in [
        ("tool-pss", "PS256", "01"),
        ("tool-pkcs1", "RS256", "02"),
        ("tool-p384", "ES384", "03"),
    ] {
        let entry = listed
            .iter()
            .find(|k| k["label"] == label)
            .unwrap_or_else(|| panic!("keys list lacks {label}: {listed:?}"));
        assert_eq!(entry["alg"], alg, "{entry}");
        assert_eq!(entry["id"], id, "{entry}");
        assert_eq!(entry["policy"], "pass", "{entry}");
        let jwk = token.jwk(label);
        assert_jwks_entry(&jwk, alg);
        assert_eq!(entry["kid"], jwk["kid"]);
        let jws = token.sign(&assertion_args(label));
        assert_verifies(&jwk, &jws);
    }
}

// ---------------------------------------------------------------------------
// keybound checks
// ---------------------------------------------------------------------------

/// `keys audit --label <label> --json`: exits `code` and describes one key.
fn audit_one(token: &DevToken, label: &str, code: i32) -> Value {
    let args = ["keys", "audit", "--label", label, "--json"];
    let out = token.keybound(&args);
    assert_exit(&out, code, &args);
    let entries: Vec<Value> = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{args:?} prints a JSON array ({e})\n{}", describe(&out)));
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = entries.into_iter().next().unwrap();
    assert_eq!(entry["label"], label);
    entry
}

fn assert_attributes(entry: &Value, want: &[(&str, bool)]) {
    for (name, value) in want {
        assert_eq!(entry["attributes"][name], *value, "{name} in {entry}");
    }
}

fn assert_finding(entry: &Value, severity: &str, attribute: &str) {
    let findings = entry["findings"].as_array().expect("findings is an array");
    for finding in findings {
        assert_members(finding, &["severity", "attribute", "message"]);
    }
    assert!(
        findings
            .iter()
            .any(|f| f["severity"] == severity && f["attribute"] == attribute),
        "want a {severity} finding on {attribute}: {entry:#}"
    );
}

/// Signing with `label` fails with one error line naming `attribute`.
fn assert_refused(token: &DevToken, label: &str, attribute: &str) {
    let line = token.run_err(&assertion_args(label));
    assert_mentions(&line, &[attribute]);
    let line = token.run_err(&["dpop", "--key", label, "--method", "GET", "--url", AUDIENCE]);
    assert_mentions(&line, &[attribute]);
}
