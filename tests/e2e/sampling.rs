//! `--stack-sample`: every block counted exactly, a byte sample of stacks
//! walked, the sites estimated within the error the report states.

use crate::support::*;

/// leak_basic holds 1000 x 4096 bytes at leak_site and frees 5000 x 128
/// from churn_site; with a 64 KiB gap about 72 of its 6001 blocks are
/// walked.
#[test]
fn totals_stay_exact_and_sites_are_within_their_stated_error() {
    if !bpf_available() {
        return;
    }
    let (exact, _) = run_fixture("sampling_exact", "leak_basic", &[]);
    let (sampled, output) = run_fixture("sampling", "leak_basic", &["--stack-sample", "64KB"]);
    assert_eq!(
        sampled.totals, exact.totals,
        "every block is counted with its size"
    );
    assert_eq!(
        (sampled.totals.alloc_count, sampled.totals.free_count),
        (exact.totals.alloc_count, 5000)
    );
    assert_eq!(
        sampled.peak.as_ref().map(|p| p.live_bytes),
        exact.peak.as_ref().map(|p| p.live_bytes)
    );
    assert_nothing_lost(&sampled);
    // The windows' totals are exact too (alerts on growth read them).
    let windows = &sampled.windows;
    assert_eq!(
        windows.iter().map(|w| w.alloc_bytes).sum::<u64>(),
        sampled.totals.alloc_bytes
    );
    assert_eq!(
        windows.last().map(|w| w.live_bytes),
        Some(sampled.totals.live_bytes)
    );
    let sampling = sampled.sampling.expect("the report says how it sampled");
    assert_eq!(sampling.mean_bytes, 65_536);
    // 4.7 MB allocated: about 72 walks expected; 30-150 holds with odds
    // far past a billion to one.
    assert!(
        (30..=150).contains(&sampling.walked_count),
        "walked {}",
        sampling.walked_count
    );

    let leak = site(&sampled, "leak_site");
    assert_eq!(leak.frames[1].function, "main");
    assert_eq!(leak.frames[0].line, Some(9));
    let error = leak.live_bytes_error.expect("a sampled site has an error");
    // 4096-byte blocks at a 64 KiB gap: each walked one stands for 16.5.
    let walked = (leak.live_count as f64 / 16.5).round();
    assert!((15.0..=120.0).contains(&walked), "{walked} blocks walked");
    // The stated error is 1.96 standard deviations; over the binomial
    // count of walked blocks, 3 of it is missed once in 300,000 runs.
    let off = leak.live_bytes.abs_diff(4_096_000);
    assert!(
        off as f64 <= 3.0 * error as f64,
        "estimate {} is {off} off 4096000, stated error {error}",
        leak.live_bytes
    );
    let size = leak.live_bytes as f64 / leak.live_count as f64;
    // NB: to the rounding of a scaled count.
    assert!(
        (size / 4096.0 - 1.0).abs() < 1e-3,
        "blocks keep their size: {size}"
    );
    // Freed blocks leave nothing live, estimated or not (a churn site may
    // be absent: about 10 of its blocks are walked).
    if let Some(churn) = sampled
        .sites
        .iter()
        .find(|s| s.frames[0].function == "churn_site")
    {
        assert_eq!((churn.live_bytes, churn.live_count), (0, 0));
        let size = churn.alloc_bytes as f64 / churn.alloc_count as f64;
        assert!((size / 128.0 - 1.0).abs() < 1e-3, "{size}");
    }
    assert!(exact.sampling.is_none() && exact.sites.iter().all(|s| s.live_bytes_error.is_none()));

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("stacks sampled: 1 every 64.0 KiB allocated on average"),
        "{stdout}"
    );
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output_dir_path("sampling").join("report.json"))
            .expect("report.json"),
    )
    .expect("JSON");
    assert_valid_report(&raw, "a sampled report");
}

/// A pre-fork master and its two workers: each process's totals, what it
/// inherited and its growth are the exact run's, sampled or not.
#[test]
fn forked_processes_keep_their_exact_figures() {
    if !bpf_available() {
        return;
    }
    let (exact, _) = run_fixture("sampling_prefork_exact", "prefork", &[]);
    let (sampled, _) = run_fixture("sampling_prefork", "prefork", &["--stack-sample", "64KB"]);
    let figures = |report: &memscope::report::Report| -> Vec<_> {
        let mut each: Vec<_> = report
            .processes
            .iter()
            .map(|p| {
                (
                    p.totals,
                    p.inherited_count,
                    p.inherited_bytes,
                    p.growth_bytes,
                )
            })
            .collect();
        each.sort_by_key(|(totals, ..)| (totals.alloc_bytes, totals.free_bytes));
        each
    };
    assert_eq!(exact.processes.len(), 3);
    assert_eq!(figures(&sampled), figures(&exact));
    assert_eq!(sampled.totals, exact.totals);
}

#[test]
fn a_sample_gap_out_of_range_is_a_usage_error() {
    assert_usage_error(
        &["run", "--stack-sample", "8GB", "--", "true"],
        "stack sample \"8GB\" is out of range: give 1 byte to 4GB",
    );
}

#[test]
fn check_refuses_to_gate_on_estimates() {
    assert_usage_error(
        &["check", "--stack-sample", "512KB", "--", "true"],
        "--stack-sample cannot be used with check",
    );
}
