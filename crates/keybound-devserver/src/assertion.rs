//! `private_key_jwt` client authentication (RFC 7523 §3, OpenID Connect Core §9), checked
//! the way Okta checks it. Every refusal is a 401 `invalid_client` whose description names
//! the claim at fault.

use super::App;
use super::replay::Use;
use super::verify::{Jws, SigAlg};

/// RFC 7523 §2.2: the `client_assertion_type` of a JWT client assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Okta's limit on `exp - iat`.
const MAX_LIFETIME: i64 = 3600;
/// Clock skew allowed for `iat` and `nbf` in the future.
const MAX_SKEW: i64 = 60;
/// Longest `jti` remembered, in bytes.
const MAX_JTI_LEN: usize = 256;

/// Verifies the assertion and consumes its `jti`; the error is the `error_description`.
pub async fn verify(app: &App, assertion: &str, now: i64) -> Result<(), String> {
    let jws = Jws::parse(assertion)
        .ok_or("The client_assertion is not a well-formed JWT (header.claims.signature).")?;
    if jws.header.contains_key("crit") {
        return Err(
            "The client_assertion header has crit parameters this server does not understand."
                .into(),
        );
    }
    let alg_name = jws
        .header_str("alg")
        .ok_or("The client_assertion header has no alg.")?;
    let alg = SigAlg::from_name(alg_name).ok_or_else(|| {
        format!(
            "The client_assertion alg '{alg_name}' is not allowed; use one of {}.",
            SigAlg::names()
        )
    })?;
    let kid = match jws.header.get("kid") {
        None => None,
        Some(kid) => Some(
            kid.as_str()
                .ok_or("The client_assertion kid header is not a string.")?,
        ),
    };
    let candidates = app
        .client_keys
        .candidates(kid, alg)
        .await
        .map_err(|e| e.to_string())?;
    let signed = candidates.iter().any(|k| {
        k.jwk
            .verify(alg, jws.signing_input.as_bytes(), &jws.signature)
    });
    if !signed {
        return Err("The client_assertion signature is invalid.".into());
    }

    let client_id = app.client_id.as_str();
    if jws.claim_str("iss") != Some(client_id) || jws.claim_str("sub") != Some(client_id) {
        return Err(
            "The iss and sub claims of the client_assertion must both be the client_id.".into(),
        );
    }
    // RFC 7523 §3 item 3, compared as Okta does: one string, exactly the endpoint invoked.
    if jws.claim_str("aud") != Some(app.endpoints.token.as_str()) {
        return Err(
            "The audience claim for client_assertion must be the endpoint invoked for the request."
                .into(),
        );
    }
    let exp = jws
        .claim_time("exp")
        .ok_or("The client_assertion token must have an exp claim (a NumericDate).")?;
    if exp <= now {
        return Err("The client_assertion token is expired.".into());
    }
    let iat = jws
        .claim_time("iat")
        .ok_or("The client_assertion token must have an iat claim (a NumericDate).")?;
    if iat > now + MAX_SKEW {
        return Err("The client_assertion token has an iat in the future.".into());
    }
    if jws
        .claim_time("nbf")
        .is_some_and(|nbf| nbf > now + MAX_SKEW)
    {
        return Err("The client_assertion token is not valid yet (nbf is in the future).".into());
    }
    if exp - iat > MAX_LIFETIME {
        return Err(format!(
            "The client_assertion lifetime exceeds {MAX_LIFETIME} seconds."
        ));
    }
    let jti = jws
        .claim_str("jti")
        .filter(|j| !j.is_empty())
        .ok_or("The client_assertion token must have a jti claim.")?;
    if jti.len() > MAX_JTI_LEN {
        return Err(format!(
            "The client_assertion jti is longer than {MAX_JTI_LEN} bytes."
        ));
    }
    // Remembered until exp: after that the assertion is refused as expired anyway.
    match app.assertion_jtis.first_use(jti.to_string(), exp, now) {
        Use::First => Ok(()),
        Use::Replayed => Err("The client_assertion token has a jti that was already used.".into()),
        Use::Full => Err("Too many client assertions are live; try again later.".into()),
    }
}
