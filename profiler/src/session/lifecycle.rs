//! The target's processes coming and going: kernel lifecycle events (fork,
//! exec, exit) and what each does to the probes and the live set.

use aya::maps::{MapData, RingBuf};
use profiler_common::{ProcessEvent, event_kind};
use tokio::io::unix::AsyncFd;

use std::{path::PathBuf, time::Instant};

use super::{Session, SessionError};
use crate::{
    allocator,
    attach::{self, Attached},
    follow,
    holds::monotonic_ns,
    process_maps::ProcessMaps,
    processes::{self, Following, ProcessRecord},
    target::{self, TargetError},
};

impl Session {
    /// The latest process with this pid: a fork storm reuses pids, and an
    /// event is about the one alive now, not an earlier one.
    pub(super) fn record_mut(&mut self, pid: u32) -> Option<&mut ProcessRecord> {
        self.processes.iter_mut().rev().find(|p| p.pid == pid)
    }

    pub(super) fn process_exited(&mut self, pid: u32) {
        self.start_times.remove(&pid);
        self.kernel.unwinder.forget(pid);
        if self.alive.remove(&pid) {
            let now = self.started.elapsed().as_secs_f64();
            let heap = processes::take_heap_top(&mut self.kernel.ebpf, pid);
            let peak = crate::peaks::take(&mut self.kernel.ebpf, &self.shared_peaks, pid);
            self.object_allocators.remove(&pid);
            if let Some(record) = self.record_mut(pid) {
                record.exited_s = Some(now);
                record.heap_at_exit = heap;
                record.peak_at_exit = peak;
            }
        }
    }

    pub(super) fn drain_events(&mut self, ring: &mut RingBuf<MapData>) {
        for event in ring_records::<ProcessEvent>(ring) {
            self.handle_event(event);
        }
    }

    fn handle_event(&mut self, event: ProcessEvent) {
        let started = Instant::now();
        self.handle_event_kind(event);
        tracing::debug!(
            kind = event.kind,
            pid = event.pid,
            held = event.held,
            waited_ms = monotonic_ns().saturating_sub(event.timestamp_ns) / 1_000_000,
            took = ?started.elapsed(),
            "lifecycle event"
        );
    }

    fn handle_event_kind(&mut self, event: ProcessEvent) {
        let pid = event.pid;
        match event.kind {
            event_kind::FORK => self.forked(event),
            event_kind::EXEC => {
                // Held for what must come before the new image's first
                // instruction, and no more: its own malloc's probes, and a
                // heap top started afresh (a new program has a new heap).
                processes::take_heap_top(&mut self.kernel.ebpf, pid);
                if !self.tearing_down {
                    self.probe_new_image(pid);
                }
                // Before it runs: a short script would be done before its
                // interpreter is found.
                let maps = ProcessMaps::read(pid).ok();
                // The kernel forgot the old image's mappings.
                self.kernel.unwinder.forget(pid);
                if let Some(maps) = &maps {
                    self.kernel.describe_unwind(maps);
                    self.python_executed(pid, maps);
                    self.probe_request_fn(pid, maps);
                }
                if event.held != 0 && !self.kernel.holds.release(pid, event.hold_ns) {
                    self.let_go_early(
                        pid,
                        event.timestamp_ns,
                        "at its exec",
                        "its first allocations may be missed or lack Python frames",
                    );
                }
                // The old image's blocks, found by their timestamps, can go
                // while the new one runs (a shell loop waits on each exec).
                match processes::release_live_set(
                    &mut self.kernel.ebpf,
                    &self.front,
                    pid,
                    event.timestamp_ns,
                ) {
                    Ok(released) => processes::merge_adjustments(&mut self.adjustments, released),
                    Err(error) => tracing::warn!("exec of {pid}: {error}"),
                }
                let command = target::command_line(pid);
                if let Some(record) = self.record_mut(pid) {
                    record.command = command;
                }
                if let Some(maps) = maps {
                    self.symbolizer.update_maps(maps);
                }
            }
            event_kind::PYTHON_START => {
                self.python_started(pid);
                if event.held != 0 {
                    self.kernel.holds.release(pid, event.hold_ns);
                }
            }
            event_kind::EXITING => {
                // Stopped in `_exit`: its mappings are read one last time,
                // and what its anonymous ones hold.
                self.refresh_maps();
                self.read_address_space(pid);
                if let Ok(figures) = crate::process_memory::MemoryFigures::read(pid)
                    && let Some(record) = self.record_mut(pid)
                {
                    record.memory = Some(figures);
                }
                if event.held != 0 && !self.kernel.holds.release(pid, event.hold_ns) {
                    self.let_go_early(
                        pid,
                        event.timestamp_ns,
                        "in its _exit",
                        "its Python frames may be unnamed",
                    );
                }
            }
            event_kind::CODE_MAPPED => {
                // Its new code's rules before it runs any.
                if let Ok(maps) = ProcessMaps::read(pid) {
                    self.kernel.describe_unwind(&maps);
                    self.symbolizer.update_maps(maps);
                }
                if event.held != 0 {
                    self.kernel.holds.release(pid, event.hold_ns);
                }
            }
            event_kind::FINALIZING => {
                // The program's end, before the interpreter frees it all
                // (its code objects too).
                self.resolve_new_python_stacks();
                if self.python_teardown {
                    self.close_window(crate::timeline::WindowEnd::Teardown);
                    let now = self.started.elapsed().as_secs_f64();
                    if let Some(record) = self.record_mut(pid)
                        && record.teardown_s.is_none()
                    {
                        record.teardown_s = Some(now);
                    }
                }
                if event.held != 0 {
                    self.kernel.holds.release(pid, event.hold_ns);
                }
            }
            event_kind::EXIT => self.exit_seen(pid),
            _ => {}
        }
    }

    /// The watchdog continued `pid` at a stop (`at`: "at its exec") before
    /// memscope was done with it, which its record says, with what may be
    /// missing for it.
    fn let_go_early(&mut self, pid: u32, stop_ns: u64, at: &str, missing: &str) {
        let waited_ms = monotonic_ns().saturating_sub(stop_ns) / 1_000_000;
        tracing::warn!("pid {pid} was continued by the watchdog {at}, {waited_ms} ms later");
        if let Some(record) = self.record_mut(pid) {
            record.note = Some(format!(
                "continued by the watchdog {at} before memscope was done ({waited_ms} ms): {missing} (--hold-budget)"
            ));
        }
    }

    /// A followed process forked `event.pid`, which the kernel holds
    /// stopped before its first instruction: probe it and let it go, or
    /// let it go unprobed when that cannot be done within the budget.
    fn forked(&mut self, event: ProcessEvent) {
        let (pid, ppid) = (event.pid, event.ppid);
        if event.held == 0 {
            // --follow image: its probes were on from its first instruction,
            // and stay until the end, so it counts even while that comes.
            if !self.alive.contains(&pid) {
                let maps = ProcessMaps::read(pid).ok();
                self.track(pid, ppid, maps, Following::Forked);
            }
            return;
        }
        if self.tearing_down || self.alive.contains(&pid) {
            // Ending, or found already by the scan of the tree at attach.
            self.kernel.holds.release(pid, event.hold_ns);
            return;
        }
        let budget_ns = self.kernel.hold_budget_ns;
        let waited_ns = monotonic_ns().saturating_sub(event.timestamp_ns);
        if waited_ns > budget_ns {
            let note = format!(
                "held {} ms before memscope could probe it (budget {} ms): forks come faster than probes go on",
                waited_ns / 1_000_000,
                budget_ns / 1_000_000
            );
            self.kernel.holds.release(pid, event.hold_ns);
            self.unfollow(pid, ppid, note);
            return;
        }
        let started = Instant::now();
        let followed = self.follow_child(pid, ppid, event.timestamp_ns);
        let still_held = self.kernel.holds.release(pid, event.hold_ns);
        // NB: past the budget the watchdog may have let it go already, its
        // SIGCONT sent but the map entry not yet removed: late, to be safe.
        let in_time = monotonic_ns().saturating_sub(event.timestamp_ns) < budget_ns;
        if !(still_held && in_time)
            && let Some(record) = self.record_mut(pid)
        {
            // The watchdog let it go first: it ran before its probes were on.
            record.following = Following::Late;
            record.note = Some(format!(
                "continued by the watchdog after {} ms, before its probes were on: its first allocations may be missed",
                budget_ns / 1_000_000
            ));
        }
        match followed {
            Ok(()) => {
                tracing::debug!(pid, cost = ?started.elapsed(), waited_ns, "child followed");
                self.attach_costs.push(started.elapsed());
            }
            Err(error) => {
                tracing::warn!("cannot follow child {pid} of {ppid}: {error}");
                self.unfollow(pid, ppid, format!("not followed: {error}"));
            }
        }
    }

    /// Records a process that runs without probes, and stops following
    /// its forks.
    pub(super) fn unfollow(&mut self, pid: u32, ppid: u32, note: String) {
        follow::untrace(&mut self.kernel.ebpf, pid);
        if let Some(links) = self.links.remove(&pid) {
            self.detacher.detach(links);
        }
        self.alive.remove(&pid);
        let now = self.started.elapsed().as_secs_f64();
        match self.record_mut(pid) {
            Some(record) => {
                record.following = Following::Unfollowed;
                record.note = Some(note);
            }
            None => self.processes.push(ProcessRecord {
                note: Some(note),
                ..ProcessRecord::new(
                    pid,
                    Some(ppid),
                    target::command_line(pid),
                    now,
                    Following::Unfollowed,
                )
            }),
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
                && !self
                    .probed_images
                    .contains(&(self.kernel.probe_owner(pid), image.path.clone()))
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
        let owner = self.kernel.probe_owner(pid);
        if !self.probed_images.insert((owner, image.path.clone())) {
            return;
        }
        match attach::attach_image(&mut self.kernel.programs(), pid, maps, exe, image) {
            Ok(attached) => self.keep(owner, attached, true),
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
        let arenas = &mut self.arenas;
        match processes::forget_live_sets(
            &mut self.kernel.ebpf,
            &self.front,
            &pids,
            |key, block| super::credit_arena(arenas, key, block),
        ) {
            Ok(kept) => processes::merge_adjustments(&mut self.kept_by_exited, kept),
            Err(error) => tracing::warn!("{error}"),
        }
    }

    /// Keeps what attaching to `pid` gave: its links, its warnings (once),
    /// and with `list_probes` its probes for the report.
    pub(super) fn keep(&mut self, pid: u32, attached: Attached, list_probes: bool) {
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

    /// Records a process whose probes are on (or, with `--follow image`,
    /// that is traced), with its mappings for symbolization.
    pub(super) fn track(
        &mut self,
        pid: u32,
        ppid: u32,
        maps: Option<ProcessMaps>,
        following: Following,
    ) {
        let started = self.started.elapsed().as_secs_f64();
        // NB: a child not held at its fork (--follow image) may be gone by
        // now, its pid another process's: only its own mappings will do.
        let identity = crate::proc_tree::identity(pid).filter(|&(_, parent)| parent == ppid);
        let parents_maps = |this: &Self| {
            let mut maps = this.symbolizer.maps(ppid)?.clone();
            maps.pid = pid;
            Some(maps)
        };
        let Some((start_time, _)) = identity else {
            // Gone: its parent's mappings stand in (a fork copies them).
            if let Some(maps) = parents_maps(self) {
                self.symbolizer.update_maps(maps);
            }
            let mut record = ProcessRecord::new(pid, Some(ppid), String::new(), started, following);
            record.exited_s = Some(started);
            self.processes.push(record);
            return;
        };
        // A fork copies its parent's mappings: those stand in for ones read
        // too late (as it exited, they go one by one).
        let maps = maps
            .filter(|_| !crate::proc_tree::exiting(pid))
            .or_else(|| parents_maps(self));
        self.start_times.insert(pid, start_time);
        // A pid seen before was another process: its address space is gone.
        self.address_spaces.remove(&pid);
        self.arenas.remove(&pid);
        self.alive.insert(pid);
        self.processes.push(ProcessRecord::new(
            pid,
            Some(ppid),
            target::command_line(pid),
            started,
            following,
        ));
        if let Some(maps) = maps {
            self.probe_request_fn(pid, &maps);
            // A fork runs its parent's interpreter, or none: nothing to look
            // for while it is held (its exec, if any, is looked at then). A
            // process found in the tree at attach is looked at.
            if following != Following::Forked {
                self.discover_python(pid, &maps);
            } else if self.symbolizer.is_python(ppid) {
                self.python_forked(ppid, pid, &maps);
            }
            self.symbolizer.update_maps(maps);
        }
    }

    /// Puts on a forked child the probes its parent has. A fork copies the
    /// address space: the child calls the allocators its parent did, all
    /// probed already, so nothing is looked up again.
    fn probe_like_parent(
        &mut self,
        pid: u32,
        ppid: u32,
        maps: &ProcessMaps,
    ) -> Result<(), SessionError> {
        let mut images: Vec<PathBuf> = self
            .probed_images
            .iter()
            .filter(|(owner, _)| *owner == ppid)
            .map(|(_, image)| image.clone())
            .collect();
        if images.is_empty() {
            let (image, attached) =
                attach::attach_allocator(&mut self.kernel.programs(), pid, maps)?;
            self.keep(pid, attached, false);
            images.push(image.path);
        } else {
            for image in &images {
                let attached =
                    attach::attach_family(&mut self.kernel.programs(), pid, maps, image)?;
                // A child's probes are its parent's again: not listed twice.
                self.keep(pid, attached, false);
            }
        }
        // Probed: a maps refresh must not probe them again.
        self.probed_images
            .extend(images.into_iter().map(|image| (pid, image)));
        Ok(())
    }

    /// Puts the allocator probes on a new child and gives it its parent's
    /// live set. Only for a held child: with `--follow image` none is held
    /// (its probes are on already, its inherited blocks found in place).
    fn follow_child(&mut self, pid: u32, ppid: u32, fork_ns: u64) -> Result<(), SessionError> {
        let maps = ProcessMaps::read(pid).map_err(|_| TargetError::NoSuchProcess(pid))?;
        self.probe_like_parent(pid, ppid, &maps)?;
        let inherited =
            processes::copy_live_set(&mut self.kernel.ebpf, &self.front, ppid, pid, fork_ns)?;
        let inherited_bytes = inherited
            .iter()
            .filter(|(key, _)| key.class == profiler_common::site_class::MALLOC)
            .map(|(_, t)| t.alloc_bytes)
            .sum();
        if let Err(error) = crate::peaks::inherit(
            &mut self.kernel.ebpf,
            &self.shared_peaks,
            pid,
            inherited_bytes,
            fork_ns,
        ) {
            tracing::warn!("peak of {pid}: {error}");
        }
        processes::merge_adjustments(&mut self.adjustments, inherited);
        self.track(pid, ppid, Some(maps), Following::Forked);
        Ok(())
    }
}

/// The records waiting on a ring the kernel side writes `T`s to.
pub(super) fn ring_records<T: aya::Pod>(ring: &mut RingBuf<MapData>) -> Vec<T> {
    let mut records = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<T>() {
            // SAFETY: the kernel wrote a T (plain data); read unaligned.
            records.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<T>()) });
        }
    }
    records
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
