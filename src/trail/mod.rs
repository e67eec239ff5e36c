//! The audit trail (`[audit]`): one JSON line per event (a signature, a token fetch, a
//! gateway request), each line carrying `seq` and `prev`, the SHA-256 of the line before it,
//! and every `checkpoint_every` lines or `checkpoint_secs` seconds a checkpoint line: the
//! chain head signed on the device by the `checkpoint_key`. Rewriting history then needs
//! the device, not only root on the host (`verify`, `keybound audit verify`).
//!
//! Events go through a bounded queue to one writer thread; the device's signing threads
//! only queue, and nothing ever waits for the queue (async tasks record events too). The
//! keyring's gate ([`Trail::gate`]) reserves a signature's place in the queue before the
//! device signs, and the observer queues the signature's line in that place: with
//! `on_failure = "refuse"` a signature without a place (a full queue) is refused before
//! the device signs, so every signature made has its line. When the trail cannot be
//! written (disk full, file gone, queue full), the trail is failing: with `"refuse"` the
//! gate refuses every signature; with `"continue"` signing goes on and the failure is
//! logged loudly. Either way `/healthz`, the metrics and the log say so. When writing
//! works again, a `gap` line records how many events were lost and why.

mod line;
pub mod verify;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::InvalidSetting;
use crate::keyring::{GatePass, Purpose, SignEvent, SignGate, SigningKey};

pub use line::{GENESIS, line_hash};

/// `[audit]` in the config (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// The trail file; appended to, created when missing (its directory must exist).
    pub path: PathBuf,
    /// The key on the device that signs checkpoints: a label or rotated slot, approved by
    /// the policy like any key, and no client's assertion or DPoP key.
    #[serde(default = "defaults::checkpoint_key")]
    pub checkpoint_key: String,
    /// A checkpoint after this many lines.
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: u64,
    /// A checkpoint at least this often while lines are written.
    #[serde(default = "defaults::checkpoint_secs")]
    pub checkpoint_secs: u64,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Events queued for the writer at most.
    #[serde(default = "defaults::queue")]
    pub queue: usize,
    /// Accepted from older configs and not used: nothing waits for the queue any more
    /// (a signature reserves its place before the device signs, see [`Trail::gate`]).
    #[serde(default = "defaults::queue_wait_ms")]
    pub queue_wait_ms: u64,
    /// Rotates the file after this many bytes: it is renamed `<path>.<last seq>` after a
    /// final checkpoint, and the new file's first line chains to its last.
    pub rotate_bytes: Option<u64>,
}

mod defaults {
    pub fn checkpoint_key() -> String {
        "audit".into()
    }
    pub fn checkpoint_every() -> u64 {
        1000
    }
    pub fn checkpoint_secs() -> u64 {
        60
    }
    pub fn queue() -> usize {
        8192
    }
    pub fn queue_wait_ms() -> u64 {
        200
    }
}

/// What the agent does when the trail cannot be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Refuse every signature until the trail is written again (Vault's rule).
    #[default]
    Refuse,
    /// Sign without a trail, and say so loudly (log, `/healthz`, metrics).
    Continue,
}

impl AuditSettings {
    /// Ranges, and a checkpoint key that is none of the clients' keys (`client_keys`:
    /// client, role, key name).
    pub fn validate(&self, client_keys: &[(&str, &str, &str)]) -> Result<(), InvalidSetting> {
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(InvalidSetting::new(
                    format!("audit.{key}"),
                    format!("{v} is out of range {lo} to {hi}"),
                ))
            }
        };
        if !self.path.is_absolute() {
            return Err(InvalidSetting::new(
                "audit.path",
                format!("'{}' must be an absolute path", self.path.display()),
            ));
        }
        range("checkpoint_every", self.checkpoint_every, 1, 10_000_000)?;
        range("checkpoint_secs", self.checkpoint_secs, 1, 86_400)?;
        range(
            "queue",
            u64::try_from(self.queue).unwrap_or(u64::MAX),
            16,
            1_000_000,
        )?;
        range("queue_wait_ms", self.queue_wait_ms, 0, 10_000)?;
        if let Some(bytes) = self.rotate_bytes {
            range("rotate_bytes", bytes, 4096, u64::MAX)?;
        }
        if self.checkpoint_key.is_empty() {
            return Err(InvalidSetting::new(
                "audit.checkpoint_key",
                "empty; name the key that signs checkpoints (e.g. \"audit\")",
            ));
        }
        if let Some((client, role, _)) = client_keys
            .iter()
            .find(|(_, _, key)| *key == self.checkpoint_key)
        {
            return Err(InvalidSetting::new(
                "audit.checkpoint_key",
                format!(
                    "'{}' is the {role} of client '{client}'; the checkpoint key must sign \
                     checkpoints only (generate one: `keybound keys generate --label audit`)",
                    self.checkpoint_key
                ),
            ));
        }
        Ok(())
    }
}

/// One event of the trail. The writer adds `seq`, `prev`, `time` and `event`.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Event {
    Signature(Box<Signature>),
    TokenFetch(TokenFetch),
    Gateway(GatewayRequest),
}

impl Event {
    /// The event's members as a JSON object. A signature, the hot path, is written by hand
    /// (the same bytes as serde's, `tests::hand_written_signature_json_is_serdes`).
    fn to_json(&self) -> Vec<u8> {
        match self {
            Event::Signature(s) => s.to_json(),
            // Plain structs of strings and numbers always serialise.
            other => serde_json::to_vec(other).unwrap_or_default(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Event::Signature(_) => "signature",
            Event::TokenFetch(_) => "token_fetch",
            Event::Gateway(_) => "gateway",
        }
    }
}

/// A signature the device made or failed to make (built from the keyring's [`SignEvent`]).
#[derive(Clone, Debug, Serialize)]
pub struct Signature {
    /// `{"uid", "pid", "exe"}` of the connection that asked, or `"agent"`.
    pub caller: Caller,
    pub key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    pub kid: String,
    pub alg: &'static str,
    /// `dpop`, `assertion`, `jws` or `possession`.
    pub purpose: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub htu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    pub outcome: &'static str,
}

/// A JSON string, escaped by serde only when it has to be.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

impl Signature {
    fn to_json(&self) -> Vec<u8> {
        use std::io::Write as _;
        let mut out = Vec::with_capacity(320);
        out.extend_from_slice(b"{\"caller\":");
        match &self.caller {
            Caller::Peer(o) => {
                let _ = write!(out, "{{\"uid\":{},\"pid\":", o.uid);
                match o.pid {
                    Some(pid) => {
                        let _ = write!(out, "{pid}");
                    }
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"exe\":");
                match &o.exe {
                    Some(exe) => json_str(&mut out, exe),
                    None => out.extend_from_slice(b"null"),
                }
                out.push(b'}');
            }
            Caller::Agent(a) => json_str(&mut out, a),
        }
        let member = |out: &mut Vec<u8>, name: &str, value: Option<&str>| {
            if let Some(v) = value {
                let _ = write!(out, ",\"{name}\":");
                json_str(out, v);
            }
        };
        member(&mut out, "key", Some(&self.key));
        member(&mut out, "slot", self.slot.as_deref());
        member(&mut out, "kid", Some(&self.kid));
        member(&mut out, "alg", Some(self.alg));
        member(&mut out, "purpose", Some(self.purpose));
        if let Some(aud) = &self.aud {
            out.extend_from_slice(b",\"aud\":");
            let _ = serde_json::to_writer(&mut out, aud);
        }
        member(&mut out, "htm", self.htm.as_deref());
        member(&mut out, "htu", self.htu.as_deref());
        member(&mut out, "jti", self.jti.as_deref());
        if let Some(iat) = self.iat {
            let _ = write!(out, ",\"iat\":{iat}");
        }
        member(&mut out, "outcome", Some(self.outcome));
        out.push(b'}');
        out
    }

    /// The trail's view of one signature: the claims' audit fields, never the claims.
    pub fn of(e: &SignEvent<'_>) -> Signature {
        let claims = match e.purpose {
            Purpose::Jws => e.claims(),
            Purpose::Possession => Default::default(),
        };
        let purpose = match e.purpose {
            Purpose::Possession => "possession",
            Purpose::Jws if claims.htm.is_some() => "dpop",
            Purpose::Jws if claims.aud.is_some() => "assertion",
            Purpose::Jws => "jws",
        };
        let caller = match e.origin {
            Some(o) => Caller::Peer(o.clone()),
            None => Caller::Agent("agent"),
        };
        Signature {
            caller,
            key: e.label.to_owned(),
            slot: e.slot.map(str::to_owned),
            kid: e.kid.to_owned(),
            alg: e.alg.name(),
            purpose,
            aud: claims.aud,
            htm: claims.htm,
            htu: claims.htu,
            jti: claims.jti,
            iat: claims.iat,
            outcome: if e.ok { "ok" } else { "error" },
        }
    }
}

/// Who asked for a signature.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Caller {
    /// The connection's peer credentials and executable.
    Peer(crate::keyring::Origin),
    /// The agent itself (`"agent"`): a token fetch, a background refresh, an approval.
    Agent(&'static str),
}

/// A token request to an authorization server (its nonce and clock retries included).
#[derive(Clone, Debug, Serialize)]
pub struct TokenFetch {
    pub client: String,
    pub endpoint: String,
    /// The last HTTP status; `None` when no answer came.
    pub status: Option<u16>,
    pub round_trips: u32,
    /// SHA-256 (hex) of the access token, never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

impl TokenFetch {
    /// The event for a fetch; `token` is hashed here and not kept.
    pub fn new(
        client: &str,
        endpoint: &str,
        status: Option<u16>,
        round_trips: u32,
        token: Option<&str>,
    ) -> TokenFetch {
        TokenFetch {
            client: client.to_owned(),
            endpoint: strip_query(endpoint).to_owned(),
            status,
            round_trips,
            token_sha256: token.map(|t| crate::token::hex(&Sha256::digest(t.as_bytes()))),
        }
    }
}

/// One request through the gateway (`/gw/<route>/...`).
#[derive(Clone, Debug, Serialize)]
pub struct GatewayRequest {
    /// The caller's uid (the connection's peer credentials).
    pub uid: u32,
    pub route: String,
    pub method: String,
    /// The upstream path, without its query (a query may carry secrets).
    pub path: String,
    pub status: u16,
    /// Response body bytes streamed back.
    pub bytes: u64,
    pub duration_ms: u64,
}

impl GatewayRequest {
    /// The event for one gateway request; the query is cut off `path` here.
    pub fn new(
        uid: u32,
        route: &str,
        method: &str,
        path: &str,
        status: u16,
        bytes: u64,
        duration: Duration,
    ) -> GatewayRequest {
        GatewayRequest {
            uid,
            route: route.to_owned(),
            method: method.to_owned(),
            path: strip_query(path).to_owned(),
            status,
            bytes,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

fn strip_query(s: &str) -> &str {
    s.split(['?', '#']).next().unwrap_or(s)
}

/// What the writer and the agent share: health and counters.
struct Shared {
    on_failure: OnFailure,
    healthy: AtomicBool,
    reason: Mutex<Option<String>>,
    lines: AtomicU64,
    checkpoints: AtomicU64,
    failures: AtomicU64,
    /// Events that never reached the file (recorded as a count in the next `gap` line).
    lost: AtomicU64,
    /// Places in the queue taken: events queued and not yet taken by the writer, and
    /// places reserved by signatures the device is making ([`Reservation`]).
    pending: AtomicUsize,
    /// The bound of `pending` (`queue`).
    capacity: usize,
}

/// One place in the writer's queue, taken by [`Shared::reserve`]: the queue (unbounded
/// itself) never holds more than `capacity` events. Dropped unused, it frees the place; a
/// queued event keeps it until the writer takes the event.
struct Reservation {
    shared: Arc<Shared>,
    held: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Shared {
    /// A place in the queue, or `None` when all `capacity` places are taken.
    fn reserve(self: &Arc<Self>) -> Option<Reservation> {
        self.pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .ok()
            .map(|_| Reservation {
                shared: self.clone(),
                held: true,
            })
    }

    fn queue_full(&self) -> String {
        format!(
            "the audit queue is full ({} events): the writer is not keeping up",
            self.capacity
        )
    }

    fn fail(&self, reason: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let was = self.healthy.swap(false, Ordering::SeqCst);
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if was || r.as_deref() != Some(reason.as_str()) {
            match self.on_failure {
                OnFailure::Refuse => tracing::error!(
                    "audit trail cannot be written: {reason}; REFUSING TO SIGN until it can \
                     (audit.on_failure = \"refuse\")"
                ),
                OnFailure::Continue => tracing::error!(
                    "audit trail cannot be written: {reason}; SIGNING WITHOUT AN AUDIT TRAIL \
                     (audit.on_failure = \"continue\")"
                ),
            }
        }
        *r = Some(reason);
    }

    fn recovered(&self) {
        if !self.healthy.swap(true, Ordering::SeqCst) {
            tracing::warn!("audit trail written again");
            *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "unknown".into())
    }
}

enum Msg {
    Event(Event, SystemTime),
    /// Write a final checkpoint, close, and answer.
    Close(crossbeam_channel::Sender<()>),
}

/// The running trail: queue events with [`Trail::record`]. Cheap to clone.
#[derive(Clone)]
pub struct Trail {
    /// Unbounded: [`Shared::pending`] bounds it (a reserved place always finds room).
    tx: crossbeam_channel::Sender<Msg>,
    shared: Arc<Shared>,
    path: Arc<PathBuf>,
    /// The checkpoint key's name and kid: reserved, no caller signs with it.
    checkpoint_key: Arc<(String, String)>,
}

impl Trail {
    /// Opens (or creates) the file, continues its chain, writes an `open` line and starts
    /// the writer thread. `checkpoint_key` must come from a keyring without the trail's
    /// observer and gate: a checkpoint's signature is its own line, not an event, and a
    /// failing trail must still be able to try its checkpoint.
    ///
    /// A file that cannot be opened is an error; one that cannot be written (a full disk)
    /// starts the trail failing.
    pub fn start(settings: &AuditSettings, checkpoint_key: SigningKey) -> Result<Trail, String> {
        let shared = Arc::new(Shared {
            on_failure: settings.on_failure,
            healthy: AtomicBool::new(true),
            reason: Mutex::new(None),
            lines: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            capacity: settings.queue,
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let reserved = Arc::new((
            checkpoint_key.name().to_owned(),
            checkpoint_key.kid().to_owned(),
        ));
        let writer = writer::Writer::open(settings, checkpoint_key, shared.clone())?;
        std::thread::Builder::new()
            .name("keybound-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("cannot start the audit writer thread: {e}"))?;
        Ok(Trail {
            tx,
            shared,
            path: Arc::new(settings.path.clone()),
            checkpoint_key: reserved,
        })
    }

    /// The checkpoint key's name (label or rotated slot) and kid: the agent refuses it to
    /// every caller.
    pub fn checkpoint_key(&self) -> (&str, &str) {
        (&self.checkpoint_key.0, &self.checkpoint_key.1)
    }

    /// Queues one event, never waiting (async tasks call this): a full queue loses the
    /// event, counted, and the trail is failing until the writer catches up.
    pub fn record(&self, event: Event) {
        match self.shared.reserve() {
            Some(place) => self.queue(place, event),
            None => {
                self.shared.lost.fetch_add(1, Ordering::Relaxed);
                self.shared.fail(self.shared.queue_full());
            }
        }
    }

    /// Queues `event` in a reserved place (which it keeps until the writer takes it).
    fn queue(&self, mut place: Reservation, event: Event) {
        match self.tx.send(Msg::Event(event, SystemTime::now())) {
            Ok(()) => place.held = false,
            Err(_) => {
                self.shared.lost.fetch_add(1, Ordering::Relaxed);
                self.shared.fail("the audit writer thread stopped".into());
            }
        }
    }

    /// Records a gateway request (the gateway calls this once per request it answered).
    pub fn gateway(&self, request: GatewayRequest) {
        self.record(Event::Gateway(request));
    }

    /// Records a token fetch.
    pub fn token_fetch(&self, fetch: TokenFetch) {
        self.record(Event::TokenFetch(fetch));
    }

    /// Records one signature (what the keyring's observer calls), in the place the gate
    /// reserved for it when there is one.
    pub fn signature(&self, e: &SignEvent<'_>) {
        let event = Event::Signature(Box::new(Signature::of(e)));
        let place = e
            .take_pass()
            .and_then(|pass| pass.0.downcast::<Reservation>().ok());
        match place {
            Some(place) => self.queue(*place, event),
            None => self.record(event),
        }
    }

    /// The keyring's gate, asked before the device signs: it reserves the signature's
    /// place in the queue (the pass the observer queues its line with). With
    /// `on_failure = "refuse"`, signing is refused while the trail cannot be written or
    /// the queue has no place; with `"continue"` it always passes.
    pub fn gate(&self) -> SignGate {
        let shared = self.shared.clone();
        Arc::new(move || {
            let pass = |place: Reservation| GatePass(Box::new(place));
            if shared.on_failure == OnFailure::Continue {
                return Ok(shared.reserve().map(pass));
            }
            let refused = |reason: String| {
                format!(
                    "the audit trail cannot be written ({reason}), and audit.on_failure = \
                     \"refuse\""
                )
            };
            if !shared.healthy.load(Ordering::SeqCst) {
                return Err(refused(shared.reason()));
            }
            match shared.reserve() {
                Some(place) => Ok(Some(pass(place))),
                None => {
                    let reason = shared.queue_full();
                    shared.fail(reason.clone());
                    Err(refused(reason))
                }
            }
        })
    }

    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// `/healthz`'s `audit` member.
    pub fn health(&self) -> serde_json::Value {
        let on_failure = match self.shared.on_failure {
            OnFailure::Refuse => "refuse",
            OnFailure::Continue => "continue",
        };
        if self.healthy() {
            serde_json::json!({ "status": "ok", "path": self.path.display().to_string(),
                "lines": self.shared.lines.load(Ordering::Relaxed), "on_failure": on_failure })
        } else {
            let signing = match self.shared.on_failure {
                OnFailure::Refuse => "refused",
                OnFailure::Continue => "continuing without an audit trail",
            };
            serde_json::json!({ "status": "failing", "path": self.path.display().to_string(),
                "reason": self.shared.reason(), "on_failure": on_failure, "signing": signing })
        }
    }

    /// The `keybound_audit_*` metrics, Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = &self.shared;
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        one(
            "keybound_audit_lines_total",
            "counter",
            "Lines written to the audit trail (checkpoints included).",
            s.lines.load(Ordering::Relaxed),
        );
        one(
            "keybound_audit_checkpoints_total",
            "counter",
            "Checkpoints signed on the device and written.",
            s.checkpoints.load(Ordering::Relaxed),
        );
        one(
            "keybound_audit_failures_total",
            "counter",
            "Failures to write the audit trail (or to sign a checkpoint).",
            s.failures.load(Ordering::Relaxed),
        );
        one(
            "keybound_audit_lost_events_total",
            "counter",
            "Events that never reached the trail (counted in its next gap line).",
            s.lost.load(Ordering::Relaxed),
        );
        one(
            "keybound_audit_healthy",
            "gauge",
            "1 while the audit trail is written, 0 while it is failing.",
            u64::from(self.healthy()),
        );
    }

    /// Writes a final checkpoint and stops the writer (waits up to 10 s for it).
    pub fn close(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Msg::Close(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// The OAuth engine's observer with token fetches recorded in the trail; everything else
/// goes to `inner` (the agent's metrics).
pub struct Upstream {
    pub inner: Arc<dyn crate::oauth::observe::UpstreamObserver>,
    pub trail: Trail,
}

impl crate::oauth::observe::UpstreamObserver for Upstream {
    fn response(&self, client: &str, status: http::StatusCode) {
        self.inner.response(client, status)
    }
    fn nonce_challenge(&self, client: &str) {
        self.inner.nonce_challenge(client)
    }
    fn token_fetch(&self, client: &str, ok: bool, took: Duration) {
        self.inner.token_fetch(client, ok, took)
    }
    fn token_cache(&self, client: &str, hit: bool) {
        self.inner.token_cache(client, hit)
    }
    fn token_exchange(&self, e: &crate::oauth::observe::TokenExchange<'_>) {
        self.inner.token_exchange(e);
        self.trail.token_fetch(TokenFetch::new(
            e.client,
            e.endpoint,
            e.status,
            e.round_trips,
            e.token,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Origin;

    #[test]
    fn hand_written_signature_json_is_serdes() {
        let base = Signature {
            caller: Caller::Agent("agent"),
            key: "dpop".into(),
            slot: None,
            kid: "kid".into(),
            alg: "ES256",
            purpose: "dpop",
            aud: None,
            htm: Some("GET".into()),
            htu: Some("https://a.example/x\"y\\z\u{1}".into()),
            jti: Some("j".into()),
            iat: Some(17),
            outcome: "ok",
        };
        let peer = Signature {
            caller: Caller::Peer(Origin {
                uid: 1000,
                pid: Some(42),
                exe: Some("/usr/bin/cu\"rl".into()),
            }),
            slot: Some("client-auth".into()),
            purpose: "assertion",
            aud: Some(serde_json::json!(["https://a", "b"])),
            htm: None,
            htu: None,
            iat: None,
            ..base.clone()
        };
        let anonymous = Signature {
            caller: Caller::Peer(Origin {
                uid: 0,
                pid: None,
                exe: None,
            }),
            jti: None,
            ..base.clone()
        };
        for s in [base, peer, anonymous] {
            assert_eq!(
                String::from_utf8(s.to_json()).unwrap(),
                serde_json::to_string(&s).unwrap()
            );
        }
    }

    #[test]
    fn the_example_config_documents_every_setting() {
        let example = include_str!("../../keybound.example.toml");
        let (_, section) = example
            .split_once("\n# [audit]\n")
            .expect("an [audit] section");
        let section = section.split("\n# ----").next().unwrap_or_default();
        let lines: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .collect();
        let s: AuditSettings = toml::from_str(&lines.join("\n")).expect("the example is valid");
        s.validate(&[]).expect("and within range");
        assert_eq!(s.rotate_bytes, Some(104_857_600));
        assert_eq!(lines.len(), 8, "{lines:?}");
    }

    #[test]
    fn gateway_and_token_fetch_never_keep_a_query_or_a_token() {
        let g = GatewayRequest::new(
            1,
            "okta",
            "GET",
            "/api/v1/users?after=secret",
            200,
            5,
            Duration::from_millis(7),
        );
        assert_eq!(g.path, "/api/v1/users");
        let t = TokenFetch::new(
            "okta",
            "https://x/token?x=1",
            Some(200),
            2,
            Some("the-token"),
        );
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            !json.contains("the-token") && !json.contains("x=1"),
            "{json}"
        );
        assert_eq!(t.token_sha256.unwrap().len(), 64);
    }
}
