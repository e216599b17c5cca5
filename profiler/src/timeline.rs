//! Kernel snapshots on a tick, kept as windows: what each window allocated
//! and freed per (process, stack). The kernel's totals are cumulative, so a
//! window is the difference of the snapshots at its two ends.

use std::collections::BTreeMap;

use profiler_common::{StackKey, StackTotals, site_class};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What closed a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowEnd {
    /// `--window` elapsed.
    #[default]
    Timer,
    /// `memscope mark`, or SIGUSR2 to memscope.
    Mark,
    /// The session ended.
    End,
    /// An interpreter began to finalize (`memscope check`).
    Teardown,
}

/// One window as collected, before symbolization.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecordedWindow {
    /// Seconds since the session started.
    pub start_s: f64,
    pub end_s: f64,
    /// `end_s` on the kernel's clock (CLOCK_MONOTONIC), to place blocks by
    /// their allocation time.
    pub end_ns: u64,
    pub closed_by: WindowEnd,
    /// What changed in the window, per (process, stack); unchanged stacks
    /// are absent.
    pub changes: BTreeMap<StackKey, StackTotals>,
    /// Live bytes of the malloc family at the window's end.
    pub live_bytes: u64,
    /// Resident memory of the followed processes at the window's end.
    pub rss_bytes: u64,
    /// Their memory figures then, summed (see `process_memory`).
    pub memory: Option<crate::process_memory::MemoryFigures>,
    /// With `--stack-sample`: the malloc family's exact changes in the
    /// window, `changes` being the sites' estimates.
    pub exact_malloc: Option<StackTotals>,
}

impl RecordedWindow {
    /// The window's changes summed, malloc family only (as `totals`):
    /// exact, with `--stack-sample` too.
    pub fn malloc_changes(&self) -> StackTotals {
        self.exact_malloc
            .unwrap_or_else(|| malloc_sum(&self.changes))
    }
}

/// The malloc family's totals in `totals`, summed.
pub fn malloc_sum(totals: &BTreeMap<StackKey, StackTotals>) -> StackTotals {
    let mut sum = StackTotals::default();
    for (key, t) in totals {
        if key.class == site_class::MALLOC {
            sum.add(t);
        }
    }
    sum
}

/// The windows so far and the snapshot the next one starts from.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    last: BTreeMap<StackKey, StackTotals>,
    /// See `set_last_exact`.
    last_exact: StackTotals,
    last_s: f64,
    windows: Vec<RecordedWindow>,
    /// Past this many windows, neighbours merge (0: `MAX_WINDOWS`).
    max_windows: usize,
    /// How many times they merged.
    merges: u32,
}

/// Windows kept at most: past this, neighbours are merged pairwise (each
/// then twice as long), so a session left attached for days holds a few
/// hundred windows, not tens of thousands.
pub const MAX_WINDOWS: usize = 512;

/// Windows shorter than this are not kept when they change nothing (a mark
/// right after a tick, the end right after one).
const EMPTY_WINDOW_S: f64 = 0.001;

impl Timeline {
    /// A timeline that keeps at most `max_windows` (at least 8).
    pub fn with_max_windows(max_windows: usize) -> Self {
        Self {
            max_windows: max_windows.max(8),
            ..Self::default()
        }
    }

    /// How many times the windows merged pairwise: each merge makes every
    /// window twice as long, and the next ones should be too.
    pub fn merges(&self) -> u32 {
        self.merges
    }

    /// Closes the window that ends now, `at_s` into the session, given the
    /// cumulative totals then (userspace adjustments included). Returns it,
    /// or None when it would be empty and instantaneous.
    pub fn close(
        &mut self,
        (at_s, at_ns): (f64, u64),
        cumulative: BTreeMap<StackKey, StackTotals>,
        rss_bytes: u64,
        closed_by: WindowEnd,
    ) -> Option<&RecordedWindow> {
        let changes = changes_between(&self.last, &cumulative);
        if changes.is_empty() && at_s - self.last_s < EMPTY_WINDOW_S {
            return None;
        }
        let live_bytes = cumulative
            .iter()
            .filter(|(key, _)| key.class == site_class::MALLOC)
            .map(|(_, t)| t.live_bytes())
            .sum();
        self.windows.push(RecordedWindow {
            start_s: self.last_s,
            end_s: at_s,
            end_ns: at_ns,
            closed_by,
            changes,
            live_bytes,
            rss_bytes,
            memory: None,
            exact_malloc: None,
        });
        self.last = cumulative;
        self.last_s = at_s;
        let max = if self.max_windows == 0 {
            MAX_WINDOWS
        } else {
            self.max_windows
        };
        if self.windows.len() > max {
            self.windows = merge_pairs(std::mem::take(&mut self.windows));
            self.merges += 1;
        }
        self.windows.last()
    }

    pub fn windows(&self) -> &[RecordedWindow] {
        &self.windows
    }

    /// The processes' memory figures at the end of the window just closed.
    /// With `--stack-sample`: the malloc family's exact cumulative totals
    /// at the last window's end, which `close` was given estimates of.
    pub fn set_last_exact(&mut self, cumulative: StackTotals) {
        let change = cumulative.since(&self.last_exact);
        if let Some(last) = self.windows.last_mut() {
            // A window merged into it has its own part already.
            let mut exact = last.exact_malloc.unwrap_or_default();
            exact.add(&change);
            last.exact_malloc = Some(exact);
            last.live_bytes = cumulative.live_bytes();
        }
        self.last_exact = cumulative;
    }

    pub fn set_last_memory(&mut self, memory: crate::process_memory::MemoryFigures) {
        if let Some(last) = self.windows.last_mut() {
            last.rss_bytes = memory.rss_bytes;
            last.memory = Some(memory);
        }
    }
}

/// Neighbouring windows merged two by two (an odd last one stays as it
/// is): what each pair allocated and freed, and the figures at the end of
/// the later one.
pub fn merge_pairs(windows: Vec<RecordedWindow>) -> Vec<RecordedWindow> {
    let mut merged = Vec::with_capacity(windows.len().div_ceil(2));
    let mut windows = windows.into_iter();
    while let Some(mut first) = windows.next() {
        if let Some(second) = windows.next() {
            for (key, change) in second.changes {
                first.changes.entry(key).or_default().add(&change);
            }
            first.end_s = second.end_s;
            first.end_ns = second.end_ns;
            first.closed_by = second.closed_by;
            first.live_bytes = second.live_bytes;
            first.rss_bytes = second.rss_bytes;
            first.memory = second.memory;
            if let Some(exact) = second.exact_malloc {
                first.exact_malloc.get_or_insert_default().add(&exact);
            }
        }
        merged.push(first);
    }
    merged
}

/// What happened between two cumulative snapshots, per key; keys whose
/// totals did not move are left out.
pub fn changes_between(
    earlier: &BTreeMap<StackKey, StackTotals>,
    later: &BTreeMap<StackKey, StackTotals>,
) -> BTreeMap<StackKey, StackTotals> {
    later
        .iter()
        .filter_map(|(key, now)| {
            let change = match earlier.get(key) {
                Some(before) => now.since(before),
                None => *now,
            };
            (change != StackTotals::default()).then_some((*key, change))
        })
        .collect()
}

/// Cumulative totals at the end of window `index`: its changes and those
/// of every window before it.
pub fn totals_at(windows: &[RecordedWindow], index: usize) -> BTreeMap<StackKey, StackTotals> {
    let mut totals: BTreeMap<StackKey, StackTotals> = BTreeMap::new();
    for window in windows.iter().take(index + 1) {
        for (key, change) in &window.changes {
            totals.entry(*key).or_default().add(change);
        }
    }
    totals
}

/// The window a block allocated at `ns` (kernel clock) belongs to: the
/// first whose end is not before it.
pub fn window_of(windows: &[RecordedWindow], ns: u64) -> usize {
    windows
        .partition_point(|w| w.end_ns < ns)
        .min(windows.len().saturating_sub(1))
}

/// The window whose end is nearest to `at_s`.
pub fn nearest_end(windows: &[RecordedWindow], at_s: f64) -> Option<usize> {
    windows
        .iter()
        .enumerate()
        .min_by(|(_, a), (_, b)| (a.end_s - at_s).abs().total_cmp(&(b.end_s - at_s).abs()))
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn totals(alloc: u64, free: u64) -> StackTotals {
        StackTotals {
            alloc_count: alloc,
            alloc_bytes: alloc * 100,
            free_count: free,
            free_bytes: free * 100,
        }
    }

    fn snapshot(entries: &[(u32, StackTotals)]) -> BTreeMap<StackKey, StackTotals> {
        entries
            .iter()
            .map(|(stack, t)| (StackKey::new(1, *stack), *t))
            .collect()
    }

    /// Check that a window holds only what moved, and a new stack whole.
    #[test]
    fn a_window_is_the_difference_of_its_ends() {
        let mut timeline = Timeline::default();
        timeline.close(
            (1.0, 0),
            snapshot(&[(1, totals(3, 1))]),
            10,
            WindowEnd::Timer,
        );
        let window = timeline
            .close(
                (2.0, 0),
                snapshot(&[(1, totals(3, 1)), (2, totals(5, 0))]),
                20,
                WindowEnd::Mark,
            )
            .cloned()
            .expect("a window");
        assert_eq!(window.changes, snapshot(&[(2, totals(5, 0))]));
        assert_eq!((window.start_s, window.end_s), (1.0, 2.0));
        assert_eq!(window.live_bytes, 200 + 500);
        assert_eq!(window.rss_bytes, 20);
        assert_eq!(window.closed_by, WindowEnd::Mark);
    }

    #[test]
    fn an_instant_empty_window_is_not_kept() {
        let mut timeline = Timeline::default();
        let now = snapshot(&[(1, totals(3, 1))]);
        assert!(
            timeline
                .close((1.0, 0), now.clone(), 0, WindowEnd::Timer)
                .is_some()
        );
        assert!(
            timeline
                .close((1.0, 0), now.clone(), 0, WindowEnd::End)
                .is_none()
        );
        // Long enough, it is a window in which nothing happened.
        assert!(timeline.close((2.0, 0), now, 0, WindowEnd::End).is_some());
        assert_eq!(timeline.windows().len(), 2);
    }

    /// With `--stack-sample` the windows' totals are the exact ones given,
    /// merged windows included, whatever the sites' estimates say.
    #[test]
    fn exact_totals_stand_beside_estimated_sites() {
        // Nine windows kept: the tenth merges all in pairs, itself with the
        // ninth before its exact totals are given.
        let mut timeline = Timeline::with_max_windows(9);
        let key = StackKey::new(1, 7);
        for i in 1..=10u64 {
            let estimate = BTreeMap::from([(key, StackTotals::new(i, 1000 * i, 0, 0))]);
            assert!(
                timeline
                    .close((i as f64, 0), estimate, 0, WindowEnd::Timer)
                    .is_some()
            );
            timeline.set_last_exact(StackTotals::new(10 * i, 900 * i, i, 100 * i));
        }
        let windows = timeline.windows();
        assert_eq!(windows.len(), 5);
        for window in windows {
            assert_eq!(window.malloc_changes(), StackTotals::new(20, 1800, 2, 200));
            assert_eq!(window.changes[&key], StackTotals::new(2, 2000, 0, 0));
        }
        assert_eq!(windows[4].live_bytes, 9000 - 1000);
    }

    #[test]
    fn the_nearest_window_end_is_found() {
        let windows: Vec<RecordedWindow> = [1.0, 2.0, 4.0]
            .iter()
            .map(|end| RecordedWindow {
                end_s: *end,
                ..RecordedWindow::default()
            })
            .collect();
        assert_eq!(nearest_end(&windows, 2.9), Some(1));
        assert_eq!(nearest_end(&windows, 3.1), Some(2));
        assert_eq!(nearest_end(&windows, 0.0), Some(0));
        assert_eq!(nearest_end(&[], 1.0), None);
    }

    /// Check that a long session keeps at most MAX_WINDOWS windows, which
    /// still tile it and add up to its totals.
    #[test]
    fn a_long_session_merges_its_windows() {
        let mut timeline = Timeline::default();
        let mut cumulative = BTreeMap::new();
        for i in 0..3 * MAX_WINDOWS {
            cumulative.insert(StackKey::new(1, (i % 7) as u32), totals(i as u64, 0));
            timeline.close(((i + 1) as f64, 0), cumulative.clone(), 0, WindowEnd::Timer);
        }
        let windows = timeline.windows();
        assert!(windows.len() <= MAX_WINDOWS, "{}", windows.len());
        assert_eq!(windows[0].start_s, 0.0);
        assert_eq!(
            windows.last().map(|w| w.end_s),
            Some((3 * MAX_WINDOWS) as f64)
        );
        for pair in windows.windows(2) {
            assert_eq!(pair[0].end_s, pair[1].start_s);
        }
        assert_eq!(totals_at(windows, windows.len() - 1), cumulative);
    }

    proptest! {
        /// Check that the windows add up to the last snapshot, whatever the
        /// order in which stacks appear and grow.
        #[test]
        fn windows_add_up_to_the_cumulative_totals(
            steps in prop::collection::vec(
                prop::collection::vec((0u32..6, 0u64..50, 0u64..50), 0..8),
                1..12,
            )
        ) {
            let mut timeline = Timeline::default();
            let mut cumulative: BTreeMap<StackKey, StackTotals> = BTreeMap::new();
            for (i, step) in steps.iter().enumerate() {
                for (stack, alloc, free) in step {
                    let t = cumulative.entry(StackKey::new(1, *stack)).or_default();
                    t.add(&totals(*alloc, (*free).min(*alloc)));
                }
                timeline.close((i as f64 + 1.0, 0), cumulative.clone(), 0, WindowEnd::Timer);
            }
            let windows = timeline.windows();
            let summed = totals_at(windows, windows.len() - 1);
            let nonzero: BTreeMap<_, _> = cumulative
                .into_iter()
                .filter(|(_, t)| *t != StackTotals::default())
                .collect();
            prop_assert_eq!(summed, nonzero);
            let live: u64 = windows.last().map(|w| w.live_bytes).unwrap_or(0);
            let expected: u64 = totals_at(windows, windows.len() - 1)
                .values()
                .map(StackTotals::live_bytes)
                .sum();
            prop_assert_eq!(live, expected);
        }
    }
}
