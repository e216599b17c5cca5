use memscope::report::Report;

use crate::support::*;

/// Every allocator entry point, with realloc's corner cases: grow, shrink,
/// realloc(NULL, n) (glibc calls malloc inside: counted once), realloc(p, 0)
/// (frees p), and failed allocations (nothing recorded).
#[test]
fn every_allocator_function_is_counted_exactly() {
    if !bpf_available() {
        return;
    }
    // With one call slot too: realloc's inner calls must find their outer
    // call in the hash map as in a slot. With one front-table bucket, most
    // blocks are in the live map, some in the front table: realloc moves
    // blocks between the two.
    for (name, args) in [
        ("alloc_family", &[][..]),
        ("alloc_family-hashed", &["--call-slots", "1"]),
        ("alloc_family-overflow", &["--front-buckets", "1"]),
    ] {
        let (report, _) = run_fixture(name, "alloc_family", args);
        assert_family_counted(&report, name);
    }
}

fn assert_family_counted(report: &Report, name: &str) {
    let expect =
        |function: &str, live_bytes: u64, live_count: u64, alloc_bytes: u64, alloc_count: u64| {
            assert_eq!(
                figures(site(report, function)),
                (live_bytes, live_count, alloc_bytes, alloc_count),
                "{name}: {function}"
            );
        };
    expect("calloc_site", 50_000, 50, 50_000, 50);
    expect("realloc_grow_site", 50_000, 10, 50_000, 10);
    expect("alloc_before_grow", 0, 0, 10_000, 10);
    expect("realloc_shrink_site", 1_000, 10, 1_000, 10);
    expect("alloc_before_shrink", 0, 0, 80_000, 10);
    expect("realloc_null_site", 30_000, 10, 30_000, 10);
    expect("alloc_freed_by_realloc", 0, 0, 7_770, 10);
    expect("reallocarray_site", 3_500, 5, 3_500, 5);
    expect("posix_memalign_site", 7_168, 7, 7_168, 7);
    expect("aligned_alloc_site", 1_536, 3, 1_536, 3);
    expect("memalign_site", 512, 2, 512, 2);
    expect("valloc_site", 8_192, 2, 8_192, 2);
    expect("pvalloc_site", 200, 2, 200, 2);
    assert!(
        !report
            .sites
            .iter()
            .any(|s| s.frames[0].function == "failing_malloc_site"),
        "a failed malloc was recorded"
    );
    assert!(
        !report
            .sites
            .iter()
            .any(|s| s.frames[0].function == "realloc_zero_site")
    );
    assert_nothing_lost(report);
    assert_eq!(
        report.completeness.unknown_frees, 0,
        "free(NULL) is not an unknown free"
    );
    assert_eq!(
        report.target.exit_code,
        Some(0),
        "fixture's own checks failed"
    );
}

#[test]
fn free_probe_sits_on_an_emulated_instruction() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("alloc_family_probes", "leak_basic", &[]);
    let free = report
        .probes
        .iter()
        .find(|p| p.function == "free")
        .expect("free is probed");
    assert!(free.emulated, "{free:?}");
    assert!(!free.return_probe);
    for function in ["malloc", "calloc", "realloc", "posix_memalign"] {
        assert!(
            report.probes.iter().any(|p| p.function == function),
            "{function} not probed"
        );
    }
}
