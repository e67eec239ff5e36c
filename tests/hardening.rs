//! What keybound trusts on disk and in its own process (issue #9, F2, F8, F9): the config
//! file and the PKCS#11 module only where no other user can change them, the PIN file only
//! as a plain file of the user's own, and no core dump of a process that holds a PIN.
//!
//! The tests run as root (here and in CI); uid 65534 (nobody) plays the other user.

mod support;

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::{PermissionsExt as _, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Config, DevToken, MODULE, assert_error, assert_mentions, assert_success, mkfifo};

const NOBODY: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn chown_uid(path: &Path, uid: u32) {
    chown(path, Some(uid), None).unwrap_or_else(|e| panic!("chown {uid} {}: {e}", path.display()));
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether `test`, which runs keybound as another uid (`setpriv`), can run: it needs root.
/// Elsewhere it is skipped with a note; in CI (the environment variable CI is set) it fails
/// instead, so CI can never pass by skipping it.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root to run keybound as another uid (setpriv), and CI is set: run the \
         tests as root in CI (they are never skipped there)"
    );
    eprintln!("SKIPPED {test}: needs root to run keybound as another uid (setpriv)");
    false
}

/// A token whose config uses `module`.
fn with_module(token: &DevToken, module: &str) {
    token.write_config(
        &Config {
            module: module.to_owned(),
            ..Config::default()
        }
        .render(),
    );
}

/// A token whose config reads the PIN from `path`.
fn with_pin_file(token: &DevToken, path: &Path) {
    token.write_config(
        &Config {
            pin_line: format!("pin_file = \"{}\"", path.display()),
            ..Config::default()
        }
        .render(),
    );
}

/// The real SoftHSM module, copied into `dir` (created 0755) as a 0755 file.
fn module_copy(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    chmod(dir, 0o755);
    let real = fs::canonicalize(MODULE).expect("the SoftHSM module is installed");
    let copy = dir.join("libsofthsm2.so");
    fs::copy(real, &copy).unwrap();
    chmod(&copy, 0o755);
    copy
}

// ---------------------------------------------------------------------------
// F2: the config file
// ---------------------------------------------------------------------------

/// A `keybound.toml` in the working directory is never read: whoever controls the
/// directory a command runs in must not choose its module or its PIN source.
#[test]
fn config_in_working_directory_is_not_read() {
    let token = DevToken::new();
    fs::copy(token.config_path(), token.path("cwd").join("keybound.toml")).unwrap();
    let xdg = token.path("xdg");
    fs::create_dir(&xdg).unwrap();
    let out = token
        .command(&["keys", "list"])
        .env_remove("KEYBOUND_CONFIG")
        .env("XDG_CONFIG_HOME", &xdg)
        .output()
        .unwrap();
    let line = assert_error(&out, &"keys list with only ./keybound.toml");
    let xdg_config = xdg.join("keybound").join("keybound.toml");
    assert_mentions(
        &line,
        &[
            "no configuration found",
            "$KEYBOUND_CONFIG",
            xdg_config.to_str().unwrap(),
        ],
    );
    let tried = line
        .split("looked at: ")
        .nth(1)
        .and_then(|rest| rest.split(". ").next())
        .unwrap_or_else(|| panic!("the error lists the places looked at: {line}"));
    for place in tried.split(", ") {
        assert!(
            place.starts_with('/') || place.starts_with('$'),
            "only absolute places are looked at, not {place:?}: {line}"
        );
    }
}

/// A config another user can write is refused, naming the file, its mode or owner and the
/// fix; so is a config in a directory others can write, unless that directory is sticky.
#[test]
fn config_writable_by_others_is_refused() {
    let token = DevToken::new();
    token.generate("k", "ES256");
    let config = token.config_path();
    let path = config.to_str().unwrap();
    for mode in [0o664, 0o646, 0o666, 0o620] {
        chmod(&config, mode);
        let line = token.run_err(&["keys", "list"]);
        assert_mentions(
            &line,
            &[
                path,
                &format!("mode {mode:o}"),
                &format!("chmod go-w {path}"),
            ],
        );
    }
    chmod(&config, 0o644);
    chown_uid(&config, NOBODY);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[path, &format!("owned by uid {NOBODY}"), "chown"]);
    chown_uid(&config, 0);
    assert!(token.run_ok(&["keys", "list"]).contains("k"));

    // The directory holding it.
    let open = token.path("open");
    fs::create_dir(&open).unwrap();
    let moved = open.join("keybound.toml");
    fs::copy(&config, &moved).unwrap();
    chmod(&open, 0o777);
    let run = || {
        token
            .command(&["--config", moved.to_str().unwrap(), "keys", "list"])
            .output()
            .unwrap()
    };
    let line = assert_error(&run(), &"config in a 0777 directory");
    assert_mentions(
        &line,
        &[open.to_str().unwrap(), "mode 777", "chmod go-w", "chmod +t"],
    );
    // Sticky: nobody else can rename or replace the file (the rule of /tmp).
    chmod(&open, 0o1777);
    assert_success(&run(), &"config in a 1777 directory");
    chmod(&open, 0o755);
    chown_uid(&open, NOBODY);
    let line = assert_error(&run(), &"config in a directory of another user");
    assert_mentions(&line, &[open.to_str().unwrap(), &format!("uid {NOBODY}")]);
}

// ---------------------------------------------------------------------------
// F2: the PKCS#11 module
// ---------------------------------------------------------------------------

/// `module = "./x.so"` would load whatever the working directory holds.
#[test]
fn relative_module_is_refused() {
    let token = DevToken::new();
    module_copy(&token.path("cwd"));
    with_module(&token, "./libsofthsm2.so");
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &["token.module: must be an absolute path"]);
    with_module(&token, "libsofthsm2.so");
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &["token.module: must be an absolute path"]);
}

/// The module is code keybound runs with the PIN in memory: another user must not be able
/// to change it or the directory it is in.
#[test]
fn module_writable_by_others_is_refused() {
    let token = DevToken::new();
    let dir = token.path("modules");
    let module = module_copy(&dir);
    let path = module.to_str().unwrap();
    with_module(&token, path);
    token.generate("k", "ES256");

    chmod(&module, 0o666);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(
        &line,
        &[
            "PKCS#11 module",
            path,
            "mode 666",
            &format!("chmod go-w {path}"),
        ],
    );
    chmod(&module, 0o755);
    chown_uid(&module, NOBODY);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[path, &format!("owned by uid {NOBODY}")]);
    chown_uid(&module, 0);

    chmod(&dir, 0o777);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[dir.to_str().unwrap(), "mode 777", "chmod go-w"]);
    // Through a symlink in a safe place, the directory that holds the real file counts.
    let link_dir = token.path("links");
    fs::create_dir(&link_dir).unwrap();
    let link = link_dir.join("libsofthsm2.so");
    symlink(&module, &link).unwrap();
    with_module(&token, link.to_str().unwrap());
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[dir.to_str().unwrap(), "mode 777"]);

    chmod(&dir, 0o755);
    assert!(token.run_ok(&["keys", "list"]).contains("k"));
}

/// `profiles_dir` holds the profiles that name modules: a relative one is refused like
/// `module`.
#[test]
fn relative_profiles_dir_is_refused() {
    let token = DevToken::new();
    fs::create_dir(token.path("cwd").join("profiles")).unwrap();
    token.write_config(
        &Config {
            extra_token_lines: "profiles_dir = \"profiles\"".to_owned(),
            ..Config::default()
        }
        .render(),
    );
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &["token.profiles_dir: must be an absolute path"]);
}

/// The profiles in `profiles_dir` name modules: the directory and its files are trusted
/// like the config.
#[test]
fn profiles_dir_writable_by_others_is_refused() {
    let token = DevToken::new();
    let dir = token.path("profiles");
    fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let profile = dir.join("softhsm2.toml");
    fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/hsm-profiles/softhsm2.toml"),
        &profile,
    )
    .unwrap();
    chmod(&profile, 0o644);
    token.write_config(
        &Config {
            extra_token_lines: format!("profiles_dir = \"{}\"", dir.display()),
            ..Config::default()
        }
        .render(),
    );
    token.run_ok(&["keys", "list"]);
    chmod(&profile, 0o666);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(
        &line,
        &[profile.to_str().unwrap(), "mode 666", "chmod go-w"],
    );
    chmod(&profile, 0o644);
    chmod(&dir, 0o777);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[dir.to_str().unwrap(), "mode 777", "chmod go-w"]);
}

// ---------------------------------------------------------------------------
// F8: the PIN file
// ---------------------------------------------------------------------------

/// A PIN file the user owns, 0600, in a directory only the user can write.
fn pin_file(token: &DevToken) -> PathBuf {
    let path = token.write_file("pin", &format!("{}\n", support::USER_PIN));
    chmod(&path, 0o600);
    path
}

#[test]
fn pin_file_of_another_user_is_refused() {
    let token = DevToken::new();
    let pin = pin_file(&token);
    with_pin_file(&token, &pin);
    token.run_ok(&["keys", "list"]);
    chown_uid(&pin, NOBODY);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(
        &line,
        &[
            pin.to_str().unwrap(),
            &format!("owned by uid {NOBODY}"),
            "chown",
        ],
    );
}

#[test]
fn pin_file_symlink_is_refused() {
    let token = DevToken::new();
    let pin = pin_file(&token);
    let link = token.path("pin-link");
    symlink(&pin, &link).unwrap();
    with_pin_file(&token, &link);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[link.to_str().unwrap(), "symbolic link"]);
}

#[test]
fn pin_file_in_directory_others_can_write_is_refused() {
    let token = DevToken::new();
    let open = token.path("open");
    fs::create_dir(&open).unwrap();
    let pin = open.join("pin");
    fs::write(&pin, support::USER_PIN).unwrap();
    chmod(&pin, 0o600);
    chmod(&open, 0o777);
    with_pin_file(&token, &pin);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[open.to_str().unwrap(), "mode 777", "chmod go-w"]);
    // Sticky, like /tmp: nobody else can replace a file the user owns.
    chmod(&open, 0o1777);
    token.run_ok(&["keys", "list"]);
}

/// A symbolic link in the middle of the path is resolved: the directories checked are the
/// ones the opened file is really in (and the resolved path must still be the opened file).
#[test]
fn pin_file_behind_a_symlinked_directory_is_checked_where_it_is() {
    let token = DevToken::new();
    let real = token.path("real");
    fs::create_dir(&real).unwrap();
    chmod(&real, 0o700);
    let pin = real.join("pin");
    fs::write(&pin, support::USER_PIN).unwrap();
    chmod(&pin, 0o600);
    let link = token.path("via");
    symlink(&real, &link).unwrap();
    with_pin_file(&token, &link.join("pin"));
    token.run_ok(&["keys", "list"]);
    chmod(&real, 0o777);
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[real.to_str().unwrap(), "mode 777", "chmod go-w"]);
}

#[test]
fn pin_file_readable_by_group_is_refused() {
    let token = DevToken::new();
    let pin = pin_file(&token);
    with_pin_file(&token, &pin);
    for mode in [0o640, 0o604, 0o660] {
        chmod(&pin, mode);
        let line = token.run_err(&["keys", "list"]);
        let path = pin.to_str().unwrap();
        assert_mentions(&line, &[path, &format!("mode {mode:o}"), "chmod 600"]);
    }
}

/// A FIFO as pin_file is refused at once instead of blocking on a writer that never comes.
#[test]
fn pin_file_fifo_is_refused_without_hanging() {
    let token = DevToken::new();
    let fifo = token.path("pin-fifo");
    mkfifo(&fifo);
    with_pin_file(&token, &fifo);
    let child = token
        .command(&["keys", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_or_kill(child, "keys list with a FIFO pin_file");
    let line = assert_error(&out, &"keys list with a FIFO pin_file");
    assert_mentions(&line, &[fifo.to_str().unwrap(), "not a regular file"]);
}

/// Waits for `child`; kills it and fails the test if it is still running after a generous
/// safety net (the assertion is "it exits", not "it exits within N seconds").
fn wait_or_kill(mut child: Child, what: &str) -> std::process::Output {
    for _ in 0..600 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what}: keybound still running after 60 s; killed");
}

// ---------------------------------------------------------------------------
// F9: core dumps
// ---------------------------------------------------------------------------

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every keybound process is non-dumpable (PR_SET_DUMPABLE 0) with RLIMIT_CORE 0. The
/// kernel shows the first: the /proc/<pid> entries of a non-dumpable process belong to
/// root, not to the process's uid. So the process runs as uid 65534 (`setpriv`): the agent,
/// which holds the PIN.
#[test]
fn keybound_is_not_dumpable_and_has_no_core_limit() {
    if !root_or_skip("keybound_is_not_dumpable_and_has_no_core_limit") {
        return;
    }
    let agent = AgentAsNobody::start();
    let pid = agent.child.0.id();
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = fs::read_to_string(proc.join("status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "runs as nobody: {uid_line}"
    );
    use std::os::unix::fs::MetadataExt as _;
    let owner = fs::metadata(proc.join("status")).unwrap().uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/status of a non-dumpable process belongs to root, not to uid {owner}"
    );
    let limits = fs::read_to_string(proc.join("limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let values: Vec<&str> = core.split_whitespace().skip(4).take(2).collect();
    assert_eq!(values, ["0", "0"], "{core}");
}

/// `setpriv` arguments that run a program as uid and gid 65534.
const AS_NOBODY: [&str; 6] = [
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
    "--",
];

/// `curl` on the agent's socket, as uid 65534 or as root; the HTTP status, or `None` when
/// the agent gave no answer.
fn agent_status(socket: &Path, as_nobody: bool) -> Option<u16> {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(AS_NOBODY).arg("curl");
        c
    } else {
        Command::new("curl")
    };
    let out = cmd
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "60",
        ])
        .arg("--unix-socket")
        .arg(socket)
        .arg("http://agent/v1/keys")
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|&code| code != 0)
}

/// Going non-dumpable does not cost a non-root agent its identity: the files in
/// /proc/self now belong to root (the directory keeps the euid, which is what the agent
/// reads), and the agent still takes its own uid for the socket directory's owner and, with
/// no rules, as the only uid it serves.
#[test]
fn non_dumpable_agent_of_another_uid_knows_its_own_uid() {
    if !root_or_skip("non_dumpable_agent_of_another_uid_knows_its_own_uid") {
        return;
    }
    let agent = AgentAsNobody::start();
    let socket = &agent.socket;
    assert_eq!(
        agent_status(socket, true),
        Some(200),
        "its own uid is served"
    );
    assert_ne!(agent_status(socket, false), Some(200), "root has no rule");
}

/// `keybound serve` as uid 65534 on a token with one key, ready to answer.
struct AgentAsNobody {
    child: Killed,
    socket: PathBuf,
    _token: DevToken,
}

impl AgentAsNobody {
    fn start() -> AgentAsNobody {
        let token = DevToken::new();
        token.generate("k", "ES256");
        chmod(token.dir(), 0o755);
        // SoftHSM writes lock files next to the token objects: the agent's user owns them.
        chown_tree(&token.path("tokens"), NOBODY);
        let run = token.path("run");
        fs::create_dir(&run).unwrap();
        chmod(&run, 0o700);
        chown_tree(&run, NOBODY);
        let socket = run.join("agent.sock");
        let mut agent = Killed(
            Command::new("setpriv")
                .args(AS_NOBODY)
                .arg(env!("CARGO_BIN_EXE_keybound"))
                .arg("serve")
                .arg("--socket")
                .arg(&socket)
                .current_dir(token.dir())
                .env("SOFTHSM2_CONF", token.softhsm_conf())
                .env("KEYBOUND_CONFIG", token.config_path())
                .env(support::PIN_ENV, support::USER_PIN)
                .env("HOME", token.dir())
                .env_remove("XDG_CONFIG_HOME")
                .env_remove("XDG_RUNTIME_DIR")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run setpriv (util-linux)"),
        );
        let stderr = BufReader::new(agent.0.stderr.take().unwrap());
        let ready = format!("keybound agent listening on {}", socket.display());
        let mut log = Vec::new();
        for line in stderr.lines() {
            let line = line.unwrap();
            let done = line.contains(&ready);
            log.push(line);
            if done {
                break;
            }
        }
        assert!(
            log.iter().any(|l| l.contains(&ready)),
            "keybound serve as uid {NOBODY} did not start:\n{}",
            log.join("\n")
        );
        AgentAsNobody {
            child: agent,
            socket,
            _token: token,
        }
    }
}

fn chown_tree(path: &Path, uid: u32) {
    chown(path, Some(uid), Some(uid)).unwrap();
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            chown_tree(&entry.unwrap().path(), uid);
        }
    }
}
