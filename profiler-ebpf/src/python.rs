//! Python frames: where an allocation happens in a CPython process, the
//! allocating thread's own interpreter frame chain is walked here, since the
//! interpreter has no frame pointers for the native walk to follow.
//!
//! The thread state is the thread's own (glibc's pthread_getspecific of
//! the interpreter's TSS key), not the GIL holder's: a thread that released
//! the GIL to allocate still gets its own stack. Frames are recorded as
//! (code object, instruction, first line); userspace reads names and line
//! tables from the live process (`python` module).

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user, generated::bpf_loop,
    },
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use profiler_common::{
    Counter, DEFAULT_MAX_STACKS, MAX_PROCESSES, MAX_PYTHON_FRAMES, NO_OFFSET, PYTHON_FRAME_READ,
    PythonFrame, PythonHandlers, PythonProcess, PythonStack, config, python_flags,
    python_stack_flags,
};

use crate::counters::count;

#[map]
static PY_PROCS: HashMap<u32, PythonProcess> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// Written by userspace once it has named the handler's code objects.
#[map]
static PY_HANDLERS: HashMap<u32, PythonHandlers> = HashMap::with_max_entries(MAX_PROCESSES, 0);

/// NB: not preallocated: a full map would be 64 MiB of kernel memory for
/// the few hundred stacks a service has.
#[map]
static PY_STACKS: HashMap<u64, PythonStack> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// The stack being built, the frame being read and a window of the memory
/// below it: too big for the 512-byte BPF stack.
#[repr(C)]
pub struct Scratch {
    walk: Walk,
    stack: PythonStack,
    /// The frame read, as words.
    frame: [u64; FRAME_WORDS],
    /// Up to `WINDOW_BYTES` read once, ending where a frame ends: from
    /// 3.11 frames are pushed on the thread's data stack one above the
    /// other, so callers' frames come from the same copy (a copy costs
    /// 60-120 ns whatever its size). `window_len` 0: none.
    window_base: u64,
    window_len: u64,
    window: [u64; WINDOW_WORDS],
}

const FRAME_WORDS: usize = PYTHON_FRAME_READ / 8;
const WINDOW_BYTES: u64 = 1024;
const WINDOW_WORDS: usize = WINDOW_BYTES as usize / 8;

#[map]
static PY_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// glibc keeps keys below 32 in the thread's own block; CPython's key is
/// made at startup and is small.
const TSD_DIRECT_KEYS: u32 = 32;
/// `FRAME_OWNED_BY_CSTACK`: a shim frame a C call into Python pushes
/// (3.12+); it has no code of its own.
const FRAME_OWNED_BY_CSTACK: u8 = 3;
/// Frames skipped (shims, `None` code) on top of those kept.
const SKIPPED_FRAMES: usize = 16;

/// A forked child runs its parent's interpreter at the same addresses.
pub fn inherit(parent: u32, child: u32) {
    // SAFETY: the value is copied out.
    if let Some(process) = unsafe { PY_PROCS.get(parent) }.copied() {
        let _ = PY_PROCS.insert(child, process, 0);
    }
    // SAFETY: the value is copied out.
    if let Some(handlers) = unsafe { PY_HANDLERS.get(parent) }.copied() {
        let _ = PY_HANDLERS.insert(child, handlers, 0);
    }
}

/// Whether userspace has described this process's interpreter.
pub fn is_known(tgid: u32) -> bool {
    // SAFETY: read-only look-up.
    unsafe { PY_PROCS.get(tgid) }.is_some()
}

/// At exec or exit: the interpreter (if any) is gone.
pub fn forget(tgid: u32) {
    let _ = PY_PROCS.remove(tgid);
    let _ = PY_HANDLERS.remove(tgid);
}

/// The current thread's Python stack, recorded in `PY_STACKS`: its hash, or
/// zero when the thread runs no Python code (or it could not be read; that
/// is counted). With `requests` on and a request handler known in the
/// process, also the outermost of its frames on the stack (zero when none
/// is), for `request::current`; `None` without one or when the walk failed.
pub fn current_stack(tgid: u32, requests: bool) -> (u64, Option<u64>) {
    if crate::processes::config(profiler_common::config::PYTHON) == 0 {
        return (0, None);
    }
    // SAFETY: the value is copied out.
    let Some(process) = (unsafe { PY_PROCS.get(tgid) }).copied() else {
        return (0, None);
    };
    let handlers = if requests {
        // SAFETY: the value is copied out.
        unsafe { PY_HANDLERS.get(tgid) }.copied()
    } else {
        None
    };
    match walk(tgid, &process, handlers) {
        Ok((hash, frame)) => (hash, handlers.map(|_| frame)),
        Err(counter) => {
            if let Some(counter) = counter {
                count(counter);
            }
            (0, None)
        }
    }
}

fn read<T>(addr: u64) -> Result<T, Option<Counter>> {
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| Some(Counter::PythonStackErrors))
}

/// The word at byte `offset` in the frame read. Userspace checks every
/// offset: 8-aligned and below `PYTHON_FRAME_READ`.
/// NB: a mask, not a comparison, bounds the index: the verifier loses a
/// comparison's bound when the compiler checks a copy of the register.
fn word(frame: &[u64; FRAME_WORDS], offset: u16) -> u64 {
    frame[(offset as usize >> 3) & (FRAME_WORDS - 1)]
}

fn byte(frame: &[u64; FRAME_WORDS], offset: u16) -> u8 {
    (word(frame, offset) >> ((offset & 7) * 8)) as u8
}

/// The thread state of the current thread, zero when it has none.
fn thread_state(process: &PythonProcess) -> Result<u64, Option<Counter>> {
    let fsbase_offset = crate::processes::config(config::TASK_FSBASE_OFFSET) as u64;
    if fsbase_offset == 0 {
        return Err(None);
    }
    // NB: before the interpreter first touches `_PyRuntime` its page is
    // not mapped in yet, and a BPF read cannot fault it in: the C code
    // that runs first (the loader, libc) has no Python stack to miss.
    let tss: [u32; 2] = read(process.tss_addr).map_err(|_| None)?;
    if tss[0] == 0 {
        return Err(None); // the interpreter is still starting
    }
    let key = tss[1];
    if key >= TSD_DIRECT_KEYS {
        return Err(Some(Counter::PythonStackErrors));
    }
    // SAFETY: the current task is valid for the program's run; the
    // offset comes from the kernel's BTF.
    let fsbase: u64 =
        unsafe { bpf_probe_read_kernel((bpf_get_current_task() + fsbase_offset) as *const u64) }
            .map_err(|_| Some(Counter::PythonStackErrors))?;
    read(fsbase + u64::from(process.tsd_offset) + u64::from(key) * 16 + 8)
}

/// Bytes of a frame up to the end of the last field the walk reads.
fn frame_read(process: &PythonProcess) -> u32 {
    let mut end = process
        .frame_code
        .max(process.frame_back)
        .max(process.frame_instr);
    if process.frame_owner != NO_OFFSET {
        end = end.max(process.frame_owner & !7);
    }
    u32::from(end) + 8
}

/// The walk's state, passed to each `step` of a `bpf_loop`.
#[repr(C)]
struct Walk {
    process: PythonProcess,
    frame: u64,
    hash: u64,
    len: u32,
    flags: u32,
    /// Bytes of each frame read: up to the last field used.
    frame_read: u32,
    _pad: u32,
    /// The request handler's code objects (zeros: none), and the outermost
    /// frame found running one.
    handlers: PythonHandlers,
    handler_frame: u64,
}

fn walk(
    tgid: u32,
    process: &PythonProcess,
    handlers: Option<PythonHandlers>,
) -> Result<(u64, u64), Option<Counter>> {
    let tstate = thread_state(process)?;
    if tstate == 0 {
        return Err(None); // a thread that never ran Python
    }
    let mut frame: u64 = read(tstate + u64::from(process.tstate_frame))?;
    if process.cframe_frame != NO_OFFSET && frame != 0 {
        frame = read(frame + u64::from(process.cframe_frame))?;
    }
    let scratch = PY_SCRATCH.get_ptr_mut(0).ok_or(None)?;
    // SAFETY: a per-CPU map value, valid for this program's run; programs
    // on one CPU do not run in parallel.
    unsafe {
        (*scratch).window_len = 0;
        (*scratch).walk = Walk {
            process: *process,
            frame,
            // FNV-1a over the frames kept.
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
            flags: 0,
            frame_read: frame_read(process),
            _pad: 0,
            handlers: handlers.unwrap_or_default(),
            handler_frame: 0,
        };
    }
    // NB: bpf_loop, not a loop: the verifier checks `step` once, where an
    // 80-round loop whose rounds differ (frames skipped or kept) passed its
    // million-instruction budget. The state is in the map value, not on
    // this stack: the compiler cannot see `step` change it.
    // SAFETY: `step` matches the callback's type.
    unsafe {
        bpf_loop(
            (MAX_PYTHON_FRAMES + SKIPPED_FRAMES) as u32,
            step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    // SAFETY: as above; re-read after the loop.
    let (walk, stack) = unsafe {
        let scratch = core::ptr::read_volatile(&scratch);
        (&(*scratch).walk, &mut (*scratch).stack)
    };
    let handler_frame = walk.handler_frame;
    if walk.len == 0 {
        return Err(None);
    }
    stack.tgid = tgid;
    stack.len = walk.len;
    stack.flags = walk.flags;
    let hash = (walk.hash ^ u64::from(walk.flags)).wrapping_mul(0x0000_0100_0000_01b3);
    // Zero means "no Python stack".
    let hash = (hash ^ u64::from(tgid)).max(1);
    // SAFETY: read-only look-up.
    if unsafe { PY_STACKS.get(hash) }.is_none()
        && PY_STACKS.insert(hash, stack, BPF_NOEXIST as u64).is_err()
        // SAFETY: read-only look-up: another CPU may have inserted it.
        && unsafe { PY_STACKS.get(hash) }.is_none()
    {
        return Err(Some(Counter::PythonStacksFull));
    }
    Ok((hash, handler_frame))
}

/// Reads the walk's frame (its first `size` bytes) into `scratch.frame`:
/// from the window when it holds them, else from a new window ending with
/// them.
///
/// NB: never past the frame's last byte needed: a frame near the end of
/// the interpreter's data stack may be followed by a page not touched yet,
/// which a BPF read cannot fault in; nor below the frame's page, which may
/// start the data stack's chunk.
fn read_frame(scratch: &mut Scratch, size: usize) -> bool {
    let frame = scratch.walk.frame;
    // The mask bounds the size to the buffer for the verifier.
    let size = (size.wrapping_sub(1) & (PYTHON_FRAME_READ - 1)) as u64 + 1;
    let end = frame.wrapping_add(size);
    let mut offset = frame.wrapping_sub(scratch.window_base);
    if frame & 7 != 0
        || frame < scratch.window_base
        || end > scratch.window_base.wrapping_add(scratch.window_len)
    {
        // Rounded up: the frame itself is aligned.
        let base = (end.saturating_sub(WINDOW_BYTES).max(frame & !4095) + 7) & !7;
        scratch.window_len = 0;
        if frame & 7 != 0 || base > frame {
            return read_frame_alone(scratch, size);
        }
        // NB: the mask is for the verifier; `end - base` is at most
        // WINDOW_BYTES already.
        let len = ((end - base - 1) & (WINDOW_BYTES - 1)) + 1;
        // SAFETY: the window holds WINDOW_BYTES; the helper checks the
        // user address.
        let copied = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                scratch.window.as_mut_ptr().cast(),
                len as u32,
                base as *const core::ffi::c_void,
            )
        };
        if copied != 0 {
            return read_frame_alone(scratch, size);
        }
        scratch.window_base = base;
        scratch.window_len = len;
        offset = frame - base;
    }
    let first = (offset / 8) as usize;
    for i in 0..FRAME_WORDS {
        scratch.frame[i] = scratch.window[(first + i) & (WINDOW_WORDS - 1)];
    }
    true
}

fn read_frame_alone(scratch: &mut Scratch, size: u64) -> bool {
    // SAFETY: the buffer holds PYTHON_FRAME_READ bytes, `size` at most;
    // the helper checks the address read.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            scratch.frame.as_mut_ptr().cast(),
            size as u32,
            scratch.walk.frame as *const core::ffi::c_void,
        ) == 0
    }
}

/// One frame of the walk; non-zero ends it.
extern "C" fn step(_index: u64, _context: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = PY_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a per-CPU map value, valid for this program's run; programs
    // on one CPU do not run in parallel.
    let scratch = unsafe { &mut *scratch };
    let walk = &mut scratch.walk;
    if walk.frame == 0 {
        return 1;
    }
    let len = walk.len as usize;
    if len >= MAX_PYTHON_FRAMES {
        walk.flags |= python_stack_flags::TRUNCATED;
        count(Counter::PythonTruncated);
        return 1;
    }
    let size = walk.frame_read as usize;
    if !read_frame(scratch, size) {
        count(Counter::PythonStackErrors);
        return 1;
    }
    let walk = &mut scratch.walk;
    let process = walk.process;
    let this = walk.frame;
    let code = word(&scratch.frame, process.frame_code);
    let instr = word(&scratch.frame, process.frame_instr);
    walk.frame = word(&scratch.frame, process.frame_back);
    let shim = process.frame_owner != NO_OFFSET
        && byte(&scratch.frame, process.frame_owner) == FRAME_OWNED_BY_CSTACK;
    if shim || code == 0 || code == process.none_addr {
        return 0;
    }
    if walk.handlers.codes.contains(&code) {
        walk.handler_frame = this;
    }
    let instr = if process.flags & python_flags::INSTR_POINTER != 0 {
        instr.wrapping_sub(code) as u32
    } else {
        instr as u32 // f_lasti, an int
    };
    let firstlineno = read::<u32>(code + u64::from(process.code_firstlineno)).unwrap_or(0);
    scratch.stack.frames[len & (MAX_PYTHON_FRAMES - 1)] = PythonFrame {
        code,
        instr,
        firstlineno,
    };
    walk.len += 1;
    walk.hash = (walk.hash ^ code).wrapping_mul(0x0000_0100_0000_01b3);
    walk.hash = (walk.hash ^ u64::from(instr)).wrapping_mul(0x0000_0100_0000_01b3);
    0
}
