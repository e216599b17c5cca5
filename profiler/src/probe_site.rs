//! Where to put an entry probe inside a function.
//!
//! The kernel emulates a few x86 instructions at a uprobe (push, relative
//! jmp/jcc/call, nop) and single-steps every other one out of line, which in
//! a VM costs over 10x more (TOOLCHAIN.md: free's entry `test %rdi,%rdi`
//! 9900 ns per call, free+3 `je` 800 ns). So an entry-only probe goes on the
//! first emulated instruction of the straight-line prologue, as long as
//! nothing before it writes an argument register the entry program reads;
//! else it stays at the entry.
//! A return probe can move the same way while the return address is still
//! at the stack pointer (nothing before it moved rsp or wrote the stack):
//! jemalloc's malloc starts with `cmp $0x1000,%rdi; ja`, and probing the
//! `ja` instead of the `cmp` is what keeps a jemalloc target fast.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register,
};

/// How far into a prologue to look.
/// jemalloc's free reaches its first branch after 9 instructions.
const MAX_PROLOGUE_INSTRUCTIONS: usize = 16;

/// The chosen site, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Bytes from the function's entry.
    pub offset: u64,
    /// Whether the kernel emulates the instruction there (the fast case).
    pub emulated: bool,
}

/// Chooses the entry-probe site for x86-64 `code` starting at a function's
/// entry, whose program reads the first `arguments` argument registers.
pub fn entry_probe_site(code: &[u8], arguments: usize) -> ProbeSite {
    probe_site(code, arguments, false)
}

/// Chooses one site for a function's entry and return probes: a return
/// probe replaces the return address at rsp when it fires, so it must fire
/// before the function moves rsp or writes its stack.
pub fn return_probe_site(code: &[u8], arguments: usize) -> ProbeSite {
    probe_site(code, arguments, true)
}

fn probe_site(code: &[u8], arguments: usize, with_return: bool) -> ProbeSite {
    let entry = ProbeSite {
        offset: 0,
        emulated: false,
    };
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for _ in 0..MAX_PROLOGUE_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            break;
        }
        if is_emulated(&instruction) {
            return ProbeSite {
                offset: instruction.ip(),
                emulated: true,
            };
        }
        // Past a branch the argument may not reach the probe; past a write
        // to an argument register the probe would read the wrong value.
        if instruction.flow_control() != FlowControl::Next
            || writes_argument(&mut info, &instruction, arguments)
            || (with_return && writes_stack(&mut info, &instruction))
        {
            break;
        }
    }
    entry
}

/// Instructions the x86 uprobe code emulates instead of single-stepping
/// (arch/x86/kernel/uprobes.c: branch and push emulation, nops).
fn is_emulated(instruction: &iced_x86::Instruction) -> bool {
    instruction.is_jcc_short_or_near()
        || instruction.is_jmp_short_or_near()
        || instruction.is_call_near()
        || matches!(
            instruction.code(),
            Code::Push_r64 | Code::Nopd | Code::Nopq | Code::Nopw
        )
}

fn writes_argument(
    info: &mut InstructionInfoFactory,
    instruction: &iced_x86::Instruction,
    arguments: usize,
) -> bool {
    const ARGUMENTS: [Register; 6] = [
        Register::RDI,
        Register::RSI,
        Register::RDX,
        Register::RCX,
        Register::R8,
        Register::R9,
    ];
    info.info(instruction).used_registers().iter().any(|used| {
        ARGUMENTS[..arguments.min(ARGUMENTS.len())].contains(&used.register().full_register())
            && !matches!(
                used.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::None
            )
    })
}

/// Whether `instruction` moves rsp or writes memory (the return address
/// may be where it writes).
fn writes_stack(info: &mut InstructionInfoFactory, instruction: &iced_x86::Instruction) -> bool {
    let info = info.info(instruction);
    let writes = |access: OpAccess| {
        !matches!(
            access,
            OpAccess::Read | OpAccess::CondRead | OpAccess::None | OpAccess::NoMemAccess
        )
    };
    info.used_registers()
        .iter()
        .any(|used| used.register().full_register() == Register::RSP && writes(used.access()))
        || info.used_memory().iter().any(|used| writes(used.access()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_moves_past_test_to_je() {
        // test %rdi,%rdi ; je +0x..
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0x97, 0x00, 0x00, 0x00];
        assert_eq!(
            entry_probe_site(&code, 1),
            ProbeSite {
                offset: 3,
                emulated: true
            }
        );
    }

    #[test]
    fn push_at_entry_stays_at_entry() {
        // push %r12 ; push %rbp
        let code = [0x41, 0x54, 0x55];
        assert_eq!(
            entry_probe_site(&code, 1),
            ProbeSite {
                offset: 0,
                emulated: true
            }
        );
    }

    #[test]
    fn memalign_skips_rip_relative_compare() {
        // cmpb $0x0,0x140e71(%rip) ; je +7
        let code = [0x80, 0x3d, 0x71, 0x0e, 0x14, 0x00, 0x00, 0x74, 0x07];
        assert_eq!(entry_probe_site(&code, 1).offset, 7);
    }

    #[test]
    fn argument_write_keeps_the_entry() {
        // mov %rdi,%rax is fine, mov %rsi,%rdi overwrites an argument: stop.
        // mov %rsi,%rdi ; push %rbx
        let code = [0x48, 0x89, 0xf7, 0x53];
        assert_eq!(
            entry_probe_site(&code, 1),
            ProbeSite {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn jemalloc_malloc_return_probe_moves_to_ja() {
        // cmp $0x1000,%rdi ; ja +0x93
        let code = [
            0x48, 0x81, 0xff, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x87, 0x93, 0x00, 0x00, 0x00,
        ];
        assert_eq!(
            return_probe_site(&code, 1),
            ProbeSite {
                offset: 7,
                emulated: true
            }
        );
    }

    #[test]
    fn return_probe_stays_before_a_stack_change() {
        // sub $0x18,%rsp ; je +7: the return address has moved.
        let code = [0x48, 0x83, 0xec, 0x18, 0x74, 0x07];
        assert_eq!(entry_probe_site(&code, 1).offset, 4);
        assert_eq!(return_probe_site(&code, 1).offset, 0);
        // mov %rdi,(%rsp) ; je +7: the return address is overwritten.
        let code = [0x48, 0x89, 0x3c, 0x24, 0x74, 0x07];
        assert_eq!(return_probe_site(&code, 1).offset, 0);
        // push %r15 is itself the site: it has not run when the probe fires.
        assert_eq!(return_probe_site(&[0x41, 0x57, 0x41, 0x56], 1).offset, 0);
    }

    #[test]
    fn jemalloc_free_moves_past_nine_instructions() {
        let code = [
            0x48, 0x89, 0xf8, // mov %rdi,%rax
            0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, // mov 0xa530e(%rip),%rdx
            0x48, 0x89, 0xf9, // mov %rdi,%rcx
            0x48, 0xc1, 0xe8, 0x1a, // shr $0x1a,%rax
            0x48, 0x81, 0xe1, 0x00, 0x00, 0x00, 0xc0, // and $0xffffffffc0000000,%rcx
            0x25, 0xf0, 0x00, 0x00, 0x00, // and $0xf0,%eax
            0x64, 0x48, 0x03, 0x04, 0x25, 0x00, 0x00, 0x00, 0x00, // add %fs:0x0,%rax
            0x48, 0x01, 0xd0, // add %rdx,%rax
            0x48, 0x3b, 0x88, 0xb0, 0x01, 0x00, 0x00, // cmp 0x1b0(%rax),%rcx
            0x0f, 0x85, 0x8a, 0x00, 0x00, 0x00, // jne
        ];
        assert_eq!(
            entry_probe_site(&code, 1),
            ProbeSite {
                offset: 48,
                emulated: true
            }
        );
        // Its second instruction writes rdx, which a three-argument
        // function's program reads.
        assert_eq!(entry_probe_site(&code, 3).offset, 0);
    }

    #[test]
    fn garbage_keeps_the_entry() {
        assert_eq!(entry_probe_site(&[], 1).offset, 0);
        assert_eq!(entry_probe_site(&[0x0f, 0x0b], 1).offset, 0); // ud2
    }
}
