//! `memscope check`: pass or fail a command's run on what its memory did.
//! A pure function of the report and the rules, so it can be tested on
//! made-up reports and is the same on a saved one.
//!
//! By default a site fails when its memory grows with work: the
//! classification of its windows says its live bytes rose to the end
//! (`leak`, or `growing` when its early blocks were freed: a backlog;
//! `classify`), and it holds at least `MIN_LEAK_BYTES` at the end. A
//! Python program's end is when its interpreter began to finalize. A
//! global table or a cache levels off and passes. With a baseline, a site
//! fails instead when it leaks more than the baseline allowed (or is new).
//! Thresholds (`--max-leaked`, `--max-growth`, `--max-rss`) add checks.
//! docs/ci.md states the rules with examples.

pub mod baseline;
pub mod render;
pub mod suppress;

use crate::{
    classify::{Verdict, classify},
    report::{Frame, Report, Site, SiteHistory, SiteKind},
    units::format_bytes,
};

pub use baseline::{Baseline, chain_of};
pub use suppress::Suppressions;

/// Leaks smaller than this do not fail a check by default: a few blocks
/// a library keeps for the process's lifetime.
pub const MIN_LEAK_BYTES: u64 = 4096;

/// How much more than its baseline a site may leak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tolerance {
    /// Of the baseline's bytes, and at least `MIN_LEAK_BYTES`.
    Percent(f64),
    Bytes(u64),
}

impl Default for Tolerance {
    fn default() -> Self {
        Self::Percent(10.0)
    }
}

impl Tolerance {
    /// The bytes a site may leak beyond `baseline`.
    pub fn allowed(&self, baseline: u64) -> u64 {
        match *self {
            Self::Percent(p) => ((baseline as f64 * p / 100.0) as u64).max(MIN_LEAK_BYTES),
            Self::Bytes(b) => b,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("`{input}` is not a tolerance: write a percentage (10%) or a size (64KB)")]
pub struct ToleranceError {
    input: String,
}

impl std::str::FromStr for Tolerance {
    type Err = ToleranceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let error = || ToleranceError {
            input: input.to_owned(),
        };
        match input.trim().strip_suffix('%') {
            Some(percent) => percent
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| p.is_finite() && *p >= 0.0)
                .map(Self::Percent)
                .ok_or_else(error),
            None => crate::units::parse_size(input)
                .map(Self::Bytes)
                .map_err(|_| error()),
        }
    }
}

/// What the run must keep to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// Bytes still live at the end, every site summed.
    pub max_leaked: Option<u64>,
    /// Growth of the live bytes in one window, or what one request still
    /// holds at its return with `--request-fn`.
    pub max_growth: Option<u64>,
    /// RSS of the processes summed, at any window's end.
    pub max_rss: Option<u64>,
    /// Seconds at the start whose allocations are left out: startup.
    pub warmup_s: f64,
    pub tolerance: Tolerance,
}

/// A site a check failed on.
#[derive(Clone, Debug, PartialEq)]
pub struct FailingSite {
    pub kind: SiteKind,
    /// As the table shows it.
    pub chain: String,
    /// The innermost frame with a source line.
    pub location: Option<(String, u32)>,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub message: String,
    pub site: Option<FailingSite>,
}

/// One check and what it found.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// `leaks`, `baseline`, `--max-leaked 1.0 MiB`, ...
    pub name: String,
    /// What was measured, in words (also when it passed).
    pub summary: String,
    pub failures: Vec<Failure>,
}

/// A suppression and the sites it matched.
#[derive(Clone, Debug, PartialEq)]
pub struct Suppressed {
    pub pattern: String,
    pub line: usize,
    pub sites: Vec<FailingSite>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GateResult {
    pub outcomes: Vec<Outcome>,
    /// Every suppression, in file order, with what it matched (none: it is
    /// unused, which the summary says).
    pub suppressions: Vec<Suppressed>,
    /// Things the reader should know that fail nothing.
    pub notes: Vec<String>,
}

impl GateResult {
    pub fn passed(&self) -> bool {
        self.outcomes.iter().all(|o| o.failures.is_empty())
    }

    pub fn failures(&self) -> impl Iterator<Item = &Failure> {
        self.outcomes.iter().flat_map(|o| o.failures.iter())
    }
}

/// A site as the checks see it: what it leaked after the warm-up.
struct Candidate<'a> {
    site: &'a Site,
    leaked: u64,
    verdict: Verdict,
    why: String,
}

/// Decides the run.
pub fn evaluate(
    report: &Report,
    rules: &Rules,
    baseline: Option<&Baseline>,
    suppressions: &Suppressions,
) -> GateResult {
    let warmup_windows = windows_before(report, rules.warmup_s);
    let teardown = teardown_window(report);
    let mut suppressed: Vec<Suppressed> = suppressions
        .patterns
        .iter()
        .map(|p| Suppressed {
            pattern: p.text.clone(),
            line: p.line,
            sites: Vec::new(),
        })
        .collect();
    let mut candidates = Vec::new();
    for site in &report.sites {
        let (leaked, history) = site_at_end(site, teardown, warmup_windows);
        if let Some(index) = suppressions.matching(&site.frames) {
            if leaked > 0 {
                suppressed[index].sites.push(failing_site(site, leaked));
            }
            continue;
        }
        let classification = match (history, warmup_windows) {
            (Some(history), w) if w > 0 || teardown.is_some() => {
                classify(leaked, Some(&history_after(&history, w)))
            }
            _ => site
                .classification
                .clone()
                .unwrap_or_else(|| classify(site.live_bytes, site.history.as_ref())),
        };
        let why = match teardown {
            Some(cut) => format!(
                "until the interpreter began to finalize ({:.2}s), {}",
                report.windows[cut].end_s, classification.reason
            ),
            None => classification.reason,
        };
        candidates.push(Candidate {
            site,
            leaked,
            verdict: classification.verdict,
            why,
        });
    }
    let mut outcomes = vec![match baseline {
        Some(baseline) => against_baseline(&candidates, baseline, rules.tolerance),
        None => leaks(&candidates),
    }];
    if let Some(max) = rules.max_leaked {
        outcomes.push(max_leaked(&candidates, max));
    }
    if let Some(max) = rules.max_growth {
        outcomes.push(max_growth(report, rules.warmup_s, max));
    }
    if let Some(max) = rules.max_rss {
        outcomes.push(max_rss(report, max));
    }
    let mut notes = Vec::new();
    let windows = report.windows.len().saturating_sub(warmup_windows);
    if windows < crate::classify::MIN_WINDOWS && baseline.is_none() {
        notes.push(format!(
            "{windows} windows after the warm-up: too few to tell a leak from a table that levels off ({} needed); the run was short, so shorten --window, or use --max-leaked or a baseline",
            crate::classify::MIN_WINDOWS
        ));
    }
    GateResult {
        outcomes,
        suppressions: suppressed,
        notes,
    }
}

/// A Python program ends when its interpreter begins to finalize (it
/// frees every object after, leaked or not): the window that closed then,
/// the target's if it runs Python, else the last interpreter's to finalize
/// (a helper that finalized early must not end the run).
pub(crate) fn teardown_window(report: &Report) -> Option<usize> {
    let target = report.processes.iter().find(|p| p.ppid.is_none());
    let at = target.and_then(|p| p.teardown_s).or_else(|| {
        report
            .processes
            .iter()
            .filter_map(|p| p.teardown_s)
            .max_by(f64::total_cmp)
    })?;
    report
        .windows
        .iter()
        .rposition(|w| w.closed_by == crate::timeline::WindowEnd::Teardown && w.end_s <= at + 1e-3)
}

/// What a site held at the run's end, beyond what it held after the
/// warm-up, and its history to that end.
pub(crate) fn site_at_end(
    site: &Site,
    teardown: Option<usize>,
    warmup_windows: usize,
) -> (u64, Option<SiteHistory>) {
    match (teardown, &site.history) {
        (Some(cut), Some(history)) => until_teardown(history, cut, warmup_windows),
        _ => (leaked_after(site, warmup_windows), site.history.clone()),
    }
}

/// The windows that ended within the warm-up.
pub(crate) fn windows_before(report: &Report, warmup_s: f64) -> usize {
    report
        .windows
        .iter()
        .take_while(|w| w.end_s <= warmup_s)
        .count()
}

/// Bytes live at the end, less those allocated in the first `windows`.
fn leaked_after(site: &Site, windows: usize) -> u64 {
    match &site.history {
        Some(history) if windows > 0 => {
            let early: u64 = history.surviving_bytes.iter().take(windows).sum();
            site.live_bytes.saturating_sub(early)
        }
        _ => site.live_bytes,
    }
}

/// A site's history up to window `cut` (an interpreter's teardown), and
/// what it held then beyond its level at the warm-up's end. Which blocks
/// of it would have lived on is unknown: the interpreter frees them all,
/// so they count as surviving.
fn until_teardown(history: &SiteHistory, cut: usize, warmup: usize) -> (u64, Option<SiteHistory>) {
    let take = |v: &Vec<u64>| v.iter().take(cut + 1).copied().collect::<Vec<u64>>();
    let live = take(&history.live_bytes);
    let at_cut = live.last().copied().unwrap_or(0);
    let at_warmup = warmup
        .checked_sub(1)
        .and_then(|i| live.get(i))
        .copied()
        .unwrap_or(0);
    let alloc = take(&history.alloc_bytes);
    let cut_history = SiteHistory {
        live_bytes: live,
        surviving_bytes: alloc.clone(),
        alloc_bytes: alloc,
    };
    (at_cut.saturating_sub(at_warmup), Some(cut_history))
}

/// A history without its first `windows` (the warm-up).
fn history_after(history: &SiteHistory, windows: usize) -> SiteHistory {
    let skip = |v: &Vec<u64>| v.iter().skip(windows).copied().collect();
    SiteHistory {
        live_bytes: skip(&history.live_bytes),
        alloc_bytes: skip(&history.alloc_bytes),
        surviving_bytes: skip(&history.surviving_bytes),
    }
}

fn failing_site(site: &Site, bytes: u64) -> FailingSite {
    FailingSite {
        kind: site.kind,
        chain: Frame::chain(&site.frames, 4),
        location: location(&site.frames),
        bytes,
    }
}

/// The innermost frame's source line that has one.
fn location(frames: &[Frame]) -> Option<(String, u32)> {
    frames.iter().find_map(|f| Some((f.file.clone()?, f.line?)))
}

fn leaks(candidates: &[Candidate]) -> Outcome {
    let failures: Vec<Failure> = candidates
        .iter()
        .filter(|c| matches!(c.verdict, Verdict::Leak | Verdict::Growing))
        .filter(|c| c.leaked >= MIN_LEAK_BYTES)
        .map(|c| Failure {
            message: format!(
                "{} {}: {} bytes ({}) live at the end; {}",
                Frame::chain(&c.site.frames, 4),
                if c.verdict == Verdict::Leak {
                    "leaks"
                } else {
                    "grows"
                },
                c.leaked,
                format_bytes(c.leaked),
                c.why
            ),
            site: Some(failing_site(c.site, c.leaked)),
        })
        .collect();
    let live: u64 = candidates.iter().map(|c| c.leaked).sum();
    Outcome {
        name: "leaks".into(),
        summary: format!(
            "{} of {} sites live at the end grow with work ({} live in all)",
            failures.len(),
            candidates.iter().filter(|c| c.leaked > 0).count(),
            format_bytes(live)
        ),
        failures,
    }
}

fn against_baseline(
    candidates: &[Candidate],
    baseline: &Baseline,
    tolerance: Tolerance,
) -> Outcome {
    // Sites that share a chain are one for the baseline.
    let mut by_chain: Vec<(SiteKind, Vec<String>, u64, &Site)> = Vec::new();
    for c in candidates.iter().filter(|c| c.leaked > 0) {
        let chain = chain_of(&c.site.frames);
        match by_chain
            .iter_mut()
            .find(|(kind, other, _, _)| *kind == c.site.kind && *other == chain)
        {
            Some(entry) => entry.2 += c.leaked,
            None => by_chain.push((c.site.kind, chain, c.leaked, c.site)),
        }
    }
    let mut failures = Vec::new();
    for (kind, chain, leaked, site) in &by_chain {
        let before = baseline.leaked(*kind, chain);
        let allowed = before.unwrap_or(0) + tolerance.allowed(before.unwrap_or(0));
        if *leaked <= allowed {
            continue;
        }
        let label = Frame::chain(&site.frames, 4);
        let message = match before {
            Some(before) => format!(
                "{label} leaks {} ({leaked} bytes), {} in the baseline: more than the tolerance allows ({})",
                format_bytes(*leaked),
                format_bytes(before),
                format_bytes(allowed)
            ),
            None => format!(
                "{label} is new: {} ({leaked} bytes) live at the end, none in the baseline",
                format_bytes(*leaked)
            ),
        };
        failures.push(Failure {
            message,
            site: Some(failing_site(site, *leaked)),
        });
    }
    let gone = baseline
        .sites
        .iter()
        .filter(|b| {
            !by_chain
                .iter()
                .any(|(kind, chain, _, _)| *kind == b.kind && *chain == b.chain)
        })
        .count();
    Outcome {
        name: "baseline".into(),
        summary: format!(
            "{} sites live at the end, {} over the baseline; {gone} of its {} sites leak no more",
            by_chain.len(),
            failures.len(),
            baseline.sites.len()
        ),
        failures,
    }
}

fn max_leaked(candidates: &[Candidate], max: u64) -> Outcome {
    let leaked: u64 = candidates.iter().map(|c| c.leaked).sum();
    let mut top: Vec<&Candidate> = candidates.iter().filter(|c| c.leaked > 0).collect();
    top.sort_by_key(|c| std::cmp::Reverse(c.leaked));
    let failures = if leaked > max {
        top.iter()
            .take(3)
            .map(|c| Failure {
                message: format!(
                    "{} bytes ({}) live at the end, more than {}: {} holds {}",
                    leaked,
                    format_bytes(leaked),
                    format_bytes(max),
                    Frame::chain(&c.site.frames, 4),
                    format_bytes(c.leaked)
                ),
                site: Some(failing_site(c.site, c.leaked)),
            })
            .collect()
    } else {
        Vec::new()
    };
    Outcome {
        name: format!("--max-leaked {}", format_bytes(max)),
        summary: format!("{} live at the end", format_bytes(leaked)),
        failures,
    }
}

fn max_growth(report: &Report, warmup_s: f64, max: u64) -> Outcome {
    if let Some(requests) = &report.requests {
        let over: Vec<_> = requests
            .largest
            .iter()
            .filter(|r| r.start_s >= warmup_s && r.retained_bytes > max)
            .collect();
        let largest = requests.retained_bytes.as_ref().map_or(0, |p| p.max);
        let site = requests.sites.first();
        return Outcome {
            name: format!("--max-growth {} per request", format_bytes(max)),
            summary: format!(
                "{} requests; the most one still held at its return: {}",
                requests.count,
                format_bytes(largest)
            ),
            failures: over
                .iter()
                .map(|r| Failure {
                    message: format!(
                        "a request (pid {}, {:.2}s in) still held {} at its return, more than {}",
                        r.pid,
                        r.start_s,
                        format_bytes(r.retained_bytes),
                        format_bytes(max)
                    ),
                    site: site.map(|s| failing_site(s, r.retained_bytes)),
                })
                .collect(),
        };
    }
    let after: Vec<_> = report
        .windows
        .iter()
        .filter(|w| w.start_s >= warmup_s)
        .collect();
    let most = after.iter().map(|w| w.growth_bytes).max().unwrap_or(0);
    let failures = after
        .iter()
        .filter(|w| w.growth_bytes > max as i64)
        .map(|w| Failure {
            message: format!(
                "window {} ({:.2}-{:.2}s) grew the live bytes by {}, more than {}",
                w.index,
                w.start_s,
                w.end_s,
                format_bytes(w.growth_bytes.unsigned_abs()),
                format_bytes(max)
            ),
            site: w.top_sites.first().map(|s| FailingSite {
                kind: s.kind,
                chain: Frame::chain(&s.frames, 4),
                location: location(&s.frames),
                bytes: s.growth_bytes.unsigned_abs(),
            }),
        })
        .collect();
    Outcome {
        name: format!("--max-growth {} per window", format_bytes(max)),
        summary: format!(
            "{} windows; the most one grew: {}",
            after.len(),
            format_bytes(most.max(0) as u64)
        ),
        failures,
    }
}

fn max_rss(report: &Report, max: u64) -> Outcome {
    let (most, at) = report
        .windows
        .iter()
        .map(|w| (w.rss_bytes, w.end_s))
        .max_by_key(|(rss, _)| *rss)
        .unwrap_or((0, 0.0));
    let failures = if most > max {
        vec![Failure {
            message: format!(
                "RSS reached {} at {at:.2}s, more than {}",
                format_bytes(most),
                format_bytes(max)
            ),
            site: None,
        }]
    } else {
        Vec::new()
    };
    Outcome {
        name: format!("--max-rss {}", format_bytes(max)),
        summary: format!("RSS at most {}", format_bytes(most)),
        failures,
    }
}

#[cfg(test)]
mod tests;
