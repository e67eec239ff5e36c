//! `serve`: the agent in the foreground, until SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use keybound::agent::jwks_host::Hosted;
use keybound::agent::{self, Agent, socket};
use keybound::keyring::Keyring;
use keybound::oauth::client::OAuthClient;
use keybound::oauth::observe::UpstreamObserver;
use keybound::token::signer::SignerSpawn;
use keybound::trail::Trail;

pub fn run(
    config: Option<&Path>,
    socket_flag: Option<PathBuf>,
    verbose: u8,
) -> anyhow::Result<ExitCode> {
    // The HTTP side is light and the device works on the token's own signing threads (or
    // in signer processes), so by default one async thread serves every connection: on a
    // small machine more threads only contend with the signing (see `keybound bench
    // --agent`). It is built before the device is opened: the signer processes' answers are
    // read on it, next to the tasks that await them.
    let mut built = None;
    let (config, path, mut keyring) = super::load_with(config, |config| {
        let runtime = super::log_out::hold_on_workers(
            tokio::runtime::Builder::new_multi_thread().worker_threads(config.agent.async_threads),
        )
        .enable_all()
        .build()
        .map_err(|e| {
            keybound::token::TokenError::Internal(format!("cannot start the async runtime: {e}"))
        })?;
        let handle = runtime.handle().clone();
        built = Some(runtime);
        match config.agent.signers {
            agent::Signers::Processes => Keyring::open_signers(
                SignerSpawn {
                    device: config.token.clone(),
                    verbose,
                    sessions: None,
                    bench: false,
                    hung_after: std::time::Duration::from_secs(config.agent.signer_timeout_secs),
                    runtime: handle,
                },
                config.policy.clone(),
            ),
            agent::Signers::InProcess => Keyring::open(&config.token, config.policy.clone(), None),
        }
    })?;
    let runtime = built.context("the async runtime was not started")?;
    runtime.spawn(super::log_out::flush_held_lines());
    // The checkpoint key is approved before the observer and the gate are set: its
    // signature is the checkpoint line itself, and a failing trail still tries it.
    let trail = match &config.audit {
        Some(audit) => {
            let key = keyring
                .signing_key(&audit.checkpoint_key)
                .with_context(|| {
                    format!(
                        "audit.checkpoint_key '{}' cannot sign (generate it: `keybound keys \
                     generate --label {}`)",
                        audit.checkpoint_key, audit.checkpoint_key
                    )
                })?;
            let trail = Trail::start(audit, key).map_err(anyhow::Error::msg)?;
            keyring.set_gate(trail.gate());
            Some(trail)
        }
        None => None,
    };
    // Before any key is approved: the clients' keys sign under the same observer.
    let metrics = Arc::new(agent::metrics::Metrics::default());
    keyring.set_observer(agent::sign_observer(&metrics, trail.clone()));
    let upstream: Arc<dyn UpstreamObserver> = match &trail {
        Some(trail) => Arc::new(keybound::trail::Upstream {
            inner: metrics.clone(),
            trail: trail.clone(),
        }),
        None => metrics.clone(),
    };
    let clients = config
        .clients
        .iter()
        .map(|c| {
            OAuthClient::new(c.clone(), &keyring)
                .map(|client| client.with_observer(upstream.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let socket_path = socket_flag.unwrap_or_else(|| config.agent.socket_path());
    let own_uid = socket::own_uid().context("cannot read this process's uid")?;
    let signer_keyring = keyring.clone();
    let mut agent = Agent::new(keyring, clients, config.agent.clone(), own_uid, metrics)
        .and_then(|a| a.with_routes(config.routes.clone()))
        .map_err(anyhow::Error::msg)?
        .with_trail(trail.clone());
    // The hosted JWKS's certificate and key are read now: a bad one stops the start.
    let jwks_tls = match &config.jwks {
        Some(jwks) => jwks.tls().map_err(anyhow::Error::msg)?,
        None => None,
    };
    let served = runtime.block_on(async {
        // Signal handlers go in before the socket and the ready message: a SIGTERM sent as
        // soon as the agent is ready must find them.
        let shutdown = super::shutdown_signal()?;
        // Bound before the ready message: an address in use is an error at start.
        let hosted = match &config.jwks {
            // max-age never outlasts the shortest publish_lead: a server must see a prepared key
            // before it is activated.
            Some(jwks) => Some(
                Hosted::bind(
                    jwks,
                    jwks_tls,
                    jwks.max_age(Some(config.rotation.shortest_lead())),
                )
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        if let Some(hosted) = &hosted {
            agent = agent.with_jwks(hosted.host());
        }
        let agent = Arc::new(agent);
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut jwks_tasks = Vec::new();
        if let Some(hosted) = hosted {
            tracing::info!(url = hosted.url(), "hosted JWKS listening");
            eprintln!("keybound JWKS on {}", hosted.url());
            jwks_tasks = hosted.spawn(&agent, &stopping);
        }
        let listener = socket::bind(
            &socket_path,
            config.agent.socket_mode,
            config.agent.socket_group.as_deref(),
        )?;
        let tcp = match config.agent.gateway_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on agent.gateway_listen {addr}"))?;
                let bound = l.local_addr().context("gateway_listen's address")?;
                tracing::info!(listen = %bound, "gateway listening on loopback TCP");
                eprintln!("keybound gateway on http://{bound}/gw/");
                Some(l)
            }
            None => None,
        };
        tracing::info!(socket = %socket_path.display(), config = %path.display(), uid = own_uid,
            "keybound agent listening");
        eprintln!("keybound agent listening on {}", socket_path.display());
        agent::notify_ready();
        let rotation = agent::rotation::spawn(agent.clone(), config.rotation.clone());
        agent::run_with_tcp(listener, tcp, agent, async {
            shutdown.await;
            let _ = stop.send(true);
        })
        .await;
        rotation.abort();
        let _ = stop.send(true);
        for task in jwks_tasks {
            let _ = task.await;
        }
        if let Err(e) = std::fs::remove_file(&socket_path) {
            tracing::warn!("cannot remove {}: {e}", socket_path.display());
        }
        if let Some(trail) = &trail {
            trail.close();
        }
        tracing::info!("keybound agent stopped");
        anyhow::Ok(())
    });
    // The signer processes' answers are read on this runtime: they end while it still
    // runs (its worker threads run on outside `block_on`), also after an error above.
    signer_keyring.stop_signers();
    served?;
    Ok(ExitCode::SUCCESS)
}
