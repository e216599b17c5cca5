//! The target's processes coming and going: kernel lifecycle events (fork,
//! exec, exit) and what each does to the probes and the live set.

use aya::maps::{MapData, RingBuf};
use profiler_common::{ProcessEvent, event_kind};
use tokio::io::unix::AsyncFd;

use super::{Session, SessionError};
use crate::{
    allocator,
    attach::{self, Attached},
    process_maps::ProcessMaps,
    processes::{self, ProcessRecord},
    target::{self, TargetError},
};

impl Session {
    pub(super) fn process_exited(&mut self, pid: u32) {
        if self.alive.remove(&pid) {
            let now = self.started.elapsed().as_secs_f64();
            if let Some(record) = self.processes.iter_mut().find(|p| p.pid == pid) {
                record.exited_s = Some(now);
            }
        }
    }

    pub(super) fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
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
                // A new program has a new heap: its first brk starts afresh.
                processes::forget_heap_top(&mut self.ebpf, pid);
                self.refresh_maps();
                self.probe_new_image(pid);
                // Stopped in the kernel at the exec: let it go.
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            event_kind::EXITING => {
                // Stopped in `_exit`: its mappings are read one last time.
                self.refresh_maps();
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            }
            event_kind::EXIT => {
                self.process_exited(pid);
                if pid != self.pid {
                    self.exited_in_live_map.insert(pid);
                    // NB: its probes stay until the end: detaching holds kernel
                    // locks that attaching to new children would wait for.
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
        let exe = allocator::executable(pid);
        let exe = exe.as_deref();
        let image = match allocator::locate(&maps, exe) {
            Ok(image) if image.name != "glibc" => Some((image, "executed")),
            // Its libraries are not mapped yet: look at what it links.
            _ => exe
                .and_then(|exe| allocator::linked_allocator(&maps, exe))
                .map(|image| (image, "links")),
        };
        if let Some((image, how)) = image {
            self.probe_image(pid, &maps, exe, &image, how);
        }
    }

    /// An allocator library that appeared in a running process (linked by
    /// a program reached through exec, or dlopen'ed) is probed when seen;
    /// what it served before that is not counted, and the report says so.
    pub(super) fn probe_late_allocators(&mut self, seen: Vec<(u32, ProcessMaps)>) {
        for (pid, maps) in seen {
            if let Some(image) = allocator::replacement_library(&maps)
                && !self.probed_images.contains(&(pid, image.path.clone()))
            {
                self.warnings.push(format!(
                    "pid {pid} loaded {} after its start: its allocations before memscope saw it are not counted",
                    image.path.display()
                ));
                let exe = allocator::executable(pid);
                self.probe_image(pid, &maps, exe.as_deref(), &image, "loaded");
            }
        }
    }

    fn probe_image(
        &mut self,
        pid: u32,
        maps: &ProcessMaps,
        exe: Option<&std::path::Path>,
        image: &allocator::AllocatorImage,
        how: &str,
    ) {
        if !self.probed_images.insert((pid, image.path.clone())) {
            return;
        }
        match attach::attach_image(&mut self.ebpf, pid, maps, exe, image) {
            Ok(attached) => self.keep(pid, attached, true),
            Err(error) => self
                .warnings
                .push(format!("pid {pid} {how} {}: {error}", image.path.display())),
        }
    }

    /// Drops the live-map entries of children that exited since the last
    /// call (see `processes::forget_live_sets`).
    pub(super) fn forget_exited(&mut self) {
        if self.exited_in_live_map.is_empty() {
            return;
        }
        let pids = std::mem::take(&mut self.exited_in_live_map);
        if let Err(error) = processes::forget_live_sets(&mut self.ebpf, &pids) {
            tracing::warn!("{error}");
        }
    }

    /// Keeps what attaching to `pid` gave: its links, its warnings (once),
    /// and with `list_probes` its probes for the report.
    fn keep(&mut self, pid: u32, attached: Attached, list_probes: bool) {
        for warning in attached.warnings {
            if !self.warnings.contains(&warning) {
                self.warnings.push(warning);
            }
        }
        if list_probes {
            self.probes.extend(attached.probes);
        }
        self.links.entry(pid).or_default().extend(attached.links);
    }

    /// Puts the allocator probes on a new child and gives it its parent's
    /// live set.
    fn follow_child(&mut self, pid: u32, ppid: u32, fork_ns: u64) -> Result<(), SessionError> {
        let maps = ProcessMaps::read(pid).map_err(|_| TargetError::NoSuchProcess(pid))?;
        let attached = attach::attach_allocator(&mut self.ebpf, pid, &maps)?;
        // A child's probes are its parent's again: not listed twice.
        self.keep(pid, attached, false);
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
}

/// Waits until the ring buffer has data; never resolves without one.
pub(super) async fn readable(
    events: &mut Option<AsyncFd<RingBuf<MapData>>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
    match events {
        Some(events) => events.readable_mut().await,
        None => std::future::pending().await,
    }
}
