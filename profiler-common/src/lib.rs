//! Types shared by memscope's BPF programs and its userspace.
//!
//! Every struct here crosses the kernel boundary as raw bytes, so each one is
//! `#[repr(C)]` with fixed-width fields and explicit padding, and holds no
//! `bool` or enum: an invalid bit pattern would be undefined behaviour for
//! `aya::Pod`.
#![no_std]

pub mod sampling;

/// Map names, shared so both sides name a map the same way (15 bytes max).
pub mod map_names {
    /// Live allocations: `LiveKey -> LiveAllocation`.
    pub const LIVE: &str = "LIVE";
    /// Where most malloc-family blocks live instead: an mmapable array of
    /// `FrontBucket`s (see `FrontSlot`).
    pub const FRONT: &str = "FRONT";
    /// How many malloc-family blocks `LIVE` may hold: one mmapable u64,
    /// moved by both sides with atomic adds (see `FrontSlot`).
    pub const HASHED_BLOCKS: &str = "HASHED_BLOCKS";
    /// Per-stack totals: `StackKey -> StackTotals`.
    pub const STACK_TOTALS: &str = "STACK_TOTALS";
    /// User stack traces, by stack id.
    pub const STACKS: &str = "STACKS";
    /// Arguments of allocator calls in flight, by pid_tgid.
    pub const IN_FLIGHT: &str = "IN_FLIGHT";
    pub const CALL_SLOTS: &str = "CALL_SLOTS";
    /// Per-CPU failure counters, indexed by `Counter`.
    pub const COUNTERS: &str = "COUNTERS";
    /// Processes under the probes: `tgid -> 1`.
    pub const TRACED: &str = "TRACED";
    /// Children forked by a traced process, until they first return to user
    /// mode: `tid -> parent tgid`.
    pub const NEW_CHILDREN: &str = "NEW_CHILDREN";
    /// Process lifecycle events for userspace (`ProcessEvent`).
    pub const EVENTS: &str = "EVENTS";
    /// Settings written by userspace before attaching, indexed by `config`.
    pub const CONFIG: &str = "CONFIG";
    /// Heap top per process: `tgid -> HeapTop`.
    pub const HEAP_TOPS: &str = "HEAP_TOPS";
    /// Processes the kernel side stopped (SIGSTOP) and nobody has continued
    /// yet: `tgid -> monotonic ns of the stop`. Userspace continues them
    /// once their probes are on; the watchdog continues any held too long
    /// and every one left when memscope ends, however it ends.
    pub const HELD: &str = "HELD";
    /// With `--follow image`, each forked child's parent and fork time:
    /// `tgid -> Inheritance`.
    pub const INHERITED: &str = "INHERITED";
    /// CPython processes and how to walk their frames: `tgid -> PythonProcess`.
    pub const PY_PROCS: &str = "PY_PROCS";
    /// Python stacks by hash: `u64 -> PythonStack`.
    pub const PY_STACKS: &str = "PY_STACKS";
    /// Live bytes of the malloc family and their high-water mark, per
    /// process: `tgid -> ProcessPeak`.
    pub const PEAKS: &str = "PEAKS";
    /// The same, in an mmapable array of `PeakSlot`s where most processes
    /// keep them: the slot of `tgid % PEAK_SLOTS_LEN`, if free when the
    /// process first needs one (else `PEAKS`).
    pub const PEAK_SLOTS: &str = "PEAK_SLOTS";
    /// The same, summed over every traced process: one `ProcessPeak` in an
    /// mmapable array, which userspace adds to as well (a forked child's
    /// inherited blocks).
    pub const MERGED_PEAK: &str = "MERGED_PEAK";
    /// Requests open or closed but not yet followed by `keep_after`
    /// others: `id -> RequestRecord`.
    pub const REQUESTS: &str = "REQUESTS";
    /// The request open on each thread: `pid_tgid -> ThreadRequest`.
    pub const REQUEST_THREADS: &str = "REQUEST_THREADS";
    /// Per process, its requests closed so far: `tgid -> u64`.
    pub const REQUEST_PROCS: &str = "REQUEST_PROCS";
    /// The ids of each process's last `keep_after` closed requests, by
    /// close number modulo `keep_after`: `tgid << 32 | slot -> id`.
    pub const REQUEST_SLOTS: &str = "REQUEST_SLOTS";
    /// Unwind rules of every object memscope unwinds from .eh_frame, one
    /// sorted run per object: `index -> UnwindRow`.
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    /// Per process, its executable mappings and their runs of rows:
    /// `tgid -> ProcessUnwind`. A process without one is walked by frame
    /// pointers (the kernel's walk, into `STACKS`).
    pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
    /// Stacks the unwinder walked, by id (`UNWOUND_STACK_BIT` set):
    /// `u32 -> UnwoundStack`.
    pub const UNWOUND: &str = "UNWOUND";
    /// Closed and kept requests for userspace (`RequestRecord`).
    pub const REQUEST_EVENTS: &str = "REQUEST_EVENTS";
    /// The code objects of a Python request handler, per process:
    /// `tgid -> PythonHandlers`.
    pub const PY_HANDLERS: &str = "PY_HANDLERS";
}

/// Slots of the `CONFIG` array.
pub mod config {
    /// Byte offset of `child_pid` in the sched_process_fork record (it moved
    /// between kernels; userspace reads the tracepoint's format file).
    pub const FORK_CHILD_PID_OFFSET: u32 = 0;
    /// Byte offset of `group_dead` in the sched_process_exit record;
    /// `u32::MAX` where the kernel's record has no such field.
    pub const EXIT_GROUP_DEAD_OFFSET: u32 = 1;
    /// Non-zero once teardown has begun: the kernel side stops no process
    /// any more, so the set of held processes can only shrink.
    pub const STOPS_DISABLED: u32 = 2;
    /// Non-zero with `--follow image`: the allocator probes are on for
    /// every process mapping the allocator's file, and the programs count
    /// only the traced ones; so nothing waits for a probe, forks and execs
    /// are not held, and a child's frees of its parent's blocks are looked
    /// up in the parent's live set (`INHERITED`) instead of a copy.
    pub const FOLLOW_IMAGE: u32 = 3;
    /// Byte offset of the user fs base (`thread.fsbase`) in the kernel's
    /// `task_struct`, from BTF; zero when unknown (no Python walks then).
    pub const TASK_FSBASE_OFFSET: u32 = 4;
    /// Non-zero with `--request-fn`: allocations are tagged with their
    /// thread's open request.
    pub const REQUESTS: u32 = 5;
    /// A request's "kept" bytes are its live bytes when this many more
    /// requests of its process have closed (1 to `MAX_KEEP_AFTER`).
    pub const KEEP_AFTER: u32 = 6;
    /// Non-zero once a Python process is described (`PY_PROCS`): before
    /// that, an allocation skips the hash look-up of its process there.
    pub const PYTHON: u32 = 7;
    /// With `--stack-sample BYTES`: the mean gap, in bytes allocated,
    /// between heap allocations whose stack is walked (`sampling`); zero
    /// walks every one.
    pub const STACK_SAMPLE: u32 = 8;
    /// The front table's bucket count less one (a power of two less one:
    /// userspace sizes `FRONT` by `--max-live`).
    pub const FRONT_MASK: u32 = 9;
    pub const SLOTS: u32 = 10;
}

/// Processes followed at once (the target and its descendants).
pub const MAX_PROCESSES: u32 = 4096;
/// Ring buffer for process events: rare, small records.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// `ProcessEvent::kind` values.
pub mod event_kind {
    /// A traced process forked `pid`, which is now stopped (SIGSTOP) before
    /// its first user instruction, waiting for its probes.
    pub const FORK: u32 = 1;
    /// `pid` executed a new program: its address space was replaced. It is
    /// stopped (SIGSTOP) before the new image's first instruction.
    pub const EXEC: u32 = 2;
    /// The last thread of `pid` exited.
    pub const EXIT: u32 = 3;
    /// `pid`, a command memscope started, called `_exit` and is stopped
    /// (SIGSTOP) while its mappings are still there to read.
    pub const EXITING: u32 = 4;
    /// `pid` started initialising a shared libpython it had not mapped at
    /// its exec, and is stopped (SIGSTOP) until its interpreter is found.
    pub const PYTHON_START: u32 = 5;
    /// `pid`'s interpreter started finalizing (`Py_FinalizeEx`), and is
    /// stopped (SIGSTOP) while a window closes on what its program held
    /// before the interpreter frees it all.
    pub const FINALIZING: u32 = 6;
    /// `pid`, whose stacks the .eh_frame unwinder walks, mapped a file
    /// executable, and is stopped (SIGSTOP) until that file's rules are
    /// loaded: its next stacks may run through it.
    pub const CODE_MAPPED: u32 = 7;
}

/// Extra time a process may be held beyond the usual budget at the stops
/// that come once per program image (`event_kind::EXEC`, `PYTHON_START`,
/// `EXITING`), not at every fork: the new image's probes go on and its
/// interpreter's layout is read from a large executable or libpython (cold
/// from disk on a fresh machine: 50 ms and more), or its code objects are
/// read one last time. Their record in `HELD` is dated this far ahead, so
/// the watchdog's budget check needs no other case.
pub const ONCE_PER_IMAGE_GRACE_NS: u64 = 200_000_000;

/// A process lifecycle event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    pub kind: u32,
    pub pid: u32,
    pub ppid: u32,
    /// Non-zero when `pid` is stopped for this event and waits for
    /// userspace to continue it (see `map_names::HELD`).
    pub held: u32,
    pub timestamp_ns: u64,
    /// The hold's record in `HELD`, which whoever continues it matches:
    /// `timestamp_ns`, plus `ONCE_PER_IMAGE_GRACE_NS` at the once-per-image
    /// stops. Zero when not held.
    pub hold_ns: u64,
}

/// Where a forked child's inherited blocks are: its parent's live set, as
/// it was at the fork.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inheritance {
    pub parent: u32,
    pub _pad: u32,
    pub fork_ns: u64,
}

/// Generations of parents a child's free is looked up in (`--follow image`).
pub const INHERITANCE_DEPTH: usize = 4;

/// Default capacity of the live-allocation map (`--max-live`).
pub const DEFAULT_MAX_LIVE: u32 = 1 << 20;
/// Default capacity of the stack trace map (`--max-stacks`).
pub const DEFAULT_MAX_STACKS: u32 = 1 << 15;
/// Per-stack totals are keyed by (process, stack): room for many processes
/// sharing stacks (pre-fork workers allocate from the same ones).
pub const STACK_TOTALS_PER_STACK: u32 = 8;
/// An allocator call in flight longer than this lost its return (it was
/// caught while probes were being attached, or the thread longjmp'd out).
pub const STALE_CALL_NS: u64 = 1_000_000_000;
/// Threads' call slots: a thread's allocator call in flight is in the slot
/// of its tid modulo this (a power of two).
pub const CALL_SLOTS_LEN: u32 = 1 << 16;
/// Calls in flight of threads whose slot another thread holds at once.
pub const MAX_HASHED_CALLS: u32 = 1 << 12;
/// Deepest user stack recorded; the kernel's PERF_MAX_STACK_DEPTH.
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack id recorded when the kernel could not walk the stack, so the bytes
/// still count (under an "unknown stack" site) instead of vanishing.
pub const UNKNOWN_STACK: u32 = u32::MAX;

/// Stack id of heap blocks whose stack `--stack-sample` did not walk: their
/// figures make the exact totals, and no site.
pub const UNSAMPLED_STACK: u32 = u32::MAX - 1;

/// The highest id an unwound stack takes: the two above are reserved.
pub const MAX_UNWOUND_ID: u32 = u32::MAX - 2;

/// Set in the id of a stack the .eh_frame unwinder walked (`UNWOUND`);
/// ids without it are the kernel's frame-pointer walks (`STACKS`).
pub const UNWOUND_STACK_BIT: u32 = 1 << 31;

/// Executable mappings described per process (`ProcessUnwind`); a pc in
/// none of them is walked by its frame pointer.
pub const MAX_UNWIND_MAPPINGS: usize = 128;
/// Default capacity of `UNWIND_ROWS` (`--unwind-rows`): 8 bytes a row.
pub const DEFAULT_UNWIND_ROWS: u32 = 1 << 21;

/// How a row finds the canonical frame address (CFA, the caller's stack
/// pointer before the call): `UnwindRow::cfa_rule`.
pub mod cfa_rule {
    /// CFA = rsp + offset.
    pub const RSP: u8 = 0;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 1;
    /// A PLT entry: CFA = rsp + 8, plus 8 when `(rip & 15) >= offset`
    /// (the push of the lazy-binding stub), the DWARF expression every
    /// linker emits for .plt.
    pub const PLT: u8 = 2;
    /// The return address is undefined: the outermost frame (`_start`, a
    /// thread's start), where a stack ends whole.
    pub const END: u8 = 3;
    /// No rule memscope can follow (a gap between functions, a DWARF
    /// expression): the stack is cut here.
    pub const STOP: u8 = 4;
}

/// One unwind rule, from `pc` (relative to the object's link-time
/// addresses) up to the next row's. The return address is always at
/// CFA - 8 (x86-64's call pushes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    pub cfa_offset: u16,
    /// One of `cfa_rule`.
    pub cfa_rule: u8,
    /// Where the caller's rbp was saved, in words from the CFA (negative);
    /// zero when rbp still holds it.
    pub rbp_offset: i8,
}

/// An executable mapping of a process and its object's rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Runtime address minus link-time address.
    pub bias: u64,
    /// The object's run in `UNWIND_ROWS`; `rows_len` zero walks the
    /// object's frames by frame pointer.
    pub rows_start: u32,
    pub rows_len: u32,
}

/// A process's executable mappings, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessUnwind {
    pub len: u32,
    pub _pad: u32,
    /// Unique to this description of this process (never reused, also
    /// across processes): the kernel caches the rules found by it.
    pub generation: u64,
    pub mappings: [UnwindMapping; MAX_UNWIND_MAPPINGS],
}

/// How an unwound stack ended: `UnwoundStack::flags`.
pub mod unwound_flags {
    /// At a frame whose return address is undefined: the stack is whole.
    pub const COMPLETE: u32 = 1;
    /// Deeper than `MAX_STACK_DEPTH`: the outermost frames are cut off.
    pub const TRUNCATED: u32 = 2;
    /// Cut at a frame no rule covers or whose saved registers could not be
    /// read: the frames kept are right, the callers beyond are missing.
    pub const CUT: u32 = 4;
}

/// A stack the unwinder walked, innermost frame first. `check` is a second
/// hash of the frames: a different stack hashing to the same id has
/// another, and is not merged with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnwoundStack {
    pub check: u64,
    pub len: u32,
    /// `unwound_flags`.
    pub flags: u32,
    /// `len` used, at most `MAX_STACK_DEPTH`; one more slot so the walk's
    /// index can be bounded by a mask.
    pub frames: [u64; MAX_STACK_DEPTH + 1],
}

/// Which allocator entry point a call came through.
pub mod alloc_kind {
    pub const MALLOC: u32 = 1;
    pub const CALLOC: u32 = 2;
    pub const REALLOC: u32 = 3;
    pub const POSIX_MEMALIGN: u32 = 4;
    pub const ALIGNED_ALLOC: u32 = 5;
    pub const MEMALIGN: u32 = 6;
    pub const VALLOC: u32 = 7;
    pub const PVALLOC: u32 = 8;
    pub const REALLOCARRAY: u32 = 9;
    /// An anonymous private mmap outside the allocator.
    pub const MMAP: u32 = 10;
    /// An mremap in flight (recorded as `MMAP`).
    pub const MREMAP: u32 = 11;
    /// free(ptr): the attach cookie of free's entry probe.
    pub const FREE: u32 = 12;
    /// CPython's object allocator (`--python-objects` with `attach`): the
    /// functions behind `PyObject_Malloc` and friends, whose first
    /// argument is the allocator's context: `malloc(ctx, size)`,
    /// `calloc(ctx, n, size)`, `realloc(ctx, ptr, size)`, `free(ctx, ptr)`.
    /// The first three have a return probe, so the libc calls and arena
    /// mmaps made inside them are theirs, not counted again; `PY_FREE` is
    /// entry only, and marks the thread for the libc free it may make.
    pub const PY_MALLOC: u32 = 13;
    pub const PY_CALLOC: u32 = 14;
    pub const PY_REALLOC: u32 = 15;
    pub const PY_FREE: u32 = 16;
    /// Not an allocator: the request handler (`--request-fn`), whose entry
    /// opens a request on the thread and whose return closes it.
    pub const REQUEST: u32 = 17;
    /// Not an allocator: a file mapped executable (the loader, dlopen),
    /// whose mmap's return holds the process until the unwinder knows it
    /// (`event_kind::CODE_MAPPED`).
    pub const CODE_MMAP: u32 = 18;

    /// How many leading argument registers (rdi, rsi, rdx) the entry
    /// program reads for `kind`: a probe may move past prologue
    /// instructions that write only the others.
    pub const fn arguments(kind: u32) -> usize {
        match kind {
            MALLOC | VALLOC | PVALLOC | FREE => 1,
            CALLOC | REALLOC | ALIGNED_ALLOC | MEMALIGN | PY_MALLOC | PY_FREE => 2,
            _ => 3,
        }
    }
}

/// What kind of memory a site holds: `StackKey::class`.
pub mod site_class {
    /// The malloc family (including glibc's own mmaps for large blocks,
    /// which happen inside malloc and are counted there, once).
    pub const MALLOC: u32 = 0;
    /// Anonymous private mappings made outside the allocator.
    pub const MMAP: u32 = 1;
}

/// Index into the per-CPU `COUNTERS` array. Every event the kernel side could
/// not record increments one of these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// The live map was full: an allocation was not tracked.
    LiveMapFull = 0,
    /// The per-stack totals map was full: an allocation's bytes were not
    /// attributed to a stack.
    TotalsMapFull = 1,
    /// `bpf_get_stackid` failed other than by a collision (the stack map
    /// full, a fault or a busy callchain buffer).
    StackErrors = 2,
    /// `free` of an address the live map does not hold (allocated before
    /// attach, or lost to a full map).
    UnknownFrees = 3,
    /// A return probe fired without its entry (attached mid-call).
    MissedReturns = 4,
    /// The in-flight map was full: an allocator call's arguments were lost.
    InFlightFull = 5,
    /// A forked child could not be followed (process map, held map or event
    /// ring full): it was not stopped and runs unprobed.
    LostChildren = 6,
    /// The per-process heap (brk) map was full.
    HeapMapFull = 7,
    /// A Python thread's frame chain could not be read (a fault, or a
    /// frame that is not one): the stack has native frames only.
    PythonStackErrors = 8,
    /// A Python stack deeper than `MAX_PYTHON_FRAMES`: the outermost frames
    /// were cut off (the innermost are kept).
    PythonTruncated = 9,
    /// The Python stack map was full: a stack kept its native frames only.
    PythonStacksFull = 10,
    /// The per-process peak map was full: a process's live bytes and peak
    /// are not known (its allocations are still counted).
    PeakMapFull = 11,
    /// A peak could not be raised within `PEAK_RAISE_TRIES` exchanges
    /// (other CPUs raised it meanwhile): the peak may be low by the bytes
    /// of that one allocation.
    PeakRaceLost = 12,
    /// `bpf_get_stackid` found another stack in the stack's bucket (EEXIST:
    /// a hash collision, as no BPF_F_REUSE_STACKID is given). Counted apart
    /// from `StackErrors`, the walks that failed otherwise.
    StackCollisions = 13,
    /// The request map was full: a request was not opened, its allocations
    /// go untagged (they still count in the sites).
    RequestsFull = 14,
    /// The request ring buffer was full: a request's close or kept figure
    /// did not reach userspace.
    RequestEventsLost = 15,
    /// The unwound-stack map was full, or an unwound stack's id was taken
    /// by another stack: the allocation counts under the unknown stack.
    UnwoundStacksFull = 16,
}

/// Number of `Counter` slots.
pub const COUNTER_SLOTS: u32 = 17;

/// Live bytes (malloc family) and their high-water mark, for one process or
/// for all (`map_names::PEAKS`, `map_names::MERGED_PEAK`).
///
/// `live_bytes` counts blocks allocated and freed under the probes;
/// `inherited_bytes` is what userspace copied into a forked child's live set
/// (constant once written, before the child runs). The process holds
/// `inherited_bytes + live_bytes`, and `peak_bytes` is the highest that sum
/// has been, at `peak_ns` (monotonic).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessPeak {
    pub live_bytes: i64,
    pub inherited_bytes: u64,
    pub peak_bytes: u64,
    pub peak_ns: u64,
}

/// A process's `ProcessPeak` in `map_names::PEAK_SLOTS`: `owner` is its
/// tgid, 0 while the slot is free. Claimed by compare-and-swap from 0 (by
/// the kernel at the process's first block, or by userspace for a held
/// child it gives inherited bytes), and freed by userspace alone, after
/// the process exits: zeroed figures, then the owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeakSlot {
    pub owner: u64,
    pub peak: ProcessPeak,
}

/// Slots of `map_names::PEAK_SLOTS` (a power of two): an array element is
/// reached without a hash look-up, twice a malloc/free pair.
pub const PEAK_SLOTS_LEN: u32 = 1 << 10;

impl ProcessPeak {
    /// What the process holds now.
    pub const fn held_bytes(&self) -> u64 {
        let held = self.inherited_bytes as i64 + self.live_bytes;
        if held < 0 { 0 } else { held as u64 }
    }
}

/// Exchanges tried to raise a peak before giving up (`Counter::PeakRaceLost`).
pub const PEAK_RAISE_TRIES: usize = 8;

/// Movement of a process's heap top (brk), all calls included: glibc's
/// main arena grows this way inside malloc.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapTop {
    /// The break seen first, and the latest one.
    pub first: u64,
    pub current: u64,
    /// Bytes the break moved up and down, summed.
    pub grown: u64,
    pub shrunk: u64,
}

/// Key of a live allocation. Forked workers share their parent's layout, so
/// two processes often hold the same address: key by (tgid, address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub tgid: u32,
    pub _pad: u32,
    pub addr: u64,
}

/// One allocation that has not been freed yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveAllocation {
    pub size: u64,
    pub timestamp_ns: u64,
    pub stack_id: u32,
    /// One of `alloc_kind`.
    pub kind: u32,
    /// See `StackKey::caller`.
    pub caller: u64,
    /// See `StackKey::python_stack`.
    pub python_stack: u64,
    /// The request the allocating thread was serving (`RequestRecord::id`),
    /// zero outside requests.
    pub request: u64,
}

/// A malloc-family block in the front table (`map_names::FRONT`), where a
/// block is found at a hash of its key without a hash map's bucket walk,
/// lock and element allocation (measured: 13-22% of a malloc/free pair of
/// blocks that live a while). `owner` is the block's address, 0 for a free
/// slot, `FRONT_BUSY` while one side has it to itself: a slot is claimed
/// and taken by compare-and-swap of `owner`, so a block is read whole by
/// whoever takes it. A block whose bucket is full goes to `LIVE`;
/// `HASHED_BLOCKS` counts those, so while it is 0 a new block needs no
/// look-up there for a stale entry of its address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontSlot {
    pub owner: u64,
    pub tgid: u32,
    pub _pad: u32,
    pub block: LiveAllocation,
}

/// Slots of a front-table bucket: a key may sit in any of them.
pub const FRONT_WAYS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontBucket {
    pub slots: [FrontSlot; FRONT_WAYS],
}

/// The front table's buckets at the default `--max-live` (a power of two;
/// 4 MiB of kernel memory, allocated at load).
pub const FRONT_BUCKETS: u32 = 1 << 14;

/// `FrontSlot::owner` while a slot is being written or taken.
pub const FRONT_BUSY: u64 = u64::MAX;

/// The front bucket of a block: a multiplicative hash of its key.
pub const fn front_bucket(tgid: u32, addr: u64, mask: u32) -> u32 {
    // A user address has 47 bits (x86-64's 4-level paging): the process
    // above them, its high bits wrapped to the low ones, which alignment
    // leaves zero.
    let mixed = (addr ^ (tgid as u64).rotate_left(47)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 40) as u32 & mask
}

/// Key of per-stack totals: the process and the allocating stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackKey {
    pub tgid: u32,
    pub stack_id: u32,
    /// One of `site_class`.
    pub class: u32,
    pub _pad: u32,
    /// For stacks taken at a system call: the return address at the user
    /// stack pointer. libc's syscall wrappers are leaves without a frame, so
    /// the frame-pointer walk skips their caller; this is that caller. Zero
    /// for stacks taken at return probes, which are complete.
    pub caller: u64,
    /// Hash of the allocating thread's Python stack (`PY_STACKS`); zero
    /// when the thread ran no Python code or is not in a CPython process.
    pub python_stack: u64,
}

impl LiveAllocation {
    /// A malloc-family block, not a mapping: only these go to the front
    /// table, and `HASHED_BLOCKS` counts those in `LIVE`.
    pub const fn is_heap(&self) -> bool {
        self.kind != alloc_kind::MMAP
    }

    /// The totals this block is counted in, in process `tgid`.
    pub const fn stack_key(&self, tgid: u32) -> StackKey {
        StackKey {
            tgid,
            stack_id: self.stack_id,
            class: if self.kind == alloc_kind::MMAP {
                site_class::MMAP
            } else {
                site_class::MALLOC
            },
            _pad: 0,
            caller: self.caller,
            python_stack: self.python_stack,
        }
    }
}

impl StackKey {
    pub const fn new(tgid: u32, stack_id: u32) -> Self {
        Self {
            tgid,
            stack_id,
            class: site_class::MALLOC,
            _pad: 0,
            caller: 0,
            python_stack: 0,
        }
    }
}

/// Cumulative totals of one stack. Updated with atomic adds: many threads
/// allocate from the same stack at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackTotals {
    pub alloc_count: u64,
    pub alloc_bytes: u64,
    pub free_count: u64,
    pub free_bytes: u64,
}

impl StackTotals {
    pub const fn new(alloc_count: u64, alloc_bytes: u64, free_count: u64, free_bytes: u64) -> Self {
        Self {
            alloc_count,
            alloc_bytes,
            free_count,
            free_bytes,
        }
    }

    pub const fn live_count(&self) -> u64 {
        self.alloc_count.saturating_sub(self.free_count)
    }

    pub const fn live_bytes(&self) -> u64 {
        self.alloc_bytes.saturating_sub(self.free_bytes)
    }

    /// Adds `other` field by field.
    pub const fn add(&mut self, other: &StackTotals) {
        self.alloc_count += other.alloc_count;
        self.alloc_bytes += other.alloc_bytes;
        self.free_count += other.free_count;
        self.free_bytes += other.free_bytes;
    }

    /// What happened between `earlier` and `self` (both cumulative totals
    /// of one stack): never negative, so a totals entry that was removed and
    /// started again counts from zero.
    pub const fn since(&self, earlier: &StackTotals) -> StackTotals {
        StackTotals {
            alloc_count: self.alloc_count.saturating_sub(earlier.alloc_count),
            alloc_bytes: self.alloc_bytes.saturating_sub(earlier.alloc_bytes),
            free_count: self.free_count.saturating_sub(earlier.free_count),
            free_bytes: self.free_bytes.saturating_sub(earlier.free_bytes),
        }
    }

    /// Net change of live bytes these totals make.
    pub const fn growth_bytes(&self) -> i64 {
        self.alloc_bytes as i64 - self.free_bytes as i64
    }
}

/// Arguments of an allocator call, saved at entry and consumed at return.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlightCall {
    /// Requested size in bytes.
    pub size: u64,
    /// realloc: the old pointer; posix_memalign: the `memptr` out-pointer.
    pub ptr: u64,
    /// When the call entered, to recognise an entry whose return never came.
    pub timestamp_ns: u64,
    /// One of `alloc_kind`.
    pub kind: u32,
    pub _pad: u32,
}

/// Deepest Python stack recorded (innermost frames kept).
pub const MAX_PYTHON_FRAMES: usize = 64;
/// Bytes of a Python frame read at once; every frame offset used must fit.
pub const PYTHON_FRAME_READ: usize = 128;
/// An offset a version does not have.
pub const NO_OFFSET: u16 = u16::MAX;

/// `PythonProcess::flags` bits.
pub mod python_flags {
    /// `frame_instr` is a pointer into the code object's bytecode (3.11+),
    /// not an int `f_lasti` (3.8-3.10).
    pub const INSTR_POINTER: u16 = 1;
}

/// `PythonStack::flags` bits.
pub mod python_stack_flags {
    /// Deeper than `MAX_PYTHON_FRAMES`: outer frames are missing.
    pub const TRUNCATED: u32 = 1;
}

/// How the kernel side walks one CPython process's frames. Written by
/// userspace (`python::runtime`) once the interpreter is found; every
/// offset is in bytes and below `PYTHON_FRAME_READ` where it indexes a frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonProcess {
    /// Address of the interpreter's `Py_tss_t autoTSSkey` in the process:
    /// `{int _is_initialized; int _key}`, read at every walk (it is set
    /// during `Py_Initialize`, after a `run` target's exec).
    pub tss_addr: u64,
    /// Address of `_Py_NoneStruct`: 3.13 marks a C-entered frame with a
    /// `None` code object.
    pub none_addr: u64,
    /// Offset of glibc's `struct pthread.specific_1stblock` from the thread
    /// pointer (0x310 for glibc 2.27-2.38): a key's value is at
    /// `fsbase + tsd_offset + key * 16 + 8`.
    pub tsd_offset: u32,
    /// `(major << 8) | minor`, e.g. 0x030b.
    pub version: u32,
    /// `PyThreadState.frame` (3.8-3.10), `.cframe` (3.11-3.12) or
    /// `.current_frame` (3.13).
    pub tstate_frame: u16,
    /// `_PyCFrame.current_frame` (3.11-3.12); `NO_OFFSET` without a cframe.
    pub cframe_frame: u16,
    /// In a frame: `f_code`/`f_executable`, the back link
    /// (`f_back`/`previous`), the instruction (`f_lasti`, `prev_instr`,
    /// `instr_ptr`) and `owner` (`NO_OFFSET` before 3.12: no shim frames).
    pub frame_code: u16,
    pub frame_back: u16,
    pub frame_instr: u16,
    pub frame_owner: u16,
    /// `PyCodeObject.co_firstlineno`, read per frame to tell a freed code
    /// object's address from a new one there.
    pub code_firstlineno: u16,
    /// `python_flags`.
    pub flags: u16,
}

/// One Python frame as recorded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PythonFrame {
    /// Address of the code object.
    pub code: u64,
    /// With `python_flags::INSTR_POINTER`: the instruction pointer's byte
    /// offset from the code object's start; else `f_lasti` as stored.
    pub instr: u32,
    /// The code object's `co_firstlineno`, as read with the frame.
    pub firstlineno: u32,
}

/// A Python stack, innermost frame first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PythonStack {
    /// The process whose code objects the frames name: forked workers
    /// share addresses, but code made after the fork differs.
    pub tgid: u32,
    pub _pad: u32,
    pub len: u32,
    /// `python_stack_flags`.
    pub flags: u32,
    pub frames: [PythonFrame; MAX_PYTHON_FRAMES],
}

/// Requests open at once or waiting for their kept figure.
pub const MAX_REQUESTS: u32 = 1 << 16;
/// Threads serving a request at once.
pub const MAX_REQUEST_THREADS: u32 = 1 << 14;
/// The most requests a kept figure may wait for (`--keep-after`).
pub const MAX_KEEP_AFTER: usize = 64;
/// Ring buffer for request records: two per request.
pub const REQUEST_EVENTS_BYTES: u32 = 1 << 20;

/// `RequestRecord::kind` values.
pub mod request_event {
    /// The request returned: `retained_bytes` is set.
    pub const CLOSED: u32 = 1;
    /// `keep_after` more requests of its process closed: `kept_bytes` is set.
    pub const KEPT: u32 = 2;
}

/// `RequestRecord::flags` bits.
pub mod request_flags {
    /// Opened on a Python frame of a thread not seen outside the handler
    /// since the handler was known: it may have begun earlier, so its
    /// figures may be short.
    pub const PARTIAL: u32 = 1;
}

/// One request: a call of the handler on one thread, from entry to return.
/// `live_bytes` moves with its blocks (frees on any thread); at the close it
/// is copied to `retained_bytes`, and `keep_after` closes later to
/// `kept_bytes`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestRecord {
    pub id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub start_ns: u64,
    /// Zero while open.
    pub end_ns: u64,
    pub alloc_count: u64,
    pub alloc_bytes: u64,
    pub live_bytes: i64,
    pub retained_bytes: u64,
    pub kept_bytes: u64,
    /// One of `request_event` in a ring record; zero in the map.
    pub kind: u32,
    /// `request_flags`.
    pub flags: u32,
}

/// The request open on a thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadRequest {
    /// Zero when none is open (a Python thread seen outside its handler).
    pub id: u64,
    /// The handler's interpreter frame, for a request opened on a Python
    /// frame; zero for a native handler.
    pub frame: u64,
    /// Native handler calls nested on the thread: the outermost is the
    /// request.
    pub depth: u32,
    pub _pad: u32,
}

/// Code objects that are the request handler in one CPython process
/// (a function may have several: one per definition run).
pub const MAX_PYTHON_HANDLERS: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonHandlers {
    pub codes: [u64; MAX_PYTHON_HANDLERS],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), fixed-width integers with explicit padding, so
    // every bit pattern is valid.
    unsafe impl aya::Pod for super::LiveKey {}
    unsafe impl aya::Pod for super::LiveAllocation {}
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::StackTotals {}
    unsafe impl aya::Pod for super::InFlightCall {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::HeapTop {}
    unsafe impl aya::Pod for super::Inheritance {}
    unsafe impl aya::Pod for super::PythonProcess {}
    unsafe impl aya::Pod for super::PythonFrame {}
    unsafe impl aya::Pod for super::PythonStack {}
    unsafe impl aya::Pod for super::ProcessPeak {}
    unsafe impl aya::Pod for super::PeakSlot {}
    unsafe impl aya::Pod for super::FrontBucket {}
    unsafe impl aya::Pod for super::RequestRecord {}
    unsafe impl aya::Pod for super::ThreadRequest {}
    unsafe impl aya::Pod for super::PythonHandlers {}
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::UnwindMapping {}
    unsafe impl aya::Pod for super::ProcessUnwind {}
    unsafe impl aya::Pod for super::UnwoundStack {}
}
