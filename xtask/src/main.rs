//! `cargo xtask`: every developer workflow of memscope in one place.
//!
//! - `setup`: nightly rust-src, bpf-linker under target/tools, tracefs.
//! - `build`: setup, then a release build of memscope.
//! - `test`: setup, then every test (real BPF: run as root).
//! - `demo [flask]`: build, then profile examples/leaky-server (or, with
//!   `flask`, examples/flask-service under gunicorn) and say where the
//!   report and flamegraph are.
//! - `bench`: build, then the allocation benchmark against other tools.

mod bare_traps;
mod bench;
mod demo;
mod fork_rate;
mod python_objects_rate;
mod python_rate;
mod request_rate;
mod setup;
mod unwind_cost;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "memscope developer workflows")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Release build of memscope (target/release/memscope).
    Build,
    /// Run all tests; BPF tests need root.
    Test {
        /// Extra arguments for `cargo test` (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Profile an example and show the result.
    Demo {
        /// leaky-server (`memscope run` on a C program) or flask (gunicorn
        /// workers, `memscope attach`).
        #[arg(value_enum, default_value_t)]
        example: demo::Example,
    },
    /// Benchmark memscope against the untraced program and other tools.
    Bench {
        /// Only the Python rows (frame walk, objects), into
        /// target/bench/python.json.
        #[arg(long)]
        python: bool,
        /// Only the request rows (`--request-fn`), into
        /// target/bench/requests.json.
        #[arg(long, conflicts_with = "python")]
        requests: bool,
        /// Only the unwinding rows (.eh_frame walk against frame pointers),
        /// into target/bench/unwind.json.
        #[arg(long, conflicts_with_all = ["python", "requests"])]
        unwind: bool,
        /// Only the allocation loops under memscope against the untraced
        /// program and the bare-trap limit, into target/bench/allocs.json.
        #[arg(long, conflicts_with_all = ["python", "requests", "unwind"])]
        allocs: bool,
    },
    /// cargo fmt --check and clippy with -D warnings.
    Lint,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.task {
        Task::Setup => setup::run(&root),
        Task::Build => {
            setup::run(&root)?;
            build_release(&root).map(|_| ())
        }
        Task::Test { args } => {
            setup::run(&root)?;
            cargo(&root, &["test", "--workspace"], &args)
        }
        Task::Demo { example } => {
            setup::run(&root)?;
            let memscope = build_release(&root)?;
            demo::run(&root, &memscope, example)
        }
        Task::Bench {
            python,
            requests,
            unwind,
            allocs,
        } => {
            setup::run(&root)?;
            let memscope = build_release(&root)?;
            if python {
                bench::run_python(&root, &memscope)
            } else if requests {
                bench::run_requests(&root, &memscope)
            } else if unwind {
                bench::run_unwind(&root, &memscope)
            } else {
                bench::run(&root, &memscope, allocs)
            }
        }
        Task::Lint => {
            setup::run(&root)?;
            cargo(&root, &["fmt", "--all", "--check"], &[])?;
            fmt_check_ebpf(&root)?;
            cargo(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
                &[],
            )
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Runs cargo in the workspace with target/tools/bin (bpf-linker) on PATH.
fn cargo(root: &Path, args: &[&str], extra: &[String]) -> Result<()> {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root).args(args);
    if !extra.is_empty() {
        command.arg("--").args(extra);
    }
    command.env("PATH", setup::path_with_tools(root)?);
    run_command(&mut command)
}

/// The kernel programs are outside the workspace (their own target and
/// nightly toolchain), so `cargo fmt --all` never sees them.
fn fmt_check_ebpf(root: &Path) -> Result<()> {
    run_command(
        Command::new("rustup")
            .current_dir(root.join("profiler-ebpf"))
            .args(["run", "nightly", "cargo", "fmt", "--check"]),
    )
    .context("profiler-ebpf is not formatted: run `cargo fmt` in profiler-ebpf/")
}

fn run_command(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn build_release(root: &Path) -> Result<PathBuf> {
    cargo(root, &["build", "--release", "--package", "memscope"], &[])?;
    Ok(target_dir(root).join("release/memscope"))
}

/// Where cargo builds: CARGO_TARGET_DIR (relative to the workspace) if set.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
