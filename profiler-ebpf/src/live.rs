//! The live-allocation table and the per-stack totals behind it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, StackTrace},
    programs::tracing::StackIdContext,
};
use profiler_common::{
    Counter, DEFAULT_MAX_LIVE, DEFAULT_MAX_STACKS, INHERITANCE_DEPTH, InFlightCall, LiveAllocation,
    LiveKey, STACK_TOTALS_PER_STACK, StackKey, StackTotals, UNKNOWN_STACK, UNSAMPLED_STACK,
    alloc_kind, site_class,
};

use crate::{counters::count, unwind::WithUserRegs};

const EEXIST: i32 = 17;

// Capacities are defaults: userspace resizes LIVE and STACKS at load time
// (`--max-live`, `--max-stacks`). LIVE is not preallocated: its memory
// follows the live set (1-3% more per malloc/free pair than a preallocated
// map, measured; 96 MiB less reserved at the defaults).
#[map]
static LIVE: HashMap<LiveKey, LiveAllocation> =
    HashMap::with_max_entries(DEFAULT_MAX_LIVE, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static STACK_TOTALS: HashMap<StackKey, StackTotals> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS * STACK_TOTALS_PER_STACK, 0);

/// NB: no BPF_F_REUSE_STACKID: it silently merges different stacks that hash
/// alike; a collision is counted as a stack error instead.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(DEFAULT_MAX_STACKS, 0);

fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// Records a new block. Called at the return probe, where the stack is right:
/// at a function's first instruction the frame-pointer walk misses the
/// direct caller, whose return address is not behind the frame pointer yet.
/// `caller` is that of a system call's wrapper, for the frame-pointer walk;
/// the unwinder finds it itself. The block is stamped with the call's entry
/// time: a clock read less a pair, and microseconds from its return.
pub fn record_alloc(
    ctx: &(impl StackIdContext + WithUserRegs),
    addr: u64,
    call: &InFlightCall,
    kind: u32,
    caller: u64,
) {
    let size = call.size;
    let tgid = tgid();
    // Mappings are few and large: always walked.
    let walked = kind == alloc_kind::MMAP || crate::sampling::walks_stack(size);
    let (stack_id, caller) = if !walked {
        (UNSAMPLED_STACK, 0)
    } else {
        match crate::unwind::stack_id(tgid, ctx) {
            Some(id) => (id, 0),
            None => (frame_pointer_stack(ctx), caller),
        }
    };
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    let requests = crate::request::enabled();
    // NB: a request is found by its frame on the Python stack, so with
    // requests on the walk is made even for a block not sampled (userspace
    // counts every unsampled block alike, whatever its Python stack).
    let (python_stack, python_frame) = if walked || requests {
        crate::python::current_stack(tgid, requests)
    } else {
        (0, None)
    };
    let request = if requests {
        crate::request::current(python_frame)
    } else {
        0
    };
    let block = LiveAllocation {
        size,
        timestamp_ns: call.timestamp_ns,
        stack_id,
        kind,
        caller,
        python_stack,
        request,
    };
    if !(block.is_heap() && put_front(&key, &block)) && !put_hashed(&key, &block) {
        count(Counter::LiveMapFull);
        return;
    }
    add_totals(block.stack_key(tgid), 1, size, 0, 0);
    if request != 0 {
        crate::request::add_block(request, size);
    }
}

/// A malloc-family block into the front table, if its bucket has room.
/// An entry of the same address still live, in either table, lost its
/// free: it is closed first, or its bytes would stay live forever.
/// NB: not inlined: its copies of blocks would otherwise sit in the
/// frame of `record_alloc`, under the unwinder's, past the verifier's 512
/// bytes of stack.
#[inline(never)]
fn put_front(key: &LiveKey, block: &LiveAllocation) -> bool {
    let Some(bucket) = crate::front::bucket(key.tgid, key.addr) else {
        return false;
    };
    if let Some(stale) = crate::front::take(bucket, key.tgid, key.addr) {
        close(key.tgid, &stale);
    }
    if !crate::front::put(bucket, key.tgid, key.addr, block) {
        return false;
    }
    if crate::front::any_hashed() {
        release_hashed(key);
    }
    true
}

/// A block into `LIVE`; false when it is full. NB: not inlined, as
/// `put_front`.
#[inline(never)]
fn put_hashed(key: &LiveKey, block: &LiveAllocation) -> bool {
    if LIVE.insert(key, block, BPF_NOEXIST as u64).is_err() {
        // The address is live already: its free went unseen (see
        // `put_front`).
        if !release_hashed(key) || LIVE.insert(key, block, BPF_NOEXIST as u64).is_err() {
            return false;
        }
    }
    if block.is_heap() {
        crate::front::count_hashed(1);
    }
    true
}

/// The kernel's frame-pointer walk of the user stack.
fn frame_pointer_stack(ctx: &impl StackIdContext) -> u32 {
    match ctx.get_stackid(&STACKS, BPF_F_USER_STACK as u64) {
        Ok(id) => id as u32,
        Err(error) => {
            count(if error == -EEXIST {
                Counter::StackCollisions
            } else {
                Counter::StackErrors
            });
            UNKNOWN_STACK
        }
    }
}

/// A live mapping (or a malloc-family block whose bucket was full) of this
/// process, if `addr` starts one: mappings are never in the front table.
pub fn live_block(addr: u64) -> Option<LiveAllocation> {
    let key = LiveKey {
        tgid: tgid(),
        _pad: 0,
        addr,
    };
    // SAFETY: the value is copied out.
    unsafe { LIVE.get(key) }.copied()
}

/// Removes `len` bytes from the start of the mapped block at `addr`: the
/// rest stays live at `addr + len` under the same stack.
pub fn shrink_mapping_front(addr: u64, len: u64) {
    let tgid = tgid();
    let key = LiveKey {
        tgid,
        _pad: 0,
        addr,
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(block) = (unsafe { LIVE.get(key) }).copied() else {
        return;
    };
    if len >= block.size {
        release_hashed(&key);
        return;
    }
    if LIVE.remove(key).is_err() {
        return;
    }
    let rest = LiveAllocation {
        size: block.size - len,
        ..block
    };
    let rest_key = LiveKey {
        tgid,
        _pad: 0,
        addr: addr + len,
    };
    if LIVE.insert(rest_key, rest, 0).is_err() {
        count(Counter::LiveMapFull);
        add_totals(block.stack_key(tgid), 0, 0, 1, block.size);
        drop_request_bytes(&block, block.size);
        return;
    }
    drop_request_bytes(&block, len);
    // Bytes are freed; the mapping (one allocation) lives on.
    add_totals(block.stack_key(tgid), 0, 0, 0, len);
}

/// Records free(addr) in the calling process.
pub fn record_free(addr: u64) {
    end_block(addr, release);
}

/// Records the end of the mapping at `addr` (mremap moved it): mappings
/// are only in `LIVE`, and a heap block at the same address in the front
/// table is not this.
pub fn record_unmap(addr: u64) {
    end_block(addr, release_hashed);
}

/// Ends the calling process's block at `addr`: its own (by `release_own`),
/// else one it inherited, else an unknown free.
#[inline(always)]
fn end_block(addr: u64, release_own: impl Fn(&LiveKey) -> bool) {
    let key = LiveKey {
        tgid: tgid(),
        _pad: 0,
        addr,
    };
    if !release_own(&key) && !release_inherited(&key) {
        count(Counter::UnknownFrees);
    }
}

/// With `--follow image` a forked child has no copy of its parent's live
/// set: a free of a block it inherited is found in its parent's (or an
/// earlier ancestor's) live set as it was at the fork, and counted in the
/// child as a block it had and freed. The ancestor's own block stays live:
/// after a fork each process holds its copy.
#[inline(never)]
fn release_inherited(key: &LiveKey) -> bool {
    let mut child = key.tgid;
    let mut before = u64::MAX;
    for _ in 0..INHERITANCE_DEPTH {
        let Some(inheritance) = crate::processes::inheritance(child) else {
            return false;
        };
        before = before.min(inheritance.fork_ns);
        let ancestor = LiveKey {
            tgid: inheritance.parent,
            ..*key
        };
        // SAFETY: the value is copied out.
        let block = crate::front::get(ancestor.tgid, ancestor.addr)
            .or_else(|| unsafe { LIVE.get(ancestor) }.copied());
        if let Some(block) = block
            && block.timestamp_ns <= before
        {
            add_totals(block.stack_key(key.tgid), 1, block.size, 1, block.size);
            return true;
        }
        child = inheritance.parent;
    }
    false
}

/// Removes a live block and moves its bytes to its stack's freed totals.
/// Returns false when the block is not live.
fn release(key: &LiveKey) -> bool {
    release_front(key) || release_hashed(key)
}

/// `release` of a block in the front table. NB: not inlined, nor are
/// `release_hashed` and `release_inherited`: their copies of a block in
/// one frame, under the totals' calls, would pass the verifier's 512 bytes
/// of stack.
#[inline(never)]
fn release_front(key: &LiveKey) -> bool {
    let Some(block) = crate::front::bucket(key.tgid, key.addr)
        .and_then(|bucket| crate::front::take(bucket, key.tgid, key.addr))
    else {
        return false;
    };
    close(key.tgid, &block);
    true
}

/// `release` of a block in `LIVE`.
#[inline(never)]
fn release_hashed(key: &LiveKey) -> bool {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(block) = (unsafe { LIVE.get(key) }).copied() else {
        return false;
    };
    // Two threads freeing the same block race here; only the one whose
    // remove succeeds counts it.
    if LIVE.remove(key).is_err() {
        return false;
    }
    if block.is_heap() {
        crate::front::count_hashed(-1);
    }
    close(key.tgid, &block);
    true
}

/// A block taken out of the live set: its bytes move to its stack's frees.
fn close(tgid: u32, block: &LiveAllocation) {
    add_totals(block.stack_key(tgid), 0, 0, 1, block.size);
    drop_request_bytes(block, block.size);
}

fn drop_request_bytes(block: &LiveAllocation, size: u64) {
    if block.request != 0 {
        crate::request::drop_bytes(block.request, size);
    }
}

/// The value at `key`, inserted as its default when absent; None (counted
/// as `full`) when the map has no room. A racing insert of the same key is
/// fine: both callers then update the one entry, atomically.
pub fn value_or_default<K, V: Default>(
    map: &HashMap<K, V>,
    key: &K,
    full: Counter,
) -> Option<*mut V> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some(value);
    }
    let _ = map.insert(key, V::default(), BPF_NOEXIST as u64);
    let value = map.get_ptr_mut(key);
    if value.is_none() {
        count(full);
    }
    value
}

fn add_totals(key: StackKey, alloc_count: u64, alloc_bytes: u64, free_count: u64, free_bytes: u64) {
    if key.class == site_class::MALLOC && alloc_bytes != free_bytes {
        crate::peak::add_live(key.tgid, alloc_bytes as i64 - free_bytes as i64);
    }
    let Some(totals) = value_or_default(&STACK_TOTALS, &key, Counter::TotalsMapFull) else {
        return;
    };
    // SAFETY: the pointer is to a map value, valid for this program's run;
    // other CPUs add to the same value, hence atomic adds (the BPF target
    // has no compare-and-swap, so `AtomicU64::fetch_add` is not offered).
    unsafe {
        if alloc_count != 0 || alloc_bytes != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*totals).alloc_count,
                alloc_count,
            );
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*totals).alloc_bytes,
                alloc_bytes,
            );
        }
        if free_count != 0 || free_bytes != 0 {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*totals).free_count,
                free_count,
            );
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*totals).free_bytes,
                free_bytes,
            );
        }
    }
}
