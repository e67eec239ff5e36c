//! Where log lines go: stderr, in whole lines. A line made on one of the agent's async
//! threads waits in a buffer until that thread has run every task that was ready (it is
//! about to sleep: [`flush`] from the runtime's park hook), so under load the lines of many
//! requests leave in one `write` instead of one each; an idle agent writes a line as soon
//! as the request that made it is answered. A line from any other thread goes out at once,
//! after every line made before it, so the order of lines is the order they were made.

use std::io::Write;
use std::sync::{Mutex, PoisonError};

/// Lines waiting to be written; at most [`HELD`] bytes before they go out anyway.
static WAITING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
const HELD: usize = 64 * 1024;

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

fn write_out(waiting: &mut Vec<u8>) {
    if !waiting.is_empty() {
        // A log that cannot be written has nowhere to report it.
        let _ = std::io::stderr().lock().write_all(waiting);
        waiting.clear();
    }
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
        waiting.extend_from_slice(line);
        if !HOLDS.get() || waiting.len() >= HELD {
            write_out(&mut waiting);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
