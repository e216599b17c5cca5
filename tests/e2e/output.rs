//! The output directory, written as root: never through a symlink, and
//! handed to the user who ran sudo.

use std::{os::unix::fs::MetadataExt as _, process::Command};

use crate::support::*;

#[test]
fn output_dir_symlink_is_not_followed() {
    if !bpf_available() {
        return;
    }
    let base = output_dir("output_dir_symlink");
    let elsewhere = base.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).expect("target dir");
    let link = base.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
    let output = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(&link)
        .arg("--")
        .arg(fixture("leak_basic"))
        .output()
        .expect("memscope runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(8), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!(
            "memscope: cannot write the report to {0}: {0} is a symbolic link: memscope does not follow it, give it a directory",
            link.display()
        )
    );
    let left: Vec<_> = std::fs::read_dir(&elsewhere).expect("list").collect();
    assert!(left.is_empty(), "written through the symlink: {left:?}");
    // The table still reaches the user.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("leak_site <- main"), "{stdout}");
}

#[test]
fn sudo_user_owns_the_output() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("sudo_user_owns_the_output");
    let output = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(&dir)
        .arg("--")
        .arg(fixture("leak_basic"))
        .env("SUDO_UID", "12345")
        .env("SUDO_GID", "12345")
        .output()
        .expect("memscope runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ids = |path: &std::path::Path| {
        let m = std::fs::symlink_metadata(path).expect("stat");
        (m.uid(), m.gid(), m.mode() & 0o022)
    };
    assert_eq!(ids(&dir), (12345, 12345, 0), "directory");
    for name in memscope::output::FILES {
        assert_eq!(ids(&dir.join(name)), (12345, 12345, 0), "{name}");
    }
}

/// Check that profile.pb.gz reads in the real `go tool pprof`: the example
/// server's leaking function with its exact in-use bytes, and the churning
/// one with its exact allocation count; and that `memscope report DIR`
/// renders the same profile again from the saved report.
#[test]
fn go_tool_pprof_reads_the_profile_with_exact_figures() {
    if !bpf_available() {
        return;
    }
    let server = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pprof-leaky-server");
    let source = workspace_file("examples/leaky-server/leaky-server.c");
    assert!(
        compile_c(&source, &server, &[])
            .expect("gcc runs")
            .success()
    );
    let (report, _) = run_command("pprof", &[server.into_os_string()], &[]);
    let dir = output_dir_path("pprof");
    let profile = dir.join(memscope::output::PROFILE_PB_GZ);
    let pprof = |index: &str, unit: &str| {
        let output = Command::new("go")
            .args(["tool", "pprof", "-top", "-nodecount=200"])
            .arg(format!("-unit={unit}"))
            .arg(format!("-sample_index={index}"))
            .arg(&profile)
            .env("HOME", env!("CARGO_TARGET_TMPDIR"))
            .output()
            .expect("go tool pprof runs (cargo xtask setup installs golang-go)");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        text
    };
    let line = |text: &str, function: &str| {
        text.lines()
            .find(|l| l.split_whitespace().last() == Some(function))
            .unwrap_or_else(|| panic!("no {function} in:\n{text}"))
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let inuse = pprof("inuse_space", "B");
    assert_eq!(line(&inuse, "cache_report_result"), "3276800B", "{inuse}");
    // pprof sums a function's sites: every call it makes to the allocator.
    let calls: u64 = report
        .sites
        .iter()
        .filter(|s| s.frames[0].function == "read_request")
        .map(|s| s.alloc_count)
        .sum();
    assert!(calls >= 667, "{calls}");
    let allocs = pprof("alloc_objects", "minimum");
    assert_eq!(line(&allocs, "read_request"), calls.to_string(), "{allocs}");

    // Rendered again from report.json alone: the same bytes.
    let again = output_dir("pprof_again");
    let status = Command::new(MEMSCOPE)
        .arg("report")
        .arg(&dir)
        .arg("-o")
        .arg(&again)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("memscope report runs");
    assert!(status.success());
    let read = |path: &std::path::Path| std::fs::read(path).expect("profile.pb.gz");
    assert_eq!(
        read(&again.join(memscope::output::PROFILE_PB_GZ)),
        read(&profile)
    );
    // And to stdout, as the formats say.
    let stdout = |format: &str| {
        let output = Command::new(MEMSCOPE)
            .args(["report", "--format", format])
            .arg(&dir)
            .output()
            .expect("memscope report runs");
        assert!(output.status.success());
        output.stdout
    };
    assert_eq!(stdout("pprof"), read(&profile));
    assert_eq!(
        stdout("folded"),
        read(&dir.join(memscope::output::STACKS_FOLDED))
    );
}
