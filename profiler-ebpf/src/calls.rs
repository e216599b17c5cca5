//! Allocator calls in flight: what an entry probe saves for its return, one
//! call per thread (the outermost; see `enter`).
//!
//! Each thread's call is in the slot of its tid modulo `CALL_SLOTS_LEN`, an
//! array element reached without hashing or locking: a hash map's insert,
//! look-up and delete at each call cost about 8% of a malloc/free pair. A
//! slot is claimed by a compare-and-swap of its owner from 0 and released
//! by its owner alone; a thread that finds its slot held by another (tids
//! equal modulo the slot count, both in a call) uses `IN_FLIGHT` instead,
//! which no look-up visits while it is empty.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap},
};
use profiler_common::{
    CALL_SLOTS_LEN, Counter, InFlightCall, MAX_HASHED_CALLS, STALE_CALL_NS, alloc_kind,
};

use crate::counters::count;

/// A thread's call: `owner` is its pid_tgid, 0 when the slot is free.
#[repr(C)]
struct CallSlot {
    owner: u64,
    call: InFlightCall,
}

#[map]
static CALL_SLOTS: Array<CallSlot> = Array::with_max_entries(CALL_SLOTS_LEN, 0);

/// Calls of threads whose slot another thread holds, by pid_tgid.
#[map]
static IN_FLIGHT: HashMap<u64, InFlightCall> = HashMap::with_max_entries(MAX_HASHED_CALLS, 0);

/// How many calls `IN_FLIGHT` holds. NB: exact, since only a thread itself
/// adds or removes its own entry, and its programs never run at once.
#[map]
static HASHED_CALLS: Array<u64> = Array::with_max_entries(1, 0);

/// Where a thread's call is.
#[derive(Clone, Copy)]
enum Place {
    Slot(*mut CallSlot),
    Hashed,
}

fn slot_of(id: u64) -> Option<*mut CallSlot> {
    CALL_SLOTS.get_ptr_mut(id as u32 & (CALL_SLOTS_LEN - 1))
}

fn hashed_calls() -> *mut u64 {
    HASHED_CALLS.get_ptr_mut(0).unwrap_or(core::ptr::null_mut())
}

/// The thread's call in flight, and where it is.
fn find(id: u64) -> Option<(Place, InFlightCall)> {
    // SAFETY: a map value; only its owner writes the call, so the copy is
    // whole once the owner is this thread.
    unsafe {
        // NB: no slot when userspace made the array shorter (tests of the
        // hashed path, `--call-slots`).
        if let Some(slot) = slot_of(id)
            && read_volatile(&raw const (*slot).owner) == id
        {
            return Some((Place::Slot(slot), read_volatile(&raw const (*slot).call)));
        }
        let hashed = hashed_calls();
        if hashed.is_null() || read_volatile(hashed) == 0 {
            return None;
        }
        IN_FLIGHT.get(id).copied().map(|call| (Place::Hashed, call))
    }
}

/// Saves a call for a thread that has none in flight.
fn put(id: u64, call: InFlightCall) {
    if let Some(slot) = slot_of(id) {
        // SAFETY: a map value; other CPUs claim it with the same atomics.
        unsafe {
            let (_, claimed) = atomic_cxchg::<
                u64,
                { AtomicOrdering::Relaxed },
                { AtomicOrdering::Relaxed },
            >(&raw mut (*slot).owner, 0, id);
            if claimed {
                write_volatile(&raw mut (*slot).call, call);
                return;
            }
        }
    }
    let hashed = hashed_calls();
    if hashed.is_null() || IN_FLIGHT.insert(id, call, BPF_NOEXIST as u64).is_err() {
        count(Counter::InFlightFull);
        return;
    }
    // SAFETY: a map value, added to atomically by every thread.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hashed, 1) };
}

/// Writes over the thread's call where it is.
fn replace(place: Place, id: u64, call: InFlightCall) {
    match place {
        // SAFETY: the thread's own slot.
        Place::Slot(slot) => unsafe { write_volatile(&raw mut (*slot).call, call) },
        Place::Hashed => {
            let _ = IN_FLIGHT.insert(id, call, 0);
        }
    }
}

/// Ends the thread's call. NB: the call was copied out before (`find`):
/// once the owner is 0, another thread may claim the slot.
fn remove(place: Place, id: u64) {
    match place {
        // SAFETY: the thread's own slot; the volatile store comes after
        // the volatile copy.
        Place::Slot(slot) => unsafe { write_volatile(&raw mut (*slot).owner, 0) },
        Place::Hashed => {
            let hashed = hashed_calls();
            if IN_FLIGHT.remove(id).is_ok() && !hashed.is_null() {
                // SAFETY: as in `put`.
                unsafe {
                    atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(hashed, u64::MAX);
                }
            }
        }
    }
}

/// Saves a call's arguments. glibc's realloc calls malloc and free itself
/// (realloc(NULL, n), realloc(p, 0)): the outer call owns the thread's slot,
/// and inner calls are left to it, or they would be counted twice.
pub fn enter(size: u64, ptr: u64, kind: u32) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let call = InFlightCall {
        size,
        ptr,
        timestamp_ns: now,
        kind,
        _pad: 0,
    };
    let id = bpf_get_current_pid_tgid();
    let Some((place, outer)) = find(id) else {
        put(id, call);
        return;
    };
    // A mark left by PyObject_Free is no call (see `mark_python_free`).
    if outer.kind == alloc_kind::PY_FREE {
        replace(place, id, call);
        return;
    }
    // The same function cannot be in flight twice on one thread, and no
    // allocator call lasts a second: such an entry lost its return and would
    // block the thread's slot for good.
    if outer.kind == kind || now.wrapping_sub(outer.timestamp_ns) > STALE_CALL_NS {
        count(Counter::MissedReturns);
        replace(place, id, call);
    }
}

/// Takes the thread's saved call if it belongs to the function returning now;
/// an inner call nested in realloc finds its outer call and leaves it.
pub fn take_call(kind: u32) -> Option<InFlightCall> {
    let call = take_call_if_any(kind);
    if call.is_none() && !in_allocator_call() {
        count(Counter::MissedReturns);
    }
    call
}

/// As `take_call`, for exits that often have no entry (system calls the
/// entry program chose not to track).
pub fn take_call_if_any(kind: u32) -> Option<InFlightCall> {
    let id = bpf_get_current_pid_tgid();
    let (place, call) = find(id)?;
    if call.kind != kind {
        return None;
    }
    remove(place, id);
    Some(call)
}

/// Drops the current thread's call in flight, if any (at its exit).
pub fn forget_call() {
    let id = bpf_get_current_pid_tgid();
    if let Some((place, _)) = find(id) {
        remove(place, id);
    }
}

/// Whether this thread is inside a (live, not stale) allocator call.
pub fn in_allocator_call() -> bool {
    find(bpf_get_current_pid_tgid()).is_some_and(|(_, call)| is_live_call(&call))
}

fn is_live_call(call: &InFlightCall) -> bool {
    // SAFETY: no preconditions.
    call.kind != alloc_kind::PY_FREE
        && unsafe { bpf_ktime_get_ns() }.wrapping_sub(call.timestamp_ns) <= STALE_CALL_NS
}

/// PyObject_Free has no return probe: its first instruction would be
/// single-stepped (10 µs a call here). It frees its block at the entry and
/// leaves this mark, since pymalloc hands a block it does not serve (over
/// 512 bytes) to libc's free, which must not count it again. The next
/// allocator call on the thread writes over the mark; the next free takes
/// it (see `free_is_counted`). Called outside any live call: what the
/// thread has in flight is an older mark, or a call that lost its return.
pub fn mark_python_free(ptr: u64) {
    let mark = InFlightCall {
        size: 0,
        ptr,
        // SAFETY: no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        kind: alloc_kind::PY_FREE,
        _pad: 0,
    };
    let id = bpf_get_current_pid_tgid();
    match find(id) {
        Some((place, _)) => replace(place, id, mark),
        None => put(id, mark),
    }
}

/// Whether libc's free(ptr) is the program's own: not made inside another
/// allocator call (realloc's), nor by PyObject_Free for the block it just
/// freed. One look-up, as `in_allocator_call`.
pub fn free_is_counted(ptr: u64) -> bool {
    let id = bpf_get_current_pid_tgid();
    match find(id) {
        None => true,
        Some((place, mark)) if mark.kind == alloc_kind::PY_FREE => {
            remove(place, id);
            mark.ptr != ptr
        }
        Some((_, call)) => !is_live_call(&call),
    }
}
