//! Struct offsets of each supported CPython minor version (x86-64, GIL
//! build), in bytes.
//!
//! Measured with `offsetof()` against each version's own headers
//! (PYTHON-FRAMES.md section 2.2) and pinned by this module's tests
//! against the running interpreters (`python::tests`). Offsets are stable
//! across the patch releases of a minor (Pyroscope's DWARF-generated
//! tables change only with the minor), so the table is per minor; 3.13's
//! are read from `_Py_DebugOffsets` in the interpreter itself and checked
//! against this table.

use profiler_common::{NO_OFFSET, python_flags};

use super::linetable::LineTableFormat;

/// Where the BPF walk finds a thread's frames, and where the symbolizer
/// finds a code object's names and lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionOffsets {
    /// `_PyRuntime` to its `Py_tss_t autoTSSkey` (`gilstate.autoTSSkey`
    /// before 3.12).
    pub runtime_tss: u64,
    pub tstate_frame: u16,
    pub cframe_frame: u16,
    pub frame_code: u16,
    pub frame_back: u16,
    pub frame_instr: u16,
    pub frame_owner: u16,
    /// `python_flags` for the kernel side.
    pub flags: u16,
    pub code: CodeOffsets,
}

/// The parts of a `PyCodeObject` and of its strings and bytes the
/// symbolizer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeOffsets {
    pub firstlineno: u16,
    pub filename: u16,
    pub name: u16,
    /// `co_qualname`, 3.11+.
    pub qualname: Option<u16>,
    /// `co_lnotab` (3.8/3.9) or `co_linetable`.
    pub linetable: u16,
    /// 3.11+: where the code units start in the code object
    /// (`co_code_adaptive`, = `PyCode_Type.tp_basicsize`); the frame's
    /// instruction pointer is relative to the object.
    pub code_adaptive: Option<u16>,
    pub line_format: LineTableFormat,
    /// `sizeof(PyASCIIObject)`: a compact ASCII string's characters follow.
    pub ascii_size: u16,
    /// `sizeof(PyCompactUnicodeObject)`: a compact non-ASCII string's
    /// characters follow.
    pub compact_size: u16,
}

/// `PyObject.ob_type`.
pub const OB_TYPE: u64 = 8;
/// `PyVarObject.ob_size` (code units of a 3.11+ code object, bytes of a
/// bytes object) and `PyASCIIObject.length` (code points).
pub const OB_SIZE: u64 = 16;
/// `PyASCIIObject.state`: `interned:2, kind:3, compact:1, ascii:1, ...`.
pub const UNICODE_STATE: u64 = 32;
/// `PyBytesObject.ob_sval`.
pub const BYTES_DATA: u64 = 32;

/// `enum _frameowner` value of a C-stack shim frame (3.12+).
pub const FRAME_OWNED_BY_CSTACK: u8 = 3;

const CODE_3_8: CodeOffsets = CodeOffsets {
    firstlineno: 40,
    filename: 104,
    name: 112,
    qualname: None,
    linetable: 120,
    code_adaptive: None,
    line_format: LineTableFormat::Lnotab,
    ascii_size: 48,
    compact_size: 72,
};

const CODE_3_11: CodeOffsets = CodeOffsets {
    firstlineno: 72,
    filename: 112,
    name: 120,
    qualname: Some(128),
    linetable: 136,
    code_adaptive: Some(184),
    line_format: LineTableFormat::Locations,
    ascii_size: 48,
    compact_size: 72,
};

/// 3.12 dropped `wstr` from the string header (PEP 623) and reordered the
/// code object's ints.
const CODE_3_12: CodeOffsets = CodeOffsets {
    firstlineno: 68,
    code_adaptive: Some(192),
    ascii_size: 40,
    compact_size: 56,
    ..CODE_3_11
};

const fn frame_object(runtime_tss: u64, frame_instr: u16, code: CodeOffsets) -> VersionOffsets {
    VersionOffsets {
        runtime_tss,
        tstate_frame: 24,
        cframe_frame: NO_OFFSET,
        frame_code: 32,
        frame_back: 24,
        frame_instr,
        frame_owner: NO_OFFSET,
        flags: 0,
        code,
    }
}

/// The table for `3.minor`; `None` for a minor this module does not know.
pub const fn for_minor(minor: u8) -> Option<VersionOffsets> {
    Some(match minor {
        8 => frame_object(1360 + 32, 104, CODE_3_8),
        9 => frame_object(560 + 24, 104, CODE_3_8),
        10 => frame_object(
            560 + 24,
            96,
            CodeOffsets {
                line_format: LineTableFormat::Linetable310,
                ..CODE_3_8
            },
        ),
        // NB: 3.11 has an `owner` (at 69) but no shim frames yet: its
        // entry frames are marked by `is_entry`, and belong to the stack.
        11 => VersionOffsets {
            runtime_tss: 568 + 24,
            tstate_frame: 56,
            cframe_frame: 8,
            frame_code: 32,
            frame_back: 48,
            frame_instr: 56,
            frame_owner: NO_OFFSET,
            flags: python_flags::INSTR_POINTER,
            code: CODE_3_11,
        },
        12 => VersionOffsets {
            runtime_tss: 1544,
            tstate_frame: 56,
            cframe_frame: 0,
            frame_code: 0,
            frame_back: 8,
            frame_instr: 56,
            frame_owner: 70,
            flags: python_flags::INSTR_POINTER,
            code: CODE_3_12,
        },
        13 => VersionOffsets {
            runtime_tss: 2160,
            tstate_frame: 72,
            cframe_frame: NO_OFFSET,
            frame_code: 0,
            frame_back: 8,
            frame_instr: 56,
            frame_owner: 70,
            flags: python_flags::INSTR_POINTER,
            code: CodeOffsets {
                code_adaptive: Some(200),
                ..CODE_3_12
            },
        },
        _ => return None,
    })
}

/// `_Py_DebugOffsets` of 3.13 (`Include/internal/pycore_runtime.h`), at the
/// start of `_PyRuntime`: every member a `uint64_t`, so a field is a word
/// index. NB: the struct changes between minors; these indices are 3.13's.
pub mod debug_offsets {
    pub const COOKIE: &[u8; 8] = b"xdebugpy";
    pub const VERSION: usize = 1;
    pub const FREE_THREADED: usize = 2;
    pub const THREAD_STATE_CURRENT_FRAME: usize = 23;
    pub const FRAME_PREVIOUS: usize = 29;
    pub const FRAME_EXECUTABLE: usize = 30;
    pub const FRAME_INSTR_PTR: usize = 31;
    pub const FRAME_OWNER: usize = 33;
    pub const CODE_FILENAME: usize = 35;
    pub const CODE_NAME: usize = 36;
    pub const CODE_QUALNAME: usize = 37;
    pub const CODE_LINETABLE: usize = 38;
    pub const CODE_FIRSTLINENO: usize = 39;
    pub const CODE_ADAPTIVE: usize = 43;
    pub const BYTES_OB_SIZE: usize = 65;
    pub const BYTES_OB_SVAL: usize = 66;
    pub const UNICODE_ASCII_SIZE: usize = 70;
    /// Words read: through `unicode_object.asciiobject_size`.
    pub const WORDS: usize = 71;
}
