use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use crate::support::*;

/// `attach` to a running fixture: only what happens after attach counts;
/// frees of blocks allocated before attach are unknown frees, not negative
/// live bytes.
#[test]
fn attach_counts_only_what_follows_it() {
    if !bpf_available() {
        return;
    }
    let mut target = Command::new(fixture("attach_target"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fixture starts");
    let mut target_out = BufReader::new(target.stdout.take().expect("stdout"));
    let mut line = String::new();
    target_out.read_line(&mut line).expect("handshake");
    assert_eq!(line, "ready\n");

    let dir = output_dir("attach");
    let mut memscope = Command::new(MEMSCOPE)
        .arg("attach")
        .arg("-o")
        .arg(&dir)
        .arg(target.id().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memscope starts");
    let mut memscope_err = BufReader::new(memscope.stderr.take().expect("stderr"));
    let mut banner = String::new();
    memscope_err
        .read_line(&mut banner)
        .expect("memscope banner");
    assert!(banner.starts_with("memscope: profiling pid"), "{banner}");

    target
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("release the fixture");
    line.clear();
    target_out.read_line(&mut line).expect("fixture done");
    assert_eq!(line, "done\n");
    assert!(target.wait().expect("fixture exits").success());
    let status = memscope.wait().expect("memscope exits with its target");
    assert!(status.success(), "memscope failed: {status}");

    let report = read_report(&dir);
    assert_eq!(
        figures(site(&report, "attach_leak_site")),
        (614_400, 300, 614_400, 300)
    );
    assert_eq!(
        figures(site(&report, "attach_churn_site")),
        (0, 0, 64_000, 1000)
    );
    assert!(
        !report
            .sites
            .iter()
            .any(|s| s.frames[0].function == "before_attach_site"),
        "allocations before attach were counted"
    );
    assert_eq!(report.completeness.unknown_frees, 500);
    assert_eq!(report.totals.live_bytes, 614_400);
    assert_nothing_lost(&report);
}
