//! Access tokens as secrets: secrecy's `SecretString`, the one secret type of keybound (the
//! PIN is one too): zeroized on drop, `Debug` redacted, read only through `expose_secret`,
//! and logged at most as [`Redacted::redacted`], their first 6 characters and a hash.

use secrecy::ExposeSecret as _;
pub use secrecy::SecretString;
use sha2::Digest as _;

/// The short form of a secret for logs.
pub trait Redacted {
    /// `eyJhbG…#3f2a9c1b`: enough to tell tokens apart in logs, not to use one.
    fn redacted(&self) -> String;
}

impl Redacted for SecretString {
    fn redacted(&self) -> String {
        let value = self.expose_secret();
        let head: String = value.chars().take(6).collect();
        let hash = sha2::Sha256::digest(value.as_bytes());
        format!(
            "{head}…#{:02x}{:02x}{:02x}{:02x}",
            hash[0], hash[1], hash[2], hash[3]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_token() {
        let s = SecretString::from("eyJhbGciOiJFUzI1NiJ9.secret-part");
        let d = format!("{s:?}");
        assert!(!d.contains("secret-part") && !d.contains("eyJhbG"), "{d}");
        let r = s.redacted();
        assert!(r.starts_with("eyJhbG…#"), "{r}");
        assert!(!r.contains("secret-part"), "{r}");
    }
}
