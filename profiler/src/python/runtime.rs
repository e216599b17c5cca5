//! Finding the CPython interpreter in a process: which mapped object holds
//! `_PyRuntime`, its version, load bias and struct layout.
//!
//! Everything is read from the interpreter's ELF file (symbols, `Py_Version`,
//! 3.13's `_Py_DebugOffsets` in the statically initialised `.PyRuntime`
//! section), never from the process, so a process that has not run
//! `Py_Initialize` yet (a `run` target right after exec) is found too.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};
use profiler_common::{PYTHON_FRAME_READ, PythonProcess};

use super::{
    PythonError,
    offsets::{self, CodeOffsets, VersionOffsets, debug_offsets},
};
use crate::process_maps::ProcessMaps;

/// Offset of glibc's `struct pthread.specific_1stblock` from the thread
/// pointer on x86-64: 0x310 in every glibc from 2.27 to 2.38 (Pyroscope's
/// per-version table), bookworm's 2.36 included. A key below 32 has its
/// value at `fsbase + 0x310 + key * 16 + 8`.
pub const GLIBC_TSD_OFFSET: u32 = 0x310;

/// A CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PythonVersion {
    pub major: u8,
    pub minor: u8,
    /// Known from `Py_Version` (3.11+), not from a file name.
    pub micro: Option<u8>,
}

impl std::fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(micro) = self.micro {
            write!(f, ".{micro}")?;
        }
        Ok(())
    }
}

impl PythonVersion {
    /// From `PY_VERSION_HEX`: `major << 24 | minor << 16 | micro << 8 | ...`.
    pub const fn from_hex(hex: u64) -> Self {
        Self {
            major: (hex >> 24) as u8,
            minor: (hex >> 16) as u8,
            micro: Some((hex >> 8) as u8),
        }
    }
}

/// The CPython interpreter of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonRuntime {
    /// The process it was found in.
    pub pid: u32,
    pub version: PythonVersion,
    /// The object defining `_PyRuntime` (libpython, or the executable when
    /// libpython is linked in), as the process maps it: native frames
    /// inside it are the interpreter's, where the Python stack takes over.
    pub interpreter: PathBuf,
    /// What the BPF walk needs, for `PY_PROCS`.
    pub process: PythonProcess,
    /// What the symbolizer needs.
    pub(super) code: CodeLayout,
    /// Where `interpreter` is loaded: its addresses in the process are its
    /// link-time ones plus this.
    pub(super) bias: u64,
}

impl PythonRuntime {
    /// Where this interpreter keeps a code object's names and line table,
    /// and which table format it uses.
    pub fn code_offsets(&self) -> &CodeOffsets {
        &self.code.offsets
    }
}

/// How to read code objects, strings and bytes in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CodeLayout {
    pub offsets: CodeOffsets,
    /// Runtime addresses of `PyCode_Type`, `PyUnicode_Type` and
    /// `PyBytes_Type`: an object whose `ob_type` is not the expected one is
    /// not read as one.
    pub code_type: u64,
    pub unicode_type: u64,
    pub bytes_type: u64,
}

/// Symbols of the interpreter object, as link-time addresses.
#[derive(Default)]
struct Symbols {
    runtime: Option<u64>,
    version: Option<u64>,
    none: Option<u64>,
    code_type: Option<u64>,
    unicode_type: Option<u64>,
    bytes_type: Option<u64>,
}

/// Finds the CPython interpreter of `pid` in its mappings. `Ok(None)` when
/// no mapped object defines `_PyRuntime` (not a CPython process); an error
/// for a CPython whose frames cannot be walked (see `PythonError`).
pub fn find_runtime(pid: u32, maps: &ProcessMaps) -> Result<Option<PythonRuntime>, PythonError> {
    for path in candidates(pid, maps) {
        match inspect(pid, maps, &path) {
            Ok(Some(runtime)) => return Ok(Some(runtime)),
            Ok(None) => {}
            // NB: an executable that cannot be read or parsed is not known
            // to be a Python; a libpython that cannot is.
            Err(error @ (PythonError::Read { .. } | PythonError::Elf { .. }))
                if !file_name(&path).starts_with("libpython") =>
            {
                tracing::debug!(pid, "not looking for python in {}: {error}", path.display());
            }
            Err(error) => return Err(error),
        }
    }
    Ok(None)
}

/// libpython first (with `--enable-shared` the executable only links it),
/// then the executable (libpython linked in, as Debian's).
fn candidates(pid: u32, maps: &ProcessMaps) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut add = |path: &Path| {
        if !paths.iter().any(|p| p == path) {
            paths.push(path.to_path_buf());
        }
    };
    for mapping in &maps.mappings {
        if let Some(path) = &mapping.path
            && file_name(path).starts_with("libpython")
        {
            add(path);
        }
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .filter(|exe| maps.mappings.iter().any(|m| m.path.as_ref() == Some(exe)))
        .or_else(|| maps.mappings.iter().find_map(|m| m.path.clone()));
    if let Some(exe) = exe {
        add(&exe);
    }
    paths
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn inspect(
    pid: u32,
    maps: &ProcessMaps,
    path: &Path,
) -> Result<Option<PythonRuntime>, PythonError> {
    let io_error = |source| PythonError::Read {
        pid,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(maps.host_path(path)).map_err(io_error)?;
    // NB: a pyenv libpython is ~25 MB with its DWARF: read only the parts
    // parsed (headers, symbol tables, a few words of data).
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|source| PythonError::Elf {
        pid,
        path: path.to_path_buf(),
        source,
    })?;
    let symbols = symbols(&elf);
    let Some(runtime_sym) = symbols.runtime else {
        if elf.section_by_name(".PyRuntime").is_some() {
            return Err(PythonError::Stripped {
                pid,
                path: path.to_path_buf(),
            });
        }
        // 3.6 and older have no _PyRuntime; every CPython has code objects.
        if symbols.code_type.is_some()
            && let Some(version) = version_from_name(file_name(path))
            && (version.major, version.minor) < (3, 8)
        {
            return Err(PythonError::UnsupportedVersion {
                pid,
                path: path.to_path_buf(),
                version,
            });
        }
        return Ok(None);
    };
    let version = match symbols.version {
        Some(addr) => {
            let hex = read_file_words(&elf, addr, 1)
                .and_then(|w| w.first().copied())
                .ok_or_else(|| PythonError::MissingSymbol {
                    pid,
                    path: path.to_path_buf(),
                    symbol: "Py_Version",
                })?;
            // NB: Py_Version is an unsigned long, so the high half of the
            // word read is zero, or another symbol: keep 32 bits.
            PythonVersion::from_hex(hex & 0xffff_ffff)
        }
        None => version_from_name(file_name(path)).ok_or_else(|| PythonError::UnknownVersion {
            pid,
            path: path.to_path_buf(),
        })?,
    };
    let unsupported = || PythonError::UnsupportedVersion {
        pid,
        path: path.to_path_buf(),
        version,
    };
    if version.major != 3 {
        return Err(unsupported());
    }
    let table = offsets::for_minor(version.minor).ok_or_else(unsupported)?;
    let offsets = if version.minor == 13 {
        from_debug_offsets(pid, path, &elf, runtime_sym, version, table)?
    } else {
        table
    };
    if let Some(libc) = musl(maps) {
        return Err(PythonError::Musl {
            pid,
            path: path.to_path_buf(),
            libc,
        });
    }
    let bias = load_bias(&elf, maps, path).ok_or_else(|| PythonError::NotMapped {
        pid,
        path: path.to_path_buf(),
    })?;
    let required = |addr: Option<u64>, symbol: &'static str| {
        addr.map(|a| a.wrapping_add(bias))
            .ok_or_else(|| PythonError::MissingSymbol {
                pid,
                path: path.to_path_buf(),
                symbol,
            })
    };
    let process = PythonProcess {
        tss_addr: bias
            .wrapping_add(runtime_sym)
            .wrapping_add(offsets.runtime_tss),
        none_addr: required(symbols.none, "_Py_NoneStruct")?,
        tsd_offset: GLIBC_TSD_OFFSET,
        version: (u32::from(version.major) << 8) | u32::from(version.minor),
        tstate_frame: offsets.tstate_frame,
        cframe_frame: offsets.cframe_frame,
        frame_code: offsets.frame_code,
        frame_back: offsets.frame_back,
        frame_instr: offsets.frame_instr,
        frame_owner: offsets.frame_owner,
        code_firstlineno: offsets.code.firstlineno,
        flags: offsets.flags,
    };
    let code = CodeLayout {
        offsets: offsets.code,
        code_type: required(symbols.code_type, "PyCode_Type")?,
        unicode_type: required(symbols.unicode_type, "PyUnicode_Type")?,
        bytes_type: required(symbols.bytes_type, "PyBytes_Type")?,
    };
    Ok(Some(PythonRuntime {
        pid,
        version,
        interpreter: path.to_path_buf(),
        process,
        code,
        bias,
    }))
}

fn symbols<'data, R: object::ReadRef<'data>>(elf: &object::File<'data, R>) -> Symbols {
    let mut found = Symbols::default();
    // .dynsym first: what the dynamic linker sees, and all a stripped
    // build keeps. NB: .symtab of a pyenv libpython has ~20k entries.
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if !symbol.is_definition() {
            continue;
        }
        let slot = match symbol.name() {
            Ok("_PyRuntime") => &mut found.runtime,
            Ok("Py_Version") => &mut found.version,
            Ok("_Py_NoneStruct") => &mut found.none,
            Ok("PyCode_Type") => &mut found.code_type,
            Ok("PyUnicode_Type") => &mut found.unicode_type,
            Ok("PyBytes_Type") => &mut found.bytes_type,
            _ => continue,
        };
        slot.get_or_insert(symbol.address());
        if found.runtime.is_some()
            && found.version.is_some()
            && found.none.is_some()
            && found.code_type.is_some()
            && found.unicode_type.is_some()
            && found.bytes_type.is_some()
        {
            break;
        }
    }
    found
}

/// `words` 64-bit words of initialised data at link-time address `addr`.
fn read_file_words<'data, R: object::ReadRef<'data>>(
    elf: &object::File<'data, R>,
    addr: u64,
    words: usize,
) -> Option<Vec<u64>> {
    let len = u64::try_from(words * 8).ok()?;
    let section = elf
        .sections()
        .find(|s| s.address() <= addr && addr < s.address() + s.size())?;
    let bytes = section.data_range(addr, len).ok()??;
    Some(
        bytes
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .collect(),
    )
}

/// `python3.11`, `libpython3.10.so.1.0`, `libpython3.9d.so`: the first
/// `python<major>.<minor>` in the name.
fn version_from_name(name: &str) -> Option<PythonVersion> {
    let rest = &name[name.find("python")? + "python".len()..];
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some(PythonVersion {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        micro: None,
    })
}

/// 3.13 publishes its own layout for out-of-process readers at the start
/// of `_PyRuntime`. Take the offsets from it (they are the interpreter's
/// own), refuse a free-threaded build, and keep the TSS key offset from
/// the table: the debug offsets have none.
fn from_debug_offsets<'data, R: object::ReadRef<'data>>(
    pid: u32,
    path: &Path,
    elf: &object::File<'data, R>,
    runtime: u64,
    version: PythonVersion,
    table: VersionOffsets,
) -> Result<VersionOffsets, PythonError> {
    let bad = |reason: String| PythonError::DebugOffsets {
        pid,
        path: path.to_path_buf(),
        reason,
    };
    let words = read_file_words(elf, runtime, debug_offsets::WORDS)
        .filter(|w| w.len() == debug_offsets::WORDS)
        .ok_or_else(|| bad("_PyRuntime has no initialised data in the file".into()))?;
    if words[0].to_le_bytes() != *debug_offsets::COOKIE {
        return Err(bad(
            "no \"xdebugpy\" cookie at the start of _PyRuntime".into()
        ));
    }
    let declared = PythonVersion::from_hex(words[debug_offsets::VERSION]);
    if (declared.major, declared.minor) != (version.major, version.minor) {
        return Err(bad(format!(
            "they describe python {declared}, Py_Version says {version}"
        )));
    }
    if words[debug_offsets::FREE_THREADED] != 0 {
        return Err(PythonError::FreeThreaded {
            pid,
            path: path.to_path_buf(),
            version,
        });
    }
    let field = |index: usize, name: &str| {
        u16::try_from(words[index]).map_err(|_| bad(format!("{name} = {:#x}", words[index])))
    };
    // NB: the BPF walk reads a frame as words: a pointer field must be
    // 8-aligned (the owner byte need not be).
    let frame_field = |index: usize, name: &str| {
        let offset = field(index, name)?;
        if usize::from(offset) + 8 > PYTHON_FRAME_READ {
            return Err(bad(format!(
                "{name} = {offset} is past the {PYTHON_FRAME_READ} bytes read per frame"
            )));
        }
        if offset % 8 != 0 && !name.ends_with("owner") {
            return Err(bad(format!("{name} = {offset} is not 8-aligned")));
        }
        Ok(offset)
    };
    if words[debug_offsets::BYTES_OB_SIZE] != offsets::OB_SIZE
        || words[debug_offsets::BYTES_OB_SVAL] != offsets::BYTES_DATA
    {
        return Err(bad("bytes objects have another layout".into()));
    }
    let code = CodeOffsets {
        firstlineno: field(debug_offsets::CODE_FIRSTLINENO, "code_object.firstlineno")?,
        filename: field(debug_offsets::CODE_FILENAME, "code_object.filename")?,
        name: field(debug_offsets::CODE_NAME, "code_object.name")?,
        qualname: Some(field(debug_offsets::CODE_QUALNAME, "code_object.qualname")?),
        linetable: field(debug_offsets::CODE_LINETABLE, "code_object.linetable")?,
        code_adaptive: Some(field(
            debug_offsets::CODE_ADAPTIVE,
            "code_object.co_code_adaptive",
        )?),
        line_format: table.code.line_format,
        ascii_size: field(
            debug_offsets::UNICODE_ASCII_SIZE,
            "unicode_object.asciiobject_size",
        )?,
        // NB: not in the debug offsets: the ASCII header plus utf8_length
        // and utf8 (3.12+).
        compact_size: table.code.compact_size,
    };
    let offsets = VersionOffsets {
        tstate_frame: field(
            debug_offsets::THREAD_STATE_CURRENT_FRAME,
            "thread_state.current_frame",
        )?,
        frame_code: frame_field(
            debug_offsets::FRAME_EXECUTABLE,
            "interpreter_frame.executable",
        )?,
        frame_back: frame_field(debug_offsets::FRAME_PREVIOUS, "interpreter_frame.previous")?,
        frame_instr: frame_field(
            debug_offsets::FRAME_INSTR_PTR,
            "interpreter_frame.instr_ptr",
        )?,
        frame_owner: frame_field(debug_offsets::FRAME_OWNER, "interpreter_frame.owner")?,
        code,
        ..table
    };
    if offsets != table {
        tracing::debug!(
            pid,
            path = %path.display(),
            "python {version}: _Py_DebugOffsets differ from memscope's 3.13 table: {offsets:?} vs {table:?}"
        );
    }
    Ok(offsets)
}

/// The musl loader or libc, if the process maps one: its thread-specific
/// data has another layout (`pthread.tsd`), not walked yet.
fn musl(maps: &ProcessMaps) -> Option<PathBuf> {
    maps.mappings.iter().find_map(|m| {
        let path = m.path.as_deref()?;
        let name = file_name(path);
        (name.starts_with("ld-musl-") || name.starts_with("libc.musl-")).then(|| path.to_path_buf())
    })
}

/// Runtime address minus link-time address, from the mapping of `path`
/// with the lowest file offset and the `PT_LOAD` segment holding it.
/// Zero for a non-PIE executable.
fn load_bias<'data, R: object::ReadRef<'data>>(
    elf: &object::File<'data, R>,
    maps: &ProcessMaps,
    path: &Path,
) -> Option<u64> {
    const PAGE: u64 = 0xfff;
    let mapping = maps
        .mappings
        .iter()
        .filter(|m| m.path.as_deref() == Some(path))
        .min_by_key(|m| m.file_offset)?;
    let segment = elf.segments().find(|s| {
        let (offset, size) = s.file_range();
        offset & !PAGE <= mapping.file_offset && mapping.file_offset < offset + size.max(1)
    })?;
    let (offset, _) = segment.file_range();
    Some(
        mapping
            .start
            .wrapping_sub(mapping.file_offset)
            .wrapping_add(offset)
            .wrapping_sub(segment.address()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_interpreter_file_names() {
        let v = |name| version_from_name(name).map(|v| (v.major, v.minor));
        assert_eq!(v("libpython3.10.so.1.0"), Some((3, 10)));
        assert_eq!(v("python3.8"), Some((3, 8)));
        assert_eq!(v("libpython3.9d.so"), Some((3, 9)));
        assert_eq!(v("python"), None);
        assert_eq!(v("python3"), None);
    }

    #[test]
    fn py_version_hex_holds_major_minor_micro() {
        let v = PythonVersion::from_hex(0x030b_02f0);
        assert_eq!((v.major, v.minor, v.micro), (3, 11, Some(2)));
        assert_eq!(v.to_string(), "3.11.2");
    }

    #[test]
    fn a_process_without_python_has_no_runtime() {
        let pid = std::process::id();
        let maps = ProcessMaps::read(pid).expect("own maps");
        assert_eq!(find_runtime(pid, &maps).expect("no error"), None);
    }
}
