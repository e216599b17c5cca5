//! Builds the report from a kernel snapshot: totals per class, sites (stacks
//! with equal frames merged), processes and completeness.

use std::collections::{BTreeMap, BTreeSet};

use profiler_common::{StackKey, StackTotals, UNKNOWN_STACK, site_class};

use crate::sampling::{StackSample, is_unsampled};

use super::{
    Completeness, Frame, HeapReport, PeakReport, ProcessPeakReport, ProcessReport, Report, SCHEMA,
    SamplingReport, Site, SiteHistory, SiteKind, TargetInfo, Totals, WindowReport, WindowSite,
};
use crate::{
    attach::AttachedProbe,
    classify::Verdict,
    collect::{KernelSnapshot, RecordedPythonStack},
    processes::{Adjustments, Following, ProcessRecord},
    symbolize::trim::trim_allocator_frames,
    timeline::{self, RecordedWindow},
};

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
    /// The session's windows, the last one ending with the snapshot.
    pub windows: Vec<RecordedWindow>,
    /// CLOCK_MONOTONIC at the session's start, to place kernel times.
    pub started_ns: u64,
    /// Live bytes per (process, stack) by the window they were allocated in.
    pub survivors: BTreeMap<StackKey, Vec<u64>>,
    /// The requests' figures (`--request-fn`), their sites still to name.
    pub requests: Option<crate::requests::RequestsReport>,
    /// Live blocks allocated inside requests, per (process, stack).
    pub kept_by_requests: BTreeMap<StackKey, StackTotals>,
    /// Mapped sites' ranges as recorded and what they hold, per (process,
    /// stack), for the processes whose address space was read.
    pub measured: Measured,
    /// `--stack-sample`: sites are estimated from a sample of stacks, as
    /// the windows' changes already are (their totals are exact).
    pub stack_sample: Option<StackSample>,
}

/// Per (process, stack) of the mmap class: the bytes recorded, and what
/// those ranges hold (see `address_space`).
pub type Measured = BTreeMap<StackKey, (u64, crate::address_space::MappedBytes)>;

/// Whether a mapping's allocating frame is the dynamic loader's: the
/// images' memory (their .bss, its early heap), not the program's.
fn is_loader(frames: Option<&Vec<Frame>>) -> bool {
    let Some(path) = frames
        .and_then(|f| f.first())
        .and_then(|f| f.module.as_deref())
    else {
        return false;
    };
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("ld-linux") || name.starts_with("ld-musl") || name == "ld.so"
}

/// Whether a block's allocating frame is stdio's buffer allocation: a
/// stream's buffer lives as long as the stream, to the exit for stdout and
/// stderr, by design (valgrind calls it "still reachable").
fn is_stdio_buffer(frames: Option<&Vec<Frame>>) -> bool {
    frames.and_then(|f| f.first()).is_some_and(|f| {
        matches!(
            f.function.as_str(),
            "_IO_file_doallocate" | "__GI__IO_file_doallocate" | "_IO_wfile_doallocate"
        )
    })
}

/// Sites that keep a request's memory, listed in the report.
pub const REQUEST_SITES: usize = 20;

/// Sites listed per window, and at the peak.
pub const WINDOW_TOP_SITES: usize = 5;
pub const PEAK_TOP_SITES: usize = 10;

/// Builds the report. `symbolize(tgid, ips, python)` turns a raw stack,
/// with the allocating thread's Python stack if it had one, into frames,
/// innermost first.
pub fn build_report(
    snapshot: &KernelSnapshot,
    mut symbolize: impl FnMut(u32, &[u64], Option<&RecordedPythonStack>) -> Vec<Frame>,
    mut context: ReportContext,
) -> Report {
    let recorded = combined_totals(&snapshot.totals, &context.adjustments);
    // The processes' own figures stay exact under sampling.
    let recorded_adjustments = context
        .stack_sample
        .map(|_| context.adjustments.clone())
        .unwrap_or_default();
    let combined = match context.stack_sample {
        Some(sample) => estimate_context(sample, &recorded, &mut context),
        None => recorded.clone(),
    };
    let mut frames_of = |key: &StackKey| {
        key_frames(
            key,
            snapshot.stacks.get(&key.stack_id).map(Vec::as_slice),
            snapshot.python_stacks.get(&key.python_stack),
            &mut symbolize,
        )
    };
    // Symbolize each (process, stack) once.
    let mut frames: BTreeMap<StackKey, Vec<Frame>> =
        combined.keys().map(|k| (*k, frames_of(k))).collect();
    let later_keys = context
        .windows
        .iter()
        .flat_map(|window| window.changes.keys())
        .chain(context.kept_by_requests.keys());
    for key in later_keys {
        if !frames.contains_key(key) {
            frames.insert(*key, frames_of(key));
        }
    }
    let seconds = |ns: u64| ns.saturating_sub(context.started_ns) as f64 / 1e9;

    // The loader's mappings are the images': out of the sites and totals.
    let (loader, combined): (BTreeMap<_, _>, BTreeMap<_, _>) = combined
        .into_iter()
        .partition(|(key, _)| key.class == site_class::MMAP && is_loader(frames.get(key)));
    let loader_totals = (!loader.is_empty()).then(|| class_totals(loader.iter()).1);
    // stdio's buffers are the C runtime's, kept by design: heap blocks,
    // in the totals (as in every window), but no sites.
    let (stdio, site_keys): (Vec<_>, Vec<_>) = combined
        .iter()
        .partition(|(key, _)| key.class == site_class::MALLOC && is_stdio_buffer(frames.get(key)));
    let stdio_totals = (!stdio.is_empty()).then(|| class_totals(stdio.into_iter()).0);
    let measured = &context.measured;
    let (totals, mut mapped) = class_totals(combined.iter());
    let mapped_memory = measured_sum(combined.keys(), measured);
    if let Some(m) = &mapped_memory {
        mapped.live_bytes = m.committed_live(mapped.live_bytes);
    }
    let mut sites = sites_of(
        site_keys.into_iter(),
        &frames,
        &context.adjustments,
        measured,
    );
    let histories = site_histories(&context.windows, &context.survivors, &frames);
    // A site an interpreter's teardown freed keeps its history up to it.
    let teardowns: Vec<usize> = context
        .windows
        .iter()
        .enumerate()
        .filter(|(_, w)| w.closed_by == crate::timeline::WindowEnd::Teardown)
        .map(|(i, _)| i)
        .collect();
    for site in &mut sites {
        let history = histories.get(&(site.kind, site.frames.as_slice()));
        let live_at_teardown = history.is_some_and(|h| {
            teardowns
                .iter()
                .any(|&i| h.live_bytes.get(i).is_some_and(|&bytes| bytes > 0))
        });
        if site.live_bytes > 0 || live_at_teardown {
            site.history = history.cloned();
        }
        site.classification = Some(crate::classify::classify(
            site.live_bytes,
            site.history.as_ref(),
        ));
    }
    let peak_of = |p: &ProcessRecord| {
        p.peak_at_exit
            .or_else(|| snapshot.peaks.get(&p.pid).copied())
            .filter(|peak| peak.peak_bytes > 0)
    };
    let processes: Vec<ProcessReport> = context
        .processes
        .iter()
        .map(|p| {
            let own = || combined.iter().filter(|(k, _)| k.tgid == p.pid);
            let (totals, mapped) = class_totals(own());
            let (inherited_count, inherited_bytes) = inherited(&context.adjustments, p.pid);
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
                    sites_of(own(), &frames, &context.adjustments, measured)
                } else {
                    Vec::new()
                },
                following: p.following,
                note: p.note.clone(),
                python: p.python.clone(),
                python_objects: p.python_objects,
                peak_bytes: peak_of(p).map(|peak| peak.peak_bytes),
                peak_s: peak_of(p).map(|peak| seconds(peak.peak_ns)),
                memory: p.memory,
                arenas: p.arenas.clone(),
                anon_mappings: p.anon_mappings.clone(),
                teardown_s: p.teardown_s,
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
        stack_collisions: c.stack_collisions,
        unwound_stacks_full: c.unwound_stacks_full,
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
        peak_map_full: c.peak_map_full,
        peak_race_lost: c.peak_race_lost,
        requests_full: c.requests_full,
        request_events_lost: c.request_events_lost,
        truncated_stacks: frames
            .values()
            .filter(|f| {
                f.iter()
                    .any(|frame| frame.function == crate::symbolize::TRUNCATED)
            })
            .count() as u64,
    };
    // What each worker allocated itself: its live bytes beyond what it
    // inherited, per site. Sites whose memory keeps growing are leaks,
    // not startup work.
    let growing: BTreeSet<(SiteKind, &[Frame])> = sites
        .iter()
        .filter(|s| {
            s.classification
                .as_ref()
                .is_some_and(|c| matches!(c.verdict, Verdict::Leak | Verdict::Growing))
        })
        .map(|s| (s.kind, s.frames.as_slice()))
        .collect();
    // A mapping counts at its resident bytes where it was measured (its
    // length may be mostly reserved: arenas, stacks), in proportion to the
    // part of it the process did not inherit.
    let own = combined.iter().filter_map(|(key, t)| {
        let inherited = context.adjustments.get(key).map_or(0, |a| a.alloc_bytes);
        let frames = frames.get(key)?;
        let own_live = t.live_bytes().saturating_sub(inherited);
        let kind = SiteKind::of_class(key.class);
        let bytes = match kind {
            SiteKind::Malloc => own_live,
            SiteKind::Mmap => {
                let resident = measured.get(key)?.1.resident;
                (resident as f64 * own_live as f64 / t.live_bytes().max(1) as f64) as u64
            }
        };
        Some((key.tgid, kind, frames.as_slice(), bytes))
    });
    let workers = crate::workers::groups(&processes, own, |kind, frames| {
        !growing.contains(&(kind, frames))
    });
    let windows = windows_of(&context.windows, &frames);
    let peak = peak_report(snapshot, &context, &processes, &frames, seconds);
    let mut report = Report {
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
        modules: Vec::new(),
        warnings: context.warnings,
        memscope_version: env!("CARGO_PKG_VERSION").to_owned(),
        windows,
        peak,
        processes,
        attach_costs: None,
        tick_costs: None,
        alerts: Vec::new(),
        mapped_memory,
        loader: loader_totals,
        stdio_buffers: stdio_totals,
        workers,
        fragmentation: None,
        sampling: None,
        requests: context.requests.map(|mut requests| {
            requests.sites = sites_of(
                context.kept_by_requests.iter(),
                &frames,
                &Adjustments::new(),
                &Measured::new(),
            );
            requests.sites.truncate(REQUEST_SITES);
            requests
        }),
    };
    if let Some(sample) = context.stack_sample {
        apply_sampling(
            &mut report,
            sample,
            (&recorded, &recorded_adjustments),
            &snapshot.totals,
        );
    }
    report.fragmentation = crate::fragmentation::assess(&report);
    report
}

/// The exact totals in place of the estimates' sum, each site's error, and
/// what was sampled.
fn apply_sampling(
    report: &mut Report,
    sample: StackSample,
    (recorded, adjustments): (&BTreeMap<StackKey, StackTotals>, &Adjustments),
    kernel: &BTreeMap<StackKey, StackTotals>,
) {
    let estimated = report.totals;
    report.totals = class_totals(recorded.iter()).0;
    for process in &mut report.processes {
        let pid = process.pid;
        process.totals = class_totals(recorded.iter().filter(|(k, _)| k.tgid == pid)).0;
        let (count, bytes) = inherited(adjustments, pid);
        process.inherited_count = count;
        process.inherited_bytes = bytes;
        process.growth_bytes = process.totals.live_bytes as i64 - bytes as i64;
    }
    let all_sites = report.sites.iter_mut().chain(
        report
            .processes
            .iter_mut()
            .flat_map(|process| process.sites.iter_mut()),
    );
    for site in all_sites {
        if site.kind == SiteKind::Malloc {
            site.live_bytes_error =
                Some(sample.live_error(site.alloc_count, site.alloc_bytes, site.live_count));
        }
    }
    let walked = kernel
        .iter()
        .filter(|(key, _)| key.class == site_class::MALLOC && !is_unsampled(key))
        .map(|(_, t)| t.alloc_count)
        .sum();
    report.sampling = Some(SamplingReport {
        mean_bytes: sample.mean_bytes,
        walked_count: walked,
        estimated,
    });
}

fn windows_of(
    windows: &[RecordedWindow],
    frames: &BTreeMap<StackKey, Vec<Frame>>,
) -> Vec<WindowReport> {
    windows
        .iter()
        .enumerate()
        .map(|(index, window)| {
            let malloc = window.malloc_changes();
            WindowReport {
                index,
                start_s: window.start_s,
                end_s: window.end_s,
                closed_by: window.closed_by,
                alloc_bytes: malloc.alloc_bytes,
                alloc_count: malloc.alloc_count,
                free_bytes: malloc.free_bytes,
                free_count: malloc.free_count,
                growth_bytes: malloc.growth_bytes(),
                live_bytes: window.live_bytes,
                rss_bytes: window.rss_bytes,
                memory: window.memory,
                top_sites: top_growing(window, frames),
            }
        })
        .collect()
}

/// The sites that grew most in a window (stacks with equal frames merged).
fn top_growing(
    window: &RecordedWindow,
    frames: &BTreeMap<StackKey, Vec<Frame>>,
) -> Vec<WindowSite> {
    let mut sites: Vec<WindowSite> = by_site(window.changes.iter(), frames)
        .into_iter()
        .filter(|(_, (t, _))| t.growth_bytes() > 0)
        .map(|((class, frames), (t, _))| WindowSite {
            kind: SiteKind::of_class(class),
            frames: frames.to_vec(),
            growth_bytes: t.growth_bytes(),
            alloc_bytes: t.alloc_bytes,
            alloc_count: t.alloc_count,
            free_bytes: t.free_bytes,
            free_count: t.free_count,
        })
        .collect();
    sites.sort_by(|a, b| {
        b.growth_bytes
            .cmp(&a.growth_bytes)
            .then_with(|| a.frames.cmp(&b.frames))
    });
    sites.truncate(WINDOW_TOP_SITES);
    sites
}

/// A window's sites for the profile pushed when it closes, as Go's delta
/// heap profiles have them: what each allocated in the window (`alloc_*`)
/// and what it held at the window's end (`live_*`), stacks with equal
/// frames merged. Biggest holders first.
pub fn window_sites(
    changes: &BTreeMap<StackKey, StackTotals>,
    held: &BTreeMap<StackKey, StackTotals>,
    frames: &BTreeMap<StackKey, Vec<Frame>>,
) -> Vec<Site> {
    fn site<'s, 'f>(
        sites: &'s mut BTreeMap<(u32, &'f [Frame]), Site>,
        (class, frames): (u32, &'f [Frame]),
    ) -> &'s mut Site {
        sites.entry((class, frames)).or_insert_with(|| Site {
            kind: SiteKind::of_class(class),
            frames: frames.to_vec(),
            ..Site::default()
        })
    }
    let mut sites = BTreeMap::new();
    for (at, (t, _)) in by_site(changes.iter(), frames) {
        let site = site(&mut sites, at);
        site.alloc_count = t.alloc_count;
        site.alloc_bytes = t.alloc_bytes;
        site.free_count = t.free_count;
        site.free_bytes = t.free_bytes;
    }
    for (at, (t, _)) in by_site(held.iter(), frames) {
        let site = site(&mut sites, at);
        site.live_count = t.live_count();
        site.live_bytes = t.live_bytes();
    }
    let mut sites: Vec<Site> = sites
        .into_values()
        .filter(|s| s.alloc_count > 0 || s.live_count > 0)
        .collect();
    sites.sort_by(by_holding);
    sites
}

/// Biggest holders first, then biggest allocators; the frames break ties,
/// so equal figures keep the outputs deterministic.
fn by_holding(a: &Site, b: &Site) -> std::cmp::Ordering {
    b.live_bytes
        .cmp(&a.live_bytes)
        .then(b.alloc_bytes.cmp(&a.alloc_bytes))
        .then_with(|| a.frames.cmp(&b.frames))
}

/// Sites by class and frames: their summed totals, and the (process,
/// stack) keys they were made of.
type BySite<'f> = BTreeMap<(u32, &'f [Frame]), (StackTotals, Vec<StackKey>)>;

/// Per-(process, stack) totals summed by site (class and frames): stacks
/// with equal frames after trimming, or in different processes, are one
/// site. Each site also gets the keys it was made of.
fn by_site<'a, 'f>(
    entries: impl Iterator<Item = (&'a StackKey, &'a StackTotals)>,
    frames: &'f BTreeMap<StackKey, Vec<Frame>>,
) -> BySite<'f> {
    let mut sites = BySite::new();
    for (key, t) in entries {
        if let Some(frames) = frames.get(key) {
            let site = sites.entry((key.class, frames.as_slice())).or_default();
            site.0.add(t);
            site.1.push(*key);
        }
    }
    sites
}

/// Each site's live bytes at every window's end, what it allocated in each
/// and how much of that survives.
fn site_histories<'a>(
    windows: &[RecordedWindow],
    survivors: &BTreeMap<StackKey, Vec<u64>>,
    frames: &'a BTreeMap<StackKey, Vec<Frame>>,
) -> BTreeMap<(SiteKind, &'a [Frame]), SiteHistory> {
    type Series<'f> = BTreeMap<(SiteKind, &'f [Frame]), (Vec<i64>, SiteHistory)>;
    fn site<'s, 'f>(
        growth: &'s mut Series<'f>,
        frames: &'f BTreeMap<StackKey, Vec<Frame>>,
        key: &StackKey,
        n: usize,
    ) -> Option<&'s mut (Vec<i64>, SiteHistory)> {
        let frames = frames.get(key)?;
        Some(
            growth
                .entry((SiteKind::of_class(key.class), frames.as_slice()))
                .or_insert_with(|| {
                    let zeros = vec![0; n];
                    (
                        vec![0; n],
                        SiteHistory {
                            live_bytes: zeros.clone(),
                            alloc_bytes: zeros.clone(),
                            surviving_bytes: zeros,
                        },
                    )
                }),
        )
    }
    let n = windows.len();
    let mut growth: Series<'a> = BTreeMap::new();
    for (index, window) in windows.iter().enumerate() {
        for (key, change) in &window.changes {
            if let Some((grown, history)) = site(&mut growth, frames, key, n) {
                grown[index] += change.growth_bytes();
                history.alloc_bytes[index] += change.alloc_bytes;
            }
        }
    }
    for (key, by_window) in survivors {
        if let Some((_, history)) = site(&mut growth, frames, key, n) {
            for (into, bytes) in history.surviving_bytes.iter_mut().zip(by_window) {
                *into += bytes;
            }
        }
    }
    growth
        .into_iter()
        .map(|(site, (grown, mut history))| {
            let mut live = 0i64;
            for (into, step) in history.live_bytes.iter_mut().zip(grown) {
                live += step;
                *into = live.max(0) as u64;
            }
            (site, history)
        })
        .collect()
}

/// The merged peak, each process's, and the sites at the window end
/// nearest to it.
fn peak_report(
    snapshot: &KernelSnapshot,
    context: &ReportContext,
    processes: &[ProcessReport],
    frames: &BTreeMap<StackKey, Vec<Frame>>,
    seconds: impl Fn(u64) -> f64,
) -> Option<PeakReport> {
    let merged = snapshot.merged_peak;
    if merged.peak_bytes == 0 {
        return None;
    }
    let at_s = seconds(merged.peak_ns);
    let window = timeline::nearest_end(&context.windows, at_s);
    let top_sites = window
        .map(|index| {
            // Windows hold the userspace adjustments already.
            let then = timeline::totals_at(&context.windows, index);
            let mut sites = sites_of(
                then.iter().filter(|(k, _)| k.class == site_class::MALLOC),
                frames,
                &context.adjustments,
                &Measured::new(),
            );
            sites.retain(|s| s.live_bytes > 0);
            sites.truncate(PEAK_TOP_SITES);
            sites
        })
        .unwrap_or_default();
    Some(PeakReport {
        live_bytes: merged.peak_bytes,
        at_s,
        processes: processes
            .iter()
            .filter_map(|p| {
                Some(ProcessPeakReport {
                    pid: p.pid,
                    live_bytes: p.peak_bytes?,
                    at_s: p.peak_s?,
                })
            })
            .collect(),
        window,
        top_sites,
    })
}

/// The frames of one (process, stack), innermost first, the allocator's
/// own trimmed: from its native stack and the thread's Python stack.
pub fn key_frames(
    key: &StackKey,
    ips: Option<&[u64]>,
    python: Option<&RecordedPythonStack>,
    symbolize: &mut impl FnMut(u32, &[u64], Option<&RecordedPythonStack>) -> Vec<Frame>,
) -> Vec<Frame> {
    match ips {
        Some(ips) if key.stack_id != UNKNOWN_STACK => {
            trim_allocator_frames(symbolize(key.tgid, &with_caller(ips, key.caller), python))
        }
        // The native walk failed (in CPython, which has no frame
        // pointers, it often reads garbage); the Python stack stands.
        _ if python.is_some() => symbolize(key.tgid, &[], python),
        _ => vec![Frame::named("[unknown stack]")],
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

/// Heap blocks and bytes process `pid` inherited at its fork.
fn inherited(adjustments: &Adjustments, pid: u32) -> (u64, u64) {
    adjustments
        .iter()
        .filter(|(k, _)| k.tgid == pid && k.class == site_class::MALLOC)
        .fold((0, 0), |(c, b), (_, t)| {
            (c + t.alloc_count, b + t.alloc_bytes)
        })
}

/// With `--stack-sample`: the sites' figures estimated from `recorded`,
/// and the context's per-site figures scaled alike.
fn estimate_context(
    sample: StackSample,
    recorded: &BTreeMap<StackKey, StackTotals>,
    context: &mut ReportContext,
) -> BTreeMap<StackKey, StackTotals> {
    let weight = |key: &StackKey| {
        recorded
            .get(key)
            .map_or(1.0, |totals| sample.weight(key, totals))
    };
    let scaled = |totals: &mut BTreeMap<StackKey, StackTotals>| {
        *totals = std::mem::take(totals)
            .into_iter()
            .filter(|(key, _)| !is_unsampled(key))
            .map(|(key, t)| (key, crate::sampling::scale(&t, weight(&key))))
            .collect();
    };
    scaled(&mut context.adjustments);
    scaled(&mut context.kept_by_requests);
    context.survivors = std::mem::take(&mut context.survivors)
        .into_iter()
        .filter(|(key, _)| !is_unsampled(key))
        .map(|(key, bytes)| {
            let w = weight(&key);
            let bytes = bytes
                .iter()
                .map(|&b| (b as f64 * w).round() as u64)
                .collect();
            (key, bytes)
        })
        .collect();
    sample.estimate(recorded)
}

/// The kernel's totals with userspace's changes to the live set added.
pub fn combined_totals(
    kernel: &BTreeMap<StackKey, StackTotals>,
    adjustments: &Adjustments,
) -> BTreeMap<StackKey, StackTotals> {
    let mut combined = kernel.clone();
    for (key, adjustment) in adjustments {
        combined.entry(*key).or_default().add(adjustment);
    }
    combined
}

/// Totals of the malloc family and of mapped memory.
fn class_totals<'a>(
    entries: impl Iterator<Item = (&'a StackKey, &'a StackTotals)>,
) -> (Totals, Totals) {
    let (mut malloc, mut mapped) = (StackTotals::default(), StackTotals::default());
    for (key, t) in entries {
        if key.class == site_class::MMAP {
            mapped.add(t);
        } else {
            malloc.add(t);
        }
    }
    (malloc.into(), mapped.into())
}

/// What the measured ones of `keys` hold, summed; None if none was.
fn measured_sum<'a>(
    keys: impl Iterator<Item = &'a StackKey>,
    measured: &Measured,
) -> Option<super::MappedReport> {
    let mut sum: Option<super::MappedReport> = None;
    for (recorded, bytes) in keys.filter_map(|key| measured.get(key)) {
        sum.get_or_insert_default().add(*recorded, *bytes);
    }
    sum
}

/// Sites from per-(process, stack) totals: stacks with equal frames (after
/// trimming, or in different processes) are one site.
/// `inherited` holds the blocks forked children got from their parents,
/// which were live before and are no growth.
fn sites_of<'a>(
    entries: impl Iterator<Item = (&'a StackKey, &'a StackTotals)>,
    frames: &BTreeMap<StackKey, Vec<Frame>>,
    inherited: &Adjustments,
    measured: &Measured,
) -> Vec<Site> {
    let mut sites: Vec<Site> = by_site(entries, frames)
        .into_iter()
        .map(|((class, frames), (t, keys))| {
            let mapped = measured_sum(keys.iter(), measured);
            Site {
                growth_bytes: t.live_bytes() as i64
                    - keys
                        .iter()
                        .filter_map(|key| inherited.get(key))
                        .map(|i| i.alloc_bytes as i64)
                        .sum::<i64>(),
                history: None,
                classification: None,
                kind: SiteKind::of_class(class),
                frames: frames.to_vec(),
                // A measured mapping holds its committed bytes, not its range.
                live_bytes: mapped.map_or(t.live_bytes(), |m| m.committed_live(t.live_bytes())),
                mapped,
                live_count: t.live_count(),
                alloc_bytes: t.alloc_bytes,
                alloc_count: t.alloc_count,
                free_bytes: t.free_bytes,
                free_count: t.free_count,
                live_bytes_error: None,
            }
        })
        .collect();
    sites.sort_by(by_holding);
    sites
}

#[cfg(test)]
mod tests {

    use super::*;

    fn totals(alloc_count: u64, alloc_bytes: u64, free_count: u64, free_bytes: u64) -> StackTotals {
        StackTotals::new(alloc_count, alloc_bytes, free_count, free_bytes)
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

    /// Check that a window's sites take their allocations from the window
    /// and what they hold from the end, that stacks of two processes with
    /// the same frames are one site, and that a site with neither is left
    /// out.
    #[test]
    fn window_sites_hold_the_windows_allocations_and_the_end_live_set() {
        let (a, b, idle) = (
            StackKey::new(1, 1),
            StackKey::new(2, 1),
            StackKey::new(1, 3),
        );
        let frames: BTreeMap<StackKey, Vec<Frame>> = [
            (a, vec![Frame::named("leak")]),
            (b, vec![Frame::named("leak")]),
            (idle, vec![Frame::named("idle")]),
        ]
        .into();
        let changes = [(a, totals(3, 300, 1, 100)), (idle, totals(0, 0, 0, 0))].into();
        let held = [(a, totals(10, 1000, 2, 200)), (b, totals(1, 50, 0, 0))].into();
        let sites = window_sites(&changes, &held, &frames);
        assert_eq!(sites.len(), 1, "{sites:?}");
        let leak = &sites[0];
        assert_eq!(names(&leak.frames), ["leak"]);
        assert_eq!((leak.alloc_count, leak.alloc_bytes), (3, 300));
        assert_eq!((leak.free_count, leak.free_bytes), (1, 100));
        assert_eq!((leak.live_count, leak.live_bytes), (9, 850));
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
                c.processes.push(ProcessRecord::new(
                    1,
                    None,
                    "x".into(),
                    0.0,
                    Following::Started,
                ));
                c
            },
        );
        snapshot.stacks.clear();
        assert_eq!(report.totals.live_bytes, 100);
        assert_eq!(report.mapped.live_bytes, 4096);
        assert_eq!(report.processes[0].mapped.live_bytes, 4096);
        let kinds: Vec<SiteKind> = report.sites.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [SiteKind::Mmap, SiteKind::Malloc]);
    }

    #[test]
    fn measured_mappings_count_committed_and_the_loaders_are_apart() {
        let mut snapshot = KernelSnapshot::default();
        let mmap = |stack| StackKey {
            class: site_class::MMAP,
            ..StackKey::new(1, stack)
        };
        snapshot.totals.insert(mmap(1), totals(1, 128 << 20, 0, 0));
        snapshot.totals.insert(mmap(2), totals(2, 73728, 0, 0));
        snapshot.stacks.insert(1, vec![0x10]);
        snapshot.stacks.insert(2, vec![0x20]);
        let mut context = ReportContext::default();
        let bytes = crate::address_space::MappedBytes {
            mapped: 128 << 20,
            committed: 1 << 20,
            resident: 4096,
        };
        context.measured.insert(mmap(1), (128 << 20, bytes));
        let report = build_report(
            &snapshot,
            |_, ips, _| match ips[0] {
                0x10 => vec![Frame::named("reserve_site")],
                _ => vec![Frame {
                    module: Some("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".into()),
                    ..Frame::named("_dl_map_segments")
                }],
            },
            context,
        );
        assert_eq!(names(&report.sites[0].frames), ["reserve_site"]);
        assert_eq!(report.sites.len(), 1, "no loader site");
        assert_eq!(report.sites[0].live_bytes, 1 << 20);
        let mapped = report.sites[0].mapped.expect("measured");
        assert_eq!(
            (mapped.reserved_bytes, mapped.resident_bytes),
            (127 << 20, 4096)
        );
        assert_eq!(report.mapped.live_bytes, 1 << 20);
        assert_eq!(report.loader.map(|l| l.live_bytes), Some(73728));
    }
}
