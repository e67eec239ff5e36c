//! Signing: the mechanism per algorithm (from the profile) and the device half of the
//! signing workers (`token::worker`), each owning one session. A `Session` is `Send` but not
//! `Sync`, so a session lives on exactly one worker thread; callers reach the workers through
//! one shared queue and get the answer by callback.
//!
//! A worker signs only with the object handle an approval proved (`Bound`). When that
//! handle cannot be used as it is (the object is gone, the session was lost, the library
//! was re-initialised), the worker does not look the key up by its `CKA_ID` again: it
//! answers `TokenError::Reapprove`, and the keyring approves the key again before it signs.

use std::sync::Arc;

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::connection::{Connection, Live, Pkcs11Failure};
use super::errors::object_gone;
use super::key_management::find_private;
use crate::jose::{Alg, JwsSignature, RawSignature, ToBeSigned};
use crate::token::profile::{EcdsaSignatureEncoding, SignMechanism};
use crate::token::worker::{self, Device, Threads, Workers as _};
use crate::token::{Binding, KeyInfo, Proof, ProofReply, Reply, TokenError};

/// The signing workers of one token: threads owning a session each, or one session used
/// on the caller's thread ([`Pool::start_inline`]).
pub(super) enum Pool {
    Threads(Threads<Worker>),
    /// A signer process with one session signs on the thread that reads its requests: no
    /// hop to a worker thread per signature.
    Inline(std::sync::Mutex<Worker>),
}

/// Which key a job signs with, without the public key.
#[derive(Clone)]
pub(super) struct KeyRef {
    id: Vec<u8>,
    label: String,
    alg: Alg,
}

/// The private-key object an approval proved: its handle in one library generation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bound {
    handle: ObjectHandle,
    generation: u64,
}

/// A signing worker's job: plain data.
pub(super) enum Job {
    /// Sign with the approved object.
    Sign {
        key: KeyRef,
        bound: Option<Bound>,
        tbs: ToBeSigned,
    },
    /// Find the key afresh by `CKA_ID` and sign: a proof of possession.
    Prove { key: KeyRef, tbs: ToBeSigned },
}

/// A signature and the object it was made with.
pub(super) struct Signed {
    signature: JwsSignature,
    bound: Bound,
}

impl Pool {
    pub(super) fn start(conn: Arc<Connection>, workers: usize) -> Result<Pool, TokenError> {
        let workers = (0..workers.max(1))
            .map(|_| Worker {
                conn: conn.clone(),
                session: None,
            })
            .collect();
        Ok(Pool::Threads(Threads::start("keybound-sign", workers)?))
    }

    pub(super) fn start_inline(conn: Arc<Connection>) -> Pool {
        Pool::Inline(std::sync::Mutex::new(Worker {
            conn,
            session: None,
        }))
    }

    fn run(&self, job: Job, reply: worker::Reply<Signed>) {
        match self {
            Pool::Threads(threads) => threads.submit(job, reply),
            Pool::Inline(worker) => {
                let outcome = worker
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .run(job);
                reply(outcome);
            }
        }
    }

    pub(super) fn submit(&self, key: &KeyInfo, binding: &Binding, tbs: ToBeSigned, reply: Reply) {
        let job = Job::Sign {
            key: KeyRef::of(key),
            bound: binding.get::<Bound>().copied(),
            tbs,
        };
        self.run(job, Box::new(move |r| reply(r.map(|s| s.signature))));
    }

    pub(super) fn prove(&self, key: &KeyInfo, tbs: ToBeSigned, reply: ProofReply) {
        let job = Job::Prove {
            key: KeyRef::of(key),
            tbs,
        };
        self.run(
            job,
            Box::new(move |r| {
                reply(r.map(|s| (Proof::Signed(s.signature), Binding::new(s.bound))))
            }),
        );
    }
}

impl KeyRef {
    fn of(key: &KeyInfo) -> KeyRef {
        KeyRef {
            id: key.id.clone(),
            label: key.label.clone(),
            alg: key.alg,
        }
    }
}

/// Owns one session (opened on first use, reopened after loss).
pub(super) struct Worker {
    conn: Arc<Connection>,
    session: Option<Live>,
}

impl Device for Worker {
    type Job = Job;
    type Answer = Signed;

    fn run(&mut self, job: Job) -> Result<Signed, TokenError> {
        match job {
            Job::Sign { key, bound, tbs } => self.sign(&key, bound, &tbs),
            Job::Prove { key, tbs } => self.prove(&key, &tbs),
        }
    }
}

/// The session is closed when the worker ends (after its last job).
impl Drop for Worker {
    fn drop(&mut self) {
        self.drop_session();
    }
}

impl Worker {
    fn drop_session(&mut self) {
        if let Some(live) = self.session.take() {
            self.conn.discard(live);
        }
    }

    /// One signature with the approved handle, or `Reapprove` when that handle cannot be
    /// trusted as it is: another library generation, an object that is gone, a lost session.
    fn sign(
        &mut self,
        key: &KeyRef,
        bound: Option<Bound>,
        tbs: &ToBeSigned,
    ) -> Result<Signed, TokenError> {
        crate::token::check_alg(&key.label, key.alg, tbs)?;
        let reapprove = || TokenError::Reapprove {
            label: key.label.clone(),
        };
        let Some(bound) = bound else {
            return Err(reapprove());
        };
        let mechanism = self.conn.profile.mechanism(key.alg)?;
        let conn = self.conn.clone();
        let result = self.ensure_session().and_then(|()| {
            let _gate = conn.read();
            let live = self.session.as_ref().ok_or(TokenError::WorkersGone)?;
            if live.generation() != bound.generation {
                // Re-initialised since the approval: the handle may name another object.
                return Err(TokenError::Reapprove {
                    label: key.label.clone(),
                }
                .into());
            }
            device_sign(&live.session, bound.handle, mechanism, tbs)
        });
        match result {
            Ok(bytes) => {
                let raw = self.raw_signature(key, mechanism, bytes);
                let signature = tbs.alg().to_jws_signature(raw)?;
                Ok(Signed { signature, bound })
            }
            Err(f) if object_gone(&f) || f.session_lost() || self.conn.probe().is_err() => {
                if object_gone(&f) {
                    let why = TokenError::from(f);
                    tracing::warn!(key = %key.label, "the approved key object is gone ({why}); approving the key again");
                } else {
                    tracing::warn!(key = %key.label, "signing session lost; reopening");
                    self.drop_session();
                }
                // A device that is gone is reported as such, not as a key to approve again.
                self.conn.reconnect_if_gone()?;
                Err(reapprove())
            }
            Err(f) => Err(f.into()),
        }
    }

    /// Finds the key by `CKA_ID` on this worker's session and signs once; on a lost session,
    /// one retry on a fresh one. Returns the signature and the handle it was made with.
    fn prove(&mut self, key: &KeyRef, tbs: &ToBeSigned) -> Result<Signed, TokenError> {
        crate::token::check_alg(&key.label, key.alg, tbs)?;
        let mechanism = self.conn.profile.mechanism(key.alg)?;
        let (bytes, bound) = worker::retry_once(
            self,
            |w| {
                let conn = w.conn.clone();
                // Finding the key makes SoftHSM read its object directory: a file another
                // process is writing would be read cut short, and that object (a rotation
                // record) missed by this process until the file changes again.
                let _turn = conn.take_turn();
                w.ensure_session().and_then(|()| {
                    let _gate = conn.read();
                    let live = w.session.as_ref().ok_or(TokenError::WorkersGone)?;
                    let token = &conn.description.token_label;
                    let handle = find_private(&live.session, &key.id, &key.label, token)?;
                    let bytes = device_sign(&live.session, handle, mechanism, tbs)?;
                    let bound = Bound {
                        handle,
                        generation: live.generation(),
                    };
                    Ok((bytes, bound))
                })
            },
            |w, f| {
                if !(f.session_lost() || w.conn.probe().is_err()) {
                    return Err(f.into());
                }
                tracing::warn!(key = %key.label, "signing session lost; reopening");
                w.drop_session();
                w.conn.reconnect_if_gone()
            },
            |w, f| match w.conn.probe() {
                Err(_) => TokenError::Unavailable {
                    reason: TokenError::from(f).to_string(),
                },
                Ok(()) => f.into(),
            },
        )?;
        let raw = self.raw_signature(key, mechanism, bytes);
        let signature = tbs.alg().to_jws_signature(raw)?;
        Ok(Signed { signature, bound })
    }

    fn raw_signature(
        &self,
        key: &KeyRef,
        mechanism: SignMechanism,
        bytes: Vec<u8>,
    ) -> RawSignature {
        let ecdsa_der = self.conn.profile.encoding.ecdsa_signature == EcdsaSignatureEncoding::Der;
        match mechanism {
            _ if key.alg.is_rsa() => RawSignature::Rsa(bytes),
            _ if ecdsa_der => RawSignature::EcdsaDer(bytes),
            _ => RawSignature::EcdsaFixed(bytes),
        }
    }

    /// A logged-in session of the current library generation. Called without the gate.
    fn ensure_session(&mut self) -> Result<(), Pkcs11Failure> {
        if let Some(live) = &self.session
            && !self.conn.is_current(live)
        {
            // Re-initialised under us: the old handle is dead (and is not closed).
            self.session = None;
        }
        if self.session.is_none() {
            self.session = Some(self.conn.open_session(false)?);
        }
        Ok(())
    }
}

/// The signing input for a hash-and-sign mechanism; a signer process gets only digests
/// (`token::signer`), so such a profile signs in-process only.
fn whole(tbs: &ToBeSigned) -> Result<Vec<u8>, Pkcs11Failure> {
    match tbs.message() {
        Some(m) => Ok(m.to_vec()),
        None => Err(TokenError::Profile(format!(
            "the profile signs {} with a hash-and-sign mechanism, which needs the whole \
             signing input, and signer processes are sent only its digest: use the prehash \
             mechanism (\"ecdsa\", \"rsa-pkcs\", \"rsa-pkcs-pss\") in the profile, or set \
             agent.signers = \"in-process\"",
            tbs.alg()
        ))
        .into()),
    }
}

/// The device call. Exactly the digest goes to prehash mechanisms (SoftHSM truncates
/// longer input silently); the signing input goes to hash-and-sign ones.
fn device_sign(
    session: &Session,
    key: ObjectHandle,
    mechanism: SignMechanism,
    tbs: &ToBeSigned,
) -> Result<Vec<u8>, Pkcs11Failure> {
    let pss = PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    };
    let digest = tbs.digest();
    let (m, data) = match mechanism {
        SignMechanism::Ecdsa => (Mechanism::Ecdsa, digest.as_bytes().to_vec()),
        SignMechanism::EcdsaSha256 => (Mechanism::EcdsaSha256, whole(tbs)?),
        SignMechanism::EcdsaSha384 => (Mechanism::EcdsaSha384, whole(tbs)?),
        SignMechanism::RsaPkcs => (Mechanism::RsaPkcs, digest.to_digest_info()),
        SignMechanism::Sha256RsaPkcs => (Mechanism::Sha256RsaPkcs, whole(tbs)?),
        SignMechanism::RsaPkcsPss => (Mechanism::RsaPkcsPss(pss), digest.as_bytes().to_vec()),
        SignMechanism::Sha256RsaPkcsPss => (Mechanism::Sha256RsaPkcsPss(pss), whole(tbs)?),
    };
    Ok(session.sign(&m, key, &data)?)
}
