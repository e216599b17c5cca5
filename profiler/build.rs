//! Builds the BPF programs (profiler-ebpf) with aya-build and leaves the
//! object in OUT_DIR, where `src/bpf_object.rs` embeds it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("profiler/ has no parent directory")?;
    let ebpf_dir = workspace.join("profiler-ebpf");
    add_local_tools_to_path(workspace)?;
    // profiler-ebpf is its own workspace (it targets bpfel with nightly), and
    // aya-build runs cargo in the current directory.
    std::env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("cannot enter {}", ebpf_dir.display()))?;
    let ebpf_dir_str = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to profiler-ebpf")?;
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("profiler-common").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: ebpf_dir_str,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the BPF programs failed; run `cargo xtask setup` to install bpf-linker and rust-src")
}

/// `cargo xtask setup` installs bpf-linker under target/tools so that no
/// global install is needed; put it on PATH for aya-build's cargo.
fn add_local_tools_to_path(workspace: &Path) -> Result<()> {
    let tools = workspace.join("target/tools/bin");
    println!("cargo:rerun-if-changed={}", tools.display());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools];
    dirs.extend(std::env::split_paths(&path));
    let joined = std::env::join_paths(dirs)?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PATH", joined) };
    Ok(())
}
