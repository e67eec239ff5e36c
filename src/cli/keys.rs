//! `keys generate|list|audit` and `jwks`.

use std::path::Path;
use std::process::ExitCode;

use keybound::jose::Alg;
use keybound::policy::{Outcome, Verdict};
use keybound::token::{KeyFacts, KeyInfo, KeyName};
use serde_json::{Value, json};

pub fn generate(config: Option<&Path>, label: &str, alg: Alg) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let key = keyring.backend().generate(label, alg)?;
    let token = keyring.backend().describe().token_label;
    let (_, verdict) = keyring.audit(&key)?;
    if let Some(refusal) = verdict.refusal(&key.label) {
        anyhow::bail!("the token created the key, but it fails the policy: {refusal}");
    }
    out!(
        "generated {} key '{}' (kid {}) on token '{token}'",
        key.alg,
        key.label,
        key.public.thumbprint()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn list(config: Option<&Path>, as_json: bool) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let mut rows = Vec::new();
    for key in keyring.backend().keys()? {
        let (_, verdict) = keyring.audit(&key)?;
        rows.push((key, verdict));
    }
    if as_json {
        let out: Vec<Value> = rows
            .iter()
            .map(|(k, v)| {
                let mut o = summary(k, v);
                o["reasons"] = v.findings.iter().map(|f| f.message.clone()).collect();
                o
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        eprintln!("no keys on the token; create one with `keybound keys generate --label <label>`");
        return Ok(ExitCode::SUCCESS);
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.label.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out!("{:width$}  {:5}  {:43}  POLICY", "LABEL", "ALG", "KID");
    for (k, v) in &rows {
        out!(
            "{:width$}  {:5}  {:43}  {}",
            k.label,
            k.alg.name(),
            k.public.thumbprint(),
            outcome_name(v.outcome())
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn audit(
    config: Option<&Path>,
    label: Option<&str>,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let token = keyring.backend().describe();
    let keys = match label {
        Some(name) => vec![keyring.backend().find(&KeyName::parse(name)?)?],
        None => keyring.backend().keys()?,
    };
    let mut reports = Vec::new();
    for key in keys {
        let (facts, verdict) = keyring.audit(&key)?;
        reports.push((key, facts, verdict));
    }
    let failed = reports.iter().any(|(_, _, v)| v.outcome() == Outcome::Fail);
    if as_json {
        let out: Vec<Value> = reports
            .iter()
            .map(|(k, f, v)| {
                let mut o = summary(k, v);
                o["token"] = json!({
                    "label": token.token_label, "manufacturer": token.manufacturer,
                    "model": token.model, "serial": token.serial, "profile": token.profile,
                });
                o["attributes"] = attributes(f);
                o["verdict"] = o["policy"].take();
                o["findings"] = json!(v.findings);
                o.as_object_mut().map(|m| m.remove("policy"));
                o
            })
            .collect();
        out!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        out!(
            "token '{}': {} {} (serial {}), profile {}",
            token.token_label,
            token.manufacturer,
            token.model,
            token.serial,
            token.profile
        );
        for (k, f, v) in &reports {
            out!();
            out!(
                "key '{}'  {}  kid {}  id {}",
                k.label,
                k.alg,
                k.public.thumbprint(),
                keybound::token::hex(&k.id)
            );
            for (name, value) in &f.attributes {
                let shown = value.map_or("(not reported)".to_string(), |b| b.to_string());
                out!("  {name:24} {shown}");
            }
            for finding in &v.findings {
                let tag = format!("{:?}", finding.severity).to_uppercase();
                out!("  {tag}: {}", finding.message);
            }
            out!("  verdict: {}", outcome_name(v.outcome()));
        }
        if reports.is_empty() {
            out!("no keys on the token");
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn jwks(config: Option<&Path>, labels: &[String]) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let mut entries = Vec::new();
    if labels.is_empty() {
        for key in keyring.backend().keys()? {
            match keyring.approve(key.clone()) {
                Ok(k) => entries.push(k.public().jwks_entry(k.kid(), k.alg())),
                Err(e) => eprintln!("warning: key '{}' left out of the JWKS: {e}", key.label),
            }
        }
    } else {
        for name in labels {
            let k = keyring.signing_key(name)?;
            entries.push(k.public().jwks_entry(k.kid(), k.alg()));
        }
    }
    out!(
        "{}",
        serde_json::to_string_pretty(&json!({ "keys": entries }))?
    );
    Ok(ExitCode::SUCCESS)
}

fn summary(k: &KeyInfo, v: &Verdict) -> Value {
    json!({
        "label": k.label,
        "id": keybound::token::hex(&k.id),
        "alg": k.alg.name(),
        "kid": k.public.thumbprint(),
        "policy": outcome_name(v.outcome()),
    })
}

fn attributes(f: &KeyFacts) -> Value {
    f.attributes
        .iter()
        .map(|(name, value)| ((*name).to_string(), json!(value)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "pass",
        Outcome::Warn => "warn",
        Outcome::Fail => "fail",
    }
}
