//! keybound: OAuth client keys that never leave the hardware. JWS signing input, claims and
//! hashing in software; the private-key operation inside a PKCS#11 token or a TPM.
//! Layers (ARCHITECTURE.md): `jose` pure, `token` hardware, `policy` rules, `oauth` claims
//! and signing, `keyring` ties a key name to a policy-approved signer.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bench;
pub mod config;
pub mod error;
pub mod fault;
pub mod jose;
pub mod keyring;
pub mod oauth;
pub mod policy;
pub mod rotation;
pub mod token;
pub mod trail;
pub mod utc;
