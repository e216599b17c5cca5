//! Checks made before anything is loaded, so a missing privilege or kernel
//! feature gets one clear line instead of a failure deep in attach.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "memscope needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE) to load BPF programs; run it with sudo"
    )]
    NotPermitted,
    #[error(
        "uprobes are not available: {0} is missing (the kernel needs CONFIG_UPROBE_EVENTS and perf events)"
    )]
    NoUprobes(String),
}

const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Root, or the capabilities BPF tracing needs.
pub fn check_privileges() -> Result<(), PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_capabilities(&status))
        .unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let can_bpf = has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON));
    if can_bpf && has(CAP_SYS_PTRACE) {
        Ok(())
    } else {
        Err(PreflightError::NotPermitted)
    }
}

/// The kernel's uprobe PMU, which aya attaches through.
pub fn check_uprobes() -> Result<(), PreflightError> {
    if Path::new(UPROBE_PMU).exists() {
        Ok(())
    } else {
        Err(PreflightError::NoUprobes(UPROBE_PMU.into()))
    }
}

fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name:\tx\n"), None);
    }
}
