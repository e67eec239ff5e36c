//! The `bench --agent` load generator: keep-alive HTTP/1.1 connections to the agent's
//! socket, each sending one prepared `POST /v1/dpop` and reading the answer in place with
//! `httparse`, so that what is measured is the agent, not the client.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{BenchError, Phase};

/// `clients` keep-alive connections asking the agent for proofs until the deadline.
pub(super) async fn agent_phase(
    socket: &Path,
    key: &str,
    clients: usize,
    phase: Duration,
) -> Result<Phase, BenchError> {
    let body = serde_json::json!({
        "key": key, "htm": "POST", "htu": "https://bench.keybound.invalid/oauth2/v1/token",
    })
    .to_string();
    let request = format!(
        "POST /v1/dpop HTTP/1.1\r\nhost: keybound\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    requests_phase(socket, request.into_bytes().into(), clients, phase).await
}

/// `clients` keep-alive connections sending `GET path` (the gateway) until the deadline.
pub(super) async fn get_phase(
    socket: &Path,
    path: &str,
    clients: usize,
    phase: Duration,
) -> Result<Phase, BenchError> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: keybound\r\n\r\n");
    requests_phase(socket, request.into_bytes().into(), clients, phase).await
}

/// `clients` keep-alive connections each sending `request` in a loop until the deadline.
///
/// The load generator shares the cores with the agent and the device, so it is kept as
/// lean as `wrk`: one task per connection writing a prepared request and reading the
/// answer in place, no per-request allocation beyond the answer's buffer growth.
async fn requests_phase(
    socket: &Path,
    request: std::sync::Arc<[u8]>,
    clients: usize,
    phase: Duration,
) -> Result<Phase, BenchError> {
    let until = Instant::now() + phase;
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (socket, request) = (socket.to_path_buf(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = LeanConnection::connect(&socket).await?;
            let mut clock = super::CallerClock::new(until);
            while clock.going() {
                conn.exchange(&request).await?;
                clock.answered();
            }
            Ok::<_, BenchError>(clock.lat)
        }));
    }
    joined(tasks).await
}

/// The latencies of every caller task, as one phase.
pub(super) async fn joined(
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<u64>, BenchError>>>,
) -> Result<Phase, BenchError> {
    let mut all = Vec::new();
    for t in tasks {
        let lat = t
            .await
            .map_err(|e| BenchError::Agent(format!("a bench client failed: {e}")))??;
        all.extend(lat);
    }
    Ok((all.len() as u64, all))
}

/// One keep-alive HTTP/1.1 connection to the agent that expects `200` with a
/// `content-length` body.
struct LeanConnection {
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl LeanConnection {
    async fn connect(path: &Path) -> Result<LeanConnection, BenchError> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| BenchError::Agent(format!("cannot connect to {}: {e}", path.display())))?;
        Ok(LeanConnection {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<(), BenchError> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let io = |e: std::io::Error| BenchError::Agent(format!("agent connection failed: {e}"));
        self.stream.write_all(request).await.map_err(io)?;
        self.buf.clear();
        loop {
            if self.buf.len() == self.buf.capacity() {
                self.buf.reserve(4096);
            }
            if self.stream.read_buf(&mut self.buf).await.map_err(io)? == 0 {
                return Err(BenchError::Agent(
                    "the agent closed the connection mid-answer".into(),
                ));
            }
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            let head = match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(BenchError::Agent(format!("bad HTTP from the agent: {e}"))),
            };
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                .ok_or_else(|| {
                    BenchError::Agent("the agent's answer has no content-length".into())
                })?;
            if self.buf.len() < head + length {
                continue;
            }
            if response.code != Some(200) {
                return Err(BenchError::Agent(format!(
                    "the agent answered {}: {}",
                    response.code.unwrap_or(0),
                    String::from_utf8_lossy(&self.buf[head..head + length])
                )));
            }
            return Ok(());
        }
    }
}
