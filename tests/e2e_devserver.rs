//! keybound's main job end to end: the built binary, keys in a real SoftHSM token, the
//! dev-server (`keybound-devserver`, in-process) on 127.0.0.1. `keybound token` and
//! `keybound call` as a user runs them; the access token is verified with p256 from the
//! dev-server's JWKS, not by keybound.

mod support;

use std::process::Command;

use keybound_devserver::{JwksSource, Settings};
use serde_json::Value;
use support::{Config, DevToken, Jws, assert_exit, assert_verifies, stderr, stdout};

const CLIENT_ID: &str = "0oa-e2e";

/// The dev-server (`keybound-devserver`) in-process on 127.0.0.1:0, on a thread and runtime
/// of its own; stopped on drop.
struct DevServer {
    _server: keybound_devserver::Background,
    base: String,
}

impl DevServer {
    fn start(token: &DevToken, jwks: &str, scopes: &str) -> DevServer {
        DevServer::start_with(token, jwks, scopes, |_| {})
    }

    /// `start` with settings changed by `adjust` (a clock offset).
    fn start_with(
        token: &DevToken,
        jwks: &str,
        scopes: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> DevServer {
        let jwks_path = token.write_file("client-jwks.json", jwks);
        let mut settings = Settings {
            granted_scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            ..Settings::new(CLIENT_ID, JwksSource::File(jwks_path))
        };
        adjust(&mut settings);
        let server = keybound_devserver::Background::start(0, settings)
            .unwrap_or_else(|e| panic!("the dev-server did not start: {e}"));
        let base = server.base().to_owned();
        assert!(base.starts_with("http://127.0.0.1:"), "{base}");
        DevServer {
            _server: server,
            base,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A token with `client-auth` and `dpop` of the given algorithms, a dev-server that knows
/// the client by its assertion key, and a `[[client]]` pointing at it.
fn setup(assertion_alg: &str, dpop_alg: &str, client_lines: &str) -> (DevToken, DevServer) {
    let token = DevToken::new();
    token.generate("client-auth", assertion_alg);
    token.generate("dpop", dpop_alg);
    let jwks = support::stdout(&token.keybound(&["jwks", "--label", "client-auth"]));
    let server = DevServer::start(&token, &jwks, "okta.users.read okta.users.manage");
    let client = client_lines.replace("{base}", &server.base);
    token.write_config(&format!(
        "{}\n[[client]]\nname = \"dev\"\nclient_id = \"{CLIENT_ID}\"\nassertion_key = \"client-auth\"\ndpop_key = \"dpop\"\n{client}",
        Config::default().render()
    ));
    (token, server)
}

const READ_WRITE: &str = "token_endpoint = \"{base}/oauth2/v1/token\"\nscopes = [\"okta.users.read\", \"okta.users.manage\"]\n";

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (body.to_owned(), code.to_owned())
}

/// The dev-server's access-token key, from its published JWKS.
fn access_token_jwk(server: &DevServer) -> Value {
    let (body, code) = curl(&[&server.url("/oauth2/v1/keys")]);
    assert_eq!(code, "200");
    let jwks: Value = serde_json::from_str(&body).expect("JWKS");
    jwks["keys"][0].clone()
}

#[test]
fn token_and_api_calls_with_keys_in_softhsm() {
    let (token, server) = setup("ES256", "ES256", READ_WRITE);

    let out = token.keybound(&["token", "--json"]);
    assert_exit(&out, 0, &"keybound token --json");
    let t: Value = serde_json::from_str(&stdout(&out)).expect("token JSON");
    assert_eq!(t["token_type"], "DPoP");
    assert_eq!(t["scope"], "okta.users.read okta.users.manage");
    let dpop_kid = token.jwk("dpop")["kid"].clone();
    assert_eq!(t["cnf_jkt"], dpop_kid, "the token is bound to the DPoP key");
    let access = Jws::parse(t["access_token"].as_str().expect("access_token"));
    assert_verifies(&access_token_jwk(&server), &access);
    assert_eq!(access.claims["cnf"]["jkt"], dpop_kid);
    assert_eq!(access.claims["sub"], CLIENT_ID);

    let check = stdout(&token.keybound(&["token", "--check"]));
    for line in [
        "dpop-bound      yes",
        "round trips     2",
        "read-only       no",
    ] {
        assert!(check.contains(line), "--check shows '{line}':\n{check}");
    }
    assert!(!check.contains(t["access_token"].as_str().unwrap_or("-")));

    let list = token.keybound(&["call", "--paginate", &server.url("/api/v1/users?limit=2")]);
    assert_exit(&list, 0, &"call --paginate");
    let users: Vec<Value> = serde_json::from_str(&stdout(&list)).expect("one JSON array");
    assert_eq!(users.len(), 7, "every page gathered");
    let id = users[0]["id"].as_str().expect("id").to_owned();

    let one = token.keybound(&["call", &server.url(&format!("/api/v1/users/{id}"))]);
    assert_exit(&one, 0, &"call GET user");
    let user: Value = serde_json::from_str(&stdout(&one)).expect("user JSON");
    assert_eq!(user["id"], id.as_str());

    let update = token.keybound(&[
        "call",
        "-d",
        r#"{"profile":{"firstName":"Ada (updated)"}}"#,
        &server.url(&format!("/api/v1/users/{id}")),
    ]);
    assert_exit(&update, 0, &"call POST update");
    let user: Value = serde_json::from_str(&stdout(&update)).expect("user JSON");
    assert_eq!(user["profile"]["firstName"], "Ada (updated)");

    let missing = token.keybound(&["call", &server.url("/api/v1/users/00unope")]);
    assert_exit(&missing, 4, &"call on a missing user");
    assert!(
        stderr(&missing).contains("E0000007"),
        "{}",
        stderr(&missing)
    );

    // The same token is useless as a Bearer token.
    let bearer = format!("Authorization: Bearer {}", access.compact);
    let (body, code) = curl(&["-H", &bearer, &server.url(&format!("/api/v1/users/{id}"))]);
    assert_eq!(code, "401", "{body}");
}

#[test]
fn rsa_assertion_key_and_pss_dpop_key() {
    let (token, server) = setup("RS256", "PS256", READ_WRITE);
    let out = token.keybound(&["token", "--json"]);
    assert_exit(&out, 0, &"keybound token --json");
    let t: Value = serde_json::from_str(&stdout(&out)).expect("token JSON");
    assert_eq!(t["cnf_jkt"], token.jwk("dpop")["kid"]);
    let one = token.keybound(&["call", &server.url("/api/v1/users?limit=1")]);
    assert_exit(&one, 0, &"call with a PS256 proof");
}

#[test]
fn token_endpoint_discovered_from_the_issuer() {
    let (token, server) = setup(
        "ES256",
        "ES256",
        "issuer = \"{base}\"\nscopes = [\"okta.users.read\"]\n",
    );
    let out = token.keybound(&["token", "--check"]);
    assert_exit(&out, 0, &"token --check with issuer discovery");
    assert!(
        stdout(&out).contains(&format!(
            "token endpoint  {}",
            server.url("/oauth2/v1/token")
        )),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_scope_the_server_does_not_grant_is_reported_with_a_hint() {
    let token = DevToken::new();
    token.generate("client-auth", "ES256");
    token.generate("dpop", "ES256");
    let jwks = support::stdout(&token.keybound(&["jwks", "--label", "client-auth"]));
    let server = DevServer::start(&token, &jwks, "okta.users.read");
    token.write_config(&format!(
        "{}\n[[client]]\nname = \"dev\"\nclient_id = \"{CLIENT_ID}\"\nassertion_key = \"client-auth\"\ndpop_key = \"dpop\"\ntoken_endpoint = \"{}\"\nscopes = [\"okta.users.manage\"]\n",
        Config::default().render(),
        server.url("/oauth2/v1/token")
    ));
    let out = token.keybound(&["token"]);
    // The server refused the request: EX_NOPERM.
    assert_exit(&out, 77, &"token for an ungranted scope");
    let err = stderr(&out);
    assert!(
        err.contains("invalid_scope") && err.contains("grant it"),
        "{err}"
    );
}

/// The `clock offset` that `token --check` reports, in seconds.
fn reported_offset(check: &str) -> i64 {
    let line = check
        .lines()
        .find(|l| l.starts_with("clock offset"))
        .unwrap_or_else(|| panic!("--check reports the clock offset:\n{check}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("an offset in seconds: {line}"))
}

/// A server whose clock runs 2 minutes or an hour ahead or behind: the first token request
/// is refused (its assertion is expired, or from the future, in the server's time); keybound
/// reads the refusal's `Date`, retries once in the server's time, and reports the offset.
/// The API calls' proofs are in the server's time too. The dev-server checks every
/// signature with RustCrypto.
#[test]
fn a_server_whose_clock_is_off_is_survived() {
    let token = DevToken::new();
    token.generate("client-auth", "ES256");
    token.generate("dpop", "ES256");
    let jwks = support::stdout(&token.keybound(&["jwks", "--label", "client-auth"]));
    // Every offset is tried and every failure reported, so that a run against a keybound
    // without the clock retry shows which directions fail.
    let mut failures = Vec::new();
    for offset in [120i64, -120, 3600, -3600] {
        let server = DevServer::start_with(
            &token,
            &jwks,
            "okta.users.read okta.users.manage",
            |settings| settings.clock_offset_secs = offset,
        );
        token.write_config(&format!(
            "{}\n[[client]]\nname = \"dev\"\nclient_id = \"{CLIENT_ID}\"\nassertion_key = \"client-auth\"\ndpop_key = \"dpop\"\n{}",
            Config::default().render(),
            READ_WRITE.replace("{base}", &server.base)
        ));

        let out = token.keybound(&["token", "--check"]);
        let check = stdout(&out);
        if out.status.code() != Some(0) {
            failures.push(format!("{offset:+} s: token --check: {}", stderr(&out)));
        } else {
            let measured = reported_offset(&check);
            // Date has 1-second resolution and the exchange takes a moment.
            assert!(
                (measured - offset).abs() <= 2,
                "offset {offset:+}: --check reports {measured:+}:\n{check}"
            );
            assert!(check.contains("dpop-bound      yes"), "{check}");
            // The refusal, then the retry in the server's time (with the nonce the refusal
            // carried): no loop.
            assert!(check.contains("round trips     2"), "{check}");
        }

        let list = token.keybound(&["call", "--paginate", &server.url("/api/v1/users?limit=3")]);
        if list.status.code() != Some(0) {
            failures.push(format!("{offset:+} s: call --paginate: {}", stderr(&list)));
        } else {
            let users: Vec<Value> = serde_json::from_str(&stdout(&list)).expect("one JSON array");
            assert_eq!(users.len(), 7, "offset {offset:+}: every page gathered");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
