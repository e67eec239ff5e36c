//! Key generation on the token, finding keys, reading their public halves and the facts the
//! policy judges. Nothing here reads, wraps or exports a private key.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::connection::{Connection, Failure};
use crate::jose::{Alg, Curve, PublicKey};
use crate::token::profile::{EcPointEncoding, Profile, Usage};
use crate::token::{Fact, KeyFacts, KeyInfo, TokenError};

/// Generates a key pair inside the token: private key sensitive, never extractable,
/// sign-only, restricted to the algorithm's mechanisms; public key verify-only.
pub(super) fn generate(
    conn: &Connection,
    label: &str,
    alg: Alg,
    rsa_bits: u32,
) -> Result<KeyInfo, TokenError> {
    conn.profile.mechanism(alg)?;
    if label.is_empty() || label.starts_with("pkcs11:") {
        return Err(TokenError::BadKeyName {
            name: label.into(),
            reason: "a label must be non-empty and not start with 'pkcs11:'".into(),
        });
    }
    let token = conn.description.token_label.clone();
    conn.with_session(|s| {
        if !s
            .find_objects(&[Attribute::Label(label.into())])?
            .is_empty()
        {
            return Err(TokenError::LabelExists {
                label: label.into(),
                token: token.clone(),
            }
            .into());
        }
        let id = fresh_id(s)?;
        let (mechanism, public, private) = templates(&conn.profile, label, &id, alg, rsa_bits);
        let (_, handle) = s.generate_key_pair(&mechanism, &public, &private)?;
        key_info(s, handle, &conn.profile)?.ok_or_else(|| {
            TokenError::BadPublicKey {
                label: label.into(),
                reason: "the generated key could not be read back".into(),
            }
            .into()
        })
    })
}

/// Every labelled private key on the token with a readable public key, sorted by label.
pub(super) fn keys(conn: &Connection) -> Result<Vec<KeyInfo>, TokenError> {
    conn.with_session(|s| {
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Token(true),
        ];
        let mut out = Vec::new();
        for handle in s.find_objects(&template)? {
            if let Some(info) = key_info(s, handle, &conn.profile)? {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.label.cmp(&b.label));
        Ok(out)
    })
}

/// The attributes of the private key that decide whether it may sign.
pub(super) fn facts(conn: &Connection, key: &KeyInfo) -> Result<KeyFacts, TokenError> {
    const READ: [(AttributeType, &str); 11] = [
        (AttributeType::Extractable, "CKA_EXTRACTABLE"),
        (AttributeType::NeverExtractable, "CKA_NEVER_EXTRACTABLE"),
        (AttributeType::Sensitive, "CKA_SENSITIVE"),
        (AttributeType::AlwaysSensitive, "CKA_ALWAYS_SENSITIVE"),
        (AttributeType::Local, "CKA_LOCAL"),
        (AttributeType::Sign, "CKA_SIGN"),
        (AttributeType::Decrypt, "CKA_DECRYPT"),
        (AttributeType::Unwrap, "CKA_UNWRAP"),
        (AttributeType::Derive, "CKA_DERIVE"),
        (AttributeType::Private, "CKA_PRIVATE"),
        (AttributeType::Token, "CKA_TOKEN"),
    ];
    let values = conn.with_session(|s| {
        let handle = find_private(s, &key.id, &key.label, &conn.description.token_label)?;
        let types: Vec<AttributeType> = READ.iter().map(|(t, _)| *t).collect();
        // get_attributes leaves out what the token does not report; those stay None.
        let attrs = s.get_attributes(handle, &types)?;
        Ok(READ.map(|(t, _)| attrs.iter().find_map(|a| bool_of(a, t))))
    })?;
    let fact = |i: usize| Fact {
        value: values[i],
        source: READ[i].1,
    };
    Ok(KeyFacts {
        extractable: fact(0),
        never_extractable: fact(1),
        sensitive: fact(2),
        always_sensitive: fact(3),
        generated_on_device: fact(4),
        can_sign: fact(5),
        other_usages: vec![fact(6), fact(7), fact(8)],
        attributes: READ
            .iter()
            .zip(values)
            .map(|((_, name), v)| (*name, v))
            .collect(),
    })
}

/// The one private-key object with this `CKA_ID`.
pub(super) fn find_private(
    s: &Session,
    id: &[u8],
    label: &str,
    token: &str,
) -> Result<ObjectHandle, Failure> {
    let template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Token(true),
        Attribute::Id(id.to_vec()),
    ];
    match s.find_objects(&template)?.as_slice() {
        [one] => Ok(*one),
        [] => Err(TokenError::KeyNotFound {
            name: format!("'{label}'"),
            token: token.to_string(),
            known: Vec::new(),
        }
        .into()),
        _ => Err(TokenError::BadPublicKey {
            label: label.into(),
            reason: "several private keys share its CKA_ID; give each key a unique CKA_ID".into(),
        }
        .into()),
    }
}

fn templates(
    profile: &Profile,
    label: &str,
    id: &[u8],
    alg: Alg,
    rsa_bits: u32,
) -> (Mechanism<'static>, Vec<Attribute>, Vec<Attribute>) {
    let usage = |u: Usage, attr: Attribute| (!profile.omits(u)).then_some(attr);
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Label(label.into()),
        Attribute::Id(id.to_vec()),
    ];
    public.extend(usage(Usage::Encrypt, Attribute::Encrypt(false)));
    public.extend(usage(Usage::Wrap, Attribute::Wrap(false)));
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::AllowedMechanisms(allowed_mechanisms(alg)),
        Attribute::Label(label.into()),
        Attribute::Id(id.to_vec()),
    ];
    private.extend(usage(Usage::Decrypt, Attribute::Decrypt(false)));
    private.extend(usage(Usage::Unwrap, Attribute::Unwrap(false)));
    private.extend(usage(Usage::Derive, Attribute::Derive(false)));
    let mechanism = match alg.curve() {
        Some(curve) => {
            public.push(Attribute::EcParams(curve.oid_der().to_vec()));
            Mechanism::EccKeyPairGen
        }
        None => {
            public.push(Attribute::ModulusBits(u64::from(rsa_bits).into()));
            public.push(Attribute::PublicExponent(vec![0x01, 0x00, 0x01]));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    (mechanism, public, private)
}

/// Both ways of making `alg` signatures (software hash or token hash), so a later profile
/// change does not strand keys; nothing else.
fn allowed_mechanisms(alg: Alg) -> Vec<MechanismType> {
    match alg {
        Alg::ES256 => vec![MechanismType::ECDSA, MechanismType::ECDSA_SHA256],
        Alg::ES384 => vec![MechanismType::ECDSA, MechanismType::ECDSA_SHA384],
        Alg::RS256 => vec![MechanismType::RSA_PKCS, MechanismType::SHA256_RSA_PKCS],
        Alg::PS256 => vec![
            MechanismType::RSA_PKCS_PSS,
            MechanismType::SHA256_RSA_PKCS_PSS,
        ],
    }
}

/// A 16-byte random CKA_ID no object on the token uses yet.
fn fresh_id(s: &Session) -> Result<Vec<u8>, Failure> {
    loop {
        let mut id = vec![0u8; 16];
        getrandom::getrandom(&mut id).map_err(|e| TokenError::Pkcs11 {
            function: "getrandom".into(),
            rv: e.to_string(),
            hint: "the operating system's random number generator failed".into(),
        })?;
        if s.find_objects(&[Attribute::Id(id.clone())])?.is_empty() {
            return Ok(id);
        }
    }
}

/// Label, id, algorithm and public key of a private-key object; `None` for objects keybound
/// does not use (no label, no public key object, unsupported key type).
fn key_info(
    s: &Session,
    handle: ObjectHandle,
    profile: &Profile,
) -> Result<Option<KeyInfo>, Failure> {
    let attrs = s.get_attributes(
        handle,
        &[
            AttributeType::Label,
            AttributeType::Id,
            AttributeType::KeyType,
            AttributeType::AllowedMechanisms,
        ],
    )?;
    let (mut label, mut id, mut key_type, mut allowed) = (String::new(), Vec::new(), None, None);
    for a in attrs {
        match a {
            Attribute::Label(l) => label = String::from_utf8_lossy(&l).trim().to_string(),
            Attribute::Id(i) => id = i,
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::AllowedMechanisms(m) => allowed = Some(m),
            _ => {}
        }
    }
    if label.is_empty() {
        return Ok(None);
    }
    let publics = s.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Id(id.clone()),
    ])?;
    let Some(public) = publics.first().copied() else {
        tracing::warn!(%label, "private key has no public key object with the same CKA_ID; skipped");
        return Ok(None);
    };
    let bad = |reason: String| -> Failure {
        TokenError::BadPublicKey {
            label: label.clone(),
            reason,
        }
        .into()
    };
    let (alg, key) = match key_type {
        Some(KeyType::EC) => {
            let attrs =
                s.get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])?;
            let (mut params, mut point) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::EcParams(p) => params = p,
                    Attribute::EcPoint(p) => point = p,
                    _ => {}
                }
            }
            let Some(curve) = Curve::from_oid_der(&params) else {
                tracing::warn!(%label, "EC key on a curve keybound does not sign with; skipped");
                return Ok(None);
            };
            let key = match profile.encoding.ec_point {
                EcPointEncoding::DerOrRaw => PublicKey::from_ec_point(curve, &point),
                EcPointEncoding::Der => PublicKey::from_ec_point_der(curve, &point),
                EcPointEncoding::Raw => PublicKey::from_uncompressed(curve, &point),
            }
            .map_err(|e| bad(e.to_string()))?;
            (curve.alg(), key)
        }
        Some(KeyType::RSA) => {
            let attrs = s.get_attributes(
                public,
                &[AttributeType::Modulus, AttributeType::PublicExponent],
            )?;
            let (mut n, mut e) = (Vec::new(), Vec::new());
            for a in attrs {
                match a {
                    Attribute::Modulus(v) => n = v,
                    Attribute::PublicExponent(v) => e = v,
                    _ => {}
                }
            }
            let key = PublicKey::rsa(&n, &e).map_err(|e| bad(e.to_string()))?;
            (rsa_alg(allowed.as_deref()), key)
        }
        _ => return Ok(None),
    };
    Ok(Some(KeyInfo {
        label,
        id,
        alg,
        public: key,
    }))
}

/// An RSA key restricted to PSS mechanisms is a PS256 key; any other is RS256.
fn rsa_alg(allowed: Option<&[MechanismType]>) -> Alg {
    let pss = [
        MechanismType::RSA_PKCS_PSS,
        MechanismType::SHA256_RSA_PKCS_PSS,
    ];
    match allowed {
        Some(m) if !m.is_empty() && m.iter().all(|m| pss.contains(m)) => Alg::PS256,
        _ => Alg::RS256,
    }
}

fn bool_of(a: &Attribute, t: AttributeType) -> Option<bool> {
    let v = match (a, t) {
        (Attribute::Extractable(v), AttributeType::Extractable)
        | (Attribute::NeverExtractable(v), AttributeType::NeverExtractable)
        | (Attribute::Sensitive(v), AttributeType::Sensitive)
        | (Attribute::AlwaysSensitive(v), AttributeType::AlwaysSensitive)
        | (Attribute::Local(v), AttributeType::Local)
        | (Attribute::Sign(v), AttributeType::Sign)
        | (Attribute::Decrypt(v), AttributeType::Decrypt)
        | (Attribute::Unwrap(v), AttributeType::Unwrap)
        | (Attribute::Derive(v), AttributeType::Derive)
        | (Attribute::Private(v), AttributeType::Private)
        | (Attribute::Token(v), AttributeType::Token) => v,
        _ => return None,
    };
    Some(*v)
}
