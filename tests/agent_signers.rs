//! Signer processes (`[agent] signers = "processes"`, the default): the device and its PIN
//! live in child processes of `keybound serve`.
//!
//! * A signer stopped and then killed under 64-way load: every request is answered with a
//!   proof that verifies independently, or with 503 and `Retry-After` (those it held are
//!   retried on the other signer); the agent (same pid) serves on, the signer is restarted
//!   with nothing of the agent's inherited, and signing resumes. The only signer, stopped:
//!   the watchdog kills it after `signer_timeout_secs`, what it held is answered 503.
//! * Callers that name a key not looked up yet, together: it is approved (proved) once.
//! * The PIN read from `pin_file` is never in the agent process: not in its environment,
//!   not in its memory (`/proc/<agent>/mem` scanned for the PIN's bytes), while the same
//!   scan finds it in a signer process (the scan works).
//!
//! The real `keybound serve` on a per-test SoftHSM2 token; proofs verified by the
//! independent verifiers of `tests/support`. Nothing here asserts on how long anything
//! took; the waits are guards against hangs.

mod agent_support;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agent_support::*;
use serde_json::Value;
use support::*;

/// The signer processes `/healthz` reports: (processes, up, pids, restarts).
async fn signers(socket: &Path) -> (u64, u64, Vec<u32>, u64) {
    let health = get(socket, "/healthz").await.json();
    let s = &health["signers"];
    assert!(s.is_object(), "healthz has no signers object: {health}");
    let pids = s["pids"]
        .as_array()
        .expect("pids")
        .iter()
        .filter_map(Value::as_u64)
        .map(|p| p as u32)
        .collect();
    (
        s["processes"].as_u64().expect("processes"),
        s["up"].as_u64().expect("up"),
        pids,
        s["restarts"].as_u64().expect("restarts"),
    )
}

/// The parent pid of `pid` (field 4 of `/proc/<pid>/stat`).
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("ppid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signer_killed_under_load_costs_no_request_and_the_agent_serves_on() {
    // SoftHSM: one process per session, two sessions (the harness's config).
    kill_under_load(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_only_signer_stuck_under_load_is_killed_503_then_signing_resumes() {
    // One session: one process, so what it held has nowhere else to go. Stopped, it
    // answers nothing: the watchdog kills it after signer_timeout_secs.
    kill_under_load(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_naming_a_new_key_together_have_it_approved_once() {
    // Before: each caller that missed the key cache waited for the one before it, then
    // looked the key up and proved it again, one after another (32 proofs, and a signer
    // stopped during any of them held up every caller not served yet).
    const CALLERS: usize = 32;
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let start = window_start();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let socket = agent.socket().to_path_buf();
        let kid = kids["dpop"].clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&socket).await;
            let job = proof_job(c, "dpop", &kid, false, false);
            let Job::Proof(request, _) = &job else {
                unreachable!()
            };
            let reply = conn.post("/v1/dpop", request).await;
            (job, reply)
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("caller task"));
    }
    let window = window_end(start);
    let metrics = get(agent.socket(), "/metrics").await.text();
    let proved = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("keybound_possession_proofs_total{key=\"dpop\",outcome=\"ok\"} ")
        })
        .map(|n| n.trim().parse::<u64>().expect("a count"));
    assert_eq!(
        proved,
        Some(1),
        "{CALLERS} callers naming a key not looked up yet: one approval\n{metrics}"
    );
    let jwks = published_jwks(&token, &agent).await;
    for (job, reply) in &answers {
        assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
        check_job(&jwks, job, reply, window);
    }
}

/// 64 callers asking for proofs; one signer process stopped, then killed, mid-way.
async fn kill_under_load(sessions: u64) {
    const CLIENTS: usize = 64;
    const PER_CLIENT: usize = 20;
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&format!(
        "{}\n[agent]\nsigner_timeout_secs = 2\n",
        Config {
            sessions: sessions.to_string(),
            ..Config::default()
        }
        .render()
    ));
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let (processes, up, pids, restarts) = signers(agent.socket()).await;
    assert_eq!(
        (processes, up, restarts),
        (sessions, sessions, 0),
        "{pids:?}"
    );
    for pid in &pids {
        assert_eq!(
            parent_of(*pid),
            agent.pid(),
            "signer {pid} is the agent's child"
        );
    }
    let victim = *pids.last().expect("a signer");

    let answered = Arc::new(AtomicUsize::new(0));
    let start = window_start();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let socket = agent.socket().to_path_buf();
        let kid = kids["dpop"].clone();
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            // One kept-alive connection per caller (a 503 keeps it open): 64 callers opening
            // a connection per request would meet max_connections_per_uid on a slow machine.
            let mut conn = Conn::open(&socket).await;
            let mut answers = Vec::new();
            for i in 0..PER_CLIENT {
                let job = proof_job(c * PER_CLIENT + i, "dpop", &kid, false, false);
                let Job::Proof(request, _) = &job else {
                    unreachable!()
                };
                let reply = conn.post("/v1/dpop", request).await;
                answered.fetch_add(1, Ordering::Relaxed);
                answers.push((job, reply));
            }
            answers
        }));
    }
    // Kill one signer once the load is well under way.
    let guard = Instant::now();
    while answered.load(Ordering::Relaxed) < CLIENTS * PER_CLIENT / 4 {
        assert!(guard.elapsed() < GUARD, "the load did not get going");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Stopped first, so requests are certainly in flight on it when it dies (it holds
    // them while the other process serves on), then killed.
    signal(victim, "STOP");
    if sessions > 1 {
        let stopped_at = answered.load(Ordering::Relaxed);
        while answered.load(Ordering::Relaxed) < stopped_at + CLIENTS {
            assert!(guard.elapsed() < GUARD, "the other signer did not serve on");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        signal(victim, "KILL");
    }
    // With one process, nothing is answered while it is stopped: the watchdog kills it.
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.expect("client task"));
    }
    let window = window_end(start);
    let (mut proofs, mut unavailable) = (0, 0);
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for (job, reply) in &answers {
        match reply.status.as_u16() {
            200 => {
                check_job(&jwks, job, reply, window);
                proofs += 1;
            }
            503 => {
                assert!(
                    reply.retry_after().is_some(),
                    "503 without Retry-After: {reply:?}"
                );
                unavailable += 1;
                let body = reply.json();
                *reasons
                    .entry(format!("{}: {}", body["error"], body["message"]))
                    .or_default() += 1;
            }
            _ => panic!("neither a proof nor 503 + Retry-After: {reply:?}"),
        }
    }
    assert_eq!(proofs + unavailable, CLIENTS * PER_CLIENT);
    if sessions == 1 {
        assert!(
            unavailable >= 1,
            "what the only signer held was answered 503"
        );
    }
    eprintln!("{proofs} proofs, {unavailable} answered 503 around the kill: {reasons:#?}");

    // The agent is the same process, still serving; the signer comes back.
    assert!(agent.running(), "the agent survived its signer");
    let guard = Instant::now();
    loop {
        let (_, up, pids, restarts) = signers(agent.socket()).await;
        if up == sessions && restarts >= 1 {
            assert!(!pids.contains(&victim), "a new process: {pids:?}");
            // Started while the agent was listening: it inherited none of its sockets (its
            // stdio aside: here pipes), and only the variables a module reads.
            if root_or_skip("the restarted signer's fds and environment") {
                for pid in &pids {
                    assert_inherits_nothing(*pid);
                }
            }
            break;
        }
        assert!(guard.elapsed() < GUARD, "the signer was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = get(agent.socket(), "/metrics").await.text();
    assert!(metric(&metrics, "keybound_signer_restarts_total", &[]).unwrap_or(0.0) >= 1.0);
    assert!(metric(&metrics, "keybound_signer_exits_total", &[]).unwrap_or(0.0) >= 1.0);
    // The stopped process held requests when it was killed: they went to the other
    // process (or were answered 503 above).
    let retried = metric(&metrics, "keybound_signer_retried_total", &[]).unwrap_or(0.0);
    let refused = metric(&metrics, "keybound_signer_unavailable_total", &[]).unwrap_or(0.0);
    eprintln!("{retried} retried on the other signer, {refused} answered unavailable");
    assert!(
        retried + refused >= 1.0,
        "the killed signer had nothing in flight?"
    );
    if sessions > 1 {
        assert!(
            retried >= 1.0,
            "what the killed signer held went to the other one"
        );
    } else {
        let hung = metric(&metrics, "keybound_signer_hung_total", &[]).unwrap_or(0.0);
        assert!(
            hung >= 1.0,
            "the watchdog killed the stuck signer: {metrics}"
        );
        assert!(
            agent.log().contains("answered nothing for"),
            "{}",
            agent.log()
        );
    }
    // Signing resumes on both processes, with no restart of the agent.
    let again = run_jobs(agent.socket(), CLIENTS, 2, move |n| {
        proof_job(n, "dpop", &kids["dpop"], false, false)
    })
    .await;
    let window = window_end(start);
    for (job, reply) in &again {
        check_job(&jwks, job, reply, window);
    }
    assert!(
        agent.log().contains("signer process ended"),
        "{}",
        agent.log()
    );
}

/// Whether this process may read another's `/proc/<pid>/{fd,environ,mem}` (signer and agent
/// are non-dumpable: root only). Elsewhere the check is skipped with a note; in CI (CI is
/// set) it fails instead, so CI never passes by skipping it.
fn root_or_skip(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} needs root (the processes are non-dumpable), and CI is set"
    );
    eprintln!("SKIPPED {what}: needs root to read a non-dumpable process's /proc entries");
    false
}

/// The signer `pid` holds no socket (the agent's listeners, its callers' connections) and
/// its environment has only the variables modules read (the agent's has more: the harness
/// sets KEYBOUND_CONFIG, PATH, ...).
fn assert_inherits_nothing(pid: u32) {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().starts_with("socket:"),
            "signer {pid} holds a socket: fd {:?} -> {}",
            fd.file_name(),
            target.display()
        );
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let mut names: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            String::from_utf8_lossy(v)
                .split('=')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    names.sort();
    for name in &names {
        assert!(
            keybound::token::signer::PASSED_ENV.contains(&name.as_str()) || name == PIN_ENV,
            "signer {pid} got {name} from the agent's environment: {names:?}"
        );
    }
    assert!(names.iter().any(|n| n == "SOFTHSM2_CONF"), "{names:?}");
    assert!(!names.iter().any(|n| n == "KEYBOUND_CONFIG"), "{names:?}");
}

/// A PIN no other string in the agent's memory could be by chance.
const DISTINCT_PIN: &str = "kb-pin-Zq7xW3m9Rt";

/// Whether `needle` occurs in any readable mapping of process `pid` (as root).
fn memory_holds(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (lo, hi) = range.split_once('-').expect("range");
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).expect("lo"),
            u64::from_str_radix(hi, 16).expect("hi"),
        );
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pin_from_a_pin_file_never_enters_the_agent_process() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let changed = token.pkcs11_tool(&["--change-pin", "--new-pin", DISTINCT_PIN]);
    assert!(changed.status.success(), "{}", describe(&changed));
    let pin_file = token.write_file("pin", DISTINCT_PIN);
    chmod(&pin_file, 0o600);
    let config = Config {
        pin_line: format!("pin_file = \"{}\"", pin_file.display()),
        ..Config::default()
    };
    token.write_config(&format!("{}\n[agent]\n", config.render()));
    let dir = SocketDir::new();
    let mut cmd = token.command(&["serve", "--socket"]);
    cmd.arg(dir.socket()).env_remove(PIN_ENV);
    let agent = Agent::start_command(cmd, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    // It signs (the signers logged in with the PIN from the file) ...
    let mut conn = Conn::open(agent.socket()).await;
    assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;
    let (_, _, pids, _) = signers(agent.socket()).await;

    // ... and the PIN is in neither the agent's environment nor its memory.
    let environ = std::fs::read(format!("/proc/{}/environ", agent.pid())).expect("environ");
    let needle = DISTINCT_PIN.as_bytes();
    assert!(!environ.windows(needle.len()).any(|w| w == needle));
    assert!(
        !memory_holds(agent.pid(), needle),
        "the PIN's bytes are in the agent's memory"
    );
    // The scan finds it where it is: a signer logged in with it.
    assert!(
        pids.iter().any(|pid| memory_holds(*pid, needle)),
        "the scan should find the PIN in a signer process (else it proves nothing)"
    );
}

/// A descriptor the agent inherited without close-on-exec (what `exec 5<file; keybound
/// serve` leaves open) stays in the agent and never reaches a signer process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_the_agent_inherited_stays_out_of_its_signers() {
    if !root_or_skip("the signers' inherited descriptors") {
        return;
    }
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&format!("{}\n[agent]\n", Config::default().render()));
    let marker = token.write_file("inherited-marker", "not for a signer");
    // Opened without O_CLOEXEC: every process this test binary starts inherits it.
    let fd = rustix::fs::open(
        &marker,
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )
    .expect("open the marker");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let (_, _, pids, _) = signers(agent.socket()).await;
    drop(fd);
    let holds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == marker))
    };
    assert!(
        holds(agent.pid()),
        "the agent inherited the marker (else this proves nothing)"
    );
    assert!(!pids.is_empty());
    for pid in pids {
        assert!(!holds(pid), "signer {pid} inherited the agent's descriptor");
    }
}

/// A signer that crashed and whose replacement hangs while it opens the device (here SoftHSM
/// blocked on its configuration file, a FIFO no one writes: what an unreachable network HSM
/// does) is killed after `signer_timeout_secs` and started again, until it comes up: its
/// slot is not down for good. The other signer serves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_that_hangs_while_it_starts_is_killed_and_started_again() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&format!(
        "{}\n[agent]\nsigner_timeout_secs = 2\n",
        Config {
            sessions: "2".into(),
            ..Config::default()
        }
        .render()
    ));
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let a = &agent;
    let health = move || async move { get(a.socket(), "/healthz").await.json()["signers"].clone() };
    // `/healthz`'s signers once `done` holds of them, polled until GUARD.
    let until = |what: &'static str, done: fn(&Value) -> bool| async move {
        let guard = Instant::now();
        loop {
            let s = health().await;
            if done(&s) {
                return s;
            }
            assert!(guard.elapsed() < GUARD, "{what}: {s}\n{}", a.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let before = health().await;
    assert_eq!(before["up"], 2, "{before}");
    let victim = before["pids"][1].as_u64().expect("signer 1's pid") as u32;

    // From now on a SoftHSM that starts blocks reading its configuration.
    let conf = token.softhsm_conf();
    let aside = conf.with_extension("real");
    std::fs::rename(&conf, &aside).expect("move the configuration aside");
    mkfifo(&conf);
    signal(victim, "KILL");
    let s = until("the hanging signer was never killed", |s| {
        s["hung"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(s["up"], 1, "{s}");
    assert!(
        agent.log().contains("is not ready after it was started"),
        "{}",
        agent.log()
    );
    // The other signer serves meanwhile.
    let mut conn = Conn::open(agent.socket()).await;
    assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;

    // The device answers again: the next try comes up.
    std::fs::remove_file(&conf).expect("remove the fifo");
    std::fs::rename(&aside, &conf).expect("put the configuration back");
    let s = until("the signer did not come back", |s| s["up"] == 2).await;
    assert_ne!(s["pids"][1].as_u64(), Some(u64::from(victim)), "{s}");
    assert_still_signs(&mut conn, &jwks, &kids["dpop"]).await;
    assert!(agent.running());
}

/// The state letter of `/proc/<pid>/stat` (`T` stopped, `Z` zombie), `None` once it is gone.
fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_signer_does_not_hold_up_the_agents_stop() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let (_, _, pids, _) = signers(agent.socket()).await;
    // A signer that will never read its closed pipe: the agent kills it when it stops.
    signal(pids[0], "STOP");
    agent.terminate();
    agent.assert_clean_exit();
    let guard = Instant::now();
    for pid in pids {
        while let Some(state) = state_of(pid) {
            if state == 'Z' {
                break;
            }
            assert!(
                guard.elapsed() < GUARD,
                "signer {pid} outlived the agent (state {state})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
