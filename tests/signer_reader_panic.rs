//! A panic in what a signer process's answer runs on the agent's side (a reply, an
//! observer: a bug) must not cost the agent its device. The task that read the process
//! ends with the panic; the process is restarted as if it had crashed, and the next
//! signature is made and verifies (independently, with the `p256` crate). Before, the
//! panic looked like the runtime shutting down: the slot stayed down and nothing was
//! restarted again, so with one signer the agent could never sign again.
//!
//! Without the test harness (`harness = false`): the signer processes are this binary run
//! with the hidden subcommand (`/proc/self/exe __signer`), as `keybound serve` runs
//! itself. The test re-runs itself with the token's environment (no `set_var`).

mod support;

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keybound::keyring::{Keyring, Purpose, SignEvent};
use keybound::oauth::{self, dpop};
use keybound::token::signer::SignerSpawn;
use support::*;

const SCENARIO: &str = "KEYBOUND_TEST_SCENARIO_CONFIG";

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(keybound::token::signer::CHILD_COMMAND) {
        return keybound::token::signer::run_child();
    }
    if let Some(config) = std::env::var_os(SCENARIO) {
        scenario(std::path::Path::new(&config));
        println!("test a_panic_in_an_answer_restarts_the_signer_and_the_agent_signs_on ... ok");
        return ExitCode::SUCCESS;
    }
    // The harness's own arguments (a filter, --list, ...) are not ours: `--list` lists
    // the one test, a filter that does not match it skips it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = "a_panic_in_an_answer_restarts_the_signer_and_the_agent_signs_on";
    if args.iter().any(|a| a == "--list") {
        println!("{name}: test");
        return ExitCode::SUCCESS;
    }
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-'))
        && !name.contains(filter.as_str())
    {
        return ExitCode::SUCCESS;
    }
    let token = DevToken::new();
    token.generate("dpop", "ES256");
    let status = Command::new(std::env::current_exe().expect("this test's path"))
        .env("SOFTHSM2_CONF", token.softhsm_conf())
        .env(PIN_ENV, USER_PIN)
        .env(SCENARIO, token.config_path())
        .env("DPOP_JWK", token.jwk("dpop").to_string())
        .status()
        .expect("run the scenario");
    if status.success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("test {name} ... FAILED ({status})");
        ExitCode::FAILURE
    }
}

fn scenario(config: &std::path::Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let (config, _) = keybound::config::Config::load(Some(config)).expect("load the config");
    let mut keyring = Keyring::open_signers(
        SignerSpawn {
            device: config.token.clone(),
            verbose: 0,
            // One signer process: with two, the other would sign on and hide the loss.
            sessions: Some(1),
            bench: false,
            hung_after: Duration::from_secs(30),
            runtime: runtime.handle().clone(),
        },
        config.policy.clone(),
    )
    .expect("start the signer process");
    let fired = Arc::new(AtomicBool::new(false));
    let once = fired.clone();
    keyring.set_observer(Arc::new(move |e: &SignEvent<'_>| {
        if e.purpose == Purpose::Jws && !once.swap(true, Ordering::SeqCst) {
            panic!("a bug in an observer (this panic is the test's own)");
        }
    }));
    let pids = |k: &Keyring| k.signers().expect("signer processes").pids;
    let before = pids(&keyring);
    let key = keyring.signing_key("dpop").expect("approve the key");
    let header = dpop::header(key.alg(), key.jwk());
    let claims = || {
        dpop::claims(
            "POST",
            "https://server.example.com/token",
            None,
            None,
            oauth::unix_now(),
            oauth::new_jti().expect("jti"),
        )
        .expect("claims")
    };
    // The first signature's answer panics in the observer: its caller hears the device
    // went away, not a signature.
    let first = runtime.block_on(oauth::sign_async(&key, &header, &claims()));
    assert!(fired.load(Ordering::SeqCst), "the observer ran");
    assert!(
        first.is_err(),
        "the panicked answer was delivered: {first:?}"
    );
    // Then the process is restarted (backoff 0.1 s) and signing works again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let jws = loop {
        match runtime.block_on(oauth::sign_async(&key, &header, &claims())) {
            Ok(jws) => break jws,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("signing never resumed after the reader's panic: {e}"),
        }
    };
    let after = pids(&keyring);
    assert_ne!(before, after, "the signer process was restarted");
    let report = keyring.signers().expect("signer processes");
    assert_eq!(report.up, 1, "{report:?}");
    assert!(report.restarts >= 1, "{report:?}");
    let jwk: serde_json::Value =
        serde_json::from_str(&std::env::var("DPOP_JWK").expect("DPOP_JWK")).expect("a JWK");
    assert_signature(&Verifier::new("ES256", &jwk), &Jws::parse(&jws));
    keyring.stop_signers();
}
