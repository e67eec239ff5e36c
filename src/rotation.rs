//! Rotation across the layers: the keyring's steps (`keyring::rotation`), the `[rotation]`
//! settings and schedule, and the activation proof, which needs the OAuth clients: a
//! prepared generation of an assertion key becomes active only after every `[[client]]`
//! that signs its assertions with that slot got a token from its server with an assertion
//! signed by the prepared key. A key the server does not know is never switched to.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{ErrorKind, InvalidSetting};
use crate::keyring::rotation::{Accepted, Rotation};
use crate::keyring::{KeyError, Keyring, SigningKey};
use crate::oauth::OAuthError;
use crate::oauth::client::OAuthClient;

/// `[rotation]`: when the agent's schedule runs each step, for every slot or per slot.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationSettings {
    #[serde(flatten)]
    pub defaults: Timing,
    /// Per-slot overrides: `[rotation.slot.dpop] interval = "30d"`.
    #[serde(default)]
    pub slot: std::collections::BTreeMap<String, Timing>,
    /// The slots the agent's schedule rotates (default: every configured client's keys,
    /// when `interval` is set for them).
    pub slots: Option<Vec<String>>,
    /// How often the agent reads the rotation records (steps another process took show up
    /// within this time). Default "30s".
    pub check: Option<Span>,
}

/// The schedule of one slot. Durations are strings with a unit: "90d", "12h", "30m",
/// "45s".
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    /// Time from one activation to the next. Unset: the agent does not rotate the slot.
    pub interval: Option<Span>,
    /// Time a prepared generation is published before it is activated: the servers fetch
    /// the JWKS meanwhile. Default "1d". Also bounds the hosted JWKS's max-age.
    pub publish_lead: Option<Span>,
    /// Time a retiring generation stays published after the switch. Default "1d".
    pub retire_after: Option<Span>,
}

/// A duration as written in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        let text = String::deserialize(d)?;
        parse_span(&text)
            .map(Span)
            .map_err(serde::de::Error::custom)
    }
}

/// "90d", "12h", "30m", "45s" (one number and one unit).
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "'{text}' is not a duration; write a number and a unit: \"90d\", \"12h\", \"30m\", \"45s\""
        )
    };
    let t = text.trim();
    let unit_at = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = t.split_at(unit_at);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

const DAY: Duration = Duration::from_secs(86_400);

/// One slot's effective schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub interval: Option<Duration>,
    pub publish_lead: Duration,
    pub retire_after: Duration,
}

impl RotationSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for (key, t) in std::iter::once(("rotation".to_string(), &self.defaults)).chain(
            self.slot
                .iter()
                .map(|(s, t)| (format!("rotation.slot.{s}"), t)),
        ) {
            if let Some(Span(i)) = t.interval {
                let lead = t
                    .publish_lead
                    .or(self.defaults.publish_lead)
                    .map_or(DAY, |s| s.0);
                if i <= lead {
                    return Err(InvalidSetting::new(
                        format!("{key}.interval"),
                        format!(
                            "{} s is not longer than publish_lead ({} s): a generation would be \
                             prepared before the last one was active",
                            i.as_secs(),
                            lead.as_secs()
                        ),
                    ));
                }
            }
        }
        if let Some(Span(c)) = self.check
            && !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&c)
        {
            return Err(InvalidSetting::new(
                "rotation.check",
                "must be between 1s and 1h",
            ));
        }
        Ok(())
    }

    /// The schedule of `slot`: its own settings over the global ones over the defaults.
    pub fn schedule(&self, slot: &str) -> Schedule {
        let own = self.slot.get(slot);
        let pick = |f: fn(&Timing) -> Option<Span>| {
            own.and_then(f).or_else(|| f(&self.defaults)).map(|s| s.0)
        };
        Schedule {
            interval: pick(|t| t.interval),
            publish_lead: pick(|t| t.publish_lead).unwrap_or(DAY),
            retire_after: pick(|t| t.retire_after).unwrap_or(DAY),
        }
    }

    pub fn check_every(&self) -> Duration {
        self.check.map_or(Duration::from_secs(30), |s| s.0)
    }

    /// The shortest publish lead of any slot: the hosted JWKS's max-age must not be longer,
    /// or a server could miss a prepared key until after its activation.
    pub fn shortest_lead(&self) -> Duration {
        self.slot
            .keys()
            .map(|s| self.schedule(s).publish_lead)
            .chain([self.schedule("").publish_lead])
            .min()
            .unwrap_or(DAY)
    }
}

/// A rotation step that did not happen, and why.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "activation refused, nothing changed: client '{client}' asked its token endpoint for a \
         token with an assertion signed by the prepared key (kid {kid}), and the server did \
         not issue one: {refusal}.{}",
        not_accepted_hint(refusal)
    )]
    NotAccepted {
        client: String,
        kid: String,
        /// In the message, not a source: the error chain would print it twice.
        refusal: Box<OAuthError>,
    },
    #[error("{what} stopped: {reason}")]
    Stopped { what: &'static str, reason: String },
    #[error(
        "no [[client]] in this config signs assertions or DPoP proofs with '{slot}', so \
         keybound cannot prove that the servers know its prepared key: activate it with the \
         config that has the clients, or pass --force to skip the proof"
    )]
    NoClient { slot: String },
}

/// What to do after a refused activation proof: when the server refused the client
/// (`invalid_client`), it does not know the key yet; otherwise the error says what failed.
fn not_accepted_hint(e: &OAuthError) -> &'static str {
    match e {
        OAuthError::Server { error, .. } if error == "invalid_client" => {
            " The server does not know the new key yet: paste the JWKS (`keybound jwks`) \
             into the app's keys, or, with a JWKS URL, wait until the server fetched it \
             again; then activate again"
        }
        _ => " Fix that, then activate again",
    }
}

impl StepError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StepError::Key(e) => e.kind(),
            // The server refusing the prepared key is a refused credential (exit 77).
            StepError::NotAccepted { refusal, .. } => match refusal.kind() {
                ErrorKind::Device => ErrorKind::Transient,
                kind => kind,
            },
            StepError::Stopped { .. } => ErrorKind::Internal,
            StepError::NoClient { .. } => ErrorKind::Configuration,
        }
    }
}

/// Whether `slot` is `c`'s assertion key (named as in the config, or found through it).
fn signs_assertions(c: &OAuthClient, slot: &str) -> bool {
    c.config().assertion_key == slot || c.assertion_key().name() == slot
}

/// Whether `slot` is `c`'s DPoP key.
fn signs_proofs(c: &OAuthClient, slot: &str) -> bool {
    c.config().dpop_key.as_deref() == Some(slot) || c.dpop_key().is_some_and(|k| k.name() == slot)
}

/// The activation proof: every client in `clients` gets a token for an assertion signed
/// by `slot`'s prepared generation. With no client (a DPoP slot, or a key no client here
/// signs assertions with) there is nothing to register and the acceptance names nobody.
///
/// `clients` are every configured client; those that sign assertions with `slot` are
/// asked. When clients are configured and none uses the slot, neither for assertions nor
/// for DPoP, it is refused: keybound cannot tell whether some server needs to know it
/// (run with the config that has its clients, or force).
pub async fn prove(
    keyring: &Keyring,
    clients: &[&OAuthClient],
    slot: &str,
) -> Result<Accepted, StepError> {
    let asked: Vec<&OAuthClient> = clients
        .iter()
        .copied()
        .filter(|c| signs_assertions(c, slot))
        .collect();
    // No client at all: keys used directly (`keybound dpop`, the agent's key names), no
    // server known to ask.
    if asked.is_empty() && !clients.is_empty() && !clients.iter().any(|c| signs_proofs(c, slot)) {
        return Err(StepError::NoClient {
            slot: slot.to_string(),
        });
    }
    let clients = asked.as_slice();
    let key = prepared_key(keyring, slot).await?;
    let mut names = Vec::new();
    for c in clients {
        c.prove_assertion_key(key.clone())
            .await
            .map_err(|e| StepError::NotAccepted {
                client: c.config().name.clone(),
                kid: key.kid().to_string(),
                refusal: Box::new(e),
            })?;
        tracing::info!(client = %c.config().name, kid = key.kid(), slot, "the server accepted the prepared key");
        names.push(c.config().name.clone());
    }
    Ok(Accepted::by_servers(&key, names))
}

/// The slot's prepared generation, approved (a blocking device call, off the reactor).
async fn prepared_key(keyring: &Keyring, slot: &str) -> Result<SigningKey, StepError> {
    let (k, s) = (keyring.clone(), slot.to_string());
    Ok(tokio::task::spawn_blocking(move || k.prepared_key(&s))
        .await
        .map_err(|e| StepError::Stopped {
            what: "the key lookup",
            reason: e.to_string(),
        })??)
}

/// Proves (unless `force`) and activates `slot`'s prepared generation.
pub async fn activate(
    keyring: &Keyring,
    clients: &[&OAuthClient],
    slot: &str,
    force: bool,
) -> Result<(Rotation, Accepted), StepError> {
    let accepted = if force {
        let key = prepared_key(keyring, slot).await?;
        tracing::warn!(
            slot,
            kid = key.kid(),
            "activation FORCED: no server was asked whether it knows the key"
        );
        Accepted::forced(key.kid())
    } else {
        prove(keyring, clients, slot).await?
    };
    let (k, s, a) = (keyring.clone(), slot.to_string(), accepted.clone());
    let rotation = tokio::task::spawn_blocking(move || k.activate(&s, &a))
        .await
        .map_err(|e| StepError::Stopped {
            what: "the activation",
            reason: e.to_string(),
        })??;
    Ok((rotation, accepted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_with_units() {
        assert_eq!(parse_span("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse_span("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_span("30m").unwrap(), Duration::from_secs(1_800));
        assert_eq!(parse_span("45s").unwrap(), Duration::from_secs(45));
        for bad in ["", "d", "10", "10w", "-1d", "1.5d", "99999999999999999999d"] {
            assert!(parse_span(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slot_settings_override_global_ones() {
        let s: RotationSettings = toml::from_str(
            "interval = \"90d\"\npublish_lead = \"2d\"\n[slot.dpop]\ninterval = \"30d\"\n",
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(
            s.schedule("dpop").interval,
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            s.schedule("dpop").publish_lead,
            Duration::from_secs(2 * 86_400)
        );
        assert_eq!(
            s.schedule("client-auth").interval,
            Some(Duration::from_secs(90 * 86_400))
        );
        assert_eq!(s.schedule("client-auth").retire_after, DAY);
        let bad: RotationSettings =
            toml::from_str("interval = \"1d\"\npublish_lead = \"2d\"\n").unwrap();
        assert_eq!(bad.validate().unwrap_err().key, "rotation.interval");
    }
}
