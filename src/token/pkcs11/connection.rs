//! Module, token and login: `C_Initialize` with `OS_LOCKING_OK`, the token found by label or
//! serial (never slot id), one login kept alive by a long-lived session, re-done after loss.
//!
//! Over 400 lines: opening, login, session loss and recovery share one lock and one
//! generation counter, so they stay in one file.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;

use super::Pkcs11Settings;
use super::errors::{ck, session_lost};
use super::host_lock::{HostGuard, HostLock};
use crate::token::profile::{Profile, Profiles};
use crate::token::trust::{self, Owners};
use crate::token::worker;
use crate::token::{ModuleDescription, Pin, TokenDescription, TokenError};

/// A failure inside a PKCS#11 operation: the device's code (maybe worth a retry on a new
/// session) or keybound's own verdict.
pub(super) enum Pkcs11Failure {
    Ck(Error),
    Token(TokenError),
}

impl From<Error> for Pkcs11Failure {
    fn from(e: Error) -> Self {
        Pkcs11Failure::Ck(e)
    }
}

impl From<TokenError> for Pkcs11Failure {
    fn from(e: TokenError) -> Self {
        Pkcs11Failure::Token(e)
    }
}

impl From<Pkcs11Failure> for TokenError {
    fn from(f: Pkcs11Failure) -> Self {
        match f {
            Pkcs11Failure::Ck(e) => ck(e),
            Pkcs11Failure::Token(e) => e,
        }
    }
}

impl Pkcs11Failure {
    /// Worth one retry on a fresh session.
    pub(super) fn session_lost(&self) -> bool {
        matches!(self, Pkcs11Failure::Ck(e) if session_lost(e))
    }
}

#[derive(Clone, Debug)]
enum Selector {
    Label(String),
    Serial(String),
}

/// A session of one library generation. Opened without close-on-drop: after the library is
/// re-initialised its handle number may belong to someone else's new session, so only a
/// session of the current generation is ever closed (`Connection::discard`).
pub(super) struct Live {
    pub(super) session: Session,
    generation: u64,
}

impl Live {
    /// The library generation this session (and every handle found through it) belongs to.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }
}

/// One token, logged in. Shared by the management session and the signing workers.
pub(super) struct Connection {
    pkcs11: Pkcs11,
    module: PathBuf,
    selector: Selector,
    /// Slot ids can change when a token is re-inserted; re-found on reconnect.
    slot: Mutex<Slot>,
    pin: Pin,
    /// Set once the token rejected the PIN: never try it again, or the token locks.
    pin_rejected: AtomicBool,
    /// The management session. Keeping one session open keeps the login alive (closing the
    /// last session of a process drops it). Never held across a signature.
    keeper: Mutex<Option<Live>>,
    /// Every device call holds this for reading; re-initialising the library holds it for
    /// writing, so no thread is inside the module during `C_Finalize`/`C_Initialize`.
    gate: RwLock<()>,
    /// Bumped by every re-initialisation; sessions of older generations are dead.
    generation: AtomicU64,
    last_recovery: Mutex<Option<Instant>>,
    /// Taken around what reads or rewrites the token's own state (opening, login,
    /// management, finding a key to prove it), so keybound's processes on this host take
    /// turns at it.
    host: HostLock,
    /// This connection's `C_Initialize` succeeded (it did not find the library already
    /// initialised by someone else in the process), so it owes the `C_Finalize`.
    finalize: bool,
    pub(super) profile: Profile,
    pub(super) description: TokenDescription,
}

impl Connection {
    pub(super) fn open(
        settings: &Pkcs11Settings,
        profiles: &Profiles,
    ) -> Result<Connection, TokenError> {
        let selector = match (&settings.token_serial, &settings.token_label) {
            (Some(serial), _) => Selector::Serial(serial.clone()),
            (None, Some(label)) => Selector::Label(label.clone()),
            (None, None) => return Err(TokenError::NoTokenSelector),
        };
        let module = resolve_module(settings, profiles)?;
        let named = named_module(settings, profiles);
        // The profile as far as the module file tells; the token confirms it below.
        let host = HostLock::for_profile(
            named
                .as_deref()
                .and_then(|n| profiles.claiming(settings.profile.as_deref(), n)),
        );
        let opening = host.hold();
        let (pkcs11, finalize, slot, info) = initialize_and_find(&module, &selector)?;
        let profile = match &settings.profile {
            Some(name) => profiles.named(name)?,
            None => profiles.matching(&module, info.manufacturer_id(), info.model())?,
        }
        .clone();
        let clean = |s: &str| crate::token::profile::unpad(s).to_string();
        let library = pkcs11.get_library_info().map_err(ck)?;
        let version = library.library_version();
        // For `slot-description` and `slot-manufacturer` in URIs; a module that cannot
        // say leaves them empty (a URI naming them then does not match).
        let slot_info = pkcs11.get_slot_info(slot).ok();
        let module_description = ModuleDescription {
            paths: named.into_iter().chain([module.clone()]).collect(),
            library_manufacturer: clean(library.manufacturer_id()),
            library_description: clean(library.library_description()),
            library_version: (version.major(), version.minor()),
            pin_file: settings.pin_file.clone(),
            slot_id: slot.id(),
            slot_description: slot_info
                .as_ref()
                .map_or_else(String::new, |i| clean(i.slot_description())),
            slot_manufacturer: slot_info
                .as_ref()
                .map_or_else(String::new, |i| clean(i.manufacturer_id())),
        };
        let description = TokenDescription {
            backend: "pkcs11",
            token_label: clean(info.label()),
            manufacturer: clean(info.manufacturer_id()),
            model: clean(info.model()),
            serial: clean(info.serial_number()),
            profile: profile.name.clone(),
            profile_tested_live: profile.tested_live,
            module: Some(module_description),
        };
        tracing::debug!(module = %module.display(), token = %description.token_label,
            profile = %profile.name, "token found");
        drop(opening);
        let conn = Connection {
            pkcs11,
            module,
            selector,
            slot: Mutex::new(slot),
            pin: Pin::read(&settings.pin_source())?,
            pin_rejected: AtomicBool::new(false),
            keeper: Mutex::new(None),
            gate: RwLock::new(()),
            generation: AtomicU64::new(0),
            last_recovery: Mutex::new(None),
            host,
            finalize,
            profile,
            description,
        };
        // Log in now, so a wrong PIN is reported at start, not at the first signature.
        conn.with_session(|_| Ok(()))?;
        Ok(conn)
    }

    /// Opens a session on the token and logs it in. `rw` for key generation. Never call it
    /// while holding `read()`: it takes the gate itself and may have to re-initialise.
    pub(super) fn open_session(&self, rw: bool) -> Result<Live, TokenError> {
        // A login rewrites SoftHSM's token file.
        let _host = self.host.hold();
        match self.try_open(rw) {
            Err(Error::Pkcs11(
                RvError::SlotIdInvalid
                | RvError::TokenNotPresent
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::GeneralError
                | RvError::CryptokiNotInitialized,
                _,
            )) => {
                // The token went away or came back under another slot id.
                let slot = {
                    let _gate = self.read();
                    find_slot(&self.pkcs11, &self.selector, &self.module)
                };
                match slot {
                    Ok(slot) => *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = slot,
                    Err(_) => self.recover()?,
                }
                self.try_open(rw).map_err(|e| TokenError::Unavailable {
                    reason: ck(e).to_string(),
                })
            }
            Err(e) => Err(ck(e)),
            Ok(live) => Ok(live),
        }
        .and_then(|live| {
            let login = {
                let _gate = self.read();
                self.login(&live.session)
            };
            match login {
                Ok(()) => Ok(live),
                Err(e) => {
                    self.discard(live);
                    Err(e)
                }
            }
        })
    }

    fn try_open(&self, rw: bool) -> Result<Live, Error> {
        let _gate = self.read();
        let slot = *self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let session = if rw {
            self.pkcs11.open_rw_session_no_drop(slot)?
        } else {
            self.pkcs11.open_ro_session_no_drop(slot)?
        };
        Ok(Live {
            session,
            generation: self.generation.load(Ordering::Acquire),
        })
    }

    /// This host's turn at the token (see `host_lock`), for a call outside the connection
    /// that reads the token's object store (finding a key). Take it before `read()`.
    pub(super) fn take_turn(&self) -> HostGuard<'_> {
        self.host.hold()
    }

    /// Held around every call into the module.
    pub(super) fn read(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes a session of the current generation; a stale one is only forgotten.
    pub(super) fn discard(&self, live: Live) {
        let _gate = self.read();
        if live.generation == self.generation.load(Ordering::Acquire) {
            let _ = live.session.close();
        }
    }

    pub(super) fn is_current(&self, live: &Live) -> bool {
        live.generation == self.generation.load(Ordering::Acquire)
    }

    /// When the token does not answer, looks for it again (`recover`) or reports it gone.
    pub(super) fn reconnect_if_gone(&self) -> Result<(), TokenError> {
        if self.probe().is_err() {
            self.recover()?;
        }
        Ok(())
    }

    /// Is the token there? `C_GetTokenInfo` on its slot.
    pub(super) fn probe(&self) -> Result<(), TokenError> {
        // Reads SoftHSM's token file: a read torn by another process's login would look
        // like a token gone, and re-initialise the library for nothing.
        let _host = self.host.hold();
        let _gate = self.read();
        let slot = *self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match self.pkcs11.get_token_info(slot) {
            Ok(info) if info.token_initialized() => Ok(()),
            Ok(_) => Err(TokenError::Unavailable {
                reason: "the token in the slot is not initialised".into(),
            }),
            Err(e) => Err(TokenError::Unavailable {
                reason: ck(e).to_string(),
            }),
        }
    }

    /// Re-initialises the library to find a token that went away (SoftHSM only notices a
    /// restored token directory after `C_Finalize` + `C_Initialize`). At most once a
    /// second; never while this thread holds `read()`.
    pub(super) fn recover(&self) -> Result<(), TokenError> {
        let unavailable = |reason: String| TokenError::Unavailable { reason };
        if !self.finalize {
            return Err(unavailable(
                "the token is gone, and the PKCS#11 library belongs to other code in this process; restart keybound when it is back".into(),
            ));
        }
        {
            let mut last = self
                .last_recovery
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err(unavailable(format!(
                    "token {} is not reachable; keybound looks for it again every second",
                    self.selector
                )));
            }
            *last = Some(Instant::now());
        }
        let _host = self.host.hold();
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        tracing::warn!(token = %self.description.token_label,
            "token unreachable: re-initialising the PKCS#11 library");
        let _ = self.pkcs11.clone().finalize();
        self.generation.fetch_add(1, Ordering::AcqRel);
        match self
            .pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(unavailable(format!("C_Initialize: {}", ck(e)))),
        }
        let slot = find_slot(&self.pkcs11, &self.selector, &self.module)
            .map_err(|e| unavailable(e.to_string()))?;
        // The same token, not another one that carries the label now: keys, URIs (serial=,
        // manufacturer=) and the profile were all judged against the one opened at start.
        let info = token_info(&self.pkcs11, slot).map_err(|e| unavailable(ck(e).to_string()))?;
        let clean = |s: &str| crate::token::profile::unpad(s).to_string();
        let d = &self.description;
        if clean(info.serial_number()) != d.serial
            || clean(info.manufacturer_id()) != d.manufacturer
            || clean(info.model()) != d.model
        {
            return Err(unavailable(format!(
                "token {} is back, but it is another token (serial '{}', was '{}'): keybound \
                 keeps to the token it opened; restart it to use this one",
                self.selector,
                clean(info.serial_number()),
                d.serial
            )));
        }
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = slot;
        tracing::info!(token = %self.description.token_label, "token found again");
        Ok(())
    }

    fn login(&self, session: &Session) -> Result<(), TokenError> {
        let token = || self.description.token_label.clone();
        if self.pin_rejected.load(Ordering::Acquire) {
            return Err(TokenError::PinIncorrect { token: token() });
        }
        match session.login(UserType::User, Some(self.pin.secret())) {
            // One login covers every session of the process.
            Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(Error::Pkcs11(RvError::PinIncorrect, _)) => {
                self.pin_rejected.store(true, Ordering::Release);
                Err(TokenError::PinIncorrect { token: token() })
            }
            Err(Error::Pkcs11(RvError::PinLocked, _)) => {
                self.pin_rejected.store(true, Ordering::Release);
                Err(TokenError::PinLocked { token: token() })
            }
            Err(e) => Err(ck(e)),
        }
    }

    /// Runs `f` on the management session; reopens it and retries once when it was lost,
    /// re-initialising the library first when the token itself is gone.
    pub(super) fn with_session<T>(
        &self,
        mut f: impl FnMut(&Session) -> Result<T, Pkcs11Failure>,
    ) -> Result<T, TokenError> {
        let mut keeper = self.keeper.lock().unwrap_or_else(PoisonError::into_inner);
        // Management reads and writes the token's objects: other processes wait.
        let _host = self.host.hold();
        // A failure carries the session it happened on (`None`: none could be opened, which
        // is not retried); boxed, as failures are rare and large.
        worker::retry_once(
            &mut *keeper,
            |keeper| {
                let live = match keeper.take() {
                    Some(l) if self.is_current(&l) => l,
                    _ => self
                        .open_session(true)
                        .map_err(|e| Box::new((Pkcs11Failure::Token(e), None)))?,
                };
                let result = {
                    let _gate = self.read();
                    f(&live.session)
                };
                match result {
                    Ok(v) => {
                        *keeper = Some(live);
                        Ok(v)
                    }
                    Err(failure) => Err(Box::new((failure, Some(live)))),
                }
            },
            |keeper, failed| {
                let (failure, live) = *failed;
                let Some(live) = live else {
                    return Err(failure.into());
                };
                if !(failure.session_lost() || self.probe().is_err()) {
                    *keeper = Some(live);
                    return Err(failure.into());
                }
                tracing::warn!(token = %self.description.token_label,
                    "management session lost; reopening and logging in again");
                self.discard(live);
                self.reconnect_if_gone()
            },
            |keeper, failed| {
                let (failure, live) = *failed;
                if let Some(live) = live {
                    *keeper = Some(live);
                }
                failure.into()
            },
        )
    }
}

/// Sessions closed, then `C_Finalize`: SoftHSM (with OpenSSL 3) frees its state twice and
/// crashes at process exit when a process ends without it, about one exit in ten under load.
impl Drop for Connection {
    fn drop(&mut self) {
        let keeper = self
            .keeper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(live) = keeper {
            self.discard(live);
        }
        if self.finalize
            && let Err(e) = self.pkcs11.clone().finalize()
        {
            tracing::warn!("C_Finalize failed: {e}");
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Label(l) => write!(f, "labelled '{l}'"),
            Selector::Serial(s) => write!(f, "with serial '{s}'"),
        }
    }
}

/// `token.module`, else the profile's paths, else every profile's: the first that exists.
/// The module to load: the configured one, else the first profile path that exists. It is
/// code that runs with the PIN in memory, so it is loaded only when no other user can
/// change it or a directory above it (resolved through symbolic links, and loaded by its
/// resolved path so that a link swapped later does not matter).
fn resolve_module(settings: &Pkcs11Settings, profiles: &Profiles) -> Result<PathBuf, TokenError> {
    let tried = match &settings.module {
        Some(path) => vec![path.clone()],
        None => profiles.module_paths(settings.profile.as_deref()),
    };
    let found = tried
        .iter()
        .find(|p| p.is_file())
        .ok_or_else(|| TokenError::ModuleNotFound {
            tried: tried.clone(),
        })?;
    let refuse = |reason: String| TokenError::ModuleLoad {
        path: found.clone(),
        reason,
    };
    if !found.is_absolute() {
        return Err(refuse("a module path must be absolute".into()));
    }
    trust::check_path(found, Owners::UserOrRoot).map_err(refuse)
}

/// The module file as the config or the profile names it (before symbolic links are
/// followed), for `pkcs11:` URIs that name it with `module-path`.
fn named_module(settings: &Pkcs11Settings, profiles: &Profiles) -> Option<PathBuf> {
    match &settings.module {
        Some(path) => Some(path.clone()),
        None => profiles
            .module_paths(settings.profile.as_deref())
            .into_iter()
            .find(|p| p.is_file()),
    }
}

/// Loads and initialises the module and finds the token. SoftHSM reads its token files
/// at `C_Initialize`; when another process was rewriting them at that moment (a key
/// generated, a rotation record written by another keybound on the same token), the token
/// is missing, unreadable or has an empty label in this process until it initialises
/// again: so a token not found or `CKR_GENERAL_ERROR` is tried again, three times within
/// about 300 ms, after `C_Finalize`.
fn initialize_and_find(
    module: &std::path::Path,
    selector: &Selector,
) -> Result<(Pkcs11, bool, Slot, cryptoki::slot::TokenInfo), TokenError> {
    let mut tries = 0u64;
    loop {
        let pkcs11 = Pkcs11::new(module).map_err(|e| TokenError::ModuleLoad {
            path: module.to_path_buf(),
            reason: e.to_string(),
        })?;
        let finalize =
            match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) => true,
                // Already initialised in this process (C_Initialize is process-global): whoever
                // did it finalises it.
                Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => false,
                Err(e) => return Err(ck(e)),
            };
        let found = find_slot(&pkcs11, selector, module)
            .and_then(|slot| Ok((slot, token_info(&pkcs11, slot).map_err(ck)?)));
        let passing = match &found {
            // Also a token seen half-read (an empty label): the same moment of rewriting.
            Err(TokenError::TokenNotFound { .. }) => true,
            Err(e) => e.to_string().contains("CKR_GENERAL_ERROR"),
            Ok(_) => false,
        };
        match found {
            Ok((slot, info)) => return Ok((pkcs11, finalize, slot, info)),
            Err(e) if !(passing && finalize && tries < 3) => {
                if finalize {
                    let _ = pkcs11.finalize();
                }
                return Err(e);
            }
            Err(e) => {
                tries += 1;
                tracing::debug!("token not readable yet ({e}); initialising the module again");
                let _ = pkcs11.finalize();
                std::thread::sleep(std::time::Duration::from_millis(50 * tries));
            }
        }
    }
}

/// `C_GetTokenInfo`, tried again a few times on `CKR_GENERAL_ERROR`: SoftHSM answers that
/// while another process rewrites the token's files (a key generated, a rotation record
/// written by another keybound on the same token), and a moment later it reads them fine.
fn token_info(pkcs11: &Pkcs11, slot: Slot) -> Result<cryptoki::slot::TokenInfo, Error> {
    let mut tries = 0;
    loop {
        match pkcs11.get_token_info(slot) {
            Err(Error::Pkcs11(RvError::GeneralError, _)) if tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20 * tries));
            }
            other => return other,
        }
    }
}

fn find_slot(
    pkcs11: &Pkcs11,
    selector: &Selector,
    module: &std::path::Path,
) -> Result<Slot, TokenError> {
    let mut seen = Vec::new();
    for slot in pkcs11.get_slots_with_token().map_err(ck)? {
        let Ok(info) = token_info(pkcs11, slot) else {
            continue;
        };
        let (label, serial) = (info.label().trim(), info.serial_number().trim());
        let fits = match selector {
            Selector::Label(l) => l.trim() == label,
            Selector::Serial(s) => s.trim() == serial,
        };
        if fits && info.token_initialized() {
            return Ok(slot);
        }
        if info.token_initialized() {
            seen.push(format!("'{label}' (serial {serial})"));
        }
    }
    Err(TokenError::TokenNotFound {
        wanted: selector.to_string(),
        module: module.to_path_buf(),
        seen,
    })
}
