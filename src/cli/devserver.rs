//! `dev-server`: flags, startup banner, run until Ctrl-C / SIGTERM.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("dev-server is not built yet")
}
