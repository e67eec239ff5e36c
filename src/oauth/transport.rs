//! The seam between protocol code and the network (as in oauth2-rs): the OAuth engine
//! builds `http::Request`s and hands them to a [`Transport`]. The product's is the reqwest
//! adapter in `http`; tests may put an in-memory one in its place.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;

/// A boxed, sendable future: the trait stays object-safe without a macro crate.
pub type Sending<'a> =
    Pin<Box<dyn Future<Output = Result<Response<Vec<u8>>, TransportError>> + Send + 'a>>;

/// A response body read as it arrives (the gateway streams it to its caller).
pub type StreamBody = UnsyncBoxBody<Bytes, TransportError>;

/// [`Sending`] with the body not read yet: the future resolves at the response's head.
pub type StreamSending<'a> =
    Pin<Box<dyn Future<Output = Result<Response<StreamBody>, TransportError>> + Send + 'a>>;

/// Sends one request and returns the whole response. Never follows redirects: a 3xx is an
/// answer (a redirected token request would carry an assertion and a proof to a host
/// nobody configured).
pub trait Transport: Send + Sync {
    fn send(&self, request: Request<Vec<u8>>) -> Sending<'_>;

    /// Sends one request and returns at the response's head; the body is read as the
    /// caller polls it. By default the whole response is read first (an in-memory
    /// transport has it anyway).
    fn send_streaming(&self, request: Request<Vec<u8>>) -> StreamSending<'_> {
        Box::pin(async move {
            let response = self.send(request).await?;
            Ok(response.map(|body| {
                http_body_util::Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed_unsync()
            }))
        })
    }
}

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
