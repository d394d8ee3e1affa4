//! Recent errors: the last [`MAX_EVENTS`] warn and error log events with their time, for the
//! dashboard (`GET /api/errors`).
//!
//! The ring is process-wide (the log subscriber is): [`layer`] is a `tracing_subscriber`
//! layer the binary installs next to its log formatter; it copies every event at WARN or
//! above that passes the log filter (message, fields, the spans it happened in) into the ring,
//! each message cut at [`MAX_MESSAGE`] bytes. [`recent`] reads it. Nothing is written to disk.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{DefaultFields, JsonFields};
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// Events kept (the oldest goes first).
pub const MAX_EVENTS: usize = 100;
/// Longest message kept, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// One warn or error event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogEvent {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The module that logged it.
    pub target: String,
    /// The message, then its fields (`key=value`), then the spans it happened in.
    pub message: String,
}

static RING: Mutex<VecDeque<LogEvent>> = Mutex::new(VecDeque::new());

/// The recent warn and error events, oldest first.
pub fn recent() -> Vec<LogEvent> {
    let r = RING.lock().unwrap_or_else(|e| e.into_inner());
    r.iter().cloned().collect()
}

fn record(e: LogEvent) {
    let mut r = RING.lock().unwrap_or_else(|e| e.into_inner());
    r.push_back(e);
    while r.len() > MAX_EVENTS {
        r.pop_front();
    }
}

/// The layer that fills the ring; see the module docs.
pub fn layer() -> RecentEvents {
    RecentEvents
}

/// See [`layer`].
#[derive(Debug, Clone, Copy)]
pub struct RecentEvents;

/// Collects an event's message and fields as text.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

/// `text` without ANSI escape sequences (the log formatter colours span fields on a terminal).
fn no_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl<S> Layer<S> for RecentEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return; // INFO and below are less severe
        }
        let mut text = Text::default();
        event.record(&mut text);
        let mut message = text.message;
        message.push_str(&text.fields);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                let ext = span.extensions();
                let fields = ext
                    .get::<FormattedFields<DefaultFields>>()
                    .map(|f| f.fields.as_str())
                    .or_else(|| {
                        ext.get::<FormattedFields<JsonFields>>()
                            .map(|f| f.fields.as_str())
                    })
                    .unwrap_or("");
                let _ = write!(message, " in {}{{{}}}", span.name(), no_ansi(fields));
            }
        }
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        record(LogEvent {
            time_ms,
            level: if level == Level::ERROR {
                "ERROR"
            } else {
                "WARN"
            },
            target: event.metadata().target().to_string(),
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn keeps_warnings_and_errors_with_their_spans_bounded() {
        let sub = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink))
            .with(layer());
        tracing::subscriber::with_default(sub, || {
            tracing::info!("not kept");
            for i in 0..MAX_EVENTS + 5 {
                tracing::error!(i, "{}", "x".repeat(2 * MAX_MESSAGE));
            }
            let span = tracing::info_span!("flight", nar = "abc");
            let _e = span.enter();
            tracing::warn!(source = "upstream", "fetching the NAR failed");
        });
        // Only this test installs the layer (for its thread): the ring is this test's.
        let all = recent();
        assert_eq!(all.len(), MAX_EVENTS, "bounded");
        assert!(all
            .iter()
            .all(|e| e.message.len() <= MAX_MESSAGE + '…'.len_utf8()));
        assert!(all.iter().all(|e| !e.message.contains("not kept")));
        assert_eq!(all[0].level, "ERROR");
        assert_eq!(
            no_ansi("\u{1b}[3mnar\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"abc\""),
            "nar=\"abc\""
        );
        let w = all.last().unwrap();
        assert_eq!(w.level, "WARN");
        assert!(
            w.message
                .starts_with("fetching the NAR failed source=upstream")
                && w.message.contains("in flight{nar=\"abc\"}"),
            "{}",
            w.message
        );
    }
}
