//! `keybound audit verify`: the chain across files given in order, and every checkpoint's
//! signature against the audit key's JWKS. The first break is named, with its kind when
//! the evidence tells it: a `seq` that skips (deletion), one that repeats or goes back
//! (insertion, reordering), a hash that no longer matches (an edit), a line that chains to
//! no line of these files (spliced from another trail), a checkpoint whose signature does
//! not verify or whose signed head is not the chain's (a forged checkpoint, or a chain
//! rewritten after its lines were edited).
//!
//! An intact chain can still be incomplete ([`Report::incomplete`]): no line at all, a
//! first line that continues a file not given (the head cut off, rotated files missing),
//! more lines after the last checkpoint than `checkpoint_every` / `checkpoint_secs` allow
//! (the checkpoint that was due, and what came after it, cut off; a `gap` or `open` line
//! there is not signed, so it is shown but excuses nothing), or a last line cut off
//! mid-write (a crash; not checked).
//!
//! What it cannot see: lines after the last checkpoint are chained but not signed, so up
//! to a checkpoint's worth of them can be cut off (or the whole tail rewritten) without a
//! trace. The report counts them.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::line::{GENESIS, line_hash};
use crate::jose::{self, Alg, Jwk, PublicKey};

/// The JWS `typ` of a checkpoint's signature (the writer's header).
pub const CHECKPOINT_TYP: &str = "keybound-audit-checkpoint";

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

/// What the trail's writer promised (its `[audit]` settings), and what to accept.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// A checkpoint after this many lines (`checkpoint_every`).
    pub checkpoint_every: u64,
    /// A checkpoint at least this often while lines are written (`checkpoint_secs`).
    pub checkpoint_secs: u64,
    /// The first file may begin at a rotation's `open` line (`--from-rotation`): the
    /// earlier files are knowingly not given.
    pub from_rotation: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            checkpoint_every: 1000,
            checkpoint_secs: 60,
            from_rotation: false,
        }
    }
}

/// Slack on `checkpoint_secs` (the writer looks every 500 ms; a line's time is when its
/// event was queued).
const CHECKPOINT_SLACK_MS: u64 = 2000;

/// Intact and complete, intact but incomplete, or tampered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Intact,
    Incomplete,
    Tampered,
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
    /// Why the lines, intact, are not the whole trail (empty when they are).
    pub incomplete: Vec<String>,
    /// Notes that do not make it incomplete (a start at a rotation, accepted).
    pub notes: Vec<String>,
    pub broken: Option<Break>,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.broken.is_none()
    }

    pub fn status(&self) -> Status {
        if self.broken.is_some() {
            Status::Tampered
        } else if self.incomplete.is_empty() {
            Status::Intact
        } else {
            Status::Incomplete
        }
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
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        for reason in &self.incomplete {
            writeln!(f, "INCOMPLETE: {reason}")?;
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
pub fn verify(files: &[PathBuf], keys: &Keys, options: &Options) -> Result<Report, String> {
    let mut lines = Vec::new();
    let mut torn = None;
    let mut torn_end = None;
    for (f, path) in files.iter().enumerate() {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut rest = text.as_slice();
        let mut number = 0;
        while !rest.is_empty() {
            number += 1;
            let (line, after) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                // The end of the trail cut mid-line: what a crash in a write leaves (the
                // agent cuts it off when it starts again). Not a line of the chain.
                None if f + 1 == files.len() => {
                    torn_end = Some(rest.len());
                    break;
                }
                // A file that the writer had finished before it rotated.
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
        incomplete: Vec::new(),
        notes: Vec::new(),
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
                "the file's last line has no newline, yet a later file follows it: it was \
                 cut off mid-line or edited"
                    .into(),
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
        let Some(next) = seq.checked_add(1) else {
            report.broken = Some(at(
                l,
                Kind::Malformed,
                format!("its seq {seq} is the largest there is: no trail line has it"),
            ));
            break;
        };
        expected = Some(next);
    }
    if report.broken.is_none() {
        completeness(&mut report, &parsed, options);
        if let Some(bytes) = torn_end {
            report.incomplete.push(format!(
                "the last file ends in {bytes} byte(s) without a newline: a line cut off \
                 mid-write (a crash; the agent cuts it off when it starts again) or by an \
                 edit; it is not checked"
            ));
        }
    }
    Ok(report)
}

/// Whether the intact lines are the whole trail: [`Report::incomplete`].
fn completeness(report: &mut Report, parsed: &[Option<(u64, String, Value)>], options: &Options) {
    let values: Vec<&Value> = parsed.iter().flatten().map(|(_, _, v)| v).collect();
    let Some(first) = values.first() else {
        report
            .incomplete
            .push("there are no lines at all: an empty file (or the wrong file)".into());
        return;
    };
    fn event(v: &Value) -> &str {
        v.get("event").and_then(Value::as_str).unwrap_or_default()
    }
    fn reason(v: &Value) -> &str {
        v.get("reason").and_then(Value::as_str).unwrap_or_default()
    }
    if report.continues {
        let seq = first.get("seq").and_then(Value::as_u64).unwrap_or(0);
        if event(first) == "open" && reason(first).starts_with("rotated") {
            if options.from_rotation {
                report.notes.push(format!(
                    "the first line (seq {seq}) begins a file after a rotation; the earlier \
                     files are not checked (--from-rotation)"
                ));
            } else {
                report.incomplete.push(format!(
                    "the first line (seq {seq}) continues an earlier file ({}): give the \
                     earlier files too, oldest first, or --from-rotation to check from this \
                     rotation on",
                    reason(first)
                ));
            }
        } else {
            report.incomplete.push(format!(
                "the first line (seq {seq}) chains to a line not given, and it is no \
                 rotation's first line: the beginning of the trail is missing (cut off, or \
                 earlier files not given)"
            ));
        }
    }
    // A file the agent found empty when it started, and went on after the previous one's
    // last checkpoint: a rotation cut short by a crash, or the file's lines removed. The
    // line is the agent's, and signed by the checkpoint after it.
    // And one that found no rotated file to go on from, beside rotated files: its chain
    // begins at genesis, and the files before it are another chain.
    for v in &values {
        let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
        if event(v) != "open" {
            continue;
        }
        if reason(v).contains(super::writer::CUT_SHORT) {
            report.incomplete.push(format!(
                "line seq {seq}: {}: what was written after the previous file's last \
                 checkpoint may be missing",
                super::writer::CUT_SHORT
            ));
        } else if reason(v).contains(super::writer::CHAIN_RESTARTED) {
            report.notes.push(format!("line seq {seq}: {}", reason(v)));
        }
    }
    // The lines after the last checkpoint. The writer signs one as soon as
    // `checkpoint_every` lines follow the last, at least every `checkpoint_secs` while
    // lines come, and as soon as it starts; so a longer tail is a checkpoint cut off, or
    // one the device did not sign. A `gap` or `open` line there may say why, but it is not
    // signed: it is shown, and the tail stays incomplete.
    if report.uncovered == 0 {
        return;
    }
    let tail = &values[values.len() - report.uncovered..];
    let from = values
        .len()
        .checked_sub(report.uncovered + 1)
        .map_or(tail[0], |i| values[i]);
    // The latest time: events held through an outage keep the time they were queued,
    // earlier than the gap line before them.
    let late = match (time_ms(from), tail.iter().filter_map(|v| time_ms(v)).max()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    let count = tail.len() as u64;
    let mut worst = if count >= options.checkpoint_every {
        format!(
            "{count} line(s) in a row come after the last checkpoint, where one is signed \
             every {} line(s): the checkpoint that was due (and what came after it) is missing",
            options.checkpoint_every
        )
    } else if late > options.checkpoint_secs * 1000 + CHECKPOINT_SLACK_MS {
        format!(
            "lines after the last checkpoint span {} s, where one is signed at least every \
             {} s: the checkpoint that was due (and what came after it) is missing",
            late / 1000,
            options.checkpoint_secs
        )
    } else {
        return;
    };
    let said: Vec<String> = tail
        .iter()
        .filter(|v| matches!(event(v), "gap" | "open"))
        .take(3)
        .map(|v| format!("{} \"{}\"", event(v), reason(v)))
        .collect();
    if !said.is_empty() {
        worst.push_str(&format!(
            "; unsigned lines there say: {} (they prove nothing until a checkpoint covers them)",
            said.join(", ")
        ));
    }
    report.incomplete.push(worst);
}

/// A line's `time` (`2026-12-01T04:24:14.123Z`) in milliseconds since 1970.
fn time_ms(v: &Value) -> Option<u64> {
    let t = v.get("time")?.as_str()?;
    let num = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    if t.len() != 24 || !t.ends_with('Z') {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Howard Hinnant's days-from-civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms;
    u64::try_from(ms).ok()
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
    if decoded.header.get("typ").and_then(Value::as_str) != Some(CHECKPOINT_TYP) {
        return Err(forged(format!(
            "its jws's typ is not \"{CHECKPOINT_TYP}\": a signature the key made for \
             something else, not a checkpoint"
        )));
    }
    if v.get("kid").and_then(Value::as_str) != Some(kid) {
        return Err(forged(format!(
            "its jws is signed by kid {kid}, not by the kid the line names: forged"
        )));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_times_read_back() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_563_054_123);
        let v = serde_json::json!({ "time": super::super::line::rfc3339(t) });
        assert_eq!(time_ms(&v), Some(1_764_563_054_123));
        let leap = serde_json::json!({ "time": "2000-02-29T00:00:00.000Z" });
        assert_eq!(time_ms(&leap), Some(951_782_400_000));
        assert_eq!(time_ms(&serde_json::json!({ "time": "yesterday" })), None);
    }

    fn dummy_keys() -> Keys {
        let doc = serde_json::json!({ "keys": [{"kty": "EC", "crv": "P-256",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}] });
        Keys::from_jwks(&doc).unwrap()
    }

    /// A trail of `events` (name, seconds after the first), chained from genesis.
    fn trail(dir: &Path, events: &[(&str, u64)]) -> PathBuf {
        let t0 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_000_000);
        let (mut prev, mut text) = (GENESIS.to_owned(), Vec::new());
        for (seq, (event, secs)) in events.iter().enumerate() {
            let t = t0 + std::time::Duration::from_secs(*secs);
            let fields: &[u8] = if *event == "open" {
                br#"{"reason":"agent started"}"#
            } else {
                b"{}"
            };
            let line = super::super::line::build(seq as u64, &prev, t, event, fields);
            prev = line_hash(&line);
            text.extend_from_slice(&line);
            text.push(b'\n');
        }
        let path = dir.join("audit.log");
        std::fs::write(&path, &text).unwrap();
        path
    }

    #[test]
    fn an_uncovered_tail_longer_than_the_settings_allow_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            checkpoint_every: 3,
            checkpoint_secs: 60,
            from_rotation: false,
        };
        let verdict = |events: &[(&str, u64)]| {
            let path = trail(dir.path(), events);
            verify(&[path], &dummy_keys(), &options).unwrap()
        };
        // Within both bounds.
        let r = verdict(&[("open", 0), ("signature", 1)]);
        assert_eq!(r.status(), Status::Intact, "{r}");
        // checkpoint_every lines with no checkpoint after them.
        let r = verdict(&[("open", 0), ("signature", 1), ("signature", 2)]);
        assert_eq!(r.status(), Status::Incomplete, "{r}");
        assert!(r.to_string().contains("every 3 line(s)"), "{r}");
        // Longer than checkpoint_secs.
        let r = verdict(&[("open", 0), ("signature", 100)]);
        assert_eq!(r.status(), Status::Incomplete, "{r}");
        assert!(r.to_string().contains("span 100 s"), "{r}");
        // A gap line, or an agent's start, may say why, but it is not signed: anyone who
        // can write the file can add one where they cut a checkpoint off. (The writer
        // signs a checkpoint as soon as it starts.)
        let r = verdict(&[("open", 0), ("gap", 1), ("signature", 100)]);
        assert_eq!(r.status(), Status::Incomplete, "{r}");
        assert!(
            r.to_string()
                .contains("unsigned lines there say: open \"agent started\", gap"),
            "{r}"
        );
        let r = verdict(&[
            ("open", 0),
            ("signature", 1),
            ("open", 500),
            ("signature", 501),
        ]);
        assert_eq!(r.status(), Status::Incomplete, "{r}");
        assert!(r.to_string().contains("open \"agent started\""), "{r}");
        let r = verdict(&[
            ("open", 0),
            ("open", 1),
            ("signature", 1),
            ("open", 2),
            ("signature", 2),
        ]);
        assert_eq!(r.status(), Status::Incomplete, "{r}");
    }

    /// A file the agent found empty when it started says so in its first line, and verify
    /// reports it: a rotation cut short by a crash, or the file's lines removed.
    #[test]
    fn a_file_found_empty_at_start_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t = std::time::SystemTime::now();
        let fields = serde_json::json!({
            "reason": format!("rotated; the previous file is x.4; agent started ({})",
                super::super::writer::CUT_SHORT)
        })
        .to_string();
        let first = super::super::line::build(5, "ab", t, "open", fields.as_bytes());
        let second = super::super::line::build(6, &line_hash(&first), t, "signature", b"{}");
        std::fs::write(
            &path,
            [first, b"\n".to_vec(), second, b"\n".to_vec()].concat(),
        )
        .unwrap();
        let options = Options {
            from_rotation: true,
            ..Options::default()
        };
        let r = verify(&[path], &dummy_keys(), &options).unwrap();
        assert_eq!(r.status(), Status::Incomplete, "{r}");
        assert!(r.to_string().contains("may be missing"), "{r}");
    }

    /// A line cut off at the end of the trail is what a crash in a write leaves: not
    /// checked, incomplete (exit 2). At the end of a file a later file follows, it is not.
    #[test]
    fn a_torn_last_line_is_incomplete_and_a_torn_earlier_file_is_tampered() {
        let dir = tempfile::tempdir().unwrap();
        let path = trail(dir.path(), &[("open", 0), ("signature", 1)]);
        let whole = std::fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"seq":2,"prev":"ab"#);
        std::fs::write(&path, &torn).unwrap();
        let r = verify(
            std::slice::from_ref(&path),
            &dummy_keys(),
            &Options::default(),
        )
        .unwrap();
        assert_eq!(r.status(), Status::Incomplete, "{r}");
        assert_eq!(r.lines, 2, "{r}");
        assert!(r.to_string().contains("without a newline"), "{r}");
        let next = dir.path().join("audit.log.next");
        std::fs::write(&next, b"").unwrap();
        let r = verify(&[path, next], &dummy_keys(), &Options::default()).unwrap();
        let broken = r.broken.expect("tampered");
        assert_eq!(
            (broken.line, broken.kind),
            (3, Kind::Malformed),
            "{}",
            broken.message
        );
    }

    #[test]
    fn a_seq_that_cannot_count_on_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let t = std::time::SystemTime::now();
        let first = super::super::line::build(u64::MAX, GENESIS, t, "open", b"{}");
        let second = super::super::line::build(0, &line_hash(&first), t, "open", b"{}");
        let mut text = first.clone();
        text.push(b'\n');
        text.extend_from_slice(&second);
        text.push(b'\n');
        std::fs::write(&path, &text).unwrap();
        let report = verify(&[path], &dummy_keys(), &Options::default()).unwrap();
        let broken = report.broken.expect("malformed");
        assert_eq!(
            (broken.line, broken.kind),
            (1, Kind::Malformed),
            "{}",
            broken.message
        );
    }
}
