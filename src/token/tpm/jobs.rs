//! The TPM worker's jobs: plain data in (a key blob, a `ToBeSigned`), one answer out, run on
//! the single thread of a `token::worker` that owns the context (`context::Tpm`).

use std::sync::Arc;

use super::asym_sign;
use super::context::Tpm;
use super::key_management::{self, Created};
use super::store::StoredKey;
use crate::jose::{Alg, JwsSignature, ToBeSigned};
use crate::token::worker::{self, Device};
use crate::token::{KeyFacts, Proof, TokenError};

/// A job for the TPM's worker: plain data.
pub(super) enum Job {
    /// The TPM's manufacturer and model, and the storage primary's name.
    Identify,
    /// One command that must reach the TPM.
    Ping,
    Create {
        alg: Alg,
        rsa_bits: u32,
    },
    Facts(Arc<StoredKey>),
    /// Proof of possession: a signature, or for a key with an auth value, the TPM's own
    /// binding of the key blob to its public area (`TPM2_Load`).
    Prove(Arc<StoredKey>, ToBeSigned),
    Sign(Arc<StoredKey>, ToBeSigned),
}

/// The answer to each [`Job`], in the same order.
pub(super) enum Answer {
    Identified {
        manufacturer: String,
        model: String,
        primary: Vec<u8>,
    },
    Pong,
    Created(Created),
    Facts(KeyFacts),
    Proved(Proof),
    Signed(JwsSignature),
}

impl Device for Tpm {
    type Job = Job;
    type Answer = Answer;

    fn run(&mut self, job: Job) -> Result<Answer, TokenError> {
        match job {
            Job::Identify => self.retrying(|t| {
                let (manufacturer, model) = t.identity()?;
                let (_, primary) = t.primary()?;
                Ok(Answer::Identified {
                    manufacturer,
                    model,
                    primary,
                })
            }),
            Job::Ping => self.retrying(|t| t.ping().map(|()| Answer::Pong)),
            Job::Create { alg, rsa_bits } => self
                .retrying(|t| key_management::create(t, alg, rsa_bits))
                .map(Answer::Created),
            Job::Facts(key) => self
                .retrying(|t| key_management::facts(t, &key))
                .map(Answer::Facts),
            Job::Prove(key, tbs) => {
                let proof = if key.auth {
                    // Signing would need the key's auth value (a wrong one is a
                    // dictionary-attack strike); loading it needs none and binds the public
                    // area to the key.
                    self.retrying(|t| t.load(&key).map(|_| ()))
                        .map(|()| Proof::LoadedByDevice)
                } else {
                    asym_sign::sign(self, &key, &tbs).map(Proof::Signed)
                };
                proof.map(Answer::Proved)
            }
            Job::Sign(key, tbs) => asym_sign::sign(self, &key, &tbs).map(Answer::Signed),
        }
    }

    /// Nothing stays loaded in the TPM while no work is queued.
    fn idle(&mut self) {
        self.release();
    }
}

/// A worker answered a job with the answer to another: a bug, reported rather than
/// trusted.
pub(super) fn mismatch(job: &str) -> TokenError {
    TokenError::Internal(format!(
        "the TPM worker gave a {job} job another job's answer"
    ))
}

/// The TPM's single worker thread.
pub(super) fn start(tpm: Tpm) -> Result<worker::Threads<Tpm>, TokenError> {
    worker::Threads::start("keybound-tpm", vec![tpm])
}
