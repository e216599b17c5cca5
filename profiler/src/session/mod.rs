//! One profiling session: start or find the target, attach, wait for the
//! end (target exit, Ctrl-C, SIGTERM, deadline), then build the report from
//! whatever was collected.

mod child;
mod exits;
mod lifecycle;
mod push;
mod python;
mod requests;
mod teardown;
mod tree;

use std::{
    ffi::OsString,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use profiler_common::{StackKey, map_names};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

pub use self::requests::RequestOptions;
use crate::{
    alert::{Alert, AlertRules, AlertSite, Alerter, Sink, WindowFigures},
    attach::{self, AttachError, Attached, AttachedProbe, LinkSet, ProbeLink, Programs, SiteCache},
    bpf::{self, LoadError, MapCapacity},
    collect::{self, CollectError},
    completeness,
    follow::{self, FollowError},
    front::FrontTable,
    holds::Holds,
    multi_uprobe::{self, MultiPrograms, MultiUprobeError},
    peaks::{PeakError, SharedPeaks},
    preflight::{self, PreflightError},
    process_maps::ProcessMaps,
    processes::{Adjustments, Following, LiveSetError, ProcessRecord},
    report::{self, Report, ReportContext, TargetInfo},
    resources::{self, ResourceError},
    sampling::StackSample,
    symbolize::StackSymbolizer,
    target::{self, TargetError},
    timeline::{Timeline, WindowEnd},
    unwind::{UnwindMode, Unwinder},
    watchdog::{Watchdog, WatchdogError},
};

/// How often the target's mappings are re-read while it runs, so that code
/// it maps later (dlopen) can be symbolized after it exits.
const MAPS_REFRESH: Duration = Duration::from_millis(500);

/// Processes whose memory figures a window reads (see `read_memory`).
const MEMORY_READS_PER_WINDOW: usize = 32;

/// What to profile.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// Start this command (argv) suspended and profile it from its first instruction.
    Run(Vec<OsString>),
    /// Profile this running process from now on.
    Attach(u32),
}

/// Where the allocator probes go (`--follow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FollowMode {
    /// On each followed process: nothing else on the host traps, but each
    /// fork costs an attach (and a detach at its exit).
    #[default]
    Process,
    /// On the allocator's file, for every process that maps it, counted
    /// only for the followed ones: a fork costs no attach, but every
    /// process on the host using that allocator traps on each call.
    Image,
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub capacity: MapCapacity,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Put forked children under the same probes.
    pub follow_children: bool,
    /// Give each process its own site list in the report.
    pub per_process_sites: bool,
    pub follow_mode: FollowMode,
    /// Walk CPython processes' frames (see `python`).
    pub python_frames: bool,
    /// How native stacks are walked (see `unwind`).
    pub unwind: UnwindMode,
    /// Count CPython's small objects one by one (see `python::objects`).
    pub python_objects: bool,
    /// Close a window when an interpreter started by `run` begins to
    /// finalize (what its program held before the interpreter frees it
    /// all: `memscope check`'s end).
    pub python_teardown: bool,
    /// How long a window lasts (see `timeline`).
    pub window: Duration,
    /// Windows kept before neighbours merge (each merge doubles the
    /// window, as `window` then does for the next ones).
    pub max_windows: usize,
    /// Follow requests of this handler (see `requests`).
    pub requests: Option<RequestOptions>,
    /// How long a process may stay held (a fork before its probes are on,
    /// an exec, an exit) before the watchdog continues it (see `holds`).
    pub hold_budget: Duration,
    /// Walk the stacks of a byte sample of heap blocks only (see
    /// `sampling`).
    pub stack_sample: Option<StackSample>,
    /// Allocator probes whose programs record nothing: what the probes
    /// alone cost the target (`cargo xtask bench`).
    pub empty_programs: bool,
}

/// `--window` unless given.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            capacity: MapCapacity::default(),
            duration: None,
            follow_children: true,
            per_process_sites: false,
            follow_mode: FollowMode::Process,
            python_frames: true,
            unwind: UnwindMode::Auto,
            python_objects: false,
            window: DEFAULT_WINDOW,
            python_teardown: false,
            max_windows: crate::timeline::MAX_WINDOWS,
            requests: None,
            hold_budget: crate::holds::ATTACH_HOLD_BUDGET,
            stack_sample: None,
            empty_programs: false,
        }
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    TargetExited,
    Interrupted,
    Terminated,
    /// SIGHUP: the terminal or ssh session went away.
    HungUp,
    DurationElapsed,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Collect(#[from] CollectError),
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error(transparent)]
    LiveSet(#[from] LiveSetError),
    #[error(transparent)]
    MultiUprobe(#[from] MultiUprobeError),
    #[error("{0}")]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Watchdog(#[from] WatchdogError),
    #[error(transparent)]
    Peak(#[from] PeakError),
    #[error("cannot watch pid {pid}: {source}")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The signals that end a session (or report on the started child).
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    child_events: tokio::signal::unix::Signal,
    /// SIGUSR2 (`memscope mark`): close the current window now.
    mark: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
            child_events: signal(SignalKind::child())?,
            mark: signal(SignalKind::user_defined2())?,
        })
    }
}

/// The root process once its probes are on.
struct AttachedTarget {
    pid: u32,
    command: String,
    is_child: bool,
    attached: Attached,
    maps: ProcessMaps,
}

/// The kernel side before a target is attached: programs loaded, the
/// watchdog watching the held processes.
struct Kernel {
    ebpf: Ebpf,
    multi: Option<MultiPrograms>,
    sites: SiteCache,
    follow_mode: FollowMode,
    tracepoints: LinkSet,
    holds: Holds,
    /// `SessionOptions::hold_budget`, in ns.
    hold_budget_ns: u64,
    /// Gives the kernel each process's unwind rules, before its probes go
    /// on: a stack walked both ways would make two sites of one.
    unwinder: Unwinder,
    /// Continues whatever memscope leaves held, and unregisters the probes
    /// when memscope is gone (see `watchdog`).
    watchdog: Watchdog,
}

impl Kernel {
    fn load(options: &SessionOptions) -> Result<Self, SessionError> {
        let mut ebpf = bpf::load(options.capacity)?;
        if let Some(sample) = options.stack_sample {
            bpf::set_stack_sample(&mut ebpf, sample.mean_bytes)?;
        }
        // Before any map is taken out of `ebpf`: the programs are relocated
        // against all of them. Empty programs need session links, which
        // `load` refuses without.
        let multi = if multi_uprobe::supported() || options.empty_programs {
            Some(MultiPrograms::load(
                &ebpf,
                bpf::object(),
                options.empty_programs,
            )?)
        } else {
            tracing::info!("no multi-uprobe links (Linux < 6.6): one uprobe per function");
            None
        };
        let missing = || FollowError::Missing(map_names::HELD);
        let Some(aya::maps::Map::HashMap(held)) = ebpf.take_map(map_names::HELD) else {
            return Err(missing().into());
        };
        let map_error = |source| FollowError::Map {
            name: map_names::HELD,
            source,
        };
        let held_id = held.info().map_err(map_error)?.id();
        // Before anything can be stopped: from here on nothing memscope
        // stops outlives memscope, however it ends.
        let exe = std::env::current_exe().map_err(|source| WatchdogError::Spawn {
            exe: "/proc/self/exe".into(),
            source,
        })?;
        let hold_budget_ns = u64::try_from(options.hold_budget.as_nanos()).unwrap_or(u64::MAX);
        let watchdog = Watchdog::spawn(&exe, held_id, hold_budget_ns)?;
        if let (Some(config_fd), Some(traced_fd)) = (
            ebpf.map(map_names::CONFIG).and_then(multi_uprobe::map_fd),
            ebpf.map(map_names::TRACED).and_then(multi_uprobe::map_fd),
        ) {
            watchdog.give_maps(config_fd, traced_fd);
        }
        let holds = Holds::new(held).map_err(map_error)?;
        let tracepoints = LinkSet(
            follow::attach_lifecycle(
                &mut ebpf,
                options.follow_children,
                options.follow_mode == FollowMode::Image,
            )?
            .into_iter()
            .filter_map(|link| ProbeLink::tracepoint(link, Some(watchdog.links())))
            .collect(),
        );
        Ok(Self {
            ebpf,
            multi,
            sites: SiteCache::default(),
            follow_mode: options.follow_mode,
            tracepoints,
            holds,
            hold_budget_ns,
            unwinder: Unwinder::new(options.unwind, options.capacity.unwind_rows),
            watchdog,
        })
    }

    /// Gives the kernel `maps`' process's unwind rules, where they changed.
    fn describe_unwind(&mut self, maps: &ProcessMaps) {
        if let Err(error) = self.unwinder.describe(&mut self.ebpf, maps) {
            tracing::warn!(
                "pid {}: {error}; its stacks are walked by frame pointer",
                maps.pid
            );
        }
    }

    fn programs(&mut self) -> Programs<'_> {
        Programs {
            ebpf: &mut self.ebpf,
            multi: self.multi.as_ref(),
            sites: &mut self.sites,
            every_process: self.follow_mode == FollowMode::Image,
            handoff: Some(self.watchdog.links()),
        }
    }

    /// Whose probes serve `pid`: its own, or with `--follow image` the
    /// probes on every process (owner 0).
    fn probe_owner(&self, pid: u32) -> u32 {
        match self.follow_mode {
            FollowMode::Process => pid,
            FollowMode::Image => 0,
        }
    }
}

/// A target with memscope's probes on it.
pub struct Session {
    /// The programs, the held processes and the watchdog; its tracepoints
    /// are detached with the probes at the end.
    kernel: Kernel,
    pid: u32,
    command: String,
    /// Whether memscope started the target (and so is its parent).
    is_child: bool,
    probes: Vec<AttachedProbe>,
    symbolizer: StackSymbolizer,
    capacity: MapCapacity,
    started: Instant,
    /// `started` on the kernel's clock (CLOCK_MONOTONIC).
    started_ns: u64,
    /// The windows so far.
    timeline: Timeline,
    window: Duration,
    /// How long each window's snapshot took.
    tick_costs: Vec<Duration>,
    /// The merged live bytes, for a forked child's inherited blocks.
    shared_peaks: SharedPeaks,
    /// Most live heap blocks, read and taken out beside `LIVE`.
    front: FrontTable,
    /// Decides the alerts at each window's end, and where they go.
    alerter: Option<Alerter>,
    sinks: Vec<Box<dyn Sink>>,
    /// `--pprof-push`: each window's profile as it closes.
    pushes: Option<crate::output::push::WindowPushes>,
    alerts: Vec<Alert>,
    /// On a terminal: elapsed, live bytes, last window's growth, alerts.
    status: Option<indicatif::ProgressBar>,
    exit_code: Option<i32>,
    /// Lifecycle events from the kernel.
    events: Option<AsyncFd<RingBuf<MapData>>>,
    processes: Vec<ProcessRecord>,
    /// Processes still running, each watched by a pidfd; the session ends
    /// when none is left.
    alive: exits::LiveProcesses,
    /// Start time of each process in `alive` (see `proc_tree::identity`).
    start_times: std::collections::HashMap<u32, u64>,
    adjustments: Adjustments,
    per_process_sites: bool,
    /// See `SessionOptions::stack_sample`.
    stack_sample: Option<StackSample>,
    /// See `SessionOptions::python_frames`.
    python_frames: bool,
    /// See `SessionOptions::python_objects`.
    python_objects: bool,
    /// See `SessionOptions::python_teardown`.
    python_teardown: bool,
    warnings: Vec<String>,
    /// (process, image) pairs whose malloc family is probed.
    probed_images: std::collections::HashSet<(u32, std::path::PathBuf)>,
    /// Probe links by process; see `attach::detach` for why they are
    /// detached in parallel, off the event loop.
    links: std::collections::HashMap<u32, Vec<ProbeLink>>,
    /// Takes the links of processes that exited.
    detacher: attach::Detacher,
    /// How long putting each process's probes on took.
    attach_costs: Vec<Duration>,
    /// Exited children whose live-map entries are still to drop.
    exited_in_live_map: std::collections::HashSet<u32>,
    /// Taken by `wait`.
    signals: Option<Signals>,
    /// Set once the session ends: new processes are let go, not probed.
    tearing_down: bool,
    /// Python stacks already named (see `resolve_new_python_stacks`).
    python_stacks_seen: std::collections::HashSet<u64>,
    /// Processes looked at for CPython, and whether a libpython was mapped
    /// then (see `discover_late_python`).
    python_looked: std::collections::HashMap<u32, bool>,
    /// The object allocator probed in each process (`--python-objects`
    /// with `attach`); kept across an exec, so the same one is not probed
    /// twice.
    object_allocators: std::collections::HashMap<u32, crate::python::objects::ObjectAllocator>,
    /// With `--request-fn`.
    requests: Option<requests::Requests>,
    /// Address spaces read as processes stopped at their exit (`run`), for
    /// the mappings they still held (see `measure_mappings`).
    address_spaces: std::collections::HashMap<u32, crate::address_space::AddressSpace>,
    /// The arena heaps found in those address spaces, with the live blocks
    /// credited to them so far (an exited child's as they are dropped from
    /// the kernel map, the rest at the end).
    arenas: std::collections::HashMap<u32, crate::arenas::ProcessArenas>,
    /// Whether `measure_running` has run.
    measured_running: bool,
    /// The last process whose memory a window read (see `read_memory`).
    memory_cursor: u32,
    /// Request-tagged live blocks of exited processes, whose live sets were
    /// dropped from the kernel map (see `forget_exited`).
    kept_by_exited: Adjustments,
}

impl Session {
    /// Checks privileges, loads the BPF programs and attaches them. For
    /// `Run`, the command starts only once the probes are in place.
    pub fn start(spec: &TargetSpec, options: &SessionOptions) -> Result<Self, SessionError> {
        // The profile covers attach time too: probes go on one by one.
        let started = Instant::now();
        let started_ns = crate::holds::monotonic_ns();
        // Before anything can be interrupted: a SIGTERM between attach and
        // wait() must end the session with a report, not kill memscope.
        let signals =
            Signals::install().map_err(|source| SessionError::Watch { pid: 0, source })?;
        // A thread id resolves to its process; what cannot be profiled is
        // refused before anything loads.
        let spec = &match spec {
            TargetSpec::Attach(pid) => {
                let resolved = target::resolve_target(*pid, options.follow_children)?;
                if let Some(note) = &resolved.note {
                    eprintln!("memscope: {note}");
                }
                TargetSpec::Attach(resolved.pid)
            }
            TargetSpec::Run(argv) => TargetSpec::Run(argv.clone()),
        };
        if let TargetSpec::Run(argv) = spec {
            // Before privileges: a typo deserves its own message.
            let program = argv.first().ok_or(TargetError::EmptyCommand)?;
            target::resolve_command(program)?;
        }
        preflight::check_privileges()?;
        preflight::check_uprobes()?;
        // The live map's worst case counts: it grows while the target runs.
        resources::check_kernel_memory(
            options.capacity.reserved_bytes() + options.capacity.live_bytes_at_most(),
        )?;
        // Every followed process holds a link descriptor; sudo's soft
        // limit is 1024.
        let (before, now) = resources::raise_nofile_limit();
        tracing::debug!("descriptor limit {before} -> {now}");
        let mut kernel = Kernel::load(options)?;
        match spec {
            TargetSpec::Attach(pid) => {
                let pid = *pid;
                let maps = ProcessMaps::read(pid).map_err(|_| TargetError::NoSuchProcess(pid))?;
                // Per process: traced first, so what it forks while its
                // probes go on is held for its own. With --follow image the
                // probes (counting traced processes only) go on first: its
                // children are not held, and must find them on.
                let image_mode = options.follow_mode == FollowMode::Image;
                kernel.describe_unwind(&maps);
                if !image_mode {
                    follow::trace(&mut kernel.ebpf, pid)?;
                }
                let attach_started = Instant::now();
                let (image, attached) =
                    attach::attach_allocator(&mut kernel.programs(), pid, &maps)?;
                if image_mode {
                    follow::trace(&mut kernel.ebpf, pid)?;
                }
                let target = AttachedTarget {
                    pid,
                    command: target::command_line(pid),
                    is_child: false,
                    attached,
                    maps,
                };
                let mut session =
                    Self::new(kernel, target, options, (started, started_ns, signals))?;
                session.attach_costs.push(attach_started.elapsed());
                session
                    .probed_images
                    .insert((session.kernel.probe_owner(pid), image.path));
                if options.follow_children {
                    session.attach_descendants();
                }
                Ok(session)
            }
            TargetSpec::Run(argv) => {
                let mut env = Vec::new();
                if options.python_objects {
                    env.push((
                        crate::python::objects::ALLOCATOR_VARIABLE,
                        crate::python::objects::ONE_BY_ONE,
                    ));
                }
                let child = target::spawn_suspended(argv, &env)?;
                let attached = ProcessMaps::read(child.pid)
                    .map_err(|_| SessionError::from(TargetError::NoSuchProcess(child.pid)))
                    .and_then(|maps| {
                        let (image, mut attached) =
                            attach::attach_allocator(&mut kernel.programs(), child.pid, &maps)?;
                        attached.links.extend(attach::attach_exit_stop(
                            &mut kernel.programs(),
                            child.pid,
                            &maps,
                        )?);
                        follow::trace(&mut kernel.ebpf, child.pid)?;
                        Ok::<_, SessionError>((image, attached, maps))
                    });
                let (image, attached, maps) = match attached {
                    Ok(attached) => attached,
                    Err(error) => {
                        // Never leave a stopped child behind.
                        // SAFETY: plain syscall on our own child.
                        unsafe { libc::kill(child.pid as i32, libc::SIGKILL) };
                        target::reap(child.pid);
                        return Err(error);
                    }
                };
                let command = child.command().to_owned();
                let pid = child.resume()?;
                let target = AttachedTarget {
                    pid,
                    command,
                    is_child: true,
                    attached,
                    maps,
                };
                let mut session =
                    Self::new(kernel, target, options, (started, started_ns, signals))?;
                if options.python_objects {
                    session
                        .warnings
                        .extend(crate::python::objects::replaced_setting());
                }
                session
                    .probed_images
                    .insert((session.kernel.probe_owner(pid), image.path));
                if let Some(record) = session.processes.first_mut() {
                    record.following = Following::Started;
                }
                Ok(session)
            }
        }
    }

    fn new(
        kernel: Kernel,
        target: AttachedTarget,
        options: &SessionOptions,
        (started, started_ns, signals): (Instant, u64, Signals),
    ) -> Result<Self, SessionError> {
        let mut kernel = kernel;
        let shared_peaks = SharedPeaks::map(&kernel.ebpf)?;
        let front = FrontTable::map(&kernel.ebpf).map_err(PeakError::from)?;
        let AttachedTarget {
            pid,
            command,
            is_child,
            attached:
                Attached {
                    probes,
                    warnings,
                    links,
                },
            maps,
        } = target;
        let mut symbolizer = StackSymbolizer::new(pid);
        symbolizer.update_maps(maps.clone());
        let events = kernel
            .ebpf
            .take_map(map_names::EVENTS)
            .and_then(|map| RingBuf::try_from(map).ok())
            .ok_or(FollowError::Missing(map_names::EVENTS))?;
        // SAFETY: the ring buffer's descriptor lives as long as the AsyncFd.
        let events = unsafe { AsyncFd::register(events) }.map_err(|e| SessionError::Watch {
            pid,
            source: std::io::Error::other(e.to_string()),
        })?;
        let links = std::collections::HashMap::from([(kernel.probe_owner(pid), links)]);
        let mut alive =
            exits::LiveProcesses::new().map_err(|source| SessionError::Watch { pid, source })?;
        alive.insert(pid);
        let mut session = Self {
            kernel,
            pid,
            command: command.clone(),
            is_child,
            probes,
            symbolizer,
            capacity: options.capacity,
            started,
            started_ns,
            timeline: Timeline::with_max_windows(options.max_windows),
            window: options.window,
            tick_costs: Vec::new(),
            shared_peaks,
            front,
            alerter: None,
            sinks: Vec::new(),
            pushes: None,
            alerts: Vec::new(),
            status: None,
            exit_code: None,
            events: Some(events),
            processes: vec![ProcessRecord::new(
                pid,
                None,
                command,
                0.0,
                Following::Attached,
            )],
            alive,
            start_times: crate::proc_tree::identity(pid)
                .map(|(start, _)| (pid, start))
                .into_iter()
                .collect(),
            adjustments: Adjustments::new(),
            per_process_sites: options.per_process_sites,
            stack_sample: options.stack_sample,
            python_frames: options.python_frames,
            python_objects: options.python_objects,
            python_teardown: options.python_teardown,
            warnings,
            probed_images: std::collections::HashSet::new(),
            links,
            detacher: attach::Detacher::default(),
            attach_costs: Vec::new(),
            exited_in_live_map: std::collections::HashSet::new(),
            signals: Some(signals),
            tearing_down: false,
            python_stacks_seen: std::collections::HashSet::new(),
            python_looked: std::collections::HashMap::new(),
            object_allocators: std::collections::HashMap::new(),
            requests: None,
            address_spaces: std::collections::HashMap::new(),
            arenas: std::collections::HashMap::new(),
            measured_running: false,
            memory_cursor: 0,
            kept_by_exited: Adjustments::new(),
        };
        if let Some(options) = &options.requests {
            session.requests = Some(requests::Requests::start(
                &mut session.kernel.ebpf,
                options.clone(),
            )?);
            session.probe_request_fn(pid, &maps);
        }
        // A command memscope starts is still memscope's own copy: its
        // interpreter, if any, is looked for at its exec.
        if !is_child {
            session.discover_python(pid, &maps);
        }
        Ok(session)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn command(&self) -> &str {
        &self.command
    }

    pub fn probes(&self) -> &[AttachedProbe] {
        &self.probes
    }

    /// Raises alerts by `rules` at each window's end, into `sinks`.
    pub fn set_alerts(&mut self, rules: AlertRules, sinks: Vec<Box<dyn Sink>>) {
        self.alerter = Some(Alerter::new(rules));
        self.sinks = sinks;
    }

    /// Shows a status line on stderr, updated at each window's end.
    pub fn show_status(&mut self) {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} memscope {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar.set_message(format!(
            "pid {}: first window in {:?}",
            self.pid, self.window
        ));
        bar.enable_steady_tick(Duration::from_millis(500));
        self.status = Some(bar);
    }

    /// Kernel memory the session's maps reserve.
    pub fn reserved_bytes(&self) -> u64 {
        self.capacity.reserved_bytes()
    }

    /// Kernel memory the live map may grow to (`--max-live`).
    pub fn live_bytes_at_most(&self) -> u64 {
        self.capacity.live_bytes_at_most()
    }

    /// Waits for the end of the session and returns why it ended.
    pub async fn wait(&mut self, duration: Option<Duration>) -> Result<StopReason, SessionError> {
        let watch_error = |source| SessionError::Watch {
            pid: self.pid,
            source,
        };
        let Signals {
            mut interrupt,
            mut terminate,
            mut hangup,
            mut child_events,
            mut mark,
        } = self.signals.take().ok_or_else(|| {
            watch_error(std::io::Error::other("the session was already waited for"))
        })?;
        let deadline =
            tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::from(u32::MAX))));
        tokio::pin!(deadline);
        let mut refresh = tokio::time::interval(MAPS_REFRESH);
        let mut window =
            tokio::time::interval_at(tokio::time::Instant::now() + self.window, self.window);
        window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut events = self.events.take();
        let mut request_ring = self.requests.as_mut().and_then(|r| r.ring.take());
        let mut request_poll = tokio::time::interval(requests::REQUEST_POLL);
        // A stop or exit of our child before the SIGCHLD stream existed was
        // not delivered to it: look once now (and at every refresh tick).
        if self.is_child {
            self.handle_child_event(&mut events);
        }
        let reason = loop {
            if self.alive.is_empty() {
                break StopReason::TargetExited;
            }
            tokio::select! {
                // The guarantee behind the EXIT events (see `exits`).
                exited = self.alive.exited() => {
                    for pid in exited {
                        self.exit_seen(pid);
                    }
                }
                guard = lifecycle::readable(&mut events) => {
                    if let Ok(mut guard) = guard {
                        self.drain_events(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                }
                guard = lifecycle::readable(&mut request_ring) => {
                    if let Ok(mut guard) = guard {
                        self.drain_requests(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                }
                // The kernel wakes the reader only when the ring fills.
                _ = request_poll.tick(), if request_ring.is_some() => {
                    if let Some(ring) = request_ring.as_mut() {
                        self.drain_requests(ring.get_mut());
                    }
                }
                _ = interrupt.recv() => break StopReason::Interrupted,
                _ = terminate.recv() => break StopReason::Terminated,
                _ = hangup.recv() => break StopReason::HungUp,
                _ = &mut deadline => break StopReason::DurationElapsed,
                _ = child_events.recv(), if self.is_child => {
                    self.handle_child_event(&mut events);
                }
                _ = window.tick() => {
                    let merges = self.timeline.merges();
                    self.close_window(WindowEnd::Timer);
                    if self.timeline.merges() > merges {
                        // The windows merged two by two: the next ones
                        // are as long as they now are.
                        self.window *= 2;
                        window = tokio::time::interval_at(
                            tokio::time::Instant::now() + self.window,
                            self.window,
                        );
                        window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                _ = mark.recv() => {
                    self.close_window(WindowEnd::Mark);
                    // The next window is a whole one.
                    window.reset();
                }
                _ = refresh.tick() => {
                    self.refresh_maps();
                    self.forget_exited();
                    if self.is_child {
                        self.handle_child_event(&mut events);
                    }
                }
            }
        };
        self.events = events;
        if let Some(requests) = self.requests.as_mut() {
            requests.ring = request_ring;
        }
        if let Some(status) = self.status.take() {
            status.finish_and_clear();
        }
        // What the processes hold, read before the command is signalled:
        // its workers may go with it, unstopped, their mappings unread.
        self.measure_running();
        if self.is_child {
            self.finish_child(reason).await;
        }
        self.stop_holding();
        // A second Ctrl-C (or SIGTERM) from here on ends memscope at once:
        // nothing is held any more, and the watchdog sees to late stops.
        teardown::restore_default_signals();
        Ok(reason)
    }

    /// Re-reads the mappings of every running process: for symbolization
    /// after they exit, and to notice an allocator library mapped late.
    fn refresh_maps(&mut self) {
        let mut seen = Vec::new();
        let mut gone = Vec::new();
        for pid in self.alive.iter() {
            // Its pid may be another process's by now (its exit not seen
            // yet): that one's mappings would name its frames wrong.
            if !self.still_the_same(pid) {
                gone.push(pid);
                continue;
            }
            match ProcessMaps::read(pid) {
                // Read before it began to exit, or not at all: an exiting
                // process's mappings go one by one.
                Ok(_) if crate::proc_tree::exiting(pid) => {}
                // And read from it: it ran throughout the read.
                Ok(_) if !self.still_the_same(pid) => gone.push(pid),
                Ok(maps) if !maps.mappings.is_empty() => {
                    self.symbolizer.update_maps(maps.clone());
                    seen.push((pid, maps));
                }
                // Exited (a zombie has no mappings): its exit event may
                // have been lost, and must not keep the session alive.
                _ => gone.push(pid),
            }
        }
        for pid in gone {
            if pid != self.pid || !self.is_child {
                self.exit_seen(pid);
            }
        }
        for (pid, maps) in &seen {
            self.kernel.describe_unwind(maps);
            self.probe_request_fn(*pid, maps);
        }
        self.discover_late_python(&seen);
        self.resolve_new_python_stacks();
        self.probe_late_allocators(seen);
    }

    /// The sites' figures as a window or the report counts them: estimated
    /// from the walked blocks with `--stack-sample`.
    fn estimated(
        &self,
        recorded: std::collections::BTreeMap<StackKey, profiler_common::StackTotals>,
    ) -> std::collections::BTreeMap<StackKey, profiler_common::StackTotals> {
        match self.stack_sample {
            Some(sample) => sample.estimate(&recorded),
            None => recorded,
        }
    }

    /// With `--stack-sample`: the malloc family's exact totals, which the
    /// windows keep beside their sites' estimates.
    fn exact_malloc(
        &self,
        recorded: &std::collections::BTreeMap<StackKey, profiler_common::StackTotals>,
    ) -> Option<profiler_common::StackTotals> {
        self.stack_sample
            .map(|_| crate::timeline::malloc_sum(recorded))
    }

    /// Closes the current window: the kernel's totals now, read while the
    /// target runs (no map is locked, nothing waits on memscope).
    fn close_window(&mut self, closed_by: WindowEnd) {
        let began = Instant::now();
        let totals = match collect::read_totals(&self.kernel.ebpf) {
            Ok(totals) => totals,
            Err(error) => {
                tracing::warn!("window not closed: {error}");
                return;
            }
        };
        let recorded = report::combined_totals(&totals, &self.adjustments);
        let exact = self.exact_malloc(&recorded);
        let cumulative = self.estimated(recorded);
        let held = self.pushes.is_some().then(|| push::held(&cumulative));
        let memory = self.read_memory(Some(MEMORY_READS_PER_WINDOW));
        let rss_bytes = memory.rss_bytes;
        if self
            .timeline
            .close(self.now(), cumulative, rss_bytes, closed_by)
            .is_none()
        {
            return;
        }
        if let Some(exact) = exact {
            self.timeline.set_last_exact(exact);
        }
        if let Some(held) = held {
            self.push_last_window(&held);
        }
        if memory.processes > 0 {
            self.timeline.set_last_memory(memory);
        }
        let Some(window) = self.timeline.windows().last() else {
            return;
        };
        let change = window.malloc_changes();
        tracing::debug!(
            "window {:.1}-{:.1}s ({closed_by:?}): +{} -{} bytes, live {}, rss {}; {} stacks read in {:?}",
            window.start_s,
            window.end_s,
            change.alloc_bytes,
            change.free_bytes,
            window.live_bytes,
            window.rss_bytes,
            totals.len(),
            began.elapsed()
        );
        let (end_s, live_bytes) = (window.end_s, window.live_bytes);
        // Only the few stacks an alert may name leave the window's borrow.
        let growers = if self.alerter.is_some() {
            top_growers(&window.changes)
        } else {
            Vec::new()
        };
        // After the close: past MAX_WINDOWS the windows before were merged.
        let index = self.timeline.windows().len() - 1;
        // Said where a load script that marks can wait for it.
        if closed_by == WindowEnd::Mark {
            eprintln!(
                "memscope: window {index} closed at {end_s:.3}s: {:+} bytes, {live_bytes} live",
                change.growth_bytes(),
            );
        }
        self.tick_costs.push(began.elapsed());
        let figures = WindowFigures {
            index,
            end_s,
            growth_bytes: change.growth_bytes(),
            rss_bytes,
            top_sites: Vec::new(),
        };
        self.raise_alerts(figures, &growers);
        if let Some(status) = &self.status {
            status.set_message(format!(
                "pid {}: {end_s:.0}s, live {}, {:+} bytes in window {index}, {} alerts",
                self.pid,
                crate::units::format_bytes(live_bytes),
                change.growth_bytes(),
                self.alerts.len()
            ));
        }
    }

    /// Alerts for a window just closed, to every sink.
    fn raise_alerts(&mut self, mut figures: WindowFigures, growers: &[(StackKey, i64)]) {
        if self.alerter.is_none() {
            return;
        }
        figures.top_sites = self.name_sites(growers);
        let Some(alerter) = self.alerter.as_mut() else {
            return;
        };
        for alert in alerter.on_window(&figures) {
            self.send_alert(alert);
        }
    }

    fn send_alert(&mut self, alert: Alert) {
        for sink in &mut self.sinks {
            sink.send(&alert);
        }
        self.alerts.push(alert);
    }

    /// The sites that grew most, named now (the report names them all at
    /// the end). Workers allocate from the same stacks: stacks named alike
    /// are one site.
    fn name_sites(&mut self, growers: &[(StackKey, i64)]) -> Vec<AlertSite> {
        let mut sites: Vec<AlertSite> = Vec::new();
        for (key, growth_bytes) in growers {
            let ips = collect::read_stack(&self.kernel.ebpf, key.stack_id);
            let python = collect::read_python_stack(&self.kernel.ebpf, key.python_stack);
            let symbolizer = &mut self.symbolizer;
            let frames = report::key_frames(
                key,
                ips.as_deref(),
                python.as_ref(),
                &mut |pid, ips, python| symbolizer.symbolize_with_python(pid, ips, python),
            );
            let site = report::Frame::chain(&frames, 4);
            match sites.iter_mut().find(|s| s.site == site) {
                Some(same) => same.growth_bytes += growth_bytes,
                None => sites.push(AlertSite {
                    site,
                    growth_bytes: *growth_bytes,
                }),
            }
        }
        sites.sort_by_key(|s| std::cmp::Reverse(s.growth_bytes));
        sites.truncate(crate::alert::ALERT_SITES);
        sites
    }

    /// Now, in seconds into the session and on the kernel's clock.
    fn now(&self) -> (f64, u64) {
        (
            self.started.elapsed().as_secs_f64(),
            crate::holds::monotonic_ns(),
        )
    }

    /// Reads `pid`'s address space (at its exit stop, or at the end) for
    /// its mappings and arena heaps.
    pub(super) fn read_address_space(&mut self, pid: u32) {
        match crate::address_space::AddressSpace::read(pid) {
            Ok(space) => {
                self.arenas
                    .insert(pid, crate::arenas::ProcessArenas::of(&space));
                let by_size = space.by_size();
                if let Some(record) = self.record_mut(pid) {
                    record.anon_mappings = by_size;
                }
                self.address_spaces.insert(pid, space);
            }
            Err(error) => tracing::debug!(pid, "address space not read: {error}"),
        }
    }

    /// Reads the address space and memory figures of every running
    /// followed process, for the report (once: at the end of `wait`, or by
    /// `report` if it comes first).
    fn measure_running(&mut self) {
        if self.measured_running {
            return;
        }
        self.measured_running = true;
        let running: Vec<u32> = self.alive.iter().collect();
        for pid in running {
            self.read_address_space(pid);
        }
        self.read_memory(None);
    }

    /// What each live mapping outside malloc holds: from the address
    /// spaces read as processes stopped at their exit, else at the end for
    /// those still running; a process read neither way is left unmeasured.
    fn measure_mappings(&self, mappings: &[(StackKey, u64, u64)]) -> crate::report::Measured {
        let mut measured = crate::report::Measured::new();
        for &(key, addr, size) in mappings {
            let Some(space) = self.address_spaces.get(&key.tgid) else {
                continue;
            };
            let entry = measured.entry(key).or_default();
            entry.0 += size;
            entry.1.add(space.figures(addr, size));
        }
        measured
    }

    /// The running followed processes' memory figures, summed; each one's
    /// goes to its record. With `limit`, only that many are read, in turn
    /// from where the last read stopped, and the others count at their
    /// last figures: one smaps_rollup walks a process's page tables (0.1
    /// to a few ms), too much for every window of a hundred workers.
    fn read_memory(&mut self, limit: Option<usize>) -> crate::process_memory::MemoryFigures {
        let alive: Vec<u32> = self.alive.iter().collect();
        let read: Vec<u32> = match limit {
            Some(limit) if alive.len() > limit => {
                let from = alive.partition_point(|&pid| pid <= self.memory_cursor);
                let read: Vec<u32> = alive
                    .iter()
                    .cycle()
                    .skip(from)
                    .take(limit)
                    .copied()
                    .collect();
                self.memory_cursor = read.last().copied().unwrap_or(0);
                read
            }
            _ => alive.clone(),
        };
        let (each, _) = crate::process_memory::read_all(read.into_iter());
        for (pid, figures) in each {
            if let Some(record) = self.record_mut(pid) {
                record.memory = Some(figures);
            }
        }
        let mut sum = crate::process_memory::MemoryFigures::default();
        for pid in alive {
            let last = self.processes.iter().rev().find(|p| p.pid == pid);
            if let Some(figures) = last.and_then(|p| p.memory.as_ref()) {
                sum.add(figures);
            }
        }
        sum
    }

    /// Reads the kernel maps and builds the report of everything so far.
    pub fn report(&mut self) -> Result<Report, SessionError> {
        // Processes forked since the end (with --follow image they count).
        // NB: the snapshot right after the drain: a child forked between
        // the two would be counted without its record, one recorded after
        // the snapshot without its allocations; the mappings (a slow read)
        // are refreshed before, not between, and the processes' memory and
        // address spaces read before that (unless `wait` did).
        self.measure_running();
        self.refresh_maps();
        self.drain_pending_events();
        let snapshot = collect::read_snapshot(&self.kernel.ebpf, &self.shared_peaks)?;
        let recorded = report::combined_totals(&snapshot.totals, &self.adjustments);
        let exact = self.exact_malloc(&recorded);
        let cumulative = self.estimated(recorded);
        let held = self.pushes.is_some().then(|| push::held(&cumulative));
        // The figures just read.
        let memory = self.read_memory(Some(0));
        if self
            .timeline
            .close(self.now(), cumulative, memory.rss_bytes, WindowEnd::End)
            .is_some()
        {
            if let Some(exact) = exact {
                self.timeline.set_last_exact(exact);
            }
            if memory.processes > 0 {
                self.timeline.set_last_memory(memory);
            }
            if let Some(held) = held {
                self.push_last_window(&held);
            }
        }
        let windows = self.timeline.windows();
        let arenas = &mut self.arenas;
        let mut scan = collect::scan_live(
            &self.kernel.ebpf,
            &self.front,
            windows.len(),
            |ns| crate::timeline::window_of(windows, ns),
            |key, block| credit_arena(arenas, key, block),
        )?;
        let heaps: Vec<_> = self
            .arenas
            .iter()
            .map(|(pid, a)| (*pid, a.finish()))
            .collect();
        for (pid, heaps) in heaps {
            if let Some(record) = self.record_mut(pid) {
                record.arenas = heaps;
            }
        }
        crate::processes::merge_adjustments(
            &mut scan.kept_by_requests,
            std::mem::take(&mut self.kept_by_exited),
        );
        let requests = self.requests_report();
        let measured = self.measure_mappings(&scan.mappings);
        let symbolizer = &mut self.symbolizer;
        let context = ReportContext {
            target: Some(TargetInfo {
                pid: self.pid,
                command: self.command.clone(),
                exit_code: self.exit_code,
            }),
            duration_s: self.started.elapsed().as_secs_f64(),
            probes: self.probes.clone(),
            warnings: Vec::new(),
            processes: self.processes.clone(),
            adjustments: self.adjustments.clone(),
            per_process_sites: self.per_process_sites,
            windows: self.timeline.windows().to_vec(),
            started_ns: self.started_ns,
            survivors: scan.survivors,
            requests,
            kept_by_requests: scan.kept_by_requests,
            measured,
            stack_sample: self.stack_sample,
        };
        let mut report = report::build_report(
            &snapshot,
            |pid, ips, python| symbolizer.symbolize_with_python(pid, ips, python),
            context,
        );
        report.modules = crate::build_id::modules(&report, self.pid);
        report.warnings = self.warnings.clone();
        report
            .warnings
            .extend(crate::python::objects::counting_warning(
                &report.processes,
                self.python_objects,
                self.is_child,
            ));
        report.attach_costs = report::AttachCosts::of(&self.attach_costs);
        report.tick_costs = report::TickCosts::of(&self.tick_costs);
        report.alerts = self.alerts.clone();
        report
            .warnings
            .extend(completeness::loss_warnings(&report, self.capacity));
        Ok(report)
    }
}

/// Credits a malloc-family block to the arena heap of its process that
/// holds it.
pub(super) fn credit_arena(
    arenas: &mut std::collections::HashMap<u32, crate::arenas::ProcessArenas>,
    key: &profiler_common::LiveKey,
    block: &profiler_common::LiveAllocation,
) {
    if block.kind != profiler_common::alloc_kind::MMAP
        && let Some(heaps) = arenas.get_mut(&key.tgid)
    {
        heaps.credit(key.addr, block.size);
    }
}

/// The stacks that grew most in a window, with their growth: more than an
/// alert names, as stacks of different workers merge into one site.
fn top_growers(
    changes: &std::collections::BTreeMap<StackKey, profiler_common::StackTotals>,
) -> Vec<(StackKey, i64)> {
    let mut grown: Vec<(StackKey, i64)> = changes
        .iter()
        .map(|(key, t)| (*key, t.growth_bytes()))
        .filter(|(_, growth)| *growth > 0)
        .collect();
    grown.sort_by_key(|(_, growth)| std::cmp::Reverse(*growth));
    grown.truncate(4 * crate::alert::ALERT_SITES);
    grown
}
