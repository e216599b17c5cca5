//! The fork-rate rows of `cargo xtask bench`: what following a fork-heavy
//! process costs it. tests/fixtures/fork_storm.c forks a short-lived child
//! every INTERVAL and prints its fork count each second; it is measured
//! untraced and under `memscope attach` in both follow modes, interleaved,
//! [`ROUNDS`] times, and the medians are compared. memscope's report says
//! how many children it followed, late or not at all.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

const ROUNDS: usize = 3;
/// Seconds of fork counts per measurement, after one second to settle.
const SECONDS: usize = 4;
/// (name, microseconds between forks).
const STORMS: [(&str, &str); 2] = [("every 10 ms", "10000"), ("back to back", "0")];
/// How memscope is run, by name.
const MODES: [(&str, &[&str]); 3] = [
    ("untraced", &[]),
    ("process", &["--follow", "process"]),
    ("image", &["--follow", "image"]),
];

/// Medians of one storm in one mode.
#[derive(Debug, Default, Clone)]
struct Row {
    forks_per_s: Vec<f64>,
    followed: Vec<f64>,
    errors: Vec<String>,
}

/// Measures every storm in every mode; returns the table and the JSON.
pub fn run(root: &Path, out_dir: &Path, memscope: &Path) -> Result<(String, Value)> {
    let storm = build(root, out_dir)?;
    let mut rows = vec![vec![Row::default(); MODES.len()]; STORMS.len()];
    for round in 1..=ROUNDS {
        for (s, (storm_name, interval)) in STORMS.iter().enumerate() {
            for (m, (mode, args)) in MODES.iter().enumerate() {
                let row = &mut rows[s][m];
                match measure(&storm, interval, memscope, args, out_dir) {
                    Ok((rate, followed)) => {
                        eprintln!(
                            "bench: round {round}/{ROUNDS} fork storm {storm_name:<13} {mode:<9} {rate:.0} forks/s"
                        );
                        row.forks_per_s.push(rate);
                        row.followed.extend(followed);
                    }
                    Err(error) => {
                        eprintln!("bench: fork storm {storm_name} {mode}: {error}");
                        row.errors.push(error.to_string());
                    }
                }
            }
        }
    }
    Ok((render(&rows), to_json(&rows)))
}

fn build(root: &Path, out_dir: &Path) -> Result<PathBuf> {
    build_fixture(root, out_dir, "fork_storm")
}

/// Builds tests/fixtures/NAME.c for a bench row: optimised, with frame
/// pointers, every malloc kept.
pub(crate) fn build_fixture(root: &Path, out_dir: &Path, name: &str) -> Result<PathBuf> {
    let binary = out_dir.join(name);
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-fno-omit-frame-pointer",
            "-fno-builtin-malloc",
            "-o",
        ])
        .arg(&binary)
        .arg(root.join(format!("tests/fixtures/{name}.c")))
        .status()
        .context("cannot run gcc")?;
    if !status.success() {
        bail!("gcc failed to build tests/fixtures/{name}.c");
    }
    Ok(binary)
}

/// One run: forks per second over [`SECONDS`], and the fraction of the
/// children memscope followed before their first instruction.
fn measure(
    storm: &Path,
    interval: &str,
    memscope: &Path,
    args: &[&str],
    out_dir: &Path,
) -> Result<(f64, Option<f64>)> {
    let mut target = Command::new(storm)
        .arg(interval)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the fork storm")?;
    let counts = fork_counts(target.stdout.take().context("no stdout")?);
    let result = (|| {
        counts
            .recv_timeout(Duration::from_secs(5))
            .context("the fork storm said nothing")?;
        let report_dir = out_dir.join("fork-storm-report");
        let _ = fs::remove_dir_all(&report_dir);
        let mut tracer = if args.is_empty() {
            None
        } else {
            Some(attach(memscope, args, target.id(), &report_dir)?)
        };
        // Settle, then count.
        let _ = counts.recv_timeout(Duration::from_secs(5));
        let start = counts.recv_timeout(Duration::from_secs(5))?;
        let mut end = start;
        for _ in 0..SECONDS {
            end = counts.recv_timeout(Duration::from_secs(5))?;
        }
        let rate = (end - start) / SECONDS as f64;
        let followed = match tracer.as_mut() {
            Some(memscope) => {
                interrupt(memscope);
                Some(followed_fraction(&report_dir)?)
            }
            None => None,
        };
        Ok((rate, followed))
    })();
    let _ = target.kill();
    let _ = target.wait();
    result
}

/// The storm's "forks N" counts, as they come.
fn fork_counts(stdout: ChildStdout) -> mpsc::Receiver<f64> {
    let (send, receive) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let count = line
                .strip_prefix("forks ")
                .and_then(|n| n.trim().parse().ok());
            if let Some(count) = count
                && send.send(count).is_err()
            {
                break;
            }
        }
    });
    receive
}

/// `memscope attach ARGS PID`, once its probes are on.
fn attach(memscope: &Path, args: &[&str], pid: u32, dir: &Path) -> Result<Child> {
    let mut child = Command::new(memscope)
        .arg("attach")
        .args(args)
        .arg("-o")
        .arg(dir)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start memscope")?;
    let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?);
    let mut banner = String::new();
    stderr.read_line(&mut banner)?;
    if !banner.starts_with("memscope: profiling") {
        let _ = child.kill();
        bail!("memscope did not attach: {}", banner.trim());
    }
    thread::spawn(move || for _ in stderr.lines() {});
    Ok(child)
}

fn interrupt(memscope: &mut Child) {
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
    let _ = memscope.wait();
}

/// Children followed before their first instruction, of all it saw.
fn followed_fraction(dir: &Path) -> Result<f64> {
    let text = fs::read_to_string(dir.join("report.json")).context("no report.json")?;
    let report: Value = serde_json::from_str(&text)?;
    let processes = report["processes"].as_array().context("no processes")?;
    let children: Vec<&Value> = processes.iter().filter(|p| p["ppid"].is_u64()).collect();
    let forked = children
        .iter()
        .filter(|p| p["following"] == "forked")
        .count();
    Ok(forked as f64 / children.len().max(1) as f64)
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

fn render(rows: &[Vec<Row>]) -> String {
    let mut out = String::from(
        "\nfork storm      untraced forks/s   --follow process           --follow image\n",
    );
    for ((name, _), row) in STORMS.iter().zip(rows) {
        let untraced = median(&row[0].forks_per_s);
        let cell = |r: &Row| match (median(&r.forks_per_s), untraced) {
            (Some(rate), Some(base)) => format!(
                "{rate:.0}/s ({:.0}%, {:.0}% followed)",
                100.0 * rate / base,
                100.0 * median(&r.followed).unwrap_or(0.0)
            ),
            _ => "failed".into(),
        };
        out.push_str(&format!(
            "{name:<15} {:>16}   {:<26} {}\n",
            untraced.map_or("failed".into(), |u| format!("{u:.0}")),
            cell(&row[1]),
            cell(&row[2])
        ));
    }
    out
}

fn to_json(rows: &[Vec<Row>]) -> Value {
    let storms: Vec<Value> = STORMS
        .iter()
        .zip(rows)
        .map(|((name, interval), row)| {
            let modes: serde_json::Map<String, Value> = MODES
                .iter()
                .zip(row)
                .map(|((mode, _), r)| {
                    (
                        (*mode).to_owned(),
                        json!({
                            "forks_per_s_median": median(&r.forks_per_s),
                            "forks_per_s": r.forks_per_s,
                            "followed_fraction_median": median(&r.followed),
                            "errors": r.errors,
                        }),
                    )
                })
                .collect();
            json!({"storm": name, "interval_us": interval, "modes": modes})
        })
        .collect();
    json!({"rounds": ROUNDS, "seconds": SECONDS, "storms": storms})
}
