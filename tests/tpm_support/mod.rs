//! Harness for the TPM tests, after rust-tss-esapi's (`tests/integration_tests/common`):
//!
//! * [`Swtpm`]: one `swtpm` per test, its state in a temporary directory, its data and
//!   control channels on two consecutive free loopback ports (the swtpm TCTI finds the
//!   control channel at data port + 1), polled until it accepts, killed on drop.
//!   [`Swtpm::restart`] stops it and starts it again on the same state (what a machine
//!   reboot does to a TPM: transient objects gone, persistent ones and seeds kept).
//! * [`TpmHome`]: a swtpm plus a `keybound.toml` with `backend = "tpm"`, a state directory
//!   and helpers that run the built `keybound` binary against it.
//! * [`tpm2`]: a tpm2-tools command aimed at the same swtpm.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running swtpm that only this test uses.
pub struct Swtpm {
    dir: TempDir,
    port: u16,
    ctrl: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// Starts swtpm on two free ports; a port taken between probing and binding (another
    /// test) makes swtpm exit, so this tries fresh ports a few times.
    pub fn start() -> Swtpm {
        let dir = tempfile::Builder::new()
            .prefix("keybound-swtpm-")
            .tempdir()
            .expect("create swtpm tempdir");
        fs::create_dir(dir.path().join("state")).expect("create swtpm state dir");
        let mut tpm = Swtpm {
            dir,
            port: 0,
            ctrl: 0,
            child: None,
        };
        let mut last = String::new();
        for _ in 0..5 {
            (tpm.port, tpm.ctrl) = free_ports();
            match tpm.launch() {
                Ok(()) => return tpm,
                Err(e) => last = e,
            }
        }
        panic!("swtpm did not start: {last}");
    }

    /// `swtpm:host=127.0.0.1,port=P`, the TCTI keybound and tpm2-tools use.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills swtpm (like pulling the plug) and starts it again on the same state and ports.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.launch() {
                Ok(()) => return,
                // The old listening sockets may linger a moment.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("swtpm restart: {e}; retrying");
                    sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("swtpm did not restart: {e}"),
            }
        }
    }

    /// What swtpm wrote to stderr so far.
    pub fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        read("swtpm.log") + &read("trace.log")
    }

    /// Kills swtpm; the TPM is unreachable until [`Swtpm::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn launch(&mut self) -> Result<(), String> {
        let state = self.dir.path().join("state");
        let log = fs::File::create(self.dir.path().join("swtpm.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.ctrl))
            .args(["--flags", "not-need-init,startup-clear"])
            .args(match std::env::var("KEYBOUND_TEST_SWTPM_LOG_LEVEL") {
                // For debugging the harness: swtpm's own trace in its log file.
                Ok(level) => vec![
                    "--log".to_string(),
                    format!("file={}/trace.log,level={level}", self.dir.path().display()),
                ],
                Err(_) => vec![],
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run swtpm (is the swtpm package installed?): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(self.dir.path().join("swtpm.log")).unwrap_or_default();
                return Err(format!("swtpm exited with {status}: {log}"));
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "swtpm did not accept on port {} in 10 s",
                    self.port
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port P such that P and P+1 are free right now (bound, read, released): the swtpm TCTI
/// finds the control channel at P+1.
fn free_ports() -> (u16, u16) {
    for _ in 0..100 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
        let port = a.local_addr().expect("port").port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, next)).is_ok() {
            return (port, next);
        }
    }
    panic!("no two consecutive free ports on 127.0.0.1");
}

/// A tpm2-tools command (`tpm2_<tool>`) aimed at `tpm`, quiet.
pub fn tpm2(tpm: &Swtpm, tool: &str) -> Command {
    let mut cmd = Command::new(format!("tpm2_{tool}"));
    cmd.env("TPM2TOOLS_TCTI", tpm.tcti())
        .env("TSS2_LOG", "all+none");
    cmd
}

/// Runs a tpm2-tools command, asserts success, returns stdout.
pub fn tpm2_ok(tpm: &Swtpm, tool: &str, args: &[&str]) -> String {
    let out = tpm2(tpm, tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run tpm2_{tool} (is tpm2-tools installed?): {e}"));
    assert!(
        out.status.success(),
        "tpm2_{tool} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Transient objects currently loaded in the TPM (`tpm2_getcap handles-transient`).
pub fn transient_handles(tpm: &Swtpm) -> Vec<String> {
    tpm2_ok(tpm, "getcap", &["handles-transient"])
        .lines()
        .map(|l| l.trim().trim_start_matches("- ").to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Transient objects loaded in the TPM, asked from this process through tss-esapi.
///
/// Tests that keep a `Keyring` open in process must use this rather than spawning
/// tpm2-tools: the TSS opens its sockets without close-on-exec, so a child spawned while
/// keybound's TPM thread is mid-command inherits that connection, and swtpm (one client at
/// a time) then waits on it forever while the child waits for swtpm.
#[cfg(feature = "tpm")]
pub fn loaded_objects(tpm: &Swtpm) -> Vec<u32> {
    use std::str::FromStr as _;
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::constants::tss::TPM2_TRANSIENT_FIRST;
    use tss_esapi::structures::CapabilityData;
    let tcti = tss_esapi::TctiNameConf::from_str(&tpm.tcti()).expect("tcti");
    let mut ctx = tss_esapi::Context::new(tcti).expect("connect to swtpm");
    let (data, _) = ctx
        .get_capability(CapabilityType::Handles, TPM2_TRANSIENT_FIRST, 16)
        .expect("TPM2_GetCapability(handles)");
    match data {
        CapabilityData::Handles(list) => list.into_inner().into_iter().map(u32::from).collect(),
        other => panic!("unexpected capability data {other:?}"),
    }
}

/// Waits (up to 2 s) until nothing is loaded in the TPM: keybound's TPM thread flushes when
/// its queue is empty, just after it replied.
#[cfg(feature = "tpm")]
pub fn wait_until_nothing_loaded(tpm: &Swtpm) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let loaded = loaded_objects(tpm);
        if loaded.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "objects left loaded in the TPM: {loaded:x?}"
        );
        sleep(Duration::from_millis(10));
    }
}

/// Tests that open a `Keyring` in this process hold this exclusively; the others share it.
/// A child process spawned by one test while another test's in-process TPM thread is
/// mid-command would inherit that connection (see [`loaded_objects`]) and stall the other
/// test's swtpm for as long as the child lives.
static IN_PROCESS: RwLock<()> = RwLock::new(());

enum Turn {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// A swtpm with keybound configured for it.
///
/// Layout of the tempdir: `keybound.toml`, `state/` (keybound's TPM state directory),
/// `cwd/` (an empty working directory for the binary) and `home/`.
pub struct TpmHome {
    pub tpm: Swtpm,
    dir: TempDir,
    /// Extra raw lines for `[token]`.
    extra: String,
    /// Dropped last: the swtpm is gone before another test may run.
    _turn: Turn,
}

impl TpmHome {
    /// For tests that only run the `keybound` binary and tools: run in parallel.
    pub fn new() -> TpmHome {
        TpmHome::with_token_lines("")
    }

    /// For tests that open a `Keyring` in this process: run alone.
    pub fn in_process() -> TpmHome {
        let turn = Turn::Exclusive(IN_PROCESS.write().unwrap_or_else(PoisonError::into_inner));
        TpmHome::build("", turn)
    }

    /// The config gets `extra` appended to `[token]`.
    pub fn with_token_lines(extra: &str) -> TpmHome {
        let turn = Turn::Shared(IN_PROCESS.read().unwrap_or_else(PoisonError::into_inner));
        TpmHome::build(extra, turn)
    }

    fn build(extra: &str, turn: Turn) -> TpmHome {
        let dir = tempfile::Builder::new()
            .prefix("keybound-tpm-test-")
            .tempdir()
            .expect("create tempdir");
        for d in ["cwd", "home"] {
            fs::create_dir(dir.path().join(d)).expect("create dir");
        }
        let home = TpmHome {
            tpm: Swtpm::start(),
            dir,
            extra: extra.to_string(),
            _turn: turn,
        };
        home.write_config(&home.config_text(""));
        home
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("keybound.toml")
    }

    /// The `keybound.toml` text, with `rest` (e.g. `[[client]]` sections) appended.
    pub fn config_text(&self, rest: &str) -> String {
        format!(
            "[token]\nbackend = \"tpm\"\ntcti = \"{}\"\nstate_dir = \"{}\"\n{}\n{rest}",
            self.tpm.tcti(),
            self.state_dir().display(),
            self.extra.trim_end()
        )
    }

    pub fn write_config(&self, text: &str) {
        fs::write(self.config_path(), text).expect("write keybound.toml");
    }

    /// `keybound <args>` against this TPM, not yet run.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybound"));
        cmd.args(args)
            .current_dir(self.path("cwd"))
            .env("KEYBOUND_CONFIG", self.config_path())
            .env("TSS2_LOG", "all+none")
            .env("HOME", self.path("home"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_STATE_HOME")
            .env_remove("RUST_LOG");
        cmd
    }

    pub fn keybound<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("spawn keybound")
    }

    /// Runs `keybound <args>`, asserts exit 0 and no panic, returns stdout.
    pub fn run_ok<S: AsRef<OsStr> + Debug>(&self, args: &[S]) -> String {
        let out = self.keybound(args);
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{args:?} failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// Runs `keybound <args>`, asserts exit `code` and no panic or crash, returns the last
    /// stderr line, which must start with `error: ` for an error (1, 75, 77). (The TSS libraries may log
    /// their own lines before it.)
    pub fn run_fail<S: AsRef<OsStr> + Debug>(&self, args: &[S], code: i32) -> (String, String) {
        let out = self.keybound(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: expected exit {code}\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let last = stderr.lines().last().unwrap_or_default().to_string();
        if matches!(code, 1 | 75 | 77) {
            assert!(last.starts_with("error: "), "{args:?}: {stderr}");
        }
        (String::from_utf8_lossy(&out.stdout).into_owned(), last)
    }

    /// `keys generate`; checks the one-line report and returns the kid.
    pub fn generate(&self, label: &str, alg: &str) -> String {
        let out = self.run_ok(&["keys", "generate", "--label", label, "--alg", alg]);
        let prefix = format!("generated {alg} key '{label}' (kid ");
        let kid = out
            .trim_end()
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(") on token 'tpm'"))
            .unwrap_or_else(|| panic!("unexpected keys generate output: {out:?}"));
        assert_eq!(kid.len(), 43, "kid is a base64url SHA-256: {kid}");
        kid.to_string()
    }

    /// The key file keybound keeps for `label`.
    pub fn key_file(&self, label: &str) -> PathBuf {
        self.state_dir().join("keys").join(format!("{label}.json"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
