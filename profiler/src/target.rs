//! The process being profiled: a command started suspended (`run`), or a
//! running pid (`attach`).

use std::{
    ffi::{CString, OsStr, OsString},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("cannot attach to pid {0}: no such process")]
    NoSuchProcess(u32),
    #[error("command not found: {0} (not an executable path, nor on PATH)")]
    CommandNotFound(String),
    #[error("cannot execute {command}: {source}")]
    Exec {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the command: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("no command given: use `memscope run -- CMD [ARGS...]`")]
    EmptyCommand,
}

/// Fails unless `pid` names a live process.
pub fn check_exists(pid: u32) -> Result<(), TargetError> {
    let alive =
        pid != 0 && i32::try_from(pid).is_ok() && Path::new(&format!("/proc/{pid}/maps")).exists();
    if alive {
        Ok(())
    } else {
        Err(TargetError::NoSuchProcess(pid))
    }
}

/// The process's command line, space-joined, or its comm if it has none.
pub fn command_line(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if words.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim().to_owned())
            .unwrap_or_default()
    } else {
        words.join(" ")
    }
}

/// A forked child stopped before it executes the command, so probes can be
/// attached before its first allocation.
#[derive(Debug)]
pub struct SuspendedChild {
    pub pid: u32,
    command: String,
    /// Closed on a successful exec (O_CLOEXEC); carries errno otherwise.
    exec_status: OwnedFd,
}

/// Forks a child that stops itself (SIGSTOP) and, once continued, executes
/// `argv`. The child is a copy of memscope until it executes, mapping the
/// same libc the command will load (dynamically linked commands; issue #4
/// re-checks at exec).
pub fn spawn_suspended(argv: &[OsString]) -> Result<SuspendedChild, TargetError> {
    let (program, _) = argv.split_first().ok_or(TargetError::EmptyCommand)?;
    let command = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let path = resolve_command(program)?;
    let to_cstring = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| TargetError::Exec {
            command: command.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "argument holds a NUL byte",
            ),
        })
    };
    let path_c = to_cstring(path.as_os_str())?;
    let args_c = argv
        .iter()
        .map(|a| to_cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut arg_ptrs: Vec<*const libc::c_char> = args_c.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());

    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(TargetError::Spawn(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: the child only calls async-signal-safe functions (raise,
    // execv, write, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(TargetError::Spawn(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; nothing here allocates or takes locks.
        unsafe {
            // Rust ignores SIGPIPE, and an ignored signal stays ignored
            // across exec: give the command the default back, as
            // std::process::Command does.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGSTOP);
            libc::execv(path_c.as_ptr(), arg_ptrs.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(
                write_end.as_raw_fd(),
                (&raw const errno).cast(),
                size_of::<i32>(),
            );
            libc::_exit(127);
        }
    }
    drop(write_end);
    let pid = pid as u32;
    wait_until_stopped(pid)?;
    Ok(SuspendedChild {
        pid,
        command,
        exec_status: read_end,
    })
}

impl SuspendedChild {
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Lets the child execute the command; fails if the exec failed.
    pub fn resume(self) -> Result<u32, TargetError> {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
        let mut errno = [0u8; 4];
        // SAFETY: reads at most 4 bytes into a 4-byte buffer; EOF means exec succeeded.
        let n = unsafe { libc::read(self.exec_status.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
        if n == 4 {
            reap(self.pid);
            return Err(TargetError::Exec {
                command: self.command,
                source: std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)),
            });
        }
        Ok(self.pid)
    }
}

fn wait_until_stopped(pid: u32) -> Result<(), TargetError> {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WUNTRACED) };
    if r < 0 {
        return Err(TargetError::Spawn(std::io::Error::last_os_error()));
    }
    if libc::WIFSTOPPED(status) {
        Ok(())
    } else {
        Err(TargetError::Spawn(std::io::Error::other(
            "the child exited before it could be profiled",
        )))
    }
}

/// Waits for a child that has exited and returns its exit code (128+signal
/// when killed by a signal).
pub fn reap(pid: u32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waits for our own child; WNOHANG-free because it has exited.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
    if r != pid as i32 {
        return None;
    }
    exit_code(status)
}

/// What a child of ours is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildState {
    Running,
    Stopped,
    /// Reaped, with its exit code (see `exit_code`).
    Exited(Option<i32>),
}

/// Looks at child `pid` without blocking; reaps it if it has exited.
pub fn poll_child(pid: u32) -> ChildState {
    let mut status = 0;
    // SAFETY: non-blocking wait on our own child.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG | libc::WUNTRACED) };
    if r != pid as i32 {
        ChildState::Running
    } else if libc::WIFSTOPPED(status) {
        ChildState::Stopped
    } else {
        ChildState::Exited(exit_code(status))
    }
}

/// A wait status as a shell shows it: the exit code, or 128+signal.
pub fn exit_code(status: i32) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Finds `program` as a shell would: a path if it has a slash, else on PATH.
pub fn resolve_command(program: &OsStr) -> Result<PathBuf, TargetError> {
    let not_found = || TargetError::CommandNotFound(program.to_string_lossy().into_owned());
    let is_executable = |p: &Path| {
        let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: c is a valid NUL-terminated path.
        p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
    };
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(not_found())
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(not_found)
}

/// A descriptor that becomes readable when `pid` exits (pidfd_open, 5.3+).
pub fn exit_notifier(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_commands_on_path_and_rejects_unknown_ones() {
        assert!(resolve_command(OsStr::new("sh")).is_ok());
        assert!(matches!(
            resolve_command(OsStr::new("no-such-command-memscope")),
            Err(TargetError::CommandNotFound(_))
        ));
        assert!(matches!(
            resolve_command(OsStr::new("./no/such/file")),
            Err(TargetError::CommandNotFound(_))
        ));
    }

    #[test]
    fn pid_zero_and_huge_pids_do_not_exist() {
        assert!(matches!(
            check_exists(0),
            Err(TargetError::NoSuchProcess(0))
        ));
        assert!(check_exists(999_999_999).is_err());
        assert!(check_exists(std::process::id()).is_ok());
    }
}
