//! Memory a traced process gets from the kernel without malloc: anonymous
//! private mmaps (with munmap and mremap), and heap-top (brk) movement.
//!
//! Syscall tracepoints fire for every process on the host, so each program
//! first checks that the caller is traced. Mappings made inside an
//! allocator call (glibc serves blocks of 128 KiB and more with its own
//! mmap) are left to the malloc probes, so no byte is counted twice.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use profiler_common::{Counter, HeapTop, MAX_PROCESSES, alloc_kind, event_kind};

use crate::{
    counters::count, enter, in_allocator_call, live, processes::is_traced, take_call_if_any,
};

#[map]
static HEAP_TOPS: HashMap<u32, HeapTop> = HashMap::with_max_entries(MAX_PROCESSES, 0);

// Syscall tracepoint records: an 8-byte common header, the syscall number
// padded to 8 bytes, then each argument (or the return value) as 8 bytes.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const ARG3: usize = 40;
const RET: usize = 16;

const MAP_SHARED: u64 = 0x01;
const MAP_PRIVATE: u64 = 0x02;
const MAP_ANONYMOUS: u64 = 0x20;
const PROT_EXEC: u64 = 0x4;
const PAGE: u64 = 4096;
/// Offset of `sp` in x86-64 `struct pt_regs`.
const PT_REGS_SP: usize = 19 * 8;

fn traced_caller() -> bool {
    is_traced((bpf_get_current_pid_tgid() >> 32) as u32)
}

fn arg(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: offsets within the syscall record (see above).
    unsafe { ctx.read_at::<u64>(offset) }.unwrap_or(0)
}

/// Whether a syscall's return value is a failure (-4095..-1).
fn failed(ret: u64) -> bool {
    ret > (-4096i64) as u64
}

/// The return address at the user stack pointer: libc's mmap wrapper is a
/// leaf, so this is the code that called it, which the frame-pointer walk
/// skips.
fn user_return_address() -> u64 {
    // SAFETY: the task and its saved user registers are valid for the
    // current task; both reads are checked by the helpers.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        let Ok(sp) = bpf_probe_read_kernel(regs.add(PT_REGS_SP) as *const u64) else {
            return 0;
        };
        bpf_probe_read_user(sp as *const u64).unwrap_or(0)
    }
}

fn round_to_pages(len: u64) -> u64 {
    len.div_ceil(PAGE) * PAGE
}

#[tracepoint]
pub fn mmap_enter(ctx: TracePointContext) -> u32 {
    if !traced_caller() || in_allocator_call() {
        return 0;
    }
    let flags = arg(&ctx, ARG3);
    if flags & MAP_ANONYMOUS == 0 {
        // Code the unwinder must know before it runs.
        if arg(&ctx, ARG2) & PROT_EXEC != 0
            && crate::unwind::is_described((bpf_get_current_pid_tgid() >> 32) as u32)
        {
            enter(0, 0, alloc_kind::CODE_MMAP);
        }
        return 0;
    }
    if flags & MAP_PRIVATE == 0 || flags & MAP_SHARED != 0 {
        return 0;
    }
    enter(round_to_pages(arg(&ctx, ARG1)), 0, alloc_kind::MMAP);
    0
}

#[tracepoint]
pub fn mmap_exit(ctx: TracePointContext) -> u32 {
    let Some(call) = take_call_if_any(alloc_kind::MMAP) else {
        if take_call_if_any(alloc_kind::CODE_MMAP).is_some() && !failed(arg(&ctx, RET)) {
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            crate::processes::hold(event_kind::CODE_MAPPED, tgid, 0);
        }
        return 0;
    };
    let addr = arg(&ctx, RET);
    if !failed(addr) {
        live::record_alloc(&ctx, addr, &call, alloc_kind::MMAP, user_return_address());
    }
    0
}

#[tracepoint]
pub fn munmap_enter(ctx: TracePointContext) -> u32 {
    if !traced_caller() || in_allocator_call() {
        return 0;
    }
    let addr = arg(&ctx, ARG0);
    // Only mappings memscope recorded; an unmap of anything else (a file,
    // a malloc-owned chunk) is not a free of tracked memory.
    if live::live_block(addr).is_some_and(|b| b.kind == alloc_kind::MMAP) {
        live::shrink_mapping_front(addr, round_to_pages(arg(&ctx, ARG1)));
    }
    0
}

#[tracepoint]
pub fn mremap_enter(ctx: TracePointContext) -> u32 {
    if !traced_caller() || in_allocator_call() {
        return 0;
    }
    let addr = arg(&ctx, ARG0);
    if live::live_block(addr).is_some_and(|b| b.kind == alloc_kind::MMAP) {
        enter(round_to_pages(arg(&ctx, ARG2)), addr, alloc_kind::MREMAP);
    }
    0
}

/// A moved or resized mapping is recorded like realloc: the old block is
/// freed, the new one allocated at mremap's caller.
#[tracepoint]
pub fn mremap_exit(ctx: TracePointContext) -> u32 {
    let Some(call) = take_call_if_any(alloc_kind::MREMAP) else {
        return 0;
    };
    let addr = arg(&ctx, RET);
    if failed(addr) {
        return 0;
    }
    live::record_unmap(call.ptr);
    // NB: glibc's mremap wrapper has a stack frame, so the word at the stack
    // pointer is not its return address: no caller (the frame-pointer walk
    // then starts at the caller's caller).
    live::record_alloc(&ctx, addr, &call, alloc_kind::MMAP, 0);
    0
}

/// Every brk, inside malloc or not: the heap top's movement per process.
#[tracepoint]
pub fn brk_exit(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_traced(tgid) {
        return 0;
    }
    let top = arg(&ctx, RET);
    let Some(heap) = HEAP_TOPS.get_ptr_mut(tgid) else {
        let first = HeapTop {
            first: top,
            current: top,
            grown: 0,
            shrunk: 0,
        };
        if HEAP_TOPS.insert(tgid, first, 0).is_err() {
            count(Counter::HeapMapFull);
        }
        return 0;
    };
    // SAFETY: a map value, valid for this run; a process's brk calls are
    // serialized by the kernel (mmap lock).
    unsafe {
        if top > (*heap).current {
            (*heap).grown += top - (*heap).current;
        } else {
            (*heap).shrunk += (*heap).current - top;
        }
        (*heap).current = top;
    }
    0
}
