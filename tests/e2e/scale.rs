use crate::support::*;

/// A million live blocks from 8 threads fit the default map: nothing lost.
#[test]
fn million_live_allocations_from_eight_threads_lose_nothing() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("scale", "scale", &[]);
    assert_eq!(
        figures(site(&report, "scale_keep_site")),
        (32_000_000, 1_000_000, 32_000_000, 1_000_000)
    );
    assert_eq!(
        figures(site(&report, "scale_churn_site")),
        (0, 0, 48_000_000, 1_000_000)
    );
    assert_nothing_lost(&report);
    assert!(
        report.warnings.iter().all(|w| !w.contains("--max-live")),
        "{:?}",
        report.warnings
    );
}

/// A live map too small for the program: the loss is counted and the table
/// says which option fixes it.
#[test]
fn tiny_live_map_reports_its_loss() {
    if !bpf_available() {
        return;
    }
    let (report, output) = run_fixture("tiny_max_live", "leak_basic", &["--max-live", "1000"]);
    let c = &report.completeness;
    assert!(c.live_map_full >= 5000, "{c:?}");
    assert_eq!(
        c.map_full,
        c.live_map_full + c.totals_map_full + c.in_flight_full
    );
    // Every malloc call was either tracked or counted as lost.
    assert_eq!(report.totals.alloc_count + c.live_map_full, 6001, "{c:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("was full; rerun with --max-live 4000"),
        "the table must warn about the loss:\n{stdout}"
    );
}
