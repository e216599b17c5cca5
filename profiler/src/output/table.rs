//! The short table printed at the end of a session.

use std::io::{self, Write};

use super::escape::escape_control;
use crate::{
    classify::Verdict,
    fragmentation::FragmentationVerdict,
    process_memory::MemoryFigures,
    processes::Following,
    report::{Frame, MappedReport, ProcessReport, Report},
    requests::{Percentiles, RequestsReport},
    units::format_bytes,
};

/// Frames of a site shown in the table's chain.
const CHAIN_FRAMES: usize = 4;

/// Writes a summary and the top `limit` sites by live bytes. Every string
/// the target chose (command lines, function names, the paths in warnings)
/// goes through `escape_control`: this lands on root's terminal.
/// Sites that keep request memory the table shows.
const REQUEST_SITES_SHOWN: usize = 5;

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
    if let Some(peak) = &report.peak {
        writeln!(
            out,
            "peak: {} bytes ({}) at {:.1}s; {} window{}",
            peak.live_bytes,
            format_bytes(peak.live_bytes),
            peak.at_s,
            report.windows.len(),
            if report.windows.len() == 1 { "" } else { "s" }
        )?;
    }
    // Each process as last read: at the end, or at its exit stop.
    let mut memory = MemoryFigures::default();
    for figures in report.processes.iter().filter_map(|p| p.memory.as_ref()) {
        memory.add(figures);
    }
    if memory.processes > 0 {
        render_memory(&memory, out)?;
    }
    if let Some(f) = &report.fragmentation {
        writeln!(
            out,
            "fragmentation: {}: {}",
            fragmentation_word(f.verdict),
            f.reason
        )?;
        if f.arenas > 1 {
            let saving = if f.arena_max_saving_bytes > 0 {
                format!(
                    "; MALLOC_ARENA_MAX={} would give back up to {}",
                    crate::fragmentation::ADVISED_ARENA_MAX,
                    format_bytes(f.arena_max_saving_bytes)
                )
            } else {
                String::new()
            };
            writeln!(
                out,
                "  arenas: {} heaps, {} resident, {} of it free{saving}",
                f.arenas,
                format_bytes(f.arena_resident_bytes),
                format_bytes(f.arena_free_bytes),
            )?;
        }
        for advice in &f.advice {
            writeln!(out, "  advice: {advice}")?;
        }
    }
    let m = &report.mapped;
    if m.alloc_count > 0 {
        writeln!(
            out,
            "mapped outside malloc: {} bytes ({}) in {} mappings{}; mapped {} bytes in {} calls",
            m.live_bytes,
            format_bytes(m.live_bytes),
            m.live_count,
            report
                .mapped_memory
                .as_ref()
                .map(|m| format!(" (committed{})", mapped_words(m)))
                .unwrap_or_default(),
            m.alloc_bytes,
            m.alloc_count
        )?;
    }
    let mut runtime = Vec::new();
    if let Some(stdio) = report.stdio_buffers.filter(|t| t.live_count > 0) {
        runtime.push(format!(
            "stdio buffers {} in {} blocks",
            format_bytes(stdio.live_bytes),
            stdio.live_count
        ));
    }
    if let Some(loader) = report.loader.filter(|t| t.live_count > 0) {
        runtime.push(format!(
            "the loader's {} in {} mappings for the images",
            format_bytes(loader.live_bytes),
            loader.live_count
        ));
    }
    if !runtime.is_empty() {
        writeln!(
            out,
            "kept by the runtime, not sites: {}",
            runtime.join("; ")
        )?;
    }
    if let Some(sampling) = &report.sampling {
        writeln!(
            out,
            "stacks sampled: 1 every {} allocated on average ({} blocks walked); the totals are exact, the sites' figures estimates (+/-: the 95% error of their live bytes)",
            format_bytes(sampling.mean_bytes),
            sampling.walked_count
        )?;
    }
    writeln!(out)?;
    // Verdicts once there are windows enough to give them.
    let verdicts = report.windows.len() >= crate::classify::MIN_WINDOWS;
    // With --stack-sample, each site's 95% error beside its live bytes.
    let sampled = report.sampling.is_some();
    writeln!(
        out,
        "{:>14} {}{:>10} {:>14} {:>10}  {}SITE (allocating function <- callers)",
        "LIVE BYTES",
        if sampled { "  +/- (95%) " } else { "" },
        "LIVE",
        "ALLOC BYTES",
        "ALLOCS",
        if verdicts { "VERDICT    " } else { "" }
    )?;
    for site in report.sites.iter().take(limit) {
        let chain = escape_control(&Frame::chain(&site.frames, CHAIN_FRAMES)).into_owned();
        // glibc maps each thread's stack in allocate_stack.
        let what = match site.frames.first() {
            Some(frame) if frame.function == "allocate_stack" => "thread stacks",
            _ => "mmap",
        };
        let kind = match (site.kind, &site.mapped) {
            (crate::report::SiteKind::Malloc, _) => String::new(),
            (crate::report::SiteKind::Mmap, None) => format!("[{what}] "),
            (crate::report::SiteKind::Mmap, Some(m)) => format!("[{what}{}] ", mapped_words(m)),
        };
        let verdict = match &site.classification {
            Some(c) if verdicts => format!("{:<11}", verdict_word(c.verdict)),
            _ => String::new(),
        };
        let spread = match site.live_bytes_error {
            Some(error) => format!("{:>11} ", format_bytes(error)),
            None if sampled => format!("{:>11} ", "-"),
            None => String::new(),
        };
        writeln!(
            out,
            "{:>14} {spread}{:>10} {:>14} {:>10}  {verdict}{kind}{chain}",
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
        render_processes(report, limit, out)?;
        if let Some(costs) = report.attach_costs {
            writeln!(
                out,
                "probes went on {} processes in {:.1} ms each (median; {:.1} ms at most)",
                costs.processes, costs.median_ms, costs.max_ms
            )?;
        }
    }
    if let Some(requests) = &report.requests {
        render_requests(requests, out)?;
    }
    for alert in &report.alerts {
        writeln!(out, "alert: {}", escape_control(&alert.message))?;
    }
    for warning in &report.warnings {
        writeln!(out, "warning: {}", escape_control(warning))?;
    }
    Ok(())
}

/// The followed processes' memory at the end, as the kernel counts it.
fn render_memory(m: &MemoryFigures, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "memory: RSS {} (PSS {}, USS {}; anonymous {}, file {}, shmem {}), swap {}, VMS {}{} in {} processes, {} threads",
        format_bytes(m.rss_bytes),
        format_bytes(m.pss_bytes),
        format_bytes(m.uss_bytes),
        format_bytes(m.anon_bytes),
        format_bytes(m.file_bytes),
        format_bytes(m.shmem_bytes),
        format_bytes(m.swap_bytes),
        format_bytes(m.vms_bytes),
        m.vms_rss_ratio()
            .map(|r| format!(" ({r:.1} x RSS)"))
            .unwrap_or_default(),
        m.processes,
        m.threads
    )
}

/// `, 1.0 MiB resident, 127.0 MiB reserved`: what a measured mapping's
/// committed bytes leave out.
fn mapped_words(m: &MappedReport) -> String {
    let mut words = format!(", {} resident", format_bytes(m.resident_bytes));
    if m.reserved_bytes > 0 {
        words += &format!(", {} reserved", format_bytes(m.reserved_bytes));
    }
    words
}

/// Per-request figures: what a request allocated, retained at its return
/// and kept later, and the sites that keep.
fn render_requests(requests: &RequestsReport, out: &mut impl Write) -> io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "requests of {}: {} returned, {} open{}",
        escape_control(&requests.function),
        requests.count,
        requests.open,
        if requests.partial > 0 {
            format!(
                ", {} partial (begun before the handler was known; left out)",
                requests.partial
            )
        } else {
            String::new()
        }
    )?;
    let row = |what: &str, p: Option<Percentiles>| match p {
        Some(p) => format!(
            "{what:>22}: p50 {} ({}), p95 {}, max {}",
            p.p50,
            format_bytes(p.p50),
            p.p95,
            p.max
        ),
        None => format!("{what:>22}: none yet"),
    };
    writeln!(out, "{}", row("allocated", requests.alloc_bytes))?;
    writeln!(
        out,
        "{}",
        row("retained at return", requests.retained_bytes)
    )?;
    writeln!(
        out,
        "{} ({} requests)",
        row(
            &format!("kept {} requests on", requests.keep_after),
            requests.kept_bytes
        ),
        requests.kept_count
    )?;
    for site in requests.sites.iter().take(REQUEST_SITES_SHOWN) {
        writeln!(
            out,
            "{:>14} {:>10}  kept by requests at {}",
            site.live_bytes,
            site.live_count,
            escape_control(&Frame::chain(&site.frames, CHAIN_FRAMES))
        )?;
    }
    Ok(())
}

/// Per-process figures: a pre-fork master and its workers, growth being
/// what each added beyond what it inherited at fork. The target first,
/// then the processes holding most, up to `limit` (a fork storm makes
/// thousands); how each was followed, and why not, in FOLLOW.
fn render_processes(report: &Report, limit: usize, out: &mut impl Write) -> io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "{:>8} {:>8} {:>14} {:>14} {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  COMMAND",
        "PID",
        "PPID",
        "LIVE BYTES",
        "GROWTH",
        "ALLOC BYTES",
        "RSS",
        "PSS",
        "USS",
        "SHARED",
        "STATE",
        "FOLLOW"
    )?;
    let mut shown: Vec<&ProcessReport> = report.processes.iter().collect();
    shown.sort_by_key(|p| {
        (
            p.ppid.is_some(),
            std::cmp::Reverse(p.totals.live_bytes),
            p.pid,
        )
    });
    let rest = shown.split_off(shown.len().min(limit.max(1)));
    for p in shown {
        let ppid = p.ppid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let state = match p.exited_s {
            Some(t) => format!("exit {t:.1}s"),
            None => "running".into(),
        };
        let memory = |figure: fn(&MemoryFigures) -> u64| {
            p.memory
                .as_ref()
                .map_or("-".to_owned(), |m| format_bytes(figure(m)))
        };
        writeln!(
            out,
            "{:>8} {:>8} {:>14} {:>+14} {:>14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            p.pid,
            ppid,
            p.totals.live_bytes,
            p.growth_bytes,
            p.totals.alloc_bytes,
            memory(|m| m.rss_bytes),
            memory(|m| m.pss_bytes),
            memory(|m| m.uss_bytes),
            memory(|m| m.shared_bytes),
            state,
            following_word(p.following),
            escape_control(&p.command)
        )?;
        if let Some(note) = &p.note {
            writeln!(out, "{:>8}   {}", "", escape_control(note))?;
        }
    }
    if !rest.is_empty() {
        let exited = rest.iter().filter(|p| p.exited_s.is_some()).count();
        let live: u64 = rest.iter().map(|p| p.totals.live_bytes).sum();
        writeln!(
            out,
            "... {} more processes ({exited} exited, {live} live bytes) in report.json",
            rest.len()
        )?;
    }
    for group in &report.workers {
        render_workers(group, out)?;
    }
    Ok(())
}

/// A master's workers: per worker, private and shared memory, what it
/// added itself and what every one of them allocated again.
fn render_workers(group: &crate::workers::WorkerGroup, out: &mut impl Write) -> io::Result<()> {
    let n = group.workers.len() as u64;
    let per = |bytes: u64| format_bytes(bytes / n.max(1));
    let memory = group.memory.map_or(String::new(), |m| {
        let read = m.processes.max(1);
        format!(
            ", RSS {} = private (USS) {} + shared {}, PSS {}",
            format_bytes(m.rss_bytes / read),
            format_bytes(m.uss_bytes / read),
            format_bytes(m.shared_bytes / read),
            format_bytes(m.pss_bytes / read)
        )
    });
    writeln!(
        out,
        "workers of {}: {n}, each on average{memory}; added after the fork {}, of which {} at sites every worker allocated at",
        group.master,
        per(group.added_bytes),
        format_bytes(group.repeated_bytes_per_worker)
    )?;
    for site in group.repeated_sites.iter().take(3) {
        writeln!(
            out,
            "  {:>10} in each at {}",
            format_bytes(site.bytes_per_worker),
            escape_control(&Frame::chain(&site.frames, 4))
        )?;
    }
    Ok(())
}

fn fragmentation_word(verdict: FragmentationVerdict) -> &'static str {
    match verdict {
        FragmentationVerdict::None => "none",
        FragmentationVerdict::AllocatorRetention => "allocator-retention",
        FragmentationVerdict::ArenaBloat => "arena-bloat",
        FragmentationVerdict::MappedGrowth => "mapped-growth",
        FragmentationVerdict::DuplicationAcrossWorkers => "duplication-across-workers",
        FragmentationVerdict::Unknown => "unknown",
    }
}

fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Leak => "LEAK",
        Verdict::Growing => "growing",
        Verdict::Bounded => "bounded",
        Verdict::Temporary => "temporary",
        Verdict::Unknown => "unknown",
    }
}

fn following_word(following: Following) -> &'static str {
    match following {
        Following::Started => "started",
        Following::Attached => "attached",
        Following::Forked => "forked",
        Following::Late => "late",
        Following::Unfollowed => "UNFOLLOWED",
    }
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

    fn process(pid: u32, ppid: Option<u32>, live: u64, following: Following) -> ProcessReport {
        ProcessReport {
            pid,
            ppid,
            command: format!("worker {pid}"),
            started_s: 0.0,
            exited_s: None,
            totals: crate::report::Totals {
                live_bytes: live,
                ..Default::default()
            },
            mapped: Default::default(),
            heap: None,
            inherited_count: 0,
            inherited_bytes: 0,
            growth_bytes: live as i64,
            sites: Vec::new(),
            following,
            note: (following == Following::Unfollowed).then(|| "held 60 ms".into()),
            ..ProcessReport::default()
        }
    }

    #[test]
    fn process_table_shows_the_root_then_the_biggest_and_why_one_is_unfollowed() {
        let mut report = sample_report();
        report.processes = vec![process(1, None, 0, Following::Attached)];
        for pid in 2..10 {
            report.processes.push(process(
                pid,
                Some(1),
                u64::from(pid) * 100,
                Following::Forked,
            ));
        }
        report
            .processes
            .push(process(99, Some(1), 5000, Following::Unfollowed));
        let mut out = Vec::new();
        render(&report, 3, &mut out).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        let rows: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("FOLLOW"))
            .skip(1)
            .collect();
        assert!(
            rows[0].contains("worker 1") && rows[0].contains("attached"),
            "{text}"
        );
        assert!(
            rows[1].contains("worker 99") && rows[1].contains("UNFOLLOWED"),
            "{text}"
        );
        assert_eq!(rows[2].trim(), "held 60 ms");
        assert!(rows[3].contains("worker 9"), "{text}");
        assert!(
            rows[4].starts_with("... 7 more processes (0 exited, 3500 live bytes)"),
            "{text}"
        );
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
