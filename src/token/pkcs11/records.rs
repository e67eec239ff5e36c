//! Rotation records as PKCS#11 data objects on the token, next to the keys they describe,
//! so every agent that shares the token reads the same record (ARCHITECTURE.md, key life
//! cycle). Each record is one `CKO_DATA` object: `CKA_TOKEN` and `CKA_PRIVATE` true (read
//! only after login), not modifiable, `CKA_APPLICATION` "keybound rotation", `CKA_LABEL`
//! "keybound rotation: <slot>", `CKA_VALUE` the record's bytes. A record is never edited
//! in place: a new one is created, then the old one destroyed, so a crash leaves one of
//! the two whole (the keyring reads the newest). And destroying a key generation: its
//! private and public objects.

use cryptoki::error::{Error, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::connection::{Connection, Pkcs11Failure};
use crate::token::{KeyInfo, TokenError};

const APPLICATION: &[u8] = b"keybound rotation";

/// A record's attributes, searched by and created with. `CKA_PRIVATE` among them: SoftHSM
/// lets a session that never logged in create public data objects, and a record planted so
/// (a well-formed one naming another key active, or garbage that breaks the slot) must
/// never be read.
fn template(slot: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Application(APPLICATION.to_vec()),
        Attribute::Label(format!("keybound rotation: {slot}").into_bytes()),
    ]
}

fn values(s: &Session, slot: &str) -> Result<Vec<(ObjectHandle, Vec<u8>)>, Pkcs11Failure> {
    let mut out = Vec::new();
    for handle in s.find_objects(&template(slot))? {
        let attributes = match s.get_attributes(handle, &[AttributeType::Value]) {
            // Another agent sharing the token removed it (an old record) since the search.
            Err(Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
            found => found?,
        };
        let value = attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            })
            .unwrap_or_default();
        out.push((handle, value));
    }
    Ok(out)
}

/// Every record of `slot` on the token, in no order.
pub(super) fn records(conn: &Connection, slot: &str) -> Result<Vec<Vec<u8>>, TokenError> {
    conn.with_session(|s| Ok(values(s, slot)?.into_iter().map(|(_, v)| v).collect()))
}

/// Adds a record of `slot`.
pub(super) fn put(conn: &Connection, slot: &str, bytes: &[u8]) -> Result<(), TokenError> {
    conn.with_session(|s| {
        let mut attributes = template(slot);
        attributes.extend([
            Attribute::Modifiable(false),
            Attribute::Value(bytes.to_vec()),
        ]);
        s.create_object(&attributes)?;
        Ok(())
    })
}

/// Destroys the records of `slot` whose bytes are `bytes`.
pub(super) fn remove(conn: &Connection, slot: &str, bytes: &[u8]) -> Result<(), TokenError> {
    conn.with_session(|s| {
        for (handle, value) in values(s, slot)? {
            if value == bytes {
                match s.destroy_object(handle) {
                    // Removed by another agent meanwhile: gone either way.
                    Err(Error::Pkcs11(RvError::ObjectHandleInvalid, _)) => {}
                    done => done?,
                }
            }
        }
        Ok(())
    })
}

/// Destroys the key's private object and its public object (by `CKA_ID`, with the label
/// checked, so an object of another key is never touched).
pub(super) fn destroy(conn: &Connection, key: &KeyInfo) -> Result<(), TokenError> {
    conn.with_session(|s| {
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for handle in s.find_objects(&[
                Attribute::Class(class),
                Attribute::Id(key.id().to_vec()),
                Attribute::Label(key.label().as_bytes().to_vec()),
            ])? {
                s.destroy_object(handle)?;
            }
        }
        Ok(())
    })
}
