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
    assert_nothing_lost(&report);
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
