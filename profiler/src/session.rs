//! One profiling session: start or find the target, attach, wait for the
//! end (target exit, Ctrl-C, SIGTERM, deadline), then build the report from
//! whatever was collected.

use std::{
    ffi::OsString,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use aya::Ebpf;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    attach::{self, AttachError, AttachedProbe},
    bpf::{self, LoadError, MapCapacity},
    collect::{self, CollectError},
    preflight::{self, PreflightError},
    process_maps::ProcessMaps,
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

#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub capacity: MapCapacity,
    /// Stop after this long.
    pub duration: Option<Duration>,
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
    #[error("cannot watch pid {pid}: {source}")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
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
}

impl Session {
    /// Checks privileges, loads the BPF programs and attaches them. For
    /// `Run`, the command starts only once the probes are in place.
    pub fn start(spec: &TargetSpec, options: &SessionOptions) -> Result<Self, SessionError> {
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
        match spec {
            TargetSpec::Attach(pid) => {
                let pid = *pid;
                let maps = ProcessMaps::read(pid).map_err(|_| TargetError::NoSuchProcess(pid))?;
                let probes = attach::attach_allocator(&mut ebpf, pid, &maps)?;
                Ok(Self::new(
                    ebpf,
                    pid,
                    target::command_line(pid),
                    false,
                    probes,
                    maps,
                    options,
                ))
            }
            TargetSpec::Run(argv) => {
                let child = target::spawn_suspended(argv)?;
                let attached = ProcessMaps::read(child.pid)
                    .map_err(|_| SessionError::from(TargetError::NoSuchProcess(child.pid)))
                    .and_then(|maps| {
                        let probes = attach::attach_allocator(&mut ebpf, child.pid, &maps)?;
                        attach::attach_exit_stop(&mut ebpf, child.pid, &maps)?;
                        Ok::<_, SessionError>((probes, maps))
                    });
                let (probes, maps) = match attached {
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
                Ok(Self::new(ebpf, pid, command, true, probes, maps, options))
            }
        }
    }

    fn new(
        ebpf: Ebpf,
        pid: u32,
        command: String,
        is_child: bool,
        probes: Vec<AttachedProbe>,
        maps: ProcessMaps,
        options: &SessionOptions,
    ) -> Self {
        let mut symbolizer = StackSymbolizer::new(pid);
        symbolizer.update_maps(maps);
        Self {
            ebpf,
            pid,
            command,
            is_child,
            probes,
            symbolizer,
            capacity: options.capacity,
            started: Instant::now(),
            exit_code: None,
        }
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

        let reason = loop {
            tokio::select! {
                _ = exited.readable() => break StopReason::TargetExited,
                _ = interrupt.recv() => break StopReason::Interrupted,
                _ = terminate.recv() => break StopReason::Terminated,
                _ = &mut deadline => break StopReason::DurationElapsed,
                _ = child_events.recv(), if self.is_child => {
                    if self.handle_child_event() {
                        break StopReason::TargetExited;
                    }
                }
                _ = refresh.tick() => self.refresh_maps(),
            }
        };
        if self.is_child {
            self.finish_child(reason).await;
        }
        Ok(reason)
    }

    /// A stop of our child is the `_exit` probe's: read its mappings one
    /// last time and let it exit. Returns true once it has exited.
    fn handle_child_event(&mut self) -> bool {
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
        if let Ok(maps) = ProcessMaps::read(self.pid)
            && !maps.mappings.is_empty()
        {
            self.symbolizer.update_maps(maps);
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
        };
        let mut report = report::build_report(
            &snapshot,
            |pid, ips| symbolizer.symbolize_stack(pid, ips),
            context,
        );
        report.warnings = loss_warnings(&report, self.capacity);
        Ok(report)
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
