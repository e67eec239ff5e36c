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

/// Logs go to stderr; stdout carries only the command's output.
pub fn init_logging(verbose: u8, json: bool) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
