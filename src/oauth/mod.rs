//! OAuth on top of JOSE and the token: `private_key_jwt` assertions (RFC 7523) and DPoP
//! proofs (RFC 9449). Claim builders are pure; `sign`/`sign_async` are where a JWS meets a
//! key; `client` talks to token endpoints and `api` to resource servers.

pub mod api;
pub mod assertion;
pub mod cache;
pub mod client;
mod discovery;
pub mod dpop;
pub mod http;
pub mod nonce;
pub mod observe;
pub mod resilience;
pub mod response;
mod retry;
pub mod secret;
pub mod server;
pub mod settings;
pub mod state;
mod token_endpoint;
pub mod transport;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use self::state::{ClockNote, TOLERATED_SKEW_SECS};
use self::transport::TransportError;
use crate::error::ErrorKind;
use crate::jose::{self, Header, JoseError};
use crate::keyring::{KeyError, SigningKey};
use crate::token::TokenError;

/// Errors of the OAuth layer.
#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("{what} '{value}' is not an absolute http(s) URL: {reason}")]
    BadUrl {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("lifetime {secs} s is out of range: use 1 to {max} seconds ({why})")]
    BadLifetime {
        secs: u64,
        max: u64,
        why: &'static str,
    },
    #[error("HTTP method '{0}' is not a valid method token (RFC 9110 §9.1)")]
    BadMethod(String),
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("the operating system's random number generator failed: {0}")]
    Rng(String),
    #[error(transparent)]
    Jose(#[from] JoseError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("client '{client}' has neither token_endpoint nor issuer: set one of them")]
    NoEndpoint { client: String },
    #[error("client '{client}' has dpop = \"off\": it has no DPoP key to sign a proof with")]
    DpopOff { client: String },
    #[error(
        "client '{client}': key '{key}' is {alg}, which {server} does not accept for client assertions (accepted: {accepted})"
    )]
    AssertionAlg {
        client: String,
        key: String,
        alg: String,
        server: &'static str,
        accepted: String,
    },
    #[error(
        "client '{client}': the DPoP key and the assertion key are the same key (kid {kid}); {server} requires two keys"
    )]
    SameKey {
        client: String,
        kid: String,
        server: &'static str,
    },
    #[error("cannot build the request to {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url} {reason}; set token_endpoint")]
    Metadata { url: String, reason: String },
    #[error("cannot discover the token endpoint of {issuer}: {last}; set token_endpoint")]
    Discovery { issuer: String, last: String },
    #[error("the next link '{link}' is not a URL: {reason}")]
    BadLink { link: String, reason: String },
    #[error("{what} stopped before it finished: {reason}")]
    Stopped { what: &'static str, reason: String },
    #[error("{url} answered HTTP {status}: {error}{}{}",
        .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default(),
        server_advice(.error, .description.as_deref(), .clock.as_ref()))]
    Server {
        url: String,
        status: u16,
        error: String,
        description: Option<String>,
        /// The server's clock as its `Date` told it, when the response had one.
        clock: Option<ClockNote>,
    },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} answered HTTP {status} with a body keybound cannot read ({reason}): {body}")]
    Parse {
        url: String,
        status: u16,
        reason: String,
        body: String,
    },
    #[error(
        "{url} answered with a redirect (HTTP {status} to {location}); keybound does not follow redirects on token requests: configure the final URL"
    )]
    Redirected {
        url: String,
        status: u16,
        location: String,
    },
    #[error(
        "{origin} demanded a new DPoP nonce again right after one was supplied; giving up instead of looping"
    )]
    NonceLoop { origin: String },
    #[error(
        "the server returned token_type '{token_type}' although DPoP is required: refusing the downgraded token"
    )]
    Downgrade { token_type: String },
    #[error("scope guard: the token grants {} outside allowed_scopes ({}); the token was discarded",
        .extra.join(" "), .allowed.join(" "))]
    ScopeGuard {
        extra: Vec<String>,
        allowed: Vec<String>,
    },
    #[error(
        "circuit breaker open for {endpoint} after {failures} consecutive failures (last: {last}); next try in {retry_in_secs} s"
    )]
    BreakerOpen {
        endpoint: String,
        failures: u32,
        retry_in_secs: u64,
        last: String,
    },
    #[error("gave up after {attempts} attempts; last: {last}")]
    Exhausted {
        attempts: u32,
        last: Box<OAuthError>,
    },
    #[error("the server asked to retry after {secs} s, longer than keybound waits; last: {last}")]
    RetryTooLate { secs: u64, last: Box<OAuthError> },
    #[error(
        "refusing to follow a next link from {from} to {to}: pagination stays on the origin it started on"
    )]
    CrossOriginLink { from: String, to: String },
    #[error(
        "refusing to send client '{client}''s access token to {origin}: not in its api_origins ({allowed}); add the origin to api_origins if it is meant"
    )]
    ForeignOrigin {
        client: String,
        origin: String,
        allowed: String,
    },
}

/// Signs header and claims with a policy-approved key: signing input, device, compact form.
pub fn sign<C: Serialize>(
    key: &SigningKey,
    header: &Header,
    claims: &C,
) -> Result<String, OAuthError> {
    let input = jose::signing_input(header, claims)?;
    let signature = key.sign(key.alg().to_be_signed(input.as_bytes()))?;
    Ok(jose::compact(input, &signature))
}

/// `sign` for async callers: the device works on a signing thread, the task awaits the
/// reply; the reactor never blocks on the token.
pub async fn sign_async<C: Serialize>(
    key: &SigningKey,
    header: &Header,
    claims: &C,
) -> Result<String, OAuthError> {
    let input = jose::signing_input(header, claims)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    key.submit(
        key.alg().to_be_signed(input.as_bytes()),
        Box::new(move |result| {
            // The awaiting task may have been cancelled; then nobody wants the signature.
            let _ = tx.send(result);
        }),
    );
    let signature = rx.await.map_err(|_| TokenError::WorkersGone)??;
    Ok(jose::compact(input, &signature))
}

impl OAuthError {
    /// What kind of failure this is (see [`ErrorKind`]); errors of the layers below keep
    /// their own kind.
    pub fn kind(&self) -> ErrorKind {
        use OAuthError as E;
        match self {
            E::BadUrl { .. }
            | E::BadLifetime { .. }
            | E::BadMethod(_)
            | E::Empty { .. }
            | E::NoEndpoint { .. }
            | E::DpopOff { .. }
            | E::AssertionAlg { .. }
            | E::SameKey { .. }
            | E::Request { .. }
            | E::Jose(_) => ErrorKind::Configuration,
            E::Rng(_) | E::Token(_) | E::Key(KeyError::Token(_)) => ErrorKind::Device,
            E::Key(KeyError::Policy(_))
            | E::Downgrade { .. }
            | E::ScopeGuard { .. }
            | E::CrossOriginLink { .. }
            | E::ForeignOrigin { .. } => ErrorKind::Refused,
            E::Server { .. } => ErrorKind::Authentication,
            E::BreakerOpen { .. }
            | E::Exhausted { .. }
            | E::RetryTooLate { .. }
            | E::Stopped { .. } => ErrorKind::Transient,
            E::Transport(_) | E::Status { .. } if self.retryable() => ErrorKind::Transient,
            E::Transport(_)
            | E::Status { .. }
            | E::Parse { .. }
            | E::Redirected { .. }
            | E::NonceLoop { .. }
            | E::Metadata { .. }
            | E::Discovery { .. }
            | E::BadLink { .. } => ErrorKind::Upstream,
        }
    }

    /// The key is no longer on the device under the id it was approved with (deleted, or
    /// rotated under the same name): worth looking it up again by name.
    pub fn key_gone(&self) -> bool {
        matches!(
            self,
            OAuthError::Token(TokenError::KeyNotFound { .. })
                | OAuthError::Key(KeyError::Token(TokenError::KeyNotFound { .. }))
        )
    }

    /// Connect errors, timeouts, 5xx and 429 are worth another attempt.
    pub fn retryable(&self) -> bool {
        match self {
            OAuthError::Transport(t) => t.retryable(),
            OAuthError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

fn hint_suffix(error: &str) -> String {
    match response::hint(error) {
        "" => String::new(),
        h => format!("; {h}"),
    }
}

/// What follows a refusal: the clock when it is the likely cause, else the error code's
/// hint; then the measured offset, and whether a retry in the server's time was refused too.
fn server_advice(error: &str, description: Option<&str>, clock: Option<&ClockNote>) -> String {
    let about_time = names_time_claim(error, description);
    let Some(clock) = clock else {
        return if about_time {
            "; the server refused a time claim (iat/exp) and sent no Date header to measure its clock by: check this machine's clock (NTP)".into()
        } else {
            hint_suffix(error)
        };
    };
    let off = clock.offset;
    let far = off.unsigned_abs() >= TOLERATED_SKEW_SECS;
    let drifted = clock.drift.unsigned_abs() >= TOLERATED_SKEW_SECS;
    let retried = if clock.retried {
        ", and keybound's retry with iat/exp in the server's time was refused too"
    } else {
        ""
    };
    // Refusals a clock can cause; the offset, even when small, rules the clock in or out.
    let clocky = about_time || matches!(error, "invalid_client" | "invalid_dpop_proof");
    if clocky && (drifted || (about_time && far)) {
        return format!(
            "; the server's clock is {off:+} s from this machine's (server minus local, from its Date header){retried}: the refusal is most likely about time, not the kid, client id or audience; set the wrong clock right (NTP)"
        );
    }
    let mut out = hint_suffix(error);
    if !(clocky || far) {
        return out;
    }
    out.push_str(&format!(
        "; measured clock offset to this server: {off:+} s (server minus local)"
    ));
    if far {
        out.push_str(if clock.retried {
            "; a retry with iat/exp in the server's time was refused too, so the clock is not the cause"
        } else {
            "; the request's iat/exp were already in the server's time"
        });
    }
    out
}

/// Whether an error names a time claim or the clock.
pub(crate) fn names_time_claim(error: &str, description: Option<&str>) -> bool {
    let text = format!("{error} {}", description.unwrap_or("")).to_lowercase();
    let words = text.split(|c: char| !c.is_ascii_alphanumeric());
    let mut words = words.filter(|w| !w.is_empty());
    words.any(|w| {
        matches!(
            w,
            "iat" | "exp" | "nbf" | "expired" | "future" | "clock" | "time" | "skew" | "stale"
        )
    })
}

/// A fresh `jti`: 128 random bits from the OS, base64url (22 characters).
///
/// The bits come from the kernel's CSPRNG (`getrandom`) in blocks of 32 `jti`s per thread,
/// each byte handed out once (a `jti` is public once sent, so spent bytes need no
/// wiping): one system call per 32 proofs instead of one per proof.
pub fn new_jti() -> Result<String, OAuthError> {
    const JTI: usize = 16;
    const BLOCK: usize = 32 * JTI;
    thread_local! {
        static POOL: std::cell::RefCell<([u8; BLOCK], usize)> =
            const { std::cell::RefCell::new(([0; BLOCK], BLOCK)) };
    }
    POOL.with_borrow_mut(|(pool, used)| {
        if *used == BLOCK {
            getrandom::getrandom(pool).map_err(|e| OAuthError::Rng(e.to_string()))?;
            *used = 0;
        }
        let jti = jose::b64(&pool[*used..*used + JTI]);
        *used += JTI;
        Ok(jti)
    })
}

/// Seconds since the Unix epoch, for `iat`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_claims_are_named_as_words() {
        assert!(names_time_claim("invalid_client", Some("jwt expired")));
        assert!(names_time_claim(
            "invalid_request",
            Some("iat is in the future")
        ));
        assert!(names_time_claim(
            "invalid_client",
            Some("'exp' claim too far")
        ));
        assert!(!names_time_claim(
            "invalid_client",
            Some("The client_assertion JWT kid is invalid.")
        ));
        assert!(!names_time_claim(
            "invalid_scope",
            Some("expiration policy")
        ));
    }

    #[test]
    fn advice_blames_the_clock_only_when_it_is_likely() {
        let note = |offset, drift, retried| ClockNote {
            offset,
            drift,
            retried,
        };
        // Made in this machine's time, refused, the server 2 minutes ahead: the clock.
        let a = server_advice("invalid_client", None, Some(&note(120, 120, false)));
        assert!(
            a.contains("+120 s") && a.contains("most likely about time"),
            "{a}"
        );
        assert!(!a.contains("paste"), "{a}");
        // Refused again in the server's time for a reason that is not about time: the kid.
        let a = server_advice("invalid_client", None, Some(&note(120, 0, true)));
        assert!(
            a.contains("paste") && a.contains("the clock is not the cause"),
            "{a}"
        );
        // Refused again naming a time claim: the clock, and that the retry was refused too.
        let a = server_advice(
            "invalid_client",
            Some("jwt expired"),
            Some(&note(-120, 0, true)),
        );
        assert!(a.contains("-120 s") && a.contains("refused too"), "{a}");
        // In step: the hint and the offset that rules the clock out.
        let a = server_advice("invalid_client", None, Some(&note(0, 0, false)));
        assert!(a.contains("paste") && a.contains("+0 s"), "{a}");
        // A refusal no clock causes: just its hint.
        let a = server_advice("invalid_scope", None, Some(&note(0, 0, false)));
        assert!(!a.contains("clock"), "{a}");
        // No Date, a time claim named: say to check the clock.
        let a = server_advice("invalid_client", Some("iat is in the future"), None);
        assert!(a.contains("no Date header"), "{a}");
    }
}
