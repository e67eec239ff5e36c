//! The shape of a line: `{"seq", "prev", "time", "event", ...}`, its hash, and the time.

use std::time::{SystemTime, UNIX_EPOCH};

/// The `prev` of the very first line of a trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 (hex) of a line's exact bytes, without its newline: the next line's `prev`.
/// (ring's assembly: the writer hashes every line, and sha2 unoptimised in a debug build
/// costs more than the rest of the line.)
pub fn line_hash(line: &[u8]) -> String {
    crate::token::hex(ring::digest::digest(&ring::digest::SHA256, line).as_ref())
}

/// One line's bytes (no newline): the chain fields first, then the members of `fields`
/// (a serialised JSON object). `prev` is hex and `event` a fixed name: neither needs
/// escaping.
pub(super) fn build(seq: u64, prev: &str, time: SystemTime, event: &str, fields: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut line = Vec::with_capacity(fields.len() + 160);
    let _ = write!(
        line,
        "{{\"seq\":{seq},\"prev\":\"{prev}\",\"time\":\"{}\",\"event\":\"{event}\"",
        rfc3339(time)
    );
    match fields.strip_prefix(b"{") {
        Some(b"}") | None => line.push(b'}'),
        Some(rest) => {
            line.push(b',');
            line.extend_from_slice(rest);
        }
    }
    line
}

/// `2026-12-01T04:24:14.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let c = crate::utc::civil(d.as_secs());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        c.year,
        c.month,
        c.day,
        c.hour,
        c.minute,
        c.second,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_764_563_054_123);
        assert_eq!(rfc3339(t), "2025-12-01T04:24:14.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
