//! The dev-server (`keybound-devserver`) end to end: client keys in a real SoftHSM2 token,
//! assertions and DPoP proofs signed by the `keybound` binary, the dev-server in-process on
//! 127.0.0.1:0, HTTP through reqwest. Assertions the CLI will not make (expired, too
//! long-lived, from the future) come from a software key the test registers. The
//! `keybound-devserver` binary is tested in its own crate (`crates/keybound-devserver/tests`).

mod devserver_support;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devserver_support::*;
use keybound_devserver::{JwksSource, Settings};
use serde_json::{Value, json};

const BOTH: &str = "okta.users.read okta.users.manage";
const PEOPLE: [&str; 7] = [
    "Ada Lovelace",
    "Alan Turing",
    "Grace Hopper",
    "Katherine Johnson",
    "Edsger Dijkstra",
    "Barbara Liskov",
    "Donald Knuth",
];

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// A SoftHSM token holding `client-auth` (registered with the dev-server) and `dpop`, a
/// dev-server that knows the client, and an HTTP client.
struct Fixture {
    hsm: Hsm,
    server: Server,
    http: reqwest::Client,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut Settings)) -> Fixture {
        let hsm = Hsm::with_client_keys();
        let jwks = hsm.write_jwks(&["client-auth"]);
        let mut settings = Settings::new(CLIENT_ID, JwksSource::File(jwks));
        adjust(&mut settings);
        let server = Server::start(settings).await;
        Fixture {
            hsm,
            server,
            http: http(),
        }
    }

    fn token_url(&self) -> &str {
        &self.server.endpoints.token
    }

    fn users_url(&self, rest: &str) -> String {
        format!("{}{rest}", self.server.endpoints.users)
    }

    /// A fresh `client-auth` assertion for the token endpoint.
    fn assertion(&self) -> String {
        self.hsm.assertion("client-auth", self.token_url())
    }

    /// A `dpop` proof for `POST <token endpoint>`.
    fn token_proof(&self, nonce: Option<&str>) -> String {
        self.hsm.dpop("dpop", "POST", self.token_url(), nonce, None)
    }

    async fn request_token(&self, assertion: &str, proof: Option<&str>, scope: &str) -> Reply {
        post_token(&self.http, &self.server, assertion, proof, scope).await
    }

    /// The current AS nonce, read off a cheap refusal (every token response carries it).
    async fn as_nonce(&self) -> String {
        let reply = post_form(
            &self.http,
            &self.server,
            &[("grant_type", "password")],
            None,
        )
        .await;
        reply.assert_oauth_error(400, "unsupported_grant_type", "client_credentials");
        reply.nonce()
    }

    /// A DPoP-bound access token for `scope`, bound to `dpop_key`.
    async fn access_token_for(&self, dpop_key: &str, client_key: &str, scope: &str) -> String {
        let nonce = self.as_nonce().await;
        let assertion = self.hsm.assertion(client_key, self.token_url());
        let proof = self
            .hsm
            .dpop(dpop_key, "POST", self.token_url(), Some(&nonce), None);
        let reply = self.request_token(&assertion, Some(&proof), scope).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    async fn access_token(&self, scope: &str) -> String {
        self.access_token_for("dpop", "client-auth", scope).await
    }

    /// The current RS nonce, read off the challenge to a request without Authorization.
    async fn rs_nonce(&self) -> String {
        let reply = Reply::read(
            self.http
                .get(self.users_url(""))
                .send()
                .await
                .expect("GET users"),
        )
        .await;
        reply.assert_okta_error(401, "E0000011");
        reply.nonce()
    }

    /// An API call the way keybound makes it: a fresh proof from `key` with the RS nonce and
    /// `ath`.
    async fn api_with(
        &self,
        key: &str,
        method: &str,
        url: &str,
        token: &str,
        body: Option<&str>,
    ) -> Reply {
        let nonce = self.rs_nonce().await;
        let proof = self.hsm.dpop(key, method, url, Some(&nonce), Some(token));
        call_api(&self.http, method, url, token, &proof, body).await
    }

    async fn api(&self, method: &str, url: &str, token: &str, body: Option<&str>) -> Reply {
        self.api_with("dpop", method, url, token, body).await
    }
}

/// A dev-server whose registered JWKS holds a software key (and no SoftHSM token).
struct SoftFixture {
    key: SoftKey,
    server: Server,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl SoftFixture {
    async fn new() -> SoftFixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SoftKey::new("soft-1");
        let jwks = write_jwks(dir.path(), "jwks.json", &[key.jwk()]);
        let server = Server::start(Settings::new(CLIENT_ID, JwksSource::File(jwks))).await;
        SoftFixture {
            key,
            server,
            http: http(),
            _dir: dir,
        }
    }

    /// A token request with the software key's assertion for `iat` / `exp` and no proof.
    async fn request(&self, iat: i64, exp: i64) -> Reply {
        let assertion = self.key.assertion(&self.server.endpoints.token, iat, exp);
        post_token(&self.http, &self.server, &assertion, None, BOTH).await
    }
}

// ---------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn nonce_challenge_then_fresh_assertion_yields_a_dpop_bound_token() {
    let f = Fixture::new().await;

    // First try, as a client that has no nonce yet: challenged.
    let first = f
        .request_token(&f.assertion(), Some(&f.token_proof(None)), BOTH)
        .await;
    first.assert_oauth_error(400, "use_dpop_nonce", "");
    assert_eq!(
        first.body["error_description"],
        "Authorization server requires nonce in DPoP proof."
    );
    let nonce = first.nonce();

    // Retry with a fresh assertion and a proof carrying the nonce.
    let reply = f
        .request_token(&f.assertion(), Some(&f.token_proof(Some(&nonce))), BOTH)
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    assert_eq!(reply.nonce(), nonce, "no rotation within seconds");
    assert_eq!(reply.body["token_type"], "DPoP");
    assert_eq!(reply.body["expires_in"], 3600);
    assert_eq!(reply.body["scope"], BOTH);

    // The access token is an ES256 JWT signed by the key at /oauth2/v1/keys.
    let token = Jwt::decode(reply.body["access_token"].as_str().expect("access_token"));
    assert_eq!(token.header["alg"], "ES256");
    let keys = get_json(&f.http, &f.server.endpoints.jwks).await;
    let jwk = keys["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .find(|k| k["kid"] == token.header["kid"])
        .expect("the token's kid is published");
    assert_eq!(
        jwk["kid"],
        thumbprint(jwk),
        "kid is the RFC 7638 thumbprint"
    );
    assert!(token.verify_es256(jwk), "access token signature verifies");
    let mut tampered = Jwt::decode(reply.body["access_token"].as_str().expect("token"));
    tampered.signing_input.push('x');
    assert!(!tampered.verify_es256(jwk), "a tampered token does not");

    let issuer = f.server.endpoints.issuer.as_str();
    let c = &token.claims;
    assert_eq!((&c["iss"], &c["aud"]), (&json!(issuer), &json!(issuer)));
    assert_eq!(
        (&c["sub"], &c["cid"]),
        (&json!(CLIENT_ID), &json!(CLIENT_ID))
    );
    assert_eq!(c["scp"], json!([READ, MANAGE]));
    assert_eq!(c["scope"], BOTH);
    assert_eq!(
        c["exp"].as_i64().expect("exp") - c["iat"].as_i64().expect("iat"),
        3600
    );

    // Bound to the HSM's dpop key: cnf.jkt is its RFC 7638 thumbprint, computed here and
    // by keybound (its kid).
    let dpop_jwk = f.hsm.jwk("dpop");
    assert_eq!(c["cnf"]["jkt"], thumbprint(&dpop_jwk));
    assert_eq!(c["cnf"]["jkt"], dpop_jwk["kid"]);

    let meta = get_json(&f.http, &f.server.endpoints.metadata).await;
    assert_eq!(meta["issuer"], issuer);
    assert_eq!(meta["token_endpoint"], f.server.endpoints.token);
    assert_eq!(meta["jwks_uri"], f.server.endpoints.jwks);
    let algs = json!(["ES256", "ES384", "RS256", "PS256"]);
    assert_eq!(meta["dpop_signing_alg_values_supported"], algs);
    assert_eq!(
        meta["token_endpoint_auth_signing_alg_values_supported"],
        algs
    );
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );

    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_with_the_same_assertion_after_a_nonce_challenge_is_refused() {
    let f = Fixture::new().await;
    let assertion = f.assertion();
    let first = f
        .request_token(&assertion, Some(&f.token_proof(None)), READ)
        .await;
    first.assert_oauth_error(400, "use_dpop_nonce", "requires nonce");

    // The assertion's jti was consumed before the DPoP check refused the proof.
    let retry = f
        .request_token(&assertion, Some(&f.token_proof(Some(&first.nonce()))), READ)
        .await;
    retry.assert_oauth_error(
        401,
        "invalid_client",
        "The client_assertion token has a jti that was already used.",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_token_proof_is_refused() {
    let f = Fixture::new().await;
    let proof = f.token_proof(Some(&f.as_nonce().await));
    let first = f.request_token(&f.assertion(), Some(&proof), READ).await;
    assert_eq!(first.status, 200, "{first:?}");

    let replay = f.request_token(&f.assertion(), Some(&proof), READ).await;
    replay.assert_oauth_error(400, "invalid_dpop_proof", "jti claim has already been used");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_proof_for_another_url_is_refused() {
    let f = Fixture::new().await;
    let nonce = f.as_nonce().await;
    let keys_url = f.server.url("/oauth2/v1/keys");
    let proof = f.hsm.dpop("dpop", "POST", &keys_url, Some(&nonce), None);
    f.request_token(&f.assertion(), Some(&proof), READ)
        .await
        .assert_oauth_error(400, "invalid_dpop_proof", "htu");

    // Query and fragment are not part of htu: the same endpoint with a query is fine.
    let with_query = format!("{}?x=1#f", f.token_url());
    let proof = f.hsm.dpop("dpop", "POST", &with_query, Some(&nonce), None);
    let reply = f.request_token(&f.assertion(), Some(&proof), READ).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_proof_for_another_method_is_refused() {
    let f = Fixture::new().await;
    let nonce = f.as_nonce().await;
    let proof = f.hsm.dpop("dpop", "GET", f.token_url(), Some(&nonce), None);
    f.request_token(&f.assertion(), Some(&proof), READ)
        .await
        .assert_oauth_error(
            400,
            "invalid_dpop_proof",
            "htm claim must be the request method POST",
        );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_proof_signed_with_the_client_authentication_key_is_refused() {
    // Okta refuses one key for both jobs: a DPoP key that is registered for client
    // authentication would let whoever holds the DPoP key authenticate as the client.
    let f = Fixture::new().await;
    let nonce = f.as_nonce().await;
    let proof = f
        .hsm
        .dpop("client-auth", "POST", f.token_url(), Some(&nonce), None);
    f.request_token(&f.assertion(), Some(&proof), READ)
        .await
        .assert_oauth_error(
            400,
            "invalid_dpop_proof",
            "must not be signed with a key registered for client authentication",
        );
    // The separate DPoP key is fine.
    let proof = f.token_proof(Some(&nonce));
    let reply = f.request_token(&f.assertion(), Some(&proof), READ).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_offset_moves_date_checks_tokens_and_nonces_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = SoftKey::new("client-1");
    let dpop = SoftKey::new("dpop-1");
    let jwks = write_jwks(dir.path(), "jwks.json", &[client.jwk()]);
    for offset in [3600, -3600, 120, -120] {
        let mut settings = Settings::new(CLIENT_ID, JwksSource::File(jwks.clone()));
        settings.clock_offset_secs = offset;
        let server = Server::start(settings).await;
        let http = http();
        let token_url = server.endpoints.token.clone();
        let local = unix_now();

        // In this machine's time, the assertion is expired (server ahead) or from the
        // future (server behind), as Okta would say.
        let reply = post_token(
            &http,
            &server,
            &client.assertion(&token_url, local, local + 60),
            None,
            READ,
        )
        .await;
        let why = if offset > 0 {
            "expired"
        } else {
            "iat in the future"
        };
        reply.assert_oauth_error(401, "invalid_client", why);

        // Its Date tells its own clock (1 s resolution; the margin is for a slow machine,
        // not a timing claim).
        let date = httpdate::parse_http_date(reply.header("date").expect("Date"))
            .expect("an HTTP date")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        let server_now = date;
        assert!(
            (local + offset - 2..=local + offset + 60).contains(&server_now),
            "offset {offset}: Date {date} vs local {local}"
        );

        // In the server's time, with a proof from a separate key and the server's nonce,
        // a token is issued whose iat/exp are the server's too.
        let nonce = reply.nonce();
        let proof = dpop.sign(
            &json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": dpop.jwk() }),
            &json!({ "jti": random_id(), "htm": "POST", "htu": token_url,
                     "iat": server_now, "nonce": nonce }),
        );
        let reply = post_token(
            &http,
            &server,
            &client.assertion(&token_url, server_now, server_now + 60),
            Some(&proof),
            READ,
        )
        .await;
        assert_eq!(reply.status, 200, "offset {offset}: {reply:?}");
        let token = Jwt::decode(reply.body["access_token"].as_str().expect("token"));
        let keys = get_json(&http, &server.endpoints.jwks).await;
        assert!(
            token.verify_es256(&keys["keys"][0]),
            "access token verifies"
        );
        let iat = token.claims["iat"].as_i64().expect("iat");
        assert!(
            (server_now..=server_now + 60).contains(&iat),
            "offset {offset}: iat {iat}"
        );
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn assertion_for_another_audience_is_refused() {
    let f = Fixture::new().await;
    // The issuer is a common mistake for aud; Okta wants the token endpoint itself.
    let assertion = f.hsm.assertion("client-auth", &f.server.endpoints.issuer);
    f.request_token(&assertion, Some(&f.token_proof(None)), READ)
        .await
        .assert_oauth_error(
            401,
            "invalid_client",
            "The audience claim for client_assertion must be the endpoint invoked for the request.",
        );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_assertion_is_refused() {
    let f = SoftFixture::new().await;
    let now = unix_now();
    f.request(now - 120, now - 60).await.assert_oauth_error(
        401,
        "invalid_client",
        "The client_assertion token is expired.",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn assertion_living_longer_than_an_hour_is_refused() {
    let f = SoftFixture::new().await;
    let now = unix_now();
    f.request(now, now + 3601).await.assert_oauth_error(
        401,
        "invalid_client",
        "The client_assertion lifetime exceeds 3600 seconds.",
    );
    // Exactly an hour is allowed: the request gets past the assertion to the DPoP check.
    f.request(now, now + 3600).await.assert_oauth_error(
        400,
        "invalid_dpop_proof",
        "header is missing",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn assertion_issued_in_the_future_is_refused() {
    let f = SoftFixture::new().await;
    let now = unix_now();
    f.request(now + 300, now + 360).await.assert_oauth_error(
        401,
        "invalid_client",
        "The client_assertion token has an iat in the future.",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn other_assertion_and_request_refusals_name_their_cause() {
    let f = SoftFixture::new().await;
    let token_url = f.server.endpoints.token.clone();
    let now = unix_now();
    let claims = |overrides: Value| {
        let mut c = json!({
            "iss": CLIENT_ID, "sub": CLIENT_ID, "aud": token_url,
            "iat": now, "exp": now + 60, "jti": random_id(),
        });
        for (k, v) in overrides.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let header = json!({ "alg": "ES256", "kid": "soft-1" });
    let stranger = SoftKey::new("soft-1");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "signed by an unregistered key under a registered kid",
            stranger.sign(&header, &claims(json!({}))),
            "The client_assertion signature is invalid.",
        ),
        (
            "unknown kid",
            f.key.sign(
                &json!({ "alg": "ES256", "kid": "nope" }),
                &claims(json!({})),
            ),
            "No key in the registered JWKS matches kid 'nope'",
        ),
        (
            "symmetric alg",
            f.key.sign(
                &json!({ "alg": "HS256", "kid": "soft-1" }),
                &claims(json!({})),
            ),
            "alg 'HS256' is not allowed",
        ),
        (
            "another client as iss",
            f.key.sign(&header, &claims(json!({ "iss": "0oa-other" }))),
            "iss and sub claims",
        ),
        (
            "no jti",
            f.key.sign(&header, &claims(json!({ "jti": null }))),
            "must have a jti claim",
        ),
        (
            "no exp",
            f.key.sign(&header, &claims(json!({ "exp": null }))),
            "must have an exp claim",
        ),
    ];
    for (what, assertion, description) in cases {
        let reply = post_token(&f.http, &f.server, &assertion, None, READ).await;
        assert_eq!(reply.status, 401, "{what}: {reply:?}");
        reply.assert_oauth_error(401, "invalid_client", description);
    }

    // Without a kid, every registered key that fits the alg is tried.
    let no_kid = f.key.sign(&json!({ "alg": "ES256" }), &claims(json!({})));
    post_token(&f.http, &f.server, &no_kid, None, READ)
        .await
        .assert_oauth_error(400, "invalid_dpop_proof", "header is missing");

    let good = f.key.assertion(&token_url, now, now + 60);
    let wrong_type = [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", "urn:example:other"),
        ("client_assertion", good.as_str()),
        ("scope", READ),
    ];
    post_form(&f.http, &f.server, &wrong_type, None)
        .await
        .assert_oauth_error(401, "invalid_client", "client_assertion_type must be");
    let wrong_grant = [
        ("grant_type", "authorization_code"),
        ("client_assertion_type", ASSERTION_TYPE),
        ("client_assertion", good.as_str()),
    ];
    post_form(&f.http, &f.server, &wrong_grant, None)
        .await
        .assert_oauth_error(400, "unsupported_grant_type", "client_credentials");
}

#[tokio::test(flavor = "multi_thread")]
async fn rsa_and_p384_keys_sign_assertions_and_proofs() {
    let hsm = Hsm::new();
    // Client keys, and separate DPoP keys: the server refuses one key for both jobs.
    for (label, alg) in [
        ("rs256", "RS256"),
        ("ps256", "PS256"),
        ("es384", "ES384"),
        ("rs256-dpop", "RS256"),
        ("ps256-dpop", "PS256"),
        ("es384-dpop", "ES384"),
    ] {
        hsm.generate(label, alg);
    }
    let jwks = hsm.write_jwks(&["rs256", "ps256", "es384"]);
    let server = Server::start(Settings::new(CLIENT_ID, JwksSource::File(jwks))).await;
    let f = Fixture {
        hsm,
        server,
        http: http(),
    };
    for (client_key, dpop_key) in [
        ("rs256", "ps256-dpop"),
        ("ps256", "rs256-dpop"),
        ("es384", "es384-dpop"),
    ] {
        let token = f.access_token_for(dpop_key, client_key, READ).await;
        assert_eq!(
            Jwt::decode(&token).claims["cnf"]["jkt"],
            thumbprint(&f.hsm.jwk(dpop_key)),
            "{dpop_key}"
        );
        let reply = f
            .api_with(dpop_key, "GET", &f.users_url("?limit=1"), &token, None)
            .await;
        assert_eq!(reply.status, 200, "{client_key}/{dpop_key}: {reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_uri_is_fetched_at_start_and_again_for_an_unknown_kid() {
    let first = SoftKey::new("first");
    let second = SoftKey::new("second");
    let published = Arc::new(Mutex::new(json!({ "keys": [first.jwk()] })));
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks_app = {
        let (published, fetches) = (published.clone(), fetches.clone());
        axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                axum::Json(published.lock().expect("lock").clone())
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let jwks_url = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, jwks_app).await });

    let uri = url::Url::parse(&jwks_url).expect("URL");
    let server = Server::start(Settings::new(CLIENT_ID, JwksSource::Uri(uri))).await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched at start");
    let http = http();
    let token_url = server.endpoints.token.clone();
    let now = unix_now();
    let request = |key: &SoftKey| key.assertion(&token_url, now, now + 60);

    // A key published at start: the assertion passes; the request stops at DPoP.
    post_token(&http, &server, &request(&first), None, READ)
        .await
        .assert_oauth_error(400, "invalid_dpop_proof", "header is missing");

    // The client publishes a new key; its unknown kid makes the dev-server fetch again.
    *published.lock().expect("lock") = json!({ "keys": [first.jwk(), second.jwk()] });
    post_token(&http, &server, &request(&second), None, READ)
        .await
        .assert_oauth_error(400, "invalid_dpop_proof", "header is missing");
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "fetched for the new kid");

    // Another unknown kid right after: no third fetch within 10 s.
    post_token(&http, &server, &request(&SoftKey::new("third")), None, READ)
        .await
        .assert_oauth_error(
            401,
            "invalid_client",
            "No key in the registered JWKS matches kid 'third'",
        );
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "rate-limited");
}

// ---------------------------------------------------------------------------
// Key rotation: the registered JWKS changes under a running server
// ---------------------------------------------------------------------------

/// The reply to a token request whose client assertion passed, sent without a DPoP proof:
/// the server stops at the missing proof.
fn assert_assertion_passed(reply: &Reply) {
    reply.assert_oauth_error(400, "invalid_dpop_proof", "header is missing");
}

/// The refusal of an assertion whose kid the registered JWKS does not hold.
fn assert_unknown_kid(reply: &Reply, kid: &str) {
    reply.assert_oauth_error(
        401,
        "invalid_client",
        &format!("No key in the registered JWKS matches kid '{kid}'."),
    );
}

/// Paste mode, with keys in a real SoftHSM token: the admin rewrites the JWKS file to add
/// the next key before activation and to remove the old one at retirement, without
/// restarting the server; a broken file keeps the last good keys.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_file_edits_add_and_remove_keys_without_a_restart() {
    let f = Fixture::new().await;
    f.hsm.generate("client-auth-next", "ES256");
    let old_jwk = f.hsm.jwk("client-auth");
    let next_jwk = f.hsm.jwk("client-auth-next");
    let old_kid = old_jwk["kid"].as_str().expect("kid").to_string();
    let next_kid = next_jwk["kid"].as_str().expect("kid").to_string();
    let jwks_file = f.hsm.path("jwks.json");
    let with = |key: &str| f.hsm.assertion(key, f.token_url());

    // Not pasted yet: refused, naming the kid.
    let reply = f.request_token(&with("client-auth-next"), None, READ).await;
    assert_unknown_kid(&reply, &next_kid);

    // Pasted next to the old key: both get tokens.
    f.hsm.write_jwks(&["client-auth", "client-auth-next"]);
    f.access_token_for("dpop", "client-auth-next", READ).await;
    f.access_token_for("dpop", "client-auth", READ).await;

    // The old key removed at retirement: refused; the new one goes on.
    f.hsm.write_jwks(&["client-auth-next"]);
    let reply = f.request_token(&with("client-auth"), None, READ).await;
    assert_unknown_kid(&reply, &old_kid);
    f.access_token_for("dpop", "client-auth-next", READ).await;

    // A broken file keeps the last good keys, and a refusal says why the file was not used.
    let duplicate = json!({ "keys": [next_jwk.clone(), next_jwk.clone()] }).to_string();
    for (content, problem) in [
        (Some("{\"keys\": [".to_string()), "not JSON"),
        (Some(duplicate), "appears twice"),
        (None, "cannot read the client JWKS file"),
    ] {
        match content {
            Some(text) => std::fs::write(&jwks_file, text).expect("write jwks.json"),
            None => std::fs::remove_file(&jwks_file).expect("remove jwks.json"),
        }
        f.access_token_for("dpop", "client-auth-next", READ).await;
        let reply = f.request_token(&with("client-auth"), None, READ).await;
        assert_unknown_kid(&reply, &old_kid);
        reply.assert_oauth_error(401, "invalid_client", "The last good JWKS is still in use");
        reply.assert_oauth_error(401, "invalid_client", problem);
        reply.assert_oauth_error(401, "invalid_client", &jwks_file.display().to_string());
    }

    // Repaired: the file counts again, note gone.
    f.hsm.write_jwks(&["client-auth"]);
    f.access_token_for("dpop", "client-auth", READ).await;
    let reply = f.request_token(&with("client-auth-next"), None, READ).await;
    assert_unknown_kid(&reply, &next_kid);
    let description = reply.body["error_description"].as_str().expect("text");
    assert!(!description.contains("last good"), "{description}");
}

/// An edit that keeps the file's size and mtime (two writes within one tick of the file
/// system's clock, or an mtime put back) is still seen.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_file_rewritten_with_the_same_size_and_mtime_is_read_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (SoftKey::new("soft-a"), SoftKey::new("soft-b"));
    let path = write_jwks(dir.path(), "jwks.json", &[a.jwk()]);
    let before = std::fs::metadata(&path).expect("stat");
    let server = Server::start(Settings::new(CLIENT_ID, JwksSource::File(path.clone()))).await;
    let http = http();
    let token_url = server.endpoints.token.clone();
    let request = |key: &SoftKey| {
        let now = unix_now();
        key.assertion(&token_url, now, now + 60)
    };
    assert_assertion_passed(&post_token(&http, &server, &request(&a), None, READ).await);

    write_jwks(dir.path(), "jwks.json", &[b.jwk()]);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .expect("open")
        .set_modified(before.modified().expect("mtime"))
        .expect("put the mtime back");
    let after = std::fs::metadata(&path).expect("stat");
    assert_eq!(
        (after.len(), after.modified().expect("mtime")),
        (before.len(), before.modified().expect("mtime"))
    );
    assert_assertion_passed(&post_token(&http, &server, &request(&b), None, READ).await);
    let reply = post_token(&http, &server, &request(&a), None, READ).await;
    assert_unknown_kid(&reply, "soft-a");
}

/// URL mode: a key removed from the served JWKS is refused once the cached set is older
/// than the response's max-age, without an unknown kid to trigger a fetch.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_uri_forgets_a_removed_key_once_its_max_age_has_passed() {
    let (old, next) = (SoftKey::new("old"), SoftKey::new("next"));
    let host = JwksHost::start(&[old.jwk(), next.jwk()], Some("public, max-age=1"), false).await;
    let server = Server::start(Settings::new(CLIENT_ID, JwksSource::Uri(host.url.clone()))).await;
    let http = http();
    let token_url = server.endpoints.token.clone();
    let request = |key: &SoftKey| {
        let now = unix_now();
        key.assertion(&token_url, now, now + 60)
    };
    assert_assertion_passed(&post_token(&http, &server, &request(&old), None, READ).await);
    assert_eq!(host.counts().served, 1);

    host.set_keys(&[next.jwk()]);
    // Bounded poll: accepted until the cached set is older than 1 s, then refused.
    let mut refused = None;
    for _ in 0..300 {
        let reply = post_token(&http, &server, &request(&old), None, READ).await;
        if reply.status == 401 {
            refused = Some(reply);
            break;
        }
        assert_assertion_passed(&reply);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let reply = refused.expect("the removed key is refused once max-age has passed");
    assert_unknown_kid(&reply, "old");
    assert!(host.counts().served >= 2, "{:?}", host.counts());
    assert_assertion_passed(&post_token(&http, &server, &request(&next), None, READ).await);
}

/// URL mode: a new kid is fetched for at once (refetch interval 0), the cached set is
/// revalidated with If-None-Match, and a 304 keeps the keys and restarts their max-age.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_uri_picks_up_a_new_kid_and_revalidates_with_its_etag() {
    let (first, second) = (SoftKey::new("first"), SoftKey::new("second"));
    let host = JwksHost::start(&[first.jwk()], Some("max-age=3600"), true).await;
    let mut settings = Settings::new(CLIENT_ID, JwksSource::Uri(host.url.clone()));
    settings.jwks_refetch_interval = 0;
    let server = Server::start(settings).await;
    let http = http();
    let token_url = server.endpoints.token.clone();
    let request = |key: &SoftKey| {
        let now = unix_now();
        key.assertion(&token_url, now, now + 60)
    };
    assert_assertion_passed(&post_token(&http, &server, &request(&first), None, READ).await);

    // The client publishes a second key: its unknown kid makes the server fetch again.
    host.set_keys(&[first.jwk(), second.jwk()]);
    assert_assertion_passed(&post_token(&http, &server, &request(&second), None, READ).await);
    let counts = host.counts();
    assert_eq!((counts.served, counts.not_modified), (2, 0), "{counts:?}");
    assert_eq!(
        counts.if_none_match,
        ["\"v1\""],
        "the ETag of the first fetch"
    );

    // An unknown kid again: revalidated, 304, still refused; the cached keys stand.
    let reply = post_token(
        &http,
        &server,
        &request(&SoftKey::new("nobody")),
        None,
        READ,
    )
    .await;
    assert_unknown_kid(&reply, "nobody");
    let counts = host.counts();
    assert_eq!((counts.served, counts.not_modified), (2, 1), "{counts:?}");
    assert_eq!(counts.if_none_match, ["\"v1\"", "\"v2\""]);
    for key in [&first, &second] {
        assert_assertion_passed(&post_token(&http, &server, &request(key), None, READ).await);
    }

    // With max-age=0 every assertion revalidates first; each 304 keeps the keys.
    host.set_cache_control(Some("no-cache"));
    let reply = post_token(
        &http,
        &server,
        &request(&SoftKey::new("nobody")),
        None,
        READ,
    )
    .await;
    assert_unknown_kid(&reply, "nobody");
    assert_eq!(host.counts().not_modified, 2);
    for expected in [3, 4] {
        assert_assertion_passed(&post_token(&http, &server, &request(&first), None, READ).await);
        assert_eq!(host.counts().not_modified, expected, "{:?}", host.counts());
    }
    assert_eq!(host.counts().served, 2, "{:?}", host.counts());

    // A 304 that restates max-age=3600 resets the set's age: no fetch for a while.
    host.set_cache_control(Some("max-age=3600"));
    assert_assertion_passed(&post_token(&http, &server, &request(&first), None, READ).await);
    let settled = host.counts();
    assert_eq!(settled.not_modified, 5, "{settled:?}");
    assert_assertion_passed(&post_token(&http, &server, &request(&second), None, READ).await);
    assert_eq!(host.counts(), settled, "fresh for an hour: not fetched");
}

/// URL mode: a JWKS URL that is down keeps the last good keys; the refusal of an unknown
/// kid says the URL failed; once it is back, its keys count again.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_uri_that_is_down_keeps_the_last_good_keys() {
    let (first, second) = (SoftKey::new("first"), SoftKey::new("second"));
    let host = JwksHost::start(&[first.jwk()], Some("max-age=0"), false).await;
    let mut settings = Settings::new(CLIENT_ID, JwksSource::Uri(host.url.clone()));
    settings.jwks_refetch_interval = 0;
    let server = Server::start(settings).await;
    let http = http();
    let token_url = server.endpoints.token.clone();
    let request = |key: &SoftKey| {
        let now = unix_now();
        key.assertion(&token_url, now, now + 60)
    };
    assert_assertion_passed(&post_token(&http, &server, &request(&first), None, READ).await);

    host.set_down(true);
    host.set_keys(&[first.jwk(), second.jwk()]);
    assert_assertion_passed(&post_token(&http, &server, &request(&first), None, READ).await);
    assert!(host.counts().failed >= 1, "{:?}", host.counts());
    let reply = post_token(&http, &server, &request(&second), None, READ).await;
    assert_unknown_kid(&reply, "second");
    reply.assert_oauth_error(401, "invalid_client", "The last good JWKS is still in use");
    reply.assert_oauth_error(401, "invalid_client", "HTTP status 503");

    host.set_down(false);
    assert_assertion_passed(&post_token(&http, &server, &request(&second), None, READ).await);
}

/// A JWKS URI whose publisher is up but not ready yet (`keybound serve` before its keys
/// are proved answers 503 with `Retry-After`): the server waits as told and starts with
/// the keys. A 503 without `Retry-After` stops the start at once, naming the status.
#[tokio::test(flavor = "multi_thread")]
async fn jwks_uri_answering_503_with_retry_after_at_start_is_fetched_again() {
    let key = SoftKey::new("first");
    let host = JwksHost::start(&[key.jwk()], None, false).await;
    host.set_down(true);

    let refused = keybound_devserver::DevServer::new(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        Settings::new(CLIENT_ID, JwksSource::Uri(host.url.clone())),
    )
    .await
    .err()
    .expect("a 503 without Retry-After stops the start");
    assert!(refused.to_string().contains("HTTP status 503"), "{refused}");
    assert_eq!(host.counts().failed, 1, "{:?}", host.counts());

    // Two more 503s with Retry-After: 1, then the keys.
    host.set_retry_after(Some(1));
    host.up_after_failed(3);
    let server = Server::start(Settings::new(CLIENT_ID, JwksSource::Uri(host.url.clone()))).await;
    let counts = host.counts();
    assert!(counts.failed == 3 && counts.served == 1, "{counts:?}");
    let http = http();
    let now = unix_now();
    let assertion = key.assertion(&server.endpoints.token, now, now + 60);
    assert_assertion_passed(&post_token(&http, &server, &assertion, None, READ).await);
}

// ---------------------------------------------------------------------------
// Resource server
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn users_list_follows_link_next_to_the_end() {
    let f = Fixture::new().await;
    let token = f.access_token(READ).await;
    let mut url = f.users_url("?limit=2");
    let mut names = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        let reply = f.api("GET", &url, &token, None).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.nonce();
        let links = reply.header_all("link");
        assert_eq!(links[0], format!("<{url}>; rel=\"self\""));
        for user in reply.body.as_array().expect("array of users") {
            let id = user["id"].as_str().expect("id");
            assert!(id.starts_with("00u") && id.len() == 19, "{id}");
            assert_eq!(user["status"], "ACTIVE");
            assert_eq!(
                user["_links"]["self"]["href"],
                f.users_url(&format!("/{id}"))
            );
            let p = &user["profile"];
            assert_eq!(p["email"], p["login"]);
            names.push(format!(
                "{} {}",
                p["firstName"].as_str().expect("firstName"),
                p["lastName"].as_str().expect("lastName")
            ));
        }
        let Some(next) = links.get(1) else {
            assert_eq!(links.len(), 1, "{links:?}");
            break;
        };
        let next = next
            .strip_prefix('<')
            .and_then(|n| n.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("second Link is rel=next: {next}"));
        assert!(next.starts_with(&f.users_url("?after=00u")), "{next}");
        url = next.to_string();
    }
    assert_eq!(pages, 4);
    assert_eq!(names, PEOPLE);

    for bad in ["0", "201", "ten"] {
        let reply = f
            .api("GET", &f.users_url(&format!("?limit={bad}")), &token, None)
            .await;
        reply.assert_okta_error(400, "E0000001");
        assert_eq!(reply.body["errorSummary"], "Api validation failed: limit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn user_get_and_update() {
    let f = Fixture::new().await;
    let token = f.access_token(BOTH).await;
    let first_page = f.api("GET", &f.users_url("?limit=1"), &token, None).await;
    let id = first_page.body[0]["id"].as_str().expect("id").to_string();
    let user_url = f.users_url(&format!("/{id}"));

    let ada = f.api("GET", &user_url, &token, None).await;
    assert_eq!(ada.status, 200, "{ada:?}");
    assert_eq!(ada.body["id"], id.as_str());
    assert_eq!(
        ada.body["profile"],
        json!({
            "firstName": "Ada", "lastName": "Lovelace",
            "email": "ada.lovelace@example.com", "login": "ada.lovelace@example.com",
        })
    );
    assert_eq!(ada.body["created"], "2026-01-01T00:00:00.000Z");

    let missing = f
        .api("GET", &f.users_url("/00u0000000000000000"), &token, None)
        .await;
    missing.assert_okta_error(404, "E0000007");
    assert_eq!(
        missing.body["errorSummary"],
        "Not found: Resource not found: 00u0000000000000000 (User)"
    );

    let updated = f
        .api(
            "POST",
            &user_url,
            &token,
            Some(r#"{"profile":{"firstName":"Augusta"}}"#),
        )
        .await;
    assert_eq!(updated.status, 200, "{updated:?}");
    assert_eq!(updated.body["profile"]["firstName"], "Augusta");
    assert_eq!(
        updated.body["profile"]["lastName"], "Lovelace",
        "partial update"
    );
    let again = f.api("GET", &user_url, &token, None).await;
    assert_eq!(again.body["profile"]["firstName"], "Augusta", "kept");

    for bad in [
        r#"{"profile":{"firstName":1}}"#,
        r#"{"firstName":"Augusta"}"#,
        r#"{"profile":{"email":"ada@example.org"}}"#,
        r#"{"profile":{"firstName":"Augusta""#,
    ] {
        let reply = f.api("POST", &user_url, &token, Some(bad)).await;
        reply.assert_okta_error(400, "E0000003");
        assert_eq!(
            reply.body["errorSummary"], "The request body was not well-formed.",
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_authorization_bearer_use_and_foreign_tokens_are_refused() {
    let f = Fixture::new().await;
    let token = f.access_token(READ).await;
    let url = f.users_url("");

    let bare = Reply::read(f.http.get(&url).send().await.expect("GET")).await;
    bare.assert_okta_error(401, "E0000011");
    assert_eq!(bare.body["errorSummary"], "Invalid token provided");
    assert_eq!(
        bare.www_authenticate(),
        r#"DPoP algs="ES256 ES384 RS256 PS256""#
    );

    // Our token as a Bearer token, even with a good proof alongside.
    let proof = f
        .hsm
        .dpop("dpop", "GET", &url, Some(&f.rs_nonce().await), Some(&token));
    let bearer = Reply::read(
        f.http
            .get(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header("DPoP", proof)
            .send()
            .await
            .expect("GET"),
    )
    .await;
    bearer.assert_okta_error(401, "E0000011");
    assert_eq!(
        bearer.www_authenticate(),
        r#"DPoP error="invalid_token", error_description="The access token is DPoP-bound; present it with the DPoP scheme and a proof""#
    );

    // A token this server did not sign.
    let (input, _) = token.rsplit_once('.').expect("compact JWS");
    let forged = format!("{input}.{}", b64(&[7u8; 64]));
    f.api("GET", &url, &forged, None)
        .await
        .assert_dpop_challenge(401, "E0000011", "invalid_token", "signature is invalid");
}

#[tokio::test(flavor = "multi_thread")]
async fn proof_from_another_key_is_refused() {
    let f = Fixture::new().await;
    f.hsm.generate("other", "ES256");
    let token = f.access_token(READ).await;
    let reply = f
        .api_with("other", "GET", &f.users_url(""), &token, None)
        .await;
    reply.assert_okta_error(401, "E0000011");
    assert_eq!(
        reply.www_authenticate(),
        r#"DPoP error="invalid_dpop_proof", error_description="The DPoP proof key does not match the access token's cnf.jkt""#
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn proof_without_or_with_a_wrong_ath_is_refused() {
    let f = Fixture::new().await;
    let token = f.access_token(READ).await;
    let url = f.users_url("");

    let no_ath = f
        .hsm
        .dpop("dpop", "GET", &url, Some(&f.rs_nonce().await), None);
    call_api(&f.http, "GET", &url, &token, &no_ath, None)
        .await
        .assert_dpop_challenge(401, "E0000011", "invalid_dpop_proof", "no ath claim");

    let other_token = f.access_token(READ).await;
    let wrong_ath = f.hsm.dpop(
        "dpop",
        "GET",
        &url,
        Some(&f.rs_nonce().await),
        Some(&other_token),
    );
    call_api(&f.http, "GET", &url, &token, &wrong_ath, None)
        .await
        .assert_dpop_challenge(
            401,
            "E0000011",
            "invalid_dpop_proof",
            "ath claim does not match the access token",
        );
}

#[tokio::test(flavor = "multi_thread")]
async fn rs_nonce_challenge_is_401_by_default() {
    rs_nonce_challenge(None, 401).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rs_nonce_challenge_can_be_400_as_okta_sends_it() {
    rs_nonce_challenge(Some(400), 400).await;
}

async fn rs_nonce_challenge(setting: Option<u16>, status: u16) {
    let f = Fixture::with(|s| {
        if let Some(code) = setting {
            s.rs_nonce_status = code;
        }
    })
    .await;
    let token = f.access_token(READ).await;
    let url = f.users_url("/ada.lovelace@example.com");
    let send = |proof: String| {
        let (http, url, token) = (&f.http, &url, &token);
        async move { call_api(http, "GET", url, token, &proof, None).await }
    };

    let challenged = send(f.hsm.dpop("dpop", "GET", &url, None, Some(&token))).await;
    challenged.assert_okta_error(status, "E0000011");
    assert_eq!(
        challenged.www_authenticate(),
        r#"DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof""#
    );
    let rs_nonce = challenged.nonce();

    // The authorization server's nonce is a different one and does not count here.
    let as_nonce = f.as_nonce().await;
    assert_ne!(as_nonce, rs_nonce);
    send(
        f.hsm
            .dpop("dpop", "GET", &url, Some(&as_nonce), Some(&token)),
    )
    .await
    .assert_dpop_challenge(status, "E0000011", "use_dpop_nonce", "requires nonce");

    let proof = f
        .hsm
        .dpop("dpop", "GET", &url, Some(&rs_nonce), Some(&token));
    let ok = send(proof.clone()).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body["profile"]["lastName"], "Lovelace");
    assert_eq!(ok.nonce(), rs_nonce);

    // The same proof once more is a replay.
    send(proof).await.assert_dpop_challenge(
        401,
        "E0000011",
        "invalid_dpop_proof",
        "jti claim has already been used",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insufficient_scope_is_refused() {
    let f = Fixture::with(|s| s.granted_scopes = vec![READ.into()]).await;

    let nonce = f.as_nonce().await;
    f.request_token(&f.assertion(), Some(&f.token_proof(Some(&nonce))), BOTH)
        .await
        .assert_oauth_error(
            400,
            "invalid_scope",
            "The following scopes are not allowed: okta.users.manage",
        );

    let token = f.access_token(READ).await;
    let list = f.api("GET", &f.users_url("?limit=1"), &token, None).await;
    assert_eq!(list.status, 200, "{list:?}");
    let id = list.body[0]["id"].as_str().expect("id");
    let update = f
        .api(
            "POST",
            &f.users_url(&format!("/{id}")),
            &token,
            Some(r#"{"profile":{"firstName":"Augusta"}}"#),
        )
        .await;
    update.assert_okta_error(403, "E0000006");
    assert_eq!(
        update.body["errorSummary"],
        "You do not have permission to perform the requested action"
    );
    assert_eq!(
        update.www_authenticate(),
        r#"DPoP error="insufficient_scope", error_description="The access token provided does not contain the required scopes.""#
    );
}

// ---------------------------------------------------------------------------
// The library entry point
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn run_serves_until_shutdown_and_refuses_bad_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = write_jwks(dir.path(), "jwks.json", &[SoftKey::new("k").jwk()]);
    let settings = Settings::new(CLIENT_ID, JwksSource::File(jwks));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(keybound_devserver::run(listener, settings.clone(), async {
        let _ = stopped.await;
    }));
    let keys = get_json(&http(), &format!("{base}/oauth2/v1/keys")).await;
    assert_eq!(keys["keys"][0]["kid"], thumbprint(&keys["keys"][0]));
    stop.send(()).expect("server still running");
    server
        .await
        .expect("join")
        .expect("run returns Ok after shutdown");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let empty_client = Settings {
        client_id: " ".into(),
        ..settings.clone()
    };
    let err = keybound_devserver::run(listener, empty_client, std::future::pending())
        .await
        .expect_err("an empty client id is refused");
    assert!(err.to_string().contains("client id is empty"), "{err}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let slow_refetch = Settings {
        jwks_refetch_interval: 3601,
        ..settings
    };
    let err = keybound_devserver::run(listener, slow_refetch, std::future::pending())
        .await
        .expect_err("a refetch interval over an hour is refused");
    assert!(
        err.to_string()
            .contains("JWKS refetch interval 3601 s is out of range"),
        "{err}"
    );
}
