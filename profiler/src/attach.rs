//! Puts memscope's programs on the target's allocator: libc's malloc family,
//! one pid-scoped multi-uprobe link for its entries and one for its returns
//! (perf-event uprobes, one per function, on kernels without them).

use std::{
    collections::BTreeSet,
    num::NonZeroU32,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf,
    programs::{
        UProbe,
        links::FdLink,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeLinkId, UProbeScope},
    },
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use profiler_common::alloc_kind;

use crate::{
    allocator::{self, AllocatorImage, NoAllocator},
    multi_uprobe::{
        self, ENTRY_PROGRAM, MultiLink, MultiPrograms, MultiUprobeError, ProbePoint, RETURN_PROGRAM,
    },
    probe_site::{entry_probe_site, return_probe_site},
    process_maps::ProcessMaps,
    watchdog::{LinkHandoff, WatchdogCopy},
};

/// One allocator function: its symbol, and the attach cookie (one of
/// `alloc_kind`) by which the shared programs tell it apart.
struct AllocatorFunction {
    symbol: &'static str,
    kind: u32,
    /// Functions without one (free) get their entry probe moved to a cheap
    /// site.
    return_probe: bool,
}

const fn function(symbol: &'static str, kind: u32, return_probe: bool) -> AllocatorFunction {
    AllocatorFunction {
        symbol,
        kind,
        return_probe,
    }
}

/// libc's allocator family. malloc_usable_size is not an allocation.
/// NB: free comes first: a block allocated while the family is being
/// attached must not have its free missed (it would look leaked).
const LIBC_ALLOCATOR: &[AllocatorFunction] = &[
    function("free", alloc_kind::FREE, false),
    function("malloc", alloc_kind::MALLOC, true),
    function("calloc", alloc_kind::CALLOC, true),
    function("realloc", alloc_kind::REALLOC, true),
    function("reallocarray", alloc_kind::REALLOCARRAY, true),
    function("posix_memalign", alloc_kind::POSIX_MEMALIGN, true),
    function("aligned_alloc", alloc_kind::ALIGNED_ALLOC, true),
    function("memalign", alloc_kind::MEMALIGN, true),
    function("valloc", alloc_kind::VALLOC, true),
    function("pvalloc", alloc_kind::PVALLOC, true),
];

/// Functions without which nothing useful can be measured.
const REQUIRED: [&str; 2] = ["malloc", "free"];

/// Where one function was probed, for the report and `--verbose`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
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
    #[error("aya made the link of {0}'s uprobe in a way memscope cannot keep (build bug)")]
    UnexpectedLink(&'static str),
    #[error("pid {0} is not a valid process id")]
    InvalidPid(u32),
    #[error(transparent)]
    Multi(#[from] MultiUprobeError),
}

/// A function of the library, located in the file.
#[derive(Debug)]
struct ResolvedSymbol {
    file_offset: u64,
    address: u64,
    /// The first bytes of the function, for the probe-site choice.
    prologue: Vec<u8>,
}

/// Probes on one process (or a tracepoint); detached when dropped (see
/// `detach`).
#[derive(Debug)]
pub struct ProbeLink {
    /// memscope's own descriptor.
    /// NB: declared before `copy`, so it is closed first: the watchdog's
    /// copy is then the last, and the kernel unregisters the probes when
    /// the watchdog closes it, in a process that is not being killed.
    #[expect(dead_code, reason = "held for its Drop")]
    link: LinkKind,
    /// The watchdog's copy, when it took one (see `watchdog`).
    copy: Option<WatchdogCopy>,
}

#[derive(Debug)]
enum LinkKind {
    /// A multi-uprobe link: a whole family at once.
    Multi(MultiLink),
    /// A BPF link aya made (a perf-event uprobe or a tracepoint, on
    /// kernels with BPF perf links): its descriptor can be copied by id.
    Fd(FdLink),
    /// One perf-event uprobe (kernels before 6.6, and `_exit`'s stop).
    Perf(#[expect(dead_code, reason = "held for its Drop")] UProbeLink),
    /// A lifecycle or mapped-memory tracepoint (kernels without BPF perf
    /// links).
    Tracepoint(
        #[expect(dead_code, reason = "held for its Drop")]
        aya::programs::trace_point::TracePointLink,
    ),
}

impl ProbeLink {
    fn new(link: LinkKind, handoff: Option<&Arc<LinkHandoff>>) -> Self {
        let copy = handoff.and_then(|handoff| {
            let fd = match &link {
                LinkKind::Multi(link) => link.as_fd().try_clone_to_owned().ok()?,
                LinkKind::Fd(link) => multi_uprobe::link_fd_by_id(link.info().ok()?.id()).ok()?,
                LinkKind::Perf(_) | LinkKind::Tracepoint(_) => return None,
            };
            handoff.keep(fd.as_fd())
        });
        Self { link, copy }
    }

    pub fn multi(link: MultiLink, handoff: Option<&Arc<LinkHandoff>>) -> Self {
        Self::new(LinkKind::Multi(link), handoff)
    }

    /// A tracepoint's link. None if aya made it in a way this version
    /// does not (a build bug: then it is already detached).
    pub fn tracepoint(
        link: aya::programs::trace_point::TracePointLink,
        handoff: Option<&Arc<LinkHandoff>>,
    ) -> Option<Self> {
        // NB: aya's conversion drops a link that is not a BPF link, and
        // aya makes BPF links exactly when the kernel has BPF perf links.
        let link = if aya::features().bpf_perf_link() {
            LinkKind::Fd(FdLink::try_from(link).ok()?)
        } else {
            LinkKind::Tracepoint(link)
        };
        Some(Self::new(link, handoff))
    }

    /// A perf-event uprobe's link; None as for `tracepoint`.
    fn perf(link: UProbeLink, handoff: Option<&Arc<LinkHandoff>>) -> Option<Self> {
        let link = if aya::features().bpf_perf_link() {
            LinkKind::Fd(FdLink::try_from(link).ok()?)
        } else {
            LinkKind::Perf(link)
        };
        Some(Self::new(link, handoff))
    }

    /// Whether the watchdog holds a copy: then dropping this one is cheap
    /// (the kernel unregisters the probes when the watchdog closes its).
    pub fn watchdog_has_copy(&self) -> bool {
        self.copy.is_some()
    }
}

/// The probes on one process, and what they cannot see.
#[derive(Debug, Default)]
pub struct Attached {
    pub probes: Vec<AttachedProbe>,
    pub warnings: Vec<String>,
    /// Detached when dropped: see `detach`.
    pub links: Vec<ProbeLink>,
}

/// The loaded kernel programs probes are made of.
pub struct Programs<'a> {
    pub ebpf: &'a mut Ebpf,
    /// None on kernels without multi-uprobe links: perf-event uprobes, one
    /// per function, then.
    pub multi: Option<&'a MultiPrograms>,
    pub sites: &'a mut SiteCache,
    /// `--follow image`: probes on the file for every process that maps
    /// it (the programs count only traced ones), instead of one process.
    pub every_process: bool,
    /// Where each new link's copy goes (the watchdog; see `ProbeLink`).
    pub handoff: Option<&'a Arc<LinkHandoff>>,
}

/// Probe sites by library file (device, inode): reading and parsing libc
/// costs milliseconds, and every forked child needs the same sites.
#[derive(Debug, Default)]
pub struct SiteCache(std::collections::HashMap<(u64, u64), FamilySites>);

impl SiteCache {
    fn sites(&mut self, host_path: &Path, library: &Path) -> Result<FamilySites, AttachError> {
        use std::os::unix::fs::MetadataExt as _;
        let read_error = |source| AttachError::ReadLibrary {
            path: host_path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(host_path).map_err(read_error)?;
        let key = (meta.dev(), meta.ino());
        if let Some(sites) = self.0.get(&key) {
            return Ok(sites.clone());
        }
        let bytes = std::fs::read(host_path).map_err(read_error)?;
        let elf = object::File::parse(&*bytes).map_err(|source| AttachError::ParseLibrary {
            path: host_path.to_path_buf(),
            source,
        })?;
        let sites = family_sites(&elf, library)?;
        for probe in &sites.probes {
            tracing::debug!(
                function = probe.function,
                offset = probe.entry_offset,
                emulated = probe.emulated,
                "probe site"
            );
        }
        self.0.insert(key, sites.clone());
        Ok(sites)
    }
}

/// Links detached together, in parallel, when dropped: also on an error
/// path (a failed exec), where one at a time the tracepoints alone took
/// most of a second.
#[derive(Debug, Default)]
pub struct LinkSet(pub Vec<ProbeLink>);

impl Drop for LinkSet {
    fn drop(&mut self) {
        detach(std::mem::take(&mut self.0));
    }
}

/// Detaches probe links. The watchdog's copies make that cheap here: only
/// memscope's descriptor closes, and the watchdog unregisters the probes.
/// The rest (links the watchdog could not take) wait in the kernel, ~3 ms
/// per uprobe link serialized, and ~50 ms per tracepoint for RCU grace
/// periods, which overlap in parallel.
pub fn detach(links: Vec<ProbeLink>) {
    const THREADS: usize = 64;
    let (handed, mut links): (Vec<_>, Vec<_>) =
        links.into_iter().partition(ProbeLink::watchdog_has_copy);
    drop(handed);
    if links.len() <= 1 {
        drop(links);
        return;
    }
    let per_thread = links.len().div_ceil(THREADS);
    std::thread::scope(|scope| {
        while !links.is_empty() {
            let rest = links.split_off(links.len().saturating_sub(per_thread));
            scope.spawn(move || drop(rest));
        }
    });
}

/// Detaches the links of processes that exit, as they exit (every uprobe
/// left registered on libc is one more filter the kernel runs at each mmap
/// of libc on the host), without holding up the event loop: the watchdog
/// unregisters those it has a copy of, and a thread of memscope's own the
/// others. Dropping it waits for what was sent.
pub struct Detacher {
    queue: Option<std::sync::mpsc::Sender<Vec<ProbeLink>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Default for Detacher {
    fn default() -> Self {
        let (queue, pending) = std::sync::mpsc::channel::<Vec<ProbeLink>>();
        let thread = std::thread::Builder::new()
            .name("detach".into())
            .spawn(move || {
                while let Ok(mut links) = pending.recv() {
                    // Whatever else is queued goes in the same parallel pass.
                    links.extend(pending.try_iter().flatten());
                    detach(links);
                }
            })
            .ok();
        Self {
            queue: Some(queue),
            thread,
        }
    }
}

impl Detacher {
    pub fn detach(&self, links: Vec<ProbeLink>) {
        let (handed, links): (Vec<_>, Vec<_>) =
            links.into_iter().partition(ProbeLink::watchdog_has_copy);
        // A close and a message each: no need for the thread.
        drop(handed);
        if links.is_empty() {
            return;
        }
        match (&self.queue, &self.thread) {
            (Some(queue), Some(_)) => {
                if let Err(unsent) = queue.send(links) {
                    detach(unsent.0);
                }
            }
            _ => detach(links),
        }
    }

    /// Waits until everything sent is detached.
    pub fn finish(&mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Detacher {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Attaches the allocator probes to process `pid`, whose mappings are
/// `maps`. Probes are scoped to that pid (every thread of it).
pub fn attach_allocator(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
) -> Result<(AllocatorImage, Attached), AttachError> {
    // A command memscope started is memscope itself until its exec (whose
    // image is checked again): not a program to look into.
    let exe =
        allocator::executable(pid).filter(|exe| std::env::current_exe().ok().as_ref() != Some(exe));
    let image = allocator::locate(maps, exe.as_deref())?;
    let attached = attach_image(programs, pid, maps, exe.as_deref(), &image)?;
    Ok((image, attached))
}

/// Where each function of the family is probed in one library.
#[derive(Clone, Debug)]
pub struct FamilySites {
    /// `_exit`, where a started command is stopped before its mappings go.
    exit: Option<ProbePoint>,
    probes: Vec<AttachedProbe>,
    entries: Vec<ProbePoint>,
    returns: Vec<ProbePoint>,
    /// (function, entry point, return point) for perf-event uprobes.
    functions: Vec<(&'static str, ProbePoint, Option<ProbePoint>)>,
}

fn family_sites(elf: &object::File<'_>, library: &Path) -> Result<FamilySites, AttachError> {
    let mut sites = FamilySites {
        exit: resolve(elf, "_exit").map(|symbol| ProbePoint {
            file_offset: symbol.file_offset,
            cookie: 0,
        }),
        probes: Vec::new(),
        entries: Vec::new(),
        returns: Vec::new(),
        functions: Vec::new(),
    };
    let mut probed_addresses = BTreeSet::new();
    for function in LIBC_ALLOCATOR {
        let Some(symbol) = resolve(elf, function.symbol) else {
            if REQUIRED.contains(&function.symbol) {
                return Err(AttachError::MissingSymbol {
                    path: library.to_path_buf(),
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
        // A return probe and its entry program share one trap.
        let arguments = alloc_kind::arguments(function.kind);
        let site = if function.return_probe {
            return_probe_site(&symbol.prologue, arguments)
        } else {
            entry_probe_site(&symbol.prologue, arguments)
        };
        let cookie = u64::from(function.kind);
        let entry = ProbePoint {
            file_offset: symbol.file_offset + site.offset,
            cookie,
        };
        let ret = function.return_probe.then_some(entry);
        sites.entries.push(entry);
        sites.returns.extend(ret);
        sites.functions.push((function.symbol, entry, ret));
        sites.probes.push(AttachedProbe {
            function: function.symbol.to_owned(),
            library: library.to_path_buf(),
            entry_offset: site.offset,
            emulated: site.emulated,
            return_probe: function.return_probe,
        });
    }
    Ok(sites)
}

/// Attaches the allocator probes to the malloc family of `image` (which
/// need not be mapped yet: uprobes go on the file); `exe` is the process's
/// executable, checked for allocators the probes cannot see.
pub fn attach_image(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    exe: Option<&Path>,
    image: &AllocatorImage,
) -> Result<Attached, AttachError> {
    let warnings = allocator::blind_spots(maps, exe, image);
    let attached = attach_family(programs, pid, maps, &image.path)?;
    Ok(Attached {
        warnings,
        ..attached
    })
}

/// Attaches the allocator probes to the malloc family of `library` in
/// process `pid`: all of it, with no look at what else the process maps
/// (for a forked child, whose images are its parent's).
pub fn attach_family(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    library: &Path,
) -> Result<Attached, AttachError> {
    let (scope, link_pid) = if programs.every_process {
        (UProbeScope::AllProcesses, 0)
    } else {
        let pid = NonZeroU32::new(pid).ok_or(AttachError::InvalidPid(pid))?;
        (UProbeScope::OneProcess(pid), pid.get())
    };
    let host_path = maps.host_path(library);
    let mut sites = programs.sites.sites(&host_path, library)?;
    let mut links = Vec::new();
    // NB: return probes before entry probes. A call caught between the two
    // then only misses its return (counted); the other order would leave
    // an entry that no return consumes, blocking the thread's slot.
    if let Some(multi) = programs.multi {
        let link_error = |source| match source {
            MultiUprobeError::Link { ref source, .. }
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                AttachError::ProbeConflict {
                    symbol: "the malloc family",
                    path: host_path.clone(),
                }
            }
            source => AttachError::Multi(source),
        };
        let created = std::time::Instant::now();
        links.extend(
            multi
                .attach(&host_path, &sites.entries, &sites.returns, link_pid)
                .map_err(link_error)?
                .into_iter()
                .map(|link| ProbeLink::multi(link, programs.handoff)),
        );
        tracing::debug!(link_pid, cost = ?created.elapsed(), "links created");
    } else {
        load_programs(programs.ebpf)?;
        let handoff = programs.handoff;
        for (symbol, entry, ret) in std::mem::take(&mut sites.functions) {
            if let Some(ret) = ret {
                links.push(attach_one(
                    programs.ebpf,
                    RETURN_PROGRAM,
                    symbol,
                    ret,
                    &host_path,
                    scope,
                    handoff,
                )?);
            }
            links.push(attach_one(
                programs.ebpf,
                ENTRY_PROGRAM,
                symbol,
                entry,
                &host_path,
                scope,
                handoff,
            )?);
        }
    }
    Ok(Attached {
        probes: sites.probes,
        warnings: Vec::new(),
        links,
    })
}

/// Stops `pid` when it calls libc's `_exit`, so that its mappings can be
/// read after its last allocation and before they are gone. Only for a
/// command memscope started: the stop is seen by its parent.
pub fn attach_exit_stop(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
) -> Result<Option<ProbeLink>, AttachError> {
    // The copy of memscope that will exec the command maps libc; without
    // it there is nothing to stop at.
    let Some(library) = maps.find_library("libc.so") else {
        return Ok(None);
    };
    attach_exit_stop_at(programs, pid, maps, library)
}

/// As `attach_exit_stop`, on `library` (the libc a program just executed
/// will map).
pub fn attach_exit_stop_at(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    library: &Path,
) -> Result<Option<ProbeLink>, AttachError> {
    const PROGRAM: &str = "exit_enter";
    const SYMBOL: &str = "_exit";
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(AttachError::InvalidPid(pid))?);
    let host_path = maps.host_path(library);
    if let Some(multi) = programs.multi {
        let Some(point) = programs.sites.sites(&host_path, library)?.exit else {
            return Ok(None);
        };
        return Ok(Some(ProbeLink::multi(
            multi.attach_exit_stop(&host_path, point, pid)?,
            programs.handoff,
        )));
    }
    let program = uprobe(programs.ebpf, PROGRAM)?;
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
    let handoff = programs.handoff;
    let link = take_link(program, link)?;
    ProbeLink::perf(link, handoff)
        .map(Some)
        .ok_or(AttachError::UnexpectedLink(SYMBOL))
}

/// Stops `pid` when its libpython (`library`, not mapped yet) starts
/// initialising, so that its interpreter is found before any Python code
/// runs (see `python::startup`). Multi-uprobe kernels only: elsewhere such
/// a process gets Python frames from the next maps refresh on.
pub fn attach_python_start(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    library: &Path,
) -> Result<Option<ProbeLink>, AttachError> {
    use crate::python::startup::START_SYMBOL;
    let kind = profiler_common::event_kind::PYTHON_START;
    attach_python_stop(programs, pid, maps, library, START_SYMBOL, kind)
}

/// Stops `pid` when its interpreter (`library`) starts finalizing, before
/// it frees every object: what the program held then is its end
/// (`memscope check`). Multi-uprobe kernels only.
pub fn attach_python_finalize(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    library: &Path,
) -> Result<Option<ProbeLink>, AttachError> {
    let kind = profiler_common::event_kind::FINALIZING;
    attach_python_stop(programs, pid, maps, library, "Py_FinalizeEx", kind)
}

fn attach_python_stop(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    library: &Path,
    symbol: &str,
    kind: u32,
) -> Result<Option<ProbeLink>, AttachError> {
    let Some(multi) = programs.multi else {
        return Ok(None);
    };
    let host_path = maps.host_path(library);
    let Some(file_offset) = crate::python::startup::symbol_offset(&host_path, symbol) else {
        return Ok(None);
    };
    let point = ProbePoint {
        file_offset,
        cookie: u64::from(kind),
    };
    Ok(Some(ProbeLink::multi(
        multi.attach_exit_stop(&host_path, point, pid)?,
        programs.handoff,
    )))
}

/// Probes the functions behind CPython's object allocator in `pid`
/// (`--python-objects` with `attach`): entry and return, so what they do
/// through malloc and mmap is theirs, but the free, entry only.
/// Multi-uprobe kernels only: `None` elsewhere.
pub fn attach_python_objects(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    allocator: &crate::python::objects::ObjectAllocator,
) -> Result<Option<Vec<ProbeLink>>, AttachError> {
    let Some(multi) = programs.multi else {
        return Ok(None);
    };
    let host_path = maps.host_path(&allocator.path);
    let point = |offset: u64, kind: u32| ProbePoint {
        file_offset: offset,
        cookie: u64::from(kind),
    };
    let entries: Vec<ProbePoint> = allocator
        .functions
        .iter()
        .map(|f| point(f.file_offset + f.entry_offset, f.kind))
        .collect();
    let returns: Vec<ProbePoint> = allocator
        .functions
        .iter()
        .filter(|f| f.has_return())
        .map(|f| point(f.file_offset + f.entry_offset, f.kind))
        .collect();
    let links = multi.attach(&host_path, &entries, &returns, pid)?;
    Ok(Some(
        links
            .into_iter()
            .map(|link| ProbeLink::multi(link, programs.handoff))
            .collect(),
    ))
}

/// Where a request handler (`--request-fn`) starts in the ELF file at
/// `host_path`: its file offset, if the file defines it.
pub fn handler_offset(host_path: &Path, function: &str) -> Option<u64> {
    let bytes = std::fs::read(host_path).ok()?;
    let elf = object::File::parse(&*bytes).ok()?;
    resolve(&elf, function).map(|symbol| symbol.file_offset)
}

/// Probes the request handler at `file_offset` of `library` in `pid`: its
/// entry opens a request on the thread, its return closes it (the
/// allocator programs, told by the `REQUEST` cookie). Multi-uprobe kernels
/// only: `None` elsewhere.
pub fn attach_request_fn(
    programs: &mut Programs<'_>,
    pid: u32,
    maps: &ProcessMaps,
    library: &Path,
    file_offset: u64,
) -> Result<Option<Vec<ProbeLink>>, AttachError> {
    let Some(multi) = programs.multi else {
        return Ok(None);
    };
    let link_pid = if programs.every_process { 0 } else { pid };
    let point = ProbePoint {
        file_offset,
        cookie: u64::from(alloc_kind::REQUEST),
    };
    let links = multi.attach(&maps.host_path(library), &[point], &[point], link_pid)?;
    Ok(Some(
        links
            .into_iter()
            .map(|link| ProbeLink::multi(link, programs.handoff))
            .collect(),
    ))
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    for name in [ENTRY_PROGRAM, RETURN_PROGRAM] {
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
    symbol: &'static str,
    point: ProbePoint,
    path: &Path,
    scope: UProbeScope,
    handoff: Option<&Arc<LinkHandoff>>,
) -> Result<ProbeLink, AttachError> {
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::AbsoluteOffset(point.file_offset),
        cookie: Some(point.cookie),
    };
    let probe = uprobe(ebpf, program)?;
    let link = probe.attach(point, path, scope).map_err(|source| {
        // The kernel rejects a second uprobe at one place whose
        // reference-counter offset differs (dmesg: ref_ctr_offset mismatch).
        if format!("{source:?}").contains("code: 22")
            || source.to_string().contains("Invalid argument")
        {
            AttachError::ProbeConflict {
                symbol,
                path: path.to_path_buf(),
            }
        } else {
            AttachError::Probe {
                symbol,
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let link = take_link(probe, link)?;
    ProbeLink::perf(link, handoff).ok_or(AttachError::UnexpectedLink(symbol))
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
        let site = entry_probe_site(&free.prologue, 1);
        assert!(
            site.emulated,
            "free's entry probe is single-stepped: {site:?}"
        );
    }
}
