//! `--pprof-push URL`: each window's profile, as the window closes, sent
//! to a Grafana Pyroscope server's ingest endpoint (`POST
//! /ingest?format=pprof`, the body a gzipped pprof), where a fleet's
//! profiles are kept and compared over time. A window's profile holds what
//! Go's delta heap profiles hold: what each site allocated in the window,
//! and what it held at the window's end, so Pyroscope's timeline shows both
//! churn and growth as they happen. The pushes run on a thread of their
//! own: a slow or dead server never holds the collection.

use std::{collections::HashMap, path::Path, time::SystemTime};

use super::pprof::{Span, gzipped, profile_of};
use crate::{
    background::{Background, Delivery},
    http::{Endpoint, query_value},
    report::{Module, Site},
};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(
        "--pprof-push {0}: only http://HOST[:PORT][/PATH] is supported, a Pyroscope server's address (http://pyroscope:4040) or its /ingest URL; for https, push through a local relay such as Grafana Alloy"
    )]
    Unsupported(String),
    #[error(
        "cannot push the window profiles to {url}: {message} (the files are written: push DIR/profile.pb.gz later for the whole session)"
    )]
    Failed { url: String, message: String },
}

/// Where profiles go.
#[derive(Clone, Debug)]
pub struct PprofPush {
    url: String,
    endpoint: Endpoint,
}

impl PprofPush {
    pub fn parse(url: &str) -> Result<Self, PushError> {
        let endpoint =
            Endpoint::parse(url).ok_or_else(|| PushError::Unsupported(url.to_owned()))?;
        Ok(Self {
            url: url.to_owned(),
            endpoint,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Starts pushing the windows of a session that began at `started`.
    pub fn start(self, pid: u32, command: &str, started: SystemTime) -> WindowPushes {
        let path = self.endpoint.path().trim_end_matches('/');
        let ingest = if path.ends_with("/ingest") {
            path.to_owned()
        } else {
            format!("{path}/ingest")
        };
        let endpoint = self.endpoint.clone();
        WindowPushes {
            ingest,
            name: application_name(command, pid),
            started_s: started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            pid,
            comment: format!(
                "memscope {}: pid {pid} ({command})",
                env!("CARGO_PKG_VERSION")
            ),
            build_ids: HashMap::new(),
            background: Background::start(
                format!("--pprof-push {}", self.url),
                "profile",
                move |outgoing: &Outgoing| {
                    endpoint.post(&outgoing.target, "application/octet-stream", &outgoing.body)
                },
            ),
            queued: 0,
            url: self.url,
        }
    }
}

/// A window's profile on its way: the ingest path and query, the body.
struct Outgoing {
    target: String,
    body: Vec<u8>,
}

/// The pushes of one session.
pub struct WindowPushes {
    url: String,
    ingest: String,
    name: String,
    /// The session's start, Unix seconds.
    started_s: f64,
    pid: u32,
    comment: String,
    /// Read once per object, not per window.
    build_ids: HashMap<String, Option<String>>,
    background: Background<Outgoing>,
    queued: u64,
}

impl WindowPushes {
    /// Queues the profile of the window `start_s`..`end_s` (seconds into
    /// the session) with its `sites` (see `report::window_sites`).
    pub fn send(&mut self, (start_s, end_s): (f64, f64), sites: &[Site]) {
        let modules = self.modules(sites);
        let span = Span {
            comment: self.comment.clone(),
            time_nanos: ((self.started_s + start_s) * 1e9) as i64,
            duration_s: end_s - start_s,
        };
        let body = match gzipped(&profile_of(&span, sites, &modules)) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!("window profile not pushed: {error}");
                return;
            }
        };
        let target = self.target(self.started_s + start_s, self.started_s + end_s);
        self.background.send(Outgoing { target, body });
        self.queued += 1;
    }

    /// Waits for the queued profiles (`background::DRAIN` at most); how
    /// many went out, or an error when some did not.
    pub fn finish(self) -> Result<u64, PushError> {
        let (url, queued) = (self.url, self.queued);
        let delivery = self.background.finish();
        match missing(queued, &delivery) {
            None => Ok(delivery.delivered),
            Some(message) => Err(PushError::Failed { url, message }),
        }
    }

    /// The sites' native objects with their build ids.
    fn modules(&mut self, sites: &[Site]) -> Vec<Module> {
        crate::build_id::native_paths(sites)
            .into_iter()
            .map(|path| {
                let pid = self.pid;
                let build_id = self
                    .build_ids
                    .entry(path.to_owned())
                    .or_insert_with(|| {
                        crate::build_id::read(&crate::process_maps::through_root(
                            pid,
                            Path::new(path),
                        ))
                    })
                    .clone();
                Module {
                    path: path.to_owned(),
                    build_id,
                }
            })
            .collect()
    }

    /// The ingest path and its query for a window from `from` to `until`
    /// (Unix seconds): rounded to whole seconds, as Pyroscope takes them,
    /// so that windows following each other get spans that do too.
    fn target(&self, from: f64, until: f64) -> String {
        let from = from.round() as u64;
        let until = (until.round() as u64).max(from + 1);
        format!(
            "{}?name={}&from={from}&until={until}&format=pprof&spyName=memscope",
            self.ingest,
            query_value(&self.name)
        )
    }
}

/// What was not pushed, in words, or None when everything was.
fn missing(queued: u64, delivery: &Delivery) -> Option<String> {
    let mut parts = Vec::new();
    if delivery.failed > 0 {
        parts.push(format!(
            "{} refused or unreachable ({})",
            delivery.failed,
            delivery.last_error.as_deref().unwrap_or("no answer")
        ));
    }
    if delivery.dropped > 0 {
        parts.push(format!(
            "{} dropped while the server did not keep up",
            delivery.dropped
        ));
    }
    if delivery.abandoned {
        let left = queued.saturating_sub(delivery.delivered + delivery.failed);
        parts.push(format!("{left} still queued when memscope ended"));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "{} of {} window profiles not pushed: {}",
            queued + delivery.dropped - delivery.delivered,
            queued + delivery.dropped,
            parts.join("; ")
        )
    })
}

/// `memscope.PROGRAM{pid=PID}`: Pyroscope's application name with a label,
/// the program's file name reduced to the characters names may hold.
fn application_name(command: &str, pid: u32) -> String {
    let program = command
        .split_whitespace()
        .next()
        .and_then(|word| word.rsplit('/').next())
        .unwrap_or_default();
    let program: String = program
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let program = if program.is_empty() {
        "process".to_owned()
    } else {
        program
    };
    format!("memscope.{program}{{pid={pid}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_names_the_program_and_the_window() {
        let started = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let pushes = PprofPush::parse("http://pyroscope:4040")
            .expect("parses")
            .start(42, "./server 10", started);
        assert_eq!(
            pushes.target(1_000_010.2, 1_000_020.4),
            "/ingest?name=memscope.server%7Bpid%3D42%7D&from=1000010&until=1000020&format=pprof&spyName=memscope"
        );
        // A window inside one second still spans one.
        assert!(pushes.target(7.25, 7.4).contains("&from=7&until=8&"));
        assert!(pushes.target(7.25, 7.5).contains("&from=7&until=8&"));
        let pushes = PprofPush::parse("http://relay/pyroscope/ingest")
            .expect("parses")
            .start(1, "x", started);
        assert!(
            pushes
                .target(5.0, 6.0)
                .starts_with("/pyroscope/ingest?name=")
        );
        assert!(PprofPush::parse("https://pyroscope").is_err());
    }

    #[test]
    fn odd_commands_give_plain_names() {
        assert_eq!(
            application_name("/opt/my app{x}/srv\x1b --flag", 7),
            "memscope.my{pid=7}"
        );
        assert_eq!(application_name("", 7), "memscope.process{pid=7}");
    }

    #[test]
    fn what_was_not_pushed_is_counted() {
        let all = Delivery {
            delivered: 3,
            ..Delivery::default()
        };
        assert_eq!(missing(3, &all), None);
        let some = Delivery {
            delivered: 1,
            failed: 1,
            dropped: 2,
            last_error: Some("HTTP 500".into()),
            ..Delivery::default()
        };
        assert_eq!(
            missing(2, &some).as_deref(),
            Some(
                "3 of 4 window profiles not pushed: 1 refused or unreachable (HTTP 500); 2 dropped while the server did not keep up"
            )
        );
    }
}
