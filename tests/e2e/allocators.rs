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
