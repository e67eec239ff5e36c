//! The user PIN: read from an environment variable or a 0600 file, never from argv;
//! zeroized on drop, redacted in `Debug`. The file must be a regular file (not a symbolic
//! link, not a FIFO) that the effective user owns, in directories no other user can write.

use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use secrecy::{ExposeSecret as _, SecretString};

use super::TokenError;
use super::trust::{self, Owners};

/// Where the PIN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

/// A PIN file is a PIN and a newline, not a document.
const MAX_PIN_FILE: usize = 4096;

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
                // The opened file is what is checked and read: no symbolic link, no FIFO
                // to block on, and no window in which the name could point elsewhere.
                let (file, meta) = trust::open_regular(path, true).map_err(err)?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(TokenError::PinFilePermissions {
                        path: path.clone(),
                        mode,
                    });
                }
                trust::check_file(path, &meta, Owners::User).map_err(err)?;
                trust::check_dirs_of(path, &meta).map_err(err)?;
                // Room for the whole read up front: a growing String would leave copies of
                // the PIN behind in freed memory that Zeroizing never sees.
                let mut text = zeroize::Zeroizing::new(String::with_capacity(MAX_PIN_FILE + 1));
                file.take(MAX_PIN_FILE as u64 + 1)
                    .read_to_string(&mut text)
                    .map_err(|e| err(e.to_string()))?;
                if text.len() > MAX_PIN_FILE {
                    return Err(err(format!(
                        "it is longer than {MAX_PIN_FILE} bytes; it must hold only the PIN"
                    )));
                }
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
