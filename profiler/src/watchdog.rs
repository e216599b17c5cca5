//! The watchdog: a small process of its own (`memscope __watchdog`) that
//! does what must be done however memscope ends, SIGKILL and panics
//! included:
//!
//! - it continues every process the kernel side holds stopped when memscope
//!   cannot: when one is held past the budget (memscope busy or stopped),
//!   and when memscope has exited. It reads the `HELD` map by id (see
//!   `holds`);
//! - it holds a copy of every probe link memscope makes, passed over a unix
//!   socket (SCM_RIGHTS) as each is made, and at the end it is the one that
//!   unregisters them.
//!
//! Why the links: a link's probes go when its last descriptor closes, and
//! for a uprobe that costs ~3 ms here, serialized in the kernel (each
//! unregistration walks every process mapping the file). memscope used to
//! pay that itself at exit: 3 s for 1000 followed processes. Worse, when
//! memscope was SIGKILLed its dying task released them with a fatal signal
//! pending: the kernel cannot write the original instruction back then,
//! logs "failed to unregister, leaking uprobe", and the breakpoint stays in
//! the file's pages until reboot (bcc's memleak then fails there with a
//! ref_ctr_offset mismatch). Now memscope only drops its own copy, which is
//! never the last, and exits at once; the watchdog, never the one being
//! killed, closes the copies as a healthy process once memscope is gone.
//!
//! NB: it ignores SIGINT, SIGTERM, SIGHUP and SIGQUIT: a Ctrl-C or a closed
//! terminal reaches the whole process group, and the watchdog must outlive
//! memscope. It never outlives its job: once memscope has exited it
//! continues what is held, closes the links (about 3 ms each) and exits. If
//! it is killed too, the kernel releases the links as it would have.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use profiler_common::config;

use crate::{
    holds::{Holds, monotonic_ns},
    target,
};

/// The hidden subcommand that runs the watchdog.
pub const SUBCOMMAND: &str = "__watchdog";
/// How often held processes are checked against the budget.
const SWEEP: Duration = Duration::from_millis(10);
const READY: &str = "ready";
/// Threads that close the links of processes that exit during the session.
const CLOSERS: usize = 16;
/// Threads that close the links left at the end, at most. Most of a close
/// is waiting for RCU grace periods, and those waits overlap: 201 links
/// took 2.3 s on 8 threads, 1.1 s on 64 and 0.78 s on 256 here.
const FINAL_CLOSERS: usize = 1024;
/// A closing thread only drops descriptors.
const CLOSER_STACK: usize = 64 * 1024;

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

/// What memscope tells its watchdog, one message per datagram of the
/// socket (SOCK_SEQPACKET keeps them apart, and each message's
/// descriptors with it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Message {
    kind: u32,
    _pad: u32,
    /// The link's id, memscope's own numbering.
    id: u64,
}

mod message_kind {
    /// One descriptor: a copy of link `id`, to keep until told otherwise
    /// or until memscope has exited.
    pub const KEEP: u32 = 1;
    /// memscope dropped link `id` (its process exited): close the copy.
    pub const CLOSE: u32 = 2;
    /// Two descriptors: the `CONFIG` and `TRACED` maps, to make the
    /// programs do nothing once memscope is gone (see `silence`).
    pub const MAPS: u32 = 3;
}

/// memscope's handle on its watchdog. Dropping it (or memscope's death)
/// tells the watchdog to finish: it continues whatever is still held and
/// closes the links once memscope has exited.
pub struct Watchdog {
    links: Arc<LinkHandoff>,
    child: Child,
}

impl Watchdog {
    /// Starts `exe __watchdog` for the `HELD` map `map_id` and waits until
    /// it has the map open.
    pub fn spawn(exe: &Path, map_id: u32, budget_ns: u64) -> Result<Self, WatchdogError> {
        let spawn_error = |source| WatchdogError::Spawn {
            exe: exe.display().to_string(),
            source,
        };
        let (ours, theirs) = socket_pair().map_err(spawn_error)?;
        // Its end becomes its stdin (dup2 clears close-on-exec); ours stays
        // close-on-exec, so no other child inherits it.
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(map_id.to_string())
            .arg(std::process::id().to_string())
            .arg(budget_ns.to_string())
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(spawn_error)?;
        let Some(stdout) = child.stdout.take() else {
            return Err(WatchdogError::NotReady("no pipe".into()));
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
            links: Arc::new(LinkHandoff {
                socket: ours,
                next_id: AtomicU64::new(1),
            }),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where memscope passes its links.
    pub fn links(&self) -> &Arc<LinkHandoff> {
        &self.links
    }

    /// Gives the watchdog the `CONFIG` and `TRACED` maps, so that once
    /// memscope is gone it can make the programs do nothing before it
    /// unregisters them.
    pub fn give_maps(&self, config: BorrowedFd<'_>, traced: BorrowedFd<'_>) {
        let message = Message {
            kind: message_kind::MAPS,
            ..Message::default()
        };
        if let Err(error) = send(self.links.socket.as_fd(), message, &[config, traced]) {
            tracing::debug!("cannot pass the maps to the watchdog: {error}");
        }
    }
}

/// memscope's end of the socket to its watchdog, shared by whoever makes
/// or drops links.
#[derive(Debug)]
pub struct LinkHandoff {
    socket: OwnedFd,
    next_id: AtomicU64,
}

impl LinkHandoff {
    /// Passes a copy of `link` to the watchdog. None when it could not
    /// take it (gone, or its queue full): memscope's copy is then the only
    /// one, and memscope unregisters the link itself.
    pub fn keep(self: &Arc<Self>, link: BorrowedFd<'_>) -> Option<WatchdogCopy> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = Message {
            kind: message_kind::KEEP,
            id,
            ..Message::default()
        };
        match send_waiting(self.socket.as_fd(), message, &[link]) {
            Ok(()) => Some(WatchdogCopy {
                id,
                handoff: Arc::clone(self),
            }),
            Err(error) => {
                tracing::debug!("the watchdog cannot take link {id}: {error}");
                None
            }
        }
    }
}

/// The watchdog's copy of one link. Dropped after memscope's own copy
/// (see `attach::ProbeLink`), it tells the watchdog to close its copy: the
/// last one, whose close unregisters the probes, in the watchdog.
#[derive(Debug)]
pub struct WatchdogCopy {
    id: u64,
    handoff: Arc<LinkHandoff>,
}

impl Drop for WatchdogCopy {
    fn drop(&mut self) {
        let message = Message {
            kind: message_kind::CLOSE,
            id: self.id,
            ..Message::default()
        };
        // Unsent (the watchdog is gone, or its queue is full): it closes
        // the copy at its end anyway.
        let _ = send(self.handoff.socket.as_fd(), message, &[]);
    }
}

/// Makes memscope's programs do nothing, so that the probes still on
/// while they are being unregistered cost the target only the trap: no
/// process is stopped any more, and no process counts (with `FOLLOW_IMAGE`
/// set the programs count traced processes only, and none is). An entry
/// of the session program that counts nothing also skips its return probe.
pub fn silence(config_map: &mut Map, traced: &mut Map) -> Result<(), MapError> {
    silence_config(config_map)?;
    untrace_all(traced)
}

/// The `CONFIG` half of `silence`.
pub fn silence_config(config_map: &mut Map) -> Result<(), MapError> {
    let mut config_map = Array::<&mut MapData, u32>::try_from(config_map)?;
    config_map.set(config::STOPS_DISABLED, 1, 0)?;
    config_map.set(config::FOLLOW_IMAGE, 1, 0)
}

/// The `TRACED` half of `silence`: no process is traced any more.
pub fn untrace_all(traced: &mut Map) -> Result<(), MapError> {
    let mut traced = BpfHashMap::<&mut MapData, u32, u32>::try_from(traced)?;
    let pids: Vec<u32> = traced.keys().filter_map(Result::ok).collect();
    for pid in pids {
        let _ = traced.remove(&pid);
    }
    Ok(())
}

/// The watchdog process's body: returns once memscope has exited, nothing
/// it held is left stopped, and every link it passed is closed.
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
    // SAFETY: memscope made fd 0 our end of its socket (see `spawn`).
    let socket = unsafe { OwnedFd::from_raw_fd(0) };

    let mut links = Links::default();
    let closers = Closers::start();
    let mut late = 0;
    let mut socket_open = true;
    loop {
        let (readable, exited) = wait(&pidfd, socket_open.then(|| socket.as_fd()), SWEEP);
        let released = holds.release_held_before(monotonic_ns().saturating_sub(budget_ns));
        if released > 0 {
            tracing::debug!(
                released,
                "watchdog continued processes held past the budget"
            );
        }
        late += released;
        if readable {
            socket_open = links.receive(socket.as_fd(), &closers);
        }
        if exited {
            break;
        }
    }
    // memscope's end of the socket is closed now: what it sent is all
    // queued, the last links it made included.
    while socket_open {
        socket_open = links.receive(socket.as_fd(), &closers);
    }
    // memscope's descriptors are closed once it has exited, but the links
    // are not: first make the programs inert, so nothing new is stopped,
    // then continue what memscope left.
    if let Some((config_map, traced)) = links.maps.as_mut()
        && let Err(error) = silence(config_map, traced)
    {
        tracing::debug!("watchdog cannot silence the programs: {error}");
    }
    let left = holds.release_all();
    std::thread::sleep(SWEEP);
    let left = left + holds.release_all();
    if left > 0 {
        eprintln!("memscope watchdog: continued {left} process(es) memscope left stopped");
    }
    if late > 0 {
        tracing::debug!("watchdog continued {late} process(es) held past the budget");
    }
    let count = links.by_id.len();
    let started = Instant::now();
    close_all(std::mem::take(&mut links.by_id).into_values().collect());
    // NB: joined before returning. A thread still inside a close when the
    // process exits would be killed there, and leak that uprobe.
    closers.finish();
    tracing::debug!("watchdog closed {count} links in {:?}", started.elapsed());
    Ok(())
}

/// The copies the watchdog holds.
#[derive(Default)]
struct Links {
    by_id: BTreeMap<u64, OwnedFd>,
    /// `CONFIG` and `TRACED`.
    maps: Option<(Map, Map)>,
}

impl Links {
    /// Takes every message queued on the socket; returns whether it is
    /// still open.
    fn receive(&mut self, socket: BorrowedFd<'_>, closers: &Closers) -> bool {
        loop {
            match receive(socket) {
                Ok(Some((message, fds))) => self.handle(message, fds, closers),
                Ok(None) => return false,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    eprintln!("memscope watchdog: cannot read memscope's socket: {error}");
                    return false;
                }
            }
        }
    }

    fn handle(&mut self, message: Message, mut fds: Vec<OwnedFd>, closers: &Closers) {
        match message.kind {
            message_kind::KEEP => {
                if let Some(fd) = fds.pop() {
                    self.by_id.insert(message.id, fd);
                }
            }
            message_kind::CLOSE => {
                if let Some(fd) = self.by_id.remove(&message.id) {
                    closers.close(fd);
                }
            }
            message_kind::MAPS if fds.len() == 2 => {
                let traced = fds.pop().map(MapData::from_fd);
                let config_map = fds.pop().map(MapData::from_fd);
                if let (Some(Ok(config_map)), Some(Ok(traced))) = (config_map, traced) {
                    self.maps = Some((Map::Array(config_map), Map::HashMap(traced)));
                }
            }
            kind => tracing::debug!(kind, "watchdog: unknown message"),
        }
    }
}

/// Threads closing link copies, off the loop that continues held
/// processes: a close can take milliseconds.
struct Closers {
    queue: mpsc::Sender<OwnedFd>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Closers {
    fn start() -> Self {
        let (queue, pending) = mpsc::channel::<OwnedFd>();
        let pending = Arc::new(Mutex::new(pending));
        let threads = (0..CLOSERS)
            .filter_map(|i| {
                let pending = Arc::clone(&pending);
                std::thread::Builder::new()
                    .name(format!("close-{i}"))
                    .stack_size(CLOSER_STACK)
                    .spawn(move || {
                        loop {
                            let next = match pending.lock() {
                                Ok(pending) => pending.recv(),
                                Err(_) => return,
                            };
                            match next {
                                Ok(link) => drop(link),
                                Err(_) => return,
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        Self { queue, threads }
    }

    fn close(&self, link: OwnedFd) {
        if self.threads.is_empty() {
            drop(link);
            return;
        }
        if let Err(unsent) = self.queue.send(link) {
            drop(unsent.0);
        }
    }

    /// Waits until every link given is closed.
    fn finish(self) {
        drop(self.queue);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Closes `links` on as many threads as there are links, up to
/// `FINAL_CLOSERS`, and returns once all are closed. In the order they
/// were made: the tracepoints first, which run for every process on the
/// host.
fn close_all(links: Vec<OwnedFd>) {
    let per_thread = links.len().div_ceil(FINAL_CLOSERS).max(1);
    let mut links = links.into_iter();
    std::thread::scope(|scope| {
        loop {
            let chunk: Vec<OwnedFd> = links.by_ref().take(per_thread).collect();
            if chunk.is_empty() {
                break;
            }
            let spawned = std::thread::Builder::new()
                .stack_size(CLOSER_STACK)
                .spawn_scoped(scope, move || drop(chunk));
            // Out of threads: the rest close here, one by one.
            if spawned.is_err() {
                links.by_ref().for_each(drop);
            }
        }
    });
}

/// Polls memscope's pidfd and, while it is open, its socket for up to
/// `timeout`: (socket readable or closed, memscope exited).
fn wait(pidfd: &OwnedFd, socket: Option<BorrowedFd<'_>>, timeout: Duration) -> (bool, bool) {
    let mut fds = [
        libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: socket.map_or(-1, |socket| socket.as_raw_fd()),
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

/// The most descriptors one message carries.
const MAX_FDS: usize = 2;

fn socket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array.
    let made = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if made != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Control-message room for `MAX_FDS` descriptors, aligned for cmsghdr.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// Sends one message with `fds` attached. Never blocks: a watchdog that is
/// stopped or gone must not hold memscope up.
fn send(socket: BorrowedFd<'_>, message: Message, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    debug_assert!(fds.len() <= MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: (&raw const message).cast_mut().cast(),
        iov_len: size_of::<Message>(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        header.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        header.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        // SAFETY: the control buffer holds CMSG_SPACE(data_len) bytes, so
        // its first header and that many data bytes are in bounds.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&raw const header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: the header points at live buffers for the whole call.
    let sent = unsafe {
        libc::sendmsg(
            socket.as_raw_fd(),
            &raw const header,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `send`, waiting up to `KEEP_WAIT` for room: the watchdog drains the
/// socket as it wakes, and a link it does not get is one memscope must
/// unregister itself (and may be killed doing so). A CLOSE is never
/// waited for: the watchdog closes every copy at its end anyway.
fn send_waiting(
    socket: BorrowedFd<'_>,
    message: Message,
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    const KEEP_WAIT: Duration = Duration::from_millis(200);
    let deadline = Instant::now() + KEEP_WAIT;
    loop {
        match send(socket, message, fds) {
            Err(error)
                if error.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
            {
                let mut poll = libc::pollfd {
                    fd: socket.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&raw mut poll, 1, 10) };
            }
            sent => return sent,
        }
    }
}

/// Receives one message and its descriptors; None at the end of the
/// stream (memscope closed its end).
fn receive(socket: BorrowedFd<'_>) -> std::io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut message = Message::default();
    let mut iov = libc::iovec {
        iov_base: (&raw mut message).cast(),
        iov_len: size_of::<Message>(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &raw mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.0.as_mut_ptr().cast();
    header.msg_controllen = control.0.len();
    // SAFETY: the header points at live buffers for the whole call.
    let read = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &raw mut header,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if read < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if read == 0 {
        return Ok(None);
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG
    // macros stay within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&raw const header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        // Out of descriptors: that link is memscope's alone to close.
        eprintln!("memscope watchdog: a link could not be received (descriptor limit?)");
    }
    Ok(Some((message, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that a message and its descriptors cross the socket, and
    /// that the end of the stream is seen once the sender closes.
    #[test]
    fn messages_carry_their_descriptors() {
        let (ours, theirs) = socket_pair().expect("socketpair");
        let (read_end, write_end) = {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: pipe writes two descriptors into the array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: both are new and ours.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        let message = Message {
            kind: message_kind::KEEP,
            id: 42,
            ..Message::default()
        };
        send(ours.as_fd(), message, &[write_end.as_fd()]).expect("send");
        drop(write_end);
        let (got, fds) = receive(theirs.as_fd())
            .expect("receive")
            .expect("a message");
        assert_eq!((got.kind, got.id, fds.len()), (message_kind::KEEP, 42, 1));
        // The copy is the pipe's write end: closing it ends the pipe.
        let mut file = std::fs::File::from(fds.into_iter().next().expect("fd"));
        std::io::Write::write_all(&mut file, b"x").expect("write through the copy");
        drop(file);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read_end), &mut text).expect("read");
        assert_eq!(text, "x");
        assert!(matches!(
            receive(theirs.as_fd()),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
        ));
        drop(ours);
        assert!(receive(theirs.as_fd()).expect("end").is_none());
    }
}
