//! The non-extractable rules: from the facts a backend reports about a key, a verdict with
//! reasons. Pure. A key that is or ever was extractable, is not sensitive, or was imported
//! does not sign.

use serde::{Deserialize, Serialize};

use crate::token::{Fact, KeyFacts};

/// `[policy]` in the config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Relaxes only the imported-key rule; extractable or readable keys stay refused.
    #[serde(default)]
    pub danger_allow_imported_keys: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warn,
    Fail,
}

/// One reason, naming the device attribute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub attribute: &'static str,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub findings: Vec<Finding>,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("key '{label}' may not sign: {reasons}")]
    Refused { label: String, reasons: String },
}

impl PolicyError {
    /// keybound's own key policy refused: [`ErrorKind::Refused`](crate::error::ErrorKind).
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            PolicyError::Refused { .. } => crate::error::ErrorKind::Refused,
        }
    }
}

const REGENERATE: &str = "generate a new key on the device with `keybound keys generate`";

/// Judges a key.
pub fn evaluate(facts: &KeyFacts, rules: &Rules) -> Verdict {
    let mut findings = Vec::new();
    // An imported key was, by definition, once outside the device and readable there, so
    // the token reports it as neither never-extractable nor always-sensitive. Accepting
    // imported keys accepts exactly that history: it is reported, not refused.
    let imported_and_allowed =
        rules.danger_allow_imported_keys && facts.generated_on_device.value == Some(false);
    // `forgivable`: the fact records import history, which an allowed import explains.
    // What the attribute means on this device, where its profile says (a YubiHSM 2's
    // CKA_EXTRACTABLE is its exportable-under-wrap capability).
    let on_device = |fact: &Fact| {
        facts
            .meaning(fact.source)
            .map_or_else(String::new, |m| format!(" ({m})"))
    };
    let mut require = |fact: &Fact, want: bool, forgivable: bool, meaning: &str| match fact.value {
        Some(v) if v == want => {}
        Some(v) if imported_and_allowed && forgivable => findings.push(warn(
            fact,
            format!(
                "{}={v}{}: {meaning} (it was imported)",
                fact.source,
                on_device(fact)
            ),
        )),
        Some(v) => findings.push(fail(
            fact,
            format!(
                "{}={v}{}: {meaning}; {REGENERATE}",
                fact.source,
                on_device(fact)
            ),
        )),
        None => findings.push(fail(
            fact,
            format!(
                "the token did not report {}, so keybound cannot prove the key stays on the device",
                fact.source
            ),
        )),
    };
    require(
        &facts.extractable,
        false,
        false,
        "the key can be exported from the device",
    );
    // Worded for both readings: PKCS#11's history, or (a YubiHSM 2) the state now.
    require(
        &facts.never_extractable,
        true,
        true,
        "the key is or was extractable, so copies may exist",
    );
    require(
        &facts.sensitive,
        true,
        false,
        "the private key value can be read",
    );
    require(
        &facts.always_sensitive,
        true,
        true,
        "the private key value is or was readable",
    );
    require(
        &facts.can_sign,
        true,
        false,
        "the key is not allowed to sign",
    );
    match facts.needs_login {
        Some(Fact {
            value: Some(true), ..
        })
        | None => {}
        Some(login @ Fact { value: Some(v), .. }) => findings.push(fail(
            &login,
            format!(
                "{}={v}: the key can be used without logging in, so anyone who can open the \
                 token signs with it (and SoftHSM lets anyone create such a key without the \
                 PIN); {REGENERATE}",
                login.source
            ),
        )),
        Some(login @ Fact { value: None, .. }) => findings.push(fail(
            &login,
            format!(
                "the token did not report {}, so keybound cannot tell that the key needs \
                 the login to be used",
                login.source
            ),
        )),
    }

    let origin = &facts.generated_on_device;
    if origin.value != Some(true) {
        let what = match origin.value {
            Some(v) => format!(
                "{}={v}{}: the key was imported, so it existed outside the device",
                origin.source,
                on_device(origin)
            ),
            None => format!(
                "the token did not report {}, so the key may have been imported",
                origin.source
            ),
        };
        findings.push(if rules.danger_allow_imported_keys {
            warn(
                origin,
                format!("{what}; allowed by policy.danger_allow_imported_keys"),
            )
        } else {
            fail(
                origin,
                format!(
                    "{what}; {REGENERATE}, or accept the risk with policy.danger_allow_imported_keys = true"
                ),
            )
        });
    }
    // A public-key object made apart from the key (C_CreateObject: some tokens, SoftHSM
    // among them, allow it without the PIN). The keyring's proof of possession decides
    // whether it belongs to the key; this only reports its history.
    if let Some(public) = &facts.public_generated_on_device
        && public.value != Some(true)
    {
        let what = match public.value {
            Some(v) => format!("{}={v}", public.source),
            None => format!("{} not reported", public.source),
        };
        findings.push(warn(
            public,
            format!(
                "{what}: the public key object was not generated on the device with the key \
                 (it was created or replaced later, which some tokens allow without the PIN); \
                 keybound publishes it only after the device proves it holds the matching \
                 private key"
            ),
        ));
    }
    for usage in facts.other_usages.iter().filter(|f| f.value == Some(true)) {
        findings.push(warn(
            usage,
            format!(
                "{}=true: the key may also be used for more than signing; keybound generates sign-only keys",
                usage.source
            ),
        ));
    }
    Verdict { findings }
}

impl Verdict {
    pub fn outcome(&self) -> Outcome {
        match self.findings.iter().map(|f| f.severity).max() {
            None => Outcome::Pass,
            Some(Severity::Warn) => Outcome::Warn,
            Some(Severity::Fail) => Outcome::Fail,
        }
    }

    pub fn allows_signing(&self) -> bool {
        self.outcome() != Outcome::Fail
    }

    /// The refusal for a key that may not sign; `None` if it may.
    pub fn refusal(&self, label: &str) -> Option<PolicyError> {
        let reasons: Vec<&str> = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Fail)
            .map(|f| f.message.as_str())
            .collect();
        (!reasons.is_empty()).then(|| PolicyError::Refused {
            label: label.into(),
            reasons: reasons.join("; "),
        })
    }
}

fn fail(fact: &Fact, message: String) -> Finding {
    Finding {
        severity: Severity::Fail,
        attribute: fact.source,
        message,
    }
}

fn warn(fact: &Fact, message: String) -> Finding {
    Finding {
        severity: Severity::Warn,
        attribute: fact.source,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(value: Option<bool>, source: &'static str) -> Fact {
        Fact { value, source }
    }

    fn good() -> KeyFacts {
        KeyFacts {
            extractable: fact(Some(false), "CKA_EXTRACTABLE"),
            never_extractable: fact(Some(true), "CKA_NEVER_EXTRACTABLE"),
            sensitive: fact(Some(true), "CKA_SENSITIVE"),
            always_sensitive: fact(Some(true), "CKA_ALWAYS_SENSITIVE"),
            generated_on_device: fact(Some(true), "CKA_LOCAL"),
            public_generated_on_device: Some(fact(Some(true), "public CKA_LOCAL")),
            can_sign: fact(Some(true), "CKA_SIGN"),
            needs_login: Some(fact(Some(true), "CKA_PRIVATE")),
            other_usages: vec![fact(Some(false), "CKA_DECRYPT")],
            attributes: vec![],
            meanings: vec![],
        }
    }

    #[test]
    fn a_device_born_sign_only_key_passes() {
        let v = evaluate(&good(), &Rules::default());
        assert_eq!(v.outcome(), Outcome::Pass);
        assert!(v.refusal("k").is_none());
    }

    /// A key usable without the PIN (`CKA_PRIVATE=false`, which SoftHSM lets a session that
    /// never logged in generate) fails, imported keys allowed or not; a device without the
    /// attribute (a TPM) is not judged on it.
    #[test]
    fn a_key_usable_without_login_is_refused_even_with_the_danger_switch() {
        let mut f = good();
        f.needs_login = Some(fact(Some(false), "CKA_PRIVATE"));
        for danger_allow_imported_keys in [false, true] {
            let rules = Rules {
                danger_allow_imported_keys,
            };
            let v = evaluate(&f, &rules);
            assert_eq!(v.outcome(), Outcome::Fail, "{v:?}");
            assert!(format!("{v:?}").contains("CKA_PRIVATE=false"), "{v:?}");
        }
        f.needs_login = Some(fact(None, "CKA_PRIVATE"));
        assert_eq!(evaluate(&f, &Rules::default()).outcome(), Outcome::Fail);
        f.needs_login = None;
        assert_eq!(evaluate(&f, &Rules::default()).outcome(), Outcome::Pass);
    }

    #[test]
    fn extractable_is_refused_even_with_the_danger_switch() {
        let mut f = good();
        f.extractable.value = Some(true);
        f.never_extractable.value = Some(false);
        let rules = Rules {
            danger_allow_imported_keys: true,
        };
        let v = evaluate(&f, &rules);
        assert_eq!(v.outcome(), Outcome::Fail);
        let msg = v.refusal("k").unwrap().to_string();
        assert!(msg.contains("CKA_EXTRACTABLE=true"), "{msg}");
        assert!(msg.contains("CKA_NEVER_EXTRACTABLE=false"), "{msg}");
    }

    #[test]
    fn imported_keys_need_the_danger_switch() {
        let mut f = good();
        // What a token reports for a key imported as sensitive and non-extractable.
        f.generated_on_device.value = Some(false);
        f.never_extractable.value = Some(false);
        f.always_sensitive.value = Some(false);
        let v = evaluate(&f, &Rules::default());
        assert_eq!(v.outcome(), Outcome::Fail);
        assert!(
            v.refusal("k")
                .unwrap()
                .to_string()
                .contains("CKA_LOCAL=false")
        );
        let v = evaluate(
            &f,
            &Rules {
                danger_allow_imported_keys: true,
            },
        );
        assert_eq!(v.outcome(), Outcome::Warn, "{:?}", v.findings);
        assert!(v.allows_signing());
        // The switch never covers a key born on the device that was once extractable.
        let mut f = good();
        f.never_extractable.value = Some(false);
        let allow = Rules {
            danger_allow_imported_keys: true,
        };
        assert_eq!(evaluate(&f, &allow).outcome(), Outcome::Fail);
    }

    #[test]
    fn unreported_facts_fail_and_extra_usages_warn() {
        let mut f = good();
        f.sensitive.value = None;
        assert_eq!(evaluate(&f, &Rules::default()).outcome(), Outcome::Fail);
        let mut f = good();
        f.other_usages[0].value = Some(true);
        assert_eq!(evaluate(&f, &Rules::default()).outcome(), Outcome::Warn);
    }

    #[test]
    fn findings_name_what_the_attribute_means_on_the_device() {
        let mut f = good();
        f.extractable.value = Some(true);
        f.never_extractable.value = Some(false);
        f.meanings = vec![(
            "CKA_EXTRACTABLE",
            "YubiHSM 2: the exportable-under-wrap capability".into(),
        )];
        let msg = evaluate(&f, &Rules::default())
            .refusal("k")
            .unwrap()
            .to_string();
        assert!(
            msg.contains(
                "CKA_EXTRACTABLE=true (YubiHSM 2: the exportable-under-wrap capability): \
                 the key can be exported"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("CKA_NEVER_EXTRACTABLE=false: the key is or was extractable"),
            "{msg}"
        );
    }

    #[test]
    fn a_public_object_made_apart_from_the_key_is_reported() {
        let mut f = good();
        f.public_generated_on_device = Some(fact(Some(false), "public CKA_LOCAL"));
        let v = evaluate(&f, &Rules::default());
        assert_eq!(v.outcome(), Outcome::Warn);
        assert_eq!(v.findings[0].attribute, "public CKA_LOCAL");
        f.public_generated_on_device = None;
        assert_eq!(evaluate(&f, &Rules::default()).outcome(), Outcome::Pass);
    }
}
