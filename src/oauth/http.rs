//! The one-file HTTP adapter: protocol code builds `http::Request`s, this sends them with
//! reqwest (rustls). Redirects are never followed: a token request that is redirected could
//! carry an assertion and proof to a host nobody configured (SSRF), so a 3xx is an answer.

use std::time::Duration;

use http::{Request, Response};

/// Bodies above this are refused: no server keybound talks to needs more.
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url} did not answer within {secs:.1} s")]
    Timeout { url: String, secs: f64 },
    #[error("HTTP exchange with {url} failed: {reason}")]
    Other { url: String, reason: String },
}

impl TransportError {
    /// Connect errors and timeouts are worth another attempt; a broken exchange is not
    /// necessarily idempotent, but token requests are, so the caller decides.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Timeout { .. }
        )
    }
}

#[derive(Clone, Debug)]
pub struct HttpClient {
    inner: reqwest::Client,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Result<HttpClient, TransportError> {
        let inner = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .user_agent(concat!("keybound/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TransportError::Other {
                url: String::new(),
                reason: e.to_string(),
            })?;
        Ok(HttpClient { inner, timeout })
    }

    pub async fn send(
        &self,
        request: Request<Vec<u8>>,
    ) -> Result<Response<Vec<u8>>, TransportError> {
        let url = request.uri().to_string();
        let request =
            reqwest::Request::try_from(request.map(reqwest::Body::from)).map_err(|e| {
                TransportError::Other {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            })?;
        let classify = |e: reqwest::Error| {
            if e.is_timeout() {
                TransportError::Timeout {
                    url: url.clone(),
                    secs: self.timeout.as_secs_f64(),
                }
            } else if e.is_connect() {
                TransportError::Connect {
                    url: url.clone(),
                    reason: root_cause(&e),
                }
            } else {
                TransportError::Other {
                    url: url.clone(),
                    reason: root_cause(&e),
                }
            }
        };
        let mut response = self.inner.execute(request).await.map_err(classify)?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(TransportError::Other {
                    url,
                    reason: format!("response body exceeds {MAX_BODY} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let mut out = Response::new(body);
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
