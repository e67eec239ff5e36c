//! `pkcs11:` URIs (RFC 7512) on a real SoftHSM2 token: for each URI, the keys keybound's
//! `keys audit --label URI` finds are exactly the private keys GnuTLS's `p11tool --list-all`
//! resolves for the same URI (or both find none); `dpop --key URI` signs with the one key
//! a URI names (verified from the JWK with the p256 crate); the query attributes never
//! choose the module or the PIN.

mod agent_support;
mod support;

use std::collections::BTreeSet;
use std::process::Command;

use agent_support::*;
use serde_json::Value;
use support::*;

/// (label, lower-case hex CKA_ID) of a key.
type Key = (String, String);

/// The private keys `p11tool --list-all` lists for `uri` on this token, logged in with the
/// PIN from `GNUTLS_PIN` (never argv). `--list-all`, not `--list-all-privkeys`: the latter
/// replaces the URI's own `type`.
fn p11tool_private_keys(token: &DevToken, uri: &str) -> BTreeSet<Key> {
    let out = Command::new("p11tool")
        .args([
            "--provider",
            MODULE,
            "--login",
            "--only-urls",
            "--list-all",
            uri,
        ])
        .env("SOFTHSM2_CONF", token.softhsm_conf())
        .env("GNUTLS_PIN", USER_PIN)
        .output()
        .expect("run p11tool (is gnutls-bin installed?)");
    let text = stdout(&out);
    if text.trim().is_empty() {
        // p11tool says "No matching objects found" and exits non-zero.
        assert!(
            stderr(&out).contains("No matching objects found"),
            "p11tool {uri}\n{}",
            describe(&out)
        );
        return BTreeSet::new();
    }
    assert!(out.status.success(), "p11tool {uri}\n{}", describe(&out));
    text.lines()
        .filter_map(|url| {
            let attr = |name: &str| {
                let path = url.strip_prefix("pkcs11:")?.split('?').next()?;
                path.split(';')
                    .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
                    .map(pct_decode)
            };
            (attr("type")? == b"private").then(|| {
                let label = String::from_utf8(attr("object").unwrap_or_default()).unwrap();
                let id = attr("id").unwrap_or_default();
                (label, id.iter().map(|b| format!("{b:02x}")).collect())
            })
        })
        .collect()
}

fn pct_decode(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).expect("p11tool escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The keys `keybound keys audit --label URI --json` lists, or none and the error it gave.
fn keybound_keys(token: &DevToken, uri: &str) -> (BTreeSet<Key>, String) {
    let out = token.keybound(&["keys", "audit", "--label", uri, "--json"]);
    match serde_json::from_str::<Value>(&stdout(&out)) {
        // Exit 3: listed, with a failing verdict (the key pkcs11-tool made).
        Ok(Value::Array(keys)) if matches!(out.status.code(), Some(0 | 3)) => {
            let keys = keys
                .iter()
                .map(|k| {
                    let s = |f: &str| k[f].as_str().expect("label and id").to_owned();
                    (s("label"), s("id"))
                })
                .collect();
            (keys, String::new())
        }
        _ => {
            let line = assert_error(&out, &uri);
            (BTreeSet::new(), line)
        }
    }
}

/// The token's serial as p11tool reports it.
fn serial(token: &DevToken) -> String {
    let out = Command::new("p11tool")
        .args(["--provider", MODULE, "--list-token-urls"])
        .env("SOFTHSM2_CONF", token.softhsm_conf())
        .output()
        .expect("run p11tool");
    let text = stdout(&out);
    let url = text
        .lines()
        .find(|u| u.contains(&format!("token={TOKEN_LABEL}")))
        .unwrap_or_else(|| panic!("p11tool --list-token-urls\n{}", describe(&out)));
    url.split(';')
        .find_map(|a| a.strip_prefix("serial="))
        .expect("serial in the token URL")
        .to_owned()
}

#[test]
fn keybound_finds_exactly_the_private_keys_p11tool_resolves() {
    let token = DevToken::new();
    token.generate("dpop", "ES256");
    token.generate("client", "ES256");
    // A second key labelled "dpop", made by another tool, with CKA_ID 0x77.
    let out = token.pkcs11_tool(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "dpop",
        "--id",
        "77",
    ]);
    assert!(out.status.success(), "pkcs11-tool\n{}", describe(&out));
    let serial = serial(&token);
    let dpop_id = {
        let (keys, _) = keybound_keys(&token, "pkcs11:object=dpop");
        let ids: Vec<&String> = keys
            .iter()
            .map(|(_, id)| id)
            .filter(|id| *id != "77")
            .collect();
        assert_eq!(ids.len(), 1, "{keys:?}");
        ids[0].clone()
    };
    let dpop_id_uri: String = dpop_id
        .as_bytes()
        .chunks(2)
        .map(|h| format!("%{}", std::str::from_utf8(h).unwrap()))
        .collect();

    let t = TOKEN_LABEL;
    // (uri, how many private keys it names, what keybound says when it names none)
    let cases: Vec<(String, usize, &str)> = vec![
        (format!("pkcs11:token={t};object=dpop"), 2, ""),
        (format!("pkcs11:token={t};object=client"), 1, ""),
        ("pkcs11:id=%77".into(), 1, ""),
        (format!("pkcs11:object=dpop;id={dpop_id_uri}"), 1, ""),
        (format!("pkcs11:serial={serial};object=client"), 1, ""),
        (
            "pkcs11:serial=0000000000000000;object=client".into(),
            0,
            "serial '0000000000000000'",
        ),
        (
            "pkcs11:manufacturer=SoftHSM%20project;model=SoftHSM%20v2;object=client".into(),
            1,
            "",
        ),
        (
            "pkcs11:manufacturer=Yubico%20%28www.yubico.com%29;object=client".into(),
            0,
            "manufacturer 'Yubico (www.yubico.com)'",
        ),
        (
            "pkcs11:model=YubiHSM;object=client".into(),
            0,
            "model 'YubiHSM'",
        ),
        (
            "pkcs11:token=other;object=client".into(),
            0,
            "token 'other'",
        ),
        ("pkcs11:object=client;type=private".into(), 1, ""),
        ("pkcs11:object=client;object-type=private".into(), 1, ""),
        (
            "pkcs11:object=client;type=public".into(),
            0,
            "type=public names no private key",
        ),
        (
            "pkcs11:object=client;object-type=public".into(),
            0,
            "object-type=public names no private key",
        ),
        (
            "pkcs11:library-manufacturer=SoftHSM;object=client".into(),
            1,
            "",
        ),
        (
            "pkcs11:library-manufacturer=OpenSC;object=client".into(),
            0,
            "library-manufacturer 'OpenSC'",
        ),
        (
            "pkcs11:library-description=Implementation%20of%20PKCS11;object=client".into(),
            1,
            "",
        ),
        (
            "pkcs11:library-version=0.1;object=client".into(),
            0,
            "library-version 0.1",
        ),
        ("pkcs11:object=nothing".into(), 0, "nothing"),
    ];
    for (uri, count, says) in &cases {
        let listed = p11tool_private_keys(&token, uri);
        let (found, error) = keybound_keys(&token, uri);
        assert_eq!(found, listed, "{uri}: keybound {error}");
        assert_eq!(found.len(), *count, "{uri}: {found:?}");
        if *count == 0 {
            assert!(error.contains(says), "{uri}: {error}");
        }
    }
}

#[test]
fn dpop_signs_with_the_key_a_uri_names_and_only_on_the_token_it_names() {
    let token = DevToken::new();
    token.generate("client", "ES256");
    let jwk = token.jwk("client");
    let serial = serial(&token);
    let dpop =
        |key: &str| ["dpop", "--key", key, "--method", "GET", "--url", AUDIENCE].map(str::to_owned);
    for uri in [
        format!("pkcs11:serial={serial};object=client"),
        "pkcs11:object=client;object-type=private?module-path=/usr/lib/softhsm/libsofthsm2.so"
            .into(),
        "pkcs11:object=client?module-name=softhsm2&x-note=ignored".into(),
        "pkcs11:object=client;x-vendor=ignored".into(),
    ] {
        let jws = token.sign(&dpop(&uri));
        assert_verifies(&jwk, &jws);
    }
    for (uri, says) in [
        (
            "pkcs11:serial=0000000000000000;object=client".to_owned(),
            vec!["serial '0000000000000000'", &serial],
        ),
        (
            "pkcs11:object=client?module-path=/tmp/other-pkcs11.so".into(),
            vec![
                "/tmp/other-pkcs11.so",
                MODULE,
                "never makes keybound load a library",
            ],
        ),
        (
            "pkcs11:object=client?module-name=opensc-pkcs11".into(),
            vec!["module-name 'opensc-pkcs11'", MODULE],
        ),
        (
            format!("pkcs11:object=client?pin-value={USER_PIN}"),
            vec!["a PIN never sits in a URI"],
        ),
        (
            "pkcs11:object=client?pin-source=/etc/passwd".into(),
            vec![
                "pin-source '/etc/passwd'",
                "never reads a file a key name points to",
            ],
        ),
        (
            "pkcs11:object=client;object=client".into(),
            vec!["'object' appears twice"],
        ),
        ("pkcs11:object=client;id=%+1".into(), vec!["two hex digits"]),
        (
            "pkcs11:object=client?pin-sauce=x".into(),
            vec!["unknown query attribute 'pin-sauce'", "module-path"],
        ),
    ] {
        let line = token.run_err(&dpop(&uri));
        assert_mentions(&line, &says);
        assert!(!line.contains(USER_PIN), "the PIN is not repeated: {line}");
    }
}

/// Through the agent's socket: a URI is checked before the key cache is asked, so a URI
/// naming another serial, module or PIN file never reaches a key the cache holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_checks_every_attribute_before_its_key_cache() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let serial = serial(&token);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let mut conn = Conn::open(agent.socket()).await;
    let htu = "https://a.example/u";
    // The key is cached by a URI that names it rightly...
    let kid = &kids["dpop"];
    proves(
        &mut conn,
        &jwks,
        kid,
        &format!("pkcs11:serial={serial};object=dpop"),
    )
    .await;
    // ...and every name below is refused all the same.
    for (uri, says) in [
        (
            // The caller learns which attribute differs, never the token's own values,
            // module path or PIN file (the agent logs those).
            "pkcs11:serial=0000000000000000;object=dpop".to_owned(),
            vec!["its serial does not match"],
        ),
        (
            "pkcs11:manufacturer=Yubico;object=dpop".into(),
            vec!["its manufacturer does not match"],
        ),
        (
            "pkcs11:object=dpop?module-path=/tmp/other-pkcs11.so".into(),
            vec!["its module-path does not match"],
        ),
        (
            "pkcs11:object=dpop?pin-source=file:///etc/shadow".into(),
            vec!["its pin-source does not match"],
        ),
        (
            format!("pkcs11:object=dpop?pin-value={USER_PIN}"),
            vec!["a PIN never sits in a URI", "pin-value=[redacted]"],
        ),
        (
            "pkcs11:object=dpop;type=public".into(),
            vec!["type=public names no private key"],
        ),
    ] {
        let message = conn
            .post("/v1/dpop", &dpop_request(&uri, "GET", htu))
            .await
            .error(400, "invalid_request", &says);
        assert!(!message.contains(USER_PIN), "{message}");
        assert!(!message.contains(serial.as_str()), "{message}");
        assert!(!message.contains("libsofthsm2"), "{message}");
    }
    // p11-kit's object-type, the module by its name, a vendor attribute.
    let uri = "pkcs11:object=dpop;object-type=private;x-a=1?module-name=softhsm2";
    proves(&mut conn, &jwks, kid, uri).await;
}

/// `POST /v1/dpop` naming `uri` gives a proof by the key `kid`, verified from the JWKS.
async fn proves(
    conn: &mut Conn,
    jwks: &std::collections::BTreeMap<String, Value>,
    kid: &str,
    uri: &str,
) {
    let htu = "https://a.example/u";
    let start = window_start();
    let proof = conn
        .post("/v1/dpop", &dpop_request(uri, "GET", htu))
        .await
        .ok_member("a proof by URI", "proof");
    check_proof(
        jwks,
        &proof,
        &want_proof(kid, "GET", htu),
        window_end(start),
    );
}

/// `slot-id`, `slot-description` and `slot-manufacturer` are checked against the slot the
/// configured token is in, as pkcs11-tool reports it: right values find the key, a wrong
/// one is refused naming the attribute.
#[test]
fn slot_attributes_are_checked_against_the_tokens_slot() {
    let token = DevToken::new();
    token.generate("dpop", "ES256");
    let out = token.pkcs11_tool(&["--list-slots"]);
    let text = stdout(&out);
    // "Slot 1 (0x2c8a1f3e): SoftHSM slot ID 0x2c8a1f3e" then "  token label : keybound-test"
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("token label") && l.contains(TOKEN_LABEL))
        .unwrap_or_else(|| panic!("no slot with the token:\n{text}"));
    let header = lines[..at]
        .iter()
        .rev()
        .find(|l| l.starts_with("Slot "))
        .expect("the slot line");
    let hex = header
        .split("(0x")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("slot id");
    let id = u64::from_str_radix(hex, 16).expect("hex slot id");
    let description = header.split("): ").nth(1).expect("slot description").trim();
    let enc = |s: &str| s.replace(' ', "%20");
    let right = format!(
        "pkcs11:slot-id={id};slot-description={};object=dpop",
        enc(description)
    );
    let (found, err) = keybound_keys(&token, &right);
    assert_eq!(found.len(), 1, "{right}: {err}");
    for (uri, says) in [
        (format!("pkcs11:slot-id={};object=dpop", id + 1), "slot-id"),
        (
            "pkcs11:slot-description=another%20slot;object=dpop".to_owned(),
            "slot-description 'another slot'",
        ),
        (
            "pkcs11:slot-manufacturer=Acme;object=dpop".to_owned(),
            "slot-manufacturer 'Acme'",
        ),
    ] {
        let (found, err) = keybound_keys(&token, &uri);
        assert!(found.is_empty(), "{uri}");
        assert!(err.contains(says), "{uri}: {err}");
    }
}
