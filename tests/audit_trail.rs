//! The audit trail (`[audit]`), end to end: `keybound serve` on a per-test SoftHSM2 token
//! writes one line per signature, hash-chained, with checkpoints signed by the `audit` key
//! on the token. Every chain hash and checkpoint signature is checked here independently
//! (sha2, and the p256 verifier of `tests/support` from the JWK `keybound jwks` prints),
//! then `keybound audit verify` must name each kind of tampering. A full disk
//! (`/dev/full`), a removed file and a removed directory get the right refusal or note.
//! No assertion here is about how long anything took; loops are bounded by [`GUARD`].

mod agent_support;
mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_support::*;
use p256::ecdsa::signature::Signer as _;
use p256::elliptic_curve::rand_core::OsRng;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::*;

const PIN: &str = "1234";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A token with a `dpop` key and the `audit` checkpoint key, configured with `[audit]`.
fn audit_token(audit_lines: &str) -> (DevToken, String, String) {
    let token = DevToken::new();
    let dpop = token.generate("dpop", "ES256");
    let audit = token.generate("audit", "ES256");
    token.write_config(&config_text(
        &format!("[audit]\n{}\n", audit_lines.trim()),
        "",
    ));
    (token, dpop, audit)
}

fn trail_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Waits (bounded) until `path` holds at least `n` lines.
/// The file's lines once one of them holds `needle` (the line of a request just made:
/// the writer appends it a moment after the answer).
fn wait_for_line(path: &Path, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + GUARD;
    loop {
        let lines = std::fs::read_to_string(path)
            .map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        if lines.iter().any(|l| l.contains(needle)) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} never had a line with {needle}: {lines:#?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Independent check of a whole trail: `prev` is the SHA-256 of the line before (the
/// genesis value first), `seq` counts up, and every checkpoint's JWS verifies under the
/// audit key's JWK and signs the chain head. Returns the checkpoints seen.
fn check_independently(lines: &[String], audit_jwk: &Value) -> usize {
    let verifier = Verifier::from_jwk(audit_jwk);
    let mut prev = "0".repeat(64);
    let mut checkpoints = 0;
    for (i, line) in lines.iter().enumerate() {
        let v = parse(line);
        assert_eq!(v["seq"], json!(i), "seq of line {i}: {line}");
        assert_eq!(v["prev"], json!(prev), "prev of line {i}: {line}");
        if v["event"] == "checkpoint" {
            let jws = Jws::parse(v["jws"].as_str().expect("checkpoint jws"));
            assert_signature(&verifier, &jws);
            assert_eq!(jws.claims["seq"], v["seq"], "{line}");
            assert_eq!(jws.claims["head"], json!(prev), "{line}");
            assert_eq!(jws.header["kid"], audit_jwk["kid"], "{line}");
            checkpoints += 1;
        }
        prev = sha256_hex(line.as_bytes());
    }
    checkpoints
}

fn verify_cmd(token: &DevToken, jwks: &Path, files: &[&Path]) -> std::process::Output {
    let mut args: Vec<OsArg> = vec![
        "audit".into(),
        "verify".into(),
        "--jwks".into(),
        jwks.into(),
    ];
    args.extend(files.iter().map(OsArg::from));
    output_with_guard(token.command(&args))
}

fn write_jwks(dir: &Path, jwk: &Value) -> PathBuf {
    let path = dir.join("audit-jwks.json");
    std::fs::write(&path, json!({ "keys": [jwk] }).to_string()).expect("write jwks");
    path
}

/// Runs an agent with `[audit] path = trail`, asks for `proofs` DPoP proofs (each checked
/// independently), and stops it with SIGTERM (a final checkpoint). Returns the proofs.
async fn make_trail(token: &DevToken, dpop_kid: &str, proofs: usize) -> Vec<String> {
    let dir = SocketDir::new();
    let mut agent = Agent::start(token, &dir.socket());
    let jwks = published_jwks(token, &agent).await;
    let mut conn = Conn::open(agent.socket()).await;
    let mut out = Vec::new();
    for i in 0..proofs {
        let start = window_start();
        let htu = format!("https://rs.example/items/{i}");
        let mut request = dpop_request("dpop", "GET", &htu);
        request["access_token"] = format!("eyJ.secret-access-token-{i}.sig").into();
        let proof = conn
            .post("/v1/dpop", &request)
            .await
            .ok_member("POST /v1/dpop", "proof");
        let mut want = want_proof(dpop_kid, "GET", &htu);
        want.access_token = Some(format!("eyJ.secret-access-token-{i}.sig"));
        check_proof(&jwks, &proof, &want, window_end(start));
        out.push(proof);
    }
    let health = conn.get("/healthz").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["audit"]["status"], "ok", "{}", health.text());
    drop(conn);
    agent.terminate();
    agent.assert_clean_exit();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signature_is_a_chained_line_with_signed_checkpoints_and_no_secrets() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, dpop_kid, _) = audit_token(&format!(
        "path = \"{}\"\ncheckpoint_every = 4",
        trail.display()
    ));
    let proofs = make_trail(&token, &dpop_kid, 9).await;
    let audit_jwk = token.jwk("audit");
    let lines = trail_lines(&trail);

    // Independent: chain and every checkpoint signature.
    let checkpoints = check_independently(&lines, &audit_jwk);
    assert!(
        checkpoints >= 3,
        "checkpoints every 4 lines and at exit: {lines:#?}"
    );
    assert_eq!(parse(&lines[0])["event"], "open");
    assert_eq!(
        parse(lines.last().unwrap())["event"],
        "checkpoint",
        "SIGTERM writes a final checkpoint"
    );

    // One signature line per proof, with the caller, the key and the claims' fields.
    let signatures: Vec<Value> = lines
        .iter()
        .map(|l| parse(l))
        .filter(|v| v["event"] == "signature" && v["purpose"] == "dpop")
        .collect();
    assert_eq!(signatures.len(), proofs.len(), "{lines:#?}");
    let me = std::fs::read_link("/proc/self/exe").expect("own exe");
    for (line, proof) in signatures.iter().zip(&proofs) {
        let claims = Jws::parse(proof).claims;
        assert_eq!(line["caller"]["uid"], json!(own_uid()), "{line}");
        assert_eq!(line["caller"]["pid"], json!(std::process::id()), "{line}");
        assert_eq!(
            line["caller"]["exe"],
            json!(me.display().to_string()),
            "{line}"
        );
        assert_eq!(line["key"], "dpop");
        assert_eq!(line["kid"], json!(dpop_kid));
        assert_eq!(line["alg"], "ES256");
        assert_eq!(line["htm"], claims["htm"]);
        assert_eq!(line["htu"], claims["htu"]);
        assert_eq!(line["jti"], claims["jti"]);
        assert_eq!(line["iat"], claims["iat"]);
        assert_eq!(line["outcome"], "ok");
    }

    // Never a proof, its signature, the access token or its hash, nor the PIN.
    let text = std::fs::read_to_string(&trail).unwrap();
    for proof in &proofs {
        let sig = proof.rsplit('.').next().unwrap();
        assert!(!text.contains(sig), "a proof's signature is in the trail");
        assert!(!text.contains(proof.as_str()));
        let ath = Jws::parse(proof).claims["ath"].as_str().unwrap().to_owned();
        assert!(!text.contains(&ath), "an ath is in the trail");
    }
    assert!(!text.contains("secret-access-token"), "{text}");
    assert!(!text.contains(&format!("\"{PIN}\"")), "{text}");

    // keybound's own verifier agrees.
    let jwks = write_jwks(work.path(), &audit_jwk);
    let out = verify_cmd(&token, &jwks, &[&trail]);
    let report = assert_success(&out, &"audit verify");
    assert_mentions(&report, &["intact", "every line is covered"]);
}

/// The `i`-th line index (0-based) whose event is `event`.
fn nth_event(lines: &[String], event: &str, n: usize) -> usize {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| parse(l)["event"] == event)
        .nth(n)
        .unwrap_or_else(|| panic!("no {event} #{n} in {lines:#?}"))
        .0
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write tampered trail");
}

/// Runs `audit verify` on `lines` written to a file; expects exit 1 naming `line`
/// (1-based) and `kind`.
fn assert_tampered(
    token: &DevToken,
    jwks: &Path,
    dir: &Path,
    name: &str,
    lines: &[String],
    line: usize,
    kind: &str,
) {
    let path = dir.join(name);
    write_lines(&path, lines);
    let out = verify_cmd(token, jwks, &[&path]);
    assert_eq!(out.status.code(), Some(1), "{name}: {}", describe(&out));
    let report = stdout(&out);
    let want = format!("{}:{line}: {kind}", path.display());
    assert!(
        report.contains(&want),
        "{name}: wanted '{want}' in:\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_edits_deletions_reordering_splices_and_forged_checkpoints() {
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b) = (work.path().join("a.log"), work.path().join("b.log"));
    let (token, dpop_kid, _) =
        audit_token(&format!("path = \"{}\"\ncheckpoint_every = 4", a.display()));
    make_trail(&token, &dpop_kid, 8).await;
    // A second trail (another file) to splice lines from.
    token.write_config(&config_text(
        &format!(
            "[audit]\npath = \"{}\"\ncheckpoint_every = 4\n",
            b.display()
        ),
        "",
    ));
    make_trail(&token, &dpop_kid, 8).await;
    let audit_jwk = token.jwk("audit");
    let jwks = write_jwks(work.path(), &audit_jwk);
    let lines = trail_lines(&a);
    let other = trail_lines(&b);
    check_independently(&lines, &audit_jwk);
    check_independently(&other, &audit_jwk);
    let dir = work.path();

    // Line numbers below are 1-based, as `audit verify` names them.
    let s = nth_event(&lines, "signature", 3);

    let mut edited = lines.clone();
    edited[s] = edited[s].replace("items/", "itemz/");
    assert_ne!(edited[s], lines[s]);
    assert_tampered(&token, &jwks, dir, "edited", &edited, s + 1, "edited");

    let mut deleted = lines.clone();
    deleted.remove(s);
    assert_tampered(&token, &jwks, dir, "deleted", &deleted, s + 1, "deleted");

    let mut reordered = lines.clone();
    reordered.swap(s, s + 1);
    assert_tampered(
        &token,
        &jwks,
        dir,
        "reordered",
        &reordered,
        s + 1,
        "reordered",
    );

    let mut inserted = lines.clone();
    inserted.insert(s + 1, lines[s - 1].clone());
    assert_tampered(&token, &jwks, dir, "inserted", &inserted, s + 2, "inserted");

    let mut spliced = lines.clone();
    spliced.insert(s, other[nth_event(&other, "signature", 1)].clone());
    assert_tampered(&token, &jwks, dir, "spliced", &spliced, s + 1, "spliced");

    // A checkpoint whose signature was altered, one signed by another key under the audit
    // key's kid, and one naming a key the JWKS does not hold.
    let c = nth_event(&lines, "checkpoint", 1);
    let cp = parse(&lines[c]);
    let jws = cp["jws"].as_str().unwrap();
    let mut forged = lines.clone();
    let mut v = cp.clone();
    let mut altered = Jws::parse(jws);
    altered.signature[0] ^= 1;
    v["jws"] = format!("{}.{}", altered.signing_input, b64(&altered.signature)).into();
    forged[c] = v.to_string();
    // The checkpoint line's own bytes changed: its successor no longer chains to it, but
    // the forgery is seen first, at the checkpoint itself.
    assert_tampered(
        &token,
        &jwks,
        dir,
        "forged",
        &forged,
        c + 1,
        "forged checkpoint",
    );

    let attacker = p256::ecdsa::SigningKey::random(&mut OsRng);
    let sign_as = |kid: &str| {
        let jws = Jws::parse(jws);
        let header = json!({ "typ": "keybound-audit-checkpoint", "alg": "ES256", "kid": kid });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(jws.claims.to_string().as_bytes())
        );
        let sig: p256::ecdsa::Signature = attacker.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    };
    for (name, kid) in [
        ("other-key", audit_jwk["kid"].as_str().unwrap()),
        ("unknown-kid", "attacker"),
    ] {
        let mut forged = lines.clone();
        let mut v = cp.clone();
        v["jws"] = sign_as(kid).into();
        forged[c] = v.to_string();
        assert_tampered(
            &token,
            &jwks,
            dir,
            name,
            &forged,
            c + 1,
            "forged checkpoint",
        );
    }

    // A JWS the audit key made for something else (another typ), and a checkpoint line
    // naming another kid than its JWS: both forged. (The attacker's key stands in for the
    // audit key here, published under its own kid in a second JWKS.)
    {
        let point = attacker.verifying_key().to_encoded_point(false);
        let attacker_jwk = json!({ "kty": "EC", "crv": "P-256", "kid": "attacker",
            "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap()) });
        let both = dir.join("both-jwks.json");
        std::fs::write(
            &both,
            json!({ "keys": [audit_jwk, attacker_jwk] }).to_string(),
        )
        .unwrap();
        let parts = Jws::parse(jws);
        let sign_with = |header: Value| {
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(parts.claims.to_string().as_bytes())
            );
            let sig: p256::ecdsa::Signature = attacker.sign(input.as_bytes());
            format!("{input}.{}", b64(&sig.to_bytes()))
        };
        let mut forged = lines.clone();
        let mut v = cp.clone();
        v["kid"] = "attacker".into();
        v["jws"] = sign_with(json!({ "typ": "JWT", "alg": "ES256", "kid": "attacker" })).into();
        forged[c] = v.to_string();
        assert_tampered(
            &token,
            &both,
            dir,
            "other-typ",
            &forged,
            c + 1,
            "forged checkpoint",
        );
        let report = stdout(&verify_cmd(&token, &both, &[&dir.join("other-typ")]));
        assert_mentions(&report, &["typ"]);
        // The right typ under the attacker's kid, but the line names the audit key.
        v["kid"] = audit_jwk["kid"].clone();
        v["jws"] = sign_with(json!({ "typ": "keybound-audit-checkpoint", "alg": "ES256",
            "kid": "attacker" }))
        .into();
        forged[c] = v.to_string();
        assert_tampered(
            &token,
            &both,
            dir,
            "other-kid",
            &forged,
            c + 1,
            "forged checkpoint",
        );
        let report = stdout(&verify_cmd(&token, &both, &[&dir.join("other-kid")]));
        assert_mentions(&report, &["not by the kid the line names"]);
    }

    // An edit with the chain recomputed after it: only the checkpoint's signed head shows.
    let mut rewritten = lines.clone();
    rewritten[s] = rewritten[s].replace("items/", "itemz/");
    for i in s + 1..rewritten.len() {
        let mut v = parse(&rewritten[i]);
        v["prev"] = sha256_hex(rewritten[i - 1].as_bytes()).into();
        if v["event"] == "checkpoint" {
            v["head"] = v["prev"].clone();
        }
        rewritten[i] = v.to_string();
    }
    let next_cp = (s..lines.len())
        .find(|&i| parse(&lines[i])["event"] == "checkpoint")
        .unwrap();
    assert_tampered(
        &token,
        &jwks,
        dir,
        "rewritten",
        &rewritten,
        next_cp + 1,
        "rewritten",
    );

    // Rotated files given in order chain; out of order they do not.
    let out = verify_cmd(&token, &jwks, &[&a]);
    assert_success(&out, &"verify a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_after_the_last_checkpoint_are_reported_uncovered_and_can_be_cut_undetected() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, dpop_kid, _) = audit_token(&format!(
        "path = \"{}\"\ncheckpoint_every = 5",
        trail.display()
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    for i in 0..7 {
        conn.post(
            "/v1/dpop",
            &dpop_request("dpop", "GET", &format!("https://rs.example/{i}")),
        )
        .await
        .ok_member("POST /v1/dpop", "proof");
    }
    // Every signature written (no exit checkpoint: the agent is killed).
    let deadline = Instant::now() + GUARD;
    while trail_lines(&trail)
        .iter()
        .filter(|l| l.contains("\"purpose\":\"dpop\""))
        .count()
        < 7
    {
        assert!(Instant::now() < deadline, "{:#?}", trail_lines(&trail));
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(conn);
    drop(agent);
    let _ = dpop_kid;
    let lines = trail_lines(&trail);
    let audit_jwk = token.jwk("audit");
    check_independently(&lines, &audit_jwk);
    // The agent signs a checkpoint as it starts: its `open` line is never in the tail.
    assert_eq!(parse(&lines[1])["event"], "checkpoint", "{lines:#?}");
    let last_cp = lines
        .iter()
        .rposition(|l| parse(l)["event"] == "checkpoint")
        .expect("a checkpoint");
    let uncovered = lines.len() - last_cp - 1;
    assert!(uncovered >= 2, "{lines:#?}");
    let jwks = write_jwks(work.path(), &audit_jwk);
    let out = verify_cmd(&token, &jwks, &[&trail]);
    let report = assert_success(&out, &"verify");
    assert_mentions(
        &report,
        &[
            "intact",
            &format!("NOT COVERED: the last {uncovered} line(s)"),
        ],
    );

    // Cutting one of them off goes unnoticed: that is what "not covered" means.
    let cut = work.path().join("cut.log");
    write_lines(&cut, &lines[..lines.len() - 1]);
    let out = verify_cmd(&token, &jwks, &[&cut]);
    let report = assert_success(&out, &"verify cut");
    assert_mentions(
        &report,
        &[&format!("NOT COVERED: the last {} line(s)", uncovered - 1)],
    );

    // Cutting off the last checkpoint and what follows it leaves checkpoint_every lines
    // after a checkpoint, where the writer signs one at once: incomplete (exit 2).
    write_lines(&cut, &lines[..last_cp]);
    let out = verify_cmd(&token, &jwks, &[&cut]);
    assert_exit(&out, 2, &"verify without the last checkpoint");
    assert_mentions(
        &stdout(&out),
        &["INCOMPLETE", "where one is signed every 5 line(s)"],
    );
    // The head cut off: the first line chains to nothing given.
    let first_cp = nth_event(&lines, "checkpoint", 0);
    write_lines(&cut, &lines[first_cp + 1..]);
    let out = verify_cmd(&token, &jwks, &[&cut]);
    assert_exit(&out, 2, &"verify without the head");
    assert_mentions(
        &stdout(&out),
        &["INCOMPLETE", "the beginning of the trail is missing"],
    );
    // An empty file.
    std::fs::write(&cut, "").expect("empty the file");
    let out = verify_cmd(&token, &jwks, &[&cut]);
    assert_exit(&out, 2, &"verify an empty file");
    assert_mentions(&stdout(&out), &["INCOMPLETE", "no lines at all"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_signing_by_default_and_continue_signs_loudly() {
    // refuse (the default)
    let (token, dpop_kid, _) = audit_token("path = \"/dev/full\"");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    let refused = conn
        .post(
            "/v1/dpop",
            &dpop_request("dpop", "GET", "https://rs.example/x"),
        )
        .await;
    refused.error(
        503,
        "audit_unavailable",
        &["audit trail", "No space left", "refuse"],
    );
    let health = conn.get("/healthz").await;
    assert_eq!(health.status, 503, "{}", health.text());
    let h = health.json();
    assert_eq!(h["audit"]["status"], "failing", "{h}");
    assert!(
        h["audit"]["reason"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{h}"
    );
    let metrics = conn.get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "keybound_audit_healthy", &[]),
        Some(0.0),
        "{metrics}"
    );
    assert!(metric(&metrics, "keybound_audit_failures_total", &[]).unwrap() >= 1.0);
    assert!(agent.log().contains("REFUSING TO SIGN"), "{}", agent.log());
    drop(conn);
    drop(agent);

    // continue
    token.write_config(&config_text(
        "[audit]\npath = \"/dev/full\"\non_failure = \"continue\"\n",
        "",
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let jwks = published_jwks(&token, &agent).await;
    let mut conn = Conn::open(agent.socket()).await;
    let start = window_start();
    let proof = conn
        .post(
            "/v1/dpop",
            &dpop_request("dpop", "GET", "https://rs.example/x"),
        )
        .await
        .ok_member("POST /v1/dpop", "proof");
    check_proof(
        &jwks,
        &proof,
        &want_proof(&dpop_kid, "GET", "https://rs.example/x"),
        window_end(start),
    );
    let health = conn.get("/healthz").await;
    assert_eq!(health.status, 200, "continue keeps the agent available");
    assert_eq!(
        health.json()["audit"]["status"],
        "failing",
        "{}",
        health.text()
    );
    assert!(
        agent.log().contains("SIGNING WITHOUT AN AUDIT TRAIL"),
        "{}",
        agent.log()
    );
}

/// Polls `/healthz` (bounded) until its `audit.status` is `want`.
async fn wait_audit(conn: &mut Conn, want: &str) -> Value {
    let deadline = Instant::now() + GUARD;
    loop {
        let h = conn.get("/healthz").await.json();
        if h["audit"]["status"] == want {
            return h;
        }
        assert!(Instant::now() < deadline, "audit never became {want}: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_file_is_recreated_with_a_note_and_a_removed_directory_refuses_until_back() {
    let work = tempfile::tempdir().expect("tempdir");
    let logs = work.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let trail = logs.join("audit.log");
    let (token, _, _) = audit_token(&format!("path = \"{}\"", trail.display()));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    let sign = |i: usize| dpop_request("dpop", "GET", &format!("https://rs.example/{i}"));
    conn.post("/v1/dpop", &sign(0))
        .await
        .ok_member("dpop", "proof");
    wait_for_line(&trail, "rs.example/0");

    // The file removed: a new file whose first line says so and chains on.
    std::fs::remove_file(&trail).unwrap();
    conn.post("/v1/dpop", &sign(1))
        .await
        .ok_member("dpop", "proof");
    let lines = wait_for_line(&trail, "rs.example/1");
    let open = parse(&lines[0]);
    assert_eq!(open["event"], "open", "{lines:#?}");
    assert!(
        open["reason"]
            .as_str()
            .unwrap()
            .contains("removed or replaced"),
        "{open}"
    );
    assert_ne!(
        open["prev"],
        json!("0".repeat(64)),
        "it chains to the removed file"
    );

    // The directory removed: the file cannot be made again; signing is refused.
    std::fs::remove_dir_all(&logs).unwrap();
    let h = wait_audit(&mut conn, "failing").await;
    assert!(
        h["audit"]["reason"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{h}"
    );
    conn.post("/v1/dpop", &sign(2))
        .await
        .error(503, "audit_unavailable", &["audit trail"]);

    // Back: a gap line records the outage, and signing works again.
    std::fs::create_dir(&logs).unwrap();
    wait_audit(&mut conn, "ok").await;
    conn.post("/v1/dpop", &sign(3))
        .await
        .ok_member("dpop", "proof");
    let lines = wait_for_line(&trail, "rs.example/3");
    let events: Vec<Value> = lines.iter().map(|l| parse(l)).collect();
    assert_eq!(events[0]["event"], "open", "{lines:#?}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "gap"
                && e["reason"].as_str().unwrap_or("").contains("No such file")),
        "{lines:#?}"
    );
    let last = events
        .iter()
        .rev()
        .find(|e| e["event"] == "signature")
        .unwrap();
    assert_eq!(last["htu"], "https://rs.example/3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_truncated_in_place_is_noted_and_verify_names_the_cut() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, _, _) = audit_token(&format!("path = \"{}\"", trail.display()));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    let sign = |i: usize| dpop_request("dpop", "GET", &format!("https://rs.example/{i}"));
    for i in 0..3 {
        conn.post("/v1/dpop", &sign(i))
            .await
            .ok_member("dpop", "proof");
    }
    let deadline = Instant::now() + GUARD;
    let before = loop {
        let lines = trail_lines(&trail);
        if lines.iter().any(|l| l.contains("https://rs.example/2\"")) {
            break lines;
        }
        assert!(Instant::now() < deadline, "{lines:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Someone cuts the last two lines off in place (same file, smaller).
    let keep: usize = before[..before.len() - 2].iter().map(|l| l.len() + 1).sum();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trail)
        .unwrap()
        .set_len(keep as u64)
        .unwrap();
    conn.post("/v1/dpop", &sign(3))
        .await
        .ok_member("dpop", "proof");
    let deadline = Instant::now() + GUARD;
    let after = loop {
        let lines = trail_lines(&trail);
        if lines.iter().any(|l| l.contains("https://rs.example/3\"")) {
            break lines;
        }
        assert!(Instant::now() < deadline, "{lines:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let note = parse(&after[before.len() - 2]);
    assert_eq!(note["event"], "open", "{after:#?}");
    assert_eq!(note["reason"], "truncated by someone else", "{after:#?}");
    // It chains to the last line the agent wrote, which is gone.
    assert_eq!(
        note["prev"],
        json!(sha256_hex(before[before.len() - 1].as_bytes())),
        "{after:#?}"
    );
    drop(conn);
    drop(agent);
    let jwks = write_jwks(work.path(), &token.jwk("audit"));
    let out = verify_cmd(&token, &jwks, &[&trail]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_mentions(
        &stdout(&out),
        &[
            "TAMPERED",
            &format!("{}:{}:", trail.display(), before.len() - 1),
            "deleted",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_checkpoint_keeps_the_trail_failing_with_one_gap_line_and_one_log_line() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, _, _) = audit_token(&format!(
        "path = \"{}\"\ncheckpoint_every = 2\non_failure = \"continue\"",
        trail.display()
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    // The checkpoint key goes away under the running agent: no checkpoint can be signed.
    for kind in ["privkey", "pubkey"] {
        let out = token.pkcs11_tool(&["--delete-object", "--type", kind, "--label", "audit"]);
        assert!(out.status.success(), "pkcs11-tool:\n{}", describe(&out));
    }
    for i in 0..8 {
        let htu = format!("https://rs.example/{i}");
        conn.post("/v1/dpop", &dpop_request("dpop", "GET", &htu))
            .await
            .ok_member("dpop", "proof");
        // Each proof its own batch.
        let deadline = Instant::now() + GUARD;
        while !text_of(&trail).contains(&format!("\"{htu}\"")) {
            assert!(Instant::now() < deadline, "{}", text_of(&trail));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let h = wait_audit(&mut conn, "failing").await;
    assert!(
        h["audit"]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot sign a checkpoint"),
        "{h}"
    );
    let lines = trail_lines(&trail);
    let gaps = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"gap\""))
        .count();
    assert_eq!(gaps, 1, "one gap line for the one outage: {lines:#?}");
    let log = agent.log();
    assert_eq!(
        log.matches("cannot sign a checkpoint").count(),
        1,
        "one log line per change: {log}"
    );
    assert!(!log.contains("audit trail written again"), "{log}");
    drop(conn);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_caller_signs_with_the_checkpoint_key_and_no_jwks_publishes_it() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, dpop_kid, audit_kid) = audit_token(&format!("path = \"{}\"", trail.display()));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    for name in ["audit", "pkcs11:object=audit"] {
        conn.post(
            "/v1/dpop",
            &dpop_request(name, "GET", "https://rs.example/x"),
        )
        .await
        .error(403, "forbidden", &["checkpoint key"]);
        let r = conn
            .post(
                "/v1/assertion",
                &json!({ "key": name, "client_id": "c", "audience": "https://as.example/token" }),
            )
            .await;
        r.error(403, "forbidden", &["checkpoint key"]);
    }
    // Other keys still sign.
    conn.post(
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://rs.example/x"),
    )
    .await
    .ok_member("dpop", "proof");
    let jwks = conn.get("/v1/jwks").await.ok("GET /v1/jwks");
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(kids.contains(&dpop_kid.as_str()), "{jwks}");
    assert!(!kids.contains(&audit_kid.as_str()), "{jwks}");
    drop(conn);
    drop(agent);
    // `keybound jwks` (what the hosted JWKS serves) leaves it out too; by label it is there
    // (the verifier's JWKS).
    let all = token.run_ok(&["jwks"]);
    assert!(!all.contains(&audit_kid), "{all}");
    let audit_only = token.run_ok(&["jwks", "--label", "audit"]);
    assert!(audit_only.contains(&audit_kid), "{audit_only}");
}

fn checkpoint_kids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| parse(l))
        .filter(|v| v["event"] == "checkpoint")
        .map(|v| v["kid"].as_str().unwrap().to_owned())
        .collect()
}

/// Signs proofs until `trail` holds a checkpoint signed by `kid`.
async fn sign_until_checkpoint_by(conn: &mut Conn, trail: &Path, kid: &str) -> Vec<String> {
    let deadline = Instant::now() + GUARD;
    let mut i = 0;
    loop {
        i += 1;
        conn.post(
            "/v1/dpop",
            &dpop_request("dpop", "GET", &format!("https://rs.example/{kid}/{i}")),
        )
        .await
        .ok_member("dpop", "proof");
        let lines = trail_lines(trail);
        if checkpoint_kids(&lines).iter().any(|k| k == kid) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint by {kid}: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_checkpoint_key_signs_on_with_the_active_generation_and_verifies() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, _, kid1) = audit_token(&format!(
        "path = \"{}\"\ncheckpoint_every = 2",
        trail.display()
    ));
    let jwk1 = token.jwk("audit");
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    sign_until_checkpoint_by(&mut conn, &trail, &kid1).await;

    // The slot rotates: generation 2 active, generation 1 retiring (still on the device).
    token.run_ok(&["keys", "rotate", "--label", "audit"]);
    token.run_ok(&["keys", "rotate", "--label", "audit", "--activate"]);
    let jwk2 = token.jwk("audit");
    let kid2 = jwk2["kid"].as_str().unwrap().to_owned();
    assert_ne!(kid2, kid1);
    // Without --jwks, verify takes every generation of the slot from the device.
    let mut args: Vec<OsArg> = vec!["audit".into(), "verify".into()];
    args.push(trail.as_path().into());
    let out = output_with_guard(token.command(&args));
    assert_success(&out, &"checkpoints by the retiring generation verify");

    // Generation 1 destroyed: the writer's next checkpoint is signed by generation 2.
    for kind in ["privkey", "pubkey"] {
        let out = token.pkcs11_tool(&["--delete-object", "--type", kind, "--label", "audit"]);
        assert!(out.status.success(), "pkcs11-tool:\n{}", describe(&out));
    }
    sign_until_checkpoint_by(&mut conn, &trail, &kid2).await;
    let health = conn.get("/healthz").await.json();
    assert_eq!(health["audit"]["status"], "ok", "{health}");
    drop(conn);
    drop(agent);
    let lines = trail_lines(&trail);
    let both = work.path().join("both-jwks.json");
    std::fs::write(&both, json!({ "keys": [jwk1, jwk2] }).to_string()).unwrap();
    let out = verify_cmd(&token, &both, &[&trail]);
    assert_success(&out, &"both generations' checkpoints verify");
    let kids = checkpoint_kids(&lines);
    assert!(kids.contains(&kid1) && kids.contains(&kid2), "{lines:#?}");
}

#[test]
fn a_checkpoint_key_that_is_a_client_key_is_refused_at_load() {
    let (token, _, _) = audit_token("path = \"/tmp/never-written.log\"");
    token.write_config(&config_text(
        "[[client]]\nname = \"okta\"\nserver = \"okta\"\ntoken_endpoint = \"https://example.okta.com/oauth2/v1/token\"\n\
         scopes = [\"okta.users.read\"]\n\
         client_id = \"0oa1\"\nassertion_key = \"audit\"\ndpop_key = \"dpop\"\n\
         [audit]\npath = \"/tmp/never-written.log\"\n",
        "",
    ));
    let out = token.keybound(&["jwks"]);
    let err = assert_error(&out, &"jwks with a bad [audit]");
    assert_mentions(
        &err,
        &[
            "audit.checkpoint_key",
            "'audit' is the assertion_key of client 'okta'",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_fetch_is_recorded_by_hash_never_the_token_assertion_or_proof() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, _) = token_with_keys(&[("client-auth", "ES256"), ("dpop", "ES256")]);
    token.generate("audit", "ES256");
    let server = DevServer::for_client_auth(&token, |_| {});
    token.write_config(&config_text(
        &format!(
            "{}\n[[route]]\nname = \"okta\"\nclient = \"dev\"\nupstream = \"{}\"\nallow = [\"GET /api/v1/users\"]\n\n[audit]\npath = \"{}\"\ncheckpoint_every = 3\n",
            dev_client(&server.base),
            server.base,
            trail.display()
        ),
        "",
    ));
    let dir = SocketDir::new();
    let mut agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    let answer = conn
        .post("/v1/token", &json!({ "client": "dev" }))
        .await
        .ok("POST /v1/token");
    let access_token = answer["access_token"].as_str().unwrap().to_owned();
    // A gateway request: its line, and its proof's signature line naming the caller.
    let users = conn.get("/gw/okta/api/v1/users?limit=2&q=secret").await;
    assert_eq!(users.status, 200, "{}", users.text());
    drop(conn);
    agent.terminate();
    agent.assert_clean_exit();

    let lines = trail_lines(&trail);
    check_independently(&lines, &token.jwk("audit"));
    let fetch = lines
        .iter()
        .map(|l| parse(l))
        .find(|v| v["event"] == "token_fetch")
        .unwrap_or_else(|| panic!("no token_fetch: {lines:#?}"));
    assert_eq!(fetch["client"], "dev");
    assert_eq!(
        fetch["endpoint"],
        format!("{}/oauth2/v1/token", server.base)
    );
    assert_eq!(fetch["status"], 200);
    assert!(fetch["round_trips"].as_u64().unwrap() >= 1, "{fetch}");
    assert_eq!(fetch["token_sha256"], sha256_hex(access_token.as_bytes()));
    let gateway = lines
        .iter()
        .map(|l| parse(l))
        .find(|v| v["event"] == "gateway")
        .unwrap_or_else(|| panic!("no gateway line: {lines:#?}"));
    assert_eq!(gateway["route"], "okta", "{gateway}");
    assert_eq!(gateway["method"], "GET", "{gateway}");
    assert_eq!(gateway["path"], "/api/v1/users", "{gateway}");
    assert_eq!(gateway["status"], 200, "{gateway}");
    assert_eq!(gateway["uid"], own_uid(), "{gateway}");
    assert!(gateway["bytes"].as_u64().unwrap() > 0, "{gateway}");
    let proof = lines
        .iter()
        .map(|l| parse(l))
        .find(|v| v["event"] == "signature" && v["htm"] == "GET")
        .unwrap_or_else(|| panic!("no signature for the gateway's proof: {lines:#?}"));
    assert_eq!(proof["caller"]["uid"], own_uid(), "{proof}");
    assert_eq!(
        proof["htu"],
        format!("{}/api/v1/users", server.base),
        "{proof}"
    );
    assert!(
        !text_of(&trail).contains("secret"),
        "a query reached the trail"
    );
    // The token endpoint's assertion and proof, signed by the agent for itself.
    let own: Vec<Value> = lines
        .iter()
        .map(|l| parse(l))
        .filter(|v| {
            v["event"] == "signature" && v["caller"] == "agent" && v["purpose"] != "possession"
        })
        .collect();
    assert!(
        own.iter()
            .any(|v| v["purpose"] == "assertion" && v["key"] == "client-auth"),
        "{own:#?}"
    );
    assert!(
        own.iter()
            .any(|v| v["purpose"] == "dpop" && v["htm"] == "POST"),
        "{own:#?}"
    );
    let text = text_of(&trail);
    assert!(
        !text.contains(&access_token),
        "the access token is in the trail"
    );
    assert!(
        !text.contains("eyJ0eXAiOiJkcG9w"),
        "a DPoP proof header is in the trail"
    );
    assert!(!text.contains(&format!("\"{PIN}\"")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_and_restarts_chain_and_verify_only_in_order() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, dpop_kid, _) = audit_token(&format!(
        "path = \"{}\"\ncheckpoint_every = 4\nrotate_bytes = 4096",
        trail.display()
    ));
    make_trail(&token, &dpop_kid, 12).await;
    // A restart appends to the current file, chaining on.
    make_trail(&token, &dpop_kid, 12).await;
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let seq = path.extension()?.to_str()?.parse().ok()?;
            Some((seq, path))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 2, "rotated at 4096 bytes: {files:?}");
    let mut all: Vec<PathBuf> = files.into_iter().map(|(_, p)| p).collect();
    all.push(trail.clone());
    // Independently: the files, in order, are one chain.
    let lines: Vec<String> = all.iter().flat_map(|f| trail_lines(f)).collect();
    let audit_jwk = token.jwk("audit");
    check_independently(&lines, &audit_jwk);
    let opens: Vec<Value> = lines
        .iter()
        .map(|l| parse(l))
        .filter(|v| v["event"] == "open")
        .collect();
    assert!(
        opens
            .iter()
            .any(|v| v["reason"].as_str().unwrap().starts_with("rotated")),
        "{opens:#?}"
    );
    assert_eq!(
        opens
            .iter()
            .filter(|v| v["reason"] == "agent started")
            .count(),
        2,
        "{opens:#?}"
    );

    let jwks = write_jwks(work.path(), &audit_jwk);
    let refs: Vec<&Path> = all.iter().map(PathBuf::as_path).collect();
    let out = verify_cmd(&token, &jwks, &refs);
    let report = assert_success(&out, &"verify in order");
    assert_mentions(&report, &["intact", &format!("in {} file(s)", all.len())]);
    // The current file alone: intact, but incomplete (exit 2) unless --from-rotation
    // says the earlier files are knowingly not given.
    let out = verify_cmd(&token, &jwks, &[&trail]);
    assert_exit(&out, 2, &"verify current");
    assert_mentions(
        &stdout(&out),
        &[
            "INCOMPLETE",
            "give the earlier files too",
            "--from-rotation",
        ],
    );
    let args: Vec<OsArg> = vec![
        "audit".into(),
        "verify".into(),
        "--from-rotation".into(),
        "--jwks".into(),
        jwks.as_path().into(),
        trail.as_path().into(),
    ];
    let out = output_with_guard(token.command(&args));
    assert_mentions(
        &assert_success(&out, &"verify current --from-rotation"),
        &["intact", "after a rotation"],
    );

    // Out of order: the second file's first line does not chain to the first's last.
    let mut swapped = refs.clone();
    swapped.swap(0, 1);
    let out = verify_cmd(&token, &jwks, &swapped);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_mentions(
        &stdout(&out),
        &["TAMPERED", &format!("{}:1:", swapped[1].display())],
    );
    // Without --jwks: the checkpoint key of the config's device.
    let mut args: Vec<OsArg> = vec!["audit".into(), "verify".into()];
    args.extend(refs.iter().map(OsArg::from));
    let out = output_with_guard(token.command(&args));
    assert_mentions(
        &assert_success(&out, &"verify from the device"),
        &["intact"],
    );
}

#[test]
fn a_trail_that_cannot_be_opened_stops_the_agent_at_start() {
    let work = tempfile::tempdir().expect("tempdir");
    let missing = work.path().join("no-such-dir").join("audit.log");
    let (token, _, _) = audit_token(&format!("path = \"{}\"", missing.display()));
    let dir = SocketDir::new();
    assert_serve_refuses(
        &token,
        &dir,
        &["cannot open the audit trail", "No such file"],
    );
    // And no checkpoint key on the device: named, with the command that makes it.
    token.write_config(&config_text(
        &format!(
            "[audit]\npath = \"{}\"\ncheckpoint_key = \"absent\"\n",
            work.path().join("a.log").display()
        ),
        "",
    ));
    assert_serve_refuses(
        &token,
        &dir,
        &[
            "audit.checkpoint_key 'absent'",
            "keys generate --label absent",
        ],
    );
}

/// A second agent given the same trail is refused at start: two writers would fork the
/// chain (both going on from the same last line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_trail_is_refused_at_start() {
    let work = tempfile::tempdir().expect("tempdir");
    let trail = work.path().join("audit.log");
    let (token, _, _) = audit_token(&format!("path = \"{}\"", trail.display()));
    let dir = SocketDir::new();
    let first = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(first.socket()).await;
    conn.post(
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://rs.example/0"),
    )
    .await
    .ok_member("dpop", "proof");
    let other = SocketDir::new();
    assert_serve_refuses(
        &token,
        &other,
        &["audit trail", "being written by another process"],
    );
    // The first one writes on.
    conn.post(
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://rs.example/1"),
    )
    .await
    .ok_member("dpop", "proof");
    wait_for_line(&trail, "rs.example/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_that_cannot_keep_up_fills_the_bounded_queue_and_signing_is_refused() {
    // The trail is a FIFO the test reads only when told: once the pipe's buffer is full
    // the writer blocks in write(2) and the queue (16 events) fills. The gate reserves a
    // place in the queue before the device signs, so the flood is refused (503) before
    // signing: every proof that was answered 200 has its line, none is only counted in a
    // gap line.
    let work = tempfile::tempdir().expect("tempdir");
    let fifo = work.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Read as _;
            // Blocks until the agent opens it for writing.
            let mut f = std::fs::File::open(&fifo).expect("open fifo");
            let _ = wait.recv();
            let mut all = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
                // Stop once the last proof's line has been read.
                if String::from_utf8_lossy(&all).contains("https://rs.example/after\"") {
                    break;
                }
            }
            String::from_utf8_lossy(&all).into_owned()
        })
    };
    let (token, _, _) = audit_token(&format!(
        "path = \"{}\"\nqueue = 16\nqueue_wait_ms = 50",
        fifo.display()
    ));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    let mut refused = None;
    let mut signed = Vec::new();
    for i in 0..5000 {
        let htu = format!("https://rs.example/{i}");
        let r = conn
            .post("/v1/dpop", &dpop_request("dpop", "GET", &htu))
            .await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        signed.push(htu);
    }
    let refused = refused.expect("the queue filled within 5000 proofs");
    refused.error(503, "audit_unavailable", &["audit queue is full"]);
    let metrics = conn.get("/metrics").await.text();
    assert_eq!(
        metric(&metrics, "keybound_audit_lost_events_total", &[]),
        Some(0.0),
        "{metrics}"
    );

    // The reader catches up: the writer recovers and records the outage.
    go.send(()).unwrap();
    wait_audit(&mut conn, "ok").await;
    // The queue may still be draining: refused (never signed unrecorded) until it has.
    let deadline = Instant::now() + GUARD;
    loop {
        let r = conn
            .post(
                "/v1/dpop",
                &dpop_request("dpop", "GET", "https://rs.example/after"),
            )
            .await;
        if r.status == 200 {
            break;
        }
        r.error(503, "audit_unavailable", &["audit queue is full"]);
        assert!(Instant::now() < deadline, "still refused: {}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signed.push("https://rs.example/after".into());
    let text = reader.join().expect("reader");
    let lines: Vec<Value> = text.lines().map(parse).collect();
    for htu in &signed {
        assert!(
            lines
                .iter()
                .any(|v| v["event"] == "signature" && v["htu"] == json!(htu)),
            "the proof for {htu} was answered 200 but has no line"
        );
    }
    for gap in lines.iter().filter(|v| v["event"] == "gap") {
        assert_eq!(gap["lost"], 0, "{gap}");
    }
    // A pipe is no file: its size says nothing of what was written to it.
    assert!(
        !lines
            .iter()
            .any(|v| v["reason"] == "truncated by someone else"),
        "{text}"
    );
    drop(conn);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signature_whose_write_failed_is_written_when_writing_works_again() {
    // The trail is a FIFO whose reader goes away: the next write fails (EPIPE) after the
    // proof was answered 200. When a reader is back, that proof's line is written; the
    // gap line records the outage, and counts no loss.
    let work = tempfile::tempdir().expect("tempdir");
    let fifo = work.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let read_until = |fifo: PathBuf, until: String| {
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut f = std::fs::File::open(&fifo).expect("open fifo");
            let mut all = Vec::new();
            let mut buf = [0u8; 65536];
            while !String::from_utf8_lossy(&all).contains(&until) {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
            String::from_utf8_lossy(&all).into_owned()
        })
    };
    let first = read_until(fifo.clone(), "https://rs.example/a0\"".into());
    let (token, _, _) = audit_token(&format!("path = \"{}\"", fifo.display()));
    let dir = SocketDir::new();
    let agent = Agent::start(&token, &dir.socket());
    let mut conn = Conn::open(agent.socket()).await;
    conn.post(
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://rs.example/a0"),
    )
    .await
    .ok_member("dpop", "proof");
    first.join().expect("first reader");
    // No reader now: the next proof is answered, its line cannot be written.
    let mut signed = Vec::new();
    for i in 1..1000 {
        let htu = format!("https://rs.example/a{i}");
        let r = conn
            .post("/v1/dpop", &dpop_request("dpop", "GET", &htu))
            .await;
        if r.status == 503 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        signed.push(htu);
    }
    assert!(!signed.is_empty());
    wait_audit(&mut conn, "failing").await;
    // A reader again: the held lines are written, then the proofs after them.
    let second = read_until(fifo.clone(), "https://rs.example/after\"".into());
    wait_audit(&mut conn, "ok").await;
    conn.post(
        "/v1/dpop",
        &dpop_request("dpop", "GET", "https://rs.example/after"),
    )
    .await
    .ok_member("dpop", "proof");
    let text = second.join().expect("second reader");
    let lines: Vec<Value> = text.lines().map(parse).collect();
    for htu in &signed {
        assert!(
            lines
                .iter()
                .any(|v| v["event"] == "signature" && v["htu"] == json!(htu)),
            "the proof for {htu} was answered 200 but has no line: {text}"
        );
    }
    let gap = lines
        .iter()
        .find(|v| v["event"] == "gap")
        .unwrap_or_else(|| panic!("no gap line: {text}"));
    assert_eq!(gap["lost"], 0, "{gap}");
    drop(conn);
    drop(agent);
}

fn text_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}
