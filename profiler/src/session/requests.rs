//! The session's requests (`--request-fn`): the handler probed in every
//! followed process whose files define it natively, found among the named
//! Python frames where it is a Python function, and the kernel's request
//! records read as they come.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use profiler_common::{
    MAX_KEEP_AFTER, MAX_PYTHON_HANDLERS, PythonHandlers, RequestRecord, config, map_names,
    request_flags,
};
use tokio::io::unix::AsyncFd;

use super::{Session, SessionError};
use crate::{
    alert::{AlertRequest, RequestFigures},
    attach,
    collect::RecordedPythonStack,
    follow::FollowError,
    process_maps::ProcessMaps,
    requests::{RequestFn, RequestLog, RequestsReport},
};

/// How often the request ring is read: the kernel side wakes memscope only
/// when it is a quarter full (a wakeup per request would cost the target
/// microseconds each).
pub(super) const REQUEST_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// `--request-fn` and `--keep-after`.
#[derive(Clone, Debug)]
pub struct RequestOptions {
    pub function: RequestFn,
    pub keep_after: u32,
}

/// Requests as the session follows them.
pub(super) struct Requests {
    options: RequestOptions,
    pub(super) log: RequestLog,
    /// Taken by `wait` while it runs.
    pub(super) ring: Option<AsyncFd<RingBuf<MapData>>>,
    /// (probe owner, file) pairs whose handler is probed.
    probed: HashSet<(u32, PathBuf)>,
    /// The handler's file offset by file (device, inode); `None`: the file
    /// does not define it.
    offsets: HashMap<(u64, u64), Option<u64>>,
    /// The handler's code objects per CPython process.
    python: HashMap<u32, Vec<u64>>,
    /// Where the handler was found, said on stderr: a native file once, a
    /// Python process each (a load script waits for its workers).
    found: HashSet<String>,
    /// What was found before the banner (`Session::announce_requests`).
    unsaid: Option<Vec<String>>,
}

impl Requests {
    /// Turns tagging on in the kernel side and takes the request ring.
    pub(super) fn start(
        ebpf: &mut aya::Ebpf,
        options: RequestOptions,
    ) -> Result<Self, SessionError> {
        let missing = |name| SessionError::Follow(FollowError::Missing(name));
        let map_error = |source| {
            SessionError::Follow(FollowError::Map {
                name: map_names::CONFIG,
                source,
            })
        };
        let mut settings: Array<&mut MapData, u32> = Array::try_from(
            ebpf.map_mut(map_names::CONFIG)
                .ok_or(missing(map_names::CONFIG))?,
        )
        .map_err(map_error)?;
        let keep_after = options.keep_after.clamp(1, MAX_KEEP_AFTER as u32);
        settings
            .set(config::KEEP_AFTER, keep_after, 0)
            .map_err(map_error)?;
        settings.set(config::REQUESTS, 1, 0).map_err(map_error)?;
        let ring = ebpf
            .take_map(map_names::REQUEST_EVENTS)
            .and_then(|map| RingBuf::try_from(map).ok())
            .ok_or(missing(map_names::REQUEST_EVENTS))?;
        // SAFETY: the ring buffer's descriptor lives as long as the AsyncFd.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| SessionError::Watch {
            pid: 0,
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            options: RequestOptions {
                keep_after,
                ..options
            },
            log: RequestLog::default(),
            ring: Some(ring),
            probed: HashSet::new(),
            offsets: HashMap::new(),
            python: HashMap::new(),
            found: HashSet::new(),
            unsaid: Some(Vec::new()),
        })
    }

    /// Where the handler starts in `path`, cached by file.
    fn offset(&mut self, host_path: &std::path::Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(host_path).ok()?;
        *self
            .offsets
            .entry((meta.dev(), meta.ino()))
            .or_insert_with(|| attach::handler_offset(host_path, &self.options.function.function))
    }

    /// Says once per `place` where the handler was found.
    fn announce(&mut self, place: String, what: std::fmt::Arguments<'_>) {
        if !self.found.insert(place) {
            return;
        }
        let line = format!(
            "memscope: request handler {} found {what}",
            self.options.function
        );
        match &mut self.unsaid {
            Some(unsaid) => unsaid.push(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Session {
    /// Says where the handler was found so far, and from now on as found:
    /// after the banner, which a script waits for first.
    pub fn announce_requests(&mut self) {
        if let Some(requests) = self.requests.as_mut() {
            for line in requests.unsaid.take().unwrap_or_default() {
                eprintln!("{line}");
            }
        }
    }

    /// Probes the native handler in `pid`'s files that define it (each file
    /// once per probe owner): at attach, at a fork or exec, and as the
    /// maps refresh (a library loaded late).
    pub(super) fn probe_request_fn(&mut self, pid: u32, maps: &ProcessMaps) {
        if self.tearing_down {
            return;
        }
        let owner = self.kernel.probe_owner(pid);
        let Some(requests) = self.requests.as_mut() else {
            return;
        };
        let mut files: Vec<(PathBuf, u64)> = Vec::new();
        for mapping in maps.mappings.iter().filter(|m| m.executable) {
            let Some(file) = &mapping.path else {
                continue;
            };
            let named = file
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| requests.options.function.names_file(name));
            if !named || !requests.probed.insert((owner, file.clone())) {
                continue;
            }
            if let Some(offset) = requests.offset(&maps.host_path(file)) {
                files.push((file.clone(), offset));
            }
        }
        for (file, offset) in files {
            match attach::attach_request_fn(&mut self.kernel.programs(), pid, maps, &file, offset) {
                Ok(Some(links)) => {
                    self.links.entry(owner).or_default().extend(links);
                    if let Some(requests) = self.requests.as_mut() {
                        requests.announce(
                            file.display().to_string(),
                            format_args!("in {} (pid {pid})", file.display()),
                        );
                    }
                }
                Ok(None) => self.warn_once(
                    "--request-fn on a native function needs multi-uprobe links (Linux 6.6+)"
                        .to_owned(),
                ),
                Err(error) => self.warn_once(format!(
                    "the request handler in {} cannot be probed: {error}",
                    file.display()
                )),
            }
        }
    }

    /// A new Python stack of `stack.tgid`: any of its frames that runs the
    /// handler makes that code object the handler, in its process and in
    /// every other CPython process where the same address holds the same
    /// function (pre-fork workers).
    pub(super) fn find_python_handler(&mut self, stack: &RecordedPythonStack) {
        let Some(function) = self.requests.as_ref().map(|r| r.options.function.clone()) else {
            return;
        };
        for frame in &stack.frames {
            let location = self.symbolizer.python_location(stack.tgid, frame);
            if !function.names_python(&location.function, &location.file) {
                continue;
            }
            let mut pids: Vec<u32> = self.alive.iter().collect();
            pids.retain(|&pid| pid != stack.tgid && self.symbolizer.is_python(pid));
            pids.insert(0, stack.tgid);
            for pid in pids {
                let there = self.symbolizer.python_location(pid, frame);
                if function.names_python(&there.function, &there.file) {
                    self.add_python_handler(pid, frame.code, &location.file);
                }
            }
        }
    }

    fn add_python_handler(&mut self, pid: u32, code: u64, file: &str) {
        let Some(requests) = self.requests.as_mut() else {
            return;
        };
        let codes = requests.python.entry(pid).or_default();
        if codes.contains(&code) || codes.len() >= MAX_PYTHON_HANDLERS {
            return;
        }
        codes.push(code);
        let mut handlers = PythonHandlers::default();
        handlers.codes[..codes.len()].copy_from_slice(codes);
        requests.announce(pid.to_string(), format_args!("in {file} (pid {pid})"));
        tracing::debug!(pid, code, "python request handler");
        if let Err(error) =
            super::python::insert_into(&mut self.kernel.ebpf, map_names::PY_HANDLERS, pid, handlers)
        {
            tracing::warn!("request handler of pid {pid}: {error}");
        }
    }

    /// A forked child runs its parent's code: the kernel copied its
    /// handlers; these are what later ones are added to.
    pub(super) fn python_handlers_forked(&mut self, parent: u32, child: u32) {
        if let Some(requests) = self.requests.as_mut()
            && let Some(codes) = requests.python.get(&parent).cloned()
        {
            requests.python.insert(child, codes);
        }
    }

    /// An exec replaced the process's code.
    pub(super) fn python_handlers_gone(&mut self, pid: u32) {
        if let Some(requests) = self.requests.as_mut() {
            requests.python.remove(&pid);
        }
    }

    /// Takes the records on the ring into the log; a request that retained
    /// past `--alert-growth` raises an alert.
    pub(super) fn drain_requests(&mut self, ring: &mut RingBuf<MapData>) {
        for record in super::lifecycle::ring_records::<RequestRecord>(ring) {
            let Some(requests) = self.requests.as_mut() else {
                return;
            };
            let Some(closed) = requests.log.record(&record).copied() else {
                continue;
            };
            self.request_alert(&closed);
        }
    }

    fn request_alert(&mut self, closed: &RequestRecord) {
        let seconds = |ns: u64| ns.saturating_sub(self.started_ns) as f64 / 1e9;
        let figures = RequestFigures {
            at_s: seconds(closed.end_ns),
            window: self.timeline.windows().len(),
            request: AlertRequest {
                pid: closed.tgid,
                tid: closed.tid,
                start_s: seconds(closed.start_ns),
                duration_ms: closed.end_ns.saturating_sub(closed.start_ns) as f64 / 1e6,
            },
            retained_bytes: closed.retained_bytes,
        };
        let Some(mut alerter) = self.alerter.take() else {
            return;
        };
        let alert = alerter.on_request(&figures, || {
            match crate::collect::request_blocks(&self.kernel.ebpf, &self.front, closed.id) {
                Ok(mut kept) => {
                    kept.truncate(4 * crate::alert::ALERT_SITES);
                    self.name_sites(&kept)
                }
                Err(error) => {
                    tracing::warn!("sites of a request: {error}");
                    Vec::new()
                }
            }
        });
        self.alerter = Some(alerter);
        if let Some(alert) = alert {
            self.send_alert(alert);
        }
    }

    /// The report's `requests`, its sites still to name: what the ring
    /// still holds, and the requests still open.
    pub(super) fn requests_report(&mut self) -> Option<RequestsReport> {
        let mut ring = self.requests.as_mut()?.ring.take();
        if let Some(ring) = ring.as_mut() {
            self.drain_requests(ring.get_mut());
        }
        let open = open_requests(&self.kernel.ebpf);
        let started_ns = self.started_ns;
        let requests = self.requests.as_mut()?;
        requests.ring = ring;
        Some(requests.log.report(
            &requests.options.function,
            requests.options.keep_after,
            started_ns,
            open,
            Vec::new(),
        ))
    }
}

/// Requests the kernel still has open (not partial ones).
fn open_requests(ebpf: &aya::Ebpf) -> u64 {
    let Some(map) = ebpf.map(map_names::REQUESTS) else {
        return 0;
    };
    let Ok(requests) = BpfHashMap::<&MapData, u64, RequestRecord>::try_from(map) else {
        return 0;
    };
    requests
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, r)| r.end_ns == 0 && r.flags & request_flags::PARTIAL == 0)
        .count() as u64
}
