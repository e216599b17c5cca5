//! Puts memscope's programs on the target's allocator: libc's malloc family,
//! one pid-scoped uprobe (and uretprobe) per function.

use std::{
    collections::BTreeSet,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use profiler_common::alloc_kind;

use crate::{
    allocator::{self, AllocatorImage, NoAllocator},
    probe_site::{ProbeSite, entry_probe_site},
    process_maps::ProcessMaps,
};

/// One allocator function and the programs that trace it.
struct AllocatorFunction {
    symbol: &'static str,
    /// Attach cookie: one of `alloc_kind`, read by shared programs.
    kind: u32,
    entry_program: &'static str,
    /// Return probe; functions without one (free) get their entry probe
    /// moved to a cheap site.
    return_program: Option<&'static str>,
}

const fn function(
    symbol: &'static str,
    kind: u32,
    entry_program: &'static str,
    return_program: Option<&'static str>,
) -> AllocatorFunction {
    AllocatorFunction {
        symbol,
        kind,
        entry_program,
        return_program,
    }
}

/// libc's allocator family. malloc_usable_size is not an allocation.
/// NB: free comes first: a block allocated while the family is being
/// attached must not have its free missed (it would look leaked).
const LIBC_ALLOCATOR: &[AllocatorFunction] = &[
    function("free", 0, "free_enter", None),
    function(
        "malloc",
        alloc_kind::MALLOC,
        "size_arg0_enter",
        Some("alloc_return"),
    ),
    function(
        "calloc",
        alloc_kind::CALLOC,
        "calloc_enter",
        Some("alloc_return"),
    ),
    function(
        "realloc",
        alloc_kind::REALLOC,
        "realloc_enter",
        Some("realloc_return"),
    ),
    function(
        "reallocarray",
        alloc_kind::REALLOCARRAY,
        "realloc_enter",
        Some("realloc_return"),
    ),
    function(
        "posix_memalign",
        alloc_kind::POSIX_MEMALIGN,
        "posix_memalign_enter",
        Some("posix_memalign_return"),
    ),
    function(
        "aligned_alloc",
        alloc_kind::ALIGNED_ALLOC,
        "size_arg1_enter",
        Some("alloc_return"),
    ),
    function(
        "memalign",
        alloc_kind::MEMALIGN,
        "size_arg1_enter",
        Some("alloc_return"),
    ),
    function(
        "valloc",
        alloc_kind::VALLOC,
        "size_arg0_enter",
        Some("alloc_return"),
    ),
    function(
        "pvalloc",
        alloc_kind::PVALLOC,
        "size_arg0_enter",
        Some("alloc_return"),
    ),
    function("free", 0, "free_enter", None),
];

/// Functions without which nothing useful can be measured.
const REQUIRED: [&str; 2] = ["malloc", "free"];

/// Where one function was probed, for the report and `--verbose`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttachedProbe {
    pub function: String,
    pub library: PathBuf,
    /// Entry-probe offset from the function's start.
    pub entry_offset: u64,
    /// Whether the kernel emulates the probed instruction (fast) or
    /// single-steps it (slow).
    pub emulated: bool,
    pub return_probe: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    NoAllocator(#[from] NoAllocator),
    #[error("cannot read {path}: {source}")]
    ReadLibrary {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path} as ELF: {source}")]
    ParseLibrary {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{path} does not export {symbol}: not a libc memscope knows how to probe")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error("BPF program {0} is missing from memscope's object (build bug)")]
    MissingProgram(&'static str),
    #[error("cannot load BPF program {name}: {source}")]
    Load {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the kernel refused a uprobe on {symbol} in {path} (EINVAL): another tracer (bcc's memleak, for one) holds a uprobe there registered differently; stop it and retry"
    )]
    ProbeConflict { symbol: &'static str, path: PathBuf },
    #[error("cannot attach a uprobe to {symbol} in {path}: {source}")]
    Probe {
        symbol: &'static str,
        path: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pid {0} is not a valid process id")]
    InvalidPid(u32),
}

/// A function of the library, located in the file.
#[derive(Debug)]
struct ResolvedSymbol {
    file_offset: u64,
    address: u64,
    /// The first bytes of the function, for the probe-site choice.
    prologue: Vec<u8>,
}

/// The probes on one process, and what they cannot see.
#[derive(Debug, Default)]
pub struct Attached {
    pub probes: Vec<AttachedProbe>,
    pub warnings: Vec<String>,
    /// Detached when dropped: see `detach`.
    pub links: Vec<UProbeLink>,
}

/// Detaches uprobe links. Each detach waits for an RCU grace period in the
/// kernel (about 0.2 s here), so one at a time 20 probes on each of 40
/// processes take minutes; in parallel the waits overlap.
pub fn detach(links: Vec<UProbeLink>) {
    const THREADS: usize = 32;
    if links.len() <= 1 {
        drop(links);
        return;
    }
    let per_thread = links.len().div_ceil(THREADS);
    let mut links = links;
    std::thread::scope(|scope| {
        while !links.is_empty() {
            let rest = links.split_off(links.len().saturating_sub(per_thread));
            scope.spawn(move || drop(rest));
        }
    });
}

/// Attaches the allocator probes to process `pid`, whose mappings are
/// `maps`. Probes are scoped to that pid (every thread of it).
pub fn attach_allocator(
    ebpf: &mut Ebpf,
    pid: u32,
    maps: &ProcessMaps,
) -> Result<Attached, AttachError> {
    let exe = allocator::executable(pid);
    let image = allocator::locate(maps, exe.as_deref())?;
    attach_image(ebpf, pid, maps, exe.as_deref(), &image)
}

/// Attaches the allocator probes to the malloc family of `image` (which
/// need not be mapped yet: uprobes go on the file); `exe` is the process's
/// executable, checked for allocators the probes cannot see.
pub fn attach_image(
    ebpf: &mut Ebpf,
    pid: u32,
    maps: &ProcessMaps,
    exe: Option<&Path>,
    image: &AllocatorImage,
) -> Result<Attached, AttachError> {
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(AttachError::InvalidPid(pid))?);
    let warnings = allocator::blind_spots(maps, exe, image);
    let library = image.path.as_path();
    let host_path = maps.host_path(library);
    let bytes = std::fs::read(&host_path).map_err(|source| AttachError::ReadLibrary {
        path: host_path.clone(),
        source,
    })?;
    let elf = object::File::parse(&*bytes).map_err(|source| AttachError::ParseLibrary {
        path: host_path.clone(),
        source,
    })?;

    load_programs(ebpf)?;
    let mut attached = Vec::new();
    let mut links = Vec::new();
    let mut probed_addresses = BTreeSet::new();
    for function in LIBC_ALLOCATOR {
        let Some(symbol) = resolve(&elf, function.symbol) else {
            if REQUIRED.contains(&function.symbol) {
                return Err(AttachError::MissingSymbol {
                    path: host_path,
                    symbol: function.symbol,
                });
            }
            continue;
        };
        // Aliases (aligned_alloc = memalign in some glibcs) share an address:
        // probing both would count each call twice.
        if !probed_addresses.insert(symbol.address) {
            continue;
        }
        let site = match function.return_program {
            // A return probe needs a trap at the entry anyway; the entry
            // program shares it.
            Some(_) => {
                let first = entry_probe_site(&symbol.prologue);
                ProbeSite {
                    offset: 0,
                    emulated: first.emulated && first.offset == 0,
                }
            }
            None => entry_probe_site(&symbol.prologue),
        };
        // NB: return probe before entry probe. A call caught between the two
        // then only misses its return (counted); the other order would leave
        // an entry that no return consumes, blocking the thread's slot.
        if let Some(return_program) = function.return_program {
            links.push(attach_one(
                ebpf,
                return_program,
                function,
                symbol.file_offset,
                &host_path,
                scope,
            )?);
        }
        links.push(attach_one(
            ebpf,
            function.entry_program,
            function,
            symbol.file_offset + site.offset,
            &host_path,
            scope,
        )?);
        tracing::debug!(
            function = function.symbol,
            offset = site.offset,
            emulated = site.emulated,
            "probe attached"
        );
        attached.push(AttachedProbe {
            function: function.symbol.to_owned(),
            library: library.to_path_buf(),
            entry_offset: site.offset,
            emulated: site.emulated,
            return_probe: function.return_program.is_some(),
        });
    }
    Ok(Attached {
        probes: attached,
        warnings,
        links,
    })
}

/// Stops `pid` when it calls libc's `_exit`, so that its mappings can be
/// read after its last allocation and before they are gone. Only for a
/// command memscope started: the stop is seen by its parent.
pub fn attach_exit_stop(
    ebpf: &mut Ebpf,
    pid: u32,
    maps: &ProcessMaps,
) -> Result<Option<UProbeLink>, AttachError> {
    const PROGRAM: &str = "exit_enter";
    const SYMBOL: &str = "_exit";
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(AttachError::InvalidPid(pid))?);
    // The copy of memscope that will exec the command maps libc; without
    // it there is nothing to stop at.
    let Some(library) = maps.find_library("libc.so") else {
        return Ok(None);
    };
    let host_path = maps.host_path(library);
    let program = uprobe(ebpf, PROGRAM)?;
    program.load().map_err(|source| AttachError::Load {
        name: PROGRAM,
        source,
    })?;
    let link = program
        .attach(UProbeAttachLocation::Symbol(SYMBOL), &host_path, scope)
        .map_err(|source| AttachError::Probe {
            symbol: SYMBOL,
            path: host_path.clone(),
            source,
        })?;
    take_link(program, link).map(Some)
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let names: BTreeSet<&'static str> = LIBC_ALLOCATOR
        .iter()
        .flat_map(|f| std::iter::once(f.entry_program).chain(f.return_program))
        .collect();
    for name in names {
        let program = uprobe(ebpf, name)?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|source| AttachError::Load { name, source })?;
        }
    }
    Ok(())
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, AttachError> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut UProbe>::try_from(p).ok())
        .ok_or(AttachError::MissingProgram(name))
}

fn attach_one(
    ebpf: &mut Ebpf,
    program: &'static str,
    function: &AllocatorFunction,
    file_offset: u64,
    path: &Path,
    scope: UProbeScope,
) -> Result<UProbeLink, AttachError> {
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(file_offset),
        cookie: Some(u64::from(function.kind)),
    };
    let probe = uprobe(ebpf, program)?;
    let link = probe.attach(point, path, scope).map_err(|source| {
        // The kernel rejects a second uprobe at one place whose
        // reference-counter offset differs (dmesg: ref_ctr_offset mismatch).
        if format!("{source:?}").contains("code: 22")
            || source.to_string().contains("Invalid argument")
        {
            AttachError::ProbeConflict {
                symbol: function.symbol,
                path: path.to_path_buf(),
            }
        } else {
            AttachError::Probe {
                symbol: function.symbol,
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    take_link(probe, link)
}

/// Owns a link apart from its program, so the session decides when (and
/// on which thread) it is detached.
fn take_link(probe: &mut UProbe, link: UProbeLinkId) -> Result<UProbeLink, AttachError> {
    probe.take_link(link).map_err(|source| AttachError::Load {
        name: "uprobe link",
        source,
    })
}

/// Finds an exported function and its file offset.
fn resolve(elf: &object::File<'_>, name: &str) -> Option<ResolvedSymbol> {
    const PROLOGUE_BYTES: u64 = 64;
    // A static executable's malloc is only in .symtab.
    let symbol = elf.dynamic_symbols().chain(elf.symbols()).find(|s| {
        s.is_definition() && s.kind() == object::SymbolKind::Text && s.name() == Ok(name)
    })?;
    let address = symbol.address();
    let section = elf.sections().find(|s| {
        let start = s.address();
        start <= address && address < start + s.size()
    })?;
    let (section_offset, _) = section.file_range()?;
    let file_offset = address - section.address() + section_offset;
    let data = section.data().ok()?;
    let start = usize::try_from(address - section.address()).ok()?;
    let len = usize::try_from(PROLOGUE_BYTES.min(symbol.size().max(1))).ok()?;
    let prologue = data.get(start..data.len().min(start + len))?.to_vec();
    Some(ResolvedSymbol {
        file_offset,
        address,
        prologue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_this_machines_libc_family() {
        let maps = ProcessMaps::read(std::process::id()).expect("own maps");
        let libc = maps
            .find_library("libc.so")
            .expect("test binary links libc");
        let bytes = std::fs::read(libc).expect("read libc");
        let elf = object::File::parse(&*bytes).expect("parse libc");
        for name in REQUIRED {
            let symbol = resolve(&elf, name).expect(name);
            assert!(!symbol.prologue.is_empty());
        }
        // glibc's free starts with `test %rdi,%rdi; je`: the probe moves to the je.
        let free = resolve(&elf, "free").expect("free");
        let site = entry_probe_site(&free.prologue);
        assert!(
            site.emulated,
            "free's entry probe is single-stepped: {site:?}"
        );
    }
}
