//! Which image's malloc a process really calls: libc's, a preloaded or
//! linked allocator library's (jemalloc, tcmalloc, mimalloc export the same
//! malloc family and win symbol resolution), or the executable's own (a
//! statically linked program).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSymbol as _, ReadCache};

use crate::process_maps::ProcessMaps;

/// Allocator libraries that replace libc's malloc family when loaded.
const REPLACEMENT_ALLOCATORS: [(&str, &str); 3] = [
    ("libjemalloc", "jemalloc"),
    ("libtcmalloc", "tcmalloc"),
    ("libmimalloc", "mimalloc"),
];

/// Prefixed allocator entry points a program may call instead of malloc
/// (Rust's jemallocator and mimalloc crates, for instance): invisible to
/// malloc probes.
const PREFIXED_ALLOCATORS: [(&str, &str); 4] = [
    ("_rjem_malloc", "jemalloc (prefixed _rjem_)"),
    ("je_malloc", "jemalloc (prefixed je_)"),
    ("mi_malloc", "mimalloc (mi_ API)"),
    ("tc_malloc", "tcmalloc (tc_ API)"),
];

/// The image whose malloc family is probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorImage {
    /// As the process sees it.
    pub path: PathBuf,
    /// `glibc`, `jemalloc`, `tcmalloc`, `mimalloc` or `executable`.
    pub name: &'static str,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "pid {pid} has no malloc memscope can probe: no libc.so or allocator library is mapped{static_hint}; {what}"
)]
pub struct NoAllocator {
    pub pid: u32,
    static_hint: &'static str,
    what: String,
}

/// Finds the image that serves `pid`'s malloc, from its mappings and
/// executable (`exe` as the process sees it).
pub fn locate(maps: &ProcessMaps, exe: Option<&Path>) -> Result<AllocatorImage, NoAllocator> {
    if let Some(image) = preloaded_allocator(maps.pid) {
        return Ok(image);
    }
    if let Some(image) = replacement_library(maps) {
        return Ok(image);
    }
    if let Some(exe) = exe
        && defines_malloc(&maps.host_path(exe))
    {
        return Ok(AllocatorImage {
            path: exe.to_path_buf(),
            name: "executable",
        });
    }
    if let Some(path) = maps.find_library("libc.so") {
        return Ok(AllocatorImage {
            path: path.to_path_buf(),
            name: "glibc",
        });
    }
    let is_static = maps.find_library("ld-linux").is_none();
    Err(NoAllocator {
        pid: maps.pid,
        static_hint: if is_static { " (statically linked?)" } else { "" },
        what: "a stripped static binary has no malloc symbol to probe; build it with symbols or link it dynamically"
            .into(),
    })
}

/// Directories the dynamic loader searches by default.
pub(crate) const LIBRARY_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
    "/lib64",
    "/usr/lib",
    "/lib",
];

/// An allocator library the executable of `pid` links (its DT_NEEDED
/// names are in .dynstr): at the exec stop it is not mapped yet, but it
/// will serve malloc. Found in the default library directories only.
pub fn linked_allocator(maps: &ProcessMaps, exe: &Path) -> Option<AllocatorImage> {
    REPLACEMENT_ALLOCATORS
        .iter()
        .find_map(|(prefix, allocator)| {
            let path = crate::python::startup::linked_library(maps.pid, maps, exe, prefix)?;
            Some(AllocatorImage {
                path: std::fs::canonicalize(&path).unwrap_or(path),
                name: allocator,
            })
        })
}

/// Runs `read` on the ELF file at `path`, reading only the parts it looks
/// at: the process may be held at its exec meanwhile, and an executable
/// with a static libpython is megabytes, cold from disk on a fresh machine.
fn with_elf<T>(
    path: &Path,
    read: impl FnOnce(&object::File<'_, &ReadCache<File>>) -> T,
) -> Option<T> {
    let cache = ReadCache::new(File::open(path).ok()?);
    let elf = object::File::parse(&cache).ok()?;
    Some(read(&elf))
}

/// A mapped allocator library that replaces libc's malloc family.
pub fn replacement_library(maps: &ProcessMaps) -> Option<AllocatorImage> {
    REPLACEMENT_ALLOCATORS.iter().find_map(|(prefix, name)| {
        maps.find_library(prefix).map(|path| AllocatorImage {
            path: path.to_path_buf(),
            name,
        })
    })
}

/// An allocator library named in the process's LD_PRELOAD: at exec it is
/// not mapped yet, but it will serve malloc.
pub fn preloaded_allocator(pid: u32) -> Option<AllocatorImage> {
    let preload = crate::target::environment_variable(pid, "LD_PRELOAD")?;
    let preload = String::from_utf8_lossy(&preload);
    preload.split([':', ' ']).find_map(|entry| {
        let path = Path::new(entry);
        let file = path.file_name()?.to_str()?;
        REPLACEMENT_ALLOCATORS
            .iter()
            .find(|(prefix, _)| file.starts_with(prefix))
            .map(|(_, name)| AllocatorImage {
                // As the mappings will name it, so it is probed once.
                path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
                name,
            })
    })
}

/// Warnings about allocations the probes on `image` cannot see.
pub fn blind_spots(maps: &ProcessMaps, exe: Option<&Path>, image: &AllocatorImage) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(exe) = exe {
        let prefixed = with_elf(&maps.host_path(exe), |elf| {
            PREFIXED_ALLOCATORS
                .iter()
                .filter(|(symbol, _)| defines(elf, symbol))
                .map(|(_, allocator)| *allocator)
                .collect::<Vec<_>>()
        });
        for allocator in prefixed.into_iter().flatten() {
            warnings.push(format!(
                "{} uses {allocator}: those allocations bypass {}'s malloc and are not seen",
                exe.display(),
                image.name
            ));
        }
    }
    if image.name != "glibc" {
        warnings.push(format!(
            "malloc is served by {} ({}): it is probed instead of libc",
            image.name,
            image.path.display()
        ));
    }
    warnings
}

fn defines_malloc(path: &Path) -> bool {
    with_elf(path, |elf| defines(elf, "malloc") && defines(elf, "free")).unwrap_or(false)
}

/// Whether the ELF defines function `name` (dynamic or static symbols).
pub fn defines<'data, R: object::ReadRef<'data>>(elf: &object::File<'data, R>, name: &str) -> bool {
    elf.dynamic_symbols()
        .chain(elf.symbols())
        .any(|s| s.is_definition() && s.kind() == object::SymbolKind::Text && s.name() == Ok(name))
}

/// The executable of `pid` as it sees it (the target of /proc/PID/exe).
pub fn executable(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(lines: &str) -> ProcessMaps {
        ProcessMaps::parse(1, lines)
    }

    const LIBC: &str = "7f00-7f10 r-xp 00000000 fe:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                        7f20-7f30 r-xp 00000000 fe:01 3 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n";

    #[test]
    fn libc_serves_malloc_by_default() {
        let image = locate(&maps(LIBC), None).expect("libc");
        assert_eq!(image.name, "glibc");
        assert!(image.path.ends_with("libc.so.6"));
    }

    #[test]
    fn a_preloaded_jemalloc_wins_over_libc() {
        let text = format!(
            "7e00-7e10 r-xp 00000000 fe:01 9 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n{LIBC}"
        );
        let image = locate(&maps(&text), None).expect("jemalloc");
        assert_eq!(image.name, "jemalloc");
        let warnings = blind_spots(&maps(&text), None, &image);
        assert!(
            warnings[0].contains("probed instead of libc"),
            "{warnings:?}"
        );
    }

    #[test]
    fn no_libc_and_no_symbols_is_a_clear_error() {
        let text = "5500-5510 r-xp 00000000 fe:01 4 /nonexistent/static-app\n";
        let error = locate(&maps(text), Some(Path::new("/nonexistent/static-app")))
            .expect_err("nothing to probe");
        let message = error.to_string();
        assert!(message.contains("statically linked?"), "{message}");
    }
}
