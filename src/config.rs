//! `keybound.toml`: found by --config, $KEYBOUND_CONFIG or
//! $XDG_CONFIG_HOME/keybound/keybound.toml (never the working directory, which whoever
//! starts keybound chooses); refused when another user can change it; unknown keys refused;
//! errors name the key.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::oauth::settings::{ClientConfig, ClientSettings};
use crate::policy::Rules;
#[cfg(feature = "tpm")]
use crate::token::tpm;
use crate::token::trust::{self, Owners};
use crate::token::{DeviceSettings, pkcs11};

#[derive(Clone, Debug)]
pub struct Config {
    pub token: DeviceSettings,
    pub policy: Rules,
    /// `[[client]]` entries, in file order.
    pub clients: Vec<ClientConfig>,
    /// `[agent]`, for `keybound serve`.
    pub agent: crate::agent::AgentSettings,
    /// `[rotation]`: `retire_after` for `keys rotate --retire`, the agent's schedule.
    pub rotation: crate::rotation::RotationSettings,
    /// `[jwks]`, the hosted JWKS of `keybound serve`; absent: not hosted.
    pub jwks: Option<crate::agent::jwks_host::JwksSettings>,
    /// `[[route]]` entries: the agent's egress gateway.
    pub routes: Vec<crate::agent::gateway::Route>,
    /// `[audit]`, the agent's audit trail; absent: no trail.
    pub audit: Option<crate::trail::AuditSettings>,
}

/// The file's shape before `[token]` is resolved by its backend. Parsing in two steps keeps
/// the full key path (`token.sessions`) in error messages, which a serde-tagged enum loses.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    token: toml::Table,
    #[serde(default)]
    policy: Rules,
    #[serde(default)]
    client: Vec<ClientSettings>,
    #[serde(default)]
    agent: crate::agent::AgentSettings,
    #[serde(default)]
    rotation: crate::rotation::RotationSettings,
    jwks: Option<crate::agent::jwks_host::JwksSettings>,
    #[serde(default)]
    route: Vec<crate::agent::gateway::RouteSettings>,
    audit: Option<crate::trail::AuditSettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no configuration found; looked at: {}. Copy keybound.example.toml, or run softhsm-setup/setup.sh for a dev token",
        .tried.join(", ")
    )]
    NotFound { tried: Vec<String> },
    #[error("cannot read config {}: {reason}", .path.display())]
    Read { path: PathBuf, reason: String },
    #[error("config {}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
    /// The file names the module keybound loads and where the PIN comes from: a file
    /// another user can change is someone else's choice of code and PIN source.
    #[error("config {} is not safe to use: {reason}", .path.display())]
    Unsafe { path: PathBuf, reason: String },
}

impl ConfigError {
    /// Every config error is fixed in the config: [`ErrorKind::Configuration`].
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            ConfigError::NotFound { .. }
            | ConfigError::Read { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::Unsafe { .. } => crate::error::ErrorKind::Configuration,
        }
    }
}

impl Config {
    /// Finds and parses the configuration; returns it with the path it came from.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, PathBuf), ConfigError> {
        let path = locate(explicit)?;
        let read_err = |reason: String| ConfigError::Read {
            path: path.clone(),
            reason,
        };
        let unsafe_err = |reason: String| ConfigError::Unsafe {
            path: path.clone(),
            reason,
        };
        let (mut file, meta) = trust::open_regular(&path, false).map_err(read_err)?;
        trust::check_file(&path, &meta, Owners::UserOrRoot).map_err(unsafe_err)?;
        trust::check_dirs_of(&path, &meta).map_err(unsafe_err)?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| read_err(e.to_string()))?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.clone(),
            message,
        })?;
        Ok((config, path))
    }

    /// Parses and validates TOML text; the error names the key and the reason.
    pub fn parse(text: &str) -> Result<Config, String> {
        let de = toml::Deserializer::parse(text).map_err(|e| one_line(&e, ""))?;
        let mut raw: RawConfig = serde_path_to_error::deserialize(de)
            .map_err(|e| one_line(e.inner(), &e.path().to_string()))?;
        let backend = match raw.token.remove("backend") {
            Some(toml::Value::String(b)) => b,
            Some(other) => {
                return Err(format!(
                    "token.backend: expected a string, found {}",
                    other.type_str()
                ));
            }
            None => {
                return Err("token.backend: missing; set backend = \"pkcs11\" or \"tpm\"".into());
            }
        };
        let token = match backend.as_str() {
            "pkcs11" => {
                let settings: pkcs11::Pkcs11Settings = token_settings(raw.token)?;
                settings.validate().map_err(|e| e.to_string())?;
                DeviceSettings::Pkcs11(settings)
            }
            #[cfg(feature = "tpm")]
            "tpm" => {
                let settings: tpm::TpmSettings = token_settings(raw.token)?;
                settings.validate().map_err(|e| e.to_string())?;
                DeviceSettings::Tpm(settings)
            }
            #[cfg(not(feature = "tpm"))]
            "tpm" => {
                return Err(
                    "token.backend: this keybound was built without TPM support \
                     (cargo feature `tpm`); rebuild it with default features, or use \
                     backend = \"pkcs11\" (tpm2-pkcs11 reaches a TPM that way)"
                        .into(),
                );
            }
            other => {
                return Err(format!(
                    "token.backend: unknown backend '{other}'; use \"pkcs11\" or \"tpm\""
                ));
            }
        };
        let mut clients: Vec<ClientConfig> = Vec::new();
        for (i, c) in raw.client.into_iter().enumerate() {
            let c = c
                .validate(&format!("client[{i}]"))
                .map_err(|e| e.to_string())?;
            if clients.iter().any(|d| d.name == c.name) {
                return Err(format!(
                    "client[{i}].name: '{}' is used by another client",
                    c.name
                ));
            }
            clients.push(c);
        }
        raw.agent.validate().map_err(|e| e.to_string())?;
        let mut routes: Vec<crate::agent::gateway::Route> = Vec::new();
        for (i, r) in raw.route.into_iter().enumerate() {
            let r = r.validate(&format!("route[{i}]"), &clients)?;
            if routes.iter().any(|d| d.name == r.name) {
                return Err(format!(
                    "route[{i}].name: '{}' is used by another route",
                    r.name
                ));
            }
            routes.push(r);
        }
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        crate::agent::authz::Policy::check_routes(&raw.agent.allow, &names)
            .map_err(|e| e.to_string())?;
        raw.rotation.validate().map_err(|e| e.to_string())?;
        if let Some(jwks) = &raw.jwks {
            jwks.validate().map_err(|e| e.to_string())?;
            for c in &clients {
                if let (Some(dpop), Some(keys)) = (&c.dpop_key, &jwks.keys)
                    && keys.contains(dpop)
                {
                    return Err(format!(
                        "jwks.keys: '{dpop}' is the dpop_key of [[client]] '{}'; a DPoP key is \
                         never published (Okta refuses DPoP proofs signed by a key registered \
                         for client authentication): remove it from jwks.keys",
                        c.name
                    ));
                }
            }
        }
        if let Some(audit) = &raw.audit {
            let mut keys = Vec::new();
            for c in &clients {
                keys.push((c.name.as_str(), "assertion_key", c.assertion_key.as_str()));
                if let Some(d) = &c.dpop_key {
                    keys.push((c.name.as_str(), "dpop_key", d.as_str()));
                }
            }
            audit.validate(&keys).map_err(|e| e.to_string())?;
        }
        Ok(Config {
            token,
            policy: raw.policy,
            clients,
            agent: raw.agent,
            rotation: raw.rotation,
            jwks: raw.jwks,
            routes,
            audit: raw.audit,
        })
    }
}

impl Config {
    /// The keys a JWKS publishes (`keybound jwks`, the agent's `/v1/jwks` and JWKS URL):
    /// `[jwks] keys`, else every `[[client]]`'s `assertion_key`, else every approved key
    /// (`None`).
    pub fn published_keys(&self) -> Option<Vec<String>> {
        if let Some(keys) = self.jwks.as_ref().and_then(|j| j.keys.clone()) {
            return Some(keys);
        }
        if self.clients.is_empty() {
            return None;
        }
        let mut keys: Vec<String> = self
            .clients
            .iter()
            .map(|c| c.assertion_key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        Some(keys)
    }

    /// The client named `name`, or the only one when `name` is `None`.
    pub fn client(&self, name: Option<&str>) -> Result<&ClientConfig, String> {
        let names = || {
            let v: Vec<&str> = self.clients.iter().map(|c| c.name.as_str()).collect();
            if v.is_empty() {
                "(none)".to_string()
            } else {
                v.join(", ")
            }
        };
        match (name, self.clients.as_slice()) {
            (_, []) => {
                Err("no [[client]] in the config; add one (see keybound.example.toml)".into())
            }
            (None, [only]) => Ok(only),
            (None, _) => Err(format!(
                "several clients are configured; pick one with --client ({})",
                names()
            )),
            (Some(n), all) => all
                .iter()
                .find(|c| c.name == n)
                .ok_or_else(|| format!("no client named '{n}'; configured: {}", names())),
        }
    }
}

/// toml's message on one line, prefixed with the key path where serde knows it.
/// `[token]` as one backend's settings; errors name the key as `token.<path>`.
fn token_settings<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T, String> {
    serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| one_line(e.inner(), &format!("token.{}", e.path())))
}

fn one_line(e: &toml::de::Error, path: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    match path.trim_end_matches('.') {
        "" => message,
        path => format!("{path}: {message}"),
    }
}

fn locate(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let mut tried = Vec::new();
    match std::env::var_os("KEYBOUND_CONFIG") {
        Some(p) if !p.is_empty() => return Ok(PathBuf::from(p)),
        _ => tried.push("$KEYBOUND_CONFIG (unset)".to_string()),
    }
    // XDG Base Directory: a relative $XDG_CONFIG_HOME is invalid and ignored; it would
    // bring the working directory back into the search.
    let absolute = |p: PathBuf| p.is_absolute().then_some(p);
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .and_then(absolute)
                .map(|h| h.join(".config"))
        });
    match xdg {
        Some(dir) => {
            let candidate = dir.join("keybound").join("keybound.toml");
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
        None => tried.push("$XDG_CONFIG_HOME and $HOME (unset or relative)".to_string()),
    }
    Err(ConfigError::NotFound { tried })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[token]
backend = "pkcs11"
token_label = "t"
"#;

    /// Routes are checked when the config loads: their client, their upstream against the
    /// client's api_origins, their names, and the rules that name them.
    #[test]
    fn routes_are_checked_at_load() {
        let client = "[[client]]\nname = \"okta\"\nissuer = \"https://example.okta.com\"\n\
                      client_id = \"0oa1\"\nassertion_key = \"client-auth\"\ndpop_key = \"dpop\"\n";
        let route = |extra: &str| {
            format!(
                "{GOOD}{client}[[route]]\nname = \"okta\"\nclient = \"okta\"\n\
                 upstream = \"https://example.okta.com\"\nallow = [\"GET /api/v1/users\"]\n{extra}"
            )
        };
        let c = Config::parse(&route("")).unwrap();
        assert_eq!(c.routes[0].name, "okta");
        let ok_rule = "[[agent.allow]]\nuid = 7\nroutes = [\"okta\"]\n";
        Config::parse(&route(ok_rule)).unwrap();
        for (extra, needle) in [
            (
                "[[agent.allow]]\nuid = 7\nroutes = [\"nope\"]\n",
                "agent.allow[0].routes[0]: no [[route]] is named 'nope'",
            ),
            (
                "[[route]]\nname = \"okta\"\nclient = \"okta\"\nupstream = \"https://example.okta.com\"\nallow = [\"GET /\"]\n",
                "route[1].name: 'okta' is used by another route",
            ),
            (
                "[[route]]\nname = \"x\"\nclient = \"gh\"\nupstream = \"https://example.okta.com\"\nallow = [\"GET /\"]\n",
                "route[1].client: no [[client]] is named 'gh'",
            ),
            (
                "[[route]]\nname = \"x\"\nclient = \"okta\"\nupstream = \"https://evil.example\"\nallow = [\"GET /\"]\n",
                "route[1].upstream: the origin https://evil.example is not one of client 'okta''s api_origins",
            ),
            (
                "[[route]]\nname = \"x\"\nclient = \"okta\"\nupstream = \"https://example.okta.com\"\nallow = [\"* /\"]\n",
                "route[1].allow: route 'x': pattern '* /': method '*' is not allowed",
            ),
            (
                "[[route]]\nname = \"../x\"\nclient = \"okta\"\nupstream = \"https://example.okta.com\"\nallow = [\"GET /\"]\n",
                "route[1].name: '../x' is not a path-safe name",
            ),
        ] {
            let e = Config::parse(&route(extra)).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
    }

    #[test]
    fn relative_token_paths_are_refused() {
        for key in ["module", "pin_file", "profiles_dir"] {
            let e = Config::parse(&format!("{GOOD}{key} = \"./x\"\n")).unwrap_err();
            assert_eq!(
                e,
                format!("token.{key}: must be an absolute path, not './x'")
            );
        }
        Config::parse(&format!("{GOOD}module = \"/usr/lib/x.so\"\n")).unwrap();
    }

    #[test]
    #[cfg_attr(not(feature = "tpm"), allow(irrefutable_let_patterns))]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(GOOD).unwrap();
        let DeviceSettings::Pkcs11(s) = &c.token else {
            panic!("not pkcs11: {:?}", c.token);
        };
        assert_eq!(s.pin_env, "KEYBOUND_PIN");
        assert_eq!(s.rsa_bits, 2048);
        assert!(!c.policy.danger_allow_imported_keys);
    }

    #[cfg(feature = "tpm")]
    #[test]
    fn tpm_config_gets_defaults_and_errors_name_the_key() {
        let c = Config::parse("[token]\nbackend = \"tpm\"\n").unwrap();
        let DeviceSettings::Tpm(s) = &c.token else {
            panic!("not tpm: {:?}", c.token);
        };
        assert_eq!(s.tcti, "device:/dev/tpmrm0");
        assert_eq!(s.rsa_bits, 2048);
        assert_eq!(s.primary_handle, None);
        assert_eq!(s.key_auth_source(), None);
        let c = Config::parse(
            "[token]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n\
             state_dir = \"/var/lib/keybound/tpm\"\nprimary_handle = 0x81000001\n\
             key_auth_env = \"KEYBOUND_KEY_AUTH\"\nrsa_bits = 3072\n",
        )
        .unwrap();
        let DeviceSettings::Tpm(s) = &c.token else {
            panic!("not tpm: {:?}", c.token);
        };
        assert_eq!(s.primary_handle, Some(0x8100_0001));
        assert_eq!(
            s.state_dir().unwrap(),
            PathBuf::from("/var/lib/keybound/tpm")
        );
        let tpm = "[token]\nbackend = \"tpm\"\n";
        let e = Config::parse(&format!("{tpm}token_label = \"t\"\n")).unwrap_err();
        assert!(e.starts_with("token.token_label: unknown field"), "{e}");
        let e = Config::parse(&format!("{tpm}primary_handle = \"x\"\n")).unwrap_err();
        assert!(e.starts_with("token.primary_handle: invalid type"), "{e}");
        let e = Config::parse(&format!("{tpm}tcti = \"usb\"\n")).unwrap_err();
        assert!(e.starts_with("token.tcti: 'usb' is not a TCTI"), "{e}");
        let e = Config::parse(&format!("{tpm}rsa_bits = 1024\n")).unwrap_err();
        assert!(e.starts_with("token.rsa_bits"), "{e}");
        for key in ["state_dir", "key_auth_file"] {
            let e = Config::parse(&format!("{tpm}{key} = \"x/y\"\n")).unwrap_err();
            assert_eq!(
                e,
                format!("token.{key}: must be an absolute path, not 'x/y'")
            );
        }
    }

    /// The commented `backend = "tpm"` block of the example, uncommented, is a valid
    /// `[token]` that sets every TPM key.
    #[cfg(feature = "tpm")]
    #[test]
    fn the_example_tpm_block_is_valid() {
        let example = include_str!("../keybound.example.toml");
        let block = example
            .split("# --- backend = \"tpm\"")
            .nth(1)
            .and_then(|rest| rest.split("\n# ----").next())
            .expect("the example has a TPM block");
        let mut text = String::from("[token]\n");
        for line in block.lines() {
            let Some((key, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = ")) else {
                continue;
            };
            if key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                text.push_str(&line[2..]);
                text.push('\n');
            }
        }
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let DeviceSettings::Tpm(s) = &c.token else {
            panic!("not tpm: {text}");
        };
        assert_eq!(s.primary_handle, Some(0x8100_0001), "{text}");
        assert!(
            s.key_auth_env.is_some() && s.key_auth_file.is_some(),
            "{text}"
        );
        assert!(s.state_dir.is_some(), "{text}");
    }

    #[test]
    fn the_example_config_is_valid() {
        Config::parse(include_str!("../keybound.example.toml")).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse(&format!("{GOOD}bogus = 1\n")).unwrap_err();
        assert!(e.contains("token") && e.contains("bogus"), "{e}");
        let e = Config::parse(&GOOD.replace("\"t\"", "7")).unwrap_err();
        assert!(e.starts_with("token.token_label: invalid type"), "{e}");
        let e = Config::parse(&format!("{GOOD}sessions = \"x\"\n")).unwrap_err();
        assert!(e.starts_with("token.sessions: invalid type"), "{e}");
        let e = Config::parse(&GOOD.replace("pkcs11", "hsm")).unwrap_err();
        assert!(e.contains("hsm"), "{e}");
        let e = Config::parse(&format!("{GOOD}sessions = 0\n")).unwrap_err();
        assert!(e.contains("token.sessions"), "{e}");
        let e = Config::parse("[token]\nbackend = \"pkcs11\"\n").unwrap_err();
        assert!(e.contains("token_label"), "{e}");
        let e = Config::parse(&format!("{GOOD}[policy]\ndanger = true\n")).unwrap_err();
        assert!(e.starts_with("policy.danger: unknown field"), "{e}");
        let e = Config::parse(&format!("{GOOD}[policy]\ndanger_allow_imported_keys = 1\n"))
            .unwrap_err();
        assert!(e.starts_with("policy.danger_allow_imported_keys: "), "{e}");
    }
}
