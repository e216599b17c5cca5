//! Recorded Python frames to function, file and line: code objects read
//! from the live process, cached per process.

use std::{collections::HashMap, sync::Arc};

use profiler_common::{PythonFrame, PythonStack};

use super::{
    linetable::LineTableFormat,
    memory::{MemoryError, ProcessMemory, u32_at, u64_at},
    offsets::{BYTES_DATA, OB_SIZE, OB_TYPE, UNICODE_STATE},
    runtime::{CodeLayout, PythonRuntime},
};

/// Longest name read, in code points; longer ones end in `…`.
const MAX_NAME_CHARS: u64 = 512;
/// Longest file name read, in code points.
const MAX_FILE_CHARS: u64 = 4096;
/// Largest line table read. NB: a 20k-line module's table is ~100 KiB in
/// 3.11+; a corrupt size must not make us read megabytes.
const MAX_LINE_TABLE_BYTES: u64 = 256 * 1024;
/// Code objects cached per process; the cache starts over when full.
const MAX_CACHED_CODE: usize = 1 << 16;

/// Where a Python frame is in the source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PythonLocation {
    /// `co_qualname` (3.11+, `Outer.Inner.method`), else `co_name`; for a
    /// code object that could not be read, `<unknown code 0x...>`.
    pub function: String,
    /// `co_filename`, as the interpreter holds it (a module's path, or
    /// `<frozen importlib._bootstrap>`, `<string>`).
    pub file: String,
    /// `None` for an instruction without a line, or an unknown code object.
    pub line: Option<u32>,
}

impl PythonLocation {
    fn unknown(code: u64) -> Self {
        Self {
            function: format!("<unknown code {code:#x}>"),
            file: "<unknown>".to_string(),
            line: None,
        }
    }
}

/// What is kept of a code object.
#[derive(Debug)]
struct CodeInfo {
    function: String,
    file: String,
    firstlineno: u32,
    /// `None` when the table could not be read (or was too large).
    line_table: Option<Box<[u8]>>,
    /// 3.11+: the bytecode's size in bytes (`ob_size` code units).
    code_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
enum CodeError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the object at {0:#x} is not a code object")]
    NotCode(u64),
}

/// One process's interpreter layout and code objects.
#[derive(Clone, Debug)]
struct ProcessCode {
    memory: ProcessMemory,
    layout: CodeLayout,
    /// By (code object address, `co_firstlineno`): a freed code object's
    /// address can hold another, and a firstlineno that differs tells them
    /// apart (the BPF walk records it with each frame).
    code: HashMap<(u64, u32), Arc<CodeInfo>>,
    /// Frames whose code object could not be read (freed, or the process
    /// gone): tried once, not at every stack that holds them.
    unreadable: std::collections::HashSet<(u64, u32)>,
}

/// Symbolizes recorded Python frames, per process.
#[derive(Debug, Default)]
pub struct PythonSymbolizer {
    processes: HashMap<u32, ProcessCode>,
}

impl PythonSymbolizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts symbolizing `pid`'s frames with the interpreter found in it.
    /// A second registration (after an exec) starts with an empty cache.
    pub fn register(&mut self, pid: u32, runtime: &PythonRuntime) {
        self.processes.insert(
            pid,
            ProcessCode {
                memory: ProcessMemory::new(pid),
                layout: runtime.code,
                code: HashMap::new(),
                unreadable: std::collections::HashSet::new(),
            },
        );
    }

    /// `child` was forked from `parent`: it has the same code objects at
    /// the same addresses, so it starts with the parent's cache (the
    /// firstlineno in each frame keeps that safe once they diverge).
    /// Nothing happens when `parent` is not registered.
    pub fn fork(&mut self, parent: u32, child: u32) {
        if let Some(code) = self.processes.get(&parent) {
            let mut code = code.clone();
            code.memory = ProcessMemory::new(child);
            self.processes.insert(child, code);
        }
    }

    /// Drops `pid` (it exited, or exec'd into something else).
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    pub fn is_registered(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    /// The location of a frame recorded in `pid`. Reads the code object
    /// from the process the first time; once the process is gone, only
    /// what was cached can be named, the rest is `<unknown code 0x...>`.
    pub fn symbolize(&mut self, pid: u32, frame: &PythonFrame) -> PythonLocation {
        let Some(process) = self.processes.get_mut(&pid) else {
            return PythonLocation::unknown(frame.code);
        };
        let key = (frame.code, frame.firstlineno);
        if let Some(info) = process.code.get(&key) {
            return info.location(&process.layout, frame.instr);
        }
        if process.unreadable.contains(&key) {
            return PythonLocation::unknown(frame.code);
        }
        if process.code.len() + process.unreadable.len() >= MAX_CACHED_CODE {
            process.code.clear();
            process.unreadable.clear();
        }
        let info = match read_code(&process.memory, &process.layout, frame.code) {
            Ok(info) => Arc::new(info),
            Err(error) => {
                tracing::debug!(pid, "python code object not read: {error}");
                process.unreadable.insert(key);
                return PythonLocation::unknown(frame.code);
            }
        };
        process
            .code
            .insert((frame.code, info.firstlineno), Arc::clone(&info));
        if info.firstlineno != frame.firstlineno {
            // Another code object lives there now: the frame's was freed.
            process.unreadable.insert(key);
            return PythonLocation::unknown(frame.code);
        }
        info.location(&process.layout, frame.instr)
    }

    /// A whole recorded stack, innermost frame first.
    pub fn symbolize_stack(&mut self, pid: u32, stack: &PythonStack) -> Vec<PythonLocation> {
        let len = usize::try_from(stack.len).map_or(0, |len| len.min(stack.frames.len()));
        stack.frames[..len]
            .iter()
            .map(|frame| self.symbolize(pid, frame))
            .collect()
    }
}

impl CodeInfo {
    fn location(&self, layout: &CodeLayout, instr: u32) -> PythonLocation {
        PythonLocation {
            function: self.function.clone(),
            file: self.file.clone(),
            line: self.line(layout, instr),
        }
    }

    /// The frame's instruction as a byte offset into the bytecode, then its
    /// line. A frame that has not run its first instruction yet is at its
    /// first line, as `f_lineno` says.
    fn line(&self, layout: &CodeLayout, instr: u32) -> Option<u32> {
        let format = layout.offsets.line_format;
        let offset = match (format, layout.offsets.code_adaptive) {
            // `f_lasti`, an int: -1 before the first instruction.
            (LineTableFormat::Lnotab, _) => i64::from(instr as i32),
            // 3.10 counts code units.
            (LineTableFormat::Linetable310, _) => i64::from(instr as i32) * 2,
            // The instruction pointer's offset from the code object.
            (LineTableFormat::Locations, Some(start)) => i64::from(instr) - i64::from(start),
            (LineTableFormat::Locations, None) => return None,
        };
        let Ok(offset) = u32::try_from(offset) else {
            return Some(self.firstlineno);
        };
        if self
            .code_bytes
            .is_some_and(|size| u64::from(offset) >= size)
        {
            return None;
        }
        format.line(self.line_table.as_deref()?, self.firstlineno, offset)
    }
}

fn read_code(
    memory: &ProcessMemory,
    layout: &CodeLayout,
    addr: u64,
) -> Result<CodeInfo, CodeError> {
    let o = &layout.offsets;
    let fields = [
        o.firstlineno,
        o.filename,
        o.name,
        o.qualname.unwrap_or(0),
        o.linetable,
    ];
    let header = fields
        .iter()
        .map(|&f| usize::from(f) + 8)
        .max()
        .unwrap_or(0);
    let mut buf = vec![0u8; header.max(24)];
    memory.read(addr, &mut buf)?;
    if u64_at(&buf, OB_TYPE as usize) != Some(layout.code_type) {
        return Err(CodeError::NotCode(addr));
    }
    let word = |offset: u16| u64_at(&buf, usize::from(offset)).unwrap_or(0);
    let firstlineno = u32_at(&buf, usize::from(o.firstlineno)).unwrap_or(0);
    let code_bytes = o.code_adaptive.map(|_| {
        u64_at(&buf, OB_SIZE as usize)
            .unwrap_or(0)
            .saturating_mul(2)
    });
    let function = read_string(
        memory,
        layout,
        word(o.qualname.unwrap_or(o.name)),
        MAX_NAME_CHARS,
    )?;
    let file = read_string(memory, layout, word(o.filename), MAX_FILE_CHARS)?;
    let line_table = read_bytes(memory, layout, word(o.linetable), MAX_LINE_TABLE_BYTES);
    Ok(CodeInfo {
        function,
        file,
        firstlineno,
        line_table,
        code_bytes,
    })
}

/// A `str` object's text: compact strings only (every identifier and file
/// name the compiler makes is one), each of the three kinds; anything else
/// reads as `?`, never as raw bytes of something that is not text.
fn read_string(
    memory: &ProcessMemory,
    layout: &CodeLayout,
    addr: u64,
    max_chars: u64,
) -> Result<String, MemoryError> {
    const UNREADABLE: &str = "?";
    if addr == 0 {
        return Ok(UNREADABLE.to_string());
    }
    let o = &layout.offsets;
    let mut header = [0u8; 40];
    memory.read(addr, &mut header)?;
    if u64_at(&header, OB_TYPE as usize) != Some(layout.unicode_type) {
        return Ok(UNREADABLE.to_string());
    }
    let length = u64_at(&header, OB_SIZE as usize).unwrap_or(0);
    let state = u32_at(&header, UNICODE_STATE as usize).unwrap_or(0);
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || !matches!(kind, 1 | 2 | 4) || (ascii && kind != 1) {
        return Ok(UNREADABLE.to_string());
    }
    let data = if ascii { o.ascii_size } else { o.compact_size };
    let chars = length.min(max_chars);
    let width = u64::from(kind);
    let len = usize::try_from(chars * width).unwrap_or(0);
    let bytes = memory.read_vec(addr + u64::from(data), len)?;
    let points: Vec<u32> = match kind {
        1 => bytes.iter().map(|&b| u32::from(b)).collect(),
        2 => bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_ne_bytes([c[0], c[1]])))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    // CPython keeps every string in the narrowest kind that holds it, and
    // names hold no NUL: anything else is not this string's text (a wrong
    // layout, or an object freed under us).
    let widest = points.iter().copied().max().unwrap_or(0);
    let needs = match widest {
        0..0x80 => 0,
        0x80..0x100 => 1,
        0x100..0x1_0000 => 2,
        _ => 4,
    };
    let fits = if ascii {
        needs == 0
    } else {
        // A cut string's widest character may lie past the cut.
        needs == kind || length > chars
    };
    if !fits || widest > 0x10_ffff || points.contains(&0) {
        return Ok(UNREADABLE.to_string());
    }
    // NB: lone surrogates (file names decoded with surrogateescape) are
    // valid in Python and not in Rust: they become `?`.
    let mut text: String = points
        .iter()
        .map(|&c| char::from_u32(c).unwrap_or('?'))
        .collect();
    if length > chars {
        text.push('…');
    }
    Ok(text)
}

/// A `bytes` object's contents, up to `max` bytes; `None` if it is not one,
/// is larger, or cannot be read.
fn read_bytes(
    memory: &ProcessMemory,
    layout: &CodeLayout,
    addr: u64,
    max: u64,
) -> Option<Box<[u8]>> {
    if addr == 0 {
        return None;
    }
    let mut header = [0u8; BYTES_DATA as usize];
    memory.read(addr, &mut header).ok()?;
    if u64_at(&header, OB_TYPE as usize) != Some(layout.bytes_type) {
        return None;
    }
    let size = u64_at(&header, OB_SIZE as usize)?;
    if size > max {
        return None;
    }
    let bytes = memory
        .read_vec(addr + BYTES_DATA, usize::try_from(size).ok()?)
        .ok()?;
    Some(bytes.into_boxed_slice())
}
