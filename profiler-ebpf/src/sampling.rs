//! `--stack-sample BYTES`: which heap allocations have their stacks walked.
//! Every block is still recorded, with its size, so totals stay exact.

use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::PerCpuArray};
use profiler_common::config;

/// Bytes left to allocate, per CPU, before the next walked allocation; 0
/// before the first draw. NB: per CPU, not per thread: the gaps are
/// memoryless, so each allocation is walked with the same chance whichever
/// threads shared the countdown before it.
#[map]
static SAMPLE_COUNTDOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Whether the stack of an allocation of `size` bytes is walked: always
/// without `--stack-sample`, else with probability `1 - exp(-size / mean)`.
pub fn walks_stack(size: u64) -> bool {
    let mean = crate::processes::config(config::STACK_SAMPLE) as u64;
    if mean == 0 {
        return true;
    }
    let Some(left) = SAMPLE_COUNTDOWN.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: a per-CPU slot; programs on this CPU do not run in parallel.
    unsafe {
        if *left == 0 {
            *left = draw(mean);
        }
        if size < *left {
            *left -= size;
            return false;
        }
        *left = draw(mean);
    }
    true
}

fn draw(mean: u64) -> u64 {
    // SAFETY: no preconditions.
    profiler_common::sampling::interval(unsafe { bpf_get_prandom_u32() }, mean)
}
