//! OAuth on top of JOSE and the token: `private_key_jwt` assertions (RFC 7523) and DPoP
//! proofs (RFC 9449). Claim builders are pure; `sign`/`sign_async` are where a JWS meets a
//! key; `client` talks to token endpoints and `api` to resource servers. The client's jobs
//! have a file each: `discovery`, `token_endpoint`, `nonce` (the one nonce and clock retry
//! policy), `retry` (attempts, backoff, breaker); HTTP goes through `transport`, metrics
//! through `observe`; `error` holds [`OAuthError`] and its kinds.

pub mod api;
pub mod assertion;
pub mod cache;
pub mod client;
mod discovery;
pub mod dpop;
mod error;
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

use serde::Serialize;

pub use self::error::OAuthError;
pub(crate) use self::error::{hint_suffix, names_time_claim};
use crate::jose::{self, Header};
use crate::keyring::SigningKey;
use crate::token::TokenError;

/// Signs header and claims with a policy-approved key: signing input, device, compact form.
pub fn sign<C: Serialize>(
    key: &SigningKey,
    header: &Header,
    claims: &C,
) -> Result<String, OAuthError> {
    let input = jose::signing_input_of(header, claims)?;
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
    let input = jose::signing_input_of(header, claims)?;
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

/// Seconds since the Unix epoch, for `iat` (one clock for every layer: `jose`).
pub use crate::jose::unix_now;
