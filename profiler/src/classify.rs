//! Leak, growing, bounded, temporary: what a site's memory is doing, decided
//! from its history across windows alone (a pure function, so a saved
//! report is classified again the same way). docs/analysis.md states the
//! rule with examples.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::report::{Report, SiteHistory};

/// Windows a verdict needs: fewer cannot tell a cache that levels off from
/// a leak.
pub const MIN_WINDOWS: usize = 4;

/// A level that moved by at most this share over the last third of the
/// windows has levelled off.
const LEVEL_SHARE: f64 = 0.05;

/// Blocks from the early windows still live at this share or more: the
/// site does not free what it allocated then.
const SURVIVAL_FOR_LEAK: f64 = 0.9;

/// What a site's memory is doing (docs/analysis.md has the rule).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Live bytes keep rising and blocks from the early windows are never
    /// freed.
    Leak,
    /// Rising, but old blocks do get freed: an unbounded queue or backlog.
    Growing,
    /// Rose, then levelled off: a cache, a pool, lazy initialisation.
    Bounded,
    /// Allocated and freed again: nothing (or almost nothing) of it stays.
    Temporary,
    /// Not enough windows yet.
    Unknown,
}

/// How sure a verdict is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Confidence {
    High,
    Medium,
    Low,
}

/// A site's verdict and the figures it rests on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Classification {
    /// What its memory is doing.
    pub verdict: Verdict,
    /// Live bytes added per window: over the last third of the windows when
    /// rising, over the whole session otherwise.
    pub growth_bytes_per_window: i64,
    /// How sure the verdict is.
    pub confidence: Confidence,
    /// Why, in words: the figures the verdict rests on.
    pub reason: String,
    /// With `unknown`: how many more windows a verdict needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_needed: Option<usize>,
}

/// Classifies a site that holds `live_bytes` at the end, from its history
/// (None: it had none, as a site live at no window's end).
pub fn classify(live_bytes: u64, history: Option<&SiteHistory>) -> Classification {
    if live_bytes == 0 {
        return Classification {
            verdict: Verdict::Temporary,
            growth_bytes_per_window: 0,
            confidence: Confidence::High,
            reason: "everything it allocated was freed".into(),
            windows_needed: None,
        };
    }
    let Some(history) = history else {
        return Classification {
            verdict: Verdict::Unknown,
            growth_bytes_per_window: 0,
            confidence: Confidence::Low,
            reason: "no history across windows (a report from before memscope kept one)".into(),
            windows_needed: Some(MIN_WINDOWS),
        };
    };
    let live = &history.live_bytes;
    let windows = live.len();
    if windows < MIN_WINDOWS {
        return Classification {
            verdict: Verdict::Unknown,
            growth_bytes_per_window: 0,
            confidence: Confidence::Low,
            reason: format!("{windows} windows so far; a verdict needs {MIN_WINDOWS}"),
            windows_needed: Some(MIN_WINDOWS - windows),
        };
    }
    let last = live[windows - 1] as f64;
    let highest = live.iter().copied().max().unwrap_or(0) as f64;
    let overall = (last - live[0] as f64) / (windows - 1) as f64;
    if last <= highest * LEVEL_SHARE {
        return Classification {
            verdict: Verdict::Temporary,
            growth_bytes_per_window: overall as i64,
            confidence: Confidence::High,
            reason: format!(
                "held up to {} bytes, then released all but {}",
                highest as u64, last as u64
            ),
            windows_needed: None,
        };
    }
    let third = (windows / 3).max(1);
    let recent = last - live[windows - 1 - third] as f64;
    let rising_windows = live.windows(2).filter(|w| w[1] > w[0]).count();
    let confidence = if windows >= 2 * MIN_WINDOWS {
        Confidence::High
    } else {
        Confidence::Medium
    };
    if recent <= last * LEVEL_SHARE {
        return Classification {
            verdict: Verdict::Bounded,
            growth_bytes_per_window: overall as i64,
            confidence,
            reason: format!(
                "levelled off at {} bytes: {:+} over the last {third} of {windows} windows",
                last as u64, recent as i64
            ),
            windows_needed: None,
        };
    }
    let per_window = (recent / third as f64) as i64;
    // Blocks from the windows before the last third: still live, or freed?
    let early = windows - third;
    let allocated: u64 = history.alloc_bytes.iter().take(early).sum();
    let surviving: u64 = history.surviving_bytes.iter().take(early).sum();
    if allocated == 0 {
        return Classification {
            verdict: Verdict::Unknown,
            growth_bytes_per_window: per_window,
            confidence: Confidence::Low,
            reason: format!("rising, but it began allocating only in the last {third} windows"),
            windows_needed: Some(third),
        };
    }
    let survival = surviving as f64 / allocated as f64;
    let verdict = if survival >= SURVIVAL_FOR_LEAK {
        Verdict::Leak
    } else {
        Verdict::Growing
    };
    Classification {
        verdict,
        growth_bytes_per_window: per_window,
        confidence: if rising_windows * 4 >= (windows - 1) * 3 {
            confidence
        } else {
            Confidence::Low
        },
        reason: format!(
            "rose in {rising_windows} of {} windows ({per_window:+} bytes per window lately); {:.0}% of the bytes allocated before the last {third} windows {}",
            windows - 1,
            survival * 100.0,
            if verdict == Verdict::Leak {
                "are still live"
            } else {
                "are still live, the rest was freed"
            }
        ),
        windows_needed: None,
    }
}

/// Classifies every site of a report from its saved history. (Sites
/// listed per process, `--per-process`, have no history of their own.)
pub fn classify_sites(report: &mut Report) {
    for site in &mut report.sites {
        site.classification = Some(classify(site.live_bytes, site.history.as_ref()));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A site that allocates `alloc[k]` in window k, of which `kept[k]`
    /// survive to the end, and whose live bytes are `live[k]` at each end.
    fn history(live: &[u64], alloc: &[u64], surviving: &[u64]) -> SiteHistory {
        SiteHistory {
            live_bytes: live.to_vec(),
            alloc_bytes: alloc.to_vec(),
            surviving_bytes: surviving.to_vec(),
        }
    }

    fn verdict(live: &[u64], alloc: &[u64], surviving: &[u64]) -> Verdict {
        let history = history(live, alloc, surviving);
        classify(live.last().copied().unwrap_or(0), Some(&history)).verdict
    }

    /// Check that a steady leak, whose every block stays, is a leak.
    #[test]
    fn a_steady_leak_is_a_leak() {
        let live: Vec<u64> = (1..=10).map(|k| k * 100).collect();
        assert_eq!(verdict(&live, &[100; 10], &[100; 10]), Verdict::Leak);
        let c = classify(1000, Some(&history(&live, &[100; 10], &[100; 10])));
        assert_eq!(c.growth_bytes_per_window, 100);
        assert_eq!(c.confidence, Confidence::High);
    }

    /// Check that a queue whose old entries are served while it grows is
    /// growing, not a leak.
    #[test]
    fn a_queue_that_frees_old_entries_is_growing() {
        let live: Vec<u64> = (1..=10).map(|k| k * 50).collect();
        let surviving = [0, 0, 0, 0, 0, 0, 50, 100, 100, 100];
        assert_eq!(verdict(&live, &[100; 10], &surviving), Verdict::Growing);
    }

    /// Check that a cache that fills and then evicts is bounded.
    #[test]
    fn a_cache_that_levels_off_is_bounded() {
        let live = [300, 600, 900, 1000, 1000, 1000, 1000, 1000, 1000, 1000];
        let surviving = [0, 0, 0, 0, 0, 0, 100, 300, 300, 300];
        assert_eq!(verdict(&live, &[300; 10], &surviving), Verdict::Bounded);
    }

    /// Check that memory allocated once at start-up and kept is bounded.
    #[test]
    fn lazy_initialisation_is_bounded() {
        let mut alloc = [0; 10];
        alloc[0] = 5000;
        let mut surviving = [0; 10];
        surviving[0] = 5000;
        assert_eq!(verdict(&[5000; 10], &alloc, &surviving), Verdict::Bounded);
    }

    /// Check that churn, and a backlog drained by the end, are temporary.
    #[test]
    fn what_is_freed_again_is_temporary() {
        assert_eq!(classify(0, None).verdict, Verdict::Temporary);
        // Live, but no history to judge by.
        assert_eq!(classify(10, None).verdict, Verdict::Unknown);
        let drained = [100, 400, 800, 400, 100, 0, 0, 0, 0, 0];
        assert_eq!(verdict(&drained, &[100; 10], &[0; 10]), Verdict::Temporary);
    }

    /// Check that three windows are too few, and the verdict says how many
    /// more it needs.
    #[test]
    fn few_windows_give_no_verdict() {
        let c = classify(300, Some(&history(&[100, 200, 300], &[100; 3], &[100; 3])));
        assert_eq!((c.verdict, c.windows_needed), (Verdict::Unknown, Some(1)));
    }

    proptest! {
        /// Check that a site whose live bytes end no higher than they were
        /// two thirds of the way through is never called a leak, whatever
        /// happened before: caches, pools, drained queues.
        #[test]
        fn a_level_that_stopped_rising_is_never_a_leak(
            rise in prop::collection::vec(0u64..10_000, 2..20),
            plateau in 2usize..20,
        ) {
            let mut live: Vec<u64> = rise
                .iter()
                .scan(0, |sum, step| { *sum += step; Some(*sum) })
                .collect();
            let top = *live.last().unwrap_or(&0);
            live.extend(std::iter::repeat_n(top, plateau.max(live.len())));
            let n = live.len();
            let v = verdict(&live, &vec![100; n], &vec![100; n]);
            prop_assert_ne!(v, Verdict::Leak);
            prop_assert_ne!(v, Verdict::Growing);
        }

        /// Check that live bytes rising by a steady step in every window,
        /// all of it kept, are a leak once there are enough windows.
        #[test]
        fn a_steady_rise_that_keeps_everything_is_a_leak(
            step in 1u64..1_000_000,
            windows in MIN_WINDOWS..40,
        ) {
            let live: Vec<u64> = (1..=windows as u64).map(|k| k * step).collect();
            let alloc = vec![step; windows];
            prop_assert_eq!(verdict(&live, &alloc, &alloc), Verdict::Leak);
        }
    }
}
