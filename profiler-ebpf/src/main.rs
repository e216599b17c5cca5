//! memscope's kernel programs: exact live-allocation tracking.
//!
//! Entry probes save an allocator call's arguments by thread; return probes
//! record `(tgid, address) -> LiveAllocation` and add to the allocating
//! stack's totals; `free` moves bytes from live to freed. Nothing per event
//! goes to userspace: it reads the maps.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd and atomic_xchg: the BPF target offers no AtomicU64"
)]

mod calls;
mod counters;
mod front;
mod live;
mod mapped;
mod peak;
mod processes;
mod python;
mod request;
mod sampling;
mod unwind;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use profiler_common::{InFlightCall, alloc_kind};

pub(crate) use crate::calls::{
    enter, forget_call, free_is_counted, in_allocator_call, mark_python_free, take_call,
    take_call_if_any,
};

/// The attach cookie names the allocator function (one of `alloc_kind`), so
/// one program serves every function with the same argument layout.
fn cookie(ctx: &impl aya_ebpf::EbpfContext) -> u32 {
    // SAFETY: the context pointer is the one the kernel passed in.
    unsafe { aya_ebpf::helpers::generated::bpf_get_attach_cookie(ctx.as_ptr()) as u32 }
}

/// Entry of every allocator function: one program for all of them, told
/// apart by the attach cookie, so a process's whole family goes on with one
/// multi-uprobe link (one registration instead of one per function; see
/// userspace `multi_uprobe`).
#[uprobe]
pub fn alloc_enter(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

/// Return of every allocator function with a return probe, by cookie.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    on_return(&ctx);
    0
}

/// Entry and return in one program, for a session link (Linux 6.13+):
/// one link per process instead of two, so half the registrations to
/// make and, at the end, to undo.
///
/// NB: written without `#[uprobe]`, whose wrapper always returns 0: the
/// entry's return value is what tells the kernel to skip the return.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe/alloc_session")]
pub fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
    let ctx = ProbeContext::new(ctx);
    if is_session_entry(&ctx) {
        // Non-zero skips the return: free has none.
        return u32::from(!on_entry(&ctx));
    }
    on_return(&RetProbeContext::new(ctx.as_ptr()));
    0
}

/// Whether a session program runs at the function's entry (else at its
/// return).
#[inline(always)]
fn is_session_entry(ctx: &ProbeContext) -> bool {
    // SAFETY: the context is the kernel's; both reads are of its registers.
    let (ip, probed) = unsafe {
        (
            (*ctx.regs).rip,
            aya_ebpf::helpers::generated::bpf_get_func_ip(ctx.as_ptr()),
        )
    };
    // NB: at the entry the saved ip is the probed address, or one past it
    // (the int3); at the return it is the caller's return address, which
    // cannot be within the callee's first instruction.
    ip.wrapping_sub(probed) <= 1
}

/// `alloc_session` recording nothing (the hidden `--empty-programs`): what
/// memscope's own probes cost a target before any of its work, the floor
/// its speed is measured against beside bare perf-event traps. The return
/// runs where `alloc_session`'s would (free's is skipped).
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe/alloc_session_empty")]
pub fn alloc_session_empty(ctx: *mut core::ffi::c_void) -> u32 {
    let ctx = ProbeContext::new(ctx);
    let kind = cookie(&ctx);
    u32::from(is_session_entry(&ctx) && (kind == alloc_kind::FREE || kind == alloc_kind::PY_FREE))
}

/// Returns whether the function has a return to probe.
fn on_entry(ctx: &ProbeContext) -> bool {
    if !processes::counts_current() {
        return false;
    }
    let kind = cookie(ctx);
    let arg = |n: usize| -> u64 { ctx.arg(n).unwrap_or(0) };
    match kind {
        alloc_kind::REQUEST => {
            request::native_enter();
            return true;
        }
        alloc_kind::FREE => {
            // Attached past the prologue's first instructions where the
            // kernel can emulate them (userspace `probe_site`); `rdi` is
            // still the argument there.
            let ptr = arg(0);
            if ptr != 0 && free_is_counted(ptr) {
                live::record_free(ptr);
            }
            return false;
        }
        alloc_kind::PY_FREE => {
            // Entry only, past the prologue like free's (see `probe_site`).
            let ptr = arg(1);
            if ptr != 0 && !in_allocator_call() {
                live::record_free(ptr);
                mark_python_free(ptr);
            }
            return false;
        }
        alloc_kind::PY_MALLOC => enter(arg(1), 0, kind),
        alloc_kind::PY_CALLOC => enter(arg(1).wrapping_mul(arg(2)), 0, kind),
        alloc_kind::PY_REALLOC => enter(arg(2), arg(1), kind),
        // aligned_alloc(alignment, size), memalign(alignment, size).
        alloc_kind::ALIGNED_ALLOC | alloc_kind::MEMALIGN => enter(arg(1), 0, kind),
        // An overflowing product makes calloc fail: it returns NULL and
        // nothing is recorded, so any value will do.
        alloc_kind::CALLOC => enter(arg(0).wrapping_mul(arg(1)), 0, kind),
        // glibc's realloc(NULL, n) and reallocarray call malloc and
        // realloc: the outer call owns the thread's slot (see `enter`).
        alloc_kind::REALLOC => enter(arg(1), arg(0), kind),
        alloc_kind::REALLOCARRAY => enter(arg(1).wrapping_mul(arg(2)), arg(0), kind),
        // posix_memalign(memptr, alignment, size): the pointer comes back
        // through `*memptr`, read at return.
        alloc_kind::POSIX_MEMALIGN => enter(arg(2), arg(0), kind),
        // malloc(size), valloc(size), pvalloc(size).
        _ => enter(arg(0), 0, kind),
    }
    true
}

fn on_return(ctx: &RetProbeContext) {
    if !processes::counts_current() {
        return;
    }
    let kind = cookie(ctx);
    if kind == alloc_kind::REQUEST {
        request::native_return();
        return;
    }
    let Some(call) = take_call(kind) else {
        return;
    };
    match kind {
        alloc_kind::REALLOC | alloc_kind::REALLOCARRAY => realloc_return(ctx, call, kind),
        // pymalloc's realloc never frees on a size of 0: NULL is a failure,
        // which leaves the old block live.
        alloc_kind::PY_REALLOC => {
            let addr: u64 = ctx.ret();
            if addr != 0 {
                if call.ptr != 0 {
                    live::record_free(call.ptr);
                }
                live::record_alloc(ctx, addr, &call, kind, 0);
            }
        }
        alloc_kind::POSIX_MEMALIGN => posix_memalign_return(ctx, call),
        _ => {
            let addr: u64 = ctx.ret();
            if addr != 0 {
                live::record_alloc(ctx, addr, &call, kind, 0);
            }
        }
    }
}

fn realloc_return(ctx: &RetProbeContext, call: InFlightCall, kind: u32) {
    let addr: u64 = ctx.ret();
    if addr == 0 {
        // glibc's realloc(p, 0) frees p and returns NULL; any other NULL is a
        // failure that leaves the old block live.
        if call.size == 0 && call.ptr != 0 {
            live::record_free(call.ptr);
        }
        return;
    }
    if call.ptr != 0 {
        live::record_free(call.ptr);
    }
    live::record_alloc(ctx, addr, &call, kind, 0);
}

fn posix_memalign_return(ctx: &RetProbeContext, call: InFlightCall) {
    let status: i32 = ctx.ret();
    if status != 0 || call.ptr == 0 {
        return;
    }
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error.
    if let Ok(addr) = unsafe { bpf_probe_read_user(call.ptr as *const u64) }
        && addr != 0
    {
        live::record_alloc(ctx, addr, &call, alloc_kind::POSIX_MEMALIGN, 0);
    }
}

/// A stop on a function's entry, the event kind in its cookie: libc's
/// `_exit` for a command memscope started (`EXITING`: its mappings are read
/// before its address space goes; perf-event probes carry no cookie), a
/// shared libpython's first initialisation step (`PYTHON_START`: its
/// interpreter is found before Python code runs), and `Py_FinalizeEx`
/// (`FINALIZING`: a window closes before the interpreter frees it all). Every stop memscope
/// causes is ended by the handler of its event, once.
#[uprobe]
pub fn exit_enter(ctx: ProbeContext) -> u32 {
    use profiler_common::event_kind::{EXITING, FINALIZING, PYTHON_START};
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let kind = match cookie(&ctx) {
        PYTHON_START => {
            // Some versions pass here again and again (3.8: from the
            // allocator); once the interpreter is known, the stop has
            // done its job.
            if python::is_known(tgid) {
                return 0;
            }
            PYTHON_START
        }
        FINALIZING => FINALIZING,
        _ => EXITING,
    };
    processes::hold(kind, tgid, 0);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
