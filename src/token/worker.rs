//! The one hardware worker: N threads, each owning one device handle (a PKCS#11 session, a
//! TPM context), taking plain-data jobs from one queue and answering each through its
//! callback. PKCS#11 runs N of them, the TPM one. A job names what to do (a key's binding
//! and the `ToBeSigned`, never a closure), so the same [`Workers`] could be a child process
//! that holds the device instead of a thread; [`Threads`] is the in-process one.
//!
//! Also the one retry-once rule ([`retry_once`]) that every device call uses when a
//! session, a context or the device itself was lost under it.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::TokenError;

/// Receives the outcome of one job, possibly on another thread.
pub(crate) type Reply<A> = Box<dyn FnOnce(Result<A, TokenError>) + Send>;

/// What a worker owns and how it runs a job. One value per worker thread: it is never shared,
/// so it may hold a handle that is `Send` but not `Sync`.
pub(crate) trait Device: Send + 'static {
    /// Plain data: what to do, with which key.
    type Job: Send + 'static;
    type Answer: Send + 'static;

    /// Runs one job. Blocking; only this worker touches `self`.
    fn run(&mut self, job: Self::Job) -> Result<Self::Answer, TokenError>;

    /// The queue is empty: a moment to let go of what only a burst of work needs (the TPM
    /// flushes what it loaded). Also called once before the worker ends.
    fn idle(&mut self) {}
}

/// Somewhere jobs run and answer by callback: threads of this process ([`Threads`]); a
/// signer process would be another implementation.
pub(crate) trait Workers<J, A: Send + 'static>: Send + Sync {
    /// Queues `job`; `reply` gets its outcome, or [`TokenError::WorkersGone`] at once when
    /// no worker will run it.
    fn submit(&self, job: J, reply: Reply<A>);

    /// Runs `job` and waits for its outcome. Blocking: never call it on a worker itself.
    /// (PKCS#11 only submits; its management calls use their own session.)
    #[cfg_attr(not(feature = "tpm"), allow(dead_code))]
    fn call(&self, job: J) -> Result<A, TokenError> {
        wait(|reply| self.submit(job, reply))
    }
}

/// Calls `submit` with a reply that sends to this thread, and waits for it: the one
/// blocking adapter over a callback.
pub(crate) fn wait<A: Send + 'static>(submit: impl FnOnce(Reply<A>)) -> Result<A, TokenError> {
    let (tx, rx) = mpsc::sync_channel(1);
    submit(Box::new(move |result| {
        // The receiver waits below; a failed send means it is gone, nothing to do.
        let _ = tx.send(result);
    }));
    rx.recv().map_err(|_| TokenError::WorkersGone)?
}

type Queued<D> = (<D as Device>::Job, Reply<<D as Device>::Answer>);

/// Worker threads sharing one queue: any idle worker takes the next job.
pub(crate) struct Threads<D: Device> {
    /// Multi-producer multi-consumer. `None` once shutting down.
    jobs: Option<Sender<Queued<D>>>,
    threads: Vec<JoinHandle<()>>,
}

impl<D: Device> Threads<D> {
    /// One thread per device handle, named `{name}-{i}` (or `name` for a single one: the
    /// bench tells device threads from the others by these names).
    pub(crate) fn start(name: &str, devices: Vec<D>) -> Result<Threads<D>, TokenError> {
        let (jobs, queue) = crossbeam_channel::unbounded();
        let single = devices.len() == 1;
        let mut threads = Vec::with_capacity(devices.len());
        for (i, device) in devices.into_iter().enumerate() {
            let queue = queue.clone();
            let thread = if single {
                name.to_string()
            } else {
                format!("{name}-{i}")
            };
            match std::thread::Builder::new()
                .name(thread.clone())
                .spawn(move || serve(device, queue))
            {
                Ok(handle) => threads.push(handle),
                // Fewer workers still work; none is an error.
                Err(e) => tracing::error!("cannot start device worker {thread}: {e}"),
            }
        }
        if threads.is_empty() {
            return Err(TokenError::Unavailable {
                reason: format!("cannot start any {name} worker thread"),
            });
        }
        Ok(Threads {
            jobs: Some(jobs),
            threads,
        })
    }
}

impl<D: Device> Workers<D::Job, D::Answer> for Threads<D> {
    fn submit(&self, job: D::Job, reply: Reply<D::Answer>) {
        let refused = match &self.jobs {
            Some(jobs) => jobs.send((job, reply)).err().map(|e| e.0),
            None => Some((job, reply)),
        };
        if let Some((_, reply)) = refused {
            reply(Err(TokenError::WorkersGone));
        }
    }
}

/// Closing the queue ends each worker once the queued jobs are done; joining them means no
/// thread is inside the device's library (SoftHSM crashes if its globals are torn down under
/// a running call; TSS objects stay flushed) when the process exits.
impl<D: Device> Drop for Threads<D> {
    fn drop(&mut self) {
        self.jobs = None;
        // A reply runs on a worker and may hold the last reference to these threads; that
        // worker cannot join itself (EDEADLK). It ends on its own once the queue is closed.
        let me = std::thread::current().id();
        for handle in self.threads.drain(..) {
            if handle.thread().id() == me {
                continue;
            }
            if handle.join().is_err() {
                tracing::error!("a device worker panicked");
            }
        }
    }
}

fn serve<D: Device>(mut device: D, queue: Receiver<Queued<D>>) {
    loop {
        let (job, reply) = match queue.try_recv() {
            Ok(queued) => queued,
            Err(TryRecvError::Empty) => {
                device.idle();
                match queue.recv() {
                    Ok(queued) => queued,
                    Err(_) => break,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        // A panic in a job (a bug) answers that job and leaves the worker serving: a dead
        // worker would strand every job queued behind it, and their callers wait forever.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.run(job)))
            .unwrap_or_else(|_| {
                Err(TokenError::Internal(
                    "a device worker panicked while running a job".into(),
                ))
            });
        reply(outcome);
    }
    device.idle();
}

/// Runs `attempt` on `state`; when it fails, `recover` decides: `Ok(())` means the handle
/// was renewed (session reopened, context reconnected) and the attempt is worth one more
/// try; `Err(e)` ends with `e`. A second failure ends with `give_up`'s error.
pub(crate) fn retry_once<S: ?Sized, T, F, E>(
    state: &mut S,
    mut attempt: impl FnMut(&mut S) -> Result<T, F>,
    recover: impl FnOnce(&mut S, F) -> Result<(), E>,
    give_up: impl FnOnce(&mut S, F) -> E,
) -> Result<T, E> {
    let failure = match attempt(state) {
        Ok(v) => return Ok(v),
        Err(f) => f,
    };
    recover(state, failure)?;
    attempt(state).map_err(|f| give_up(state, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts jobs and idle moments; job `n` answers `n + jobs run so far`.
    struct Counter {
        runs: u32,
        idles: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    impl Device for Counter {
        type Job = u32;
        type Answer = u32;
        fn run(&mut self, job: u32) -> Result<u32, TokenError> {
            self.runs += 1;
            assert!(job != 666, "a job that panics");
            Ok(job + self.runs)
        }
        fn idle(&mut self) {
            self.idles
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_job_that_panics_is_answered_and_the_worker_serves_on() {
        let threads = Threads::start(
            "test-worker",
            vec![Counter {
                runs: 0,
                idles: Default::default(),
            }],
        )
        .unwrap();
        assert!(matches!(threads.call(666), Err(TokenError::Internal(_))));
        assert_eq!(threads.call(10).unwrap(), 12);
    }

    #[test]
    fn one_worker_runs_jobs_in_order_and_idles_before_it_ends() {
        let idles = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads = Threads::start(
            "test-worker",
            vec![Counter {
                runs: 0,
                idles: idles.clone(),
            }],
        )
        .unwrap();
        assert_eq!(threads.call(10).unwrap(), 11);
        assert_eq!(threads.call(10).unwrap(), 12);
        drop(threads);
        // Joined: the idle at the end has run (whatever ran between the jobs).
        assert!(idles.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_job_after_shutdown_is_answered() {
        let idles = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut threads = Threads::start("test-worker", vec![Counter { runs: 0, idles }]).unwrap();
        threads.jobs = None;
        assert!(matches!(threads.call(1), Err(TokenError::WorkersGone)));
    }

    #[test]
    fn a_reply_that_drops_the_workers_does_not_deadlock() {
        let idles = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads = std::sync::Arc::new(
            Threads::start("test-worker", vec![Counter { runs: 0, idles }]).unwrap(),
        );
        let (done_tx, done_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let last = threads.clone();
        // The reply drops the last strong reference, on the worker thread itself, once this
        // thread has let go of its own.
        threads.submit(
            1,
            Box::new(move |r| {
                let _ = go_rx.recv();
                drop(last);
                let _ = done_tx.send(r.is_ok());
            }),
        );
        drop(threads);
        go_tx.send(()).unwrap();
        assert!(done_rx.recv().unwrap());
    }

    #[test]
    fn retry_once_retries_once() {
        let mut tries = 0;
        let r: Result<(), &str> = retry_once(
            &mut tries,
            |t| {
                *t += 1;
                Err(*t)
            },
            |_, _| Ok(()),
            |_, n| if n == 2 { "second" } else { "other" },
        );
        assert_eq!((r, tries), (Err("second"), 2));
        let mut tries = 0;
        let r: Result<(), &str> = retry_once(
            &mut tries,
            |t| {
                *t += 1;
                Err(*t)
            },
            |_, _| Err("first"),
            |_, _| "second",
        );
        assert_eq!((r, tries), (Err("first"), 1));
    }
}
