//! Where log lines go: stderr, in whole lines. A line made on one of the agent's async
//! threads waits in a buffer until that thread has run every task that was ready (it is
//! about to sleep: [`flush`] from the runtime's park hook), so under load the lines of many
//! requests leave in one `write` instead of one each; an idle agent writes a line as soon
//! as the request that made it is answered. A worker that never sleeps still writes its
//! lines within [`HELD_FOR`] or [`HELD`] bytes. A line from any other thread goes out at
//! once, after every line made before it, so the order of lines is the order they were
//! made.

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

struct Waiting {
    bytes: Vec<u8>,
    since: Option<Instant>,
}

thread_local! {
    /// This thread is an async worker: its lines may wait until it parks.
    static HOLDS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An async worker is about to sleep: every waiting line goes out, and from now on this
/// thread's lines wait for its next sleep (only workers park: a blocking-pool thread of the
/// same runtime never holds a line). The runtime's `on_thread_park`.
pub fn worker_parks() {
    HOLDS.set(true);
    flush();
}

/// Writes every waiting line (before a message printed straight to stderr).
pub fn flush() {
    let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
    write_out(&mut waiting);
}

/// [`flush`] from a panic hook: skipped when the lines are being written (perhaps by the
/// thread that panics).
pub fn flush_at_panic() {
    if let Ok(mut waiting) = WAITING.try_lock() {
        write_out(&mut waiting);
    }
}

fn write_out(waiting: &mut Waiting) {
    if !waiting.bytes.is_empty() {
        // A log that cannot be written has nowhere to report it.
        let _ = std::io::stderr().lock().write_all(&waiting.bytes);
        waiting.bytes.clear();
    }
    waiting.since = None;
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
        let mut waiting = WAITING.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.bytes.extend_from_slice(line);
        let since = *waiting.since.get_or_insert_with(Instant::now);
        if !HOLDS.get() || waiting.bytes.len() >= HELD || since.elapsed() >= HELD_FOR {
            write_out(&mut waiting);
        }
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

/// `YYYY-MM-DDTHH:MM:SS.` of a Unix time (days to a civil date: H. Hinnant's algorithm).
fn second_prefix(unix: u64) -> String {
    let (days, of_day) = (unix / 86_400, unix % 86_400);
    let z = days + 719_468;
    let (era, of_era) = (z / 146_097, z % 146_097);
    let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
    let day_of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let m = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * m + 2) / 5 + 1;
    let month = if m < 10 { m + 3 } else { m - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
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
