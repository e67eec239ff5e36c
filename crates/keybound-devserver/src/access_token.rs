//! The dev-server's access tokens: JWTs with Okta's claims, signed ES256 with a software key
//! made at start and published at `/oauth2/v1/keys`, bound to a DPoP key by `cnf.jkt`
//! (RFC 9449 §6.1).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::{Value, json};

use super::random_b64;
use super::verify::{Jws, PublicJwk};

/// The access-token issuer: its key, the key's `kid` and JWK, and the issuer URL.
pub struct Issuer {
    signing: SigningKey,
    verifying: VerifyingKey,
    kid: String,
    jwk: Value,
    issuer: String,
}

/// What the resource server needs from a verified access token.
#[derive(Debug)]
pub struct AccessClaims {
    pub scopes: Vec<String>,
    /// The DPoP key the token is bound to.
    pub jkt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the operating system's random number generator failed: {0}")]
    Random(#[from] rand_core::Error),
    #[error("signing the access token failed: {0}")]
    Sign(#[from] p256::ecdsa::Error),
    #[error("encoding the access token failed: {0}")]
    Json(#[from] serde_json::Error),
}

impl Issuer {
    /// A fresh P-256 key from the OS; `kid` is its RFC 7638 thumbprint.
    pub fn generate(issuer: &str) -> Result<Issuer, String> {
        let signing = SigningKey::random(&mut rand_core::OsRng);
        let verifying = *signing.verifying_key();
        let point = verifying.to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err("the access-token key has no affine coordinates".into());
        };
        let mut jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        });
        let kid = PublicJwk::parse(&jwk)
            .map_err(|e| format!("the access-token key: {e}"))?
            .thumbprint()
            .to_string();
        jwk["kid"] = Value::from(kid.as_str());
        jwk["alg"] = Value::from("ES256");
        jwk["use"] = Value::from("sig");
        Ok(Issuer {
            signing,
            verifying,
            kid,
            jwk,
            issuer: issuer.into(),
        })
    }

    /// The signing key as a JWKS (RFC 7517 §5).
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// A signed access token for `client_id` with `scopes`, bound to the DPoP key `jkt`.
    pub fn mint(
        &self,
        client_id: &str,
        scopes: &[String],
        jkt: &str,
        lifetime: i64,
        now: i64,
    ) -> Result<String, MintError> {
        let header = json!({ "typ": "JWT", "alg": "ES256", "kid": self.kid });
        let claims = json!({
            "ver": 1,
            "jti": format!("AT.{}", random_b64::<16>()?),
            "iss": self.issuer,
            "aud": self.issuer,
            "iat": now,
            "exp": now + lifetime,
            "cid": client_id,
            "sub": client_id,
            "scp": scopes,
            "scope": scopes.join(" "),
            "cnf": { "jkt": jkt },
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
        );
        let signature: Signature = self.signing.try_sign(input.as_bytes())?;
        Ok(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        ))
    }

    /// Verifies a token this issuer minted: key, signature, `iss`, `aud`, `exp`, `cnf.jkt`.
    /// The error is the description of an `invalid_token`.
    pub fn verify(&self, token: &str, now: i64) -> Result<AccessClaims, &'static str> {
        let jws = Jws::parse(token).ok_or("The access token is not a well-formed JWT.")?;
        if jws.header_str("alg") != Some("ES256") || jws.header_str("kid") != Some(&self.kid) {
            return Err("The access token was not issued by this server.");
        }
        let signed = Signature::from_slice(&jws.signature).is_ok_and(|sig| {
            self.verifying
                .verify(jws.signing_input.as_bytes(), &sig)
                .is_ok()
        });
        if !signed {
            return Err("The access token signature is invalid.");
        }
        if jws.claim_str("iss") != Some(&self.issuer) || jws.claim_str("aud") != Some(&self.issuer)
        {
            return Err("The access token was not issued for this server.");
        }
        if jws.claim_time("exp").is_none_or(|exp| exp <= now) {
            return Err("The access token is expired.");
        }
        let jkt = jws
            .claims
            .get("cnf")
            .and_then(|cnf| cnf.get("jkt"))
            .and_then(Value::as_str)
            .ok_or("The access token is not DPoP-bound (it has no cnf.jkt).")?;
        let scopes = jws
            .claims
            .get("scp")
            .and_then(Value::as_array)
            .map(|scp| {
                scp.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .ok_or("The access token has no scp claim.")?;
        Ok(AccessClaims {
            scopes,
            jkt: jkt.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_tampering_is_caught() {
        let issuer = Issuer::generate("http://127.0.0.1:1").unwrap();
        let scopes = vec!["okta.users.read".to_string()];
        let token = issuer.mint("c1", &scopes, "jkt1", 60, 1000).unwrap();
        let claims = issuer.verify(&token, 1000).unwrap();
        assert_eq!(claims.scopes, scopes);
        assert_eq!(claims.jkt, "jkt1");
        assert_eq!(
            issuer.verify(&token, 1060).unwrap_err(),
            "The access token is expired."
        );

        let other = Issuer::generate("http://127.0.0.1:1").unwrap();
        assert!(other.verify(&token, 1000).is_err());
        let (input, _) = token.rsplit_once('.').unwrap();
        let (_, forged) = other
            .mint("c1", &scopes, "jkt1", 60, 1000)
            .unwrap()
            .rsplit_once('.')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        assert_eq!(
            issuer
                .verify(&format!("{input}.{forged}"), 1000)
                .unwrap_err(),
            "The access token signature is invalid."
        );
    }

    #[test]
    fn jwks_kid_is_the_thumbprint() {
        let issuer = Issuer::generate("http://127.0.0.1:1").unwrap();
        let jwks = issuer.jwks();
        let jwk = &jwks["keys"][0];
        assert_eq!(
            jwk["kid"].as_str().unwrap(),
            PublicJwk::parse(jwk).unwrap().thumbprint()
        );
    }
}
