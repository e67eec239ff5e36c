//! Signing: the mechanism per algorithm (from the profile) and the worker threads that each
//! own one session. A `Session` is `Send` but not `Sync`, so a session lives on exactly one
//! thread; callers reach the workers through one shared queue and get the answer by callback.

use std::collections::HashMap;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use super::connection::{Connection, Failure, Live};
use super::key_management::find_private;
use crate::jose::{Alg, JwsSignature, RawSignature, ToBeSigned};
use crate::token::profile::{EcdsaSignatureEncoding, SignMechanism};
use crate::token::{KeyInfo, Reply, TokenError};

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

enum Job {
    Sign {
        key: KeyRef,
        tbs: ToBeSigned,
        reply: Reply,
    },
    /// Sign `tbs` over and over until `until`, then report the count.
    Raw {
        key: KeyRef,
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
                handles: HashMap::new(),
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

    pub(super) fn submit(&self, key: &KeyInfo, tbs: ToBeSigned, reply: Reply) {
        let job = Job::Sign {
            key: KeyRef::of(key),
            tbs,
            reply,
        };
        if let Err(job) = self.send(job)
            && let Job::Sign { reply, .. } = *job
        {
            reply(Err(TokenError::WorkersGone));
        }
    }

    /// One raw job per worker, all running until the same deadline.
    pub(super) fn bench_raw(
        &self,
        key: &KeyInfo,
        tbs: &ToBeSigned,
        duration: Duration,
    ) -> Result<u64, TokenError> {
        let (done, results) = mpsc::channel();
        let until = Instant::now() + duration;
        for _ in 0..self.workers.len() {
            let job = Job::Raw {
                key: KeyRef::of(key),
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
        for handle in self.workers.drain(..) {
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

/// Owns one session (opened on first use, reopened after loss) and a cache of key handles.
struct Worker {
    conn: Arc<Connection>,
    session: Option<Live>,
    handles: HashMap<Vec<u8>, ObjectHandle>,
}

impl Worker {
    fn run(mut self, queue: Receiver<Job>) {
        for job in queue.iter() {
            match job {
                Job::Sign { key, tbs, reply } => reply(self.sign(&key, &tbs)),
                Job::Raw {
                    key,
                    tbs,
                    until,
                    done,
                } => {
                    // The bench waits for this; if it gave up, there is nobody to tell.
                    let _ = done.send(self.raw(&key, &tbs, until));
                }
            }
        }
        self.drop_session();
    }

    fn drop_session(&mut self) {
        self.handles.clear();
        if let Some(live) = self.session.take() {
            self.conn.discard(live);
        }
    }

    fn sign(&mut self, key: &KeyRef, tbs: &ToBeSigned) -> Result<JwsSignature, TokenError> {
        let raw = self.sign_raw(key, tbs)?;
        Ok(tbs.alg().to_jws_signature(raw)?)
    }

    fn raw(&mut self, key: &KeyRef, tbs: &ToBeSigned, until: Instant) -> Result<u64, TokenError> {
        let mut n = 0;
        while Instant::now() < until {
            self.sign_raw(key, tbs)?;
            n += 1;
        }
        Ok(n)
    }

    /// One signature; on a lost session or stale handle, one retry on a fresh session.
    fn sign_raw(&mut self, key: &KeyRef, tbs: &ToBeSigned) -> Result<RawSignature, TokenError> {
        crate::token::check_alg(&key.label, key.alg, tbs)?;
        let profile = &self.conn.profile;
        let mechanism = profile.mechanism(key.alg)?;
        let ecdsa_der = profile.encoding.ecdsa_signature == EcdsaSignatureEncoding::Der;
        let mut retried = false;
        loop {
            let conn = self.conn.clone();
            let result = self.ensure_session().and_then(|()| {
                let _gate = conn.read();
                let (session, handle) = self.ready(key)?;
                device_sign(session, handle, mechanism, tbs)
            });
            match result {
                Ok(bytes) => {
                    return Ok(match mechanism {
                        _ if key.alg.is_rsa() => RawSignature::Rsa(bytes),
                        _ if ecdsa_der => RawSignature::EcdsaDer(bytes),
                        _ => RawSignature::EcdsaFixed(bytes),
                    });
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

    /// A logged-in session of the current library generation. Called without the gate.
    fn ensure_session(&mut self) -> Result<(), Failure> {
        if let Some(live) = &self.session
            && !self.conn.is_current(live)
        {
            // Re-initialised under us: the old handle is dead (and is not closed).
            self.session = None;
            self.handles.clear();
        }
        if self.session.is_none() {
            self.handles.clear();
            self.session = Some(self.conn.open_session(false)?);
        }
        Ok(())
    }

    /// This worker's session and the key's handle. Called with the gate held.
    fn ready(&mut self, key: &KeyRef) -> Result<(&Session, ObjectHandle), Failure> {
        let Some(live) = self.session.as_ref() else {
            return Err(TokenError::WorkersGone.into());
        };
        let handle = match self.handles.get(&key.id) {
            Some(h) => *h,
            None => {
                let token = &self.conn.description.token_label;
                let h = find_private(&live.session, &key.id, &key.label, token)?;
                self.handles.insert(key.id.clone(), h);
                h
            }
        };
        Ok((&live.session, handle))
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
