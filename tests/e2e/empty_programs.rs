//! `--empty-programs` (hidden): the bench's floor of memscope's own probes.
//! The probes go on where they always do, and nothing is recorded.

use crate::support::*;

#[test]
fn empty_programs_keep_the_probes_and_record_nothing() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("empty_programs", "leak_basic", &["--empty-programs"]);
    assert_eq!(
        (report.totals.alloc_count, report.totals.free_count),
        (0, 0)
    );
    assert!(report.sites.is_empty());
    let probed = |name: &str| report.probes.iter().find(|p| p.function == name);
    let malloc = probed("malloc").expect("malloc is probed");
    assert!(malloc.return_probe);
    assert!(!probed("free").expect("free is probed").return_probe);
}

#[test]
fn check_refuses_to_gate_on_empty_programs() {
    assert_usage_error(
        &["check", "--empty-programs", "--", "true"],
        "--empty-programs cannot be used with check",
    );
}
