//! The report.json model (`memscope.report/1`). Later versions only add
//! fields. `build` makes one from a kernel snapshot.

mod build;
pub mod saved;
mod schema;

use profiler_common::{HeapTop, StackTotals, site_class};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::build::{
    Measured, ReportContext, build_report, combined_totals, key_frames, window_sites,
};
pub use self::schema::{SCHEMA_FILE, json_schema, json_schema_text};
use crate::{attach::AttachedProbe, processes::Following};

pub const SCHEMA: &str = "memscope.report/1";

/// One profile: report.json (`memscope.report/1`, docs/report-schema.md).
/// Within a version fields are only added; readers ignore those they do not know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Report {
    /// The version of this format: `memscope.report/1`.
    #[schemars(schema_with = "schema::schema_version")]
    pub schema: String,
    /// The profiled process.
    pub target: TargetInfo,
    /// Seconds from the start of the session (before the probes were
    /// attached) to the building of the report.
    pub duration_s: f64,
    /// The malloc family. glibc's own mmaps for large blocks happen inside
    /// malloc and are counted here, once.
    pub totals: Totals,
    /// Anonymous private mappings made outside the allocator (`kind: mmap` sites).
    #[serde(default)]
    pub mapped: Totals,
    /// Sorted by live bytes, largest first.
    pub sites: Vec<Site>,
    /// What the kernel side could not record: all zero means the figures
    /// are exact.
    pub completeness: Completeness,
    /// Where each allocator function was probed.
    #[serde(default)]
    pub probes: Vec<AttachedProbe>,
    /// The native objects the sites' frames come from, with their build ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<Module>,
    /// Things the reader should know about this profile (loss, coverage).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The version of memscope that wrote the report.
    #[serde(default)]
    pub memscope_version: String,
    /// The target and the children it forked.
    #[serde(default)]
    pub processes: Vec<ProcessReport>,
    /// What putting the probes on each followed process cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_costs: Option<AttachCosts>,
    /// What closing each window cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick_costs: Option<TickCosts>,
    /// The session cut in windows (`--window`, `memscope mark`), oldest first.
    #[serde(default)]
    pub windows: Vec<WindowReport>,
    /// The most the followed processes held at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak: Option<PeakReport>,
    /// Every alert raised, as alerts.jsonl has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<crate::alert::Alert>,
    /// What the mappings outside malloc hold (`mapped` counts them at
    /// their committed size where they were measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_memory: Option<MappedReport>,
    /// Anonymous memory the dynamic loader mapped for the images it loaded
    /// (their .bss, its own early heap): the images', not allocation sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<Totals>,
    /// stdio's stream buffers (malloc'd at a stream's first use, kept to
    /// the exit by design): the C runtime's, not allocation sites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio_buffers: Option<Totals>,
    /// Pre-fork workers, per master: shared and private memory, and what
    /// every worker allocated again (see `workers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<crate::workers::WorkerGroup>,
    /// Anonymous RSS against the live heap: what the allocator keeps
    /// (see `fragmentation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fragmentation: Option<crate::fragmentation::Fragmentation>,
    /// With `--stack-sample`: the sites (the windows' and requests' too)
    /// are estimated from a byte sample of stacks; `totals`, the
    /// processes' and the windows' own figures are exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingReport>,
    /// Per request of the handler (`--request-fn`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<crate::requests::RequestsReport>,
}

/// One window of the session: what it allocated, freed and kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WindowReport {
    /// 0 for the first window.
    pub index: usize,
    /// Seconds after the session started.
    pub start_s: f64,
    /// Seconds after the session started: the next window's `start_s`.
    pub end_s: f64,
    /// What ended the window.
    pub closed_by: crate::timeline::WindowEnd,
    /// The malloc family, as `totals`.
    pub alloc_bytes: u64,
    /// Allocations in the window.
    pub alloc_count: u64,
    /// Bytes freed in the window.
    pub free_bytes: u64,
    /// Frees in the window.
    pub free_count: u64,
    /// alloc_bytes - free_bytes: what the window added to the live bytes.
    pub growth_bytes: i64,
    /// At the window's end.
    pub live_bytes: u64,
    /// Resident memory of the running followed processes at the window's end.
    pub rss_bytes: u64,
    /// The followed processes' memory at the window's end, summed: RSS,
    /// PSS, USS and the rest (see `process_memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::process_memory::MemoryFigures>,
    /// The sites that grew most in the window (malloc and mmap), largest first.
    pub top_sites: Vec<WindowSite>,
}

/// A site's part in one window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WindowSite {
    /// What the site allocates with.
    pub kind: SiteKind,
    /// Innermost first, as `sites[].frames`.
    pub frames: Vec<Frame>,
    /// alloc_bytes - free_bytes: what it added to the live bytes in the window.
    pub growth_bytes: i64,
    /// Bytes it allocated in the window.
    pub alloc_bytes: u64,
    /// Allocations it made in the window.
    pub alloc_count: u64,
    /// Bytes of its blocks freed in the window.
    pub free_bytes: u64,
    /// Its blocks freed in the window.
    pub free_count: u64,
}

/// The high-water mark of live bytes (malloc family), kept exactly in the
/// kernel: over all followed processes at once, and per process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PeakReport {
    /// The high-water mark over all followed processes at once.
    pub live_bytes: u64,
    /// Seconds after the session started.
    pub at_s: f64,
    /// Each process's own peak.
    pub processes: Vec<ProcessPeakReport>,
    /// The window whose end is nearest to the peak.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// What the sites held at the end of `window`, largest first.
    #[serde(default)]
    pub top_sites: Vec<Site>,
}

/// One process's own peak (also `processes[].peak_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessPeakReport {
    /// The process.
    pub pid: u32,
    /// The most it held at once (malloc family, inherited blocks included).
    pub live_bytes: u64,
    /// When, in seconds after the session started.
    pub at_s: f64,
}

/// Time spent probing the followed processes (for a forked child: from its
/// event to its probes on and its live set copied), while each waited.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttachCosts {
    /// Processes timed.
    pub processes: u64,
    /// Median cost, in milliseconds.
    pub median_ms: f64,
    /// Largest cost, in milliseconds.
    pub max_ms: f64,
}

impl AttachCosts {
    pub fn of(costs: &[std::time::Duration]) -> Option<Self> {
        let (median_ms, max_ms) = median_and_max_ms(costs)?;
        Some(Self {
            processes: costs.len() as u64,
            median_ms,
            max_ms,
        })
    }
}

/// Time spent reading the kernel's totals at each window's end (the
/// target runs meanwhile).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TickCosts {
    /// Window ends timed.
    pub ticks: u64,
    /// Median cost, in milliseconds.
    pub median_ms: f64,
    /// Largest cost, in milliseconds.
    pub max_ms: f64,
}

impl TickCosts {
    pub fn of(costs: &[std::time::Duration]) -> Option<Self> {
        let (median_ms, max_ms) = median_and_max_ms(costs)?;
        Some(Self {
            ticks: costs.len() as u64,
            median_ms,
            max_ms,
        })
    }
}

fn median_and_max_ms(costs: &[std::time::Duration]) -> Option<(f64, f64)> {
    let mut ms: Vec<f64> = costs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    Some((*ms.get(ms.len() / 2)?, *ms.last()?))
}

/// One process of the session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessReport {
    /// Process id, as memscope (the host) sees it.
    pub pid: u32,
    /// Absent for the target itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
    /// Its command line (after its last exec).
    pub command: String,
    /// Seconds after the session started.
    pub started_s: f64,
    /// Seconds after the session started when it exited; absent if it was
    /// still running at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_s: Option<f64>,
    /// Includes `inherited_*`: a forked child starts with its parent's live blocks.
    pub totals: Totals,
    /// Its own anonymous mappings outside malloc, as the top-level `mapped`.
    #[serde(default)]
    pub mapped: Totals,
    /// Movement of the heap top (brk), inside malloc or not; absent if the
    /// process never called brk while traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heap: Option<HeapReport>,
    /// Malloc-family blocks copied from its parent's live set at the fork
    /// (0 for the target).
    #[serde(default)]
    pub inherited_count: u64,
    /// Their bytes.
    #[serde(default)]
    pub inherited_bytes: u64,
    /// Live bytes minus inherited bytes (malloc family): what this process added.
    #[serde(default)]
    pub growth_bytes: i64,
    /// This process's sites (with `--per-process`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Site>,
    /// How memscope followed it (absent in older reports: `attached`).
    #[serde(default)]
    pub following: Following,
    /// Why it is not, or only partly, followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The CPython version it runs, when its Python frames are walked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// How its Python objects are counted, when it runs CPython.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_objects: Option<PythonObjects>,
    /// The most it held at once (malloc family, inherited blocks included),
    /// and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_bytes: Option<u64>,
    /// When it held `peak_bytes`, in seconds after the session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_s: Option<f64>,
    /// What the process held as the kernel counts it, read at the end
    /// (or at its exit stop with `run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::process_memory::MemoryFigures>,
    /// Its glibc arena heaps, read with `memory`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arenas: Vec<crate::arenas::ArenaHeap>,
    /// Its anonymous mappings by size class, read with `arenas`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anon_mappings: Vec<crate::address_space::SizeClass>,
    /// Seconds into the session when its interpreter began to finalize
    /// (with `memscope check`): what it held then is the program's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown_s: Option<f64>,
}

/// The profiled process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TargetInfo {
    /// Process id, as memscope (the host) sees it.
    pub pid: u32,
    /// `run`: the command and its arguments; `attach`: its command line;
    /// space-joined.
    pub command: String,
    /// Exit code of a command started by `memscope run` (128+signal when
    /// killed); absent while it runs or for `attach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// Allocations made and freed, and what is still live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Totals {
    /// Allocations, blocks forked children inherited included.
    pub alloc_count: u64,
    /// Bytes of those allocations.
    pub alloc_bytes: u64,
    /// Frees of blocks memscope saw allocated (and blocks an exec released).
    pub free_count: u64,
    /// Bytes of those frees.
    pub free_bytes: u64,
    /// alloc_count - free_count.
    pub live_count: u64,
    /// alloc_bytes - free_bytes.
    pub live_bytes: u64,
}

impl From<StackTotals> for Totals {
    fn from(t: StackTotals) -> Self {
        Self {
            alloc_count: t.alloc_count,
            alloc_bytes: t.alloc_bytes,
            free_count: t.free_count,
            free_bytes: t.free_bytes,
            live_count: t.live_count(),
            live_bytes: t.live_bytes(),
        }
    }
}

/// A process's heap top (program break).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HeapReport {
    /// The break returned by the first brk call seen.
    pub first: u64,
    /// The break after the last brk call seen.
    pub current: u64,
    /// Bytes it moved up, summed over the brk calls after the first.
    pub grown_bytes: u64,
    /// Bytes it moved down, summed likewise.
    pub shrunk_bytes: u64,
}

impl From<HeapTop> for HeapReport {
    fn from(h: HeapTop) -> Self {
        Self {
            first: h.first,
            current: h.current,
            grown_bytes: h.grown,
            shrunk_bytes: h.shrunk,
        }
    }
}

/// One source location in a call stack.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub struct Frame {
    /// The function's name, demangled (`FILE+0xOFFSET` without a symbol).
    pub function: String,
    /// The executable or library, as the target sees its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// The source file, from debug info.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The source line, 1-based: of the call to the next frame inward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// Machine code, or a Python function (absent in older reports: `native`).
    #[serde(default)]
    pub language: Language,
}

/// An object (executable or library) frames are in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Module {
    /// Its path as the target saw it: the frames' `module`.
    pub path: String,
    /// Its GNU build id in hex, when the file has one (the name of its debug
    /// file under /usr/lib/debug/.build-id, the key debuginfod serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

/// What a frame runs: machine code, or a Python function the interpreter
/// runs (its `function` is the qualified name, `file` the source file).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    #[default]
    Native,
    Python,
}

/// How a CPython process's small objects are counted (see
/// `python::objects`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PythonObjects {
    /// As the pymalloc arenas (mmap) that hold them, charged to the Python
    /// stack that opened each.
    Arenas,
    /// One by one through malloc (`PYTHONMALLOC=malloc`).
    Malloc,
    /// One by one by probes on its object allocator (`--python-objects`
    /// with `attach`).
    Probes,
}

impl Frame {
    pub fn named(function: &str) -> Self {
        Self {
            function: function.to_owned(),
            module: None,
            file: None,
            line: None,
            language: Language::Native,
        }
    }

    /// How tables and flame graphs name the frame: a Python frame with its
    /// file and line, `analyze (app.py:21)`, as Python's own tracebacks
    /// place a function; a native one by its function. An installed
    /// package's file is named from the package (`flask/app.py`), so it is
    /// not taken for the service's own `app.py`.
    /// A stack as the table shows it: `leak_site <- main <- ...`, the
    /// first `frames` frames.
    pub fn chain(stack: &[Frame], frames: usize) -> String {
        let mut chain = stack
            .iter()
            .take(frames)
            .map(Frame::label)
            .collect::<Vec<_>>()
            .join(" <- ");
        if stack.len() > frames {
            chain.push_str(" <- ...");
        }
        chain
    }

    pub fn label(&self) -> String {
        match (self.language, &self.file) {
            (Language::Python, Some(file)) => {
                let file = python_file_label(file);
                match self.line {
                    Some(line) => format!("{} ({file}:{line})", self.function),
                    None => format!("{} ({file})", self.function),
                }
            }
            _ => self.function.clone(),
        }
    }
}

/// A Python source file as a label names it: from its package when it is
/// installed (site-packages, the standard library), else by file name.
fn python_file_label(path: &str) -> &str {
    for marker in ["/site-packages/", "/dist-packages/"] {
        if let Some((_, rest)) = path.rsplit_once(marker) {
            return rest;
        }
    }
    // The standard library: /usr/lib/python3.11/json/decoder.py.
    if let Some((_, rest)) = path.rsplit_once("/lib/python3.")
        && let Some((_, rest)) = rest.split_once('/')
    {
        return rest;
    }
    path.rsplit('/').next().unwrap_or(path)
}

/// What a site allocates with.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// The malloc family (glibc's own mmaps for large blocks included).
    #[default]
    Malloc,
    /// Anonymous mappings made outside the allocator.
    Mmap,
}

impl SiteKind {
    pub fn of_class(class: u32) -> Self {
        match class {
            site_class::MMAP => Self::Mmap,
            _ => Self::Malloc,
        }
    }
}

/// An allocating call stack and what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Site {
    /// What it allocates with (absent in older reports: `malloc`).
    #[serde(default)]
    pub kind: SiteKind,
    /// Innermost first: `frames[0]` called the allocator.
    pub frames: Vec<Frame>,
    /// alloc_bytes - free_bytes: what it still holds.
    pub live_bytes: u64,
    /// alloc_count - free_count.
    pub live_count: u64,
    /// Bytes allocated from this stack, inherited blocks included.
    pub alloc_bytes: u64,
    /// Allocations from this stack, inherited blocks included.
    pub alloc_count: u64,
    /// Bytes of its blocks freed, wherever the free happened.
    #[serde(default)]
    pub free_bytes: u64,
    /// Its blocks freed.
    #[serde(default)]
    pub free_count: u64,
    /// Live bytes that became live during the session: `live_bytes` less
    /// what forked children inherited from their parents (live before).
    /// What growth.svg draws.
    #[serde(default)]
    pub growth_bytes: i64,
    /// Its figures at each window, for a site live at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<SiteHistory>,
    /// For an mmap site: what its ranges hold, read from the process while
    /// it lived (`live_bytes` is then the committed bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped: Option<MappedReport>,
    /// What its memory is doing: leak, growing, bounded, temporary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<crate::classify::Classification>,
    /// With `--stack-sample`: its figures are estimates, and its true live
    /// bytes are within this of `live_bytes` at 95% confidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_bytes_error: Option<u64>,
}

/// `--stack-sample`: how the sites' figures were estimated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SamplingReport {
    /// The mean gap, in bytes allocated, between heap blocks whose stack
    /// was walked: a block of `s` bytes was walked with chance
    /// `1 - exp(-s / mean_bytes)`, and stands for the inverse of that.
    pub mean_bytes: u64,
    /// Heap blocks whose stack was walked.
    pub walked_count: u64,
    /// The heap's totals summed over the estimated sites (`totals` are
    /// exact: every block is counted with its size).
    pub estimated: Totals,
}

/// What anonymous mappings hold, from /proc/PID/maps and pagemap (see
/// `address_space`), as opposed to the address ranges `mmap` returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MappedReport {
    /// The ranges as recorded at `mmap` (and shrunk by munmaps of their
    /// front), for the ranges measured.
    pub recorded_bytes: u64,
    /// Still mapped (trimmed tails and holes left out).
    pub mapped_bytes: u64,
    /// Mapped with some access: memory the process may use.
    pub committed_bytes: u64,
    /// Mapped PROT_NONE: address space only (arena reservations, guards).
    pub reserved_bytes: u64,
    /// In RAM.
    pub resident_bytes: u64,
}

impl MappedReport {
    /// `live_bytes` of the measured ranges among them counted at their
    /// committed size, not their recorded one.
    pub fn committed_live(&self, live_bytes: u64) -> u64 {
        (live_bytes + self.committed_bytes).saturating_sub(self.recorded_bytes)
    }

    pub fn add(&mut self, recorded: u64, bytes: crate::address_space::MappedBytes) {
        self.recorded_bytes += recorded;
        self.mapped_bytes += bytes.mapped;
        self.committed_bytes += bytes.committed;
        self.reserved_bytes += bytes.reserved();
        self.resident_bytes += bytes.resident;
    }
}

/// A site across the session's windows (`windows[]`), oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SiteHistory {
    /// Live bytes at each window's end.
    pub live_bytes: Vec<u64>,
    /// Bytes allocated in each window.
    pub alloc_bytes: Vec<u64>,
    /// Of the bytes allocated in each window, those still live at the end.
    pub surviving_bytes: Vec<u64>,
}

impl Site {
    /// What the site's counts add up to.
    pub fn totals(&self) -> StackTotals {
        StackTotals {
            alloc_count: self.alloc_count,
            alloc_bytes: self.alloc_bytes,
            free_count: self.free_count,
            free_bytes: self.free_bytes,
        }
    }
}

/// What the kernel side could not record. All zero means the figures are exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Completeness {
    /// Allocations not tracked because a map was full (sum of the three below).
    pub map_full: u64,
    /// Stacks that could not be walked or stored; their bytes are under an
    /// "[unknown stack]" site.
    pub stack_errors: u64,
    /// Frees of blocks allocated before memscope attached (or lost to a full map).
    pub unknown_frees: u64,
    /// Return probes that fired without their entry.
    pub missed_returns: u64,
    /// Allocations not tracked: the live map (`--max-live`) was full.
    #[serde(default)]
    pub live_map_full: u64,
    /// Allocations or frees whose per-(process, stack) totals could not be
    /// stored.
    #[serde(default)]
    pub totals_map_full: u64,
    /// Allocator calls missed: the thread's call slot was another
    /// thread's, and the map for such threads was full.
    #[serde(default)]
    pub in_flight_full: u64,
    /// Forked children that could not be followed.
    #[serde(default)]
    pub lost_children: u64,
    /// Processes whose heap top (brk) could not be tracked.
    #[serde(default)]
    pub heap_map_full: u64,
    /// Processes of the tree that run without probes (see `processes[]`
    /// for each one's reason).
    #[serde(default)]
    pub unfollowed_processes: u64,
    /// Forked processes continued before their probes were on.
    #[serde(default)]
    pub late_processes: u64,
    /// Allocations in a Python thread whose frame chain could not be read:
    /// their stacks have native frames only.
    #[serde(default)]
    pub python_stack_errors: u64,
    /// Python stacks deeper than memscope records: the outermost frames
    /// are missing (the innermost are kept).
    #[serde(default)]
    pub python_truncated: u64,
    /// Python stacks not stored (the map was full): native frames only.
    #[serde(default)]
    pub python_stacks_full: u64,
    /// Of `stack_errors`, stacks that collided in the stack map with
    /// another one (a hash collision; the rest failed to be walked).
    #[serde(default)]
    pub stack_collisions: u64,
    /// Of `stack_errors`, stacks the unwinder walked but could not store:
    /// its map (`--max-stacks` entries) was full.
    #[serde(default)]
    pub unwound_stacks_full: u64,
    /// Processes whose peak was not tracked (the map was full).
    #[serde(default)]
    pub peak_map_full: u64,
    /// Raises of a peak lost to other CPUs raising it at once: the peak
    /// may be low by one allocation each.
    #[serde(default)]
    pub peak_race_lost: u64,
    /// Requests not tracked: the request map was full (their allocations
    /// still count in the sites, untagged).
    #[serde(default)]
    pub requests_full: u64,
    /// Request records lost on a full ring: a request's figures are missing.
    #[serde(default)]
    pub request_events_lost: u64,
    /// Recorded stacks (per process) cut short: the frame-pointer walk
    /// left the code (a function built without frame pointers) or reached
    /// the kernel's depth. Their sites end with `[truncated]`; nothing is
    /// lost, the callers beyond are unknown.
    #[serde(default)]
    pub truncated_stacks: u64,
}

impl Completeness {
    /// Whether anything was lost (unknown frees are not a loss: they are
    /// memory memscope never saw allocated).
    pub fn lost_anything(&self) -> bool {
        self.map_full
            + self.stack_errors
            + self.missed_returns
            + self.lost_children
            + self.unfollowed_processes
            + self.late_processes
            + self.python_stack_errors
            + self.python_truncated
            + self.python_stacks_full
            + self.peak_map_full
            + self.peak_race_lost
            + self.requests_full
            + self.request_events_lost
            > 0
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::alert::{Alert, AlertKind, AlertLevel, AlertRequest, AlertSite};

    fn frame(function: &str, file: &str, line: u32) -> Frame {
        Frame {
            function: function.into(),
            module: Some("/opt/app/server".into()),
            file: Some(file.into()),
            line: Some(line),
            language: Language::Native,
        }
    }

    fn site(frames: Vec<Frame>, alloc: (u64, u64), free: (u64, u64)) -> Site {
        Site {
            kind: SiteKind::Malloc,
            frames,
            live_bytes: alloc.1 - free.1,
            live_count: alloc.0 - free.0,
            alloc_bytes: alloc.1,
            alloc_count: alloc.0,
            free_bytes: free.1,
            free_count: free.0,
            growth_bytes: (alloc.1 - free.1) as i64,
            history: None,
            mapped: None,
            classification: None,
            live_bytes_error: None,
        }
    }

    /// A fixed report for golden-file tests of the renderings.
    pub(crate) fn sample_report() -> Report {
        let main = frame("main", "server.c", 80);
        let sites = vec![
            site(
                vec![
                    frame("leak_site", "server.c", 12),
                    frame("handle_request", "server.c", 40),
                    main.clone(),
                ],
                (1000, 4_096_000),
                (0, 0),
            ),
            site(
                vec![
                    frame("cache_insert", "cache.c", 7),
                    frame("handle_request", "server.c", 44),
                    main.clone(),
                ],
                (64, 65_536),
                (32, 32_768),
            ),
            site(
                vec![frame("parse_body", "server.c", 30), main],
                (5000, 640_000),
                (5000, 640_000),
            ),
        ];
        let mut totals = StackTotals::default();
        for s in &sites {
            totals.add(&s.totals());
        }
        let totals = Totals::from(totals);
        Report {
            schema: SCHEMA.into(),
            target: TargetInfo {
                pid: 4242,
                command: "./server --port 8080".into(),
                exit_code: Some(0),
            },
            duration_s: 12.5,
            totals,
            mapped: Totals::default(),
            sites,
            completeness: Completeness::default(),
            probes: Vec::new(),
            modules: Vec::new(),
            warnings: Vec::new(),
            memscope_version: "0.1.0".into(),
            processes: Vec::new(),
            attach_costs: None,
            tick_costs: None,
            windows: Vec::new(),
            peak: None,
            alerts: Vec::new(),
            mapped_memory: None,
            stdio_buffers: None,
            workers: Vec::new(),
            loader: None,
            fragmentation: None,
            sampling: None,
            requests: None,
        }
    }

    /// A report with every part a report can have: each optional field
    /// set, each list that is left out when empty given an entry.
    pub(crate) fn full_report() -> Report {
        let mut report = sample_report();
        report.sampling = Some(SamplingReport {
            mean_bytes: 512 * 1024,
            walked_count: 61,
            estimated: report.totals,
        });
        report.modules = vec![Module {
            path: "/opt/app/server".into(),
            build_id: Some("5e6b0c2d4f".into()),
        }];
        let memory = crate::process_memory::MemoryFigures {
            rss_bytes: 9 << 20,
            pss_bytes: 8 << 20,
            uss_bytes: 7 << 20,
            shared_bytes: 2 << 20,
            anon_bytes: 6 << 20,
            file_bytes: 3 << 20,
            shmem_bytes: 4096,
            swap_bytes: 0,
            vms_bytes: 200 << 20,
            threads: 2,
            processes: 1,
        };
        let frames = report.sites[0].frames.clone();
        let mut python = Frame::named("handle");
        python.file = Some("/srv/app/app.py".into());
        python.line = Some(41);
        python.language = Language::Python;
        let site = &mut report.sites[0];
        site.live_bytes_error = Some(512_000);
        site.frames.push(python);
        site.history = Some(SiteHistory {
            live_bytes: vec![2_048_000, 4_096_000],
            alloc_bytes: vec![2_048_000, 2_048_000],
            surviving_bytes: vec![2_048_000, 2_048_000],
        });
        site.classification = Some(crate::classify::Classification {
            verdict: crate::classify::Verdict::Unknown,
            growth_bytes_per_window: 2_048_000,
            confidence: crate::classify::Confidence::Low,
            reason: "2 windows".into(),
            windows_needed: Some(1),
        });
        let mapped = MappedReport {
            recorded_bytes: 1 << 27,
            mapped_bytes: 1 << 27,
            committed_bytes: 1 << 20,
            reserved_bytes: (1 << 27) - (1 << 20),
            resident_bytes: 1 << 18,
        };
        report.sites.push(Site {
            kind: SiteKind::Mmap,
            frames: vec![Frame::named("reserve_site")],
            live_bytes: 1 << 20,
            live_count: 1,
            alloc_bytes: 1 << 27,
            alloc_count: 1,
            mapped: Some(mapped),
            ..Site::default()
        });
        report.mapped = Totals {
            alloc_count: 1,
            alloc_bytes: 1 << 27,
            live_count: 1,
            live_bytes: 1 << 20,
            ..Totals::default()
        };
        report.mapped_memory = Some(mapped);
        report.loader = Some(Totals {
            alloc_count: 1,
            alloc_bytes: 8192,
            live_count: 1,
            live_bytes: 8192,
            ..Totals::default()
        });
        report.stdio_buffers = Some(Totals {
            alloc_count: 1,
            alloc_bytes: 1024,
            live_count: 1,
            live_bytes: 1024,
            ..Totals::default()
        });
        report.probes = vec![crate::attach::AttachedProbe {
            function: "free".into(),
            library: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            entry_offset: 3,
            emulated: true,
            return_probe: false,
        }];
        report.warnings = vec!["1 child was not followed".into()];
        let target = ProcessReport {
            pid: 4242,
            command: "./server --port 8080".into(),
            totals: report.totals,
            heap: Some(HeapReport {
                first: 0x5555_0000_0000,
                current: 0x5555_0040_0000,
                grown_bytes: 0x40_0000,
                shrunk_bytes: 0,
            }),
            growth_bytes: report.totals.live_bytes as i64,
            sites: report.sites.clone(),
            following: crate::processes::Following::Started,
            python: Some("3.11.2".into()),
            python_objects: Some(PythonObjects::Malloc),
            peak_bytes: Some(4_096_000),
            peak_s: Some(11.0),
            memory: Some(memory),
            arenas: vec![crate::arenas::ArenaHeap {
                kind: crate::arenas::HeapKind::Main,
                address: 0x5555_0000_0000,
                committed_bytes: 0x40_0000,
                resident_bytes: 0x40_0000,
                live_bytes: 4_096_000,
                live_count: 1000,
                free_bytes: 80_304,
            }],
            anon_mappings: vec![crate::address_space::SizeClass {
                min_bytes: 1 << 20,
                count: 1,
                mapped_bytes: 1 << 27,
                committed_bytes: 1 << 20,
                resident_bytes: 1 << 18,
            }],
            teardown_s: Some(12.0),
            ..ProcessReport::default()
        };
        let child = ProcessReport {
            pid: 4243,
            ppid: Some(4242),
            command: "./server --port 8080".into(),
            started_s: 0.5,
            exited_s: Some(3.0),
            inherited_count: 1,
            inherited_bytes: 4096,
            following: crate::processes::Following::Late,
            note: Some("held 62 ms before memscope could probe it".into()),
            ..ProcessReport::default()
        };
        report.processes = vec![target, child];
        report.attach_costs = Some(AttachCosts {
            processes: 2,
            median_ms: 12.5,
            max_ms: 20.0,
        });
        report.tick_costs = Some(TickCosts {
            ticks: 2,
            median_ms: 0.5,
            max_ms: 0.75,
        });
        let window_site = WindowSite {
            kind: SiteKind::Malloc,
            frames: frames.clone(),
            growth_bytes: 2_048_000,
            alloc_bytes: 2_048_000,
            alloc_count: 500,
            free_bytes: 0,
            free_count: 0,
        };
        report.windows = vec![WindowReport {
            index: 0,
            start_s: 0.0,
            end_s: 6.25,
            closed_by: crate::timeline::WindowEnd::Timer,
            alloc_bytes: 2_048_000,
            alloc_count: 500,
            free_bytes: 0,
            free_count: 0,
            growth_bytes: 2_048_000,
            live_bytes: 2_048_000,
            rss_bytes: 9 << 20,
            memory: Some(memory),
            top_sites: vec![window_site],
        }];
        report.peak = Some(PeakReport {
            live_bytes: 4_096_000,
            at_s: 11.0,
            processes: vec![ProcessPeakReport {
                pid: 4242,
                live_bytes: 4_096_000,
                at_s: 11.0,
            }],
            window: Some(0),
            top_sites: vec![report.sites[0].clone()],
        });
        report.alerts = vec![Alert {
            kind: AlertKind::Request,
            level: AlertLevel::Warning,
            at_s: 6.25,
            window: 0,
            value_bytes: 2_048_000,
            threshold_bytes: 1 << 20,
            limit_bytes: Some(1 << 30),
            message: "a request retained 2.0 MB at leak_site".into(),
            top_sites: vec![AlertSite {
                site: "leak_site <- handle_request <- main".into(),
                growth_bytes: 2_048_000,
            }],
            held_back: 1,
            request: Some(AlertRequest {
                pid: 4242,
                tid: 4244,
                start_s: 6.0,
                duration_ms: 3.5,
            }),
        }];
        report.workers = vec![crate::workers::WorkerGroup {
            master: 4242,
            workers: vec![4243, 4245],
            memory: Some(memory),
            added_bytes: 8192,
            repeated_bytes_per_worker: 4096,
            repeated_sites: vec![crate::workers::RepeatedSite {
                kind: SiteKind::Malloc,
                frames: frames.clone(),
                bytes_per_worker: 4096,
            }],
        }];
        report.fragmentation = Some(crate::fragmentation::Fragmentation {
            rss_bytes: 9 << 20,
            anon_bytes: 6 << 20,
            live_heap_bytes: 4_096_000,
            heap_overhead_bytes: 16_000,
            mapped_resident_bytes: 1 << 18,
            python_arena_bytes: 0,
            loader_bytes: 8192,
            retained_free_bytes: 1_920_000,
            ratio: Some(1.5),
            vms_rss_ratio: Some(22.2),
            threads: 2,
            arenas: 1,
            arena_resident_bytes: 0x40_0000,
            arena_free_bytes: 80_304,
            arena_max_saving_bytes: 0,
            verdict: crate::fragmentation::FragmentationVerdict::None,
            reason: "the live heap accounts for the anonymous RSS".into(),
            advice: vec!["nothing to do".into()],
        });
        let figures = crate::requests::Percentiles {
            p50: 4096,
            p95: 8192,
            max: 2_048_000,
        };
        report.requests = Some(crate::requests::RequestsReport {
            function: "handle_request".into(),
            keep_after: 10,
            count: 100,
            kept_count: 90,
            open: 1,
            partial: 0,
            alloc_bytes: Some(figures),
            retained_bytes: Some(figures),
            kept_bytes: Some(figures),
            approximate: true,
            largest: vec![crate::requests::RequestReport {
                pid: 4242,
                tid: 4244,
                start_s: 6.0,
                duration_ms: 3.5,
                alloc_count: 600,
                alloc_bytes: 2_100_000,
                retained_bytes: 2_048_000,
                kept_bytes: Some(2_048_000),
            }],
            sites: vec![report.sites[0].clone()],
        });
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_frames_are_labelled_by_package_file_and_line() {
        let python = |file: &str, line| Frame {
            function: "f".into(),
            module: None,
            file: Some(file.into()),
            line,
            language: Language::Python,
        };
        let labels = [
            python("/srv/app/app.py", Some(41)),
            python("/venv/lib/python3.11/site-packages/flask/app.py", Some(902)),
            python("/usr/lib/python3/dist-packages/six.py", None),
            python("/usr/lib/python3.11/json/decoder.py", Some(3)),
            python("<frozen importlib._bootstrap>", Some(241)),
        ]
        .map(|f| f.label());
        assert_eq!(
            labels,
            [
                "f (app.py:41)",
                "f (flask/app.py:902)",
                "f (six.py)",
                "f (json/decoder.py:3)",
                "f (<frozen importlib._bootstrap>:241)",
            ]
        );
        // A native frame keeps its bare name, file or not.
        let native = Frame {
            language: Language::Native,
            ..python("/src/x.c", Some(1))
        };
        assert_eq!(native.label(), "f");
    }

    #[test]
    fn report_json_round_trips() {
        let report = build_report(
            &crate::collect::KernelSnapshot::default(),
            |_, _, _| Vec::new(),
            ReportContext::default(),
        );
        let text = serde_json::to_string(&report).expect("serialize");
        let back: Report = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, report);
        assert!(text.contains("\"schema\":\"memscope.report/1\""));
    }
}
