//! Following the target's children: forks are caught in the kernel and the
//! child is stopped before its first user instruction, so userspace can put
//! the (pid-scoped) allocator probes on it with nothing missed.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::TracePointContext,
};
use profiler_common::{
    Counter, EVENTS_BYTES, Inheritance, MAX_PROCESSES, ProcessEvent, config, event_kind,
};

use crate::counters::count;

#[map]
static TRACED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static NEW_CHILDREN: HashMap<u32, u32> = HashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(config::SLOTS, 0);

#[map]
static HELD: HashMap<u32, u64> = HashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static INHERITED: HashMap<u32, Inheritance> = HashMap::with_max_entries(MAX_PROCESSES, 0);

pub const SIGSTOP: u32 = 19;

pub fn config(slot: u32) -> usize {
    CONFIG.get(slot).copied().unwrap_or(0) as usize
}

fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

fn follow_image() -> bool {
    config(config::FOLLOW_IMAGE) != 0
}

/// Whether the allocator probes should count the current process: with
/// `--follow image` they fire for every process that maps the allocator.
pub fn counts_current() -> bool {
    !follow_image() || is_traced(current_tgid())
}

/// Where a child's blocks inherited at its fork are (`--follow image`).
pub fn inheritance(tgid: u32) -> Option<Inheritance> {
    // SAFETY: read-only look-up; the value is copied.
    unsafe { INHERITED.get(tgid) }.copied()
}

pub fn is_traced(tgid: u32) -> bool {
    // SAFETY: read-only look-up.
    unsafe { TRACED.get(tgid) }.is_some()
}

fn event(kind: u32, pid: u32, ppid: u32) -> ProcessEvent {
    ProcessEvent {
        kind,
        pid,
        ppid,
        held: 0,
        // SAFETY: no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        hold_ns: 0,
    }
}

pub fn emit(kind: u32, pid: u32, ppid: u32) {
    if EVENTS
        .output::<ProcessEvent>(&event(kind, pid, ppid), 0)
        .is_err()
    {
        count(Counter::LostChildren);
    }
}

/// Stops the current process (SIGSTOP to the current thread, delivered
/// before it next runs user code; the whole group stops) and reports it,
/// so userspace can do its work and continue it.
/// NB: the event is reserved and the stop recorded in HELD before the
/// signal goes: a process whose event could be lost is never stopped, and
/// every stop is in HELD for the watchdog. Returns whether it was stopped.
pub fn hold(kind: u32, pid: u32, ppid: u32) -> bool {
    if config(config::STOPS_DISABLED) != 0 {
        return false;
    }
    let Some(mut entry) = EVENTS.reserve::<ProcessEvent>(0) else {
        count(Counter::LostChildren);
        return false;
    };
    let mut event = ProcessEvent {
        held: 1,
        ..event(kind, pid, ppid)
    };
    event.hold_ns = event.timestamp_ns;
    if kind != event_kind::FORK {
        event.hold_ns += profiler_common::ONCE_PER_IMAGE_GRACE_NS;
    }
    // NB: a record left by an earlier hold is written over: whoever
    // continued the process takes that record out atomically and puts a
    // newer one back (userspace `holds`), so neither hold is lost.
    if HELD.insert(pid, event.hold_ns, 0).is_err() {
        entry.discard(0);
        count(Counter::LostChildren);
        return false;
    }
    // To the current thread, not the process: a stop sent to the process
    // while another is pending there (a thread's code mapping, not yet
    // taken by the thread the kernel woke for it, which a loaded machine
    // may not run for milliseconds) merges with it and wakes nobody, so a
    // thread in `_exit` ran on to exit_group unstopped. Sent to the
    // thread, it stops before its next user instruction, and the stop is
    // still the whole group's.
    // SAFETY: signals the current thread.
    if unsafe { aya_ebpf::helpers::generated::bpf_send_signal_thread(SIGSTOP) } != 0 {
        let _ = HELD.remove(pid);
        entry.discard(0);
        count(Counter::LostChildren);
        return false;
    }
    entry.write(event);
    entry.submit(0);
    true
}

/// Runs in the parent. The record's parent_pid is the forking thread, so
/// the parent process is the current tgid.
#[tracepoint]
pub fn process_fork(ctx: TracePointContext) -> u32 {
    let parent = current_tgid();
    if !is_traced(parent) {
        return 0;
    }
    // SAFETY: the offset comes from the tracepoint's format file.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(config(config::FORK_CHILD_PID_OFFSET)) }) else {
        return 0;
    };
    if NEW_CHILDREN.insert(child as u32, parent, 0).is_err() {
        count(Counter::LostChildren);
    }
    0
}

/// Runs as a task leaves clone, clone3, fork or vfork; a new child leaves
/// it here before its first user instruction. A new process (not a thread) is
/// stopped and reported; userspace attaches its probes and continues it.
#[tracepoint]
pub fn syscall_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let tid = id as u32;
    // SAFETY: read-only look-up; the value is copied.
    let Some(parent) = (unsafe { NEW_CHILDREN.get(tid) }).copied() else {
        return 0;
    };
    let _ = NEW_CHILDREN.remove(tid);
    let tgid = (id >> 32) as u32;
    if tid != tgid {
        return 0; // a new thread: the process's probes already cover it
    }
    // Traced first, so forks it makes while held are followed too; an
    // untraced child is never stopped.
    if TRACED.insert(tgid, 1, BPF_NOEXIST as u64).is_err() && !is_traced(tgid) {
        count(Counter::LostChildren);
        return 0;
    }
    crate::python::inherit(parent, tgid);
    crate::unwind::inherit(parent, tgid);
    if follow_image() {
        // Its probes are on already: nothing to wait for. Its parent's live
        // set stands for the one it inherited.
        let inheritance = Inheritance {
            parent,
            _pad: 0,
            // SAFETY: no preconditions.
            fork_ns: unsafe { bpf_ktime_get_ns() },
        };
        if INHERITED.insert(tgid, inheritance, 0).is_err() {
            count(Counter::LostChildren);
        }
        emit(event_kind::FORK, tgid, parent);
        return 0;
    }
    if !hold(event_kind::FORK, tgid, parent) {
        let _ = TRACED.remove(tgid);
    }
    0
}

/// The new image may bring its own malloc (a static binary, a preloaded
/// allocator): stop it before its first instruction so userspace can probe
/// it, as for a fork.
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if !is_traced(tgid) {
        return 0;
    }
    // A new address space: nothing of the parent's is in it.
    let _ = INHERITED.remove(tgid);
    crate::peak::drop_live(tgid);
    crate::python::forget(tgid);
    crate::unwind::forget(tgid);
    forget_requests(tgid, true);
    // Unheld (with --follow image, or when it cannot be), the exec is
    // still reported: the old image's blocks go.
    if follow_image() || !hold(event_kind::EXEC, tgid, 0) {
        emit(event_kind::EXEC, tgid, 0);
    }
    0
}

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let tgid = current_tgid();
    if !is_traced(tgid) {
        return 0;
    }
    // A thread that dies inside an allocator call leaves its slot behind;
    // its id is soon another thread's (a fork storm reuses pids quickly).
    crate::forget_call();
    let offset = config(config::EXIT_GROUP_DEAD_OFFSET);
    let group_dead = if offset == u32::MAX as usize {
        // No group_dead field: the leader's exit stands for the process's.
        bpf_get_current_pid_tgid() as u32 == tgid
    } else {
        // SAFETY: the offset comes from the tracepoint's format file.
        unsafe { ctx.read_at::<u8>(offset) }.unwrap_or(0) != 0
    };
    if group_dead {
        let _ = TRACED.remove(tgid);
        let _ = INHERITED.remove(tgid);
        crate::python::forget(tgid);
        crate::unwind::forget(tgid);
        crate::peak::drop_live(tgid);
        emit(event_kind::EXIT, tgid, 0);
    }
    forget_requests(tgid, group_dead);
    0
}

/// A thread that exits (or execs) inside a request leaves it open for good;
/// a process that does, its request numbering.
fn forget_requests(tgid: u32, whole_process: bool) {
    if !crate::request::enabled() {
        return;
    }
    crate::request::forget_thread(bpf_get_current_pid_tgid());
    if whole_process {
        crate::request::forget_process(tgid);
    }
}
