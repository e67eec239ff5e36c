//! A YubiHSM 2 for the tests, without the hardware: Yubico's own PKCS#11 module
//! (`yubihsm_pkcs11.so`, package `yubihsm-pkcs11` from bookworm-backports) talking HTTP to a
//! test connector on 127.0.0.1:0 that hands every device message to the `yubihsm` crate's
//! MockHsm (the device protocol, SCP03 sessions included, in memory; debug builds only).
//!
//! * [`MockYubiHsm`]: the connector (stopped on drop), its temp dir with
//!   `yubihsm_pkcs11.conf` and `keybound.toml`, and `keybound` commands run against it.
//! * [`MockYubiHsm::client`]: the crate's own client on the same MockHsm, to make keys
//!   keybound did not make (e.g. one with the exportable-under-wrap capability).
//!
//! What the connector does itself, because libyubihsm and the MockHsm disagree:
//! * `GET /connector/status` answers `status=OK` lines (the crate's `http-server` prints
//!   `status\nOK`, which libyubihsm does not read);
//! * the unauthenticated DeviceInfo command (0x06) libyubihsm sends first is answered here
//!   with what the MockHsm's own DeviceInfo says (version 2.0.0, serial 0123456789, the
//!   algorithms 0x01..=0x2f): the MockHsm only takes CreateSession, AuthenticateSession
//!   and SessionMessage unauthenticated.

// Each test uses its own subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use tempfile::TempDir;

/// Where Debian's `yubihsm-pkcs11` puts the module.
pub const YUBIHSM_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so";
/// The token label the module reports.
pub const YUBIHSM_TOKEN: &str = "YubiHSM";
/// The PIN: authentication key 0x0001 as 4 hex digits, then its password (the factory
/// default the MockHsm also has).
pub const YUBIHSM_PIN: &str = "0001password";
pub const YUBIHSM_PIN_ENV: &str = "KEYBOUND_PIN";

/// The test connector and a keybound set up to use the MockHsm behind it.
pub struct MockYubiHsm {
    dir: TempDir,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The MockHsm, shared with the connector's threads.
    hsm: yubihsm::Connector,
    stop: Arc<AtomicBool>,
    port: u16,
    server: Option<JoinHandle<()>>,
}

impl MockYubiHsm {
    /// Starts the connector on 127.0.0.1:0 and writes `yubihsm_pkcs11.conf` and
    /// `keybound.toml` (`sessions = 1`, the PIN from [`YUBIHSM_PIN_ENV`]).
    pub fn start() -> MockYubiHsm {
        assert!(
            Path::new(YUBIHSM_MODULE).exists(),
            "{YUBIHSM_MODULE} is missing: run scripts/install-deps.sh yubihsm"
        );
        let dir = tempfile::Builder::new()
            .prefix("keybound-yubihsm-")
            .tempdir()
            .expect("create tempdir");
        std::fs::create_dir(dir.path().join("cwd")).expect("create cwd");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test connector");
        let port = listener.local_addr().expect("connector address").port();
        let url = format!("http://127.0.0.1:{port}");
        let hsm = yubihsm::Connector::mockhsm();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (hsm, stop) = (hsm.clone(), Arc::clone(&stop));
            std::thread::spawn(move || serve(listener, hsm, stop, port))
        };
        let token = MockYubiHsm {
            dir,
            url,
            hsm,
            stop,
            port,
            server: Some(server),
        };
        std::fs::write(
            token.path("yubihsm_pkcs11.conf"),
            format!("connector={}\n", token.url),
        )
        .expect("write yubihsm_pkcs11.conf");
        token.write_config(&token.config_text());
        token
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("keybound.toml")
    }

    /// `[token]` and `[policy]` for the MockHsm through Yubico's module.
    pub fn config_text(&self) -> String {
        format!(
            "[token]\n\
             backend = \"pkcs11\"\n\
             module = \"{YUBIHSM_MODULE}\"\n\
             token_label = \"{YUBIHSM_TOKEN}\"\n\
             pin_env = \"{YUBIHSM_PIN_ENV}\"\n\
             sessions = 1\n\
             [policy]\n\
             danger_allow_imported_keys = false\n"
        )
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write keybound.toml");
    }

    /// Writes `contents` to `<tempdir>/<name>` and returns its path.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write file");
        path
    }

    /// `keybound <args>` against the MockHsm, not yet run.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keybound"));
        cmd.args(args)
            .current_dir(self.path("cwd"))
            .env("YUBIHSM_PKCS11_CONF", self.path("yubihsm_pkcs11.conf"))
            .env("KEYBOUND_CONFIG", self.config_path())
            .env(YUBIHSM_PIN_ENV, YUBIHSM_PIN)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("RUST_LOG")
            .env("HOME", self.dir());
        cmd
    }

    pub fn keybound<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        self.command(args).output().expect("spawn keybound")
    }

    /// The `yubihsm` crate's client on the same MockHsm, logged in with the default
    /// authentication key (0x0001, "password").
    pub fn client(&self) -> yubihsm::Client {
        yubihsm::Client::open(self.hsm.clone(), yubihsm::Credentials::default(), true)
            .expect("open a yubihsm client session on the MockHsm")
    }
}

impl Drop for MockYubiHsm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

fn serve(listener: TcpListener, hsm: yubihsm::Connector, stop: Arc<AtomicBool>, port: u16) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let hsm = hsm.clone();
        std::thread::spawn(move || {
            let _ = connection(stream, &hsm, port);
        });
    }
}

/// One HTTP/1.1 connection (libcurl keeps it alive): requests until the peer closes.
fn connection(stream: TcpStream, hsm: &yubihsm::Connector, port: u16) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        let mut expect_continue = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("expect")
                    && value.eq_ignore_ascii_case("100-continue")
                {
                    expect_continue = true;
                }
            }
        }
        if expect_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, answer) = match (method, path) {
            ("GET", "/connector/status") => (
                "200 OK",
                format!(
                    "status=OK\nserial=*\nversion=3.0.4\npid={}\naddress=127.0.0.1\nport={port}\n",
                    std::process::id()
                )
                .into_bytes(),
            ),
            ("POST", "/connector/api") => match device_message(hsm, body) {
                Some(answer) => ("200 OK", answer),
                None => ("500 Internal Server Error", Vec::new()),
            },
            _ => ("404 Not Found", Vec::new()),
        };
        writer.write_all(
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\n\r\n",
                answer.len()
            )
            .as_bytes(),
        )?;
        writer.write_all(&answer)?;
        writer.flush()?;
    }
}

/// DeviceInfo (0x06) answered here; everything else to the MockHsm. `None` when the
/// MockHsm refused or panicked (an unsupported command panics it).
fn device_message(hsm: &yubihsm::Connector, body: Vec<u8>) -> Option<Vec<u8>> {
    if body.first() == Some(&0x06) {
        return Some(device_info());
    }
    let command = body.first().copied();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        hsm.send_message(yubihsm::Uuid::nil(), body.into())
    }));
    match result {
        Ok(Ok(answer)) => Some(answer.into()),
        Ok(Err(e)) => {
            eprintln!("test connector: the MockHsm refused command {command:02x?}: {e}");
            None
        }
        Err(_) => {
            eprintln!("test connector: the MockHsm panicked on command {command:02x?}");
            None
        }
    }
}

/// The MockHsm's own DeviceInfo, as the device sends it: response code 0x86, length, then
/// version 2.0.0, serial 0123456789, log 62/62, algorithms 0x01..=0x2f.
fn device_info() -> Vec<u8> {
    let mut data = vec![2u8, 0, 0];
    data.extend_from_slice(&123_456_789u32.to_be_bytes());
    data.extend_from_slice(&[62, 62]);
    data.extend(0x01u8..=0x2f);
    let mut answer = vec![0x86];
    answer.extend_from_slice(&(data.len() as u16).to_be_bytes());
    answer.extend(data);
    answer
}
