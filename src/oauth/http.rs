//! The product's [`Transport`]: a one-file reqwest (rustls) adapter. Redirects are never
//! followed: a token request that is redirected could carry an assertion and proof to a
//! host nobody configured (SSRF), so a 3xx is an answer.

use std::time::Duration;

use http::{Request, Response};

pub use super::transport::TransportError;
use super::transport::{Sending, StreamBody, StreamSending, Transport};
use http_body_util::BodyExt as _;

/// Bodies above this are refused: no server keybound talks to needs more.
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct HttpClient {
    /// Whole exchanges, bounded by `timeout` from sending to the body's last byte.
    inner: reqwest::Client,
    /// Streamed exchanges: no total timeout (a long answer streams as long as it flows);
    /// the caller bounds the head and the pauses between the body's bytes (the gateway:
    /// its route's `timeout_secs`).
    streaming: reqwest::Client,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Result<HttpClient, TransportError> {
        let builder = || {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(connect_timeout)
                .user_agent(concat!("keybound/", env!("CARGO_PKG_VERSION")))
        };
        let built = |b: reqwest::ClientBuilder| {
            b.build().map_err(|e| TransportError::Other {
                url: String::new(),
                reason: e.to_string(),
            })
        };
        Ok(HttpClient {
            inner: built(builder().timeout(timeout))?,
            streaming: built(builder())?,
            timeout,
        })
    }

    async fn exchange(
        &self,
        request: Request<Vec<u8>>,
    ) -> Result<Response<Vec<u8>>, TransportError> {
        let url = shown(request.uri());
        let classify = |e: reqwest::Error| self.classify(&url, e);
        let mut response = self.head(&self.inner, request).await?;
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

    /// The response's head; the body is read as it is polled, with no size limit (the
    /// gateway passes it on as it arrives).
    async fn stream(
        &self,
        request: Request<Vec<u8>>,
    ) -> Result<Response<StreamBody>, TransportError> {
        let url = shown(request.uri());
        let response =
            http::Response::<reqwest::Body>::from(self.head(&self.streaming, request).await?);
        let this = self.clone();
        Ok(response.map(move |body| body.map_err(move |e| this.classify(&url, e)).boxed_unsync()))
    }

    /// Sends `request` and waits for the response's head.
    async fn head(
        &self,
        client: &reqwest::Client,
        request: Request<Vec<u8>>,
    ) -> Result<reqwest::Response, TransportError> {
        let url = shown(request.uri());
        let request =
            reqwest::Request::try_from(request.map(reqwest::Body::from)).map_err(|e| {
                TransportError::Other {
                    url: url.clone(),
                    reason: e.to_string(),
                }
            })?;
        client
            .execute(request)
            .await
            .map_err(|e| self.classify(&url, e))
    }

    fn classify(&self, url: &str, e: reqwest::Error) -> TransportError {
        let url = url.to_owned();
        if e.is_timeout() {
            TransportError::Timeout {
                url,
                secs: self.timeout.as_secs_f64(),
            }
        } else if e.is_connect() {
            TransportError::Connect {
                url,
                reason: root_cause(&e.without_url()),
            }
        } else {
            TransportError::Other {
                url,
                reason: root_cause(&e.without_url()),
            }
        }
    }
}

impl Transport for HttpClient {
    fn send(&self, request: Request<Vec<u8>>) -> Sending<'_> {
        Box::pin(self.exchange(request))
    }

    fn send_streaming(&self, request: Request<Vec<u8>>) -> StreamSending<'_> {
        Box::pin(self.stream(request))
    }
}

/// The URL as errors show it: without the query, which may carry personal data (a
/// search, a cursor) and would reach logs, and through the gateway's breaker, other
/// callers of the route.
pub fn shown(uri: &http::Uri) -> String {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}{}", uri.path()),
        _ => uri.path().to_owned(),
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
