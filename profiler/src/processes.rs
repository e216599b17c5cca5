//! The processes of a session (the target and the children it forks) and
//! what their lifecycle does to the live set: a forked child starts with a
//! copy of its parent's live blocks; an exec frees all of a process's blocks.

use std::collections::{BTreeMap, HashSet};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{HeapTop, LiveAllocation, LiveKey, StackKey, StackTotals, map_names};

use crate::front::FrontTable;

/// One process of the session, as the report shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessRecord {
    pub pid: u32,
    /// None for the target itself.
    pub ppid: Option<u32>,
    pub command: String,
    /// Seconds since the session started.
    pub started_s: f64,
    pub exited_s: Option<f64>,
    pub following: Following,
    /// Why a process is not (or only partly) followed.
    pub note: Option<String>,
    /// Its heap top when it exited (taken out of the kernel map then).
    pub heap_at_exit: Option<HeapTop>,
    /// The CPython version it runs, when memscope walks its frames.
    pub python: Option<String>,
    /// How its Python objects are counted, when it runs CPython.
    pub python_objects: Option<crate::report::PythonObjects>,
    /// Its live bytes and peak when it exited (taken out of the kernel map then).
    pub peak_at_exit: Option<profiler_common::ProcessPeak>,
    /// Its memory figures, last read (see `process_memory`).
    pub memory: Option<crate::process_memory::MemoryFigures>,
    /// Its glibc arena heaps, as last read (see `arenas`).
    pub arenas: Vec<crate::arenas::ArenaHeap>,
    /// Its anonymous mappings by size, read with `arenas`.
    pub anon_mappings: Vec<crate::address_space::SizeClass>,
    /// When its interpreter began to finalize (`python_teardown`).
    pub teardown_s: Option<f64>,
}

impl ProcessRecord {
    /// A process as memscope first sees it, `started_s` into the session.
    pub fn new(
        pid: u32,
        ppid: Option<u32>,
        command: String,
        started_s: f64,
        following: Following,
    ) -> Self {
        Self {
            pid,
            ppid,
            command,
            started_s,
            exited_s: None,
            python: None,
            python_objects: None,
            following,
            note: None,
            heap_at_exit: None,
            peak_at_exit: None,
            memory: None,
            arenas: Vec::new(),
            anon_mappings: Vec::new(),
            teardown_s: None,
        }
    }
}

/// How memscope came to follow a process, or why it did not.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Following {
    /// memscope started it: everything it did is seen.
    Started,
    /// It was running when memscope attached: seen from its probes on.
    #[default]
    Attached,
    /// Forked by a followed process, probed before its first instruction.
    Forked,
    /// Forked by a followed process, but continued before its probes were
    /// on (held past the budget): its first allocations may be missed.
    Late,
    /// Continued without probes: nothing of it is counted.
    Unfollowed,
}

/// Live-set changes made in userspace, per (process, stack), added to the
/// kernel's totals when the report is built: `alloc_*` are blocks inherited
/// at fork, `free_*` blocks released by an exec.
pub type Adjustments = BTreeMap<StackKey, StackTotals>;

#[derive(Debug, thiserror::Error)]
pub enum LiveSetError {
    #[error("cannot update the live-allocation map: {0}")]
    Map(#[source] aya::maps::MapError),
    #[error("cannot read the live-allocation map: {0}")]
    Read(#[source] std::io::Error),
}

fn no_live_map() -> LiveSetError {
    LiveSetError::Map(aya::maps::MapError::InvalidName {
        name: map_names::LIVE.into(),
    })
}

fn live_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, LiveKey, LiveAllocation>, LiveSetError> {
    let map = ebpf.map_mut(map_names::LIVE).ok_or_else(no_live_map)?;
    BpfHashMap::try_from(map).map_err(LiveSetError::Map)
}

fn live_fd(ebpf: &Ebpf) -> Result<std::os::fd::BorrowedFd<'_>, LiveSetError> {
    ebpf.map(map_names::LIVE)
        .and_then(crate::multi_uprobe::map_fd)
        .ok_or_else(no_live_map)
}

/// Live blocks of the processes `wanted` says, in one batched pass (a walk
/// key by key costs two system calls for every block of every process:
/// tens of milliseconds a fork holds its child for). Deduplicated: the
/// kernel changes the map while it is read.
fn hashed_blocks(
    ebpf: &Ebpf,
    wanted: impl Fn(&LiveKey, &LiveAllocation) -> bool,
) -> Result<Vec<(LiveKey, LiveAllocation)>, LiveSetError> {
    let fd = live_fd(ebpf)?;
    let mut blocks = std::collections::HashMap::new();
    crate::map_batch::for_each(fd, |key: &LiveKey, block: &LiveAllocation| {
        if wanted(key, block) {
            blocks.insert(*key, *block);
        }
    })
    .map_err(LiveSetError::Read)?;
    Ok(blocks.into_iter().collect())
}

/// Takes the blocks `wanted` says out of the front table and the live map.
fn take_blocks(
    ebpf: &mut Ebpf,
    front: &FrontTable,
    wanted: impl Fn(&LiveKey, &LiveAllocation) -> bool,
) -> Result<Vec<(LiveKey, LiveAllocation)>, LiveSetError> {
    let mut taken = front.take(&wanted);
    let hashed = hashed_blocks(ebpf, &wanted)?;
    let mut map = live_map(ebpf)?;
    for (key, block) in hashed {
        if map.remove(&key).is_err() {
            continue; // freed meanwhile by the kernel side
        }
        if block.is_heap() {
            front.count_hashed(-1);
        }
        taken.push((key, block));
    }
    Ok(taken)
}

/// Copies `parent`'s blocks live at the fork (`fork_ns`) to `child`, so the
/// child's frees of them are known, and returns them per stack (as
/// inherited allocations of the child). Blocks the parent freed between the
/// fork and this copy are missed: the child's free of one is then an
/// unknown free. The copies go to the live map: the child is held, and
/// the copy is one batched write.
pub fn copy_live_set(
    ebpf: &mut Ebpf,
    front: &FrontTable,
    parent: u32,
    child: u32,
    fork_ns: u64,
) -> Result<Adjustments, LiveSetError> {
    let at_fork =
        |key: &LiveKey, block: &LiveAllocation| key.tgid == parent && block.timestamp_ns <= fork_ns;
    let mut blocks = hashed_blocks(ebpf, at_fork)?;
    front.for_each(|key, block| {
        if at_fork(key, block) {
            blocks.push((*key, *block));
        }
    });
    // The child's copies, written in batches. A copy is no request's: the
    // parent's request holds the parent's block, which the child's free
    // does not free.
    let (keys, copies): (Vec<LiveKey>, Vec<LiveAllocation>) = blocks
        .iter()
        .map(|(key, block)| {
            let copy = LiveAllocation {
                request: 0,
                ..*block
            };
            (
                LiveKey {
                    tgid: child,
                    ..*key
                },
                copy,
            )
        })
        .unzip();
    // Counted before they are written, so the kernel never sees more heap
    // blocks in the map than the count says.
    let heap = |copies: &[LiveAllocation]| copies.iter().filter(|b| b.is_heap()).count();
    front.count_hashed(heap(&copies) as i64);
    // Map full: the rest are not copied, and the kernel counts the loss at
    // the child's free of one.
    let (written, result) = crate::map_batch::update(live_fd(ebpf)?, &keys, &copies);
    if let Err(error) = result {
        tracing::debug!(
            "{written} of {} blocks copied to {child}: {error}",
            keys.len()
        );
    }
    front.count_hashed(-(heap(&copies[written..]) as i64));
    let mut inherited = Adjustments::new();
    for block in &copies[..written] {
        let totals = inherited.entry(block.stack_key(child)).or_default();
        totals.alloc_count += 1;
        totals.alloc_bytes += block.size;
    }
    Ok(inherited)
}

/// Drops `pid`'s blocks allocated before its exec (`exec_ns`): the exec
/// released them, they did not leak. Returns them per stack as frees.
pub fn release_live_set(
    ebpf: &mut Ebpf,
    front: &FrontTable,
    pid: u32,
    exec_ns: u64,
) -> Result<Adjustments, LiveSetError> {
    let blocks = take_blocks(ebpf, front, |key, block| {
        key.tgid == pid && block.timestamp_ns <= exec_ns
    })?;
    let mut released = Adjustments::new();
    for (_, block) in blocks {
        let totals = released.entry(block.stack_key(pid)).or_default();
        totals.free_count += 1;
        totals.free_bytes += block.size;
    }
    Ok(released)
}

/// Drops exited processes' entries from the live blocks, to free their room
/// for the processes still running (gunicorn recycles workers). Their
/// totals stay: the report shows what each held when it exited. One pass
/// for many processes: a pass reads every key of the map.
///
/// Returns what of them requests had allocated, per (process, stack): the
/// report's sites that keep still count an exited worker's.
pub fn forget_live_sets(
    ebpf: &mut Ebpf,
    front: &FrontTable,
    pids: &HashSet<u32>,
    mut each_block: impl FnMut(&LiveKey, &LiveAllocation),
) -> Result<BTreeMap<StackKey, StackTotals>, LiveSetError> {
    let blocks = take_blocks(ebpf, front, |key, _| pids.contains(&key.tgid))?;
    let mut kept_by_requests: BTreeMap<StackKey, StackTotals> = BTreeMap::new();
    for (key, block) in &blocks {
        each_block(key, block);
        if block.request != 0 {
            let kept = kept_by_requests
                .entry(block.stack_key(key.tgid))
                .or_default();
            kept.alloc_count += 1;
            kept.alloc_bytes += block.size;
        }
    }
    Ok(kept_by_requests)
}

/// Takes `pid`'s heap top out of the kernel map: at its exit (the map has
/// room for MAX_PROCESSES, and a fork storm makes more), and at an exec
/// (the old image's break says nothing about the new one's).
pub fn take_heap_top(ebpf: &mut Ebpf, pid: u32) -> Option<HeapTop> {
    let map = ebpf.map_mut(map_names::HEAP_TOPS)?;
    let mut tops = BpfHashMap::<&mut MapData, u32, HeapTop>::try_from(map).ok()?;
    let top = tops.get(&pid, 0).ok();
    let _ = tops.remove(&pid);
    top
}

/// Adds `more` into `into`.
pub fn merge_adjustments(into: &mut Adjustments, more: Adjustments) {
    for (key, t) in more {
        into.entry(key).or_default().add(&t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjustments_add_up() {
        let key = StackKey::new(2, 7);
        let mut into = Adjustments::new();
        let one = |alloc, free| {
            Adjustments::from([(
                key,
                StackTotals {
                    alloc_count: alloc,
                    alloc_bytes: alloc * 10,
                    free_count: free,
                    free_bytes: free * 10,
                },
            )])
        };
        merge_adjustments(&mut into, one(3, 0));
        merge_adjustments(&mut into, one(0, 2));
        assert_eq!(
            into[&key],
            StackTotals {
                alloc_count: 3,
                alloc_bytes: 30,
                free_count: 2,
                free_bytes: 20
            }
        );
    }
}
