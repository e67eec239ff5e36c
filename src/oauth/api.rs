//! Calling a resource server with a DPoP-bound token (RFC 9449 §7): `Authorization: DPoP`,
//! a fresh proof with `ath`, the server's own nonce (one retry on `use_dpop_nonce`, as a
//! 401 or Okta's 400), the server's own clock (a resource server is its own origin with its
//! own `Date`: one retry when it refuses a proof and its `Date` is far off), and
//! `Link: rel="next"` pagination that never leaves the origin.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use url::Url;

use super::OAuthError;
use super::cache::AccessToken;
use super::client::OAuthClient;
use super::nonce::{Ask, Budget, NonceAnswer};
use super::response::{OktaError, challenges, excerpt, next_link};
use super::secret::Redacted as _;
use super::settings::origin;
use super::state::{ClockNote, Role, TOLERATED_SKEW_SECS};
use super::transport::{StreamBody, TransportError};
use secrecy::ExposeSecret as _;

pub struct ApiRequest {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Vec<u8>>,
}

pub struct ApiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// HTTP exchanges this call cost, the token fetch excluded.
    pub round_trips: u32,
    /// Server clock minus local clock, seconds, from this response's `Date`.
    pub clock_offset: Option<i64>,
}

/// An [`ApiResponse`] whose body is read as it arrives (the agent's gateway streams it).
pub struct StreamedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: StreamBody,
    /// HTTP exchanges this call cost, the token fetch excluded.
    pub round_trips: u32,
}

impl OAuthClient {
    /// Sends one request with the client's token and a fresh proof.
    pub async fn call(&self, request: &ApiRequest) -> Result<ApiResponse, OAuthError> {
        let transport = &*self.transport;
        let (response, round_trips, clock) =
            self.send_with_token(request, |r| transport.send(r)).await?;
        let (parts, body) = response.into_parts();
        Ok(ApiResponse {
            status: parts.status,
            headers: parts.headers,
            body,
            round_trips,
            clock_offset: clock.map(|c| c.offset),
        })
    }

    /// [`Self::call`], returning at the response's head: the body is streamed. The
    /// retries (nonce, clock, a fresh token on `invalid_token`) need only the status and
    /// headers; a challenge's small body is read first (so that its connection can serve
    /// the retry) and dropped when the request is retried.
    pub async fn call_streaming(
        &self,
        request: &ApiRequest,
    ) -> Result<StreamedResponse, OAuthError> {
        let transport = &*self.transport;
        let (response, round_trips, _) = self
            .send_with_token(request, |r| async move {
                let url = super::http::shown(r.uri());
                let response = transport.send_streaming(r).await?;
                read_challenge(response, url).await
            })
            .await?;
        let (parts, body) = response.into_parts();
        Ok(StreamedResponse {
            status: parts.status,
            headers: parts.headers,
            body,
            round_trips,
        })
    }

    /// The one policy of an API call, whatever reads the body: the origin check, the token,
    /// a fresh proof per exchange, the nonce and clock retries, one fresh token on
    /// `invalid_token`.
    async fn send_with_token<T, S, SFut>(
        &self,
        request: &ApiRequest,
        transmit: S,
    ) -> Result<(http::Response<T>, u32, Option<ClockNote>), OAuthError>
    where
        S: Fn(Request<Vec<u8>>) -> SFut,
        SFut: Future<Output = Result<http::Response<T>, TransportError>>,
    {
        let origin = origin(&request.url);
        if !self.config().api_origins.contains(&origin) {
            return Err(OAuthError::ForeignOrigin {
                client: self.config().name.clone(),
                origin,
                allowed: self.config().api_origins.join(", "),
            });
        }
        // One budget for the whole call: a fresh token does not buy more nonce or clock
        // retries.
        let mut budget = Budget::default();
        let mut token_retried = false;
        let mut round_trips = 0;
        loop {
            let token = self.token().await?;
            let NonceAnswer { response, clock } = self
                .peer(Role::ResourceServer, &origin)
                .send_via(
                    &mut budget,
                    &mut round_trips,
                    |nonce| self.api_request(request, &token, &origin, nonce),
                    &transmit,
                    |response| {
                        let errors = challenge_errors(response.headers());
                        if !matches!(response.status().as_u16(), 400 | 401)
                            || response.extensions().get::<LongChallenge>().is_some()
                        {
                            Ask::Nothing
                        } else if errors.iter().any(|e| e == "use_dpop_nonce") {
                            Ask::Nonce
                        } else if errors.iter().any(|e| e == "invalid_dpop_proof") {
                            // A proof has no lifetime of its own: only the server's
                            // tolerance counts.
                            Ask::Clock { lifetime: u64::MAX }
                        } else {
                            Ask::Nothing
                        }
                    },
                )
                .await?;
            let status = response.status();
            // Without the query, which may carry personal data (a search, a cursor).
            tracing::info!(method = %request.method, url = %format!("{origin}{}", request.url.path()),
                status = status.as_u16(), token = %token.secret.redacted(), "API answered");
            if status == StatusCode::UNAUTHORIZED
                && response.extensions().get::<LongChallenge>().is_none()
                && challenge_errors(response.headers())
                    .iter()
                    .any(|e| e == "invalid_token")
                && !token_retried
            {
                // Revoked or expired early: one fresh token, then report whatever comes.
                token_retried = true;
                self.invalidate().await;
                continue;
            }
            return Ok((response, round_trips, clock));
        }
    }

    /// The request with the client's token (`Authorization: DPoP`, RFC 9449 §7.1) and a
    /// fresh proof with `ath` and `nonce`.
    async fn api_request(
        &self,
        request: &ApiRequest,
        token: &AccessToken,
        origin: &str,
        nonce: Option<String>,
    ) -> Result<Request<Vec<u8>>, OAuthError> {
        let proof = self
            .token_proof(
                token,
                request.method.as_str(),
                request.url.as_str(),
                origin,
                nonce.as_deref(),
            )
            .await?;
        let scheme = if proof.is_some() { "DPoP" } else { "Bearer" };
        let mut builder = Request::builder()
            .method(request.method.clone())
            .uri(request.url.as_str());
        if !request
            .headers
            .iter()
            .any(|(k, _)| k == http::header::ACCEPT)
        {
            builder = builder.header(http::header::ACCEPT, "application/json");
        }
        for (k, v) in &request.headers {
            builder = builder.header(k, v);
        }
        builder = builder.header(
            http::header::AUTHORIZATION,
            format!("{scheme} {}", token.secret.expose_secret()),
        );
        if let Some(p) = proof {
            builder = builder.header("DPoP", p);
        }
        builder
            .body(request.body.clone().unwrap_or_default())
            .map_err(|e| OAuthError::Request {
                url: request.url.to_string(),
                reason: e.to_string(),
            })
    }

    /// Follows `rel="next"` links from a GET and gathers every page's JSON array.
    /// Returns the items and the last response (an error status stops the walk).
    pub async fn paginate(
        &self,
        first: ApiRequest,
    ) -> Result<(Vec<serde_json::Value>, ApiResponse), OAuthError> {
        self.paginate_within(first, usize::MAX, |_| Ok(())).await
    }

    /// [`OAuthClient::paginate`], stopping with `PagesTooLarge` once the pages' bodies add
    /// up to more than `max_bytes` (the agent answers another process with them all).
    /// Every page's URL, the first included, passes `allowed` before it is sent (the
    /// agent's caller rule: `htu_prefixes`).
    pub async fn paginate_within(
        &self,
        first: ApiRequest,
        max_bytes: usize,
        allowed: impl Fn(&Url) -> Result<(), OAuthError>,
    ) -> Result<(Vec<serde_json::Value>, ApiResponse), OAuthError> {
        let start = origin(&first.url);
        let first_url = first.url.to_string();
        let mut request = first;
        let mut items = Vec::new();
        let mut total: usize = 0;
        // Every page asked for: a server whose next link leads back to one (or to a page
        // after page, for ever) would never end the walk, and keybound would hold its
        // token and its items growing all the while.
        let mut seen = std::collections::HashSet::from([request.url.to_string()]);
        loop {
            allowed(&request.url)?;
            let response = self.call(&request).await?;
            if !response.status.is_success() {
                return Ok((items, response));
            }
            total = total.saturating_add(response.body.len());
            if total > max_bytes {
                return Err(OAuthError::PagesTooLarge {
                    url: first_url,
                    limit: max_bytes,
                });
            }
            let page: Vec<serde_json::Value> =
                serde_json::from_slice(&response.body).map_err(|e| OAuthError::Parse {
                    url: request.url.to_string(),
                    status: response.status.as_u16(),
                    reason: format!("--paginate needs a JSON array: {e}"),
                    body: excerpt(&response.body),
                })?;
            let empty = page.is_empty();
            items.extend(page);
            let Some(next) = next_link(&response.headers) else {
                return Ok((items, response));
            };
            let next = request.url.join(&next).map_err(|e| OAuthError::BadLink {
                link: next.clone(),
                reason: e.to_string(),
            })?;
            if origin(&next) != start {
                return Err(OAuthError::CrossOriginLink {
                    from: start,
                    to: origin(&next),
                });
            }
            if seen.contains(next.as_str()) {
                // An empty page that links to itself is the end of a listing that grows
                // (Okta's System Log polled with `since` and no `until`).
                if empty {
                    return Ok((items, response));
                }
                return Err(OAuthError::EndlessPages {
                    url: next.to_string(),
                    reason: "the next link leads to a page already fetched".into(),
                });
            }
            if seen.len() >= MAX_PAGES {
                return Err(OAuthError::EndlessPages {
                    url: next.to_string(),
                    reason: format!("more than {MAX_PAGES} pages"),
                });
            }
            seen.insert(next.to_string());
            request = ApiRequest {
                url: next,
                ..request
            };
        }
    }
}

/// Pages one `--paginate` follows at most (Okta's largest listings are a few hundred
/// pages of 200).
const MAX_PAGES: usize = 10_000;

/// Longest challenge body read before a retry; a longer one is not a challenge's.
const MAX_CHALLENGE_BODY: usize = 64 * 1024;

/// Marks a challenge whose body is longer than [`MAX_CHALLENGE_BODY`]: not a challenge to
/// answer, passed on as it is (a retry would drop a body nobody read).
#[derive(Clone, Copy, Debug)]
struct LongChallenge;

/// A 400 or 401 with a `WWW-Authenticate` challenge, its body read in full (it is small);
/// a longer one is passed on whole and marked [`LongChallenge`]; any other response as it
/// is, its body still unread.
async fn read_challenge(
    response: http::Response<StreamBody>,
    url: String,
) -> Result<http::Response<StreamBody>, TransportError> {
    use http_body_util::BodyExt as _;
    if !matches!(response.status().as_u16(), 400 | 401)
        || !response
            .headers()
            .contains_key(http::header::WWW_AUTHENTICATE)
    {
        return Ok(response);
    }
    let (mut parts, mut body) = response.into_parts();
    let mut read = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| TransportError::Other {
            url: url.clone(),
            reason: format!("reading the body of a {} challenge: {e}", parts.status),
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read.extend_from_slice(&data);
        if read.len() > MAX_CHALLENGE_BODY {
            parts.extensions.insert(LongChallenge);
            let body = Prefixed {
                head: Some(Bytes::from(read)),
                rest: body,
            };
            return Ok(http::Response::from_parts(parts, body.boxed_unsync()));
        }
    }
    let body = http_body_util::Full::new(Bytes::from(read))
        .map_err(|never| match never {})
        .boxed_unsync();
    Ok(http::Response::from_parts(parts, body))
}

/// The bytes already read of a body, then the rest of it.
struct Prefixed {
    head: Option<Bytes>,
    rest: StreamBody,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = TransportError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, TransportError>>> {
        if let Some(head) = self.head.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(head))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }
}

/// The `error` of every `WWW-Authenticate` challenge (RFC 6750 §3, RFC 9449 §7.1).
fn challenge_errors(headers: &HeaderMap) -> Vec<String> {
    challenges(headers)
        .into_iter()
        .filter_map(|c| c.error)
        .collect()
}

impl ApiResponse {
    /// One line for an error status: Okta's errorCode/errorSummary/errorCauses, else the
    /// `WWW-Authenticate` error, else the body.
    pub fn error_line(&self) -> String {
        let mut line = format!("HTTP {}", self.status);
        if let Ok(okta) = serde_json::from_slice::<OktaError>(&self.body) {
            line.push_str(&format!(": {} {}", okta.error_code, okta.error_summary));
            let causes: Vec<&str> = okta
                .error_causes
                .iter()
                .map(|c| c.error_summary.as_str())
                .collect();
            if !causes.is_empty() {
                line.push_str(&format!(" (causes: {})", causes.join("; ")));
            }
        }
        for c in challenges(&self.headers) {
            if let Some(e) = c.error {
                line.push_str(&format!("; WWW-Authenticate {} error={e}", c.scheme));
                if let Some(d) = c.error_description {
                    line.push_str(&format!(" ({d})"));
                }
                line.push_str(&super::hint_suffix(&e));
            }
        }
        if line == format!("HTTP {}", self.status) && !self.body.is_empty() {
            line.push_str(&format!(": {}", excerpt(&self.body)));
        }
        if let Some(off) = self.clock_offset
            && matches!(self.status.as_u16(), 400 | 401)
            && off.unsigned_abs() >= TOLERATED_SKEW_SECS
        {
            line.push_str(&format!(
                "; measured clock offset to this server: {off:+} s (server minus local); keybound states proof iat in its time"
            ));
        }
        line
    }
}
