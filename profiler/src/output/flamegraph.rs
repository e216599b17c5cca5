//! The in-use flamegraph: live bytes by stack, rendered by inferno.

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, Palette},
};

use super::{OutputError, escape::escape_control, folded};
use crate::report::Report;

/// Renders inuse.svg. Deterministic: the same report gives the same bytes.
pub fn render_inuse(report: &Report) -> Result<Vec<u8>, OutputError> {
    let folded = folded::render(report);
    let mut options = Options::default();
    // NB: XML 1.0 forbids most control characters even as entities, so a
    // raw one in the target's command would make the SVG unreadable.
    options.title = format!(
        "memscope: live memory of pid {} ({})",
        report.target.pid,
        escape_control(&report.target.command)
    );
    options.subtitle = Some(format!(
        "{} live bytes in {} allocations after {:.1}s",
        report.totals.live_bytes, report.totals.live_count, report.duration_s
    ));
    options.count_name = "bytes".into();
    options.name_type = "Function:".into();
    options.colors = Palette::Basic(BasicPalette::Mem);
    options.deterministic = true;
    if folded.is_empty() {
        // inferno treats an empty profile as an error and logs it.
        return Ok(empty_svg(&options.title).into_bytes());
    }
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, folded.lines(), &mut svg).map_err(|error| {
        OutputError::Render {
            what: super::INUSE_SVG,
            message: error.to_string(),
        }
    })?;
    Ok(svg)
}

/// A valid SVG that says there is nothing to draw.
fn empty_svg(title: &str) -> String {
    let escaped = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"80\" xmlns=\"http://www.w3.org/2000/svg\">\n\
         <text x=\"600\" y=\"30\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{escaped}</text>\n\
         <text x=\"600\" y=\"60\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">no live memory at the end of the profile</text>\n\
         </svg>\n"
    )
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
        let svg = String::from_utf8(render_inuse(&report).expect("render")).expect("utf-8");
        assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("no live memory"));
    }

    #[test]
    fn control_characters_in_the_command_stay_out_of_the_svg() {
        let mut report = sample_report();
        report.target.command = "./server\x1b[31m\x01".into();
        let svg = String::from_utf8(render_inuse(&report).expect("render")).expect("utf-8");
        assert!(!svg.contains(['\x1b', '\x01']));
        assert!(svg.contains("(./server\\x1b[31m\\x01)"), "title escaped");
    }
}
