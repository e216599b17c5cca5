//! `cargo xtask demo [EXAMPLE]`: profile one of the examples with the
//! release build of memscope and say where the outputs are.
//!
//! - `leaky-server` (the default): `memscope run` on examples/leaky-server.
//! - `flask`: examples/flask-service under gunicorn (2 workers), a known
//!   number of requests to each endpoint, `memscope attach` on the master.

#[path = "../../examples/flask-service/harness.rs"]
mod flask_service;

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;

use flask_service::{Attached, Gunicorn, PAYLOAD_MALLOC_BYTES, VenvState};

#[derive(Clone, Copy, Default, ValueEnum)]
pub enum Example {
    /// examples/leaky-server under `memscope run`.
    #[default]
    LeakyServer,
    /// examples/flask-service under gunicorn, with `memscope attach`.
    Flask,
}

pub fn run(root: &Path, memscope: &Path, example: Example) -> Result<()> {
    match example {
        Example::LeakyServer => leaky_server(root, memscope),
        Example::Flask => flask(root, memscope),
    }
}

fn leaky_server(root: &Path, memscope: &Path) -> Result<()> {
    let dir = root.join("target/demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let server = dir.join("leaky-server");
    crate::run_command(
        Command::new("gcc")
            .args([
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-builtin-malloc",
                "-pthread",
                "-o",
            ])
            .arg(&server)
            .arg(root.join("examples/leaky-server/leaky-server.c")),
    )?;
    let report_dir = dir.join("report");
    println!(
        "\n== memscope run -o {} -- {}\n",
        report_dir.display(),
        server.display()
    );
    crate::run_command(
        Command::new(memscope)
            .arg("run")
            .arg("-o")
            .arg(&report_dir)
            .arg("--")
            .arg(&server),
    )?;
    print_outputs(&report_dir);
    Ok(())
}

fn print_outputs(report_dir: &Path) {
    println!("\nreport:     {}", report_dir.join("report.json").display());
    println!(
        "flamegraph: {} (open it in a browser)",
        report_dir.join("inuse.svg").display()
    );
    println!("folded:     {}", report_dir.join("stacks.folded").display());
}

/// Requests the Flask demo sends once memscope is attached.
const ANALYZE_REQUESTS: usize = 60;
/// /lookup requests, over half as many distinct keys (each key twice).
const LOOKUP_REQUESTS: usize = 100;
/// /report requests, cycling over more distinct keys than the two workers'
/// caches hold (32 each), so both fill and evict.
const REPORT_REQUESTS: usize = 200;
const REPORT_KEYS: usize = 80;
const CHURN_REQUESTS: usize = 50;
/// Sizes malloc is asked for, as app.py's constants plus a bytearray's NUL.
const LOOKUP_MALLOC_BYTES: u64 = 4 * 1024 + 1;
const REPORT_MALLOC_BYTES: u64 = 16 * 1024 + 1;
const CHURN_MALLOC_BYTES: u64 = 256 * 1024 + 1;

fn flask(root: &Path, memscope: &Path) -> Result<()> {
    let (venv, state) = flask_service::ensure_venv(root)?;
    match state {
        VenvState::Created { packages } => println!(
            "xtask demo: created {} with {} and installed from PyPI:\n  {}",
            venv.display(),
            flask_service::PYTHON,
            packages.trim().replace('\n', "\n  ")
        ),
        VenvState::Reused => println!(
            "xtask demo: {} already has the pinned requirements",
            venv.display()
        ),
    }
    let dir = root.join("target/demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join("flask-gunicorn.log");
    let server = Gunicorn::start(root, &venv, &log)?;
    let workers = server.workers();
    println!(
        "xtask demo: gunicorn master {} with workers {workers:?} on http://127.0.0.1:{} (log: {})",
        server.pid(),
        server.port(),
        log.display()
    );
    server.warm_up(&["/analyze", "/churn"])?;

    let report_dir = dir.join("flask-report");
    let report_arg = report_dir.to_string_lossy();
    let args = [
        "-o",
        &report_arg,
        "--top",
        "12",
        "--per-process",
        "--request-fn",
        "app:analyze",
    ];
    println!("\n== memscope attach {} {}\n", args.join(" "), server.pid());
    let attached = Attached::start(memscope, server.pid(), &args, Stdio::inherit())?;
    let mut traffic = Traffic::default();
    until_handler_found(&server, &attached, &mut traffic)?;
    drive(&server, &mut traffic)?;
    let status = attached.stop()?;
    if !status.success() {
        bail!("memscope attach failed: {status}");
    }
    let status = server.stop()?;
    if !status.success() {
        bail!("gunicorn did not exit cleanly: {status}");
    }
    traffic.print(&workers, flask_service::allocation_line(root)?);
    print_outputs(&report_dir);
    Ok(())
}

/// What the demo sent while memscope was attached, and what each worker
/// answered.
#[derive(Default)]
struct Traffic {
    /// /analyze requests per worker.
    analyzed: BTreeMap<u32, u64>,
    /// Entries of each worker's /lookup dict, in its last answer.
    lookup_entries: BTreeMap<u32, u64>,
    /// Entries of each worker's /report lru_cache, in its last answer.
    report_entries: BTreeMap<u32, u64>,
    churned: BTreeMap<u32, u64>,
}

/// Sends /analyze until memscope has named the request handler in every
/// worker (from the first stacks it sees there): requests count from then.
fn until_handler_found(
    server: &Gunicorn,
    attached: &Attached,
    traffic: &mut Traffic,
) -> Result<()> {
    let mut found = std::collections::BTreeSet::new();
    for _ in 0..MAX_WARM_UP_REQUESTS {
        analyze(server, traffic)?;
        for line in attached.said() {
            if line.starts_with("memscope: request handler") {
                found.insert(line);
            }
        }
        if found.len() >= flask_service::WORKERS {
            return Ok(());
        }
    }
    bail!("memscope did not find app:analyze in every worker: {found:?}")
}

/// /analyze requests sent for `until_handler_found` at most.
const MAX_WARM_UP_REQUESTS: usize = 400;

fn analyze(server: &Gunicorn, traffic: &mut Traffic) -> Result<()> {
    let body = server.get_json("/analyze")?;
    *traffic
        .analyzed
        .entry(flask_service::served_by(&body)?)
        .or_default() += 1;
    Ok(())
}

fn drive(server: &Gunicorn, traffic: &mut Traffic) -> Result<()> {
    for _ in 0..ANALYZE_REQUESTS {
        analyze(server, traffic)?;
    }
    for i in 0..LOOKUP_REQUESTS {
        let body = server.get_json(&format!("/lookup?key=user-{}", i / 2))?;
        traffic
            .lookup_entries
            .insert(flask_service::served_by(&body)?, entries(&body)?);
    }
    for i in 0..REPORT_REQUESTS {
        let body = server.get_json(&format!("/report?key=week-{}", i % REPORT_KEYS))?;
        traffic
            .report_entries
            .insert(flask_service::served_by(&body)?, entries(&body)?);
    }
    for _ in 0..CHURN_REQUESTS {
        let body = server.get_json("/churn")?;
        *traffic
            .churned
            .entry(flask_service::served_by(&body)?)
            .or_default() += 1;
    }
    Ok(())
}

fn entries(body: &serde_json::Value) -> Result<u64> {
    body.get("entries")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("answer without entries: {body}"))
}

impl Traffic {
    fn print(&self, workers: &[u32], line: u32) {
        let per_worker = |counts: &BTreeMap<u32, u64>| {
            workers
                .iter()
                .map(|pid| format!("{} by {pid}", counts.get(pid).copied().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sum = |counts: &BTreeMap<u32, u64>| counts.values().sum::<u64>();
        let analyzed = sum(&self.analyzed);
        let lookups = sum(&self.lookup_entries);
        let reports = sum(&self.report_entries);
        println!(
            "\nxtask demo: sent /analyze x{analyzed} ({}), /lookup x{LOOKUP_REQUESTS} over {} keys, /report x{REPORT_REQUESTS} over {REPORT_KEYS} keys, /churn x{CHURN_REQUESTS} ({})",
            per_worker(&self.analyzed),
            LOOKUP_REQUESTS / 2,
            per_worker(&self.churned),
        );
        println!("xtask demo: what the workers kept, as malloc sizes:");
        println!(
            "  leak       analyze (app.py:{line})       {analyzed} payloads x {PAYLOAD_MALLOC_BYTES} = {} bytes",
            analyzed * PAYLOAD_MALLOC_BYTES
        );
        println!(
            "  unbounded  lookup dict                {lookups} entries x {LOOKUP_MALLOC_BYTES} = {} bytes ({})",
            lookups * LOOKUP_MALLOC_BYTES,
            per_worker(&self.lookup_entries)
        );
        println!(
            "  bounded    build_report lru_cache     {reports} entries x {REPORT_MALLOC_BYTES} = {} bytes ({})",
            reports * REPORT_MALLOC_BYTES,
            per_worker(&self.report_entries)
        );
        println!(
            "  temporary  churn                      0 bytes live, {} allocated",
            sum(&self.churned) * CHURN_MALLOC_BYTES
        );
        println!(
            "  all kept:  {} bytes",
            analyzed * PAYLOAD_MALLOC_BYTES
                + lookups * LOOKUP_MALLOC_BYTES
                + reports * REPORT_MALLOC_BYTES
        );
    }
}
