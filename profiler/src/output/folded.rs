//! Folded stacks (`root;...;leaf bytes`), the input of flamegraph tools.

use crate::report::{Frame, Report};

/// One line per site holding live memory, root first, sorted so the output
/// is the same for the same report.
pub fn render(report: &Report) -> String {
    let mut lines: Vec<String> = report
        .sites
        .iter()
        .filter(|site| site.live_bytes > 0)
        .map(|site| format!("{} {}", stack_text(&site.frames), site.live_bytes))
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
        .map(frame_name)
        .collect::<Vec<_>>()
        .join(";")
}

/// A frame's name in a folded line: `;` separates frames and the last space
/// separates the count, so neither may appear inside a name.
fn frame_name(frame: &Frame) -> String {
    frame.function.replace(';', ":").replace(' ', "\u{a0}")
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
            frame_name(&Frame::named("operator new(unsigned long)")),
            "operator\u{a0}new(unsigned\u{a0}long)"
        );
        assert_eq!(frame_name(&Frame::named("a;b")), "a:b");
    }
}
