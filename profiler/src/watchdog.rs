//! The watchdog: a small process of its own (`memscope __watchdog`) that
//! continues every process the kernel side holds stopped when memscope
//! cannot: when one is held past the budget (memscope busy or stopped), and
//! when memscope ends in any way, SIGKILL and panics included. It watches
//! memscope through a pidfd and a pipe on its stdin, and reads the `HELD`
//! map by id (see `holds`).
//!
//! NB: it ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C or a closed terminal
//! reaches the whole process group, and the watchdog must outlive memscope.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use aya::maps::MapData;

use crate::{
    holds::{Holds, monotonic_ns},
    target,
};

/// The hidden subcommand that runs the watchdog.
pub const SUBCOMMAND: &str = "__watchdog";
/// How often held processes are checked against the budget.
const SWEEP: Duration = Duration::from_millis(10);
const READY: &str = "ready";

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("cannot start memscope's watchdog process ({exe}): {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memscope's watchdog did not start: {0}")]
    NotReady(String),
    #[error("cannot open BPF map {id} in the watchdog: {source}")]
    Map {
        id: u32,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the watchdog cannot watch pid {pid}: {source}")]
    Watch {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// memscope's handle on its watchdog. Dropping it (or memscope's death)
/// tells the watchdog to finish: it continues whatever is still held once
/// memscope has exited.
pub struct Watchdog {
    _stdin: ChildStdin,
    _child: Child,
}

impl Watchdog {
    /// Starts `exe __watchdog` for the `HELD` map `map_id` and waits until
    /// it has the map open.
    pub fn spawn(exe: &Path, map_id: u32, budget_ns: u64) -> Result<Self, WatchdogError> {
        let spawn_error = |source| WatchdogError::Spawn {
            exe: exe.display().to_string(),
            source,
        };
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(map_id.to_string())
            .arg(std::process::id().to_string())
            .arg(budget_ns.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(spawn_error)?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(WatchdogError::NotReady("no pipes".into()));
        };
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        if read.is_err() || line.trim() != READY {
            let _ = child.kill();
            let _ = child.wait();
            return Err(WatchdogError::NotReady(format!(
                "it said {:?}",
                line.trim()
            )));
        }
        Ok(Self {
            _stdin: stdin,
            _child: child,
        })
    }
}

/// The watchdog process's body: returns once memscope has exited and
/// nothing it held is left stopped.
pub fn run(map_id: u32, memscope: u32, budget_ns: u64) -> Result<(), WatchdogError> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: ignoring a signal has no preconditions.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let pidfd = target::exit_notifier(memscope).map_err(|source| WatchdogError::Watch {
        pid: memscope,
        source,
    })?;
    let map =
        MapData::from_id(map_id).map_err(|source| WatchdogError::Map { id: map_id, source })?;
    let mut holds = Holds::new(map).map_err(|source| WatchdogError::Map { id: map_id, source })?;
    println!("{READY}");
    // Close stdout: memscope's read of it must not wait for anything more.
    // SAFETY: fd 1 is ours; nothing writes to stdout after this.
    unsafe { libc::close(1) };

    let mut late = 0;
    let mut stdin_open = true;
    loop {
        let (stdin_event, exited) = wait(&pidfd, stdin_open, SWEEP);
        let released = holds.release_held_before(monotonic_ns().saturating_sub(budget_ns));
        if released > 0 {
            tracing::debug!(
                released,
                "watchdog continued processes held past the budget"
            );
        }
        late += released;
        if stdin_event {
            // EOF (memscope finishing or dead) or stray input: either way
            // only memscope's exit is waited for now.
            let mut buf = [0u8; 64];
            if std::io::stdin().read(&mut buf).map_or(true, |n| n == 0) {
                stdin_open = false;
            }
        }
        if exited {
            break;
        }
    }
    // memscope's descriptors are closed once it has exited: no program of
    // its can stop anything now. Continue what it left.
    let left = holds.release_all();
    std::thread::sleep(SWEEP);
    let left = left + holds.release_all();
    if left > 0 {
        eprintln!("memscope watchdog: continued {left} process(es) memscope left stopped");
    }
    if late > 0 {
        tracing::debug!("watchdog continued {late} process(es) held past the budget");
    }
    Ok(())
}

/// Polls memscope's stdin pipe and pidfd for up to `timeout`: (stdin
/// readable or closed, memscope exited).
fn wait(pidfd: &OwnedFd, stdin_open: bool, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: if stdin_open { 0 } else { -1 },
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: fds is a valid array of two pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout.as_millis() as i32) };
    if n <= 0 {
        return (false, false);
    }
    (fds[1].revents != 0, fds[0].revents != 0)
}
