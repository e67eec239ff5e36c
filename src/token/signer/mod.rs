//! Signer processes: the device in child processes of `keybound serve`, so the agent that
//! parses callers' HTTP never loads the PKCS#11 module or the TSS, never reads a PIN file,
//! and survives a module that crashes.
//!
//! [`Signers`] is a [`Backend`] like the in-process ones. The first process (the keeper)
//! also answers the key-management calls; signatures go to any process with a free
//! session. The profile says how many: SoftHSM serialises inside one process, so it gets a
//! process per session (`[sessions] per_signer = 1`); a TPM or a device that is one serial
//! engine, one process; any other, one process with every session.
//!
//! A process that dies is restarted with backoff; the requests it had in flight are retried
//! once on another process that is up, and answered `TokenError::Unavailable` (503 with
//! `Retry-After` from the agent) otherwise. A process signs with a key only after it was
//! told the key (id, algorithm, approved public key) and its own signature over a fresh
//! challenge verified under that public key (`child`); approval itself stays in the keyring.
//!
//! Over 400 lines: dispatch, the pipes and the restarts are one state machine, kept in one
//! file.

mod child;
pub(crate) mod wire;

pub use child::run as run_child;

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use wire::{Answer, Outcome, Ready, Request, Role, Start, challenge};

use super::{
    Backend, Binding, DeviceSettings, KeyFacts, KeyInfo, Label, Listing, Proof, ProofReply, Reply,
    TokenDescription, TokenError,
};
use crate::jose::{Alg, JwsSignature, ToBeSigned};

/// Environment variables a signer process gets when they are set (what PKCS#11 modules
/// and the TSS read), besides the PIN's and the TPM key auth's variables. Everything else
/// of the agent's environment stays out.
pub const PASSED_ENV: &[&str] = &[
    "SOFTHSM2_CONF",
    "YUBIHSM_PKCS11_CONF",
    "OPENSC_CONF",
    "P11_KIT_SERVER_ADDRESS",
    "XDG_RUNTIME_DIR",
    "TPM2_PKCS11_STORE",
    "TPM2_PKCS11_TCTI",
    "TPM2_PKCS11_LOG_LEVEL",
    "TSS2_LOG",
    "TPM2TOOLS_TCTI",
    "ChrystokiConfigurationPath",
    "LD_LIBRARY_PATH",
    "HOME",
    // Where a TPM's key blobs and records are when `state_dir` is not set.
    "XDG_STATE_HOME",
    "TMPDIR",
    "RUST_LOG",
];

/// Restart backoff: from the first, doubling to the last; reset after a process lived
/// [`STABLE`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const STABLE: Duration = Duration::from_secs(30);
/// What a restarted process has to get ready beyond `hung_after`: its start may wait for
/// the host lock first (`host_lock::PATIENCE`, 10 s).
const START_GRACE: Duration = Duration::from_secs(15);

/// How signer processes are started.
#[derive(Clone, Debug)]
pub struct SignerSpawn {
    pub device: DeviceSettings,
    /// The agent's `-v` count, passed on.
    pub verbose: u8,
    /// Sessions in all (`bench --sessions`); `None`: as configured.
    pub sessions: Option<usize>,
    /// For `keybound bench`: the processes also measure their raw rate ([`Backend::raw`]).
    pub bench: bool,
    /// A process that holds signatures and answers none for this long is killed and
    /// restarted (its module is stuck).
    pub hung_after: Duration,
    /// The runtime of the tasks that await signatures (the agent's): the processes'
    /// answers are read there, so an answer wakes the task that awaits it on the same
    /// thread, with no reader thread in between.
    pub runtime: tokio::runtime::Handle,
}

/// Counters for `/healthz` and the metrics.
#[derive(Debug, Default)]
pub struct SignerStats {
    /// Processes started after the first start (one per restart).
    pub restarts: AtomicU64,
    /// Processes that ended while the agent ran.
    pub exits: AtomicU64,
    /// Requests retried on another process after theirs died.
    pub retried: AtomicU64,
    /// Processes killed because they held signatures and answered none for too long.
    pub hung: AtomicU64,
    /// Requests answered "unavailable" because their process died and none other was up.
    pub unavailable: AtomicU64,
}

/// What the stats say now, with the processes up.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SignerReport {
    pub processes: usize,
    pub up: usize,
    pub pids: Vec<Option<u32>>,
    pub sessions: usize,
    pub restarts: u64,
    pub exits: u64,
    pub retried: u64,
    pub unavailable: u64,
    pub hung: u64,
}

/// The signer processes of one device.
pub(crate) struct Signers {
    shared: Arc<Shared>,
    /// The supervisor threads and the watchdog, until [`Signers::stop_now`] ends them.
    supervisors: Mutex<Vec<JoinHandle<()>>>,
}

/// The binding of a key approved through signer processes: each process proves the key
/// itself before it signs with it, so the agent holds no device handle. It holds the key
/// as approved, shared by every job that signs with it (no copy per signature).
struct Remote {
    key: Arc<KeyInfo>,
}

struct Shared {
    spawn: SignerSpawn,
    description: Mutex<TokenDescription>,
    sessions: usize,
    state: Mutex<State>,
    stats: SignerStats,
    stopping: AtomicBool,
    /// Algorithms whose profile mechanism hashes on the device: their `Sign` carries the
    /// signing input, not only its digest (the keeper's `Ready`).
    whole_input: Vec<Alg>,
    /// Each slot's process while it runs (spawned, not yet reaped): what `Drop` and the
    /// watchdog kill when one will not end or answer.
    pids: Mutex<Vec<Option<Kill>>>,
}

struct State {
    procs: Vec<Proc>,
    /// Signatures waiting for a free session.
    queue: VecDeque<Job>,
}

struct Proc {
    role: Role,
    sessions: usize,
    link: Option<Arc<Link>>,
    in_flight: usize,
    /// Key ids this incarnation was told about.
    told: HashSet<Vec<u8>>,
}

/// The pipes to one running process.
struct Link {
    /// Its slot in `State::procs`.
    index: usize,
    pid: u32,
    stdin: Mutex<Writer>,
    pending: Mutex<Pending>,
    next: AtomicU64,
    /// When it last answered a signature, or was sent one while it held none: what the
    /// watchdog measures a stuck process by.
    progress: Mutex<Instant>,
}

/// The write end of a process's stdin, and what waits to go into it.
///
/// A `Sign` goes out at once only while the process holds fewer written and unanswered
/// requests than its low-water mark (`low`); otherwise it waits in `outbox` (the process
/// has work, and will answer) until the runtime has run every task that was ready (a task
/// on the agent's runtime that yields once, then writes: `flush_due`), or until an answer
/// brings the process below the mark, whichever comes first. The answers of one batch
/// wake their callers together, and the requests those callers make next go out in one
/// write, which the process reads in one, while it still signs the last of the batch
/// before. Anything else (a key told, a management call) goes out at once, after what
/// waits before it.
///
/// The mark: a process that signs on the thread that reads (one session) keeps reading
/// what was written while it signs, so it runs dry only when it holds nothing: 1. A
/// process whose sessions sign on their own threads (a TPM, a generic module) needs two
/// requests per session queued at all times, or a session waits (and a TPM flushes its
/// loaded key).
struct Writer {
    stdin: Option<ChildStdin>,
    outbox: Vec<u8>,
    /// Frames in `outbox` the signing loop answers (not management calls).
    waiting: usize,
    /// Such frames written and not answered yet.
    open: usize,
    /// Below this many open frames the process is about to run dry.
    low: usize,
    /// A task is on its way to write the outbox.
    flush_due: bool,
}

impl Writer {
    fn new(stdin: ChildStdin, ready: &Ready) -> Writer {
        let sessions = ready.per_signer.unwrap_or(ready.sessions).max(1);
        Writer {
            stdin: Some(stdin),
            outbox: Vec::with_capacity(4096),
            waiting: 0,
            open: 0,
            low: if ready.inline { 1 } else { 2 * sessions + 1 },
            flush_due: false,
        }
    }

    /// Writes the outbox; an error means the process is gone.
    fn write(&mut self) -> std::io::Result<()> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        let written = stdin.write_all(&self.outbox).and_then(|()| stdin.flush());
        self.outbox.clear();
        self.open += std::mem::take(&mut self.waiting);
        written
    }

    /// Ends the pipe: the process sees the end of its input.
    fn close(&mut self) {
        self.stdin = None;
        self.outbox.clear();
        self.waiting = 0;
    }
}

#[derive(Default)]
struct Pending {
    /// By request number: ours, counted up, so no SipHash needed.
    waiting: FxHashMap<u64, Waiter>,
    /// The process ended: nothing more is answered.
    closed: bool,
}

/// One request of a batch for a process, and who waits for its answer.
enum Outgoing {
    /// A call or a key told: its request, made by the caller.
    Request(Request, Waiter),
    /// A job: its request is written from the job itself (no copy of its id or digest).
    Job(Job),
}

enum Waiter {
    Job(Job),
    /// A key told to the process ahead of a signature; its answer is only logged.
    Tell,
    Call(Box<dyn FnOnce(Outcome) + Send>),
}

struct Job {
    key: Arc<KeyInfo>,
    work: Work,
    retried: bool,
}

enum Work {
    Sign { tbs: ToBeSigned, reply: Reply },
    Prove { tbs: ToBeSigned, reply: ProofReply },
}

impl Job {
    fn fail(self, e: TokenError) {
        match self.work {
            Work::Sign { reply, .. } => reply(Err(e)),
            Work::Prove { reply, .. } => reply(Err(e)),
        }
    }

    fn answer(self, outcome: Outcome) {
        let key = self.key;
        match self.work {
            Work::Sign { reply, .. } => reply(match outcome {
                Ok(Answer::Signature(bytes)) => Ok(JwsSignature::from(bytes)),
                Ok(_) => Err(unexpected()),
                Err(e) => Err(e),
            }),
            Work::Prove { reply, .. } => reply(match outcome {
                Ok(Answer::Proof(Some(bytes))) => Ok((
                    Proof::Signed(JwsSignature::from(bytes)),
                    Binding::new(Remote { key }),
                )),
                Ok(Answer::Proof(None)) => {
                    Ok((Proof::LoadedByDevice, Binding::new(Remote { key })))
                }
                Ok(_) => Err(unexpected()),
                Err(e) => Err(e),
            }),
        }
    }

    /// Appends the job's request as frame `n`. A signature goes as its key's id, algorithm
    /// and digest (a binary frame written from the job, nothing copied), and with its
    /// signing input for an algorithm whose mechanism hashes on the device.
    fn encode(&self, n: u64, whole_input: &[Alg], out: &mut Vec<u8>) -> std::io::Result<()> {
        let request = match &self.work {
            Work::Sign { tbs, .. } if !whole_input.contains(&tbs.alg()) => {
                return wire::encode_sign(
                    n,
                    self.key.id(),
                    tbs.alg(),
                    tbs.digest().as_bytes(),
                    out,
                );
            }
            Work::Sign { tbs, .. } => Request::Sign {
                id: self.key.id().to_vec(),
                alg: tbs.alg(),
                digest: tbs.digest().as_bytes().to_vec(),
                message: Some(tbs.message().unwrap_or_default().to_vec()),
            },
            Work::Prove { tbs, .. } => Request::Prove {
                key: KeyInfo::clone(&self.key),
                challenge: tbs.message().unwrap_or_default().to_vec(),
            },
        };
        wire::encode(n, &request, out)
    }
}

fn unexpected() -> TokenError {
    TokenError::Internal("a signer process answered with the wrong kind of answer".into())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Signers {
    /// Starts the keeper, then as many more processes as the profile says; each must
    /// open the device and log in, or this fails with the device's own error.
    pub(crate) fn start(spawn: SignerSpawn) -> Result<Signers, TokenError> {
        let (keeper, ready, stdout) = launch(&spawn, 0, Role::Keeper, spawn.sessions, &|_| {})?;
        let total = ready.sessions.max(1);
        let layout: Vec<usize> = match ready.per_signer {
            Some(k) if k >= 1 => {
                let k = k.min(total);
                let mut left = total;
                let mut v = Vec::new();
                while left > 0 {
                    v.push(k.min(left));
                    left -= k.min(left);
                }
                v
            }
            _ => vec![total],
        };
        let mut procs = vec![Proc {
            role: Role::Keeper,
            sessions: layout[0],
            link: Some(keeper.clone()),
            in_flight: 0,
            told: HashSet::new(),
        }];
        let mut started = vec![(keeper, stdout)];
        for (i, &sessions) in layout.iter().enumerate().skip(1) {
            let (link, _, stdout) = launch(&spawn, i, Role::Signer, Some(sessions), &|_| {})?;
            procs.push(Proc {
                role: Role::Signer,
                sessions,
                link: Some(link.clone()),
                in_flight: 0,
                told: HashSet::new(),
            });
            started.push((link, stdout));
        }
        let pids = started.iter().map(|(l, _)| Some(Kill::of(l.pid))).collect();
        let shared = Arc::new(Shared {
            spawn,
            whole_input: ready.whole_input,
            pids: Mutex::new(pids),
            description: Mutex::new(ready.description),
            sessions: total,
            state: Mutex::new(State {
                procs,
                queue: VecDeque::new(),
            }),
            stats: SignerStats::default(),
            stopping: AtomicBool::new(false),
        });
        let mut supervisors = Vec::new();
        for (i, (link, io)) in started.into_iter().enumerate() {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("keybound-pipe-{i}"))
                .spawn(move || supervise(shared, i, link, io))
                .map_err(|e| TokenError::Unavailable {
                    reason: format!("cannot start a thread for signer process {i}: {e}"),
                })?;
            supervisors.push(handle);
        }
        {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name("keybound-watchdog".into())
                .spawn(move || watchdog(&shared))
                .map_err(|e| TokenError::Unavailable {
                    reason: format!("cannot start the signer watchdog thread: {e}"),
                })?;
            supervisors.push(handle);
        }
        tracing::debug!(
            processes = layout.len(),
            sessions = total,
            "signer processes started"
        );
        Ok(Signers {
            shared,
            supervisors: Mutex::new(supervisors),
        })
    }

    pub(crate) fn report(&self) -> SignerReport {
        self.shared.report()
    }

    /// A key-management call to the keeper, waited for.
    fn call(&self, request: Request) -> Outcome {
        let link = lock(&self.shared.state).procs[0].link.clone();
        let Some(link) = link else {
            return Err(down("the keeper signer process is restarting"));
        };
        crate::token::worker::wait(|reply| {
            link.send(
                vec![Outgoing::Request(request, Waiter::Call(reply))],
                &self.shared,
            );
        })
    }
}

fn down(reason: &str) -> TokenError {
    TokenError::Unavailable {
        reason: reason.into(),
    }
}

impl Shared {
    fn report(&self) -> SignerReport {
        let st = lock(&self.state);
        SignerReport {
            processes: st.procs.len(),
            up: st.procs.iter().filter(|p| p.link.is_some()).count(),
            pids: st
                .procs
                .iter()
                .map(|p| p.link.as_ref().map(|l| l.pid))
                .collect(),
            sessions: self.sessions,
            restarts: self.stats.restarts.load(Ordering::Relaxed),
            exits: self.stats.exits.load(Ordering::Relaxed),
            retried: self.stats.retried.load(Ordering::Relaxed),
            unavailable: self.stats.unavailable.load(Ordering::Relaxed),
            hung: self.stats.hung.load(Ordering::Relaxed),
        }
    }

    /// Sends `job` to the least busy process with a free session, queues it when all are
    /// busy, and refuses it when none is up.
    fn dispatch(self: &Arc<Self>, job: Job) {
        let mut st = lock(&self.state);
        if st.procs.iter().all(|p| p.link.is_none()) {
            drop(st);
            self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            job.fail(down("no signer process is up; they are restarting"));
            return;
        }
        let free = st
            .procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.link.is_some() && p.in_flight < depth(p))
            .min_by_key(|(_, p)| p.in_flight * 64 / p.sessions.max(1))
            .map(|(i, _)| i);
        match free {
            Some(i) => self.send_to(st, i, job),
            None => st.queue.push_back(job),
        }
    }

    /// Sends `job` to process `i` (which has a free session); tells it the key first when
    /// this incarnation was not told it yet.
    fn send_to(self: &Arc<Self>, mut st: MutexGuard<'_, State>, i: usize, job: Job) {
        let proc = &mut st.procs[i];
        let Some(link) = proc.link.clone() else {
            drop(st);
            return self.dispatch(job);
        };
        if proc.in_flight == 0 {
            *lock(&link.progress) = Instant::now();
        }
        proc.in_flight += 1;
        let mut tell = None;
        if matches!(job.work, Work::Sign { .. }) && !proc.told.contains(job.key.id()) {
            match challenge() {
                Ok(challenge) => {
                    tell = Some(Outgoing::Request(
                        Request::Prove {
                            key: KeyInfo::clone(&job.key),
                            challenge,
                        },
                        Waiter::Tell,
                    ))
                }
                Err(e) => {
                    proc.in_flight -= 1;
                    drop(st);
                    return job.fail(e);
                }
            }
            proc.told.insert(job.key.id().to_vec());
        }
        let stdin = lock(&link.stdin);
        drop(st);
        let batch = [tell, Some(Outgoing::Job(job))];
        link.send_locked(stdin, batch.into_iter().flatten(), self);
    }

    /// `link`'s process is gone: it gets no more jobs. (Its supervisor fails what it held
    /// and restarts it.)
    fn mark_down(&self, link: &Link) {
        let mut st = lock(&self.state);
        let p = &mut st.procs[link.index];
        if p.link.as_ref().is_some_and(|l| std::ptr::eq(&**l, link)) {
            p.link = None;
            p.in_flight = 0;
            p.told.clear();
            // From now on its stdin closes and it should end: the watchdog gives it
            // `hung_after` for that (lock order: state, then pids).
            if let Some(kill) = lock(&self.pids)[link.index]
                .as_mut()
                .filter(|k| k.pid == link.pid)
            {
                kill.since = Instant::now();
                kill.ending = true;
            }
        }
    }

    /// Sleeps `d`, or less when the agent is stopping; false then.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }

    fn set_pid(&self, i: usize, pid: Option<u32>) {
        lock(&self.pids)[i] = pid.map(Kill::of);
    }

    /// A process answered (or failed) a job: frees its session and sends it the next
    /// queued one.
    fn finished(self: &Arc<Self>, i: usize, key: &KeyInfo, outcome: &Outcome, proved: bool) {
        let mut st = lock(&self.state);
        let proc = &mut st.procs[i];
        proc.in_flight = proc.in_flight.saturating_sub(1);
        match outcome {
            Err(TokenError::Reapprove { .. }) => {
                proc.told.remove(key.id());
            }
            Ok(Answer::Proof(_)) if proved => {
                proc.told.insert(key.id().to_vec());
            }
            _ => {}
        }
        if proc.link.is_some()
            && proc.in_flight < depth(proc)
            && let Some(next) = st.queue.pop_front()
        {
            self.send_to(st, i, next);
        }
    }
}

/// Requests in flight on a process with `sessions` sessions: eight per session and sixteen
/// more, so a session never waits for the agent between two signatures (and a TPM never
/// goes idle and flushes its key between them), and under load requests go in batches (see
/// [`Writer`]) of about twenty for a one-session signer. Measured with `keybound bench
/// --key dpop --seconds 6` (2 signers, 24 callers per session), interleaved against eight
/// more (16 callers per session), 10 pairs: a context switch on the machine per 6.8 proofs
/// instead of per 4.6 (`perf stat -a -e sched:sched_switch`), pipeline / raw median 0.886
/// → 0.903 (7 pairs better); with the agent and 64 callers 4 of 5 pairs better. Deeper
/// (32 or 48 for a one-session signer) halved the switches again but not the ratio (12
/// pairs at 48: better in 5).
pub(crate) fn depth_of(sessions: usize) -> usize {
    (sessions + 2) * 8
}

/// The bench's raw loop: `sign` again and again until `until`, counting the signatures
/// finished by then (one that ends after it is not, as in the pipeline's phases).
pub(crate) fn signed_until<E>(
    until: Instant,
    mut sign: impl FnMut() -> Result<(), E>,
) -> Result<u64, E> {
    let (mut n, mut now) = (0, Instant::now());
    while now < until {
        sign()?;
        now = Instant::now();
        n += u64::from(now <= until);
    }
    Ok(n)
}

/// [`depth_of`] `p`'s sessions.
fn depth(p: &Proc) -> usize {
    depth_of(p.sessions)
}

impl Link {
    /// [`Link::send_locked`] with the write lock taken now.
    fn send(self: &Arc<Self>, batch: Vec<Outgoing>, shared: &Arc<Shared>) {
        self.send_locked(lock(&self.stdin), batch, shared);
    }

    /// What waits in the outbox goes out now (the task `send_locked` spawned).
    fn flush(&self, shared: &Arc<Shared>) {
        let mut w = lock(&self.stdin);
        w.flush_due = false;
        self.write_out(w, shared);
    }

    /// The process answered `n` requests it was written: what waited for it to run low
    /// goes out now.
    fn answered(&self, shared: &Arc<Shared>, n: usize) {
        let mut w = lock(&self.stdin);
        w.open = w.open.saturating_sub(n);
        if w.open < w.low {
            self.write_out(w, shared);
        }
    }

    /// Writes the outbox; a process that cannot be written to is gone, and gets no more
    /// jobs (its supervisor fails or retries what it held).
    fn write_out(&self, mut w: MutexGuard<'_, Writer>, shared: &Arc<Shared>) {
        if w.write().is_err() {
            drop(w);
            shared.mark_down(self);
        }
    }

    /// Writes the requests in one go, registered first so no answer finds no waiter. A
    /// process that has ended gets nothing: its jobs go where a dead process's jobs go.
    /// `stdin` is this link's write lock, taken by the caller: [`Shared::send_to`] takes
    /// it before it lets go of the state, so the frames of two jobs reach the process in
    /// the order their key was told (a key's `Prove` always before its first `Sign`).
    fn send_locked(
        self: &Arc<Self>,
        mut stdin: MutexGuard<'_, Writer>,
        batch: impl IntoIterator<Item = Outgoing>,
        shared: &Arc<Shared>,
    ) {
        // Anything but a signature goes out at once.
        let mut urgent = false;
        let bytes = &mut stdin.outbox;
        let before = bytes.len();
        // The numbers this batch takes: only this function counts `next` up, under this
        // link's write lock, which it holds throughout.
        let first = self.next.load(Ordering::Relaxed);
        let mut refused = Vec::new();
        // Frames the signing loop answers: a management call is answered on the keeper's
        // own thread, beside the signatures, and does not hold them back.
        let mut signing = 0;
        {
            let mut pending = lock(&self.pending);
            for out in batch {
                urgent |= match &out {
                    Outgoing::Request(r, _) => !matches!(r, Request::Sign { .. }),
                    Outgoing::Job(job) => !matches!(job.work, Work::Sign { .. }),
                };
                if pending.closed {
                    refused.push(match out {
                        Outgoing::Request(_, waiter) => waiter,
                        Outgoing::Job(job) => Waiter::Job(job),
                    });
                    continue;
                }
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let at = bytes.len();
                let (encoded, waiter) = match out {
                    Outgoing::Request(request, waiter) => {
                        (wire::encode(n, &request, bytes), waiter)
                    }
                    Outgoing::Job(job) => {
                        (job.encode(n, &shared.whole_input, bytes), Waiter::Job(job))
                    }
                };
                if let Err(e) = encoded {
                    bytes.truncate(at);
                    drop(pending);
                    tracing::error!("cannot encode a request to a signer process: {e}");
                    pending = lock(&self.pending);
                    refused.push(waiter);
                    continue;
                }
                signing += usize::from(!matches!(waiter, Waiter::Call(_)));
                pending.waiting.insert(n, waiter);
            }
        }
        let numbers = first..self.next.load(Ordering::Relaxed);
        stdin.waiting += signing;
        let written = if stdin.outbox.len() == before {
            Ok(())
        } else if stdin.stdin.is_none() {
            stdin.close();
            Err(std::io::ErrorKind::BrokenPipe.into())
        } else if urgent || stdin.open < stdin.low {
            stdin.write()
        } else {
            if !stdin.flush_due {
                stdin.flush_due = true;
                let (link, shared) = (self.clone(), shared.clone());
                shared.spawn.runtime.clone().spawn(async move {
                    // Woken after the tasks that were ready ran: what they asked for
                    // meanwhile is in the outbox too.
                    tokio::task::yield_now().await;
                    link.flush(&shared);
                });
            }
            Ok(())
        };
        drop(stdin);
        if written.is_err() {
            // The process is gone: no more jobs for it (its reader will notice too), and
            // ours are taken back, unless the reader failed them already.
            shared.mark_down(self);
            let mut pending = lock(&self.pending);
            for n in numbers {
                if let Some(w) = pending.waiting.remove(&n) {
                    refused.push(w);
                }
            }
        }
        for waiter in refused {
            orphan(shared, waiter, self.pid);
        }
    }
}

/// A waiter whose process ended before answering: a job is retried once elsewhere, a
/// call fails.
fn orphan(shared: &Arc<Shared>, waiter: Waiter, pid: u32) {
    match waiter {
        Waiter::Tell => {}
        Waiter::Call(reply) => reply(Err(down(&format!(
            "the keeper signer process (pid {pid}) ended; it is being restarted"
        )))),
        Waiter::Job(mut job) => {
            if job.retried {
                shared.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                job.fail(down(&format!(
                    "the signer process (pid {pid}) ended during the signature; retry"
                )));
            } else {
                job.retried = true;
                shared.stats.retried.fetch_add(1, Ordering::Relaxed);
                shared.dispatch(job);
            }
        }
    }
}

/// Starts one process and waits for it to open the device.
fn launch(
    spawn: &SignerSpawn,
    index: usize,
    role: Role,
    sessions: Option<usize>,
    spawned: &dyn Fn(u32),
) -> Result<(Arc<Link>, Ready, ChildIo), TokenError> {
    let failed = |e: String| TokenError::Unavailable {
        reason: format!("cannot start a signer process: {e}"),
    };
    // This very binary, even if the file was replaced since the agent started.
    let mut cmd = Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut cmd, "keybound");
    for _ in 0..spawn.verbose {
        cmd.arg("-v");
    }
    cmd.arg(CHILD_COMMAND)
        .env_clear()
        .envs(environment(&spawn.device))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // Nothing but its stdio goes to the signer: std opens its own descriptors
    // close-on-exec, and this marks the others so, those the agent inherited from whoever
    // started it (`exec 5<file`, a service manager's socket). They stay open in the agent.
    close_fds::set_fds_cloexec_threadsafe(3, &[]);
    let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
    let pid = child.id();
    spawned(pid);
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed("no pipes".into()));
    };
    let start = Start {
        role,
        sessions,
        device: spawn.device.clone(),
        bench: spawn.bench,
    };
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    let ready = wire::write(&mut stdin, 0, &start)
        .map_err(|e| failed(e.to_string()))
        .and_then(|()| match wire::read::<Outcome>(&mut reader, &mut buf) {
            Ok(Some(frame)) => match frame.body {
                Ok(Answer::Ready(ready)) => Ok(ready),
                Ok(_) => Err(unexpected()),
                // The device's own error (PIN, module, token), as in-process.
                Err(e) => Err(e),
            },
            Ok(None) => Err(failed(format!("process {pid} ended before it was ready"))),
            Err(e) => Err(failed(e.to_string())),
        });
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            drop(stdin);
            let _ = child.wait();
            return Err(e);
        }
    };
    let link = Arc::new(Link {
        index,
        pid,
        stdin: Mutex::new(Writer::new(stdin, &ready)),
        pending: Mutex::default(),
        next: AtomicU64::new(1),
        progress: Mutex::new(Instant::now()),
    });
    Ok((
        link,
        ready,
        ChildIo {
            child,
            reader: Some(reader),
        },
    ))
}

/// The hidden subcommand a signer process runs.
pub const CHILD_COMMAND: &str = "__signer";

/// The variables a signer process starts with: those of [`passed_names`] that are set.
fn environment(device: &DeviceSettings) -> Vec<(OsString, OsString)> {
    passed_names(device)
        .into_iter()
        .filter_map(|n| std::env::var_os(&n).map(|v| (OsString::from(n), v)))
        .collect()
}

/// [`PASSED_ENV`], and the PIN's or the TPM key auth's variable when no file gives it.
fn passed_names(device: &DeviceSettings) -> Vec<String> {
    let mut names: Vec<String> = PASSED_ENV.iter().map(|s| s.to_string()).collect();
    match device {
        DeviceSettings::Pkcs11(s) if s.pin_file.is_none() => names.push(s.pin_env.clone()),
        DeviceSettings::Pkcs11(_) => {}
        // As for the PIN: the file wins, so the variable is not passed on.
        #[cfg(feature = "tpm")]
        DeviceSettings::Tpm(s) if s.key_auth_file.is_none() => names.extend(s.key_auth_env.clone()),
        #[cfg(feature = "tpm")]
        DeviceSettings::Tpm(_) => {}
    }
    names
}

/// A process and the reading end of its answers.
struct ChildIo {
    child: Child,
    /// Taken by the task that reads it on [`SignerSpawn::runtime`].
    reader: Option<BufReader<ChildStdout>>,
}

/// One process slot for the agent's life: reads its answers (or waits while a task on
/// the agent's runtime reads them), and when it ends, fails or retries what it had,
/// restarts it with backoff, and reads again.
fn supervise(shared: Arc<Shared>, i: usize, mut link: Arc<Link>, mut io: ChildIo) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let born = Instant::now();
        match read(&shared, i, &link, &mut io) {
            Ended::Pipe => {}
            // The answers it had read died with the task (their callers see the device
            // gone); the process is stopped and restarted like one that crashed.
            Ended::Panicked => tracing::error!(
                process = i,
                pid = link.pid,
                "the task reading a signer process panicked (a bug: see the panic above); \
                 restarting the process"
            ),
            // The agent's runtime shut down and took the read end with it: the agent is
            // stopping, and nothing more can be answered or restarted.
            Ended::RuntimeGone => shared.stopping.store(true, Ordering::SeqCst),
        }
        // Ended. At once, no new job goes to it; then nothing more is answered.
        shared.mark_down(&link);
        let queued: Vec<Job> = {
            let mut st = lock(&shared.state);
            if st.procs.iter().all(|p| p.link.is_none()) {
                st.queue.drain(..).collect()
            } else {
                Vec::new()
            }
        };
        let orphans: Vec<Waiter> = {
            let mut pending = lock(&link.pending);
            pending.closed = true;
            pending.waiting.drain().map(|(_, w)| w).collect()
        };
        // Our end closed, so a process that is only slow ends too.
        lock(&link.stdin).close();
        let status = io.child.wait();
        shared.set_pid(i, None);
        if shared.stopping.load(Ordering::SeqCst) {
            for w in orphans {
                fail_waiter(w, TokenError::WorkersGone);
            }
            for job in queued {
                job.fail(TokenError::WorkersGone);
            }
            return;
        }
        shared.stats.exits.fetch_add(1, Ordering::Relaxed);
        let how = match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(
            process = i,
            pid = link.pid,
            "signer process ended ({how}); restarting it"
        );
        for w in orphans {
            orphan(&shared, w, link.pid);
        }
        for job in queued {
            shared.stats.unavailable.fetch_add(1, Ordering::Relaxed);
            job.fail(down("no signer process is up; they are restarting"));
        }
        if born.elapsed() > STABLE {
            backoff = BACKOFF_FIRST;
        }
        // Restart, with backoff between tries, until it opens the device or the agent ends.
        loop {
            if !shared.pause(backoff) {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let (role, sessions) = {
                let st = lock(&shared.state);
                (st.procs[i].role, st.procs[i].sessions)
            };
            let spawned = |pid| shared.set_pid(i, Some(pid));
            match launch(&shared.spawn, i, role, Some(sessions), &spawned) {
                Ok((new, ready, new_io)) => {
                    if role == Role::Keeper {
                        *lock(&shared.description) = ready.description;
                    }
                    shared.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(process = i, pid = new.pid, "signer process restarted");
                    link = new;
                    io = new_io;
                    let mut st = lock(&shared.state);
                    st.procs[i].link = Some(link.clone());
                    // Queued work may go now.
                    while st.procs[i].in_flight < depth(&st.procs[i]) {
                        let Some(next) = st.queue.pop_front() else {
                            break;
                        };
                        shared.send_to(st, i, next);
                        st = lock(&shared.state);
                    }
                    drop(st);
                    // Stopping began while it started: `Drop` may not have seen it.
                    if shared.stopping.load(Ordering::SeqCst) {
                        lock(&link.stdin).close();
                    }
                    break;
                }
                Err(e) => {
                    shared.set_pid(i, None);
                    tracing::error!(
                        process = i,
                        "cannot restart the signer process: {e}; trying again in {backoff:?}"
                    );
                }
            }
        }
    }
}

/// Every second: a process that holds signatures and has answered none for `hung_after`
/// is stuck in its module; it is killed, so its supervisor fails or retries what it held
/// and starts it again. So is a process that is not serving: restarted and not ready
/// `hung_after` + [`START_GRACE`] later (stuck opening the device: a network HSM that does
/// not answer, a TPM resource manager that hangs), or taken out of service and not ended
/// `hung_after` later (stuck in its module); either would hold its slot down for good.
/// (The first start, before the agent serves, is not timed: it fails the start.)
fn watchdog(shared: &Arc<Shared>) {
    let every = Duration::from_secs(1).min(shared.spawn.hung_after);
    while shared.pause(every) {
        // Killed under the locks that say it is not serving, so a process that its
        // supervisor put in service meanwhile is never killed for it.
        let mut idle: Vec<(usize, u32, bool, Duration)> = Vec::new();
        {
            let st = lock(&shared.state);
            let mut pids = lock(&shared.pids);
            for (i, (p, kill)) in st.procs.iter().zip(pids.iter_mut()).enumerate() {
                let Some(kill) = kill.as_mut().filter(|_| p.link.is_none()) else {
                    continue;
                };
                // A start may first wait for the host lock (`host_lock::PATIENCE`).
                let limit = if kill.ending {
                    shared.spawn.hung_after
                } else {
                    shared.spawn.hung_after + START_GRACE
                };
                if kill.since.elapsed() >= limit && kill.kill() {
                    // Once: it ends, and its supervisor takes it from there.
                    kill.since = Instant::now() + Duration::from_secs(3600);
                    shared.stats.hung.fetch_add(1, Ordering::Relaxed);
                    idle.push((i, kill.pid, kill.ending, limit));
                }
            }
        }
        for (i, pid, ending, limit) in idle {
            let what = if ending {
                "has not ended, although taken out of service (stuck in its module?)"
            } else {
                "is not ready after it was started (stuck opening the device?)"
            };
            tracing::error!(
                process = i,
                pid,
                "signer process {what} for {limit:?}; killed it (agent.signer_timeout_secs)"
            );
        }
        let stuck: Vec<(usize, u32, usize)> = lock(&shared.state)
            .procs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let link = p.link.as_ref()?;
                let quiet = lock(&link.progress).elapsed();
                (p.in_flight > 0 && quiet >= shared.spawn.hung_after).then_some((
                    i,
                    link.pid,
                    p.in_flight,
                ))
            })
            .collect();
        for (i, pid, held) in stuck {
            tracing::error!(
                process = i,
                pid,
                "signer process answered nothing for {:?} with {held} signature(s) waiting; \
                 killing it (agent.signer_timeout_secs)",
                shared.spawn.hung_after
            );
            shared.stats.hung.fetch_add(1, Ordering::Relaxed);
            if let Some(kill) = lock(&shared.pids)[i].as_ref().filter(|k| k.pid == pid) {
                kill.kill();
            }
        }
    }
}

/// How to kill one signer process: a pidfd, opened while the process is the agent's
/// unreaped child, so a signal can never reach another process that got its pid later.
struct Kill {
    pid: u32,
    fd: Option<std::os::fd::OwnedFd>,
    /// When it was started, or taken out of service: what the watchdog times a process
    /// that is not serving from.
    since: Instant,
    /// Taken out of service (else starting).
    ending: bool,
}

impl Kill {
    fn of(pid: u32) -> Kill {
        let fd = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
        });
        if fd.is_none() {
            tracing::warn!(pid, "no pidfd for the signer process (Linux before 5.3?)");
        }
        Kill {
            pid,
            fd,
            since: Instant::now(),
            ending: false,
        }
    }

    /// Whether a signal went out (none without a pidfd).
    fn kill(&self) -> bool {
        self.fd.as_ref().is_some_and(|fd| {
            rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL).is_ok()
        })
    }
}

fn fail_waiter(w: Waiter, e: TokenError) {
    match w {
        Waiter::Job(job) => job.fail(e),
        Waiter::Call(reply) => reply(Err(e)),
        Waiter::Tell => {}
    }
}

/// How the reading of a process's answers ended.
#[derive(PartialEq)]
enum Ended {
    /// Its stdout ended or broke: the process is gone (or going).
    Pipe,
    /// The task that read it panicked (a bug in what an answer runs, such as a reply or
    /// an observer): the process is restarted as if it had died, and the agent serves on.
    Panicked,
    /// The runtime that read it shut down.
    RuntimeGone,
}

/// Reads `io`'s answers until its stdout ends, in a task on the agent's runtime; this
/// thread waits for that task.
fn read(shared: &Arc<Shared>, i: usize, link: &Arc<Link>, io: &mut ChildIo) -> Ended {
    let Some(reader) = io.reader.take() else {
        return Ended::Pipe;
    };
    // What the start's read buffered beyond the ready answer, then the pipe itself.
    let buffered = reader.buffer().to_vec();
    let fd = std::os::fd::OwnedFd::from(reader.into_inner());
    let (done, ended) = std::sync::mpsc::channel();
    let (shared, link) = (shared.clone(), link.clone());
    shared.spawn.runtime.clone().spawn(async move {
        let reader =
            tokio::spawn(async move { read_answers(&shared, i, &link, fd, buffered).await });
        match reader.await {
            Ok(()) => {
                let _ = done.send(Ended::Pipe);
            }
            Err(e) if e.is_panic() => {
                let _ = done.send(Ended::Panicked);
            }
            // Cancelled: the runtime is shutting down (`done` goes with this task).
            Err(_) => {}
        }
    });
    // A runtime that shuts down drops the task, and `done` with it.
    ended.recv().unwrap_or(Ended::RuntimeGone)
}

/// Reads answers until the process's stdout ends or breaks, as a task of the agent's
/// runtime: the pipe is read when the runtime's poller says it is readable, every whole
/// answer a read brought is taken in one go, and the replies wake tasks of the same
/// runtime together.
async fn read_answers(
    shared: &Arc<Shared>,
    i: usize,
    link: &Link,
    fd: std::os::fd::OwnedFd,
    mut buf: Vec<u8>,
) {
    use tokio::io::AsyncReadExt as _;
    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::error!(
                process = i,
                pid = link.pid,
                "cannot read a signer process: {e}"
            );
            return;
        }
    };
    let mut frames: Vec<wire::Frame<Outcome>> = Vec::new();
    let mut answered = Vec::new();
    loop {
        let whole = wire::take_frames(&mut buf, &mut frames);
        take_answers(shared, i, link, &mut frames, &mut answered);
        if let Err(e) = whole {
            tracing::error!(process = i, pid = link.pid, "signer process: {e}");
            return;
        }
        buf.reserve(8192);
        match pipe.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(process = i, pid = link.pid, "signer process: {e}");
                return;
            }
        }
    }
}

/// The bookkeeping of the answers in `frames` (sessions freed, queued work sent, what was
/// told), then the replies, all together. `answered` is scratch space, kept between calls.
fn take_answers(
    shared: &Arc<Shared>,
    i: usize,
    link: &Link,
    frames: &mut Vec<wire::Frame<Outcome>>,
    answered: &mut Vec<(Option<Waiter>, wire::Frame<Outcome>)>,
) {
    if frames.is_empty() {
        return;
    }
    {
        let mut pending = lock(&link.pending);
        answered.extend(frames.drain(..).map(|f| (pending.waiting.remove(&f.n), f)));
    }
    // As `Link::send_locked` counted them: management calls aside.
    let signing = answered
        .iter()
        .filter(|(w, _)| !matches!(w, Some(Waiter::Call(_))))
        .count();
    link.answered(shared, signing);
    if signing > 0 {
        *lock(&link.progress) = Instant::now();
    }
    for (waiter, frame) in answered.iter() {
        if let Some(Waiter::Job(job)) = waiter {
            let proved = matches!(job.work, Work::Prove { .. });
            shared.finished(i, &job.key, &frame.body, proved);
        }
    }
    for (waiter, frame) in answered.drain(..) {
        match waiter {
            Some(Waiter::Job(job)) => job.answer(frame.body),
            Some(Waiter::Tell) => {
                if let Err(e) = frame.body {
                    tracing::warn!(
                        process = i,
                        "a signer process could not prove a key it was told: {e}"
                    );
                }
            }
            Some(Waiter::Call(reply)) => reply(frame.body),
            None => {
                tracing::error!(
                    process = i,
                    n = frame.n,
                    "a signer process answered a request it was not sent"
                );
            }
        }
    }
}

/// Ends the processes: their stdin closes, each finishes what it has and exits; one that
/// does not within a few seconds (stuck in its module) is killed. A supervisor that still
/// has not ended then is left behind rather than waited for.
impl Drop for Signers {
    fn drop(&mut self) {
        self.stop_now();
    }
}

impl Signers {
    /// What `Drop` does, callable earlier ([`Backend::stop`]); the second call finds
    /// nothing left to do.
    fn stop_now(&self) {
        let mut supervisors = lock(&self.supervisors);
        self.shared.stopping.store(true, Ordering::SeqCst);
        let links: Vec<Arc<Link>> = lock(&self.shared.state)
            .procs
            .iter()
            .filter_map(|p| p.link.clone())
            .collect();
        for link in links {
            lock(&link.stdin).close();
        }
        let wait = |d: Duration, handles: &[JoinHandle<()>]| {
            let deadline = Instant::now() + d;
            while Instant::now() < deadline && handles.iter().any(|h| !h.is_finished()) {
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait(Duration::from_secs(5), &supervisors);
        if supervisors.iter().any(|h| !h.is_finished()) {
            for kill in lock(&self.shared.pids).iter().flatten() {
                kill.kill();
            }
            wait(Duration::from_secs(2), &supervisors);
        }
        let me = std::thread::current().id();
        for handle in supervisors.drain(..) {
            if handle.is_finished() && handle.thread().id() != me {
                let _ = handle.join();
            }
        }
        let queued: Vec<Job> = lock(&self.shared.state).queue.drain(..).collect();
        for job in queued {
            job.fail(TokenError::WorkersGone);
        }
    }
}

impl Backend for Signers {
    fn describe(&self) -> TokenDescription {
        lock(&self.shared.description).clone()
    }

    fn sessions(&self) -> usize {
        self.shared.sessions
    }

    fn generate(&self, label: &Label, alg: Alg) -> Result<KeyInfo, TokenError> {
        match self.call(Request::Generate {
            label: label.to_string(),
            alg,
        })? {
            Answer::Key(k) => Ok(k),
            _ => Err(unexpected()),
        }
    }

    fn health(&self) -> Result<(), TokenError> {
        self.call(Request::Health).map(|_| ())
    }

    fn keys(&self) -> Result<Listing, TokenError> {
        match self.call(Request::Keys)? {
            Answer::Listing(l) => Ok(l),
            _ => Err(unexpected()),
        }
    }

    fn records(&self, slot: &Label) -> Result<Vec<Vec<u8>>, TokenError> {
        match self.call(Request::Records {
            slot: slot.to_string(),
        })? {
            Answer::Records(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    fn put_record(&self, slot: &Label, seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        self.call(Request::PutRecord {
            slot: slot.to_string(),
            seq,
            bytes: bytes.to_vec(),
        })
        .map(|_| ())
    }

    fn remove_record(&self, slot: &Label, seq: u64, bytes: &[u8]) -> Result<(), TokenError> {
        self.call(Request::RemoveRecord {
            slot: slot.to_string(),
            seq,
            bytes: bytes.to_vec(),
        })
        .map(|_| ())
    }

    fn destroy(&self, key: &KeyInfo) -> Result<(), TokenError> {
        self.call(Request::Destroy { key: key.clone() }).map(|_| ())
    }

    fn facts(&self, key: &KeyInfo) -> Result<KeyFacts, TokenError> {
        match self.call(Request::Facts { key: key.clone() })? {
            Answer::Facts(f) => Ok(f),
            _ => Err(unexpected()),
        }
    }

    fn prove(&self, key: &KeyInfo, tbs: ToBeSigned, reply: ProofReply) {
        self.shared.dispatch(Job {
            key: Arc::new(key.clone()),
            work: Work::Prove { tbs, reply },
            retried: false,
        });
    }

    fn submit(&self, key: &KeyInfo, binding: &Binding, tbs: ToBeSigned, reply: Reply) {
        // The binding of this key's own approval, or none: a key is signed with as it was
        // approved, never as another approval's.
        let Some(remote) = binding.get::<Remote>().filter(|r| *r.key == *key) else {
            return reply(Err(TokenError::Reapprove {
                label: key.label().to_string(),
            }));
        };
        if let Err(e) = super::check_alg(key.label(), key.alg(), &tbs) {
            return reply(Err(e));
        }
        self.shared.dispatch(Job {
            key: remote.key.clone(),
            work: Work::Sign { tbs, reply },
            retried: false,
        });
    }

    fn signers(&self) -> Option<SignerReport> {
        Some(self.report())
    }

    fn stop(&self) {
        self.stop_now();
    }

    /// Every process signs on all its sessions at once for `phase`, each in itself: the
    /// device's raw rate with the same number of processes, without the pipes.
    fn raw(&self, key: &KeyInfo, phase: Duration) -> Option<Result<u64, TokenError>> {
        let links: Vec<Arc<Link>> = lock(&self.shared.state)
            .procs
            .iter()
            .filter_map(|p| p.link.clone())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        for link in &links {
            let challenge = match challenge() {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            let tx = tx.clone();
            link.send(
                vec![
                    Outgoing::Request(
                        Request::Prove {
                            key: key.clone(),
                            challenge,
                        },
                        Waiter::Tell,
                    ),
                    Outgoing::Request(
                        Request::Raw {
                            id: key.id().to_vec(),
                            millis: phase.as_millis() as u64,
                        },
                        Waiter::Call(Box::new(move |o| {
                            let _ = tx.send(o);
                        })),
                    ),
                ],
                &self.shared,
            );
        }
        drop(tx);
        let mut made = 0;
        for outcome in rx {
            match outcome {
                Ok(Answer::Count(n)) => made += n,
                Ok(_) => return Some(Err(unexpected())),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(made))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret's variable goes to the signer only when no file gives the secret: the
    /// signer would never read it, and it is one more copy of it in a process.
    #[cfg(feature = "tpm")]
    #[test]
    fn a_key_auth_from_a_file_leaves_its_variable_behind() {
        let tpm = |file: Option<&str>| {
            DeviceSettings::Tpm(crate::token::tpm::TpmSettings {
                tcti: "swtpm:host=127.0.0.1,port=2321".into(),
                state_dir: None,
                primary_handle: None,
                key_auth_env: Some("KEYBOUND_KEY_AUTH".into()),
                key_auth_file: file.map(std::path::PathBuf::from),
                rsa_bits: 2048,
            })
        };
        let has = |d: &DeviceSettings, n: &str| passed_names(d).iter().any(|p| p == n);
        assert!(has(&tpm(None), "KEYBOUND_KEY_AUTH"));
        assert!(!has(
            &tpm(Some("/etc/keybound/key-auth")),
            "KEYBOUND_KEY_AUTH"
        ));
        // Where the TPM's state is when `state_dir` is not set: the same for the signer
        // as for the CLI, which reads it in-process.
        assert!(has(&tpm(None), "XDG_STATE_HOME"));
    }
}
