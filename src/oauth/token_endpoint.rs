//! One token request: `client_credentials` with `private_key_jwt` (RFC 7523 §2.2) and a
//! DPoP proof (RFC 9449 §5), sent under the nonce policy (`nonce`), and the answer read:
//! RFC 6749 §5.1 success, §5.2 error, 5xx/429 for the retry loop (`retry`), redirects.

use http::{Method, Request, StatusCode};
use url::Url;

use super::cache::AccessToken;
use super::client::OAuthClient;
use super::nonce::{Ask, Budget, NonceAnswer};
use super::response::{ErrorBody, TokenResponse, excerpt, retry_after, token_response_problem};
use super::retry::AttemptFailure;
use super::server::AudienceRule;
use super::settings::origin;
use super::state::Role;
use super::{OAuthError, assertion, names_time_claim, unix_now};
use secrecy::ExposeSecret as _;

/// `client_assertion_type` for a JWT (RFC 7523 §2.2).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

impl OAuthClient {
    /// One token request, with the nonce and clock retries of `nonce`: at most three
    /// exchanges, each with a new assertion and proof.
    pub(super) async fn exchange(
        &self,
        endpoint: &Url,
        scopes: &[String],
        round_trips: &mut u32,
    ) -> Result<AccessToken, AttemptFailure> {
        let origin = origin(endpoint);
        let dpop = self.dpop_key.is_some();
        // The key that signed the proof of the last request sent: the token it obtains is
        // bound to that key, whatever the client's DPoP key is by the time it answers.
        let proven_by = std::sync::Mutex::new(None);
        let lifetime = self.config.assertion_lifetime;
        let NonceAnswer { response, clock } = self
            .peer(Role::AuthorizationServer, &origin)
            .send(
                &mut Budget::default(),
                round_trips,
                |nonce| {
                    let origin = origin.as_str();
                    let proven_by = &proven_by;
                    async move {
                        self.token_request(endpoint, origin, scopes, nonce.as_deref(), proven_by)
                            .await
                    }
                },
                |response| {
                    let status = response.status();
                    tracing::info!(client = %self.config.name, status = status.as_u16(), "token endpoint answered");
                    if status.is_success() {
                        return Ask::Nothing;
                    }
                    match serde_json::from_slice::<ErrorBody>(response.body()) {
                        Ok(e) if e.error == "use_dpop_nonce" && dpop => Ask::Nonce,
                        Ok(e) if refused_for_time(status, &e) => Ask::Clock { lifetime },
                        _ => Ask::Nothing,
                    }
                },
            )
            .await?;
        let (parts, body) = response.into_parts();
        let (status, headers, body) = (parts.status, parts.headers, body.as_slice());
        let observed = |token: Option<&str>| {
            self.observer
                .token_exchange(&super::observe::TokenExchange {
                    client: &self.config.name,
                    endpoint: endpoint.as_str(),
                    status: Some(status.as_u16()),
                    round_trips: *round_trips,
                    token,
                })
        };
        if status.is_success() {
            let parsed: TokenResponse =
                serde_json::from_slice(body).map_err(|e| OAuthError::TokenResponse {
                    url: endpoint.to_string(),
                    status: status.as_u16(),
                    reason: token_response_problem(body, &headers, &e),
                })?;
            let key = proven_by
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let accepted = self.accept(parsed, scopes, key);
            match &accepted {
                Ok(t) => observed(Some(t.secret.expose_secret())),
                Err(_) => observed(None),
            }
            return Ok(accepted?);
        }
        observed(None);
        let error: Option<ErrorBody> = serde_json::from_slice(body).ok();
        let failure = match (error, status) {
            (_, s) if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                OAuthError::Status {
                    url: endpoint.to_string(),
                    status: s.as_u16(),
                    body: excerpt(body),
                }
            }
            (Some(e), s) => OAuthError::Server {
                url: endpoint.to_string(),
                status: s.as_u16(),
                clock,
                error: e.error,
                description: e.error_description,
            },
            (None, s) if s.is_redirection() => OAuthError::Redirected {
                url: endpoint.to_string(),
                status: s.as_u16(),
                location: headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("(none)")
                    .to_string(),
            },
            (None, s) => OAuthError::Parse {
                url: endpoint.to_string(),
                status: s.as_u16(),
                reason: "not an RFC 6749 §5.2 error body".into(),
                body: excerpt(body),
            },
        };
        Err(AttemptFailure {
            error: failure,
            retry_after: retry_after(&headers),
        })
    }

    async fn token_request(
        &self,
        endpoint: &Url,
        origin: &str,
        scopes: &[String],
        nonce: Option<&str>,
        proven_by: &std::sync::Mutex<Option<crate::keyring::SigningKey>>,
    ) -> Result<Request<Vec<u8>>, OAuthError> {
        let now = unix_now();
        let iat = self.state.iat_for(origin, now);
        let audience = self.audience_for(endpoint);
        let claims = assertion::claims(
            &self.config.client_id,
            &audience,
            self.config.assertion_lifetime,
            self.config.server.max_assertion_lifetime(),
            iat,
            super::new_jti()?,
        )?;
        let client_assertion = self
            .sign_with(false, |k| assertion::header(k.alg(), k.kid()), &claims)
            .await?;
        let mut form = vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_assertion_type", JWT_BEARER.to_string()),
            ("client_assertion", client_assertion),
        ];
        if !scopes.is_empty() {
            form.push(("scope", scopes.join(" ")));
        }
        let bad_request = |reason: String| OAuthError::Request {
            url: endpoint.to_string(),
            reason,
        };
        let body = serde_urlencoded::to_string(&form).map_err(|e| bad_request(e.to_string()))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(endpoint.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some((proof, key)) = self
            .proof_with_key("POST", endpoint.as_str(), origin, nonce, None)
            .await?
        {
            request = request.header("DPoP", proof);
            *proven_by
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key);
        }
        request
            .body(body.into_bytes())
            .map_err(|e| bad_request(e.to_string()))
    }

    /// The `aud` of this client's assertions: configured, or by the server's rule.
    pub async fn assertion_audience(&self) -> Result<String, OAuthError> {
        let endpoint = self.endpoint().await?;
        Ok(self.audience_for(endpoint))
    }

    fn audience_for(&self, endpoint: &Url) -> String {
        match (&self.config.audience, self.config.server.audience_rule()) {
            (Some(a), _) => a.clone(),
            (None, AudienceRule::Issuer) => self
                .config
                .issuer
                .as_ref()
                .map_or_else(|| endpoint.to_string(), Url::to_string),
            (None, AudienceRule::TokenEndpoint) => endpoint.to_string(),
        }
    }
}

/// A refusal that a request made in the wrong time can cause: the client assertion
/// (`invalid_client`) or the proof (`invalid_dpop_proof`) refused, or a 400 naming a time
/// claim.
fn refused_for_time(status: StatusCode, e: &ErrorBody) -> bool {
    matches!(e.error.as_str(), "invalid_client" | "invalid_dpop_proof")
        || (status == StatusCode::BAD_REQUEST
            && names_time_claim(&e.error, e.error_description.as_deref()))
}
