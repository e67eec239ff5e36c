//! `keybound audit verify`: the chain across files given in order, and every checkpoint's
//! signature against the audit key's JWKS. The first break is named, with its kind when
//! the evidence tells it: a `seq` that skips (deletion), one that repeats or goes back
//! (insertion, reordering), a hash that no longer matches (an edit), a line that chains to
//! no line of these files (spliced from another trail), a checkpoint whose signature does
//! not verify or whose signed head is not the chain's (a forged checkpoint, or a chain
//! rewritten after its lines were edited).
//!
//! What it cannot see: lines after the last checkpoint are chained but not signed, so they
//! can be cut off (or the whole tail rewritten) without a trace. The report counts them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::line::{GENESIS, line_hash};
use crate::jose::{self, Alg, Jwk, PublicKey};

/// The audit keys by kid, from a JWKS document.
pub struct Keys(HashMap<String, (PublicKey, Option<Alg>)>);

impl Keys {
    /// `{"keys": [...]}` (what `keybound jwks --label audit` prints).
    pub fn from_jwks(doc: &Value) -> Result<Keys, String> {
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the JWKS has no \"keys\" array")?;
        let mut out = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let jwk: Jwk = serde_json::from_value(k.clone())
                .map_err(|e| format!("JWKS key {i} is not a public JWK: {e}"))?;
            let public = PublicKey::from_jwk(&jwk).map_err(|e| format!("JWKS key {i}: {e}"))?;
            let kid = jwk.kid.clone().unwrap_or_else(|| public.thumbprint());
            let alg = jwk.alg.as_deref().and_then(|a| a.parse().ok());
            out.insert(kid, (public, alg));
        }
        if out.is_empty() {
            return Err("the JWKS holds no key".into());
        }
        Ok(Keys(out))
    }
}

/// What kind of tampering the first break looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Edited,
    Deleted,
    Inserted,
    Reordered,
    Spliced,
    /// The chain was recomputed after an edit: only a checkpoint's signed head shows it.
    Rewritten,
    ForgedCheckpoint,
    /// Not a trail line at all (not JSON, no `seq`/`prev`, a torn last line).
    Malformed,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Edited => "edited",
            Kind::Deleted => "deleted",
            Kind::Inserted => "inserted",
            Kind::Reordered => "reordered",
            Kind::Spliced => "spliced",
            Kind::Rewritten => "rewritten",
            Kind::ForgedCheckpoint => "forged checkpoint",
            Kind::Malformed => "malformed",
        })
    }
}

/// The first break: where, what kind, and why.
#[derive(Clone, Debug)]
pub struct Break {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
    pub kind: Kind,
    pub message: String,
}

/// The outcome of a verification.
#[derive(Clone, Debug)]
pub struct Report {
    pub files: usize,
    pub lines: usize,
    pub checkpoints: usize,
    /// Lines after the last verified checkpoint (all of them when there is none).
    pub uncovered: usize,
    /// `seq` of the first and last line.
    pub seqs: Option<(u64, u64)>,
    /// The first line chains to a file not given (not the genesis value).
    pub continues: bool,
    pub broken: Option<Break>,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.broken.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b) = &self.broken {
            writeln!(
                f,
                "TAMPERED: {}:{}: {}: {}",
                b.file.display(),
                b.line,
                b.kind,
                b.message
            )?;
            return write!(
                f,
                "the lines before it are intact ({} checkpoint(s) verified up to there)",
                self.checkpoints
            );
        }
        let (first, last) = self.seqs.unwrap_or((0, 0));
        writeln!(
            f,
            "intact: {} line(s) in {} file(s), seq {first} to {last}; {} checkpoint(s) verified",
            self.lines, self.files, self.checkpoints
        )?;
        if self.continues {
            writeln!(
                f,
                "the first line chains to a file not given here (an earlier, rotated file): \
                 give every file, oldest first, to check the whole history"
            )?;
        }
        if self.uncovered == 0 {
            write!(f, "every line is covered by a signed checkpoint")
        } else {
            write!(
                f,
                "NOT COVERED: the last {} line(s) come after the last checkpoint: they are \
                 chained but not signed, so they could be cut off (or rewritten) without a \
                 trace; the next checkpoint covers them",
                self.uncovered
            )
        }
    }
}

/// One line as read.
struct Line {
    file: usize,
    number: usize,
    bytes: Vec<u8>,
    hash: String,
}

/// Verifies `files` (oldest first) against `keys`.
pub fn verify(files: &[PathBuf], keys: &Keys) -> Result<Report, String> {
    let mut lines = Vec::new();
    let mut torn = None;
    for (f, path) in files.iter().enumerate() {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut rest = text.as_slice();
        let mut number = 0;
        while !rest.is_empty() {
            number += 1;
            let (line, after) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => {
                    torn.get_or_insert((f, number));
                    (rest, &[][..])
                }
            };
            lines.push(Line {
                file: f,
                number,
                hash: line_hash(line),
                bytes: line.to_vec(),
            });
            rest = after;
        }
    }
    let known: HashMap<&str, usize> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (l.hash.as_str(), i))
        .collect();
    let mut report = Report {
        files: files.len(),
        lines: lines.len(),
        checkpoints: 0,
        uncovered: lines.len(),
        seqs: None,
        continues: false,
        broken: None,
    };
    let at = |l: &Line, kind: Kind, message: String| Break {
        file: files[l.file].clone(),
        line: l.number,
        kind,
        message,
    };
    let parsed: Vec<Option<(u64, String, Value)>> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_slice(&l.bytes).ok()?;
            let seq = v.get("seq")?.as_u64()?;
            let prev = v.get("prev")?.as_str()?.to_owned();
            Some((seq, prev, v))
        })
        .collect();
    let mut expected: Option<u64> = None;
    for (i, l) in lines.iter().enumerate() {
        if torn == Some((l.file, l.number)) {
            report.broken = Some(at(
                l,
                Kind::Malformed,
                "the last line has no newline: it was cut off mid-line or edited".into(),
            ));
            break;
        }
        let Some((seq, prev, v)) = &parsed[i] else {
            report.broken = Some(at(
                l,
                Kind::Malformed,
                "not a trail line (not JSON with seq and prev): edited".into(),
            ));
            break;
        };
        match i {
            0 => report.continues = prev != GENESIS,
            _ => {
                if *prev != lines[i - 1].hash {
                    report.broken = Some(classify(&lines, &parsed, &known, i, expected, &at));
                    break;
                }
                if Some(*seq) != expected {
                    report.broken = Some(at(
                        l,
                        Kind::Edited,
                        format!(
                            "its seq is {seq} where {} was due, yet it chains to the line \
                             before: its seq was edited",
                            expected.unwrap_or(0)
                        ),
                    ));
                    break;
                }
            }
        }
        if v.get("event").and_then(Value::as_str) == Some("checkpoint") {
            if let Err((kind, message)) = check_checkpoint(*seq, prev, v, keys) {
                report.broken = Some(at(l, kind, message));
                break;
            }
            report.checkpoints += 1;
            report.uncovered = lines.len() - i - 1;
        }
        let first = report.seqs.map_or(*seq, |(f, _)| f);
        report.seqs = Some((first, *seq));
        expected = Some(seq + 1);
    }
    Ok(report)
}

/// Line `i` does not chain to line `i - 1`: what happened.
fn classify(
    lines: &[Line],
    parsed: &[Option<(u64, String, Value)>],
    known: &HashMap<&str, usize>,
    i: usize,
    expected: Option<u64>,
    at: &dyn Fn(&Line, Kind, String) -> Break,
) -> Break {
    let l = &lines[i];
    let Some((seq, prev, _)) = &parsed[i] else {
        return at(l, Kind::Malformed, "not a trail line".into());
    };
    let want = expected.unwrap_or(0);
    let next_prev = parsed
        .get(i + 1)
        .and_then(|p| p.as_ref())
        .map(|(_, p, _)| p.as_str());
    if let Some(copy) = lines[..i].iter().find(|o| o.bytes == l.bytes) {
        return at(
            l,
            Kind::Inserted,
            format!(
                "it repeats line {} (seq {seq}): a copy was inserted",
                copy.number
            ),
        );
    }
    if let Some(&j) = known.get(prev.as_str()) {
        return at(
            l,
            Kind::Reordered,
            format!(
                "seq {seq} chains to line {} (seq {}), not to the line before it: lines \
                 were reordered or moved",
                lines[j].number,
                parsed[j].as_ref().map_or(0, |p| p.0)
            ),
        );
    }
    if *seq > want {
        let what = if *seq == want + 1 {
            format!("seq {want} is missing")
        } else {
            format!("seq {want} to {} are missing", seq - 1)
        };
        return at(
            l,
            Kind::Deleted,
            format!("{what} before this line: deleted"),
        );
    }
    if *seq < want {
        return at(
            l,
            Kind::Spliced,
            format!(
                "seq {seq} goes back (seq {want} was due) and it chains to no line of these \
                 files: a line from another trail was spliced in (inserted)"
            ),
        );
    }
    // The seq is right but the hash is not.
    if next_prev == Some(l.hash.as_str()) || next_prev.is_none() {
        let before = &lines[i - 1];
        return Break {
            message: format!(
                "this line's hash no longer matches the one line {} (seq {seq}) recorded \
                 for it: it was edited",
                l.number
            ),
            ..at(before, Kind::Edited, String::new())
        };
    }
    if next_prev.is_some_and(|p| p == lines[i - 1].hash) {
        return at(
            l,
            Kind::Inserted,
            format!(
                "it chains to no line of these files, and the line after it chains to the \
                 line before it: inserted (spliced from another trail); seq {seq}"
            ),
        );
    }
    at(
        l,
        Kind::Spliced,
        format!(
            "it chains to no line of these files, nor does the next line chain to it: the \
             line was replaced (spliced from another trail); seq {seq}"
        ),
    )
}

/// A checkpoint line: its fields, its JWS's payload, and the signature under the JWKS.
fn check_checkpoint(seq: u64, prev: &str, v: &Value, keys: &Keys) -> Result<(), (Kind, String)> {
    let forged = |m: String| (Kind::ForgedCheckpoint, m);
    let jws = v
        .get("jws")
        .and_then(Value::as_str)
        .ok_or_else(|| forged("no jws".into()))?;
    let decoded = jose::decode(jws).map_err(|e| forged(format!("its jws does not decode: {e}")))?;
    let kid = decoded
        .header
        .get("kid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let alg: Alg = decoded
        .header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| forged("its jws names no algorithm keybound knows".into()))?;
    let Some((public, key_alg)) = keys.0.get(kid) else {
        return Err(forged(format!(
            "signed by kid {kid}, which is not in the audit key's JWKS: forged (or the \
             wrong JWKS)"
        )));
    };
    if key_alg.is_some_and(|a| a != alg) {
        return Err(forged(format!(
            "its jws says {alg}, the JWKS says the key is for another algorithm"
        )));
    }
    let signature = jose::JwsSignature::from(decoded.signature.clone());
    jose::verify(public, alg, decoded.signing_input.as_bytes(), &signature).map_err(|_| {
        forged(format!(
            "its signature does not verify under the audit key {kid}: forged"
        ))
    })?;
    let signed_seq = decoded.claims.get("seq").and_then(Value::as_u64);
    let signed_head = decoded.claims.get("head").and_then(Value::as_str);
    if signed_seq != Some(seq) {
        return Err(forged(format!(
            "the signed seq is {signed_seq:?}, the line's is {seq}: a checkpoint moved from \
             elsewhere"
        )));
    }
    if signed_head == Some(prev) && v.get("head").and_then(Value::as_str) != Some(prev) {
        return Err((
            Kind::Edited,
            "its head is not the signed head (which matches the chain): the line was edited".into(),
        ));
    }
    if signed_head != Some(prev) {
        return Err((
            Kind::Rewritten,
            "the device signed another chain head than the lines before this checkpoint \
             hash to: lines before it were edited and the chain recomputed"
                .into(),
        ));
    }
    Ok(())
}

/// Reads a JWKS file.
pub fn read_keys(path: &Path) -> Result<Keys, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("cannot read JWKS {}: {e}", path.display()))?;
    let doc: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("JWKS {} is not JSON: {e}", path.display()))?;
    Keys::from_jwks(&doc).map_err(|e| format!("JWKS {}: {e}", path.display()))
}
