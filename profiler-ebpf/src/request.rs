//! Requests (`--request-fn`): one call of the handler on one thread, from
//! its entry to its return. Allocations made inside a request are tagged
//! with its id; its live bytes move with its blocks, whichever thread frees
//! them. At its close they are its "retained" bytes, and when `keep_after`
//! more requests of its process have closed, its "kept" bytes. Both go to
//! userspace on a ring; nothing per allocation does.
//!
//! `open` and `close` do not care what opened a request: a native handler's
//! entry probe (`native_enter`), or in CPython an allocation whose frame
//! walk finds the handler's frame on the thread (`on_python_frame`).

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, RingBuf},
};
use profiler_common::{
    Counter, MAX_KEEP_AFTER, MAX_PROCESSES, MAX_REQUEST_THREADS, MAX_REQUESTS,
    REQUEST_EVENTS_BYTES, RequestRecord, ThreadRequest, config, request_event, request_flags,
};

use crate::{counters::count, live::value_or_default, peak::fetch_add};

#[map]
static REQUESTS: HashMap<u64, RequestRecord> = HashMap::with_max_entries(MAX_REQUESTS, 0);

#[map]
static REQUEST_THREADS: HashMap<u64, ThreadRequest> =
    HashMap::with_max_entries(MAX_REQUEST_THREADS, 0);

#[map]
static REQUEST_PROCS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_PROCESSES, 0);

#[map]
static REQUEST_SLOTS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_REQUESTS, 0);

#[map]
static REQUEST_EVENTS: RingBuf = RingBuf::with_byte_size(REQUEST_EVENTS_BYTES, 0);

/// The last id given; ids are unique over the session (forks included).
#[map]
static REQUEST_IDS: Array<u64> = Array::with_max_entries(1, 0);

/// Whether requests are tracked at all (`--request-fn`).
pub fn enabled() -> bool {
    crate::processes::config(config::REQUESTS) != 0
}

fn keep_after() -> u64 {
    // NB: min and max, not clamp, whose check for a bad range would panic.
    (crate::processes::config(config::KEEP_AFTER) as u64)
        .min(MAX_KEEP_AFTER as u64)
        .max(1)
}

fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Opens a request on the current thread; its id, or zero when there was
/// no room (counted).
fn open(flags: u32) -> u64 {
    let Some(last) = REQUEST_IDS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: a map value, valid for this program's run.
    let id = unsafe { fetch_add(last, 1, Counter::RequestsFull) }.wrapping_add(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let record = RequestRecord {
        id,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        start_ns: now(),
        flags,
        ..RequestRecord::default()
    };
    if REQUESTS.insert(id, record, BPF_NOEXIST as u64).is_err() {
        count(Counter::RequestsFull);
        return 0;
    }
    id
}

/// Bytes on the ring past which a record wakes userspace. Below, nothing
/// does: a wakeup per record would cost each request several
/// microseconds of the reader's context switches, and userspace reads the
/// ring on its own tick anyway (userspace `REQUEST_POLL`).
const WAKE_AT_BYTES: u64 = REQUEST_EVENTS_BYTES as u64 / 4;

fn emit(record: &RequestRecord, kind: u32) {
    let event = RequestRecord { kind, ..*record };
    let flags = if REQUEST_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKE_AT_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if REQUEST_EVENTS
        .output::<RequestRecord>(&event, u64::from(flags))
        .is_err()
    {
        count(Counter::RequestEventsLost);
    }
}

fn live_now(record: &RequestRecord) -> u64 {
    record.live_bytes.max(0) as u64
}

/// Closes request `id` of process `tgid`: its retained bytes are what it
/// holds now; the request that closed `keep_after` closes ago gets its
/// kept bytes, and is done.
fn close(tgid: u32, id: u64) {
    let Some(record) = REQUESTS.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: a map value; only its own thread closes a request, frees on
    // other threads move `live_bytes` alone.
    let record = unsafe {
        (*record).end_ns = now();
        (*record).retained_bytes = live_now(&*record);
        *record
    };
    emit(&record, request_event::CLOSED);
    let Some(closed) = value_or_default(&REQUEST_PROCS, &tgid, Counter::RequestsFull) else {
        return;
    };
    // SAFETY: a map value; other threads of the process close too.
    let number = unsafe { fetch_add(closed, 1, Counter::RequestsFull) };
    let slot = (u64::from(tgid) << 32) | (number % keep_after());
    let Some(last) = value_or_default(&REQUEST_SLOTS, &slot, Counter::RequestsFull) else {
        return;
    };
    // SAFETY: a map value, exchanged atomically.
    let before = unsafe { atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(last, id) };
    if before != 0 {
        kept(before);
    }
}

/// `keep_after` requests closed after request `id`: what it holds now is
/// what it kept.
fn kept(id: u64) {
    let Some(record) = REQUESTS.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: a map value, copied out before it is removed.
    let record = unsafe {
        (*record).kept_bytes = live_now(&*record);
        *record
    };
    emit(&record, request_event::KEPT);
    let _ = REQUESTS.remove(id);
}

/// Entry of the native handler: the outermost call on the thread opens a
/// request, nested ones only count their depth.
pub fn native_enter() {
    let thread = bpf_get_current_pid_tgid();
    if let Some(open) = REQUEST_THREADS.get_ptr_mut(thread) {
        // SAFETY: the thread's own entry.
        unsafe {
            if (*open).depth > 0 {
                (*open).depth += 1;
                return;
            }
        }
    }
    let request = ThreadRequest {
        id: open(0),
        frame: 0,
        depth: 1,
        _pad: 0,
    };
    // Even without an id: its return must find the depth.
    let _ = REQUEST_THREADS.insert(thread, request, 0);
}

/// Return of the native handler: the outermost closes the request. A
/// return whose entry came before attach finds nothing open.
pub fn native_return() {
    let thread = bpf_get_current_pid_tgid();
    let Some(open) = REQUEST_THREADS.get_ptr_mut(thread) else {
        return;
    };
    // SAFETY: the thread's own entry.
    let id = unsafe {
        if (*open).depth == 0 {
            return;
        }
        (*open).depth -= 1;
        if (*open).depth > 0 {
            return;
        }
        let id = (*open).id;
        (*open).id = 0;
        id
    };
    if id != 0 {
        close((thread >> 32) as u32, id);
    }
}

/// The request an allocation of the current thread belongs to, given what
/// its Python frame walk found: `None` when the process has no Python
/// handler, else the handler's frame (zero when it is not on the stack).
///
/// A Python request opens at the first allocation with the handler's frame
/// on the stack and closes at the first without it (or with another
/// activation's frame). A thread first seen inside the handler may have
/// entered it before memscope knew the handler: that request is `PARTIAL`.
pub fn current(python_frame: Option<u64>) -> u64 {
    let thread = bpf_get_current_pid_tgid();
    let open = REQUEST_THREADS.get_ptr_mut(thread);
    let Some(frame) = python_frame else {
        // SAFETY: the thread's own entry.
        return open.map_or(0, |open| unsafe { (*open).id });
    };
    let Some(open) = open else {
        let request = ThreadRequest {
            id: if frame == 0 {
                0
            } else {
                self::open(request_flags::PARTIAL)
            },
            frame,
            depth: 0,
            _pad: 0,
        };
        let _ = REQUEST_THREADS.insert(thread, request, 0);
        return request.id;
    };
    // SAFETY: the thread's own entry.
    unsafe {
        // A native handler's request covers what it runs.
        if (*open).depth > 0 || ((*open).id != 0 && (*open).frame == frame) {
            return (*open).id;
        }
        if (*open).id != 0 {
            close((thread >> 32) as u32, (*open).id);
        }
        (*open).id = if frame == 0 { 0 } else { self::open(0) };
        (*open).frame = frame;
        (*open).id
    }
}

/// A new block of request `id`.
pub fn add_block(id: u64, size: u64) {
    let Some(record) = REQUESTS.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: a map value; frees on other threads add to it too.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*record).alloc_count, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*record).alloc_bytes, size);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*record).live_bytes as *mut u64,
            size,
        );
    }
}

/// `size` bytes of request `id`'s blocks were freed.
pub fn drop_bytes(id: u64, size: u64) {
    if let Some(record) = REQUESTS.get_ptr_mut(id) {
        // SAFETY: as in `add_block`.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*record).live_bytes as *mut u64,
                size.wrapping_neg(),
            );
        }
    }
}

/// At a thread's exit (or exec): its open request, if any, never closes
/// and goes; its blocks stay live, tagged, in the sites that keep.
pub fn forget_thread(thread: u64) {
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(open) = unsafe { REQUEST_THREADS.get(thread) }.copied()
        && open.id != 0
    {
        let _ = REQUESTS.remove(open.id);
    }
    let _ = REQUEST_THREADS.remove(thread);
}

/// At a process's exec or exit: its close count and slots go, and the
/// requests still waiting for their kept figure, which none will now
/// give (userspace has their close).
pub fn forget_process(tgid: u32) {
    if REQUEST_PROCS.remove(tgid).is_err() {
        return;
    }
    for slot in 0..MAX_KEEP_AFTER as u64 {
        let key = (u64::from(tgid) << 32) | slot;
        // SAFETY: the value is copied out before the entry is removed.
        if let Some(id) = unsafe { REQUEST_SLOTS.get(key) }.copied() {
            let _ = REQUESTS.remove(id);
            let _ = REQUEST_SLOTS.remove(key);
        }
    }
}
