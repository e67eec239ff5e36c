//! Another uid: [`curl_as`] sends a request through `setpriv` or `runuser` + curl, as
//! [`As`] says.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::*;
use crate::support::*;

/// How to become another user.
#[derive(Clone, Copy, Debug)]
pub enum As {
    /// `setpriv --reuid --regid --clear-groups`: any uid/gid pair.
    Setpriv { uid: u32, gid: u32 },
    /// `runuser -u nobody --`.
    RunuserNobody,
    /// `setpriv --reuid --regid --groups`: a uid/gid pair with one supplementary group.
    SetprivInGroup { uid: u32, gid: u32, group: u32 },
}

impl As {
    /// The command prefix that runs what follows as this user.
    pub fn command(self) -> Command {
        match self {
            As::Setpriv { uid, gid } => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg("--");
                c
            }
            As::SetprivInGroup { uid, gid, group } => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg(format!("--groups={group}"))
                    .arg("--");
                c
            }
            As::RunuserNobody => {
                let mut c = Command::new("runuser");
                c.args(["-u", "nobody", "--"]);
                c
            }
        }
    }
}

/// What curl got: its exit code, the HTTP status (0 when none) and the body.
#[derive(Debug)]
pub struct CurlReply {
    pub exit: Option<i32>,
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

impl CurlReply {
    /// No HTTP answer at all: the agent closed the connection as soon as it accepted it
    /// (curl: 7 could not connect, 52 empty reply, 56 connection reset).
    pub fn assert_closed(&self) {
        assert!(
            // curl: 7 could not connect, 52 empty reply, 55 send failed (the agent closed
            // while curl was still writing), 56 receive failed.
            self.status == 0 && matches!(self.exit, Some(7 | 52 | 55 | 56)),
            "the agent closes the connection without answering: {self:?}"
        );
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("curl got non-JSON ({e}): {self:?}"))
    }

    /// An error answer: `status`, `error` = `code`, a message naming `mentions`.
    pub fn error(&self, status: u16, code: &str, mentions: &[&str]) -> String {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_members(&body, &["error", "message"]);
        assert_eq!(body["error"], code, "{self:?}");
        let message = body["message"].as_str().expect("message").to_owned();
        assert_mentions(&message, mentions);
        message
    }
}

/// `curl --unix-socket <socket> -X POST http://keybound<path> -d <body>` as another user.
pub fn curl_as(who: As, socket: &Path, path: &str, body: &Value) -> CurlReply {
    curl_method_as(who, socket, "POST", path, Some(&body.to_string()))
}

/// `curl --unix-socket <socket> -X <method> http://keybound<path>` as another user, with a
/// JSON body when given; the path sent as it is (`--path-as-is`).
pub fn curl_method_as(
    who: As,
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> CurlReply {
    let mut cmd = who.command();
    cmd.arg("curl")
        .args(["-sS", "--max-time", "30", "--path-as-is", "--unix-socket"])
        .arg(socket)
        .args(["-w", "\n%{http_code}", "-X", method])
        .arg(format!("http://keybound{path}"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir("/");
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            body,
        ]);
    }
    CurlReply::of(cmd)
}

impl CurlReply {
    /// Runs `cmd`, a curl with `-w "\n%{http_code}"`, and reads its answer.
    pub fn of(cmd: Command) -> CurlReply {
        let out = output_with_guard(cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        CurlReply {
            exit: out.status.code(),
            status: code.trim().parse().unwrap_or(0),
            body: body.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// `POST /v1/dpop` for `key` and `GET htu`, sent as `who`: answered 200, and the proof
/// verified independently against `jwks` as signed by `kid` for `want_htu` (the `htu` as
/// the agent normalises it).
pub fn proof_as(
    who: As,
    socket: &Path,
    jwks: &std::collections::BTreeMap<String, Value>,
    (key, kid): (&str, &str),
    htu: &str,
    want_htu: &str,
) {
    let start = window_start();
    let reply = curl_as(who, socket, "/v1/dpop", &dpop_request(key, "GET", htu));
    assert_eq!(reply.status, 200, "{reply:?}");
    check_proof(
        jwks,
        reply.json()["proof"].as_str().expect("proof"),
        &want_proof(kid, "GET", want_htu),
        window_end(start),
    );
}
