//! A scripted HTTP server on 127.0.0.1 for the OAuth client tests: each path answers from
//! its own list of [`Reply`]s (the last one repeats), and every request is recorded with
//! its arrival time and the reply it got. The same scripts also answer in memory
//! ([`FakeServer::in_memory`], [`FakeServer::transport`]): keybound's `Transport` trait
//! without a socket, for a client built in the test's own process.
//!
//! Nothing here knows OAuth: the tests script protocol answers and judge what arrived.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, Method, StatusCode};
use keybound::oauth::transport::{Sending, Transport, TransportError};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// One scripted HTTP response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// `status` with an empty body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).expect("valid status code"),
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// `status` with `body` as `application/json`.
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply {
            body: body.to_string(),
            ..Reply::status(status)
        }
        .header("Content-Type", "application/json")
    }

    /// `status` with a `text/plain` body.
    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            body: body.to_owned(),
            ..Reply::status(status)
        }
        .header("Content-Type", "text/plain")
    }

    /// Adds a header (repeatable: several `Link` or `WWW-Authenticate` lines).
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The first header named `name` (case-insensitive).
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn into_response(self) -> Response {
        let mut builder = Response::builder().status(self.status);
        for (name, value) in &self.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Body::from(self.body))
            .expect("scripted reply is a valid response")
    }
}

// ---------------------------------------------------------------------------
// Recorded requests
// ---------------------------------------------------------------------------

/// A request as it arrived, and what the server answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// Taken before the body is read: the moment the request reached the handler.
    pub at: Instant,
    /// The reply sent, with the `Date` the server added when its clock is skewed.
    pub reply: Reply,
}

impl Recorded {
    /// The one header named `name`; panics when it is repeated, `None` when absent.
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        assert!(
            values.next().is_none(),
            "{} {}: header {name} is repeated",
            self.method,
            self.path
        );
        Some(first.to_str().expect("header value is visible ASCII"))
    }

    pub fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("request body is UTF-8")
    }

    /// The body as `application/x-www-form-urlencoded`; panics on a repeated field.
    pub fn form(&self) -> BTreeMap<String, String> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&self.body).expect("body is a urlencoded form");
        let mut form = BTreeMap::new();
        for (name, value) in pairs {
            assert!(
                form.insert(name.clone(), value).is_none(),
                "form field {name} is repeated: {}",
                self.body_text()
            );
        }
        form
    }

    /// `path?query` as the client sent it.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// The scripted server; it stops when dropped.
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The socket's serving task; `None` in memory.
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    /// Replies still to give, per path. A std `Mutex` because the handler never holds it
    /// across an `.await`.
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    log: Mutex<Vec<Recorded>>,
    /// Seconds added to the real time in a `Date` header on every reply; 0 leaves `Date`
    /// to hyper (the real time).
    clock_offset: AtomicI64,
}

impl FakeServer {
    /// Binds 127.0.0.1 on a free port and serves from a task of the current runtime.
    pub async fn start() -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .fallback(answer)
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake server runs");
        });
        FakeServer {
            addr,
            shared,
            task: Some(task),
        }
    }

    /// The same server without a socket: reached only through [`FakeServer::transport`].
    /// Its URLs name 127.0.0.1 port 1, where nothing listens, so a request that went to
    /// the network instead would fail to connect.
    pub fn in_memory() -> FakeServer {
        FakeServer {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            shared: Arc::new(Shared::default()),
            task: None,
        }
    }

    /// An in-memory `Transport` to this server: requests to its address are answered from
    /// the scripts and recorded like those that arrive on the socket; any other address
    /// is a connection error.
    pub fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(InMemory {
            authority: self.addr.to_string(),
            shared: Arc::clone(&self.shared),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` followed by `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    /// Replaces the replies of `path` (query ignored). They are given in order; the last
    /// one repeats. An unscripted path answers 404.
    pub fn script(&self, path: &str, replies: impl IntoIterator<Item = Reply>) {
        let replies: VecDeque<Reply> = replies.into_iter().collect();
        assert!(!replies.is_empty(), "script at least one reply for {path}");
        lock(&self.shared.scripts).insert(path.to_owned(), replies);
    }

    /// Every reply from now on carries `Date` = real time + `secs`.
    pub fn set_clock_offset(&self, secs: i64) {
        self.shared.clock_offset.store(secs, Ordering::SeqCst);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.log).clone()
    }

    /// The requests to `path`, in arrival order.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Forgets scripts, log and clock offset, for the next scenario of a test.
    pub fn reset(&self) {
        lock(&self.shared.scripts).clear();
        lock(&self.shared.log).clear();
        self.set_clock_offset(0);
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The transport of [`FakeServer::transport`].
struct InMemory {
    authority: String,
    shared: Arc<Shared>,
}

impl Transport for InMemory {
    fn send(&self, request: http::Request<Vec<u8>>) -> Sending<'_> {
        let at = Instant::now();
        let url = request.uri().to_string();
        if request.uri().authority().map(|a| a.as_str()) != Some(self.authority.as_str()) {
            return Box::pin(async move {
                Err(TransportError::Connect {
                    url,
                    reason: "not the in-memory server".into(),
                })
            });
        }
        let (parts, body) = request.into_parts();
        let reply = self
            .shared
            .answer(parts.method, &parts.uri, parts.headers, body, at);
        let mut response = http::Response::new(reply.body.into_bytes());
        *response.status_mut() = reply.status;
        for (name, value) in &reply.headers {
            response.headers_mut().append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("scripted header name"),
                http::HeaderValue::from_str(value).expect("scripted header value"),
            );
        }
        if !response.headers().contains_key(http::header::DATE) {
            // What hyper adds on the socket.
            let now = httpdate::fmt_http_date(SystemTime::now());
            response.headers_mut().insert(
                http::header::DATE,
                http::HeaderValue::from_str(&now).expect("an HTTP date"),
            );
        }
        Box::pin(async move { Ok(response) })
    }
}

impl Shared {
    fn next_reply(&self, path: &str) -> Reply {
        let mut scripts = lock(&self.scripts);
        let Some(queue) = scripts.get_mut(path) else {
            return Reply::text(404, &format!("fake server: no script for {path}"));
        };
        if queue.len() > 1 {
            queue.pop_front().expect("queue is not empty")
        } else {
            queue.front().expect("scripts are never empty").clone()
        }
    }

    /// `Date` for the skewed clock, or `None` to let hyper send the real time.
    fn date(&self) -> Option<String> {
        let offset = self.clock_offset.load(Ordering::SeqCst);
        let shift = Duration::from_secs(offset.unsigned_abs());
        let now = SystemTime::now();
        match offset {
            0 => None,
            o if o < 0 => Some(httpdate::fmt_http_date(now - shift)),
            _ => Some(httpdate::fmt_http_date(now + shift)),
        }
    }
}

impl Shared {
    /// The next reply for a request, recorded with it.
    fn answer(
        &self,
        method: Method,
        uri: &http::Uri,
        headers: HeaderMap,
        body: Vec<u8>,
        at: Instant,
    ) -> Reply {
        let path = uri.path().to_owned();
        let mut reply = self.next_reply(&path);
        if let Some(date) = self.date() {
            reply = reply.header("Date", &date);
        }
        lock(&self.log).push(Recorded {
            method,
            path,
            query: uri.query().map(str::to_owned),
            headers,
            body,
            at,
            reply: reply.clone(),
        });
        reply
    }
}

async fn answer(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("read the request body");
    shared
        .answer(parts.method, &parts.uri, parts.headers, body.to_vec(), at)
        .into_response()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the log from the assertions that follow.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
