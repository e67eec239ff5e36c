//! Who may ask: `[[agent.allow]]` rules matched against the caller's peer credentials
//! (SO_PEERCRED: uid, gid, pid of the connecting process).

use serde::Deserialize;

/// The connecting process, from the socket's peer credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// One `[[agent.allow]]` entry. A field left out places no limit on that dimension.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub clients: Option<Vec<String>>,
    pub keys: Option<Vec<String>>,
    pub htu_prefixes: Option<Vec<String>>,
    pub max_assertion_lifetime: Option<u64>,
}

/// The rules in force: the configured ones, or "the agent's own uid, unrestricted".
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    own_uid: u32,
}

impl Policy {
    pub fn new(rules: Vec<Rule>, own_uid: u32) -> Result<Policy, String> {
        for (i, r) in rules.iter().enumerate() {
            if r.uid.is_none() && r.gid.is_none() {
                return Err(format!("agent.allow[{i}]: set uid or gid"));
            }
        }
        let rules = if rules.is_empty() {
            vec![Rule {
                uid: Some(own_uid),
                ..Rule::default()
            }]
        } else {
            rules
        };
        Ok(Policy { rules, own_uid })
    }

    /// The first rule naming the caller's uid, else the first naming its gid.
    pub fn rule_for(&self, peer: &Peer) -> Result<&Rule, String> {
        self.rules
            .iter()
            .find(|r| r.uid == Some(peer.uid))
            .or_else(|| {
                self.rules
                    .iter()
                    .find(|r| r.uid.is_none() && r.gid == Some(peer.gid))
            })
            .ok_or_else(|| {
                format!(
                    "uid {} (gid {}) is not allowed to use this agent; add an [[agent.allow]] rule (without rules only uid {} may)",
                    peer.uid, peer.gid, self.own_uid
                )
            })
    }
}

impl Rule {
    pub fn check_client(&self, name: &str) -> Result<(), String> {
        allowed(&self.clients, name, "client")
    }

    pub fn check_key(&self, name: &str) -> Result<(), String> {
        allowed(&self.keys, name, "key")
    }

    pub fn check_htu(&self, htu: &str) -> Result<(), String> {
        match &self.htu_prefixes {
            Some(p) if !p.iter().any(|p| htu.starts_with(p.as_str())) => Err(format!(
                "htu '{htu}' is outside this caller's htu_prefixes ({})",
                p.join(", ")
            )),
            _ => Ok(()),
        }
    }
}

fn allowed(list: &Option<Vec<String>>, name: &str, what: &str) -> Result<(), String> {
    match list {
        Some(l) if !l.iter().any(|x| x == name || x == "*") => Err(format!(
            "{what} '{name}' is not allowed for this caller (allowed: {})",
            l.join(", ")
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_own_uid_only() {
        let p = Policy::new(vec![], 1000).unwrap();
        let me = Peer {
            uid: 1000,
            gid: 5,
            pid: None,
        };
        let other = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
        };
        assert!(p.rule_for(&me).is_ok());
        assert!(p.rule_for(&other).unwrap_err().contains("65534"));
    }

    #[test]
    fn rules_limit_clients_keys_and_htu() {
        let r = Rule {
            gid: Some(50),
            keys: Some(vec!["dpop".into()]),
            htu_prefixes: Some(vec!["https://o.example/".into()]),
            ..Rule::default()
        };
        let p = Policy::new(vec![r], 0).unwrap();
        let rule = p
            .rule_for(&Peer {
                uid: 7,
                gid: 50,
                pid: None,
            })
            .unwrap();
        assert!(rule.check_key("dpop").is_ok());
        assert!(rule.check_key("client-auth").is_err());
        assert!(rule.check_client("any").is_ok());
        assert!(rule.check_htu("https://o.example/api").is_ok());
        assert!(rule.check_htu("https://evil.example/").is_err());
        assert!(Policy::new(vec![Rule::default()], 0).is_err());
    }
}
