//! Harness for the agent tests: `keybound serve` spawned from the built binary on a
//! per-test SoftHSM2 token ([`DevToken`]), its socket in a temp dir of its own, and a small
//! HTTP/1.1 client over that socket that keeps status, headers and body.
//!
//! * [`SocketDir`]: `<tmp>/keybound-agent-XXXX/run/agent.sock`; `run/` is the agent's to
//!   create (0700), so the tests see what the agent itself makes.
//! * [`Agent`]: the running agent, ready once it prints `keybound agent listening on`,
//!   SIGKILLed on drop (its stderr is printed when the test failed).
//! * [`Conn`], [`Reply`], [`raw_exchange`]: requests over the socket.
//! * [`curl_as`]: the same request from another uid, through `setpriv` or `runuser` + curl.
//! * [`check_proof`], [`check_assertion`]: every JWS the agent hands out, verified with the
//!   independent [`Verifier`] of `tests/support` against the published JWKS.
//! * [`DevServer`]: the dev-server on 127.0.0.1:0, in-process.
//! * [`metric`]: one sample of the Prometheus text.
//!
//! By job: `process.rs`, `client.rs`, `as_uid.rs`, `checks.rs`, `devserver.rs`; the
//! config helpers are here.

// Each test uses its own subset of these helpers.
#![allow(dead_code)]

mod as_uid;
mod checks;
mod client;
mod devserver;
mod process;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use {as_uid::*, checks::*, client::*, devserver::*, process::*};

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::time::Duration;

use crate::support::*;

/// How long a child may take to report ready or to exit before the test gives up. A guard
/// against hangs, never a measurement: nothing asserts on how long anything took.
pub const GUARD: Duration = Duration::from_secs(60);

/// The uid and gid of `nobody` on Debian: the "other user" of these tests.
pub const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// This process's uid (the owner of `/proc/self`): the agent's own uid in these tests.
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .expect("stat /proc/self")
        .uid()
}

/// The harness's default `[token]` and `[policy]`, then `sections` (`[[client]]` tables),
/// then `[agent]` with `agent_lines` (keys and `[[agent.allow]]` tables).
pub fn config_text(sections: &str, agent_lines: &str) -> String {
    format!(
        "{}\n{}\n[agent]\n{}\n",
        Config::default().render(),
        sections.trim(),
        agent_lines.trim()
    )
}

/// `[[agent.allow]]` for `uid` with the given extra lines (`keys = [...]`, ...).
pub fn allow_uid(uid: u32, lines: &str) -> String {
    format!("[[agent.allow]]\nuid = {uid}\n{}\n", lines.trim())
}

/// A token with `keys` (label, alg) generated on it; returns the kid of each label.
pub fn token_with_keys(keys: &[(&str, &str)]) -> (DevToken, BTreeMap<String, String>) {
    let token = DevToken::new();
    let kids = keys
        .iter()
        .map(|(label, alg)| ((*label).to_owned(), token.generate(label, alg)))
        .collect();
    (token, kids)
}
