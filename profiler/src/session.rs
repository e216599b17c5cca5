//! One profiling session: start or find the target, attach, wait for the
//! end (target exit, Ctrl-C, SIGTERM, deadline), then build the report from
//! whatever was collected.

use std::{
    ffi::OsString,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use std::collections::BTreeSet;

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use profiler_common::{ProcessEvent, event_kind, map_names};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    attach::{self, AttachError, Attached, AttachedProbe},
    bpf::{self, LoadError, MapCapacity},
    collect::{self, CollectError},
    follow::{self, FollowError},
    preflight::{self, PreflightError},
    process_maps::ProcessMaps,
    processes::{self, Adjustments, LiveSetError, ProcessRecord},
    report::{self, Report, ReportContext, TargetInfo},
    symbolize::StackSymbolizer,
    target::{self, TargetError},
};

/// How often the target's mappings are re-read while it runs, so that code
/// it maps later (dlopen) can be symbolized after it exits.
const MAPS_REFRESH: Duration = Duration::from_millis(500);

/// What to profile.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// Start this command (argv) suspended and profile it from its first instruction.
    Run(Vec<OsString>),
    /// Profile this running process from now on.
    Attach(u32),
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
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            capacity: MapCapacity::default(),
            duration: None,
            follow_children: true,
            per_process_sites: false,
        }
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    TargetExited,
    Interrupted,
    Terminated,
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
    #[error("cannot watch pid {pid}: {source}")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The root process once its probes are on.
struct AttachedTarget {
    pid: u32,
    command: String,
    is_child: bool,
    attached: Attached,
    maps: ProcessMaps,
}

/// A target with memscope's probes on it.
pub struct Session {
    ebpf: Ebpf,
    pid: u32,
    command: String,
    /// Whether memscope started the target (and so is its parent).
    is_child: bool,
    probes: Vec<AttachedProbe>,
    symbolizer: StackSymbolizer,
    capacity: MapCapacity,
    started: Instant,
    exit_code: Option<i32>,
    /// Lifecycle events from the kernel.
    events: Option<AsyncFd<RingBuf<MapData>>>,
    processes: Vec<ProcessRecord>,
    /// Processes still running; the session ends when none is left.
    alive: BTreeSet<u32>,
    adjustments: Adjustments,
    per_process_sites: bool,
    warnings: Vec<String>,
    /// (process, image) pairs whose malloc family is probed.
    probed_images: std::collections::HashSet<(u32, std::path::PathBuf)>,
}

impl Session {
    /// Checks privileges, loads the BPF programs and attaches them. For
    /// `Run`, the command starts only once the probes are in place.
    pub fn start(spec: &TargetSpec, options: &SessionOptions) -> Result<Self, SessionError> {
        // The profile covers attach time too: probes go on one by one.
        let started = Instant::now();
        if let TargetSpec::Attach(pid) = spec {
            target::check_exists(*pid)?;
        }
        if let TargetSpec::Run(argv) = spec {
            // Before privileges: a typo deserves its own message.
            let program = argv.first().ok_or(TargetError::EmptyCommand)?;
            target::resolve_command(program)?;
        }
        preflight::check_privileges()?;
        preflight::check_uprobes()?;
        let mut ebpf = bpf::load(options.capacity)?;
        follow::attach_lifecycle(&mut ebpf, options.follow_children)?;
        match spec {
            TargetSpec::Attach(pid) => {
                let pid = *pid;
                let maps = ProcessMaps::read(pid).map_err(|_| TargetError::NoSuchProcess(pid))?;
                let attached = attach::attach_allocator(&mut ebpf, pid, &maps)?;
                follow::trace(&mut ebpf, pid)?;
                let target = AttachedTarget {
                    pid,
                    command: target::command_line(pid),
                    is_child: false,
                    attached,
                    maps,
                };
                Self::new(ebpf, target, options, started)
            }
            TargetSpec::Run(argv) => {
                let child = target::spawn_suspended(argv)?;
                let attached = ProcessMaps::read(child.pid)
                    .map_err(|_| SessionError::from(TargetError::NoSuchProcess(child.pid)))
                    .and_then(|maps| {
                        let attached = attach::attach_allocator(&mut ebpf, child.pid, &maps)?;
                        attach::attach_exit_stop(&mut ebpf, child.pid, &maps)?;
                        follow::trace(&mut ebpf, child.pid)?;
                        Ok::<_, SessionError>((attached, maps))
                    });
                let (attached, maps) = match attached {
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
                Self::new(ebpf, target, options, started)
            }
        }
    }

    fn new(
        mut ebpf: Ebpf,
        target: AttachedTarget,
        options: &SessionOptions,
        started: Instant,
    ) -> Result<Self, SessionError> {
        let AttachedTarget {
            pid,
            command,
            is_child,
            attached: Attached { probes, warnings },
            maps,
        } = target;
        let probed_images = probes.iter().map(|p| (pid, p.library.clone())).collect();
        let mut symbolizer = StackSymbolizer::new(pid);
        symbolizer.update_maps(maps);
        let events = ebpf
            .take_map(map_names::EVENTS)
            .and_then(|map| RingBuf::try_from(map).ok())
            .ok_or(FollowError::Missing(map_names::EVENTS))?;
        // SAFETY: the ring buffer's descriptor lives as long as the AsyncFd.
        let events = unsafe { AsyncFd::register(events) }.map_err(|e| SessionError::Watch {
            pid,
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            ebpf,
            pid,
            command: command.clone(),
            is_child,
            probes,
            symbolizer,
            capacity: options.capacity,
            started,
            exit_code: None,
            events: Some(events),
            processes: vec![ProcessRecord {
                pid,
                ppid: None,
                command,
                started_s: 0.0,
                exited_s: None,
            }],
            alive: BTreeSet::from([pid]),
            adjustments: Adjustments::new(),
            per_process_sites: options.per_process_sites,
            warnings,
            probed_images,
        })
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

    /// Kernel memory the session's maps reserve.
    pub fn reserved_bytes(&self) -> u64 {
        self.capacity.reserved_bytes()
    }

    /// Waits for the end of the session and returns why it ended.
    pub async fn wait(&mut self, duration: Option<Duration>) -> Result<StopReason, SessionError> {
        let watch_error = |source| SessionError::Watch {
            pid: self.pid,
            source,
        };
        let mut interrupt = signal(SignalKind::interrupt()).map_err(watch_error)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(watch_error)?;
        let mut child_events = signal(SignalKind::child()).map_err(watch_error)?;
        let exit_fd: OwnedFd = target::exit_notifier(self.pid).map_err(watch_error)?;
        // SAFETY: the pidfd is owned by the AsyncFd and closed only when it drops.
        let exited = unsafe { AsyncFd::register(exit_fd) }
            .map_err(|e| watch_error(std::io::Error::other(e.to_string())))?;
        let deadline =
            tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::from(u32::MAX))));
        tokio::pin!(deadline);
        let mut refresh = tokio::time::interval(MAPS_REFRESH);

        let mut events = self.events.take();
        // A stop or exit of our child before the SIGCHLD stream existed was
        // not delivered to it: look once now (and at every refresh tick).
        if self.is_child && self.handle_child_event(&mut events) {
            self.process_exited(self.pid);
        }
        let reason = loop {
            if self.alive.is_empty() {
                break StopReason::TargetExited;
            }
            let root_alive = self.alive.contains(&self.pid);
            tokio::select! {
                _ = exited.readable(), if root_alive => self.process_exited(self.pid),
                guard = readable(&mut events) => {
                    if let Ok(mut guard) = guard {
                        self.drain_events(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                }
                _ = interrupt.recv() => break StopReason::Interrupted,
                _ = terminate.recv() => break StopReason::Terminated,
                _ = &mut deadline => break StopReason::DurationElapsed,
                _ = child_events.recv(), if self.is_child => {
                    if self.handle_child_event(&mut events) {
                        self.process_exited(self.pid);
                    }
                }
                _ = refresh.tick() => {
                    self.refresh_maps();
                    if self.is_child && self.handle_child_event(&mut events) {
                        self.process_exited(self.pid);
                    }
                }
            }
        };
        if let Some(events) = events.as_mut() {
            // Forks that raced with the end still need their SIGCONT.
            self.drain_events(events.get_mut());
        }
        self.events = events;
        if self.is_child {
            self.finish_child(reason).await;
        }
        Ok(reason)
    }

    fn process_exited(&mut self, pid: u32) {
        if self.alive.remove(&pid) {
            let now = self.started.elapsed().as_secs_f64();
            if let Some(record) = self.processes.iter_mut().find(|p| p.pid == pid) {
                record.exited_s = Some(now);
            }
        }
    }

    fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<ProcessEvent>() {
                // SAFETY: the kernel wrote a ProcessEvent; read unaligned.
                events.push(unsafe {
                    std::ptr::read_unaligned(item.as_ptr().cast::<ProcessEvent>())
                });
            }
        }
        for event in events {
            self.handle_event(event);
        }
    }

    fn handle_event(&mut self, event: ProcessEvent) {
        let pid = event.pid;
        match event.kind {
            event_kind::FORK => {
                if let Err(error) = self.follow_child(pid, event.ppid, event.timestamp_ns) {
                    tracing::warn!("cannot follow child {pid} of {}: {error}", event.ppid);
                    self.warnings
                        .push(format!("child process {pid} was not followed: {error}"));
                }
                // Stopped in the kernel before its first instruction: let it go.
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            event_kind::EXEC => {
                match processes::release_live_set(&mut self.ebpf, pid, event.timestamp_ns) {
                    Ok(released) => processes::merge_adjustments(&mut self.adjustments, released),
                    Err(error) => tracing::warn!("exec of {pid}: {error}"),
                }
                let command = target::command_line(pid);
                if let Some(record) = self.processes.iter_mut().find(|p| p.pid == pid) {
                    record.command = command;
                }
                self.refresh_maps();
                self.probe_new_image(pid);
                // Stopped in the kernel at the exec: let it go.
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            event_kind::EXIT => {
                self.process_exited(pid);
                if pid != self.pid
                    && let Err(error) = processes::forget_live_set(&mut self.ebpf, pid)
                {
                    tracing::warn!("exit of {pid}: {error}");
                }
            }
            _ => {}
        }
    }

    /// After an exec: a new image with its own malloc (a static binary, a
    /// preloaded allocator) gets probes of its own. A dynamically linked
    /// one loads the libc whose probes are already on this process.
    fn probe_new_image(&mut self, pid: u32) {
        let Ok(maps) = ProcessMaps::read(pid) else {
            return;
        };
        let exe = crate::allocator::executable(pid);
        let image = match crate::allocator::locate(&maps, exe.as_deref()) {
            Ok(image) if image.name != "glibc" => image,
            _ => return,
        };
        if !self.probed_images.insert((pid, image.path.clone())) {
            return;
        }
        match attach::attach_allocator(&mut self.ebpf, pid, &maps) {
            Ok(attached) => {
                for warning in attached.warnings {
                    if !self.warnings.contains(&warning) {
                        self.warnings.push(warning);
                    }
                }
                self.probes.extend(attached.probes);
            }
            Err(error) => self.warnings.push(format!(
                "pid {pid} executed {}: {error}",
                image.path.display()
            )),
        }
    }

    /// Puts the allocator probes on a new child and gives it its parent's
    /// live set.
    fn follow_child(&mut self, pid: u32, ppid: u32, fork_ns: u64) -> Result<(), SessionError> {
        let maps = ProcessMaps::read(pid).map_err(|_| TargetError::NoSuchProcess(pid))?;
        let attached = attach::attach_allocator(&mut self.ebpf, pid, &maps)?;
        for warning in attached.warnings {
            if !self.warnings.contains(&warning) {
                self.warnings.push(warning);
            }
        }
        let inherited = processes::copy_live_set(&mut self.ebpf, ppid, pid, fork_ns)?;
        processes::merge_adjustments(&mut self.adjustments, inherited);
        self.symbolizer.update_maps(maps);
        self.alive.insert(pid);
        self.processes.push(ProcessRecord {
            pid,
            ppid: Some(ppid),
            command: target::command_line(pid),
            started_s: self.started.elapsed().as_secs_f64(),
            exited_s: None,
        });
        Ok(())
    }

    /// A stop of our child is the `_exit` probe's: read its mappings one
    /// last time and let it exit. Returns true once it has exited.
    fn handle_child_event(&mut self, events: &mut Option<AsyncFd<RingBuf<MapData>>>) -> bool {
        let mut status = 0;
        // SAFETY: non-blocking wait on our own child.
        let r = unsafe {
            libc::waitpid(
                self.pid as i32,
                &mut status,
                libc::WNOHANG | libc::WUNTRACED,
            )
        };
        if r != self.pid as i32 {
            return false;
        }
        if libc::WIFSTOPPED(status) {
            // An exec stop is the EXEC event's to end, once the new image
            // is probed: handle pending events before continuing.
            if let Some(events) = events.as_mut() {
                self.drain_events(events.get_mut());
            }
            self.refresh_maps();
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
            return false;
        }
        self.exit_code = exit_code(status);
        self.exit_code.is_some()
    }

    /// After the session, a started command either has exited (reap it) or
    /// still runs (pass SIGINT/SIGTERM on and give it a moment to exit).
    async fn finish_child(&mut self, reason: StopReason) {
        if self.exit_code.is_some() {
            return;
        }
        let signal = match reason {
            StopReason::Terminated => Some(libc::SIGTERM),
            StopReason::Interrupted => Some(libc::SIGINT),
            _ => None,
        };
        if let Some(signal) = signal {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(self.pid as i32, signal) };
        }
        for _ in 0..20 {
            let mut status = 0;
            // SAFETY: non-blocking wait on our own child.
            let r = unsafe {
                libc::waitpid(
                    self.pid as i32,
                    &mut status,
                    libc::WNOHANG | libc::WUNTRACED,
                )
            };
            if r == self.pid as i32 {
                if libc::WIFSTOPPED(status) {
                    self.refresh_maps();
                    // SAFETY: as above.
                    unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
                    continue;
                }
                self.exit_code = exit_code(status);
                return;
            }
            if signal.is_none() && reason == StopReason::DurationElapsed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn refresh_maps(&mut self) {
        for &pid in &self.alive {
            if let Ok(maps) = ProcessMaps::read(pid)
                && !maps.mappings.is_empty()
            {
                self.symbolizer.update_maps(maps);
            }
        }
    }

    /// Reads the kernel maps and builds the report of everything so far.
    pub fn report(&mut self) -> Result<Report, SessionError> {
        self.refresh_maps();
        let snapshot = collect::read_snapshot(&self.ebpf)?;
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
        };
        let mut report = report::build_report(
            &snapshot,
            |pid, ips| symbolizer.symbolize_stack(pid, ips),
            context,
        );
        report.warnings = self.warnings.clone();
        report
            .warnings
            .extend(loss_warnings(&report, self.capacity));
        Ok(report)
    }
}

/// Waits until the ring buffer has data; never resolves without one.
async fn readable(
    events: &mut Option<AsyncFd<RingBuf<MapData>>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match events {
        Some(events) => events.readable_mut().await,
        None => std::future::pending().await,
    }
}

fn exit_code(status: i32) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Says what was lost and which option fixes it.
pub fn loss_warnings(report: &Report, capacity: MapCapacity) -> Vec<String> {
    let c = &report.completeness;
    let mut warnings = Vec::new();
    if c.live_map_full > 0 {
        warnings.push(format!(
            "{} allocations were not tracked: the live map ({} entries) was full; rerun with --max-live {}",
            c.live_map_full,
            capacity.max_live,
            capacity.max_live.saturating_mul(4)
        ));
    }
    if c.totals_map_full > 0 || c.stack_errors > 0 {
        warnings.push(format!(
            "{} stacks could not be recorded ({} totals-map full); their bytes are under [unknown stack]; rerun with --max-stacks {}",
            c.stack_errors,
            c.totals_map_full,
            capacity.max_stacks.saturating_mul(4)
        ));
    }
    if c.in_flight_full > 0 {
        warnings.push(format!(
            "{} allocator calls were missed: more threads were inside the allocator at once than memscope tracks",
            c.in_flight_full
        ));
    }
    if c.lost_children > 0 {
        warnings.push(format!(
            "{} forked children could not be followed (more than {} processes)",
            c.lost_children,
            profiler_common::MAX_PROCESSES
        ));
    }
    if c.missed_returns > 0 {
        warnings.push(format!(
            "{} allocator returns had no matching entry (calls in progress at attach)",
            c.missed_returns
        ));
    }
    if c.unknown_frees > 0 {
        warnings.push(format!(
            "{} frees of memory allocated before memscope attached were ignored",
            c.unknown_frees
        ));
    }
    if report.totals.alloc_count == 0 {
        warnings.push(
            "no allocations were seen: the target may not have allocated, or it bypasses libc's malloc (static binary, jemalloc/tcmalloc/mimalloc)"
                .to_owned(),
        );
    }
    warnings
}
