//! `--pprof-push`: the profile of each window as it closes, named on the
//! collection loop and sent on the push thread.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Instant, SystemTime},
};

use profiler_common::{StackKey, StackTotals};

use super::Session;
use crate::{
    collect,
    output::push::{PprofPush, PushError},
    report,
};

/// The stacks holding memory in `cumulative`: what a window's profile
/// counts as in use at its end.
pub(super) fn held(
    cumulative: &BTreeMap<StackKey, StackTotals>,
) -> BTreeMap<StackKey, StackTotals> {
    cumulative
        .iter()
        .filter(|(_, t)| t.live_count() > 0)
        .map(|(key, t)| (*key, *t))
        .collect()
}

impl Session {
    /// Pushes each window's profile to `push` from now on.
    pub fn set_push(&mut self, push: PprofPush) {
        let started = SystemTime::now()
            .checked_sub(self.started.elapsed())
            .unwrap_or_else(SystemTime::now);
        self.pushes = Some(push.start(self.pid, &self.command, started));
    }

    /// Waits for the pushes still queued (a few seconds at most): how many
    /// went out, or what did not. None without `--pprof-push`.
    pub fn finish_pushes(&mut self) -> Option<Result<u64, PushError>> {
        self.pushes.take().map(|pushes| pushes.finish())
    }

    /// Queues the profile of the window just closed, `held` being what the
    /// stacks held at its end.
    pub(super) fn push_last_window(&mut self, held: &BTreeMap<StackKey, StackTotals>) {
        let began = Instant::now();
        let Some(window) = self.timeline.windows().last() else {
            return;
        };
        let span = (window.start_s, window.end_s);
        let changes = window.changes.clone();
        let keys: BTreeSet<StackKey> = changes.keys().chain(held.keys()).copied().collect();
        let mut frames = BTreeMap::new();
        for key in keys {
            let ips = collect::read_stack(&self.kernel.ebpf, key.stack_id);
            let python = collect::read_python_stack(&self.kernel.ebpf, key.python_stack);
            let symbolizer = &mut self.symbolizer;
            let named = report::key_frames(
                &key,
                ips.as_deref(),
                python.as_ref(),
                &mut |pid, ips, python| symbolizer.symbolize_with_python(pid, ips, python),
            );
            frames.insert(key, named);
        }
        let sites = report::window_sites(&changes, held, &frames);
        if let Some(pushes) = self.pushes.as_mut() {
            pushes.send(span, &sites);
        }
        tracing::debug!(
            "window {:.1}-{:.1}s: profile of {} sites queued for push in {:?}",
            span.0,
            span.1,
            sites.len(),
            began.elapsed()
        );
    }
}
