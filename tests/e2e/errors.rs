//! Bad input: one clear line on stderr and a distinct exit code.

use std::process::Command;

use crate::support::*;

#[test]
fn attach_to_missing_pid_says_so() {
    let output = Command::new(MEMSCOPE)
        .args(["attach", "999999"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(4));
    assert_eq!(
        stderr_of(&output),
        "memscope: cannot attach to pid 999999: no such process\n"
    );
}

#[test]
fn unknown_command_says_so() {
    let output = Command::new(MEMSCOPE)
        .args(["run", "--", "no-such-command-memscope"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(6));
    assert_eq!(
        stderr_of(&output),
        "memscope: command not found: no-such-command-memscope (not an executable path, nor on PATH)\n"
    );
}

#[test]
fn without_root_says_to_use_sudo() {
    if !bpf_available() {
        return;
    }
    // Drop to nobody with no capabilities; the binary stays readable.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(MEMSCOPE)
        .args(["attach", &std::process::id().to_string()])
        .output()
        .expect("setpriv runs");
    assert_eq!(output.status.code(), Some(3), "{}", stderr_of(&output));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("run it with sudo"), "{stderr}");
}

#[test]
fn bad_duration_is_a_usage_error() {
    let output = Command::new(MEMSCOPE)
        .args(["attach", "-d", "soon", "1"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr_of(&output).contains("invalid duration \"soon\""),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_hold_budget_out_of_range_is_a_usage_error() {
    assert_usage_error(
        &["run", "--hold-budget", "1h", "--", "true"],
        "hold budget \"1h\" is out of range: give 10ms to 10s (a process waits this long at most)",
    );
}

#[test]
fn map_sizes_memscope_cannot_load_are_usage_errors() {
    if !bpf_available() {
        return;
    }
    assert_usage_error(
        &["run", "--max-live", "0", "--", "true"],
        "--max-live, --max-stacks and --unwind-rows must be at least 1",
    );
    assert_usage_error(
        &["run", "--front-buckets", "3", "--", "true"],
        "--front-buckets must be a power of two from 1 to 16384",
    );
}

#[test]
fn unwritable_output_still_prints_the_table_and_exits_8() {
    if !bpf_available() {
        return;
    }
    let output = Command::new(MEMSCOPE)
        .args(["run", "-o", "/proc/memscope-cannot-write-here", "--"])
        .arg(fixture("leak_basic"))
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(8));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("leak_site <- main"), "{stdout}");
    let stderr = stderr_of(&output);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("memscope: cannot write the report to /proc/memscope-cannot-write-here"),
        "{stderr}"
    );
    assert_eq!(
        last.matches("No such file or directory").count(),
        1,
        "the cause is said once: {last}"
    );
}
