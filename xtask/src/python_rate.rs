//! The Python rows of `cargo xtask bench`: what walking CPython's frames
//! costs per recorded allocation. tests/fixtures/python/alloc_loop.py
//! allocates and frees a 4 KiB bytearray (over pymalloc's 512 bytes, so
//! through malloc) at a given Python stack depth and prints ns per
//! allocation; it runs untraced, under `memscope run --no-python-frames`
//! and under `memscope run`, interleaved, [`ROUNDS`] times, and the medians
//! are compared: frames minus no-frames is the walk, over the depth per
//! frame. A last mode, `--stack-sample 512KB`, shows what walking a byte
//! sample of stacks leaves of it.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

const ROUNDS: usize = 3;
/// Allocations per run.
const OPS: &str = "200000";
/// Python frames on the stack at each allocation.
const DEPTHS: [u32; 2] = [1, 30];
/// Debian's interpreter: libpython linked in, no frame pointers.
const PYTHON: &str = "/usr/bin/python3.11";
const MODES: [(&str, Option<&[&str]>); 4] = [
    ("untraced", None),
    ("no frames", Some(&["--no-python-frames"])),
    ("frames", Some(&[])),
    ("sampled", Some(&["--stack-sample", "512KB"])),
];

/// Measures every depth in every mode; returns the table and the JSON.
pub fn run(root: &Path, out_dir: &Path, memscope: &Path) -> Result<(String, Value)> {
    let script = root.join("tests/fixtures/python/alloc_loop.py");
    let mut ns = vec![vec![Vec::new(); MODES.len()]; DEPTHS.len()];
    for round in 1..=ROUNDS {
        for (d, depth) in DEPTHS.iter().enumerate() {
            for (m, (mode, args)) in MODES.iter().enumerate() {
                match measure(&script, *depth, memscope, *args, out_dir) {
                    Ok(value) => {
                        eprintln!(
                            "bench: round {round}/{ROUNDS} python depth {depth:<3} {mode:<9} {value:.0} ns/alloc"
                        );
                        ns[d][m].push(value);
                    }
                    Err(error) => eprintln!("bench: python depth {depth} {mode}: {error:#}"),
                }
            }
        }
    }
    let medians: Vec<Vec<Option<f64>>> = ns
        .iter()
        .map(|modes| modes.iter().map(|v| median(v)).collect())
        .collect();
    Ok((render(&medians), to_json(&medians)))
}

fn measure(
    script: &Path,
    depth: u32,
    memscope: &Path,
    args: Option<&[&str]>,
    out_dir: &Path,
) -> Result<f64> {
    let output = plain_or_under_memscope(Path::new(PYTHON), memscope, args, out_dir)
        .arg(script)
        .arg(OPS)
        .arg(depth.to_string())
        .output()
        .context("cannot run the python loop")?;
    ns_per_op(&String::from_utf8_lossy(&output.stdout)).with_context(|| {
        format!(
            "no figure: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

/// `program` alone (`args` None) or under `memscope run ARGS`, its report
/// in a scratch directory of `out_dir`; the caller adds the arguments.
pub(crate) fn plain_or_under_memscope(
    program: &Path,
    memscope: &Path,
    args: Option<&[&str]>,
    out_dir: &Path,
) -> Command {
    let Some(args) = args else {
        return Command::new(program);
    };
    let report_dir = out_dir.join("bench-report");
    let _ = std::fs::remove_dir_all(&report_dir);
    let mut command = Command::new(memscope);
    command
        .arg("run")
        .arg("-o")
        .arg(&report_dir)
        .args(args)
        .arg("--")
        .arg(program);
    command
}

/// The figure a bench fixture prints: `ns per op: N`.
pub(crate) fn ns_per_op(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("ns per op: "))
        .and_then(|value| value.trim().parse().ok())
}

pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}

fn render(medians: &[Vec<Option<f64>>]) -> String {
    let mut out = format!(
        "\nPython ({PYTHON}, a 4 KiB bytearray made and dropped per op; ns per allocation, median of {ROUNDS})\n"
    );
    out += &format!(
        "{:<8} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}\n",
        "DEPTH", "untraced", "no frames", "frames", "walk/alloc", "walk/frame", "sampled"
    );
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for (depth, row) in DEPTHS.iter().zip(medians) {
        let walk = match (row[1], row[2]) {
            (Some(without), Some(with)) => Some(with - without),
            _ => None,
        };
        out += &format!(
            "{:<8} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}\n",
            depth,
            cell(row[0]),
            cell(row[1]),
            cell(row[2]),
            cell(walk),
            cell(walk.map(|w| w / f64::from(*depth))),
            cell(row[3]),
        );
    }
    out
}

fn to_json(medians: &[Vec<Option<f64>>]) -> Value {
    let rows: Vec<Value> = DEPTHS
        .iter()
        .zip(medians)
        .map(|(depth, row)| {
            json!({
                "depth": depth,
                "untraced_ns": row[0],
                "no_frames_ns": row[1],
                "frames_ns": row[2],
                "sampled_ns": row[3],
            })
        })
        .collect();
    json!({
        "interpreter": PYTHON,
        "ops": OPS,
        "sampled": "--stack-sample 512KB, Python frames on",
        "rows": rows,
    })
}
