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
    attach_and_check("attach", Command::new(fixture("attach_target")), || {});
}

/// Check that a daemon whose libc was replaced on disk after it started
/// (a package upgrade) is probed and named through the file it really
/// maps.
#[test]
fn attach_probes_the_libc_a_process_maps_after_an_upgrade_replaced_it() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("replaced-libc-lib");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let libc = dir.join("libc.so.6");
    std::fs::copy("/lib/x86_64-linux-gnu/libc.so.6", &libc).expect("copy libc");
    let mut target = Command::new(fixture("attach_target"));
    target.env("LD_LIBRARY_PATH", &dir);
    attach_and_check("attach-replaced", target, || {
        // The upgrade: another file renamed over the one mapped.
        let new = dir.join("libc.so.6.new");
        std::fs::copy("/bin/true", &new).expect("new file");
        std::fs::rename(&new, &libc).expect("rename over libc");
    });
}

/// Starts `target` (the attach fixture), runs `before_attach` once it is
/// ready, attaches, and checks the figures of what followed.
fn attach_and_check(test: &str, mut target: Command, before_attach: impl FnOnce()) {
    let mut target = target
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fixture starts");
    let mut target_out = BufReader::new(target.stdout.take().expect("stdout"));
    let mut line = String::new();
    target_out.read_line(&mut line).expect("handshake");
    assert_eq!(line, "ready\n");
    before_attach();

    let dir = output_dir(test);
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
