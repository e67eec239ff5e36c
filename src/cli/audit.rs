//! `audit verify`: the trail's chain and checkpoint signatures (`keybound::trail::verify`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use keybound::config::Config;
use keybound::trail::verify::{self, Keys, Options, Status};

/// Exit status of a trail that is not intact.
const TAMPERED: u8 = 1;
/// Exit status of intact lines that are not the whole trail.
const INCOMPLETE: u8 = 2;

/// Verifies `files` (oldest first) against `jwks`, or, without it, against the
/// `[audit] checkpoint_key` of the config's device. The config's `checkpoint_every` and
/// `checkpoint_secs` (the defaults without a config) say how long an uncovered tail may be.
pub fn verify(
    config: Option<&Path>,
    jwks: Option<&Path>,
    from_rotation: bool,
    files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let keys = match jwks {
        Some(path) => verify::read_keys(path).map_err(anyhow::Error::msg)?,
        None => device_keys(config)?,
    };
    let mut options = Options {
        from_rotation,
        ..Options::default()
    };
    if let Ok((config, _)) = Config::load(config)
        && let Some(audit) = &config.audit
    {
        options.checkpoint_every = audit.checkpoint_every;
        options.checkpoint_secs = audit.checkpoint_secs;
    }
    let report = verify::verify(files, &keys, &options).map_err(anyhow::Error::msg)?;
    out!("{report}");
    Ok(match report.status() {
        Status::Intact => ExitCode::SUCCESS,
        Status::Incomplete => ExitCode::from(INCOMPLETE),
        Status::Tampered => ExitCode::from(TAMPERED),
    })
}

/// The checkpoint key's public JWKs, from the device (approved like any key): every
/// generation on the device when it is a rotated slot, so checkpoints signed before a
/// rotation verify too (a destroyed generation's need `--jwks`).
fn device_keys(config: Option<&Path>) -> anyhow::Result<Keys> {
    let (config, _, keyring) = super::load(config, None).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nno --jwks given, so the audit key is read from the configured device; \
             pass --jwks FILE (the output of `keybound jwks --label <checkpoint_key>`) to \
             verify elsewhere"
        )
    })?;
    let audit = config.audit.as_ref().ok_or_else(|| {
        anyhow::anyhow!("the config has no [audit]; pass --jwks FILE with the audit key's JWKS")
    })?;
    let name = audit.checkpoint_key.as_str();
    // The active key first: a name that cannot sign is an error that says why.
    let key = keyring.signing_key(name)?;
    let mut entries = vec![key.public().jwks_entry(key.kid(), key.alg())];
    if key.slot().is_some() {
        let inventory = keyring.inventory()?;
        for a in &inventory.audits {
            let info = a.key();
            let ours = a.generation().is_some_and(|(slot, _)| slot == name);
            if ours && a.verdict().refusal(info.label()).is_none() {
                let kid = info.public().thumbprint();
                if kid != key.kid() {
                    entries.push(info.public().jwks_entry(&kid, info.alg()));
                }
            }
        }
    }
    let doc = serde_json::json!({ "keys": entries });
    Keys::from_jwks(&doc).map_err(anyhow::Error::msg)
}
