//! The in-use flamegraph: live bytes by stack, rendered by inferno.

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, Palette},
};

use super::{OutputError, folded};
use crate::report::Report;

/// Renders inuse.svg. Deterministic: the same report gives the same bytes.
pub fn render_inuse(report: &Report) -> Result<Vec<u8>, OutputError> {
    let folded = folded::render(report);
    let mut options = Options::default();
    options.title = format!(
        "memscope: live memory of pid {} ({})",
        report.target.pid, report.target.command
    );
    options.subtitle = Some(format!(
        "{} live bytes in {} allocations after {:.1}s",
        report.totals.live_bytes, report.totals.live_count, report.duration_s
    ));
    options.count_name = "bytes".into();
    options.name_type = "Function:".into();
    options.colors = Palette::Basic(BasicPalette::Mem);
    options.deterministic = true;
    let mut svg = Vec::new();
    let result = flamegraph::from_lines(&mut options, folded.lines(), &mut svg);
    // With no live memory inferno still writes an SVG that says so, then
    // reports an error; that SVG is the right output.
    match result {
        Ok(()) => Ok(svg),
        Err(_) if folded.is_empty() && !svg.is_empty() => Ok(svg),
        Err(error) => Err(OutputError::Render {
            what: super::INUSE_SVG,
            message: error.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::sample_report;

    #[test]
    fn inuse_svg_matches_golden_file() {
        let svg = render_inuse(&sample_report()).expect("render");
        crate::output::assert_golden("inuse.svg", &svg);
    }

    #[test]
    fn empty_report_still_gives_an_svg() {
        let mut report = sample_report();
        report.sites.clear();
        let svg = render_inuse(&report).expect("render");
        assert!(String::from_utf8_lossy(&svg).contains("<svg"));
    }
}
