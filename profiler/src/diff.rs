//! Two saved profiles compared site by site (`memscope diff`).
//!
//! Sites are matched by their function chain, not by address or line: two
//! builds of a program put the same code at other addresses and lines, and
//! a site's leak should still line up with itself. Python frames keep
//! their file, since a function name alone is ambiguous across modules.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::{Frame, Language, Report, Site};

/// Which figure of each site is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Bytes live at the end of each profile (inuse.svg).
    Live,
    /// Bytes that became live during each profile and stayed (growth.svg).
    Growth,
    /// Bytes allocated, freed or not (alloc.svg).
    Alloc,
    /// Allocation calls.
    Allocs,
}

impl Metric {
    fn of(self, site: &Site) -> i64 {
        let clamp = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        match self {
            Metric::Live => clamp(site.live_bytes),
            Metric::Growth => site.growth_bytes,
            Metric::Alloc => clamp(site.alloc_bytes),
            Metric::Allocs => clamp(site.alloc_count),
        }
    }

    /// What the figures count, for titles and table headers.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Allocs => "calls",
            _ => "bytes",
        }
    }

    /// The figure in words.
    pub fn describe(self) -> &'static str {
        match self {
            Metric::Live => "live bytes",
            Metric::Growth => "growth",
            Metric::Alloc => "bytes allocated",
            Metric::Allocs => "allocation calls",
        }
    }
}

/// One function chain's figure in both profiles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Innermost first, as a site's frames.
    pub chain: Vec<String>,
    pub base: i64,
    pub new: i64,
}

impl Change {
    pub fn delta(&self) -> i64 {
        self.new.saturating_sub(self.base)
    }
}

/// The comparison: every chain with a figure in either profile, those that
/// changed most first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProfileDiff {
    pub metric: Metric,
    pub base: Side,
    pub new: Side,
    pub changes: Vec<Change>,
}

/// What each profile was, for titles.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Side {
    pub command: String,
    pub duration_s: f64,
    /// The metric summed over its sites.
    pub total: i64,
}

impl Side {
    fn of(report: &Report, metric: Metric) -> Self {
        Self {
            command: report.target.command.clone(),
            duration_s: report.duration_s,
            total: report
                .sites
                .iter()
                .map(|s| metric.of(s))
                .fold(0, i64::saturating_add),
        }
    }
}

impl ProfileDiff {
    /// Compares `new` against `base` by `metric`. Sorted by the size of the
    /// change, largest first, then by chain: the same inputs give the same
    /// order.
    pub fn compare(base: &Report, new: &Report, metric: Metric) -> Self {
        let mut figures: BTreeMap<Vec<String>, (i64, i64)> = BTreeMap::new();
        for (report, side) in [(base, 0), (new, 1)] {
            for site in &report.sites {
                let entry = figures.entry(chain(&site.frames)).or_default();
                let slot = if side == 0 {
                    &mut entry.0
                } else {
                    &mut entry.1
                };
                *slot = slot.saturating_add(metric.of(site));
            }
        }
        let mut changes: Vec<Change> = figures
            .into_iter()
            .filter(|(_, (base, new))| *base != 0 || *new != 0)
            .map(|(chain, (base, new))| Change { chain, base, new })
            .collect();
        changes.sort_by(|a, b| {
            b.delta()
                .unsigned_abs()
                .cmp(&a.delta().unsigned_abs())
                .then(b.delta().cmp(&a.delta()))
                .then_with(|| a.chain.cmp(&b.chain))
        });
        Self {
            metric,
            base: Side::of(base, metric),
            new: Side::of(new, metric),
            changes,
        }
    }
}

/// A site's frames as names that survive a rebuild.
fn chain(frames: &[Frame]) -> Vec<String> {
    frames.iter().map(frame_key).collect()
}

fn frame_key(frame: &Frame) -> String {
    match frame.language {
        // The label (function and file) without its line.
        Language::Python => Frame {
            line: None,
            ..frame.clone()
        }
        .label(),
        Language::Native => frame.function.clone(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::report::tests_support::sample_report;

    fn with_sites(sites: &[(&[&str], u64)]) -> Report {
        let mut report = sample_report();
        let template = report.sites[0].clone();
        report.sites = sites
            .iter()
            .map(|(frames, live)| Site {
                frames: frames.iter().map(|f| Frame::named(f)).collect(),
                live_bytes: *live,
                ..template.clone()
            })
            .collect();
        report
    }

    #[test]
    fn the_site_that_grew_most_comes_first() {
        let base = with_sites(&[(&["leak", "main"], 1000), (&["cache", "main"], 500)]);
        let new = with_sites(&[
            (&["leak", "main"], 10_000),
            (&["cache", "main"], 400),
            (&["fresh", "main"], 50),
        ]);
        let diff = ProfileDiff::compare(&base, &new, Metric::Live);
        let rows: Vec<(&str, i64)> = diff
            .changes
            .iter()
            .map(|c| (c.chain[0].as_str(), c.delta()))
            .collect();
        assert_eq!(rows, [("leak", 9000), ("cache", -100), ("fresh", 50)]);
        assert_eq!((diff.base.total, diff.new.total), (1500, 10_450));
    }

    #[test]
    fn sites_split_by_line_or_address_are_one_chain() {
        let base = with_sites(&[(&["f", "main"], 10)]);
        let mut new = with_sites(&[(&["f", "main"], 10), (&["f", "main"], 5)]);
        new.sites[1].frames[0].line = Some(99);
        let diff = ProfileDiff::compare(&base, &new, Metric::Live);
        assert_eq!(diff.changes.len(), 1);
        assert_eq!((diff.changes[0].base, diff.changes[0].new), (10, 15));
    }

    #[test]
    fn python_frames_keep_their_file_but_not_their_line() {
        let frame = Frame {
            function: "analyze".into(),
            module: None,
            file: Some("/srv/app.py".into()),
            line: Some(20),
            language: Language::Python,
        };
        assert_eq!(frame_key(&frame), "analyze (app.py)");
    }

    proptest! {
        #[test]
        fn deltas_add_up_to_the_change_in_totals(
            base in proptest::collection::vec((0usize..4, 0u64..1_000_000), 0..12),
            new in proptest::collection::vec((0usize..4, 0u64..1_000_000), 0..12),
        ) {
            const NAMES: [&str; 4] = ["a", "b", "c", "d"];
            let report = |sites: &[(usize, u64)]| {
                let frames: Vec<[&str; 2]> = sites.iter().map(|(i, _)| [NAMES[*i], "main"]).collect();
                let sites: Vec<(&[&str], u64)> = frames
                    .iter()
                    .zip(sites)
                    .map(|(f, (_, live))| (&f[..], *live))
                    .collect();
                with_sites(&sites)
            };
            let (base, new) = (report(&base), report(&new));
            let diff = ProfileDiff::compare(&base, &new, Metric::Live);
            let sum: i64 = diff.changes.iter().map(Change::delta).sum();
            prop_assert_eq!(sum, diff.new.total - diff.base.total);
            let same = ProfileDiff::compare(&new, &new, Metric::Live);
            prop_assert!(same.changes.iter().all(|c| c.delta() == 0));
        }
    }
}
