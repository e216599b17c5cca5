//! The sinks that write where memscope is: a line on stderr, and
//! alerts.jsonl in the output directory, a JSON object per line, each
//! written (and flushed) as the alert happens.

use std::{fs::File, io::Write as _};

use super::{Alert, Sink};
use crate::output::escape::escape_control;

pub struct StderrSink;

impl Sink for StderrSink {
    fn send(&mut self, alert: &Alert) {
        // Site names come from the target's binaries.
        eprintln!(
            "memscope: ALERT {} {} at {:.1}s: {}",
            alert.kind,
            alert.level,
            alert.at_s,
            escape_control(&alert.message)
        );
    }
}

pub struct JsonLinesSink {
    file: File,
    failed: bool,
}

impl JsonLinesSink {
    pub fn new(file: File) -> Self {
        Self {
            file,
            failed: false,
        }
    }
}

impl Sink for JsonLinesSink {
    fn send(&mut self, alert: &Alert) {
        let Ok(mut line) = serde_json::to_vec(alert) else {
            return;
        };
        line.push(b'\n');
        // One write per line: a reader tailing the file sees whole lines.
        if let Err(error) = self.file.write_all(&line)
            && !std::mem::replace(&mut self.failed, true)
        {
            tracing::warn!("cannot write {}: {error}", crate::output::ALERTS_JSONL);
        }
    }
}
