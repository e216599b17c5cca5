use crate::support::*;

#[test]
fn four_threads_are_counted_exactly() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("threads", "threads", &[]);
    let leak = site(&report, "thread_leak_site");
    assert_eq!(figures(leak), (1_000_000, 1000, 1_000_000, 1000));
    assert_eq!(leak.frames[1].function, "worker");
    let churn = site(&report, "thread_churn_site");
    assert_eq!(figures(churn), (0, 0, 2_560_000, 40_000));
    assert_nothing_lost(&report);
}
