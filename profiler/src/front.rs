//! The kernel's front table (`FRONT`; see `profiler_common::FrontSlot`):
//! where most malloc-family blocks live instead of `LIVE`. Userspace reads
//! it through a mapping, and takes blocks out (an exec's, an exited
//! process's) by the kernel's own compare-and-swap of a slot's owner, so a
//! block is never both taken here and freed there.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use profiler_common::{
    FRONT_BUSY, FRONT_WAYS, FrontBucket, FrontSlot, LiveAllocation, LiveKey, config, map_names,
};

use crate::shared_array::{SharedArray, SharedArrayError};

/// `FRONT` and `HASHED_BLOCKS`, mapped.
pub struct FrontTable {
    buckets: SharedArray<FrontBucket>,
    hashed: SharedArray<u64>,
}

// SAFETY: the mappings are shared memory used only through atomics and
// volatile copies.
unsafe impl Send for FrontTable {}

impl FrontTable {
    /// Maps the table, sized as the loader made it (`CONFIG`'s mask).
    pub fn map(ebpf: &Ebpf) -> Result<Self, SharedArrayError> {
        let name = map_names::CONFIG;
        let mask = ebpf
            .map(name)
            .and_then(|map| Array::<&MapData, u32>::try_from(map).ok())
            .and_then(|config| config.get(&config::FRONT_MASK, 0).ok())
            .ok_or(SharedArrayError::Missing(name))?;
        Ok(Self {
            buckets: SharedArray::map(ebpf, map_names::FRONT, mask as usize + 1)?,
            hashed: SharedArray::map(ebpf, map_names::HASHED_BLOCKS, 1)?,
        })
    }

    fn slots(&self) -> impl Iterator<Item = (*mut FrontSlot, &AtomicU64)> {
        (0..self.buckets.count()).flat_map(move |index| {
            let bucket = self.buckets.get(index);
            (0..FRONT_WAYS).map(move |way| {
                // SAFETY: a slot of the mapped bucket; `owner` is an 8-byte
                // aligned u64, changed only by atomic instructions.
                unsafe {
                    let slot = &raw mut (*bucket).slots[way];
                    (slot, AtomicU64::from_ptr(&raw mut (*slot).owner))
                }
            })
        })
    }

    /// Every block in the table. The kernel changes it meanwhile: a slot
    /// that changed hands while it was read is skipped.
    pub fn for_each(&self, mut each: impl FnMut(&LiveKey, &LiveAllocation)) {
        for (slot, owner) in self.slots() {
            let before = owner.load(Ordering::Acquire);
            if before == 0 || before == FRONT_BUSY {
                continue;
            }
            let (key, block) = read(slot, before);
            if owner.load(Ordering::Acquire) == before {
                each(&key, &block);
            }
        }
    }

    /// Takes out the blocks `wanted` says, and returns them. A slot is the
    /// taker's alone once its owner is swapped to busy: what the kernel
    /// frees meanwhile is its own, and not taken here.
    pub fn take(
        &self,
        wanted: impl Fn(&LiveKey, &LiveAllocation) -> bool,
    ) -> Vec<(LiveKey, LiveAllocation)> {
        let mut taken = Vec::new();
        for (slot, owner) in self.slots() {
            let addr = owner.load(Ordering::Acquire);
            if addr == 0 || addr == FRONT_BUSY {
                continue;
            }
            let (key, block) = read(slot, addr);
            if !wanted(&key, &block)
                || owner
                    .compare_exchange(addr, FRONT_BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            // Read again now that it cannot change.
            let (key, block) = read(slot, addr);
            if wanted(&key, &block) {
                owner.store(0, Ordering::Release);
                taken.push((key, block));
            } else {
                owner.store(addr, Ordering::Release);
            }
        }
        taken
    }

    /// Moves the count of malloc-family blocks in `LIVE` by `delta`.
    pub fn count_hashed(&self, delta: i64) {
        // SAFETY: the mapped u64, 8-byte aligned, which the kernel moves
        // with atomic adds too.
        let count = unsafe { AtomicI64::from_ptr(self.hashed.get(0).cast()) };
        count.fetch_add(delta, Ordering::Relaxed);
    }
}

fn read(slot: *mut FrontSlot, addr: u64) -> (LiveKey, LiveAllocation) {
    // SAFETY: a slot of the mapping; copied (a torn copy is what the
    // callers' second look at the owner rules out).
    let (tgid, block) = unsafe {
        (
            std::ptr::read_volatile(&raw const (*slot).tgid),
            std::ptr::read_volatile(&raw const (*slot).block),
        )
    };
    (
        LiveKey {
            tgid,
            _pad: 0,
            addr,
        },
        block,
    )
}
