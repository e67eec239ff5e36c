//! The client's registered JWKS (`--jwks FILE` or `--jwks-uri URL`) and the choice of key
//! for a client assertion: by `kid`, or every key whose type fits the `alg`.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use url::Url;

use super::verify::{PublicJwk, SigAlg};
use super::{DevServerError, JwksSource};

/// Fewest seconds between two fetches triggered by an unknown `kid`.
const REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// The JWKS URI must answer within this time.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted, in bytes.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// One registered public key.
#[derive(Debug)]
pub struct RegisteredKey {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<SigAlg>,
    pub jwk: PublicJwk,
}

/// The registered keys and, for a URI, how to fetch them again.
#[derive(Debug)]
pub struct ClientKeys {
    keys: RwLock<Arc<Vec<Arc<RegisteredKey>>>>,
    remote: Option<Remote>,
}

#[derive(Debug)]
struct Remote {
    url: Url,
    http: reqwest::Client,
    /// When the last unknown-`kid` fetch started. An async lock on purpose: it is held
    /// across the fetch so that concurrent unknown kids cause one request, not many.
    last_refetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Why no key was found; the text is the `error_description` of a 401 invalid_client.
#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    #[error("No key in the registered JWKS matches kid '{0}'.")]
    UnknownKid(String),
    #[error("The key with kid '{kid}' in the registered JWKS cannot verify {alg} signatures.")]
    AlgMismatch { kid: String, alg: &'static str },
    #[error("No key in the registered JWKS can verify {0} signatures.")]
    NoFittingKey(&'static str),
}

impl RegisteredKey {
    /// Whether this key may verify `alg`: the key type fits and the JWK's `alg`, if any, agrees.
    pub fn accepts(&self, alg: SigAlg) -> bool {
        self.jwk.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

impl ClientKeys {
    /// Reads the file or fetches the URI; any unusable entry fails the start.
    pub async fn load(source: JwksSource) -> Result<ClientKeys, DevServerError> {
        let (keys, remote) = match source {
            JwksSource::File(path) => {
                let text = std::fs::read(&path).map_err(|e| DevServerError::JwksRead {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let keys = parse_jwks(&text).map_err(|reason| DevServerError::JwksInvalid {
                    origin: path.display().to_string(),
                    reason,
                })?;
                (keys, None)
            }
            JwksSource::Uri(url) => {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(DevServerError::JwksFetch {
                        url,
                        reason: "only http and https URLs can be fetched".into(),
                    });
                }
                // Redirects off: a JWKS URI that redirects is a misconfiguration, and
                // following it would let the document point the server anywhere (SSRF).
                let http = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|e| DevServerError::HttpClient(e.to_string()))?;
                let keys = fetch(&http, &url).await?;
                let remote = Remote {
                    url,
                    http,
                    last_refetch: tokio::sync::Mutex::new(None),
                };
                (keys, Some(remote))
            }
        };
        Ok(ClientKeys {
            keys: RwLock::new(Arc::new(keys)),
            remote,
        })
    }

    /// The keys to try for an assertion signed with `alg`: the one named by `kid` (fetching
    /// the JWKS URI again if it is unknown), or without a `kid` every key that fits.
    pub async fn candidates(
        &self,
        kid: Option<&str>,
        alg: SigAlg,
    ) -> Result<Vec<Arc<RegisteredKey>>, KeyLookupError> {
        let Some(kid) = kid else {
            let fitting: Vec<_> = self
                .snapshot()
                .iter()
                .filter(|k| k.accepts(alg))
                .cloned()
                .collect();
            if fitting.is_empty() {
                return Err(KeyLookupError::NoFittingKey(alg.name()));
            }
            return Ok(fitting);
        };
        let key = match self.by_kid(kid) {
            Some(key) => key,
            None if self.refetch().await => self
                .by_kid(kid)
                .ok_or_else(|| KeyLookupError::UnknownKid(kid.into()))?,
            None => return Err(KeyLookupError::UnknownKid(kid.into())),
        };
        if !key.accepts(alg) {
            return Err(KeyLookupError::AlgMismatch {
                kid: kid.into(),
                alg: alg.name(),
            });
        }
        Ok(vec![key])
    }

    /// Whether a registered key has this RFC 7638 thumbprint: such a key authenticates the
    /// client, and Okta refuses it as a DPoP key.
    pub fn registered(&self, thumbprint: &str) -> bool {
        self.snapshot()
            .iter()
            .any(|k| k.jwk.thumbprint() == thumbprint)
    }

    fn snapshot(&self) -> Arc<Vec<Arc<RegisteredKey>>> {
        // A poisoned lock still holds a complete Arc: writers only swap it.
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn by_kid(&self, kid: &str) -> Option<Arc<RegisteredKey>> {
        self.snapshot()
            .iter()
            .find(|k| k.kid.as_deref() == Some(kid))
            .cloned()
    }

    /// Fetches the JWKS URI again, at most once per [`REFETCH_INTERVAL`]; `true` if the keys
    /// were replaced. A failed fetch keeps the old keys.
    async fn refetch(&self) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let mut last = remote.last_refetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFETCH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        match fetch(&remote.http, &remote.url).await {
            Ok(keys) => {
                tracing::info!(url = %remote.url, keys = keys.len(), "client JWKS fetched again");
                *self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
                true
            }
            Err(e) => {
                tracing::warn!("{e}; keeping the keys fetched before");
                false
            }
        }
    }
}

async fn fetch(
    http: &reqwest::Client,
    url: &Url,
) -> Result<Vec<Arc<RegisteredKey>>, DevServerError> {
    let failed = |reason: String| DevServerError::JwksFetch {
        url: url.clone(),
        reason,
    };
    let response = http
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| failed(causes(&e.without_url())))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP status {}", response.status())));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| failed(causes(&e.without_url())))?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(failed(format!(
            "the document exceeds {MAX_JWKS_BYTES} bytes"
        )));
    }
    parse_jwks(&body).map_err(|reason| DevServerError::JwksInvalid {
        origin: url.to_string(),
        reason,
    })
}

/// An error and its sources on one line: reqwest's own message ("error sending request")
/// does not say why.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses `{"keys":[...]}` (RFC 7517 §5). Every entry must be a usable signing key: a JWKS
/// that silently loses a key only surfaces later as a confusing "no key matches kid".
fn parse_jwks(text: &[u8]) -> Result<Vec<Arc<RegisteredKey>>, String> {
    let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("it has no \"keys\" array")?;
    if entries.is_empty() {
        return Err("the \"keys\" array is empty".into());
    }
    let mut kids = HashSet::new();
    let mut keys = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let kid = match entry.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(format!("key #{i}: kid is not a string")),
        };
        let name = kid
            .as_deref()
            .map_or(format!("key #{i}"), |k| format!("key '{k}'"));
        if let Some(kid) = &kid
            && !kids.insert(kid.clone())
        {
            return Err(format!("{name} appears twice"));
        }
        let jwk = PublicJwk::parse(entry).map_err(|e| format!("{name}: {e}"))?;
        let alg =
            match entry.get("alg") {
                None => None,
                Some(Value::String(a)) => Some(SigAlg::from_name(a).ok_or_else(|| {
                    format!("{name}: alg '{a}' is not one of {}", SigAlg::names())
                })?),
                Some(_) => return Err(format!("{name}: alg is not a string")),
            };
        if let Some(alg) = alg
            && !jwk.fits(alg)
        {
            return Err(format!(
                "{name}: alg {} does not fit the key type",
                alg.name()
            ));
        }
        match entry.get("use") {
            None => {}
            Some(Value::String(u)) if u == "sig" => {}
            Some(other) => return Err(format!("{name}: use is {other}, not \"sig\"")),
        }
        keys.push(Arc::new(RegisteredKey { kid, alg, jwk }));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_jwk() -> Value {
        let v: Value =
            serde_json::from_str(include_str!("../../../tests/vectors/rfc-vectors.json")).unwrap();
        v["rfc9449_ec_thumbprint"]["jwk"].clone()
    }

    #[test]
    fn jwks_entries_are_checked() {
        let mut jwk = ec_jwk();
        jwk["kid"] = "k1".into();
        jwk["alg"] = "ES256".into();
        jwk["use"] = "sig".into();
        let ok = serde_json::json!({ "keys": [jwk.clone()] }).to_string();
        let keys = parse_jwks(ok.as_bytes()).unwrap();
        assert_eq!(keys[0].kid.as_deref(), Some("k1"));
        assert!(keys[0].accepts(SigAlg::Es256) && !keys[0].accepts(SigAlg::Es384));

        for (member, value, fragment) in [
            ("alg", Value::from("RS256"), "does not fit"),
            ("alg", Value::from("HS256"), "is not one of"),
            ("use", Value::from("enc"), "not \"sig\""),
            ("d", Value::from("AAAA"), "private key member 'd'"),
        ] {
            let mut bad = jwk.clone();
            bad[member] = value;
            let doc = serde_json::json!({ "keys": [bad] }).to_string();
            let err = parse_jwks(doc.as_bytes()).unwrap_err();
            assert!(err.contains(fragment), "{err}");
        }
        let twice = serde_json::json!({ "keys": [jwk.clone(), jwk] }).to_string();
        assert!(parse_jwks(twice.as_bytes()).unwrap_err().contains("twice"));
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
    }
}
