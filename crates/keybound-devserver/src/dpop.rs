//! DPoP proof checks (RFC 9449 §4.3) shared by the token endpoint and the resource server.
//! The server nonce (§4.3 item 10) is the caller's: each server has its own and its own
//! challenge, so a verified proof hands its `nonce` back.

use axum::http::HeaderMap;
use serde_json::Value;

use super::replay::{ReplayCache, Use};
use super::verify::{self, JwkError, Jws, PublicJwk, SigAlg};

/// How far in the past a proof's `iat` may lie, in seconds.
const MAX_AGE: i64 = 300;
/// How far in the future a proof's `iat` may lie (clock skew), in seconds.
const MAX_SKEW: i64 = 60;
/// Longest `jti` remembered, in bytes.
const MAX_JTI_LEN: usize = 256;

/// What the proof must match.
pub struct Expected<'a> {
    /// The request method, compared to `htm` exactly.
    pub method: &'a str,
    /// The request URL, compared to `htu` after normalising both.
    pub url: &'a str,
    /// At the resource server: the access token the proof must carry in `ath`, and the key
    /// thumbprint it is bound to (`cnf.jkt`, RFC 9449 §6.1).
    pub binding: Option<Binding<'a>>,
}

pub struct Binding<'a> {
    pub access_token: &'a str,
    pub jkt: &'a str,
}

/// A proof that passed every check but the nonce.
#[derive(Debug)]
pub struct Proof {
    /// RFC 7638 thumbprint of the proof's `jwk`.
    pub jkt: String,
    pub nonce: Option<String>,
}

/// Checks the request's single `DPoP` header and records its `jti` (per key). The error is
/// the description of an `invalid_dpop_proof`.
pub fn verify(
    headers: &HeaderMap,
    expected: &Expected<'_>,
    replay: &ReplayCache,
    now: i64,
) -> Result<Proof, String> {
    let mut values = headers.get_all("dpop").iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err("The DPoP proof JWT header is missing.".into()),
        (Some(value), None) => value,
        (Some(_), Some(_)) => return Err("Exactly one DPoP header is allowed.".into()),
    };
    let jws = value
        .to_str()
        .ok()
        .and_then(Jws::parse)
        .ok_or("The DPoP proof is not a well-formed JWT (header.claims.signature).")?;

    if jws.header_str("typ") != Some("dpop+jwt") {
        return Err("The DPoP proof typ header must be 'dpop+jwt'.".into());
    }
    if jws.header.contains_key("crit") {
        return Err(
            "The DPoP proof has crit header parameters this server does not understand.".into(),
        );
    }
    let alg_name = jws.header_str("alg").unwrap_or_default();
    let alg = SigAlg::from_name(alg_name).ok_or_else(|| {
        format!(
            "The DPoP proof alg '{alg_name}' is not allowed; use one of {}.",
            SigAlg::names()
        )
    })?;
    let jwk = jws
        .header
        .get("jwk")
        .ok_or("The DPoP proof has no jwk header.")?;
    let jwk = PublicJwk::parse(jwk).map_err(|e| match e {
        JwkError::Private(member) => format!(
            "The DPoP proof jwk header must be a public key; it contains the private member '{member}'."
        ),
        other => format!("The DPoP proof jwk header is not a usable public key: {other}."),
    })?;
    if !jwk.fits(alg) {
        return Err(format!(
            "The DPoP proof jwk header does not fit alg {}.",
            alg.name()
        ));
    }
    if !jwk.verify(alg, jws.signing_input.as_bytes(), &jws.signature) {
        return Err("The DPoP proof signature is invalid.".into());
    }

    if jws.claim_str("htm") != Some(expected.method) {
        return Err(format!(
            "The DPoP proof htm claim must be the request method {}.",
            expected.method
        ));
    }
    let htu = jws.claim_str("htu").and_then(verify::normalize_htu);
    if htu.is_none() || htu != verify::normalize_htu(expected.url) {
        return Err(format!(
            "The DPoP proof htu claim must be the request URL {} (without query and fragment).",
            expected.url
        ));
    }
    let iat = jws
        .claim_time("iat")
        .ok_or("The DPoP proof must have an iat claim (a NumericDate).")?;
    if iat < now - MAX_AGE || iat > now + MAX_SKEW {
        return Err(format!(
            "The DPoP proof iat claim is outside the accepted window ({MAX_AGE} s in the past to {MAX_SKEW} s in the future)."
        ));
    }
    if let Some(binding) = &expected.binding {
        let ath = jws.claim_str("ath").ok_or(
            "The DPoP proof has no ath claim; it must carry the hash of the access token.",
        )?;
        if ath != verify::ath(binding.access_token) {
            return Err("The DPoP proof ath claim does not match the access token.".into());
        }
        if jwk.thumbprint() != binding.jkt {
            return Err("The DPoP proof key does not match the access token's cnf.jkt".into());
        }
    }
    let nonce = match jws.claims.get("nonce") {
        None => None,
        Some(Value::String(nonce)) => Some(nonce.clone()),
        Some(_) => return Err("The DPoP proof nonce claim is not a string.".into()),
    };
    let jti = jws
        .claim_str("jti")
        .filter(|j| !j.is_empty())
        .ok_or("The DPoP proof must have a jti claim.")?;
    if jti.len() > MAX_JTI_LEN {
        return Err(format!(
            "The DPoP proof jti claim is longer than {MAX_JTI_LEN} bytes."
        ));
    }
    // RFC 9449 §11.1: jti is unique per key. Remembered until iat leaves the window; a
    // thumbprint is base64url, so ':' cannot be part of it and the key is unambiguous.
    match replay.first_use(
        format!("{}:{jti}", jwk.thumbprint()),
        iat + MAX_AGE + 1,
        now,
    ) {
        Use::First => {}
        Use::Replayed => return Err("The DPoP proof jti claim has already been used.".into()),
        Use::Full => return Err("Too many DPoP proofs are live; try again later.".into()),
    }
    Ok(Proof {
        jkt: jwk.thumbprint().to_string(),
        nonce,
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use p256::ecdsa::signature::Signer as _;
    use serde_json::json;

    use super::*;

    const URL: &str = "https://server.example.com/token";
    const IAT: i64 = 1562262616;

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../../tests/vectors/rfc-vectors.json")).unwrap()
    }

    fn headers(proofs: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for p in proofs {
            h.append("dpop", HeaderValue::from_str(p).unwrap());
        }
        h
    }

    fn post<'a>() -> Expected<'a> {
        Expected {
            method: "POST",
            url: URL,
            binding: None,
        }
    }

    /// A proof signed with a fresh software key; `edit` adjusts header and claims.
    fn signed(edit: impl FnOnce(&mut Value, &mut Value)) -> String {
        let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let point = key.verifying_key().to_encoded_point(false);
        let mut header = json!({
            "typ": "dpop+jwt", "alg": "ES256",
            "jwk": {
                "kty": "EC", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
                "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
            },
        });
        let mut claims = json!({ "jti": "j1", "htm": "POST", "htu": URL, "iat": IAT });
        edit(&mut header, &mut claims);
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn check(proof: &str, expected: &Expected<'_>, now: i64) -> Result<Proof, String> {
        verify(&headers(&[proof]), expected, &ReplayCache::new(10), now)
    }

    #[test]
    fn rfc9449_example_proof_passes_once() {
        let v = vectors();
        let proof = v["rfc9449_example_proof"]["compact"].as_str().unwrap();
        let replay = ReplayCache::new(10);
        let ok = verify(&headers(&[proof]), &post(), &replay, IAT).unwrap();
        assert_eq!(ok.jkt, v["rfc9449_ec_thumbprint"]["thumbprint"]);
        assert_eq!(ok.nonce, None);
        let again = verify(&headers(&[proof]), &post(), &replay, IAT).unwrap_err();
        assert!(again.contains("jti claim has already been used"), "{again}");
    }

    #[test]
    fn rfc9449_example_proof_fails_each_request_check() {
        let v = vectors();
        let proof = v["rfc9449_example_proof"]["compact"].as_str().unwrap();
        let get = Expected {
            method: "GET",
            ..post()
        };
        assert!(check(proof, &get, IAT).unwrap_err().contains("htm"));
        let other = Expected {
            url: "https://server.example.com/other",
            ..post()
        };
        assert!(check(proof, &other, IAT).unwrap_err().contains("htu"));
        // htu is compared after normalisation.
        let loud = Expected {
            url: "HTTPS://Server.Example.COM:443/token?x=1",
            ..post()
        };
        assert!(check(proof, &loud, IAT).is_ok());
        assert!(
            check(proof, &post(), IAT + 301)
                .unwrap_err()
                .contains("iat")
        );
        assert!(check(proof, &post(), IAT - 61).unwrap_err().contains("iat"));
        assert!(check(proof, &post(), IAT + 300).is_ok());
        let bound = Expected {
            binding: Some(Binding {
                access_token: "t",
                jkt: "x",
            }),
            ..post()
        };
        assert!(check(proof, &bound, IAT).unwrap_err().contains("no ath"));
    }

    #[test]
    fn header_checks() {
        let proof = signed(|_, _| {});
        assert!(check(&proof, &post(), IAT).is_ok());
        let none = verify(&HeaderMap::new(), &post(), &ReplayCache::new(10), IAT);
        assert!(none.unwrap_err().contains("missing"));
        let two = verify(
            &headers(&[&proof, &proof]),
            &post(),
            &ReplayCache::new(10),
            IAT,
        );
        assert!(two.unwrap_err().contains("Exactly one"));

        for (edit, fragment) in [
            (json!({"typ": "JWT"}), "typ"),
            (json!({"alg": "HS256"}), "alg 'HS256' is not allowed"),
            (json!({"alg": "ES384"}), "does not fit alg ES384"),
            (json!({"crit": ["x"]}), "crit"),
            (json!({"jwk": null}), "no jwk"),
        ] {
            let proof = signed(|h, _| {
                for (k, v) in edit.as_object().unwrap() {
                    if v.is_null() {
                        h.as_object_mut().unwrap().remove(k);
                    } else {
                        h[k] = v.clone();
                    }
                }
            });
            let err = check(&proof, &post(), IAT).unwrap_err();
            assert!(err.contains(fragment), "{edit}: {err}");
        }
        let private = signed(|h, _| h["jwk"]["d"] = json!("AAAA"));
        let err = check(&private, &post(), IAT).unwrap_err();
        assert!(err.contains("private member 'd'"), "{err}");
        // Someone else's key in the header: the signature does not verify.
        let theirs = signed(|_, _| {});
        let mine = signed(|_, _| {});
        let (input, _) = theirs.rsplit_once('.').unwrap();
        let (_, sig) = mine.rsplit_once('.').unwrap();
        let err = check(&format!("{input}.{sig}"), &post(), IAT).unwrap_err();
        assert!(err.contains("signature is invalid"), "{err}");
    }

    #[test]
    fn claim_checks_and_binding() {
        let no_jti = signed(|_, c| c["jti"] = Value::Null);
        assert!(check(&no_jti, &post(), IAT).unwrap_err().contains("jti"));
        let nonce = signed(|_, c| c["nonce"] = json!("n1"));
        assert_eq!(
            check(&nonce, &post(), IAT).unwrap().nonce.as_deref(),
            Some("n1")
        );
        let bad_nonce = signed(|_, c| c["nonce"] = json!(1));
        assert!(
            check(&bad_nonce, &post(), IAT)
                .unwrap_err()
                .contains("nonce")
        );

        let token = "access-token";
        let with_ath = signed(|_, c| c["ath"] = json!(super::verify::ath(token)));
        let jkt = check(&with_ath, &post(), IAT).unwrap().jkt;
        let bound = |access_token, jkt| Expected {
            binding: Some(Binding { access_token, jkt }),
            ..post()
        };
        assert!(check(&with_ath, &bound(token, &jkt), IAT).is_ok());
        let err = check(&with_ath, &bound("other-token", &jkt), IAT).unwrap_err();
        assert!(err.contains("ath claim does not match"), "{err}");
        let err = check(&with_ath, &bound(token, "someone-else"), IAT).unwrap_err();
        assert_eq!(
            err,
            "The DPoP proof key does not match the access token's cnf.jkt"
        );
    }
}
