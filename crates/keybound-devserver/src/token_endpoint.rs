//! `POST /oauth2/v1/token`: client credentials (RFC 6749 §4.4) for a client that
//! authenticates with `private_key_jwt` (RFC 7523 §2.2) and binds the token with DPoP
//! (RFC 9449 §5). Checks run in Okta's order: grant type, client assertion (its `jti`
//! consumed), DPoP proof, AS nonce, scope. A client retrying after a nonce challenge must
//! therefore send a fresh assertion too. Like Okta, the DPoP key must not be one of the
//! client's registered (client-authentication) keys.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::assertion::{self, ASSERTION_TYPE};
use super::dpop::{self, Expected};
use super::{App, Refusal};

/// An RFC 6749 §5.2 error response.
#[derive(Debug)]
struct TokenError {
    status: StatusCode,
    code: &'static str,
    description: String,
}

pub async fn token(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    match issue(&app, &headers, &body).await {
        Ok(body) => no_store(Json(body).into_response()),
        Err(e) => e.into_response(),
    }
}

async fn issue(app: &App, headers: &HeaderMap, body: &[u8]) -> Result<Value, TokenError> {
    let now = app.now();
    let form = form(headers, body)?;
    let param = |name: &str| form.get(name).map(String::as_str);

    if param("grant_type") != Some("client_credentials") {
        return Err(TokenError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server. Configured grant types: [client_credentials].",
        ));
    }

    if headers.contains_key(header::AUTHORIZATION) || form.contains_key("client_secret") {
        return Err(TokenError::invalid_client(
            "This client authenticates with private_key_jwt; client secrets and Basic authentication are not accepted.",
        ));
    }
    if param("client_assertion_type") != Some(ASSERTION_TYPE) {
        return Err(TokenError::invalid_client(format!(
            "The client_assertion_type must be {ASSERTION_TYPE}."
        )));
    }
    let assertion = param("client_assertion")
        .ok_or_else(|| TokenError::invalid_client("The client_assertion parameter is required."))?;
    if param("client_id").is_some_and(|id| id != app.client_id) {
        return Err(TokenError::invalid_client(
            "The client_id parameter is not the client this server knows.",
        ));
    }
    assertion::verify(app, assertion, now)
        .await
        .map_err(TokenError::invalid_client)?;

    let expected = Expected {
        method: "POST",
        url: &app.endpoints.token,
        binding: None,
    };
    let proof = dpop::verify(headers, &expected, &app.proof_jtis, now).map_err(|description| {
        TokenError::new(StatusCode::BAD_REQUEST, "invalid_dpop_proof", description)
    })?;
    // One key for both jobs would let whoever holds the DPoP key authenticate as the client.
    if app.client_keys.registered(&proof.jkt) {
        return Err(TokenError::new(
            StatusCode::BAD_REQUEST,
            "invalid_dpop_proof",
            "The DPoP proof JWT must not be signed with a key registered for client authentication; use a separate key for DPoP.",
        ));
    }
    if !app.as_nonce.accepts(proof.nonce.as_deref(), now) {
        return Err(TokenError::new(
            StatusCode::BAD_REQUEST,
            "use_dpop_nonce",
            "Authorization server requires nonce in DPoP proof.",
        ));
    }

    let scopes = requested_scopes(app, param("scope"))?;
    let token = app
        .issuer
        .mint(&app.client_id, &scopes, &proof.jkt, app.token_lifetime, now)
        .map_err(|e| {
            TokenError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?;
    Ok(json!({
        "token_type": "DPoP",
        "expires_in": app.token_lifetime,
        "access_token": token,
        "scope": scopes.join(" "),
    }))
}

/// The form body (RFC 6749 §3.2): form-encoded, each parameter at most once; empty values
/// count as absent (RFC 6749 §3.1).
fn form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, TokenError> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if !media_type.is_some_and(|m| m.eq_ignore_ascii_case("application/x-www-form-urlencoded")) {
        return Err(TokenError::invalid_request(
            "The request body must be application/x-www-form-urlencoded.",
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| TokenError::invalid_request("The request body is not valid form encoding."))?;
    let mut form = HashMap::new();
    for (name, value) in pairs.into_iter().filter(|(_, v)| !v.is_empty()) {
        if form.contains_key(&name) {
            return Err(TokenError::invalid_request(format!(
                "The '{name}' parameter was included more than once."
            )));
        }
        form.insert(name, value);
    }
    Ok(form)
}

/// The requested scopes, each once and in request order; all must be granted.
fn requested_scopes(app: &App, scope: Option<&str>) -> Result<Vec<String>, TokenError> {
    let invalid = |description: String| {
        TokenError::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    };
    let mut requested: Vec<String> = Vec::new();
    for s in scope
        .unwrap_or_default()
        .split(' ')
        .filter(|s| !s.is_empty())
    {
        if !requested.iter().any(|r| r == s) {
            requested.push(s.to_string());
        }
    }
    if requested.is_empty() {
        return Err(invalid(
            "The authorization server resource does not have any configured default scopes, 'scope' must be provided.".into(),
        ));
    }
    let refused: Vec<&str> = requested
        .iter()
        .filter(|s| !app.granted_scopes.contains(s))
        .map(String::as_str)
        .collect();
    if !refused.is_empty() {
        return Err(invalid(format!(
            "The following scopes are not allowed: {}",
            refused.join(", ")
        )));
    }
    Ok(requested)
}

/// RFC 6749 §5.1: token responses are not cached.
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

impl TokenError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> TokenError {
        TokenError {
            status,
            code,
            description: description.into(),
        }
    }

    fn invalid_client(description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }

    fn invalid_request(description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.code, "error_description": self.description });
        let mut response = no_store((self.status, Json(body)).into_response());
        response.extensions_mut().insert(Refusal {
            code: self.code,
            description: self.description,
        });
        response
    }
}
