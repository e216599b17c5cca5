//! The report.json model (`memscope.report/1`) and how it is built from a
//! kernel snapshot. Later versions only add fields.

use std::collections::BTreeMap;

use profiler_common::{HeapTop, StackKey, StackTotals, UNKNOWN_STACK, site_class};
use serde::{Deserialize, Serialize};

use crate::{
    attach::AttachedProbe,
    collect::{KernelSnapshot, RecordedPythonStack},
    processes::{Adjustments, Following, ProcessRecord},
};

pub const SCHEMA: &str = "memscope.report/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub target: TargetInfo,
    pub duration_s: f64,
    /// The malloc family. glibc's own mmaps for large blocks happen inside
    /// malloc and are counted here, once.
    pub totals: Totals,
    /// Anonymous private mappings made outside the allocator (`kind: mmap` sites).
    #[serde(default)]
    pub mapped: Totals,
    /// Sorted by live bytes, largest first.
    pub sites: Vec<Site>,
    pub completeness: Completeness,
    /// Where each allocator function was probed.
    #[serde(default)]
    pub probes: Vec<AttachedProbe>,
    /// Things the reader should know about this profile (loss, coverage).
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub memscope_version: String,
    /// The target and the children it forked.
    #[serde(default)]
    pub processes: Vec<ProcessReport>,
    /// What putting the probes on each followed process cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach_costs: Option<AttachCosts>,
}

/// Time spent probing the followed processes (for a forked child: from its
/// event to its probes on and its live set copied), while each waited.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttachCosts {
    pub processes: u64,
    pub median_ms: f64,
    pub max_ms: f64,
}

impl AttachCosts {
    pub fn of(costs: &[std::time::Duration]) -> Option<Self> {
        let mut ms: Vec<f64> = costs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Self {
            processes: ms.len() as u64,
            median_ms: *ms.get(ms.len() / 2)?,
            max_ms: *ms.last()?,
        })
    }
}

/// One process of the session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub pid: u32,
    /// Absent for the target itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppid: Option<u32>,
    pub command: String,
    /// Seconds after the session started.
    pub started_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_s: Option<f64>,
    /// Includes `inherited_*`: a forked child starts with its parent's live blocks.
    pub totals: Totals,
    #[serde(default)]
    pub mapped: Totals,
    /// Movement of the heap top (brk), inside malloc or not; absent if the
    /// process never called brk while traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heap: Option<HeapReport>,
    #[serde(default)]
    pub inherited_count: u64,
    #[serde(default)]
    pub inherited_bytes: u64,
    /// Live bytes minus inherited bytes (malloc family): what this process added.
    #[serde(default)]
    pub growth_bytes: i64,
    /// This process's sites (with `--per-process`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<Site>,
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub pid: u32,
    pub command: String,
    /// Exit code of a command started by `memscope run` (128+signal when
    /// killed); absent while it runs or for `attach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub alloc_count: u64,
    pub alloc_bytes: u64,
    pub free_count: u64,
    pub free_bytes: u64,
    pub live_count: u64,
    pub live_bytes: u64,
}

impl Totals {
    fn add(&mut self, totals: &StackTotals) {
        self.alloc_count += totals.alloc_count;
        self.alloc_bytes += totals.alloc_bytes;
        self.free_count += totals.free_count;
        self.free_bytes += totals.free_bytes;
        self.live_count = self.alloc_count.saturating_sub(self.free_count);
        self.live_bytes = self.alloc_bytes.saturating_sub(self.free_bytes);
    }
}

/// A process's heap top (program break).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapReport {
    /// The break when first seen and at the end.
    pub first: u64,
    pub current: u64,
    /// Bytes it moved up and down, summed over all brk calls.
    pub grown_bytes: u64,
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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Frame {
    pub function: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default)]
    pub language: Language,
}

/// What a frame runs: machine code, or a Python function the interpreter
/// runs (its `function` is the qualified name, `file` the source file).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    #[default]
    Native,
    Python,
}

/// How a CPython process's small objects are counted (see
/// `python::objects`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

/// An allocating call stack and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// `malloc` (the malloc family) or `mmap` (anonymous mappings).
    #[serde(default = "malloc_kind")]
    pub kind: String,
    /// Innermost first: `frames[0]` called the allocator.
    pub frames: Vec<Frame>,
    pub live_bytes: u64,
    pub live_count: u64,
    pub alloc_bytes: u64,
    pub alloc_count: u64,
    #[serde(default)]
    pub free_bytes: u64,
    #[serde(default)]
    pub free_count: u64,
}

fn malloc_kind() -> String {
    "malloc".into()
}

fn class_name(class: u32) -> &'static str {
    match class {
        site_class::MMAP => "mmap",
        _ => "malloc",
    }
}

/// What the kernel side could not record. All zero means the figures are exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub live_map_full: u64,
    #[serde(default)]
    pub totals_map_full: u64,
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
            > 0
    }
}

/// What the report needs besides the snapshot.
#[derive(Clone, Debug, Default)]
pub struct ReportContext {
    pub target: Option<TargetInfo>,
    pub duration_s: f64,
    pub probes: Vec<AttachedProbe>,
    pub warnings: Vec<String>,
    pub processes: Vec<ProcessRecord>,
    /// Userspace changes to the live set (inheritance at fork, release at exec).
    pub adjustments: Adjustments,
    /// Whether each process gets its own site list.
    pub per_process_sites: bool,
}

/// Functions that are the allocator's plumbing rather than the caller that
/// asked for memory: leading frames matching these are dropped so that
/// `frames[0]` is the code that allocated.
const ALLOCATOR_FRAMES: &[&str] = &[
    "malloc",
    "calloc",
    "realloc",
    "free",
    "__libc_",
    "__rust_alloc",
    "__rust_realloc",
    "__rust_alloc_zeroed",
    "__rdl_",
    "__rg_",
    // The alloc crate: Vec, Box, String and their growth plumbing.
    "alloc::",
    "<alloc::",
    "std::sys::alloc::",
    "std::alloc::",
    "<std::alloc::System as core::alloc::global::GlobalAlloc>",
    "operator new",
    "operator new[]",
    // libc's system call wrappers, for mmap sites.
    "mmap",
    "mmap64",
    "__mmap",
    "__mmap64",
    "__GI___mmap64",
    "mremap",
    "__mremap",
    "__GI___mremap",
];

fn is_allocator_frame(frame: &Frame) -> bool {
    ALLOCATOR_FRAMES.iter().any(|prefix| {
        frame.function == *prefix
            || (prefix.ends_with(['_', ':', '>']) && frame.function.starts_with(prefix))
            || frame.function.starts_with(&format!("{prefix}("))
    })
}

/// Drops the allocator's own leading frames; keeps at least one frame.
pub fn trim_allocator_frames(mut frames: Vec<Frame>) -> Vec<Frame> {
    let keep_from = frames
        .iter()
        .position(|f| !is_allocator_frame(f))
        .unwrap_or(frames.len().saturating_sub(1));
    frames.drain(..keep_from);
    frames
}

/// Builds the report. `symbolize(tgid, ips, python)` turns a raw stack,
/// with the allocating thread's Python stack if it had one, into frames,
/// innermost first.
pub fn build_report(
    snapshot: &KernelSnapshot,
    mut symbolize: impl FnMut(u32, &[u64], Option<&RecordedPythonStack>) -> Vec<Frame>,
    context: ReportContext,
) -> Report {
    let mut combined = snapshot.totals.clone();
    for (key, adjustment) in &context.adjustments {
        let t = combined.entry(*key).or_default();
        t.alloc_count += adjustment.alloc_count;
        t.alloc_bytes += adjustment.alloc_bytes;
        t.free_count += adjustment.free_count;
        t.free_bytes += adjustment.free_bytes;
    }
    let mut frames_of = |key: &StackKey| {
        let python = snapshot.python_stacks.get(&key.python_stack);
        match snapshot.stacks.get(&key.stack_id) {
            Some(ips) if key.stack_id != UNKNOWN_STACK => {
                trim_allocator_frames(symbolize(key.tgid, &with_caller(ips, key.caller), python))
            }
            // The native walk failed (in CPython, which has no frame
            // pointers, it often reads garbage); the Python stack stands.
            _ if python.is_some() => symbolize(key.tgid, &[], python),
            _ => vec![Frame::named("[unknown stack]")],
        }
    };
    // Symbolize each (process, stack) once.
    let frames: BTreeMap<StackKey, Vec<Frame>> =
        combined.keys().map(|k| (*k, frames_of(k))).collect();

    let (totals, mapped) = class_totals(combined.iter());
    let sites = sites_of(combined.iter(), &frames);
    let processes = context
        .processes
        .iter()
        .map(|p| {
            let own = || combined.iter().filter(|(k, _)| k.tgid == p.pid);
            let (totals, mapped) = class_totals(own());
            let (inherited_count, inherited_bytes) = context
                .adjustments
                .iter()
                .filter(|(k, _)| k.tgid == p.pid && k.class == site_class::MALLOC)
                .fold((0, 0), |(c, b), (_, t)| {
                    (c + t.alloc_count, b + t.alloc_bytes)
                });
            ProcessReport {
                pid: p.pid,
                ppid: p.ppid,
                command: p.command.clone(),
                started_s: p.started_s,
                exited_s: p.exited_s,
                totals,
                mapped,
                heap: p
                    .heap_at_exit
                    .or_else(|| snapshot.heap_tops.get(&p.pid).copied())
                    .map(HeapReport::from),
                inherited_count,
                inherited_bytes,
                growth_bytes: totals.live_bytes as i64 - inherited_bytes as i64,
                sites: if context.per_process_sites {
                    sites_of(own(), &frames)
                } else {
                    Vec::new()
                },
                following: p.following,
                note: p.note.clone(),
                python: p.python.clone(),
                python_objects: p.python_objects,
            }
        })
        .collect();
    let following_count = |state| {
        context
            .processes
            .iter()
            .filter(|p| p.following == state)
            .count() as u64
    };

    let c = snapshot.counters;
    let completeness = Completeness {
        map_full: c.live_map_full + c.totals_map_full + c.in_flight_full,
        stack_errors: c.stack_errors,
        unknown_frees: c.unknown_frees,
        missed_returns: c.missed_returns,
        live_map_full: c.live_map_full,
        totals_map_full: c.totals_map_full,
        in_flight_full: c.in_flight_full,
        lost_children: c.lost_children,
        heap_map_full: c.heap_map_full,
        unfollowed_processes: following_count(Following::Unfollowed),
        late_processes: following_count(Following::Late),
        python_stack_errors: c.python_stack_errors,
        python_truncated: c.python_truncated,
        python_stacks_full: c.python_stacks_full,
    };
    Report {
        schema: SCHEMA.to_owned(),
        target: context.target.unwrap_or(TargetInfo {
            pid: 0,
            command: String::new(),
            exit_code: None,
        }),
        duration_s: context.duration_s,
        totals,
        mapped,
        sites,
        completeness,
        probes: context.probes,
        warnings: context.warnings,
        memscope_version: env!("CARGO_PKG_VERSION").to_owned(),
        processes,
        attach_costs: None,
    }
}

/// A stack taken at a system call lacks the wrapper's caller (see
/// `StackKey::caller`): put it back after the wrapper's frame.
fn with_caller(ips: &[u64], caller: u64) -> Vec<u64> {
    match ips.split_first() {
        Some((first, rest)) if caller != 0 && rest.first() != Some(&caller) => {
            let mut out = Vec::with_capacity(ips.len() + 1);
            out.push(*first);
            out.push(caller);
            out.extend_from_slice(rest);
            out
        }
        _ => ips.to_vec(),
    }
}

/// Totals of the malloc family and of mapped memory.
fn class_totals<'a>(
    entries: impl Iterator<Item = (&'a StackKey, &'a StackTotals)>,
) -> (Totals, Totals) {
    let (mut malloc, mut mapped) = (Totals::default(), Totals::default());
    for (key, t) in entries {
        if key.class == site_class::MMAP {
            mapped.add(t);
        } else {
            malloc.add(t);
        }
    }
    (malloc, mapped)
}

/// Sites from per-(process, stack) totals: stacks with equal frames (after
/// trimming, or in different processes) are one site.
fn sites_of<'a>(
    entries: impl Iterator<Item = (&'a StackKey, &'a StackTotals)>,
    frames: &BTreeMap<StackKey, Vec<Frame>>,
) -> Vec<Site> {
    let mut by_frames: BTreeMap<(u32, &[Frame]), StackTotals> = BTreeMap::new();
    for (key, t) in entries {
        let Some(frames) = frames.get(key) else {
            continue;
        };
        let site = by_frames.entry((key.class, frames)).or_default();
        site.alloc_count += t.alloc_count;
        site.alloc_bytes += t.alloc_bytes;
        site.free_count += t.free_count;
        site.free_bytes += t.free_bytes;
    }
    let mut sites: Vec<Site> = by_frames
        .into_iter()
        .map(|((class, frames), t)| Site {
            kind: class_name(class).to_owned(),
            frames: frames.to_vec(),
            live_bytes: t.alloc_bytes.saturating_sub(t.free_bytes),
            live_count: t.alloc_count.saturating_sub(t.free_count),
            alloc_bytes: t.alloc_bytes,
            alloc_count: t.alloc_count,
            free_bytes: t.free_bytes,
            free_count: t.free_count,
        })
        .collect();
    // Stable order for equal live bytes keeps outputs deterministic.
    sites.sort_by(|a, b| {
        b.live_bytes
            .cmp(&a.live_bytes)
            .then(b.alloc_bytes.cmp(&a.alloc_bytes))
            .then_with(|| a.frames.cmp(&b.frames))
    });
    sites
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

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
            kind: "malloc".into(),
            frames,
            live_bytes: alloc.1 - free.1,
            live_count: alloc.0 - free.0,
            alloc_bytes: alloc.1,
            alloc_count: alloc.0,
            free_bytes: free.1,
            free_count: free.0,
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
        let mut totals = Totals::default();
        for s in &sites {
            totals.add(&StackTotals {
                alloc_count: s.alloc_count,
                alloc_bytes: s.alloc_bytes,
                free_count: s.free_count,
                free_bytes: s.free_bytes,
            });
        }
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
            warnings: Vec::new(),
            memscope_version: "0.1.0".into(),
            processes: Vec::new(),
            attach_costs: None,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn totals(alloc_count: u64, alloc_bytes: u64, free_count: u64, free_bytes: u64) -> StackTotals {
        StackTotals {
            alloc_count,
            alloc_bytes,
            free_count,
            free_bytes,
        }
    }

    fn names(frames: &[Frame]) -> Vec<&str> {
        frames.iter().map(|f| f.function.as_str()).collect()
    }

    #[test]
    fn sites_sort_by_live_bytes_and_merge_equal_stacks() {
        let mut snapshot = KernelSnapshot::default();
        snapshot
            .totals
            .insert(StackKey::new(1, 1), totals(10, 1000, 10, 1000));
        snapshot
            .totals
            .insert(StackKey::new(1, 2), totals(3, 300, 1, 100));
        // Same frames after trimming as stack 2: merged.
        snapshot
            .totals
            .insert(StackKey::new(1, 3), totals(1, 50, 0, 0));
        snapshot.stacks.insert(1, vec![0x10]);
        snapshot.stacks.insert(2, vec![0x20]);
        snapshot.stacks.insert(3, vec![0x30]);
        let report = build_report(
            &snapshot,
            |_, ips, _| match ips[0] {
                0x10 => vec![Frame::named("churn"), Frame::named("main")],
                0x20 => vec![Frame::named("leak"), Frame::named("main")],
                _ => vec![
                    Frame::named("malloc"),
                    Frame::named("leak"),
                    Frame::named("main"),
                ],
            },
            ReportContext::default(),
        );
        assert_eq!(report.sites.len(), 2);
        assert_eq!(names(&report.sites[0].frames), ["leak", "main"]);
        assert_eq!(report.sites[0].live_bytes, 250);
        assert_eq!(report.sites[0].live_count, 3);
        assert_eq!(report.sites[1].live_bytes, 0);
        assert_eq!(report.totals.live_bytes, 250);
        assert_eq!(report.totals.alloc_count, 14);
    }

    #[test]
    fn unwalkable_stacks_keep_their_bytes() {
        let mut snapshot = KernelSnapshot::default();
        snapshot
            .totals
            .insert(StackKey::new(1, UNKNOWN_STACK), totals(2, 64, 0, 0));
        snapshot.counters.stack_errors = 2;
        let report = build_report(&snapshot, |_, _, _| Vec::new(), ReportContext::default());
        assert_eq!(names(&report.sites[0].frames), ["[unknown stack]"]);
        assert_eq!(report.sites[0].live_bytes, 64);
        assert!(report.completeness.lost_anything());
    }

    #[test]
    fn syscall_stacks_get_their_callers_back() {
        assert_eq!(with_caller(&[1, 3, 4], 2), [1, 2, 3, 4]);
        assert_eq!(with_caller(&[1, 2, 4], 2), [1, 2, 4], "already there");
        assert_eq!(with_caller(&[1, 3], 0), [1, 3]);
        assert!(with_caller(&[], 2).is_empty());
    }

    #[test]
    fn mapped_memory_is_totalled_apart() {
        let mut snapshot = KernelSnapshot::default();
        snapshot
            .totals
            .insert(StackKey::new(1, 1), totals(1, 100, 0, 0));
        let mmap_key = StackKey {
            class: site_class::MMAP,
            ..StackKey::new(1, 2)
        };
        snapshot.totals.insert(mmap_key, totals(2, 8192, 1, 4096));
        let report = build_report(
            &snapshot,
            |_, ips, _| vec![Frame::named(&format!("f{}", ips[0]))],
            {
                let mut c = ReportContext::default();
                c.processes.push(ProcessRecord {
                    pid: 1,
                    ppid: None,
                    command: "x".into(),
                    started_s: 0.0,
                    following: Following::Started,
                    note: None,
                    heap_at_exit: None,
                    exited_s: None,
                    python: None,
                    python_objects: None,
                });
                c
            },
        );
        snapshot.stacks.clear();
        assert_eq!(report.totals.live_bytes, 100);
        assert_eq!(report.mapped.live_bytes, 4096);
        assert_eq!(report.processes[0].mapped.live_bytes, 4096);
        let kinds: Vec<&str> = report.sites.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["mmap", "malloc"]);
    }

    #[test]
    fn allocator_frames_are_trimmed() {
        let frames = [
            "__rdl_alloc",
            "alloc::raw_vec::RawVec<T>::grow",
            "app::cache::insert",
            "main",
        ]
        .map(Frame::named)
        .to_vec();
        assert_eq!(
            names(&trim_allocator_frames(frames)),
            ["app::cache::insert", "main"]
        );
        // A function merely named like an allocator prefix stays.
        let frames = vec![Frame::named("malloc_wrapper_user")];
        assert_eq!(
            names(&trim_allocator_frames(frames)),
            ["malloc_wrapper_user"]
        );
        // Only allocator frames: the last one stays.
        let frames = vec![Frame::named("malloc")];
        assert_eq!(names(&trim_allocator_frames(frames)), ["malloc"]);
    }

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
            &KernelSnapshot::default(),
            |_, _, _| Vec::new(),
            ReportContext::default(),
        );
        let text = serde_json::to_string(&report).expect("serialize");
        let back: Report = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, report);
        assert!(text.contains("\"schema\":\"memscope.report/1\""));
    }
}
