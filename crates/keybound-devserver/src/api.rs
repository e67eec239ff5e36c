//! The resource server: an Okta-shaped users API for DPoP-bound access tokens (RFC 9449 §7).
//! Every request passes, in order: an Authorization header; the DPoP scheme, not Bearer; a
//! valid access token; a DPoP proof bound to it; the resource-server nonce; the scope.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rand_core::RngCore as _;
use serde_json::json;

use super::dpop::{self, Binding, Expected};
use super::users::ProfilePatch;
use super::verify::SigAlg;
use super::{App, Refusal, USERS_PATH, lock};

/// Largest and default page size of the users list.
const MAX_LIMIT: usize = 200;
const READ_SCOPE: &str = "okta.users.read";
const MANAGE_SCOPE: &str = "okta.users.manage";

/// An error as Okta's management API sends it, with the `WWW-Authenticate` challenge that
/// goes with it.
#[derive(Debug)]
pub struct OktaError {
    status: StatusCode,
    code: &'static str,
    summary: String,
    challenge: Option<String>,
    /// For the request log: the challenge's description, else the summary.
    reason: String,
    /// The OAuth error code when there is one (for the request log), else `code`.
    log_code: &'static str,
}

/// What a request needs the token's scopes to allow.
#[derive(Clone, Copy, Debug)]
enum Need {
    Read,
    Manage,
}

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route(USERS_PATH, get(list_users))
        .route("/api/v1/users/{id}", get(get_user).post(update_user))
}

/// `GET /api/v1/users?limit=&after=`: a page of users, with Okta's `Link` headers.
async fn list_users(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize(&app, &method, &uri, &headers, Need::Read) {
        return e.into_response();
    }
    let query: Vec<(String, String)> = match serde_urlencoded::from_str(uri.query().unwrap_or("")) {
        Ok(query) => query,
        Err(_) => return OktaError::validation("query").into_response(),
    };
    let param = |name: &str| {
        query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let limit = match param("limit").map(str::parse::<usize>) {
        None => MAX_LIMIT,
        Some(Ok(limit)) if (1..=MAX_LIMIT).contains(&limit) => limit,
        Some(_) => return OktaError::validation("limit").into_response(),
    };
    let after = param("after");
    let Ok((page, more)) = lock(&app.users).page(after, limit) else {
        return OktaError::validation("after").into_response();
    };

    let users_url = &app.endpoints.users;
    let link = |after: Option<&str>, rel: &str| {
        let query = match after {
            Some(id) => format!("after={}&limit={limit}", encode(id)),
            None => format!("limit={limit}"),
        };
        HeaderValue::from_str(&format!("<{users_url}?{query}>; rel=\"{rel}\""))
    };
    let next = page.last().filter(|_| more).map(|u| u.id.clone());
    let mut response = Json(page).into_response();
    // Two separate Link headers, as Okta sends them.
    if let Ok(value) = link(after, "self") {
        response.headers_mut().append(header::LINK, value);
    }
    if let Some(Ok(value)) = next.as_deref().map(|id| link(Some(id), "next")) {
        response.headers_mut().append(header::LINK, value);
    }
    response
}

/// `GET /api/v1/users/{id}`: one user, by id or login.
async fn get_user(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = authorize(&app, &method, &uri, &headers, Need::Read) {
        return e.into_response();
    }
    let user = lock(&app.users).get(&id);
    match user {
        Some(user) => Json(user).into_response(),
        None => OktaError::user_not_found(&id).into_response(),
    }
}

/// `POST /api/v1/users/{id}`: a partial profile update (firstName, lastName).
async fn update_user(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = authorize(&app, &method, &uri, &headers, Need::Manage) {
        return e.into_response();
    }
    let Some(patch) = ProfilePatch::parse(&body) else {
        return OktaError::new(
            StatusCode::BAD_REQUEST,
            "E0000003",
            "The request body was not well-formed.".into(),
        )
        .into_response();
    };
    if let Some(member) = patch.blank_member() {
        return OktaError::validation(member).into_response();
    }
    let user = lock(&app.users).update(&id, patch);
    match user {
        Some(user) => Json(user).into_response(),
        None => OktaError::user_not_found(&id).into_response(),
    }
}

/// The resource server's checks, in order (module doc). RFC 9449 §7.1 for the challenges.
fn authorize(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    need: Need,
) -> Result<(), OktaError> {
    let now = app.now();
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(OktaError::no_token());
    };
    let value = value.to_str().map_err(|_| OktaError::no_token())?;
    let (scheme, token) = value
        .split_once(' ')
        .map_or((value, ""), |(scheme, token)| (scheme, token.trim()));

    if scheme.eq_ignore_ascii_case("Bearer") {
        // All tokens of this server are DPoP-bound (RFC 9449 §7.2: not usable as Bearer).
        return Err(match app.issuer.verify(token, now) {
            Ok(_) => OktaError::invalid_token(
                "The access token is DPoP-bound; present it with the DPoP scheme and a proof",
            ),
            Err(description) => OktaError::invalid_token(description),
        });
    }
    if !scheme.eq_ignore_ascii_case("DPoP") || token.is_empty() {
        return Err(OktaError::no_token());
    }
    let claims = app
        .issuer
        .verify(token, now)
        .map_err(OktaError::invalid_token)?;

    let url = format!("{}{}", app.endpoints.issuer, uri.path());
    let expected = Expected {
        method: method.as_str(),
        url: &url,
        binding: Some(Binding {
            access_token: token,
            jkt: &claims.jkt,
        }),
    };
    let proof = dpop::verify(headers, &expected, &app.proof_jtis, now).map_err(|description| {
        OktaError::challenge(
            StatusCode::UNAUTHORIZED,
            "E0000011",
            "Invalid token provided",
            "invalid_dpop_proof",
            &description,
        )
    })?;
    if !app.rs_nonce.accepts(proof.nonce.as_deref(), now) {
        return Err(OktaError::challenge(
            app.rs_nonce_status,
            "E0000011",
            "Invalid token provided",
            "use_dpop_nonce",
            "Resource server requires nonce in DPoP proof",
        ));
    }

    let has = |scope: &str| claims.scopes.iter().any(|s| s == scope);
    let allowed = match need {
        Need::Read => has(READ_SCOPE) || has(MANAGE_SCOPE),
        Need::Manage => has(MANAGE_SCOPE),
    };
    if !allowed {
        return Err(OktaError::challenge(
            StatusCode::FORBIDDEN,
            "E0000006",
            "You do not have permission to perform the requested action",
            "insufficient_scope",
            "The access token provided does not contain the required scopes.",
        ));
    }
    Ok(())
}

impl OktaError {
    pub fn new(status: StatusCode, code: &'static str, summary: String) -> OktaError {
        OktaError {
            status,
            code,
            reason: summary.clone(),
            summary,
            challenge: None,
            log_code: code,
        }
    }

    /// An error with a `DPoP error="...", error_description="..."` challenge.
    fn challenge(
        status: StatusCode,
        code: &'static str,
        summary: &str,
        error: &'static str,
        description: &str,
    ) -> OktaError {
        OktaError {
            status,
            code,
            summary: summary.into(),
            challenge: Some(format!(
                "DPoP error=\"{error}\", error_description=\"{}\"",
                quoted_string_safe(description)
            )),
            reason: description.into(),
            log_code: error,
        }
    }

    /// No usable Authorization header: the bare challenge with the accepted algorithms.
    fn no_token() -> OktaError {
        OktaError {
            challenge: Some(format!("DPoP algs=\"{}\"", SigAlg::names())),
            ..OktaError::new(
                StatusCode::UNAUTHORIZED,
                "E0000011",
                "Invalid token provided".into(),
            )
        }
    }

    fn invalid_token(description: &str) -> OktaError {
        OktaError::challenge(
            StatusCode::UNAUTHORIZED,
            "E0000011",
            "Invalid token provided",
            "invalid_token",
            description,
        )
    }

    fn validation(member: &str) -> OktaError {
        OktaError::new(
            StatusCode::BAD_REQUEST,
            "E0000001",
            format!("Api validation failed: {member}"),
        )
    }

    fn user_not_found(id: &str) -> OktaError {
        OktaError::new(
            StatusCode::NOT_FOUND,
            "E0000007",
            format!("Not found: Resource not found: {id} (User)"),
        )
    }
}

impl IntoResponse for OktaError {
    fn into_response(self) -> Response {
        let body = json!({
            "errorCode": self.code,
            "errorSummary": self.summary,
            "errorLink": self.code,
            "errorId": error_id(),
            "errorCauses": [],
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(value) = self
            .challenge
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response.extensions_mut().insert(Refusal {
            code: self.log_code,
            description: self.reason,
        });
        response
    }
}

/// Okta's `errorId`: `oae` and 20 random alphanumerics.
fn error_id() -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = [0u8; 20];
    // An error id only correlates log lines; a zero id beats failing the response.
    if rand_core::OsRng.try_fill_bytes(&mut bytes).is_err() {
        bytes = [0; 20];
    }
    let tail: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    format!("oae{tail}")
}

/// Makes text safe inside an RFC 9110 §5.6.4 quoted-string: descriptions can echo client
/// input (an alg or kty name), which must not end the string or add parameters.
fn quoted_string_safe(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c == ' ' || c.is_ascii_graphic() => c,
            _ => '?',
        })
        .collect()
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_cannot_be_broken_by_client_text() {
        assert_eq!(
            quoted_string_safe("kty 'x\", error=\"y' \u{e9}\n"),
            "kty 'x', error='y' ??"
        );
        let e = OktaError::invalid_token("a \"quoted\" kty");
        assert_eq!(
            e.challenge.as_deref(),
            Some("DPoP error=\"invalid_token\", error_description=\"a 'quoted' kty\"")
        );
    }

    #[test]
    fn error_ids_look_like_okta() {
        let id = error_id();
        assert!(id.starts_with("oae") && id.len() == 23);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
