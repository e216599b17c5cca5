//! Folded stacks (`root;...;leaf bytes`), the input of flamegraph tools.

use super::escape::escape_control;
use crate::report::{Frame, Report, Site};

/// One line per site holding live memory, root first, sorted so the output
/// is the same for the same report.
pub fn render(report: &Report) -> String {
    render_by(report, |site| site.live_bytes as i64)
}

/// One line per site whose `weight` is positive.
pub fn render_by(report: &Report, weight: impl Fn(&Site) -> i64) -> String {
    let mut lines: Vec<String> = report
        .sites
        .iter()
        .filter(|site| weight(site) > 0)
        .map(|site| format!("{} {}", stack_text(&site.frames), weight(site)))
        .collect();
    lines.sort();
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

fn stack_text(frames: &[Frame]) -> String {
    frames
        .iter()
        .rev()
        .map(|frame| frame_name(&frame.label()))
        .collect::<Vec<_>>()
        .join(";")
}

/// A frame's name in a folded line. The name comes from the target's
/// binaries, so it may hold anything: control characters become `\xNN`
/// (a newline would end the line, an escape sequence would reach whoever
/// cats the file); `;` separates frames, so it becomes `:`; the last space
/// separates the count, so spaces become no-break spaces.
pub(super) fn frame_name(label: &str) -> String {
    escape_control(label)
        .replace(';', ":")
        .replace(' ', "\u{a0}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::sample_report;

    #[test]
    fn folded_matches_golden_file() {
        crate::output::assert_golden("stacks.folded", render(&sample_report()).as_bytes());
    }

    #[test]
    fn names_lose_separators() {
        assert_eq!(
            frame_name("operator new(unsigned long)"),
            "operator\u{a0}new(unsigned\u{a0}long)"
        );
        assert_eq!(frame_name("a;b"), "a:b");
    }

    #[test]
    fn names_cannot_break_lines_or_reach_the_terminal() {
        assert_eq!(
            frame_name("\x1b[31mred\nfake;frame 99"),
            "\\x1b[31mred\\x0afake:frame\u{a0}99"
        );
    }

    #[test]
    fn a_hostile_name_stays_one_line_of_one_site() {
        let mut report = sample_report();
        report.sites.truncate(1);
        report.sites[0].frames = vec![Frame::named("evil\nmain;x 1"), Frame::named("main")];
        let text = render(&report);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(text, "main;evil\\x0amain:x\u{a0}1 4096000\n");
    }
}
