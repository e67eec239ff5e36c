//! The OAuth layer's errors: one variant per thing a user can act on, its [`ErrorKind`],
//! and the advice a server's refusal gets (the error code's hint, or the clock).

use super::response;
use super::state::{ClockNote, TOLERATED_SKEW_SECS};
use super::transport::TransportError;
use crate::error::ErrorKind;
use crate::jose::JoseError;
use crate::keyring::KeyError;
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
    /// Pagination that would not end: a page linked again, or more pages than any listing.
    #[error("--paginate stopped at {url}: {reason}")]
    EndlessPages { url: String, reason: String },
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
    /// A success answer of a token endpoint that is not a token response: described by
    /// its shape only, since its body may hold the token.
    #[error(
        "{url} answered HTTP {status} with a body that is not an RFC 6749 §5.1 token response: {reason} (the body is not shown: it may hold an access token)"
    )]
    TokenResponse {
        url: String,
        status: u16,
        reason: String,
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
    #[error(
        "the pages from {url} on add up to more than {limit} bytes, the most this caller takes; raise the limit (agent.max_call_bytes) or page by hand"
    )]
    PagesTooLarge { url: String, limit: usize },
    /// The caller's rule does not allow a URL the call would send to (a page's link).
    #[error("{0}")]
    NotAllowed(String),
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
            E::Rng(_) => ErrorKind::Device,
            E::Token(e) => e.kind(),
            E::Key(e) => e.kind(),
            E::Downgrade { .. }
            | E::ScopeGuard { .. }
            | E::CrossOriginLink { .. }
            | E::ForeignOrigin { .. }
            | E::PagesTooLarge { .. }
            | E::NotAllowed(_) => ErrorKind::Refused,
            E::Server { .. } => ErrorKind::Authentication,
            E::BreakerOpen { .. } | E::Exhausted { .. } | E::RetryTooLate { .. } => {
                ErrorKind::Transient
            }
            // A spawned task that failed or panicked (docs/agent-api.yaml: 500 internal).
            E::Stopped { .. } => ErrorKind::Internal,
            E::Transport(_) | E::Status { .. } if self.retryable() => ErrorKind::Transient,
            E::Transport(_)
            | E::Status { .. }
            | E::Parse { .. }
            | E::TokenResponse { .. }
            | E::Redirected { .. }
            | E::NonceLoop { .. }
            | E::Metadata { .. }
            | E::Discovery { .. }
            | E::BadLink { .. }
            | E::EndlessPages { .. } => ErrorKind::Upstream,
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

pub(crate) fn hint_suffix(error: &str) -> String {
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

    #[test]
    fn kinds_say_what_a_caller_can_do() {
        use ErrorKind::*;
        let status = |status| OAuthError::Status {
            url: "https://as.example/token".into(),
            status,
            body: String::new(),
        };
        assert_eq!(status(503).kind(), Transient);
        assert_eq!(status(429).kind(), Transient);
        assert_eq!(status(404).kind(), Upstream);
        let transport = |t| OAuthError::Transport(t).kind();
        let (url, reason) = (String::from("u"), String::from("r"));
        assert_eq!(
            transport(TransportError::Timeout {
                url: url.clone(),
                secs: 1.0
            }),
            Transient
        );
        assert_eq!(transport(TransportError::Other { url, reason }), Upstream);
        let discovery = OAuthError::Discovery {
            issuer: "https://as.example".into(),
            last: "404".into(),
        };
        assert_eq!(discovery.kind(), Upstream);
        let no_endpoint = OAuthError::NoEndpoint { client: "c".into() };
        assert_eq!(no_endpoint.kind(), Configuration);
        let scope = OAuthError::ScopeGuard {
            extra: vec!["a".into()],
            allowed: vec![],
        };
        assert_eq!(scope.kind(), Refused);
        let server = OAuthError::Server {
            url: "u".into(),
            status: 401,
            error: "invalid_client".into(),
            description: None,
            clock: None,
        };
        assert_eq!(server.kind(), Authentication);
        assert_eq!(OAuthError::Token(TokenError::WorkersGone).kind(), Device);
        let locked = TokenError::PinLocked { token: "t".into() };
        assert_eq!(OAuthError::Token(locked).kind(), Authentication);
        let exhausted = OAuthError::Exhausted {
            attempts: 3,
            last: Box::new(status(503)),
        };
        assert_eq!(exhausted.kind(), Transient);
    }
}
