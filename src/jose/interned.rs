//! Serde for the `&'static str` fields of errors and key facts (attribute names, curve
//! names, backend names) when they cross a process boundary (`token::signer`): each
//! distinct string is kept once for the life of the process, and at most [`CAP`] of them,
//! so a peer that sends ever new strings cannot grow this process's memory.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};

use serde::{Deserialize, Deserializer, Serializer};

/// `&'static str` for fields read with this module: spelt as a path, so serde does not
/// take the field for one borrowed from the input.
pub type Str = &'static str;

/// Distinct strings kept; later ones, and longer ones, read as "(unknown)".
const CAP: usize = 4096;
const MAX_LEN: usize = 128;

/// The one `'static` copy of `s`.
pub fn intern(s: &str) -> &'static str {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(kept) = seen.get(s) {
        return kept;
    }
    if seen.len() >= CAP || s.len() > MAX_LEN {
        return "(unknown)";
    }
    let kept: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.insert(kept);
    kept
}

pub fn serialize<S: Serializer>(s: &&'static str, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<&'static str, D::Error> {
    let s = String::deserialize(de)?;
    Ok(intern(&s))
}

/// `(name, value)` lists whose names are `'static` (a key's attributes and their meanings).
pub mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(
        v: &[(&'static str, T)],
        ser: S,
    ) -> Result<S::Ok, S::Error> {
        ser.collect_seq(v.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        de: D,
    ) -> Result<Vec<(&'static str, T)>, D::Error> {
        let v: Vec<(String, T)> = Vec::deserialize(de)?;
        Ok(v.into_iter().map(|(k, t)| (super::intern(&k), t)).collect())
    }
}

/// `serde_json::Error` as its message.
pub mod json_error {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(e: &serde_json::Error, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(&e.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<serde_json::Error, D::Error> {
        let s = String::deserialize(de)?;
        Ok(<serde_json::Error as serde::de::Error>::custom(s))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_string_is_kept_once() {
        let a = super::intern("CKA_EXTRACTABLE-test");
        let b = super::intern(&String::from("CKA_EXTRACTABLE-test"));
        assert!(std::ptr::eq(a, b));
    }
}
