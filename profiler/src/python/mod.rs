//! CPython support in userspace: find the interpreter in a process and
//! describe its layout to the BPF frame walk ([`find_runtime`] →
//! [`PythonRuntime::process`], for `PY_PROCS`), and turn the frames the walk
//! records into function, file and line ([`PythonSymbolizer`]).
//!
//! Supported: CPython 3.8 to 3.13, default (GIL) builds, x86-64, glibc;
//! libpython linked into the executable (Debian's `python3.11`, non-PIE) or
//! shared (pyenv's `--enable-shared`). Refused with a [`PythonError`] that
//! says so: 3.7 and older, 3.14 and newer, free-threaded builds, musl, an
//! interpreter stripped of its dynamic symbols.
//!
//! Techniques, and why:
//! - **The thread state through the `autoTSSkey` pthread key**, not
//!   `_PyRuntime.gilstate.tstate_current`: the latter is the thread holding
//!   the GIL, and malloc often runs in threads that released it (I/O, C
//!   extensions), whose allocations would be charged to another thread's
//!   Python stack. The key's value is read the way glibc's
//!   `pthread_getspecific` does (`fsbase + 0x310 + key * 16 + 8`). Its
//!   *address* comes from the offset table (`_PyRuntime` + offset), not
//!   from decoding machine code, which misses on non-LTO builds.
//! - **Offsets per minor version** ([`offsets`]), measured against each
//!   version's headers and pinned by tests on the real interpreters; 3.13's
//!   come from the interpreter's own `_Py_DebugOffsets`, read from the file.
//! - **Symbols and data from the ELF file**, not the process: found before
//!   `Py_Initialize` has run, and with no DWARF (Debian ships none).
//! - **Strings and line tables in userspace**: the BPF walk records only
//!   `(code address, instruction, co_firstlineno)` per frame. The
//!   firstlineno tells a freed code object's address from a new object at
//!   the same address: a frame whose firstlineno is not the object's now
//!   is reported unknown rather than under the new object's name.
//! - **Every read capped** (names, file names, line tables), so a corrupt
//!   object cannot make the symbolizer read megabytes.
//!
//! Public API:
//! - [`find_runtime`]`(pid, &ProcessMaps) -> Result<Option<PythonRuntime>, PythonError>`;
//!   a [`PythonRuntime`] has `pid`, `version`, `interpreter` (the object's
//!   path as mapped: cut native stacks at its first frame), `process` (for
//!   `PY_PROCS`) and `code_offsets()`;
//! - [`PythonSymbolizer`]: `new()`, `register(pid, &PythonRuntime)`,
//!   `fork(parent, child)`, `forget(pid)`, `is_registered(pid)`,
//!   `symbolize(pid, &PythonFrame) -> PythonLocation` and
//!   `symbolize_stack(pid, &PythonStack) -> Vec<PythonLocation>`.

mod code;
mod linetable;
mod memory;
pub mod objects;
pub mod offsets;
mod runtime;
pub mod startup;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use code::{PythonLocation, PythonSymbolizer};
pub use linetable::LineTableFormat;
pub use runtime::{GLIBC_TSD_OFFSET, PythonRuntime, PythonVersion, find_runtime};

/// Why a CPython process's frames cannot be walked. Each message names the
/// process and the interpreter file, and says the stacks stay native.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error(
        "python {version} in pid {pid} ({}): frames of this version cannot be walked yet; stacks stay native",
        path.display()
    )]
    UnsupportedVersion {
        pid: u32,
        path: PathBuf,
        version: PythonVersion,
    },
    #[error(
        "python {version} in pid {pid} ({}) is a free-threaded build: its frames cannot be walked yet; stacks stay native",
        path.display()
    )]
    FreeThreaded {
        pid: u32,
        path: PathBuf,
        version: PythonVersion,
    },
    #[error(
        "python in pid {pid} ({}) runs on musl ({}): its thread states cannot be found yet; stacks stay native",
        path.display(),
        libc.display()
    )]
    Musl {
        pid: u32,
        path: PathBuf,
        libc: PathBuf,
    },
    #[error(
        "python in pid {pid} ({}) is stripped (no _PyRuntime symbol): its frames cannot be walked; stacks stay native",
        path.display()
    )]
    Stripped { pid: u32, path: PathBuf },
    #[error(
        "python in pid {pid} ({}) has no symbol {symbol}: its frames cannot be walked; stacks stay native",
        path.display()
    )]
    MissingSymbol {
        pid: u32,
        path: PathBuf,
        symbol: &'static str,
    },
    #[error(
        "cannot tell the version of python in pid {pid} ({}): no Py_Version symbol and no version in the file name; stacks stay native",
        path.display()
    )]
    UnknownVersion { pid: u32, path: PathBuf },
    #[error(
        "python in pid {pid} ({}): _Py_DebugOffsets cannot be used ({reason}); stacks stay native",
        path.display()
    )]
    DebugOffsets {
        pid: u32,
        path: PathBuf,
        reason: String,
    },
    #[error("python in pid {pid} ({}): the file is not mapped as an ELF object expects", path.display())]
    NotMapped { pid: u32, path: PathBuf },
    #[error("cannot read {} mapped by pid {pid}: {source}", path.display())]
    Read {
        pid: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {} mapped by pid {pid}: {source}", path.display())]
    Elf {
        pid: u32,
        path: PathBuf,
        #[source]
        source: object::Error,
    },
}
