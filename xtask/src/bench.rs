//! `cargo xtask bench`: what memscope costs a program that allocates, next
//! to the untraced program and to the tools people use today.
//!
//! bench/allocbench.c runs one of five workloads (`tight`, `mixed`,
//! `threads`, `leak`, and `hold`, which ends with 1M live blocks: memscope's
//! own RSS there is the figure) for a fixed number of operations and prints its own
//! `ns_per_op=...`, timed around the loop only. Each workload is measured
//! untraced, under `memscope run`, under a minimal bpftrace script (uprobe +
//! uretprobe on malloc, uprobe on free: the floor of any uprobe tracer),
//! under memleak (libbpf-tools, or BCC's memleak-bpfcc where libbpf-tools has
//! none) and under heaptrack (LD_PRELOAD). Every tool-run is repeated
//! [`REPS`] times, interleaved, and the median is kept; the untraced program
//! is measured at the start and the end of every round. The result is the
//! ratio to the untraced program of the same run, printed as a table and
//! written to target/bench/results.json with memscope's own peak RSS and CPU
//! time. A tool that cannot be installed or fails is reported, not fatal.
//! The fork-rate rows (`fork_rate`) follow, then Python's, the
//! requests' (`request_rate`) and the unwinder's cost (`unwind_cost`).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// Rounds of every measurement; the median is kept.
const REPS: usize = 3;
/// Operations per run (`threads`: in total, half on each thread). Chosen so
/// that the slowest tracers (about 12 µs per malloc+free here: free's entry
/// is single-stepped) stay under 10 s a run and the whole bench fits in
/// about 5 minutes on 2 cores; the untraced loops are then short (4-80 ms)
/// but steady, and the untraced program is measured twice per round.
const WORKLOADS: [(&str, u64, &str); 5] = [
    ("tight", 500_000, "malloc(64)/free loop"),
    ("mixed", 500_000, "sizes 16..4096, ring of 1024 live blocks"),
    ("threads", 500_000, "mixed on 2 threads (ops in total)"),
    ("leak", 500_000, "mixed, every 16th block kept"),
    // The live set memscope holds at its end: its own RSS is the figure.
    ("hold", 1_000_000, "malloc(32), every block kept: 1M live"),
];
/// Longest any single run may take before it is killed and recorded as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a pid-attaching tool gets to print that it is attaching.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(90);
/// Pause after a tool says it is attaching, before the timed loop starts:
/// bpftrace and BCC print that line just before they attach.
const ATTACH_SETTLE: Duration = Duration::from_millis(1500);

/// Why a tool was not run on the later workloads.
const GAVE_UP: &str = "it failed in every earlier run";

/// How an error of the attach phase (before the timed loop) begins.
const ATTACH_FAILED: &str = "attach failed: ";

/// Minimal allocation tracker: the cost every uprobe-based tracer pays at
/// least. `$1` is the target pid (with -p, bpftrace exits with it).
const BPFTRACE_SCRIPT: &str = "\
uprobe:libc:malloc /pid == $1/ { @s[tid] = arg0; }
uretprobe:libc:malloc /pid == $1/ { @a[retval] = @s[tid]; delete(@s[tid]); }
uprobe:libc:free /pid == $1/ { delete(@a[arg0]); }
END { clear(@s); clear(@a); }
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    Untraced,
    Memscope,
    /// memscope walking a byte sample of stacks (`SAMPLE_GAP`).
    MemscopeSampled,
    /// memscope's probes with programs that record nothing: its own floor,
    /// so memscope minus this is what its programs cost.
    MemscopeEmpty,
    BareTraps,
    Bpftrace,
    Memleak,
    Heaptrack,
}

const TOOLS: [Tool; 8] = [
    Tool::Untraced,
    Tool::Memscope,
    Tool::MemscopeSampled,
    Tool::MemscopeEmpty,
    Tool::BareTraps,
    Tool::Bpftrace,
    Tool::Memleak,
    Tool::Heaptrack,
];

/// What `--allocs` measures: memscope between its two bounds.
const OWN: [Tool; 5] = [
    Tool::Untraced,
    Tool::Memscope,
    Tool::MemscopeSampled,
    Tool::MemscopeEmpty,
    Tool::BareTraps,
];

/// `--stack-sample` of the sampled row: tcmalloc's and Go's default gap.
const SAMPLE_GAP: &str = "512KB";

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Untraced => "untraced",
            Tool::Memscope => "memscope",
            Tool::MemscopeSampled => "memscope, sampled",
            Tool::MemscopeEmpty => "memscope, empty",
            Tool::BareTraps => "bare traps (limit)",
            Tool::Bpftrace => "bpftrace (floor)",
            Tool::Memleak => "memleak",
            Tool::Heaptrack => "heaptrack",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Tool::Untraced => "untraced",
            Tool::Memscope => "memscope",
            Tool::MemscopeSampled => "memscope_sampled",
            Tool::MemscopeEmpty => "memscope_empty_programs",
            Tool::BareTraps => "bare_traps",
            Tool::Bpftrace => "bpftrace",
            Tool::Memleak => "memleak",
            Tool::Heaptrack => "heaptrack",
        }
    }
}

/// memleak as found on this machine.
struct Memleak {
    program: PathBuf,
    /// `libbpf-tools` or `bcc`.
    flavor: &'static str,
    /// BCC_KERNEL_SOURCE when the running kernel has no headers of its own.
    kernel_source: Option<PathBuf>,
}

/// What is installed: each tool, or why it is not there.
struct Tools {
    bpftrace: Result<PathBuf, String>,
    memleak: Result<Memleak, String>,
    heaptrack: Result<PathBuf, String>,
    notes: Vec<String>,
}

impl Tools {
    fn unavailable(&self, tool: Tool) -> Option<&str> {
        match tool {
            Tool::Untraced
            | Tool::Memscope
            | Tool::MemscopeSampled
            | Tool::MemscopeEmpty
            | Tool::BareTraps => None,
            Tool::Bpftrace => self.bpftrace.as_ref().err().map(String::as_str),
            Tool::Memleak => self.memleak.as_ref().err().map(String::as_str),
            Tool::Heaptrack => self.heaptrack.as_ref().err().map(String::as_str),
        }
    }
}

/// memscope's own process, read from /proc while it runs.
#[derive(Clone, Copy, Default)]
struct ProcStats {
    peak_rss_kib: u64,
    user_s: f64,
    sys_s: f64,
    wall_s: f64,
}

struct Sample {
    ns_per_op: f64,
    memscope: Option<ProcStats>,
}

/// Everything measured for one workload and one tool.
#[derive(Default)]
struct Cell {
    ns_per_op: Vec<f64>,
    memscope: Vec<ProcStats>,
    errors: Vec<String>,
    /// Attach failures that a second try got past.
    retried: Vec<String>,
}

struct Context<'a> {
    bench: PathBuf,
    memscope: &'a Path,
    tools: &'a Tools,
    work: PathBuf,
    bpftrace_script: PathBuf,
    clk_tck: f64,
    /// memscope's probes, from its first report: where the bare traps go.
    probes: std::sync::OnceLock<Vec<crate::bare_traps::Probe>>,
}

/// The Python rows alone (`cargo xtask bench --python`).
pub fn run_python(workspace_root: &Path, memscope_bin: &Path) -> Result<()> {
    let work = workspace_root.join("target/bench/tmp-python");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let (python_table, python_json) = crate::python_rate::run(workspace_root, &work, memscope_bin)?;
    let (objects_table, objects_json) =
        crate::python_objects_rate::run(workspace_root, &work, memscope_bin)?;
    let _ = fs::remove_dir_all(&work);
    let path = workspace_root.join("target/bench/python.json");
    let results = serde_json::json!({ "python": python_json, "python_objects": objects_json });
    fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    print!("{python_table}{objects_table}");
    println!("\nbench: results in {}", path.display());
    Ok(())
}

/// The unwinding rows alone (`cargo xtask bench --unwind`).
pub fn run_unwind(workspace_root: &Path, memscope_bin: &Path) -> Result<()> {
    let out_dir = workspace_root.join("target/bench");
    let work = out_dir.join("tmp-unwind");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let (table, json) = crate::unwind_cost::run(workspace_root, &out_dir, &work, memscope_bin)?;
    let _ = fs::remove_dir_all(&work);
    let path = out_dir.join("unwind.json");
    fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    print!("{table}");
    println!("\nbench: results in {}", path.display());
    Ok(())
}

/// The request rows alone (`cargo xtask bench --requests`).
pub fn run_requests(workspace_root: &Path, memscope_bin: &Path) -> Result<()> {
    let work = workspace_root.join("target/bench/tmp-requests");
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let (table, json) = crate::request_rate::run(workspace_root, &work, memscope_bin)?;
    let _ = fs::remove_dir_all(&work);
    let path = workspace_root.join("target/bench/requests.json");
    fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    print!("{table}");
    println!("\nbench: results in {}", path.display());
    Ok(())
}

/// The whole bench; with `allocs_only`, only the allocation loops under
/// memscope and the bare traps (what speed work moves), into allocs.json.
pub fn run(workspace_root: &Path, memscope_bin: &Path, allocs_only: bool) -> Result<()> {
    let started = Instant::now();
    let out_dir = workspace_root.join("target/bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    if !memscope_bin.is_file() {
        bail!("memscope binary not found at {}", memscope_bin.display());
    }
    let bench = build_bench(workspace_root, &out_dir)?;
    let tools = ensure_tools(&out_dir);
    for note in &tools.notes {
        eprintln!("bench: {note}");
    }

    let work = out_dir.join("tmp");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot clear {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let bpftrace_script = work.join("floor.bt");
    fs::write(&bpftrace_script, BPFTRACE_SCRIPT)
        .with_context(|| format!("cannot write {}", bpftrace_script.display()))?;
    let ctx = Context {
        bench,
        memscope: memscope_bin,
        tools: &tools,
        work: work.clone(),
        bpftrace_script,
        clk_tck: clock_ticks(),
        probes: std::sync::OnceLock::new(),
    };

    // cells[workload][tool]
    let mut cells: Vec<Vec<Cell>> = WORKLOADS
        .iter()
        .map(|_| TOOLS.iter().map(|_| Cell::default()).collect())
        .collect();
    // a tool that never worked is given up after this many failed runs
    let mut failures = [0usize; TOOLS.len()];
    let mut worked = [false; TOOLS.len()];
    for rep in 1..=REPS {
        for (w, &(workload, ops, _)) in WORKLOADS.iter().enumerate() {
            // untraced first and last: drift between them shows in the samples
            let order = TOOLS.iter().copied().chain([Tool::Untraced]);
            for tool in order {
                let t = tool_index(tool);
                if (allocs_only && !OWN.contains(&tool))
                    || tools.unavailable(tool).is_some()
                    || (!worked[t] && failures[t] >= 2)
                {
                    continue;
                }
                let t0 = Instant::now();
                let cell = &mut cells[w][t];
                let mut outcome = measure(&ctx, tool, workload, ops);
                if let Err(error) = &outcome
                    && error.starts_with(ATTACH_FAILED)
                {
                    // a tool that failed to attach gets a second try
                    eprintln!("bench: {} {workload}: {error}; trying again", tool.name());
                    cell.retried.push(error.clone());
                    outcome = measure(&ctx, tool, workload, ops);
                }
                let shown = match outcome {
                    Ok(sample) => {
                        worked[t] = true;
                        cell.ns_per_op.push(sample.ns_per_op);
                        cell.memscope.extend(sample.memscope);
                        format!("{:.1} ns/op", sample.ns_per_op)
                    }
                    Err(error) => {
                        failures[t] += 1;
                        if !worked[t] && failures[t] == 2 {
                            eprintln!("bench: {} failed twice: giving up on it", tool.name());
                        }
                        let line = format!("failed: {error}");
                        cell.errors.push(error);
                        line
                    }
                };
                eprintln!(
                    "bench: round {rep}/{REPS} {workload:<8} {:<18} {shown} ({:.1} s)",
                    tool.name(),
                    t0.elapsed().as_secs_f64()
                );
            }
        }
    }
    if allocs_only {
        let _ = fs::remove_dir_all(&work);
        let results = results_json(&ctx, &cells, started.elapsed());
        let path = out_dir.join("allocs.json");
        let text = serde_json::to_string_pretty(&results)?;
        fs::write(&path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        print!("{}", render_table(&tools, &cells, &OWN));
        println!(
            "\nbench: {REPS} rounds in {:.0} s; results in {}",
            started.elapsed().as_secs_f64(),
            path.display()
        );
        return Ok(());
    }
    let (fork_table, fork_json) = crate::fork_rate::run(workspace_root, &work, memscope_bin)?;
    let (python_table, python_json) = crate::python_rate::run(workspace_root, &work, memscope_bin)?;
    let (objects_table, objects_json) =
        crate::python_objects_rate::run(workspace_root, &work, memscope_bin)?;
    let (request_table, request_json) =
        crate::request_rate::run(workspace_root, &work, memscope_bin)?;
    let (unwind_table, unwind_json) =
        crate::unwind_cost::run(workspace_root, &out_dir, &work, memscope_bin)?;
    let _ = fs::remove_dir_all(&work);

    let mut results = results_json(&ctx, &cells, started.elapsed());
    results["fork_rate"] = fork_json;
    results["python"] = python_json;
    results["python_objects"] = objects_json;
    results["requests"] = request_json;
    results["unwind_cost"] = unwind_json;
    let path = out_dir.join("results.json");
    let text = serde_json::to_string_pretty(&results)?;
    fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    print!("{}", render_table(&tools, &cells, &TOOLS));
    print!("{fork_table}");
    print!("{python_table}");
    print!("{objects_table}");
    print!("{request_table}");
    print!("{unwind_table}");
    println!(
        "\nbench: {} rounds in {:.0} s; results in {}",
        REPS,
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

fn tool_index(tool: Tool) -> usize {
    TOOLS.iter().position(|&t| t == tool).unwrap_or(0)
}

// ---------------------------------------------------------------- building

fn build_bench(root: &Path, out_dir: &Path) -> Result<PathBuf> {
    build_allocbench(root, &out_dir.join("allocbench"), "-fno-omit-frame-pointer")
}

/// bench/allocbench.c into `binary`, with `frame_pointer_flag` and the
/// bench's other flags.
pub(crate) fn build_allocbench(
    root: &Path,
    binary: &Path,
    frame_pointer_flag: &str,
) -> Result<PathBuf> {
    let source = root.join("bench/allocbench.c");
    let out = Command::new("gcc")
        .args(["-O2", frame_pointer_flag])
        .args(["-fno-builtin-malloc", "-pthread", "-Wall", "-o"])
        .arg(binary)
        .arg(&source)
        .output()
        .context("cannot run gcc (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "gcc failed to build {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(binary.to_path_buf())
}

// ------------------------------------------------------------ installation

/// Installs the other tools with apt-get; each one that cannot be had is
/// reported and skipped.
fn ensure_tools(out_dir: &Path) -> Tools {
    let mut notes = Vec::new();
    let wanted = ["libbpf-tools", "bpftrace", "heaptrack"];
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty()
        && let Err(error) = apt_install(&missing)
    {
        notes.push(format!("apt-get install {}: {error}", missing.join(" ")));
    }

    let bpftrace = find_program("bpftrace")
        .ok_or_else(|| "bpftrace is not installed (apt-get install bpftrace failed)".to_owned());
    let heaptrack = find_program("heaptrack")
        .ok_or_else(|| "heaptrack is not installed (apt-get install heaptrack failed)".to_owned());
    let memleak = find_memleak(out_dir, &mut notes);
    Tools {
        bpftrace,
        memleak,
        heaptrack,
        notes,
    }
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

/// `apt-get install -y`, with one `apt-get update` and a retry on failure.
fn apt_install(packages: &[&str]) -> Result<(), String> {
    let install = || -> Result<(), String> {
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(last_line(&String::from_utf8_lossy(&out.stderr)))
        }
    };
    eprintln!("bench: apt-get install -y {}", packages.join(" "));
    if install().is_ok() {
        return Ok(());
    }
    eprintln!("bench: apt-get update, then again");
    let _ = Command::new("apt-get")
        .args(["update", "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    if install().is_ok() {
        return Ok(());
    }
    // one by one, so that one missing package does not cost the others
    let mut failed = Vec::new();
    for package in packages {
        let out = Command::new("apt-get")
            .args(["install", "-y", "-q", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => failed.push(format!(
                "{package}: {}",
                last_line(&String::from_utf8_lossy(&o.stderr))
            )),
            Err(e) => failed.push(format!("{package}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// libbpf-tools' memleak where the package ships it; otherwise BCC's
/// memleak-bpfcc (bookworm's libbpf-tools 0.26 has no memleak), which
/// compiles its BPF program at start and so needs kernel headers.
fn find_memleak(out_dir: &Path, notes: &mut Vec<String>) -> Result<Memleak, String> {
    let listed = Command::new("dpkg")
        .args(["-L", "libbpf-tools"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if let Some(path) = listed
        .lines()
        .find(|l| l.ends_with("/memleak") && Path::new(l).is_file())
    {
        return Ok(Memleak {
            program: PathBuf::from(path),
            flavor: "libbpf-tools",
            kernel_source: None,
        });
    }
    notes.push(
        "libbpf-tools has no memleak here; using BCC's memleak-bpfcc (package bpfcc-tools)"
            .to_owned(),
    );
    if !dpkg_installed("bpfcc-tools") {
        apt_install(&["bpfcc-tools"]).map_err(|e| format!("bpfcc-tools: {e}"))?;
    }
    let program = find_program("memleak-bpfcc")
        .ok_or("neither libbpf-tools nor bpfcc-tools provides memleak here")?;
    let kernel_source = bcc_kernel_source(out_dir, notes)?;
    Ok(Memleak {
        program,
        flavor: "bcc",
        kernel_source,
    })
}

/// BCC finds headers in /lib/modules/$(uname -r)/build or
/// /sys/kernel/kheaders.tar.xz. When the running kernel has neither (a custom
/// kernel), Debian's own kernel headers serve: memleak with -p compiles only
/// uprobe programs, which read `struct pt_regs` (stable ABI on x86-64), never
/// a kernel structure. BCC wants them in one directory (BCC_KERNEL_SOURCE),
/// Debian splits them in two: a symlink tree under target/bench joins them.
fn bcc_kernel_source(out_dir: &Path, notes: &mut Vec<String>) -> Result<Option<PathBuf>, String> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    if Path::new(&format!("/lib/modules/{release}/build")).exists()
        || Path::new("/sys/kernel/kheaders.tar.xz").exists()
    {
        return Ok(None);
    }
    let find = || -> Option<(PathBuf, PathBuf)> {
        let mut found: Vec<(PathBuf, PathBuf)> = fs::read_dir("/usr/src")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("linux-headers-") && n.ends_with("-amd64"))
            })
            .filter_map(|arch| {
                // its Makefile is `include /usr/src/linux-headers-X-common/Makefile`
                let makefile = fs::read_to_string(arch.join("Makefile")).ok()?;
                let common = makefile
                    .split_whitespace()
                    .find(|w| w.ends_with("/Makefile"))
                    .and_then(|m| Path::new(m).parent())?
                    .to_path_buf();
                common.is_dir().then_some((arch, common))
            })
            .collect();
        found.sort_by_key(|(arch, _)| natural_key(&arch.to_string_lossy()));
        found.pop()
    };
    let (arch, common) = match find() {
        Some(found) => found,
        None => {
            apt_install(&["linux-headers-amd64"])
                .map_err(|e| format!("BCC needs kernel headers; linux-headers-amd64: {e}"))?;
            find().ok_or("BCC needs kernel headers and none were found in /usr/src")?
        }
    };
    let name = arch
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let merged = out_dir.join(format!("bcc-kernel-headers/{name}"));
    let marker = merged.join(".complete");
    if !marker.exists() {
        let _ = fs::remove_dir_all(&merged);
        fs::create_dir_all(&merged).map_err(|e| format!("{}: {e}", merged.display()))?;
        for (source, force) in [(&common, false), (&arch, true)] {
            let status = Command::new("cp")
                .arg(if force { "-rsf" } else { "-rs" })
                .arg(source.join("."))
                .arg(&merged)
                .status()
                .map_err(|e| format!("cannot run cp: {e}"))?;
            if !status.success() {
                return Err(format!("cp -rs {} failed", source.display()));
            }
        }
        fs::write(&marker, "").map_err(|e| format!("{}: {e}", marker.display()))?;
    }
    notes.push(format!(
        "kernel {release} has no headers; BCC compiles memleak against {name} (uprobes only, pt_regs is stable)"
    ));
    Ok(Some(merged))
}

/// Sort key that orders "6.1.0-9" before "6.1.0-48".
fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut digits = String::new();
    let mut text = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                key.push((0, std::mem::take(&mut text)));
            }
            digits.push(c);
        } else {
            if !digits.is_empty() {
                key.push((digits.parse().unwrap_or(0), String::new()));
                digits.clear();
            }
            text.push(c);
        }
    }
    if !digits.is_empty() {
        key.push((digits.parse().unwrap_or(0), String::new()));
    }
    if !text.is_empty() {
        key.push((0, text));
    }
    key
}

// ------------------------------------------------------------- measuring

fn measure(ctx: &Context, tool: Tool, workload: &str, ops: u64) -> Result<Sample, String> {
    let ops_arg = ops.to_string();
    match tool {
        Tool::Untraced => {
            let mut cmd = Command::new(&ctx.bench);
            cmd.args([workload, &ops_arg]);
            run_plain(cmd)
        }
        Tool::Heaptrack => {
            let Ok(heaptrack) = &ctx.tools.heaptrack else {
                return Err("heaptrack unavailable".into());
            };
            let mut cmd = Command::new(heaptrack);
            cmd.arg("-o")
                .arg(ctx.work.join(format!("heaptrack-{workload}")))
                .arg(&ctx.bench)
                .args([workload, &ops_arg]);
            run_plain(cmd)
        }
        Tool::Memscope => run_memscope(ctx, workload, &ops_arg, &[]),
        Tool::MemscopeSampled => {
            run_memscope(ctx, workload, &ops_arg, &["--stack-sample", SAMPLE_GAP])
        }
        Tool::MemscopeEmpty => run_memscope(ctx, workload, &ops_arg, &["--empty-programs"]),
        Tool::BareTraps => run_bare_traps(ctx, workload, &ops_arg),
        Tool::Bpftrace => {
            let Ok(bpftrace) = &ctx.tools.bpftrace else {
                return Err("bpftrace unavailable".into());
            };
            run_attached(ctx, workload, &ops_arg, &["Attaching"], |pid| {
                let mut cmd = Command::new(bpftrace);
                cmd.arg("-p")
                    .arg(pid.to_string())
                    .arg(&ctx.bpftrace_script)
                    .arg(pid.to_string())
                    // the leak workload keeps 31k blocks: the default 4096 would drop them
                    .env("BPFTRACE_MAP_KEYS_MAX", "1048576");
                cmd
            })
        }
        Tool::Memleak => {
            let Ok(memleak) = &ctx.tools.memleak else {
                return Err("memleak unavailable".into());
            };
            run_attached(
                ctx,
                workload,
                &ops_arg,
                &["Attaching to pid", "Tracing outstanding"],
                |pid| {
                    let mut cmd = Command::new(&memleak.program);
                    // a report once an hour: nothing but the probes runs meanwhile
                    cmd.args(["-p", &pid.to_string(), "3600"])
                        .env("PYTHONUNBUFFERED", "1");
                    if let Some(source) = &memleak.kernel_source {
                        cmd.env("BCC_KERNEL_SOURCE", source);
                    }
                    cmd
                },
            )
        }
    }
}

/// Lines of a child's stdout and stderr, as they come.
enum Line {
    Out(String),
    Err(String),
}

fn spawn_readers(child: &mut Child) -> Receiver<Line> {
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        let tx = tx.clone();
        thread::spawn(move || read_lines(stdout, |l| tx.send(Line::Out(l)).is_ok()));
    }
    if let Some(stderr) = child.stderr.take() {
        thread::spawn(move || read_lines(stderr, |l| tx.send(Line::Err(l)).is_ok()));
    }
    rx
}

fn read_lines(stream: impl Read, mut send: impl FnMut(String) -> bool) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if !send(line) {
            break;
        }
    }
}

/// Starts `cmd` with no stdin and both outputs piped to the harness.
fn spawn_piped(cmd: &mut Command) -> Result<std::process::Child, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))
}

/// Runs a command whose stdout carries the bench's line (the bench itself,
/// heaptrack) and returns that line's figure.
fn run_plain(mut cmd: Command) -> Result<Sample, String> {
    let mut child = spawn_piped(&mut cmd)?;
    let lines = spawn_readers(&mut child);
    let (out, err, status) = collect_until_exit(&mut child, &lines, RUN_TIMEOUT)?;
    let ns_per_op = parse_ns_per_op(&out)
        .ok_or_else(|| failure("no ns_per_op line", status.as_deref(), &err))?;
    Ok(Sample {
        ns_per_op,
        memscope: None,
    })
}

/// `memscope run -o DIR -- bench WORKLOAD OPS`, watching memscope's own
/// process in /proc: VmHWM while it lives, utime/stime once it is a zombie
/// (before it is reaped, so they are final and exclude the bench's).
fn run_memscope(
    ctx: &Context,
    workload: &str,
    ops: &str,
    options: &[&str],
) -> Result<Sample, String> {
    let report_dir = ctx.work.join(format!("memscope-{workload}"));
    let mut cmd = Command::new(ctx.memscope);
    cmd.arg("run")
        .arg("-o")
        .arg(&report_dir)
        .args(options)
        .arg("--")
        .arg(&ctx.bench)
        .args([workload, ops]);
    let started = Instant::now();
    let mut child = spawn_piped(&mut cmd)?;
    let lines = spawn_readers(&mut child);
    let proc_dir = PathBuf::from(format!("/proc/{}", child.id()));
    let mut stats = ProcStats::default();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut final_times = None;
    loop {
        drain(&lines, &mut out, &mut err);
        if let Ok(status) = fs::read_to_string(proc_dir.join("status"))
            && let Some(kib) = status_kib(&status, "VmHWM:")
        {
            stats.peak_rss_kib = stats.peak_rss_kib.max(kib);
        }
        match fs::read_to_string(proc_dir.join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        {
            Some((state, utime, stime)) => {
                if state == 'Z' || state == 'X' {
                    final_times = Some((utime, stime));
                    break;
                }
            }
            None => break,
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "memscope did not finish in {} s",
                RUN_TIMEOUT.as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for memscope: {e}"))?;
    stats.wall_s = started.elapsed().as_secs_f64();
    // the readers end at EOF, shortly after the exit
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Line::Out(l)) => out.push(l),
            Ok(Line::Err(l)) => err.push(l),
            Err(_) => break,
        }
    }
    if ctx.probes.get().is_none()
        && let Ok(probes) = crate::bare_traps::probes_of(&report_dir.join("report.json"))
    {
        let _ = ctx.probes.set(probes);
    }
    let _ = fs::remove_dir_all(&report_dir);
    if !status.success() {
        return Err(failure("memscope failed", Some(&status.to_string()), &err));
    }
    let (utime, stime) = final_times.ok_or("memscope's /proc entry vanished before it was read")?;
    stats.user_s = utime as f64 / ctx.clk_tck;
    stats.sys_s = stime as f64 / ctx.clk_tck;
    let ns_per_op = parse_ns_per_op(&out)
        .ok_or_else(|| failure("no ns_per_op line in memscope's stdout", None, &err))?;
    Ok(Sample {
        ns_per_op,
        memscope: Some(stats),
    })
}

/// Starts the bench so that it waits on stdin after its warm-up, attaches
/// the tool to its pid, waits for the tool to say it attaches (plus a
/// settle time), then lets the timed loop run.
fn run_attached(
    ctx: &Context,
    workload: &str,
    ops: &str,
    ready_markers: &[&str],
    tool_command: impl FnOnce(u32) -> Command,
) -> Result<Sample, String> {
    let (mut bench, bench_lines) = start_waiting(ctx, workload, ops)?;
    let mut tool: Option<Child> = None;
    let result = (|| {
        let pid = ready_pid(&bench_lines)?;
        let mut cmd = tool_command(pid);
        let mut child = spawn_piped(&mut cmd)?;
        let tool_lines = spawn_readers(&mut child);
        tool = Some(child);
        // wait for the attach line; anything else it says is kept for errors
        let mut said = Vec::new();
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            match tool_lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Line::Out(l) | Line::Err(l)) => {
                    let ready = ready_markers.iter().any(|m| l.contains(m));
                    said.push(l);
                    if ready {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let what = format!("{ATTACH_FAILED}the tool exited before attaching");
                    return Err(failure(&what, None, &said));
                }
                Err(RecvTimeoutError::Timeout) => {
                    let what = format!("{ATTACH_FAILED}the tool did not attach in time");
                    return Err(failure(&what, None, &said));
                }
            }
        }
        thread::sleep(ATTACH_SETTLE);
        if let Some(child) = tool.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            drain_all(&tool_lines, &mut said);
            let what = format!("{ATTACH_FAILED}the tool exited");
            return Err(failure(&what, Some(&status.to_string()), &said));
        }
        let (out, err, status) = release(&mut bench, &bench_lines)?;
        drain_all(&tool_lines, &mut said);
        parse_ns_per_op(&out).ok_or_else(|| {
            let mut context = err;
            context.extend(said);
            failure("no ns_per_op line", status.as_deref(), &context)
        })
    })();
    // the tool (memleak never exits by itself) and, on failure, the bench
    if let Some(mut child) = tool {
        stop(&mut child);
    }
    let _ = bench.kill();
    let _ = bench.wait();
    result.map(|ns_per_op| Sample {
        ns_per_op,
        memscope: None,
    })
}

/// The bench started so that it waits on stdin after its warm-up.
fn start_waiting(
    ctx: &Context,
    workload: &str,
    ops: &str,
) -> Result<(Child, Receiver<Line>), String> {
    let mut bench = Command::new(&ctx.bench)
        .args([workload, ops])
        .env("BENCH_WAIT_STDIN", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the bench: {e}"))?;
    let lines = spawn_readers(&mut bench);
    Ok((bench, lines))
}

/// The waiting bench's pid, once it says it is ready.
fn ready_pid(lines: &Receiver<Line>) -> Result<u32, String> {
    match lines.recv_timeout(Duration::from_secs(30)) {
        Ok(Line::Out(line)) => line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| format!("bench printed {line:?} instead of \"ready PID\"")),
        Ok(Line::Err(line)) => Err(format!("bench: {line}")),
        Err(_) => Err("the bench did not get ready".to_owned()),
    }
}

/// Lets the waiting bench run its timed loop (one byte, then EOF) and
/// collects what it says until it exits.
fn release(bench: &mut Child, lines: &Receiver<Line>) -> Result<Collected, String> {
    if let Some(mut stdin) = bench.stdin.take() {
        let _ = stdin.write_all(b"g");
    }
    collect_until_exit(bench, lines, RUN_TIMEOUT)
}

/// The bench under bare perf-event uprobes at memscope's probe sites.
fn run_bare_traps(ctx: &Context, workload: &str, ops: &str) -> Result<Sample, String> {
    let probes = ctx
        .probes
        .get()
        .ok_or("memscope's probe sites are not known: no memscope run wrote its report")?;
    let (mut bench, lines) = start_waiting(ctx, workload, ops)?;
    let result = (|| {
        let pid = ready_pid(&lines)?;
        let traps =
            crate::bare_traps::attach(pid, probes).map_err(|e| format!("{ATTACH_FAILED}{e}"))?;
        let (out, err, status) = release(&mut bench, &lines)?;
        drop(traps);
        parse_ns_per_op(&out).ok_or_else(|| failure("no ns_per_op line", status.as_deref(), &err))
    })();
    let _ = bench.kill();
    let _ = bench.wait();
    result.map(|ns_per_op| Sample {
        ns_per_op,
        memscope: None,
    })
}

/// SIGINT (tools print and detach on it), SIGKILL after 10 s.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

type Collected = (Vec<String>, Vec<String>, Option<String>);

/// Waits for the child's exit (killing it after `timeout`) and returns its
/// stdout and stderr lines and, when it failed, its exit status.
fn collect_until_exit(
    child: &mut Child,
    lines: &Receiver<Line>,
    timeout: Duration,
) -> Result<Collected, String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut err = Vec::new();
    // the readers end at EOF, after the exit (or when a grandchild lets go)
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Line::Out(l)) => out.push(l),
            Ok(Line::Err(l)) => err.push(l),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failure(
                    &format!("no exit in {} s", timeout.as_secs()),
                    None,
                    &err,
                ));
            }
        }
    }
    let status = child.wait().map_err(|e| format!("cannot wait: {e}"))?;
    let failed = (!status.success()).then(|| status.to_string());
    Ok((out, err, failed))
}

fn drain(lines: &Receiver<Line>, out: &mut Vec<String>, err: &mut Vec<String>) {
    while let Ok(line) = lines.try_recv() {
        match line {
            Line::Out(l) => out.push(l),
            Line::Err(l) => err.push(l),
        }
    }
}

fn drain_all(lines: &Receiver<Line>, into: &mut Vec<String>) {
    while let Ok(Line::Out(l) | Line::Err(l)) = lines.try_recv() {
        into.push(l);
    }
}

/// A failure message with the last meaningful lines the program printed.
pub(crate) fn failure(what: &str, status: Option<&str>, said: &[String]) -> String {
    let mut message = what.to_owned();
    if let Some(status) = status {
        let _ = write!(message, " ({status})");
    }
    let tail: Vec<&str> = said
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.contains("RLIMIT_MEMLOCK"))
        .collect();
    let tail = &tail[tail.len().saturating_sub(3)..];
    if !tail.is_empty() {
        let _ = write!(message, ": {}", tail.join(" | "));
    }
    message
}

fn last_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("failed")
        .to_owned()
}

/// The bench's `ns_per_op=123.4 ops=...` line, wherever it is in the output
/// (memscope prints its table after it).
pub(crate) fn parse_ns_per_op(lines: &[String]) -> Option<f64> {
    lines.iter().find_map(|line| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("ns_per_op="))
            .and_then(|v| v.parse().ok())
    })
}

fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// (state, utime, stime) from /proc/PID/stat, whose second field may hold
/// spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(char, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime 15
    let state = fields.first()?.chars().next()?;
    Some((
        state,
        fields.get(11)?.parse().ok()?,
        fields.get(12)?.parse().ok()?,
    ))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t: &f64| t > 0.0)
        .unwrap_or(100.0)
}

// --------------------------------------------------------------- results

pub(crate) fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    Some(if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    })
}

/// Median of each memscope figure on its own.
fn memscope_median(stats: &[ProcStats]) -> Option<ProcStats> {
    let pick = |f: fn(&ProcStats) -> f64| median(&stats.iter().map(f).collect::<Vec<_>>());
    Some(ProcStats {
        peak_rss_kib: pick(|s| s.peak_rss_kib as f64)? as u64,
        user_s: pick(|s| s.user_s)?,
        sys_s: pick(|s| s.sys_s)?,
        wall_s: pick(|s| s.wall_s)?,
    })
}

fn tool_version(program: &Path, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

fn dpkg_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn results_json(ctx: &Context, cells: &[Vec<Cell>], elapsed: Duration) -> Value {
    let tools = ctx.tools;
    let tool_info = |tool: Tool| -> Value {
        match tool {
            Tool::Untraced => json!({"available": true}),
            Tool::Memscope => json!({
                "available": true,
                "path": ctx.memscope.display().to_string(),
                "version": tool_version(ctx.memscope, "--version"),
                "command": "memscope run -o DIR -- allocbench WORKLOAD OPS",
            }),
            Tool::MemscopeSampled => json!({
                "available": true,
                "command": format!("memscope run -o DIR --stack-sample {SAMPLE_GAP} -- allocbench WORKLOAD OPS"),
            }),
            Tool::MemscopeEmpty => json!({
                "available": true,
                "command": "memscope run -o DIR --empty-programs -- allocbench WORKLOAD OPS",
                "what": "memscope's probes and links with programs that record nothing: \
                         memscope minus this is what its programs cost",
            }),
            Tool::BareTraps => json!({
                "available": true,
                "command": "perf_event_open uprobes (no BPF program; not inherited: every thread traps, the first one's hits are counted) at the sites \
                            of memscope's report.json probes: an entry probe at entry_offset, a return \
                            probe at the same site where memscope has one (attached after the warm-up)",
            }),
            Tool::Bpftrace => match &tools.bpftrace {
                Ok(p) => json!({
                    "available": true,
                    "version": tool_version(p, "--version"),
                    "command": "bpftrace -p PID floor.bt PID (attached after the warm-up)",
                    "script": BPFTRACE_SCRIPT,
                }),
                Err(e) => json!({"available": false, "error": e}),
            },
            Tool::Memleak => match &tools.memleak {
                Ok(m) => json!({
                    "available": true,
                    "flavor": m.flavor,
                    "path": m.program.display().to_string(),
                    "version": dpkg_version(if m.flavor == "bcc" { "bpfcc-tools" } else { "libbpf-tools" }),
                    "command": format!("{} -p PID 3600 (attached after the warm-up)", m.program.display()),
                    "bcc_kernel_source": m.kernel_source.as_ref().map(|p| p.display().to_string()),
                }),
                Err(e) => json!({"available": false, "error": e}),
            },
            Tool::Heaptrack => match &tools.heaptrack {
                Ok(p) => json!({
                    "available": true,
                    "version": tool_version(p, "--version"),
                    "command": "heaptrack -o TMP allocbench WORKLOAD OPS",
                }),
                Err(e) => json!({"available": false, "error": e}),
            },
        }
    };
    let tools_json: serde_json::Map<String, Value> = TOOLS
        .iter()
        .map(|&t| (t.key().to_owned(), tool_info(t)))
        .collect();

    let workloads: Vec<Value> = WORKLOADS
        .iter()
        .enumerate()
        .map(|(w, &(name, ops, what))| {
            let untraced = median(&cells[w][tool_index(Tool::Untraced)].ns_per_op);
            let bare = median(&cells[w][tool_index(Tool::BareTraps)].ns_per_op);
            let results: Vec<Value> = TOOLS
                .iter()
                .map(|&tool| {
                    let cell = &cells[w][tool_index(tool)];
                    let ns = median(&cell.ns_per_op);
                    let ratio = ns.zip(untraced).map(|(n, u)| n / u);
                    let mut entry = json!({
                        "tool": tool.key(),
                        "ns_per_op": ns.map(round1),
                        "ratio_to_untraced": ratio.map(round2),
                        "ratio_to_bare_traps": ns.zip(bare).map(|(n, b)| round2(n / b)),
                        "samples_ns_per_op": cell.ns_per_op.iter().copied().map(round1).collect::<Vec<_>>(),
                        "errors": cell.errors,
                        "attach_retries": cell.retried,
                    });
                    if let Some(reason) = tools.unavailable(tool) {
                        entry["skipped"] = json!(reason);
                    } else if cell.ns_per_op.is_empty() && cell.errors.is_empty() {
                        entry["skipped"] = json!(GAVE_UP);
                    }
                    entry
                })
                .collect();
            let memscope = memscope_median(&cells[w][tool_index(Tool::Memscope)].memscope).map(|s| {
                json!({
                    "peak_rss_kib": s.peak_rss_kib,
                    "cpu_user_s": round3(s.user_s),
                    "cpu_sys_s": round3(s.sys_s),
                    "cpu_s": round3(s.user_s + s.sys_s),
                    "wall_s": round3(s.wall_s),
                })
            });
            json!({
                "workload": name,
                "description": what,
                "ops": ops,
                "results": results,
                "memscope_programs_ns_per_op": programs_ns(&cells[w]).map(round1),
                "memscope_process": memscope,
            })
        })
        .collect();

    json!({
        "schema": "memscope.bench/1",
        "note": "ns_per_op is the bench's own figure for its timed loop (median of the rounds); \
                 ratio_to_untraced divides it by the untraced median of the same run, \
                 ratio_to_bare_traps by the bare traps' (the trap limit at memscope's sites). \
                 memscope_process is memscope's own process (not the target): peak RSS (VmHWM) \
                 and CPU time, medians.",
        "machine": {
            "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).ok(),
            "cpus": thread::available_parallelism().map(|n| n.get()).ok(),
            "gcc_flags": "-O2 -fno-omit-frame-pointer -fno-builtin-malloc -pthread",
        },
        "rounds": REPS,
        "elapsed_s": round1(elapsed.as_secs_f64()),
        "tools": tools_json,
        "notes": tools.notes,
        "workloads": workloads,
    })
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What memscope's programs cost a workload's op: memscope less its
/// probes with empty programs.
fn programs_ns(cells: &[Cell]) -> Option<f64> {
    let ns = |tool| median(&cells[tool_index(tool)].ns_per_op);
    ns(Tool::Memscope)
        .zip(ns(Tool::MemscopeEmpty))
        .map(|(full, empty)| full - empty)
}

fn render_table(tools: &Tools, cells: &[Vec<Cell>], shown: &[Tool]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{:<8} {:<18} {:>10} {:>11} {:>7}  note",
        "WORKLOAD", "TOOL", "NS/OP", "x UNTRACED", "x BARE"
    );
    for (w, &(name, _, _)) in WORKLOADS.iter().enumerate() {
        let untraced = median(&cells[w][tool_index(Tool::Untraced)].ns_per_op);
        let bare = median(&cells[w][tool_index(Tool::BareTraps)].ns_per_op);
        for &tool in shown {
            let cell = &cells[w][tool_index(tool)];
            let ns = median(&cell.ns_per_op);
            let ratio = ns.zip(untraced).map(|(n, u)| n / u);
            let note = if let Some(reason) = tools.unavailable(tool) {
                format!("skipped: {reason}")
            } else if let Some(error) = cell.errors.first() {
                format!(
                    "{} of {} runs failed: {}",
                    cell.errors.len(),
                    cell.errors.len() + cell.ns_per_op.len(),
                    truncate(error, 120)
                )
            } else if cell.ns_per_op.is_empty() {
                format!("skipped: {GAVE_UP}")
            } else if !cell.retried.is_empty() {
                format!(
                    "attach retried {}x: {}",
                    cell.retried.len(),
                    truncate(&cell.retried[0], 100)
                )
            } else {
                String::new()
            };
            let to_bare = ns.zip(bare).filter(|_| tool != Tool::Untraced);
            let _ = writeln!(
                s,
                "{:<8} {:<18} {:>10} {:>11} {:>7}  {}",
                name,
                tool.name(),
                ns.map_or("-".to_owned(), |n| format!("{n:.1}")),
                ratio.map_or("-".to_owned(), |r| format!("{r:.2}")),
                to_bare.map_or("-".to_owned(), |(n, b)| format!("{:.2}", n / b)),
                note
            );
        }
    }
    if shown.contains(&Tool::MemscopeEmpty) {
        let _ = writeln!(
            s,
            "\nmemscope's programs, ns/op (memscope less \"memscope, empty\": its probes with programs that record nothing)"
        );
        for (w, &(name, _, _)) in WORKLOADS.iter().enumerate() {
            if let Some(ns) = programs_ns(&cells[w]) {
                let _ = writeln!(s, "{name:<8} {ns:>8.1}");
            }
        }
    }
    let _ = writeln!(
        s,
        "\nmemscope's own process (medians): peak RSS, CPU user+sys, wall (start to report)"
    );
    for (w, &(name, _, _)) in WORKLOADS.iter().enumerate() {
        if let Some(m) = memscope_median(&cells[w][tool_index(Tool::Memscope)].memscope) {
            let _ = writeln!(
                s,
                "{:<8} {:>8.1} MiB {:>8.2} s ({:.2} user + {:.2} sys) {:>7.2} s",
                name,
                m.peak_rss_kib as f64 / 1024.0,
                m.user_s + m.sys_s,
                m.user_s,
                m.sys_s,
                m.wall_s
            );
        }
    }
    s
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        text.chars().take(max).collect::<String>() + "…"
    }
}
