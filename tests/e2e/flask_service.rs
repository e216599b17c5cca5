//! examples/flask-service under gunicorn (2 workers of 2 threads), memscope
//! attached to the master: each worker's /analyze leak is found to the
//! byte. The virtualenv comes from PyPI the first time (target/flask-venv,
//! shared with `cargo xtask demo flask`).

#[path = "../../examples/flask-service/harness.rs"]
mod service;

use std::{collections::BTreeMap, path::Path, process::Stdio};

use memscope::{
    processes::Following,
    report::{ProcessReport, Site},
};

use crate::support::*;
use service::{Attached, Gunicorn, PAYLOAD_MALLOC_BYTES, VenvState};

/// /analyze requests sent while memscope is attached, at least.
const ANALYZE_REQUESTS: u64 = 40;
/// Each worker serves at least this many of them, or more are sent.
const MIN_PER_WORKER: u64 = 5;
/// Requests sent at most while waiting for either: memscope names the
/// handler at a maps refresh (every 0.5 s), later when the machine is busy
/// with the other tests; a request takes a few milliseconds.
const MAX_REQUESTS: u64 = 4000;

fn or_panic<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|error| panic!("{error:#}"))
}

#[test]
fn flask_analyze_leak_is_found_to_the_byte_in_each_gunicorn_worker() {
    if !bpf_available() {
        return;
    }
    let workspace = workspace_file("")
        .canonicalize()
        .expect("the workspace exists");
    let (venv, state) = or_panic(service::ensure_venv(&workspace));
    if let VenvState::Created { packages } = state {
        eprintln!("created {} from PyPI:\n{packages}", venv.display());
    }
    let line = or_panic(service::allocation_line(&workspace));
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join("flask-gunicorn.log");
    let server = or_panic(Gunicorn::start(&workspace, &venv, &log));
    let workers = server.workers();
    or_panic(server.warm_up(&["/analyze"]));

    let dir = output_dir("flask_service");
    let dir_arg = dir.to_string_lossy();
    let memscope = or_panic(Attached::start(
        Path::new(MEMSCOPE),
        server.pid(),
        &[
            "-o",
            &dir_arg,
            "--per-process",
            "--request-fn",
            "app:analyze",
        ],
        Stdio::null(),
    ));
    // Requests count from when memscope has named the handler in a
    // worker, which it does from the first stacks it sees there.
    let mut served = BTreeMap::new();
    let mut found = std::collections::BTreeSet::new();
    send_analyze_until(&server, &mut served, |_| {
        for line in memscope.said() {
            if let Some(pid) = line
                .strip_prefix("memscope: request handler app:analyze found in ")
                .and_then(|rest| rest.rsplit_once("(pid "))
                .and_then(|(_, pid)| pid.trim_end_matches(')').parse::<u32>().ok())
            {
                found.insert(pid);
            }
        }
        found.len() == service::WORKERS
    });
    let before_requests: u64 = served.values().sum();
    send_analyze_until(&server, &mut served, |served| {
        let sent: u64 = served.values().sum::<u64>() - before_requests;
        sent >= ANALYZE_REQUESTS
            && served.len() == service::WORKERS
            && served.values().all(|&n| n >= MIN_PER_WORKER)
    });
    let counted = served.values().sum::<u64>() - before_requests;
    let status = or_panic(memscope.stop());
    assert!(status.success(), "memscope attach: {status}");
    let master = server.pid();
    let status = or_panic(server.stop());
    assert!(status.success(), "gunicorn: {status}");

    let report = read_report(&dir);
    assert_eq!(report.target.pid, master);
    assert_eq!(report.processes[0].pid, master, "{:#?}", report.processes);
    assert_eq!(
        served.keys().copied().collect::<Vec<_>>(),
        workers,
        "every worker served /analyze"
    );
    for (&pid, &count) in &served {
        let worker = report
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .unwrap_or_else(|| panic!("worker {pid} not in processes: {:#?}", report.processes));
        assert_eq!(worker.ppid, Some(master), "{worker:#?}");
        assert_eq!(worker.following, Following::Attached, "{worker:#?}");
        let leak = analyze_site(worker, line);
        assert_eq!(
            (leak.kind, leak.live_bytes, leak.live_count),
            (
                memscope::report::SiteKind::Malloc,
                count * PAYLOAD_MALLOC_BYTES,
                count
            ),
            "worker {pid} served {count} /analyze: {leak:#?}"
        );
    }
    let c = &report.completeness;
    assert_eq!(
        (
            c.map_full,
            c.missed_returns,
            c.lost_children,
            c.unfollowed_processes,
            c.late_processes
        ),
        (0, 0, 0, 0, 0),
        "{c:?}"
    );
    assert_requests(&report, counted, line);
}

/// Every /analyze request memscope counted allocated, retained and kept
/// one payload, at analyze's allocation line. (Past 64 payloads a worker's
/// list of them grows through malloc, inside the request that appends:
/// those few requests keep the list's growth too, so only the median is
/// exactly one payload.)
fn assert_requests(report: &memscope::report::Report, counted: u64, line: u32) {
    let requests = report.requests.as_ref().expect("requests in the report");
    assert!(
        requests.count >= counted,
        "{} requests counted, {counted} sent once the handler was known",
        requests.count
    );
    assert!(
        requests.kept_count + 2 * 10 >= requests.count,
        "{requests:#?}"
    );
    for figure in [
        requests.alloc_bytes,
        requests.retained_bytes,
        requests.kept_bytes,
    ] {
        let figure = figure.expect("figures");
        assert_eq!(figure.p50, PAYLOAD_MALLOC_BYTES, "{requests:#?}");
        assert!(figure.max >= PAYLOAD_MALLOC_BYTES, "{requests:#?}");
    }
    let keeper = requests
        .sites
        .iter()
        .find(|s| s.frames[0].function == "analyze" && s.frames[0].line == Some(line))
        .unwrap_or_else(|| panic!("no keeping site at analyze: {:#?}", requests.sites));
    // Partial requests' blocks are theirs too.
    let tagged = requests.count + requests.partial;
    assert_eq!(
        (keeper.live_count, keeper.live_bytes),
        (tagged, tagged * PAYLOAD_MALLOC_BYTES)
    );
}

/// Sends /analyze until `done` says so (the kernel picks which worker
/// accepts a connection), counting in `served` the requests each worker
/// pid served, from the answers.
fn send_analyze_until(
    server: &Gunicorn,
    served: &mut BTreeMap<u32, u64>,
    mut done: impl FnMut(&BTreeMap<u32, u64>) -> bool,
) {
    let mut sent = 0;
    while !done(served) {
        assert!(
            sent < MAX_REQUESTS,
            "after {sent} requests the workers served {served:?}"
        );
        let body = server
            .get_json("/analyze")
            .unwrap_or_else(|e| panic!("127.0.0.1:{}: {e:#}", server.port()));
        *served
            .entry(or_panic(service::served_by(&body)))
            .or_default() += 1;
        sent += 1;
    }
}

/// The worker's one site of `analyze`'s payloads: first frame `analyze`,
/// in app.py, at the line of the allocation. (Past 64 payloads the list
/// holding them grows through malloc too, at the next line.)
fn analyze_site(worker: &ProcessReport, line: u32) -> &Site {
    let matches: Vec<&Site> = worker
        .sites
        .iter()
        .filter(|s| {
            s.frames
                .first()
                .is_some_and(|f| f.function == "analyze" && f.line == Some(line))
        })
        .collect();
    assert_eq!(matches.len(), 1, "one analyze site: {:#?}", worker.sites);
    let frame = &matches[0].frames[0];
    let file = frame.file.as_deref().map(Path::new);
    assert_eq!(
        (
            file.and_then(Path::file_name).and_then(|f| f.to_str()),
            frame.line,
            frame.language,
        ),
        (
            Some("app.py"),
            Some(line),
            memscope::report::Language::Python
        ),
        "{frame:#?}"
    );
    matches[0]
}
