//! `--pprof-push URL`: profile.pb.gz sent at the end to a Grafana
//! Pyroscope server's ingest endpoint (`POST /ingest?format=pprof`, the
//! body the profile itself), where a fleet's profiles are kept and
//! compared over time.

use crate::{
    http::{Endpoint, query_value},
    report::Report,
};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(
        "--pprof-push {0}: only http://HOST[:PORT][/PATH] is supported, a Pyroscope server's address (http://pyroscope:4040) or its /ingest URL; for https, push through a local relay such as Grafana Alloy"
    )]
    Unsupported(String),
    #[error(
        "cannot push the profile to {url}: {message} (the files are written: push DIR/profile.pb.gz again later)"
    )]
    Failed { url: String, message: String },
    #[error(transparent)]
    Render(#[from] super::OutputError),
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

    /// Sends the report's profile, covering the `duration_s` up to
    /// `until` (Unix seconds).
    pub fn push(&self, report: &Report, until: u64) -> Result<(), PushError> {
        let body = super::pprof::render(report)?;
        self.endpoint
            .post(
                &self.target(report, until),
                "application/octet-stream",
                &body,
            )
            .map_err(|message| PushError::Failed {
                url: self.url.clone(),
                message,
            })
    }

    /// The ingest path and its query.
    fn target(&self, report: &Report, until: u64) -> String {
        let path = self.endpoint.path().trim_end_matches('/');
        let ingest = if path.ends_with("/ingest") {
            path.to_owned()
        } else {
            format!("{path}/ingest")
        };
        let from = until.saturating_sub(report.duration_s.ceil() as u64);
        format!(
            "{ingest}?name={}&from={from}&until={until}&format=pprof&spyName=memscope",
            query_value(&application_name(report))
        )
    }
}

/// `memscope.PROGRAM{pid=PID}`: Pyroscope's application name with a label,
/// the program's file name reduced to the characters names may hold.
fn application_name(report: &Report) -> String {
    let program = report
        .target
        .command
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
    format!("memscope.{program}{{pid={}}}", report.target.pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::sample_report;

    #[test]
    fn the_target_names_the_program_and_the_span() {
        let report = sample_report();
        let push = PprofPush::parse("http://pyroscope:4040").expect("parses");
        let duration = report.duration_s.ceil() as u64;
        assert_eq!(
            push.target(&report, 1_000_000),
            format!(
                "/ingest?name=memscope.server%7Bpid%3D{}%7D&from={}&until=1000000&format=pprof&spyName=memscope",
                report.target.pid,
                1_000_000 - duration
            )
        );
        let push = PprofPush::parse("http://relay/pyroscope/ingest").expect("parses");
        assert!(
            push.target(&report, 5)
                .starts_with("/pyroscope/ingest?name=")
        );
        assert!(PprofPush::parse("https://pyroscope").is_err());
    }

    #[test]
    fn odd_commands_give_plain_names() {
        let mut report = sample_report();
        report.target.command = "/opt/my app{x}/srv\x1b --flag".into();
        report.target.pid = 7;
        assert_eq!(application_name(&report), "memscope.my{pid=7}");
        report.target.command = String::new();
        assert_eq!(application_name(&report), "memscope.process{pid=7}");
    }
}
