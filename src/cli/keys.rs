//! `keys generate|list|audit` and `jwks`.

use std::path::Path;
use std::process::ExitCode;

use keybound::jose::{self, Alg};
use keybound::keyring::rotation::{GenState, Generation};
use keybound::keyring::{Audit, Inventory};
use keybound::oauth::client::OAuthClient;
use keybound::policy::{Outcome, Verdict};
use keybound::rotation;
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
    let Inventory {
        audits, problems, ..
    } = keyring.inventory()?;
    if as_json {
        let out: Vec<Value> = audits
            .iter()
            .map(|a| {
                let mut o = summary(a.key(), a.verdict());
                if let Some((slot, g)) = a.generation() {
                    o["slot"] = json!(slot);
                    o["generation"] = json!(g.n);
                    o["state"] = json!(g.state.name());
                    o["published"] = json!(g.state.published());
                    o["dates"] = dates(g);
                }
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
    out!(
        "{:width$}  {:5}  {:43}  {:10}  {:23}  POLICY",
        "LABEL",
        "ALG",
        "KID",
        "STATE",
        "SINCE"
    );
    for a in &audits {
        let k = a.key();
        let (state, since) = match a.generation() {
            Some((_, g)) => (g.state.name(), since(g)),
            None => ("-", "-".to_string()),
        };
        let line = format!(
            "{:width$}  {:5}  {:43}  {:10}  {:23}  {}",
            k.label(),
            k.alg().name(),
            k.public().thumbprint(),
            state,
            since,
            outcome_name(a.verdict().outcome())
        );
        out!("{}", line.trim_end());
    }
    for p in &problems {
        out!(
            "{:width$}  {:5}  {:43}  {:10}  {:23}  fail",
            p.label,
            "-",
            "-",
            "-",
            "-"
        );
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
        ..
    } = keyring.inventory()?;
    if let Some(text) = label {
        let name = KeyName::parse(text)?;
        name.check_token(&token)?;
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
        "profile_tested_live": token.profile_tested_live,
    });
    if as_json {
        let out: Vec<Value> = audits
            .iter()
            .map(|a| {
                let mut o = summary(a.key(), a.verdict());
                o["token"] = token_json.clone();
                o["attributes"] = attributes(a.facts());
                if !a.facts().meanings.is_empty() {
                    // What the attributes mean on this device, from its profile.
                    o["meanings"] = a
                        .facts()
                        .meanings
                        .iter()
                        .map(|(name, m)| ((*name).to_string(), json!(m)))
                        .collect::<serde_json::Map<_, _>>()
                        .into();
                }
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
        if !token.profile_tested_live {
            out!(
                "profile not tested live: profile {} comes from the vendor's documentation; \
                 check its mechanisms and this audit against the device",
                token.profile
            );
        }
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
        match f.meaning(name) {
            Some(meaning) => out!("  {name:24} {shown:5}  {meaning}"),
            None => out!("  {name:24} {shown}"),
        }
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
        // Exactly what the agent's JWKS URL serves.
        out!("{}", serde_json::to_string_pretty(&inventory.jwks())?);
        for audit in &inventory.audits {
            // A generation that may not sign is left out or published by its state.
            match audit.signing_key() {
                Some(_) => {}
                None if audit.generation().is_some() && audit.verdict().refusal("").is_none() => {}
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
        return Ok(ExitCode::SUCCESS);
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

/// When a generation entered its state, as Unix seconds and age.
fn since(g: &Generation) -> String {
    let at = match g.state {
        GenState::Pending => Some(g.created),
        GenState::Prepared => g.prepared,
        GenState::Active => g.activated,
        GenState::Retiring => g.retiring_since,
        GenState::Retired => g.retired,
        GenState::Destroying | GenState::Destroyed => g.destroyed,
    };
    match at {
        Some(t) => format!(
            "{} ({} ago)",
            utc_minute(t),
            age(jose::unix_now().saturating_sub(t))
        ),
        None => "-".to_string(),
    }
}

/// `2026-12-01 01:49Z` (proleptic Gregorian, UTC).
fn utc_minute(t: u64) -> String {
    let t = keybound::utc::civil(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute
    )
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn dates(g: &Generation) -> Value {
    json!({
        "created": g.created, "prepared": g.prepared, "activated": g.activated,
        "retiring_since": g.retiring_since, "retired": g.retired,
        "destroyed": g.destroyed, "tokens_until": g.tokens_until,
    })
}

/// `keys rotate --label L [--activate | --retire] [--force]`.
pub fn rotate(
    config: Option<&Path>,
    slot: &str,
    step: RotateStep,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let (config, _, keyring) = super::load(config, None)?;
    let token = keyring.describe().token_label;
    match step {
        RotateStep::Prepare => {
            let prepared = keyring.prepare(slot)?;
            let g = &prepared.generation;
            let kid = g.kid.as_deref().unwrap_or("?");
            out!(
                "{} generation {} of '{slot}': label '{}', kid {kid} ({}), on token '{token}'",
                if prepared.resumed {
                    "finished preparing"
                } else {
                    "prepared"
                },
                g.n,
                g.label,
                prepared.rotation.alg
            );
            out!("It is published from now on and does not sign until it is activated.");
            let users: Vec<&str> = config
                .clients
                .iter()
                .filter(|c| c.assertion_key == slot)
                .map(|c| c.name.as_str())
                .collect();
            if users.is_empty() {
                out!(
                    "No [[client]] signs assertions with '{slot}' (a DPoP key has nothing to \
                     register): activate it when you like; new tokens are then bound to it."
                );
            } else {
                let jwks = keyring.inventory()?.jwks();
                out!();
                out!(
                    "Next, the server must learn the new key (client {}):",
                    users.join(", ")
                );
                out!(
                    "  * Okta, \"Use a URL to fetch keys dynamically\": nothing to do: your JWKS URL"
                );
                out!(
                    "    (keybound serve with [jwks] listen) serves it now. Okta fetches it again"
                );
                out!("    on its own schedule or when it sees an unknown kid.");
                out!(
                    "  * Okta, \"Save keys\" (pasted keys): replace the app's public keys with this"
                );
                out!(
                    "    JWKS (also printed by `keybound jwks`), which holds every published key:"
                );
                out!("{}", serde_json::to_string_pretty(&jwks)?);
            }
            out!();
            out!(
                "Then: keybound keys rotate --label {slot} --activate   (it first gets a token \
                 with the new key, and switches only if the server accepts it)"
            );
        }
        RotateStep::Activate => {
            let mut clients = Vec::new();
            for c in &config.clients {
                clients.push(OAuthClient::new(c.clone(), &keyring)?);
            }
            let refs: Vec<&OAuthClient> = clients.iter().collect();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let (rotation, accepted) =
                runtime.block_on(rotation::activate(&keyring, &refs, slot, force))?;
            let active = rotation.active().map(|g| g.describe()).unwrap_or_default();
            if accepted.is_forced() {
                eprintln!(
                    "WARNING: --force: kid {} was activated WITHOUT asking any server whether it \
                     knows it. If a server does not, every token request of '{slot}' fails until \
                     you publish the key there",
                    accepted.kid()
                );
            } else if accepted.clients().is_empty() && config.clients.is_empty() {
                out!(
                    "no [[client]] signs assertions with '{slot}': nothing to prove (no \
                     [[client]] is configured, so no server was asked)"
                );
            } else if accepted.clients().is_empty() {
                out!(
                    "no [[client]] signs assertions with '{slot}': nothing to prove ('{slot}' \
                     is a DPoP key: new tokens are bound to it)"
                );
            } else {
                out!(
                    "the token endpoint issued a token for an assertion signed by kid {} \
                     (client {})",
                    accepted.kid(),
                    accepted.clients().join(", ")
                );
            }
            out!("activated: {active}");
            for g in rotation.in_state(GenState::Retiring) {
                out!(
                    "retiring: {}; still published, no longer signs. Retire it after \
                     retire_after ({} s): keybound keys rotate --label {slot} --retire",
                    g.describe(),
                    config.rotation.schedule(slot).retire_after.as_secs()
                );
            }
        }
        RotateStep::Retire => {
            let after = config.rotation.schedule(slot).retire_after.as_secs();
            let before = keyring.rotation(slot)?;
            let rotation = keyring.retire(slot, after, force)?;
            for g in rotation.in_state(GenState::Retired) {
                let was = before
                    .as_ref()
                    .and_then(|b| b.generations.iter().find(|o| o.n == g.n))
                    .is_some_and(|o| o.state == GenState::Retiring);
                if was {
                    out!(
                        "retired: {}; no longer published. With pasted keys, remove kid {} from \
                         the app's keys. It stays on the device until: keybound keys destroy \
                         --label {slot} --kid {}",
                        g.describe(),
                        g.kid.as_deref().unwrap_or("?"),
                        g.kid.as_deref().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The step `keys rotate` takes.
#[derive(Clone, Copy, Debug)]
pub enum RotateStep {
    Prepare,
    Activate,
    Retire,
}

/// `keys destroy --label L --kid K`.
pub fn destroy(config: Option<&Path>, slot: &str, kid: &str) -> anyhow::Result<ExitCode> {
    let keyring = super::open(config, None)?;
    let rotation = keyring.destroy(slot, kid)?;
    let g = rotation
        .by_kid(kid)
        .map(|g| g.describe())
        .unwrap_or_default();
    out!("destroyed: {g}; its key is deleted from the device");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_utc() {
        assert_eq!(super::utc_minute(0), "1970-01-01 00:00Z");
        assert_eq!(super::utc_minute(1_796_090_999), "2026-12-01 02:09Z");
        assert_eq!(super::utc_minute(951_782_400), "2000-02-29 00:00Z");
    }
}
