//! Command bodies: each opens what it needs and prints; the work happens in the library.

/// `println!` that returns the write error (a closed pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub mod agent;
pub mod audit;
pub mod bench;
pub mod keys;
pub mod log_fields;
pub mod log_out;
pub mod oauth;
pub mod serve;
pub mod sign;

use std::future::Future;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use keybound::config::Config;
use keybound::keyring::Keyring;

/// Loads the config and opens its token (logged in); returns the config, where it was
/// found, and the keyring.
pub fn load(
    config: Option<&Path>,
    sessions: Option<usize>,
) -> anyhow::Result<(Config, PathBuf, Keyring)> {
    load_with(config, |config| {
        Keyring::open(&config.token, config.policy.clone(), sessions)
    })
}

/// [`load`], with the token opened by `open` (in signer processes, for `serve`).
pub fn load_with(
    config: Option<&Path>,
    open: impl FnOnce(&Config) -> Result<Keyring, keybound::token::TokenError>,
) -> anyhow::Result<(Config, PathBuf, Keyring)> {
    let (config, path) = Config::load(config)?;
    tracing::debug!(config = %path.display(), "config loaded");
    let mut keyring = open(&config)?;
    keyring.publish_only(config.published_keys());
    if let Some(audit) = &config.audit {
        keyring.withhold_from_jwks(&audit.checkpoint_key);
    }
    Ok((config, path, keyring))
}

/// Loads the config and opens its token (logged in).
pub fn open(config: Option<&Path>, sessions: Option<usize>) -> anyhow::Result<Keyring> {
    Ok(load(config, sessions)?.2)
}

/// Completes on SIGINT or SIGTERM. The handlers are installed by this call, not when the
/// future is first polled: call it before telling anyone the server is ready, or a signal
/// sent at once would still kill the process with the default action.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Logs go to stderr, whole lines at a time ([`log_out`]); stdout carries only the
/// command's output. The TSS bindings log through `log` at error level for conditions
/// keybound reports itself (a TPM that went away, a refused key): they show from -vv on.
pub fn init_logging(verbose: u8, json: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let level = match verbose {
        0 => LevelFilter::WARN,
        1 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    };
    let tss = if verbose >= 2 {
        level
    } else {
        LevelFilter::OFF
    };
    let filter = Targets::new()
        .with_default(level)
        .with_target("tss_esapi", tss);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(log_out::Lines)
        .with_timer(log_out::Clock)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let layer = if json {
        layer.json().boxed()
    } else {
        layer.fmt_fields(log_fields::Fields).boxed()
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
}
