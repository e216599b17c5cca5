//! glibc's arenas seen from outside the process. The main arena is the
//! brk heap (`[heap]`); each thread arena lives in heaps glibc maps at a
//! 64 MiB-aligned address, reserved whole (PROT_NONE) and made writable as
//! it grows. Their resident bytes come from the address space; the live
//! blocks in each are found by address among memscope's own live blocks,
//! so what a heap holds free is derived (resident minus live blocks and
//! their headers), not read from the allocator: mallinfo2 and malloc_info
//! only answer inside the process.

use std::ops::Range;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::address_space::AddressSpace;

/// HEAP_MAX_SIZE on 64-bit glibc: a thread heap's reservation and alignment.
pub const HEAP_MAX_BYTES: u64 = 64 << 20;

/// Which kind of glibc heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HeapKind {
    /// The main arena's brk heap.
    Main,
    /// A heap of a thread arena.
    Thread,
}

/// One arena heap of a process, as report.json's `processes[].arenas[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ArenaHeap {
    /// The main arena's brk heap or a thread heap.
    pub kind: HeapKind,
    /// Where the heap starts.
    pub address: u64,
    /// Mapped writable (a thread heap's reservation beyond is not).
    pub committed_bytes: u64,
    /// In RAM.
    pub resident_bytes: u64,
    /// memscope's live blocks inside it.
    pub live_bytes: u64,
    /// Those blocks' count.
    pub live_count: u64,
    /// Resident bytes that hold no live block or its header: free memory
    /// the arena keeps.
    pub free_bytes: u64,
}

/// A process's arena heaps, to which live blocks are credited by address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessArenas {
    /// Sorted by address; the range is the committed part.
    heaps: Vec<(Range<u64>, ArenaHeap)>,
}

impl ProcessArenas {
    /// The heaps in `space`.
    pub fn of(space: &AddressSpace) -> Self {
        let heaps = space
            .glibc_heaps()
            .into_iter()
            .map(|(kind, range, resident_bytes)| {
                let heap = ArenaHeap {
                    kind,
                    address: range.start,
                    committed_bytes: range.end - range.start,
                    resident_bytes,
                    live_bytes: 0,
                    live_count: 0,
                    free_bytes: 0,
                };
                (range, heap)
            })
            .collect();
        Self { heaps }
    }

    /// Counts a live block at `address` in the heap that holds it; a block
    /// in none (glibc maps large ones apart) is not counted.
    pub fn credit(&mut self, address: u64, size: u64) {
        let at = self
            .heaps
            .partition_point(|(range, _)| range.end <= address);
        if let Some((range, heap)) = self.heaps.get_mut(at)
            && range.contains(&address)
        {
            heap.live_bytes += size;
            heap.live_count += 1;
        }
    }

    /// The heaps with their free bytes, as reported.
    pub fn finish(&self) -> Vec<ArenaHeap> {
        self.heaps
            .iter()
            .map(|(_, heap)| {
                let used =
                    heap.live_bytes + heap.live_count * crate::fragmentation::OVERHEAD_PER_BLOCK;
                ArenaHeap {
                    free_bytes: heap.resident_bytes.saturating_sub(used),
                    ..heap.clone()
                }
            })
            .collect()
    }
}

/// What MALLOC_ARENA_MAX=`arenas` would give back, at most, of a process's
/// heaps: with fewer arenas the threads reuse each other's free memory,
/// so the free memory of all but the `arenas` heaps holding most is freed.
/// A bound, not a promise: threads that allocate at once need their
/// memory at once, whichever arena it is in.
pub fn arena_max_saving(heaps: &[ArenaHeap], arenas: usize) -> u64 {
    let mut free: Vec<u64> = heaps.iter().map(|h| h.free_bytes).collect();
    free.sort_unstable_by(|a, b| b.cmp(a));
    free.iter().skip(arenas).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heap(kind: HeapKind, free_bytes: u64) -> ArenaHeap {
        ArenaHeap {
            kind,
            address: 0,
            committed_bytes: free_bytes,
            resident_bytes: free_bytes,
            live_bytes: 0,
            live_count: 0,
            free_bytes,
        }
    }

    #[test]
    fn fewer_arenas_keep_the_largest_free_parts() {
        let heaps = [
            heap(HeapKind::Main, 8),
            heap(HeapKind::Thread, 1),
            heap(HeapKind::Thread, 5),
            heap(HeapKind::Thread, 3),
        ];
        assert_eq!(arena_max_saving(&heaps, 2), 4);
        assert_eq!(arena_max_saving(&heaps, 1), 9);
        assert_eq!(arena_max_saving(&heaps, 8), 0);
    }

    #[test]
    fn blocks_are_credited_to_the_heap_that_holds_them() {
        let mut arenas = ProcessArenas {
            heaps: vec![
                (0x1000..0x9000, heap(HeapKind::Main, 0)),
                (
                    HEAP_MAX_BYTES..HEAP_MAX_BYTES + 0x10_0000,
                    heap(HeapKind::Thread, 0),
                ),
            ],
        };
        arenas.heaps[0].1.resident_bytes = 0x8000;
        arenas.credit(0x1010, 100);
        arenas.credit(0x8ff0, 16);
        arenas.credit(0x9000, 1 << 20); // past the main heap: a mapped chunk
        arenas.credit(HEAP_MAX_BYTES + 0x20, 1000);
        let heaps = arenas.finish();
        assert_eq!((heaps[0].live_bytes, heaps[0].live_count), (116, 2));
        assert_eq!(heaps[0].free_bytes, 0x8000 - 116 - 32);
        assert_eq!((heaps[1].live_bytes, heaps[1].live_count), (1000, 1));
        assert_eq!(heaps[1].free_bytes, 0, "nothing resident");
    }
}
