//! hsm-profiles: per-token-model data (module paths, mechanisms, encodings, template quirks).
//! Embedded from `hsm-profiles/`, overridable from a directory.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::TokenError;
use super::trust::{self, Owners};
use crate::jose::Alg;

const EMBEDDED: [(&str, &str); 9] = [
    (
        "softhsm2.toml",
        include_str!("../../hsm-profiles/softhsm2.toml"),
    ),
    (
        "tpm2-pkcs11.toml",
        include_str!("../../hsm-profiles/tpm2-pkcs11.toml"),
    ),
    (
        "yubihsm2.toml",
        include_str!("../../hsm-profiles/yubihsm2.toml"),
    ),
    (
        "generic.toml",
        include_str!("../../hsm-profiles/generic.toml"),
    ),
    (
        "p11-kit-client.toml",
        include_str!("../../hsm-profiles/p11-kit-client.toml"),
    ),
    (
        "opensc-sc-hsm.toml",
        include_str!("../../hsm-profiles/opensc-sc-hsm.toml"),
    ),
    (
        "aws-cloudhsm.toml",
        include_str!("../../hsm-profiles/aws-cloudhsm.toml"),
    ),
    (
        "thales-luna.toml",
        include_str!("../../hsm-profiles/thales-luna.toml"),
    ),
    (
        "utimaco-cryptoserver.toml",
        include_str!("../../hsm-profiles/utimaco-cryptoserver.toml"),
    ),
];

/// The key attributes a profile may explain in `[attributes]`: the names the policy's
/// findings and `keys audit` use.
pub const EXPLAINED_ATTRIBUTES: [&str; 6] = [
    "CKA_EXTRACTABLE",
    "CKA_NEVER_EXTRACTABLE",
    "CKA_SENSITIVE",
    "CKA_ALWAYS_SENSITIVE",
    "CKA_LOCAL",
    "public CKA_LOCAL",
];

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// False for a profile written from the vendor's documentation only: `keys audit`
    /// says so. Left out: tested live.
    #[serde(default = "yes")]
    pub tested_live: bool,
    #[serde(default, rename = "match")]
    pub match_rule: MatchRule,
    pub module: ModuleRule,
    pub sessions: Sessions,
    #[serde(default)]
    pub mechanisms: BTreeMap<Alg, SignMechanism>,
    pub encoding: Encoding,
    pub template: Template,
    /// Which attributes keybound may read on the token's keys.
    #[serde(default)]
    pub read: ReadRules,
    /// What a key attribute means on this token where that differs from, or says more
    /// than, PKCS#11's definition: attribute name -> meaning, shown by `keys audit` and in
    /// the policy's findings.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// How keybound's processes share the token (`[processes]`).
    #[serde(default)]
    pub processes: Processes,
    pub quirks: Vec<String>,
}

/// How keybound's processes on one host share the token (`[processes]`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Processes {
    /// For a module that rewrites its files unsafely (SoftHSM): keybound's processes take
    /// turns, with a lock on the path this setting of the module's own configuration
    /// names, for opening the token, login, management and finding a key to prove it
    /// (not signatures).
    pub take_turns_on: Option<ConfigSetting>,
}

/// A setting (`name = value` line) of a module's configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSetting {
    /// The variable that names the configuration file.
    pub config_env: String,
    /// The file when the variable is not set.
    pub config_default: PathBuf,
    pub setting: String,
}

fn yes() -> bool {
    true
}

/// Which attributes keybound may read on the token's keys (`[read]`).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadRules {
    /// False when reading `CKA_ALLOWED_MECHANISMS` fails the whole read (p11-kit-client
    /// 0.24.1: `CKR_DEVICE_ERROR`): keybound does not ask, and an RSA key is then RS256.
    #[serde(default = "yes")]
    pub allowed_mechanisms: bool,
}

impl Default for ReadRules {
    fn default() -> Self {
        ReadRules {
            allowed_mechanisms: true,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    /// File name of the loaded module (e.g. `p11-kit-client.so`). A profile matched by
    /// module is chosen before any matched by manufacturer and model: a module that
    /// forwards another token reports that token's manufacturer.
    pub module: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleRule {
    pub paths: Vec<PathBuf>,
    /// False for a module that reaches its device over the network (YubiHSM's connector):
    /// tried only when the config names the profile or sets `token.module`, never found by
    /// searching the usual paths.
    #[serde(default = "yes")]
    pub search: bool,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sessions {
    pub default: usize,
    pub max: usize,
    /// Sessions per signer process (`keybound serve`): 1 for a module that serialises
    /// inside one process (SoftHSM), so its sessions sign in parallel as separate
    /// processes; absent: one signer process holds every session.
    #[serde(default)]
    pub per_signer: Option<usize>,
}

/// How one JWS algorithm is signed on the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignMechanism {
    Ecdsa,
    EcdsaSha256,
    EcdsaSha384,
    RsaPkcs,
    Sha256RsaPkcs,
    RsaPkcsPss,
    Sha256RsaPkcsPss,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encoding {
    pub ec_point: EcPointEncoding,
    pub ecdsa_signature: EcdsaSignatureEncoding,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EcPointEncoding {
    Der,
    Raw,
    DerOrRaw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EcdsaSignatureEncoding {
    Raw,
    Der,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub omit: Vec<Usage>,
    /// Length of the random `CKA_ID` keybound gives a generated key (default 16). A
    /// YubiHSM 2 takes a 2-byte id as the device's own object id; a longer one it keeps in
    /// an extra object.
    #[serde(default = "default_id_bytes")]
    pub id_bytes: usize,
}

fn default_id_bytes() -> usize {
    16
}

/// Attributes keybound sets on generated keys that a token may refuse in a template: the
/// usages it sets to false, and the list of mechanisms the key may be used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Usage {
    Encrypt,
    Decrypt,
    Wrap,
    Unwrap,
    Derive,
    /// `CKA_ALLOWED_MECHANISMS` on the private key.
    AllowedMechanisms,
}

/// The profiles known to this run: embedded ones, replaced or extended from a directory.
#[derive(Clone, Debug)]
pub struct Profiles(Vec<Profile>);

impl Profiles {
    pub fn load(dir: Option<&Path>) -> Result<Profiles, TokenError> {
        let mut profiles = Vec::new();
        for (file, text) in EMBEDDED {
            profiles.push(parse(text, file)?);
        }
        if let Some(dir) = dir {
            // Profiles name the module keybound loads: only from files no other user can
            // change.
            let unsafe_profile = |path: &Path, reason: String| {
                TokenError::Profile(format!("{} is not safe to use: {reason}", path.display()))
            };
            // The directory as resolved and checked is the one read.
            let real = trust::check_dir(dir).map_err(|r| unsafe_profile(dir, r))?;
            let entries = std::fs::read_dir(&real).map_err(|e| {
                TokenError::Profile(format!("cannot read profiles_dir {}: {e}", dir.display()))
            })?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for path in paths {
                let (mut file, meta) = trust::open_regular(&path, false).map_err(|e| {
                    TokenError::Profile(format!("cannot read {}: {e}", path.display()))
                })?;
                trust::check_file(&path, &meta, Owners::UserOrRoot)
                    .and_then(|()| trust::check_dirs_of(&path, &meta).map(drop))
                    .map_err(|r| unsafe_profile(&path, r))?;
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(|e| {
                    TokenError::Profile(format!("cannot read {}: {e}", path.display()))
                })?;
                let p = parse(&text, &path.display().to_string())?;
                profiles.retain(|q| q.name != p.name);
                profiles.push(p);
            }
        }
        Ok(Profiles(profiles))
    }

    pub fn named(&self, name: &str) -> Result<&Profile, TokenError> {
        self.0.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.0.iter().map(|p| p.name.as_str()).collect();
            TokenError::Profile(format!(
                "no profile named '{name}'; known: {}",
                names.join(", ")
            ))
        })
    }

    /// The profile whose match rule fits the module and token (rules naming the module
    /// first), else `generic`.
    pub fn matching(
        &self,
        module: &Path,
        manufacturer: &str,
        model: &str,
    ) -> Result<&Profile, TokenError> {
        let file = module.file_name().and_then(|f| f.to_str()).unwrap_or("");
        let fits = |p: &&Profile| p.match_rule.fits(file, manufacturer, model);
        let by_module = self
            .0
            .iter()
            .filter(|p| p.match_rule.module.is_some())
            .find(fits);
        match by_module.or_else(|| self.0.iter().find(fits)) {
            Some(p) => Ok(p),
            None => self.named("generic"),
        }
    }

    /// The profile a module is known by before its token is read: the named one, else the
    /// first whose match rule or module paths name a file of that name. `None` when none
    /// does (the profile is then only known from the token).
    pub fn claiming(&self, name: Option<&str>, module: &Path) -> Option<&Profile> {
        if let Some(name) = name {
            return self.named(name).ok();
        }
        let file = module.file_name()?;
        self.0.iter().find(|p| {
            p.match_rule.module.as_deref().map(std::ffi::OsStr::new) == Some(file)
                || p.module.paths.iter().any(|m| m.file_name() == Some(file))
        })
    }

    /// Where to look for a module: the named profile's paths first, then those of every
    /// profile that recognises its tokens by manufacturer or model. A profile chosen by its
    /// module (p11-kit-client), only by name (documentation-only ones) or whose module
    /// goes to the network (`[module] search = false`: YubiHSM) is never loaded unless
    /// named: its module would otherwise be picked on a machine that merely has it.
    pub fn module_paths(&self, first: Option<&str>) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        let by_token = |p: &&Profile| {
            p.module.search
                && p.match_rule.module.is_none()
                && (p.match_rule.manufacturer.is_some() || p.match_rule.model.is_some())
        };
        let ordered = self
            .0
            .iter()
            .filter(|p| Some(p.name.as_str()) == first)
            .chain(
                self.0
                    .iter()
                    .filter(|p| Some(p.name.as_str()) != first)
                    .filter(by_token),
            );
        for p in ordered {
            for path in &p.module.paths {
                if !out.contains(path) {
                    out.push(path.clone());
                }
            }
        }
        out
    }
}

impl Profile {
    pub fn mechanism(&self, alg: Alg) -> Result<SignMechanism, TokenError> {
        self.mechanisms
            .get(&alg)
            .copied()
            .ok_or_else(|| TokenError::AlgUnavailable {
                alg,
                profile: self.name.clone(),
                reason: "the profile lists no mechanism for it".into(),
            })
    }

    pub fn omits(&self, usage: Usage) -> bool {
        self.template.omit.contains(&usage)
    }

    /// What `attribute` means on this token, if the profile says.
    pub fn meaning(&self, attribute: &str) -> Option<&str> {
        self.attributes.get(attribute).map(String::as_str)
    }
}

impl MatchRule {
    fn fits(&self, module_file: &str, manufacturer: &str, model: &str) -> bool {
        if self.module.is_none() && self.manufacturer.is_none() && self.model.is_none() {
            return false;
        }
        let eq = |want: &Option<String>, got: &str| {
            want.as_deref().is_none_or(|w| unpad(w) == unpad(got))
        };
        self.module.as_deref().is_none_or(|m| m == module_file)
            && eq(&self.manufacturer, manufacturer)
            && eq(&self.model, model)
    }
}

impl SignMechanism {
    /// Whether the token hashes (true) or signs keybound's software digest (false).
    pub fn hashes_on_token(self) -> bool {
        matches!(
            self,
            SignMechanism::EcdsaSha256
                | SignMechanism::EcdsaSha384
                | SignMechanism::Sha256RsaPkcs
                | SignMechanism::Sha256RsaPkcsPss
        )
    }

    /// Whether this mechanism can make `alg` signatures.
    pub fn fits(self, alg: Alg) -> bool {
        matches!(
            (self, alg),
            (SignMechanism::Ecdsa, Alg::ES256 | Alg::ES384)
                | (SignMechanism::EcdsaSha256, Alg::ES256)
                | (SignMechanism::EcdsaSha384, Alg::ES384)
                | (
                    SignMechanism::RsaPkcs | SignMechanism::Sha256RsaPkcs,
                    Alg::RS256
                )
                | (
                    SignMechanism::RsaPkcsPss | SignMechanism::Sha256RsaPkcsPss,
                    Alg::PS256
                )
        )
    }
}

fn parse(text: &str, origin: &str) -> Result<Profile, TokenError> {
    let p: Profile = toml::from_str(text)
        .map_err(|e| TokenError::Profile(format!("{origin}: {}", e.message().trim())))?;
    if let Some((alg, m)) = p.mechanisms.iter().find(|(a, m)| !m.fits(**a)) {
        return Err(TokenError::Profile(format!(
            "{origin}: mechanisms.{alg} = {m:?} cannot make {alg} signatures"
        )));
    }
    // A relative module path would be looked up in the working directory.
    if let Some(path) = p.module.paths.iter().find(|path| !path.is_absolute()) {
        return Err(TokenError::Profile(format!(
            "{origin}: module.paths: '{}' is not an absolute path",
            path.display()
        )));
    }
    if let Some(name) = p
        .attributes
        .keys()
        .find(|n| !EXPLAINED_ATTRIBUTES.contains(&n.as_str()))
    {
        return Err(TokenError::Profile(format!(
            "{origin}: attributes: '{name}' is not one of {}",
            EXPLAINED_ATTRIBUTES.join(", ")
        )));
    }
    if !(2..=64).contains(&p.template.id_bytes) {
        return Err(TokenError::Profile(format!(
            "{origin}: template.id_bytes must be between 2 and 64"
        )));
    }
    if p.sessions.default == 0 || p.sessions.default > p.sessions.max {
        return Err(TokenError::Profile(format!(
            "{origin}: sessions.default must be between 1 and sessions.max"
        )));
    }
    Ok(p)
}

/// A token information field without its padding: PKCS#11 pads these fields with blanks;
/// tpm2-pkcs11 pads the model with NULs.
pub(crate) fn unpad(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || c == '\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_profiles_parse_and_match() {
        let p = Profiles::load(None).unwrap();
        assert_eq!(
            p.matching(Path::new(SOFTHSM), "SoftHSM project", "SoftHSM v2      ")
                .unwrap()
                .name,
            "softhsm2"
        );
        assert_eq!(
            p.matching(Path::new("/opt/acme.so"), "Acme", "HSM 9000")
                .unwrap()
                .name,
            "generic"
        );
        // tpm2-pkcs11 over swtpm pads the model with NULs.
        let tpm = p
            .matching(
                Path::new("/usr/lib/libtpm2_pkcs11.so.1"),
                "IBM",
                "SW   TPM\0\0\0\0\0\0\0\0",
            )
            .unwrap();
        assert_eq!(tpm.name, "tpm2-pkcs11");
        assert!(tpm.mechanism(Alg::PS256).is_err());
        assert!(tpm.omits(Usage::Decrypt) && tpm.omits(Usage::Encrypt));
        let soft = p.named("softhsm2").unwrap();
        assert_eq!(soft.mechanism(Alg::ES256).unwrap(), SignMechanism::Ecdsa);
        assert!(!soft.omits(Usage::AllowedMechanisms));
        let yubi = p
            .matching(
                Path::new("/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so"),
                "Yubico (www.yubico.com)",
                "YubiHSM",
            )
            .unwrap();
        assert_eq!(yubi.name, "yubihsm2");
        assert!(yubi.omits(Usage::AllowedMechanisms));
        assert!(
            yubi.meaning("CKA_EXTRACTABLE")
                .is_some_and(|m| m.contains("exportable-under-wrap"))
        );
        assert_eq!(yubi.sessions.max, 1);
        assert_eq!((yubi.template.id_bytes, soft.template.id_bytes), (2, 16));
        assert_eq!(
            p.module_paths(Some("softhsm2"))[0],
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        // Modules of profiles chosen by module or by name only are searched only when named.
        let unnamed = p.module_paths(None);
        assert!(
            unnamed
                .iter()
                .all(|m| !m.ends_with("p11-kit-client.so") && !m.ends_with("opensc-pkcs11.so"))
        );
        assert!(p.module_paths(Some("p11-kit-client"))[0].ends_with("p11-kit-client.so"));
    }

    const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn p11_kit_client_is_chosen_by_module_before_the_forwarded_manufacturer() {
        let p = Profiles::load(None).unwrap();
        let client = Path::new("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so");
        let chosen = p.matching(client, "SoftHSM project", "SoftHSM v2").unwrap();
        assert_eq!(chosen.name, "p11-kit-client");
        assert!(!chosen.read.allowed_mechanisms);
        assert!(chosen.mechanism(Alg::PS256).is_err());
        assert!(chosen.tested_live);
        // The same token through its own module keeps its own profile, and reads
        // CKA_ALLOWED_MECHANISMS.
        let direct = p
            .matching(Path::new(SOFTHSM), "SoftHSM project", "SoftHSM v2")
            .unwrap();
        assert_eq!(direct.name, "softhsm2");
        assert!(direct.read.allowed_mechanisms);
        // A module rule alone never matches another module.
        assert_eq!(
            p.matching(Path::new("/opt/other-client.so"), "Acme", "X")
                .unwrap()
                .name,
            "generic"
        );
    }

    #[test]
    fn documentation_only_profiles_say_so() {
        let p = Profiles::load(None).unwrap();
        for name in [
            "opensc-sc-hsm",
            "aws-cloudhsm",
            "thales-luna",
            "utimaco-cryptoserver",
        ] {
            let profile = p.named(name).unwrap();
            assert!(!profile.tested_live, "{name}");
            assert!(profile.description.contains("documentation"), "{name}");
        }
        for name in ["softhsm2", "tpm2-pkcs11", "generic", "p11-kit-client"] {
            assert!(p.named(name).unwrap().tested_live, "{name}");
        }
    }

    #[test]
    fn a_directory_overrides_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../../hsm-profiles/softhsm2.toml")
            .replace("ES384 = \"ecdsa\"\n", "")
            .replace("description = \"SoftHSM", "description = \"Local SoftHSM");
        std::fs::write(dir.path().join("local.toml"), text).unwrap();
        let p = Profiles::load(Some(dir.path())).unwrap();
        let soft = p.named("softhsm2").unwrap();
        assert!(soft.description.starts_with("Local"));
        assert!(soft.mechanism(Alg::ES384).is_err());
    }

    #[test]
    fn a_mechanism_for_the_wrong_alg_is_refused() {
        let text = include_str!("../../hsm-profiles/generic.toml")
            .replace("RS256 = \"rsa-pkcs\"", "RS256 = \"ecdsa\"");
        let err = parse(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("mechanisms.RS256"), "{err}");
    }

    #[test]
    fn an_unknown_attribute_meaning_is_refused() {
        let text = format!(
            "{}\n[attributes]\nCKA_COLOR = \"blue\"\n",
            include_str!("../../hsm-profiles/generic.toml")
        );
        let err = parse(&text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("attributes: 'CKA_COLOR'"), "{err}");
    }

    #[test]
    fn a_relative_module_path_is_refused() {
        let text = include_str!("../../hsm-profiles/softhsm2.toml")
            .replace("\"/usr/lib/softhsm/libsofthsm2.so\"", "\"libsofthsm2.so\"");
        let err = parse(&text, "x.toml").unwrap_err().to_string();
        assert!(
            err.contains("module.paths: 'libsofthsm2.so' is not an absolute path"),
            "{err}"
        );
    }
}
