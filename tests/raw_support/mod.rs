//! Raw PKCS#11 (cryptoki) on a test's SoftHSM2 token, from the test process: what another
//! tool, or an attacker who can open the token, does to it underneath keybound.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` in `C_Initialize`, and PKCS#11 state is process-global.
//! So every raw PKCS#11 access in a test binary goes through [`with_session`] (logged in)
//! or [`with_public_session`] (read-write, no `C_Login`), which hold one mutex while they
//! point `SOFTHSM2_CONF` at the test's own token, initialise the library, work and finalise
//! it again. keybound itself always runs as a child process with its environment set on
//! the `Command`.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::sync::{Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use p256::elliptic_curve::sec1::ToEncodedPoint;

use crate::support::*;

/// DER OID of the curves, the value of CKA_EC_PARAMS.
pub const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
pub const P384_PARAMS: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Serialises every use of PKCS#11 and of `SOFTHSM2_CONF` in this process.
static PKCS11_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` with a logged-in read-write session on `token`'s SoftHSM2 token.
pub fn with_session<R>(token: &DevToken, f: impl FnOnce(&Session) -> R) -> R {
    session_on(token, true, f)
}

/// Runs `f` with a read-write session on `token` that never logs in: what anyone who can
/// open the token's files can do without the PIN.
pub fn with_public_session<R>(token: &DevToken, f: impl FnOnce(&Session) -> R) -> R {
    session_on(token, false, f)
}

fn session_on<R>(token: &DevToken, login: bool, f: impl FnOnce(&Session) -> R) -> R {
    let _lock = PKCS11_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: the only code in this process that reads the environment
    // outside std's own environment lock is SoftHSM2 (getenv in
    // C_Initialize), and it runs only under PKCS11_LOCK, held here. Other
    // test threads touch the environment only through std (Command), which
    // synchronises with set_var.
    unsafe { std::env::set_var("SOFTHSM2_CONF", token.softhsm_conf()) };
    let pkcs11 = library();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let _finalize = FinalizeOnDrop(pkcs11.clone());
    let slot = pkcs11
        .get_slots_with_token()
        .expect("C_GetSlotList")
        .into_iter()
        .find(|&slot| {
            pkcs11
                .get_token_info(slot)
                .is_ok_and(|info| info.label() == TOKEN_LABEL)
        })
        .expect("the test token is visible");
    let session = pkcs11.open_rw_session(slot).expect("C_OpenSession");
    if login {
        session
            .login(UserType::User, Some(&AuthPin::from(USER_PIN)))
            .expect("C_Login");
    }
    f(&session)
    // Drop order: session (closes it), then C_Finalize, then the lock.
}

/// The SoftHSM2 module, loaded once; initialised only inside a session helper.
fn library() -> Pkcs11 {
    static LIBRARY: OnceLock<Pkcs11> = OnceLock::new();
    LIBRARY
        .get_or_init(|| Pkcs11::new(MODULE).expect("load SoftHSM2"))
        .clone()
}

struct FinalizeOnDrop(Pkcs11);

impl Drop for FinalizeOnDrop {
    fn drop(&mut self) {
        let _ = self.0.clone().finalize();
    }
}

pub fn private_key(session: &Session, label: &str) -> ObjectHandle {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("C_FindObjects");
    assert_eq!(found.len(), 1, "one private key labelled {label}");
    found[0]
}

/// The public-key objects with this CKA_ID.
pub fn public_keys(session: &Session, id: &[u8]) -> Vec<ObjectHandle> {
    session
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Id(id.to_vec()),
        ])
        .expect("C_FindObjects")
}

/// Every object (any class) with this CKA_ID.
pub fn objects_with_id(session: &Session, id: &[u8]) -> Vec<ObjectHandle> {
    session
        .find_objects(&[Attribute::Id(id.to_vec())])
        .expect("C_FindObjects")
}

/// The CKA_ID `keys list --json` reports for `label`.
pub fn key_id(token: &DevToken, label: &str) -> Vec<u8> {
    let listed: serde_json::Value =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).expect("JSON");
    let entry = listed
        .as_array()
        .expect("an array")
        .iter()
        .find(|k| k["label"] == label)
        .unwrap_or_else(|| panic!("keys list lacks {label}: {listed}"));
    hex_decode(entry["id"].as_str().expect("id is hex"))
}

/// CKA_EC_POINT as SoftHSM stores it: a DER OCTET STRING around the uncompressed point.
pub fn p256_ec_point(public: &p256::PublicKey) -> Vec<u8> {
    let point = public.to_encoded_point(false);
    let mut ec_point = vec![0x04, point.len() as u8];
    ec_point.extend_from_slice(point.as_bytes());
    ec_point
}

/// A P-256 public-key object with this label, CKA_ID and CKA_EC_POINT, made with
/// C_CreateObject (so CKA_LOCAL is false).
pub fn create_p256_public(session: &Session, label: &str, id: &[u8], ec_point: Vec<u8>) {
    session
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::EcPoint(ec_point),
        ])
        .expect("C_CreateObject (public key)");
}

/// Imports a P-256 key pair with C_CreateObject (so CKA_LOCAL is false):
/// the private key with the given CKA_SENSITIVE / CKA_EXTRACTABLE, the public
/// key with the same CKA_ID and label.
pub fn import_p256(
    session: &Session,
    label: &str,
    id: &[u8],
    secret: &p256::SecretKey,
    sensitive: bool,
    extractable: bool,
) {
    let private = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Private(true),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(extractable),
        Attribute::Sign(true),
        Attribute::Derive(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::AllowedMechanisms(vec![MechanismType::ECDSA]),
        Attribute::Value(secret.to_bytes().to_vec()),
    ];
    create_p256_public(session, label, id, p256_ec_point(&secret.public_key()));
    session.create_object(&private).expect("create private key");
}

/// C_GenerateKeyPair with the sign-only template of HARDWARE-NOTES, plus
/// `public_extra` / `private_extra` (later attributes win).
pub fn generate_pair(
    session: &Session,
    mechanism: &Mechanism,
    label: &str,
    id: &[u8],
    public_extra: &[Attribute],
    private_extra: &[Attribute],
) {
    let ident = [
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.to_vec()),
    ];
    let mut public = ident.to_vec();
    public.extend([
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
    ]);
    public.extend_from_slice(public_extra);
    let mut private = ident.to_vec();
    let overridden = |t: AttributeType| private_extra.iter().any(|a| a.attribute_type() == t);
    private.extend(
        [
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
        ]
        .into_iter()
        .filter(|a| !overridden(a.attribute_type())),
    );
    private.extend_from_slice(private_extra);
    session
        .generate_key_pair(mechanism, &public, &private)
        .expect("C_GenerateKeyPair");
}

/// A sign-only P-256 pair generated on the token (CKA_LOCAL true on both halves).
pub fn generate_p256(session: &Session, label: &str, id: &[u8]) {
    generate_pair(
        session,
        &Mechanism::EccKeyPairGen,
        label,
        id,
        &[Attribute::EcParams(P256_PARAMS.to_vec())],
        &[Attribute::AllowedMechanisms(vec![MechanismType::ECDSA])],
    );
}
