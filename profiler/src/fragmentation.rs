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

use serde::{Deserialize, Serialize};

use crate::{
    process_memory::MemoryFigures, processes::Following, report::Report, units::format_bytes,
};

/// glibc's chunk header (8 bytes) and 16-byte alignment, on average per
/// live block.
pub const OVERHEAD_PER_BLOCK: u64 = 16;
/// Retention below this is noise.
pub const MIN_RETAINED_BYTES: u64 = 16 << 20;
/// ... and below this share of anonymous RSS.
pub const MIN_RETAINED_SHARE: f64 = 0.25;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FragmentationVerdict {
    /// Anonymous RSS is what the program holds.
    None,
    /// The allocator keeps freed memory resident.
    AllocatorRetention,
    /// Not every block was seen (attached to a running process).
    Unknown,
}

/// report.json's `fragmentation`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fragmentation {
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub live_heap_bytes: u64,
    /// Headers and alignment of the live blocks (estimated per block).
    pub heap_overhead_bytes: u64,
    /// Resident mappings outside malloc (thread stacks included).
    pub mapped_resident_bytes: u64,
    /// The loader's anonymous mappings for the images.
    pub loader_bytes: u64,
    /// Anonymous RSS none of the above explains: free memory the
    /// allocator keeps (or, after an attach, memory allocated before).
    pub retained_free_bytes: u64,
    /// Anonymous RSS over the live heap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms_rss_ratio: Option<f64>,
    pub threads: u64,
    pub verdict: FragmentationVerdict,
    /// Why, with the numbers.
    pub reason: String,
    pub advice: Vec<String>,
}

/// The assessment of the processes whose memory was read, or None.
pub fn assess(report: &Report) -> Option<Fragmentation> {
    let mut memory = MemoryFigures::default();
    let mut from_start = true;
    for process in &report.processes {
        if let Some(figures) = &process.memory {
            memory.add(figures);
            from_start &= matches!(process.following, Following::Started | Following::Forked);
        }
    }
    if memory.processes == 0 {
        return None;
    }
    let live_heap_bytes = report.totals.live_bytes;
    let heap_overhead_bytes = report.totals.live_count * OVERHEAD_PER_BLOCK;
    let mapped_resident_bytes = report.mapped_memory.map_or(0, |m| m.resident_bytes);
    let loader_bytes = report.loader.map_or(0, |l| l.live_bytes);
    let explained = live_heap_bytes + heap_overhead_bytes + mapped_resident_bytes + loader_bytes;
    let retained = memory.anon_bytes.saturating_sub(explained);
    let share = retained as f64 / memory.anon_bytes.max(1) as f64;
    let words = format!(
        "anonymous RSS {} = live heap {} + headers {} + mappings {} + loader {} + {} unexplained ({:.0}%)",
        format_bytes(memory.anon_bytes),
        format_bytes(live_heap_bytes),
        format_bytes(heap_overhead_bytes),
        format_bytes(mapped_resident_bytes),
        format_bytes(loader_bytes),
        format_bytes(retained),
        share * 100.0
    );
    let (verdict, reason, advice) = if !from_start {
        (
            FragmentationVerdict::Unknown,
            format!(
                "{words}: memscope attached to running processes, so the unexplained part also holds what they allocated before; `memscope run` the service to tell retention from old allocations"
            ),
            Vec::new(),
        )
    } else if retained >= MIN_RETAINED_BYTES && share >= MIN_RETAINED_SHARE {
        (
            FragmentationVerdict::AllocatorRetention,
            format!("{words}: the program freed that memory, the allocator keeps it resident"),
            retention_advice(retained),
        )
    } else {
        (
            FragmentationVerdict::None,
            format!("{words}: the program holds its anonymous memory"),
            Vec::new(),
        )
    };
    Some(Fragmentation {
        rss_bytes: memory.rss_bytes,
        anon_bytes: memory.anon_bytes,
        live_heap_bytes,
        heap_overhead_bytes,
        mapped_resident_bytes,
        loader_bytes,
        retained_free_bytes: retained,
        ratio: (live_heap_bytes > 0).then(|| memory.anon_bytes as f64 / live_heap_bytes as f64),
        vms_rss_ratio: memory.vms_rss_ratio(),
        threads: memory.threads,
        verdict,
        reason,
        advice,
    })
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
        assert!(!f.advice.is_empty());
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
