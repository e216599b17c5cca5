//! Reads the kernel maps into a plain-data snapshot: per-stack totals, the
//! stacks they name, and the failure counters.

use std::collections::{BTreeMap, HashMap};

use crate::{front::FrontTable, peaks::SharedPeaks};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, StackTraceMap},
};
use profiler_common::{
    Counter, HeapTop, LiveAllocation, LiveKey, MAX_STACK_DEPTH, ProcessPeak, PythonFrame,
    PythonStack, StackKey, StackTotals, UNKNOWN_STACK, UNSAMPLED_STACK, UNWOUND_STACK_BIT,
    UnwoundStack, map_names, python_stack_flags, unwound_flags,
};

/// Everything the kernel side knows at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSnapshot {
    /// Cumulative totals per (process, allocating stack).
    pub totals: BTreeMap<StackKey, StackTotals>,
    /// User stacks by id: instruction pointers, innermost first (return
    /// addresses past the first).
    pub stacks: HashMap<u32, Vec<u64>>,
    pub counters: LossCounters,
    /// Heap top per process.
    pub heap_tops: BTreeMap<u32, HeapTop>,
    /// Python stacks by hash (`StackKey::python_stack`).
    pub python_stacks: HashMap<u64, RecordedPythonStack>,
    /// Live bytes and their high-water mark per running process.
    pub peaks: BTreeMap<u32, ProcessPeak>,
    /// The same over all traced processes.
    pub merged_peak: ProcessPeak,
}

/// A Python stack as the kernel side recorded it, innermost frame first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedPythonStack {
    /// The process whose code objects the frames name.
    pub tgid: u32,
    pub frames: Vec<PythonFrame>,
    /// Deeper than the kernel side records: outer frames are missing.
    pub truncated: bool,
}

impl From<&PythonStack> for RecordedPythonStack {
    fn from(stack: &PythonStack) -> Self {
        let len = (stack.len as usize).min(stack.frames.len());
        Self {
            tgid: stack.tgid,
            frames: stack.frames[..len].to_vec(),
            truncated: stack.flags & python_stack_flags::TRUNCATED != 0,
        }
    }
}

/// Events the kernel side could not record, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LossCounters {
    pub live_map_full: u64,
    pub totals_map_full: u64,
    /// Every failed stack walk, collisions included.
    pub stack_errors: u64,
    pub stack_collisions: u64,
    /// Unwound stacks not recorded: their map was full.
    pub unwound_stacks_full: u64,
    pub unknown_frees: u64,
    pub missed_returns: u64,
    pub in_flight_full: u64,
    pub lost_children: u64,
    pub heap_map_full: u64,
    pub python_stack_errors: u64,
    pub python_truncated: u64,
    pub python_stacks_full: u64,
    pub peak_map_full: u64,
    pub peak_race_lost: u64,
    pub requests_full: u64,
    pub request_events_lost: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("BPF map {0} is missing (build bug)")]
    MissingMap(&'static str),
    #[error("cannot read BPF map {name} in batches: {source}")]
    Batch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Peaks(#[from] crate::peaks::PeakError),
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> CollectError {
    move |source| CollectError::Map { name, source }
}

fn map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, CollectError> {
    ebpf.map(name).ok_or(CollectError::MissingMap(name))
}

/// The cumulative totals per (process, stack): all a window needs. The
/// kernel keeps adding while they are read, so an entry is as of its own
/// read; nothing is stopped or locked.
pub fn read_totals(ebpf: &Ebpf) -> Result<BTreeMap<StackKey, StackTotals>, CollectError> {
    let name = map_names::STACK_TOTALS;
    let fd = map(ebpf, name).map(crate::multi_uprobe::map_fd)?;
    let fd = fd.ok_or(CollectError::MissingMap(name))?;
    let mut totals = BTreeMap::new();
    crate::map_batch::for_each(fd, |key: &StackKey, value: &StackTotals| {
        totals.insert(*key, *value);
    })
    .map_err(|source| CollectError::Batch { name, source })?;
    Ok(totals)
}

/// What one pass over the live map at the end finds.
#[derive(Clone, Debug, Default)]
pub struct LiveScan {
    /// The live blocks' bytes per (process, stack), by the window each was
    /// allocated in: how much of each window's allocations survives.
    pub survivors: BTreeMap<StackKey, Vec<u64>>,
    /// The live blocks allocated inside a request, per (process, stack),
    /// as allocations (count and bytes).
    pub kept_by_requests: BTreeMap<StackKey, StackTotals>,
    /// The live mappings made outside malloc: (process and stack, address,
    /// bytes).
    pub mappings: Vec<(StackKey, u64, u64)>,
}

/// One pass over the live blocks, in the front table and the live map
/// (`window_of` maps an allocation time to its window). The kernel changes
/// them meanwhile: a block freed during the pass may still be counted, one
/// allocated during it may be missed.
pub fn scan_live(
    ebpf: &Ebpf,
    front: &FrontTable,
    windows: usize,
    window_of: impl Fn(u64) -> usize,
    mut each_block: impl FnMut(&LiveKey, &LiveAllocation),
) -> Result<LiveScan, CollectError> {
    let mut scan = LiveScan::default();
    for_each_live(ebpf, front, |key, block| {
        each_block(key, block);
        let stack = block.stack_key(key.tgid);
        let by_window = scan
            .survivors
            .entry(stack)
            .or_insert_with(|| vec![0; windows]);
        if let Some(bytes) = by_window.get_mut(window_of(block.timestamp_ns)) {
            *bytes += block.size;
        }
        if stack.class == profiler_common::site_class::MMAP {
            scan.mappings.push((stack, key.addr, block.size));
        }
        if block.request != 0 {
            let kept = scan.kept_by_requests.entry(stack).or_default();
            kept.alloc_count += 1;
            kept.alloc_bytes += block.size;
        }
    })?;
    Ok(scan)
}

/// Every live block: the front table's, then the live map's.
fn for_each_live(
    ebpf: &Ebpf,
    front: &FrontTable,
    mut each: impl FnMut(&LiveKey, &LiveAllocation),
) -> Result<(), CollectError> {
    front.for_each(&mut each);
    let name = map_names::LIVE;
    let fd = map(ebpf, name).map(crate::multi_uprobe::map_fd)?;
    let fd = fd.ok_or(CollectError::MissingMap(name))?;
    crate::map_batch::for_each(fd, |key: &LiveKey, block: &LiveAllocation| each(key, block))
        .map_err(|source| CollectError::Batch { name, source })
}

/// The live bytes of request `id` by (process, stack), largest first: what
/// it keeps, for an alert. One pass over the live blocks.
pub fn request_blocks(
    ebpf: &Ebpf,
    front: &FrontTable,
    id: u64,
) -> Result<Vec<(StackKey, i64)>, CollectError> {
    let mut kept: BTreeMap<StackKey, i64> = BTreeMap::new();
    for_each_live(ebpf, front, |key, block| {
        if block.request == id {
            *kept.entry(block.stack_key(key.tgid)).or_default() += block.size as i64;
        }
    })?;
    let mut kept: Vec<(StackKey, i64)> = kept.into_iter().collect();
    kept.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    Ok(kept)
}

/// Reads the maps. Stacks a totals entry names but the stack map lacks
/// (evicted, or never walked) are simply absent from `stacks`.
pub fn read_snapshot(ebpf: &Ebpf, shared: &SharedPeaks) -> Result<KernelSnapshot, CollectError> {
    let map = |name: &'static str| map(ebpf, name);
    let totals = read_totals(ebpf)?;

    let stack_maps = StackMaps::open(ebpf)?;
    let mut stacks = HashMap::new();
    for key in totals.keys() {
        if key.stack_id == UNKNOWN_STACK
            || key.stack_id == UNSAMPLED_STACK
            || stacks.contains_key(&key.stack_id)
        {
            continue;
        }
        if let Some(ips) = stack_maps.get(key.stack_id) {
            stacks.insert(key.stack_id, ips);
        }
    }

    let counter_map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map(map_names::COUNTERS)?).map_err(map_error(map_names::COUNTERS))?;
    let read = |counter: Counter| -> Result<u64, CollectError> {
        let values = counter_map
            .get(&(counter as u32), 0)
            .map_err(map_error(map_names::COUNTERS))?;
        Ok(values.iter().sum())
    };
    let counters = LossCounters {
        live_map_full: read(Counter::LiveMapFull)?,
        totals_map_full: read(Counter::TotalsMapFull)?,
        stack_errors: read(Counter::StackErrors)?
            + read(Counter::StackCollisions)?
            + read(Counter::UnwoundStacksFull)?,
        unwound_stacks_full: read(Counter::UnwoundStacksFull)?,
        stack_collisions: read(Counter::StackCollisions)?,
        unknown_frees: read(Counter::UnknownFrees)?,
        missed_returns: read(Counter::MissedReturns)?,
        in_flight_full: read(Counter::InFlightFull)?,
        lost_children: read(Counter::LostChildren)?,
        heap_map_full: read(Counter::HeapMapFull)?,
        python_stack_errors: read(Counter::PythonStackErrors)?,
        python_truncated: read(Counter::PythonTruncated)?,
        python_stacks_full: read(Counter::PythonStacksFull)?,
        peak_map_full: read(Counter::PeakMapFull)?,
        peak_race_lost: read(Counter::PeakRaceLost)?,
        requests_full: read(Counter::RequestsFull)?,
        request_events_lost: read(Counter::RequestEventsLost)?,
    };
    let referenced: std::collections::HashSet<u64> =
        totals.keys().map(|k| k.python_stack).collect();
    let python_stacks = read_python_stacks(ebpf, |hash| referenced.contains(&hash))?;
    let heap_map: BpfHashMap<&MapData, u32, HeapTop> =
        BpfHashMap::try_from(map(map_names::HEAP_TOPS)?)
            .map_err(map_error(map_names::HEAP_TOPS))?;
    let heap_tops = heap_map.iter().filter_map(Result::ok).collect();
    let peaks = crate::peaks::per_process(ebpf, shared)?;
    let merged_peak = shared.merged();
    Ok(KernelSnapshot {
        totals,
        stacks,
        counters,
        heap_tops,
        python_stacks,
        peaks,
        merged_peak,
    })
}

/// One user stack, by id (None when the stack maps have none).
pub fn read_stack(ebpf: &Ebpf, stack_id: u32) -> Option<Vec<u64>> {
    StackMaps::open(ebpf).ok()?.get(stack_id)
}

/// Ends a stack the unwinder cut (`unwound_flags::CUT`): the frames before
/// it are right, the callers beyond it are unknown.
pub const CUT_MARK: u64 = u64::MAX;

/// The two kinds of user stack: the kernel's frame-pointer walks, and the
/// unwinder's (ids with `UNWOUND_STACK_BIT`).
struct StackMaps<'a> {
    frame_pointer: StackTraceMap<&'a MapData>,
    unwound: BpfHashMap<&'a MapData, u32, UnwoundStack>,
}

impl<'a> StackMaps<'a> {
    fn open(ebpf: &'a Ebpf) -> Result<Self, CollectError> {
        let frame_pointer = StackTraceMap::try_from(map(ebpf, map_names::STACKS)?)
            .map_err(map_error(map_names::STACKS))?;
        let unwound = BpfHashMap::try_from(map(ebpf, map_names::UNWOUND)?)
            .map_err(map_error(map_names::UNWOUND))?;
        Ok(Self {
            frame_pointer,
            unwound,
        })
    }

    /// Instruction pointers, innermost first.
    fn get(&self, stack_id: u32) -> Option<Vec<u64>> {
        if stack_id & UNWOUND_STACK_BIT == 0 {
            let trace = self.frame_pointer.get(&stack_id, 0).ok()?;
            return Some(trace.frames().iter().map(|f| f.ip).collect());
        }
        self.unwound
            .get(&stack_id, 0)
            .ok()
            .map(|stack| unwound_frames(&stack))
    }
}

fn unwound_frames(stack: &UnwoundStack) -> Vec<u64> {
    let len = (stack.len as usize).min(MAX_STACK_DEPTH);
    let mut ips = stack.frames[..len].to_vec();
    if stack.flags & unwound_flags::CUT != 0 {
        ips.push(CUT_MARK);
    }
    ips
}

/// One recorded Python stack, by hash.
pub fn read_python_stack(ebpf: &Ebpf, hash: u64) -> Option<RecordedPythonStack> {
    let map: BpfHashMap<&MapData, u64, PythonStack> =
        BpfHashMap::try_from(ebpf.map(map_names::PY_STACKS)?).ok()?;
    map.get(&hash, 0)
        .ok()
        .map(|stack| RecordedPythonStack::from(&stack))
}

/// The recorded Python stacks whose hash `wanted` accepts.
pub fn read_python_stacks(
    ebpf: &Ebpf,
    mut wanted: impl FnMut(u64) -> bool,
) -> Result<HashMap<u64, RecordedPythonStack>, CollectError> {
    let name = map_names::PY_STACKS;
    let map: BpfHashMap<&MapData, u64, PythonStack> =
        BpfHashMap::try_from(ebpf.map(name).ok_or(CollectError::MissingMap(name))?)
            .map_err(|source| CollectError::Map { name, source })?;
    let mut stacks = HashMap::new();
    for hash in map.keys().filter_map(Result::ok) {
        if wanted(hash)
            && let Ok(stack) = map.get(&hash, 0)
        {
            stacks.insert(hash, RecordedPythonStack::from(&stack));
        }
    }
    Ok(stacks)
}
