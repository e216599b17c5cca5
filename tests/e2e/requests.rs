//! Requests (`--request-fn`): a pre-fork fixture server whose handler keeps
//! 64 KiB per request, served on two threads in each of two processes.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use memscope::requests::Percentiles;

use crate::support::*;

const KEEP: u64 = 64 << 10;
/// What one request allocates: the kept block and 3 x 4000 of scratch.
const ALLOCATED: u64 = KEEP + 3 * 4000;
/// Requests each process serves.
const SERVED: u64 = 40;

fn exactly(bytes: u64) -> Option<Percentiles> {
    Some(Percentiles {
        p50: bytes,
        p95: bytes,
        max: bytes,
    })
}

/// Starts the fixture server, attaches `memscope attach --request-fn
/// handle_request ARGS` to it, has each process serve `SERVED` requests,
/// ends both and returns the output directory.
fn serve_attached(test: &str, args: &[&str]) -> std::path::PathBuf {
    let mut server = Command::new(fixture("request_server"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fixture starts");
    let mut to_server = server.stdin.take().expect("stdin");
    let from_server = lines(server.stdout.take().expect("stdout"));
    wait_for(&from_server, |l| l.starts_with("ready"), "ready");

    let dir = output_dir(test);
    let args = [&["--request-fn", "handle_request"][..], args].concat();
    let (mut memscope, said) = attach_memscope(server.id(), &dir, &args);
    wait_for(
        &said,
        |l| l.starts_with("memscope: request handler handle_request found"),
        "handler found",
    );

    writeln!(to_server, "serve {SERVED}").expect("fixture reads");
    wait_for(&from_server, |l| l == "done", "requests served");
    drop(to_server);
    assert!(server.wait().expect("fixture ends").success());
    assert!(memscope.wait().expect("memscope ends").success());
    dir
}

/// Check that `attach --request-fn handle_request` gives every request its
/// exact figures (allocated, retained, kept), keeps the two processes' and
/// threads' requests apart, and names the site that keeps.
#[test]
fn each_request_retains_and_keeps_exactly_its_64_kib() {
    if !bpf_available() {
        return;
    }
    let report = read_report(&serve_attached("requests", &[]));
    assert_nothing_lost(&report);
    let requests = report.requests.as_ref().expect("requests in the report");
    assert_eq!(requests.function, "handle_request");
    assert_eq!(
        (requests.count, requests.open, requests.partial),
        (2 * SERVED, 0, 0)
    );
    // The last 10 of each process have no tenth successor.
    assert_eq!(requests.kept_count, 2 * (SERVED - 10));
    assert_eq!(requests.alloc_bytes, exactly(ALLOCATED));
    assert_eq!(requests.retained_bytes, exactly(KEEP));
    assert_eq!(requests.kept_bytes, exactly(KEEP));
    let largest = &requests.largest[0];
    assert_eq!((largest.alloc_count, largest.retained_bytes), (4, KEEP));
    assert_eq!(requests.sites.len(), 1, "{:#?}", requests.sites);
    let keeper = &requests.sites[0];
    let names: Vec<&str> = keeper.frames.iter().map(|f| f.function.as_str()).collect();
    assert_eq!(&names[..2], ["keep_site", "handle_request"]);
    assert_eq!(keeper.live_bytes, 2 * SERVED * KEEP);
    assert_eq!(keeper.live_count, 2 * SERVED);
}

/// Check that with `--request-fn`, `--alert-growth` is per request: the
/// first request over it alerts with what it kept and where, and the rest
/// within the minute are held back.
#[test]
fn a_request_keeping_more_than_alert_growth_alerts_with_its_site() {
    if !bpf_available() {
        return;
    }
    let dir = serve_attached("requests_alert", &["--alert-growth", "32KB"]);
    let text = std::fs::read_to_string(dir.join("alerts.jsonl")).expect("alerts.jsonl");
    let alerts: Vec<memscope::alert::Alert> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("an alert per line"))
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let alert = &alerts[0];
    assert_eq!(alert.kind, memscope::alert::AlertKind::Request);
    assert_eq!((alert.value_bytes, alert.threshold_bytes), (KEEP, 32 << 10));
    assert!(alert.request.is_some(), "{alert:#?}");
    let site = &alert.top_sites[0];
    assert!(
        site.site.starts_with("keep_site <- handle_request"),
        "{site:?}"
    );
    assert_eq!(site.growth_bytes, KEEP as i64);
    let report = read_report(&dir);
    assert_eq!(report.alerts, alerts);
}
