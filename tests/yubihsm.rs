//! keybound on a YubiHSM 2 through Yubico's PKCS#11 module, tested live against the
//! `yubihsm` crate's MockHsm behind a test connector (tests/yubihsm_support). Every
//! signature is verified with the p256 crate from the published JWK.

mod support;
mod yubihsm_support;

use support::*;
use yubihsm_support::*;

/// `keys generate` on the MockHsm; returns the kid it announces.
fn generate(hsm: &MockYubiHsm, label: &str) -> String {
    let args = ["keys", "generate", "--label", label, "--alg", "ES256"];
    let out = assert_success(&hsm.keybound(&args), &args);
    let line = out.trim_end();
    let prefix = format!("generated ES256 key '{label}' (kid ");
    let suffix = format!(") on token '{YUBIHSM_TOKEN}'");
    let kid = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("unexpected keys generate line {line:?}"));
    kid.to_owned()
}

#[test]
fn generate_probe() {
    let hsm = MockYubiHsm::start();
    let kid = generate(&hsm, "client-auth");
    eprintln!("kid {kid}");
    let out = hsm.keybound(&["keys", "audit"]);
    eprintln!("{}", describe(&out));
}
