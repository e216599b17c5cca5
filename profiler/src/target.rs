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
    #[error("cannot attach to pid {0}: it is a zombie (exited, not yet reaped by its parent)")]
    Zombie(u32),
    #[error("cannot attach to pid {pid} ({comm}): a kernel thread has no user-space allocator")]
    KernelThread { pid: u32, comm: String },
    #[error(
        "refusing to attach to pid 1 with its children: that is every process on the host; \
         use --no-children to profile pid 1 alone"
    )]
    InitWithChildren,
    #[error("cannot attach to pid {0}: it is memscope itself")]
    MemscopeItself(u32),
    #[error("cannot attach to pid {pid}: cannot read /proc/{pid}: {source}")]
    Inspect {
        pid: u32,
        #[source]
        source: procfs::ProcError,
    },
    #[error("command not found: {0} (not an executable path, nor on PATH)")]
    CommandNotFound(String),
    #[error("cannot execute {command}: {source}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Exec {
        command: String,
        #[source]
        source: std::io::Error,
        /// Why the kernel refused, when errno alone does not say (see
        /// `explain_exec_failure`).
        reason: Option<String>,
    },
    #[error("cannot start the command: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("no command given: use `memscope run -- CMD [ARGS...]`")]
    EmptyCommand,
}

/// The process `attach` profiles, once the pid given is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// The process (thread group) id: the pid given, or the process owning
    /// the thread given.
    pub pid: u32,
    /// What to tell the user when the process profiled is not the pid given.
    pub note: Option<String>,
}

/// The flag in /proc/PID/stat that marks a kernel thread
/// (include/linux/sched.h).
const PF_KTHREAD: u32 = 0x0020_0000;

/// Checks that `pid` names something `attach` can profile and returns the
/// process to attach to: a thread id resolves to its process (uprobes and
/// the live set are per process). Refuses zombies, kernel threads,
/// memscope itself, and pid 1 when its children would be followed.
pub fn resolve_target(pid: u32, follow_children: bool) -> Result<ResolvedTarget, TargetError> {
    resolve_target_excluding(pid, follow_children, std::process::id())
}

/// `resolve_target` with memscope's own pid as a parameter, so that tests
/// (which are the calling process) can resolve their own threads.
fn resolve_target_excluding(
    pid: u32,
    follow_children: bool,
    own_pid: u32,
) -> Result<ResolvedTarget, TargetError> {
    let proc_error = |pid: u32| {
        move |source: procfs::ProcError| match source {
            procfs::ProcError::NotFound(_) => TargetError::NoSuchProcess(pid),
            source => TargetError::Inspect { pid, source },
        }
    };
    let raw_pid = i32::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or(TargetError::NoSuchProcess(pid))?;
    // NB: /proc/TID of a thread that is not its group's leader opens by
    // path though readdir does not list it, so a tid opens like a pid.
    let task = procfs::process::Process::new(raw_pid).map_err(proc_error(pid))?;
    let status = task.status().map_err(proc_error(pid))?;
    let tgid = u32::try_from(status.tgid).map_err(|_| TargetError::NoSuchProcess(pid))?;
    let (process, status) = if tgid == pid {
        (task, status)
    } else {
        let process = procfs::process::Process::new(status.tgid).map_err(proc_error(tgid))?;
        let status = process.status().map_err(proc_error(tgid))?;
        (process, status)
    };
    if tgid == own_pid {
        return Err(TargetError::MemscopeItself(tgid));
    }
    let stat = process.stat().map_err(proc_error(tgid))?;
    // NB: the flag, not an empty /proc/PID/maps: the leader of a process
    // whose main thread called pthread_exit shows no maps either.
    if stat.flags & PF_KTHREAD != 0 {
        return Err(TargetError::KernelThread {
            pid: tgid,
            comm: stat.comm,
        });
    }
    // NB: that leader is also in state Z while its other threads run; the
    // process has exited only once no other thread is left.
    if stat.state == 'Z' && status.threads <= 1 {
        return Err(TargetError::Zombie(tgid));
    }
    if tgid == 1 && follow_children {
        return Err(TargetError::InitWithChildren);
    }
    let note = (tgid != pid).then(|| {
        format!(
            "pid {pid} is a thread of process {tgid} ({}): profiling the process",
            stat.comm
        )
    });
    Ok(ResolvedTarget { pid: tgid, note })
}

/// The value of variable `name` in `pid`'s environment as it started.
pub fn environment_variable(pid: u32, name: &str) -> Option<Vec<u8>> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|var| {
        var.strip_prefix(name.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
            .map(<[u8]>::to_vec)
    })
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
    /// The program as given (argv[0]), for error messages.
    program: String,
    /// The program as found, executed by the child.
    path: PathBuf,
    /// Closed on a successful exec (O_CLOEXEC); carries errno otherwise.
    exec_status: OwnedFd,
}

/// Forks a child that stops itself (SIGSTOP) and, once continued, executes
/// `argv` in memscope's environment with `env` set over it. The child is a
/// copy of memscope until it executes, mapping the same libc the command
/// will load (dynamically linked commands; issue #4 re-checks at exec).
pub fn spawn_suspended(
    argv: &[OsString],
    env: &[(&str, &str)],
) -> Result<SuspendedChild, TargetError> {
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
            reason: None,
        })
    };
    let path_c = to_cstring(path.as_os_str())?;
    let args_c = argv
        .iter()
        .map(|a| to_cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut arg_ptrs: Vec<*const libc::c_char> = args_c.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let env_c = environment(env)
        .iter()
        .map(|var| to_cstring(var))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env_ptrs: Vec<*const libc::c_char> = env_c.iter().map(|v| v.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(TargetError::Spawn(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

    // SAFETY: the child only calls async-signal-safe functions (raise,
    // execve, write, _exit) on memory prepared before the fork.
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
            libc::execve(path_c.as_ptr(), arg_ptrs.as_ptr(), env_ptrs.as_ptr());
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
        program: program.to_string_lossy().into_owned(),
        path,
        exec_status: read_end,
    })
}

/// memscope's environment as `NAME=value` entries, with `overrides` set.
fn environment(overrides: &[(&str, &str)]) -> Vec<OsString> {
    let mut vars: Vec<OsString> = std::env::vars_os()
        .filter(|(name, _)| !overrides.iter().any(|(set, _)| name == set))
        .map(|(name, value)| {
            let mut var = name;
            var.push("=");
            var.push(value);
            var
        })
        .collect();
    vars.extend(
        overrides
            .iter()
            .map(|(name, value)| format!("{name}={value}").into()),
    );
    vars
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
        let n = loop {
            // SAFETY: reads at most 4 bytes into a 4-byte buffer; EOF means exec succeeded.
            let n =
                unsafe { libc::read(self.exec_status.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n == 4 {
            // NB: kill before reaping. The failed child goes on to _exit,
            // where memscope's own exit probe stops it, and a stopped child
            // never satisfies a plain waitpid.
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            reap(self.pid);
            let errno = i32::from_ne_bytes(errno);
            return Err(TargetError::Exec {
                command: self.program,
                source: std::io::Error::from_raw_os_error(errno),
                reason: explain_exec_failure(errno, &self.path),
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

/// Finds `program` as a shell would (a path if it has a slash, else on
/// PATH) and refuses it if execve certainly would (see `check_executable`).
pub fn resolve_command(program: &OsStr) -> Result<PathBuf, TargetError> {
    let path = find_command(program)?;
    check_executable(program, &path)?;
    Ok(path)
}

fn find_command(program: &OsStr) -> Result<PathBuf, TargetError> {
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

/// Refuses what execve would certainly refuse from the file's first bytes,
/// before any probe is attached: attaching, then detaching, the probes
/// costs seconds (3 to 5 s here, 6.18, mostly closing uprobe events). The
/// errno of the exec itself stays the authority for the rest (a file open
/// for writing, a noexec mount).
fn check_executable(program: &OsStr, path: &Path) -> Result<(), TargetError> {
    // Unreadable (execute-only for a non-root user): leave it to execve.
    let Some(head) = read_head(path) else {
        return Ok(());
    };
    let kind = match executable_kind(&head, Path::exists) {
        ExecutableKind::Elf { .. } => ExecutableKind::Elf {
            interpreter: elf_interpreter(path),
        },
        kind => kind,
    };
    match certain_exec_failure(&kind, binfmt_misc_has_handlers()) {
        Some(errno) => Err(TargetError::Exec {
            command: program.to_string_lossy().into_owned(),
            source: std::io::Error::from_raw_os_error(errno),
            reason: exec_failure_reason(errno, &kind),
        }),
        None => Ok(()),
    }
}

/// The errno execve will give for a file of this kind, when certain.
/// binfmt_misc handlers are consulted first and may run anything (a jar,
/// a foreign-architecture binary), so with any registered nothing is.
fn certain_exec_failure(kind: &ExecutableKind, binfmt_misc: bool) -> Option<i32> {
    if binfmt_misc {
        return None;
    }
    match kind {
        ExecutableKind::Script { interpreter, .. } if interpreter.is_empty() => Some(libc::ENOEXEC),
        ExecutableKind::Script {
            interpreter_exists: false,
            ..
        } => Some(libc::ENOENT),
        ExecutableKind::Other => Some(libc::ENOEXEC),
        // The kernel opens the ELF's loader by its absolute path.
        ExecutableKind::Elf {
            interpreter: Some(loader),
        } if !Path::new(loader).exists() => Some(libc::ENOENT),
        ExecutableKind::Script { .. } | ExecutableKind::Elf { .. } => None,
    }
}

/// Whether binfmt_misc is enabled with a handler registered; false when
/// it is not mounted.
fn binfmt_misc_has_handlers() -> bool {
    const DIR: &str = "/proc/sys/fs/binfmt_misc";
    let enabled = std::fs::read_to_string(format!("{DIR}/status"))
        .is_ok_and(|status| status.trim() == "enabled");
    enabled
        && std::fs::read_dir(DIR).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| !matches!(e.file_name().to_str(), Some("register" | "status")))
        })
}

/// The first EXEC_HEAD_LEN bytes of the file, or None if it cannot be read.
fn read_head(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(EXEC_HEAD_LEN);
    std::fs::File::open(path)
        .and_then(|file| file.take(EXEC_HEAD_LEN as u64).read_to_end(&mut head))
        .ok()?;
    Some(head)
}

/// What the first bytes of an executable say it is, as execve reads them.
#[derive(Debug, PartialEq, Eq)]
enum ExecutableKind {
    /// `#!interpreter`; `interpreter` is empty when the line names none.
    Script {
        interpreter: String,
        interpreter_exists: bool,
    },
    /// `interpreter`: its PT_INTERP (dynamic loader), read only to explain
    /// an ENOENT.
    Elf { interpreter: Option<String> },
    /// Neither: execve has nothing to run it with.
    Other,
}

/// The kernel reads this much of the file to choose how to run it
/// (BINPRM_BUF_SIZE).
const EXEC_HEAD_LEN: usize = 256;

fn executable_kind(head: &[u8], exists: impl Fn(&Path) -> bool) -> ExecutableKind {
    if head.starts_with(b"\x7fELF") {
        return ExecutableKind::Elf { interpreter: None };
    }
    let Some(line) = head.strip_prefix(b"#!") else {
        return ExecutableKind::Other;
    };
    // As binfmt_script: blanks, then the interpreter up to a blank or newline.
    let interpreter: Vec<u8> = line
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == b'\t')
        .take_while(|&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\0'))
        .collect();
    let interpreter_exists =
        !interpreter.is_empty() && exists(Path::new(OsStr::from_bytes(&interpreter)));
    ExecutableKind::Script {
        interpreter: String::from_utf8_lossy(&interpreter).into_owned(),
        interpreter_exists,
    }
}

/// What errno means for this file, in the words of what to fix; None when
/// errno says it already.
fn exec_failure_reason(errno: i32, kind: &ExecutableKind) -> Option<String> {
    use ExecutableKind::{Elf, Other, Script};
    let reason = match (errno, kind) {
        (libc::ENOEXEC, Script { interpreter, .. }) if interpreter.is_empty() => {
            "its #! line names no interpreter".to_owned()
        }
        (libc::ENOEXEC, Script { interpreter, .. }) => {
            format!("its #! interpreter {interpreter} is not a program this kernel can run")
        }
        (libc::ENOEXEC, Elf { .. }) => "a binary for another architecture or ABI".to_owned(),
        (libc::ENOEXEC, Other) => "no #! line and not a binary".to_owned(),
        (
            libc::ENOENT,
            Script {
                interpreter,
                interpreter_exists: false,
            },
        ) => format!("its #! interpreter {interpreter} does not exist"),
        (
            libc::ENOENT,
            Script {
                interpreter,
                interpreter_exists: true,
            },
        ) => format!("its #! interpreter {interpreter} needs a dynamic loader that does not exist"),
        (
            libc::ENOENT,
            Elf {
                interpreter: Some(interpreter),
            },
        ) => format!("its ELF interpreter (dynamic loader) {interpreter} does not exist"),
        (libc::ENOENT, Elf { interpreter: None }) => {
            "the dynamic loader it names (its ELF interpreter) does not exist".to_owned()
        }
        (libc::EACCES, Script { interpreter, .. }) => format!(
            "its #! interpreter {interpreter} is not executable, or a file system is mounted noexec"
        ),
        (libc::EACCES, _) => {
            "its file system is mounted noexec, or a security module denied it".to_owned()
        }
        (libc::ETXTBSY, _) => {
            "the file is open for writing (is it still being written?)".to_owned()
        }
        (libc::ELOOP, Script { .. }) => "too many levels of #! interpreters".to_owned(),
        _ => return None,
    };
    Some(reason)
}

/// Why execve of `path` failed with `errno`, from the file's first bytes;
/// best effort, read after the failure.
fn explain_exec_failure(errno: i32, path: &Path) -> Option<String> {
    // An unreadable file still gets errno's own words.
    let head = read_head(path).unwrap_or_default();
    let kind = match executable_kind(&head, Path::exists) {
        ExecutableKind::Elf { .. } if errno == libc::ENOENT => ExecutableKind::Elf {
            interpreter: elf_interpreter(path),
        },
        kind => kind,
    };
    exec_failure_reason(errno, &kind)
}

/// The dynamic loader an ELF names (PT_INTERP), if it names one. Reads
/// only the headers and the name: the binary may be hundreds of MB.
fn elf_interpreter(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileExt as _;
    const PT_INTERP: u32 = 3;
    let file = std::fs::File::open(path).ok()?;
    let read = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).ok().map(|()| buf)
    };
    let u16_at =
        |b: &[u8], at: usize| Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let u32_at =
        |b: &[u8], at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let u64_at =
        |b: &[u8], at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    // ELF64, little-endian: the only kind memscope runs on.
    let header = read(0, 64)?;
    if !header.starts_with(b"\x7fELF\x02\x01") {
        return None;
    }
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20)?,
        usize::from(u16_at(&header, 0x36)?),
        usize::from(u16_at(&header, 0x38)?),
    );
    let headers = read(phoff, phentsize.checked_mul(phnum)?)?;
    headers.chunks_exact(phentsize.max(1)).find_map(|ph| {
        if u32_at(ph, 0)? != PT_INTERP {
            return None;
        }
        let (offset, size) = (u64_at(ph, 8)?, u64_at(ph, 32)?);
        let name = read(offset, usize::try_from(size.min(4096)).ok()?)?;
        let name = name.split(|&b| b == 0).next()?;
        Some(String::from_utf8_lossy(name).into_owned())
    })
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
        for pid in [0, 999_999_999, u32::MAX] {
            assert!(matches!(
                resolve_target(pid, true),
                Err(TargetError::NoSuchProcess(p)) if p == pid
            ));
        }
    }

    /// The test binary is the calling process: resolve as if memscope were
    /// some other process.
    const NOT_US: u32 = 0;

    #[test]
    fn pid_zero_and_pids_past_i32_do_not_exist() {
        for pid in [0, u32::MAX, i32::MAX as u32 + 1] {
            assert!(
                matches!(resolve_target(pid, true), Err(TargetError::NoSuchProcess(p)) if p == pid),
                "{pid}"
            );
        }
    }

    #[test]
    fn a_thread_id_resolves_to_its_process_with_a_note() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            tid_tx.send(tid).expect("test waits for the tid");
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().expect("thread sends its tid");
        let resolved = resolve_target_excluding(tid, true, NOT_US);
        done_tx.send(()).expect("thread waits");
        thread.join().expect("thread ends");

        let pid = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").expect("comm readable");
        assert_ne!(tid, pid);
        assert_eq!(
            resolved.expect("a live thread resolves"),
            ResolvedTarget {
                pid,
                note: Some(format!(
                    "pid {tid} is a thread of process {pid} ({}): profiling the process",
                    comm.trim_end()
                )),
            }
        );
    }

    #[test]
    fn a_process_resolves_to_itself_without_a_note() {
        let pid = std::process::id();
        assert_eq!(
            resolve_target_excluding(pid, true, NOT_US).expect("we are alive"),
            ResolvedTarget { pid, note: None }
        );
    }

    #[test]
    fn memscope_refuses_itself() {
        let pid = std::process::id();
        let error = resolve_target(pid, false).expect_err("refused");
        assert_eq!(
            error.to_string(),
            format!("cannot attach to pid {pid}: it is memscope itself")
        );
    }

    #[test]
    fn pid_1_is_refused_only_with_its_children() {
        let error = resolve_target_excluding(1, true, NOT_US).expect_err("refused");
        assert_eq!(
            error.to_string(),
            "refusing to attach to pid 1 with its children: that is every process on the host; \
             use --no-children to profile pid 1 alone"
        );
        assert_eq!(
            resolve_target_excluding(1, false, NOT_US).expect("pid 1 alone is fine"),
            ResolvedTarget { pid: 1, note: None }
        );
    }

    #[test]
    fn kthreadd_is_a_kernel_thread() {
        let error = resolve_target_excluding(2, false, NOT_US).expect_err("refused");
        assert!(
            matches!(&error, TargetError::KernelThread { pid: 2, comm } if comm == "kthreadd"),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "cannot attach to pid 2 (kthreadd): a kernel thread has no user-space allocator"
        );
    }

    #[test]
    fn an_unreaped_child_is_a_zombie() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("true runs");
        let pid = child.id();
        // SAFETY: waitid on our own child writes into a zeroed siginfo.
        let waited = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            // WNOWAIT: wait for the exit but leave the child unreaped.
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        assert_eq!(waited, 0, "{}", std::io::Error::last_os_error());
        let resolved = resolve_target_excluding(pid, false, NOT_US);
        child.wait().expect("reaped");
        let error = resolved.expect_err("a zombie is refused");
        assert_eq!(
            error.to_string(),
            format!(
                "cannot attach to pid {pid}: it is a zombie (exited, not yet reaped by its parent)"
            )
        );
    }

    #[test]
    fn shebang_lines_name_their_interpreter() {
        let exists = |p: &Path| p == Path::new("/bin/sh");
        let script = |interpreter: &str, interpreter_exists| ExecutableKind::Script {
            interpreter: interpreter.to_owned(),
            interpreter_exists,
        };
        assert_eq!(
            executable_kind(b"#!/bin/sh\necho", exists),
            script("/bin/sh", true)
        );
        assert_eq!(
            executable_kind(b"#! \t/nonexistent/interp -x\n", exists),
            script("/nonexistent/interp", false)
        );
        assert_eq!(executable_kind(b"#!\n", exists), script("", false));
        assert_eq!(
            executable_kind(b"\x7fELF\x02\x01", exists),
            ExecutableKind::Elf { interpreter: None }
        );
        assert_eq!(executable_kind(b"echo hi\n", exists), ExecutableKind::Other);
        assert_eq!(executable_kind(b"", exists), ExecutableKind::Other);
    }

    #[test]
    fn only_certain_exec_failures_are_refused_before_exec() {
        let script = |interpreter: &str, interpreter_exists| ExecutableKind::Script {
            interpreter: interpreter.to_owned(),
            interpreter_exists,
        };
        let elf = ExecutableKind::Elf { interpreter: None };
        assert_eq!(
            certain_exec_failure(&ExecutableKind::Other, false),
            Some(libc::ENOEXEC)
        );
        assert_eq!(
            certain_exec_failure(&script("", false), false),
            Some(libc::ENOEXEC)
        );
        assert_eq!(
            certain_exec_failure(&script("/no/such", false), false),
            Some(libc::ENOENT)
        );
        assert_eq!(certain_exec_failure(&script("/bin/sh", true), false), None);
        assert_eq!(certain_exec_failure(&elf, false), None);
        // A binfmt_misc handler may run any of them.
        assert_eq!(certain_exec_failure(&ExecutableKind::Other, true), None);
        assert_eq!(certain_exec_failure(&script("/no/such", false), true), None);
    }

    #[test]
    fn resolve_command_refuses_a_script_without_shebang() {
        let dir = std::env::temp_dir().join(format!("memscope-target-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("no-shebang");
        std::fs::write(&path, "echo hello\n").expect("written");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let resolved = resolve_command(path.as_os_str());
        let _ = std::fs::remove_dir_all(&dir);
        if binfmt_misc_has_handlers() {
            assert_eq!(resolved.expect("left to execve"), path);
        } else {
            assert_eq!(
                resolved.expect_err("refused").to_string(),
                format!(
                    "cannot execute {}: Exec format error (os error 8): no #! line and not a binary",
                    path.display()
                )
            );
        }
    }

    #[test]
    fn exec_failures_say_what_to_fix() {
        let exec_error = |errno, kind: ExecutableKind| {
            TargetError::Exec {
                command: "./script".into(),
                source: std::io::Error::from_raw_os_error(errno),
                reason: exec_failure_reason(errno, &kind),
            }
            .to_string()
        };
        let missing = || ExecutableKind::Script {
            interpreter: "/nonexistent/interp".into(),
            interpreter_exists: false,
        };
        assert_eq!(
            exec_error(libc::ENOEXEC, ExecutableKind::Other),
            "cannot execute ./script: Exec format error (os error 8): no #! line and not a binary"
        );
        assert_eq!(
            exec_error(libc::ENOENT, missing()),
            "cannot execute ./script: No such file or directory (os error 2): \
             its #! interpreter /nonexistent/interp does not exist"
        );
        assert_eq!(
            exec_error(libc::ETXTBSY, ExecutableKind::Elf { interpreter: None }),
            "cannot execute ./script: Text file busy (os error 26): \
             the file is open for writing (is it still being written?)"
        );
        assert_eq!(
            exec_error(libc::EACCES, ExecutableKind::Elf { interpreter: None }),
            "cannot execute ./script: Permission denied (os error 13): \
             its file system is mounted noexec, or a security module denied it"
        );
        assert_eq!(
            exec_error(
                libc::ENOENT,
                ExecutableKind::Elf {
                    interpreter: Some("/nonexistent/ld.so".into())
                }
            ),
            "cannot execute ./script: No such file or directory (os error 2): \
             its ELF interpreter (dynamic loader) /nonexistent/ld.so does not exist"
        );
        // A file that vanished: errno says it all.
        assert_eq!(
            exec_error(libc::ENOENT, ExecutableKind::Other),
            "cannot execute ./script: No such file or directory (os error 2)"
        );
    }
}
