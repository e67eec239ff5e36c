//! `keys generate|list|audit` and `jwks`.

use std::path::Path;
use std::process::ExitCode;

use keybound::jose::Alg;
use keybound::keyring::{Audit, Inventory};
use keybound::policy::{Outcome, Verdict};
use keybound::token::{KeyFacts, KeyInfo, KeyName, Label, Problem, hex};
use serde_json::{Value, json};

pub fn generate(config: Option<&Path>, label: &str, alg: Alg) -> anyhow::Result<ExitCode> {
    let label = Label::parse(label)?;
    let keyring = super::open(config, None)?;
    let audit = keyring.generate(&label, alg)?;
    let token = keyring.describe().token_label;
    let key = audit.key().clone();
    if let Err(refusal) = audit.into_signing_key() {
        anyhow::bail!("the token created the key, but it fails the policy: {refusal}");
    }
    out!(
        "generated {} key '{}' (kid {}) on token '{token}'",
        key.alg(),
        key.label(),
        key.public().thumbprint()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn list(config: Option<&Path>, as_json: bool) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let Inventory { audits, problems } = keyring.inventory()?;
    if as_json {
        let out: Vec<Value> = audits
            .iter()
            .map(|a| {
                let mut o = summary(a.key(), a.verdict());
                o["reasons"] = a
                    .verdict()
                    .findings
                    .iter()
                    .map(|f| f.message.clone())
                    .collect();
                o
            })
            .chain(problems.iter().map(|p| {
                let mut o = problem_summary(p);
                o["reasons"] = json!([p.reason]);
                o
            }))
            .collect();
        out!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if audits.is_empty() && problems.is_empty() {
        eprintln!("no keys on the token; create one with `keybound keys generate --label <label>`");
        return Ok(ExitCode::SUCCESS);
    }
    let width = audits
        .iter()
        .map(|a| a.key().label())
        .chain(problems.iter().map(|p| p.label.as_str()))
        .map(str::len)
        .max()
        .unwrap_or(5)
        .max(5);
    out!("{:width$}  {:5}  {:43}  POLICY", "LABEL", "ALG", "KID");
    for a in &audits {
        let k = a.key();
        out!(
            "{:width$}  {:5}  {:43}  {}",
            k.label(),
            k.alg().name(),
            k.public().thumbprint(),
            outcome_name(a.verdict().outcome())
        );
    }
    for p in &problems {
        out!("{:width$}  {:5}  {:43}  fail", p.label, "-", "-");
    }
    for p in &problems {
        out!(
            "unusable object '{}' (id {}): {}",
            p.label,
            hex(&p.id),
            p.reason
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
    let token = keyring.describe();
    let Inventory {
        mut audits,
        mut problems,
    } = keyring.inventory()?;
    if let Some(text) = label {
        let name = KeyName::parse(text)?;
        name.check_token(&token.token_label)?;
        audits.retain(|a| name.matches(a.key().label(), a.key().id()));
        problems.retain(|p| name.matches(&p.label, &p.id));
        if audits.is_empty() && problems.is_empty() {
            // The same "not found" error, listing the keys that exist, as signing gives.
            keyring.find(text)?;
        }
    }
    let failed = !problems.is_empty()
        || audits
            .iter()
            .any(|a| a.verdict().outcome() == Outcome::Fail);
    let token_json = json!({
        "label": token.token_label, "manufacturer": token.manufacturer,
        "model": token.model, "serial": token.serial, "profile": token.profile,
    });
    if as_json {
        let out: Vec<Value> = audits
            .iter()
            .map(|a| {
                let mut o = summary(a.key(), a.verdict());
                o["token"] = token_json.clone();
                o["attributes"] = attributes(a.facts());
                o["verdict"] = o["policy"].take();
                o["findings"] = json!(a.verdict().findings);
                o.as_object_mut().map(|m| m.remove("policy"));
                o
            })
            .chain(problems.iter().map(|p| {
                let mut o = problem_summary(p);
                o["token"] = token_json.clone();
                o["attributes"] = json!({});
                o["verdict"] = o["policy"].take();
                o["findings"] = json!([{
                    "severity": "fail", "attribute": "object", "message": p.reason,
                }]);
                o.as_object_mut().map(|m| m.remove("policy"));
                o
            }))
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
        for a in &audits {
            print_audit(a)?;
        }
        for p in &problems {
            out!();
            out!("object '{}'  id {}", p.label, hex(&p.id));
            out!("  FAIL: {}", p.reason);
            out!("  verdict: fail");
        }
        if audits.is_empty() && problems.is_empty() {
            out!("no keys on the token");
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_audit(a: &Audit) -> anyhow::Result<()> {
    let (k, f, v) = (a.key(), a.facts(), a.verdict());
    out!();
    out!(
        "key '{}'  {}  kid {}  id {}",
        k.label(),
        k.alg(),
        k.public().thumbprint(),
        hex(k.id())
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
    Ok(())
}

pub fn jwks(config: Option<&Path>, labels: &[String]) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let mut entries = Vec::new();
    if labels.is_empty() {
        let inventory = keyring.inventory()?;
        for audit in &inventory.audits {
            match audit.signing_key() {
                Some(k) => entries.push(k.public().jwks_entry(k.kid(), k.alg())),
                None => {
                    let why = audit
                        .verdict()
                        .refusal(audit.key().label())
                        .map_or_else(String::new, |r| r.to_string());
                    eprintln!(
                        "warning: key '{}' left out of the JWKS: {why}",
                        audit.key().label()
                    );
                }
            }
        }
        for p in &inventory.problems {
            eprintln!(
                "warning: object '{}' (id {}) left out of the JWKS: {}",
                p.label,
                hex(&p.id),
                p.reason
            );
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
        "label": k.label(),
        "id": hex(k.id()),
        "alg": k.alg().name(),
        "kid": k.public().thumbprint(),
        "policy": outcome_name(v.outcome()),
    })
}

/// An object that is not a usable key, in the shape of a key's summary.
fn problem_summary(p: &Problem) -> Value {
    json!({
        "label": p.label,
        "id": hex(&p.id),
        "alg": null,
        "kid": null,
        "policy": outcome_name(Outcome::Fail),
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
