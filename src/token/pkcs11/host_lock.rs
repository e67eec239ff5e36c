//! keybound's processes on one host take turns at a SoftHSM token for what reads or
//! rewrites the token's own state: `C_Initialize` and finding the token, login, checking
//! that it is there, key and record management, and finding a key to prove it (SoftHSM
//! reads its object directory then). Signatures do not take turns.
//!
//! Why: SoftHSM 2.6.1 rewrites its token file on every `C_Login` (the PIN-count flags), and
//! releases its file lock before its buffered writes reach the file; another process that
//! reads the file in that moment sees it empty or cut short, and its `C_Login` fails with
//! `CKR_USER_PIN_NOT_INITIALIZED` or `CKR_GENERAL_ERROR` (a new key or record file read
//! that way is missing until the next read). Four loops of `keybound keys list` against
//! one token failed 63 times in about 4,100 runs without this lock, 0 times in about 2,900
//! with it (`tests/keys.rs` runs a smaller version).
//!
//! The profile says where (`[processes] take_turns_on`: for SoftHSM, the token directory
//! `directories.tokendir` of `$SOFTHSM2_CONF`, else of `/etc/softhsm/softhsm2.conf`). The
//! lock is an advisory `flock` on that path: every process that uses those tokens can open
//! it for reading, processes on other token directories (each test's own) do not wait for
//! each other, and no file is created anywhere. For a module whose profile says nothing
//! the lock only orders this process's own threads. It is reentrant on one thread (management
//! opens sessions, which log in, which may re-initialise the library). A process that
//! holds it for ever (another user's) delays keybound by [`PATIENCE`] once: keybound then
//! goes on without it, with a warning, and for [`AFTER_GIVING_UP`] tries it only once each
//! time.

use std::fs::File;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use crate::token::profile::{ConfigSetting, Profile};

/// How long a process waits for another to finish (an RSA key generation on a slow token
/// takes seconds) before it goes on without the lock; well below the agent's
/// `signer_timeout_secs` (30 s by default), after which a signer that signs nothing is
/// taken for stuck.
const PATIENCE: Duration = Duration::from_secs(10);

/// After giving up once, the lock is tried once (not waited for) for this long.
const AFTER_GIVING_UP: Duration = Duration::from_secs(60);

pub(super) struct HostLock {
    /// What is locked; `None` when the lock orders this process's threads only.
    file: Option<File>,
    /// The thread that holds the lock, and how many times it took it.
    holder: Mutex<Option<(ThreadId, usize)>>,
    freed: Condvar,
    /// When this process last went on without the lock.
    gave_up: Mutex<Option<Instant>>,
}

/// Held while it lives, on the thread that took it (not `Send`).
pub(super) struct HostGuard<'a>(&'a HostLock, PhantomData<*const ()>);

impl HostLock {
    /// The lock `profile` asks for (`[processes] take_turns_on`), or this process only.
    pub(super) fn for_profile(profile: Option<&Profile>) -> HostLock {
        let target = profile
            .and_then(|p| p.processes.take_turns_on.as_ref())
            .and_then(configured_path);
        HostLock::on(target.as_deref())
    }

    /// The lock on `target` (a file or directory), or on this process only.
    pub(super) fn on(target: Option<&Path>) -> HostLock {
        let file = target.and_then(|path| {
            File::open(path)
                .inspect_err(|e| {
                    tracing::debug!(path = %path.display(),
                        "cannot open it to lock the token across processes: {e}");
                })
                .ok()
        });
        HostLock {
            file,
            holder: Mutex::new(None),
            freed: Condvar::new(),
            gave_up: Mutex::new(None),
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
                    return HostGuard(self, PhantomData);
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
            let mut gave_up = self.gave_up.lock().unwrap_or_else(PoisonError::into_inner);
            let patience = match *gave_up {
                Some(t) if t.elapsed() < AFTER_GIVING_UP => Duration::ZERO,
                _ => PATIENCE,
            };
            if !take(file, patience) {
                *gave_up = Some(Instant::now());
            }
        }
        HostGuard(self, PhantomData)
    }
}

/// The path `setting` names in the module's configuration file.
fn configured_path(setting: &ConfigSetting) -> Option<PathBuf> {
    let conf = std::env::var_os(&setting.config_env)
        .map_or_else(|| setting.config_default.clone(), PathBuf::from);
    let text = std::fs::read_to_string(&conf)
        .inspect_err(|e| tracing::debug!(conf = %conf.display(), "cannot read it: {e}"))
        .ok()?;
    setting_in(&text, &setting.setting)
}

/// `name = PATH` in a configuration of `name = value` lines (`#` starts a comment line,
/// spaces around `=` are trimmed, as SoftHSM reads its own).
fn setting_in(conf: &str, name: &str) -> Option<PathBuf> {
    conf.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(n, _)| n.trim() == name)
        .map(|(_, value)| PathBuf::from(value.trim()))
        .filter(|p| !p.as_os_str().is_empty())
}

/// `flock(LOCK_EX)`, polled for `patience` at most (once when zero); false when it went
/// on without the lock.
fn take(file: &File, patience: Duration) -> bool {
    let start = Instant::now();
    // Short pauses: a listing takes and leaves the lock once per object, and a long sleep
    // past the moment it was let go costs every one of them.
    let mut pause = Duration::from_micros(100);
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return true,
            Err(rustix::io::Errno::WOULDBLOCK | rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::debug!("cannot take the token's lock: {e}; going on without it");
                return true;
            }
        }
        if start.elapsed() >= patience {
            if !patience.is_zero() {
                tracing::warn!(
                    "another process has held the token's lock (the profile's \
                     [processes] take_turns_on) for \
                     {} s; going on without it, and for {} s without waiting for it (a token \
                     file read meanwhile may look empty: retry what fails)",
                    patience.as_secs(),
                    AFTER_GIVING_UP.as_secs()
                );
            }
            return false;
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
    fn softhsm_token_dir_from_its_config() {
        let name = "directories.tokendir";
        let conf = "# comment\ndirectories.tokendir = /var/lib/softhsm/tokens/ \nobjectstore.backend = file\n";
        assert_eq!(
            setting_in(conf, name),
            Some(PathBuf::from("/var/lib/softhsm/tokens/"))
        );
        assert_eq!(setting_in("#directories.tokendir = /x\n", name), None);
        assert_eq!(setting_in("directories.tokendir =\n", name), None);
    }

    #[test]
    fn reentrant_on_one_thread() {
        let (_dir, path) = file();
        let lock = HostLock::on(Some(&path));
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
        let lock = HostLock::on(Some(&path));
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
        let lock = Arc::new(HostLock::on(Some(&path)));
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
