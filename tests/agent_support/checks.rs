//! Checking what the agent signed and published: every proof ([`check_proof`]) and
//! assertion ([`check_assertion`]) verified with the independent [`Verifier`] of
//! `tests/support` against the published JWKS; the concurrency [`Job`]s; and one sample
//! of the Prometheus text ([`metric`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::support::*;

/// The JWKS entries by kid.
pub fn by_kid(keys: &[Value]) -> BTreeMap<String, Value> {
    keys.iter()
        .map(|k| {
            (
                k["kid"].as_str().expect("kid is a string").to_owned(),
                k.clone(),
            )
        })
        .collect()
}

/// What a DPoP proof must say.
#[derive(Clone, Debug)]
pub struct WantProof {
    /// The kid (RFC 7638 thumbprint) of the key that must have signed it.
    pub kid: String,
    pub htm: String,
    /// The normalised `htu`, written out by the test.
    pub htu: String,
    pub nonce: Option<String>,
    pub access_token: Option<String>,
}

/// RFC 9449 §4.2 checks on `compact`, signature verified with the JWKS entry of `want.kid`
/// (not with the key in the proof's own header). `window` bounds `iat` (unix seconds).
pub fn check_proof(
    jwks: &BTreeMap<String, Value>,
    compact: &str,
    want: &WantProof,
    window: (i64, i64),
) -> Jws {
    let jws = Jws::parse(compact);
    let jwk = jwks
        .get(&want.kid)
        .unwrap_or_else(|| panic!("kid {} is not in the JWKS {jwks:?}", want.kid));
    assert_members(&jws.header, &["typ", "alg", "jwk"]);
    assert_eq!(jws.header["typ"], "dpop+jwt", "{}", jws.header);
    assert_eq!(
        jws.header["jwk"],
        required_public_members(jwk),
        "the proof's jwk is exactly the public key of {}",
        want.kid
    );
    assert_eq!(jwk_thumbprint(&jws.header["jwk"]), want.kid);
    assert_verifies(jwk, &jws);

    let mut members = vec!["jti", "htm", "htu", "iat"];
    if want.nonce.is_some() {
        members.push("nonce");
    }
    if want.access_token.is_some() {
        members.push("ath");
    }
    assert_members(&jws.claims, &members);
    assert_eq!(jws.claims["htm"], want.htm.as_str(), "{}", jws.claims);
    assert_eq!(jws.claims["htu"], want.htu.as_str(), "{}", jws.claims);
    if let Some(nonce) = &want.nonce {
        assert_eq!(jws.claims["nonce"], nonce.as_str());
    }
    if let Some(token) = &want.access_token {
        assert_eq!(
            jws.claims["ath"],
            b64(&Sha256::digest(token.as_bytes())),
            "ath is base64url(SHA-256(access token)) (RFC 9449 §4.2)"
        );
    }
    check_iat_and_jti(&jws.claims, window);
    jws
}

/// `htm`/`htu` as a caller may send them, and as a proof must carry them (RFC 9449 §4.2:
/// method in upper case, URI without query and fragment, scheme and host lowercased,
/// default port dropped, empty path as "/").
pub const HTU_CASES: [(&str, &str, &str, &str); 4] = [
    (
        "post",
        "https://Resource.Example.org:443/token?x=1#f",
        "POST",
        "https://resource.example.org/token",
    ),
    (
        "GET",
        "HTTPS://o.example/api/v1/users?limit=3",
        "GET",
        "https://o.example/api/v1/users",
    ),
    (
        "PATCH",
        "http://127.0.0.1:8080/api/v1/users/00u1",
        "PATCH",
        "http://127.0.0.1:8080/api/v1/users/00u1",
    ),
    ("get", "https://a.example", "GET", "https://a.example/"),
];

/// The agent's `/v1/jwks` by kid, after checking each entry's shape and that it equals
/// `cli`, what `keybound jwks` printed for the same config.
pub async fn served_jwks(agent: &Agent, cli: &[Value]) -> BTreeMap<String, Value> {
    let body = get(agent.socket(), "/v1/jwks").await.ok("GET /v1/jwks");
    assert_members(&body, &["keys"]);
    let keys = body["keys"].as_array().expect("keys is an array");
    for key in keys {
        assert_jwks_entry(key, key["alg"].as_str().expect("alg"));
    }
    let served = by_kid(keys);
    assert_eq!(
        served,
        by_kid(cli),
        "GET /v1/jwks and `keybound jwks` publish the same keys"
    );
    served
}

/// `{key, htm, htu}`: a `/v1/dpop` request.
pub fn dpop_request(key: &str, htm: &str, htu: &str) -> Value {
    serde_json::json!({ "key": key, "htm": htm, "htu": htu })
}

/// A proof from `kid` for `htm`/`htu` as the proof must carry them, without nonce or `ath`.
pub fn want_proof(kid: &str, htm: &str, htu: &str) -> WantProof {
    WantProof {
        kid: kid.to_owned(),
        htm: htm.to_owned(),
        htu: htu.to_owned(),
        nonce: None,
        access_token: None,
    }
}

/// Request `n` as a DPoP proof with `key` (`kid`): `htm`/`htu` from [`HTU_CASES`], with a
/// nonce and an access token to bind when asked.
pub fn proof_job(n: usize, key: &str, kid: &str, nonce: bool, access_token: bool) -> Job {
    let (htm, htu, want_htm, want_htu) = HTU_CASES[n % HTU_CASES.len()];
    let mut request = dpop_request(key, htm, htu);
    let mut want = want_proof(kid, want_htm, want_htu);
    if nonce {
        let nonce = format!("nonce-{n}");
        request["nonce"] = nonce.clone().into();
        want.nonce = Some(nonce);
    }
    if access_token {
        let token = format!("eyJ.access-token-{n}.sig");
        request["access_token"] = token.clone().into();
        want.access_token = Some(token);
    }
    Job::Proof(request, want)
}

/// Request `n` as a client assertion by `key` (`kid`) for `audience`, with `lifetime`
/// asked for or left to the default (60 s).
pub fn assertion_job(n: usize, key: &str, kid: &str, audience: &str, lifetime: Option<i64>) -> Job {
    let client_id = format!("0oa-agent-{n}");
    let mut request =
        serde_json::json!({ "key": key, "client_id": client_id, "audience": audience });
    if let Some(l) = lifetime {
        request["lifetime"] = l.into();
    }
    Job::Assertion {
        request,
        kid: kid.to_owned(),
        client_id,
        audience: audience.to_owned(),
        lifetime: lifetime.unwrap_or(60),
    }
}

/// A request a test client makes, and what the answer must be.
pub enum Job {
    Proof(Value, WantProof),
    Assertion {
        request: Value,
        kid: String,
        client_id: String,
        audience: String,
        lifetime: i64,
    },
}

impl Job {
    /// The key label the request names.
    pub fn key(&self) -> &str {
        match self {
            Job::Proof(request, _) | Job::Assertion { request, .. } => {
                request["key"].as_str().expect("key")
            }
        }
    }
}

/// `clients` keep-alive connections at once, each sending `per_client` requests: request
/// `n` is `job(n)`. Every request with its answer.
pub async fn run_jobs(
    socket: &Path,
    clients: usize,
    per_client: usize,
    job: impl Fn(usize) -> Job + Send + Sync + 'static,
) -> Vec<(Job, Reply)> {
    let job = Arc::new(job);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (socket, job) = (socket.to_path_buf(), Arc::clone(&job));
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&socket).await;
            let mut answers = Vec::new();
            for i in 0..per_client {
                let job = job(c * per_client + i);
                let reply = match &job {
                    Job::Proof(request, _) => conn.post("/v1/dpop", request).await,
                    Job::Assertion { request, .. } => conn.post("/v1/assertion", request).await,
                };
                answers.push((job, reply));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.expect("client task"));
    }
    answers
}

/// `reply` must be a 200 whose proof or assertion [`check_proof`] or [`check_assertion`]
/// accepts for `job`; returns it parsed.
pub fn check_job(
    jwks: &BTreeMap<String, Value>,
    job: &Job,
    reply: &Reply,
    window: (i64, i64),
) -> Jws {
    match job {
        Job::Proof(request, want) => {
            let proof = reply.ok_member(&format!("POST /v1/dpop {request}"), "proof");
            check_proof(jwks, &proof, want, window)
        }
        Job::Assertion {
            request,
            kid,
            client_id,
            audience,
            lifetime,
        } => {
            let assertion = reply.ok_member(&format!("POST /v1/assertion {request}"), "assertion");
            check_assertion(
                jwks, &assertion, kid, client_id, audience, *lifetime, window,
            )
        }
    }
}

/// RFC 7523 §3 checks on `compact`, verified with the JWKS entry of `kid`.
pub fn check_assertion(
    jwks: &BTreeMap<String, Value>,
    compact: &str,
    kid: &str,
    client_id: &str,
    audience: &str,
    lifetime: i64,
    window: (i64, i64),
) -> Jws {
    let jws = Jws::parse(compact);
    let jwk = jwks
        .get(kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS {jwks:?}"));
    assert_members(&jws.header, &["typ", "alg", "kid"]);
    assert_eq!(jws.header["typ"], "JWT");
    assert_eq!(jws.header["kid"], kid);
    assert_verifies(jwk, &jws);
    assert_members(&jws.claims, &["iss", "sub", "aud", "iat", "exp", "jti"]);
    assert_eq!(jws.claims["iss"], client_id);
    assert_eq!(jws.claims["sub"], client_id);
    assert_eq!(jws.claims["aud"], audience);
    assert_eq!(
        int_claim(&jws.claims, "exp") - int_claim(&jws.claims, "iat"),
        lifetime,
        "{}",
        jws.claims
    );
    check_iat_and_jti(&jws.claims, window);
    jws
}

fn check_iat_and_jti(claims: &Value, (from, to): (i64, i64)) {
    let iat = int_claim(claims, "iat");
    assert!(
        (from..=to).contains(&iat),
        "iat {iat} is outside the test's run [{from}, {to}]: {claims}"
    );
    let jti = claims["jti"].as_str().expect("jti is a string");
    assert!(
        jti.len() >= 16 && is_base64url(jti),
        "jti is a random base64url string: {jti:?}"
    );
}

/// `(now - 1, ...)`: the lower end of an `iat` window; close it with [`window_end`].
pub fn window_start() -> i64 {
    unix_now() - 1
}

pub fn window_end(start: i64) -> (i64, i64) {
    (start, unix_now() + 1)
}

/// The labels of the passing keys that may sign (outside a rotation, or the active
/// generation), from the CLI: so the agent's own counters (proofs of possession) stay the
/// test's.
pub fn signing_labels(token: &DevToken) -> Vec<String> {
    let list: Value =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).expect("keys list --json");
    list.as_array()
        .expect("keys list --json is an array")
        .iter()
        .filter(|k| k["policy"] != "fail" && (k["state"].is_null() || k["state"] == "active"))
        .filter_map(|k| k["label"].as_str().map(str::to_owned))
        .collect()
}

/// Every key the agent may sign with, by kid (to verify what it signs), after checking
/// that `/v1/jwks` equals `keybound jwks` and each entry's shape. The published JWKS
/// holds only the clients' assertion keys when `[[client]]`s are configured (never a
/// DPoP key), so the others come from `keybound jwks --label` for each passing key.
pub async fn published_jwks(token: &DevToken, agent: &Agent) -> BTreeMap<String, Value> {
    let mut all = served_jwks(agent, &token.jwks(&[])).await;
    let labels = signing_labels(token);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    if !labels.is_empty() {
        all.extend(by_kid(&token.jwks(&labels)));
    }
    all
}

/// One good request and its verification: the agent still signs correctly.
pub async fn assert_still_signs(conn: &mut Conn, jwks: &BTreeMap<String, Value>, kid: &str) {
    let start = window_start();
    let reply = conn
        .post(
            "/v1/dpop",
            &dpop_request("dpop", "GET", "https://a.example/ok"),
        )
        .await;
    let proof = reply.ok_member("a good request", "proof");
    check_proof(
        jwks,
        &proof,
        &want_proof(kid, "GET", "https://a.example/ok"),
        window_end(start),
    );
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// The value of the sample `name{labels}` (labels exactly these, in any order).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric_name, got) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric_name != name {
                return None;
            }
            let mut got: Vec<String> = if got.is_empty() {
                Vec::new()
            } else {
                got.split(',').map(str::to_owned).collect()
            };
            got.sort();
            (got == want).then(|| value.parse().expect("sample value is a number"))
        })
}

/// Every sample line of `name` (labels included), for messages.
pub fn samples(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        })
        .map(str::to_owned)
        .collect()
}
