//! The end of a session: nothing left stopped, then the probes off.
//!
//! Order matters: first the kernel side stops stopping processes, so the
//! set of held ones can only shrink; then every held process is continued;
//! once the report is made the programs stop counting; then memscope drops
//! its copy of each link and exits. The watchdog holds the other copy and
//! unregisters the probes in the background (~3 ms per link, serialized
//! in the kernel): never memscope itself, which a second Ctrl-C or a
//! SIGKILL may end in the middle of an unregistration (the kernel then
//! leaks the uprobe).

use std::time::Instant;

use aya::maps::{Array, MapData};
use profiler_common::{config, map_names};

use super::Session;
use crate::{
    attach::{self, ProbeLink},
    watchdog,
};

impl Session {
    /// Stops the kernel side from holding processes and continues every
    /// one it holds. Lifecycle events still in the ring are handled (their
    /// processes let go, not probed).
    pub(super) fn stop_holding(&mut self) {
        self.tearing_down = true;
        if let Some(map) = self.kernel.ebpf.map_mut(map_names::CONFIG)
            && let Ok(mut config_map) = Array::<&mut MapData, u32>::try_from(map)
            && let Err(error) = config_map.set(config::STOPS_DISABLED, 1, 0)
        {
            tracing::warn!("cannot tell the kernel side to stop holding processes: {error}");
        }
        self.drain_pending_events();
        let left = self.kernel.holds.release_all();
        if left > 0 {
            tracing::info!("continued {left} held process(es) at the end");
        }
    }
}

impl Session {
    /// Handles the lifecycle events in the ring now, outside the wait loop.
    pub(super) fn drain_pending_events(&mut self) {
        if let Some(mut events) = self.events.take() {
            self.drain_events(events.get_mut());
            self.events = Some(events);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Nothing may stay stopped, even when the session ends by an error.
        if !self.tearing_down {
            self.stop_holding();
        }
        // The report is made: the programs can stop counting. Their probes
        // stay on until the watchdog has unregistered them, costing the
        // target only the trap meanwhile.
        self.silence_programs();
        let processes = self.links.len();
        let links: Vec<ProbeLink> = std::mem::take(&mut self.links)
            .into_values()
            .flatten()
            .chain(std::mem::take(&mut self.kernel.tracepoints.0))
            .collect();
        let handed = links.iter().filter(|link| link.watchdog_has_copy()).count();
        let kept = links.len() - handed;
        if handed > 0 && processes > 100 {
            eprintln!(
                "memscope: its watchdog (pid {}) removes the probes of {processes} processes in the background",
                self.kernel.watchdog.pid()
            );
        }
        if kept > 100 {
            eprintln!(
                "memscope: detaching {kept} probe links of {processes} processes (Ctrl-C to skip the wait)"
            );
        }
        let started = Instant::now();
        attach::detach(links);
        // And what exited processes left queued.
        self.detacher.finish();
        tracing::info!(
            "handed {handed} probe links of {processes} processes to the watchdog, detached {kept}, in {:?}",
            started.elapsed()
        );
    }
}

impl Session {
    /// See `watchdog::silence`.
    fn silence_programs(&mut self) {
        let silenced = self
            .kernel
            .ebpf
            .map_mut(map_names::CONFIG)
            .map(watchdog::silence_config)
            .into_iter()
            .chain(
                self.kernel
                    .ebpf
                    .map_mut(map_names::TRACED)
                    .map(watchdog::untrace_all),
            )
            .collect::<Result<Vec<()>, _>>();
        if let Err(error) = silenced {
            tracing::debug!("cannot silence the programs: {error}");
        }
    }
}

/// Gives SIGINT, SIGTERM and SIGHUP their default action back: once the
/// report is being made, a second one ends memscope at once.
pub(super) fn restore_default_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: resetting a disposition has no preconditions.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}
