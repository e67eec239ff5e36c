//! Access tokens as secrets: zeroized on drop, `Debug` redacted, logged at most as their
//! first 6 characters and a hash.

use std::fmt;

use sha2::Digest as _;
use zeroize::Zeroizing;

#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }

    /// The one accessor, for the `Authorization` header and `ath`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `eyJhbG…#3f2a9c1b`: enough to tell tokens apart in logs, not to use one.
    pub fn redacted(&self) -> String {
        let head: String = self.0.chars().take(6).collect();
        let hash = sha2::Sha256::digest(self.0.as_bytes());
        format!(
            "{head}…#{:02x}{:02x}{:02x}{:02x}",
            hash[0], hash[1], hash[2], hash[3]
        )
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let s = Secret::new("eyJhbGciOiJFUzI1NiJ9.secret-part".into());
        let d = format!("{s:?}");
        assert!(d.starts_with("Secret(eyJhbG…#"), "{d}");
        assert!(!d.contains("secret-part"));
    }
}
