//! However a session ends, everything collected so far is written.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::support::*;

/// Starts memscope with `args`, waits for its banner (probes are on), and
/// returns it with the rest of its stderr.
fn start(args: &[&std::ffi::OsStr]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut memscope = Command::new(MEMSCOPE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memscope starts");
    let mut stderr = BufReader::new(memscope.stderr.take().expect("stderr"));
    let mut banner = String::new();
    stderr.read_line(&mut banner).expect("banner");
    assert!(banner.starts_with("memscope: profiling pid"), "{banner}");
    (memscope, stderr)
}

fn attach(
    target: u32,
    dir: &std::path::Path,
    extra: &[&str],
) -> (Child, BufReader<std::process::ChildStderr>) {
    let target = target.to_string();
    let mut args: Vec<&std::ffi::OsStr> = vec!["attach".as_ref(), "-o".as_ref(), dir.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(target.as_ref());
    start(&args)
}

fn run(dir: &std::path::Path, command: &[&str]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "run".as_ref(),
        "-o".as_ref(),
        dir.as_os_str(),
        "--".as_ref(),
    ];
    args.extend(command.iter().map(std::ffi::OsStr::new));
    start(&args)
}

/// A process that only sleeps, killed when the test ends however it ends.
struct Sleeper(Child);

impl Sleeper {
    fn start() -> Self {
        Self(
            Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("sleep starts"),
        )
    }

    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rest_of(mut stderr: BufReader<std::process::ChildStderr>) -> String {
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
    text
}

/// Ends an attached session with `signal`: the report is written, its
/// last line says why, and the target keeps running.
fn signal_writes_the_report_and_leaves_the_target_running(signal: i32, test: &str, why: &str) {
    let mut target = Sleeper::start();
    let dir = output_dir(test);
    let (memscope, stderr) = attach(target.id(), &dir, &[]);
    // SAFETY: plain syscall.
    unsafe { libc::kill(memscope.id() as i32, signal) };
    let output = memscope.wait_with_output().expect("memscope exits");
    let said = rest_of(stderr);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains(&format!("memscope: {why}; wrote report.json")),
        "{said}"
    );
    let report = read_report(&dir);
    assert_eq!(report.target.pid, target.id());
    assert!(
        target.0.try_wait().expect("wait").is_none(),
        "the target keeps running"
    );
}

#[test]
fn sigterm_writes_the_report_and_leaves_the_target_running() {
    if !bpf_available() {
        return;
    }
    signal_writes_the_report_and_leaves_the_target_running(libc::SIGTERM, "sigterm", "terminated");
}

/// Check that a dropped ssh session (SIGHUP) still gets its report.
#[test]
fn sighup_writes_the_report_and_leaves_the_target_running() {
    if !bpf_available() {
        return;
    }
    signal_writes_the_report_and_leaves_the_target_running(libc::SIGHUP, "sighup", "hung up");
}

#[test]
fn duration_ends_the_session() {
    if !bpf_available() {
        return;
    }
    let target = Sleeper::start();
    let dir = output_dir("duration");
    let (memscope, stderr) = attach(target.id(), &dir, &["-d", "1s"]);
    let output = memscope.wait_with_output().expect("memscope exits");
    assert!(output.status.success());
    assert!(rest_of(stderr).contains("memscope: duration elapsed; wrote report.json"));
    let report = read_report(&dir);
    assert!(
        report.duration_s >= 1.0 && report.duration_s < 30.0,
        "{}",
        report.duration_s
    );
    // `sleep` allocates nothing while it sleeps: say so, not silently empty.
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("no allocations were seen"))
    );
}

#[test]
fn ctrl_c_in_run_mode_reaches_the_command_and_writes_the_report() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("sigint_run");
    let (mut memscope, _stderr) = run(&dir, &["sleep", "60"]);
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: plain syscall.
    unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
    let status = memscope.wait().expect("memscope exits");
    assert!(status.success());
    let report = read_report(&dir);
    assert_eq!(
        report.target.exit_code,
        Some(128 + libc::SIGINT),
        "sleep got the SIGINT"
    );
}

/// `memscope run -- CMD | head -1`: the command dies of SIGPIPE as it would
/// without memscope (Rust's ignored SIGPIPE is not passed on), and memscope
/// treats its own closed stdout as a normal end, with the report written.
#[test]
fn closed_stdout_ends_cleanly_for_both() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("closed_stdout");
    let (mut memscope, _stderr) = run(&dir, &["yes"]);
    let mut stdout = BufReader::new(memscope.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("a line from yes");
    assert_eq!(line, "y\n");
    drop(stdout);
    let status = memscope.wait().expect("memscope exits");
    assert!(status.success(), "{status}");
    let report = read_report(&dir);
    assert_eq!(report.target.exit_code, Some(128 + libc::SIGPIPE));
}
