//! The front table: where malloc-family blocks live, found at a hash of
//! their key in an array (see `profiler_common::FrontSlot`). A block whose
//! bucket is full goes to `LIVE` (`live`), as do mappings.
//!
//! A slot is claimed by a compare-and-swap of `owner` from 0 to
//! `FRONT_BUSY`, written, then given its address; it is taken by a
//! compare-and-swap from the address to `FRONT_BUSY`, read, then freed. So
//! whoever takes a block reads it whole, and two takers of one block (a
//! double free racing itself, userspace dropping an exited process's)
//! cannot both have it. NB: x86's stores are seen in program order, so the
//! address is seen after what it publishes.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{bindings::BPF_F_MMAPABLE, macros::map, maps::Array};
use profiler_common::{
    FRONT_BUCKETS, FRONT_BUSY, FRONT_WAYS, FrontBucket, FrontSlot, LiveAllocation, config,
    front_bucket,
};

#[map]
static FRONT: Array<FrontBucket> = Array::with_max_entries(FRONT_BUCKETS, BPF_F_MMAPABLE);

#[map]
static HASHED_BLOCKS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The bucket of `tgid`'s block at `addr`.
pub fn bucket(tgid: u32, addr: u64) -> Option<*mut FrontBucket> {
    let mask = crate::processes::config(config::FRONT_MASK) as u32;
    FRONT.get_ptr_mut(front_bucket(tgid, addr, mask))
}

/// # Safety
/// `slot` points into a map value.
unsafe fn swap_owner(slot: *mut FrontSlot, from: u64, to: u64) -> bool {
    // SAFETY: the caller's pointer; every side changes owners this way.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
            &raw mut (*slot).owner,
            from,
            to,
        )
        .1
    }
}

/// Takes `tgid`'s block at `addr` out of its `bucket`, if there.
pub fn take(bucket: *mut FrontBucket, tgid: u32, addr: u64) -> Option<LiveAllocation> {
    for way in 0..FRONT_WAYS {
        // SAFETY: a map value; its slots are changed only as described above.
        unsafe {
            let slot = &raw mut (*bucket).slots[way];
            if read_volatile(&raw const (*slot).owner) != addr
                || read_volatile(&raw const (*slot).tgid) != tgid
                || !swap_owner(slot, addr, FRONT_BUSY)
            {
                continue;
            }
            // The slot may have changed hands between the checks and the
            // swap: the process is read again now that it cannot.
            if read_volatile(&raw const (*slot).tgid) != tgid {
                write_volatile(&raw mut (*slot).owner, addr);
                continue;
            }
            let block = read_volatile(&raw const (*slot).block);
            write_volatile(&raw mut (*slot).owner, 0);
            return Some(block);
        }
    }
    None
}

/// A copy of `tgid`'s block at `addr`, left in place. NB: read without
/// taking the slot, and checked after the read: a slot emptied and given
/// the same key again between the two checks would be misread (only
/// inherited frees read so, of an ancestor's blocks).
pub fn get(tgid: u32, addr: u64) -> Option<LiveAllocation> {
    let bucket = bucket(tgid, addr)?;
    for way in 0..FRONT_WAYS {
        // SAFETY: as in `take`.
        unsafe {
            let slot = &raw const (*bucket).slots[way];
            let holds = || {
                read_volatile(&raw const (*slot).owner) == addr
                    && read_volatile(&raw const (*slot).tgid) == tgid
            };
            if !holds() {
                continue;
            }
            let block = read_volatile(&raw const (*slot).block);
            if holds() {
                return Some(block);
            }
        }
    }
    None
}

/// Puts a new block in a free slot of its `bucket`; false when all are
/// held. The caller has taken any stale block of the same key first.
pub fn put(bucket: *mut FrontBucket, tgid: u32, addr: u64, block: &LiveAllocation) -> bool {
    for way in 0..FRONT_WAYS {
        // SAFETY: as in `take`; the slot is this program's once claimed.
        unsafe {
            let slot = &raw mut (*bucket).slots[way];
            if read_volatile(&raw const (*slot).owner) != 0 || !swap_owner(slot, 0, FRONT_BUSY) {
                continue;
            }
            write_volatile(&raw mut (*slot).tgid, tgid);
            write_volatile(&raw mut (*slot).block, *block);
            write_volatile(&raw mut (*slot).owner, addr);
            return true;
        }
    }
    false
}

/// Whether `LIVE` may hold a malloc-family block.
pub fn any_hashed() -> bool {
    HASHED_BLOCKS
        .get(0)
        // SAFETY: a map value, read whole (an aligned u64).
        .is_some_and(|count| unsafe { read_volatile(count) } != 0)
}

/// Moves the count of malloc-family blocks in `LIVE` by `delta`.
pub fn count_hashed(delta: i64) {
    if let Some(count) = HASHED_BLOCKS.get_ptr_mut(0) {
        // SAFETY: a map value, added to atomically by both sides.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, delta as u64) };
    }
}
