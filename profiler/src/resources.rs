//! Host resources a session needs beyond privileges: descriptors for the
//! probes' links, and kernel memory for the maps.

use crate::units::format_bytes;

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(
        "--max-live/--max-stacks would take up to {} of kernel memory but only {} is available: lower them",
        format_bytes(*reserved),
        format_bytes(*available)
    )]
    KernelMemory { reserved: u64, available: u64 },
    #[error("cannot read /proc/meminfo: {0}")]
    Meminfo(#[source] procfs::ProcError),
    #[error("/proc/meminfo has no MemAvailable line")]
    NoMemAvailable,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft
/// limit before and now. Each followed process keeps several BPF link
/// descriptors, and sudo leaves the soft limit at 1024. When it cannot be
/// raised, both figures are the limit as it stays (0 if it cannot even be
/// read); a probe that then fails to attach says why.
pub fn raise_nofile_limit() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::debug!(
            "cannot read RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        return (0, 0);
    }
    let before = limit.rlim_cur;
    // NB: the kernel refuses a soft limit above fs.nr_open, and an
    // unlimited hard limit is above it.
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        nr_open().unwrap_or(limit.rlim_max)
    } else {
        limit.rlim_max
    };
    if target <= before {
        return (before, before);
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::debug!(
            "cannot raise RLIMIT_NOFILE to {target}: {}",
            std::io::Error::last_os_error()
        );
        return (before, before);
    }
    (before, target)
}

fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Fails if maps reserving `reserved_bytes` would take more than half of
/// the host's MemAvailable: the kernel preallocates hash maps, and a load
/// that nearly succeeds leaves the host, and the target, short of memory.
pub fn check_kernel_memory(reserved_bytes: u64) -> Result<(), ResourceError> {
    use procfs::Current as _;
    let meminfo = procfs::Meminfo::current().map_err(ResourceError::Meminfo)?;
    // MemAvailable exists since Linux 3.14, long before memscope's 5.15.
    let available = meminfo.mem_available.ok_or(ResourceError::NoMemAvailable)?;
    check_reservation(reserved_bytes, available)
}

/// The decision of `check_kernel_memory`: at most half of what is available.
fn check_reservation(reserved: u64, available: u64) -> Result<(), ResourceError> {
    if reserved > available / 2 {
        Err(ResourceError::KernelMemory {
            reserved,
            available,
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_reservation_of_half_the_available_memory_is_allowed() {
        assert!(check_reservation(GIB, 2 * GIB).is_ok());
        assert!(check_reservation(0, 0).is_ok());
    }

    #[test]
    fn a_reservation_past_half_the_available_memory_is_refused() {
        let error = check_reservation(GIB + 1, 2 * GIB).expect_err("refused");
        assert!(
            matches!(
                error,
                ResourceError::KernelMemory {
                    reserved,
                    available
                } if (reserved, available) == (GIB + 1, 2 * GIB)
            ),
            "{error:?}"
        );
        assert_eq!(
            check_reservation(3 * GIB, 4 * GIB)
                .expect_err("refused")
                .to_string(),
            "--max-live/--max-stacks would take up to 3.0 GiB of kernel memory but only 4.0 GiB is available: lower them"
        );
    }

    #[test]
    fn meminfo_is_read_for_the_check() {
        assert!(check_kernel_memory(0).is_ok());
        let error = check_kernel_memory(u64::MAX).expect_err("more than any host has");
        assert!(
            matches!(error, ResourceError::KernelMemory { reserved: u64::MAX, available } if available > 0),
            "{error:?}"
        );
    }

    #[test]
    fn the_nofile_limit_ends_at_the_hard_limit() {
        let (before, now) = raise_nofile_limit();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a valid struct.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert!(now >= before, "{before} -> {now}");
        assert_eq!(limit.rlim_cur, now);
        if limit.rlim_max != libc::RLIM_INFINITY {
            assert_eq!(now, limit.rlim_max);
        }
        // A second call has nothing left to raise.
        assert_eq!(raise_nofile_limit(), (now, now));
    }
}
