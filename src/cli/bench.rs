//! `bench`: the raw token against the full JWS pipeline, or against the running agent, in
//! one run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keybound::bench;
use keybound::jose::Alg;
use keybound::oauth::client::OAuthClient;

/// `--agent`: measure the running agent instead of the in-process pipeline.
pub struct AgentTarget {
    pub clients: usize,
    pub socket: Option<PathBuf>,
    /// A second agent on the same token with `[audit]` on: compare the two.
    pub audit_socket: Option<PathBuf>,
}

pub fn run(
    config: Option<&Path>,
    key: Option<&str>,
    sessions: Option<usize>,
    seconds: f64,
    as_json: bool,
    agent: Option<AgentTarget>,
) -> anyhow::Result<ExitCode> {
    if !(seconds.is_finite() && seconds > 0.0) {
        anyhow::bail!("--seconds must be a positive number");
    }
    // As `serve` runs the device: in signer processes, their answers read on one async
    // thread where the pipeline's tasks await them, unless the config says in-process.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let (settings, _, keyring) = super::load_with(config, |c| match c.agent.signers {
        keybound::agent::Signers::Processes => keybound::keyring::Keyring::open_signers(
            keybound::token::signer::SignerSpawn {
                device: c.token.clone(),
                verbose: 0,
                sessions,
                bench: true,
                hung_after: std::time::Duration::from_secs(c.agent.signer_timeout_secs),
                runtime: runtime.handle().clone(),
            },
            c.policy.clone(),
        ),
        keybound::agent::Signers::InProcess => {
            keybound::keyring::Keyring::open(&c.token, c.policy.clone(), sessions)
        }
    })?;
    let key = match key {
        Some(name) => keyring.signing_key(name)?,
        None => keyring
            .inventory()?
            .audits
            .into_iter()
            .filter(|a| a.key().alg() == Alg::ES256)
            .find_map(|a| a.into_signing_key().ok())
            .ok_or_else(|| {
                anyhow::anyhow!("no ES256 key the policy allows; pass --key or generate one")
            })?,
    };
    let sessions = sessions.unwrap_or_else(|| keyring.sessions());
    if let Some(AgentTarget {
        clients,
        socket,
        audit_socket: Some(on),
    }) = &agent
    {
        let off = socket
            .clone()
            .unwrap_or_else(|| settings.agent.socket_path());
        let r = bench::run_audit(&key, &off, on, *clients, seconds)?;
        if as_json {
            out!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            out!(
                "key '{}', {} agent callers, {:.1} s measured, audit off ({}) and on ({}) alternating",
                r.key,
                r.callers,
                r.seconds,
                off.display(),
                on.display()
            );
            out!(
                "audit off       {:>10.0} proofs/s   (p50 {} µs, p99 {} µs)",
                r.off_per_s,
                r.off_p50_us,
                r.off_p99_us
            );
            out!(
                "audit on        {:>10.0} proofs/s   (p50 {} µs, p99 {} µs)",
                r.on_per_s,
                r.on_p50_us,
                r.on_p99_us
            );
            out!("on / off        {:.3}", r.ratio);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = match agent {
        None => bench::run(&key, sessions, seconds)?,
        Some(target) => {
            let socket = target
                .socket
                .unwrap_or_else(|| settings.agent.socket_path());
            bench::run_agent(&key, sessions, &socket, target.clients, seconds)?
        }
    };
    if as_json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let side = if report.mode == "agent" {
        "agent"
    } else {
        "JWS pipeline"
    };
    out!(
        "key '{}' ({}), {} sessions, {} {side} callers, {:.1} s measured",
        report.key,
        report.alg,
        report.sessions,
        report.callers,
        report.seconds
    );
    match keyring.signers() {
        Some(s) => out!(
            "raw token       {:>10.0} signs/s   (inside {} signer process{}, no pipes)",
            report.raw_per_s,
            s.processes,
            if s.processes == 1 { "" } else { "es" }
        ),
        None => out!("raw token       {:>10.0} signs/s", report.raw_per_s),
    }
    out!(
        "{side:15} {:>10.0} proofs/s   (p50 {} µs, p99 {} µs)",
        report.pipeline_per_s,
        report.pipeline_p50_us,
        report.pipeline_p99_us
    );
    out!("{side} / raw   {:.3}", report.ratio);
    match &report.cpu {
        Some(cpu) if report.mode != "agent" => out!(
            "CPU per operation: raw signature {:.1} µs; per proof: device (signer processes \
             or device threads) {:.1} µs, this process's other threads (the pipeline: JOSE, pipes) \
             {:.1} µs",
            cpu.raw_sign_us,
            cpu.agent_device_us,
            cpu.agent_async_us
        ),
        Some(cpu) => out!(
            "CPU per operation: raw signature {:.0} µs; per proof: device (signer processes \
             or device threads) {:.0} µs, agent HTTP/JOSE {:.0} µs, this load generator {:.0} µs",
            cpu.raw_sign_us,
            cpu.agent_device_us,
            cpu.agent_async_us,
            cpu.client_us
        ),
        None => {}
    }
    if let Some((before, peak)) = report.agent_rss_kib {
        out!(
            "agent memory: {:.1} MiB resident before the run, peak since it started {:.1} MiB",
            before as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--gateway ROUTE`: a GET through the running agent's gateway against the same GET sent
/// directly by this process with the route client's cached token.
pub fn gateway(
    config: Option<&Path>,
    route: &str,
    path: &str,
    clients: usize,
    socket: Option<PathBuf>,
    seconds: f64,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    if !(seconds.is_finite() && seconds > 0.0) {
        anyhow::bail!("--seconds must be a positive number");
    }
    let (settings, _, keyring) = super::load(config, None)?;
    let Some(r) = settings.routes.iter().find(|r| r.name == route) else {
        let names: Vec<&str> = settings.routes.iter().map(|r| r.name.as_str()).collect();
        anyhow::bail!(
            "no [[route]] named '{route}' in the config (routes: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
    };
    let Some(c) = settings.clients.iter().find(|c| c.name == r.client) else {
        anyhow::bail!("route '{route}' names no configured client");
    };
    let client = OAuthClient::new(c.clone(), &keyring)?;
    let socket = socket.unwrap_or_else(|| settings.agent.socket_path());
    let report = bench::run_gateway(client, r, &socket, path, clients, seconds)?;
    if as_json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "route '{}' GET {}, {} callers each side, {:.1} s measured",
        report.route,
        report.path,
        report.callers,
        report.seconds
    );
    out!(
        "direct (cached token) {:>8.0} GET/s   (p50 {} µs, p99 {} µs)",
        report.direct_per_s,
        report.direct_p50_us,
        report.direct_p99_us
    );
    out!(
        "through the gateway   {:>8.0} GET/s   (p50 {} µs, p99 {} µs)",
        report.gateway_per_s,
        report.gateway_p50_us,
        report.gateway_p99_us
    );
    out!("gateway / direct      {:.3}", report.ratio);
    Ok(ExitCode::SUCCESS)
}
