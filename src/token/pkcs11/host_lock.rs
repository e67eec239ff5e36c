//! keybound's processes on one host take turns at a module for what reads or rewrites the
//! token's own state: `C_Initialize` and finding the token, login, and key and record
//! management. Signatures do not take turns.
//!
//! Why: SoftHSM 2.6.1 rewrites its token file on every `C_Login` (the PIN-count flags), and
//! releases its file lock before its buffered writes reach the file; another process that
//! reads the file in that moment sees it empty or cut short, and its `C_Login` fails with
//! `CKR_USER_PIN_NOT_INITIALIZED` or `CKR_GENERAL_ERROR` (a new key or record file read
//! that way is missing until the next read). Four loops of `keybound keys list` against
//! one token failed 63 times in about 4,100 runs without this lock, 0 times in about 2,900
//! with it (`tests/keys.rs` runs a smaller version).
//!
//! The lock is an advisory `flock` on the module file itself: every process that loads
//! the module can open it for reading, and no file is created anywhere. It is reentrant on
//! one thread (management opens sessions, which log in, which may re-initialise the
//! library). Another user's process could hold it for ever: after [`PATIENCE`] keybound
//! goes on without it, with a warning.

use std::fs::File;
use std::path::Path;
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

/// How long a process waits for another to finish (an RSA key generation on a slow token
/// takes seconds) before it goes on without the lock.
const PATIENCE: Duration = Duration::from_secs(30);

pub(super) struct HostLock {
    /// The module file; `None` when it cannot be opened (the lock is then in-process only).
    file: Option<File>,
    /// The thread that holds the lock, and how many times it took it.
    holder: Mutex<Option<(ThreadId, usize)>>,
    freed: Condvar,
}

/// Held while it lives.
pub(super) struct HostGuard<'a>(&'a HostLock);

impl HostLock {
    pub(super) fn on(module: &Path) -> HostLock {
        let file = File::open(module)
            .inspect_err(|e| {
                tracing::debug!(module = %module.display(),
                    "cannot open the module to lock it across processes: {e}");
            })
            .ok();
        HostLock {
            file,
            holder: Mutex::new(None),
            freed: Condvar::new(),
        }
    }

    /// Waits for the other threads of this process, then for the other processes.
    pub(super) fn hold(&self) -> HostGuard<'_> {
        let me = thread::current().id();
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match &mut *holder {
                Some((t, depth)) if *t == me => {
                    *depth += 1;
                    return HostGuard(self);
                }
                Some(_) => {
                    holder = self
                        .freed
                        .wait(holder)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                None => break,
            }
        }
        *holder = Some((me, 1));
        // Other threads of this process wait on `freed` meanwhile.
        drop(holder);
        if let Some(file) = &self.file {
            take(file);
        }
        HostGuard(self)
    }
}

/// `flock(LOCK_EX)`, polled so that a holder that never lets go delays this process by
/// [`PATIENCE`] at most.
fn take(file: &File) {
    let start = Instant::now();
    // Short pauses: a listing takes and leaves the lock once per object, and a long sleep
    // past the moment it was let go costs every one of them.
    let mut pause = Duration::from_micros(100);
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return,
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::debug!("cannot lock the module file: {e}; going on without the lock");
                return;
            }
        }
        if start.elapsed() >= PATIENCE {
            tracing::warn!(
                "another process has held the lock on the PKCS#11 module file for {} s; \
                 going on without it (a token file read meanwhile may look empty: retry \
                 what fails)",
                PATIENCE.as_secs()
            );
            return;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(2));
    }
}

impl Drop for HostGuard<'_> {
    fn drop(&mut self) {
        let lock = self.0;
        let mut holder = lock.holder.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, depth)) = &mut *holder {
            *depth -= 1;
            if *depth > 0 {
                return;
            }
        }
        if let Some(file) = &lock.file {
            // Unlocking a lock not held (it was given up on) is harmless.
            let _ = flock(file, FlockOperation::Unlock);
        }
        *holder = None;
        drop(holder);
        lock.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("module.so");
        std::fs::write(&path, b"not a module").unwrap();
        (dir, path)
    }

    #[test]
    fn reentrant_on_one_thread() {
        let (_dir, path) = file();
        let lock = HostLock::on(&path);
        let outer = lock.hold();
        let inner = lock.hold();
        drop(inner);
        drop(outer);
        // Free again: a second holder (another descriptor, as another process) gets it.
        let other = File::open(&path).unwrap();
        flock(&other, FlockOperation::NonBlockingLockExclusive).expect("free after release");
    }

    #[test]
    fn another_descriptor_waits_while_held() {
        let (_dir, path) = file();
        let lock = HostLock::on(&path);
        let guard = lock.hold();
        let other = File::open(&path).unwrap();
        assert!(
            flock(&other, FlockOperation::NonBlockingLockExclusive).is_err(),
            "held: another open file description (another process) must wait"
        );
        drop(guard);
        flock(&other, FlockOperation::NonBlockingLockExclusive).expect("free after release");
    }

    #[test]
    fn threads_take_turns() {
        let (_dir, path) = file();
        let lock = Arc::new(HostLock::on(&path));
        let inside = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (lock, inside) = (lock.clone(), inside.clone());
                thread::spawn(move || {
                    for _ in 0..50 {
                        let _g = lock.hold();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
