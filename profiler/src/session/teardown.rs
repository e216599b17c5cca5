//! The end of a session: nothing left stopped, then the probes off.
//!
//! Order matters: first the kernel side stops stopping processes, so the
//! set of held ones can only shrink; then every held process is continued;
//! only then are the probes detached (which takes a while, and may be cut
//! short by a second Ctrl-C: the watchdog covers that).

use std::time::Instant;

use aya::maps::{Array, MapData};
use profiler_common::{config, map_names};

use super::Session;
use crate::attach::{self, ProbeLink};

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
        let processes = self.links.len();
        let links: Vec<ProbeLink> = std::mem::take(&mut self.links)
            .into_values()
            .flatten()
            .chain(std::mem::take(&mut self.kernel.tracepoints.0))
            .collect();
        if links.len() > 100 {
            eprintln!(
                "memscope: detaching the probes of {processes} processes (Ctrl-C to skip the wait)"
            );
        }
        let started = Instant::now();
        let count = links.len();
        attach::detach(links);
        // And what exited processes left queued.
        self.detacher.finish();
        tracing::info!(
            "detached {count} probe links of {processes} processes in {:?}",
            started.elapsed()
        );
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
