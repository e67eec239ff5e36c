//! The writer thread: the only code that touches the trail file. It batches queued
//! events, appends their lines with one write, checks that the file at the path is still
//! the one it writes, signs checkpoints, rotates, and records outages as `gap` lines.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::line::{self, GENESIS, line_hash};
use super::{AuditSettings, Msg, Shared};
use crate::jose;
use crate::keyring::SigningKey;

/// How often the writer looks at its file and its health when no event comes.
const TICK: Duration = Duration::from_millis(500);
/// The first wait before a failed checkpoint is tried again; it doubles up to
/// [`CHECKPOINT_RETRY_MAX`].
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);
const CHECKPOINT_RETRY_MAX: Duration = Duration::from_secs(60);
/// Events written with one `write`.
const BATCH: usize = 1024;
/// After the first event of a batch, the writer sleeps this long and then takes what
/// queued meanwhile: one `write` (and one look at the file) for many events, and the
/// signing threads never have to wake it.
const LINGER: Duration = Duration::from_millis(5);

pub(super) struct Writer {
    path: PathBuf,
    file: Option<File>,
    /// (dev, ino) of the open file: another file at the path means it was removed or
    /// replaced.
    id: (u64, u64),
    size: u64,
    /// The next line's `seq`, and the hash of the last line written.
    seq: u64,
    head: String,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    every: u64,
    secs: Duration,
    rotate: Option<u64>,
    key: SigningKey,
    shared: Arc<Shared>,
    /// Why the next file is opened (the old one rotated, removed or replaced).
    reopen: Option<String>,
    /// When the current outage began, for its `gap` line.
    outage_since: Option<SystemTime>,
    /// The current outage's `gap` line is written (one per outage, more only for lost
    /// events).
    gap_noted: bool,
    /// While checkpoints fail: when to try again, and the wait after that. The trail stays
    /// failing until a checkpoint is signed.
    checkpoint_retry: Option<(Instant, Duration)>,
    /// Events taken from the queue whose write failed, written first when writing works
    /// again (at most `queue` of them; past that they are lost, counted).
    held: Vec<Item>,
}

/// An event's name, its members as a serialised JSON object, and its time.
type Item = (&'static str, Vec<u8>, SystemTime);

impl Writer {
    pub(super) fn open(
        settings: &AuditSettings,
        key: SigningKey,
        shared: Arc<Shared>,
    ) -> Result<Writer, String> {
        let path = settings.path.clone();
        let (file, size, id) = open_file(&path)?;
        let Resume {
            seq,
            head,
            torn,
            rotated,
            restarted,
        } = resume(&path, &file, size)?;
        let size = size - torn;
        let mut w = Writer {
            path,
            file: Some(file),
            id,
            size,
            seq,
            head,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            every: settings.checkpoint_every,
            secs: Duration::from_secs(settings.checkpoint_secs),
            rotate: settings.rotate_bytes,
            key,
            shared,
            reopen: None,
            outage_since: None,
            gap_noted: false,
            checkpoint_retry: None,
            held: Vec::new(),
        };
        let mut reason = match &rotated {
            // `verify` reads "rotated" as a rotation's first line (`--from-rotation`).
            Some(old) => format!(
                "rotated; the previous file is {}; agent started ({CUT_SHORT})",
                old.display()
            ),
            None => match &restarted {
                Some(why) => format!("agent started; {why}"),
                None => "agent started".to_owned(),
            },
        };
        if torn > 0 {
            reason.push_str(&format!("; {torn} bytes of a torn last line were cut off"));
        }
        let open = w.open_line(&reason);
        match w.append(&[open]) {
            // Signed at once: the lines a crash left after the last run's last checkpoint,
            // and this start, are covered, so `verify` holds the tail to the settings
            // without taking an unsigned `open` line's word that a new run began.
            Ok(()) => w.checkpoint(),
            Err(e) => w.failed(e, 0),
        }
        Ok(w)
    }

    pub(super) fn run(mut self, rx: crossbeam_channel::Receiver<Msg>) {
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(msg) => msg,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    self.close();
                    return;
                }
            };
            let mut batch = Vec::new();
            let mut close = None;
            if matches!(first, Msg::Event(..)) {
                std::thread::sleep(LINGER);
            }
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e, t) => {
                        // The event's place in the queue is free again.
                        self.shared.pending.fetch_sub(1, Ordering::SeqCst);
                        batch.push((e, t));
                    }
                    Msg::Close(ack) => {
                        close = Some(ack);
                        break;
                    }
                }
                if batch.len() < BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.write_events(batch);
            }
            if let Some(ack) = close {
                self.close();
                let _ = ack.send(());
                return;
            }
            self.after_write();
        }
    }

    fn close(&mut self) {
        if !self.held.is_empty() {
            self.write_events(Vec::new());
        }
        if self.since_checkpoint > 0 && self.shared.healthy.load(Ordering::SeqCst) {
            self.checkpoint();
        }
    }

    fn tick(&mut self) {
        if !self.shared.healthy.load(Ordering::SeqCst)
            || self.shared.lost.load(Ordering::Relaxed) > 0
            || !self.held.is_empty()
        {
            self.write_events(Vec::new());
        } else if let Err(e) = self.check_file() {
            self.failed(e, 0);
            self.write_events(Vec::new());
        }
        if self.shared.healthy.load(Ordering::SeqCst) || self.checkpoint_retry.is_some() {
            self.after_write();
        }
    }

    /// Checkpoints and rotations that are due.
    fn after_write(&mut self) {
        // A failed one is tried again on its own schedule (`checkpoint` keeps to it).
        if self.since_checkpoint >= self.every
            || (self.since_checkpoint > 0
                && (self.checkpoint_retry.is_some() || self.last_checkpoint.elapsed() >= self.secs))
        {
            self.checkpoint();
        }
        if self.rotate.is_some_and(|max| self.size >= max) {
            self.rotate();
        }
    }

    /// Appends the events' lines, after a `gap` line when events were lost or the trail
    /// was failing. On failure the events are lost (counted) and the trail failing.
    fn write_events(&mut self, batch: Vec<(super::Event, SystemTime)>) {
        let lost = self.shared.lost.swap(0, Ordering::SeqCst);
        let failing = !self.shared.healthy.load(Ordering::SeqCst);
        let mut items: Vec<Item> = Vec::with_capacity(self.held.len() + batch.len() + 1);
        let gap = lost > 0 || (failing && !self.gap_noted);
        if gap {
            let reason = if failing {
                self.shared.reason()
            } else {
                "the audit queue was full".to_owned()
            };
            items.push((
                "gap",
                json!({
                    "lost": lost,
                    "reason": reason,
                    "since": self.outage_since.map(line::rfc3339),
                })
                .to_string()
                .into_bytes(),
                SystemTime::now(),
            ));
        }
        let gapped = items.len();
        items.append(&mut self.held);
        for (e, t) in batch {
            let name = e.name();
            items.push((name, e.to_json(), t));
        }
        if items.is_empty() {
            return;
        }
        let result = self
            .check_file()
            .map_err(|e| (e, items.len()))
            .and_then(|()| self.append_checkpointed(&items));
        match result {
            Ok(()) => {
                self.gap_noted |= gap;
                // Failing checkpoints keep the trail failing until one is signed.
                if self.checkpoint_retry.is_none() {
                    self.recovered();
                }
            }
            Err((e, unwritten)) => {
                // The events not written are kept for the next write; the gap line's
                // count goes back to the count when the gap line was not written.
                let start = items.len() - unwritten;
                let lost = if start < gapped { lost } else { 0 };
                let mut held = items.split_off(start.max(gapped));
                let dropped = held.len().saturating_sub(self.shared.capacity);
                held.truncate(self.shared.capacity);
                self.held = held;
                self.failed(e, lost + u64::try_from(dropped).unwrap_or(u64::MAX));
            }
        }
    }

    /// Appends `items` with a checkpoint as soon as `checkpoint_every` lines are due, so
    /// no more than that many lines ever follow a checkpoint while checkpoints sign (what
    /// `audit verify` holds the tail to). On failure: why, and how many items were not
    /// written.
    fn append_checkpointed(&mut self, items: &[Item]) -> Result<(), (String, usize)> {
        let mut rest = items;
        while !rest.is_empty() {
            let room = self.every.saturating_sub(self.since_checkpoint);
            let n = match usize::try_from(room) {
                Ok(0) | Err(_) => rest.len(),
                Ok(room) => room.min(rest.len()),
            };
            let (now, later) = rest.split_at(n);
            self.append(now).map_err(|e| (e, rest.len()))?;
            rest = later;
            if !rest.is_empty() && self.since_checkpoint >= self.every {
                self.checkpoint();
            }
        }
        Ok(())
    }

    fn recovered(&mut self) {
        self.outage_since = None;
        self.gap_noted = false;
        self.shared.recovered();
    }

    fn failed(&mut self, reason: String, lost: u64) {
        self.shared.lost.fetch_add(lost, Ordering::SeqCst);
        self.outage_since.get_or_insert_with(SystemTime::now);
        self.shared.fail(reason);
    }

    /// The file at the path is still the one open; if it is gone or replaced, or none is
    /// open, opens (creates) it and writes its `open` line first.
    fn check_file(&mut self) -> Result<(), String> {
        if self.file.is_some() {
            match std::fs::metadata(&self.path) {
                Ok(m) if (m.dev(), m.ino()) == self.id && m.is_file() && m.len() < self.size => {
                    // Only this writer writes the file, and it only appends: lines it wrote
                    // were cut off. The next line says so, chaining to the last line written.
                    tracing::error!(path = %self.path.display(), size = m.len(), written = self.size,
                        "the audit trail file was truncated by someone else; lines this agent wrote are gone");
                    self.size = m.len();
                    let open = self.open_line("truncated by someone else");
                    return self.append(&[open]);
                }
                Ok(m) if (m.dev(), m.ino()) == self.id => return Ok(()),
                _ => {
                    tracing::error!(path = %self.path.display(), "the audit trail file was removed or replaced; opening a new one");
                    self.file = None;
                    self.reopen.get_or_insert_with(|| {
                        "the previous trail file was removed or replaced".into()
                    });
                }
            }
        }
        let (file, size, id) = open_file(&self.path)?;
        self.file = Some(file);
        self.size = size;
        self.id = id;
        let reason = self.reopen.clone().unwrap_or_else(|| "reopened".to_owned());
        let open = self.open_line(&reason);
        self.append(&[open])?;
        self.reopen = None;
        Ok(())
    }

    fn open_line(&self, reason: &str) -> Item {
        (
            "open",
            json!({ "reason": reason, "pid": std::process::id(),
                    "version": env!("CARGO_PKG_VERSION") })
            .to_string()
            .into_bytes(),
            SystemTime::now(),
        )
    }

    /// Writes `items` as lines with one `write`; on failure cuts the file back to where
    /// it was (a partial line never stays) and leaves the chain as it was.
    fn append(&mut self, items: &[Item]) -> Result<(), String> {
        let Some(file) = self.file.as_mut() else {
            return Err("no trail file is open".into());
        };
        let mut buf = Vec::with_capacity(items.len() * 400);
        let (mut seq, mut head) = (self.seq, self.head.clone());
        for (event, fields, time) in items {
            let line = line::build(seq, &head, *time, event, fields);
            head = line_hash(&line);
            buf.extend_from_slice(&line);
            buf.push(b'\n');
            seq = seq
                .checked_add(1)
                .ok_or("the trail's seq is at its largest; start a new trail file")?;
        }
        if let Err(e) = file.write_all(&buf) {
            let _ = file.set_len(self.size);
            return Err(format!("cannot write {}: {e}", self.path.display()));
        }
        let n = seq - self.seq;
        self.seq = seq;
        self.head = head;
        self.size += u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.since_checkpoint += n;
        self.shared.lines.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Signs the chain head on the device and writes the checkpoint line. After a failed
    /// signature, not before its retry time (1 s, doubling up to 60 s).
    fn checkpoint(&mut self) {
        if self
            .checkpoint_retry
            .is_some_and(|(next, _)| Instant::now() < next)
        {
            return;
        }
        // The next one is due `checkpoint_secs` after this one's `time`, which `verify`
        // measures from, not after the device took its time to sign it.
        let (started, time) = (Instant::now(), SystemTime::now());
        let mut signed = self.sign_head(time);
        if signed.is_err() {
            // The key may be gone because its slot rotated (a retired generation
            // destroyed): the slot's active generation signs from now on.
            match self.key.look_up_again() {
                Ok(fresh) if fresh.kid() != self.key.kid() => {
                    tracing::warn!(key = %self.key.name(), old_kid = %self.key.kid(), kid = %fresh.kid(),
                        "the audit checkpoint key cannot sign; its name now means another key, which signs the checkpoints from now on");
                    self.key = fresh;
                    signed = self.sign_head(time);
                }
                _ => {}
            }
        }
        let (jws, kid, alg) = match signed {
            Ok(signed) => signed,
            Err(e) => {
                let wait = self.checkpoint_retry.map_or(CHECKPOINT_RETRY, |(_, wait)| {
                    (wait * 2).min(CHECKPOINT_RETRY_MAX)
                });
                self.checkpoint_retry = Some((Instant::now() + wait, wait));
                return self.failed(
                    format!(
                        "cannot sign a checkpoint with '{}' on the device: {e}",
                        self.key.name()
                    ),
                    0,
                );
            }
        };
        let fields = json!({ "head": self.head, "kid": kid, "alg": alg.name(), "jws": jws });
        match self.append(&[("checkpoint", fields.to_string().into_bytes(), time)]) {
            Ok(()) => {
                self.since_checkpoint = 0;
                self.last_checkpoint = started;
                self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
                if self.checkpoint_retry.take().is_some() {
                    self.recovered();
                }
                if let Some(file) = &self.file
                    && let Err(e) = file.sync_data()
                {
                    tracing::warn!("cannot sync the audit trail: {e}");
                }
            }
            Err(e) => self.failed(e, 0),
        }
    }

    /// The checkpoint's JWS over the chain head, signed on the device; with its kid and alg.
    fn sign_head(&self, time: SystemTime) -> Result<(String, String, jose::Alg), String> {
        let (kid, alg) = (self.key.kid().to_owned(), self.key.alg());
        let header = json!({ "typ": super::verify::CHECKPOINT_TYP, "alg": alg.name(), "kid": kid });
        let payload =
            json!({ "seq": self.seq, "head": self.head, "time": line::rfc3339(time), "kid": kid });
        let input = jose::signing_input(&header, &payload).map_err(|e| e.to_string())?;
        let sig = self
            .key
            .sign(alg.to_be_signed(input.as_bytes()))
            .map_err(|e| e.to_string())?;
        Ok((jose::compact(input, &sig), kid, alg))
    }

    /// A final checkpoint, the file renamed `<path>.<last seq>`, a new file whose `open`
    /// line chains to the old one's last line.
    fn rotate(&mut self) {
        if self.since_checkpoint > 0 {
            self.checkpoint();
            if self.since_checkpoint > 0 {
                return;
            }
        }
        let last = self.seq.saturating_sub(1);
        let mut old = self.path.clone().into_os_string();
        old.push(format!(".{last}"));
        let old = PathBuf::from(old);
        // Never over an earlier file of history (only this writer names them, each by the
        // seq of its last line, so one is there only if the chain was started again).
        let renamed = match std::fs::symlink_metadata(&old) {
            Ok(_) => Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "that file already exists",
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::rename(&self.path, &old),
            Err(e) => Err(e),
        };
        if let Err(e) = renamed {
            tracing::warn!(
                "cannot rotate the audit trail to {}: {e}; keeping one file",
                old.display()
            );
            self.rotate = None;
            return;
        }
        self.file = None;
        self.reopen = Some(format!("rotated; the previous file is {}", old.display()));
        if let Err(e) = self.check_file() {
            self.failed(e, 0);
        }
    }
}

/// Opens the trail for appending (0600, created when missing): the file, its size and
/// (dev, ino).
fn open_file(path: &Path) -> Result<(File, u64, (u64, u64)), String> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open the audit trail {}: {e}", path.display()))?;
    let stat = || {
        file.metadata()
            .map_err(|e| format!("cannot stat the audit trail {}: {e}", path.display()))
    };
    // One writer per trail: a second agent given the same path would fork the chain
    // (both go on from the same last line). Held while the file is open; taken before
    // the file is measured, so an agent that is still stopping has written its last line.
    if stat()?.is_file() {
        use rustix::fs::{FlockOperation, flock};
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(format!(
                    "the audit trail {} is being written by another process (another keybound \
                     agent with the same [audit] path?): give each agent its own trail",
                    path.display()
                ));
            }
            Err(e) => tracing::warn!(
                "cannot lock the audit trail {} against a second writer: {e}",
                path.display()
            ),
        }
    }
    let meta = stat()?;
    let size = if meta.is_file() { meta.len() } else { 0 };
    Ok((file, size, (meta.dev(), meta.ino())))
}

/// What the first line of a file says when the writer found it empty and went on from the
/// newest rotated file: `verify` reports it (an attacker who empties the file, its lines
/// after the rotated file's last checkpoint gone, leaves the same trace).
pub(super) const CUT_SHORT: &str = "the file was empty at start: a rotation cut short before \
     its first line, or its lines were removed";

/// What the first line of a file says when the writer found it empty and no rotated file
/// beside it ends in the checkpoint its name says: `verify` shows it.
pub(super) const CHAIN_RESTARTED: &str = "the chain starts again";

/// Where a writer that opens the trail goes on from.
#[derive(Debug)]
struct Resume {
    /// The next `seq` and `prev`.
    seq: u64,
    head: String,
    /// Bytes of a torn last line (no newline) cut off the file.
    torn: u64,
    /// The rotated file the chain goes on from, when the file holds no line: a rotation
    /// that a crash cut short after its rename.
    rotated: Option<PathBuf>,
    /// Why the chain starts again although rotated files are there.
    restarted: Option<String>,
}

/// Where the chain goes on: after the file's last line; for a file with no whole line,
/// after the newest rotated file's (`<path>.<seq>`, a rotation cut short between its
/// rename and the new file's first line); genesis when there is none. A torn last line
/// (no newline: a crash mid-write) is cut off the file first.
fn resume(path: &Path, file: &File, size: u64) -> Result<Resume, String> {
    let (end, torn) = if size == 0 {
        (None, 0)
    } else {
        chain_end(path, size)?
    };
    if torn > 0 {
        file.set_len(size - torn).map_err(|e| {
            format!(
                "the audit trail {} ends in a torn line, which cannot be cut off: {e}",
                path.display()
            )
        })?;
    }
    if let Some(end) = end {
        return Ok(Resume {
            seq: end.next,
            head: end.head,
            torn,
            rotated: None,
            restarted: None,
        });
    }
    // Only a file this writer rotated: named by the seq of its last line, a checkpoint
    // (`rotate` signs one first); the newest such. Another (logrotate's `.1`, a file of
    // another trail) is passed over.
    let rotated = rotated_files(path);
    for (number, old) in &rotated {
        let size = std::fs::metadata(old).map_or(0, |m| m.len());
        if let Ok((Some(end), 0)) = chain_end(old, size)
            && end.checkpoint
            && end.next == number.saturating_add(1)
        {
            return Ok(Resume {
                seq: end.next,
                head: end.head,
                torn,
                rotated: Some(old.clone()),
                restarted: None,
            });
        }
    }
    // Said in the new file's first line, so `verify` of these files shows it.
    let restarted = (!rotated.is_empty()).then(|| {
        let names: Vec<String> = rotated
            .iter()
            .map(|(_, p)| p.display().to_string())
            .collect();
        format!(
            "the file was empty at start, and no rotated file beside it ({}) ends in the \
             checkpoint its name says: {CHAIN_RESTARTED}",
            names.join(", ")
        )
    });
    Ok(Resume {
        seq: 0,
        head: GENESIS.to_owned(),
        torn,
        rotated: None,
        restarted,
    })
}

/// The rotated files of `path` (`<path>.<seq>`), the largest seq first (none when the
/// directory cannot be listed: the chain starts again, as it did before rotated files were
/// looked for).
fn rotated_files(path: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(
                "cannot list the audit trail's directory {} for rotated files: {e}",
                dir.display()
            );
            return Vec::new();
        }
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let seq = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(name)?.strip_prefix('.'))
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())?;
            Some((seq, entry.path()))
        })
        .collect();
    found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    found
}

/// Where a file's chain ends: the next `seq` and `prev`, and whether its last line is a
/// checkpoint.
struct End {
    next: u64,
    head: String,
    checkpoint: bool,
}

/// A trail line begins so ([`line::build`]).
const LINE_START: &[u8] = b"{\"seq\":";

/// Where the chain of `path`'s `size` bytes ends (`None` when they hold no whole line), and
/// how many bytes follow its last whole line (a torn line).
fn chain_end(path: &Path, size: u64) -> Result<(Option<End>, u64), String> {
    let bad = |why: String| {
        format!(
            "the audit trail {} does not end in a trail line ({why}); move it aside and \
             start a new one (`keybound audit verify` tells what it holds)",
            path.display()
        )
    };
    let mut reader = File::open(path).map_err(|e| bad(e.to_string()))?;
    let start = size.saturating_sub(1 << 20);
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| bad(e.to_string()))?;
    let mut tail = Vec::new();
    reader
        .take(size - start)
        .read_to_end(&mut tail)
        .map_err(|e| bad(e.to_string()))?;
    let complete = match tail.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        // The whole file is one torn line (a crash in its first write, or the zeros a
        // file system can leave after a power loss): nothing of the chain is in it.
        // Anything else is no trail, and never cut.
        None if start == 0
            && (tail.starts_with(LINE_START)
                || LINE_START.starts_with(&tail)
                || tail.iter().all(|b| *b == 0)) =>
        {
            return Ok((None, size));
        }
        None => return Err(bad("no whole line, and no trail line begun".into())),
    };
    let torn = u64::try_from(tail.len() - complete).unwrap_or(0);
    let body = &tail[..complete - 1];
    let last = body
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(body, |i| &body[i + 1..]);
    let line: Value =
        serde_json::from_slice(last).map_err(|_| bad("its last line is not JSON".into()))?;
    let seq = line
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("its last line has no seq".into()))?;
    let next = seq
        .checked_add(1)
        .ok_or_else(|| bad("its last line's seq is the largest there is".into()))?;
    let end = End {
        next,
        head: line_hash(last),
        checkpoint: line.get("event").and_then(Value::as_str) == Some("checkpoint"),
    };
    Ok((Some(end), torn))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`resume`] on `path` opened as the writer opens it, and closed again (the writer's
    /// lock with it).
    fn resume_at(path: &Path) -> Result<Resume, String> {
        let (file, size, _) = open_file(path)?;
        resume(path, &file, size)
    }

    #[test]
    fn a_last_line_with_the_largest_seq_does_not_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut line = line::build(u64::MAX, GENESIS, SystemTime::now(), "open", b"{}");
        line.push(b'\n');
        std::fs::write(&path, &line).unwrap();
        let err = resume_at(&path).unwrap_err();
        assert!(err.contains("largest"), "{err}");
    }

    /// `n` lines chained from genesis, the last a `last` event; and the last one's hash.
    fn chain(n: u64, last: &str) -> (Vec<u8>, String) {
        let (mut prev, mut text) = (GENESIS.to_owned(), Vec::new());
        for seq in 0..n {
            let event = if seq + 1 == n { last } else { "signature" };
            let l = line::build(seq, &prev, SystemTime::now(), event, b"{}");
            prev = line_hash(&l);
            text.extend_from_slice(&l);
            text.push(b'\n');
        }
        (text, prev)
    }

    /// A crash between a rotation's rename and the new file's first line (or in that
    /// line's write) leaves no file, or a torn line alone, at the path: the chain goes on
    /// from the rotated file, never from genesis (which `verify` would call a splice).
    #[test]
    fn a_rotation_cut_short_goes_on_from_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (text, head) = chain(5, "checkpoint");
        std::fs::write(dir.path().join("audit.log.4"), &text).unwrap();
        let (older, _) = chain(2, "checkpoint");
        std::fs::write(dir.path().join("audit.log.1"), &older).unwrap();
        std::fs::write(dir.path().join("audit.log.4x"), b"not a rotated file").unwrap();
        // Nothing, a torn first line, a shorter start of one, the zeros a power loss can
        // leave.
        for torn in [&b""[..], br#"{"seq":5,"prev":"#, b"{\"se", &[0u8; 40][..]] {
            std::fs::write(&path, torn).unwrap();
            let r = resume_at(&path).unwrap();
            assert_eq!(
                (r.seq, &r.head, r.torn),
                (5, &head, torn.len() as u64),
                "{r:?}"
            );
            assert_eq!(r.rotated, Some(dir.path().join("audit.log.4")));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        }
        // A newer file that no rotation of this writer ended (a checkpoint of another seq
        // than its name, as with logrotate's numbering; or no checkpoint last) is passed
        // over for the newest one that one did.
        for (n, last) in [(3, "checkpoint"), (10, "signature")] {
            let (other, _) = chain(n, last);
            std::fs::write(dir.path().join("audit.log.9"), &other).unwrap();
            std::fs::write(&path, b"").unwrap();
            let r = resume_at(&path).unwrap();
            assert_eq!(
                (r.seq, r.rotated.clone()),
                (5, Some(dir.path().join("audit.log.4"))),
                "{n} lines ending in {last}"
            );
        }
        // None that one did: the chain starts again, and the first line will say why.
        std::fs::remove_file(dir.path().join("audit.log.4")).unwrap();
        std::fs::remove_file(dir.path().join("audit.log.1")).unwrap();
        let r = resume_at(&path).unwrap();
        assert_eq!((r.seq, r.rotated), (0, None));
        let why = r.restarted.expect("why the chain starts again");
        assert!(
            why.contains("audit.log.9") && why.contains("starts again"),
            "{why}"
        );
        // A file with no line and no trail line begun (the wrong path) is not cut.
        std::fs::write(&path, b"0001secret").unwrap();
        let err = resume_at(&path).unwrap_err();
        assert!(err.contains("no trail line begun"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"0001secret");
        // No rotated file: genesis.
        let alone = tempfile::tempdir().unwrap();
        let path = alone.path().join("audit.log");
        let r = resume_at(&path).unwrap();
        assert_eq!((r.seq, r.head.as_str(), r.rotated), (0, GENESIS, None));
        // A whole file goes on after its own last line.
        let (text, head) = chain(5, "signature");
        std::fs::write(&path, &text).unwrap();
        let r = resume_at(&path).unwrap();
        assert_eq!((r.seq, &r.head, r.rotated), (5, &head, None));
    }
}
