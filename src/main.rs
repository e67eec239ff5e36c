//! The `keybound` command line: parses arguments, loads the config, hands off to `cli::*`.
#![forbid(unsafe_code)]

#[macro_use]
mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: see Cargo.toml. Secrets are zeroized before they are freed, whatever the
/// allocator (`zeroize`, `secrecy`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keep OAuth client keys in hardware: private_key_jwt assertions (RFC 7523) and DPoP proofs
/// (RFC 9449) signed inside a PKCS#11 token.
#[derive(Parser)]
#[command(name = "keybound", version, about, max_term_width = 100)]
struct Args {
    /// Config file (else $KEYBOUND_CONFIG, else $XDG_CONFIG_HOME/keybound/keybound.toml)
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate, list and audit keys on the token
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print the public JWKS (all keys the policy allows, or the named ones)
    Jwks {
        /// Key label or pkcs11: URI; repeatable
        #[arg(long = "label", value_name = "L")]
        labels: Vec<String>,
    },
    /// Sign a private_key_jwt client assertion (RFC 7523)
    Assertion {
        /// Key label or pkcs11: URI
        #[arg(long)]
        key: String,
        /// The OAuth client id (iss and sub)
        #[arg(long)]
        client_id: String,
        /// The aud claim: the token endpoint URL for Okta
        #[arg(long)]
        audience: String,
        /// Seconds until exp (1 to 3600)
        #[arg(long, default_value_t = keybound::oauth::assertion::DEFAULT_LIFETIME_SECS)]
        lifetime: u64,
    },
    /// Sign a DPoP proof (RFC 9449) for one HTTP request
    Dpop {
        /// Key label or pkcs11: URI
        #[arg(long)]
        key: String,
        /// HTTP method of the request (htm)
        #[arg(long)]
        method: String,
        /// Request URL; query and fragment are dropped for htu
        #[arg(long)]
        url: String,
        /// Server-provided nonce (DPoP-Nonce); may start with '-'
        #[arg(long, allow_hyphen_values = true)]
        nonce: Option<String>,
        /// File holding the access token to bind with ath
        #[arg(long, value_name = "F")]
        access_token_file: Option<PathBuf>,
    },
    /// Get an access token (client_credentials + private_key_jwt + DPoP)
    Token {
        /// The [[client]] to use (default: the only one)
        #[arg(long)]
        client: Option<String>,
        /// Print as JSON
        #[arg(long)]
        json: bool,
        /// Print an audit of the connection instead of the token
        #[arg(long)]
        check: bool,
        /// Fetch in this process, not through a running agent
        #[arg(long)]
        no_agent: bool,
    },
    /// Call an API with a DPoP-bound token (like curl)
    Call(cli::oauth::CallArgs),
    /// Decode a compact JWS (argument or stdin) without verifying it
    Decode {
        /// The compact JWS; read from stdin when absent
        jws: Option<String>,
    },
    /// The agent's audit trail (see [audit] in the config)
    #[command(subcommand)]
    Audit(AuditCommand),
    /// A signer process of `serve`: the device behind pipes (started by the agent only)
    #[command(name = "__signer", hide = true)]
    Signer,
    /// Run the local signing agent on a Unix socket (see [agent] in the config)
    Serve {
        /// Socket path (default: agent.socket, else $XDG_RUNTIME_DIR/keybound/agent.sock,
        /// else /run/keybound/agent.sock)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Log format on stderr
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Measure signs/s of the raw token and of the full JWS pipeline, and their ratio
    Bench {
        /// Key label (default: the first ES256 key the policy allows)
        #[arg(long)]
        key: Option<String>,
        /// Signing sessions (default: from the config or the profile)
        #[arg(long)]
        sessions: Option<usize>,
        /// Total measuring time
        #[arg(long, default_value_t = 8.0)]
        seconds: f64,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        /// Drive the running agent over its socket instead of the pipeline in-process
        #[arg(long)]
        agent: bool,
        /// Concurrent agent clients (with --agent)
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// The agent's socket (with --agent or --gateway; default: from the config)
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Measure a GET through the running agent's gateway route ROUTE against the same
        /// GET sent directly with the route client's cached token
        #[arg(long, value_name = "ROUTE", conflicts_with = "agent")]
        gateway: Option<String>,
        /// The path (and query) below the route, with --gateway
        #[arg(long, value_name = "PATH", default_value = "/api/v1/users?limit=1")]
        path: String,
        /// With --agent: a second agent on the same token with [audit] on; measures
        /// proofs/s with the audit on as a ratio to --socket's (audit off), alternating
        #[arg(long, value_name = "PATH", requires = "agent")]
        audit_socket: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit trail: the hash chain across its files (oldest first) and every
    /// checkpoint's signature; exit status 1 names the first line tampered with, 2 says
    /// why intact lines are not the whole trail (incomplete)
    Verify {
        /// The audit key's JWKS (`keybound jwks --label audit`); default: the key
        /// [audit] checkpoint_key names on the configured device
        #[arg(long, value_name = "FILE")]
        jwks: Option<PathBuf>,
        /// The first file may begin at a rotation (the earlier files knowingly not given)
        #[arg(long)]
        from_rotation: bool,
        /// Trail files, oldest first (rotated files, then the current one)
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a sign-only, non-extractable key pair inside the token
    Generate {
        #[arg(long)]
        label: String,
        #[arg(long, default_value = "ES256", value_parser = ["ES256", "ES384", "RS256", "PS256"])]
        alg: String,
    },
    /// List keys: label, algorithm, kid, policy verdict
    List {
        #[arg(long)]
        json: bool,
    },
    /// Rotate a key slot: prepare the next generation, then --activate, then --retire
    Rotate {
        /// The slot: the key's label, as the config names it
        #[arg(long)]
        label: String,
        /// Make the prepared generation active (after the server accepted a token request
        /// signed with it); the active one becomes retiring
        #[arg(long, conflicts_with = "retire")]
        activate: bool,
        /// Retire the retiring generation (no longer published)
        #[arg(long)]
        retire: bool,
        /// With --activate: skip the proof against the server. With --retire: do not wait
        /// for retire_after or for tokens bound to the key
        #[arg(long)]
        force: bool,
    },
    /// Delete a retired key generation from the device
    Destroy {
        #[arg(long)]
        label: String,
        /// The kid of the retired generation (a kid may start with '-')
        #[arg(long, allow_hyphen_values = true)]
        kid: String,
    },
    /// Full attribute report per key; exit status 3 if any audited key fails the policy
    Audit {
        /// Key label or pkcs11: URI (default: every key)
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // First, before any PIN or token is read: no core file, and no ptrace or
    // /proc/<pid>/mem by other processes of the same user.
    let hardening = harden_process();
    let args = Args::parse();
    match &args.command {
        // The agent logs one line per signature: info by default.
        Command::Serve { log_format, .. } => {
            cli::init_logging(args.verbose.max(1), log_format == "json");
        }
        _ => cli::init_logging(args.verbose, false),
    }
    // Log lines an async thread held go out before a panic's message.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        cli::log_out::flush_at_panic();
        report_panic(info);
    }));
    if let Err(e) = hardening {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let outcome = run(args);
    cli::log_out::flush();
    match outcome {
        Ok(code) => code,
        // The reader of stdout went away (`keybound keys list | head -1`): stop quietly,
        // with the status a shell gives a process killed by SIGPIPE.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::from(141)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit status of a failed command, from its error's kind (README "Exit codes"):
/// 75 (sysexits `EX_TEMPFAIL`) when trying again later may succeed (the device or the
/// server is unavailable for now), 77 (`EX_NOPERM`) when a PIN, key authorization or the
/// server refused the credentials (retrying blindly would spend PIN attempts), else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    use keybound::config::ConfigError;
    use keybound::error::{ErrorKind, InvalidSetting};
    use keybound::keyring::KeyError;
    use keybound::oauth::OAuthError;
    use keybound::policy::PolicyError;
    use keybound::token::TokenError;
    let kind = e.chain().find_map(|cause| {
        let c = cause;
        c.downcast_ref::<TokenError>()
            .map(TokenError::kind)
            .or_else(|| c.downcast_ref::<KeyError>().map(KeyError::kind))
            .or_else(|| c.downcast_ref::<OAuthError>().map(OAuthError::kind))
            .or_else(|| c.downcast_ref::<PolicyError>().map(PolicyError::kind))
            .or_else(|| {
                c.downcast_ref::<keybound::rotation::StepError>()
                    .map(keybound::rotation::StepError::kind)
            })
            .or_else(|| c.downcast_ref::<ConfigError>().map(ConfigError::kind))
            .or_else(|| c.downcast_ref::<InvalidSetting>().map(InvalidSetting::kind))
            .or_else(|| {
                c.downcast_ref::<cli::agent::AgentError>()
                    .map(cli::agent::AgentError::kind)
            })
    });
    match kind {
        Some(ErrorKind::Transient | ErrorKind::Device) => 75,
        Some(ErrorKind::Authentication) => 77,
        _ => 1,
    }
}

/// Makes the process non-dumpable (PR_SET_DUMPABLE 0: no core file, its /proc entries
/// owned by root, no ptrace by the same uid) and sets RLIMIT_CORE to 0, for every command:
/// the agent and the CLI are one binary, and most of its commands hold a PIN.
fn harden_process() -> Result<(), String> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let no_core = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    setrlimit(Resource::Core, no_core).map_err(|e| format!("cannot set RLIMIT_CORE to 0: {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}"))
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config.as_deref();
    match args.command {
        Command::Signer => Ok(keybound::token::signer::run_child()),
        Command::Decode { jws } => cli::sign::decode(jws),
        Command::Keys(KeysCommand::Generate { label, alg }) => {
            cli::keys::generate(config, &label, alg.parse()?)
        }
        Command::Keys(KeysCommand::List { json }) => cli::keys::list(config, json),
        Command::Keys(KeysCommand::Rotate {
            label,
            activate,
            retire,
            force,
        }) => {
            let step = match (activate, retire) {
                (true, _) => cli::keys::RotateStep::Activate,
                (_, true) => cli::keys::RotateStep::Retire,
                _ => cli::keys::RotateStep::Prepare,
            };
            if force && matches!(step, cli::keys::RotateStep::Prepare) {
                anyhow::bail!("--force goes with --activate or --retire");
            }
            cli::keys::rotate(config, &label, step, force)
        }
        Command::Keys(KeysCommand::Destroy { label, kid }) => {
            cli::keys::destroy(config, &label, &kid)
        }
        Command::Keys(KeysCommand::Audit { label, json }) => {
            cli::keys::audit(config, label.as_deref(), json)
        }
        Command::Jwks { labels } => cli::keys::jwks(config, &labels),
        Command::Assertion {
            key,
            client_id,
            audience,
            lifetime,
        } => cli::sign::assertion(config, &key, &client_id, &audience, lifetime),
        Command::Dpop {
            key,
            method,
            url,
            nonce,
            access_token_file,
        } => cli::sign::dpop(
            config,
            &key,
            &method,
            &url,
            nonce.as_deref(),
            access_token_file.as_deref(),
        ),
        Command::Token {
            client,
            json,
            check,
            no_agent,
        } => cli::oauth::token(config, client.as_deref(), json, check, no_agent),
        Command::Call(call) => cli::oauth::call(config, call),
        Command::Serve { socket, .. } => cli::serve::run(config, socket, args.verbose),
        Command::Audit(AuditCommand::Verify {
            jwks,
            from_rotation,
            files,
        }) => cli::audit::verify(config, jwks.as_deref(), from_rotation, &files),
        Command::Bench {
            key,
            sessions,
            seconds,
            json,
            agent,
            clients,
            socket,
            gateway,
            path,
            audit_socket,
        } => {
            if let Some(route) = gateway {
                return cli::bench::gateway(config, &route, &path, clients, socket, seconds, json);
            }
            let target = agent.then_some(cli::bench::AgentTarget {
                clients,
                socket,
                audit_socket,
            });
            cli::bench::run(config, key.as_deref(), sessions, seconds, json, target)
        }
    }
}
