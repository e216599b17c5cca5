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
    assert_near(memory.rss_bytes, proc_now.rss_bytes, "RSS");
    assert_near(memory.pss_bytes, proc_now.pss_bytes, "PSS");
    assert_near(memory.uss_bytes, proc_now.uss_bytes, "USS");
    assert_near(memory.anon_bytes, proc_now.anon_bytes, "anonymous");
    assert!(memory.anon_bytes >= 64 << 20, "{memory:?}");
    assert_eq!(memory.threads, proc_now.threads);
    let windows: Vec<_> = report.windows.iter().filter_map(|w| w.memory).collect();
    assert!(windows.len() >= 2, "{:#?}", report.windows);
    for window in windows {
        assert_near(window.rss_bytes, proc_now.rss_bytes, "a window's RSS");
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

/// Check that 16 threads each keeping 8 MiB free in their own arena is
/// found as arena bloat: every arena heap counted at its committed size
/// (not its 64 MiB reservation) with its free bytes, MALLOC_ARENA_MAX=2
/// advised with a saving; and that running with it saves that much.
#[test]
fn threads_keeping_free_memory_in_their_own_arenas_is_arena_bloat() {
    if !bpf_available() {
        return;
    }
    use memscope::{arenas::HeapKind, fragmentation::FragmentationVerdict};
    const MIB: u64 = 1 << 20;
    let (report, output) = run_fixture("arenas", "arenas", &[]);
    let f = report.fragmentation.as_ref().expect("assessed");
    assert_eq!(f.verdict, FragmentationVerdict::ArenaBloat, "{f:#?}");
    // glibc makes arenas while there are fewer than 8 per core: the main
    // one and a new one for each thread up to that.
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as u64;
    let thread_heaps = 16.min(8 * cores - 1);
    let heaps = &report.processes[0].arenas;
    assert_eq!(heaps.len() as u64, 1 + thread_heaps, "{heaps:#?}");
    assert_eq!(heaps.iter().filter(|h| h.kind == HeapKind::Main).count(), 1);
    for heap in heaps.iter().filter(|h| h.kind == HeapKind::Thread) {
        // 8 MiB of 1000-byte blocks and their headers, one block live.
        assert!(
            (8 * MIB..9 * MIB).contains(&heap.committed_bytes),
            "{heap:?}"
        );
        assert_eq!((heap.live_bytes, heap.live_count), (1000, 1), "{heap:?}");
        assert!(heap.free_bytes + 1016 <= heap.resident_bytes, "{heap:?}");
        assert!(heap.free_bytes >= 8 * MIB, "{heap:?}");
    }
    assert_eq!(f.arenas, heaps.len() as u64);
    // Each thread heap is a 64 MiB reservation, mapped whole.
    let by_size = &report.processes[0].anon_mappings;
    let mapped: u64 = by_size.iter().map(|c| c.mapped_bytes).sum();
    assert!(mapped >= thread_heaps * 64 * MIB, "{by_size:#?}");
    let free: u64 = heaps.iter().map(|h| h.free_bytes).sum();
    assert_eq!(f.arena_free_bytes, free);
    // All but the two arenas holding most free memory give theirs back.
    let mut each: Vec<u64> = heaps.iter().map(|h| h.free_bytes).collect();
    each.sort_unstable();
    let advised = f.arena_max_saving_bytes;
    assert_eq!(advised, each[..each.len() - 2].iter().sum::<u64>());
    assert!(
        f.advice.iter().any(|a| a.contains("MALLOC_ARENA_MAX=2")),
        "{f:#?}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("fragmentation: arena-bloat"), "{stdout}");

    // The advice taken: the saving happens, as computed.
    let command = ["env", "MALLOC_ARENA_MAX=2"].map(std::ffi::OsString::from);
    let mut command = command.to_vec();
    command.push(fixture("arenas").into_os_string());
    let (advised_run, _) = run_command("arenas_advised", &command, &[]);
    let after = advised_run.fragmentation.as_ref().expect("assessed");
    assert_eq!(advised_run.processes[0].arenas.len(), 2);
    assert_ne!(
        after.verdict,
        FragmentationVerdict::ArenaBloat,
        "{after:#?}"
    );
    let saved = f.anon_bytes - after.anon_bytes;
    assert!(
        saved.abs_diff(advised) * 100 <= advised * 3,
        "saved {saved}, {advised} advised"
    );
}

/// Check that a program that frees what it allocates has no live site,
/// whether memscope starts it or attaches to it (as bcc's memleak test
/// does with its no_leak mode): the loader's mappings and stdout's buffer
/// are the runtime's, reported apart; and that its verdict is none.
#[test]
fn a_program_that_frees_all_it_allocates_has_no_live_site() {
    if !bpf_available() {
        return;
    }
    use memscope::fragmentation::FragmentationVerdict;
    use std::io::Write as _;
    let no_live_site = |report: &memscope::report::Report| {
        let live: Vec<_> = report.sites.iter().filter(|s| s.live_bytes > 0).collect();
        assert!(live.is_empty(), "live sites: {live:#?}");
        assert_eq!(figures(site(report, "main")), (0, 0, 30_000, 1));
        // stdout is a pipe: stdio gives it one 4 KiB buffer at the printf,
        // the heap's only block left.
        let stdio = report.stdio_buffers.expect("stdout's buffer");
        assert_eq!((stdio.live_count, stdio.live_bytes), (1, 4096));
        assert_eq!(report.totals.live_bytes, 4096);
    };

    let command = [fixture("no_leak").into_os_string(), "30000".into()];
    let (report, output) = run_command("no_leak", &command, &[]);
    no_live_site(&report);
    assert!(report.loader.is_some_and(|l| l.live_bytes > 0));
    let f = report.fragmentation.as_ref().expect("assessed");
    assert_eq!(f.verdict, FragmentationVerdict::None, "{f:#?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("kept by the runtime, not sites: stdio buffers 4.0 KiB in 1 blocks"),
        "{stdout}"
    );

    let mut target = Command::new(fixture("no_leak"))
        .arg("30000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fixture starts");
    let dir = output_dir("no_leak_attach");
    let (mut memscope, _said) = attach_memscope(target.id(), &dir, &[]);
    let mut stdin = target.stdin.take().expect("stdin");
    stdin.write_all(b"x").expect("release the fixture");
    drop(stdin);
    assert!(target.wait().expect("fixture exits").success());
    assert!(memscope.wait().expect("memscope exits").success());
    let report = read_report(&dir);
    no_live_site(&report);
}

/// Check that memory held in mappings made outside malloc is found as
/// mapped growth, with the site that maps it named in the advice.
#[test]
fn memory_mapped_outside_malloc_is_mapped_growth() {
    if !bpf_available() {
        return;
    }
    use memscope::fragmentation::FragmentationVerdict;
    let (report, _) = run_fixture("mmap_growth", "mmap_growth", &[]);
    let f = report.fragmentation.as_ref().expect("assessed");
    assert_eq!(f.verdict, FragmentationVerdict::MappedGrowth, "{f:#?}");
    let site = site(&report, "map_chunk_site");
    let mapped = site.mapped.expect("measured at the exit stop");
    assert_eq!((site.live_bytes, site.live_count), (48 << 20, 48));
    assert_eq!(mapped.resident_bytes, 48 << 20);
    assert!(f.mapped_resident_bytes >= 48 << 20, "{f:#?}");
    assert!(
        f.advice[0].starts_with("48.0 MiB resident, mapped at map_chunk_site <- main"),
        "{f:#?}"
    );
}

/// Check that a pre-fork server's workers get their RSS split into
/// private and shared memory as /proc has it (within 1%), what each added
/// after the fork, and that startup work every worker repeats is found as
/// duplication across workers, with the site and the saving of doing it
/// once before the fork.
#[test]
fn startup_work_every_worker_repeats_is_duplication_across_workers() {
    if !bpf_available() {
        return;
    }
    use memscope::fragmentation::FragmentationVerdict;
    const MIB: u64 = 1 << 20;
    let dir = output_dir("prefork_startup");
    let mut memscope = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(&dir)
        .arg("--")
        .arg(fixture("prefork_startup"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("memscope runs");
    let said = lines(memscope.stdout.take().expect("stdout"));
    wait_for(&said, |l| l == "ready", "the workers");
    // The master ignores SIGINT: memscope writes its report with all alive.
    // SAFETY: a signal to the child just spawned.
    unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
    let stdin = memscope.stdin.take();
    assert!(memscope.wait().expect("memscope exits").success());
    let report = read_report(&dir);
    let proc_now: Vec<MemoryFigures> = report.processes[1..]
        .iter()
        .map(|w| MemoryFigures::read(w.pid).expect("a worker's figures"))
        .collect();
    drop(stdin); // the fixture ends
    // Every line, to the end of the output (the fixture shares it).
    let table: Vec<String> = said.iter().collect();

    assert_eq!(report.workers.len(), 1, "{:#?}", report.workers);
    let group = &report.workers[0];
    assert_eq!((group.master, group.workers.len()), (report.target.pid, 3));
    for (worker, now) in report.processes[1..].iter().zip(&proc_now) {
        let m = worker.memory.expect("read at the end");
        assert_near(m.rss_bytes, now.rss_bytes, "RSS");
        assert_near(m.pss_bytes, now.pss_bytes, "PSS");
        assert_near(m.uss_bytes, now.uss_bytes, "USS");
        assert_near(m.shared_bytes, now.shared_bytes, "shared");
        // Its own 24 MiB private, the master's 32 MiB table shared.
        assert!((24 * MIB..25 * MIB).contains(&m.uss_bytes), "{m:?}");
        assert!((32 * MIB..34 * MIB).contains(&m.shared_bytes), "{m:?}");
        assert_eq!(m.rss_bytes, m.uss_bytes + m.shared_bytes, "{m:?}");
        assert_eq!(worker.growth_bytes, 24 << 20);
    }
    assert_eq!(group.added_bytes, 3 * (24 << 20));
    assert_eq!(group.repeated_bytes_per_worker, 24 << 20);
    assert_eq!(
        group.repeated_sites[0].frames[0].function,
        "worker_import_site"
    );
    let f = report.fragmentation.as_ref().expect("assessed");
    assert_eq!(
        f.verdict,
        FragmentationVerdict::DuplicationAcrossWorkers,
        "{f:#?}"
    );
    assert!(
        f.advice
            .iter()
            .any(|a| a.contains("preload_app") && a.contains("up to 48.0 MiB less")),
        "{f:#?}"
    );
    let table = table.join("\n");
    assert!(table.contains(" SHARED "), "{table}");
    assert!(
        table.contains(&format!(
            "workers of {}: 3, each on average, RSS",
            group.master
        )),
        "{table}"
    );
    assert!(
        table.contains("24.0 MiB in each at worker_import_site <- fill <- main"),
        "{table}"
    );
}
