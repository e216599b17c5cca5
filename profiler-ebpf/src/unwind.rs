//! User stacks without frame pointers: a walk from the registers at the
//! probe, frame by frame, by the rules userspace turned each object's
//! .eh_frame into (`UNWIND_ROWS`), for the processes it described
//! (`UNWIND_PROCS`). A pc in no described mapping, or in an object without
//! rows, is stepped by its frame pointer, as the kernel's own walk does.
//!
//! Stacks are kept in `UNWOUND` by a 31-bit hash with `UNWOUND_STACK_BIT`
//! set, so one id space serves both kinds of stack.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::{RetProbeContext, TracePointContext},
};
use profiler_common::{
    Counter, DEFAULT_MAX_STACKS, DEFAULT_UNWIND_ROWS, MAX_PROCESSES, MAX_STACK_DEPTH,
    MAX_UNWIND_MAPPINGS, MAX_UNWOUND_ID, ProcessUnwind, UNKNOWN_STACK, UNWOUND_STACK_BIT,
    UnwindMapping, UnwindRow, UnwoundStack, cfa_rule, unwound_flags,
};

use crate::counters::count;

/// Sized by userspace at load time (`--unwind-rows`).
#[map]
static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(DEFAULT_UNWIND_ROWS, 0);

/// NB: not preallocated: 4 KiB a process.
#[map]
static UNWIND_PROCS: HashMap<u32, ProcessUnwind> =
    HashMap::with_max_entries(MAX_PROCESSES, BPF_F_NO_PREALLOC);

/// Sized by userspace at load time (`--max-stacks`); not preallocated: a
/// stack is 1 KiB.
#[map]
static UNWOUND: HashMap<u32, UnwoundStack> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);

/// Rules found lately, per CPU, by pc and the description they came from:
/// most frames return to a few addresses, and a frame's two binary
/// searches cost more than the rest of its step. An entry another program
/// tore (it preempted the writer) fails its check and is searched again.
const RULE_CACHE: usize = 256;

#[repr(C)]
#[derive(Clone, Copy)]
struct CachedRule {
    pc: u64,
    generation: u64,
    /// The row's bytes, or `FRAME_POINTER_STEP`.
    rule: u64,
    check: u64,
}

/// A rule cached for a pc in no object with rows.
const FRAME_POINTER_STEP: u64 = u64::MAX;

/// Stacks found in `UNWOUND` lately, per CPU, by id: an allocation site's
/// stack repeats, and its look-up costs about a frame's step. Safe to
/// trust because nothing removes a stack from `UNWOUND`; an entry another
/// program tore (one preempted this one on the CPU) fails its check and is
/// looked up again.
const KNOWN_STACKS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct KnownStack {
    /// The id the stack's hash gave (high half) and the one it is kept
    /// under (low half: the next, after a collision), in one word so that
    /// a tear never pairs one stack's id with another's check.
    ids: u64,
    check: u64,
}

/// The user stack is read a window at a time, not a word at a time: one
/// copy costs about what one word's read does.
const WINDOW_BYTES: u64 = 1024;
const WINDOW_WORDS: usize = 2 * WINDOW_BYTES as usize / 8;
/// How far below the word asked for a new window starts: Debian's
/// redis-server, 2.1 copies a walk starting 8 bytes below, 1.2 from 32,
/// 64 or 128 bytes below, 1.4 from 256.
const WINDOW_BELOW: u64 = 64;

/// The walk's registers, the stack being built, the window and the rule
/// cache: too big for the 512-byte BPF stack.
#[repr(C)]
struct Scratch {
    ip: u64,
    sp: u64,
    bp: u64,
    generation: u64,
    window_base: u64,
    window_len: u64,
    bounds: Bounds,
    stack: UnwoundStack,
    /// Twice the bytes read, so a length bounded by a mask fits.
    window: [u64; WINDOW_WORDS],
    rules: [CachedRule; RULE_CACHE],
    known: [KnownStack; KNOWN_STACKS],
}

#[map]
static UNWIND_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Rounds of the binary searches: enough for every mapping of a process,
/// and for 4M rows in one object.
const MAPPING_ROUNDS: usize = 8;
const ROW_ROUNDS: usize = 22;
/// Frames a rule may span; a larger CFA step is taken for a bad read.
const MAX_FRAME_BYTES: u64 = 1 << 16;

const STOP_ROW: UnwindRow = UnwindRow {
    pc: 0,
    cfa_offset: 0,
    cfa_rule: cfa_rule::STOP,
    rbp_offset: 0,
};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The user registers a walk starts from.
#[derive(Clone, Copy)]
pub struct UserRegs {
    ip: u64,
    sp: u64,
    bp: u64,
}

pub trait WithUserRegs {
    fn user_regs(&self) -> Option<UserRegs>;
}

impl WithUserRegs for RetProbeContext {
    fn user_regs(&self) -> Option<UserRegs> {
        // SAFETY: the context's registers are the probed task's user ones.
        let regs = unsafe { &*self.regs };
        Some(UserRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
        })
    }
}

/// Offsets in x86-64 `struct pt_regs`.
const PT_REGS_BP: usize = 4 * 8;
const PT_REGS_IP: usize = 16 * 8;
const PT_REGS_SP: usize = 19 * 8;

impl WithUserRegs for TracePointContext {
    /// At a system call: the registers the task entered the kernel with.
    fn user_regs(&self) -> Option<UserRegs> {
        // SAFETY: the current task and its saved user registers are valid
        // for the program's run; the reads are checked by the helper.
        unsafe {
            let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
            Some(UserRegs {
                ip: bpf_probe_read_kernel(regs.add(PT_REGS_IP) as *const u64).ok()?,
                sp: bpf_probe_read_kernel(regs.add(PT_REGS_SP) as *const u64).ok()?,
                bp: bpf_probe_read_kernel(regs.add(PT_REGS_BP) as *const u64).ok()?,
            })
        }
    }
}

/// A forked child maps what its parent did, at the same addresses.
pub fn inherit(parent: u32, child: u32) {
    // SAFETY: the value is only read, by the helper.
    if let Some(process) = unsafe { UNWIND_PROCS.get(parent) } {
        let _ = UNWIND_PROCS.insert(child, process, 0);
    }
}

/// Whether userspace described this process (its stacks are unwound).
pub fn is_described(tgid: u32) -> bool {
    // SAFETY: read-only look-up.
    unsafe { UNWIND_PROCS.get(tgid) }.is_some()
}

/// At exec or exit: the mappings described are gone.
pub fn forget(tgid: u32) {
    let _ = UNWIND_PROCS.remove(tgid);
}

/// The id of the current user stack walked by the rules (`UNKNOWN_STACK`
/// when it could not be recorded, counted), or None when userspace did not
/// describe this process: the kernel's frame-pointer walk stands.
pub fn stack_id(tgid: u32, ctx: &impl WithUserRegs) -> Option<u32> {
    let Some(regs) = ctx.user_regs() else {
        if !is_described(tgid) {
            return None;
        }
        count(Counter::StackErrors);
        return Some(UNKNOWN_STACK);
    };
    u32::try_from(memscope_unwind(tgid, regs.ip, regs.sp, regs.bp)).ok()
}

/// `stack_id`'s walk, from registers, or `NOT_DESCRIBED`.
///
/// NB: a global function, which the verifier checks once, with unknown
/// arguments, instead of once for each state its callers reach it in: the
/// walk is most of a program's instructions, and an allocation reaches it
/// from several places.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn memscope_unwind(tgid: u32, ip: u64, sp: u64, bp: u64) -> u64 {
    let Some(process) = UNWIND_PROCS.get_ptr(tgid) else {
        return NOT_DESCRIBED;
    };
    u64::from(
        walk(process, UserRegs { ip, sp, bp }).unwrap_or_else(|counter| {
            count(counter);
            UNKNOWN_STACK
        }),
    )
}

/// What `memscope_unwind` returns for a process userspace did not describe.
const NOT_DESCRIBED: u64 = u64::MAX;

fn walk(process: *const ProcessUnwind, regs: UserRegs) -> Result<u32, Counter> {
    let scratch = UNWIND_SCRATCH.get_ptr_mut(0).ok_or(Counter::StackErrors)?;
    // SAFETY: a per-CPU map value, valid for this program's run; programs
    // on one CPU do not run in parallel.
    unsafe {
        (*scratch).ip = regs.ip;
        (*scratch).sp = regs.sp;
        (*scratch).bp = regs.bp;
        (*scratch).generation = (*process).generation;
        (*scratch).stack.len = 0;
        (*scratch).stack.flags = 0;
        // NB: no window yet: the first read takes one where it is needed,
        // which is not at the stack pointer when the innermost frame is
        // large (locals of kilobytes), and a read costs more than its size.
        (*scratch).window_len = 0;
    }
    // NB: bpf_loop, not a loop: the verifier checks `step` once. Its
    // context is this stack slot, which holds the process's map value: a
    // pointer the verifier follows into the callback.
    let mut context = process;
    // SAFETY: `step` matches the callback's type; the context outlives it.
    unsafe {
        bpf_loop(
            (MAX_STACK_DEPTH + 1) as u32,
            step as *mut core::ffi::c_void,
            (&raw mut context).cast(),
            0,
        )
    };
    // SAFETY: as above; re-read after the loop, which changed it.
    let stack = unsafe { &mut (*core::ptr::read_volatile(&scratch)).stack };
    if stack.len == 0 {
        return Err(Counter::StackErrors);
    }
    let len = (stack.len as usize).min(MAX_STACK_DEPTH);
    let mut hash = FNV_OFFSET ^ u64::from(stack.flags);
    let mut check = FNV_OFFSET.rotate_left(1) ^ u64::from(stack.flags);
    for i in 0..MAX_STACK_DEPTH {
        if i >= len {
            break;
        }
        let frame = stack.frames[i & MAX_STACK_DEPTH];
        hash = (hash ^ frame).wrapping_mul(FNV_PRIME);
        check = (check ^ frame.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    stack.check = check;
    let id = (((hash ^ (hash >> 32)) as u32 & !UNWOUND_STACK_BIT) | UNWOUND_STACK_BIT)
        .min(MAX_UNWOUND_ID - 1);
    // SAFETY: as above.
    let known = unsafe { &mut (*core::ptr::read_volatile(&scratch)).known };
    let slot = &mut known[id as usize & (KNOWN_STACKS - 1)];
    let ids = slot.ids;
    if (ids >> 32) as u32 == id && slot.check == check {
        return Ok(ids as u32);
    }
    let kept = store(id, check, stack)?;
    *slot = KnownStack {
        ids: (u64::from(id) << 32) | u64::from(kept),
        check,
    };
    Ok(kept)
}

/// The id under which `UNWOUND` holds `stack`, adding it if need be.
fn store(id: u32, check: u64, stack: &UnwoundStack) -> Result<u32, Counter> {
    // A taken id with another stack in it: the next one is tried once.
    for id in [
        id,
        (id.wrapping_add(1) & !UNWOUND_STACK_BIT) | UNWOUND_STACK_BIT,
    ] {
        // SAFETY: the value is only compared.
        match unsafe { UNWOUND.get(id) } {
            Some(kept) if kept.check == check => return Ok(id),
            Some(_) => continue,
            None => {}
        }
        if UNWOUND.insert(id, stack, BPF_NOEXIST as u64).is_ok() {
            return Ok(id);
        }
        // SAFETY: as above: another CPU may have inserted it meanwhile.
        match unsafe { UNWOUND.get(id) } {
            Some(kept) if kept.check == check => return Ok(id),
            Some(_) => continue,
            None => return Err(Counter::UnwoundStacksFull),
        }
    }
    Err(Counter::StackCollisions)
}

fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user checks the address; a fault is an error.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Reads the user stack from `base` into the window, as far as the end of
/// its page (the next may be unmapped, and a fault costs more than the
/// reads saved) and at most `WINDOW_BYTES`. Returns whether it could.
fn read_window(scratch: &mut Scratch, base: u64) -> bool {
    let to_page_end = 4096 - (base & 4095);
    let len = if to_page_end < WINDOW_BYTES {
        to_page_end & !7
    } else {
        WINDOW_BYTES
    };
    // NB: the mask is for the verifier: the window holds twice `len`.
    let len = len & (2 * WINDOW_BYTES - 1);
    // SAFETY: the helper checks the user address and writes at most `len`
    // bytes, which the window holds.
    let read = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            scratch.window.as_mut_ptr().cast(),
            len as u32,
            base as *const core::ffi::c_void,
        )
    };
    scratch.window_base = base;
    scratch.window_len = if read == 0 { len } else { 0 };
    read == 0
}

/// The word at `addr` on the user stack, from the window; one outside it
/// moves the window there (a walk goes up the stack, so the next frames
/// are likely in it too). The window starts `WINDOW_BELOW` bytes below
/// (within the page): a frame's saved registers, rbp among them, are just
/// under its return address, the first word a step reads, and code
/// without frame pointers may save rbp after others.
fn read_stack(scratch: &mut Scratch, addr: u64) -> Option<u64> {
    let mut offset = addr.wrapping_sub(scratch.window_base);
    if offset >= scratch.window_len {
        let base = (addr.wrapping_sub(WINDOW_BELOW) & !7).max(addr & !4095);
        if !read_window(scratch, base) {
            return read_user(addr);
        }
        offset = addr.wrapping_sub(base);
    }
    if offset & 7 != 0 || offset >= scratch.window_len {
        return read_user(addr);
    }
    Some(scratch.window[(offset / 8) as usize & (WINDOW_WORDS - 1)])
}

fn rule_check(pc: u64, generation: u64, rule: u64) -> u64 {
    (pc ^ generation.rotate_left(32) ^ rule.rotate_left(17) ^ FNV_OFFSET)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The rule for `pc`: None for a frame-pointer step (no object with rows
/// there), STOP_ROW for a gap in an object with rows.
fn rule_for(scratch: &mut Scratch, process: &ProcessUnwind, pc: u64) -> Option<UnwindRow> {
    let generation = scratch.generation;
    let index = ((pc ^ (pc >> 8) ^ (pc >> 16)) as usize) & (RULE_CACHE - 1);
    let cached = scratch.rules[index];
    if cached.pc == pc
        && cached.generation == generation
        && cached.check == rule_check(pc, generation, cached.rule)
    {
        // SAFETY: 8 bytes of plain integers, any pattern valid.
        return (cached.rule != FRAME_POINTER_STEP)
            .then(|| unsafe { core::mem::transmute::<u64, UnwindRow>(cached.rule) });
    }
    let bounds = &raw mut scratch.bounds;
    let rule = match find_mapping(bounds, process, pc) {
        Some(mapping) if mapping.rows_len != 0 => {
            Some(find_row(bounds, &mapping, pc).unwrap_or(STOP_ROW))
        }
        _ => None,
    };
    // SAFETY: as above.
    let bits = rule.map_or(FRAME_POINTER_STEP, |row| unsafe {
        core::mem::transmute::<UnwindRow, u64>(row)
    });
    scratch.rules[index] = CachedRule {
        pc,
        generation,
        rule: bits,
        check: rule_check(pc, generation, bits),
    };
    rule
}

/// One frame of the walk; non-zero ends it.
extern "C" fn step(_index: u64, context: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = UNWIND_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: a per-CPU map value, valid for this program's run; the
    // context is `walk`'s slot holding the process's map value.
    let (scratch, process) =
        unsafe { (&mut *scratch, &**(context as *const *const ProcessUnwind)) };
    let len = scratch.stack.len as usize;
    if len >= MAX_STACK_DEPTH {
        scratch.stack.flags |= unwound_flags::TRUNCATED;
        return 1;
    }
    let ip = scratch.ip;
    scratch.stack.frames[len & MAX_STACK_DEPTH] = ip;
    scratch.stack.len += 1;
    let (sp, bp) = (scratch.sp, scratch.bp);
    // Every pc past the first is a return address, and the first is one
    // too (a return probe's) or just past a syscall: its call is before it.
    let pc = ip.wrapping_sub(1);
    // An object with rows but none for this pc: a gap, cut as STOP is.
    let rule = rule_for(scratch, process, pc);
    let (cfa, saved_bp) = match rule {
        None => {
            // The frame-pointer step: the caller's rbp at [rbp], the return
            // address above it.
            if bp == 0 {
                return 1;
            }
            (bp.wrapping_add(16), Some(bp))
        }
        Some(row) => {
            let offset = u64::from(row.cfa_offset);
            let cfa = match row.cfa_rule {
                cfa_rule::RSP => sp.wrapping_add(offset),
                cfa_rule::RBP => bp.wrapping_add(offset),
                cfa_rule::PLT => sp.wrapping_add(if ip & 15 >= offset { 16 } else { 8 }),
                cfa_rule::END => {
                    scratch.stack.flags |= unwound_flags::COMPLETE;
                    return 1;
                }
                _ => {
                    scratch.stack.flags |= unwound_flags::CUT;
                    return 1;
                }
            };
            let saved_bp = (row.rbp_offset != 0)
                .then(|| cfa.wrapping_add((i64::from(row.rbp_offset) * 8) as u64));
            (cfa, saved_bp)
        }
    };
    // The stack grows down: a caller's frame is above. No progress, or a
    // leap, means the registers were not what the rule says.
    if cfa <= sp || (rule.is_some() && cfa - sp > MAX_FRAME_BYTES) {
        scratch.stack.flags |= unwound_flags::CUT;
        return 1;
    }
    let Some(return_address) = read_stack(scratch, cfa - 8) else {
        scratch.stack.flags |= unwound_flags::CUT;
        return 1;
    };
    let bp = match saved_bp {
        Some(slot) => match read_stack(scratch, slot) {
            Some(bp) => bp,
            None => {
                scratch.stack.flags |= unwound_flags::CUT;
                return 1;
            }
        },
        None => bp,
    };
    if return_address == 0 {
        return 1;
    }
    scratch.ip = return_address;
    scratch.sp = cfa;
    scratch.bp = bp;
    0
}

/// A binary search's bounds, kept in the scratch map value between rounds.
///
/// NB: for the verifier. Bounds held in registers are tracked precisely
/// (a map key's value is), so the two outcomes of each round stay distinct
/// states and a 22-round search becomes up to 2^22 paths: Linux 6.18.44
/// refused the program at a million instructions. A map value's contents
/// are not tracked, so bounds read back from it are unknown numbers, the
/// two outcomes of a round are one state again and the search verifies in
/// linear time.
#[repr(C)]
struct Bounds {
    low: u32,
    high: u32,
}

impl Bounds {
    fn set(this: *mut Bounds, low: u32, high: u32) {
        // SAFETY: the caller's pointer is into the scratch map value.
        unsafe {
            write_volatile(&raw mut (*this).low, low);
            write_volatile(&raw mut (*this).high, high);
        }
    }

    fn get(this: *const Bounds) -> (u32, u32) {
        // SAFETY: as above.
        unsafe {
            (
                read_volatile(&raw const (*this).low),
                read_volatile(&raw const (*this).high),
            )
        }
    }
}

/// The mapping holding `pc`: the last whose start is at or below it.
fn find_mapping(bounds: *mut Bounds, process: &ProcessUnwind, pc: u64) -> Option<UnwindMapping> {
    Bounds::set(bounds, 0, process.len.min(MAX_UNWIND_MAPPINGS as u32));
    for _ in 0..MAPPING_ROUNDS {
        let (low, high) = Bounds::get(bounds);
        if low >= high {
            break;
        }
        let middle = (low + high) / 2;
        if process.mappings[middle as usize & (MAX_UNWIND_MAPPINGS - 1)].start <= pc {
            Bounds::set(bounds, middle + 1, high);
        } else {
            Bounds::set(bounds, low, middle);
        }
    }
    let (low, _) = Bounds::get(bounds);
    if low == 0 {
        return None;
    }
    let mapping = process.mappings[(low as usize - 1) & (MAX_UNWIND_MAPPINGS - 1)];
    (pc < mapping.end).then_some(mapping)
}

/// The row covering `pc` in the mapping's object: the last at or below it.
fn find_row(bounds: *mut Bounds, mapping: &UnwindMapping, pc: u64) -> Option<UnwindRow> {
    let relative = pc.wrapping_sub(mapping.bias);
    if relative > u64::from(u32::MAX) {
        return None;
    }
    let relative = relative as u32;
    Bounds::set(bounds, 0, mapping.rows_len);
    for _ in 0..ROW_ROUNDS {
        let (low, high) = Bounds::get(bounds);
        if low >= high {
            break;
        }
        let middle = low + (high - low) / 2;
        let row = UNWIND_ROWS.get(mapping.rows_start.wrapping_add(middle))?;
        if row.pc <= relative {
            Bounds::set(bounds, middle + 1, high);
        } else {
            Bounds::set(bounds, low, middle);
        }
    }
    let (low, _) = Bounds::get(bounds);
    if low == 0 {
        return None;
    }
    UNWIND_ROWS
        .get(mapping.rows_start.wrapping_add(low - 1))
        .copied()
}
