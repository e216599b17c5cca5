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
    let (report, _) = run_command("pprof", &[server.clone().into_os_string()], &[]);
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

    // Each mapping carries its object's build id, as go tool pprof reads it.
    let raw = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&profile)
        .env("HOME", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .expect("go tool pprof runs");
    let raw = String::from_utf8_lossy(&raw.stdout).into_owned();
    let server_id = memscope::build_id::read(&server).expect("gcc gives a build id");
    let mapping = format!("{} {server_id} [FN][FL][LN][IN]", server.display());
    assert!(
        raw.lines().any(|l| l.ends_with(&mapping)),
        "{mapping} not in:\n{raw}"
    );

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

/// Check `memscope diff` between 10 and 100 requests of the example server:
/// its leak grows by exactly 23 blocks of 64 KiB and comes first, in red in
/// the differential flamegraph; and that a copied output directory renders
/// again as nobody, after the process is gone.
#[test]
fn diff_of_10_and_100_requests_puts_the_leak_first_and_red() {
    if !bpf_available() {
        return;
    }
    let server = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("diff-leaky-server");
    let source = workspace_file("examples/leaky-server/leaky-server.c");
    assert!(
        compile_c(&source, &server, &[])
            .expect("gcc runs")
            .success()
    );
    let run = |test: &str, requests: &str| {
        let (report, _) = run_command(
            test,
            &[server.clone().into_os_string(), requests.into()],
            &[],
        );
        assert_eq!(
            figures(site(&report, "cache_report_result")).0,
            (requests.parse::<u64>().expect("number") / 4) * 65_536
        );
        output_dir_path(test)
    };
    let (base, new) = (run("diff_10", "10"), run("diff_100", "100"));
    let svg = output_dir("diff_svg").join("diff.svg");
    let output = Command::new(MEMSCOPE)
        .arg("diff")
        .arg(&base)
        .arg(&new)
        .arg("-o")
        .arg(&svg)
        .output()
        .expect("memscope diff runs");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{table}{}", stderr_of(&output));
    // 2 blocks after 10 requests, 25 after 100.
    let first = table
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("CHANGE"))
        .nth(1)
        .unwrap_or_default();
    let columns: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(
        columns[..5],
        ["+1.4", "MiB", "131072", "1638400", "cache_report_result"][..],
        "{table}"
    );
    let svg = std::fs::read_to_string(&svg).expect("diff.svg");
    let frame = svg
        .split("<g>")
        .find(|g| g.contains("<title>cache_report_result "))
        .unwrap_or_else(|| panic!("no cache_report_result frame in diff.svg"));
    // inferno gives the change as a share of the new figure: 23 of 25 blocks.
    assert!(
        frame.contains("1,638,400 bytes, 100.00%; +92.00%"),
        "{frame}"
    );
    assert!(frame.contains("fill=\"rgb(255,"), "not red: {frame}");
    let json = Command::new(MEMSCOPE)
        .args(["diff", "--format", "json"])
        .arg(&base)
        .arg(&new)
        .output()
        .expect("memscope diff runs");
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("diff JSON");
    assert_eq!(json["changes"][0]["chain"][0], "cache_report_result");
    assert_eq!(json["changes"][0]["new"], 1_638_400);

    // A copy, read by nobody: the same table and the same files.
    let copy = std::path::Path::new("/tmp").join(format!("memscope-copied-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    let status = Command::new("cp")
        .args(["-r", "--no-preserve=ownership"])
        .arg(&new)
        .arg(&copy)
        .status()
        .expect("cp runs");
    assert!(status.success());
    let rendered = copy.join("rendered");
    let as_nobody = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod -R a+rX {0} && chmod a+w {0}",
            copy.display()
        ))
        .status()
        .expect("chmod runs");
    assert!(as_nobody.success());
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(MEMSCOPE)
        .arg("report")
        .arg(&copy)
        .arg("-o")
        .arg(&rendered)
        .output()
        .expect("setpriv runs");
    assert!(output.status.success(), "{}", stderr_of(&output));
    let original = Command::new(MEMSCOPE)
        .arg("report")
        .arg(&new)
        .output()
        .expect("memscope report runs");
    assert_eq!(output.stdout, original.stdout, "the same table");
    for name in memscope::output::FILES {
        let read = |dir: &std::path::Path| std::fs::read(dir.join(name)).expect(name);
        assert_eq!(read(&rendered), read(&new), "{name} rendered again");
    }
    let _ = std::fs::remove_dir_all(&copy);
}

/// Check that --pprof-push sends the session's window (one, for a run
/// shorter than --window) to the ingest endpoint of a Pyroscope-style
/// server, named for the program, as a pprof holding what leak_basic
/// leaked; that a refused push fails the run with the files written (exit
/// 8); and that a URL memscope cannot use is refused before anything is
/// attached. (windows.rs checks the figures window by window.)
#[test]
fn pprof_push_sends_the_profile_to_the_ingest_endpoint() {
    if !bpf_available() {
        return;
    }
    let (url, pushes) = http_receiver("200 OK");
    let dir = output_dir("pprof_push");
    let output = Command::new(MEMSCOPE)
        .args(["run", "--pprof-push", &url, "-o"])
        .arg(&dir)
        .arg("--")
        .arg(fixture("leak_basic"))
        .output()
        .expect("memscope runs");
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains(&format!("memscope: pushed 1 window profiles to {url}")),
        "{}",
        stderr_of(&output)
    );
    let pushes: Vec<_> = pushes.try_iter().collect();
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    let (request, body) = &pushes[0];
    let report = read_report(&dir);
    let prefix = format!(
        "POST /ingest?name=memscope.fixture-leak_basic%7Bpid%3D{}%7D&from=",
        report.target.pid
    );
    assert!(request.starts_with(&prefix), "{request}");
    assert!(
        request.contains("&format=pprof&spyName=memscope HTTP/1.1"),
        "{request}"
    );
    let pushed = pprof_of(body);
    let written =
        pprof_of(&std::fs::read(dir.join(memscope::output::PROFILE_PB_GZ)).expect("profile"));
    for site in report.sites.iter().filter(|s| s.live_bytes > 0) {
        let function = &site.frames[0].function;
        assert_eq!(
            sample_values(&pushed, function)[3],
            sample_values(&written, function)[3],
            "inuse_space of {function}"
        );
    }

    let (url, _pushes) = http_receiver("500 Internal Server Error");
    let dir = output_dir("pprof_push_refused");
    let output = Command::new(MEMSCOPE)
        .args(["run", "--pprof-push", &url, "-o"])
        .arg(&dir)
        .arg("--")
        .arg(fixture("leak_basic"))
        .output()
        .expect("memscope runs");
    assert_eq!(output.status.code(), Some(8), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("1 of 1 window profiles not pushed: 1 refused or unreachable"),
        "{}",
        stderr_of(&output)
    );
    assert!(
        stderr_of(&output).contains("answered \"HTTP/1.1 500 Internal Server Error\""),
        "{}",
        stderr_of(&output)
    );
    assert!(dir.join(memscope::output::PROFILE_PB_GZ).exists());

    let output = Command::new(MEMSCOPE)
        .args(["run", "--pprof-push", "https://pyroscope:4040", "--"])
        .arg(fixture("leak_basic"))
        .output()
        .expect("memscope runs");
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains("only http://HOST[:PORT][/PATH] is supported"),
        "{}",
        stderr_of(&output)
    );
    assert!(output.stdout.is_empty(), "nothing was profiled");
}
