//! `run` of a command the kernel refuses to execute: memscope says why and
//! exits 6. What the file's first bytes condemn is refused before any probe
//! is attached; the rest fails at the exec itself, where memscope used to
//! wait forever for a child its own exit probe had stopped.

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::support::*;

/// Far past what these take (milliseconds when refused up front; 3 to 5 s
/// when the probes were attached, most of it detaching them): only a hang
/// reaches it.
const HANG_BOUND: Duration = Duration::from_secs(30);

/// A file in the test's scratch directory with `contents` and `mode`.
fn script(test: &str, contents: &str, mode: u32) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("exec-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("script");
    std::fs::write(&path, contents).expect("script written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

/// `memscope run -- PROGRAM`, killed and failed if it outlives HANG_BOUND.
/// In a process group of its own, so that a hang kills the command too: a
/// stopped child would hold memscope's stderr open.
fn run_bounded(test: &str, program: &Path) -> Output {
    let started = Instant::now();
    let mut memscope = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(output_dir(test))
        .arg("--")
        .arg(program)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("memscope starts");
    while memscope.try_wait().expect("memscope waitable").is_none() {
        if started.elapsed() > HANG_BOUND {
            // SAFETY: plain syscall on the process group created above.
            unsafe { libc::kill(-(memscope.id() as i32), libc::SIGKILL) };
            let output = memscope.wait_with_output().expect("memscope reaped");
            panic!(
                "memscope still running after {HANG_BOUND:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = memscope.wait_with_output().expect("memscope output");
    eprintln!("{test}: memscope exited in {:?}", started.elapsed());
    output
}

/// The one line memscope printed on stderr, after asserting exit code 6.
fn exec_error(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn script_without_shebang_is_not_executable() {
    // Refused up front (no binfmt_misc handler on the test machines): no
    // root needed.
    let path = script("no-shebang", "echo hello\n", 0o755);
    let output = run_bounded("exec-no-shebang", &path);
    assert_eq!(
        exec_error(&output),
        format!(
            "memscope: cannot execute {}: Exec format error (os error 8): no #! line and not a binary\n",
            path.display()
        )
    );
}

#[test]
fn missing_shebang_interpreter_is_named() {
    let path = script(
        "missing-interp",
        "#!/nonexistent/interp -x\necho hello\n",
        0o755,
    );
    let output = run_bounded("exec-missing-interp", &path);
    assert_eq!(
        exec_error(&output),
        format!(
            "memscope: cannot execute {}: No such file or directory (os error 2): \
             its #! interpreter /nonexistent/interp does not exist\n",
            path.display()
        )
    );
}

#[test]
fn file_open_for_writing_is_busy() {
    if !bpf_available() {
        return;
    }
    let path = script("busy", "#!/bin/sh\necho hello\n", 0o755);
    // Held open for writing while memscope runs it: execve gives ETXTBSY.
    let writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open for writing");
    let output = run_bounded("exec-busy", &path);
    drop(writer);
    assert_eq!(
        exec_error(&output),
        format!(
            "memscope: cannot execute {}: Text file busy (os error 26): \
             the file is open for writing (is it still being written?)\n",
            path.display()
        )
    );
}

#[test]
fn binary_with_a_missing_dynamic_loader_names_it() {
    if !bpf_available() {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("exec-missing-loader");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let source = dir.join("main.c");
    std::fs::write(&source, "int main(void) { return 0; }\n").expect("source written");
    let binary = dir.join("missing-loader");
    let built = compile_c(
        &source,
        &binary,
        &["-Wl,--dynamic-linker=/nonexistent/ld-linux.so.2"],
    )
    .expect("gcc runs");
    assert!(built.success(), "fixture builds");
    let output = run_bounded("exec-missing-loader", &binary);
    assert_eq!(
        exec_error(&output),
        format!(
            "memscope: cannot execute {}: No such file or directory (os error 2): \
             its ELF interpreter (dynamic loader) /nonexistent/ld-linux.so.2 does not exist\n",
            binary.display()
        )
    );
}

#[test]
fn file_without_execute_permission_is_not_found() {
    // Refused before any BPF is loaded: no root needed.
    let path = script("no-x", "#!/bin/sh\necho hello\n", 0o644);
    let output = run_bounded("exec-no-x", &path);
    assert_eq!(
        exec_error(&output),
        format!(
            "memscope: command not found: {} (not an executable path, nor on PATH)\n",
            path.display()
        )
    );
}
