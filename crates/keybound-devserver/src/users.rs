//! The in-memory user directory behind the users API: Okta-shaped users with deterministic
//! ids and names, so tests can assert on them.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// Who the generated users are; after the list, names repeat with a numbered login.
const PEOPLE: [(&str, &str); 16] = [
    ("Ada", "Lovelace"),
    ("Alan", "Turing"),
    ("Grace", "Hopper"),
    ("Katherine", "Johnson"),
    ("Edsger", "Dijkstra"),
    ("Barbara", "Liskov"),
    ("Donald", "Knuth"),
    ("Margaret", "Hamilton"),
    ("Dennis", "Ritchie"),
    ("Frances", "Allen"),
    ("John", "McCarthy"),
    ("Radia", "Perlman"),
    ("Ken", "Thompson"),
    ("Hedy", "Lamarr"),
    ("Claude", "Shannon"),
    ("Annie", "Easley"),
];

const ID_ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The users, in creation order (the order of the list and of its cursor).
#[derive(Debug)]
pub struct Directory {
    users: Vec<User>,
}

/// An Okta user object (the members the dev-server keeps).
#[derive(Clone, Debug, Serialize)]
pub struct User {
    pub id: String,
    pub status: &'static str,
    pub created: String,
    pub profile: Profile,
    #[serde(rename = "_links")]
    pub links: Links,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub login: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Links {
    #[serde(rename = "self")]
    pub self_: Href,
}

#[derive(Clone, Debug, Serialize)]
pub struct Href {
    pub href: String,
}

/// A partial profile update: `{"profile":{"firstName"?: string, "lastName"?: string}}`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProfilePatch {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// A list page cursor that names no user.
#[derive(Debug)]
pub struct UnknownCursor;

impl Directory {
    /// `count` users; `users_url` is the collection URL for `_links.self`.
    pub fn generate(count: usize, users_url: &str) -> Directory {
        let users = (0..count)
            .map(|i| {
                let (first, last) = PEOPLE[i % PEOPLE.len()];
                let round = i / PEOPLE.len();
                let number = if round == 0 {
                    String::new()
                } else {
                    (round + 1).to_string()
                };
                let login = format!(
                    "{}.{}{number}@example.com",
                    first.to_lowercase(),
                    last.to_lowercase()
                );
                let id = user_id(i);
                User {
                    links: Links {
                        self_: Href {
                            href: format!("{users_url}/{id}"),
                        },
                    },
                    id,
                    status: "ACTIVE",
                    created: format!("2026-01-{:02}T00:00:00.000Z", i % 28 + 1),
                    profile: Profile {
                        first_name: first.into(),
                        last_name: last.into(),
                        email: login.clone(),
                        login,
                    },
                }
            })
            .collect();
        Directory { users }
    }

    /// Up to `limit` users after the one with id `after`; and whether more remain.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<User>, bool), UnknownCursor> {
        let start = match after {
            None => 0,
            Some(id) => {
                self.users
                    .iter()
                    .position(|u| u.id == id)
                    .ok_or(UnknownCursor)?
                    + 1
            }
        };
        let rest = self.users.get(start..).unwrap_or_default();
        let page = rest.iter().take(limit).cloned().collect();
        Ok((page, rest.len() > limit))
    }

    /// By id, or by login as Okta also allows.
    pub fn get(&self, id_or_login: &str) -> Option<User> {
        self.find(id_or_login).cloned()
    }

    pub fn update(&mut self, id_or_login: &str, patch: ProfilePatch) -> Option<User> {
        let user = self.find_mut(id_or_login)?;
        if let Some(first) = patch.first_name {
            user.profile.first_name = first;
        }
        if let Some(last) = patch.last_name {
            user.profile.last_name = last;
        }
        Some(user.clone())
    }

    fn find(&self, id_or_login: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.id == id_or_login || u.profile.login == id_or_login)
    }

    fn find_mut(&mut self, id_or_login: &str) -> Option<&mut User> {
        self.users
            .iter_mut()
            .find(|u| u.id == id_or_login || u.profile.login == id_or_login)
    }
}

impl ProfilePatch {
    /// Parses the update body strictly: a `profile` object and nothing else, holding only
    /// string `firstName` / `lastName`. `None` when the body is not well-formed.
    pub fn parse(body: &[u8]) -> Option<ProfilePatch> {
        let Value::Object(doc) = serde_json::from_slice::<Value>(body).ok()? else {
            return None;
        };
        if doc.len() != 1 {
            return None;
        }
        let profile = doc.get("profile")?.as_object()?;
        let mut patch = ProfilePatch::default();
        for (name, value) in profile {
            let value = value.as_str()?.to_string();
            match name.as_str() {
                "firstName" => patch.first_name = Some(value),
                "lastName" => patch.last_name = Some(value),
                _ => return None,
            }
        }
        Some(patch)
    }

    /// Okta refuses blank names; the member that is blank, if any.
    pub fn blank_member(&self) -> Option<&'static str> {
        let blank = |v: &Option<String>| v.as_deref().is_some_and(|s| s.trim().is_empty());
        if blank(&self.first_name) {
            Some("firstName")
        } else if blank(&self.last_name) {
            Some("lastName")
        } else {
            None
        }
    }
}

/// A deterministic Okta-style user id: `00u` and 16 alphanumerics.
fn user_id(index: usize) -> String {
    let digest = Sha256::digest(format!("keybound dev-server user {index}").as_bytes());
    let tail: String = digest
        .iter()
        .take(16)
        .map(|b| char::from(ID_ALPHABET[usize::from(*b) % ID_ALPHABET.len()]))
        .collect();
    format!("00u{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_deterministic_and_paged() {
        let dir = Directory::generate(7, "http://127.0.0.1:1/api/v1/users");
        let again = Directory::generate(7, "http://127.0.0.1:1/api/v1/users");
        assert_eq!(dir.users[3].id, again.users[3].id);
        assert_eq!(dir.users[0].profile.login, "ada.lovelace@example.com");
        assert_eq!(dir.users[2].created, "2026-01-03T00:00:00.000Z");
        assert_eq!(dir.users[0].id.len(), 19);

        let (first, more) = dir.page(None, 3).unwrap();
        assert_eq!(first.len(), 3);
        assert!(more);
        let (last, more) = dir.page(Some(&dir.users[3].id), 3).unwrap();
        assert_eq!(last.len(), 3);
        assert!(!more);
        let (empty, more) = dir.page(Some(&dir.users[6].id), 3).unwrap();
        assert!(empty.is_empty() && !more);
        assert!(dir.page(Some("00unknown"), 3).is_err());

        let many = Directory::generate(20, "u");
        assert_eq!(many.users[16].profile.login, "ada.lovelace2@example.com");
    }

    #[test]
    fn patches_are_strict() {
        assert_eq!(
            ProfilePatch::parse(br#"{"profile":{"firstName":"Augusta"}}"#),
            Some(ProfilePatch {
                first_name: Some("Augusta".into()),
                last_name: None
            })
        );
        for bad in [
            &br#"{"profile":{"firstName":1}}"#[..],
            br#"{"profile":{"email":"x@example.com"}}"#,
            br#"{"profile":"x"}"#,
            br#"{"firstName":"x"}"#,
            br#"{"profile":{},"credentials":{}}"#,
            br#"{"profile":"#,
            b"[]",
        ] {
            assert_eq!(
                ProfilePatch::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
