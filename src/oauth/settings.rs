//! `[[client]]` settings: one OAuth client per entry, validated at load time with the key
//! path in every message.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::server::{AudienceRule, ServerKind};
use crate::error::InvalidSetting;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpopMode {
    /// Every token request and API call carries a proof; a Bearer token is refused.
    #[default]
    Required,
    Off,
}

/// `[[client]]` as written in keybound.toml (see keybound.example.toml).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    pub name: String,
    #[serde(default)]
    pub server: ServerKind,
    pub token_endpoint: Option<String>,
    pub issuer: Option<String>,
    pub client_id: String,
    pub assertion_key: String,
    pub dpop_key: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    pub allowed_scopes: Option<Vec<String>>,
    #[serde(default)]
    pub dpop: DpopMode,
    pub audience: Option<String>,
    #[serde(default = "defaults::assertion_lifetime")]
    pub assertion_lifetime: u64,
    pub api_origins: Option<Vec<String>>,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout_secs: f64,
    #[serde(default = "defaults::timeout")]
    pub timeout_secs: f64,
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::backoff_initial")]
    pub backoff_initial_ms: u64,
    #[serde(default = "defaults::backoff_max")]
    pub backoff_max_ms: u64,
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "defaults::breaker_cooldown")]
    pub breaker_cooldown_secs: u64,
    #[serde(default = "defaults::refresh_ahead")]
    pub refresh_ahead_secs: u64,
}

mod defaults {
    pub fn assertion_lifetime() -> u64 {
        crate::oauth::assertion::DEFAULT_LIFETIME_SECS
    }
    pub fn connect_timeout() -> f64 {
        5.0
    }
    pub fn timeout() -> f64 {
        20.0
    }
    pub fn max_attempts() -> u32 {
        4
    }
    pub fn backoff_initial() -> u64 {
        250
    }
    pub fn backoff_max() -> u64 {
        8_000
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown() -> u64 {
        30
    }
    pub fn refresh_ahead() -> u64 {
        60
    }
}

/// A validated client: URLs parsed, defaults resolved.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub name: String,
    pub server: ServerKind,
    /// `None` when it comes from the issuer's metadata (RFC 8414), fetched on first use.
    pub token_endpoint: Option<Url>,
    pub issuer: Option<Url>,
    pub client_id: String,
    pub assertion_key: String,
    pub dpop_key: Option<String>,
    pub scopes: Vec<String>,
    pub allowed_scopes: Vec<String>,
    pub audience: Option<String>,
    pub assertion_lifetime: u64,
    /// Origins `keybound call` may send this client's tokens to.
    pub api_origins: Vec<String>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub refresh_ahead: Duration,
}

impl ClientSettings {
    /// Validates; `at` is the key path prefix for messages (`client[0]`).
    pub fn validate(self, at: &str) -> Result<ClientConfig, InvalidSetting> {
        let err = |key: &str, msg: String| InvalidSetting::new(format!("{at}.{key}"), msg);
        if self.name.trim().is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        let at = format!("{at} ('{}')", self.name);
        let err = |key: &str, msg: String| InvalidSetting::new(format!("{at}.{key}"), msg);
        if self.client_id.trim().is_empty() {
            return Err(err("client_id", "must not be empty".into()));
        }
        let token_endpoint = self
            .token_endpoint
            .as_deref()
            .map(|u| endpoint_url(u).map_err(|m| err("token_endpoint", m)))
            .transpose()?;
        let issuer = self
            .issuer
            .as_deref()
            .map(|u| endpoint_url(u).map_err(|m| err("issuer", m)))
            .transpose()?;
        if token_endpoint.is_none() && issuer.is_none() {
            return Err(err(
                "token_endpoint",
                "missing: set token_endpoint, or issuer to discover it".into(),
            ));
        }
        if self.server.audience_rule() == AudienceRule::Issuer
            && issuer.is_none()
            && self.audience.is_none()
        {
            return Err(err(
                "issuer",
                format!(
                    "server = \"{}\" uses the issuer as assertion audience: set issuer (or audience)",
                    self.server.name()
                ),
            ));
        }
        let max = self.server.max_assertion_lifetime();
        if self.assertion_lifetime == 0 || self.assertion_lifetime > max {
            return Err(err(
                "assertion_lifetime",
                format!(
                    "{} is out of range 1 to {max} (the {} limit)",
                    self.assertion_lifetime,
                    self.server.name()
                ),
            ));
        }
        match (&self.dpop_key, self.dpop) {
            (None, DpopMode::Required) => {
                return Err(err(
                    "dpop_key",
                    "missing: DPoP is required (dpop = \"required\"); name a key, or set dpop = \"off\"".into(),
                ));
            }
            (Some(d), _) if self.server.requires_distinct_keys() && *d == self.assertion_key => {
                return Err(err(
                    "dpop_key",
                    format!(
                        "'{d}' is also the assertion_key; {} requires a separate DPoP key (generate one with `keybound keys generate --label dpop`)",
                        self.server.name()
                    ),
                ));
            }
            _ => {}
        }
        for s in &self.scopes {
            if s.is_empty() || s.contains(char::is_whitespace) {
                return Err(err("scopes", format!("'{s}' is not a single scope token")));
            }
        }
        let allowed_scopes = self.allowed_scopes.unwrap_or_else(|| self.scopes.clone());
        if let Some(s) = self.scopes.iter().find(|s| !allowed_scopes.contains(s)) {
            return Err(err(
                "scopes",
                format!("'{s}' is not in allowed_scopes; the scope guard would refuse every token"),
            ));
        }
        let api_origins = match self.api_origins {
            Some(list) => list
                .iter()
                .map(|o| endpoint_url(o).map(|u| origin(&u)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| err("api_origins", m))?,
            None => token_endpoint
                .iter()
                .chain(issuer.iter())
                .map(origin)
                .collect(),
        };
        let secs = |key: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 600.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(err(key, format!("{v} is out of range (0, 600] seconds")))
            }
        };
        if self.max_attempts == 0 || self.max_attempts > 10 {
            return Err(err("max_attempts", "must be 1 to 10".into()));
        }
        if self.breaker_failures == 0 {
            return Err(err("breaker_failures", "must be at least 1".into()));
        }
        for (key, v) in [
            ("breaker_cooldown_secs", self.breaker_cooldown_secs),
            ("refresh_ahead_secs", self.refresh_ahead_secs),
        ] {
            if v > 86_400 {
                return Err(err(key, format!("{v} is out of range 0 to 86400 seconds")));
            }
        }
        Ok(ClientConfig {
            connect_timeout: secs("connect_timeout_secs", self.connect_timeout_secs)?,
            timeout: secs("timeout_secs", self.timeout_secs)?,
            name: self.name,
            server: self.server,
            token_endpoint,
            issuer,
            client_id: self.client_id,
            assertion_key: self.assertion_key,
            dpop_key: match self.dpop {
                DpopMode::Required => self.dpop_key,
                DpopMode::Off => None,
            },
            scopes: self.scopes,
            allowed_scopes,
            audience: self.audience,
            assertion_lifetime: self.assertion_lifetime,
            api_origins,
            max_attempts: self.max_attempts,
            backoff_initial: Duration::from_millis(self.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms.max(self.backoff_initial_ms)),
            breaker_failures: self.breaker_failures,
            breaker_cooldown: Duration::from_secs(self.breaker_cooldown_secs),
            refresh_ahead: Duration::from_secs(self.refresh_ahead_secs),
        })
    }
}

/// An endpoint must be https, except on loopback hosts, which may use http for development.
pub fn endpoint_url(value: &str) -> Result<Url, String> {
    let url = super::dpop::absolute_http_url("URL", value).map_err(|e| e.to_string())?;
    if url.scheme() == "http" && !is_loopback(&url) {
        return Err(format!(
            "'{value}' must use https (plain http is allowed only for 127.0.0.1, ::1 and localhost)"
        ));
    }
    Ok(url)
}

pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// `scheme://host[:port]`, the unit nonces, clock offsets and token audiences attach to.
pub fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Result<ClientConfig, String> {
        let text = format!(
            r#"
name = "okta"
token_endpoint = "https://example.okta.com/oauth2/v1/token"
client_id = "0oa1"
assertion_key = "client-auth"
dpop_key = "dpop"
scopes = ["okta.users.read"]
{extra}"#
        );
        let s: ClientSettings = toml::from_str(&text).map_err(|e| e.to_string())?;
        s.validate("client[0]").map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_guard() {
        let c = settings("").unwrap();
        assert_eq!(c.allowed_scopes, ["okta.users.read"]);
        assert_eq!(c.api_origins, ["https://example.okta.com"]);
        assert_eq!(c.server, ServerKind::Okta);
    }

    #[test]
    fn rules_name_the_key() {
        let e = settings("allowed_scopes = [\"x\"]").unwrap_err();
        assert!(e.starts_with("client[0] ('okta').scopes:"), "{e}");
        let e = settings("assertion_lifetime = 3601").unwrap_err();
        assert!(e.contains(".assertion_lifetime: 3601"), "{e}");
        let e = settings(
            "server = \"auth0\"\nissuer = \"https://t.auth0.com/\"\nassertion_lifetime = 301",
        )
        .unwrap_err();
        assert!(e.contains("300"), "{e}");
    }

    #[test]
    fn okta_needs_two_keys() {
        let text = r#"
name = "okta"
token_endpoint = "https://example.okta.com/oauth2/v1/token"
client_id = "0oa1"
assertion_key = "k"
dpop_key = "k"
"#;
        let s: ClientSettings = toml::from_str(text).unwrap();
        let e = s.validate("client[0]").unwrap_err();
        assert_eq!(e.key, "client[0] ('okta').dpop_key");
        assert!(e.reason.contains("separate"), "{e}");
    }

    #[test]
    fn http_only_on_loopback() {
        assert!(endpoint_url("http://127.0.0.1:8089/oauth2/v1/token").is_ok());
        assert!(endpoint_url("http://[::1]:8089/t").is_ok());
        assert!(endpoint_url("http://localhost/t").is_ok());
        assert!(endpoint_url("http://example.okta.com/t").is_err());
        assert!(endpoint_url("https://example.okta.com/t").is_ok());
    }
}
