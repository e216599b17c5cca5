//! The flamegraphs, rendered by inferno: live bytes by stack (in use),
//! what became live during the session and stayed (growth), and every
//! byte allocated (alloc: churn and hot allocation paths).

use inferno::flamegraph::{
    self, Options,
    color::{BasicPalette, Color, Palette, PaletteMap},
};

use super::{OutputError, escape::escape_control, folded};
use crate::{
    report::{Language, Report},
    units::format_bytes,
};

/// Renders inuse.svg. Deterministic: the same report gives the same bytes.
pub fn render_inuse(report: &Report) -> Result<Vec<u8>, OutputError> {
    let subtitle = format!(
        "{} ({} bytes) live in {} allocations after {:.1}s",
        format_bytes(report.totals.live_bytes),
        report.totals.live_bytes,
        report.totals.live_count,
        report.duration_s
    );
    render(
        report,
        &folded::render(report),
        ("live memory", subtitle),
        super::INUSE_SVG,
    )
}

/// Renders growth.svg: each site's live bytes less those forked children
/// inherited (live before the session saw them).
pub fn render_growth(report: &Report) -> Result<Vec<u8>, OutputError> {
    let folded = folded::render_by(report, |site| site.growth_bytes);
    let grown: i64 = report
        .sites
        .iter()
        .map(|s| s.growth_bytes)
        .filter(|g| *g > 0)
        .sum();
    let subtitle = format!(
        "{} ({grown} bytes) became live during the {:.1}s and stayed",
        format_bytes(grown.max(0) as u64),
        report.duration_s
    );
    render(
        report,
        &folded,
        ("memory growth", subtitle),
        super::GROWTH_SVG,
    )
}

/// Renders alloc.svg: every byte each site allocated, freed or not.
pub fn render_alloc(report: &Report) -> Result<Vec<u8>, OutputError> {
    let folded = folded::render_by(report, |site| {
        i64::try_from(site.alloc_bytes).unwrap_or(i64::MAX)
    });
    let allocated: u64 = report.sites.iter().map(|s| s.alloc_bytes).sum();
    let calls: u64 = report.sites.iter().map(|s| s.alloc_count).sum();
    let subtitle = format!(
        "{} ({allocated} bytes) allocated in {calls} calls over {:.1}s, freed or not",
        format_bytes(allocated),
        report.duration_s
    );
    render(report, &folded, ("allocations", subtitle), super::ALLOC_SVG)
}

fn render(
    report: &Report,
    folded: &str,
    (what, subtitle): (&str, String),
    file: &'static str,
) -> Result<Vec<u8>, OutputError> {
    let mut options = Options::default();
    // NB: XML 1.0 forbids most control characters even as entities, so a
    // raw one in the target's command would make the SVG unreadable.
    options.title = format!(
        "memscope: {what} of pid {} ({})",
        report.target.pid,
        super::shorten(&escape_control(&report.target.command))
    );
    options.subtitle = Some(subtitle);
    options.count_name = "bytes".into();
    options.name_type = "Function:".into();
    options.colors = Palette::Basic(BasicPalette::Mem);
    options.deterministic = true;
    let mut python = python_colors(report);
    options.palette_map = Some(&mut python);
    if folded.is_empty() {
        // inferno treats an empty profile as an error and logs it.
        return Ok(empty_svg(&options.title, what).into_bytes());
    }
    let mut svg = Vec::new();
    flamegraph::from_lines(&mut options, folded.lines(), &mut svg).map_err(|error| {
        OutputError::Render {
            what: file,
            message: error.to_string(),
        }
    })?;
    Ok(svg)
}

/// Python frames in yellows, apart from the native frames' greens (the
/// memory palette), each name's shade fixed by its bytes.
fn python_colors(report: &Report) -> PaletteMap {
    let mut map = PaletteMap::default();
    let frames = report.sites.iter().flat_map(|site| &site.frames);
    for frame in frames.filter(|f| f.language == Language::Python) {
        let name = folded::frame_name(&frame.label());
        let shade = name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let color = Color {
            r: 225 + (shade % 31) as u8,
            g: 175 + (shade / 31 % 61) as u8,
            b: 30 + (shade / 1891 % 51) as u8,
        };
        map.insert(name, color);
    }
    map
}

/// A valid SVG that says there is nothing to draw.
pub(super) fn empty_svg(title: &str, what: &str) -> String {
    let escaped = title
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"1200\" height=\"80\" xmlns=\"http://www.w3.org/2000/svg\">\n\
         <text x=\"600\" y=\"30\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"17\">{escaped}</text>\n\
         <text x=\"600\" y=\"60\" text-anchor=\"middle\" font-family=\"Verdana\" font-size=\"12\">no {what} at the end of the profile</text>\n\
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
    fn python_frames_are_yellow_and_native_ones_green() {
        let mut report = sample_report();
        report.sites[0].frames.push(crate::report::Frame {
            function: "analyze".into(),
            module: None,
            file: Some("/srv/app.py".into()),
            line: Some(20),
            language: Language::Python,
        });
        let svg = String::from_utf8(render_inuse(&report).expect("render")).expect("utf-8");
        let fill = |name: &str| {
            let group = svg
                .split("<g>")
                .find(|g| g.contains(&format!("<title>{name} (")))
                .unwrap_or_else(|| panic!("no {name} in the SVG"));
            let start = group.find("fill=\"rgb(").expect("a fill") + 10;
            let rgb: Vec<u8> = group[start..]
                .split(')')
                .next()
                .unwrap_or_default()
                .split(',')
                .map(|c| c.trim().parse().expect("a component"))
                .collect();
            rgb
        };
        let python = fill(&folded::frame_name("analyze (app.py:20)"));
        assert!(python[0] >= 225 && python[2] <= 80, "yellow: {python:?}");
        let native = fill("main");
        assert!(native[1] > native[0], "green: {native:?}");
    }

    #[test]
    fn growth_svg_matches_golden_file() {
        let svg = render_growth(&sample_report()).expect("render");
        crate::output::assert_golden("growth.svg", &svg);
    }

    #[test]
    fn alloc_svg_matches_golden_file() {
        let svg = render_alloc(&sample_report()).expect("render");
        crate::output::assert_golden("alloc.svg", &svg);
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
