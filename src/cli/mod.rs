//! Command bodies: each opens what it needs and prints; the work happens in the library.

/// `println!` that returns the write error (a closed pipe) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub mod bench;
pub mod devserver;
pub mod keys;
pub mod oauth;
pub mod serve;
pub mod sign;

use std::path::Path;

use keybound::config::Config;
use keybound::keyring::Keyring;

/// Loads the config and opens its token (logged in).
pub fn open(config: Option<&Path>, sessions: Option<usize>) -> anyhow::Result<Keyring> {
    let (config, path) = Config::load(config)?;
    tracing::debug!(config = %path.display(), "config loaded");
    Ok(Keyring::open(&config.token, config.policy, sessions)?)
}

/// Logs go to stderr; stdout carries only the command's output. The TSS bindings log
/// through `log` at error level for conditions keybound reports itself (a TPM that went
/// away, a refused key): they show from -vv on.
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
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let layer = if json {
        layer.json().boxed()
    } else {
        layer.boxed()
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
}
