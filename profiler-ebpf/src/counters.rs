//! Per-CPU failure counters: every event the kernel side could not record.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use profiler_common::{COUNTER_SLOTS, Counter};

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot; programs on this CPU do not run in parallel.
        unsafe { *slot += 1 };
    }
}
