//! `assertion`, `dpop`, `decode`.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use keybound::jose;
use keybound::oauth::{self, assertion, dpop};
use zeroize::Zeroizing;

pub fn assertion(
    config: Option<&Path>,
    key: &str,
    client_id: &str,
    audience: &str,
    lifetime: u64,
) -> anyhow::Result<ExitCode> {
    // Check the request before touching the device.
    let claims = assertion::claims(
        client_id,
        audience,
        lifetime,
        assertion::MAX_LIFETIME_SECS,
        oauth::unix_now(),
        oauth::new_jti()?,
    )?;
    let key = super::open(config, None)?.signing_key(key)?;
    let jws = oauth::sign(&key, &assertion::header(key.alg(), key.kid()), &claims)?;
    out!("{jws}");
    Ok(ExitCode::SUCCESS)
}

pub fn dpop(
    config: Option<&Path>,
    key: &str,
    method: &str,
    url: &str,
    nonce: Option<&str>,
    access_token_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let token = access_token_file
        .map(|path| {
            std::fs::read_to_string(path)
                .map(Zeroizing::new)
                .with_context(|| format!("cannot read access token file {}", path.display()))
        })
        .transpose()?;
    let token = token.as_deref().map(|t| t.trim_end_matches(['\r', '\n']));
    if token.is_some_and(str::is_empty) {
        anyhow::bail!("the access token file is empty");
    }
    let claims = dpop::claims(
        method,
        url,
        nonce,
        token,
        oauth::unix_now(),
        oauth::new_jti()?,
    )?;
    let key = super::open(config, None)?.signing_key(key)?;
    let jws = oauth::sign(&key, &dpop::header(key.alg(), key.jwk()), &claims)?;
    out!("{jws}");
    Ok(ExitCode::SUCCESS)
}

pub fn decode(jws: Option<String>) -> anyhow::Result<ExitCode> {
    let text = match jws {
        Some(t) => t,
        None => {
            let mut t = String::new();
            std::io::stdin()
                .read_to_string(&mut t)
                .context("cannot read the JWS from stdin")?;
            t
        }
    };
    let decoded = jose::decode(&text)?;
    let out = serde_json::json!({ "header": decoded.header, "claims": decoded.claims });
    out!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
