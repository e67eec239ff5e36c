//! `bench`: raw token vs full pipeline, in one run.

use std::path::Path;
use std::process::ExitCode;

use keybound::bench;
use keybound::jose::Alg;

pub fn run(
    config: Option<&Path>,
    key: Option<&str>,
    sessions: Option<usize>,
    seconds: f64,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    if !(seconds.is_finite() && seconds > 0.0) {
        anyhow::bail!("--seconds must be a positive number");
    }
    let keyring = super::open(config, sessions)?;
    let key = match key {
        Some(name) => keyring.signing_key(name)?,
        None => {
            let candidates = keyring.backend().keys()?;
            candidates
                .into_iter()
                .filter(|k| k.alg == Alg::ES256)
                .find_map(|k| keyring.approve(k).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("no ES256 key the policy allows; pass --key or generate one")
                })?
        }
    };
    let sessions = sessions.unwrap_or_else(|| keyring.sessions());
    let report = bench::run(&key, sessions, seconds)?;
    if as_json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!(
            "key '{}' ({}), {} sessions, {} pipeline callers, {:.1} s measured",
            report.key,
            report.alg,
            report.sessions,
            report.callers,
            report.seconds
        );
        out!("raw token       {:>10.0} signs/s", report.raw_per_s);
        out!(
            "JWS pipeline    {:>10.0} proofs/s   (p50 {} µs, p99 {} µs)",
            report.pipeline_per_s,
            report.pipeline_p50_us,
            report.pipeline_p99_us
        );
        out!("pipeline / raw  {:>10.3}", report.ratio);
    }
    Ok(ExitCode::SUCCESS)
}
