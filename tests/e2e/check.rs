//! `memscope check`: the CI gate, on fixtures with and without leaks and
//! on the example server and its fix.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::support::*;

/// `memscope check ARGS -- COMMAND` with `env`; its exit code, stdout and
/// stderr.
fn check(
    test: &str,
    args: &[&str],
    command: &[&Path],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let dir = output_dir(test);
    let output = Command::new(MEMSCOPE)
        .arg("check")
        .arg("-o")
        .arg(&dir)
        .args(args)
        .arg("--")
        .args(command)
        .env_remove("GITHUB_ACTIONS")
        .envs(env.iter().copied())
        .output()
        .expect("memscope runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("{stdout}{stderr}");
    (output.status.code().unwrap_or(-1), stdout, stderr)
}

/// The clean fixture, and its twin built with a 10 KiB leak per iteration.
fn twins() -> (PathBuf, PathBuf) {
    let leaky = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixture-ci_service-leaky");
    let status = compile_c(
        &workspace_file("tests/fixtures/ci_service.c"),
        &leaky,
        &["-DLEAKY"],
    )
    .expect("gcc runs");
    assert!(status.success());
    (fixture("ci_service"), leaky)
}

fn scratch_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// The libc frames below main are unwound by its .eh_frame rules.
const LEAK_LINE: &str = "leak_per_iteration <- work <- main <- __libc_start_call_main <- ...";

/// Check that a program with a global table passes with the defaults and
/// its twin that leaks per iteration fails naming the site, in the summary,
/// the JUnit XML and GitHub's annotations; and that a suppression of that
/// site makes it pass, an unused one being listed.
#[test]
fn a_leak_that_grows_with_work_fails_and_a_global_table_passes() {
    if !bpf_available() {
        return;
    }
    let (clean, leaky) = twins();
    let (code, stdout, _) = check("check_clean", &[], &[&clean], &[]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.starts_with("memscope check: PASSED"), "{stdout}");

    let junit = scratch_file("check-junit.xml");
    let workspace = workspace_file("").display().to_string();
    let (code, stdout, _) = check(
        "check_leaky",
        &["--junit", junit.to_str().expect("utf-8 path")],
        &[&leaky],
        &[("GITHUB_ACTIONS", "true"), ("GITHUB_WORKSPACE", &workspace)],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.starts_with("memscope check: FAILED (1 of 1 checks)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{LEAK_LINE} leaks: 307200 bytes (300.0 KiB) live at the end"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("[fixtures/ci_service.c:33]"), "{stdout}");
    assert!(
        stdout.contains("::error file=tests/fixtures/ci_service.c,line=33,title=memscope check::leak_per_iteration"),
        "{stdout}"
    );
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file");
    let parsed = quick_junit::Report::deserialize_from_str(&xml).expect("JUnit XML parses");
    let suite = &parsed.test_suites[0];
    assert_eq!((suite.tests, suite.failures), (2, 2), "{xml}");
    assert!(
        suite
            .test_cases
            .iter()
            .any(|c| c.name.as_str() == format!("leaks: {LEAK_LINE}")),
        "{xml}"
    );

    let suppress = scratch_file("check-suppress.txt");
    std::fs::write(
        &suppress,
        "# accepted for now\nleak:leak_per_*\nnot_a_function\n",
    )
    .expect("suppressions written");
    let (code, stdout, _) = check(
        "check_suppressed",
        &["--suppress", suppress.to_str().expect("utf-8 path")],
        &[&leaky],
        &[],
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("suppressed by `leak:leak_per_*` (line 2): 1 sites, 300.0 KiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("unused suppression (line 3): not_a_function"),
        "{stdout}"
    );
}

/// Check that a baseline of the clean build accepts its table and fails
/// the twin on the new site, and that a leak in a forked child is caught.
#[test]
fn a_baseline_fails_the_new_leak_and_a_forked_child_is_followed() {
    if !bpf_available() {
        return;
    }
    let (clean, leaky) = twins();
    let baseline = scratch_file("check-baseline.json");
    let baseline_arg = baseline.to_str().expect("utf-8 path");
    let (code, stdout, stderr) = check(
        "check_save_baseline",
        &["--save-baseline", baseline_arg],
        &[&clean],
        &[],
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(stderr.contains("wrote a baseline of 1 sites"), "{stderr}");
    let saved: memscope::gate::Baseline =
        serde_json::from_str(&std::fs::read_to_string(&baseline).expect("baseline written"))
            .expect("baseline parses");
    assert_eq!(saved.sites[0].chain[0], "build_table");
    assert_eq!(saved.sites[0].leaked_bytes, 64 * 4096);

    let (code, stdout, _) = check(
        "check_baseline",
        &["--baseline", baseline_arg],
        &[&clean],
        &[],
    );
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = check(
        "check_baseline_leaky",
        &["--baseline", baseline_arg],
        &[&leaky],
        &[],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{LEAK_LINE} is new: 300.0 KiB (307200 bytes) live at the end"
        )),
        "{stdout}"
    );

    let fork = Path::new("fork");
    let (code, stdout, _) = check("check_fork", &[], &[&leaky, fork], &[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(&format!("{LEAK_LINE} leaks: 307200 bytes")),
        "{stdout}"
    );
}

/// Check the project's own examples: the leaky server fails, also on
/// --max-leaked; its fix (a bounded cache) passes; and a command that
/// cannot run is memscope's failure, exit 2, said clearly.
#[test]
fn the_example_server_fails_and_its_fix_passes() {
    if !bpf_available() {
        return;
    }
    let source = workspace_file("examples/leaky-server/leaky-server.c");
    let build = |name: &str, extra: &[&str]| {
        let out = scratch_file(name);
        assert!(compile_c(&source, &out, extra).expect("gcc runs").success());
        out
    };
    let leaky = build("check-leaky-server", &[]);
    let fixed = build("check-fixed-server", &["-DBOUNDED_CACHE"]);
    let (code, stdout, _) = check("check_example", &["--max-leaked", "1MB"], &[&leaky], &[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("memscope check: FAILED (2 of 2 checks)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL --max-leaked 1.0 MiB: 3.1 MiB live at the end"),
        "{stdout}"
    );
    assert!(
        stdout.contains("cache_report_result <- handle_report"),
        "{stdout}"
    );
    let (code, stdout, _) = check(
        "check_example_fixed",
        &["--max-leaked", "1MB"],
        &[&fixed],
        &[],
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains("ok   --max-leaked 1.0 MiB: 512.0 KiB live at the end"),
        "{stdout}"
    );

    let (code, _, stderr) = check(
        "check_unrunnable",
        &[],
        &[Path::new("/nonexistent/test-suite")],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/test-suite"), "{stderr}");
    let missing = scratch_file("no-such-baseline.json");
    let (code, _, stderr) = check(
        "check_bad_baseline",
        &["--baseline", missing.to_str().expect("utf-8 path")],
        &[&fixed],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot read the baseline"), "{stderr}");
}

/// Check that a Python program is judged on what it held when its
/// interpreter began to finalize (it frees every object after): the
/// module-level list that keeps a buffer per request fails, named by its
/// Python function and line, and the same loop without it passes.
#[test]
fn a_python_leak_is_caught_before_the_interpreter_frees_it() {
    if !bpf_available() {
        return;
    }
    let script = workspace_file("tests/fixtures/python/check_leak.py");
    let python = Path::new("/usr/bin/python3.11");
    let (code, stdout, _) = check(
        "check_python",
        &[],
        &[python, &script, Path::new("leaky")],
        &[],
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains(
            "handle (check_leak.py:11) <- <module> (check_leak.py:17) leaks: 4000200 bytes"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("until the interpreter began to finalize"),
        "{stdout}"
    );
    // 200 bytearrays of 20000 bytes, each a malloc of 20001.
    let report = read_report(&output_dir_path("check_python"));
    assert!(
        report.processes[0].teardown_s.is_some(),
        "{:#?}",
        report.processes
    );
    let (code, stdout, _) = check(
        "check_python_clean",
        &[],
        &[python, &script, Path::new("clean")],
        &[],
    );
    assert_eq!(code, 0, "{stdout}");
}
