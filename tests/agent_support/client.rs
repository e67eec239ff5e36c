//! HTTP/1.1 over the agent's socket: [`Conn`] (hyper), [`raw_exchange`] (bytes as sent),
//! and the [`Reply`] both give back (status, headers, body).

use std::path::Path;

use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::support::*;

/// One answer, read in full.
#[derive(Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.status, self.headers, self.text())
    }
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("agent answered non-JSON ({e}): {self:?}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` as whole seconds (the only form the agent sends).
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("Retry-After is not delay-seconds: {v:?}"))
        })
    }

    /// 200 with a JSON body; returns it.
    pub fn ok(&self, what: &str) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{what}: {self:?}");
        assert_json_content_type(self, what);
        self.json()
    }

    /// The string member `name` of a 200 JSON answer.
    pub fn ok_member(&self, what: &str, name: &str) -> String {
        let body = self.ok(what);
        assert_members(&body, &[name]);
        body[name]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {name} is a string: {body}"))
            .to_owned()
    }

    /// The error contract: `status`, JSON with exactly `error` and `message`, `error` equal
    /// to `code`, a message naming every one of `mentions`. Returns the message.
    pub fn error(&self, status: u16, code: &str, mentions: &[&str]) -> String {
        assert_eq!(self.status.as_u16(), status, "{self:?}");
        assert_json_content_type(self, "an error answer");
        let body = self.json();
        assert_members(&body, &["error", "message"]);
        assert_eq!(body["error"], code, "{self:?}");
        let message = body["message"].as_str().expect("message is a string");
        assert!(!message.trim().is_empty(), "empty message: {self:?}");
        assert_mentions(message, mentions);
        message.to_owned()
    }
}

fn assert_json_content_type(reply: &Reply, what: &str) {
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{what}: {reply:?}"
    );
}

/// One keep-alive HTTP/1.1 connection to the agent.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(socket: &Path) -> Conn {
        Conn::try_open(socket)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()))
    }

    pub async fn try_open(socket: &Path) -> Result<Conn, String> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            // Ends when either side closes; errors then are the test's to see on `send`.
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Reply {
        self.send_bytes(Method::POST, path, body.to_string().into_bytes())
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send_bytes(Method::GET, path, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Any method, any bytes; transport errors returned, not panicked on.
    pub async fn send_bytes(
        &mut self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "keybound")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// `POST path` on a fresh connection.
pub async fn post(socket: &Path, path: &str, body: &Value) -> Reply {
    Conn::open(socket).await.post(path, body).await
}

/// `GET path` on a fresh connection.
pub async fn get(socket: &Path, path: &str) -> Reply {
    Conn::open(socket).await.get(path).await
}

/// Writes `request` (a whole HTTP/1.1 request, normally with `Connection: close`) and
/// reads until the agent closes the connection; the answer parsed by hand.
pub async fn raw_exchange(socket: &Path, request: &[u8]) -> Reply {
    let mut stream = UnixStream::connect(socket).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    read_reply(&mut stream).await
}

/// Reads one answer until EOF and parses it (`Content-Length` or close-delimited body).
pub async fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .await
        .expect("read the answer");
    parse_reply(&bytes)
}

pub fn parse_reply(bytes: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete HTTP answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let code: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').expect("header line");
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes()).expect("header name"),
            value.trim().parse().expect("header value"),
        );
    }
    let body = match headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        Some(n) => body.as_bytes()[..n].to_vec(),
        None => body.as_bytes().to_vec(),
    };
    Reply {
        status: StatusCode::from_u16(code).expect("status code"),
        headers,
        body: Bytes::from(body),
    }
}
