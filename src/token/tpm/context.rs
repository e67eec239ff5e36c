//! The TPM context: one `tss_esapi::Context` (every call takes `&mut`), owned by the one
//! thread of a `token::worker` and reached through its queue of jobs (`jobs`); answers come
//! back by callback, as from the PKCS#11 workers. The worker also owns what is loaded in the
//! TPM: the storage primary and at most one signing key, kept while jobs are queued back to
//! back and flushed as soon as the queue is empty, after any failure, and before the worker
//! ends. A bare TPM or swtpm has about three object slots; nothing keybound loads outlives a
//! burst of work. (Over 400 lines: the context and what is loaded through it are one type,
//! each step of loading and releasing next to the state it changes.)
//!
//! A TPM that goes away (swtpm restarted, device busy, daemon down) costs the request that
//! hit it one retry on a fresh context; if that fails too the error is reported and the
//! next request connects again. keybound never needs a restart for it.

use std::collections::HashSet;

use tss_esapi::constants::tss::TPM2_PT_MANUFACTURER;
use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Auth, CapabilityData};
use tss_esapi::{Context, TctiNameConf};

use super::errors::{Recovery, Tag as _, TpmFailure};
use super::key_management::primary_template;
use super::store::StoredKey;
use crate::error::ErrorKind;
use crate::token::worker;
use crate::token::{Pin, TokenError};

/// What the worker owns: the context and the objects loaded through it.
pub(super) struct Tpm {
    tcti: TctiNameConf,
    /// The TCTI as configured, for messages.
    pub(super) tcti_text: String,
    primary_handle: Option<u32>,
    key_auth: Option<Pin>,
    ctx: Option<Context>,
    primary: Option<Primary>,
    loaded: Option<Loaded>,
    /// Keys whose auth value the TPM refused: never sent again (dictionary-attack lockout).
    refused: HashSet<Vec<u8>>,
}

/// The storage key every keybound key lives under.
struct Primary {
    handle: KeyHandle,
    name: Vec<u8>,
    /// Created by keybound (flushed when released) or a persistent object (only its ESYS
    /// handle is closed).
    transient: bool,
}

/// The one signing key currently loaded.
struct Loaded {
    id: Vec<u8>,
    handle: KeyHandle,
}

impl Tpm {
    pub(super) fn new(
        tcti: TctiNameConf,
        tcti_text: String,
        primary_handle: Option<u32>,
        key_auth: Option<Pin>,
    ) -> Tpm {
        Tpm {
            tcti,
            tcti_text,
            primary_handle,
            key_auth,
            ctx: None,
            primary: None,
            loaded: None,
            refused: HashSet::new(),
        }
    }

    /// Runs one operation; when it fails because the TPM restarted or the connection broke,
    /// retries it once on a fresh context. Whatever a failed attempt loaded is flushed
    /// before the error is returned.
    pub(super) fn retrying<T>(
        &mut self,
        op: impl FnMut(&mut Tpm) -> Result<T, TpmFailure>,
    ) -> Result<T, TokenError> {
        worker::retry_once(
            self,
            op,
            |t, failure| match t.after_failure(&failure) {
                Recovery::Reconnect | Recovery::Reload => {
                    tracing::info!(tcti = %t.tcti_text,
                        "TPM request failed ({}); retrying once", failure.summary());
                    Ok(())
                }
                _ => Err(failure.into_token_error(&t.tcti_text)),
            },
            |t, failure| {
                t.after_failure(&failure);
                failure.into_token_error(&t.tcti_text)
            },
        )
    }

    /// Flushes what a failed attempt loaded, drops a broken connection, and says what the
    /// failure calls for.
    fn after_failure(&mut self, failure: &TpmFailure) -> Recovery {
        let recovery = failure.recovery();
        self.release();
        if recovery == Recovery::Reconnect {
            self.ctx = None;
        }
        recovery
    }

    /// The ESAPI context, connected on first use.
    pub(super) fn ctx(&mut self) -> Result<&mut Context, TpmFailure> {
        let ctx = match self.ctx.take() {
            Some(ctx) => ctx,
            None => Context::new(self.tcti.clone()).tag("TCTI/ESYS initialisation")?,
        };
        Ok(self.ctx.insert(ctx))
    }

    /// The storage primary's handle and name: created from the fixed template (the TPM
    /// derives the same key from the same template every time), or the persistent object
    /// at `token.primary_handle`, made there on first use.
    pub(super) fn primary(&mut self) -> Result<(KeyHandle, Vec<u8>), TpmFailure> {
        if let Some(p) = &self.primary {
            return Ok((p.handle, p.name.clone()));
        }
        match self.primary_handle {
            None => self.create_primary()?,
            Some(handle) => self.persistent_primary(handle)?,
        }
        match &self.primary {
            Some(p) => Ok((p.handle, p.name.clone())),
            None => Err(internal("the storage key was not recorded")),
        }
    }

    fn create_primary(&mut self) -> Result<(), TpmFailure> {
        let template = primary_template().tag("building the storage key template")?;
        let ctx = self.ctx()?;
        let created = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .tag("TPM2_CreatePrimary")?;
        tracing::debug!("TPM2_CreatePrimary");
        // Recorded before anything else can fail, so `release` flushes it.
        self.primary = Some(Primary {
            handle: created.key_handle,
            name: Vec::new(),
            transient: true,
        });
        let name = self
            .ctx()?
            .tr_get_name(created.key_handle.into())
            .tag("Esys_TR_GetName")?;
        if let Some(p) = &mut self.primary {
            p.name = name.value().to_vec();
        }
        Ok(())
    }

    fn persistent_primary(&mut self, handle: u32) -> Result<(), TpmFailure> {
        let persistent = PersistentTpmHandle::new(handle).tag("parsing token.primary_handle")?;
        let tpm_handle = TpmHandle::Persistent(persistent);
        let ctx = self.ctx()?;
        let (found, _) = ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, handle, 1))
            .tag("TPM2_GetCapability")?;
        let exists =
            matches!(found, CapabilityData::Handles(list) if list.first() == Some(&tpm_handle));
        if !exists {
            tracing::info!("no storage key at {handle:#x}; creating and persisting one");
            self.create_primary()?;
            let (transient, _) = self.primary()?;
            let ctx = self.ctx()?;
            let mut evicted = ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.evict_control(
                        Provision::Owner,
                        transient.into(),
                        Persistent::Persistent(persistent),
                    )
                })
                .tag("TPM2_EvictControl")?;
            ctx.tr_close(&mut evicted).tag("Esys_TR_Close")?;
            self.release();
        }
        let ctx = self.ctx()?;
        let object = ctx
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
            .tag("Esys_TR_FromTPMPublic")?;
        self.primary = Some(Primary {
            handle: object.into(),
            name: Vec::new(),
            transient: false,
        });
        let ctx = self.ctx()?;
        let (public, name, _) = ctx
            .execute_without_session(|c| c.read_public(object.into()))
            .tag("TPM2_ReadPublic")?;
        let a = public.object_attributes();
        if !(a.restricted() && a.decrypt() && !a.sign_encrypt() && a.fixed_tpm()) {
            return Err(TokenError::Tpm {
                function: "TPM2_ReadPublic".into(),
                code: format!("the object at {handle:#x} is not a storage key"),
                meaning: "keybound's keys need a restricted decryption key that never leaves \
                          the TPM as their parent"
                    .into(),
                hint: "point token.primary_handle at a storage key (SRK), or at a free handle \
                       keybound can fill"
                    .into(),
                kind: ErrorKind::Configuration,
                about_the_object: false,
            }
            .into());
        }
        if let Some(p) = &mut self.primary {
            p.name = name.value().to_vec();
        }
        Ok(())
    }

    /// Loads `key` under the primary, or returns it if it is the one loaded. Loading needs
    /// only the primary's (empty) auth; the key's own auth value is for signing
    /// (`authorize`).
    pub(super) fn load(&mut self, key: &StoredKey) -> Result<KeyHandle, TpmFailure> {
        if let Some(l) = &self.loaded {
            if l.id == key.id {
                return Ok(l.handle);
            }
            self.flush_loaded();
        }
        let (parent, parent_name) = self.primary()?;
        if let Some(recorded) = &key.parent
            && *recorded != parent_name
        {
            return Err(TokenError::TpmKey {
                label: key.label.clone(),
                reason: "it was created under another storage key than this TPM's: the TPM \
                         was cleared, or the state directory comes from another machine. The \
                         key cannot be recovered; generate a new one"
                    .into(),
            }
            .into());
        }
        let (private, public) = (key.private.clone(), key.public.clone());
        let ctx = self.ctx()?;
        let handle = ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(parent, private, public)
            })
            .tag("TPM2_Load")?;
        self.loaded = Some(Loaded {
            id: key.id.clone(),
            handle,
        });
        tracing::debug!(key = %key.label, "TPM2_Load");
        Ok(handle)
    }

    /// Gives ESYS the auth value for using the loaded `key` (nothing for keys without one).
    pub(super) fn authorize(
        &mut self,
        key: &StoredKey,
        handle: KeyHandle,
    ) -> Result<(), TpmFailure> {
        if let Some(auth) = self.auth_for(key)? {
            self.ctx()?
                .tr_set_auth(handle.into(), auth)
                .tag("Esys_TR_SetAuth")?;
        }
        Ok(())
    }

    /// The auth value to use with `key`, checked before anything is sent to the TPM.
    fn auth_for(&self, key: &StoredKey) -> Result<Option<Auth>, TpmFailure> {
        if !key.auth {
            return Ok(None);
        }
        let refuse = |reason: &str| -> TpmFailure {
            TokenError::TpmKey {
                label: key.label.clone(),
                reason: reason.into(),
            }
            .into()
        };
        if self.refused.contains(&key.id) {
            return Err(TokenError::KeyAuthRefused {
                label: key.label.clone(),
            }
            .into());
        }
        match self.auth_value()? {
            Some(auth) => Ok(Some(auth)),
            None => Err(refuse(
                "it was created with an auth value; set token.key_auth_env or \
                 token.key_auth_file",
            )),
        }
    }

    /// The configured key auth value, in the TPM's form.
    pub(super) fn auth_value(&self) -> Result<Option<Auth>, TpmFailure> {
        let Some(pin) = &self.key_auth else {
            return Ok(None);
        };
        use secrecy::ExposeSecret as _;
        let bytes = pin.secret().expose_secret().as_bytes();
        // TPM 2.0 Part 1 §19.6.4: an auth value is at most as long as the name's digest.
        if bytes.len() > 32 {
            return Err(TokenError::TpmKey {
                label: "(any)".into(),
                reason: format!(
                    "the key auth value is {} bytes; a TPM takes at most 32 (the SHA-256 digest size)",
                    bytes.len()
                ),
            }
            .into());
        }
        Ok(Some(Auth::try_from(bytes).tag("the key auth value")?))
    }

    /// Remembers that the TPM refused `key`'s auth value.
    pub(super) fn refuse(&mut self, key: &StoredKey) {
        self.refused.insert(key.id.clone());
    }

    /// Flushes the loaded signing key, if any.
    fn flush_loaded(&mut self) {
        if let Some(loaded) = self.loaded.take()
            && let Some(ctx) = self.ctx.as_mut()
            && let Err(e) = ctx.flush_context(loaded.handle.into())
        {
            tracing::debug!("TPM2_FlushContext of a signing key failed: {e}");
            // The connection is suspect; a fresh context starts clean.
            self.ctx = None;
        }
    }

    /// Flushes every transient object keybound loaded. After a failed flush the context is
    /// dropped: the next request starts on a new one.
    pub(super) fn release(&mut self) {
        self.flush_loaded();
        let Some(primary) = self.primary.take() else {
            return;
        };
        let Some(ctx) = self.ctx.as_mut() else {
            return;
        };
        let result = if primary.transient {
            ctx.flush_context(primary.handle.into())
        } else {
            let mut handle = ObjectHandle::from(primary.handle);
            ctx.tr_close(&mut handle)
        };
        if let Err(e) = result {
            tracing::debug!("releasing the storage key failed: {e}");
            self.ctx = None;
        }
    }

    /// One cheap command that must reach the TPM (tss-esapi caches properties, so
    /// `get_tpm_property` would not).
    pub(super) fn ping(&mut self) -> Result<(), TpmFailure> {
        self.ctx()?
            .execute_without_session(|c| {
                c.get_capability(CapabilityType::TpmProperties, TPM2_PT_MANUFACTURER, 1)
            })
            .tag("TPM2_GetCapability")?;
        Ok(())
    }

    /// Manufacturer, vendor string and firmware version, as the TPM reports them.
    pub(super) fn identity(&mut self) -> Result<(String, String), TpmFailure> {
        let ctx = self.ctx()?;
        let mut read = |tag: PropertyTag| -> Result<u32, TpmFailure> {
            Ok(ctx
                .get_tpm_property(tag)
                .tag("TPM2_GetCapability")?
                .unwrap_or(0))
        };
        let manufacturer = ascii(&[read(PropertyTag::Manufacturer)?]);
        let vendor = ascii(&[
            read(PropertyTag::VendorString1)?,
            read(PropertyTag::VendorString2)?,
            read(PropertyTag::VendorString3)?,
            read(PropertyTag::VendorString4)?,
        ]);
        let (v1, v2) = (
            read(PropertyTag::FirmwareVersion1)?,
            read(PropertyTag::FirmwareVersion2)?,
        );
        // Firmware versions are vendor-defined words; shown raw, as tpm2_getcap does.
        let model = format!(
            "{} (firmware {v1:#010x} {v2:#010x})",
            if vendor.is_empty() {
                "TPM 2.0"
            } else {
                &vendor
            },
        );
        Ok((manufacturer, model))
    }
}

/// TPM property words as text: 4 ASCII bytes each, NULs and padding dropped.
fn ascii(words: &[u32]) -> String {
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

fn internal(what: &str) -> TpmFailure {
    TokenError::Tpm {
        function: "keybound".into(),
        code: "internal error".into(),
        meaning: what.into(),
        hint: String::new(),
        kind: ErrorKind::Device,
        about_the_object: false,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_words_read_as_text() {
        assert_eq!(ascii(&[0x49424d00]), "IBM");
        assert_eq!(ascii(&[0x53572020, 0x2054504d, 0, 0]), "SW   TPM");
    }
}
