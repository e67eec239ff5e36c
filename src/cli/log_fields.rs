//! How a log line's fields are written: exactly as tracing-subscriber's `DefaultFields`
//! writes them (`name=value`, separated by spaces, the message first as it comes), with
//! the common cases written straight to the line instead of through its styling and
//! escaping layers: a string of printable ASCII (quoted as `Debug` would quote it), an
//! integer, a bool, and the message (escaped as `DefaultFields` escapes it). Anything
//! else, and every field when the line has colours, is `DefaultFields`'s own visitor.
//!
//! Why: the agent writes one line per signature, and formatting its fields was about
//! half of that line's cost (callgrind: ~5,200 of ~9,200 instructions per line).

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// The fields formatter of the agent's text log lines (`fmt::layer().fmt_fields(..)`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fields;

impl<'writer> FormatFields<'writer> for Fields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let plain = !writer.has_ansi_escapes();
        let mut v = Visitor {
            writer,
            plain,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a> {
    writer: Writer<'a>,
    /// No colours: the fast paths write what `DefaultVisitor` would.
    plain: bool,
    /// Nothing written yet (no space before the first field).
    is_empty: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// A field written as `DefaultVisitor` writes it (the cases with no fast path).
    fn default(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        // `DefaultVisitor` writes nothing for log metadata (tracing-log's `log.` fields),
        // not even the separating space.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = v.finish();
        self.is_empty = false;
    }

    /// `name=` after the separating space, when the fast path may write this field: no
    /// colours, and a name `DefaultVisitor` writes as it is (not the message, not a raw
    /// identifier, not log metadata).
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err()
            || !self.plain
            || name == "message"
            || name.starts_with("r#")
            || name.starts_with("log.")
        {
            return false;
        }
        let w = &mut self.writer;
        self.result = (|| {
            if !std::mem::take(&mut self.is_empty) {
                w.write_char(' ')?;
            }
            w.write_str(name)?;
            w.write_char('=')
        })();
        true
    }
}

/// `Debug` of this string is the string in double quotes: printable ASCII with no quote
/// or backslash to escape.
fn quotes_as_is(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if quotes_as_is(value) && self.start(field) {
            let w = &mut self.writer;
            self.result = self.result.and_then(|()| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.default(field, |v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = self.result.and_then(|()| write!(self.writer, "{value}"));
        } else {
            self.default(field, |v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = self.result.and_then(|()| write!(self.writer, "{value}"));
        } else {
            self.default(field, |v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            let text = if value { "true" } else { "false" };
            self.result = self.result.and_then(|()| self.writer.write_str(text));
        } else {
            self.default(field, |v| v.record_bool(field, value));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.default(field, |v| v.record_f64(field, value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.default(field, |v| v.record_i128(field, value));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.default(field, |v| v.record_u128(field, value));
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.default(field, |v| v.record_bytes(field, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.default(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        // The message, without colours: `DefaultVisitor` writes its `Debug` through a
        // writer that escapes terminal control characters; this one passes the pieces
        // that have none straight through.
        if self.plain && field.name() == "message" {
            if !std::mem::take(&mut self.is_empty) {
                self.result = self.writer.write_char(' ');
            }
            let sanitize = self.writer.sanitizes_ansi_escapes();
            let w = &mut self.writer;
            self.result = self.result.and_then(|()| {
                if sanitize {
                    write!(Escaping(w), "{value:?}")
                } else {
                    write!(w, "{value:?}")
                }
            });
        } else if self.start(field) {
            self.result = self.result.and_then(|()| write!(self.writer, "{value:?}"));
        } else {
            self.default(field, |v| v.record_debug(field, value));
        }
    }
}

/// tracing-subscriber's escaping of a message (`fmt::format::escape`): terminal control
/// characters (ESC, BEL, BS, FF, DEL) and the C1 controls written as escapes, the rest as
/// it is; a piece with none of them is written whole.
struct Escaping<'a, 'b>(&'a mut Writer<'b>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // C1 controls are U+0080..=U+009F: in UTF-8, 0xC2 then 0x80..=0x9F.
        if !s
            .bytes()
            .any(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2))
        {
            return self.0.write_str(s);
        }
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                ch if ('\u{80}'..='\u{9f}').contains(&ch) => {
                    write!(self.0, "\\u{{{:x}}}", ch as u32)?
                }
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::prelude::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Failed {
        source: Option<Box<Failed>>,
        text: &'static str,
    }
    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }
    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.source.as_deref().map(|e| e as _)
        }
    }

    use super::*;

    /// Every kind of field, every awkward string, spans with fields, and the message.
    fn events() {
        let strings = [
            "",
            "dpop",
            "a b c",
            "quote \" inside",
            "back\\slash",
            "new\nline\ttab\r",
            "esc \x1b[31m red",
            "bel \x07 bs \x08 ff \x0c del \x7f",
            "c1 \u{85} \u{9b}",
            "unicode é ✓ 🚀",
            "combining \u{301} accent",
            "zero \0 byte",
            "'single'",
        ];
        let span = tracing::info_span!("connection", uid = 1000u32, name = "svc \"x\"");
        let _e = span.enter();
        let inner = tracing::info_span!("request", path = %"/v1/dpop", esc = "\x1b");
        let _i = inner.enter();
        for s in strings {
            tracing::info!(key = s, "signature");
            tracing::info!(r#type = s, "raw name");
            tracing::info!(shown = %s, debug = ?s, "display and debug");
            tracing::info!("message with {s} inside");
            tracing::info!(message = s);
        }
        tracing::info!(
            a = 1u64,
            b = -2i64,
            c = true,
            d = false,
            e = 1.5f64,
            f = u64::MAX
        );
        tracing::info!(g = i64::MIN, h = 3u128, i = -4i128, j = f64::NAN, "numbers");
        tracing::info!(bytes = &b"\x00ab"[..], "bytes");
        let e = Failed {
            text: "outer \x1b",
            source: Some(Box::new(Failed {
                text: "inner",
                source: None,
            })),
        };
        tracing::info!(error = &e as &(dyn std::error::Error + 'static), "failed");
        tracing::info!(alg = %"ES256", micros = 260u64, outcome = "ok", "signature");
        tracing::warn!("no fields");
        tracing::info!(only = "fields");
    }

    fn format(lean: bool, ansi: bool) -> String {
        let buf = Buf::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(buf.clone())
            .without_time()
            .with_ansi(ansi)
            .with_target(false);
        let subscriber = tracing_subscriber::registry();
        if lean {
            let s = subscriber.with(layer.fmt_fields(Fields));
            tracing::subscriber::with_default(s, events);
        } else {
            tracing::subscriber::with_default(subscriber.with(layer), events);
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_byte_for_byte_what_tracing_subscriber_writes() {
        for ansi in [false, true] {
            let (ours, theirs) = (format(true, ansi), format(false, ansi));
            assert!(theirs.lines().count() > 60, "{theirs}");
            for (a, b) in ours.lines().zip(theirs.lines()) {
                assert_eq!(a, b, "ansi {ansi}");
            }
            assert_eq!(ours, theirs, "ansi {ansi}");
        }
        // The fast paths were taken (a line as the agent writes it).
        assert!(format(true, false).contains("signature alg=ES256 micros=260 outcome=\"ok\"\n"));
    }
}
