use crate::support::*;

/// Rust on the system allocator: Vec and Box plumbing is trimmed so the
/// site is the function that asked for memory.
#[test]
fn rust_program_leak_is_attributed_to_its_function() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("rust_leak", "rust_leak", &[]);
    assert_eq!(
        figures(site(&report, "rust_leak::leak_vectors")),
        (600_000, 200, 600_000, 200)
    );
    assert_eq!(
        figures(site(&report, "rust_leak::churn_boxes")),
        (0, 0, 128_000, 1000)
    );
    assert_nothing_lost(&report);
}
