//! The OAuth client's rules, end to end: the real `keybound token` / `keybound call`
//! against a scripted server on 127.0.0.1, with keys on a per-test SoftHSM2 token.
//!
//! Every client assertion (RFC 7523 §3) and DPoP proof (RFC 9449 §4.2) the server
//! receives is verified independently ([`Rig::received`]): the assertion with the
//! `client-auth` JWK from `keybound jwks`, the proof with its own header `jwk`, whose
//! RFC 7638 thumbprint must be the `dpop` key's kid. Timing checks are lower bounds only.

mod fake_server;
mod support;
#[cfg(feature = "tpm")]
mod tpm_support;

use std::collections::HashSet;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use fake_server::{FakeServer, Recorded, Reply};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::*;

const TOKEN_PATH: &str = "/oauth2/v1/token";
const CLIENT_ID: &str = "0oa-test";
const SCOPE: &str = "okta.users.read";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

// ---------------------------------------------------------------------------
// The rig: token, keys, config, fake server
// ---------------------------------------------------------------------------

/// One test's world: a SoftHSM2 token with the `client-auth` and `dpop` ES256 keys, a
/// `[[client]]` pointing at a [`FakeServer`], and the access token that server hands out.
struct Rig {
    /// The SoftHSM2 token that `keybound` runs against; `None` for a client built in this
    /// process (see `in_memory_nonce_challenge_is_answered_once_with_a_fresh_assertion`).
    hsm: Option<Arc<DevToken>>,
    server: FakeServer,
    /// The `client-auth` entry of `keybound jwks`.
    assertion_jwk: Value,
    /// The `dpop` key's kid from `keybound jwks`: the RFC 7638 thumbprint proofs must carry.
    dpop_kid: String,
    access_token: String,
}

impl Rig {
    /// `extra` is appended to the `[[client]]` section (`max_attempts = 5`, ...). The token
    /// endpoint starts scripted to grant [`Rig::token_reply`].
    async fn start(extra: &str) -> Rig {
        let server = FakeServer::start().await;
        let config = format!(
            "{}{}",
            Config::default().render(),
            client_section(&server.url(TOKEN_PATH), extra)
        );
        let (hsm, assertion_jwk, dpop_kid) = tokio::task::spawn_blocking(move || {
            let hsm = DevToken::new();
            let assertion_kid = hsm.generate("client-auth", "ES256");
            let dpop_kid = hsm.generate("dpop", "ES256");
            let assertion_jwk = single_jwk(&hsm, "client-auth", &assertion_kid);
            let dpop_jwk = single_jwk(&hsm, "dpop", &dpop_kid);
            hsm.write_config(&config);
            (hsm, assertion_jwk, jwk_thumbprint(&dpop_jwk))
        })
        .await
        .expect("set up the SoftHSM2 token");
        let rig = Rig {
            access_token: fake_access_token(&dpop_kid),
            hsm: Some(Arc::new(hsm)),
            server,
            assertion_jwk,
            dpop_kid,
        };
        rig.server.script(TOKEN_PATH, [rig.token_reply()]);
        rig
    }

    /// Back to a fresh server state (scripts, log, clock) for the next scenario of a test;
    /// each `keybound` run is a new process, so no client state carries over.
    fn reset(&self) {
        self.server.reset();
        self.server.script(TOKEN_PATH, [self.token_reply()]);
    }

    fn token_endpoint(&self) -> String {
        self.server.url(TOKEN_PATH)
    }

    /// RFC 6749 §5.1 success with a DPoP token for exactly the allowed scope.
    fn token_reply(&self) -> Reply {
        self.token_reply_with("DPoP", SCOPE)
    }

    fn token_reply_with(&self, token_type: &str, scope: &str) -> Reply {
        Reply::json(200, &self.token_body(token_type, scope))
    }

    /// The JSON of [`Rig::token_reply_with`], for a test to change a member of.
    fn token_body(&self, token_type: &str, scope: &str) -> Value {
        json!({
            "token_type": token_type,
            "expires_in": 3600,
            "access_token": self.access_token,
            "scope": scope,
        })
    }

    /// Runs the real binary on a blocking thread, so the fake server keeps serving.
    async fn keybound(&self, args: &[&str]) -> Output {
        let hsm = Arc::clone(self.hsm.as_ref().expect("a rig with a SoftHSM2 token"));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || hsm.keybound(&args))
            .await
            .expect("run keybound")
    }

    /// `keybound token --json` succeeded and printed the token the server granted.
    fn assert_token_json(&self, out: &Output) {
        let stdout = assert_success(out, &"keybound token --json");
        let printed: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("token --json printed invalid JSON ({e}):\n{stdout}"));
        assert_members(
            &printed,
            &[
                "token_type",
                "expires_in",
                "scope",
                "cnf_jkt",
                "access_token",
            ],
        );
        assert_eq!(printed["token_type"], "DPoP", "{printed}");
        assert_eq!(printed["expires_in"], 3600, "{printed}");
        assert_eq!(printed["scope"], SCOPE, "{printed}");
        assert_eq!(printed["cnf_jkt"], self.dpop_kid.as_str(), "{printed}");
        assert_eq!(
            printed["access_token"],
            self.access_token.as_str(),
            "{printed}"
        );
    }

    /// Everything the server received, each request verified: token requests (form,
    /// assertion, proof) and API calls (`Authorization: DPoP`, proof with `ath`). Every
    /// assertion `jti` and every proof `jti` is distinct from all others.
    fn received(&self) -> Received {
        let mut seen = Received::default();
        for request in self.server.requests() {
            if request.path == TOKEN_PATH {
                seen.token.push(self.check_token_request(request));
            } else {
                seen.api.push(self.check_api_call(request));
            }
        }
        assert_distinct(
            seen.token.iter().map(|t| &t.assertion),
            "client assertion jti",
        );
        assert_distinct(
            seen.token
                .iter()
                .map(|t| &t.proof)
                .chain(seen.api.iter().map(|a| &a.proof)),
            "DPoP proof jti",
        );
        seen
    }

    /// RFC 7523 §2.2 form and §3 assertion, RFC 9449 §5 proof without `ath`.
    fn check_token_request(&self, request: Recorded) -> TokenRequest {
        let what = format!("token request {}", request.target());
        assert_eq!(request.method, "POST", "{what}");
        assert_eq!(request.query, None, "{what}: no query");
        assert_eq!(
            request.header("content-type"),
            Some("application/x-www-form-urlencoded"),
            "{what}"
        );
        let form = request.form();
        assert_eq!(
            form.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "client_assertion",
                "client_assertion_type",
                "grant_type",
                "scope"
            ],
            "{what}: form fields"
        );
        assert_eq!(form["grant_type"], "client_credentials", "{what}");
        assert_eq!(form["client_assertion_type"], ASSERTION_TYPE, "{what}");
        assert_eq!(form["scope"], SCOPE, "{what}");

        let assertion = Jws::parse(&form["client_assertion"]);
        assert_verifies(&self.assertion_jwk, &assertion);
        assert_eq!(
            assertion.header["kid"], self.assertion_jwk["kid"],
            "{what}: assertion kid"
        );
        let claims = &assertion.claims;
        assert_members(claims, &["iss", "sub", "aud", "iat", "exp", "jti"]);
        assert_eq!(claims["iss"], CLIENT_ID, "{what}: iss");
        assert_eq!(claims["sub"], CLIENT_ID, "{what}: sub");
        assert_eq!(claims["aud"], self.token_endpoint(), "{what}: aud");
        assert_plausible_iat(claims, &what);
        assert_eq!(
            int_claim(claims, "exp") - int_claim(claims, "iat"),
            60,
            "{what}: assertion lifetime exp - iat"
        );
        assert_jti(claims, &what);

        let proof = self.check_proof(&request, None);
        TokenRequest {
            request,
            assertion,
            proof,
        }
    }

    /// RFC 9449 §7.1: the token under the DPoP scheme, and a proof bound to it.
    fn check_api_call(&self, request: Recorded) -> ApiCall {
        let what = format!("API call {} {}", request.method, request.target());
        assert_eq!(
            request.header("authorization"),
            Some(format!("DPoP {}", self.access_token).as_str()),
            "{what}: Authorization"
        );
        let proof = self.check_proof(&request, Some(&self.access_token));
        ApiCall { request, proof }
    }

    /// RFC 9449 §4.2/§4.3: header, signature by the `dpop` key, `htm`, `htu` (the request
    /// URL without query), `iat`, `jti`, and `ath` exactly when a token is presented.
    /// The nonce is the test's business ([`assert_nonce`]).
    fn check_proof(&self, request: &Recorded, access_token: Option<&str>) -> Jws {
        let what = format!("DPoP proof of {} {}", request.method, request.target());
        let proof = Jws::parse(
            request
                .header("dpop")
                .unwrap_or_else(|| panic!("{what}: no DPoP header")),
        );
        let header = &proof.header;
        assert_members(header, &["typ", "alg", "jwk"]);
        assert_eq!(header["typ"], "dpop+jwt", "{what}: typ");
        assert_eq!(header["alg"], "ES256", "{what}: alg");
        let jwk = &header["jwk"];
        assert!(jwk.get("d").is_none(), "{what}: private key in the jwk");
        assert_eq!(
            jwk_thumbprint(jwk),
            self.dpop_kid,
            "{what}: the jwk is not the dpop key"
        );
        let alg = header["alg"].as_str().expect("alg is a string");
        assert_signature(&Verifier::new(alg, jwk), &proof);

        let claims = &proof.claims;
        assert_eq!(claims["htm"], request.method.as_str(), "{what}: htm");
        assert_eq!(claims["htu"], self.server.url(&request.path), "{what}: htu");
        assert_plausible_iat(claims, &what);
        assert_jti(claims, &what);
        match access_token {
            Some(token) => assert_eq!(claims["ath"], b64(&Sha256::digest(token)), "{what}: ath"),
            None => assert!(claims.get("ath").is_none(), "{what}: ath without a token"),
        }
        let mut allowed: HashSet<&str> = ["jti", "htm", "htu", "iat", "nonce", "ath"].into();
        for name in member_names(claims) {
            assert!(allowed.remove(name.as_str()), "{what}: claim {name}");
        }
        proof
    }
}

/// What the server received, verified by [`Rig::received`].
#[derive(Default)]
struct Received {
    token: Vec<TokenRequest>,
    api: Vec<ApiCall>,
}

struct TokenRequest {
    request: Recorded,
    assertion: Jws,
    proof: Jws,
}

struct ApiCall {
    request: Recorded,
    proof: Jws,
}

fn client_section(token_endpoint: &str, extra: &str) -> String {
    format!(
        r#"
[[client]]
name = "test"
server = "okta"
token_endpoint = "{token_endpoint}"
client_id = "{CLIENT_ID}"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["{SCOPE}"]
allowed_scopes = ["{SCOPE}"]
backoff_initial_ms = 10
backoff_max_ms = 50
{extra}
"#
    )
}

/// The one `keybound jwks --label <label>` entry, checked against the kid `keys generate`
/// announced.
fn single_jwk(hsm: &DevToken, label: &str, kid: &str) -> Value {
    let keys = hsm.jwks(&[label]);
    assert_eq!(keys.len(), 1, "jwks --label {label}: {keys:?}");
    assert_jwks_entry(&keys[0], "ES256");
    assert_eq!(keys[0]["kid"], kid, "jwks kid of {label}");
    keys[0].clone()
}

/// A JWT-shaped access token bound to `jkt` (RFC 9449 §6.1). Its signature is filler:
/// keybound only shows the claims and must treat the token as opaque.
fn fake_access_token(jkt: &str) -> String {
    let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": "fake-as"});
    let claims = json!({
        "iss": "http://127.0.0.1/fake-as",
        "sub": CLIENT_ID,
        "scp": [SCOPE],
        "cnf": {"jkt": jkt},
    });
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(&[7u8; 64])
    )
}

// ---------------------------------------------------------------------------
// Scripted answers
// ---------------------------------------------------------------------------

/// RFC 9449 §8: the authorization server demands a nonce.
fn as_nonce_challenge(nonce: &str) -> Reply {
    Reply::json(
        400,
        &json!({
            "error": "use_dpop_nonce",
            "error_description": "Authorization server requires nonce in DPoP proof.",
        }),
    )
    .header("DPoP-Nonce", nonce)
}

/// RFC 9449 §9: a resource server demands a nonce (401; Okta also uses 400).
fn rs_nonce_challenge(status: u16, nonce: &str) -> Reply {
    Reply::status(status)
        .header(
            "WWW-Authenticate",
            r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#,
        )
        .header("DPoP-Nonce", nonce)
}

fn me() -> Value {
    json!({"id": "00u1", "status": "ACTIVE", "profile": {"login": "a@example.com"}})
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// `nonce` of a proof: absent when `want` is `None`.
fn assert_nonce(proof: &Jws, want: Option<&str>) {
    assert_eq!(
        proof
            .claims
            .get("nonce")
            .map(|n| n.as_str().expect("nonce is a string")),
        want,
        "nonce of {}",
        proof.claims
    );
}

/// No two `jti` alike among `jwss`.
fn assert_distinct<'a>(jwss: impl Iterator<Item = &'a Jws>, what: &str) {
    let mut seen = HashSet::new();
    for jws in jwss {
        let jti = jws.claims["jti"].as_str().expect("jti is a string");
        assert!(seen.insert(jti.to_owned()), "{what} {jti} was sent twice");
    }
}

fn assert_jti(claims: &Value, what: &str) {
    let jti = claims["jti"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: jti is a string: {claims}"));
    assert!(
        jti.len() >= 16,
        "{what}: jti {jti:?} is too short to be unique"
    );
}

/// `iat` is a number of seconds near now (within 10 minutes either way: the clock test's
/// 120 s skew fits, a millisecond timestamp or a zero does not).
fn assert_plausible_iat(claims: &Value, what: &str) {
    let iat = int_claim(claims, "iat");
    assert!(
        (iat - unix_now()).abs() < 600,
        "{what}: iat {iat} is not near now ({})",
        unix_now()
    );
}

/// A failed run: exit `code`, no panic, and exactly one `error: ` line, the last line of
/// stderr. Returns that line. Only tracing warnings (retries) may precede it.
fn error_line(out: &Output, code: i32) -> String {
    assert_exit(out, code, &"keybound");
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one `error: ` line on stderr\n{}",
        describe(out)
    );
    assert!(
        lines.last().is_some_and(|l| l.starts_with("error: ")),
        "the `error: ` line is the last line of stderr\n{}",
        describe(out)
    );
    for line in &lines[..lines.len() - 1] {
        assert!(
            line.contains("WARN"),
            "only warnings precede the error line, not {line:?}\n{}",
            describe(out)
        );
    }
    (*errors[0]).to_owned()
}

// ---------------------------------------------------------------------------
// Token endpoint rules
// ---------------------------------------------------------------------------

/// Rule 1 — RFC 9449 §8: a nonce challenge gets one retry carrying the nonce, with a new
/// proof and a new assertion (the server consumed the first assertion's jti).
#[tokio::test(flavor = "multi_thread")]
async fn as_nonce_challenge_is_answered_once_with_a_fresh_assertion() {
    let rig = Rig::start("").await;
    rig.server
        .script(TOKEN_PATH, [as_nonce_challenge("n1"), rig.token_reply()]);

    let out = rig.keybound(&["token", "--json"]).await;

    rig.assert_token_json(&out);
    assert_one_nonce_retry(&rig.received());
}

/// What rule 1 leaves on the server: the challenged request, then one retry with the
/// nonce, a new assertion and a new proof.
fn assert_one_nonce_retry(seen: &Received) {
    assert_eq!(seen.token.len(), 2, "challenge, then the retry");
    assert_nonce(&seen.token[0].proof, None);
    assert_nonce(&seen.token[1].proof, Some("n1"));
    // Rig::received checked every jti against all others; the two that matter here:
    let jti = |jws: &Jws| jws.claims["jti"].clone();
    assert_ne!(jti(&seen.token[0].assertion), jti(&seen.token[1].assertion));
    assert_ne!(jti(&seen.token[0].proof), jti(&seen.token[1].proof));
}

/// Rule 2: a second challenge right after a nonce was supplied is not chased.
#[tokio::test(flavor = "multi_thread")]
async fn as_nonce_challenge_is_not_looped() {
    let rig = Rig::start("").await;
    rig.server.script(
        TOKEN_PATH,
        (1..=5).map(|i| as_nonce_challenge(&format!("n{i}"))),
    );

    let out = rig.keybound(&["token", "--json"]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["nonce"]);
    let seen = rig.received();
    assert_eq!(seen.token.len(), 2, "one retry, no loop");
    assert_nonce(&seen.token[1].proof, Some("n1"));
}

/// Rule 3 — RFC 9449 §5: with DPoP required, a Bearer token is a downgrade and refused.
#[tokio::test(flavor = "multi_thread")]
async fn bearer_token_is_refused_as_a_downgrade() {
    let rig = Rig::start("").await;
    rig.server
        .script(TOKEN_PATH, [rig.token_reply_with("Bearer", SCOPE)]);

    let out = rig.keybound(&["token", "--json"]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["token_type", "Bearer", "downgrade"]);
    assert!(
        !stdout(&out).contains(&rig.access_token),
        "token not printed"
    );
    assert_eq!(rig.received().token.len(), 1);
}

/// A success answer that is not an RFC 6749 §5.1 token response (here `expires_in` as a
/// string, as Azure AD v1 sends it) is an error that names what is wrong and never quotes
/// the body: it holds the token, and the error goes to logs and to the gateway's callers.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_token_response_is_reported_without_its_token() {
    let rig = Rig::start("").await;
    let mut body = rig.token_body("DPoP", SCOPE);
    body["expires_in"] = json!("3600");
    rig.server.script(TOKEN_PATH, [Reply::json(200, &body)]);

    let out = rig.keybound(&["token", "--json"]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["expires_in is a string", "RFC 6749 §5.1"]);
    let token = &rig.access_token;
    for (what, text) in [("stdout", stdout(&out)), ("stderr", stderr(&out))] {
        for part in [token.as_str(), &token[..token.len().min(24)]] {
            assert!(!text.contains(part), "the token is on {what}:\n{text}");
        }
    }
    assert_eq!(rig.received().token.len(), 1);
}

/// Discovery (RFC 8414 §3.3): metadata that names another issuer, or a token endpoint on
/// another origin than the issuer's, is refused before any assertion is signed for it or
/// sent; the issuer's own metadata works.
#[tokio::test(flavor = "multi_thread")]
async fn discovery_refuses_metadata_of_another_issuer_or_origin() {
    let rig = Rig::start("").await;
    let hsm = rig.hsm.as_ref().expect("a SoftHSM2 rig");
    let base = rig.server.url("");
    let token_endpoint = rig.server.url(TOKEN_PATH);
    let section = client_section(&token_endpoint, "").replace(
        &format!("token_endpoint = \"{token_endpoint}\""),
        &format!("issuer = \"{base}/\""),
    );
    hsm.write_config(&format!("{}{section}", Config::default().render()));
    const METADATA: &str = "/.well-known/oauth-authorization-server";
    for (meta, needle) in [
        (
            json!({"issuer": "https://evil.example", "token_endpoint": token_endpoint}),
            "names the issuer 'https://evil.example'",
        ),
        (
            json!({"issuer": base, "token_endpoint": "http://127.0.0.1:1/token"}),
            "on another origin than the issuer's",
        ),
    ] {
        rig.server.script(METADATA, [Reply::json(200, &meta)]);
        let out = rig.keybound(&["token", "--json"]).await;
        assert!(!out.status.success(), "{}", describe(&out));
        assert_mentions(&stderr(&out), &[needle]);
        assert!(
            rig.server.requests_to(TOKEN_PATH).is_empty(),
            "a token request was sent"
        );
    }
    rig.server.script(
        METADATA,
        [Reply::json(
            200,
            &json!({"issuer": base, "token_endpoint": token_endpoint}),
        )],
    );
    let out = rig.keybound(&["token", "--json"]).await;
    rig.assert_token_json(&out);
}

/// Rule 4: a token granting a scope outside allowed_scopes is discarded.
#[tokio::test(flavor = "multi_thread")]
async fn scope_guard_discards_an_overbroad_token() {
    let rig = Rig::start("").await;
    rig.server.script(
        TOKEN_PATH,
        [rig.token_reply_with("DPoP", "okta.users.read okta.users.manage")],
    );

    let out = rig.keybound(&["token", "--json"]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["okta.users.manage", "scope guard"]);
    assert!(
        !stdout(&out).contains(&rig.access_token),
        "token not printed"
    );
    assert_eq!(rig.received().token.len(), 1);
}

/// Rule 5: 5xx and 429 are retried, each attempt with a new assertion and proof.
#[tokio::test(flavor = "multi_thread")]
async fn server_errors_and_429_are_retried_with_fresh_jtis() {
    let rig = Rig::start("").await;
    rig.server.script(
        TOKEN_PATH,
        [
            Reply::text(503, "Service Unavailable"),
            Reply::text(503, "Service Unavailable"),
            rig.token_reply(),
        ],
    );
    rig.assert_token_json(&rig.keybound(&["token", "--json"]).await);
    assert_eq!(rig.received().token.len(), 3, "503, 503, 200");

    rig.reset();
    rig.server.script(
        TOKEN_PATH,
        [
            Reply::json(429, &json!({"errorCode": "E0000047"})),
            rig.token_reply(),
        ],
    );
    rig.assert_token_json(&rig.keybound(&["token", "--json"]).await);
    assert_eq!(rig.received().token.len(), 2, "429, 200");
}

/// Rule 6: the circuit breaker opens after breaker_failures, before max_attempts.
#[tokio::test(flavor = "multi_thread")]
async fn breaker_stops_retries_after_breaker_failures() {
    let rig = Rig::start("max_attempts = 5\nbreaker_failures = 2").await;
    rig.server
        .script(TOKEN_PATH, [Reply::text(500, "Internal Server Error")]);

    let out = rig.keybound(&["token", "--json"]).await;

    let line = error_line(&out, 75);
    assert_mentions(&line, &["circuit breaker"]);
    assert_eq!(rig.received().token.len(), 2, "the breaker opened at 2");
}

/// Rule 7 — RFC 9110 §10.2.3: Retry-After is waited out (measured by the server).
#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_respected() {
    let rig = Rig::start("").await;
    rig.server.script(
        TOKEN_PATH,
        [
            Reply::text(429, "Too Many Requests").header("Retry-After", "2"),
            rig.token_reply(),
        ],
    );

    rig.assert_token_json(&rig.keybound(&["token", "--json"]).await);

    let seen = rig.received();
    assert_eq!(seen.token.len(), 2);
    let waited = seen.token[1].request.at - seen.token[0].request.at;
    assert!(
        waited >= Duration::from_millis(1900),
        "Retry-After: 2 but the retry came after {waited:?}"
    );
}

/// Rule 8: a redirect from the token endpoint is an answer, never followed (SSRF).
#[tokio::test(flavor = "multi_thread")]
async fn token_endpoint_redirect_is_not_followed() {
    let rig = Rig::start("").await;
    rig.server.script(
        TOKEN_PATH,
        [Reply::status(307).header("Location", "/elsewhere")],
    );
    rig.server.script("/elsewhere", [rig.token_reply()]);

    let out = rig.keybound(&["token", "--json"]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["redirect"]);
    assert!(
        rig.server.requests_to("/elsewhere").is_empty(),
        "the redirect was followed"
    );
    assert_eq!(rig.received().token.len(), 1);
}

/// Rule 9: after seeing a server clock 120 s behind, `iat` is never ahead of that clock.
#[tokio::test(flavor = "multi_thread")]
async fn iat_follows_a_slow_server_clock() {
    let rig = Rig::start("").await;
    rig.server.set_clock_offset(-120);
    rig.server
        .script(TOKEN_PATH, [as_nonce_challenge("n1"), rig.token_reply()]);

    rig.assert_token_json(&rig.keybound(&["token", "--json"]).await);

    let seen = rig.received();
    assert_eq!(seen.token.len(), 2);
    let date = seen.token[0]
        .request
        .reply
        .header_value("Date")
        .expect("the challenge carried Date");
    let server_now = httpdate::parse_http_date(date)
        .expect("Date is an HTTP-date")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let retry = &seen.token[1];
    assert_nonce(&retry.proof, Some("n1"));
    for (what, jws) in [("assertion", &retry.assertion), ("proof", &retry.proof)] {
        let iat = int_claim(&jws.claims, "iat");
        assert!(
            iat <= server_now + 2,
            "retried {what} iat {iat} is ahead of the server's clock ({server_now}, Date {date})"
        );
    }
}

/// 401 `invalid_client` (RFC 6749 §5.2) with `description`.
fn invalid_client(description: &str) -> Reply {
    Reply::json(
        401,
        &json!({ "error": "invalid_client", "error_description": description }),
    )
}

/// RFC 9449 §7.1: a resource server refuses the proof.
fn rs_proof_refused() -> Reply {
    Reply::status(401).header(
        "WWW-Authenticate",
        r#"DPoP error="invalid_dpop_proof", error_description="iat is in the future""#,
    )
}

/// The server's clock as a recorded reply's `Date` stated it.
fn reply_date(request: &Recorded) -> i64 {
    let date = request
        .reply
        .header_value("Date")
        .expect("a skewed server stamps Date");
    httpdate::parse_http_date(date)
        .expect("Date is an HTTP-date")
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

/// `iat` lies between the server clock's reading before (`from`, a `Date`) and after (`to`,
/// a `Date`) the request: stated in that server's time. One second of slack for `Date`'s
/// truncation; no assumption on how long anything takes.
fn assert_iat_between(jws: &Jws, from: i64, to: i64, what: &str) {
    let iat = int_claim(&jws.claims, "iat");
    assert!(
        (from - 1..=to + 1).contains(&iat),
        "{what}: iat {iat} is not in the server's time [{from}, {to}]"
    );
}

/// Rule 9b — a server whose clock is off, at first contact: the first request, made in this
/// machine's time, is refused; its `Date` shows the server's clock 2 minutes away, so
/// keybound retries once in the server's time with a fresh assertion and proof. A nonce
/// challenge may follow that retry: three requests, each `jti` new.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_from_a_skewed_server_is_retried_once_in_its_time() {
    let rig = Rig::start("").await;
    for offset in [120, -120] {
        rig.reset();
        rig.server.set_clock_offset(offset);
        rig.server.script(
            TOKEN_PATH,
            [
                invalid_client("The client_assertion token is expired."),
                as_nonce_challenge("n1"),
                rig.token_reply(),
            ],
        );
        let before = unix_now();

        rig.assert_token_json(&rig.keybound(&["token", "--json"]).await);

        let after = unix_now();
        let seen = rig.received();
        assert_eq!(
            seen.token.len(),
            3,
            "{offset}: refusal, clock retry, nonce retry"
        );
        let first = &seen.token[0];
        for jws in [&first.assertion, &first.proof] {
            assert_iat_between(
                jws,
                before,
                after,
                &format!("{offset}: first contact, local time"),
            );
        }
        let refused_at = reply_date(&first.request);
        for (i, t) in seen.token.iter().enumerate().skip(1) {
            let answered_at = reply_date(&t.request);
            for jws in [&t.assertion, &t.proof] {
                assert_iat_between(
                    jws,
                    refused_at,
                    answered_at,
                    &format!("{offset}: request {i}"),
                );
            }
        }
        assert_nonce(&seen.token[1].proof, None);
        assert_nonce(&seen.token[2].proof, Some("n1"));
    }
}

/// Rule 9c — one clock retry, never a loop; the error says the offset, and blames the clock
/// only when it is the likely cause.
#[tokio::test(flavor = "multi_thread")]
async fn clock_retry_is_bounded_and_the_error_says_the_offset() {
    let rig = Rig::start("").await;

    // Refused again in the server's time, for no stated time reason: the kid hint stays,
    // and the error says the clock is not the cause.
    rig.server.set_clock_offset(120);
    rig.server.script(
        TOKEN_PATH,
        [invalid_client("The client_assertion JWT kid is invalid.")],
    );
    let line = error_line(&rig.keybound(&["token"]).await, 77);
    assert_eq!(rig.received().token.len(), 2, "one retry: {line}");
    assert_mentions(
        &line,
        &[
            "invalid_client",
            "kid is registered",
            "measured clock offset",
            "the clock is not the cause",
        ],
    );
    assert!(line.contains("+120 s") || line.contains("+119 s"), "{line}");

    // Refused again naming a time claim: the clock is the likely cause, not the kid.
    rig.reset();
    rig.server.set_clock_offset(-120);
    rig.server
        .script(TOKEN_PATH, [invalid_client("iat is in the future")]);
    let line = error_line(&rig.keybound(&["token"]).await, 77);
    assert_eq!(rig.received().token.len(), 2, "one retry: {line}");
    assert_mentions(&line, &["most likely about time", "refused too"]);
    assert!(line.contains("-120 s") || line.contains("-121 s"), "{line}");
    assert!(!line.contains("paste `keybound jwks`"), "{line}");

    // Clock retry, then nonce challenges: three requests, then the nonce-loop error.
    rig.reset();
    rig.server.set_clock_offset(120);
    rig.server.script(
        TOKEN_PATH,
        [
            invalid_client("jwt expired"),
            as_nonce_challenge("n1"),
            as_nonce_challenge("n2"),
        ],
    );
    let line = error_line(&rig.keybound(&["token"]).await, 1);
    assert_eq!(rig.received().token.len(), 3, "bounded: {line}");
    assert_mentions(&line, &["nonce"]);

    // A server in step with this machine: no retry, and the kid hint.
    rig.reset();
    rig.server.script(
        TOKEN_PATH,
        [invalid_client("The client_assertion JWT kid is invalid.")],
    );
    let line = error_line(&rig.keybound(&["token"]).await, 77);
    assert_eq!(rig.received().token.len(), 1, "no retry: {line}");
    assert_mentions(&line, &["kid is registered"]);
    assert!(!line.contains("retry"), "{line}");
}

// ---------------------------------------------------------------------------
// Resource server rules (`keybound call`)
// ---------------------------------------------------------------------------

/// Rule 10 — RFC 9449 §9: a resource server's nonce challenge (401, or Okta's 400) gets
/// one retry with its nonce; a second challenge in a row ends the call.
#[tokio::test(flavor = "multi_thread")]
async fn rs_nonce_challenge_is_answered_once() {
    let rig = Rig::start("").await;
    let path = "/api/v1/users/me";
    let url = rig.server.url(path);

    for status in [401, 400] {
        rig.reset();
        rig.server.script(
            path,
            [rs_nonce_challenge(status, "r1"), Reply::json(200, &me())],
        );

        let out = rig.keybound(&["call", &url]).await;

        let stdout = assert_success(&out, &format!("call after a {status} challenge"));
        let printed: Value = serde_json::from_str(&stdout).expect("call prints the JSON body");
        assert_eq!(printed, me());
        let seen = rig.received();
        assert_eq!(seen.token.len(), 1, "{status}: one token");
        assert_eq!(seen.api.len(), 2, "{status}: challenge, then the retry");
        assert_nonce(&seen.api[0].proof, None);
        assert_nonce(&seen.api[1].proof, Some("r1"));
        assert_eq!(seen.api[1].request.method, "GET");
    }

    rig.reset();
    rig.server.script(
        path,
        [rs_nonce_challenge(401, "r1"), rs_nonce_challenge(401, "r2")],
    );

    let out = rig.keybound(&["call", &url]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["nonce"]);
    let seen = rig.received();
    assert_eq!(seen.api.len(), 2, "one retry, no loop");
    assert_nonce(&seen.api[1].proof, Some("r1"));
}

/// Rule 11 — RFC 8288: `--paginate` follows rel="next" within the origin only, and every
/// page's proof has an `htu` without the query.
#[tokio::test(flavor = "multi_thread")]
async fn paginate_follows_next_links_within_the_origin() {
    let rig = Rig::start("").await;
    let path = "/api/v1/users";
    let next = |origin: &str| format!(r#"<{origin}{path}?after=2&limit=2>; rel="next""#);
    let first_page = |link: &str| {
        Reply::json(200, &json!([{"id": 1}, {"id": 2}]))
            .header(
                "Link",
                &format!(r#"<{}>; rel="self""#, rig.server.url(path)),
            )
            .header("Link", link)
    };
    let first_url = rig.server.url(&format!("{path}?limit=2"));

    rig.server.script(
        path,
        [
            first_page(&next(&rig.server.url(""))),
            Reply::json(200, &json!([{"id": 3}])),
        ],
    );

    let out = rig.keybound(&["call", "--paginate", &first_url]).await;

    let stdout = assert_success(&out, &"call --paginate");
    let printed: Value = serde_json::from_str(&stdout).expect("--paginate prints JSON");
    assert_eq!(printed, json!([{"id": 1}, {"id": 2}, {"id": 3}]));
    let seen = rig.received();
    let targets: Vec<String> = seen.api.iter().map(|a| a.request.target()).collect();
    assert_eq!(
        targets,
        ["/api/v1/users?limit=2", "/api/v1/users?after=2&limit=2"]
    );
    // RFC 9449 §4.2: the query is not part of htu, on either page.
    for call in &seen.api {
        assert_eq!(call.proof.claims["htu"], rig.server.url(path));
    }

    // The same server under another origin: reachable, so a followed link would show.
    rig.reset();
    let foreign = format!("http://localhost:{}", rig.server.port());
    rig.server.script(
        path,
        [
            first_page(&next(&foreign)),
            Reply::json(200, &json!([{"id": 3}])),
        ],
    );

    let out = rig.keybound(&["call", "--paginate", &first_url]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["refusing", "localhost"]);
    let seen = rig.received();
    assert_eq!(seen.api.len(), 1, "the foreign next link was requested");
    assert!(
        rig.server
            .requests()
            .iter()
            .all(|r| !r.header("host").unwrap_or("").starts_with("localhost")),
        "a request reached the server as localhost"
    );
}

/// A next link that leads back to a page already fetched ends `--paginate` with an error
/// naming it, instead of a walk that never ends (holding the token, items growing).
#[tokio::test(flavor = "multi_thread")]
async fn paginate_stops_at_a_next_link_it_followed_before() {
    let rig = Rig::start("").await;
    let path = "/api/v1/users";
    let first_url = rig.server.url(&format!("{path}?limit=2"));
    let second_url = rig.server.url(&format!("{path}?after=2&limit=2"));
    rig.server.script(
        path,
        [
            Reply::json(200, &json!([{"id": 1}]))
                .header("Link", &format!(r#"<{second_url}>; rel="next""#)),
            Reply::json(200, &json!([{"id": 2}]))
                .header("Link", &format!(r#"<{first_url}>; rel="next""#)),
        ],
    );

    let out = rig.keybound(&["call", "--paginate", &first_url]).await;

    let line = error_line(&out, 1);
    assert_mentions(
        &line,
        &["--paginate stopped", "already fetched", &first_url],
    );
    assert_eq!(rig.received().api.len(), 2);

    // An empty page that links to itself ends a listing that grows (a log polled with
    // `since`): the items so far, no error.
    rig.reset();
    rig.server.script(
        path,
        [
            Reply::json(200, &json!([{"id": 1}]))
                .header("Link", &format!(r#"<{second_url}>; rel="next""#)),
            Reply::json(200, &json!([])).header("Link", &format!(r#"<{second_url}>; rel="next""#)),
        ],
    );
    let out = rig.keybound(&["call", "--paginate", &first_url]).await;
    let stdout = assert_success(&out, &"call --paginate to an empty last page");
    let printed: Value = serde_json::from_str(&stdout).expect("--paginate prints JSON");
    assert_eq!(printed, json!([{"id": 1}]));
    assert_eq!(rig.received().api.len(), 2);
}

/// A token whose `expires_in` is past what the clock can hold (2^64 - 1) is a token
/// without an expiry, not a panic.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_never_expires_is_no_panic() {
    let rig = Rig::start("").await;
    let mut body = rig.token_body("DPoP", SCOPE);
    body["expires_in"] = json!(u64::MAX);
    rig.server.script(TOKEN_PATH, [Reply::json(200, &body)]);
    let out = rig.keybound(&["token", "--json"]).await;
    let stdout = assert_success(&out, &"token --json");
    let printed: Value = serde_json::from_str(&stdout).expect("token --json prints JSON");
    assert_eq!(
        printed["access_token"],
        rig.access_token.as_str(),
        "{printed}"
    );
}

/// Rule 12: an API error is exit 4 with Okta's errorCode/errorSummary and the
/// WWW-Authenticate error on stderr, and the body on stdout.
#[tokio::test(flavor = "multi_thread")]
async fn api_error_reports_okta_error_and_challenge() {
    let rig = Rig::start("").await;
    let path = "/api/v1/users/00u1";
    let body = json!({
        "errorCode": "E0000006",
        "errorSummary": "You do not have permission to perform the requested action",
        "errorLink": "E0000006",
        "errorId": "oae1",
        "errorCauses": [],
    });
    rig.server.script(
        path,
        [
            Reply::json(403, &body)
                .header("WWW-Authenticate", r#"DPoP error="insufficient_scope""#),
        ],
    );

    let out = rig.keybound(&["call", &rig.server.url(path)]).await;

    let line = error_line(&out, 4);
    assert!(line.starts_with("error: HTTP 403"), "{line}");
    assert_mentions(&line, &["E0000006", "insufficient_scope"]);
    let printed: Value = serde_json::from_str(&stdout(&out)).expect("the body on stdout");
    assert_eq!(printed, body);
    assert_eq!(rig.received().api.len(), 1);
}

/// Rule 13: `-d` sends a POST with the body as given and `Content-Type: application/json`;
/// a URL outside the client's origins is refused before any request, the token's included.
#[tokio::test(flavor = "multi_thread")]
async fn call_posts_data_and_refuses_foreign_origins() {
    let rig = Rig::start("").await;
    let path = "/api/v1/users";
    let data = r#"{"profile":{"firstName":"A"}}"#;
    rig.server.script(path, [Reply::json(200, &me())]);

    let out = rig
        .keybound(&["call", "-d", data, &rig.server.url(path)])
        .await;

    let printed: Value =
        serde_json::from_str(&assert_success(&out, &"call -d")).expect("the body on stdout");
    assert_eq!(printed, me());
    let seen = rig.received();
    assert_eq!(seen.api.len(), 1);
    let post = &seen.api[0];
    assert_eq!(post.request.method, "POST");
    assert_eq!(post.proof.claims["htm"], "POST");
    assert_eq!(
        post.request.header("content-type"),
        Some("application/json")
    );
    assert_eq!(post.request.body_text(), data);

    rig.reset();
    let foreign = format!("http://localhost:{}{path}", rig.server.port());

    let out = rig.keybound(&["call", "-d", data, &foreign]).await;

    let line = error_line(&out, 1);
    assert_mentions(&line, &["refusing", "localhost"]);
    assert!(
        rig.server.requests().is_empty(),
        "requests were sent: {:?}",
        rig.server
            .requests()
            .iter()
            .map(Recorded::target)
            .collect::<Vec<_>>()
    );
}

/// Rule 14 — a resource server is its own origin with its own clock: its refusal of a
/// proof, with a `Date` five minutes away, gets one retry whose proof is in its time; a
/// second refusal is the answer, with the offset in the error.
#[tokio::test(flavor = "multi_thread")]
async fn a_resource_server_with_its_own_clock() {
    let rs = FakeServer::start().await;
    let rig = Rig::start(&format!("api_origins = [\"{}\"]", rs.url(""))).await;
    let path = "/api/v1/users/me";
    let url = rs.url(path);
    rs.set_clock_offset(300);
    rs.script(path, [rs_proof_refused(), Reply::json(200, &me())]);
    let before = unix_now();

    let out = rig.keybound(&["call", &url]).await;

    let after = unix_now();
    let printed: Value =
        serde_json::from_str(&assert_success(&out, &"call after a refused proof")).expect("JSON");
    assert_eq!(printed, me());
    assert_eq!(rig.received().token.len(), 1, "one token");
    let calls = rs.requests();
    assert_eq!(calls.len(), 2, "the refusal, then one retry");
    let proofs: Vec<Jws> = calls.iter().map(|c| rs_proof(&rig, &rs, c)).collect();
    assert_iat_between(&proofs[0], before, after, "first proof, local time");
    assert_iat_between(
        &proofs[1],
        reply_date(&calls[0]),
        reply_date(&calls[1]),
        "retried proof",
    );
    assert_ne!(proofs[0].claims["jti"], proofs[1].claims["jti"]);

    // Refused again: no loop, and the error line says the offset.
    rs.reset();
    rs.set_clock_offset(300);
    rs.script(path, [rs_proof_refused()]);
    let out = rig.keybound(&["call", &url]).await;
    let line = error_line(&out, 4);
    assert_eq!(rs.requests().len(), 2, "one retry: {line}");
    assert_mentions(&line, &["invalid_dpop_proof", "measured clock offset"]);
    assert!(line.contains("+300 s") || line.contains("+299 s"), "{line}");

    // In step: a refused proof is not retried.
    rs.reset();
    rs.script(path, [rs_proof_refused()]);
    let out = rig.keybound(&["call", &url]).await;
    error_line(&out, 4);
    assert_eq!(rs.requests().len(), 1, "no retry");
}

/// A proof that reached the second server: signed by the `dpop` key (checked with its own
/// `jwk`, whose thumbprint is the key's kid), for this request, bound to the token.
fn rs_proof(rig: &Rig, rs: &FakeServer, call: &Recorded) -> Jws {
    let proof = Jws::parse(call.header("dpop").expect("a DPoP header"));
    let jwk = &proof.header["jwk"];
    assert_eq!(jwk_thumbprint(jwk), rig.dpop_kid, "the dpop key");
    assert_signature(&Verifier::new("ES256", jwk), &proof);
    assert_eq!(proof.claims["htm"], "GET");
    assert_eq!(proof.claims["htu"], rs.url(&call.path));
    assert_eq!(
        proof.claims["ath"],
        b64(&Sha256::digest(&rig.access_token)),
        "ath"
    );
    proof
}

// ---------------------------------------------------------------------------
// In memory: the engine behind keybound's Transport trait, without a socket
// ---------------------------------------------------------------------------

/// Rule 1 again, on a client built in this process (its keys in a swtpm) that reaches the
/// fake server through the in-memory transport: the same engine, the same rules, every
/// assertion and proof verified independently, and no socket or binary in between.
#[cfg(feature = "tpm")]
#[tokio::test(flavor = "multi_thread")]
async fn in_memory_nonce_challenge_is_answered_once_with_a_fresh_assertion() {
    use keybound::config::Config;
    use keybound::keyring::Keyring;
    use keybound::oauth::client::OAuthClient;

    let server = FakeServer::in_memory();
    let endpoint = server.url(TOKEN_PATH);
    let (home, keyring, settings, assertion_jwk, dpop_kid) =
        // Blocking (the binary, the device) on this thread: `TpmHome` holds a lock guard.
        tokio::task::block_in_place(|| {
            let home = tpm_support::TpmHome::in_process();
            let jwk = |label: &str| {
                let kid = home.generate(label, "ES256");
                let doc: Value = serde_json::from_str(&home.run_ok(&["jwks", "--label", label]))
                    .expect("jwks is JSON");
                let keys = doc["keys"].as_array().expect("a keys array");
                assert_eq!(keys.len(), 1, "{doc}");
                assert_jwks_entry(&keys[0], "ES256");
                assert_eq!(keys[0]["kid"], kid.as_str(), "jwks kid of {label}");
                keys[0].clone()
            };
            let (assertion_jwk, dpop_jwk) = (jwk("client-auth"), jwk("dpop"));
            // No child process from here on while the keyring lives (tpm_support).
            let config = Config::parse(&home.config_text(&client_section(&endpoint, "")))
                .expect("the test config");
            let settings = config.client(None).expect("one client").clone();
            let keyring =
                Keyring::open(&config.token, config.policy, None).expect("open the swtpm");
            (
                home,
                keyring,
                settings,
                assertion_jwk,
                jwk_thumbprint(&dpop_jwk),
            )
        });
    let rig = Rig {
        hsm: None,
        access_token: fake_access_token(&dpop_kid),
        server,
        assertion_jwk,
        dpop_kid,
    };
    rig.server
        .script(TOKEN_PATH, [as_nonce_challenge("n1"), rig.token_reply()]);
    let client = tokio::task::block_in_place(|| OAuthClient::new(settings, &keyring))
        .expect("the client's keys pass the policy")
        .with_transport(rig.server.transport());

    let token = client.token().await.expect("a token");

    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&token.secret),
        rig.access_token
    );
    assert_eq!(token.token_type, "DPoP");
    assert_eq!(token.scopes, [SCOPE]);
    assert_eq!(token.round_trips, 2);
    assert_one_nonce_retry(&rig.received());
    // The device goes before its swtpm.
    drop((client, keyring));
    drop(home);
}
