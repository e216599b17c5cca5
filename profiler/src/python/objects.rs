//! How a CPython process's objects are counted. pymalloc serves objects of
//! 512 bytes or less from its own arenas (mmap), never through malloc: by
//! default they are seen as the arenas, charged to the Python stack that
//! opened each. `--python-objects` counts them one by one:
//! - with `run`, the command runs with `PYTHONMALLOC=malloc`, so every
//!   object is a malloc call the allocator probes see. Exact on every build,
//!   Debian's LTO one included, at the cost of malloc's speed and layout in
//!   place of pymalloc's;
//! - a process started with `PYTHONMALLOC=malloc` (or `malloc_debug`) is
//!   counted the same way, `attach` included;
//! - with `attach`, the functions the object allocator's pointers lead to
//!   (`_PyObject_Malloc` and friends, behind `PyObject_Malloc`) are probed,
//!   found by following the public functions' jump through those pointers
//!   (`find_object_allocator`). Where the build compares the pointer with
//!   its default and runs an inlined copy instead (Debian's LTO python3.11
//!   does so at some 190 call sites), no function sees every object, and
//!   the process is counted by arena, with a warning that says why.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};
use object::{Object as _, ObjectSymbol as _};
use profiler_common::alloc_kind;

use super::{PythonRuntime, memory::ProcessMemory};
use crate::{
    probe_site::{entry_probe_site, return_probe_site},
    process_maps::ProcessMaps,
    report::{ProcessReport, PythonObjects},
};

/// The variable that picks CPython's allocators, and the value memscope
/// sets for `--python-objects` with `run`.
pub const ALLOCATOR_VARIABLE: &str = "PYTHONMALLOC";
pub const ONE_BY_ONE: &str = "malloc";

/// How `pid`'s objects are counted with no probes of its own: through malloc
/// when its environment sends every object there.
pub fn counting_from_environment(pid: u32) -> PythonObjects {
    match allocator_setting(pid).as_deref() {
        Some("malloc" | "malloc_debug") => PythonObjects::Malloc,
        _ => PythonObjects::Arenas,
    }
}

/// `PYTHONMALLOC` in `pid`'s environment as it started.
fn allocator_setting(pid: u32) -> Option<String> {
    crate::target::environment_variable(pid, ALLOCATOR_VARIABLE)
        .map(|value| String::from_utf8_lossy(&value).into_owned())
}

/// The public functions, in the order of their pointers in CPython's
/// `PyMemAllocatorEx` (`ctx, malloc, calloc, realloc, free`), each with the
/// kind of the function its pointer leads to.
const PUBLIC: [(&str, u32); 4] = [
    ("PyObject_Malloc", alloc_kind::PY_MALLOC),
    ("PyObject_Calloc", alloc_kind::PY_CALLOC),
    ("PyObject_Realloc", alloc_kind::PY_REALLOC),
    ("PyObject_Free", alloc_kind::PY_FREE),
];

/// How many instructions of a public function are followed to its jump.
const MAX_INSTRUCTIONS: usize = 16;

/// The functions behind CPython's object allocator in one process, to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectAllocator {
    /// The file that holds them, as the process maps it.
    pub path: PathBuf,
    pub functions: Vec<ObjectFunction>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectFunction {
    /// `alloc_kind::PY_*`.
    pub kind: u32,
    /// Where the function starts in the file.
    pub file_offset: u64,
    /// Where its probes go, from the start: past prologue instructions the
    /// kernel would single-step (see `probe_site`), the return probe's with
    /// the entry's.
    pub entry_offset: u64,
}

impl ObjectFunction {
    pub fn has_return(&self) -> bool {
        self.kind != alloc_kind::PY_FREE
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error(
        "pid {pid}: {} inlines pymalloc into its callers (an LTO build): no function sees every object, so they are counted by arena; start it with {ALLOCATOR_VARIABLE}={ONE_BY_ONE}, or profile it with `memscope run --python-objects`",
        path.display()
    )]
    Inlined { pid: u32, path: PathBuf },
    #[error(
        "pid {pid}: {function} in {} does not jump through the object allocator as memscope knows it ({why}); its objects are counted by arena",
        path.display()
    )]
    Unrecognised {
        pid: u32,
        path: PathBuf,
        function: &'static str,
        why: &'static str,
    },
}

/// Finds the functions `PyObject_Malloc`, `_Calloc`, `_Realloc` and `_Free`
/// call through the object allocator's pointers in a running interpreter.
pub fn find_object_allocator(
    runtime: &PythonRuntime,
    maps: &ProcessMaps,
) -> Result<ObjectAllocator, ObjectsError> {
    let pid = runtime.pid;
    let path = &runtime.interpreter;
    let unrecognised = |function, why| ObjectsError::Unrecognised {
        pid,
        path: path.clone(),
        function,
        why,
    };
    let addresses = public_addresses(&maps.host_path(path))
        .ok_or_else(|| unrecognised(PUBLIC[0].0, "not all four are exported"))?;
    let memory = ProcessMemory::new(pid);
    let read = |addr: u64| memory.read_u64(addr).ok();
    let mut fields = Vec::new();
    for ((function, _), address) in PUBLIC.iter().zip(addresses) {
        let address = address.wrapping_add(runtime.bias);
        let code = memory
            .read_vec(address, 64)
            .map_err(|_| unrecognised(function, "its code cannot be read"))?;
        match dispatch(&code, address, read) {
            Dispatch::Through(field) => fields.push(field),
            Dispatch::Inlined => {
                return Err(ObjectsError::Inlined {
                    pid,
                    path: path.clone(),
                });
            }
            Dispatch::Unknown => return Err(unrecognised(function, "no jump through a pointer")),
        }
    }
    // One PyMemAllocatorEx: malloc, calloc, realloc, free side by side.
    if fields
        .iter()
        .zip(&fields[1..])
        .any(|(a, b)| b.wrapping_sub(*a) != 8)
    {
        return Err(unrecognised(
            PUBLIC[0].0,
            "its pointers are not side by side",
        ));
    }
    let mut functions = Vec::new();
    let mut file: Option<&Path> = None;
    for (field, (function, kind)) in fields.iter().zip(PUBLIC) {
        let target =
            read(*field).ok_or_else(|| unrecognised(function, "its pointer cannot be read"))?;
        let mapping = maps
            .find(target)
            .filter(|m| m.executable && m.path.is_some())
            .ok_or_else(|| unrecognised(function, "its pointer leads outside mapped code"))?;
        let mapped = mapping.path.as_deref();
        if file.is_some_and(|f| Some(f) != mapped) {
            return Err(unrecognised(function, "its pointers lead into two files"));
        }
        file = mapped;
        let mut function = ObjectFunction {
            kind,
            file_offset: target - mapping.start + mapping.file_offset,
            entry_offset: 0,
        };
        if let Ok(code) = memory.read_vec(target, 64) {
            let arguments = alloc_kind::arguments(kind);
            function.entry_offset = if function.has_return() {
                return_probe_site(&code, arguments).offset
            } else {
                entry_probe_site(&code, arguments).offset
            };
        }
        functions.push(function);
    }
    Ok(ObjectAllocator {
        path: file.map(Path::to_path_buf).unwrap_or_else(|| path.clone()),
        functions,
    })
}

/// Link-time addresses of the four public functions, in `PUBLIC`'s order.
fn public_addresses(host_path: &Path) -> Option<Vec<u64>> {
    let cache = object::ReadCache::new(File::open(host_path).ok()?);
    let elf = object::File::parse(&cache).ok()?;
    let found: HashMap<&str, u64> = elf
        .dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| {
            let name = s.name().ok()?;
            PUBLIC
                .iter()
                .find(|(public, _)| *public == name)
                .map(|(public, _)| (*public, s.address()))
        })
        .collect();
    PUBLIC
        .iter()
        .map(|(name, _)| found.get(name).copied())
        .collect()
}

/// What a public allocator function does with its allocator's pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dispatch {
    /// Jumps through the pointer at this address.
    Through(u64),
    /// Compares a pointer with a code address and runs an inlined copy of
    /// the default when they match (GCC's speculative devirtualisation).
    Inlined,
    /// Anything else.
    Unknown,
}

/// Follows `code` (a function's first bytes, at `ip` in the process) to
/// its jump through a pointer, tracking registers loaded from memory, with
/// the address each was loaded from (3.12+ reach the allocator through a
/// pointer to `_PyRuntime`, and may load the function into a register
/// first); `read` reads a word of the process.
fn dispatch(code: &[u8], ip: u64, read: impl Fn(u64) -> Option<u64>) -> Dispatch {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut known: HashMap<Register, Loaded> = HashMap::new();
    for _ in 0..MAX_INSTRUCTIONS {
        if !decoder.can_decode() {
            break;
        }
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            break;
        }
        let memory = memory_address(&instruction, &known);
        match instruction.mnemonic() {
            Mnemonic::Jmp if instruction.op0_kind() == OpKind::Memory => {
                return memory.map_or(Dispatch::Unknown, Dispatch::Through);
            }
            Mnemonic::Jmp if instruction.op0_kind() == OpKind::Register => {
                return known
                    .get(&instruction.op0_register().full_register())
                    .map_or(Dispatch::Unknown, |loaded| Dispatch::Through(loaded.from));
            }
            Mnemonic::Cmp if is_code_address_immediate(&instruction) => return Dispatch::Inlined,
            Mnemonic::Mov
                if instruction.op0_kind() == OpKind::Register
                    && instruction.op1_kind() == OpKind::Memory =>
            {
                let register = instruction.op0_register().full_register();
                match memory.and_then(|from| {
                    Some(Loaded {
                        value: read(from)?,
                        from,
                    })
                }) {
                    Some(loaded) => known.insert(register, loaded),
                    None => known.remove(&register),
                };
                continue;
            }
            _ => {}
        }
        if !matches!(
            instruction.flow_control(),
            FlowControl::Next | FlowControl::ConditionalBranch
        ) {
            return Dispatch::Unknown;
        }
        for used in info.info(&instruction).used_registers() {
            if !matches!(used.access(), OpAccess::Read | OpAccess::CondRead) {
                known.remove(&used.register().full_register());
            }
        }
    }
    Dispatch::Unknown
}

/// A register's value, read from the process at `from`.
#[derive(Clone, Copy, Debug)]
struct Loaded {
    value: u64,
    from: u64,
}

/// The address a memory operand names: RIP-relative, or a known register
/// plus a displacement.
fn memory_address(instruction: &Instruction, known: &HashMap<Register, Loaded>) -> Option<u64> {
    if !(0..instruction.op_count()).any(|i| instruction.op_kind(i) == OpKind::Memory) {
        return None;
    }
    if instruction.is_ip_rel_memory_operand() {
        return Some(instruction.ip_rel_memory_address());
    }
    if instruction.memory_index() != Register::None {
        return None;
    }
    let base = known.get(&instruction.memory_base().full_register())?;
    Some(base.value.wrapping_add(instruction.memory_displacement64()))
}

/// `cmp` against an immediate too large for a size or flag: a function's
/// address, as speculative devirtualisation compares with.
fn is_code_address_immediate(instruction: &Instruction) -> bool {
    (0..instruction.op_count()).any(|i| {
        matches!(
            instruction.op_kind(i),
            OpKind::Immediate32to64 | OpKind::Immediate32 | OpKind::Immediate64
        ) && instruction.immediate(i) > 0xffff
    })
}

/// A warning when `--python-objects` replaced a `PYTHONMALLOC` the user had
/// set for the command.
pub fn replaced_setting() -> Option<String> {
    let value = std::env::var(ALLOCATOR_VARIABLE).ok()?;
    (value != ONE_BY_ONE && value != "malloc_debug").then(|| {
        format!(
            "--python-objects ran the command with {ALLOCATOR_VARIABLE}={ONE_BY_ONE}, not the {ALLOCATOR_VARIABLE}={value} it was given"
        )
    })
}

/// What the report says of how the Python processes' objects were counted:
/// `asked` is `--python-objects`, `started` whether memscope started the
/// command (`run`), so could choose its allocator.
pub fn counting_warning(processes: &[ProcessReport], asked: bool, started: bool) -> Option<String> {
    let by_arena: Vec<String> = processes
        .iter()
        .filter(|p| p.python_objects == Some(PythonObjects::Arenas))
        .map(|p| p.pid.to_string())
        .collect();
    if by_arena.is_empty() {
        let through_malloc = processes
            .iter()
            .any(|p| p.python_objects == Some(PythonObjects::Malloc));
        return through_malloc.then(|| {
            format!(
                "python: objects counted one by one through malloc ({ALLOCATOR_VARIABLE}={ONE_BY_ONE}): counts and bytes are exact; RSS and fragmentation are malloc's, not pymalloc's"
            )
        });
    }
    let arenas = "objects of 512 bytes or less come from CPython's arenas, counted as [mmap] sites charged to the Python stack that opened each";
    Some(match (asked, started) {
        (false, _) => format!(
            "python: {arenas}; `memscope run --python-objects` (or {ALLOCATOR_VARIABLE}={ONE_BY_ONE} in the target's environment) counts them one by one"
        ),
        // Each such process's reason was given as it was found.
        (true, false) => return None,
        (true, true) => format!(
            "python: pid {} reset {ALLOCATOR_VARIABLE} in its environment: its {arenas}",
            by_arena.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // First bytes of the real functions, at their link-time addresses.
    /// pyenv 3.11: `mov rsi,rdi; test; js; mov rdi,[rip+ctx]; jmp [rip+malloc]`.
    const PYENV_311_MALLOC: &[u8] = &[
        0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x10, 0x48, 0x8b, 0x3d, 0x71, 0xd0, 0x2a, 0x00,
        0xff, 0x25, 0x73, 0xd0, 0x2a, 0x00, 0x0f, 0x1f, 0x00, 0x31, 0xc0, 0xc3,
    ];
    /// pyenv 3.12: `mov rax,[rip+&_PyRuntime]; mov rdi,[rax+0xb0]; jmp [rax+0xb8]`.
    const PYENV_312_MALLOC: &[u8] = &[
        0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x18, 0x48, 0x8b, 0x05, 0xc1, 0x48, 0x37, 0x00,
        0x48, 0x8b, 0xb8, 0xb0, 0x00, 0x00, 0x00, 0xff, 0xa0, 0xb8, 0x00, 0x00, 0x00,
    ];
    /// Debian 3.11 (LTO): `mov rax,[rip+malloc]; ...; cmp rax,0x4fb450; jne`.
    const DEBIAN_311_MALLOC: &[u8] = &[
        0x53, 0x48, 0x85, 0xff, 0x0f, 0x88, 0x65, 0xad, 0xf2, 0xff, 0x48, 0x8b, 0x05, 0xe7, 0xeb,
        0x45, 0x00, 0x48, 0x89, 0xfb, 0x48, 0x8b, 0x3d, 0xd5, 0xeb, 0x45, 0x00, 0x48, 0x3d, 0x50,
        0xb4, 0x4f, 0x00, 0x0f, 0x85, 0xc3, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn a_jump_through_the_allocator_is_followed_to_its_pointer() {
        // 0x1af1ef + 6 + 0x2ad073 = _PyObject + 8, the malloc pointer.
        assert_eq!(
            dispatch(PYENV_311_MALLOC, 0x1af1e0, |_| None),
            Dispatch::Through(0x45c268)
        );
    }

    #[test]
    fn a_jump_through_a_pointer_to_the_runtime_adds_its_displacement() {
        // 0x1cf438 + 7 + 0x3748c1 holds &_PyRuntime, here 0x600000.
        let read = |addr| (addr == 0x543d00).then_some(0x60_0000);
        assert_eq!(
            dispatch(PYENV_312_MALLOC, 0x1cf430, read),
            Dispatch::Through(0x60_00b8)
        );
        // Unreadable, it leads nowhere known.
        assert_eq!(
            dispatch(PYENV_312_MALLOC, 0x1cf430, |_| None),
            Dispatch::Unknown
        );
    }

    /// pyenv 3.12 `PyObject_Calloc`: an overflow check, then the function
    /// loaded into a register and jumped to: `mov rax,[rip+&_PyRuntime];
    /// ...; mov rax,[rax+0xc0]; mov rdi,rcx; jmp rax`.
    const PYENV_312_CALLOC: &[u8] = &[
        0x48, 0x85, 0xf6, 0x74, 0x14, 0x48, 0xb8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        0x31, 0xd2, 0x48, 0xf7, 0xf6, 0x48, 0x39, 0xf8, 0x72, 0x27, 0x48, 0x8b, 0x05, 0x80, 0x48,
        0x37, 0x00, 0x48, 0x89, 0xf2, 0x48, 0x89, 0xfe, 0x48, 0x8b, 0x88, 0xb0, 0x00, 0x00, 0x00,
        0x48, 0x8b, 0x80, 0xc0, 0x00, 0x00, 0x00, 0x48, 0x89, 0xcf, 0xff, 0xe0,
    ];

    #[test]
    fn a_jump_through_a_register_is_traced_to_where_it_was_loaded_from() {
        let read = |addr| match addr {
            0x543d00 => Some(0x60_0000),
            _ => Some(0x1234),
        };
        assert_eq!(
            dispatch(PYENV_312_CALLOC, 0x1cf460, read),
            Dispatch::Through(0x60_00c0)
        );
    }

    #[test]
    fn a_comparison_with_the_default_allocator_is_an_inlined_build() {
        assert_eq!(
            dispatch(DEBIAN_311_MALLOC, 0x4fb350, |_| Some(0x4fb450)),
            Dispatch::Inlined
        );
    }

    #[test]
    fn a_plain_function_is_unknown() {
        // push rbp; mov rbp,rsp; call rel32; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0xe8, 0, 0, 0, 0, 0xc3];
        assert_eq!(dispatch(&code, 0x1000, |_| None), Dispatch::Unknown);
    }

    fn process(pid: u32, objects: Option<PythonObjects>) -> ProcessReport {
        ProcessReport {
            pid,
            python_objects: objects,
            ..Default::default()
        }
    }

    #[test]
    fn no_python_process_no_word_about_objects() {
        assert_eq!(counting_warning(&[process(1, None)], true, true), None);
    }

    #[test]
    fn arenas_by_default_say_how_to_count_one_by_one() {
        let warning = counting_warning(&[process(1, Some(PythonObjects::Arenas))], false, true)
            .expect("a word on arenas");
        assert!(warning.contains("run --python-objects"), "{warning}");
    }

    #[test]
    fn a_command_that_reset_the_variable_is_named() {
        let processes = [
            process(7, Some(PythonObjects::Malloc)),
            process(8, Some(PythonObjects::Arenas)),
        ];
        let warning = counting_warning(&processes, true, true).expect("a word on pid 8");
        assert!(warning.contains("pid 8 reset PYTHONMALLOC"), "{warning}");
    }

    #[test]
    fn one_by_one_says_the_figures_are_mallocs() {
        let warning = counting_warning(&[process(1, Some(PythonObjects::Malloc))], true, true)
            .expect("a word on malloc");
        assert!(warning.contains("exact"), "{warning}");
    }
}
