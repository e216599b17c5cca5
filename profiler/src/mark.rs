//! `memscope mark`: finds the running memscope sessions and asks each to
//! close its current window (SIGUSR2).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("no memscope session is running (start one with `memscope run` or `memscope attach`)")]
    NoSession,
    #[error("pid {0} is not a running memscope session (see `pgrep -a memscope`)")]
    NotASession(u32),
    #[error(
        "cannot signal memscope (pid {pid}): {source}; run as the user who started it, or as root"
    )]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The subcommands that profile: the processes a mark is for.
const SESSION_COMMANDS: &[&str] = &["run", "attach"];

/// Signals `pid`, or every session when None; returns the ones marked.
pub fn mark_sessions(pid: Option<u32>) -> Result<Vec<u32>, MarkError> {
    let sessions = running_sessions();
    let targets = match pid {
        Some(pid) if sessions.contains(&pid) => vec![pid],
        Some(pid) => return Err(MarkError::NotASession(pid)),
        None if sessions.is_empty() => return Err(MarkError::NoSession),
        None => sessions,
    };
    for &pid in &targets {
        // SAFETY: plain syscall.
        if unsafe { libc::kill(pid as i32, libc::SIGUSR2) } != 0 {
            return Err(MarkError::Signal {
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(targets)
}

/// memscope processes (this executable) running `run` or `attach`.
fn running_sessions() -> Vec<u32> {
    let Ok(own_exe) = std::env::current_exe() else {
        return Vec::new();
    };
    let own_pid = std::process::id();
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter(|p| p.pid as u32 != own_pid)
        .filter(|p| same_name(p, &own_exe))
        .filter(|p| {
            p.cmdline()
                .ok()
                .and_then(|args| subcommand(&args).map(|c| SESSION_COMMANDS.contains(&c)))
                .unwrap_or(false)
        })
        .map(|p| p.pid as u32)
        .collect()
}

/// Whether `process` runs an executable named as this one: another build
/// of memscope (a release binary beside a debug one) is a session too.
fn same_name(process: &procfs::process::Process, own_exe: &Path) -> bool {
    process
        .exe()
        .is_ok_and(|exe| exe.file_name().is_some() && exe.file_name() == own_exe.file_name())
}

/// The first argument that is not an option: memscope's subcommand.
fn subcommand(args: &[String]) -> Option<&str> {
    args.iter()
        .skip(1)
        .map(String::as_str)
        .find(|a| !a.starts_with('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subcommand_is_the_first_word_after_options() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            subcommand(&args(&["memscope", "-vv", "attach", "42"])),
            Some("attach")
        );
        assert_eq!(subcommand(&args(&["memscope", "mark"])), Some("mark"));
        assert_eq!(subcommand(&args(&["memscope"])), None);
    }
}
