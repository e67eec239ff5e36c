//! `keybound-devserver`: flags, startup banner, run until Ctrl-C / SIGTERM. Logs go to
//! stderr; stdout carries only the banner.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use keybound_devserver::{self as devserver, DevServer, JwksSource, Settings};
use url::Url;

/// Strict Okta-like authorization and resource server on 127.0.0.1, for developing and testing
/// keybound only: not an authorization server for production.
#[derive(clap::Parser)]
#[command(name = "keybound-devserver", version, about, max_term_width = 100)]
#[command(group(
    clap::ArgGroup::new("client_jwks").required(true).args(["jwks", "jwks_uri"])
))]
struct Args {
    /// More log output on stderr (-v info: one line per request, -vv debug)
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Port on 127.0.0.1 (0 picks a free one)
    #[arg(long, default_value_t = 8089)]
    port: u16,
    /// The OAuth client id: iss and sub of the client assertions
    #[arg(long)]
    client_id: String,
    /// The client's public JWKS file (as `keybound jwks` prints it), read again whenever it changes
    #[arg(long, value_name = "FILE")]
    jwks: Option<PathBuf>,
    /// Fetch the client's JWKS from this URL: at start, once its Cache-Control max-age has
    /// passed (at most 3600 s, 300 s without one), and when an unknown kid shows up
    #[arg(long, value_name = "URL")]
    jwks_uri: Option<Url>,
    /// With --jwks-uri: fewest seconds between two fetches an unknown kid causes
    // conflicts_with, not requires = "jwks_uri": clap does not enforce that `requires` here
    // (exactly one of the two is required, so both say the same).
    #[arg(long, value_name = "SECS", conflicts_with = "jwks",
          default_value_t = devserver::DEFAULT_JWKS_REFETCH_INTERVAL,
          value_parser = clap::value_parser!(u64).range(0..=devserver::MAX_JWKS_REFETCH_INTERVAL))]
    jwks_refetch_interval: u64,
    /// Scopes granted to the client, space-separated
    #[arg(long, default_value_t = devserver::DEFAULT_SCOPES.join(" "))]
    scopes: String,
    /// Access-token lifetime in seconds
    #[arg(long, value_name = "SECS", default_value_t = devserver::DEFAULT_TOKEN_LIFETIME,
          value_parser = clap::value_parser!(u64).range(1..=devserver::MAX_TOKEN_LIFETIME))]
    token_lifetime: u64,
    /// How many users the users API holds
    #[arg(long, value_name = "N", default_value_t = devserver::DEFAULT_USERS as u64,
          value_parser = clap::value_parser!(u64).range(0..=devserver::MAX_USERS as u64))]
    users: u64,
    /// Status of the resource server's nonce challenge: 401 (RFC 9449) or 400 (as Okta sends)
    #[arg(long, value_name = "STATUS", default_value_t = 401,
          value_parser = clap::value_parser!(u16).range(400..=401))]
    rs_nonce_status: u16,
    /// FOR TESTS: run the server's clock SECS ahead of this machine's (negative: behind);
    /// shifts its Date header, its iat/exp checks, its tokens and its nonces alike
    #[arg(long, value_name = "SECS", default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i64)
              .range(-devserver::MAX_CLOCK_OFFSET..=devserver::MAX_CLOCK_OFFSET))]
    clock_offset_secs: i64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.verbose);
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let port = args.port;
    let settings = args.settings()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(port, settings))?;
    Ok(ExitCode::SUCCESS)
}

impl Args {
    fn settings(self) -> anyhow::Result<Settings> {
        let jwks = match (self.jwks, self.jwks_uri) {
            (Some(path), None) => JwksSource::File(path),
            (None, Some(url)) => JwksSource::Uri(url),
            // clap's required, exclusive group makes exactly one of them present.
            _ => anyhow::bail!("give exactly one of --jwks FILE and --jwks-uri URL"),
        };
        Ok(Settings {
            granted_scopes: self.scopes.split_whitespace().map(String::from).collect(),
            token_lifetime: self.token_lifetime,
            users: usize::try_from(self.users).context("--users is too large")?,
            rs_nonce_status: self.rs_nonce_status,
            clock_offset_secs: self.clock_offset_secs,
            jwks_refetch_interval: self.jwks_refetch_interval,
            ..Settings::new(self.client_id, jwks)
        })
    }
}

async fn serve(port: u16, settings: Settings) -> anyhow::Result<()> {
    // Signal handlers go in before the banner: whoever reads "listening on" may signal at once.
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let server = DevServer::new(listener, settings).await?;
    // A reader that went away after the first line must not take the server down.
    if let Err(e) = banner(&server) {
        tracing::warn!("cannot write the banner to stdout: {e}");
    }
    server.serve(shutdown).await?;
    tracing::info!("dev-server stopped");
    Ok(())
}

fn banner(server: &DevServer) -> std::io::Result<()> {
    let e = server.endpoints();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "keybound dev-server — development only, not an authorization server for production"
    )?;
    writeln!(out, "listening on {}", e.issuer)?;
    writeln!(out, "issuer          {}", e.issuer)?;
    writeln!(out, "token endpoint  {}", e.token)?;
    writeln!(out, "jwks            {}", e.jwks)?;
    writeln!(out, "users api       {}", e.users)?;
    writeln!(
        out,
        "client          {} (granted: {})",
        server.client_id(),
        server.granted_scopes().join(" ")
    )?;
    if server.clock_offset_secs() != 0 {
        writeln!(
            out,
            "clock           {:+} s from this machine's (--clock-offset-secs, for tests)",
            server.clock_offset_secs()
        )?;
    }
    out.flush()
}

/// Completes on SIGINT or SIGTERM. The handlers are installed by this call, not when the
/// future is first polled: call it before telling anyone the server is ready, or a signal
/// sent at once would still kill the process with the default action.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
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

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
