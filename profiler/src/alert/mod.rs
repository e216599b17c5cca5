//! Alerts: growth per window past a threshold, and the followed processes'
//! resident memory crossing warning / critical / emergency shares of their
//! memory limit. Deciding is a pure function of each window (`Alerter`);
//! saying is the sinks' (one `Sink` per destination, fed by the window
//! tick).

mod exec;
pub mod limit;
mod stream;
mod webhook;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::{
    exec::ExecSink,
    stream::{JsonLinesSink, StderrSink},
    webhook::{WebhookError, WebhookSink, check as check_webhook},
};

/// Growth alerts repeat at most this often; the ones held back are
/// counted in the next.
pub const REPEAT_AFTER_S: f64 = 60.0;

/// `--alert-growth` with `--request-fn` unless given: 50 MB a request.
pub const DEFAULT_REQUEST_GROWTH: u64 = 50 << 20;

/// Sites an alert names.
pub const ALERT_SITES: usize = 3;

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// A window grew the live bytes by more than `--alert-growth`.
    Growth,
    /// Resident memory crossed a level of the memory limit.
    Rss,
    /// A request retained more than `--alert-growth` (with `--request-fn`).
    Request,
}

/// How serious an alert is: growth and request alerts are warnings, RSS
/// alerts name the level of the memory limit crossed.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum AlertLevel {
    /// A level that was crossed is no longer.
    Cleared,
    /// Past the warning share of the memory limit (every growth and request
    /// alert).
    Warning,
    /// Past the critical share.
    Critical,
    /// Past the emergency share.
    Emergency,
}

impl std::fmt::Display for AlertLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cleared => "cleared",
            Self::Warning => "warning",
            Self::Critical => "critical",
            Self::Emergency => "emergency",
        })
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Growth => "growth",
            Self::Rss => "rss",
            Self::Request => "request",
        })
    }
}

/// A site an alert names, with what it grew in the window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AlertSite {
    /// Its frames as the table shows them: `leak_site <- main`.
    pub site: String,
    /// What it grew by.
    pub growth_bytes: i64,
}

/// One alert: what crossed which threshold, when, and the sites that grew
/// most then (the answer, not just the symptom).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Alert {
    /// What crossed its threshold.
    pub kind: AlertKind,
    /// How serious.
    pub level: AlertLevel,
    /// Seconds after the session started (the window's end).
    pub at_s: f64,
    /// The window it was raised in.
    pub window: usize,
    /// The window's growth, the request's retained bytes or the RSS.
    pub value_bytes: u64,
    /// The threshold it crossed (for `cleared`, the level left, in bytes).
    pub threshold_bytes: u64,
    /// The memory limit the RSS levels are shares of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// The alert in words, naming the site that grew most.
    pub message: String,
    /// The stacks that grew most in the window (for `request`: where the
    /// request's blocks still live were allocated).
    pub top_sites: Vec<AlertSite>,
    /// Alerts of this kind held back since the last one (rate limit).
    #[serde(default)]
    pub held_back: u64,
    /// The request a `request` alert is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AlertRequest>,
}

/// The request that retained too much.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AlertRequest {
    /// The process.
    pub pid: u32,
    /// The thread that ran it.
    pub tid: u32,
    /// Seconds after the session started.
    pub start_s: f64,
    /// From the handler's entry to its return, in milliseconds.
    pub duration_ms: f64,
}

/// A request as the alerts see it, at its return.
#[derive(Clone, Debug)]
pub struct RequestFigures {
    pub at_s: f64,
    /// The window it returned in.
    pub window: usize,
    pub request: AlertRequest,
    pub retained_bytes: u64,
}

/// The RSS levels, as shares of the memory limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RssLevels {
    pub warning: f64,
    pub critical: f64,
    pub emergency: f64,
}

impl Default for RssLevels {
    fn default() -> Self {
        Self {
            warning: 0.60,
            critical: 0.75,
            emergency: 0.85,
        }
    }
}

impl RssLevels {
    /// The highest level `share` reaches, if any.
    fn level_of(&self, share: f64) -> Option<AlertLevel> {
        [
            (self.emergency, AlertLevel::Emergency),
            (self.critical, AlertLevel::Critical),
            (self.warning, AlertLevel::Warning),
        ]
        .into_iter()
        .find(|(at, _)| share >= *at)
        .map(|(_, level)| level)
    }

    fn share(&self, level: AlertLevel) -> f64 {
        match level {
            AlertLevel::Emergency => self.emergency,
            AlertLevel::Critical => self.critical,
            AlertLevel::Warning => self.warning,
            AlertLevel::Cleared => 0.0,
        }
    }
}

/// What alerts are asked for.
#[derive(Clone, Debug, Default)]
pub struct AlertRules {
    /// `--alert-growth`: bytes a window may add to the live bytes.
    pub growth_per_window: Option<u64>,
    /// `--alert-growth` with `--request-fn`: bytes a request may retain.
    pub growth_per_request: Option<u64>,
    pub rss_levels: RssLevels,
    /// What the RSS levels are shares of; None: no RSS alerts.
    pub memory_limit: Option<limit::MemoryLimit>,
}

/// A window as the alerts see it.
#[derive(Clone, Debug, Default)]
pub struct WindowFigures {
    pub index: usize,
    pub end_s: f64,
    pub growth_bytes: i64,
    pub rss_bytes: u64,
    /// The sites that grew most, largest first.
    pub top_sites: Vec<AlertSite>,
}

/// Decides the alerts window by window.
#[derive(Debug)]
pub struct Alerter {
    rules: AlertRules,
    last_growth_s: Option<f64>,
    held_back: u64,
    rss_level: Option<AlertLevel>,
}

impl Alerter {
    pub fn new(rules: AlertRules) -> Self {
        Self {
            rules,
            last_growth_s: None,
            held_back: 0,
            rss_level: None,
        }
    }

    /// The alerts a window raises.
    pub fn on_window(&mut self, window: &WindowFigures) -> Vec<Alert> {
        let mut alerts = Vec::new();
        alerts.extend(self.growth_alert(window));
        alerts.extend(self.rss_alert(window));
        alerts
    }

    /// Whether a growth alert may go out at `at_s`; the held-back count
    /// if so (counting this one held back if not).
    fn growth_may_repeat(&mut self, at_s: f64) -> Option<u64> {
        if self
            .last_growth_s
            .is_some_and(|last| at_s - last < REPEAT_AFTER_S)
        {
            self.held_back += 1;
            return None;
        }
        self.last_growth_s = Some(at_s);
        Some(std::mem::take(&mut self.held_back))
    }

    /// The alert a request raises at its return, if it retained more than
    /// the threshold. `sites` names what it keeps, asked for only when the
    /// alert goes out (it reads the live set).
    pub fn on_request(
        &mut self,
        request: &RequestFigures,
        sites: impl FnOnce() -> Vec<AlertSite>,
    ) -> Option<Alert> {
        let threshold = self.rules.growth_per_request?;
        if request.retained_bytes <= threshold {
            return None;
        }
        let held_back = self.growth_may_repeat(request.at_s)?;
        let top_sites = sites();
        let retained = request.retained_bytes;
        let r = &request.request;
        Some(Alert {
            kind: AlertKind::Request,
            level: AlertLevel::Warning,
            at_s: request.at_s,
            window: request.window,
            value_bytes: retained,
            threshold_bytes: threshold,
            limit_bytes: None,
            message: format!(
                "a request (pid {}, thread {}, {:.1} ms at {:.3}s) retained {retained} bytes (threshold {threshold}){}",
                r.pid,
                r.tid,
                r.duration_ms,
                r.start_s,
                top_site_words(&top_sites)
            ),
            top_sites,
            held_back,
            request: Some(r.clone()),
        })
    }

    fn growth_alert(&mut self, window: &WindowFigures) -> Option<Alert> {
        let threshold = self.rules.growth_per_window?;
        if window.growth_bytes <= threshold as i64 {
            return None;
        }
        let held_back = self.growth_may_repeat(window.end_s)?;
        let grown = window.growth_bytes as u64;
        Some(Alert {
            kind: AlertKind::Growth,
            level: AlertLevel::Warning,
            at_s: window.end_s,
            window: window.index,
            value_bytes: grown,
            threshold_bytes: threshold,
            limit_bytes: None,
            message: format!(
                "window {} grew the live bytes by {grown} (threshold {threshold}){}",
                window.index,
                top_site_words(&window.top_sites)
            ),
            top_sites: window.top_sites.clone(),
            held_back,
            request: None,
        })
    }

    fn rss_alert(&mut self, window: &WindowFigures) -> Option<Alert> {
        let limit = self.rules.memory_limit.as_ref()?;
        let share = window.rss_bytes as f64 / limit.bytes as f64;
        let level = self.rules.rss_levels.level_of(share);
        if level == self.rss_level {
            return None;
        }
        let before = std::mem::replace(&mut self.rss_level, level);
        let percent = share * 100.0;
        let (alert_level, threshold, message) = match (level, before) {
            (Some(now), previous) if previous.is_none_or(|p| now > p) => {
                let at = self.rules.rss_levels.share(now);
                (
                    now,
                    at,
                    format!(
                        "RSS {} bytes is {percent:.0}% of the memory limit ({}, {}): past {} at {:.0}%{}",
                        window.rss_bytes,
                        limit.bytes,
                        limit.source,
                        now,
                        at * 100.0,
                        top_site_words(&window.top_sites)
                    ),
                )
            }
            (now, Some(previous)) => {
                let at = self.rules.rss_levels.share(previous);
                (
                    AlertLevel::Cleared,
                    at,
                    format!(
                        "RSS {} bytes is {percent:.0}% of the memory limit: below {previous} at {:.0}% again{}",
                        window.rss_bytes,
                        at * 100.0,
                        now.map(|n| format!(", still past {n:?}"))
                            .unwrap_or_default()
                    ),
                )
            }
            (_, None) => return None,
        };
        Some(Alert {
            kind: AlertKind::Rss,
            level: alert_level,
            at_s: window.end_s,
            window: window.index,
            value_bytes: window.rss_bytes,
            threshold_bytes: (threshold * limit.bytes as f64) as u64,
            limit_bytes: Some(limit.bytes),
            message,
            top_sites: window.top_sites.clone(),
            held_back: 0,
            request: None,
        })
    }
}

fn top_site_words(sites: &[AlertSite]) -> String {
    match sites.first() {
        Some(site) => format!("; most at {} ({:+} bytes)", site.site, site.growth_bytes),
        None => String::new(),
    }
}

/// Where alerts go: a line on stderr, alerts.jsonl, a webhook, a command.
/// Sending never blocks collection for long: the slow ones queue to a
/// thread of their own.
pub trait Sink: Send {
    fn send(&mut self, alert: &Alert);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(growth: Option<u64>, limit: Option<u64>) -> AlertRules {
        AlertRules {
            growth_per_window: growth,
            growth_per_request: None,
            rss_levels: RssLevels::default(),
            memory_limit: limit.map(|bytes| limit::MemoryLimit {
                bytes,
                source: "test".into(),
            }),
        }
    }

    fn window(index: usize, end_s: f64, growth: i64, rss: u64) -> WindowFigures {
        WindowFigures {
            index,
            end_s,
            growth_bytes: growth,
            rss_bytes: rss,
            top_sites: vec![AlertSite {
                site: "leak_site <- main".into(),
                growth_bytes: growth,
            }],
        }
    }

    /// Check that growth past the threshold alerts with the site's name,
    /// and that repeats within a minute are held back and counted.
    #[test]
    fn growth_alerts_name_the_site_and_are_rate_limited() {
        let mut alerter = Alerter::new(rules(Some(1000), None));
        assert!(alerter.on_window(&window(0, 10.0, 1000, 0)).is_empty());
        let first = alerter.on_window(&window(1, 20.0, 5000, 0));
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].value_bytes, first[0].threshold_bytes),
            (5000, 1000)
        );
        assert!(
            first[0].message.contains("leak_site <- main"),
            "{}",
            first[0].message
        );
        assert!(alerter.on_window(&window(2, 30.0, 5000, 0)).is_empty());
        assert!(alerter.on_window(&window(3, 40.0, 5000, 0)).is_empty());
        let again = alerter.on_window(&window(4, 80.0, 5000, 0));
        assert_eq!((again.len(), again[0].held_back), (1, 2));
    }

    /// Check that RSS levels alert as they are crossed upwards, and that a
    /// level cleared says so once.
    #[test]
    fn rss_levels_alert_once_each_way() {
        let mut alerter = Alerter::new(rules(None, Some(1000)));
        let levels = |alerter: &mut Alerter, rss| -> Vec<AlertLevel> {
            alerter
                .on_window(&window(0, 1.0, 0, rss))
                .iter()
                .map(|a| a.level)
                .collect()
        };
        assert!(levels(&mut alerter, 500).is_empty());
        assert_eq!(levels(&mut alerter, 610), [AlertLevel::Warning]);
        assert!(levels(&mut alerter, 700).is_empty());
        assert_eq!(levels(&mut alerter, 900), [AlertLevel::Emergency]);
        assert!(levels(&mut alerter, 950).is_empty());
        assert_eq!(levels(&mut alerter, 800), [AlertLevel::Cleared]);
        assert_eq!(levels(&mut alerter, 100), [AlertLevel::Cleared]);
        assert!(levels(&mut alerter, 100).is_empty());
    }

    #[test]
    fn a_request_over_the_threshold_alerts_with_its_sites_and_is_rate_limited() {
        let mut alerter = Alerter::new(AlertRules {
            growth_per_request: Some(1000),
            ..rules(None, None)
        });
        let request = |at_s: f64, retained_bytes: u64| RequestFigures {
            at_s,
            window: 3,
            request: AlertRequest {
                pid: 7,
                tid: 8,
                start_s: at_s - 0.5,
                duration_ms: 500.0,
            },
            retained_bytes,
        };
        let site = || {
            vec![AlertSite {
                site: "keep <- handle".into(),
                growth_bytes: 2000,
            }]
        };
        assert!(
            alerter
                .on_request(&request(1.0, 1000), || unreachable!())
                .is_none()
        );
        let alert = alerter
            .on_request(&request(2.0, 2000), site)
            .expect("alert");
        assert_eq!(
            (alert.kind, alert.window, alert.value_bytes),
            (AlertKind::Request, 3, 2000)
        );
        assert!(
            alert.message.contains("retained 2000 bytes"),
            "{}",
            alert.message
        );
        assert!(
            alert.message.contains("keep <- handle"),
            "{}",
            alert.message
        );
        assert_eq!(alert.request.as_ref().map(|r| r.tid), Some(8));
        assert!(
            alerter
                .on_request(&request(3.0, 2000), || unreachable!())
                .is_none()
        );
        let again = alerter
            .on_request(&request(70.0, 2000), site)
            .expect("after a minute");
        assert_eq!(again.held_back, 1);
    }
}
