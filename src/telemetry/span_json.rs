//! Span fields for the JSON log format, written straight into the span's buffer.
//!
//! Every message runs in a span (`partition`, `offset`, `request_id`, ...) so that
//! any warning about it says which request it was. tracing-subscriber's own
//! `JsonFields` formats those fields when the span opens by collecting them into a
//! map of JSON values and serializing the map: about 3% of paysync's CPU at 0 ms,
//! for a span that usually logs nothing. [`SpanFieldsJson`] writes the same JSON
//! object directly (fields in declaration order), and the JSON event format reads
//! it back as before when a line is logged inside the span.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

/// Formats span fields as one JSON object without intermediate values.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpanFieldsJson;

impl<'w> FormatFields<'w> for SpanFieldsJson {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut object = JsonObject::open(&mut writer)?;
        fields.record(&mut object);
        object.close()
    }

    /// Fields recorded later (`Span::record`) go into the same object.
    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        if current.fields.pop() != Some('}') {
            return Err(fmt::Error);
        }
        let empty = current.fields == "{";
        let mut object = JsonObject {
            out: &mut current.fields,
            first: empty,
            result: Ok(()),
        };
        fields.record(&mut object);
        object.close()
    }
}

/// A JSON object being written: `{` is out, members follow, `close` writes `}`.
struct JsonObject<'a> {
    out: &'a mut dyn Write,
    first: bool,
    result: fmt::Result,
}

impl<'a> JsonObject<'a> {
    fn open(out: &'a mut dyn Write) -> Result<Self, fmt::Error> {
        out.write_char('{')?;
        Ok(JsonObject {
            out,
            first: true,
            result: Ok(()),
        })
    }

    fn close(self) -> fmt::Result {
        self.result?;
        self.out.write_char('}')
    }

    /// Writes one member; `value` writes the value's JSON text.
    fn member(&mut self, field: &Field, value: impl FnOnce(&mut dyn Write) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        let name = name.strip_prefix("r#").unwrap_or(name);
        let separator = if self.first { "" } else { "," };
        self.first = false;
        self.result = self
            .out
            .write_str(separator)
            .and_then(|()| write_json_str(self.out, name))
            .and_then(|()| self.out.write_char(':'))
            .and_then(|()| value(self.out));
    }
}

impl Visit for JsonObject<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity; serde_json writes them as null too.
        self.member(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, |out| write!(out, "{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, |out| write_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field, |out| {
            out.write_char('"')?;
            write!(Escaped(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `s` as a JSON string literal.
fn write_json_str(out: &mut dyn Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaped(out).write_str(s)?;
    out.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string (RFC 8259 §7).
struct Escaped<'a>(&'a mut dyn Write);

impl Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `f` under paysync's JSON log format; returns the log lines, parsed
    /// by serde_json (another implementation than the one writing the fields).
    fn logged(f: impl FnOnce()) -> Vec<Value> {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .fmt_fields(SpanFieldsJson)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn span_fields_reach_the_line_with_their_types() {
        let lines = logged(|| {
            let span = tracing::error_span!(
                "message",
                partition = 3,
                offset = -1i64,
                request_id = "r-1",
                retried = true,
                ratio = 0.5,
                weird = f64::NAN,
                status = ?Some("CHARGED"),
                r#type = "check",
            );
            let _entered = span.enter();
            tracing::warn!(attempt = 2, "status check failed");
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["message"], "status check failed");
        assert_eq!(line["attempt"], 2);
        let span = &line["span"];
        assert_eq!(span["name"], "message");
        assert_eq!(span["partition"], 3);
        assert_eq!(span["offset"], -1);
        assert_eq!(span["request_id"], "r-1");
        assert_eq!(span["retried"], true);
        assert_eq!(span["ratio"], 0.5);
        assert_eq!(span["weird"], Value::Null);
        assert_eq!(span["status"], "Some(\"CHARGED\")");
        assert_eq!(span["type"], "check");
    }

    #[test]
    fn fields_recorded_later_join_the_object() {
        let lines = logged(|| {
            let span = tracing::error_span!(
                "message",
                offset = 7,
                request_id = tracing::field::Empty,
                connector = tracing::field::Empty
            );
            span.record("request_id", "late");
            span.record("connector", "cm");
            let _entered = span.enter();
            tracing::warn!("x");
            let empty = tracing::error_span!("bare", later = tracing::field::Empty);
            empty.record("later", 1);
            let _inner = empty.enter();
            tracing::warn!("y");
        });
        assert_eq!(lines[0]["span"]["offset"], 7);
        assert_eq!(lines[0]["span"]["request_id"], "late");
        assert_eq!(lines[0]["span"]["connector"], "cm");
        assert_eq!(lines[1]["span"]["name"], "bare");
        assert_eq!(lines[1]["span"]["later"], 1);
    }

    proptest! {
        /// Whatever a request id holds (quotes, backslashes, control characters,
        /// any Unicode), the line parses and the field reads back unchanged.
        #[test]
        fn any_string_survives(s in any::<String>(), shown in any::<String>()) {
            let lines = logged(|| {
                let span = tracing::error_span!("message", request_id = s.as_str(), d = ?shown);
                let _entered = span.enter();
                tracing::warn!("x");
            });
            prop_assert_eq!(lines[0]["span"]["request_id"].as_str(), Some(s.as_str()));
            let expected = format!("{shown:?}");
            prop_assert_eq!(lines[0]["span"]["d"].as_str(), Some(expected.as_str()));
        }
    }
}
