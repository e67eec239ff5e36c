//! The pure layers against the RFC vectors in tests/vectors/rfc-vectors.json, byte for byte.
//! Signatures are checked with the `p256` crate, which keybound itself does not use to sign.

use keybound::jose::{self, Alg, Header, Jwk, PublicKey};
use keybound::oauth::dpop;
use p256::ecdsa::signature::Verifier;
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("vectors/rfc-vectors.json")).expect("vectors are JSON")
}

fn public_key(jwk: &Value) -> PublicKey {
    // The RFC 7638 example carries alg and kid: keep only the key members.
    let mut jwk: Jwk = serde_json::from_value(jwk.clone()).expect("a JWK");
    (jwk.alg, jwk.kid, jwk.use_) = (None, None, None);
    PublicKey::from_jwk(&jwk).expect("a valid public JWK")
}

#[test]
fn rfc7638_rsa_thumbprint() {
    let v = &vectors()["rfc7638_rsa_thumbprint"];
    let key = public_key(&v["jwk"]);
    assert_eq!(
        key.thumbprint_input(),
        v["canonical_json"].as_str().unwrap()
    );
    assert_eq!(key.thumbprint(), v["thumbprint"].as_str().unwrap());
}

#[test]
fn rfc9449_ec_thumbprint() {
    let v = &vectors()["rfc9449_ec_thumbprint"];
    let key = public_key(&v["jwk"]);
    assert_eq!(
        key.thumbprint_input(),
        v["canonical_json"].as_str().unwrap()
    );
    assert_eq!(key.thumbprint(), v["thumbprint"].as_str().unwrap());
}

#[test]
fn rfc9449_example_proof_verifies() {
    let v = &vectors()["rfc9449_example_proof"];
    let decoded = jose::decode(v["compact"].as_str().unwrap()).unwrap();
    assert_eq!(decoded.header, v["header"]);
    assert_eq!(decoded.claims, v["claims"]);

    let header: Header = serde_json::from_value(decoded.header.clone()).unwrap();
    assert_eq!(header.alg, Alg::ES256);
    assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
    let jwk = header.jwk.expect("a DPoP header carries its jwk");
    let key = PublicKey::from_jwk(&jwk).unwrap();
    let PublicKey::Ec { x, y, .. } = &key else {
        panic!("the example key is EC")
    };
    let point = p256::EncodedPoint::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    let vk = p256::ecdsa::VerifyingKey::from_encoded_point(&point).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&decoded.signature).unwrap();
    vk.verify(decoded.signing_input.as_bytes(), &sig)
        .expect("the RFC 9449 example proof verifies");
    // The JWK keybound would put in a header round-trips to the same members.
    assert_eq!(key.jwk(), jwk);
    assert_eq!(
        key.thumbprint(),
        vectors()["rfc9449_ec_thumbprint"]["thumbprint"]
            .as_str()
            .unwrap()
    );
}

#[test]
fn rfc9449_example_claims_rebuild_byte_for_byte() {
    let v = &vectors()["rfc9449_example_proof"];
    let c = &v["claims"];
    let claims = dpop::claims(
        c["htm"].as_str().unwrap(),
        c["htu"].as_str().unwrap(),
        None,
        None,
        c["iat"].as_u64().unwrap(),
        c["jti"].as_str().unwrap().into(),
    )
    .unwrap();
    let compact = v["compact"].as_str().unwrap();
    let payload = compact.split('.').nth(1).unwrap();
    assert_eq!(jose::b64(serde_json::to_vec(&claims).unwrap()), payload);
}

#[test]
fn rfc9449_ath() {
    let v = &vectors()["rfc9449_ath"];
    assert_eq!(
        dpop::ath(v["access_token"].as_str().unwrap()),
        v["ath"].as_str().unwrap()
    );
}

#[test]
fn rfc9449_htu_cases() {
    for case in vectors()["rfc9449_htu"]["cases"].as_array().unwrap() {
        assert_eq!(
            dpop::htu(case["request"].as_str().unwrap()).unwrap(),
            case["htu"].as_str().unwrap(),
            "{case}"
        );
    }
}

#[test]
fn ec_point_encodings_are_both_accepted() {
    let v = &vectors()["rfc9449_ec_thumbprint"];
    let key = public_key(&v["jwk"]);
    let PublicKey::Ec { curve, x, y } = &key else {
        panic!("EC")
    };
    let mut raw = vec![0x04];
    raw.extend(x);
    raw.extend(y);
    let mut der = vec![0x04, raw.len() as u8];
    der.extend(&raw);
    assert_eq!(PublicKey::from_ec_point(*curve, &raw).unwrap(), key);
    assert_eq!(PublicKey::from_ec_point(*curve, &der).unwrap(), key);
    assert!(PublicKey::from_ec_point(*curve, &der[..40]).is_err());
}
