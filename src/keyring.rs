//! Keys by name, judged by the policy before they may sign: the only way to get a
//! `SigningKey` is through `Keyring::signing_key`, which refuses keys the policy fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::TokenConfig;
use crate::jose::{Alg, JwsSignature, PublicKey, ToBeSigned};
use crate::policy::{self, PolicyError, Rules, Verdict};
use crate::token::pkcs11::Pkcs11Token;
#[cfg(feature = "tpm")]
use crate::token::tpm::TpmToken;
use crate::token::{Backend, KeyFacts, KeyInfo, KeyName, Reply, TokenError};

/// Errors of resolving a key for signing.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// The configured device and the policy that governs its keys. Cloning shares the device.
#[derive(Clone)]
pub struct Keyring {
    backend: Arc<dyn Backend>,
    rules: Rules,
    observer: Option<SignObserver>,
}

/// One signature the device made or refused, as an observer sees it.
#[derive(Debug)]
pub struct SignEvent<'a> {
    pub label: &'a str,
    pub alg: Alg,
    pub ok: bool,
    pub took: Duration,
}

/// Called after every signature of every `SigningKey` the keyring approves from then on
/// (the agent counts and logs there), so no call site can sign unrecorded. It runs on the
/// thread that signed: keep it short and non-blocking.
pub type SignObserver = Arc<dyn Fn(&SignEvent<'_>) + Send + Sync>;

/// A key the policy allowed to sign, with its `kid` (RFC 7638 thumbprint). Cheap to
/// clone: the agent hands one to every request.
#[derive(Clone)]
pub struct SigningKey {
    info: Arc<KeyInfo>,
    kid: Arc<str>,
    backend: Arc<dyn Backend>,
    observer: Option<SignObserver>,
}

impl Keyring {
    /// Opens the device named by the config. `sessions` overrides the number of signing
    /// sessions.
    pub fn open(
        token: &TokenConfig,
        rules: Rules,
        sessions: Option<usize>,
    ) -> Result<Keyring, TokenError> {
        let backend: Arc<dyn Backend> = match token {
            TokenConfig::Pkcs11(settings) => Arc::new(Pkcs11Token::open(settings, sessions)?),
            // One thread owns the TPM context: `sessions` does not apply.
            #[cfg(feature = "tpm")]
            TokenConfig::Tpm(settings) => Arc::new(TpmToken::open(settings)?),
        };
        Ok(Keyring {
            backend,
            rules,
            observer: None,
        })
    }

    /// Watches every signature of the keys approved from now on (see [`SignObserver`]).
    pub fn set_observer(&mut self, observer: SignObserver) {
        self.observer = Some(observer);
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub fn sessions(&self) -> usize {
        self.backend.sessions()
    }

    /// The facts and the verdict for one key.
    pub fn audit(&self, key: &KeyInfo) -> Result<(KeyFacts, Verdict), TokenError> {
        let facts = self.backend.facts(key)?;
        let verdict = policy::evaluate(&facts, &self.rules);
        Ok((facts, verdict))
    }

    /// Finds a key by label or `pkcs11:` URI and checks the policy once.
    pub fn signing_key(&self, name: &str) -> Result<SigningKey, KeyError> {
        let info = self.backend.find(&KeyName::parse(name)?)?;
        self.approve(info)
    }

    /// Checks the policy for a key already found.
    pub fn approve(&self, info: KeyInfo) -> Result<SigningKey, KeyError> {
        let (_, verdict) = self.audit(&info)?;
        if let Some(refusal) = verdict.refusal(&info.label) {
            return Err(refusal.into());
        }
        Ok(SigningKey {
            kid: info.public.thumbprint().into(),
            info: Arc::new(info),
            backend: self.backend.clone(),
            observer: self.observer.clone(),
        })
    }
}

impl SigningKey {
    pub fn label(&self) -> &str {
        &self.info.label
    }

    pub fn alg(&self) -> Alg {
        self.info.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public(&self) -> &PublicKey {
        &self.info.public
    }

    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    /// Signs on the device. Blocking.
    pub fn sign(&self, tbs: ToBeSigned) -> Result<JwsSignature, TokenError> {
        let start = Instant::now();
        let result = self.backend.sign(&self.info, tbs);
        self.observed(result.is_ok(), start);
        result
    }

    /// The device's raw rate for this key: see `Backend::bench_raw`.
    pub fn raw_rate(
        &self,
        tbs: &ToBeSigned,
        duration: std::time::Duration,
    ) -> Result<u64, TokenError> {
        self.backend.bench_raw(&self.info, tbs, duration)
    }

    /// Queues a signature; `reply` gets the outcome on a worker thread.
    pub fn submit(&self, tbs: ToBeSigned, reply: Reply) {
        if self.observer.is_none() {
            return self.backend.submit(&self.info, tbs, reply);
        }
        let (key, start) = (self.clone(), Instant::now());
        // The reply runs on a worker thread: the caller's span goes along, so the
        // observer's log line carries the request's fields (the agent's caller uid).
        let span = tracing::Span::current();
        self.backend.submit(
            &self.info,
            tbs,
            Box::new(move |result| {
                let _entered = span.enter();
                key.observed(result.is_ok(), start);
                reply(result);
            }),
        );
    }

    fn observed(&self, ok: bool, start: Instant) {
        if let Some(observer) = &self.observer {
            observer(&SignEvent {
                label: self.label(),
                alg: self.alg(),
                ok,
                took: start.elapsed(),
            });
        }
    }
}
