//! Process trees on a live system: workers that exist before attach, a
//! fork storm, many processes at once, and nothing left stopped however
//! memscope ends.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use memscope::processes::Following;

use crate::support::*;

/// `memscope attach PID` (with `extra` arguments); returns once the probes
/// are on (its banner is printed after every process of the tree has them).
fn attach(
    test: &str,
    pid: u32,
    extra: &[&str],
    nofile: Option<u64>,
) -> (Child, std::path::PathBuf) {
    let (memscope, dir, _) = attach_watching_stderr(test, pid, extra, nofile);
    (memscope, dir)
}

/// `attach`, and each later line memscope writes on stderr.
fn attach_watching_stderr(
    test: &str,
    pid: u32,
    extra: &[&str],
    nofile: Option<u64>,
) -> (Child, std::path::PathBuf, std::sync::mpsc::Receiver<String>) {
    let dir = output_dir(test);
    let mut command = Command::new(MEMSCOPE);
    command
        .arg("attach")
        .arg("-o")
        .arg(&dir)
        .args(extra)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(limit) = nofile {
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let mut memscope = command.spawn().expect("memscope starts");
    let mut stderr = BufReader::new(memscope.stderr.take().expect("stderr"));
    let mut banner = String::new();
    stderr.read_line(&mut banner).expect("memscope banner");
    assert!(banner.starts_with("memscope: profiling pid"), "{banner}");
    // Keep draining stderr so memscope never blocks on it.
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("[memscope] {line}");
            let _ = lines.send(line);
        }
    });
    (memscope, dir, said)
}

/// Kills these processes when dropped: a test that fails before it
/// releases the pre-fork workers must not leave them waiting forever.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: plain syscall; a pid already gone makes it fail.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The pre-fork fixture with `workers` workers, and its "ready" line's pids
/// (master first), killed when the guard drops.
fn prefork(workers: usize) -> (Child, Vec<u32>, KillOnDrop) {
    let mut server = Command::new(fixture("prefork_attach"))
        .arg(workers.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("fixture starts");
    let mut out = BufReader::new(server.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("handshake");
    let pids: Vec<u32> = line
        .strip_prefix("ready ")
        .expect("ready line")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect();
    assert_eq!(pids.len(), workers + 1, "{line}");
    let guard = KillOnDrop(pids.clone());
    (server, pids, guard)
}

fn release(server: &mut Child) {
    server
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("release the workers");
}

/// Bytes worker `i` of the pre-fork fixture leaks.
fn worker_leak(i: usize) -> u64 {
    (i as u64 % 3 + 1) * 10 * 4096
}

/// Processes in state T (stopped) among `pid` and its descendants.
fn stopped_in_tree(pid: u32) -> Vec<u32> {
    let tree: Vec<_> = memscope::proc_tree::descendants(pid)
        .into_iter()
        .map(|node| node.pid)
        .chain([pid])
        .collect();
    tree.into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
                    Some(after == 'T')
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Check that attaching to a pre-fork master profiles the workers it
/// forked before memscope came, each exactly.
#[test]
fn attach_profiles_workers_forked_before_it() {
    if !bpf_available() {
        return;
    }
    let (mut server, pids, _workers) = prefork(3);
    let (mut memscope, dir) = attach("prefork-attach", pids[0], &[], None);
    release(&mut server);
    assert!(server.wait().expect("fixture exits").success());
    assert!(memscope.wait().expect("memscope exits").success());

    let report = read_report(&dir);
    for (i, &worker) in pids[1..].iter().enumerate() {
        let process = report
            .processes
            .iter()
            .find(|p| p.pid == worker)
            .unwrap_or_else(|| panic!("worker {worker} missing: {:?}", report.processes));
        assert_eq!(process.ppid, Some(pids[0]));
        assert_eq!(process.following, Following::Attached);
        assert_eq!(process.totals.live_bytes, worker_leak(i), "worker {i}");
    }
    let total: u64 = (0..3).map(worker_leak).sum();
    assert_eq!(
        figures(site(&report, "worker_leak_site")),
        (total, 60, total, 60)
    );
    assert_eq!(report.completeness.unfollowed_processes, 0);
    assert_nothing_lost(&report);
}

/// The fork-storm fixture and its output, with its fork rate per second.
struct Storm {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Storm {
    fn start() -> Self {
        let mut child = Command::new(fixture("fork_storm"))
            .arg("10000")
            .stdout(Stdio::piped())
            .spawn()
            .expect("fixture starts");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("pid line");
        Self { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Forks per second over the next `seconds` of its reports.
    fn rate(&mut self, seconds: usize) -> f64 {
        let mut forks = Vec::new();
        let mut line = String::new();
        while forks.len() <= seconds {
            line.clear();
            self.out.read_line(&mut line).expect("forks line");
            if let Some(n) = line.strip_prefix("forks ") {
                forks.push(n.trim().parse::<f64>().expect("count"));
            }
        }
        (forks[seconds] - forks[0]) / seconds as f64
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Attaches to the fork storm, ends memscope with `signal`, and checks
/// that no process of the tree is stopped a second later.
fn storm_survives(test: &str, signal: i32, extra: &[&str]) -> Option<memscope::report::Report> {
    let mut storm = Storm::start();
    let untraced = storm.rate(2);
    let (memscope, dir) = attach(test, storm.pid(), extra, None);
    let traced = storm.rate(3);
    eprintln!(
        "fork rate: {untraced:.0}/s untraced, {traced:.0}/s under memscope {extra:?} ({:.0}%)",
        100.0 * traced / untraced
    );
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(memscope.id() as i32, signal) };
    let mut memscope = memscope;
    let status = memscope.wait().expect("memscope exits");
    std::thread::sleep(Duration::from_secs(1));
    let stopped = stopped_in_tree(storm.pid());
    assert!(stopped.is_empty(), "stopped after memscope: {stopped:?}");
    assert!(storm.rate(1) > 0.0, "the target stopped forking");
    (signal != libc::SIGKILL).then(|| {
        assert!(status.success(), "memscope: {status}");
        read_report(&dir)
    })
}

/// Every child the storm forked under the probes made one malloc(256).
fn assert_storm_children_exact(report: &memscope::report::Report) {
    let count = |state, exited: bool| {
        report
            .processes
            .iter()
            .filter(|p| p.following == state && (!exited || p.exited_s.is_some()))
            .count() as u64
    };
    let (forked, late) = (
        count(Following::Forked, false),
        count(Following::Late, false),
    );
    // A child that exited under its probes made its call; one still
    // running at the end may not have yet.
    let exited = count(Following::Forked, true);
    assert!(exited > 0, "no child followed: {:?}", report.completeness);
    // One site, or more where some children's outer frames could not be
    // named (one that exited before its mappings were read).
    let sites: Vec<_> = report
        .sites
        .iter()
        .filter(|s| s.frames.first().is_some_and(|f| f.function == "child"))
        .collect();
    let (allocs, bytes) = sites
        .iter()
        .fold((0, 0), |(c, b), s| (c + s.alloc_count, b + s.alloc_bytes));
    if sites.len() > 1 {
        let chains: Vec<Vec<&str>> = sites
            .iter()
            .map(|s| s.frames.iter().map(|f| f.function.as_str()).collect())
            .collect();
        eprintln!("child sites: {chains:?}");
    }
    assert!(
        (exited..=forked + late).contains(&allocs),
        "{allocs} allocations from {forked} followed ({exited} exited) and {late} late children"
    );
    assert_eq!(bytes, 256 * allocs);
    eprintln!(
        "followed {forked} children, {late} late, {} unfollowed",
        report.completeness.unfollowed_processes
    );
}

#[test]
fn fork_storm_is_left_running_after_ctrl_c() {
    if !bpf_available() {
        return;
    }
    let report = storm_survives("storm-int", libc::SIGINT, &[]).expect("report");
    assert_storm_children_exact(&report);
}

#[test]
fn fork_storm_is_left_running_after_sigterm() {
    if !bpf_available() {
        return;
    }
    let report = storm_survives("storm-term", libc::SIGTERM, &[]).expect("report");
    assert_storm_children_exact(&report);
}

#[test]
fn fork_storm_is_left_running_after_sigkill() {
    if !bpf_available() {
        return;
    }
    storm_survives("storm-kill", libc::SIGKILL, &[]);
}

/// Check that with the probes on the allocator's file (`--follow image`)
/// a fork costs no attach, every child is counted, and nothing is left
/// stopped.
#[test]
fn fork_storm_is_followed_with_probes_on_the_image() {
    if !bpf_available() {
        return;
    }
    let report =
        storm_survives("storm-image", libc::SIGINT, &["--follow", "image"]).expect("report");
    assert_storm_children_exact(&report);
    storm_survives("storm-image-kill", libc::SIGKILL, &["--follow", "image"]);
}

/// Check that `--follow image` profiles running workers exactly too.
#[test]
fn attach_with_probes_on_the_image_profiles_workers_exactly() {
    if !bpf_available() {
        return;
    }
    let (mut server, pids, _workers) = prefork(3);
    let (mut memscope, dir) = attach("prefork-image", pids[0], &["--follow", "image"], None);
    release(&mut server);
    assert!(server.wait().expect("fixture exits").success());
    assert!(memscope.wait().expect("memscope exits").success());
    let report = read_report(&dir);
    for (i, &worker) in pids[1..].iter().enumerate() {
        let process = report
            .processes
            .iter()
            .find(|p| p.pid == worker)
            .expect("worker");
        assert_eq!(process.totals.live_bytes, worker_leak(i), "worker {i}");
    }
    assert_nothing_lost(&report);
}

/// Check that 200 running workers are all followed under a 1024-descriptor
/// limit, exactly, and that memscope lets go of them quickly.
#[test]
fn two_hundred_workers_are_followed_exactly_and_torn_down_quickly() {
    if !bpf_available() {
        return;
    }
    const WORKERS: usize = 200;
    let (mut server, pids, _workers) = prefork(WORKERS);
    let (mut memscope, dir) = attach("tree-200", pids[0], &[], Some(1024));
    // Teardown with all of them alive and probed.
    let interrupted = Instant::now();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
    assert!(memscope.wait().expect("memscope exits").success());
    let teardown = interrupted.elapsed();
    eprintln!(
        "teardown of {} followed processes: {teardown:?}",
        WORKERS + 1
    );
    assert!(
        teardown < Duration::from_secs(2),
        "teardown took {teardown:?}"
    );
    let report = read_report(&dir);
    let attached = report
        .processes
        .iter()
        .filter(|p| p.following == Following::Attached)
        .count();
    assert_eq!(attached, WORKERS + 1, "{:?}", report.completeness);

    // And again, through the workers' leaks.
    let (mut memscope, dir) = attach("tree-200-leaks", pids[0], &[], Some(1024));
    release(&mut server);
    assert!(server.wait().expect("fixture exits").success());
    assert!(memscope.wait().expect("memscope exits").success());
    let report = read_report(&dir);
    let total: u64 = (0..WORKERS).map(worker_leak).sum();
    assert_eq!(site(&report, "worker_leak_site").live_bytes, total);
    assert_eq!(report.completeness.unfollowed_processes, 0);
    assert_nothing_lost(&report);
}

/// Check that a thread id given to `attach` resolves to its process, and
/// memscope says so.
#[test]
fn attach_to_a_thread_id_profiles_its_process() {
    if !bpf_available() {
        return;
    }
    let mut target = Command::new(fixture("thread_holder"))
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .expect("fixture starts");
    let mut out = BufReader::new(target.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("handshake");
    let tid: u32 = line
        .strip_prefix("thread ")
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("thread line: {line}"));
    assert_ne!(tid, target.id());
    let dir = output_dir("attach-tid");
    let output = Command::new(MEMSCOPE)
        .args(["attach", "-d", "500ms", "-o"])
        .arg(&dir)
        .arg(tid.to_string())
        .output()
        .expect("memscope runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {tid} is a thread of process {}", target.id())),
        "{stderr}"
    );
    assert_eq!(read_report(&dir).target.pid, target.id());
    drop(target.stdin.take());
    let _ = target.wait();
}

/// Check that a second Ctrl-C while memscope ends stops it at once and
/// still leaves no process of the tree stopped.
#[test]
fn a_second_ctrl_c_ends_memscope_at_once_and_leaves_nothing_stopped() {
    if !bpf_available() {
        return;
    }
    let mut storm = Storm::start();
    storm.rate(1);
    let (mut memscope, _) = attach("storm-twice", storm.pid(), &[], None);
    storm.rate(1);
    let pid = memscope.id() as i32;
    // SAFETY: plain syscalls on our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(20));
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = memscope.wait().expect("memscope exits");
    eprintln!("memscope after two Ctrl-C: {status}");
    std::thread::sleep(Duration::from_secs(1));
    let stopped = stopped_in_tree(storm.pid());
    assert!(stopped.is_empty(), "stopped after memscope: {stopped:?}");
    assert!(storm.rate(1) > 0.0, "the target stopped forking");
}

/// memscope's watchdog process (`memscope __watchdog`), found among its
/// children.
fn watchdog_of(memscope: u32) -> u32 {
    memscope::proc_tree::descendants(memscope)
        .into_iter()
        .find(|node| node.ppid == memscope && node.command.contains("__watchdog"))
        .map(|node| node.pid)
        .unwrap_or_else(|| panic!("memscope {memscope} has no watchdog"))
}

/// How long until `pid` has exited (a zombie counts), if within `bound`.
fn time_to_exit(pid: u32, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    // SAFETY: pidfd_open returns a new descriptor or fails.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        // Gone and reaped already.
        return Some(started.elapsed());
    }
    let mut poll = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the descriptor is ours and closed after.
    let ready = unsafe { libc::poll(&mut poll, 1, bound.as_millis() as i32) };
    unsafe { libc::close(fd as i32) };
    (ready == 1).then(|| started.elapsed())
}

/// The kernel's uprobe multi (and session) links whose pid filter is one
/// of `pids`, counted over every BPF link on the host (what `bpftool link`
/// lists). A link is gone only when its last holder closed it: memscope,
/// and its watchdog, which keeps a copy of each.
fn uprobe_links_on(pids: &std::collections::HashSet<u32>) -> usize {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
    const BPF_LINK_TYPE_UPROBE_MULTI: u32 = 12;
    /// offsetof(struct bpf_link_info, uprobe_multi.pid).
    const PID_OFFSET: usize = 60;
    let bpf = |command: libc::c_long, attr: &mut [u32]| {
        // SAFETY: `attr` is a zeroed `union bpf_attr` prefix for `command`.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                attr.as_mut_ptr(),
                std::mem::size_of_val(attr),
            )
        }
    };
    let mut count = 0;
    let mut id = 0u32;
    loop {
        let mut next = [id, 0, 0, 0];
        if bpf(BPF_LINK_GET_NEXT_ID, &mut next) != 0 {
            break;
        }
        id = next[1];
        let mut by_id = [id, 0, 0, 0];
        let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut by_id);
        if fd < 0 {
            continue; // released meanwhile
        }
        let mut info = [0u8; 256];
        let address = info.as_mut_ptr() as u64;
        let mut get_info = [
            fd as u32,
            info.len() as u32,
            address as u32,
            (address >> 32) as u32,
        ];
        let read = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get_info);
        // SAFETY: the descriptor is ours.
        unsafe { libc::close(fd as i32) };
        let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
        if read == 0 && word(0) == BPF_LINK_TYPE_UPROBE_MULTI && pids.contains(&word(PID_OFFSET)) {
            count += 1;
        }
    }
    count
}

/// Uprobes the kernel gave up unregistering so far (dmesg: "failed to
/// unregister, leaking uprobe"): their breakpoints stay in the file's
/// pages until reboot, and another tracer cannot probe there.
fn leaked_uprobes() -> usize {
    let output = Command::new("dmesg").output().expect("dmesg runs");
    assert!(output.status.success(), "dmesg: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.contains("leaking uprobe"))
        .count()
}

/// SIGKILLs memscope while it follows a 300-process tree, `after_ctrl_c`
/// in the middle of its teardown, and checks that its watchdog removes
/// every link as a healthy process (so the kernel leaks no uprobe) and
/// exits, and that nothing is left stopped.
fn sigkill_leaks_no_uprobe(test: &str, after_ctrl_c: bool) {
    const WORKERS: usize = 300;
    let (mut server, pids, _workers) = prefork(WORKERS);
    let tree: std::collections::HashSet<u32> = pids.iter().copied().collect();
    let leaked_before = leaked_uprobes();
    let (mut memscope, _, said) = attach_watching_stderr(test, pids[0], &[], None);
    let watchdog = watchdog_of(memscope.id());
    // One session link per process (Linux 6.13+).
    assert_eq!(uprobe_links_on(&tree), WORKERS + 1);

    if after_ctrl_c {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
        // Killed while the probes come off: memscope used to unregister
        // them itself here, for seconds, and the one it was in leaked.
        let teardown = said
            .iter()
            .find(|line| line.contains("the probes of"))
            .expect("memscope says it removes the probes");
        eprintln!("killed after: {teardown}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed = Instant::now();
    // SAFETY: plain syscall on our own child (at worst a zombie by now).
    unsafe { libc::kill(memscope.id() as i32, libc::SIGKILL) };
    memscope.wait().expect("memscope is reaped");
    let memscope_gone = killed.elapsed();
    let finished = time_to_exit(watchdog, Duration::from_secs(120))
        .map(|_| killed.elapsed())
        .expect("the watchdog exits");
    eprintln!(
        "SIGKILL with {} followed processes: memscope gone after {memscope_gone:?}, its watchdog after {finished:?}",
        WORKERS + 1
    );
    assert_eq!(uprobe_links_on(&tree), 0, "links left after the watchdog");
    assert_eq!(leaked_uprobes(), leaked_before, "the kernel leaked uprobes");
    let stopped = stopped_in_tree(pids[0]);
    assert!(stopped.is_empty(), "stopped after memscope: {stopped:?}");
    // The workers run on unharmed: each leaks and exits 0.
    release(&mut server);
    assert!(server.wait().expect("fixture exits").success());
}

/// Check that SIGKILL of memscope mid-session leaves no link behind once
/// its watchdog, the last holder of each, has exited.
#[test]
fn sigkill_of_memscope_leaves_no_link_once_its_watchdog_exits() {
    if !bpf_available() {
        return;
    }
    sigkill_leaks_no_uprobe("tree-kill", false);
}

/// Check that SIGKILL of memscope while its probes come off leaks no
/// uprobe (dmesg: "failed to unregister, leaking uprobe"): the watchdog,
/// not memscope, unregisters them.
#[test]
fn sigkill_during_teardown_leaks_no_uprobe() {
    if !bpf_available() {
        return;
    }
    sigkill_leaks_no_uprobe("tree-kill-teardown", true);
}

/// Check that memscope ends within 2 s with 500 processes followed, all of
/// them alive and probed: it hands the links to its watchdog, which
/// unregisters them in the background and then exits with none left.
#[test]
fn ending_with_500_followed_processes_takes_under_2s_and_the_watchdog_removes_every_link() {
    if !bpf_available() {
        return;
    }
    const WORKERS: usize = 500;
    let (mut server, pids, _workers) = prefork(WORKERS);
    let tree: std::collections::HashSet<u32> = pids.iter().copied().collect();
    let (mut memscope, dir) = attach("tree-500", pids[0], &[], None);
    let watchdog = watchdog_of(memscope.id());
    assert_eq!(uprobe_links_on(&tree), WORKERS + 1);

    let interrupted = Instant::now();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
    assert!(memscope.wait().expect("memscope exits").success());
    let teardown = interrupted.elapsed();
    let finished = time_to_exit(watchdog, Duration::from_secs(120))
        .map(|_| interrupted.elapsed())
        .expect("the watchdog exits");
    eprintln!(
        "teardown of {} followed processes: memscope exited after {teardown:?}, its watchdog after {finished:?}",
        WORKERS + 1
    );
    assert!(
        teardown < Duration::from_secs(2),
        "teardown took {teardown:?}"
    );
    assert_eq!(uprobe_links_on(&tree), 0, "links left after the watchdog");
    let report = read_report(&dir);
    let attached = report
        .processes
        .iter()
        .filter(|p| p.following == Following::Attached)
        .count();
    assert_eq!(attached, WORKERS + 1, "{:?}", report.completeness);
    assert!(stopped_in_tree(pids[0]).is_empty());
    release(&mut server);
    assert!(server.wait().expect("fixture exits").success());
}
