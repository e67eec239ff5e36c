//! The user PIN: read from an environment variable or a 0600 file, never from argv;
//! zeroized on drop, redacted in `Debug`.

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use secrecy::{ExposeSecret as _, SecretString};

use super::TokenError;

/// Where the PIN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

/// A token PIN. `Debug` prints `[redacted]`; the memory is zeroized on drop.
#[derive(Clone)]
pub struct Pin(SecretString);

impl Pin {
    pub fn read(source: &PinSource) -> Result<Pin, TokenError> {
        match source {
            PinSource::Env(name) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Pin(v.into())),
                _ => Err(TokenError::PinMissing { env: name.clone() }),
            },
            PinSource::File(path) => {
                let err = |reason: String| TokenError::PinFile {
                    path: path.clone(),
                    reason,
                };
                let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(TokenError::PinFilePermissions {
                        path: path.clone(),
                        mode,
                    });
                }
                let text = zeroize::Zeroizing::new(
                    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?,
                );
                let pin = text
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches('\r');
                if pin.is_empty() {
                    return Err(err("the file is empty".into()));
                }
                Ok(Pin(pin.to_string().into()))
            }
        }
    }

    /// The one accessor, for the device login call.
    pub fn secret(&self) -> &SecretString {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.expose_secret().is_empty()
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let pin = Pin("123456".to_string().into());
        assert_eq!(format!("{pin:?}"), "Pin([redacted])");
        assert!(!pin.is_empty());
    }
}
