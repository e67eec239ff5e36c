//! The signer process (`keybound` run by the agent with a hidden subcommand): opens the
//! device, logs in, and answers frames on stdin with frames on stdout (`wire`). It keeps
//! the keys it was told about, each only after it signed a fresh challenge with the
//! device's object and the signature verified under the public key it was told; `Sign`
//! names one of them by id, with the algorithm and a digest of exactly that algorithm's
//! length, and anything else is refused. It ends when stdin closes (the agent ended).

use std::collections::HashMap;
use std::io::{self, Read as _, Write};
use std::os::fd::AsFd as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use super::signed_until;
use super::wire::{self, Answer, CHALLENGE_PREFIX, Frame, Outcome, Ready, Request, Role, Start};
use crate::jose::{self, ToBeSigned};
use crate::token::pkcs11::Pkcs11Token;
#[cfg(feature = "tpm")]
use crate::token::tpm::TpmToken;
use crate::token::{Backend, Binding, DeviceSettings, KeyInfo, Label, Proof, TokenError, worker};

/// The keys this process was told about and proved, by id.
type Told = Arc<Mutex<HashMap<Vec<u8>, Arc<(KeyInfo, Binding)>>>>;

/// Answers go out whole, from any thread. An answer made on the reading thread may wait in
/// the buffer (`put`) until the main loop sends what waits (`flush`, see [`FLUSH_AT`]):
/// the agent then gets several in one write, while this process still has signatures to
/// make, and neither side wakes the other once per signature.
#[derive(Clone)]
struct Out(Arc<Mutex<(io::Stdout, Vec<u8>)>>);

impl Out {
    fn new() -> Out {
        Out(Arc::new(Mutex::new((
            io::stdout(),
            Vec::with_capacity(4096),
        ))))
    }

    /// Writes `outcome`, and whatever was queued before it.
    fn send(&self, n: u64, outcome: &Outcome) {
        self.put(n, outcome, true);
    }

    /// Appends `outcome`; writes it (and what was queued before it) when `now`, else it
    /// waits for the next `flush` or `send`.
    fn put(&self, n: u64, outcome: &Outcome, now: bool) {
        let mut out = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, buf) = &mut *out;
        let start = buf.len();
        if let Err(e) = wire::encode(n, outcome, buf) {
            buf.truncate(start);
            tracing::error!("signer: cannot encode an answer: {e}");
        }
        if now {
            Self::write(&mut out);
        }
    }

    fn flush(&self) {
        Self::write(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn write(out: &mut (io::Stdout, Vec<u8>)) {
        let (stdout, buf) = out;
        if buf.is_empty() {
            return;
        }
        // A closed stdout means the agent is gone; stdin's end follows.
        let _ = stdout.write_all(buf).and_then(|()| stdout.flush());
        buf.clear();
    }
}

/// A one-session signer sends the answers that wait when the requests it has read and not
/// answered fall below this many (then the agent's next batch arrives before the last of
/// them are signed), when a new batch lifts them to it again (the answers made meanwhile
/// go with the batch's first; but see [`DEEP`]), and before it waits for input. Measured
/// with `keybound bench --key dpop --seconds 8` on SoftHSM, 2 signers, 3 runs each: 2 gave
/// pipeline / raw 0.86–0.90, 3 gave 0.89–0.90, 6 gave 0.85–0.87.
const FLUSH_AT: usize = 3;

/// A batch that lifts the requests to at least this many keeps the answers made meanwhile
/// (one or two) for the next time the requests run low, so the agent is woken once per
/// batch, not twice, while this process has work for a batch ahead. Measured with
/// `keybound bench --key dpop --seconds 6` (2 signers, 32 callers), interleaved against
/// sending on every lift: pipeline / raw median 0.873 → 0.905 (6 of 6 pairs better). A
/// variant that sent on every lift again for 8 batches after the signer ran dry gave 0.888
/// (11 pairs) and, in a later period, against this rule: 0.895 against 0.902 (this rule
/// better in 8 of 13 pairs), and around the whole bench (`perf stat -a -e
/// sched:sched_switch`, 8 pairs) one context switch on the machine per 3.6 proofs against
/// 4.7. With the agent and 64 callers (`keybound bench --agent --clients 64`) the two did
/// not differ in 21 pairs, though in the first period this rule had lost about 0.04 of
/// the ratio in 8 of 8.
const DEEP: usize = 8;

/// When a one-session signer's waiting answers go out (see [`FLUSH_AT`] and [`DEEP`]).
#[derive(Default)]
struct Pacing {
    /// The requests read and not answered were below `FLUSH_AT` at the last turn.
    was_low: bool,
}

impl Pacing {
    /// Whether the answers that wait go out now, with `left` requests read and not taken
    /// (counted up to `FLUSH_AT`); `deep` tells whether at least `DEEP` wait, and is asked
    /// only when a batch has just lifted them (it may read the pipe).
    fn due(&mut self, left: usize, deep: impl FnOnce() -> bool) -> bool {
        let low = left < FLUSH_AT;
        let lifted = self.was_low && !low;
        let fell = low && !self.was_low;
        self.was_low = low;
        left == 0 || fell || (lifted && !deep())
    }
}

/// The signer's stdin, read in as large pieces as the pipe holds: what the agent wrote
/// while this process signed comes in one read, and the requests read and not yet taken
/// can be counted (what decides when answers go out). Read through a duplicate of the
/// descriptor, so nothing sits in the standard library's own stdin buffer.
struct Input {
    pipe: std::fs::File,
    /// Always initialised to its length: reads go into `buf[end..]`.
    buf: Vec<u8>,
    /// The bytes read and not taken: `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Input {
    fn stdin() -> io::Result<Input> {
        Ok(Input {
            pipe: std::fs::File::from(io::stdin().as_fd().try_clone_to_owned()?),
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    /// Whole requests read and not taken yet, counting no further than `up_to`; when
    /// fewer, first takes in what already waits in the pipe (this never blocks: only this
    /// process reads it, so what `FIONREAD` counts is there).
    fn ready(&mut self, up_to: usize) -> usize {
        let n = wire::complete_frames(&self.buf[self.start..self.end], up_to);
        if n >= up_to {
            return n;
        }
        match rustix::io::ioctl_fionread(&self.pipe) {
            Ok(waiting) if waiting > 0 => {
                if self
                    .read_some(usize::try_from(waiting).unwrap_or(usize::MAX))
                    .is_err()
                {
                    return n;
                }
                wire::complete_frames(&self.buf[self.start..self.end], up_to)
            }
            _ => n,
        }
    }

    /// One `read` of at most `room` bytes (at least as much space as that is made first,
    /// up to the bytes a frame may take); 0 at the end of the input.
    fn read_some(&mut self, room: usize) -> io::Result<usize> {
        let room = room.clamp(1, 4 + wire::MAX_FRAME);
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.buf.len() - self.end < room {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if self.buf.len() - self.end < room {
                self.buf.resize(self.end + room, 0);
            }
        }
        let n = (&self.pipe).read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// The next frame, reading until one is whole; `Ok(None)` at a clean end of stdin.
    fn next<T: wire::Body>(&mut self) -> io::Result<Option<Frame<T>>> {
        loop {
            let rest = &self.buf[self.start..self.end];
            let need = match wire::peek(rest)? {
                wire::Peek::Whole(body, taken) => {
                    let frame = wire::decode(body)?;
                    self.start += taken;
                    return Ok(Some(frame));
                }
                wire::Peek::Short(need) => need,
            };
            let partial = !rest.is_empty();
            // Blocks until something comes; takes all the pipe holds (up to the space).
            if self.read_some(need.max(16 * 1024))? == 0 {
                return if partial {
                    Err(io::ErrorKind::UnexpectedEof.into())
                } else {
                    Ok(None)
                };
            }
        }
    }
}

/// Runs the signer until stdin closes. Exit 0 then; 1 when the device cannot be opened
/// (the agent has the error in the first answer) or the agent spoke out of turn.
pub fn run() -> ExitCode {
    // `ps` and `top` show "keybound-signer" (spawned through /proc/self/exe, it would
    // be "exe"); a name too long or refused changes nothing else.
    let _ = rustix::thread::set_name(c"keybound-signer");
    let mut input = match Input::stdin() {
        Ok(input) => input,
        Err(e) => {
            tracing::error!("signer: cannot read stdin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = Out::new();
    let start: Frame<Start> = match input.next() {
        Ok(Some(f)) => f,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("signer: no start frame: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Start {
        role,
        sessions,
        device,
        bench,
    } = start.body;
    let (backend, ready) = match open(&device, sessions) {
        Ok(opened) => opened,
        Err(e) => {
            out.send(start.n, &Err(e));
            return ExitCode::FAILURE;
        }
    };
    let ready_inline = ready.inline;
    out.send(start.n, &Ok(Answer::Ready(ready)));
    let told: Told = Arc::default();
    let mut keeper = (role == Role::Keeper).then(|| manager(backend.clone(), out.clone()));
    let mut pacing = Pacing::default();
    loop {
        // Down to a few requests: what was answered goes out now, while there are still
        // signatures to make (the agent's next batch arrives before they are done). Lifted
        // again by a new batch: what was answered meanwhile goes out now, not a batch
        // later, unless the batch is deep (see `DEEP`). None left: everything goes out
        // before the read that waits for more.
        let left = input.ready(FLUSH_AT);
        if pacing.due(left, || input.ready(DEEP) >= DEEP) {
            out.flush();
        }
        let frame: Frame<Request> = match input.next() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::error!("signer: {e}; ending");
                // The signatures made so far still go to the agent.
                out.flush();
                return ExitCode::FAILURE;
            }
        };
        let n = frame.n;
        match frame.body {
            Request::Sign {
                id,
                alg,
                digest,
                message,
            } => {
                let found = told
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&id)
                    .cloned();
                let Some(found) = found else {
                    // Not told about (or dropped after the device lost it): the agent
                    // proves it here again before it signs.
                    out.send(
                        n,
                        &Err(TokenError::Reapprove {
                            label: jose::b64(&id),
                        }),
                    );
                    continue;
                };
                let (key, binding) = &*found;
                let tbs = match check(key, alg, &digest, message.as_deref()) {
                    Ok(tbs) => tbs,
                    Err(e) => {
                        out.send(n, &Err(e));
                        continue;
                    }
                };
                let (out, told) = (out.clone(), told.clone());
                // Signed on this thread (one session): the answer waits for `flush`;
                // from a session's own thread it goes out at once.
                let now = !ready_inline;
                backend.submit(
                    key,
                    binding,
                    tbs,
                    Box::new(move |r| {
                        if let Err(TokenError::Reapprove { .. }) = &r {
                            told.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .remove(&id);
                        }
                        let answer = r.map(|s| Answer::Signature(s.as_bytes().to_vec()));
                        out.put(n, &answer, now);
                    }),
                );
            }
            Request::Prove { key, challenge } => {
                out.send(n, &prove(&*backend, &told, key, &challenge));
            }
            Request::Raw { id, millis } if bench => {
                let found = told
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&id)
                    .cloned();
                let outcome = match found {
                    Some(found) => raw(&*backend, ready_inline, &found.0, &found.1, millis),
                    None => Err(TokenError::Reapprove {
                        label: jose::b64(&id),
                    }),
                };
                out.send(n, &outcome);
            }
            other => match &keeper {
                Some((keeper, _)) => {
                    if keeper.send((n, other)).is_err() {
                        out.send(n, &Err(TokenError::WorkersGone));
                    }
                }
                None => out.send(
                    n,
                    &Err(TokenError::Internal(format!(
                        "a signer process answers only sign and prove, not {}",
                        other.name()
                    ))),
                ),
            },
        }
    }
    // The agent is gone or stopping: finish a key-management call under way (a key half
    // generated, a record half written) before the process ends; the signing sessions
    // finish theirs when `backend` is dropped.
    if let Some((sender, thread)) = keeper.take() {
        drop(sender);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
    ExitCode::SUCCESS
}

/// Opens the device; the keeper reports the configured sessions and keeps only its share.
fn open(
    device: &DeviceSettings,
    sessions: Option<usize>,
) -> Result<(Arc<dyn Backend>, Ready), TokenError> {
    let pid = std::process::id();
    match device {
        DeviceSettings::Pkcs11(settings) => {
            let mut token = Pkcs11Token::open(settings, sessions)?;
            let total = token.sessions();
            let per_signer = token.per_signer();
            if let Some(k) = per_signer {
                token.limit_sessions(k);
            }
            if token.sessions() == 1 {
                token.sign_inline();
            }
            let ready = Ready {
                description: token.describe(),
                sessions: total,
                per_signer,
                pid,
                inline: token.sessions() == 1,
                whole_input: token.whole_input(),
            };
            Ok((Arc::new(token), ready))
        }
        #[cfg(feature = "tpm")]
        DeviceSettings::Tpm(settings) => {
            let token = TpmToken::open(settings)?;
            let ready = Ready {
                description: token.describe(),
                sessions: 1,
                per_signer: None,
                pid,
                inline: false,
                whole_input: Vec::new(),
            };
            Ok((Arc::new(token), ready))
        }
    }
}

/// The largest signing input a `Sign` may carry (for a mechanism that hashes on the
/// device): a JWS signing input is a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;

/// The digest (or, for a mechanism that hashes on the device, the signing input that
/// hashes to it) as the key's algorithm needs it, or why not.
fn check(
    key: &KeyInfo,
    alg: crate::jose::Alg,
    digest: &[u8],
    message: Option<&[u8]>,
) -> Result<ToBeSigned, TokenError> {
    let tbs = ToBeSigned::of_digest(alg, digest)?;
    crate::token::check_alg(key.label(), key.alg(), &tbs)?;
    let Some(message) = message else {
        return Ok(tbs);
    };
    let whole = alg.to_be_signed(message);
    if message.len() > MAX_MESSAGE || whole.digest() != tbs.digest() {
        return Err(TokenError::Internal(
            "a signing input that is too long or does not hash to its digest".into(),
        ));
    }
    Ok(whole)
}

/// Signs the challenge with the key found afresh; keeps the key for `Sign` only when the
/// signature verifies under the public key the agent told (or the device bound it itself).
/// The signature goes back either way: the agent's keyring judges it too.
fn prove(backend: &dyn Backend, told: &Told, key: KeyInfo, challenge: &[u8]) -> Outcome {
    let well_formed = challenge.len() == CHALLENGE_PREFIX.len() + 43
        && challenge.starts_with(CHALLENGE_PREFIX)
        && challenge[CHALLENGE_PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
    if !well_formed {
        return Err(TokenError::Internal(
            "a signer process proves possession only over a challenge in the keyring's form".into(),
        ));
    }
    let tbs = key.alg().to_be_signed(challenge);
    let (proof, binding) = worker::wait(|reply| backend.prove(&key, tbs, reply))?;
    let mut told = told.lock().unwrap_or_else(PoisonError::into_inner);
    match proof {
        Proof::Signed(signature) => {
            match jose::verify(key.public(), key.alg(), challenge, &signature) {
                Ok(()) => {
                    told.insert(key.id().to_vec(), Arc::new((key, binding)));
                }
                Err(e) => {
                    tracing::warn!(key = %key.label(), "signer: the device's object does not match the key it was told about ({e}); it will not sign with it");
                    told.remove(key.id());
                }
            }
            Ok(Answer::Proof(Some(signature.as_bytes().to_vec())))
        }
        Proof::LoadedByDevice => {
            told.insert(key.id().to_vec(), Arc::new((key, binding)));
            Ok(Answer::Proof(None))
        }
    }
}

/// `bench`: every session signs the same digest until `millis` are up ([`signed_until`]).
fn raw(
    backend: &dyn Backend,
    inline: bool,
    key: &KeyInfo,
    binding: &Binding,
    millis: u64,
) -> Outcome {
    let tbs = key
        .alg()
        .to_be_signed(b"keybound bench: raw device signature");
    let tbs = ToBeSigned::of_digest(key.alg(), tbs.digest().as_bytes())?;
    let until = std::time::Instant::now() + std::time::Duration::from_millis(millis.min(60_000));
    let sign = || backend.sign(key, binding, tbs.clone()).map(drop);
    std::thread::scope(|scope| {
        // Two callers per session keep a session's worker thread from waiting between
        // signatures (and a TPM from flushing its key between them); a session signed on
        // the caller's thread needs one.
        let callers = match backend.sessions() {
            1 if inline => 1,
            n => 2 * n.max(1),
        };
        if callers == 1 {
            // On this long-lived thread, so the bench's CPU counters (per thread) see it.
            return signed_until(until, sign).map(Answer::Count);
        }
        let threads: Vec<_> = (0..callers)
            .map(|_| {
                let sign = &sign;
                scope.spawn(move || signed_until(until, sign))
            })
            .collect();
        let mut made = 0;
        for t in threads {
            made += t.join().map_err(|_| TokenError::WorkersGone)??;
        }
        Ok(Answer::Count(made))
    })
}

/// The keeper's key-management calls run on their own thread, so a slow one (an RSA key
/// generated) never holds up the signatures read behind it.
type Manager = (
    std::sync::mpsc::Sender<(u64, Request)>,
    Option<std::thread::JoinHandle<()>>,
);

fn manager(backend: Arc<dyn Backend>, out: Out) -> Manager {
    let (tx, rx) = std::sync::mpsc::channel::<(u64, Request)>();
    let spawned = std::thread::Builder::new()
        .name("keybound-keeper".into())
        .spawn(move || {
            for (n, request) in rx {
                out.send(n, &manage(&*backend, request));
            }
        });
    match spawned {
        Ok(thread) => (tx, Some(thread)),
        Err(e) => {
            tracing::error!("signer: cannot start the key-management thread: {e}");
            (tx, None)
        }
    }
}

fn manage(backend: &dyn Backend, request: Request) -> Outcome {
    let label = |s: &str| Label::parse(s);
    match request {
        Request::Keys => backend.keys().map(Answer::Listing),
        Request::Health => backend.health().map(|()| Answer::Done),
        Request::Facts { key } => backend.facts(&key).map(Answer::Facts),
        Request::Generate { label: l, alg } => backend.generate(&label(&l)?, alg).map(Answer::Key),
        Request::Records { slot } => backend.records(&label(&slot)?).map(Answer::Records),
        Request::PutRecord { slot, seq, bytes } => backend
            .put_record(&label(&slot)?, seq, &bytes)
            .map(|()| Answer::Done),
        Request::RemoveRecord { slot, seq, bytes } => backend
            .remove_record(&label(&slot)?, seq, &bytes)
            .map(|()| Answer::Done),
        Request::Destroy { key } => backend.destroy(&key).map(|()| Answer::Done),
        Request::Sign { .. } | Request::Prove { .. } | Request::Raw { .. } => Err(
            TokenError::Internal(format!("{} is not key management", request.name())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `lefts` through a fresh [`Pacing`], with `deep` as the depth of every lift.
    fn flushes(lefts: &[usize], deep: bool) -> Vec<bool> {
        let mut p = Pacing::default();
        lefts.iter().map(|&left| p.due(left, || deep)).collect()
    }

    #[test]
    fn answers_go_out_when_low_and_before_waiting() {
        // Falling below FLUSH_AT, and at none left; not while above or staying low.
        assert_eq!(
            flushes(&[5, 4, 3, 2, 1, 0], false),
            [false, false, false, true, false, true]
        );
    }

    #[test]
    fn a_deep_lift_keeps_the_answers_for_the_next_low_point() {
        // A shallow lift sends, a deep one keeps them for the next low point.
        assert_eq!(flushes(&[3, 2, 3], false), [false, true, true]);
        assert_eq!(flushes(&[3, 2, 3], true), [false, true, false]);
        // Also right after running dry: everything went out before it waited.
        assert_eq!(
            flushes(&[2, 1, 0, 3, 2, 0], true),
            [true, false, true, false, true, true]
        );
    }
}
