//! Renderings of a report: the terminal table, folded stacks, the in-use
//! flamegraph and report.json, and writing them atomically.

pub mod flamegraph;
pub mod folded;
pub mod table;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::report::Report;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot render {what}: {message}")]
    Render { what: &'static str, message: String },
}

/// File names inside the output directory.
pub const REPORT_JSON: &str = "report.json";
pub const INUSE_SVG: &str = "inuse.svg";
pub const STACKS_FOLDED: &str = "stacks.folded";

/// Writes report.json, stacks.folded and inuse.svg into `dir` (created if
/// needed). Each file appears whole or not at all.
pub fn write_all(dir: &Path, report: &Report) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(|source| OutputError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_atomically(&dir.join(REPORT_JSON), report_json(report)?.as_bytes())?;
    let folded = folded::render(report);
    write_atomically(&dir.join(STACKS_FOLDED), folded.as_bytes())?;
    let svg = flamegraph::render_inuse(report)?;
    write_atomically(&dir.join(INUSE_SVG), &svg)?;
    Ok(())
}

/// report.json's text, pretty-printed with a trailing newline.
pub fn report_json(report: &Report) -> Result<String, OutputError> {
    let mut text = serde_json::to_string_pretty(report).map_err(|e| OutputError::Render {
        what: REPORT_JSON,
        message: e.to_string(),
    })?;
    text.push('\n');
    Ok(text)
}

/// Writes to a temporary file beside `path`, then renames it over `path`:
/// an interrupted write never leaves a truncated file.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), OutputError> {
    let error = |source| OutputError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(error)
}

/// Compares `actual` with `tests/golden/NAME`; `MEMSCOPE_BLESS=1` rewrites
/// the golden file after an intended change.
#[cfg(test)]
pub(crate) fn assert_golden(name: &str, actual: &[u8]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/golden")
        .join(name);
    if std::env::var_os("MEMSCOPE_BLESS").is_some() {
        std::fs::write(&path, actual).expect("bless golden file");
    }
    let golden =
        std::fs::read(&path).expect("golden file missing; run with MEMSCOPE_BLESS=1 to create it");
    assert!(
        golden == actual,
        "{name} differs from tests/golden/{name}; if intended, rerun with MEMSCOPE_BLESS=1"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("memscope-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("x.txt");
        write_atomically(&path, b"first version, long").expect("write");
        write_atomically(&path, b"second").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["x.txt"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn atomic_write_reports_the_path_on_failure() {
        let err = write_atomically(Path::new("/nonexistent-dir/x"), b"x").expect_err("must fail");
        assert!(
            err.to_string()
                .starts_with("cannot write /nonexistent-dir/x"),
            "{err}"
        );
    }
}
