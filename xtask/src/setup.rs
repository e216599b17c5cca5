//! `cargo xtask setup`: everything a fresh machine lacks to build and test
//! memscope, installed locally and idempotently.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// bpf-linker release known to build here (TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
const TRACEFS: &str = "/sys/kernel/tracing";
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
/// The interpreter of examples/flask-service's virtualenv (its harness.rs).
const PYTHON: &str = "/usr/bin/python3.11";

pub fn run(root: &Path) -> Result<()> {
    let mut did = Vec::new();
    if ensure_rust_src()? {
        did.push("added rust-src to the nightly toolchain");
    }
    if ensure_bpf_linker(root)? {
        did.push("installed bpf-linker into target/tools");
    }
    if ensure_tracefs() {
        did.push("mounted tracefs at /sys/kernel/tracing");
    }
    if ensure_gcc()? {
        did.push("installed gcc (fixtures and examples are C)");
    }
    if ensure_jemalloc()? {
        did.push("installed libjemalloc2 (a test preloads it)");
    }
    if ensure_go()? {
        did.push("installed golang-go (tests read profile.pb.gz with go tool pprof)");
    }
    if ensure_program("g++", &["g++"])? {
        did.push("installed g++ (a fixture is C++)");
    }
    if ensure_package("libc6-dbg")? {
        did.push("installed libc6-dbg (tests name libc's own functions from its debug symbols)");
    }
    if ensure_program("redis-benchmark", &["redis-server", "redis-tools"])? {
        did.push("installed redis-server and redis-tools (a test unwinds Debian's redis-server)");
    }
    if ensure_python_venv()? {
        did.push("installed python3.11 and python3-venv (the Flask example's virtualenv)");
    }
    if did.is_empty() {
        eprintln!(
            "xtask setup: nothing to do (rust-src, bpf-linker, tracefs, gcc, g++, libc6-dbg, libjemalloc2, go, redis, python3-venv present)"
        );
    } else {
        for line in did {
            eprintln!("xtask setup: {line}");
        }
    }
    Ok(())
}

/// PATH with target/tools/bin first, where bpf-linker is installed.
pub fn path_with_tools(root: &Path) -> Result<OsString> {
    let mut dirs = vec![tools_dir(root).join("bin")];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    Ok(std::env::join_paths(dirs)?)
}

fn tools_dir(root: &Path) -> PathBuf {
    root.join("target/tools")
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<bool> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is needed to build the BPF programs")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(false);
    }
    crate::run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok(true)
}

fn ensure_bpf_linker(root: &Path) -> Result<bool> {
    let bin = tools_dir(root).join("bin/bpf-linker");
    if bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(false);
    }
    eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    match install_bpf_linker_with_rust_llvm(root) {
        Ok(()) => Ok(true),
        Err(error) => {
            eprintln!(
                "xtask setup: linking against nightly's LLVM failed ({error:#}); trying Debian's LLVM 22"
            );
            install_bpf_linker_with_debian_llvm(root)?;
            Ok(true)
        }
    }
}

/// Recipe A: link bpf-linker against the nightly toolchain's own LLVM,
/// whose library name is read from the sysroot rather than hard-coded.
fn install_bpf_linker_with_rust_llvm(root: &Path) -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM") && name.ends_with(".so"))
        .min()
        .context("no libLLVM*.so in the nightly sysroot")?;
    let llvm = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_owned();
    let rustflags = format!(
        "-L {lib} -l dylib={llvm} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib.display()
    );
    crate::run_command(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                "llvm-22,no-llvm-linking",
                "--root",
            ])
            .arg(tools_dir(root))
            .env("RUSTFLAGS", rustflags),
    )
}

/// Recipe B: Debian's LLVM 22 development packages.
fn install_bpf_linker_with_debian_llvm(root: &Path) -> Result<()> {
    let packages = [
        "llvm-22-dev",
        "libpolly-22-dev",
        "zlib1g-dev",
        "libzstd-dev",
    ];
    apt_install(&packages)?;
    crate::run_command(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--root"])
            .arg(tools_dir(root))
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if install().is_ok_and(|s| s.success()) {
        return Ok(());
    }
    crate::run_command(Command::new("apt-get").arg("update"))?;
    crate::run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Syscall and sched tracepoints are found through tracefs.
fn ensure_tracefs() -> bool {
    if Path::new(TRACEFS).join("events").exists() {
        return false;
    }
    let mounted = Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "xtask setup: could not mount tracefs at {TRACEFS} (needs root); tracepoint features will be unavailable"
        );
    }
    mounted
}

fn ensure_jemalloc() -> Result<bool> {
    if Path::new(JEMALLOC).exists() {
        return Ok(false);
    }
    apt_install(&["libjemalloc2"])?;
    Ok(true)
}

/// Installs a Debian package unless it is installed.
fn ensure_package(package: &str) -> Result<bool> {
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output();
    if status.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed")) {
        return Ok(false);
    }
    apt_install(&[package])?;
    Ok(true)
}

/// Installs `packages` unless `program` is on PATH.
fn ensure_program(program: &str, packages: &[&str]) -> Result<bool> {
    if Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(false);
    }
    apt_install(packages)?;
    Ok(true)
}

fn ensure_go() -> Result<bool> {
    if Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(false);
    }
    apt_install(&["golang-go"])?;
    Ok(true)
}

fn ensure_gcc() -> Result<bool> {
    if Command::new("gcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(false);
    }
    apt_install(&["gcc", "libc6-dev"])?;
    Ok(true)
}

/// `python3 -m venv` needs ensurepip, which Debian ships apart, in
/// python3-venv. The packages themselves come from PyPI when the Flask
/// demo or its test first runs.
fn ensure_python_venv() -> Result<bool> {
    if Command::new(PYTHON)
        .args(["-c", "import ensurepip, venv"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(false);
    }
    apt_install(&["python3.11", "python3-venv"])?;
    Ok(true)
}
