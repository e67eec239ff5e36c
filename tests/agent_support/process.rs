//! The agent as a process: its socket directory ([`SocketDir`]), `keybound serve` spawned
//! from the built binary ([`Agent`]), signals, and commands run under the [`GUARD`].

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;
use crate::support::*;

/// A temp dir holding the agent's socket directory `run/` (not created here).
pub struct SocketDir {
    dir: TempDir,
}

impl SocketDir {
    pub fn new() -> SocketDir {
        SocketDir {
            dir: tempfile::Builder::new()
                .prefix("keybound-agent-")
                .tempdir()
                .expect("create socket tempdir"),
        }
    }

    /// The temp dir itself (0700, ours).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `<root>/run`: the directory the agent creates.
    pub fn run_dir(&self) -> PathBuf {
        self.root().join("run")
    }

    /// `<root>/run/agent.sock`.
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("agent.sock")
    }
}

/// `chmod <mode> <path>`.
pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Permission bits and owner of `path` (not following a symlink).
pub fn mode_and_owner(path: &Path) -> (u32, u32) {
    let m =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid())
}

// ---------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------

/// `keybound serve --socket <path>` on a [`DevToken`] ([`Agent::start`]) or from a command
/// prepared by the test ([`Agent::start_command`], e.g. against a TPM).
pub struct Agent {
    child: Child,
    socket: PathBuf,
    /// Everything the agent wrote to stderr so far.
    log: Arc<Mutex<String>>,
    /// Fires once when the ready line appears; disconnects at EOF on stderr.
    ready: mpsc::Receiver<()>,
}

impl Agent {
    /// Starts the agent and waits for its ready line.
    pub fn start(token: &DevToken, socket: &Path) -> Agent {
        let agent = Agent::spawn(token, socket);
        agent.wait_ready();
        agent
    }

    /// Starts the agent without waiting.
    pub fn spawn(token: &DevToken, socket: &Path) -> Agent {
        Agent::spawn_command(
            token.command(&[OsArg::from("serve"), "--socket".into(), socket.into()]),
            socket,
        )
    }

    /// Starts `cmd`, a `keybound serve --socket <socket>` prepared by the caller (any
    /// backend: its config, environment and working directory are the caller's), and
    /// waits for its ready line.
    pub fn start_command(cmd: Command, socket: &Path) -> Agent {
        let agent = Agent::spawn_command(cmd, socket);
        agent.wait_ready();
        agent
    }

    /// Starts `cmd` (see [`Agent::start_command`]) without waiting.
    pub fn spawn_command(mut cmd: Command, socket: &Path) -> Agent {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keybound serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        let ready_line = format!("keybound agent listening on {}", socket.display());
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line == ready_line {
                    let _ = ready_tx.send(());
                }
                let mut log = sink.lock().unwrap_or_else(PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
        });
        Agent {
            child,
            socket: socket.to_path_buf(),
            log,
            ready,
        }
    }

    pub fn wait_ready(&self) {
        match self.ready.recv_timeout(GUARD) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("keybound serve exited before it was ready:\n{}", self.log())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "keybound serve printed no ready line within {GUARD:?}:\n{}",
                self.log()
            ),
        }
        assert!(
            self.socket.exists(),
            "ready line printed, but {} does not exist",
            self.socket.display()
        );
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's stderr so far, once it has been quiet for a moment: an async thread's
    /// log lines leave when it has nothing more to run, just after the answer a test
    /// got, and the reader thread takes them in line by line.
    pub fn log(&self) -> String {
        let read = || {
            self.log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut seen = read();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = read();
            if now.len() == seen.len() || Instant::now() > deadline {
                return now;
            }
            seen = now;
        }
    }

    /// Sends SIGTERM (through kill(1): the crate has no libc binding to borrow).
    pub fn terminate(&self) {
        signal(self.pid(), "TERM");
    }

    /// Waits for the agent to exit (SIGKILL and panic after [`GUARD`]).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for keybound serve") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "keybound serve did not exit within {GUARD:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Still running?
    /// Waits for the exit after SIGTERM: status 0, the socket removed, the stop logged,
    /// nothing panicked.
    pub fn assert_clean_exit(&mut self) {
        let status = self.wait();
        let log = self.log();
        assert_eq!(status.code(), Some(0), "exit status 0:\n{log}");
        assert!(!self.socket.exists(), "the socket file is removed on exit");
        assert!(log.contains("keybound agent stopped"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }

    pub fn running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("poll keybound serve")
            .is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- keybound serve (pid {}) stderr ---\n{}",
                self.child.id(),
                self.log()
            );
        }
    }
}

/// An argument for [`DevToken::command`], which takes one type for all.
pub type OsArg = std::ffi::OsString;

/// Sends `sig` (`"TERM"`, `"INT"`, `"KILL"`) to `pid` through the kill(2) system call, so
/// the tests need no `kill` program (procps) on the machine.
pub fn signal(pid: u32, sig: &str) {
    crate::support::send_signal(pid, sig);
}

/// Runs `cmd` to completion (a `keybound serve` expected to fail at start); SIGKILLs it and
/// panics if it is still running after [`GUARD`].
pub fn output_with_guard(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(GUARD) {
        Ok(out) => out.expect("wait for the child"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("{cmd:?} still running after {GUARD:?}; expected it to fail at start");
        }
    }
}

/// Opens the socket to everyone, as a misconfigured system might: the traversal bits on the
/// temp dir and on `run/`, rw on the socket. The uid check must still hold.
pub fn expose_socket(dir: &SocketDir) {
    chmod(dir.root(), 0o711);
    chmod(&dir.run_dir(), 0o711);
    chmod(&dir.socket(), 0o666);
}

/// `keybound serve` on `dir` must fail at start: exit 1, one `error:` line naming `needles`.
pub fn assert_serve_refuses(token: &DevToken, dir: &SocketDir, needles: &[&str]) {
    let socket = dir.socket();
    let args = [OsArg::from("serve"), "--socket".into(), socket.into()];
    let out = output_with_guard(token.command(&args));
    let line = assert_error(&out, &args);
    assert_mentions(&line, needles);
}
