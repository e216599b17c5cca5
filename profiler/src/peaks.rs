//! The kernel's live-byte peaks (`PEAK_SLOTS`, `PEAKS`, `MERGED_PEAK`):
//! what userspace adds to them (a forked child's inherited blocks), reads,
//! and takes out (an exited process's figures).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{PEAK_SLOTS_LEN, PeakSlot, ProcessPeak, map_names};

use crate::shared_array::{SharedArray, SharedArrayError};

#[derive(Debug, thiserror::Error)]
pub enum PeakError {
    #[error("BPF map {0} is missing (build bug)")]
    Missing(&'static str),
    #[error(transparent)]
    Shared(#[from] SharedArrayError),
    #[error("cannot update BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// `MERGED_PEAK` and `PEAK_SLOTS`, mapped.
pub struct SharedPeaks {
    merged: SharedArray<ProcessPeak>,
    slots: SharedArray<PeakSlot>,
}

// SAFETY: the mappings are shared memory used only through atomics.
unsafe impl Send for SharedPeaks {}

impl SharedPeaks {
    pub fn map(ebpf: &Ebpf) -> Result<Self, PeakError> {
        Ok(Self {
            merged: SharedArray::map(ebpf, map_names::MERGED_PEAK, 1)?,
            slots: SharedArray::map(ebpf, map_names::PEAK_SLOTS, PEAK_SLOTS_LEN as usize)?,
        })
    }

    /// Adds a child's inherited blocks to the merged sum, `now_ns` being
    /// when it got them.
    fn add_merged(&self, bytes: u64, now_ns: u64) {
        let value = self.merged.get(0);
        // SAFETY: the fields are 8-byte aligned u64/i64 in the mapped page;
        // the kernel side changes them only with atomic instructions too.
        let (live, peak, peak_ns) = unsafe {
            (
                AtomicI64::from_ptr(&raw mut (*value).live_bytes),
                AtomicU64::from_ptr(&raw mut (*value).peak_bytes),
                AtomicU64::from_ptr(&raw mut (*value).peak_ns),
            )
        };
        let held = live.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
        let held = held.max(0) as u64;
        if peak.fetch_max(held, Ordering::Relaxed) < held {
            peak_ns.store(now_ns, Ordering::Relaxed);
        }
    }

    fn slot_of(&self, pid: u32) -> (*mut PeakSlot, &AtomicU64) {
        let slot = self.slots.get((pid & (PEAK_SLOTS_LEN - 1)) as usize);
        // SAFETY: an 8-byte aligned u64 in the mapping; the kernel changes
        // it only by compare-and-swap.
        (slot, unsafe { AtomicU64::from_ptr(&raw mut (*slot).owner) })
    }

    /// Claims `pid`'s slot for it if free, as the kernel would at its first
    /// block; returns its figures there.
    fn claim(&self, pid: u32) -> Option<*mut ProcessPeak> {
        let (slot, owner) = self.slot_of(pid);
        let pid = u64::from(pid);
        match owner.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: a field of the mapped slot.
            Ok(_) => Some(unsafe { &raw mut (*slot).peak }),
            Err(_) => None,
        }
    }

    /// `pid`'s figures, if its slot is its own; the slot is freed.
    fn release(&self, pid: u32) -> Option<ProcessPeak> {
        let (slot, owner) = self.slot_of(pid);
        if owner.load(Ordering::Acquire) != u64::from(pid) {
            return None;
        }
        // SAFETY: the process exited: nothing else changes its figures.
        let peak = unsafe {
            let peak = std::ptr::read_volatile(&raw const (*slot).peak);
            std::ptr::write_volatile(&raw mut (*slot).peak, ProcessPeak::default());
            peak
        };
        owner.store(0, Ordering::Release);
        Some(peak)
    }

    /// The figures of every process holding a slot.
    pub fn in_slots(&self) -> Vec<(u32, ProcessPeak)> {
        (0..PEAK_SLOTS_LEN as usize)
            .filter_map(|index| {
                let slot = self.slots.get(index);
                // SAFETY: as in `slot_of`; the figures are copied.
                let (owner, peak) = unsafe {
                    (
                        AtomicU64::from_ptr(&raw mut (*slot).owner).load(Ordering::Acquire),
                        std::ptr::read_volatile(&raw const (*slot).peak),
                    )
                };
                (owner != 0).then_some((owner as u32, peak))
            })
            .collect()
    }

    /// What every traced process holds, and its high.
    pub fn merged(&self) -> ProcessPeak {
        // SAFETY: the mapped value, copied.
        unsafe { std::ptr::read_volatile(self.merged.get(0)) }
    }
}

fn peaks_map(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, u32, ProcessPeak>, PeakError> {
    let name = map_names::PEAKS;
    let map = ebpf.map_mut(name).ok_or(PeakError::Missing(name))?;
    BpfHashMap::try_from(map).map_err(|source| PeakError::Map { name, source })
}

/// A held child starts with the blocks it inherited: they count towards
/// what it holds and towards the merged sum. It has not run yet, so
/// nothing else writes its figures now.
pub fn inherit(
    ebpf: &mut Ebpf,
    shared: &SharedPeaks,
    child: u32,
    bytes: u64,
    fork_ns: u64,
) -> Result<(), PeakError> {
    let peak = ProcessPeak {
        live_bytes: 0,
        inherited_bytes: bytes,
        peak_bytes: bytes,
        peak_ns: fork_ns,
    };
    match shared.claim(child) {
        // SAFETY: the child's own slot, which nothing else writes yet.
        Some(slot) => unsafe { std::ptr::write_volatile(slot, peak) },
        None => peaks_map(ebpf)?
            .insert(child, peak, 0)
            .map_err(|source| PeakError::Map {
                name: map_names::PEAKS,
                source,
            })?,
    }
    shared.add_merged(bytes, fork_ns);
    Ok(())
}

/// Takes an exited process's figures out of the kernel maps: its slot is
/// freed for another, and `PEAKS` has room for `MAX_PROCESSES` while a
/// fork storm makes more.
pub fn take(ebpf: &mut Ebpf, shared: &SharedPeaks, pid: u32) -> Option<ProcessPeak> {
    if let Some(peak) = shared.release(pid) {
        return Some(peak);
    }
    let mut map = peaks_map(ebpf).ok()?;
    let peak = map.get(&pid, 0).ok();
    let _ = map.remove(&pid);
    peak
}

/// Every process's figures: those in `PEAKS` and those in slots.
pub fn per_process(
    ebpf: &Ebpf,
    shared: &SharedPeaks,
) -> Result<BTreeMap<u32, ProcessPeak>, PeakError> {
    let name = map_names::PEAKS;
    let map = ebpf.map(name).ok_or(PeakError::Missing(name))?;
    let hashed: BpfHashMap<&MapData, u32, ProcessPeak> =
        BpfHashMap::try_from(map).map_err(|source| PeakError::Map { name, source })?;
    let mut peaks: BTreeMap<u32, ProcessPeak> = hashed.iter().filter_map(Result::ok).collect();
    peaks.extend(shared.in_slots());
    Ok(peaks)
}
