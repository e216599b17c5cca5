//! The short table printed at the end of a session.

use std::io::{self, Write};

use super::escape::escape_control;
use crate::{report::Report, units::format_bytes};

/// Frames of a site shown in the table's chain.
const CHAIN_FRAMES: usize = 4;

/// Writes a summary and the top `limit` sites by live bytes. Every string
/// the target chose (command lines, function names, the paths in warnings)
/// goes through `escape_control`: this lands on root's terminal.
pub fn render(report: &Report, limit: usize, out: &mut impl Write) -> io::Result<()> {
    let t = &report.totals;
    writeln!(
        out,
        "memscope: pid {} ({}) over {:.1}s",
        report.target.pid,
        escape_control(&report.target.command),
        report.duration_s
    )?;
    writeln!(
        out,
        "live: {} bytes ({}) in {} allocations; allocated {} bytes in {} calls, freed {} bytes in {} calls",
        t.live_bytes,
        format_bytes(t.live_bytes),
        t.live_count,
        t.alloc_bytes,
        t.alloc_count,
        t.free_bytes,
        t.free_count
    )?;
    let m = &report.mapped;
    if m.alloc_count > 0 {
        writeln!(
            out,
            "mapped outside malloc: {} bytes ({}) in {} mappings; mapped {} bytes in {} calls",
            m.live_bytes,
            format_bytes(m.live_bytes),
            m.live_count,
            m.alloc_bytes,
            m.alloc_count
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:>14} {:>10} {:>14} {:>10}  SITE (allocating function <- callers)",
        "LIVE BYTES", "LIVE", "ALLOC BYTES", "ALLOCS"
    )?;
    for site in report.sites.iter().take(limit) {
        let chain = site
            .frames
            .iter()
            .take(CHAIN_FRAMES)
            .map(|f| escape_control(&f.function))
            .collect::<Vec<_>>()
            .join(" <- ");
        let kind = if site.kind == "malloc" { "" } else { "[mmap] " };
        let more = if site.frames.len() > CHAIN_FRAMES {
            " <- ..."
        } else {
            ""
        };
        writeln!(
            out,
            "{:>14} {:>10} {:>14} {:>10}  {kind}{chain}{more}",
            site.live_bytes, site.live_count, site.alloc_bytes, site.alloc_count
        )?;
    }
    if report.sites.len() > limit {
        writeln!(
            out,
            "... {} more sites in report.json",
            report.sites.len() - limit
        )?;
    }
    if report.processes.len() > 1 {
        render_processes(report, out)?;
    }
    for warning in &report.warnings {
        writeln!(out, "warning: {}", escape_control(warning))?;
    }
    Ok(())
}

/// Per-process figures: a pre-fork master and its workers, growth being
/// what each added beyond what it inherited at fork.
fn render_processes(report: &Report, out: &mut impl Write) -> io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "{:>8} {:>8} {:>14} {:>14} {:>14} {:>10}  COMMAND",
        "PID", "PPID", "LIVE BYTES", "GROWTH", "ALLOC BYTES", "STATE"
    )?;
    for p in &report.processes {
        let ppid = p.ppid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let state = match p.exited_s {
            Some(t) => format!("exit {t:.1}s"),
            None => "running".into(),
        };
        writeln!(
            out,
            "{:>8} {:>8} {:>14} {:>+14} {:>14} {:>10}  {}",
            p.pid,
            ppid,
            p.totals.live_bytes,
            p.growth_bytes,
            p.totals.alloc_bytes,
            state,
            escape_control(&p.command)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests_support::sample_report;

    #[test]
    fn table_matches_golden_file() {
        let mut out = Vec::new();
        render(&sample_report(), 10, &mut out).expect("render");
        crate::output::assert_golden("table.txt", &out);
    }

    #[test]
    fn table_is_cut_at_the_limit() {
        let mut out = Vec::new();
        render(&sample_report(), 1, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("leak_site <- handle_request <- main"));
        assert!(!text.contains("parse_body"));
        assert!(text.contains("... 2 more sites in report.json"));
    }

    #[test]
    fn target_strings_reach_the_terminal_escaped() {
        let mut report = sample_report();
        report.target.command = "./server \x1b[2J\x1b]0;owned\x07".into();
        report.sites[0].frames[0].function = "leak\x1b[31m_site\n".into();
        report.warnings = vec!["/lib/\x1b[8mlibc.so".into()];
        let mut out = Vec::new();
        render(&report, 1, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.starts_with("memscope: pid 4242 (./server \\x1b[2J\\x1b]0;owned\\x07) over "),
            "{text}"
        );
        assert!(
            text.contains("  leak\\x1b[31m_site\\x0a <- handle_request <- main\n"),
            "{text}"
        );
        assert!(text.ends_with("warning: /lib/\\x1b[8mlibc.so\n"), "{text}");
    }
}
