//! `bench`: the raw token against the full JWS pipeline, or against the running agent, in
//! one run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keybound::bench;
use keybound::jose::Alg;

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
    let (settings, _, keyring) = super::load(config, sessions)?;
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
    out!("raw token       {:>10.0} signs/s", report.raw_per_s);
    out!(
        "{side:15} {:>10.0} proofs/s   (p50 {} µs, p99 {} µs)",
        report.pipeline_per_s,
        report.pipeline_p50_us,
        report.pipeline_p99_us
    );
    out!("{side} / raw   {:.3}", report.ratio);
    if let Some(cpu) = &report.cpu {
        out!(
            "CPU per operation: raw signature {:.0} µs; per proof: agent device threads {:.0} µs, \
             agent HTTP/JOSE {:.0} µs, this load generator {:.0} µs",
            cpu.raw_sign_us,
            cpu.agent_device_us,
            cpu.agent_async_us,
            cpu.client_us
        );
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
