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
            let endpoint = meta["token_endpoint"]
                .as_str()
                .ok_or_else(|| metadata("has no token_endpoint".into()))?;
            return endpoint_url(endpoint)
                .map_err(|e| metadata(format!("names a token_endpoint keybound cannot use: {e}")));
        }
        Err(OAuthError::Discovery {
            issuer: issuer.to_string(),
            last,
        })
    }
}
