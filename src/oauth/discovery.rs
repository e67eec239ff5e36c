//! Where the token endpoint is: configured, or discovered once from the issuer's
//! metadata (RFC 8414 §3, then OpenID Connect Discovery 1.0 §4).

use http::Request;
use url::Url;

use super::OAuthError;
use super::client::OAuthClient;
use super::settings::{endpoint_url, origin};
use super::state::Role;

impl OAuthClient {
    /// The token endpoint: configured, or discovered from the issuer (RFC 8414 §3).
    pub async fn endpoint(&self) -> Result<&Url, OAuthError> {
        self.endpoint.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Url, OAuthError> {
        let Some(issuer) = &self.config.issuer else {
            return Err(OAuthError::NoEndpoint {
                client: self.config.name.clone(),
            });
        };
        let base = issuer.as_str().trim_end_matches('/');
        let mut last = String::new();
        for doc in ["oauth-authorization-server", "openid-configuration"] {
            let url = format!("{base}/.well-known/{doc}");
            let request = Request::get(&url)
                .body(Vec::new())
                .map_err(|e| OAuthError::Request {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
            let response = self.transport.send(request).await?;
            self.observe(
                &origin(issuer),
                Role::AuthorizationServer,
                response.headers(),
            );
            if !response.status().is_success() {
                last = format!("{url} answered {}", response.status());
                continue;
            }
            let metadata = |reason: String| OAuthError::Metadata {
                url: url.clone(),
                reason,
            };
            let meta: serde_json::Value = serde_json::from_slice(response.body())
                .map_err(|e| metadata(format!("is not JSON metadata: {e}")))?;
            // RFC 8414 §3.3, OpenID Connect Discovery §4.3: the metadata is the issuer's own
            // (one trailing `/` aside, as the URL above was made without it). Else it is a
            // mix-up, and the assertion signed for this issuer would go to another server.
            let named = meta["issuer"]
                .as_str()
                .ok_or_else(|| metadata("has no issuer (RFC 8414 §2)".into()))?;
            // Both as URLs (the configured one is one: host lower-cased, a default port
            // dropped), one trailing `/` aside.
            let same = Url::parse(named).is_ok_and(|n| n.as_str().trim_end_matches('/') == base);
            if !same {
                return Err(metadata(format!(
                    "names the issuer '{named}', not '{issuer}' whose metadata it should be \
                     (RFC 8414 §3.3); configure the issuer exactly as the server names itself"
                )));
            }
            let endpoint = meta["token_endpoint"]
                .as_str()
                .ok_or_else(|| metadata("has no token_endpoint".into()))?;
            let endpoint = endpoint_url(endpoint).map_err(|e| {
                metadata(format!("names a token_endpoint keybound cannot use: {e}"))
            })?;
            // Signed assertions and proofs go where the issuer is, unless the config says
            // otherwise.
            if origin(&endpoint) != origin(issuer) {
                return Err(metadata(format!(
                    "names a token_endpoint ({endpoint}) on another origin than the issuer's \
                     ({}); if the server really takes tokens there, set token_endpoint in \
                     the [[client]] section",
                    origin(issuer)
                )));
            }
            return Ok(endpoint);
        }
        Err(OAuthError::Discovery {
            issuer: issuer.to_string(),
            last,
        })
    }
}
