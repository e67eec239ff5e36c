//! The client's registered JWKS and the choice of key for a client assertion: by `kid`, or
//! every key whose type fits the `alg`. Two sources, as Okta has them:
//!
//! * `--jwks FILE` ("paste this JWKS"): the file's current content counts. It is read again
//!   whenever it changed, so an admin rotates keys by rewriting it; a file that became
//!   unusable keeps the last good keys in use.
//! * `--jwks-uri URL` ("Use a URL to fetch keys dynamically"): fetched at start, cached for
//!   the response's `Cache-Control: max-age` (so removed keys are forgotten), revalidated
//!   with `If-None-Match`, and fetched again for an unknown `kid` at most once per interval.

use std::collections::HashSet;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::header::{self, HeaderMap, HeaderValue};
use serde_json::Value;
use url::Url;

use super::verify::{PublicJwk, SigAlg};
use super::{DevServerError, JwksSource};

/// The JWKS URI must answer within this time.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted, in bytes.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long a fetched JWKS is used when its response has no `max-age`.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
/// The longest `max-age` honoured: a longer one would keep a removed key usable for hours.
const MAX_MAX_AGE: Duration = Duration::from_secs(3600);
/// A file whose last change is less than this many seconds before it was read may have
/// changed again since without changing its size or times (file times are coarse: a clock
/// tick on Linux, a second on some file systems), so it is read again until it is older.
const RACY_SECS: i64 = 2;

/// One registered public key.
#[derive(Debug)]
pub struct RegisteredKey {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<SigAlg>,
    pub jwk: PublicJwk,
}

/// The registered keys and where they come from.
#[derive(Debug)]
pub struct ClientKeys {
    /// The keys in use. Writers only swap the `Arc`, so a lookup sees one whole set.
    current: RwLock<Arc<Current>>,
    origin: Origin,
}

/// One published set of keys, and why it may be older than its source.
#[derive(Debug)]
struct Current {
    keys: Vec<Arc<RegisteredKey>>,
    /// URL mode: from this instant on, a lookup fetches the URL again first.
    refresh_at: Option<Instant>,
    /// Why the source could not replace these keys the last time it was read, if it
    /// could not: the last good keys are in use.
    problem: Option<String>,
}

#[derive(Debug)]
enum Origin {
    File(PastedFile),
    Uri(Remote),
}

#[derive(Debug)]
struct PastedFile {
    path: PathBuf,
    /// `std` mutex: held while the (small, local) file is statted and read, never across
    /// `.await`; concurrent lookups read it once.
    seen: Mutex<FileSeen>,
}

/// What the file looked like when it was last read.
#[derive(Debug)]
struct FileSeen {
    stamp: Option<Stamp>,
    /// Seconds since the Unix epoch when it was read.
    read_at: i64,
    /// Its content then; `None` after a failed read.
    bytes: Option<Vec<u8>>,
}

/// The file's identity, size and times: any edit changes at least one of them, except two
/// edits within one tick of the file system's clock that keep the size (see [`RACY_SECS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

#[derive(Debug)]
struct Remote {
    url: Url,
    http: reqwest::Client,
    /// Fewest seconds between two fetches triggered by an unknown `kid`.
    refetch_interval: Duration,
    /// An async lock on purpose: it is held across a fetch so that concurrent lookups that
    /// need one cause one request, not many.
    state: tokio::sync::Mutex<RemoteState>,
}

#[derive(Debug)]
struct RemoteState {
    /// The `ETag` of the cached set, sent back as `If-None-Match`.
    etag: Option<HeaderValue>,
    /// The cached set's `max-age`, kept when a 304 does not restate it (RFC 9111 §4.3.4).
    max_age: Duration,
    /// When the last unknown-`kid` fetch started.
    last_unknown_kid_fetch: Option<Instant>,
}

/// Why no key was found.
#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    #[error("No key in the registered JWKS matches kid '{0}'.")]
    UnknownKid(String),
    #[error("The key with kid '{kid}' in the registered JWKS cannot verify {alg} signatures.")]
    AlgMismatch { kid: String, alg: &'static str },
    #[error("No key in the registered JWKS can verify {0} signatures.")]
    NoFittingKey(&'static str),
}

/// No key for an assertion; the text is the `error_description` of a 401 invalid_client,
/// and says so when the registered JWKS could not be read again.
#[derive(Debug)]
pub struct NoKey {
    reason: KeyLookupError,
    stale: Option<String>,
}

impl std::fmt::Display for NoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)?;
        if let Some(problem) = &self.stale {
            write!(f, " The last good JWKS is still in use, because {problem}.")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoKey {}

impl RegisteredKey {
    /// Whether this key may verify `alg`: the key type fits and the JWK's `alg`, if any, agrees.
    pub fn accepts(&self, alg: SigAlg) -> bool {
        self.jwk.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

impl ClientKeys {
    /// Reads the file or fetches the URI; any unusable entry fails the start.
    /// `refetch_interval` spaces the fetches an unknown `kid` causes (URL mode).
    pub async fn load(
        source: JwksSource,
        refetch_interval: Duration,
    ) -> Result<ClientKeys, DevServerError> {
        match source {
            JwksSource::File(path) => {
                let stamp = std::fs::metadata(&path).map(|m| Stamp::of(&m)).ok();
                let read_at = unix_now();
                let text = read_file(&path).map_err(|reason| DevServerError::JwksRead {
                    path: path.clone(),
                    reason,
                })?;
                let keys = parse_jwks(&text).map_err(|reason| DevServerError::JwksInvalid {
                    origin: path.display().to_string(),
                    reason,
                })?;
                tracing::info!(file = %path.display(), kids = ?kids(&keys), "client JWKS file read");
                let seen = FileSeen {
                    stamp,
                    read_at,
                    bytes: Some(text),
                };
                Ok(ClientKeys::new(
                    keys,
                    None,
                    Origin::File(PastedFile {
                        path,
                        seen: Mutex::new(seen),
                    }),
                ))
            }
            JwksSource::Uri(url) => {
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(DevServerError::JwksFetch {
                        url,
                        reason: "only http and https URLs can be fetched".into(),
                    });
                }
                // Redirects off: a JWKS URI that redirects is a misconfiguration, and
                // following it would let the document point the server anywhere (SSRF).
                let http = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|e| DevServerError::HttpClient(e.to_string()))?;
                let Fetched::Keys {
                    keys,
                    etag,
                    max_age,
                } = first_fetch(&http, &url).await?
                else {
                    // Without If-None-Match a 304 is an error in `fetch`.
                    return Err(DevServerError::JwksFetch {
                        url,
                        reason: "the first fetch answered 304 Not Modified".into(),
                    });
                };
                tracing::info!(%url, kids = ?kids(&keys), max_age = max_age.as_secs(), "client JWKS fetched");
                let remote = Remote {
                    url,
                    http,
                    refetch_interval,
                    state: tokio::sync::Mutex::new(RemoteState {
                        etag,
                        max_age,
                        last_unknown_kid_fetch: None,
                    }),
                };
                Ok(ClientKeys::new(
                    keys,
                    Some(Instant::now() + max_age),
                    Origin::Uri(remote),
                ))
            }
        }
    }

    fn new(
        keys: Vec<Arc<RegisteredKey>>,
        refresh_at: Option<Instant>,
        origin: Origin,
    ) -> ClientKeys {
        ClientKeys {
            current: RwLock::new(Arc::new(Current {
                keys,
                refresh_at,
                problem: None,
            })),
            origin,
        }
    }

    /// The keys to try for an assertion signed with `alg`: the one named by `kid`, or without
    /// a `kid` every key that fits. The file is read again if it changed; the URL is fetched
    /// again first if the cached set is older than its `max-age`, and again for an unknown
    /// `kid` (at most once per refetch interval).
    pub async fn candidates(
        &self,
        kid: Option<&str>,
        alg: SigAlg,
    ) -> Result<Vec<Arc<RegisteredKey>>, NoKey> {
        // Whether this lookup already read the source: an unknown kid needs no second read.
        let read_now = match &self.origin {
            Origin::File(file) => {
                self.follow(file);
                true
            }
            Origin::Uri(remote) => self.refresh_if_due(remote).await,
        };
        let current = self.snapshot();
        let refused = |reason| NoKey {
            reason,
            stale: self.snapshot().problem.clone(),
        };
        let Some(kid) = kid else {
            let fitting: Vec<_> = current
                .keys
                .iter()
                .filter(|k| k.accepts(alg))
                .cloned()
                .collect();
            if fitting.is_empty() {
                return Err(refused(KeyLookupError::NoFittingKey(alg.name())));
            }
            return Ok(fitting);
        };
        let key = match (by_kid(&current, kid), &self.origin) {
            (Some(key), _) => key,
            (None, Origin::Uri(remote)) if !read_now && self.refetch_for(remote, kid).await => {
                by_kid(&self.snapshot(), kid)
                    .ok_or_else(|| refused(KeyLookupError::UnknownKid(kid.into())))?
            }
            (None, _) => return Err(refused(KeyLookupError::UnknownKid(kid.into()))),
        };
        if !key.accepts(alg) {
            return Err(refused(KeyLookupError::AlgMismatch {
                kid: kid.into(),
                alg: alg.name(),
            }));
        }
        Ok(vec![key])
    }

    /// Whether a registered key has this RFC 7638 thumbprint: such a key authenticates the
    /// client, and Okta refuses it as a DPoP key.
    pub fn registered(&self, thumbprint: &str) -> bool {
        if let Origin::File(file) = &self.origin {
            self.follow(file);
        }
        self.snapshot()
            .keys
            .iter()
            .any(|k| k.jwk.thumbprint() == thumbprint)
    }

    fn snapshot(&self) -> Arc<Current> {
        // A poisoned lock still holds a complete Arc: writers only swap it.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, current: Current) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(current);
    }

    /// Keeps the keys and records why their source could not replace them.
    fn keep(&self, problem: String, refresh_at: Option<Instant>) {
        let old = self.snapshot();
        self.replace(Current {
            keys: old.keys.clone(),
            refresh_at,
            problem: Some(problem),
        });
    }

    /// Paste mode: reads the file again if it changed since it was last read. A file that
    /// became unusable keeps the last good keys, and a warning says why (once per change).
    fn follow(&self, file: &PastedFile) {
        let mut seen = super::lock(&file.seen);
        let stamp = match std::fs::metadata(&file.path) {
            Ok(metadata) => Stamp::of(&metadata),
            Err(e) => {
                seen.stamp = None;
                seen.bytes = None;
                self.file_problem(
                    file,
                    DevServerError::JwksRead {
                        path: file.path.clone(),
                        reason: e.to_string(),
                    },
                );
                return;
            }
        };
        if seen.stamp == Some(stamp) && !stamp.racy(seen.read_at) {
            return;
        }
        // Stamp first, then read: an edit after the stat changes the stamp seen next time.
        seen.stamp = Some(stamp);
        seen.read_at = unix_now();
        let text = match read_file(&file.path) {
            Ok(text) => text,
            Err(reason) => {
                seen.bytes = None;
                self.file_problem(
                    file,
                    DevServerError::JwksRead {
                        path: file.path.clone(),
                        reason,
                    },
                );
                return;
            }
        };
        if seen.bytes.as_ref() == Some(&text) {
            return;
        }
        match parse_jwks(&text) {
            Ok(keys) => {
                tracing::info!(file = %file.path.display(), kids = ?kids(&keys), "client JWKS file read again");
                self.replace(Current {
                    keys,
                    refresh_at: None,
                    problem: None,
                });
            }
            Err(reason) => self.file_problem(
                file,
                DevServerError::JwksInvalid {
                    origin: file.path.display().to_string(),
                    reason,
                },
            ),
        }
        seen.bytes = Some(text);
    }

    fn file_problem(&self, file: &PastedFile, problem: DevServerError) {
        let problem = problem.to_string();
        let current = self.snapshot();
        if current.problem.as_ref() != Some(&problem) {
            tracing::warn!(
                file = %file.path.display(),
                kids = ?kids(&current.keys),
                "{problem}; keeping the last good keys"
            );
            self.keep(problem, None);
        }
    }

    /// URL mode: fetches the JWKS again if the cached set is older than its `max-age`; `true`
    /// if this lookup waited for a fetch (its own or a concurrent one).
    async fn refresh_if_due(&self, remote: &Remote) -> bool {
        let due = |current: &Current| current.refresh_at.is_some_and(|t| Instant::now() >= t);
        if !due(&self.snapshot()) {
            return false;
        }
        let mut state = remote.state.lock().await;
        // Another lookup may have fetched while this one waited for the lock.
        if due(&self.snapshot()) {
            self.fetch_again(
                remote,
                &mut state,
                "the cached set is older than its max-age",
            )
            .await;
        }
        true
    }

    /// URL mode: fetches the JWKS again for an unknown `kid`, at most once per refetch
    /// interval; `true` if the keys may have changed.
    async fn refetch_for(&self, remote: &Remote, kid: &str) -> bool {
        let mut state = remote.state.lock().await;
        // Another lookup may have fetched this kid while this one waited for the lock.
        if by_kid(&self.snapshot(), kid).is_some() {
            return true;
        }
        if state
            .last_unknown_kid_fetch
            .is_some_and(|t| t.elapsed() < remote.refetch_interval)
        {
            return false;
        }
        state.last_unknown_kid_fetch = Some(Instant::now());
        self.fetch_again(remote, &mut state, "unknown kid").await
    }

    /// Fetches the URL again with the cached `ETag`; `true` if it answered. A failure keeps
    /// the last good keys, says so in the log, and is retried after the refetch interval
    /// once the cached set is due.
    async fn fetch_again(&self, remote: &Remote, state: &mut RemoteState, why: &str) -> bool {
        match fetch(&remote.http, &remote.url, state.etag.as_ref()).await {
            Ok(Fetched::Keys {
                keys,
                etag,
                max_age,
            }) => {
                tracing::info!(url = %remote.url, why, kids = ?kids(&keys), max_age = max_age.as_secs(), "client JWKS fetched again");
                state.etag = etag;
                state.max_age = max_age;
                self.replace(Current {
                    keys,
                    refresh_at: Some(Instant::now() + max_age),
                    problem: None,
                });
                true
            }
            Ok(Fetched::NotModified { max_age }) => {
                let max_age = max_age.unwrap_or(state.max_age);
                state.max_age = max_age;
                let old = self.snapshot();
                tracing::info!(url = %remote.url, why, kids = ?kids(&old.keys), max_age = max_age.as_secs(), "client JWKS not modified (304); keeping its keys");
                self.replace(Current {
                    keys: old.keys.clone(),
                    refresh_at: Some(Instant::now() + max_age),
                    problem: None,
                });
                true
            }
            Ok(Fetched::Unavailable { error: e, .. }) | Err(e) => {
                let old = self.snapshot();
                tracing::warn!(why, kids = ?kids(&old.keys), "{e}; keeping the last good keys");
                let now = Instant::now();
                let refresh_at = match old.refresh_at {
                    Some(t) if t > now => t,
                    _ => now + remote.refetch_interval,
                };
                self.keep(e.to_string(), Some(refresh_at));
                false
            }
        }
    }
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// Whether the file was read so soon after its last change that another change since
    /// may have left this stamp as it was.
    fn racy(&self, read_at: i64) -> bool {
        let changed = self.mtime.0.max(self.ctime.0);
        read_at < changed.saturating_add(RACY_SECS)
    }
}

fn by_kid(current: &Current, kid: &str) -> Option<Arc<RegisteredKey>> {
    current
        .keys
        .iter()
        .find(|k| k.kid.as_deref() == Some(kid))
        .cloned()
}

/// The kids of a set, for the log.
fn kids(keys: &[Arc<RegisteredKey>]) -> Vec<&str> {
    keys.iter()
        .map(|k| k.kid.as_deref().unwrap_or("(no kid)"))
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The file's content, at most [`MAX_JWKS_BYTES`].
fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() > MAX_JWKS_BYTES {
        return Err(format!("the file exceeds {MAX_JWKS_BYTES} bytes"));
    }
    Ok(text)
}

/// What the JWKS URI answered.
enum Fetched {
    /// 200: the keys, the `ETag` and how long to use them.
    Keys {
        keys: Vec<Arc<RegisteredKey>>,
        etag: Option<HeaderValue>,
        max_age: Duration,
    },
    /// 304 to `If-None-Match`: the cached keys stand; `max_age` if the 304 restated it.
    NotModified { max_age: Option<Duration> },
    /// 503 with `Retry-After` in seconds (RFC 9110 §10.2.3): the publisher is up and says
    /// when to come back (a `keybound serve` whose keys are still being proved).
    Unavailable {
        retry_after: Duration,
        error: DevServerError,
    },
}

/// How long the first fetch keeps coming back to a URI that answers 503 with
/// `Retry-After`, before the server gives up starting.
const FIRST_FETCH_PATIENCE: Duration = Duration::from_secs(30);

/// The first fetch, when the server starts: a 503 with `Retry-After` is tried again (at
/// most once a second, at least every 5 s) for [`FIRST_FETCH_PATIENCE`]; anything else
/// that fails is final.
async fn first_fetch(http: &reqwest::Client, url: &Url) -> Result<Fetched, DevServerError> {
    let (start, mut tries) = (Instant::now(), 0);
    loop {
        tries += 1;
        let (retry_after, error) = match fetch(http, url, None).await? {
            Fetched::Unavailable { retry_after, error } => (retry_after, error),
            fetched => return Ok(fetched),
        };
        let wait = retry_after.clamp(Duration::from_secs(1), Duration::from_secs(5));
        if start.elapsed() + wait > FIRST_FETCH_PATIENCE {
            return Err(match error {
                DevServerError::JwksFetch { url, reason } if tries > 1 => {
                    let secs = start.elapsed().as_secs();
                    let reason = format!("{reason}, still after {secs} s of trying again");
                    DevServerError::JwksFetch { url, reason }
                }
                other => other,
            });
        }
        tracing::info!(%url, wait_secs = wait.as_secs(), "{error}; trying again");
        tokio::time::sleep(wait).await;
    }
}

async fn fetch(
    http: &reqwest::Client,
    url: &Url,
    etag: Option<&HeaderValue>,
) -> Result<Fetched, DevServerError> {
    let failed = |reason: String| DevServerError::JwksFetch {
        url: url.clone(),
        reason,
    };
    let mut request = http
        .get(url.clone())
        .header(header::ACCEPT, "application/json");
    if let Some(etag) = etag {
        request = request.header(header::IF_NONE_MATCH, etag.clone());
    }
    let response = request
        .send()
        .await
        .map_err(|e| failed(causes(&e.without_url())))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_MODIFIED && etag.is_some() {
        return Ok(Fetched::NotModified {
            max_age: response
                .headers()
                .contains_key(header::CACHE_CONTROL)
                .then(|| max_age(response.headers())),
        });
    }
    if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        && let Some(retry_after) = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Ok(Fetched::Unavailable {
            retry_after: Duration::from_secs(retry_after),
            error: failed(format!("HTTP status {status}, Retry-After {retry_after} s")),
        });
    }
    if !status.is_success() {
        return Err(failed(format!("HTTP status {status}")));
    }
    let etag = response.headers().get(header::ETAG).cloned();
    let max_age = max_age(response.headers());
    let body = response
        .bytes()
        .await
        .map_err(|e| failed(causes(&e.without_url())))?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(failed(format!(
            "the document exceeds {MAX_JWKS_BYTES} bytes"
        )));
    }
    let keys = parse_jwks(&body).map_err(|reason| DevServerError::JwksInvalid {
        origin: url.to_string(),
        reason,
    })?;
    Ok(Fetched::Keys {
        keys,
        etag,
        max_age,
    })
}

/// How long to use a fetched JWKS (RFC 9111 §5.2.2): `no-store` or `no-cache` → 0,
/// `max-age=N` → N bounded by [`MAX_MAX_AGE`], otherwise [`DEFAULT_MAX_AGE`].
fn max_age(headers: &HeaderMap) -> Duration {
    let mut found = None;
    let directives = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for directive in directives {
        let (name, value) = directive.split_once('=').unwrap_or((directive, ""));
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "no-store" | "no-cache" => return Duration::ZERO,
            "max-age" if found.is_none() => {
                let value = value.trim().trim_matches('"');
                found = Some(
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                        // RFC 9111 §4.2.1: an invalid freshness lifetime makes the response stale.
                        0
                    } else {
                        // Digits only: a parse failure is an overflow, "a very long time".
                        value.parse::<u64>().unwrap_or(u64::MAX)
                    },
                );
            }
            _ => {}
        }
    }
    found.map_or(DEFAULT_MAX_AGE, |secs| {
        Duration::from_secs(secs).min(MAX_MAX_AGE)
    })
}

/// An error and its sources on one line: reqwest's own message ("error sending request")
/// does not say why.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses `{"keys":[...]}` (RFC 7517 §5). Every entry must be a usable signing key: a JWKS
/// that silently loses a key only surfaces later as a confusing "no key matches kid".
fn parse_jwks(text: &[u8]) -> Result<Vec<Arc<RegisteredKey>>, String> {
    let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("it has no \"keys\" array")?;
    if entries.is_empty() {
        return Err("the \"keys\" array is empty".into());
    }
    let mut kids = HashSet::new();
    let mut keys = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let kid = match entry.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(format!("key #{i}: kid is not a string")),
        };
        let name = kid
            .as_deref()
            .map_or(format!("key #{i}"), |k| format!("key '{k}'"));
        if let Some(kid) = &kid
            && !kids.insert(kid.clone())
        {
            return Err(format!("{name} appears twice"));
        }
        let jwk = PublicJwk::parse(entry).map_err(|e| format!("{name}: {e}"))?;
        let alg =
            match entry.get("alg") {
                None => None,
                Some(Value::String(a)) => Some(SigAlg::from_name(a).ok_or_else(|| {
                    format!("{name}: alg '{a}' is not one of {}", SigAlg::names())
                })?),
                Some(_) => return Err(format!("{name}: alg is not a string")),
            };
        if let Some(alg) = alg
            && !jwk.fits(alg)
        {
            return Err(format!(
                "{name}: alg {} does not fit the key type",
                alg.name()
            ));
        }
        match entry.get("use") {
            None => {}
            Some(Value::String(u)) if u == "sig" => {}
            Some(other) => return Err(format!("{name}: use is {other}, not \"sig\"")),
        }
        keys.push(Arc::new(RegisteredKey { kid, alg, jwk }));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_jwk() -> Value {
        let v: Value =
            serde_json::from_str(include_str!("../../../tests/vectors/rfc-vectors.json")).unwrap();
        v["rfc9449_ec_thumbprint"]["jwk"].clone()
    }

    #[test]
    fn jwks_entries_are_checked() {
        let mut jwk = ec_jwk();
        jwk["kid"] = "k1".into();
        jwk["alg"] = "ES256".into();
        jwk["use"] = "sig".into();
        let ok = serde_json::json!({ "keys": [jwk.clone()] }).to_string();
        let keys = parse_jwks(ok.as_bytes()).unwrap();
        assert_eq!(keys[0].kid.as_deref(), Some("k1"));
        assert!(keys[0].accepts(SigAlg::Es256) && !keys[0].accepts(SigAlg::Es384));

        for (member, value, fragment) in [
            ("alg", Value::from("RS256"), "does not fit"),
            ("alg", Value::from("HS256"), "is not one of"),
            ("use", Value::from("enc"), "not \"sig\""),
            ("d", Value::from("AAAA"), "private key member 'd'"),
        ] {
            let mut bad = jwk.clone();
            bad[member] = value;
            let doc = serde_json::json!({ "keys": [bad] }).to_string();
            let err = parse_jwks(doc.as_bytes()).unwrap_err();
            assert!(err.contains(fragment), "{err}");
        }
        let twice = serde_json::json!({ "keys": [jwk.clone(), jwk] }).to_string();
        assert!(parse_jwks(twice.as_bytes()).unwrap_err().contains("twice"));
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn max_age_follows_cache_control() {
        let age = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            max_age(&headers).as_secs()
        };
        assert_eq!(age(&[]), 300, "absent: the default");
        assert_eq!(age(&["public, max-age=60"]), 60);
        assert_eq!(age(&["Max-Age=\"7\""]), 7);
        assert_eq!(age(&["max-age=86400"]), 3600, "bounded");
        assert_eq!(age(&["max-age=99999999999999999999999"]), 3600, "overflow");
        assert_eq!(age(&["max-age=0"]), 0);
        assert_eq!(age(&["max-age=-5"]), 0, "invalid: stale");
        assert_eq!(age(&["max-age=60", "no-store"]), 0);
        assert_eq!(age(&["no-cache, max-age=60"]), 0);
        assert_eq!(age(&["private"]), 300);
    }

    #[test]
    fn a_stamp_is_racy_until_two_seconds_after_the_last_change() {
        let stamp = Stamp {
            dev: 1,
            ino: 2,
            len: 3,
            mtime: (1000, 5),
            ctime: (1001, 0),
        };
        assert!(stamp.racy(1001), "read in the second of the change");
        assert!(stamp.racy(1002), "read one tick of a coarse clock later");
        assert!(!stamp.racy(1003));
    }
}
