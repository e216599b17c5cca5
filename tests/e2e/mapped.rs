//! Anonymous mappings and the heap top, beside the malloc family.

use memscope::report::{Report, Site, SiteKind};

use crate::support::*;

const MIB: u64 = 1 << 20;

fn site_of_kind<'a>(report: &'a Report, kind: SiteKind, function: &str) -> &'a Site {
    let matches: Vec<&Site> = report
        .sites
        .iter()
        .filter(|s| s.kind == kind && s.frames[0].function == function)
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "{kind:?} sites at {function}: {matches:#?}"
    );
    matches[0]
}

#[test]
fn anonymous_mappings_are_tracked_and_large_mallocs_counted_once() {
    if !bpf_available() {
        return;
    }
    let (report, output) = run_fixture("mapped", "mapped", &[]);
    assert_eq!(report.target.exit_code, Some(0));
    let leak = site_of_kind(&report, SiteKind::Mmap, "mmap_leak_site");
    assert_eq!(figures(leak), (5 * MIB, 5, 5 * MIB, 5));
    assert_eq!(
        figures(site_of_kind(&report, SiteKind::Mmap, "mmap_churn_site")),
        (0, 0, 3 * MIB, 3)
    );
    // Half unmapped from the front: one mapping, 1 MiB live.
    let split = site_of_kind(&report, SiteKind::Mmap, "mmap_split_site");
    assert_eq!(figures(split), (MIB, 1, 2 * MIB, 1));
    // Moved by mremap: freed at its first site, live at the new one.
    assert_eq!(
        figures(site_of_kind(&report, SiteKind::Mmap, "mmap_to_move_site")),
        (0, 0, MIB, 1)
    );
    assert!(
        report
            .sites
            .iter()
            .any(|s| s.kind == memscope::report::SiteKind::Mmap
                && s.live_bytes == 3 * MIB
                && s.live_count == 1),
        "the mremap'd mapping"
    );
    // glibc maps a 1 MiB malloc itself: one malloc site, no mmap site.
    assert_eq!(
        figures(site_of_kind(&report, SiteKind::Malloc, "big_malloc_site")),
        (MIB, 1, MIB, 1)
    );
    assert!(
        !report
            .sites
            .iter()
            .any(|s| s.kind == memscope::report::SiteKind::Mmap
                && s.frames[0].function == "big_malloc_site")
    );
    assert_eq!(
        report.totals.live_bytes, MIB,
        "malloc totals hold only the big malloc"
    );
    assert!(report.mapped.live_bytes >= 9 * MIB, "{:?}", report.mapped);

    let heap = report.processes[0].heap.expect("brk seen");
    assert!(heap.grown_bytes >= 64 * 1024, "{heap:?}");
    assert_nothing_lost(&report);
    assert_eq!(report.completeness.unknown_frees, 0);

    let stdout = String::from_utf8_lossy(&output.stdout);
    // Never touched: committed, none of it resident.
    assert!(
        stdout.contains("[mmap, 0 B resident] mmap_leak_site <- main"),
        "{stdout}"
    );
    let measured = leak.mapped.expect("measured at the exit stop");
    assert_eq!(
        (measured.committed_bytes, measured.resident_bytes),
        (5 * MIB, 0)
    );
    assert!(stdout.contains("mapped outside malloc:"), "{stdout}");
}

/// Check that mappings count at what they commit: a PROT_NONE reservation
/// at its writable part, a mapping with its tail and a hole unmapped at
/// what is left, thread stacks without their guard pages; each with its
/// resident bytes; and that the dynamic loader's mappings are no sites.
#[test]
fn mappings_count_what_they_commit_not_what_they_reserve() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("reserved", "reserved", &[]);
    assert_eq!(report.target.exit_code, Some(0));
    let measured = |function: &str| {
        let site = site_of_kind(&report, SiteKind::Mmap, function);
        (site.live_bytes, site.mapped.expect("measured"))
    };
    let (live, reserve) = measured("reserve_site");
    assert_eq!(live, MIB);
    assert_eq!(
        (
            reserve.recorded_bytes,
            reserve.mapped_bytes,
            reserve.committed_bytes,
            reserve.reserved_bytes,
            reserve.resident_bytes
        ),
        (128 * MIB, 128 * MIB, MIB, 127 * MIB, MIB / 4)
    );
    let (live, trim) = measured("trim_site");
    assert_eq!(live, 5 * MIB);
    assert_eq!(
        (trim.recorded_bytes, trim.mapped_bytes, trim.resident_bytes),
        (8 * MIB, 5 * MIB, 5 * MIB)
    );
    let (live, stacks) = measured("allocate_stack");
    let page = procfs::page_size();
    assert_eq!(stacks.reserved_bytes, 4 * page, "one guard page each");
    assert_eq!(live, stacks.recorded_bytes - 4 * page);
    assert!(
        !report.sites.iter().any(|s| s.kind == SiteKind::Mmap
            && s.frames
                .first()
                .and_then(|f| f.module.as_deref())
                .is_some_and(|m| m.contains("/ld-linux"))),
        "loader mappings are no sites: {:#?}",
        report.sites
    );
    assert!(report.loader.is_some_and(|l| l.live_bytes > 0));
    let all = report.mapped_memory.expect("measured");
    assert_eq!(report.mapped.live_bytes, all.committed_bytes);
}
