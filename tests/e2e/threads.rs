use crate::support::*;

/// Also with one call slot in the kernel: every thread's calls then go
/// through the hash map kept for threads whose slot another holds; and
/// with one front-table bucket: most blocks then go to the live map, and
/// threads take the bucket's four slots from each other.
#[test]
fn four_threads_are_counted_exactly() {
    if !bpf_available() {
        return;
    }
    for (name, args) in [
        ("threads", &[][..]),
        ("threads-hashed", &["--call-slots", "1"]),
        ("threads-overflow", &["--front-buckets", "1"]),
    ] {
        let (report, _) = run_fixture(name, "threads", args);
        let leak = site(&report, "thread_leak_site");
        assert_eq!(figures(leak), (1_000_000, 1000, 1_000_000, 1000), "{name}");
        assert_eq!(leak.frames[1].function, "worker");
        let churn = site(&report, "thread_churn_site");
        assert_eq!(figures(churn), (0, 0, 2_560_000, 40_000), "{name}");
        assert_nothing_lost(&report);
    }
}
