//! Checks made before anything is loaded, so a missing privilege or kernel
//! feature gets one clear line instead of a failure deep in attach.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("memscope needs root to load BPF programs and attach uprobes; run it with sudo")]
    NotPermitted,
    #[error(
        "uprobes are not available: {0} is missing (the kernel needs CONFIG_UPROBE_EVENTS and perf events)"
    )]
    NoUprobes(String),
}

const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";

/// Root. Capabilities alone (CAP_BPF, CAP_PERFMON) are not enough here:
/// tracefs, which the tracepoints need, is root-only on common setups.
pub fn check_privileges() -> Result<(), PreflightError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
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
