//! A minimal HTTP/1.1 client for the agent's socket: one keep-alive connection, JSON in and
//! out. Used by `keybound bench --agent`; handy for tests.

use std::path::Path;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

pub struct AgentConnection {
    sender: SendRequest<Full<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
#[error("agent request failed: {0}")]
pub struct AgentClientError(String);

impl AgentConnection {
    pub async fn connect(path: &Path) -> Result<AgentConnection, AgentClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| AgentClientError(format!("cannot connect to {}: {e}", path.display())))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AgentClientError(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("agent connection ended: {e}");
            }
        });
        Ok(AgentConnection { sender })
    }

    /// Sends a request; returns the status and the body.
    pub async fn request(
        &mut self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(http::StatusCode, Bytes), AgentClientError> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "keybound")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| AgentClientError(e.to_string()))?;
        self.sender
            .ready()
            .await
            .map_err(|e| AgentClientError(e.to_string()))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| AgentClientError(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| AgentClientError(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}
