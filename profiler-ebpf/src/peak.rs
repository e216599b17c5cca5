//! Live bytes of the malloc family and their high-water mark, per process
//! and over all traced processes, kept exactly as blocks come and go.
//!
//! The sum moves with atomic adds whose result says what it became; only
//! an add can set a new high, so the peak is the highest of those results.
//! The BPF target has no compare-and-swap, so the peak is raised by
//! exchange: write the candidate, and if what was there was higher, write
//! that back. The highest value ever written is always either in the map
//! or about to be written again by the CPU that took it out.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    ptr::read_volatile,
};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap},
};
use profiler_common::{
    Counter, MAX_PROCESSES, PEAK_RAISE_TRIES, PEAK_SLOTS_LEN, PeakSlot, ProcessPeak,
};

use crate::counters::count;

/// The figures of processes whose slot in `PEAK_SLOTS` another holds.
#[map]
static PEAKS: HashMap<u32, ProcessPeak> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// Where most processes keep their figures (see `PeakSlot`); mmapable, so
/// userspace claims and frees slots with the same atomic instructions.
#[map]
static PEAK_SLOTS: Array<PeakSlot> = Array::with_max_entries(PEAK_SLOTS_LEN, BPF_F_MMAPABLE);

/// Userspace maps this one and adds a forked child's inherited bytes to it
/// with the same atomic instructions.
#[map]
static MERGED_PEAK: Array<ProcessPeak> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Moves `tgid`'s live bytes (and the merged ones) by `delta`.
pub fn add_live(tgid: u32, delta: i64) {
    memscope_add_live(tgid, delta);
}

/// NB: a global function, which the verifier checks once, with unknown
/// arguments: its bounded exchange loops, checked again at each of the
/// many places a block's bytes move, were most of a program's
/// instructions.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn memscope_add_live(tgid: u32, delta: i64) -> u64 {
    if let Some(merged) = MERGED_PEAK.get_ptr_mut(0) {
        // SAFETY: a map value, valid for this program's run.
        unsafe { add_and_raise(merged, delta) };
    }
    if let Some(peak) = peak_of(tgid, true) {
        // SAFETY: as above.
        unsafe { add_and_raise(peak, delta) };
    }
    0
}

/// `tgid`'s figures: in its slot if it owns it; else in `PEAKS` if there
/// (its slot was taken when it first needed one); else, with `claim`, in
/// its slot if that is free now, or in a new `PEAKS` entry. So a process
/// keeps its figures in one place for its life.
fn peak_of(tgid: u32, claim: bool) -> Option<*mut ProcessPeak> {
    let slot = PEAK_SLOTS.get_ptr_mut(tgid & (PEAK_SLOTS_LEN - 1))?;
    let owner = u64::from(tgid);
    // SAFETY: a map value; owners change only by compare-and-swap here and
    // in userspace, and from a process's own tgid only after it exited.
    unsafe {
        if read_volatile(&raw const (*slot).owner) == owner {
            return Some(&raw mut (*slot).peak);
        }
        if let Some(peak) = PEAKS.get_ptr_mut(tgid) {
            return Some(peak);
        }
        if !claim {
            return None;
        }
        let (was, _) = atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            &raw mut (*slot).owner,
            0,
            owner,
        );
        // Claimed now, or by another of its threads just before.
        if was == 0 || was == owner {
            return Some(&raw mut (*slot).peak);
        }
    }
    crate::live::value_or_default(&PEAKS, &tgid, Counter::PeakMapFull)
}

/// At an exec or exit: what the process held leaves the merged sum, and its
/// own starts again from nothing (its peak stays, for userspace to read).
pub fn drop_live(tgid: u32) {
    let Some(peak) = peak_of(tgid, false) else {
        return;
    };
    // SAFETY: a map value; the process has one thread left (exec, exit), so
    // nothing else moves its figures now.
    let held = unsafe {
        let held = (*peak).inherited_bytes as i64 + (*peak).live_bytes;
        (*peak).live_bytes = 0;
        (*peak).inherited_bytes = 0;
        held
    };
    if held != 0
        && let Some(merged) = MERGED_PEAK.get_ptr_mut(0)
    {
        // SAFETY: as above.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*merged).live_bytes as *mut u64,
                held.wrapping_neg() as u64,
            );
        }
    }
}

/// Adds `delta` and returns what was there before. NB: LLVM's BPF backend
/// emits a plain (non-fetching) locked add for `atomicrmw add` even when
/// its result is used, so the result would be the operand: compare-and-swap
/// instead, bounded for the verifier, then an add that returns nothing.
///
/// Past `PEAK_RAISE_TRIES` lost races the add is made blind, `lost` is
/// counted and the result is stale.
///
/// # Safety
/// `value` points to a map value.
pub unsafe fn fetch_add(value: *mut u64, delta: u64, lost: Counter) -> u64 {
    // SAFETY: the caller's pointer.
    unsafe {
        let mut seen = core::ptr::read_volatile(value);
        for _ in 0..PEAK_RAISE_TRIES {
            let (was, swapped) = atomic_cxchg::<
                u64,
                { AtomicOrdering::Relaxed },
                { AtomicOrdering::Relaxed },
            >(value, seen, seen.wrapping_add(delta));
            if swapped {
                return was;
            }
            seen = was;
        }
        count(lost);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(value, delta);
        seen
    }
}

/// # Safety
/// `peak` points to a map value.
unsafe fn add_and_raise(peak: *mut ProcessPeak, delta: i64) {
    // SAFETY: the caller's pointer; other CPUs update it atomically too.
    unsafe {
        let before = fetch_add(
            &raw mut (*peak).live_bytes as *mut u64,
            delta as u64,
            Counter::PeakRaceLost,
        ) as i64;
        if delta <= 0 {
            return;
        }
        let held = (*peak).inherited_bytes as i64 + before + delta;
        let mut candidate = held as u64;
        if candidate <= (*peak).peak_bytes {
            return;
        }
        let now = bpf_ktime_get_ns();
        for _ in 0..PEAK_RAISE_TRIES {
            let was = atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*peak).peak_bytes,
                candidate,
            );
            if was <= candidate {
                if candidate == held as u64 {
                    (*peak).peak_ns = now;
                }
                return;
            }
            // Someone raised it higher meanwhile: put theirs back.
            candidate = was;
        }
        count(Counter::PeakRaceLost);
    }
}
