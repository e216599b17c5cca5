//! `memscope diff`'s outputs: the table of the chains that changed most and
//! a differential flamegraph (red grew, blue shrank; widths are the new
//! profile's figures, as in Brendan Gregg's differential flame graphs).

use std::io::{self, Write};

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, Palette},
};

use super::{OutputError, escape::escape_control, folded::frame_name, shorten};
use crate::{
    diff::{Change, Metric, ProfileDiff},
    units::format_bytes,
};

/// Frames of a chain shown in the table.
const CHAIN_FRAMES: usize = 4;

/// The differential flamegraph's file name when none is given.
pub const DIFF_SVG: &str = "diff.svg";

/// Writes the totals and the `limit` chains that changed most.
pub fn render_table(diff: &ProfileDiff, limit: usize, out: &mut impl Write) -> io::Result<()> {
    let amount = |value: i64| figure(diff.metric, value);
    writeln!(
        out,
        "memscope diff: {} of {} over {:.1}s -> {} over {:.1}s",
        diff.metric.describe(),
        escape_control(&diff.base.command),
        diff.base.duration_s,
        escape_control(&diff.new.command),
        diff.new.duration_s,
    )?;
    writeln!(
        out,
        "total: {} -> {} ({})",
        amount(diff.base.total),
        amount(diff.new.total),
        signed(diff.metric, diff.new.total.saturating_sub(diff.base.total))
    )?;
    let changed: Vec<&Change> = diff.changes.iter().filter(|c| c.delta() != 0).collect();
    if changed.is_empty() {
        return writeln!(out, "no site changed");
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:>16} {:>16} {:>16}  SITE (allocating function <- callers)",
        "CHANGE", "BASE", "NEW"
    )?;
    for change in changed.iter().take(limit) {
        writeln!(
            out,
            "{:>16} {:>16} {:>16}  {}",
            signed(diff.metric, change.delta()),
            change.base,
            change.new,
            chain_text(&change.chain)
        )?;
    }
    if changed.len() > limit {
        writeln!(
            out,
            "... {} more changed sites (--top N)",
            changed.len() - limit
        )?;
    }
    Ok(())
}

/// Renders the differential flamegraph. Deterministic.
pub fn render_svg(diff: &ProfileDiff) -> Result<Vec<u8>, OutputError> {
    let mut options = Options::default();
    options.title = format!(
        "memscope diff: {} of {} -> {}",
        diff.metric.describe(),
        shorten(&escape_control(&diff.base.command)),
        shorten(&escape_control(&diff.new.command))
    );
    options.subtitle = Some(format!(
        "{} -> {} ({}); red grew, blue shrank; widths are the new profile's",
        figure(diff.metric, diff.base.total),
        figure(diff.metric, diff.new.total),
        signed(diff.metric, diff.new.total.saturating_sub(diff.base.total))
    ));
    options.count_name = diff.metric.unit().into();
    options.name_type = "Function:".into();
    options.colors = Palette::Basic(BasicPalette::Mem);
    options.deterministic = true;
    let lines = folded(diff);
    if lines.is_empty() {
        return Ok(super::flamegraph::empty_svg(&options.title, "difference").into_bytes());
    }
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg).map_err(
        |error| OutputError::Render {
            what: DIFF_SVG,
            message: error.to_string(),
        },
    )?;
    Ok(svg)
}

/// `root;...;leaf base new` per chain, negative figures as 0 (a flamegraph
/// has no negative widths).
fn folded(diff: &ProfileDiff) -> Vec<String> {
    let mut lines: Vec<String> = diff
        .changes
        .iter()
        .filter(|c| c.base > 0 || c.new > 0)
        .map(|change| {
            let stack: Vec<String> = change
                .chain
                .iter()
                .rev()
                .map(|name| frame_name(name))
                .collect();
            format!(
                "{} {} {}",
                stack.join(";"),
                change.base.max(0),
                change.new.max(0)
            )
        })
        .collect();
    lines.sort();
    lines
}

fn chain_text(chain: &[String]) -> String {
    let mut text = chain
        .iter()
        .take(CHAIN_FRAMES)
        .map(|name| escape_control(name).into_owned())
        .collect::<Vec<_>>()
        .join(" <- ");
    if chain.len() > CHAIN_FRAMES {
        text.push_str(" <- ...");
    }
    text
}

fn figure(metric: Metric, value: i64) -> String {
    match metric {
        Metric::Allocs => format!("{value} calls"),
        _ => format!(
            "{value} bytes ({}{})",
            if value < 0 { "-" } else { "" },
            format_bytes(value.unsigned_abs())
        ),
    }
}

fn signed(metric: Metric, value: i64) -> String {
    let sign = if value > 0 { "+" } else { "" };
    match metric {
        Metric::Allocs => format!("{sign}{value}"),
        _ => format!(
            "{}{}",
            if value < 0 { "-" } else { sign },
            format_bytes(value.unsigned_abs())
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        diff::Metric,
        report::{Report, tests_support::sample_report},
    };

    fn pair() -> (Report, Report) {
        let base = sample_report();
        let mut new = sample_report();
        new.target.command = "./server --new".into();
        new.sites[0].live_bytes *= 10;
        new.sites[1].live_bytes = 0;
        // Another build: the same chain at other lines.
        for frame in &mut new.sites[0].frames {
            frame.line = frame.line.map(|line| line + 3);
        }
        (base, new)
    }

    #[test]
    fn table_and_svg_match_golden_files() {
        let (base, new) = pair();
        let diff = ProfileDiff::compare(&base, &new, Metric::Live);
        let mut table = Vec::new();
        render_table(&diff, 10, &mut table).expect("table");
        crate::output::assert_golden("diff.txt", &table);
        crate::output::assert_golden("diff.svg", &render_svg(&diff).expect("svg"));
    }

    #[test]
    fn identical_profiles_say_nothing_changed() {
        let report = sample_report();
        let diff = ProfileDiff::compare(&report, &report, Metric::Alloc);
        let mut table = Vec::new();
        render_table(&diff, 10, &mut table).expect("table");
        assert!(String::from_utf8_lossy(&table).ends_with("no site changed\n"));
    }

    #[test]
    fn folded_lines_carry_both_figures() {
        let (base, new) = pair();
        let diff = ProfileDiff::compare(&base, &new, Metric::Live);
        for line in folded(&diff) {
            let counts: Vec<&str> = line.rsplitn(3, ' ').take(2).collect();
            assert!(counts.iter().all(|c| c.parse::<u64>().is_ok()), "{line}");
        }
    }
}
