//! Where anonymous RSS goes beyond the live heap: the part the allocator
//! keeps after the program freed it (retention, fragmentation). A pure
//! function of the report, so `memscope report DIR` derives the same.
//!
//! anonymous RSS = live heap blocks + their headers and alignment
//!               + resident mappings outside malloc (stacks, arenas' own
//!                 use is inside malloc) + the loader's images' memory
//!               + what the allocator holds free (the rest).
//! Only a process followed from its start has every block seen; after an
//! `attach` the rest also holds what was allocated before, and no verdict
//! is given.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    arenas::{ArenaHeap, arena_max_saving},
    process_memory::MemoryFigures,
    processes::Following,
    report::{Frame, Report, SiteKind},
    units::format_bytes,
};

/// glibc's chunk header (8 bytes) and 16-byte alignment, on average per
/// live block.
pub const OVERHEAD_PER_BLOCK: u64 = 16;
/// Retention below this is noise.
pub const MIN_RETAINED_BYTES: u64 = 16 << 20;
/// ... and below this share of anonymous RSS.
pub const MIN_RETAINED_SHARE: f64 = 0.25;

/// What accounts for most of the anonymous RSS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FragmentationVerdict {
    /// Anonymous RSS is what the program holds.
    None,
    /// The allocator keeps freed memory resident.
    AllocatorRetention,
    /// Threads' arenas each keep free memory the others could reuse.
    ArenaBloat,
    /// Anonymous mappings made outside malloc hold the memory.
    MappedGrowth,
    /// Pre-fork workers each allocated the same startup memory.
    DuplicationAcrossWorkers,
    /// Not every block was seen (attached to a running process).
    Unknown,
}

/// report.json's `fragmentation`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Fragmentation {
    /// Resident memory of the processes whose memory was read, summed.
    pub rss_bytes: u64,
    /// Their anonymous resident memory, summed.
    pub anon_bytes: u64,
    /// `totals.live_bytes`.
    pub live_heap_bytes: u64,
    /// Headers and alignment of the live blocks (estimated per block).
    pub heap_overhead_bytes: u64,
    /// Resident mappings outside malloc (thread stacks included).
    pub mapped_resident_bytes: u64,
    /// Of those, CPython's object arenas (where objects are counted by
    /// arena): the Python heap, not mappings that grow on their own.
    #[serde(default)]
    pub python_arena_bytes: u64,
    /// The loader's anonymous mappings for the images.
    pub loader_bytes: u64,
    /// Anonymous RSS none of the above explains: free memory the
    /// allocator keeps (or, after an attach, memory allocated before).
    pub retained_free_bytes: u64,
    /// Anonymous RSS over the live heap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Address space over RSS: reported, never a verdict by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms_rss_ratio: Option<f64>,
    /// Threads of those processes, summed.
    pub threads: u64,
    /// glibc arena heaps (the main arena's brk heap and thread heaps).
    #[serde(default)]
    pub arenas: u64,
    /// Resident in the arena heaps.
    #[serde(default)]
    pub arena_resident_bytes: u64,
    /// Resident in the arena heaps and holding no live block.
    #[serde(default)]
    pub arena_free_bytes: u64,
    /// What MALLOC_ARENA_MAX=`ADVISED_ARENA_MAX` would give back at most
    /// (see `arenas::arena_max_saving`).
    #[serde(default)]
    pub arena_max_saving_bytes: u64,
    /// What accounts for most bytes.
    pub verdict: FragmentationVerdict,
    /// Why, with the numbers.
    pub reason: String,
    /// What to do about it, with the saving where it is computed.
    pub advice: Vec<String>,
}

/// The assessment of the processes whose memory was read, or None.
pub fn assess(report: &Report) -> Option<Fragmentation> {
    let mut memory = MemoryFigures::default();
    let mut from_start = true;
    let mut arenas = ArenaFigures::default();
    for process in &report.processes {
        if let Some(figures) = &process.memory {
            memory.add(figures);
            from_start &= matches!(process.following, Following::Started | Following::Forked);
            arenas.add(&process.arenas);
        }
    }
    if memory.processes == 0 {
        return None;
    }
    let live_heap_bytes = report.totals.live_bytes;
    let heap_overhead_bytes = report.totals.live_count * OVERHEAD_PER_BLOCK;
    let mapped_resident_bytes = report.mapped_memory.map_or(0, |m| m.resident_bytes);
    let python_arena_bytes = python_arena_resident(report);
    let other_mapped = mapped_resident_bytes.saturating_sub(python_arena_bytes);
    let loader_bytes = report.loader.map_or(0, |l| l.live_bytes);
    let explained = live_heap_bytes + heap_overhead_bytes + mapped_resident_bytes + loader_bytes;
    let retained = memory.anon_bytes.saturating_sub(explained);
    let share = |bytes: u64| bytes as f64 / memory.anon_bytes.max(1) as f64;
    let significant =
        |bytes: u64| bytes >= MIN_RETAINED_BYTES && share(bytes) >= MIN_RETAINED_SHARE;
    let arenas_word = if python_arena_bytes > 0 {
        format!(
            " (Python's object arenas {} of them)",
            format_bytes(python_arena_bytes)
        )
    } else {
        String::new()
    };
    let words = format!(
        "anonymous RSS {} = live heap {} + headers {} + mappings {}{arenas_word} + loader {} + {} unexplained ({:.0}%)",
        format_bytes(memory.anon_bytes),
        format_bytes(live_heap_bytes),
        format_bytes(heap_overhead_bytes),
        format_bytes(mapped_resident_bytes),
        format_bytes(loader_bytes),
        format_bytes(retained),
        share(retained) * 100.0
    );
    // Each explanation that holds, with the bytes it accounts for; the
    // largest is the verdict.
    let mut candidates: Vec<(u64, FragmentationVerdict, String, Vec<String>)> = Vec::new();
    let arena_bloat = significant(arenas.saving) && arenas.saving * 2 >= retained;
    if arena_bloat {
        // The arenas' free memory is most of what is retained: fewer
        // arenas is the fix, not a trim.
        candidates.push((
            arenas.saving,
            FragmentationVerdict::ArenaBloat,
            format!(
                "{} arena heaps keep {} free and resident; with MALLOC_ARENA_MAX={ADVISED_ARENA_MAX} threads would reuse up to {} of it",
                arenas.heaps,
                format_bytes(arenas.free_bytes),
                format_bytes(arenas.saving)
            ),
            arena_advice(arenas.saving),
        ));
    } else if significant(retained) {
        candidates.push((
            retained,
            FragmentationVerdict::AllocatorRetention,
            "the program freed that memory, the allocator keeps it resident".to_owned(),
            retention_advice(retained),
        ));
    }
    if significant(other_mapped) {
        candidates.push((
            other_mapped,
            FragmentationVerdict::MappedGrowth,
            format!(
                "mappings made outside malloc{} hold {} resident ({:.0}% of anonymous RSS)",
                if python_arena_bytes > 0 {
                    ", Python's arenas aside,"
                } else {
                    ""
                },
                format_bytes(other_mapped),
                share(other_mapped) * 100.0
            ),
            mapped_advice(report),
        ));
    }
    if let Some(duplication) = duplication(report) {
        candidates.push(duplication);
    }
    let best = candidates.into_iter().max_by_key(|c| c.0);
    // A high VMS/RSS is what people read as fragmentation: say what it is.
    let vms_words = match memory.vms_rss_ratio() {
        Some(ratio) if ratio >= 2.0 && memory.vms_bytes >= memory.rss_bytes + (64 << 20) => {
            format!(
                "; VMS is {ratio:.1} x RSS: {} of address space is not resident, mostly reserved and never touched (thread stacks, arenas' 64 MiB reservations), which is not fragmentation",
                format_bytes(memory.vms_bytes.saturating_sub(memory.rss_bytes))
            )
        }
        _ => String::new(),
    };
    let (verdict, reason, advice) = if !from_start {
        (
            FragmentationVerdict::Unknown,
            format!(
                "{words}: memscope attached to running processes, so the unexplained part also holds what they allocated before; `memscope run` the service to tell retention from old allocations"
            ),
            Vec::new(),
        )
    } else if let Some((_, verdict, why, advice)) = best {
        (verdict, format!("{words}: {why}{vms_words}"), advice)
    } else {
        (
            FragmentationVerdict::None,
            format!("{words}: the program holds its anonymous memory{vms_words}"),
            Vec::new(),
        )
    };
    Some(Fragmentation {
        rss_bytes: memory.rss_bytes,
        anon_bytes: memory.anon_bytes,
        live_heap_bytes,
        heap_overhead_bytes,
        mapped_resident_bytes,
        python_arena_bytes,
        loader_bytes,
        retained_free_bytes: retained,
        ratio: (live_heap_bytes > 0).then(|| memory.anon_bytes as f64 / live_heap_bytes as f64),
        vms_rss_ratio: memory.vms_rss_ratio(),
        threads: memory.threads,
        arenas: arenas.heaps,
        arena_resident_bytes: arenas.resident_bytes,
        arena_free_bytes: arenas.free_bytes,
        arena_max_saving_bytes: arenas.saving,
        verdict,
        reason,
        advice,
    })
}

/// Pre-fork workers that each allocated the same memory for themselves:
/// the verdict when every worker of a group holds at least
/// `MIN_RETAINED_SHARE` of its private memory (USS) at sites all of them
/// allocated at, and the copies beyond one come to `MIN_RETAINED_BYTES`.
fn duplication(report: &Report) -> Option<(u64, FragmentationVerdict, String, Vec<String>)> {
    let mut copies = 0;
    let mut words = Vec::new();
    let mut sites = Vec::new();
    for group in &report.workers {
        let Some(memory) = group.memory else {
            continue;
        };
        let n = group.workers.len() as u64;
        let uss_per_worker = memory.uss_bytes / memory.processes.max(1);
        let each = group.repeated_bytes_per_worker;
        if (each as f64) < MIN_RETAINED_SHARE * uss_per_worker as f64 {
            continue;
        }
        copies += (n - 1) * each;
        words.push(format!(
            "each of the {n} workers of pid {} allocated {} itself at the same sites ({:.0}% of its {} private memory; {} shared)",
            group.master,
            format_bytes(each),
            each as f64 * 100.0 / uss_per_worker.max(1) as f64,
            format_bytes(uss_per_worker),
            format_bytes(memory.shared_bytes / memory.processes.max(1)),
        ));
        sites.extend(group.repeated_sites.iter().take(3).map(|s| {
            format!(
                "{} in every worker at {}",
                format_bytes(s.bytes_per_worker),
                Frame::chain(&s.frames, 3)
            )
        }));
    }
    if copies < MIN_RETAINED_BYTES {
        return None;
    }
    let mut advice = sites;
    advice.push(format!(
        "do that work once in the master before it forks (gunicorn: preload_app = True or --preload) and the workers share those pages copy-on-write: up to {} less (Python's reference counts write to shared objects; gc.freeze() before the fork keeps more of them shared)",
        format_bytes(copies)
    ));
    advice.push("or run fewer workers with more threads each".to_owned());
    Some((
        copies,
        FragmentationVerdict::DuplicationAcrossWorkers,
        words.join("; "),
        advice,
    ))
}

/// The MALLOC_ARENA_MAX advised: two arenas serve most threaded services
/// (what Heroku's and the JVM's users settled on).
pub const ADVISED_ARENA_MAX: usize = 2;

/// The arena heaps of the processes assessed, summed.
#[derive(Default)]
struct ArenaFigures {
    heaps: u64,
    resident_bytes: u64,
    free_bytes: u64,
    /// Summed per process: each has its own arenas.
    saving: u64,
}

impl ArenaFigures {
    fn add(&mut self, heaps: &[ArenaHeap]) {
        self.heaps += heaps.len() as u64;
        self.resident_bytes += heaps.iter().map(|h| h.resident_bytes).sum::<u64>();
        self.free_bytes += heaps.iter().map(|h| h.free_bytes).sum::<u64>();
        self.saving += arena_max_saving(heaps, ADVISED_ARENA_MAX);
    }
}

fn arena_advice(saving: u64) -> Vec<String> {
    vec![
        format!(
            "start the service with MALLOC_ARENA_MAX={ADVISED_ARENA_MAX} in its environment (for gunicorn the master's: workers inherit it) to give back up to {}: the free memory of all but the {ADVISED_ARENA_MAX} arenas per process that hold most (threads allocating at once still need theirs)",
            format_bytes(saving)
        ),
        "glibc gives each new thread its own arena while there are fewer than 8 per core, and each keeps the memory its threads freed".to_owned(),
        "or use an allocator whose thread caches return memory (jemalloc, tcmalloc, mimalloc, via LD_PRELOAD)".to_owned(),
        "gc.collect() does not help: the objects are freed already".to_owned(),
    ]
}

/// The resident bytes of CPython's object arenas, where a process counts
/// its objects by arena: the mmap sites whose every live mapping is an
/// arena (1 MiB from CPython 3.10, 256 KiB before) of a version running.
fn python_arena_resident(report: &Report) -> u64 {
    let sizes: Vec<u64> = report
        .processes
        .iter()
        .filter(|p| p.python_objects == Some(crate::report::PythonObjects::Arenas))
        .filter_map(|p| p.python.as_deref().map(python_arena_size))
        .collect();
    if sizes.is_empty() {
        return 0;
    }
    report
        .sites
        .iter()
        .filter(|s| s.kind == SiteKind::Mmap && s.live_count > 0)
        .filter(|s| sizes.iter().any(|size| s.live_bytes == s.live_count * size))
        .filter_map(|s| s.mapped.map(|m| m.resident_bytes))
        .sum()
}

/// CPython's ARENA_SIZE for a version string such as "3.11.2".
fn python_arena_size(version: &str) -> u64 {
    let minor = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if minor >= 10 { 1 << 20 } else { 256 << 10 }
}

/// Advice naming the mapping sites that hold most.
fn mapped_advice(report: &Report) -> Vec<String> {
    let mut sites: Vec<(u64, String)> = report
        .sites
        .iter()
        .filter(|s| s.kind == SiteKind::Mmap)
        .filter_map(|s| {
            let resident = s.mapped?.resident_bytes;
            (resident > 0).then(|| (resident, Frame::chain(&s.frames, 3)))
        })
        .collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.0));
    let mut advice: Vec<String> = sites
        .iter()
        .take(3)
        .map(|(resident, chain)| format!("{} resident, mapped at {chain}", format_bytes(*resident)))
        .collect();
    advice.push("these are mmap calls of the program or a library, not malloc: munmap what is done with, or bound what is mapped (a cache, a buffer pool, a file read whole)".to_owned());
    advice.push("for thread stacks: fewer threads, or smaller stacks (ulimit -s, pthread_attr_setstacksize, threading.stack_size)".to_owned());
    advice
}

fn retention_advice(retained: u64) -> Vec<String> {
    vec![
        format!(
            "{} is free memory between live blocks or above them: glibc returns the top of its heap only past M_TRIM_THRESHOLD and whole free pages only on malloc_trim(0); freed memory between live blocks stays resident",
            format_bytes(retained)
        ),
        "call malloc_trim(0) after large frees (Python: ctypes.CDLL('libc.so.6').malloc_trim(0)), or lower MALLOC_TRIM_THRESHOLD_".to_owned(),
        "allocate long-lived and short-lived objects apart, or use an allocator that returns free pages (jemalloc, mimalloc, via LD_PRELOAD)".to_owned(),
        "gc.collect() does not help: the objects are freed already".to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ProcessReport, tests_support};

    fn report(anon: u64, live: u64, following: Following) -> Report {
        let mut report = tests_support::sample_report();
        report.totals.live_bytes = live;
        report.totals.live_count = 0;
        report.mapped_memory = None;
        report.loader = None;
        let process = ProcessReport {
            memory: Some(MemoryFigures {
                rss_bytes: anon + (1 << 20),
                anon_bytes: anon,
                vms_bytes: 4 * anon,
                threads: 1,
                processes: 1,
                ..MemoryFigures::default()
            }),
            following,
            ..ProcessReport::default()
        };
        report.processes = vec![process];
        report
    }

    #[test]
    fn half_the_anonymous_memory_freed_but_kept_is_retention() {
        let f = assess(&report(200 << 20, 100 << 20, Following::Started)).expect("assessed");
        assert_eq!(f.verdict, FragmentationVerdict::AllocatorRetention);
        assert_eq!(f.retained_free_bytes, 100 << 20);
        assert_eq!(f.ratio, Some(2.0));
        assert!(
            f.reason.contains("100.0 MiB unexplained (50%)"),
            "{}",
            f.reason
        );
        // VMS is 4 x RSS in this report.
        assert!(
            f.reason
                .contains("; VMS is 4.0 x RSS: 599.0 MiB of address space is not resident"),
            "{}",
            f.reason
        );
        assert!(!f.advice.is_empty());
    }

    #[test]
    fn the_explanation_that_accounts_for_most_bytes_is_the_verdict() {
        use crate::workers::WorkerGroup;
        // 100 MiB retained, and 3 workers repeating 60 MiB each: the two
        // copies too many (120 MiB) are more.
        let mut r = report(200 << 20, 100 << 20, Following::Started);
        r.workers = vec![WorkerGroup {
            master: 1,
            workers: vec![2, 3, 4],
            memory: Some(MemoryFigures {
                uss_bytes: 3 * (64 << 20),
                processes: 3,
                ..MemoryFigures::default()
            }),
            repeated_bytes_per_worker: 60 << 20,
            ..WorkerGroup::default()
        }];
        let f = assess(&r).expect("assessed");
        assert_eq!(f.verdict, FragmentationVerdict::DuplicationAcrossWorkers);
        assert!(
            f.advice.iter().any(|a| a.contains("up to 120.0 MiB less")),
            "{f:#?}"
        );
        // Repeating a small part of their private memory is no verdict.
        r.workers[0].repeated_bytes_per_worker = 8 << 20;
        let f = assess(&r).expect("assessed");
        assert_eq!(f.verdict, FragmentationVerdict::AllocatorRetention);
    }

    #[test]
    fn python_arenas_are_not_mapped_growth() {
        use crate::report::{MappedReport, PythonObjects, Site};
        let mut r = report(100 << 20, 1 << 20, Following::Started);
        r.processes[0].python = Some("3.11.2".into());
        r.processes[0].python_objects = Some(PythonObjects::Arenas);
        let resident = 90 << 20;
        r.mapped_memory = Some(MappedReport {
            resident_bytes: resident,
            ..MappedReport::default()
        });
        r.sites = vec![Site {
            kind: SiteKind::Mmap,
            live_bytes: 90 << 20,
            live_count: 90,
            mapped: r.mapped_memory,
            ..Site::default()
        }];
        let f = assess(&r).expect("assessed");
        assert_eq!(f.python_arena_bytes, resident);
        assert_eq!(f.verdict, FragmentationVerdict::None, "{f:#?}");
        // On 3.9 arenas are 256 KiB: these 1 MiB mappings are not theirs.
        r.processes[0].python = Some("3.9.18".into());
        let f = assess(&r).expect("assessed");
        assert_eq!(f.verdict, FragmentationVerdict::MappedGrowth, "{f:#?}");
    }

    #[test]
    fn a_heap_that_is_all_live_is_none_and_attach_is_unknown() {
        let f = assess(&report(100 << 20, 99 << 20, Following::Started)).expect("assessed");
        assert_eq!(f.verdict, FragmentationVerdict::None);
        let f = assess(&report(200 << 20, 100 << 20, Following::Attached)).expect("assessed");
        assert_eq!(f.verdict, FragmentationVerdict::Unknown);
        assert!(f.advice.is_empty());
    }
}
