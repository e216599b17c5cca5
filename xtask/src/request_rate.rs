//! The request rows of `cargo xtask bench`: what `--request-fn` costs per
//! request. tests/fixtures/request_loop.c calls a handler that allocates
//! and frees two blocks, and prints ns per call; it runs untraced, under
//! `memscope run` and under `memscope run --request-fn handle_request`,
//! interleaved, [`ROUNDS`] times. The last minus the middle is what a
//! request adds: the handler's entry and return probes, the request's
//! open and close, and tagging its two blocks.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use crate::python_rate::{median, ns_per_op, plain_or_under_memscope};

const ROUNDS: usize = 3;
/// Requests per run.
const OPS: &str = "200000";
const MODES: [(&str, Option<&[&str]>); 3] = [
    ("untraced", None),
    ("memscope", Some(&[])),
    ("requests", Some(&["--request-fn", "handle_request"])),
];

/// Measures each mode; returns the table and the JSON.
pub fn run(root: &Path, out_dir: &Path, memscope: &Path) -> Result<(String, Value)> {
    let program = crate::fork_rate::build_fixture(root, out_dir, "request_loop")?;
    let mut ns = vec![Vec::new(); MODES.len()];
    for round in 1..=ROUNDS {
        for (m, (mode, args)) in MODES.iter().enumerate() {
            match measure(&program, memscope, *args, out_dir) {
                Ok(value) => {
                    eprintln!(
                        "bench: round {round}/{ROUNDS} requests {mode:<9} {value:.0} ns/request"
                    );
                    ns[m].push(value);
                }
                Err(error) => eprintln!("bench: requests {mode}: {error:#}"),
            }
        }
    }
    let medians: Vec<Option<f64>> = ns.iter().map(|v| median(v)).collect();
    Ok((render(&medians), to_json(&medians, &ns)))
}

fn measure(program: &Path, memscope: &Path, args: Option<&[&str]>, out_dir: &Path) -> Result<f64> {
    let output = plain_or_under_memscope(program, memscope, args, out_dir)
        .arg(OPS)
        .output()
        .context("cannot run the request loop")?;
    ns_per_op(&String::from_utf8_lossy(&output.stdout)).with_context(|| {
        format!(
            "no figure: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

fn render(medians: &[Option<f64>]) -> String {
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let added = match (medians[1], medians[2]) {
        (Some(without), Some(with)) => Some(with - without),
        _ => None,
    };
    format!(
        "\nrequests (a handler allocating and freeing two blocks; ns per request, median of {ROUNDS})\n\
         {:>10} {:>10} {:>14} {:>14}\n{:>10} {:>10} {:>14} {:>14}\n",
        "untraced",
        "memscope",
        "--request-fn",
        "per request",
        cell(medians[0]),
        cell(medians[1]),
        cell(medians[2]),
        cell(added),
    )
}

fn to_json(medians: &[Option<f64>], all: &[Vec<f64>]) -> Value {
    json!({
        "ops": OPS,
        "untraced_ns": medians[0],
        "memscope_ns": medians[1],
        "request_fn_ns": medians[2],
        "runs_ns": all,
    })
}
