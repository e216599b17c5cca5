use super::*;
use crate::report::tests_support;

fn frames(function: &str) -> Vec<Frame> {
    vec![
        Frame {
            function: function.to_owned(),
            file: Some("/src/t.c".into()),
            line: Some(12),
            ..Frame::default()
        },
        Frame {
            function: "main".to_owned(),
            ..Frame::default()
        },
    ]
}

/// A site whose live bytes at each of 8 windows' ends are `live`; what it
/// allocated in each is the rise, and all of it survives.
fn site(function: &str, live: &[u64]) -> Site {
    let alloc: Vec<u64> = live
        .iter()
        .scan(0, |last, &now| {
            let rise = now.saturating_sub(*last);
            *last = now;
            Some(rise)
        })
        .collect();
    let end = *live.last().expect("windows");
    let history = SiteHistory {
        live_bytes: live.to_vec(),
        alloc_bytes: alloc.clone(),
        surviving_bytes: alloc,
    };
    Site {
        frames: frames(function),
        live_bytes: end,
        live_count: end / 1024,
        classification: Some(classify(end, Some(&history))),
        history: Some(history),
        ..Site::default()
    }
}

fn report(sites: Vec<Site>) -> Report {
    let mut report = tests_support::sample_report();
    report.sites = sites;
    report.requests = None;
    let windows = report.sites[0]
        .history
        .as_ref()
        .map_or(0, |h| h.live_bytes.len());
    report.windows = (0..windows)
        .map(|i| crate::report::WindowReport {
            index: i,
            start_s: i as f64,
            end_s: i as f64 + 1.0,
            closed_by: crate::timeline::WindowEnd::Timer,
            alloc_bytes: 1000,
            alloc_count: 1,
            free_bytes: 0,
            free_count: 0,
            growth_bytes: 1000,
            live_bytes: 0,
            rss_bytes: (10 + i as u64) << 20,
            memory: None,
            top_sites: Vec::new(),
        })
        .collect();
    report
}

const LEAK: [u64; 8] = [
    10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 70_000, 80_000,
];
const TABLE: [u64; 8] = [50_000; 8];

#[test]
fn a_leak_fails_and_a_table_that_levels_off_passes() {
    let r = report(vec![site("leak_site", &LEAK), site("table_site", &TABLE)]);
    let result = evaluate(&r, &Rules::default(), None, &Suppressions::default());
    assert!(!result.passed());
    let failures: Vec<&Failure> = result.failures().collect();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    let failing = failures[0].site.as_ref().expect("a site");
    assert_eq!(failing.chain, "leak_site <- main");
    assert_eq!(failing.location, Some(("/src/t.c".into(), 12)));
    assert_eq!(failing.bytes, 80_000);

    let clean = report(vec![site("table_site", &TABLE)]);
    assert!(evaluate(&clean, &Rules::default(), None, &Suppressions::default()).passed());
}

#[test]
fn a_leak_under_the_floor_or_in_the_warmup_passes() {
    let small = report(vec![site("leak_site", &LEAK.map(|b| b / 100))]);
    assert!(evaluate(&small, &Rules::default(), None, &Suppressions::default()).passed());
    // Startup that rises through the first half, then levels off.
    let startup = [
        10_000, 20_000, 30_000, 40_000, 40_000, 40_000, 40_000, 40_000,
    ];
    let r = report(vec![site("import_site", &startup)]);
    let rules = Rules {
        warmup_s: 4.0,
        ..Rules::default()
    };
    assert!(evaluate(&r, &rules, None, &Suppressions::default()).passed());
}

#[test]
fn a_suppression_waives_a_site_and_an_unused_one_is_listed() {
    let r = report(vec![site("leak_site", &LEAK)]);
    let suppressions = Suppressions::parse("leak_*\nnever_seen\n").expect("parses");
    let result = evaluate(&r, &Rules::default(), None, &suppressions);
    assert!(result.passed(), "{result:#?}");
    assert_eq!(result.suppressions[0].sites.len(), 1);
    assert!(result.suppressions[1].sites.is_empty());
    let mut text = Vec::new();
    render::summary(&result, &mut text).expect("renders");
    let text = String::from_utf8(text).expect("utf-8");
    assert!(
        text.contains("unused suppression (line 2): never_seen"),
        "{text}"
    );
}

#[test]
fn a_baseline_accepts_its_leaks_and_fails_new_and_grown_ones() {
    let before = report(vec![site("old_leak", &LEAK), site("table_site", &TABLE)]);
    let baseline = Baseline::of(&before, 0.0, "t");
    assert_eq!(baseline.sites.len(), 2);
    let rules = Rules::default();
    assert!(evaluate(&before, &rules, Some(&baseline), &Suppressions::default()).passed());
    // 5% more: within 10%.
    let within = report(vec![site("old_leak", &LEAK.map(|b| b * 105 / 100))]);
    assert!(evaluate(&within, &rules, Some(&baseline), &Suppressions::default()).passed());
    let after = report(vec![
        site("old_leak", &LEAK.map(|b| b * 2)),
        site("new_leak", &LEAK),
    ]);
    let result = evaluate(&after, &rules, Some(&baseline), &Suppressions::default());
    let messages: Vec<&str> = result.failures().map(|f| f.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("old_leak <- main leaks 156.2 KiB")),
        "{messages:#?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("new_leak <- main is new")),
        "{messages:#?}"
    );
    // A size tolerance instead of a percentage.
    let rules = Rules {
        tolerance: Tolerance::Bytes(1 << 20),
        ..Rules::default()
    };
    assert!(evaluate(&after, &rules, Some(&baseline), &Suppressions::default()).passed());
}

#[test]
fn thresholds_fail_with_their_figures() {
    let r = report(vec![site("table_site", &TABLE)]);
    let rules = Rules {
        max_leaked: Some(10_000),
        max_growth: Some(500),
        max_rss: Some(12 << 20),
        ..Rules::default()
    };
    let result = evaluate(&r, &rules, None, &Suppressions::default());
    let names: Vec<&str> = result
        .outcomes
        .iter()
        .filter(|o| !o.failures.is_empty())
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "--max-leaked 9.8 KiB",
            "--max-growth 500 B per window",
            "--max-rss 12.0 MiB"
        ]
    );
    let rules = Rules {
        max_leaked: Some(1 << 20),
        max_growth: Some(1 << 20),
        max_rss: Some(1 << 30),
        ..Rules::default()
    };
    assert!(evaluate(&r, &rules, None, &Suppressions::default()).passed());
}

#[test]
fn tolerances_parse_as_percentages_or_sizes() {
    assert_eq!(
        "10%".parse::<Tolerance>().ok(),
        Some(Tolerance::Percent(10.0))
    );
    assert_eq!(
        "64KB".parse::<Tolerance>().ok(),
        Some(Tolerance::Bytes(65_536))
    );
    assert!("-3%".parse::<Tolerance>().is_err());
    assert!("lots".parse::<Tolerance>().is_err());
    assert_eq!(Tolerance::Percent(10.0).allowed(0), MIN_LEAK_BYTES);
    assert_eq!(Tolerance::Percent(10.0).allowed(1 << 20), (1 << 20) / 10);
}

#[test]
fn failures_become_annotations_and_junit_cases() {
    let r = report(vec![site("leak_site", &LEAK)]);
    let result = evaluate(&r, &Rules::default(), None, &Suppressions::default());
    let mut out = Vec::new();
    render::github_annotations(&result, Some("/src"), &mut out).expect("renders");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(
        text.starts_with(
            "::error file=t.c,line=12,title=memscope check::leak_site <- main leaks: 80000 bytes"
        ),
        "{text}"
    );
    let xml = render::junit(&result, "./t").expect("serializes");
    let parsed = quick_junit::Report::deserialize_from_str(&xml).expect("parses back");
    let suite = &parsed.test_suites[0];
    assert_eq!(suite.test_cases.len(), 2, "{xml}");
    assert_eq!(suite.failures, 2, "{xml}");
}

#[test]
fn the_end_is_the_targets_teardown_else_the_last_interpreters() {
    use crate::{report::ProcessReport, timeline::WindowEnd};
    let mut r = report(vec![site("leak_site", &LEAK)]);
    assert_eq!(teardown_window(&r), None);
    for i in [2, 5] {
        r.windows[i].closed_by = WindowEnd::Teardown;
    }
    let process = |pid, ppid, teardown_s| ProcessReport {
        pid,
        ppid,
        teardown_s,
        ..ProcessReport::default()
    };
    // A helper finalized at 3 s, the target at 6 s.
    r.processes = vec![process(1, None, Some(6.0)), process(2, Some(1), Some(3.0))];
    assert_eq!(teardown_window(&r), Some(5));
    // A native target: the last interpreter's.
    r.processes = vec![process(1, None, None), process(2, Some(1), Some(3.0))];
    assert_eq!(teardown_window(&r), Some(2));
    // Judged at the cut: 30000 bytes then, rising.
    let (leaked, history) = site_at_end(&r.sites[0], Some(2), 0);
    assert_eq!(leaked, 30_000);
    assert_eq!(history.map(|h| h.live_bytes.len()), Some(3));
}
