//! An interpreter that is not mapped yet: at its exec, a program linked to a
//! shared libpython (pyenv's, `--enable-shared` builds) maps it only once
//! the dynamic loader runs, after memscope has let the exec go. Its
//! interpreter is found by where the loader will find the library, so that
//! a stop on the library's first initialisation step can be set up in time
//! (`attach::attach_python_start`).

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use object::{
    Object as _, ObjectSection as _,
    read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _},
};

use crate::process_maps::ProcessMaps;

/// Called once by every way into CPython 3.8+ (`Py_BytesMain`,
/// `Py_InitializeEx`, embedders), before any Python code runs, with
/// libpython mapped; exported by every version (3.13 no longer exports
/// `_PyRuntime_Initialize`, which 3.8 also calls again and again).
pub const START_SYMBOL: &str = "Py_InitializeFromConfig";

/// The libpython `exe` links (`DT_NEEDED`), where the dynamic loader will
/// find it: `DT_RPATH`/`DT_RUNPATH` (with `$ORIGIN`), `LD_LIBRARY_PATH`
/// from the process's environment, then the default directories. The path
/// is as the process sees it.
pub fn linked_libpython(pid: u32, maps: &ProcessMaps, exe: &Path) -> Option<PathBuf> {
    linked_library(pid, maps, exe, "libpython")
}

/// As `linked_libpython`, for the library whose name starts with `prefix`
/// (`libc.so`).
pub fn linked_library(pid: u32, maps: &ProcessMaps, exe: &Path, prefix: &str) -> Option<PathBuf> {
    // NB: only headers and the dynamic section are read: this runs while
    // the process is held at its exec, and an executable can be large.
    let file = std::fs::File::open(maps.host_path(exe)).ok()?;
    let cache = object::ReadCache::new(file);
    let (needed, search) = dynamic_entries(&cache)?;
    let name = needed
        .iter()
        .find(|name| name.starts_with(prefix) && name.contains(".so"))?;
    let origin = exe.parent().unwrap_or(Path::new("/"));
    let mut dirs: Vec<PathBuf> = search
        .iter()
        .flat_map(|paths| paths.split(':'))
        .filter(|dir| !dir.is_empty())
        .map(|dir| PathBuf::from(dir.replace("$ORIGIN", &origin.to_string_lossy())))
        .collect();
    dirs.extend(library_path(pid));
    dirs.extend(crate::allocator::LIBRARY_DIRS.iter().map(PathBuf::from));
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|path| maps.host_path(path).exists())
}

/// The file offset of the exported `symbol` in libpython (or a python
/// executable) at `host_path`, for a probe. NB: only headers and symbol
/// tables are read: a pyenv libpython is 25-30 MB with its DWARF, and this
/// runs while the process waits.
pub fn symbol_offset(host_path: &Path, symbol: &str) -> Option<u64> {
    use object::{ObjectSegment as _, ObjectSymbol as _};
    let file = std::fs::File::open(host_path).ok()?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let address = elf
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok(symbol))?
        .address();
    elf.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        (start..start + size)
            .contains(&address)
            .then(|| address - start + offset)
    })
}

/// `DT_NEEDED` names and the `DT_RPATH`/`DT_RUNPATH` lists of an ELF file.
fn dynamic_entries<'data, R: object::ReadRef<'data>>(
    bytes: R,
) -> Option<(Vec<String>, Vec<String>)> {
    let elf = object::read::elf::ElfFile64::<object::Endianness, R>::parse(bytes).ok()?;
    let endian = elf.endian();
    let dynstr = elf.section_by_name(".dynstr")?.data().ok()?;
    let string = |offset: u64| -> Option<String> {
        let rest = dynstr.get(usize::try_from(offset).ok()?..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    let (mut needed, mut search) = (Vec::new(), Vec::new());
    let header = elf.elf_header();
    for segment in header.program_headers(endian, bytes).ok()? {
        let Ok(Some(entries)) = segment.dynamic(endian, bytes) else {
            continue;
        };
        for entry in entries {
            let value = entry.d_val(endian);
            let tag = entry.d_tag(endian);
            if tag == object::elf::DT_NEEDED {
                needed.extend(string(value));
            } else if tag == object::elf::DT_RPATH || tag == object::elf::DT_RUNPATH {
                search.extend(string(value));
            }
        }
    }
    Some((needed, search))
}

/// `LD_LIBRARY_PATH` of a process, from its environment.
fn library_path(pid: u32) -> Vec<PathBuf> {
    crate::target::environment_variable(pid, "LD_LIBRARY_PATH")
        .map(|value| {
            value
                .split(|&b| b == b':')
                .filter(|dir| !dir.is_empty())
                .map(|dir| PathBuf::from(OsStr::from_bytes(dir)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that pyenv's shared-libpython interpreters are resolved to the
    /// library their loader maps, through their RUNPATH, and that each
    /// library has the start to stop at.
    #[test]
    fn finds_the_libpython_a_pyenv_interpreter_links() {
        let Ok(versions) = std::fs::read_dir("/root/.pyenv/versions") else {
            return;
        };
        let maps = ProcessMaps::read(std::process::id()).expect("own maps");
        let mut found = 0;
        for version in versions.flatten() {
            let name = version.file_name().to_string_lossy().into_owned();
            let mut parts = name.split('.');
            let (Some("3"), Some(minor)) = (parts.next(), parts.next()) else {
                continue;
            };
            let exe = version.path().join(format!("bin/python3.{minor}"));
            if !exe.exists() {
                continue;
            }
            let lib = version.path().join("lib");
            let expected = std::fs::read_dir(&lib).ok().and_then(|entries| {
                entries.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libpython3") && n.contains(".so."))
                })
            });
            let library = linked_libpython(std::process::id(), &maps, &exe);
            assert_eq!(library, expected, "{}", exe.display());
            // 3.8 brought Py_InitializeFromConfig (and the frames walked).
            if let Some(library) = library.filter(|_| minor.parse::<u32>().is_ok_and(|m| m >= 8)) {
                assert!(
                    symbol_offset(&library, START_SYMBOL).is_some(),
                    "{}",
                    library.display()
                );
            }
            found += 1;
        }
        eprintln!("resolved {found} pyenv interpreters");
    }

    #[test]
    fn a_program_without_libpython_links_none() {
        let maps = ProcessMaps::read(std::process::id()).expect("own maps");
        assert_eq!(
            linked_libpython(std::process::id(), &maps, Path::new("/bin/true")),
            None
        );
        // Debian's python3.11 has libpython linked in.
        assert_eq!(
            linked_libpython(std::process::id(), &maps, Path::new("/usr/bin/python3.11")),
            None
        );
    }
}
