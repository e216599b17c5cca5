//! Requests (`--request-fn`): what each call of a handler allocated, still
//! held at its return ("retained") and still held `keep_after` requests of
//! its process later ("kept"). The kernel side tags allocations with the
//! request open on their thread and sends two records per request (see
//! profiler-ebpf `request`); this module names the handler and sums the
//! records into the report's `requests`.

use std::collections::{BTreeMap, HashMap};

use profiler_common::{RequestRecord, request_event, request_flags};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::report::Site;

/// `--keep-after` unless given.
pub const DEFAULT_KEEP_AFTER: u32 = 10;
/// Requests the report lists one by one: the largest by retained bytes.
pub const LARGEST_REQUESTS: usize = 10;
/// Distinct byte figures kept exactly per distribution; past it, figures
/// are rounded to 1/1024 of themselves (the report says so).
const EXACT_FIGURES: usize = 1 << 16;

/// The handler: `SYMBOL`, or `MODULE:SYMBOL`. In a native program MODULE
/// names a mapped file (`libfoo.so`, `libfoo`); in CPython it is the
/// Python module (`app`, `pkg.views`) and SYMBOL the function (`analyze`,
/// `Service.analyze`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestFn {
    pub module: Option<String>,
    pub function: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid --request-fn {0:?}: expected FUNCTION or MODULE:FUNCTION (handle_request, app:analyze, libfoo.so:handle)"
)]
pub struct RequestFnError(String);

impl std::str::FromStr for RequestFn {
    type Err = RequestFnError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let error = || RequestFnError(spec.to_owned());
        let (module, function) = match spec.rsplit_once(':') {
            Some((module, function)) => (Some(module.trim()), function.trim()),
            None => (None, spec.trim()),
        };
        let bad = |s: &str| s.is_empty() || s.chars().any(char::is_whitespace);
        if bad(function) || module.is_some_and(bad) {
            return Err(error());
        }
        Ok(Self {
            module: module.map(str::to_owned),
            function: function.to_owned(),
        })
    }
}

impl std::fmt::Display for RequestFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.module {
            Some(module) => write!(f, "{module}:{}", self.function),
            None => f.write_str(&self.function),
        }
    }
}

impl RequestFn {
    /// Whether a mapped file (by its file name) is where a native handler
    /// is looked for: any, without a module.
    pub fn names_file(&self, file_name: &str) -> bool {
        match &self.module {
            None => true,
            Some(module) => {
                file_name == module
                    || file_name
                        .strip_prefix(module.as_str())
                        .is_some_and(|rest| rest.starts_with('.'))
            }
        }
    }

    /// Whether a Python function (its qualified name and `co_filename`) is
    /// the handler: `analyze` names `analyze` and `Service.analyze`;
    /// module `app` names `.../app.py` and `.../app/__init__.py`.
    pub fn names_python(&self, qualname: &str, file: &str) -> bool {
        let function = qualname == self.function
            || qualname
                .strip_suffix(self.function.as_str())
                .is_some_and(|outer| outer.ends_with('.'));
        let Some(module) = &self.module else {
            return function;
        };
        let path = module.replace('.', "/");
        let in_module = |suffix: &str| {
            file == suffix
                || file
                    .strip_suffix(suffix)
                    .is_some_and(|dir| dir.ends_with('/'))
        };
        function && (in_module(&format!("{path}.py")) || in_module(&format!("{path}/__init__.py")))
    }
}

/// How many requests had each figure, exactly while few are distinct.
#[derive(Clone, Debug, Default)]
struct Distribution {
    counts: BTreeMap<u64, u64>,
    total: u64,
    max: u64,
    rounded: bool,
}

impl Distribution {
    fn add(&mut self, bytes: u64) {
        self.total += 1;
        self.max = self.max.max(bytes);
        let bytes = if self.rounded { round(bytes) } else { bytes };
        *self.counts.entry(bytes).or_default() += 1;
        if self.counts.len() > EXACT_FIGURES {
            self.rounded = true;
            let mut rounded = BTreeMap::new();
            for (bytes, count) in std::mem::take(&mut self.counts) {
                *rounded.entry(round(bytes)).or_default() += count;
            }
            self.counts = rounded;
        }
    }

    /// The nearest-rank percentile: the smallest figure at least `share`
    /// of the requests do not exceed.
    fn percentile(&self, share: f64) -> u64 {
        let rank = ((share * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bytes, count) in &self.counts {
            seen += count;
            if seen >= rank {
                return *bytes;
            }
        }
        self.max
    }

    fn summary(&self) -> Option<Percentiles> {
        (self.total > 0).then(|| Percentiles {
            p50: self.percentile(0.50),
            p95: self.percentile(0.95),
            max: self.max,
        })
    }
}

/// Down to 10 significant bits.
fn round(bytes: u64) -> u64 {
    let shift = (64 - bytes.leading_zeros()).saturating_sub(10);
    bytes >> shift << shift
}

/// Nearest-rank percentiles over the requests, exact unless
/// `approximate`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Percentiles {
    /// The median.
    pub p50: u64,
    /// The 95th percentile.
    pub p95: u64,
    /// The largest (always exact).
    pub max: u64,
}

/// One request as the report lists it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequestReport {
    /// The process.
    pub pid: u32,
    /// The thread that ran it.
    pub tid: u32,
    /// Seconds after the session started.
    pub start_s: f64,
    /// From the handler's entry to its return, in milliseconds.
    pub duration_ms: f64,
    /// Allocations it made.
    pub alloc_count: u64,
    /// Bytes it allocated.
    pub alloc_bytes: u64,
    /// Of those, bytes still live at its return.
    pub retained_bytes: u64,
    /// `None` until `keep_after` more requests of its process closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_bytes: Option<u64>,
}

/// report.json's `requests`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequestsReport {
    /// The handler, as given (`--request-fn`).
    pub function: String,
    /// Kept bytes are a request's live bytes this many requests of its
    /// process later.
    pub keep_after: u32,
    /// Requests that closed (entry to return seen).
    pub count: u64,
    /// Of those, how many have a kept figure (the last `keep_after` of a
    /// process have none yet).
    pub kept_count: u64,
    /// Still open when the session ended.
    pub open: u64,
    /// Python requests that may have begun before memscope knew the
    /// handler: left out of every figure.
    pub partial: u64,
    /// What each request allocated; absent when none has the figure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc_bytes: Option<Percentiles>,
    /// What each still held at its return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_bytes: Option<Percentiles>,
    /// What each still held `keep_after` requests later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_bytes: Option<Percentiles>,
    /// More distinct figures than kept exactly: percentiles are within
    /// 0.1% (max is exact).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
    /// The requests that retained most.
    pub largest: Vec<RequestReport>,
    /// Where the blocks requests allocated and still hold at the end were
    /// allocated: the sites that keep, by live bytes.
    pub sites: Vec<Site>,
}

/// The records of a session, summed as they come.
#[derive(Debug, Default)]
pub struct RequestLog {
    /// Closed, waiting for their kept figure, by id.
    waiting: HashMap<u64, RequestRecord>,
    count: u64,
    kept_count: u64,
    partial: u64,
    alloc: Distribution,
    retained: Distribution,
    kept: Distribution,
    /// The largest by retained bytes, with kept filled in when it comes.
    largest: Vec<RequestRecord>,
}

impl RequestLog {
    /// Takes one record from the kernel's ring; returns the request when it
    /// just closed (for alerts), partial ones excepted.
    pub fn record(&mut self, record: &RequestRecord) -> Option<&RequestRecord> {
        if record.flags & request_flags::PARTIAL != 0 {
            if record.kind == request_event::CLOSED {
                self.partial += 1;
            }
            return None;
        }
        match record.kind {
            request_event::CLOSED => {
                self.count += 1;
                self.alloc.add(record.alloc_bytes);
                self.retained.add(record.retained_bytes);
                self.consider_largest(record);
                self.waiting.insert(record.id, *record);
                self.waiting.get(&record.id)
            }
            request_event::KEPT => {
                // A KEPT without its CLOSED was lost on the ring (counted).
                if self.waiting.remove(&record.id).is_some() {
                    self.kept_count += 1;
                    self.kept.add(record.kept_bytes);
                    if let Some(listed) = self.largest.iter_mut().find(|r| r.id == record.id) {
                        listed.kept_bytes = record.kept_bytes;
                        listed.kind = request_event::KEPT;
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn consider_largest(&mut self, record: &RequestRecord) {
        self.largest.push(*record);
        self.largest.sort_by(|a, b| {
            b.retained_bytes
                .cmp(&a.retained_bytes)
                .then(a.id.cmp(&b.id))
        });
        self.largest.truncate(LARGEST_REQUESTS);
    }

    /// Requests closed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The summary, given the session's clock start, the requests still
    /// open at the end and the sites that keep.
    pub fn report(
        &self,
        function: &RequestFn,
        keep_after: u32,
        started_ns: u64,
        open: u64,
        sites: Vec<Site>,
    ) -> RequestsReport {
        let seconds = |ns: u64| ns.saturating_sub(started_ns) as f64 / 1e9;
        RequestsReport {
            function: function.to_string(),
            keep_after,
            count: self.count,
            kept_count: self.kept_count,
            open,
            partial: self.partial,
            alloc_bytes: self.alloc.summary(),
            retained_bytes: self.retained.summary(),
            kept_bytes: self.kept.summary(),
            approximate: self.alloc.rounded || self.retained.rounded || self.kept.rounded,
            largest: self
                .largest
                .iter()
                .map(|r| RequestReport {
                    pid: r.tgid,
                    tid: r.tid,
                    start_s: seconds(r.start_ns),
                    duration_ms: r.end_ns.saturating_sub(r.start_ns) as f64 / 1e6,
                    alloc_count: r.alloc_count,
                    alloc_bytes: r.alloc_bytes,
                    retained_bytes: r.retained_bytes,
                    kept_bytes: (r.kind == request_event::KEPT).then_some(r.kept_bytes),
                })
                .collect(),
            sites,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record(id: u64, kind: u32, retained: u64, kept: u64) -> RequestRecord {
        RequestRecord {
            id,
            tgid: 7,
            tid: 8,
            start_ns: 1_000_000_000,
            end_ns: 1_002_000_000,
            alloc_count: 2,
            alloc_bytes: retained + 100,
            retained_bytes: retained,
            kept_bytes: kept,
            kind,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn specs_parse_with_and_without_a_module() {
        let spec: RequestFn = "app:analyze".parse().expect("parses");
        assert_eq!(spec.module.as_deref(), Some("app"));
        assert_eq!(spec.function, "analyze");
        let spec: RequestFn = "handle_request".parse().expect("parses");
        assert_eq!(spec.module, None);
        for bad in ["", ":f", "m:", "a b", "m: "] {
            assert!(bad.parse::<RequestFn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn python_handlers_match_by_function_and_module_file() {
        let spec: RequestFn = "app:analyze".parse().expect("parses");
        assert!(spec.names_python("analyze", "/srv/app.py"));
        assert!(spec.names_python("Service.analyze", "app.py"));
        assert!(spec.names_python("analyze", "/srv/app/__init__.py"));
        assert!(!spec.names_python("analyze", "/srv/myapp.py"));
        assert!(!spec.names_python("reanalyze", "/srv/app.py"));
        assert!(!spec.names_python("analyze", "/usr/lib/flask/app.pyc"));
        let spec: RequestFn = "pkg.views:get".parse().expect("parses");
        assert!(spec.names_python("get", "/srv/pkg/views.py"));
        assert!(!spec.names_python("get", "/srv/views.py"));
    }

    #[test]
    fn native_modules_match_file_names() {
        let spec: RequestFn = "libfoo:handle".parse().expect("parses");
        assert!(spec.names_file("libfoo.so.1"));
        assert!(spec.names_file("libfoo"));
        assert!(!spec.names_file("libfoobar.so"));
        let any: RequestFn = "handle".parse().expect("parses");
        assert!(any.names_file("server"));
    }

    #[test]
    fn closed_and_kept_records_make_the_figures() {
        let mut log = RequestLog::default();
        for id in 1..=20 {
            assert!(
                log.record(&record(id, request_event::CLOSED, 65536, 0))
                    .is_some()
            );
        }
        for id in 1..=10 {
            log.record(&record(id, request_event::KEPT, 0, 65536));
        }
        let spec: RequestFn = "h".parse().expect("parses");
        let report = log.report(&spec, 10, 0, 1, Vec::new());
        assert_eq!(report.count, 20);
        assert_eq!(report.kept_count, 10);
        assert_eq!(report.open, 1);
        let exact = Some(Percentiles {
            p50: 65536,
            p95: 65536,
            max: 65536,
        });
        assert_eq!(report.retained_bytes, exact);
        assert_eq!(report.kept_bytes, exact);
        assert_eq!(report.largest.len(), LARGEST_REQUESTS);
        assert_eq!(report.largest[0].kept_bytes, Some(65536));
        assert_eq!(report.largest[0].duration_ms, 2.0);
    }

    #[test]
    fn partial_requests_are_counted_apart() {
        let mut log = RequestLog::default();
        let partial = RequestRecord {
            flags: request_flags::PARTIAL,
            ..record(1, request_event::CLOSED, 5, 0)
        };
        assert!(log.record(&partial).is_none());
        let spec: RequestFn = "h".parse().expect("parses");
        let report = log.report(&spec, 10, 0, 0, Vec::new());
        assert_eq!((report.count, report.partial), (0, 1));
        assert_eq!(report.retained_bytes, None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut d = Distribution::default();
        for bytes in 1..=100 {
            d.add(bytes);
        }
        assert_eq!(
            d.summary(),
            Some(Percentiles {
                p50: 50,
                p95: 95,
                max: 100
            })
        );
    }

    proptest! {
        #[test]
        fn percentiles_match_a_sorted_list(values in prop::collection::vec(0u64..1 << 40, 1..300)) {
            let mut d = Distribution::default();
            for v in &values {
                d.add(*v);
            }
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let rank = |share: f64| sorted[((share * sorted.len() as f64).ceil() as usize).max(1) - 1];
            prop_assert_eq!(d.percentile(0.5), rank(0.5));
            prop_assert_eq!(d.percentile(0.95), rank(0.95));
            prop_assert_eq!(d.max, *sorted.last().unwrap_or(&0));
        }

        #[test]
        fn rounding_keeps_ten_bits(bytes in 0u64..u64::MAX) {
            let r = round(bytes);
            prop_assert!(r <= bytes);
            prop_assert!(bytes - r <= bytes >> 9);
        }
    }
}
