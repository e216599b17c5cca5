//! The unwinding rows of `cargo xtask bench`: what a stack walked by
//! memscope's .eh_frame unwinder costs next to one walked by frame pointers
//! (#19). bench/allocbench.c is built twice, as the bench builds it (frame
//! pointers) and with `-fomit-frame-pointer`, and its `tight` and `mixed`
//! workloads run untraced and under `memscope run --unwind fp|auto`,
//! interleaved, [`ROUNDS`] times; the medians are compared. Every
//! malloc+free pair records one stack (at malloc's return; free takes
//! none), so a difference of two medians in ns per pair is a difference in
//! ns per recorded stack. Each memscope run says (`-v`) how it walks each
//! object, and its report how deep the workload's stack came out and how
//! many stacks were cut: the frame-pointer walk stops in libc, which has
//! no frame pointers, so it walks fewer frames than the unwinder.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::bench::{build_allocbench, failure, median, parse_ns_per_op, round1, round2};

const ROUNDS: usize = 3;
/// (workload, malloc+free pairs): the main table's counts, so that the
/// figures compare with its memscope row. About 2 s a traced run here.
const WORKLOADS: [(&str, u64); 2] = [("tight", 500_000), ("mixed", 500_000)];
/// #19's bound on (d)/(b): an unwound stack may cost half again a
/// frame-pointer one.
const TARGET_RATIO: f64 = 1.5;
/// Longest any single run may take before it is killed and recorded as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    FramePointers,
    OmitFramePointer,
}

const BUILDS: [Build; 2] = [Build::FramePointers, Build::OmitFramePointer];

impl Build {
    fn flag(self) -> &'static str {
        match self {
            Build::FramePointers => "-fno-omit-frame-pointer",
            Build::OmitFramePointer => "-fomit-frame-pointer",
        }
    }

    /// Its binary in the bench's directory; the frame-pointer one is the
    /// main table's.
    fn file_name(self) -> &'static str {
        match self {
            Build::FramePointers => "allocbench",
            Build::OmitFramePointer => "allocbench-omit-fp",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Build::FramePointers => "frame_pointers",
            Build::OmitFramePointer => "omit_frame_pointer",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Build::FramePointers => "frame-pointer build",
            Build::OmitFramePointer => "omit-frame-pointer build",
        }
    }
}

/// One way of running the bench: a build, untraced or under memscope with
/// an `--unwind` mode.
struct Variant {
    letter: char,
    key: &'static str,
    build: Build,
    unwind: Option<&'static str>,
}

impl Variant {
    fn label(&self) -> String {
        match self.unwind {
            Some(mode) => format!("--unwind {mode}, {}", self.build.label()),
            None => format!("untraced, {}", self.build.label()),
        }
    }
}

const VARIANTS: [Variant; 5] = [
    Variant {
        letter: 'a',
        key: "untraced_fp_build",
        build: Build::FramePointers,
        unwind: None,
    },
    Variant {
        letter: 'b',
        key: "unwind_fp_fp_build",
        build: Build::FramePointers,
        unwind: Some("fp"),
    },
    Variant {
        letter: 'c',
        key: "unwind_auto_fp_build",
        build: Build::FramePointers,
        unwind: Some("auto"),
    },
    Variant {
        letter: 'd',
        key: "unwind_auto_omit_fp_build",
        build: Build::OmitFramePointer,
        unwind: Some("auto"),
    },
    Variant {
        letter: 'e',
        key: "untraced_omit_fp_build",
        build: Build::OmitFramePointer,
        unwind: None,
    },
];
/// (b), (c) and (d) in [`VARIANTS`].
const FRAME_POINTER_WALK: usize = 1;
const AUTO_ON_FP_BUILD: usize = 2;
const UNWOUND: usize = 3;

/// What one memscope run said of its stacks.
#[derive(Clone, Default)]
struct StackShape {
    /// How each object was walked, by file name, as `-v` said; empty with
    /// `--unwind fp`, which describes no process.
    objects: BTreeMap<String, String>,
    /// Frames of the workload's stack (the site with the most allocations).
    frames: usize,
    truncated_stacks: u64,
    stack_errors: u64,
}

/// Everything measured for one workload and one variant.
#[derive(Clone, Default)]
struct Cell {
    ns_per_op: Vec<f64>,
    errors: Vec<String>,
    /// The last run's; they do not differ between runs.
    shape: Option<StackShape>,
}

/// Builds both binaries into `out_dir`, measures every variant of every
/// workload with reports under `work`; returns the table and the JSON.
pub fn run(root: &Path, out_dir: &Path, work: &Path, memscope: &Path) -> Result<(String, Value)> {
    let binaries = BUILDS
        .iter()
        .map(|&build| build_allocbench(root, &out_dir.join(build.file_name()), build.flag()))
        .collect::<Result<Vec<PathBuf>>>()?;
    let binary = |build: Build| &binaries[BUILDS.iter().position(|&b| b == build).unwrap_or(0)];
    // cells[workload][variant]
    let mut cells = vec![vec![Cell::default(); VARIANTS.len()]; WORKLOADS.len()];
    for round in 1..=ROUNDS {
        for (w, &(workload, ops)) in WORKLOADS.iter().enumerate() {
            for (v, variant) in VARIANTS.iter().enumerate() {
                let started = Instant::now();
                let cell = &mut cells[w][v];
                let outcome = measure(
                    binary(variant.build),
                    variant.unwind,
                    workload,
                    ops,
                    memscope,
                    work,
                );
                let shown = match outcome {
                    Ok((ns, shape)) => {
                        cell.ns_per_op.push(ns);
                        cell.shape = shape.or(cell.shape.take());
                        format!("{ns:.1} ns/op")
                    }
                    Err(error) => {
                        let line = format!("failed: {error:#}");
                        cell.errors.push(format!("{error:#}"));
                        line
                    }
                };
                eprintln!(
                    "bench: round {round}/{ROUNDS} unwind {workload:<5} ({}) {:<40} {shown} ({:.1} s)",
                    variant.letter,
                    variant.label(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok((render(&cells), to_json(&cells, &binaries)))
}

/// One run: the bench's ns per pair and, under memscope, its stacks.
fn measure(
    binary: &Path,
    unwind: Option<&str>,
    workload: &str,
    ops: u64,
    memscope: &Path,
    work: &Path,
) -> Result<(f64, Option<StackShape>)> {
    let ops = ops.to_string();
    let report_dir = work.join(format!("unwind-{workload}"));
    let mut cmd = match unwind {
        None => Command::new(binary),
        Some(mode) => {
            let mut cmd = Command::new(memscope);
            cmd.args(["run", "-v", "--unwind", mode, "-o"])
                .arg(&report_dir)
                .arg("--")
                .arg(binary)
                // -v's lines are parsed
                .env("NO_COLOR", "1");
            cmd
        }
    };
    cmd.args([workload, &ops]);
    let (out, err) = run_to_exit(&mut cmd, work)?;
    let ns = parse_ns_per_op(&out)
        .with_context(|| failure("no ns_per_op line in its stdout", None, &err))?;
    let shape = match unwind {
        None => None,
        Some(_) => {
            let shape = stack_shape(&report_dir, &err);
            let _ = fs::remove_dir_all(&report_dir);
            Some(shape?)
        }
    };
    Ok((ns, shape))
}

/// Runs `cmd` to its exit with its stdout and stderr in files under
/// `work`, killing it after [`RUN_TIMEOUT`]; returns their lines.
fn run_to_exit(cmd: &mut Command, work: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let out_path = work.join("unwind-cost.stdout");
    let err_path = work.join("unwind-cost.stderr");
    let create = |path: &Path| {
        File::create(path).with_context(|| format!("cannot create {}", path.display()))
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(create(&out_path)?)
        .stderr(create(&err_path)?)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("cannot wait")? {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no exit in {} s", RUN_TIMEOUT.as_secs());
        }
        thread::sleep(Duration::from_millis(20));
    };
    let lines = |path: &Path| -> Vec<String> {
        fs::read_to_string(path)
            .map(|text| text.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let (out, err) = (lines(&out_path), lines(&err_path));
    if !status.success() {
        bail!("{}", failure("failed", Some(&status.to_string()), &err));
    }
    Ok((out, err))
}

/// The objects' walks from `-v`'s lines, the rest from the report.
fn stack_shape(report_dir: &Path, stderr: &[String]) -> Result<StackShape> {
    let path = report_dir.join("report.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let frames = report["sites"]
        .as_array()
        .and_then(|sites| {
            sites
                .iter()
                .max_by_key(|site| site["alloc_count"].as_u64().unwrap_or(0))
        })
        .and_then(|site| site["frames"].as_array())
        .map_or(0, Vec::len);
    let completeness = &report["completeness"];
    Ok(StackShape {
        objects: object_walks(stderr),
        frames,
        truncated_stacks: completeness["truncated_stacks"].as_u64().unwrap_or(0),
        stack_errors: completeness["stack_errors"].as_u64().unwrap_or(0),
    })
}

/// `-v`'s "unwind PATH: 65 .eh_frame rows" and "unwind PATH: by frame
/// pointer: WHY", by file name.
fn object_walks(stderr: &[String]) -> BTreeMap<String, String> {
    stderr
        .iter()
        .filter_map(|line| {
            let rest = &line[line.find("unwind /")? + "unwind ".len()..];
            let (path, walk) = rest.split_once(": ")?;
            let name = Path::new(path).file_name()?.to_string_lossy().into_owned();
            Some((name, walk.to_owned()))
        })
        .collect()
}

/// "rows (65)" or "frame pointer", for the table.
fn short_walk(walk: &str) -> String {
    match walk.strip_suffix(" .eh_frame rows") {
        Some(rows) => format!("rows ({rows})"),
        None if walk.starts_with("by frame pointer") => "frame pointer".to_owned(),
        None => walk.to_owned(),
    }
}

/// (d)/(b), (c)/(b) and (d)-(b) of one workload.
struct Comparison {
    unwound_vs_frame_pointer: Option<f64>,
    auto_fp_build_vs_frame_pointer: Option<f64>,
    extra_ns_per_stack: Option<f64>,
}

fn compare(cells: &[Cell]) -> Comparison {
    let ns = |v: usize| median(&cells[v].ns_per_op);
    let fp = ns(FRAME_POINTER_WALK);
    Comparison {
        unwound_vs_frame_pointer: ns(UNWOUND).zip(fp).map(|(d, b)| d / b),
        auto_fp_build_vs_frame_pointer: ns(AUTO_ON_FP_BUILD).zip(fp).map(|(c, b)| c / b),
        extra_ns_per_stack: ns(UNWOUND).zip(fp).map(|(d, b)| d - b),
    }
}

fn render(cells: &[Vec<Cell>]) -> String {
    let figure = |value: Option<f64>, digits: usize| {
        value.map_or("-".to_owned(), |v| format!("{v:.digits$}"))
    };
    let mut s = format!(
        "\n{:<8} {:<44} {:>8}  {:<16} WALKED BY (medians of {ROUNDS})\n",
        "UNWIND", "RUN", "NS/PAIR", "STACK"
    );
    for (&(workload, _), row) in WORKLOADS.iter().zip(cells) {
        for (variant, cell) in VARIANTS.iter().zip(row) {
            let stack = cell.shape.as_ref().map_or(String::new(), |shape| {
                let mut stack = format!("{} frames", shape.frames);
                if shape.truncated_stacks > 0 {
                    stack.push_str(", cut");
                }
                if shape.stack_errors > 0 {
                    let _ = write!(stack, ", {} errors", shape.stack_errors);
                }
                stack
            });
            let walks = match (&cell.shape, cell.errors.first()) {
                (_, Some(error)) => format!(
                    "{} of {} runs failed: {error}",
                    cell.errors.len(),
                    cell.errors.len() + cell.ns_per_op.len()
                ),
                (Some(shape), None) if shape.objects.is_empty() => {
                    "the kernel's frame-pointer walk".to_owned()
                }
                (Some(shape), None) => shape
                    .objects
                    .iter()
                    .filter(|(name, _)| {
                        *name == variant.build.file_name() || name.starts_with("libc.so")
                    })
                    .map(|(name, walk)| format!("{name}: {}", short_walk(walk)))
                    .collect::<Vec<_>>()
                    .join(", "),
                (None, None) => String::new(),
            };
            let line = format!(
                "{workload:<8} ({}) {:<40} {:>8}  {stack:<16} {walks}",
                variant.letter,
                variant.label(),
                figure(median(&cell.ns_per_op), 1),
            );
            let _ = writeln!(s, "{}", line.trim_end());
        }
        let comparison = compare(row);
        let verdict = match comparison.unwound_vs_frame_pointer {
            Some(r) if r <= TARGET_RATIO => "met",
            Some(_) => "NOT met",
            None => "unknown",
        };
        let figures = [
            (
                "(d)/(b) unwound vs frame-pointer cost, exact mode",
                format!(
                    "{} (target <= {TARGET_RATIO}: {verdict})",
                    figure(comparison.unwound_vs_frame_pointer, 2)
                ),
            ),
            (
                "(c)/(b) --unwind auto on the frame-pointer build",
                figure(comparison.auto_fp_build_vs_frame_pointer, 2),
            ),
            (
                "(d)-(b) extra ns per recorded stack",
                figure(comparison.extra_ns_per_stack, 1),
            ),
        ];
        for (what, value) in figures {
            let _ = writeln!(s, "{workload:<8} {what:<50} {value}");
        }
    }
    s
}

fn to_json(cells: &[Vec<Cell>], binaries: &[PathBuf]) -> Value {
    let builds: serde_json::Map<String, Value> = BUILDS
        .iter()
        .zip(binaries)
        .map(|(build, binary)| {
            (
                build.key().to_owned(),
                json!({
                    "binary": binary.display().to_string(),
                    "gcc_flags": format!("-O2 {} -fno-builtin-malloc -pthread", build.flag()),
                }),
            )
        })
        .collect();
    let workloads: Vec<Value> = WORKLOADS
        .iter()
        .zip(cells)
        .map(|(&(workload, ops), row)| {
            let runs: Vec<Value> = VARIANTS
                .iter()
                .zip(row)
                .map(|(variant, cell)| {
                    let shape = cell.shape.as_ref().map(|shape| {
                        json!({
                            "objects": shape.objects,
                            "frames": shape.frames,
                            "truncated_stacks": shape.truncated_stacks,
                            "stack_errors": shape.stack_errors,
                        })
                    });
                    json!({
                        "run": variant.letter.to_string(),
                        "key": variant.key,
                        "build": variant.build.key(),
                        "unwind": variant.unwind,
                        "ns_per_op": median(&cell.ns_per_op).map(round1),
                        "samples_ns_per_op": cell.ns_per_op.iter().copied().map(round1).collect::<Vec<_>>(),
                        "errors": cell.errors,
                        "stacks": shape,
                    })
                })
                .collect();
            let comparison = compare(row);
            json!({
                "workload": workload,
                "ops": ops,
                "runs": runs,
                "unwound_vs_frame_pointer": comparison.unwound_vs_frame_pointer.map(round2),
                "auto_fp_build_vs_frame_pointer": comparison.auto_fp_build_vs_frame_pointer.map(round2),
                "extra_ns_per_stack": comparison.extra_ns_per_stack.map(round1),
                "within_target": comparison.unwound_vs_frame_pointer.map(|r| r <= TARGET_RATIO),
            })
        })
        .collect();
    json!({
        "note": "ns_per_op is the bench's figure per malloc+free pair, median of the rounds; each \
                 pair records one stack. unwound_vs_frame_pointer is (d) --unwind auto on the \
                 omit-frame-pointer build over (b) --unwind fp on the frame-pointer build; \
                 auto_fp_build_vs_frame_pointer is (c) --unwind auto on the frame-pointer build \
                 over (b); extra_ns_per_stack is (d) - (b). stacks: how memscope walked each \
                 object (-v), the frames of the workload's stack and the report's cut stacks.",
        "rounds": ROUNDS,
        "target_unwound_vs_frame_pointer": TARGET_RATIO,
        "builds": builds,
        "workloads": workloads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that -v's lines give each object's walk by file name, through
    /// colors, and that other lines are ignored.
    #[test]
    fn object_walks_are_read_from_verbose_lines() {
        let lines = [
            "2026-12-03T16:44:10.216727Z  INFO malloc: entry probe at +0 (emulated), return probe",
            "2026-12-03T16:44:10.217382Z \u{1b}[32m INFO\u{1b}[0m unwind /tmp/b/allocbench: 65 .eh_frame rows",
            "2026-12-03T16:44:10.217382Z  INFO unwind /usr/lib/libc.so.6: by frame pointer: built with frame pointers (99% of its functions)",
        ]
        .map(str::to_owned);
        let walks = object_walks(&lines);
        assert_eq!(
            walks.into_iter().collect::<Vec<_>>(),
            [
                ("allocbench".to_owned(), "65 .eh_frame rows".to_owned()),
                (
                    "libc.so.6".to_owned(),
                    "by frame pointer: built with frame pointers (99% of its functions)".to_owned()
                ),
            ]
        );
        assert_eq!(short_walk("65 .eh_frame rows"), "rows (65)");
        assert_eq!(
            short_walk("by frame pointer: no unwind rows"),
            "frame pointer"
        );
    }

    /// Check that the ratios divide the medians of (d) and (c) by (b)'s.
    #[test]
    fn comparison_divides_medians_by_the_frame_pointer_walk() {
        let cell = |ns: &[f64]| Cell {
            ns_per_op: ns.to_vec(),
            ..Cell::default()
        };
        let row = [
            cell(&[8.0]),
            cell(&[2000.0, 1900.0, 2100.0]),
            cell(&[2200.0]),
            cell(&[3000.0, 2900.0, 9000.0]),
            cell(&[]),
        ];
        let comparison = compare(&row);
        assert_eq!(comparison.unwound_vs_frame_pointer, Some(1.5));
        assert_eq!(comparison.auto_fp_build_vs_frame_pointer, Some(1.1));
        assert_eq!(comparison.extra_ns_per_stack, Some(1000.0));
    }
}
