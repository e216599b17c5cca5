//! What the followed processes hold as the kernel counts it: RSS, PSS,
//! USS and the rest, against /proc itself.

use std::process::{Command, Stdio};

use memscope::process_memory::MemoryFigures;

use crate::support::*;

/// Check that `attach` reports a process's RSS, PSS and USS as
/// /proc/PID/smaps_rollup has them (within 1%), in its record and in each
/// window.
#[test]
fn attach_reports_the_process_memory_proc_has() {
    if !bpf_available() {
        return;
    }
    // 64 MiB touched, then idle: its figures hold still.
    let mut target = Command::new("/usr/bin/python3.11")
        .args([
            "-c",
            "import sys, time\nheld = bytearray(64 << 20)\nprint('ready', flush=True)\nsys.stdin.read()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let said = lines(target.stdout.take().expect("stdout"));
    wait_for(&said, |l| l == "ready", "ready");
    let pid = target.id();

    let dir = output_dir("process_memory");
    let status = Command::new(MEMSCOPE)
        .args(["attach", "-d", "1500ms", "-w", "500ms", "-o"])
        .arg(&dir)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status()
        .expect("memscope runs");
    assert!(status.success());
    let proc_now = MemoryFigures::read(pid).expect("the target's figures");
    drop(target.stdin.take());
    let _ = target.wait();

    let report = read_report(&dir);
    let memory = report.processes[0].memory.expect("memory figures");
    let near = |ours: u64, theirs: u64, what: &str| {
        assert!(
            ours.abs_diff(theirs) * 100 <= theirs,
            "{what}: {ours} reported, {theirs} in /proc"
        );
    };
    near(memory.rss_bytes, proc_now.rss_bytes, "RSS");
    near(memory.pss_bytes, proc_now.pss_bytes, "PSS");
    near(memory.uss_bytes, proc_now.uss_bytes, "USS");
    near(memory.anon_bytes, proc_now.anon_bytes, "anonymous");
    assert!(memory.anon_bytes >= 64 << 20, "{memory:?}");
    assert_eq!(memory.threads, proc_now.threads);
    let windows: Vec<_> = report.windows.iter().filter_map(|w| w.memory).collect();
    assert!(windows.len() >= 2, "{:#?}", report.windows);
    for window in windows {
        near(window.rss_bytes, proc_now.rss_bytes, "a window's RSS");
        assert_eq!(window.processes, 1);
    }
}

/// Check that freeing every other small block of 200 MiB is found to be
/// the allocator keeping freed memory, with its numbers and advice, and
/// that a program whose heap is live gets no such verdict.
#[test]
fn freed_memory_the_allocator_keeps_is_allocator_retention() {
    if !bpf_available() {
        return;
    }
    use memscope::fragmentation::FragmentationVerdict;
    let (report, output) = run_fixture("retention", "retention", &[]);
    let f = report.fragmentation.as_ref().expect("assessed");
    assert_eq!(
        f.verdict,
        FragmentationVerdict::AllocatorRetention,
        "{f:#?}"
    );
    let kept = report
        .sites
        .iter()
        .find(|s| s.frames[0].function == "small_block_site")
        .expect("the kept blocks' site");
    assert_eq!(kept.live_bytes, 100 << 20);
    assert!(f.live_heap_bytes >= 100 << 20, "{f:#?}");
    // The other 100 MiB and their headers, give or take the heap's slack.
    let freed = (100 << 20) + (200 << 20) / 256 / 2 * 16;
    assert!(
        f.retained_free_bytes.abs_diff(freed) * 100 <= freed * 5,
        "{} retained, about {freed} freed: {f:#?}",
        f.retained_free_bytes
    );
    assert!(!f.advice.is_empty());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("fragmentation: allocator-retention"),
        "{stdout}"
    );

    let (report, _) = run_fixture("leak_basic_fragmentation", "leak_basic", &[]);
    let f = report.fragmentation.as_ref().expect("assessed");
    assert_eq!(f.verdict, FragmentationVerdict::None, "{f:#?}");
}
