//! Key generation on the token, finding keys, reading their public halves and the facts the
//! policy judges. Nothing here reads, wraps or exports a private key.
//!
//! Over 400 lines: `examine` reads, one attribute at a time, every fact the policy judges.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::connection::{Connection, Pkcs11Failure};
use crate::jose::{Alg, Curve, PublicKey};
use crate::token::profile::{EcPointEncoding, Profile, Usage};
use crate::token::{Fact, KeyFacts, KeyInfo, Label, Listing, Problem, TokenError, hex};

/// Generates a key pair inside the token: private key sensitive, never extractable,
/// sign-only, restricted to the algorithm's mechanisms; public key verify-only.
pub(super) fn generate(
    conn: &Connection,
    label: &Label,
    alg: Alg,
    rsa_bits: u32,
) -> Result<KeyInfo, TokenError> {
    conn.profile.mechanism(alg)?;
    let label = label.as_str();
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
        let id = fresh_id(s, conn.profile.template.id_bytes)?;
        let (mechanism, public, private) = templates(&conn.profile, label, &id, alg, rsa_bits);
        let (_, handle) = s.generate_key_pair(&mechanism, &public, &private)?;
        // The key exists from here on: a failure to read it back must not retry the whole
        // generation (a second key, or "label exists" for the one just made).
        let examined = examine(s, handle, &conn.profile).map_err(|f| {
            Pkcs11Failure::from(TokenError::BadPublicKey {
                label: label.into(),
                reason: format!(
                    "the token generated the key, but reading it back failed ({}); see \
                     `keybound keys list`",
                    TokenError::from(f)
                ),
            })
        })?;
        match examined {
            Examined::Key(info) => Ok(info),
            Examined::Problem(p) => Err(TokenError::BadPublicKey {
                label: label.into(),
                reason: format!("the generated key cannot be read back: {}", p.reason),
            }
            .into()),
            Examined::Skipped => Err(TokenError::BadPublicKey {
                label: label.into(),
                reason: "the generated key cannot be read back".into(),
            }
            .into()),
        }
    })
}

/// Every labelled private key on the token with exactly one readable public key, sorted by
/// label; every other labelled private key as a problem. An object that cannot be read is
/// reported and skipped, so one bad object (planted, copied, malformed) never hides the
/// other keys.
pub(super) fn keys(conn: &Connection) -> Result<Listing, TokenError> {
    conn.with_session(|s| {
        let template = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Token(true),
        ];
        let mut listing = Listing::default();
        for handle in s.find_objects(&template)? {
            match examine(s, handle, &conn.profile) {
                Ok(Examined::Key(info)) => listing.keys.push(info),
                Ok(Examined::Problem(p)) => listing.problems.push(p),
                Ok(Examined::Skipped) => {}
                Err(f) if f.session_lost() => return Err(f),
                Err(f) => {
                    // Only what the object is makes it a problem; a failing device fails
                    // the listing (a key merely unreachable now must not leave a JWKS).
                    let e = TokenError::from(f);
                    if !e.about_the_object() {
                        return Err(e.into());
                    }
                    listing.problems.push(Problem {
                        label: String::new(),
                        id: Vec::new(),
                        reason: format!("a private key object cannot be read: {e}"),
                    });
                }
            }
        }
        // A CKA_ID names one key: several private keys under one id are copies
        // (C_CopyObject) or imports, and keybound cannot tell which one signs.
        let mut shared: Vec<Vec<u8>> = Vec::new();
        for (i, k) in listing.keys.iter().enumerate() {
            if listing.keys[i + 1..].iter().any(|o| o.id == k.id) && !shared.contains(&k.id) {
                shared.push(k.id.clone());
            }
        }
        for id in shared {
            let copies: Vec<KeyInfo> = listing
                .keys
                .iter()
                .filter(|k| k.id == id)
                .cloned()
                .collect();
            listing.keys.retain(|k| k.id != id);
            let labels: Vec<String> = copies.iter().map(|k| format!("'{}'", k.label)).collect();
            listing.problems.push(Problem {
                label: copies[0].label.clone(),
                id: id.clone(),
                reason: format!(
                    "{} private key objects share CKA_ID {} (labels {}): a copy (C_CopyObject) \
                     or an import; keybound cannot tell which one signs. Delete the extras",
                    copies.len(),
                    hex(&id),
                    labels.join(", ")
                ),
            });
        }
        listing.keys.sort_by(|a, b| a.label.cmp(&b.label));
        listing
            .problems
            .sort_by(|a, b| (&a.label, &a.id).cmp(&(&b.label, &b.id)));
        Ok(listing)
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
    let (values, public_local) = conn.with_session(|s| {
        let handle = find_private(s, &key.id, &key.label, &conn.description.token_label)?;
        let types: Vec<AttributeType> = READ.iter().map(|(t, _)| *t).collect();
        // get_attributes leaves out what the token does not report; those stay None.
        let attrs = s.get_attributes(handle, &types)?;
        let public = one_public(s, &key.id, &key.label)?;
        let public_local = s
            .get_attributes(public, &[AttributeType::Local])?
            .iter()
            .find_map(|a| bool_of(a, AttributeType::Local));
        Ok((
            READ.map(|(t, _)| attrs.iter().find_map(|a| bool_of(a, t))),
            public_local,
        ))
    })?;
    let public_fact = Fact {
        value: public_local,
        source: "public CKA_LOCAL",
    };
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
        public_generated_on_device: Some(public_fact),
        can_sign: fact(5),
        needs_login: Some(fact(9)),
        other_usages: vec![fact(6), fact(7), fact(8)],
        attributes: READ
            .iter()
            .zip(values)
            .map(|((_, name), v)| (*name, v))
            .chain([(public_fact.source, public_fact.value)])
            .collect(),
        meanings: READ
            .iter()
            .map(|(_, name)| *name)
            .chain([public_fact.source])
            .filter_map(|name| Some((name, conn.profile.meaning(name)?.to_string())))
            .collect(),
    })
}

/// The one public-key object with this `CKA_ID`. Public objects can be created without the
/// PIN on some tokens (SoftHSM), so a second one is refused, not guessed between.
fn one_public(s: &Session, id: &[u8], label: &str) -> Result<ObjectHandle, Pkcs11Failure> {
    let publics = s.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Id(id.to_vec()),
    ])?;
    match publics.as_slice() {
        [one] => Ok(*one),
        _ => Err(TokenError::Unusable {
            label: label.into(),
            id: hex(id),
            reason: public_count_problem(publics.len(), id),
        }
        .into()),
    }
}

fn public_count_problem(count: usize, id: &[u8]) -> String {
    if count == 0 {
        return format!(
            "no public key object has its CKA_ID {}; keybound cannot publish it. Generate a new key",
            hex(id)
        );
    }
    format!(
        "{count} public key objects share its CKA_ID {}: keybound cannot tell which belongs to \
         the key, and public objects can be created without the PIN. Delete the ones that are \
         not the key's (or the key) and run `keybound keys audit`",
        hex(id)
    )
}

/// The one private-key object with this `CKA_ID`.
pub(super) fn find_private(
    s: &Session,
    id: &[u8],
    label: &str,
    token: &str,
) -> Result<ObjectHandle, Pkcs11Failure> {
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
        Attribute::Label(label.into()),
        Attribute::Id(id.to_vec()),
    ];
    private.extend(usage(
        Usage::AllowedMechanisms,
        Attribute::AllowedMechanisms(allowed_mechanisms(alg)),
    ));
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

/// A random CKA_ID of `len` bytes (the profile's `template.id_bytes`), not all zero (a
/// YubiHSM 2 reads a 2-byte id of 0 as "the device picks"), that no object on the token
/// uses yet.
fn fresh_id(s: &Session, len: usize) -> Result<Vec<u8>, Pkcs11Failure> {
    loop {
        let mut id = vec![0u8; len];
        getrandom::getrandom(&mut id).map_err(|e| TokenError::Rng(e.to_string()))?;
        if id.iter().all(|b| *b == 0) {
            continue;
        }
        if s.find_objects(&[Attribute::Id(id.clone())])?.is_empty() {
            return Ok(id);
        }
    }
}

/// What a private-key object is to keybound.
enum Examined {
    Key(KeyInfo),
    /// A labelled key keybound would use, but cannot: the reason names the attribute.
    Problem(Problem),
    /// Not a keybound key: no label, or a key type or curve keybound does not sign with.
    Skipped,
}

/// Label, id, algorithm and public key of a private-key object, paired with its one
/// public-key object by `CKA_ID`.
fn examine(
    s: &Session,
    handle: ObjectHandle,
    profile: &Profile,
) -> Result<Examined, Pkcs11Failure> {
    let mut wanted = vec![
        AttributeType::Label,
        AttributeType::Id,
        AttributeType::KeyType,
    ];
    // Some modules fail the whole read over this one attribute (see the profile).
    if profile.read.allowed_mechanisms {
        wanted.push(AttributeType::AllowedMechanisms);
    }
    let attrs = s.get_attributes(handle, &wanted)?;
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
        return Ok(Examined::Skipped);
    }
    let problem = |reason: String| {
        Ok(Examined::Problem(Problem {
            label: label.clone(),
            id: id.clone(),
            reason,
        }))
    };
    if !matches!(key_type, Some(KeyType::EC) | Some(KeyType::RSA)) {
        tracing::debug!(%label, "private key of a type keybound does not sign with; skipped");
        return Ok(Examined::Skipped);
    }
    let publics = s.find_objects(&[
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Id(id.clone()),
    ])?;
    let public = match publics.as_slice() {
        [one] => *one,
        _ => return problem(public_count_problem(publics.len(), &id)),
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
                if params.first() == Some(&0x06) {
                    tracing::debug!(%label, "EC key on a curve keybound does not sign with; skipped");
                    return Ok(Examined::Skipped);
                }
                return problem(
                    "its public key object's CKA_EC_PARAMS is not a curve OID; delete the object"
                        .into(),
                );
            };
            let key = match profile.encoding.ec_point {
                EcPointEncoding::DerOrRaw => PublicKey::from_ec_point(curve, &point),
                EcPointEncoding::Der => PublicKey::from_ec_point_der(curve, &point),
                EcPointEncoding::Raw => PublicKey::from_uncompressed(curve, &point),
            };
            match key {
                Ok(key) => (curve.alg(), key),
                Err(e) => {
                    return problem(format!(
                        "its public key object's CKA_EC_POINT is unusable ({e}); delete that \
                         object or the key"
                    ));
                }
            }
        }
        _ => {
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
            match PublicKey::rsa(&n, &e) {
                Ok(key) => (rsa_alg(allowed.as_deref()), key),
                Err(e) => {
                    return problem(format!(
                        "its public key object's CKA_MODULUS/CKA_PUBLIC_EXPONENT are unusable \
                         ({e}); delete that object or the key"
                    ));
                }
            }
        }
    };
    Ok(Examined::Key(KeyInfo {
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
