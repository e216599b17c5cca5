//! The Python objects rows of `cargo xtask bench`: what counting each small
//! object costs. tests/fixtures/python/object_loop.py makes and drops a
//! 133-byte bytes object per op (pymalloc's, no free list) and prints ns
//! per op. Debian's python3.11 runs untraced, untraced with
//! PYTHONMALLOC=malloc (the allocator `run --python-objects` switches to),
//! under `memscope run` (objects by arena) and `memscope run
//! --python-objects`; pyenv's 3.12, whose pymalloc can be probed, runs
//! untraced and under `memscope attach --python-objects`. Interleaved,
//! [`ROUNDS`] times; medians.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::python_rate::{median, ns_per_op};

const ROUNDS: usize = 3;
/// Objects per run.
const OPS: &str = "300000";
const DEBIAN: &str = "/usr/bin/python3.11";

#[derive(Clone, Copy)]
enum Mode {
    Untraced,
    UntracedMalloc,
    Run(&'static [&'static str]),
    AttachObjects,
}

struct Row {
    interpreter: &'static str,
    name: &'static str,
    mode: Mode,
}

fn rows() -> Vec<(Row, Option<PathBuf>)> {
    let pyenv_312 = std::fs::read_dir("/root/.pyenv/versions")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin/python3.12"))
        .find(|exe| exe.exists());
    let debian = Some(PathBuf::from(DEBIAN));
    vec![
        (
            Row {
                interpreter: "debian-3.11",
                name: "untraced",
                mode: Mode::Untraced,
            },
            debian.clone(),
        ),
        (
            Row {
                interpreter: "debian-3.11",
                name: "untraced, PYTHONMALLOC=malloc",
                mode: Mode::UntracedMalloc,
            },
            debian.clone(),
        ),
        (
            Row {
                interpreter: "debian-3.11",
                name: "run (by arena)",
                mode: Mode::Run(&[]),
            },
            debian.clone(),
        ),
        (
            Row {
                interpreter: "debian-3.11",
                name: "run --python-objects",
                mode: Mode::Run(&["--python-objects"]),
            },
            debian,
        ),
        (
            Row {
                interpreter: "pyenv-3.12",
                name: "untraced",
                mode: Mode::Untraced,
            },
            pyenv_312.clone(),
        ),
        (
            Row {
                interpreter: "pyenv-3.12",
                name: "attach --python-objects",
                mode: Mode::AttachObjects,
            },
            pyenv_312,
        ),
    ]
}

/// Measures every row; returns the table and the JSON.
pub fn run(root: &Path, out_dir: &Path, memscope: &Path) -> Result<(String, Value)> {
    let script = root.join("tests/fixtures/python/object_loop.py");
    let rows = rows();
    let mut ns = vec![Vec::new(); rows.len()];
    for round in 1..=ROUNDS {
        for (i, (row, interpreter)) in rows.iter().enumerate() {
            let Some(interpreter) = interpreter else {
                continue;
            };
            let report_dir = out_dir.join("python-objects-report");
            let _ = std::fs::remove_dir_all(&report_dir);
            match measure(&script, interpreter, memscope, row.mode, &report_dir) {
                Ok(value) => {
                    eprintln!(
                        "bench: round {round}/{ROUNDS} python objects {} {:<30} {value:.0} ns/op",
                        row.interpreter, row.name
                    );
                    ns[i].push(value);
                }
                Err(error) => eprintln!(
                    "bench: python objects {} {}: {error:#}",
                    row.interpreter, row.name
                ),
            }
        }
    }
    let medians: Vec<Option<f64>> = ns.iter().map(|v| median(v)).collect();
    let rows: Vec<Row> = rows.into_iter().map(|(row, _)| row).collect();
    Ok((render(&rows, &medians), to_json(&rows, &medians)))
}

fn measure(
    script: &Path,
    interpreter: &Path,
    memscope: &Path,
    mode: Mode,
    report_dir: &Path,
) -> Result<f64> {
    let mut command = match mode {
        Mode::Untraced | Mode::UntracedMalloc => Command::new(interpreter),
        Mode::Run(args) => {
            let mut command = Command::new(memscope);
            command
                .arg("run")
                .arg("-o")
                .arg(report_dir)
                .args(args)
                .arg("--")
                .arg(interpreter);
            command
        }
        Mode::AttachObjects => return measure_attached(script, interpreter, memscope, report_dir),
    };
    if matches!(mode, Mode::UntracedMalloc) {
        command.env("PYTHONMALLOC", "malloc");
    }
    let output = command
        .arg(script)
        .arg(OPS)
        .output()
        .context("cannot run the python loop")?;
    ns_per_op(&String::from_utf8_lossy(&output.stdout)).with_context(|| {
        format!(
            "no figure: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

/// The loop, started once `memscope attach --python-objects` is on it.
fn measure_attached(
    script: &Path,
    interpreter: &Path,
    memscope: &Path,
    report_dir: &Path,
) -> Result<f64> {
    let mut target = Command::new(interpreter)
        .arg(script)
        .arg(OPS)
        .arg("--wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the python loop")?;
    let mut out = BufReader::new(target.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let mut memscope = Command::new(memscope)
        .arg("attach")
        .arg("-o")
        .arg(report_dir)
        .arg("--python-objects")
        .arg(target.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start memscope")?;
    let mut banner = String::new();
    BufReader::new(memscope.stderr.take().context("no stderr")?).read_line(&mut banner)?;
    let result = (|| {
        if !banner.starts_with("memscope: profiling pid") {
            bail!("memscope did not attach: {banner}");
        }
        let mut stdin = target.stdin.take().context("no stdin")?;
        stdin.write_all(b"go\n")?;
        line.clear();
        out.read_line(&mut line)?;
        drop(stdin);
        ns_per_op(&line).with_context(|| format!("no figure: {line}"))
    })();
    // SAFETY: plain syscalls on our own children.
    unsafe {
        libc::kill(memscope.id() as i32, libc::SIGINT);
        libc::kill(target.id() as i32, libc::SIGKILL);
    }
    let _ = memscope.wait();
    let _ = target.wait();
    result
}

/// Each row against its interpreter's untraced row.
fn render(rows: &[Row], medians: &[Option<f64>]) -> String {
    let mut out = format!(
        "\nPython objects (a 133-byte bytes object made and dropped per op; ns per op, median of {ROUNDS})\n"
    );
    out += &format!(
        "{:<12} {:<30} {:>8} {:>12} {:>10}\n",
        "PYTHON", "MODE", "ns/op", "vs untraced", "cost/op"
    );
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for (row, value) in rows.iter().zip(medians) {
        let untraced = rows
            .iter()
            .zip(medians)
            .find(|(r, _)| r.interpreter == row.interpreter && matches!(r.mode, Mode::Untraced))
            .and_then(|(_, v)| *v);
        let (ratio, cost) = match (value, untraced) {
            (Some(v), Some(u)) if u > 0.0 => (format!("{:.1}x", v / u), cell(Some(v - u))),
            _ => ("-".to_owned(), "-".to_owned()),
        };
        out += &format!(
            "{:<12} {:<30} {:>8} {:>12} {:>10}\n",
            row.interpreter,
            row.name,
            cell(*value),
            ratio,
            cost
        );
    }
    out
}

fn to_json(rows: &[Row], medians: &[Option<f64>]) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .zip(medians)
        .map(|(row, value)| json!({ "interpreter": row.interpreter, "mode": row.name, "ns_per_op": value }))
        .collect();
    json!({ "ops": OPS, "rows": rows })
}
