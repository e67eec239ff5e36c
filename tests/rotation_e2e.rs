//! A whole rotation of the client-authentication key (prepare → activate with proof →
//! retire → destroy) while a client keeps fetching tokens, against the dev-server in both
//! of Okta's modes: keys pasted into the app (`--jwks FILE`, rewritten by the test as the
//! admin would), and keys fetched from a URL (`--jwks-uri`, the JWKS `keybound serve`
//! hosts). Across the rotation no token request fails; an assertion signed with the old
//! key before the switch verifies until the old key is retired, and is refused after.
//! Activation is refused while the server does not know the new key.
//!
//! The client is `keybound token` run again and again (each run a fresh token request
//! that resolves the slot anew, as separate processes do). Step durations and the token
//! counts are printed (`--nocapture`) for the notes; nothing asserts how long anything
//! took. Loops are bounded; timeouts only guard against hangs.

mod agent_support;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use agent_support::*;
use serde_json::{Value, json};
use support::*;

/// `keybound token --client dev` in a loop on its own thread until stopped.
struct TokenLoop {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u32, Vec<String>)>,
}

impl TokenLoop {
    fn start(token: &DevToken, config: &Path) -> TokenLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, config) = (stop.clone(), config.to_owned());
        let mut cmd = token.command(&["--config"]);
        cmd.arg(&config)
            .args(["token", "--client", "dev", "--json"]);
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
        let envs: Vec<_> = cmd
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
            .collect();
        let dir = cmd.get_current_dir().map(Path::to_owned);
        let handle = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !flag.load(Ordering::SeqCst) {
                let mut c = std::process::Command::new(&program);
                c.args(&args);
                for (k, v) in &envs {
                    match v {
                        Some(v) => c.env(k, v),
                        None => c.env_remove(k),
                    };
                }
                if let Some(d) = &dir {
                    c.current_dir(d);
                }
                let out = c.output().expect("run keybound token");
                if out.status.success() {
                    ok += 1;
                } else {
                    failed.push(describe(&out));
                }
            }
            (ok, failed)
        });
        TokenLoop { stop, handle }
    }

    /// Stops it and returns (tokens fetched, failures).
    fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("token loop")
    }
}

fn config_with(token: &DevToken, name: &str, extra: &str) -> std::path::PathBuf {
    let text = format!("{}{extra}", Config::default().render());
    token.write_file(name, &text)
}

/// A client assertion signed now by the slot's active key, kept for later ("in flight").
fn presigned_assertion(token: &DevToken, config: &Path, endpoint: &str) -> Jws {
    let out = token.keybound(&[
        "--config".as_ref(),
        config.as_os_str(),
        "assertion".as_ref(),
        "--key".as_ref(),
        "client-auth".as_ref(),
        "--client-id".as_ref(),
        DEV_CLIENT_ID.as_ref(),
        "--audience".as_ref(),
        endpoint.as_ref(),
        "--lifetime".as_ref(),
        "600".as_ref(),
    ]);
    Jws::parse(assertion_text(&out).trim())
}

fn assertion_text(out: &std::process::Output) -> String {
    assert_success(out, &"keybound assertion")
}

/// Does the dev-server accept `assertion`? It checks the assertion (consuming its `jti`)
/// before the DPoP nonce, so a `use_dpop_nonce` answer to a proof without a nonce means
/// the assertion verified; `invalid_client` means it was refused.
async fn server_accepts(token: &DevToken, config: &Path, endpoint: &str, assertion: &Jws) -> bool {
    let out = token.keybound(&[
        "--config".as_ref(),
        config.as_os_str(),
        "dpop".as_ref(),
        "--key".as_ref(),
        "dpop".as_ref(),
        "--method".as_ref(),
        "POST".as_ref(),
        "--url".as_ref(),
        endpoint.as_ref(),
    ]);
    let proof = assert_success(&out, &"keybound dpop");
    let form = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.compact.as_str()),
        ("scope", "okta.users.read"),
    ];
    let reply = reqwest::Client::builder()
        .no_proxy()
        .timeout(GUARD)
        .build()
        .unwrap()
        .post(endpoint)
        .header("DPoP", proof.trim())
        .form(&form)
        .send()
        .await
        .expect("POST the token endpoint");
    let status = reply.status().as_u16();
    let body: Value =
        serde_json::from_slice(&reply.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
    let kid = assertion.header["kid"].as_str().unwrap_or_default();
    match (status, body["error"].as_str()) {
        (400, Some("use_dpop_nonce")) => true,
        (401, Some("invalid_client"))
            if body["error_description"]
                .as_str()
                .is_some_and(|d| d.contains(kid)) =>
        {
            false
        }
        other => panic!("unexpected answer {other:?}: {body}"),
    }
}

/// Polls `check` until it returns `want` (bounded).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..120 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{what}: not within the guard");
}

fn kid_of_line(out: &str, marker: &str) -> String {
    out.split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{out}"))
        .trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .to_string()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Pasted,
    Url,
}

async fn whole_rotation(mode: Mode) {
    let token = DevToken::new();
    let old_kid = token.generate("client-auth", "ES256");
    token.generate("dpop", "ES256");
    // The admin's copy of the app's keys (paste mode), or the agent hosting them (URL).
    let pasted = token.write_file(
        "app-keys.json",
        &json!({ "keys": token.jwks(&["client-auth"]) }).to_string(),
    );
    let dir = SocketDir::new();
    let agent = match mode {
        Mode::Pasted => None,
        Mode::Url => {
            token.write_config(&format!(
                "{}[jwks]\nlisten = \"127.0.0.1:0\"\nkeys = [\"client-auth\"]\nmax_age_secs = 1\nrefresh_secs = 1\n",
                Config::default().render()
            ));
            Some(Agent::start(&token, &dir.socket()))
        }
    };
    let hosted: Option<String> = agent.as_ref().map(|agent| {
        agent
            .log()
            .lines()
            .find_map(|l| l.strip_prefix("keybound JWKS on "))
            .expect("the agent's JWKS URL")
            .to_owned()
    });
    let server = DevServer::start_with(DEV_CLIENT_ID, &pasted, |s| {
        if let Some(url) = &hosted {
            s.jwks = keybound_devserver::JwksSource::Uri(url.parse().expect("url"));
            s.jwks_refetch_interval = 0;
        }
    });
    let endpoint = format!("{}/oauth2/v1/token", server.base);
    let cli = config_with(
        &token,
        "client.toml",
        &format!(
            "{}[rotation]\nretire_after = \"2s\"\n",
            dev_client(&server.base)
        ),
    );
    let run = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = vec!["--config".as_ref(), cli.as_os_str()];
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        let start = Instant::now();
        let out = token.keybound(&all);
        (out, start.elapsed())
    };
    let paste = || {
        // What the admin does with the JWKS `keybound jwks` prints.
        let (out, _) = run(&["jwks"]);
        let jwks = assert_success(&out, &"keybound jwks");
        std::fs::write(&pasted, jwks).expect("paste the JWKS");
    };
    // Assertions signed before the switch, each usable once (the server consumes its jti).
    let in_flight: Vec<Jws> = (0..12)
        .map(|_| presigned_assertion(&token, &cli, &endpoint))
        .collect();
    assert_eq!(in_flight[0].header["kid"], old_kid.as_str());

    let tokens = TokenLoop::start(&token, &cli);
    let mut steps = Vec::new();

    // 1. Prepare.
    let (out, took) = run(&["keys", "rotate", "--label", "client-auth"]);
    let printed = assert_success(&out, &"keys rotate");
    steps.push(("prepare", took));
    let new_kid = kid_of_line(&printed, "kid ");
    assert_ne!(new_kid, old_kid);
    assert_mentions(
        &printed,
        &["client-auth#2", "Use a URL", "nothing to do", "Save keys"],
    );

    // Activation is refused while the server does not know the new key (paste mode: not
    // pasted yet; the URL mode's server learns it from the URL on its own).
    if mode == Mode::Pasted {
        let (out, _) = run(&["keys", "rotate", "--label", "client-auth", "--activate"]);
        let err = assert_error_code(&out, 77, &"activate before the server knows the key");
        assert_mentions(
            &err,
            &[
                "activation refused",
                "nothing changed",
                "client 'dev'",
                &new_kid,
            ],
        );
        let (out, _) = run(&["keys", "list", "--json"]);
        let list: Value = serde_json::from_str(&assert_success(&out, &"keys list")).unwrap();
        let states: Vec<(String, String)> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["slot"] == "client-auth")
            .map(|k| {
                (
                    k["kid"].as_str().unwrap().into(),
                    k["state"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert!(
            states.contains(&(old_kid.clone(), "active".into())),
            "{states:?}"
        );
        assert!(
            states.contains(&(new_kid.clone(), "prepared".into())),
            "{states:?}"
        );
        let t = Instant::now();
        paste();
        steps.push(("paste the JWKS", t.elapsed()));
    }

    if let Some(url) = &hosted {
        // The agent's JWKS URL serves the prepared key from its next refresh on.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(GUARD)
            .build()
            .unwrap();
        let t = Instant::now();
        eventually("the JWKS URL serves the prepared key", || async {
            let body = http.get(url).send().await.expect("GET the JWKS URL");
            body.text().await.unwrap_or_default().contains(&new_kid)
        })
        .await;
        steps.push(("JWKS URL serves it", t.elapsed()));
    }

    // 2. Activate, proven by a token request signed with the prepared key.
    let (out, took) = run(&["keys", "rotate", "--label", "client-auth", "--activate"]);
    let printed = assert_success(&out, &"keys rotate --activate");
    steps.push(("activate (with proof)", took));
    assert_mentions(
        &printed,
        &["issued a token", &new_kid, "client dev", "retiring"],
    );
    // New assertions carry the new kid; one signed before the switch still verifies.
    let now = presigned_assertion(&token, &cli, &endpoint);
    assert_eq!(now.header["kid"], new_kid.as_str());
    assert!(
        server_accepts(&token, &cli, &endpoint, &in_flight[0]).await,
        "an assertion with the old kid verifies until retirement"
    );

    // 3. Retire (after retire_after), then the server forgets the old key.
    let (out, _) = run(&["keys", "rotate", "--label", "client-auth", "--retire"]);
    let err = assert_error(&out, &"retire too early");
    assert_mentions(&err, &["retire_after", "--force"]);
    std::thread::sleep(Duration::from_secs(2));
    let (out, took) = run(&["keys", "rotate", "--label", "client-auth", "--retire"]);
    let printed = assert_success(&out, &"keys rotate --retire");
    steps.push(("retire", took));
    assert_mentions(&printed, &["retired", &old_kid]);
    let t = Instant::now();
    match mode {
        Mode::Pasted => paste(),
        Mode::Url => {
            // The agent's JWKS drops it at its next refresh; the server's cache expires.
            eventually("the hosted JWKS without the old key", || async {
                let (out, _) = run(&["jwks"]);
                !assert_success(&out, &"jwks").contains(&old_kid)
            })
            .await;
        }
    }
    let (out, _) = run(&["jwks"]);
    let published = assert_success(&out, &"jwks");
    assert!(
        !published.contains(&old_kid) && published.contains(&new_kid),
        "{published}"
    );
    // Until the server refreshed its keys, an old assertion may still verify (and is then
    // spent): the next one is tried.
    let mut unspent = in_flight[1..].iter();
    let mut refused = false;
    for _ in 0..in_flight.len() * 4 {
        let Some(a) = unspent.next() else { break };
        if !server_accepts(&token, &cli, &endpoint, a).await {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        refused,
        "the server refuses the old kid after its retirement"
    );
    steps.push(("server forgets the old key", t.elapsed()));

    // 4. Destroy: the active key is refused, the retired one goes.
    let (out, _) = run(&[
        "keys",
        "destroy",
        "--label",
        "client-auth",
        "--kid",
        &new_kid,
    ]);
    assert_mentions(
        &assert_error(&out, &"destroy the active key"),
        &["only a retired", "active"],
    );
    let (out, took) = run(&[
        "keys",
        "destroy",
        "--label",
        "client-auth",
        "--kid",
        &old_kid,
    ]);
    assert_success(&out, &"keys destroy");
    steps.push(("destroy", took));

    let (ok, failed) = tokens.finish();
    // One more after the rotation, with the new key.
    let (out, _) = run(&["token", "--client", "dev", "--json"]);
    assert_success(&out, &"token after the rotation");
    eprintln!(
        "rotation ({mode:?} mode): {ok} token requests succeeded, {} failed",
        failed.len()
    );
    for (step, took) in &steps {
        eprintln!("  {step:28} {:>7.0} ms", took.as_secs_f64() * 1000.0);
    }
    assert!(
        failed.is_empty(),
        "token requests failed during the rotation:\n{}",
        failed.join("\n---\n")
    );
    assert!(ok > 0, "the client fetched tokens during the rotation");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_rotation_with_pasted_keys_fails_no_token_request() {
    whole_rotation(Mode::Pasted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_rotation_with_a_jwks_url_fails_no_token_request() {
    whole_rotation(Mode::Url).await;
}
