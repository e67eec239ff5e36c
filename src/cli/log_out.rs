//! Where log lines go: stderr, in whole lines. A line made on one of the agent's async
//! threads waits in a buffer until that thread has run every task that was ready (it is
//! about to sleep: [`flush`] from the runtime's park hook), so under load the lines of many
//! requests leave in one `write` instead of one each; an idle agent writes a line as soon
//! as the request that made it is answered. A worker that never sleeps still writes its
//! lines at [`HELD`] bytes, or once the first has waited [`HELD_FOR`] (the next line, or
//! the runtime's [`flush_held_lines`] task). A line from any other thread goes out at once, after
//! every line made before it, so the order of lines is the order they were made. Each
//! `write` is whole lines of at most [`PIPE_BUF`] bytes (one longer line alone), so a pipe
//! shared with other writers (the signer processes' stderr) never splits one.
//!
//! The price: lines held when the agent is killed (`SIGKILL`) or crashes are lost, at most
//! [`HELD_FOR`]'s worth. A panic writes them first.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines waiting to be written, and since when the first of them waits.
static WAITING: Mutex<Waiting> = Mutex::new(Waiting {
    bytes: Vec::new(),
    since: None,
});
/// Held lines go out anyway at this many bytes, or when one has waited this long.
const HELD: usize = 64 * 1024;
const HELD_FOR: Duration = Duration::from_millis(100);
/// Writes of at most this many bytes to a pipe are never interleaved with another's.
const PIPE_BUF: usize = 4096;

struct Waiting {
    bytes: Vec<u8>,
    since: Option<Instant>,
}

thread_local! {
    /// This thread is an async worker: its lines may wait until it parks. Never unset: a
    /// worker stays one (keybound never moves a worker to the blocking pool with
    /// `block_in_place`; if it ever does, its lines would wait until a worker parks).
    static HOLDS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// This thread holds [`WAITING`] (what the panic hook must not wait for).
    static WRITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The runtime `builder` makes holds its async workers' lines until they park, and writes
/// them when a worker stops; spawn [`flush_held_lines`] on it too.
pub fn hold_on_workers(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder.on_thread_park(worker_parks).on_thread_stop(flush)
}

/// Writes the lines a busy worker that logs nothing more holds, once the first has waited
/// [`HELD_FOR`]: a task of the runtime of [`hold_on_workers`], for as long as it runs.
pub async fn flush_held_lines() {
    let mut every = tokio::time::interval(HELD_FOR);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        flush_held();
    }
}

/// An async worker is about to sleep: every waiting line goes out, and from now on this
/// thread's lines wait for its next sleep (only workers park: a blocking-pool thread of the
/// same runtime never holds a line). The runtime's `on_thread_park`.
fn worker_parks() {
    HOLDS.set(true);
    flush();
}

/// Writes every waiting line (before a message printed straight to stderr).
pub fn flush() {
    with_waiting(write_out);
}

/// Writes the waiting lines when the first has waited [`HELD_FOR`].
fn flush_held() {
    with_waiting(|waiting| {
        if waiting
            .since
            .is_some_and(|since| since.elapsed() >= HELD_FOR)
        {
            write_out(waiting);
        }
    });
}

/// [`flush`] from a panic hook; skipped when the panic is this thread's own while it
/// writes lines (it holds the lock).
pub fn flush_at_panic() {
    if !WRITING.get() {
        flush();
    }
}

fn with_waiting<T>(f: impl FnOnce(&mut Waiting) -> T) -> T {
    let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
    WRITING.set(true);
    let result = f(&mut waiting);
    WRITING.set(false);
    result
}

fn write_out(waiting: &mut Waiting) {
    if !waiting.bytes.is_empty() {
        let mut stderr = std::io::stderr().lock();
        for lines in whole_lines(&waiting.bytes, PIPE_BUF) {
            // A log that cannot be written has nowhere to report it.
            if stderr.write_all(lines).is_err() {
                break;
            }
        }
        waiting.bytes.clear();
    }
    waiting.since = None;
}

/// `bytes` (whole lines) in pieces of whole lines of at most `max` bytes each; a line
/// longer than that is a piece by itself.
fn whole_lines(bytes: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let window = &rest[..rest.len().min(max)];
        let end = match window.iter().rposition(|&b| b == b'\n') {
            Some(i) if rest.len() > max => i + 1,
            _ if rest.len() <= max => rest.len(),
            // One line longer than `max`: up to its end.
            _ => rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1),
        };
        let (piece, next) = rest.split_at(end);
        rest = next;
        Some(piece)
    })
}

/// The `MakeWriter` of the log layer: one per line.
pub struct Lines;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Lines;
    fn make_writer(&'a self) -> Lines {
        Lines
    }
}

impl Write for Lines {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        with_waiting(|waiting| {
            waiting.bytes.extend_from_slice(line);
            let since = *waiting.since.get_or_insert_with(Instant::now);
            if !HOLDS.get() || waiting.bytes.len() >= HELD || since.elapsed() >= HELD_FOR {
                write_out(waiting);
            }
        });
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines' timestamps, as tracing-subscriber's own (RFC 3339, UTC, microseconds:
/// `2026-12-02T15:44:41.406798Z`), with the date and time of day formatted once per second
/// per thread: the calendar arithmetic and formatting were half of what a line cost.
pub struct Clock;

impl tracing_subscriber::fmt::time::FormatTime for Clock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        thread_local! {
            static SECOND: std::cell::RefCell<(u64, String)> =
                const { std::cell::RefCell::new((u64::MAX, String::new())) };
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        SECOND.with_borrow_mut(|(second, prefix)| {
            if *second != now.as_secs() {
                *second = now.as_secs();
                *prefix = second_prefix(*second);
            }
            write!(w, "{prefix}{:06}Z", now.subsec_micros())
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` of a Unix time.
fn second_prefix(unix: u64) -> String {
    let t = keybound::utc::civil(unix);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

    #[test]
    fn a_second_reads_as_its_calendar_date_and_time() {
        for (unix, want) in [
            (0, "1970-01-01T00:00:00."),
            (951_782_400, "2000-02-29T00:00:00."),
            (951_868_799, "2000-02-29T23:59:59."),
            (4_102_444_800, "2100-01-01T00:00:00."),
            (1_796_225_081, "2026-12-02T15:24:41."),
        ] {
            assert_eq!(second_prefix(unix), want, "{unix}");
        }
    }

    #[test]
    fn lines_go_out_whole_in_pieces_of_at_most_the_pipes_atomic_size() {
        fn pieces(bytes: &[u8], max: usize) -> Vec<&[u8]> {
            whole_lines(bytes, max).collect()
        }
        assert!(pieces(b"", 8).is_empty());
        assert_eq!(pieces(b"ab\ncd\n", 8), [&b"ab\ncd\n"[..]]);
        assert_eq!(pieces(b"ab\ncd\nef\n", 8), [&b"ab\ncd\n"[..], b"ef\n"]);
        // A line longer than the limit goes alone, whole.
        assert_eq!(
            pieces(b"a\nbcdefghijk\nl\n", 8),
            [&b"a\n"[..], b"bcdefghijk\n", b"l\n"]
        );
        assert_eq!(pieces(b"abcdefghijk\n", 8), [&b"abcdefghijk\n"[..]]);
        let lines = b"0123456\n".repeat(1000);
        let all = pieces(&lines, PIPE_BUF);
        assert!(
            all.iter()
                .all(|p| p.len() <= PIPE_BUF && p.ends_with(b"\n"))
        );
        assert_eq!(all.concat(), lines);
    }

    #[test]
    fn a_timestamp_reads_as_tracing_subscribers_own() {
        let (mut ours, mut theirs) = (String::new(), String::new());
        // Retried when a second (or a microsecond digit's width) changed in between.
        for _ in 0..100 {
            ours.clear();
            theirs.clear();
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            Clock.format_time(&mut Writer::new(&mut ours)).unwrap();
            if ours[..20] == theirs[..20] {
                break;
            }
        }
        assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
        assert_eq!(ours[..20], theirs[..20], "{ours} / {theirs}");
        assert!(ours.ends_with('Z'), "{ours}");
    }
}
