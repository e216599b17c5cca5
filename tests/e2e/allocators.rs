//! Targets whose malloc is not libc's.

use std::path::Path;

use crate::support::*;

const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";

/// A statically linked program: its own malloc is found in its symbols and
/// probed when it is executed.
#[test]
fn static_binary_is_probed_in_its_own_malloc() {
    if !bpf_available() {
        return;
    }
    let program = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixture-leak_static");
    let status = compile_c(
        &workspace_file("tests/fixtures/leak_basic.c"),
        &program,
        &["-static"],
    )
    .expect("gcc runs");
    assert!(status.success(), "static build (libc6-dev provides libc.a)");
    let (report, _) = run_command("static", &[program.clone().into_os_string()], &[]);
    assert_eq!(
        figures(site(&report, "leak_site")),
        (4_096_000, 1000, 4_096_000, 1000)
    );
    assert!(
        report
            .probes
            .iter()
            .any(|p| p.function == "malloc" && p.library == program),
        "the executable's malloc is probed: {:?}",
        report.probes
    );
    assert_nothing_lost(&report);
}

/// jemalloc preloaded into a program (set by a wrapper that execs it):
/// jemalloc's malloc family is probed instead of libc's.
#[test]
fn preloaded_jemalloc_is_probed_instead_of_libc() {
    if !bpf_available() {
        return;
    }
    assert!(
        Path::new(JEMALLOC).exists(),
        "{JEMALLOC} missing: `cargo xtask setup` installs libjemalloc2"
    );
    let command = [
        "env".into(),
        format!("LD_PRELOAD={JEMALLOC}").into(),
        fixture("leak_basic").into_os_string(),
    ];
    let (report, _) = run_command("jemalloc", &command, &[]);
    assert_eq!(
        figures(site(&report, "leak_site")),
        (4_096_000, 1000, 4_096_000, 1000)
    );
    assert_eq!(figures(site(&report, "churn_site")), (0, 0, 640_000, 5000));
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("served by jemalloc")),
        "{:?}",
        report.warnings
    );
    // jemalloc is built without frame pointers: its walks read data, and
    // so many distinct bogus stacks that two may hash to one slot of the
    // stack map (counted; their bytes under [unknown stack]). Nothing
    // else may be lost.
    let c = &report.completeness;
    assert_eq!((c.map_full, c.missed_returns), (0, 0), "{c:?}");
    assert_eq!(c.stack_errors, c.stack_collisions, "only collisions: {c:?}");
    assert_eq!(report.completeness.unknown_frees, 0);
}

/// A program linked against jemalloc (DT_NEEDED), started through a
/// wrapper that execs it: at the exec stop jemalloc is not mapped yet, and
/// is found in the executable's needed libraries and probed before it runs.
#[test]
fn linked_jemalloc_is_probed_from_the_first_allocation() {
    if !bpf_available() {
        return;
    }
    assert!(
        Path::new(JEMALLOC).exists(),
        "{JEMALLOC} missing: `cargo xtask setup` installs libjemalloc2"
    );
    let program =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixture-leak_jemalloc_linked");
    let status = compile_c(
        &workspace_file("tests/fixtures/leak_basic.c"),
        &program,
        &["-Wl,--no-as-needed", JEMALLOC],
    )
    .expect("gcc runs");
    assert!(status.success());
    let script = format!("exec {}", program.display());
    let (report, _) = run_command(
        "jemalloc_linked",
        &["sh".into(), "-c".into(), script.into()],
        &[],
    );
    assert_eq!(
        figures(site(&report, "leak_site")),
        (4_096_000, 1000, 4_096_000, 1000)
    );
    assert!(
        report
            .probes
            .iter()
            .any(|p| p.function == "malloc" && p.library == Path::new(JEMALLOC)),
        "{:?}",
        report.probes
    );
    // `sh` has no frame pointers: a walk of its stack may fail (counted).
    let c = &report.completeness;
    assert_eq!(
        (c.map_full, c.missed_returns, c.unknown_frees),
        (0, 0, 0),
        "{c:?}"
    );
}

/// Check that the workers of a server linked with jemalloc are probed once,
/// through their parent's images, however long they live: a maps refresh
/// once probed jemalloc a second time in each (every call counted twice,
/// returns missed).
#[test]
fn forked_workers_of_a_jemalloc_server_are_probed_once() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};
    if !bpf_available() {
        return;
    }
    let program =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fixture-prefork_jemalloc");
    let status = compile_c(
        &workspace_file("tests/fixtures/prefork_attach.c"),
        &program,
        &["-Wl,--no-as-needed", JEMALLOC],
    )
    .expect("gcc runs");
    assert!(status.success());
    let dir = output_dir("prefork-jemalloc");
    let mut memscope = Command::new(MEMSCOPE)
        .args(["run", "-o"])
        .arg(&dir)
        .arg("--")
        .arg(&program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("memscope runs");
    let mut out = BufReader::new(memscope.stdout.take().expect("stdout"));
    let mut ready = String::new();
    out.read_line(&mut ready).expect("ready line");
    assert!(ready.starts_with("ready "), "{ready}");
    // Past a few refreshes of the workers' mappings.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    memscope
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("release the workers");
    assert!(memscope.wait().expect("memscope exits").success());
    let report = read_report(&dir);
    let leak = 10 * 4096 + 20 * 4096 + 30 * 4096;
    assert_eq!(site(&report, "worker_leak_site").live_bytes, leak);
    // libc's set is the one of memscope's copy before the exec.
    let jemalloc_mallocs = report
        .probes
        .iter()
        .filter(|p| p.function == "malloc" && p.library == Path::new(JEMALLOC))
        .count();
    assert_eq!(jemalloc_mallocs, 1, "{:?}", report.probes);
    let c = &report.completeness;
    assert_eq!((c.missed_returns, c.unknown_frees), (0, 0), "{c:?}");
    assert_nothing_lost(&report);
}
