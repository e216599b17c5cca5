//! Windows and the peak: a fixture allocates in phases on the test's word,
//! and the test cuts a window after each phase, with `memscope mark` and
//! with SIGUSR2.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use memscope::{classify::Verdict, report::SiteKind, timeline::WindowEnd};

use crate::support::*;

const HELD_BYTES: u64 = 50 << 20;
const GROWN_BYTES: u64 = 10 * (64 << 10);

/// memscope running the phases fixture, with its streams.
struct Phases {
    memscope: std::process::Child,
    pid: u32,
    to_fixture: std::process::ChildStdin,
    from_fixture: mpsc::Receiver<String>,
    said: mpsc::Receiver<String>,
}

impl Phases {
    /// `memscope run ARGS -o DIR -- phases`, once the fixture is ready.
    fn start(dir: &std::path::Path, args: &[String]) -> Self {
        let mut memscope = Command::new(MEMSCOPE)
            .arg("run")
            .args(args)
            .arg("-o")
            .arg(dir)
            .arg("--")
            .arg(fixture("phases"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("memscope starts");
        let phases = Self {
            pid: memscope.id(),
            to_fixture: memscope.stdin.take().expect("stdin"),
            from_fixture: lines(memscope.stdout.take().expect("stdout")),
            said: lines(memscope.stderr.take().expect("stderr")),
            memscope,
        };
        wait_for(&phases.from_fixture, |l| l == "ready", "ready");
        phases
    }

    /// Runs one phase and waits for its end.
    fn phase(&mut self, command: &str) {
        writeln!(self.to_fixture, "{command}").expect("fixture reads");
        wait_for(&self.from_fixture, |l| l == "done", command);
    }

    /// Ends the fixture, and memscope with it.
    fn quit(mut self) {
        writeln!(self.to_fixture, "quit").expect("fixture reads");
        drop(self.to_fixture);
        assert!(self.memscope.wait().expect("memscope ends").success());
    }

    fn usr2(&self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGUSR2) };
    }
}

/// Check that the peak is the 50 MiB held at once though the fixture ends
/// holding 640 KiB, and that each mark closes a window with exactly what
/// its phase did.
#[test]
fn peak_is_exact_and_marks_cut_windows() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("windows_peak");
    let args = ["--window", "1h"].map(String::from);
    let mut phases = Phases::start(&dir, &args);
    let marked = |phases: &Phases, index: usize| {
        wait_for(
            &phases.said,
            |l| l.starts_with(&format!("memscope: window {index} closed")),
            "window closed",
        )
    };

    phases.phase("hold");
    let status = Command::new(MEMSCOPE)
        .args(["mark", "--pid", &phases.pid.to_string()])
        .status()
        .expect("memscope mark runs");
    assert!(status.success());
    marked(&phases, 0);
    phases.phase("release");
    phases.usr2();
    marked(&phases, 1);
    phases.phase("grow");
    phases.usr2();
    marked(&phases, 2);
    phases.quit();

    let report = read_report(&dir);
    assert_nothing_lost(&report);
    let windows = &report.windows;
    assert!(windows.len() >= 3, "{windows:#?}");
    let figures = |i: usize| {
        let w = &windows[i];
        (
            w.alloc_bytes,
            w.free_bytes,
            w.growth_bytes,
            w.live_bytes,
            w.closed_by,
        )
    };
    assert_eq!(
        figures(0),
        (
            HELD_BYTES,
            0,
            HELD_BYTES as i64,
            HELD_BYTES,
            WindowEnd::Mark
        )
    );
    assert_eq!(
        figures(1),
        (0, HELD_BYTES, -(HELD_BYTES as i64), 0, WindowEnd::Mark)
    );
    assert_eq!(
        figures(2),
        (
            GROWN_BYTES,
            0,
            GROWN_BYTES as i64,
            GROWN_BYTES,
            WindowEnd::Mark
        )
    );
    assert_eq!(windows.last().map(|w| w.closed_by), Some(WindowEnd::End));
    assert_eq!(windows[0].top_sites[0].frames[0].function, "hold_site");
    assert_eq!(windows[0].top_sites[0].growth_bytes, HELD_BYTES as i64);
    assert!(
        windows[1].top_sites.is_empty(),
        "{:?}",
        windows[1].top_sites
    );
    assert_eq!(windows[2].top_sites[0].frames[0].function, "grow_site");
    assert!(windows[2].rss_bytes > 0);
    for pair in windows.windows(2) {
        assert_eq!(pair[0].end_s, pair[1].start_s, "windows tile the session");
    }

    let peak = report.peak.as_ref().expect("a peak");
    assert_eq!(peak.live_bytes, HELD_BYTES);
    assert_eq!(peak.window, Some(0));
    assert!(
        peak.at_s > 0.0 && peak.at_s <= windows[0].end_s,
        "peak at {} in window 0 ending {}",
        peak.at_s,
        windows[0].end_s
    );
    assert_eq!(peak.top_sites[0].frames[0].function, "hold_site");
    assert_eq!(peak.top_sites[0].live_bytes, HELD_BYTES);
    assert_eq!(peak.top_sites[0].kind, SiteKind::Malloc);
    assert_eq!(peak.processes.len(), 1);
    assert_eq!(peak.processes[0].live_bytes, HELD_BYTES);
    assert_eq!(report.processes[0].peak_bytes, Some(HELD_BYTES));
    assert_eq!(report.totals.live_bytes, GROWN_BYTES);

    let growth = std::fs::read_to_string(dir.join("growth.svg")).expect("growth.svg");
    assert!(growth.contains("grow_site"), "growth.svg names grow_site");
    assert!(!growth.contains("hold_site"), "hold_site kept nothing");
}

/// Check that windows, however many the timer cut, add up to the
/// session's totals.
#[test]
fn timed_windows_add_up_to_the_totals() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("windows_timer", "leak_basic", &["--window", "50ms"]);
    let alloc: u64 = report.windows.iter().map(|w| w.alloc_bytes).sum();
    let free: u64 = report.windows.iter().map(|w| w.free_bytes).sum();
    assert_eq!(
        (alloc, free),
        (report.totals.alloc_bytes, report.totals.free_bytes)
    );
    assert_eq!(
        report.windows.last().map(|w| w.live_bytes),
        Some(report.totals.live_bytes)
    );
    // At most one churn block (128 bytes) is live beside the leak, and
    // stdout's buffer may come later.
    assert_eq!(
        report.peak.as_ref().map(|p| p.live_bytes),
        Some(report.totals.live_bytes.max(4_096_000 + 128))
    );
}

/// Check the verdicts on a fixture that leaks, caches, queues, churns and
/// initialises lazily at once, over about a dozen windows: the leak is the
/// one leak.
#[test]
fn verdicts_tell_the_leak_from_the_cache_the_queue_and_the_churn() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("windows_verdicts", "patterns", &["--window", "250ms"]);
    assert!(
        report.windows.len() >= 8,
        "{} windows",
        report.windows.len()
    );
    let ticks = report.tick_costs.expect("tick costs");
    let timed = report
        .windows
        .iter()
        .filter(|w| w.closed_by == WindowEnd::Timer)
        .count();
    assert_eq!(ticks.ticks as usize, timed, "a tick per timer window");
    let verdict = |function: &str| {
        site(&report, function)
            .classification
            .as_ref()
            .map(|c| c.verdict)
    };
    assert_eq!(verdict("leak_site"), Some(Verdict::Leak));
    assert_eq!(verdict("cache_insert"), Some(Verdict::Bounded));
    assert_eq!(verdict("lazy_init_site"), Some(Verdict::Bounded));
    assert_eq!(verdict("churn_site"), Some(Verdict::Temporary));
    assert_eq!(verdict("queue_push"), Some(Verdict::Temporary));
    let leaks: Vec<&str> = report
        .sites
        .iter()
        .filter(|s| s.classification.as_ref().map(|c| c.verdict) == Some(Verdict::Leak))
        .map(|s| s.frames[0].function.as_str())
        .collect();
    assert_eq!(leaks, ["leak_site"]);
    let leak = site(&report, "leak_site");
    assert_eq!(leak.live_bytes, 300 * 512);
    let history = leak.history.as_ref().expect("history");
    assert_eq!(history.live_bytes.last(), Some(&(300 * 512)));
    assert_eq!(history.surviving_bytes.iter().sum::<u64>(), 300 * 512);
    assert_eq!(history.alloc_bytes.iter().sum::<u64>(), 300 * 512);
    let cache = site(&report, "cache_insert");
    assert_eq!(cache.live_bytes, 32 * 768);
    let saved = output_dir_path("windows_verdicts");
    let again = std::process::Command::new(MEMSCOPE)
        .args(["report", "--json"])
        .arg(&saved)
        .output()
        .expect("memscope report runs");
    let again = parse_report(
        &String::from_utf8_lossy(&again.stdout),
        "memscope report --json's stdout",
    );
    assert_eq!(
        again.sites, report.sites,
        "verdicts re-derived from the saved file"
    );
}

/// A one-request-at-a-time HTTP server: each POST body, as it comes.
fn http_server() -> (u16, mpsc::Receiver<String>) {
    use std::io::Read as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Until the head and the body its Content-Length announces are in.
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|l| l.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                        let _ = send.send(format!("{}\n{body}", head.lines().next().unwrap_or("")));
                        break;
                    }
                }
            }
        }
    });
    (port, receive)
}

/// Check that growth past --alert-growth is written to alerts.jsonl while
/// the session runs, POSTed to the webhook and given to the command, each
/// naming the site that grew and the exact figures.
#[test]
fn growth_alerts_reach_every_sink_while_the_session_runs() {
    if !bpf_available() {
        return;
    }
    let dir = output_dir("windows_alerts");
    let (port, posts) = http_server();
    let exec_out = output_dir("windows_alerts_exec");
    let args = [
        "--window".into(),
        "1h".into(),
        "--alert-growth".into(),
        "100KB".into(),
        "--alert-webhook".into(),
        format!("http://127.0.0.1:{port}/hook"),
        "--alert-exec".into(),
        format!("cat > {}", exec_out.display()),
    ];
    let mut phases = Phases::start(&dir, &args);
    phases.phase("hold");
    phases.usr2();
    let line = wait_for(
        &phases.said,
        |l| l.starts_with("memscope: ALERT"),
        "alert line",
    );
    assert!(line.contains("hold_site"), "{line}");

    // Written as it happened: the session is still running.
    let jsonl = std::fs::read_to_string(dir.join("alerts.jsonl")).expect("alerts.jsonl");
    let alerts: Vec<memscope::alert::Alert> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON alert per line"))
        .collect();
    assert_eq!(alerts.len(), 1, "{jsonl}");
    let alert = &alerts[0];
    assert_eq!(alert.kind, memscope::alert::AlertKind::Growth);
    assert_eq!(
        (alert.window, alert.value_bytes, alert.threshold_bytes),
        (0, HELD_BYTES, 100 << 10)
    );
    assert!(
        alert.top_sites[0].site.starts_with("hold_site <- main"),
        "{alert:?}"
    );
    assert_eq!(alert.top_sites[0].growth_bytes, HELD_BYTES as i64);

    let post = posts
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook got a POST");
    assert!(post.starts_with("POST /hook HTTP/1.1\n"), "{post}");
    let posted: memscope::alert::Alert =
        serde_json::from_str(post.lines().nth(1).unwrap_or("")).expect("JSON body");
    assert_eq!(&posted, alert);

    phases.quit();
    let given = std::fs::read_to_string(&exec_out).expect("the command wrote its input");
    let given: memscope::alert::Alert = serde_json::from_str(&given).expect("JSON on stdin");
    assert_eq!(&given, alert);
    assert_eq!(read_report(&dir).alerts, alerts);
}

/// Check that --pprof-push sends one profile per window as each closes,
/// each holding exactly what its phase allocated and what was in use at
/// its end, with spans that follow each other: Pyroscope's timeline of the
/// session.
#[test]
fn each_window_is_pushed_with_its_own_figures() {
    if !bpf_available() {
        return;
    }
    let (url, pushes) = http_receiver("200 OK");
    let dir = output_dir("windows_push");
    let args = ["--window", "1h", "--pprof-push", &url].map(String::from);
    let mut phases = Phases::start(&dir, &args);
    let pushed = |index: usize| {
        let (request, body) = pushes
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("window {index} pushed as it closed"));
        (request, pprof_of(&body))
    };
    phases.phase("hold");
    phases.usr2();
    let first = pushed(0);
    phases.phase("release");
    phases.usr2();
    let second = pushed(1);
    phases.phase("grow");
    phases.usr2();
    let third = pushed(2);
    phases.quit();
    let last = pushed(3);
    assert!(pushes.try_recv().is_err(), "one push per window");

    let report = read_report(&dir);
    assert_eq!(report.windows.len(), 4, "{:#?}", report.windows);
    let (hold, grow) = (HELD_BYTES as i64, GROWN_BYTES as i64);
    let values = |profile, function| sample_values(profile, function);
    // alloc_objects, alloc_space, inuse_objects, inuse_space.
    assert_eq!(values(&first.1, "hold_site"), [50, hold, 50, hold]);
    assert_eq!(values(&second.1, "hold_site"), [0, 0, 0, 0]);
    assert_eq!(values(&third.1, "hold_site"), [0, 0, 0, 0]);
    assert_eq!(values(&third.1, "grow_site"), [10, grow, 10, grow]);
    assert_eq!(values(&last.1, "grow_site"), [0, 0, 10, grow]);

    let span = |request: &str| -> (u64, u64) {
        let value = |key: &str| {
            let (_, rest) = request
                .split_once(&format!("&{key}="))
                .unwrap_or_else(|| panic!("{key} in {request}"));
            rest.split(['&', ' '])
                .next()
                .expect("value")
                .parse()
                .expect("seconds")
        };
        (value("from"), value("until"))
    };
    let all = [&first, &second, &third, &last];
    for pair in all.windows(2) {
        let (from, until) = span(&pair[0].0);
        let (next_from, _) = span(&pair[1].0);
        assert!(
            from < until && from <= next_from,
            "{} then {}",
            pair[0].0,
            pair[1].0
        );
        assert!(pair[0].1.time_nanos <= pair[1].1.time_nanos);
    }
    for (profile, window) in all.iter().map(|p| &p.1).zip(&report.windows) {
        let length_ns = ((window.end_s - window.start_s) * 1e9) as i64;
        assert!(
            (profile.duration_nanos - length_ns).abs() < 1000,
            "{} against {length_ns}",
            profile.duration_nanos
        );
    }
}
