//! Renderings of a report: the terminal table, folded stacks, the in-use
//! and growth flamegraphs, the pprof profile and report.json, and writing
//! them atomically, as root, into a directory others may be able to write
//! to.

pub mod diff;
pub mod directory;
pub mod escape;
pub mod flamegraph;
pub mod folded;
pub mod pprof;
pub mod push;
pub mod table;

use std::path::{Path, PathBuf};

pub use self::directory::{OutputDir, Owner};
use crate::report::Report;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open directory {path}: {source}")]
    OpenDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Following it as root would let whoever planted it pick what root
    /// overwrites.
    #[error("{path} is a symbolic link: memscope does not follow it, give it a directory")]
    Symlink { path: PathBuf },
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
pub const GROWTH_SVG: &str = "growth.svg";
pub const ALLOC_SVG: &str = "alloc.svg";
pub const STACKS_FOLDED: &str = "stacks.folded";
pub const PROFILE_PB_GZ: &str = "profile.pb.gz";
/// Every file `write_all` writes, in the order the banner names them.
pub const FILES: &[&str] = &[
    REPORT_JSON,
    INUSE_SVG,
    GROWTH_SVG,
    ALLOC_SVG,
    STACKS_FOLDED,
    PROFILE_PB_GZ,
];
/// One JSON object per alert, written as each happens.
pub const ALERTS_JSONL: &str = "alerts.jsonl";

/// Writes report.json, stacks.folded and inuse.svg into `dir` (created if
/// needed, never through a symlink; see [`OutputDir`]). Each file appears
/// whole or not at all. Under sudo, the files (and the directory, if
/// created here) belong to the user who ran sudo.
pub fn write_all(dir: &Path, report: &Report) -> Result<(), OutputError> {
    write_into(&OutputDir::create(dir, Owner::from_sudo())?, report)
}

/// As `write_all`, into a directory opened already.
pub fn write_into(out: &OutputDir, report: &Report) -> Result<(), OutputError> {
    out.write_atomically(REPORT_JSON, report_json(report)?.as_bytes())?;
    let folded = folded::render(report);
    out.write_atomically(STACKS_FOLDED, folded.as_bytes())?;
    let svg = flamegraph::render_inuse(report)?;
    out.write_atomically(INUSE_SVG, &svg)?;
    out.write_atomically(GROWTH_SVG, &flamegraph::render_growth(report)?)?;
    out.write_atomically(ALLOC_SVG, &flamegraph::render_alloc(report)?)?;
    out.write_atomically(PROFILE_PB_GZ, &pprof::render(report)?)?;
    out.sync()
}

/// Writes the one file `path` (`memscope diff -o`) the way `write_all`
/// writes each of its own: in its directory, opened without following a
/// symlink, whole or not at all, under sudo given to the user.
pub fn write_file(path: &Path, contents: &[u8]) -> Result<(), OutputError> {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| OutputError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file name memscope can write (a UTF-8 name, not a directory)",
            ),
        })?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let dir = OutputDir::create(parent, Owner::from_sudo())?;
    dir.write_atomically(name, contents)?;
    dir.sync()
}

/// A command cut to fit the title: its last characters, which tell two
/// runs apart (the arguments), kept.
pub(crate) fn shorten(command: &str) -> String {
    const KEPT: usize = 40;
    let count = command.chars().count();
    if count <= KEPT {
        return command.to_owned();
    }
    let tail: String = command.chars().skip(count - (KEPT - 3)).collect();
    format!("...{tail}")
}

/// report.json's text, pretty-printed with a trailing newline. Strings stay
/// as the target gave them: JSON escapes control characters itself.
pub fn report_json(report: &Report) -> Result<String, OutputError> {
    let mut text = serde_json::to_string_pretty(report).map_err(|e| OutputError::Render {
        what: REPORT_JSON,
        message: e.to_string(),
    })?;
    text.push('\n');
    Ok(text)
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
    use crate::report::tests_support::{full_report, sample_report};

    /// Check report.json and the table of a report with every part (windows,
    /// peak, alerts, requests, workers, fragmentation) against golden files.
    #[test]
    fn full_report_json_and_table_match_golden_files() {
        let report = full_report();
        assert_golden(
            "report.json",
            report_json(&report).expect("json").as_bytes(),
        );
        let mut table = Vec::new();
        table::render(&report, 10, &mut table).expect("table");
        assert_golden("table-full.txt", &table);
    }

    #[test]
    fn long_commands_keep_their_ends_in_the_title() {
        assert_eq!(shorten("./server 10"), "./server 10");
        let long = format!("/very/long/path/{}/server 100", "x".repeat(40));
        let short = shorten(&long);
        assert_eq!(short.chars().count(), 40);
        assert!(short.starts_with("...") && short.ends_with("/server 100"));
    }

    /// Check that write_all leaves exactly its files, and no temporary.
    #[test]
    fn write_all_leaves_exactly_its_files() {
        let dir = std::env::temp_dir().join(format!("memscope-write-all-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_all(&dir, &sample_report()).expect("write");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected = FILES.to_vec();
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(
            std::fs::read(dir.join(STACKS_FOLDED)).expect("read"),
            folded::render(&sample_report()).as_bytes()
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
