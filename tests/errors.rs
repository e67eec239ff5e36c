//! Bad input and bad configuration: each must give one `error: ` line on
//! stderr, exit code 1 (2 for command-line usage errors) and never a panic
//! (checked by `run_err` / `assert_error`). Also the config lookup order.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use support::*;

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

#[test]
fn unknown_key_error_lists_known_labels() {
    let token = DevToken::new();
    token.generate("alpha", "ES256");
    token.generate("beta", "ES384");
    let line = token.run_err(&assertion_args("gamma"));
    assert_mentions(&line, &["gamma", "alpha", "beta"]);
    let line = token.run_err(&[
        "dpop", "--key", "gamma", "--method", "GET", "--url", AUDIENCE,
    ]);
    assert_mentions(&line, &["gamma", "alpha", "beta"]);
}

#[test]
fn duplicate_label_is_refused() {
    let token = DevToken::new();
    token.generate("dup", "ES256");
    let line = token.run_err(&["keys", "generate", "--label", "dup", "--alg", "ES384"]);
    assert_mentions(&line, &["dup", "already exists"]);
    let listed: serde_json::Value =
        serde_json::from_str(&token.run_ok(&["keys", "list", "--json"])).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

// ---------------------------------------------------------------------------
// Signing arguments
// ---------------------------------------------------------------------------

#[test]
fn assertion_lifetime_must_be_1_to_3600() {
    let token = DevToken::new();
    token.generate("client", "ES256");
    for lifetime in ["0", "3601", "86400"] {
        let mut args = assertion_args("client").to_vec();
        args.extend(["--lifetime", lifetime]);
        token.run_err(&args);
    }
}

#[test]
fn urls_must_be_absolute_http_or_https() {
    let token = DevToken::new();
    token.generate("client", "ES256");
    for bad in ["/token", "ftp://x/", "token", "mailto:client@example.com"] {
        let args = [
            "assertion",
            "--key",
            "client",
            "--client-id",
            "client",
            "--audience",
            bad,
        ];
        token.run_err(&args);
        token.run_err(&["dpop", "--key", "client", "--method", "POST", "--url", bad]);
    }
}

#[test]
fn usage_errors_exit_2() {
    let token = DevToken::new();
    for args in [
        &["frobnicate"][..],
        &["keys", "generate"],
        &["assertion", "--key", "client", "--audience", AUDIENCE],
        &["dpop", "--key", "client", "--url", AUDIENCE],
    ] {
        assert_exit(&token.keybound(args), 2, &args);
    }
}

// ---------------------------------------------------------------------------
// PIN
// ---------------------------------------------------------------------------

#[test]
fn wrong_pin_is_reported() {
    let token = DevToken::new();
    let out = token
        .command(&["keys", "list"])
        .env(PIN_ENV, "000000")
        .output()
        .unwrap();
    // Refused credentials: EX_NOPERM, not worth a blind retry.
    let line = assert_error_code(&out, 77, &"keys list with a wrong PIN");
    assert_mentions(&line, &["PIN"]);
}

#[test]
fn missing_pin_env_var_is_named() {
    let token = DevToken::new();
    let out = token
        .command(&["keys", "list"])
        .env_remove(PIN_ENV)
        .output()
        .unwrap();
    let line = assert_error(&out, &"keys list without KEYBOUND_PIN");
    assert_mentions(&line, &[PIN_ENV]);
}

#[test]
fn pin_file_must_be_chmod_600() {
    let token = DevToken::new();
    let pin_file = token.write_file("pin", &format!("{USER_PIN}\n"));
    token.write_config(
        &Config {
            pin_line: format!("pin_file = \"{}\"", pin_file.display()),
            ..Config::default()
        }
        .render(),
    );
    // Without KEYBOUND_PIN in the environment, so the PIN can only come
    // from the file.
    let list = || {
        token
            .command(&["keys", "list"])
            .env_remove(PIN_ENV)
            .output()
            .unwrap()
    };

    fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o644)).unwrap();
    let line = assert_error(&list(), &"pin_file with mode 0644");
    assert_mentions(&line, &["chmod 600"]);

    fs::set_permissions(&pin_file, fs::Permissions::from_mode(0o600)).unwrap();
    assert_success(&list(), &"pin_file with mode 0600");
}

// ---------------------------------------------------------------------------
// Module and token
// ---------------------------------------------------------------------------

#[test]
fn missing_module_error_names_the_path_tried() {
    let token = DevToken::new();
    let module = token.path("no-such-pkcs11-module.so");
    let module = module.to_str().unwrap();
    token.write_config(
        &Config {
            module: module.to_owned(),
            ..Config::default()
        }
        .render(),
    );
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &[module]);
}

#[test]
fn unknown_token_label_error_lists_tokens_seen() {
    let token = DevToken::new();
    token.write_config(
        &Config {
            token_label: "no-such-token".to_owned(),
            ..Config::default()
        }
        .render(),
    );
    // A token that is not there may be plugged in later: EX_TEMPFAIL.
    let line = assert_error_code(&token.keybound(&["keys", "list"]), 75, &"keys list");
    assert_mentions(&line, &[TOKEN_LABEL]);
}

// ---------------------------------------------------------------------------
// Configuration file
// ---------------------------------------------------------------------------

#[test]
fn unknown_config_key_is_named() {
    let token = DevToken::new();
    token.write_config(
        &Config {
            extra_token_lines: "bogus = 1".to_owned(),
            ..Config::default()
        }
        .render(),
    );
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &["bogus"]);
}

#[test]
fn config_value_of_wrong_type_is_named() {
    let token = DevToken::new();
    token.write_config(
        &Config {
            sessions: "\"two\"".to_owned(),
            ..Config::default()
        }
        .render(),
    );
    let line = token.run_err(&["keys", "list"]);
    assert_mentions(&line, &["sessions"]);
}

#[test]
fn missing_config_file_is_named() {
    let token = DevToken::new();
    let missing = token.path("missing.toml");
    let out = token
        .command(&["keys", "list"])
        .env("KEYBOUND_CONFIG", &missing)
        .output()
        .unwrap();
    let line = assert_error(&out, &"KEYBOUND_CONFIG names a missing file");
    assert_mentions(&line, &[missing.to_str().unwrap()]);
}

/// `--config FILE`, else `$KEYBOUND_CONFIG`, else
/// `$XDG_CONFIG_HOME/keybound/keybound.toml`; never `./keybound.toml`. A
/// config that would fail (`bogus` key) is placed at each lower-priority
/// location, and in the working directory, to prove it is not read.
#[test]
fn config_lookup_order() {
    let token = DevToken::new();
    token.generate("only-key", "ES256");
    let good = token.config_path();
    let broken_text = Config {
        extra_token_lines: "bogus = 1".to_owned(),
        ..Config::default()
    }
    .render();
    let broken_text = broken_text.as_str();
    let broken = token.write_file("broken.toml", broken_text);
    fs::write(token.path("cwd").join("keybound.toml"), broken_text).unwrap();
    let xdg = token.path("xdg");
    fs::create_dir_all(xdg.join("keybound")).unwrap();
    let lists_key = |out: std::process::Output, what: &str| {
        let text = assert_success(&out, &what);
        assert!(text.contains("only-key"), "{what}: keys list:\n{text}");
    };

    // --config beats $KEYBOUND_CONFIG.
    let out = token
        .command(&["--config", good.to_str().unwrap(), "keys", "list"])
        .env("KEYBOUND_CONFIG", &broken)
        .output()
        .unwrap();
    lists_key(out, "--config over KEYBOUND_CONFIG");

    // $KEYBOUND_CONFIG beats $XDG_CONFIG_HOME...
    fs::write(xdg.join("keybound").join("keybound.toml"), broken_text).unwrap();
    let out = token
        .command(&["keys", "list"])
        .env("XDG_CONFIG_HOME", &xdg)
        .output()
        .unwrap();
    lists_key(out, "KEYBOUND_CONFIG over XDG");

    // ...and $XDG_CONFIG_HOME/keybound/keybound.toml comes last, before the
    // broken ./keybound.toml that is never read.
    let without_env = || {
        token
            .command(&["keys", "list"])
            .env_remove("KEYBOUND_CONFIG")
            .env("XDG_CONFIG_HOME", &xdg)
            .output()
            .unwrap()
    };
    let line = assert_error(&without_env(), &"broken XDG config");
    assert_mentions(&line, &["bogus", xdg.to_str().unwrap()]);
    fs::copy(&good, xdg.join("keybound").join("keybound.toml")).unwrap();
    lists_key(without_env(), "XDG_CONFIG_HOME");
}
