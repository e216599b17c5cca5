//! Command-line arguments.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use memscope::unwind::UnwindMode;
use memscope::{
    bpf::MapCapacity,
    holds,
    session::{FollowMode, TargetSpec},
    units::{parse_duration, parse_size},
};
use profiler_common::{DEFAULT_MAX_LIVE, DEFAULT_MAX_STACKS, DEFAULT_UNWIND_ROWS};

#[derive(Debug, Parser)]
#[command(
    name = "memscope",
    version,
    about = "eBPF allocation profiler and leak detector: which call stacks hold memory, with no restart and no code change",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage (or --max-live/--max-stacks too large for the \
                  memory available), 3 not permitted (run as root), 4 no such process (or a zombie), \
                  5 BPF or uprobes unavailable, 6 command not found or not executable, 7 unsupported \
                  target (a kernel thread, pid 1 with its children, memscope itself), 8 cannot write output. \
                  `memscope check`: 0 pass, 1 fail, 2 memscope could not run"
)]
pub struct Cli {
    /// More logging on stderr (-v: probe sites, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a command with probes attached before its first instruction and
    /// profile it until it exits (or Ctrl-C, or --duration).
    Run {
        #[command(flatten)]
        profile: ProfileArgs,
        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Profile a running process from now on, until Ctrl-C, --duration or its exit.
    Attach {
        #[command(flatten)]
        profile: ProfileArgs,
        /// Process id of the target.
        pid: u32,
    },
    /// Run a command under memscope and pass or fail it on its memory: a
    /// leak-regression gate for CI (docs/ci.md). Exit 0 pass, 1 a leak,
    /// a regression or a threshold exceeded, 2 memscope could not run.
    Check {
        #[command(flatten)]
        profile: ProfileArgs,
        #[command(flatten)]
        gate: GateArgs,
        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Close the current window of running memscope sessions now (a load
    /// script cuts windows at its own boundaries); the same as SIGUSR2 to
    /// memscope.
    Mark {
        /// The memscope session to mark [default: every one running].
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
    },
    /// Internal: the watchdog memscope starts (see `memscope::watchdog`).
    #[command(name = "__watchdog", hide = true)]
    Watchdog {
        map_id: u32,
        memscope_pid: u32,
        budget_ns: u64,
    },
    /// Show a saved report.json again (no root needed); with -o, also
    /// render its flamegraphs, folded stacks and pprof profile into DIR.
    Report {
        /// A report.json, or the directory holding it.
        path: PathBuf,
        /// Write the flamegraphs, stacks.folded and profile.pb.gz (and a copy
        /// of report.json) here.
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
        /// Print the JSON instead of the table (`--format json`).
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// What goes to stdout.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Sites shown in the table.
        #[arg(long, default_value_t = 10, value_name = "N")]
        top: usize,
    },
    /// Compare two saved profiles (no root needed): the sites that changed
    /// most, matched by function chain so two builds compare, and with -o
    /// a differential flamegraph (red grew, blue shrank).
    Diff {
        /// The earlier profile: an output directory or its report.json.
        base: PathBuf,
        /// The later profile.
        new: PathBuf,
        /// Write the differential flamegraph here (an .svg file).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Which figure of each site to compare.
        #[arg(long, value_enum, default_value_t = DiffMetric::Live)]
        metric: DiffMetric,
        /// What goes to stdout: the table, or the comparison as JSON.
        #[arg(long, value_enum, default_value_t = DiffFormat::Table)]
        format: DiffFormat,
        /// Sites shown in the table.
        #[arg(long, default_value_t = 10, value_name = "N")]
        top: usize,
    },
}

/// `memscope diff --metric`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffMetric {
    /// Bytes live at the end (inuse.svg's figure).
    Live,
    /// Bytes that became live during the profile and stayed (growth.svg's).
    Growth,
    /// Bytes allocated, freed or not (alloc.svg's).
    Alloc,
    /// Allocation calls.
    Allocs,
}

impl From<DiffMetric> for memscope::diff::Metric {
    fn from(metric: DiffMetric) -> Self {
        match metric {
            DiffMetric::Live => Self::Live,
            DiffMetric::Growth => Self::Growth,
            DiffMetric::Alloc => Self::Alloc,
            DiffMetric::Allocs => Self::Allocs,
        }
    }
}

/// `memscope diff --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    Table,
    Json,
}

/// What goes to stdout at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The table of sites and figures.
    Table,
    /// report.json.
    Json,
    /// stacks.folded: live bytes per stack, root first.
    Folded,
    /// profile.pb.gz's bytes (redirect them to a file).
    Pprof,
}

impl Format {
    /// `--json` is `--format json`.
    pub fn with_json(self, json: bool) -> Self {
        if json { Self::Json } else { self }
    }
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Directory for report.json, inuse.svg and stacks.folded
    /// [default: memscope-<pid>-<timestamp>].
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Stop after this long (500ms, 30s, 5m, 1h).
    #[arg(short, long, value_parser = parse_duration, value_name = "DUR")]
    pub duration: Option<Duration>,
    /// Print report.json to stdout instead of the table (`--format json`).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// What goes to stdout at the end.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Length of a window: what each one allocated, freed and kept is in
    /// report.json's `windows` (`memscope mark` closes one early)
    /// [default: 10s; 25ms with check, doubling as the run grows].
    #[arg(short, long, value_parser = parse_duration, value_name = "DUR")]
    pub window: Option<Duration>,
    /// Sites shown in the table.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub top: usize,
    /// Live allocations tracked at once (kernel memory: a 4 MiB table at
    /// load for the first 64K heap blocks, then 128 bytes each, taken as the
    /// live set grows).
    #[arg(long, default_value_t = DEFAULT_MAX_LIVE, value_name = "N")]
    pub max_live: u32,
    /// Profile only the given process, not the children it forks.
    #[arg(long)]
    pub no_children: bool,
    /// Give each process (master, workers) its own site list in report.json.
    #[arg(long)]
    pub per_process: bool,
    /// Native stacks only in CPython processes: no walk of the
    /// interpreter's frames at each recorded allocation (docs/python.md).
    #[arg(long)]
    pub no_python_frames: bool,
    /// Count CPython's small objects one by one, not by pymalloc arena:
    /// with `run`, the command runs with PYTHONMALLOC=malloc (exact on
    /// every build; malloc's speed and layout instead of pymalloc's). For
    /// CI and tests, not a busy production worker (docs/python.md).
    #[arg(long, conflicts_with = "no_python_frames")]
    pub python_objects: bool,
    /// Where the allocator probes go. `process`: on each followed process
    /// (nothing else traps; each fork costs a ~3 ms hold while its probes go
    /// on). `image`: once on the allocator's file for every process that
    /// maps it, counted only for the followed ones (forks cost no attach,
    /// but every process on the host using that allocator traps on each
    /// call: for dedicated hosts, CI and containers).
    #[arg(long, value_enum, default_value_t = Follow::Process, value_name = "MODE")]
    pub follow: Follow,
    /// Follow requests of this handler: each call on a thread is one
    /// request, and report.json's `requests` gives what each allocated,
    /// still held at its return (retained) and --keep-after requests later
    /// (kept). A native function (`handle_request`, `libfoo.so:handle`)
    /// or a Python one (`app:analyze`, `analyze`).
    #[arg(long, value_name = "[MODULE:]FUNCTION")]
    pub request_fn: Option<memscope::requests::RequestFn>,
    /// A request's kept bytes are what it still holds when this many more
    /// requests of its process have returned (1-64).
    #[arg(long, default_value_t = memscope::requests::DEFAULT_KEEP_AFTER,
          value_parser = clap::value_parser!(u32).range(1..=64), value_name = "N")]
    pub keep_after: u32,
    /// Alert when a window grows the live bytes by more than this (4096,
    /// 64KB, 50MB, 1GB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub alert_growth: Option<u64>,
    /// RSS alert levels, percent of the memory limit: warning, critical,
    /// emergency.
    #[arg(long, value_parser = parse_levels, default_value = "60,75,85", value_name = "W,C,E")]
    pub alert_rss: memscope::alert::RssLevels,
    /// The memory limit RSS levels are shares of [default: the target's
    /// cgroup memory.max, else the host's MemTotal].
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub memory_limit: Option<u64>,
    /// POST each alert's JSON to this http:// URL (timeouts, 3 tries, never
    /// holding collection up).
    #[arg(long, value_name = "URL")]
    pub alert_webhook: Option<String>,
    /// Run `sh -c CMD` for each alert, with its JSON on standard input.
    #[arg(long, value_name = "CMD")]
    pub alert_exec: Option<String>,
    /// Send each window's profile, as it closes, to this Grafana Pyroscope
    /// server (http://HOST:PORT, or its /ingest URL), named
    /// `memscope.PROGRAM{pid=PID}`.
    #[arg(long, value_name = "URL")]
    pub pprof_push: Option<String>,
    /// Distinct call stacks recorded (kernel memory: about 1.8 KiB each: the
    /// trace, and room for 8 processes' totals of it).
    #[arg(long, default_value_t = DEFAULT_MAX_STACKS, value_name = "N")]
    pub max_stacks: u32,
    /// How user stacks are walked: `auto` by each object's .eh_frame rules
    /// (frame pointers where it is built with them), `fp` by frame
    /// pointers only (docs/design.md#unwinding).
    #[arg(long, value_enum, default_value_t = UnwindMode::Auto)]
    pub unwind: UnwindMode,
    /// Unwind rules loaded into the kernel, for every object unwound (8
    /// bytes each, preallocated: libc takes about 28K).
    #[arg(long, default_value_t = DEFAULT_UNWIND_ROWS, value_name = "N")]
    pub unwind_rows: u32,
    /// Longest a process stays stopped for memscope (a fork until its
    /// probes are on, an exec, a started command's exit) before it is let
    /// go, probed or not (10ms-10s) [default: 50ms with attach, 1s with run
    /// and check].
    #[arg(long, value_parser = parse_hold_budget, value_name = "DUR")]
    pub hold_budget: Option<Duration>,
    /// Walk the stacks of a byte sample of heap blocks only, one every SIZE
    /// allocated on average (512KB): cheaper per allocation; totals stay
    /// exact, each site's figures are estimates with a 95% error in
    /// report.json (docs/usage.md#sampling).
    #[arg(long, value_parser = parse_stack_sample, value_name = "SIZE")]
    pub stack_sample: Option<u64>,
    /// Threads' call slots in the kernel: fewer send threads' calls to the
    /// hash map kept for threads whose slot is taken (for its tests).
    #[arg(long, hide = true, default_value_t = profiler_common::CALL_SLOTS_LEN,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(profiler_common::CALL_SLOTS_LEN)))]
    pub call_slots: u32,
    /// The front table's buckets at most (a power of two): fewer send
    /// blocks whose bucket is full to the live hash map (for its tests).
    #[arg(long, hide = true, default_value_t = profiler_common::FRONT_BUCKETS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(profiler_common::FRONT_BUCKETS)))]
    pub front_buckets: u32,
    /// Allocator probes whose programs record nothing: what the probes
    /// alone cost the target, for `cargo xtask bench`.
    #[arg(long, hide = true)]
    pub empty_programs: bool,
}

/// What `memscope check` fails on, besides a leak.
#[derive(Debug, Args)]
pub struct GateArgs {
    /// Fail when more than this is still live at the exit, every site
    /// summed (heaptrack's "leaked").
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_leaked: Option<u64>,
    /// Fail when one window grows the live bytes by more than this; with
    /// --request-fn, when one request still holds more at its return.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_growth: Option<u64>,
    /// Fail when the processes' RSS, summed, passes this at a window's end.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_rss: Option<u64>,
    /// Leave out what the first DUR allocated (startup, imports).
    #[arg(long, value_parser = parse_duration, value_name = "DUR")]
    pub warmup: Option<Duration>,
    /// Write what each site leaked in this run, by function chain, to FILE.
    #[arg(long, value_name = "FILE")]
    pub save_baseline: Option<PathBuf>,
    /// Compare with a baseline: fail on a site that is new or leaks more
    /// than the baseline plus --tolerance (instead of on every leak).
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// How much more than its baseline a site may leak: a percentage
    /// (at least 4 KiB) or a size.
    #[arg(long, default_value = "10%", value_name = "PCT|SIZE")]
    pub tolerance: memscope::gate::Tolerance,
    /// Sites to accept: one function, file or `inner <- outer` pattern per
    /// line (`*`, `?`; `leak:` prefix allowed; `#` comments).
    #[arg(long, value_name = "FILE")]
    pub suppress: Option<PathBuf>,
    /// Write the checks as JUnit XML to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Follow {
    Process,
    Image,
}

impl ProfileArgs {
    pub fn follow_mode(&self) -> FollowMode {
        match self.follow {
            Follow::Process => FollowMode::Process,
            Follow::Image => FollowMode::Image,
        }
    }

    /// `--hold-budget`, else what suits the target: a live service's
    /// processes must not wait on memscope, a started command's may.
    pub fn hold_budget(&self, spec: &TargetSpec) -> Duration {
        self.hold_budget.unwrap_or(match spec {
            TargetSpec::Attach(_) => holds::ATTACH_HOLD_BUDGET,
            TargetSpec::Run(_) => holds::RUN_HOLD_BUDGET,
        })
    }

    pub fn capacity(&self) -> MapCapacity {
        MapCapacity {
            max_live: self.max_live,
            max_stacks: self.max_stacks,
            unwind_rows: self.unwind_rows,
            call_slots: self.call_slots,
            front_buckets: self.front_buckets,
        }
    }
}

/// A duration within `holds::HOLD_BUDGET_RANGE`.
fn parse_hold_budget(input: &str) -> Result<Duration, String> {
    let budget = parse_duration(input).map_err(|error| error.to_string())?;
    if holds::HOLD_BUDGET_RANGE.contains(&budget) {
        Ok(budget)
    } else {
        Err(format!(
            "hold budget {input:?} is out of range: give 10ms to 10s (a process waits this long at most)"
        ))
    }
}

/// A sampling gap the kernel side holds: 1 byte to 4 GiB.
fn parse_stack_sample(input: &str) -> Result<u64, String> {
    let bytes = parse_size(input).map_err(|error| error.to_string())?;
    if (1..=u64::from(u32::MAX)).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "stack sample {input:?} is out of range: give 1 byte to 4GB (512KB walks one stack every 512 KiB allocated)"
        ))
    }
}

/// `60,75,85`: three rising percentages.
fn parse_levels(input: &str) -> Result<memscope::alert::RssLevels, String> {
    let error =
        || format!("invalid levels {input:?}: expected three rising percentages, like 60,75,85");
    let levels: Vec<f64> = input
        .split(',')
        .map(|p| p.trim().trim_end_matches('%').parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| error())?;
    match levels[..] {
        [w, c, e] if 0.0 < w && w < c && c < e && e <= 100.0 => Ok(memscope::alert::RssLevels {
            warning: w / 100.0,
            critical: c / 100.0,
            emergency: e / 100.0,
        }),
        _ => Err(error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile_args(argv: &[&str]) -> ProfileArgs {
        let cli = Cli::try_parse_from(std::iter::once("memscope").chain(argv.iter().copied()))
            .expect("parses");
        match cli.command {
            Command::Run { profile, .. }
            | Command::Attach { profile, .. }
            | Command::Check { profile, .. } => profile,
            other => panic!("not a profiling command: {other:?}"),
        }
    }

    #[test]
    fn the_hold_budget_suits_the_target_unless_given() {
        let attach = TargetSpec::Attach(1);
        let run = TargetSpec::Run(vec!["true".into()]);
        let args = profile_args(&["attach", "1"]);
        assert_eq!(args.hold_budget(&attach), Duration::from_millis(50));
        let args = profile_args(&["check", "--", "true"]);
        assert_eq!(args.hold_budget(&run), Duration::from_secs(1));
        let args = profile_args(&["attach", "--hold-budget", "200ms", "1"]);
        assert_eq!(args.hold_budget(&attach), Duration::from_millis(200));
        for outside in ["5ms", "11s"] {
            let error =
                Cli::try_parse_from(["memscope", "run", "--hold-budget", outside, "--", "true"])
                    .expect_err(outside);
            assert!(error.to_string().contains("out of range"), "{error}");
        }
    }
}
