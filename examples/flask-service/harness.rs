//! Runs the Flask example service for `cargo xtask demo flask` and for the
//! e2e test (`tests/e2e/flask_service.rs`), which both include this file
//! with `#[path]`: its virtualenv, a gunicorn that cannot outlive its
//! caller, a small HTTP client, and `memscope attach` on it.
//!
//! Only std, libc, anyhow and serde_json, which both crates already have.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Debian's interpreter; the virtualenv's `bin/python` links to it, so the
/// profiled executable is this file (whose symbols memscope reads).
pub const PYTHON: &str = "/usr/bin/python3.11";
/// Where the example lives, from the workspace root.
pub const EXAMPLE_DIR: &str = "examples/flask-service";
/// The virtualenv, from the workspace root; shared by the demo and the test.
pub const VENV_DIR: &str = "target/flask-venv";
/// gunicorn.conf.py's `workers` and `threads`.
pub const WORKERS: usize = 2;
const THREADS: usize = 2;
/// Requests to each warmed-up endpoint each worker serves before a profile.
const WARM_UP_PER_WORKER: u64 = 2;
/// Concurrent requests in a warm-up burst: enough to keep a worker's pool
/// thread busy when the next request comes, so that it starts the other.
const WARM_UP_BURST: usize = 8;
/// What malloc is asked for by one /analyze payload, `bytearray(65536)`:
/// 65536 bytes and the trailing NUL CPython keeps after a bytearray's data
/// (PyByteArray_Resize asks for size + 1), handed to malloc unchanged by
/// PyObject_Malloc because it is over 512 bytes. Measured: a gdb breakpoint
/// on malloc shows `malloc(65537)` called from PyByteArray_Resize.
pub const PAYLOAD_MALLOC_BYTES: u64 = 64 * 1024 + 1;
/// The comment that marks the leak's allocation line in app.py.
const ALLOCATION_MARK: &str = "# memscope: the leak's allocation line";
/// Written into the virtualenv once its requirements are installed.
const VENV_STAMP: &str = "memscope-requirements.txt";
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
const STOP_DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

/// What [`ensure_venv`] found or did.
pub enum VenvState {
    /// Created and installed; the `pip freeze` of what was installed.
    Created { packages: String },
    /// Already installed with these requirements: nothing done.
    Reused,
}

/// Makes `target/flask-venv` with the example's pinned requirements from
/// PyPI, unless it already has exactly them. Concurrent callers (the test
/// and the demo) take turns on a lock file.
pub fn ensure_venv(workspace: &Path) -> Result<(PathBuf, VenvState)> {
    let venv = workspace.join(VENV_DIR);
    let requirements_path = workspace.join(EXAMPLE_DIR).join("requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .with_context(|| format!("cannot read {}", requirements_path.display()))?;
    let stamp = format!("# {PYTHON}\n{requirements}");
    let parent = venv.parent().context("the virtualenv has no parent")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let lock_path = parent.join("flask-venv.lock");
    let lock = File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock {}", lock_path.display()));
    }
    let python = venv.join("bin/python");
    if python.exists() && std::fs::read_to_string(venv.join(VENV_STAMP)).is_ok_and(|s| s == stamp) {
        return Ok((venv, VenvState::Reused));
    }
    if !Path::new(PYTHON).exists() {
        bail!(
            "{PYTHON} is missing: run `cargo xtask setup` (installs python3.11 and python3-venv)"
        );
    }
    let ensurepip = Command::new(PYTHON)
        .args(["-c", "import ensurepip, venv"])
        .output()
        .with_context(|| format!("cannot run {PYTHON}"))?;
    if !ensurepip.status.success() {
        bail!(
            "{PYTHON} cannot make a virtualenv (no ensurepip): run `cargo xtask setup` (installs python3-venv)"
        );
    }
    checked(
        Command::new(PYTHON)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
        "cannot create the virtualenv",
    )?;
    checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--no-input", "--quiet", "--retries", "1", "--timeout", "20"])
            .arg("-r")
            .arg(&requirements_path),
        "cannot install the example's requirements from PyPI (is PyPI reachable?)",
    )?;
    let freeze = checked(
        Command::new(&python).args(["-m", "pip", "freeze", "--disable-pip-version-check"]),
        "cannot list the installed packages",
    )?;
    std::fs::write(venv.join(VENV_STAMP), stamp).context("cannot stamp the virtualenv")?;
    Ok((venv, VenvState::Created { packages: freeze }))
}

/// Runs `command`; on failure, an error with `what` and its stderr's end.
fn checked(command: &mut Command, what: &str) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {command:?}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what}: {command:?} failed ({}):\n{}",
            output.status,
            tail.join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The line of app.py where `analyze` allocates each kept payload.
pub fn allocation_line(workspace: &Path) -> Result<u32> {
    let app = workspace.join(EXAMPLE_DIR).join("app.py");
    let text =
        std::fs::read_to_string(&app).with_context(|| format!("cannot read {}", app.display()))?;
    let index = text
        .lines()
        .position(|line| line.contains(ALLOCATION_MARK))
        .with_context(|| format!("{} has no line marked `{ALLOCATION_MARK}`", app.display()))?;
    Ok(u32::try_from(index + 1)?)
}

/// A gunicorn master and its workers, in a process group of their own.
/// Dropping it kills the whole group: nothing outlives a failed demo or a
/// panicking test. If the caller dies without dropping it, the master gets
/// SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops its workers.
pub struct Gunicorn {
    child: Child,
    port: u16,
    log: PathBuf,
    /// Worker pids seen answering.
    workers: BTreeSet<u32>,
}

impl Gunicorn {
    /// Starts the example under gunicorn on a free loopback port; returns
    /// once every worker has answered /health.
    pub fn start(workspace: &Path, venv: &Path, log: &Path) -> Result<Self> {
        let example = workspace.join(EXAMPLE_DIR);
        let port = free_port()?;
        let log_file =
            File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(venv.join("bin/python"));
        command
            .args(["-m", "gunicorn", "-c"])
            .arg(example.join("gunicorn.conf.py"))
            .arg("app:app")
            .current_dir(&example)
            .env("FLASK_SERVICE_PORT", port.to_string())
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0);
        // NB: the death signal follows the spawning *thread*: callers keep
        // that thread alive while the server runs (the test's own thread,
        // the demo's main thread).
        sigterm_when_parent_dies(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start gunicorn from {}", venv.display()))?;
        let mut server = Self {
            child,
            port,
            log: log.to_owned(),
            workers: BTreeSet::new(),
        };
        server.wait_for_workers()?;
        Ok(server)
    }

    /// The master's pid: the one to attach to.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Polls /health until [`WORKERS`] distinct workers have answered: each
    /// has imported the app by then, so nothing of its start-up is left to
    /// run in a profile taken afterwards.
    fn wait_for_workers(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        while self.workers.len() < WORKERS {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "gunicorn exited during start-up ({status}); its log ({}):\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "gunicorn on 127.0.0.1:{} did not have {WORKERS} workers answering /health within {}s (saw {:?}); its log ({}):\n{}",
                    self.port,
                    STARTUP_DEADLINE.as_secs(),
                    self.workers,
                    self.log.display(),
                    self.log_tail()
                );
            }
            match self.get_json("/health") {
                Ok(body) => {
                    let pid = served_by(&body)?;
                    self.workers.insert(pid);
                }
                // Not listening yet, or a worker still booting.
                Err(_) => std::thread::sleep(POLL),
            }
        }
        Ok(())
    }

    /// Until each worker has served [`WARM_UP_PER_WORKER`] requests to each
    /// of `paths` and has started all of its threads, bounded. Then a
    /// profile taken afterwards holds none of what a first call sets up
    /// once: Flask's per-endpoint caches, and a pool thread started on
    /// demand (its stack, and the 64 MiB malloc arena its first `free`
    /// makes).
    pub fn warm_up(&self, paths: &[&str]) -> Result<()> {
        for path in paths {
            let mut served: BTreeMap<u32, u64> = BTreeMap::new();
            let mut bursts = 0;
            while self.workers.iter().any(|pid| {
                served.get(pid).copied().unwrap_or(0) < WARM_UP_PER_WORKER
                    || thread_count(*pid).is_none_or(|n| n < 1 + THREADS)
            }) {
                if bursts == 50 {
                    let threads: Vec<_> = self
                        .workers
                        .iter()
                        .map(|&pid| (pid, thread_count(pid)))
                        .collect();
                    bail!(
                        "after {bursts} bursts of {WARM_UP_BURST} requests to {path}: served {served:?}, threads {threads:?}"
                    );
                }
                let answers: Vec<Result<serde_json::Value>> = std::thread::scope(|scope| {
                    let requests: Vec<_> = (0..WARM_UP_BURST)
                        .map(|_| scope.spawn(|| self.get_json(path)))
                        .collect();
                    requests
                        .into_iter()
                        .map(|r| r.join().unwrap_or_else(|_| bail!("a request panicked")))
                        .collect()
                });
                for answer in answers {
                    *served.entry(served_by(&answer?)?).or_default() += 1;
                }
                bursts += 1;
            }
        }
        Ok(())
    }

    /// The worker pids, as they answered /health.
    pub fn workers(&self) -> Vec<u32> {
        self.workers.iter().copied().collect()
    }

    /// `GET path` on its own connection; the JSON body of a 200 answer.
    pub fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let (status, body) = http_get(self.port, path)?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// SIGTERM to the master (gunicorn's graceful shutdown: it stops its
    /// workers, then exits) and waits for it.
    pub fn stop(mut self) -> Result<ExitStatus> {
        stop_child(&mut self.child, libc::SIGTERM, "gunicorn")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        // The group is the master's pid; workers are in it, and so is
        // anything they started. After a clean stop this finds nothing.
        signal(-(self.child.id() as i32), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The worker that answered: every endpoint's JSON has its `pid`.
pub fn served_by(body: &serde_json::Value) -> Result<u32> {
    body.get("pid")
        .and_then(serde_json::Value::as_u64)
        .and_then(|pid| u32::try_from(pid).ok())
        .with_context(|| format!("answer without a pid: {body}"))
}

/// `Threads:` of /proc/PID/status.
fn thread_count(pid: u32) -> Option<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: plain syscall; a process already gone makes it fail.
    unsafe { libc::kill(pid, signal) };
}

/// A loopback port nothing listens on now (gunicorn binds it a moment
/// later; another process taking it first makes the start-up fail).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// One HTTP/1.1 GET with `Connection: close`: (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("GET {path}: no answer"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: malformed answer: {response:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("GET {path}: chunked answers are not handled");
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// `memscope attach` running on the service. Dropping it stops memscope
/// (SIGINT, then SIGKILL if it hangs); its watchdog continues whatever it
/// held.
pub struct Attached {
    child: Child,
    /// memscope's stderr lines after its banner.
    said: std::sync::mpsc::Receiver<String>,
}

impl Attached {
    /// Starts `memscope attach ARGS PID` with stdout as given and returns once
    /// its probes are on every process of the tree (its banner, printed
    /// then); its other stderr lines are passed on, prefixed.
    pub fn start(memscope: &Path, pid: u32, args: &[&str], stdout: Stdio) -> Result<Self> {
        let mut command = Command::new(memscope);
        command
            .arg("attach")
            .args(args)
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        // If we die, memscope writes what it has and ends.
        sigterm_when_parent_dies(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", memscope.display()))?;
        let stderr = child.stderr.take().context("memscope's stderr")?;
        let (send, said) = std::sync::mpsc::channel();
        let attached = Self { child, said };
        let mut stderr = BufReader::new(stderr);
        let mut banner = String::new();
        stderr
            .read_line(&mut banner)
            .context("reading memscope's banner")?;
        eprint!("[memscope] {banner}");
        if !banner.starts_with("memscope: profiling pid") {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            bail!("memscope attach {pid} did not start profiling:\n{banner}{rest}");
        }
        // Keep draining stderr so memscope never blocks on it.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[memscope] {line}");
                let _ = send.send(line);
            }
        });
        Ok(attached)
    }

    /// memscope's stderr lines since the last call, without waiting.
    pub fn said(&self) -> Vec<String> {
        self.said.try_iter().collect()
    }

    /// SIGINT (memscope's Ctrl-C: it writes the report) and waits.
    pub fn stop(mut self) -> Result<ExitStatus> {
        stop_child(&mut self.child, libc::SIGINT, "memscope")
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_some()) {
            return;
        }
        signal(self.child.id() as i32, libc::SIGINT);
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            if self.child.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `child` and waits for its exit, [`STOP_DEADLINE`] at
/// most (the caller's drop guard kills it after that).
fn stop_child(child: &mut std::process::Child, sig: i32, name: &str) -> Result<ExitStatus> {
    signal(child.id() as i32, sig);
    let deadline = Instant::now() + STOP_DEADLINE;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not stop within {}s of signal {sig} (killed)",
                STOP_DEADLINE.as_secs()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// The child gets SIGTERM when this process (the spawning thread) dies,
/// and is not started at all if that happened already.
fn sigterm_when_parent_dies(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the parent already exited"));
            }
            Ok(())
        })
    };
}
