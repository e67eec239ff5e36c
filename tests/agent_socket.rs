//! The agent's socket: directory and socket modes and owner, planted or unsafe paths, stale
//! and live sockets, `socket_mode` and `socket_group`, shared directories never widened.
//!
//! `keybound serve`, end to end: the built binary on a per-test SoftHSM2 token, driven over
//! its Unix socket (hyper, raw bytes, and curl as another uid). Every proof and assertion
//! the agent hands out is verified independently ([`check_proof`], [`check_assertion`]: the
//! p256/p384/rsa verifiers of `tests/support`) against the JWKS the agent publishes, which
//! must equal `keybound jwks`. No assertion here is about how long anything took.

mod agent_support;
mod support;

use std::os::unix::fs::FileTypeExt as _;

use agent_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_dir_is_0700_socket_is_0600_both_owned_by_the_agent() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    assert!(std::fs::symlink_metadata(dir.run_dir()).unwrap().is_dir());
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o700, own_uid()));
    let meta = std::fs::symlink_metadata(agent.socket()).unwrap();
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(mode_and_owner(agent.socket()), (0o600, own_uid()));
}

#[test]
fn planted_or_unsafe_socket_paths_are_refused() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    let socket_text = |dir: &SocketDir| dir.socket().display().to_string();
    let run_text = |dir: &SocketDir| dir.run_dir().display().to_string();

    // A symlink planted at the socket path (its target must stay untouched).
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    let target = dir.root().join("target");
    std::fs::write(&target, "precious").unwrap();
    std::os::unix::fs::symlink(&target, dir.socket()).unwrap();
    assert_serve_refuses(&token, &dir, &[&socket_text(&dir), "symbolic link"]);
    assert!(
        std::fs::symlink_metadata(dir.socket())
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");

    // A dangling symlink at the socket path.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    std::os::unix::fs::symlink(dir.root().join("nowhere"), dir.socket()).unwrap();
    assert_serve_refuses(&token, &dir, &[&socket_text(&dir), "symbolic link"]);
    assert!(!dir.root().join("nowhere").exists());

    // The socket directory itself a symlink (to a 0700 dir we own).
    let dir = SocketDir::new();
    let elsewhere = dir.root().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    chmod(&elsewhere, 0o700);
    std::os::unix::fs::symlink(&elsewhere, dir.run_dir()).unwrap();
    assert_serve_refuses(&token, &dir, &[&run_text(&dir), "symbolic link"]);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);

    // A directory group or others can enter.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o755);
    assert_serve_refuses(&token, &dir, &[&run_text(&dir), "755", "chmod 700"]);

    // A directory owned by another uid.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    std::os::unix::fs::chown(dir.run_dir(), Some(NOBODY), Some(NOBODY)).unwrap();
    assert_serve_refuses(&token, &dir, &[&run_text(&dir), "uid 65534"]);

    // A regular file at the socket path.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    std::fs::write(dir.socket(), "not a socket").unwrap();
    assert_serve_refuses(&token, &dir, &[&socket_text(&dir), "not a socket"]);
    assert_eq!(
        std::fs::read_to_string(dir.socket()).unwrap(),
        "not a socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_a_live_one_is_refused() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).unwrap();
    chmod(&dir.run_dir(), 0o700);
    // A socket file nobody listens on: what a killed agent leaves behind.
    drop(std::os::unix::net::UnixListener::bind(dir.socket()).unwrap());
    assert!(
        std::os::unix::net::UnixStream::connect(dir.socket()).is_err(),
        "the stale socket has no listener"
    );

    let agent = Agent::start(&token, &dir.socket());
    assert!(
        agent.log().contains("replacing a stale socket"),
        "{}",
        agent.log()
    );
    assert_eq!(mode_and_owner(agent.socket()), (0o600, own_uid()));
    let jwks = published_jwks(&token, &agent).await;
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;

    // A second agent on the live socket fails, and leaves the first one's socket alone.
    assert_serve_refuses(
        &token,
        &dir,
        &[
            "another keybound agent is listening",
            &dir.socket().display().to_string(),
        ],
    );
    assert!(dir.socket().exists());
    assert_still_signs(&mut Conn::open(agent.socket()).await, &jwks, &kids["dpop"]).await;
}

/// F7: with socket_mode 0666 and a rule for uid 65534, that uid is served; a uid without
/// a rule is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_mode_0666_lets_a_ruled_uid_in() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        &format!(
            "socket_mode = \"0666\"\n{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(NOBODY, "keys = [\"dpop\"]")
        ),
    ));
    let dir = SocketDir::new();
    // Only the temp dir above the agent's own directory is opened by the test.
    chmod(dir.root(), 0o711);
    let agent = Agent::start(&token, &dir.socket());
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o711, own_uid()));
    assert_eq!(mode_and_owner(agent.socket()), (0o666, own_uid()));
    let jwks = served_jwks(&agent, &token.jwks(&[])).await;

    proof_as(
        As::Setpriv {
            uid: NOBODY,
            gid: NOBODY,
        },
        agent.socket(),
        &jwks,
        ("dpop", &kids["dpop"]),
        "https://o.example/api",
        "https://o.example/api",
    );
    curl_as(
        As::Setpriv {
            uid: NOBODY - 1,
            gid: NOBODY - 1,
        },
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    )
    .assert_closed();
}

/// F7 (review): the agent never widens a directory it shares with other files (a user's
/// runtime directory guards other sockets), and a second agent refused as `Live` changes
/// nothing of the running one's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_directories_are_never_widened() {
    let (token, _) = token_with_keys(&[("dpop", "ES256")]);
    token.write_config(&config_text(
        "",
        &format!(
            "socket_mode = \"0666\"\n{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(NOBODY, "keys = [\"dpop\"]")
        ),
    ));
    // A directory the agent did not create, holding another program's socket.
    let dir = SocketDir::new();
    std::fs::create_dir(dir.run_dir()).expect("mkdir run");
    chmod(&dir.run_dir(), 0o700);
    let other = std::os::unix::net::UnixListener::bind(dir.run_dir().join("other.sock"))
        .expect("bind another program's socket");
    assert_serve_refuses(&token, &dir, &["holds other files", "does not widen"]);
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o700, own_uid()));
    drop(other);

    // The agent's own directory: a second agent is refused and leaves it as it was.
    let dir = SocketDir::new();
    chmod(dir.root(), 0o711);
    let agent = Agent::start(&token, &dir.socket());
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o711, own_uid()));
    assert_serve_refuses(&token, &dir, &["another keybound agent is listening"]);
    assert_eq!(mode_and_owner(&dir.run_dir()), (0o711, own_uid()));
    assert_eq!(mode_and_owner(agent.socket()), (0o666, own_uid()));
}

/// F7: with socket_mode 0660 and socket_group, members of the group reach the socket
/// (and their rule decides); others cannot connect at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_group_lets_its_members_in() {
    let (token, kids) = token_with_keys(&[("dpop", "ES256")]);
    let member = NOBODY - 2;
    token.write_config(&config_text(
        "",
        &format!(
            "socket_mode = \"0660\"\nsocket_group = \"{NOBODY}\"\n{}{}{}",
            allow_uid(own_uid(), ""),
            allow_uid(member, "keys = [\"dpop\"]"),
            allow_uid(NOBODY - 3, "keys = [\"dpop\"]"),
        ),
    ));
    let dir = SocketDir::new();
    chmod(dir.root(), 0o711);
    let agent = Agent::start(&token, &dir.socket());
    assert_eq!(mode_and_owner(&dir.run_dir()).0, 0o710);
    assert_eq!(mode_and_owner(agent.socket()).0, 0o660);
    let group = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(p).unwrap().gid()
    };
    assert_eq!(group(&dir.run_dir()), NOBODY);
    assert_eq!(group(agent.socket()), NOBODY);
    let jwks = served_jwks(&agent, &token.jwks(&[])).await;

    proof_as(
        As::SetprivInGroup {
            uid: member,
            gid: member,
            group: NOBODY,
        },
        agent.socket(),
        &jwks,
        ("dpop", &kids["dpop"]),
        "https://o.example/api",
        "https://o.example/api",
    );
    // A ruled uid outside the group: the file modes keep it out (curl cannot connect).
    let outside = curl_as(
        As::Setpriv {
            uid: NOBODY - 3,
            gid: NOBODY - 3,
        },
        agent.socket(),
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://o.example/api"),
    );
    assert_eq!((outside.exit, outside.status), (Some(7), 0), "{outside:?}");
}
