//! Where to put an entry probe inside a function.
//!
//! The kernel emulates a few x86 instructions at a uprobe (push, relative
//! jmp/jcc/call, nop) and single-steps every other one out of line, which in
//! a VM costs over 10x more (TOOLCHAIN.md: free's entry `test %rdi,%rdi`
//! 9900 ns per call, free+3 `je` 800 ns). So an entry-only probe goes on the
//! first emulated instruction of the straight-line prologue, as long as
//! nothing before it writes an argument register; else it stays at the entry.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register,
};

/// How far into a prologue to look.
const MAX_PROLOGUE_INSTRUCTIONS: usize = 8;

/// The chosen site, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Bytes from the function's entry.
    pub offset: u64,
    /// Whether the kernel emulates the instruction there (the fast case).
    pub emulated: bool,
}

/// Chooses the entry-probe site for x86-64 `code` starting at a function's
/// entry.
pub fn entry_probe_site(code: &[u8]) -> ProbeSite {
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
            || writes_argument(&mut info, &instruction)
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

fn writes_argument(info: &mut InstructionInfoFactory, instruction: &iced_x86::Instruction) -> bool {
    const ARGUMENTS: [Register; 6] = [
        Register::RDI,
        Register::RSI,
        Register::RDX,
        Register::RCX,
        Register::R8,
        Register::R9,
    ];
    info.info(instruction).used_registers().iter().any(|used| {
        ARGUMENTS.contains(&used.register().full_register())
            && !matches!(
                used.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::None
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_moves_past_test_to_je() {
        // test %rdi,%rdi ; je +0x..
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0x97, 0x00, 0x00, 0x00];
        assert_eq!(
            entry_probe_site(&code),
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
            entry_probe_site(&code),
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
        assert_eq!(entry_probe_site(&code).offset, 7);
    }

    #[test]
    fn argument_write_keeps_the_entry() {
        // mov %rdi,%rax is fine, mov %rsi,%rdi overwrites an argument: stop.
        // mov %rsi,%rdi ; push %rbx
        let code = [0x48, 0x89, 0xf7, 0x53];
        assert_eq!(
            entry_probe_site(&code),
            ProbeSite {
                offset: 0,
                emulated: false
            }
        );
    }

    #[test]
    fn garbage_keeps_the_entry() {
        assert_eq!(entry_probe_site(&[]).offset, 0);
        assert_eq!(entry_probe_site(&[0x0f, 0x0b]).offset, 0); // ud2
    }
}
