//! A baseline: what each site leaked in an accepted run, by function chain
//! (not by address), so it survives a rebuild, another machine and ASLR.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::report::{Frame, SiteKind};

pub const SCHEMA: &str = "memscope.baseline/1";

/// Frames of a site's chain that identify it: enough to tell two callers
/// of a helper apart, few enough that a test harness's deeper frames do
/// not make every run new.
pub const CHAIN_FRAMES: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("cannot read the baseline {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a memscope baseline ({why}): make one with `memscope check --save-baseline FILE -- CMD`"
    )]
    Invalid { path: PathBuf, why: String },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub schema: String,
    /// The command it was taken from, for people.
    pub command: String,
    pub sites: Vec<BaselineSite>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineSite {
    pub kind: SiteKind,
    /// Function names, innermost first (`chain_of`).
    pub chain: Vec<String>,
    pub leaked_bytes: u64,
    pub leaked_count: u64,
}

impl Baseline {
    pub fn read(path: &Path) -> Result<Self, BaselineError> {
        let text = std::fs::read_to_string(path).map_err(|source| BaselineError::Read {
            path: path.to_owned(),
            source,
        })?;
        let baseline: Baseline =
            serde_json::from_str(&text).map_err(|e| BaselineError::Invalid {
                path: path.to_owned(),
                why: e.to_string(),
            })?;
        if baseline.schema != SCHEMA {
            return Err(BaselineError::Invalid {
                path: path.to_owned(),
                why: format!("schema `{}`, not `{SCHEMA}`", baseline.schema),
            });
        }
        Ok(baseline)
    }

    /// What each site of `report` leaked (allocated after `warmup_s`), by
    /// chain: the checks' own view of it.
    pub fn of(report: &crate::report::Report, warmup_s: f64, command: &str) -> Self {
        let warmup_windows = super::windows_before(report, warmup_s);
        let teardown = super::teardown_window(report);
        let mut sites: Vec<BaselineSite> = Vec::new();
        for site in &report.sites {
            let (leaked, _) = super::site_at_end(site, teardown, warmup_windows);
            if leaked == 0 {
                continue;
            }
            let chain = chain_of(&site.frames);
            match sites
                .iter_mut()
                .find(|s| s.kind == site.kind && s.chain == chain)
            {
                Some(entry) => {
                    entry.leaked_bytes += leaked;
                    entry.leaked_count += site.live_count;
                }
                None => sites.push(BaselineSite {
                    kind: site.kind,
                    chain,
                    leaked_bytes: leaked,
                    leaked_count: site.live_count,
                }),
            }
        }
        Self {
            schema: SCHEMA.into(),
            command: command.to_owned(),
            sites,
        }
    }

    /// The leaked bytes at `chain`, summed over the sites that share it.
    pub fn leaked(&self, kind: SiteKind, chain: &[String]) -> Option<u64> {
        let matching = self
            .sites
            .iter()
            .filter(|s| s.kind == kind && s.chain == chain);
        matching.map(|s| s.leaked_bytes).reduce(|a, b| a + b)
    }
}

/// A site's identity across builds: its first `CHAIN_FRAMES` function
/// names, an address-only frame (`python3.11+0x22d098`, an unknown code
/// object) reduced to `?`.
pub fn chain_of(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .take(CHAIN_FRAMES)
        .map(|f| {
            if f.function.starts_with("<unknown") || f.function.contains("+0x") {
                "?".to_owned()
            } else {
                f.function.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str) -> Frame {
        Frame {
            function: function.to_owned(),
            ..Frame::default()
        }
    }

    #[test]
    fn chains_keep_names_and_drop_addresses() {
        let frames = [
            frame("leak_site"),
            frame("python3.11+0x22d098"),
            frame("<unknown code 0x7f00> (<unknown>)"),
            frame("main"),
        ];
        assert_eq!(chain_of(&frames), ["leak_site", "?", "?", "main"]);
        let deep: Vec<Frame> = (0..10).map(|i| frame(&format!("f{i}"))).collect();
        assert_eq!(chain_of(&deep).len(), CHAIN_FRAMES);
    }

    #[test]
    fn a_baseline_reads_back_and_sums_shared_chains() {
        let site = |bytes| BaselineSite {
            kind: SiteKind::Malloc,
            chain: vec!["a".into(), "main".into()],
            leaked_bytes: bytes,
            leaked_count: 1,
        };
        let baseline = Baseline {
            schema: SCHEMA.into(),
            command: "./t".into(),
            sites: vec![site(10), site(5)],
        };
        let dir = std::env::temp_dir().join(format!("memscope-baseline-{}", std::process::id()));
        std::fs::write(&dir, serde_json::to_string(&baseline).expect("json")).expect("write");
        let read = Baseline::read(&dir).expect("reads back");
        let _ = std::fs::remove_file(&dir);
        assert_eq!(
            read.leaked(SiteKind::Malloc, &["a".into(), "main".into()]),
            Some(15)
        );
        assert_eq!(
            read.leaked(SiteKind::Mmap, &["a".into(), "main".into()]),
            None
        );
    }
}
