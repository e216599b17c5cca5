//! A saved report.json read back (`memscope report`, `memscope diff`),
//! with what this version derives from it (verdicts, fragmentation) done
//! again.

use std::path::{Path, PathBuf};

use super::Report;
use crate::output::REPORT_JSON;

#[derive(Debug, thiserror::Error)]
pub enum SavedReportError {
    #[error("cannot read {}: {source} (give a memscope output directory or its report.json)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a memscope report.json: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads `path`: a report.json, or the output directory holding one.
pub fn load(path: &Path) -> Result<Report, SavedReportError> {
    let file = if path.is_dir() {
        path.join(REPORT_JSON)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| SavedReportError::Read {
        path: file.clone(),
        source,
    })?;
    let mut report: Report =
        serde_json::from_str(&text).map_err(|source| SavedReportError::Parse {
            path: file.clone(),
            source,
        })?;
    // Verdicts are derived from the saved histories again, by this
    // version's rule.
    crate::classify::classify_sites(&mut report);
    report.fragmentation = crate::fragmentation::assess(&report);
    Ok(report)
}
