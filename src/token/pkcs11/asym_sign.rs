//! Signing: the mechanism per algorithm (from the profile) and the worker threads that each
//! own one session. A `Session` is `Send` but not `Sync`, so a session lives on exactly one
//! thread; callers reach the workers through one shared queue and get the answer by callback.
//!
//! A worker signs only with the object handle an approval proved (`Bound`). When that
//! handle cannot be used as it is (the object is gone, the session was lost, the library
//! was re-initialised), the worker does not look the key up by its `CKA_ID` again: it
//! answers `TokenError::Reapprove`, and the keyring approves the key again before it signs.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::connection::{Connection, Failure, Live};
use super::errors::object_gone;
use super::key_management::find_private;
use crate::jose::{Alg, JwsSignature, RawSignature, ToBeSigned};
use crate::token::profile::{EcdsaSignatureEncoding, SignMechanism};
use crate::token::{Binding, KeyInfo, Proof, ProofReply, Reply, TokenError};

/// The signing workers of one token.
pub(super) struct Pool {
    /// Multi-producer multi-consumer: any idle worker takes the next job. `None` once the
    /// pool is shutting down.
    jobs: Option<Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// Which key a job signs with, without the public key.
#[derive(Clone)]
struct KeyRef {
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

enum Job {
    Sign {
        key: KeyRef,
        bound: Option<Bound>,
        tbs: ToBeSigned,
        reply: Reply,
    },
    /// Find the key afresh by `CKA_ID` and sign: a proof of possession.
    Prove {
        key: KeyRef,
        tbs: ToBeSigned,
        reply: ProofReply,
    },
    /// Sign `tbs` over and over until `until`, then report the count.
    Raw {
        key: KeyRef,
        bound: Option<Bound>,
        tbs: ToBeSigned,
        until: Instant,
        done: mpsc::Sender<Result<u64, TokenError>>,
    },
}

impl Pool {
    pub(super) fn start(conn: Arc<Connection>, workers: usize) -> Pool {
        let (jobs, queue) = crossbeam_channel::unbounded();
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let worker = Worker {
                conn: conn.clone(),
                session: None,
            };
            let queue = queue.clone();
            match std::thread::Builder::new()
                .name(format!("keybound-sign-{i}"))
                .spawn(move || worker.run(queue))
            {
                Ok(handle) => handles.push(handle),
                Err(e) => tracing::error!("cannot start signing worker {i}: {e}"),
            }
        }
        Pool {
            jobs: Some(jobs),
            workers: handles,
        }
    }

    /// Queues a job; hands it back when the workers are gone.
    fn send(&self, job: Job) -> Result<(), Box<Job>> {
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(job)),
        }
    }

    pub(super) fn submit(&self, key: &KeyInfo, binding: &Binding, tbs: ToBeSigned, reply: Reply) {
        let job = Job::Sign {
            key: KeyRef::of(key),
            bound: binding.get::<Bound>().copied(),
            tbs,
            reply,
        };
        if let Err(job) = self.send(job)
            && let Job::Sign { reply, .. } = *job
        {
            reply(Err(TokenError::WorkersGone));
        }
    }

    pub(super) fn prove(&self, key: &KeyInfo, tbs: ToBeSigned, reply: ProofReply) {
        let job = Job::Prove {
            key: KeyRef::of(key),
            tbs,
            reply,
        };
        if let Err(job) = self.send(job)
            && let Job::Prove { reply, .. } = *job
        {
            reply(Err(TokenError::WorkersGone));
        }
    }

    /// One raw job per worker, all running until the same deadline.
    pub(super) fn bench_raw(
        &self,
        key: &KeyInfo,
        binding: &Binding,
        tbs: &ToBeSigned,
        duration: Duration,
    ) -> Result<u64, TokenError> {
        let (done, results) = mpsc::channel();
        let until = Instant::now() + duration;
        for _ in 0..self.workers.len() {
            let job = Job::Raw {
                key: KeyRef::of(key),
                bound: binding.get::<Bound>().copied(),
                tbs: tbs.clone(),
                until,
                done: done.clone(),
            };
            self.send(job).map_err(|_| TokenError::WorkersGone)?;
        }
        drop(done);
        results.iter().try_fold(0, |sum, r| Ok(sum + r?))
    }
}

/// Closing the queue ends each worker's loop once the queued jobs are done; joining them
/// means no thread is inside the PKCS#11 module, or still closing its session, when the
/// process exits (SoftHSM crashes if its globals are torn down under a running call).
impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        // A reply runs on a worker and may hold the last reference to the pool; that
        // worker cannot join itself (EDEADLK). It ends on its own once the queue is closed.
        let me = std::thread::current().id();
        for handle in self.workers.drain(..) {
            if handle.thread().id() == me {
                continue;
            }
            if handle.join().is_err() {
                tracing::error!("a signing worker panicked");
            }
        }
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
struct Worker {
    conn: Arc<Connection>,
    session: Option<Live>,
}

impl Worker {
    fn run(mut self, queue: Receiver<Job>) {
        for job in queue.iter() {
            match job {
                Job::Sign {
                    key,
                    bound,
                    tbs,
                    reply,
                } => reply(self.sign(&key, bound, &tbs)),
                Job::Prove { key, tbs, reply } => reply(self.prove(&key, &tbs)),
                Job::Raw {
                    key,
                    bound,
                    tbs,
                    until,
                    done,
                } => {
                    // The bench waits for this; if it gave up, there is nobody to tell.
                    let _ = done.send(self.raw(&key, bound, &tbs, until));
                }
            }
        }
        self.drop_session();
    }

    fn drop_session(&mut self) {
        if let Some(live) = self.session.take() {
            self.conn.discard(live);
        }
    }

    fn sign(
        &mut self,
        key: &KeyRef,
        bound: Option<Bound>,
        tbs: &ToBeSigned,
    ) -> Result<JwsSignature, TokenError> {
        let raw = self.sign_bound(key, bound, tbs)?;
        Ok(tbs.alg().to_jws_signature(raw)?)
    }

    fn raw(
        &mut self,
        key: &KeyRef,
        bound: Option<Bound>,
        tbs: &ToBeSigned,
        until: Instant,
    ) -> Result<u64, TokenError> {
        let mut n = 0;
        while Instant::now() < until {
            self.sign_bound(key, bound, tbs)?;
            n += 1;
        }
        Ok(n)
    }

    /// One signature with the approved handle, or `Reapprove` when that handle cannot be
    /// trusted as it is: another library generation, an object that is gone, a lost session.
    fn sign_bound(
        &mut self,
        key: &KeyRef,
        bound: Option<Bound>,
        tbs: &ToBeSigned,
    ) -> Result<RawSignature, TokenError> {
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
            Ok(bytes) => Ok(self.raw_signature(key, mechanism, bytes)),
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
    fn prove(&mut self, key: &KeyRef, tbs: &ToBeSigned) -> Result<(Proof, Binding), TokenError> {
        crate::token::check_alg(&key.label, key.alg, tbs)?;
        let mechanism = self.conn.profile.mechanism(key.alg)?;
        let mut retried = false;
        loop {
            let conn = self.conn.clone();
            let result = self.ensure_session().and_then(|()| {
                let _gate = conn.read();
                let live = self.session.as_ref().ok_or(TokenError::WorkersGone)?;
                let token = &conn.description.token_label;
                let handle = find_private(&live.session, &key.id, &key.label, token)?;
                let bytes = device_sign(&live.session, handle, mechanism, tbs)?;
                let bound = Bound {
                    handle,
                    generation: live.generation(),
                };
                Ok((bytes, bound))
            });
            match result {
                Ok((bytes, bound)) => {
                    let raw = self.raw_signature(key, mechanism, bytes);
                    let signature = tbs.alg().to_jws_signature(raw)?;
                    return Ok((Proof::Signed(signature), Binding::new(bound)));
                }
                Err(f) if !retried && (f.session_lost() || self.conn.probe().is_err()) => {
                    tracing::warn!(key = %key.label, "signing session lost; reopening");
                    retried = true;
                    self.drop_session();
                    self.conn.reconnect_if_gone()?;
                }
                Err(f) if retried && self.conn.probe().is_err() => {
                    let reason = TokenError::from(f).to_string();
                    return Err(TokenError::Unavailable { reason });
                }
                Err(f) => return Err(f.into()),
            }
        }
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
    fn ensure_session(&mut self) -> Result<(), Failure> {
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

/// The device call. Exactly the digest goes to prehash mechanisms (SoftHSM truncates
/// longer input silently); the signing input goes to hash-and-sign ones.
fn device_sign(
    session: &Session,
    key: ObjectHandle,
    mechanism: SignMechanism,
    tbs: &ToBeSigned,
) -> Result<Vec<u8>, Failure> {
    let pss = PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    };
    let digest = tbs.digest();
    let (m, data) = match mechanism {
        SignMechanism::Ecdsa => (Mechanism::Ecdsa, digest.as_bytes().to_vec()),
        SignMechanism::EcdsaSha256 => (Mechanism::EcdsaSha256, tbs.message().to_vec()),
        SignMechanism::EcdsaSha384 => (Mechanism::EcdsaSha384, tbs.message().to_vec()),
        SignMechanism::RsaPkcs => (Mechanism::RsaPkcs, digest.to_digest_info()),
        SignMechanism::Sha256RsaPkcs => (Mechanism::Sha256RsaPkcs, tbs.message().to_vec()),
        SignMechanism::RsaPkcsPss => (Mechanism::RsaPkcsPss(pss), digest.as_bytes().to_vec()),
        SignMechanism::Sha256RsaPkcsPss => {
            (Mechanism::Sha256RsaPkcsPss(pss), tbs.message().to_vec())
        }
    };
    Ok(session.sign(&m, key, &data)?)
}
