//! Suppressions: sites a team accepts, one pattern per line, as valgrind
//! and LeakSanitizer users write them. A pattern is a function name, a
//! module or source file name, or a chain of them innermost first
//! (`cache_put <- load_config`), each with `*` and `?` wildcards; an
//! LSan-style `leak:` prefix is allowed. `#` starts a comment.

use std::path::{Path, PathBuf};

use crate::report::Frame;

#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("cannot read the suppressions file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {why}")]
    Invalid {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

/// One pattern and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suppression {
    pub text: String,
    pub line: usize,
    /// Innermost first: consecutive frames must match in order.
    parts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suppressions {
    pub patterns: Vec<Suppression>,
}

impl Suppressions {
    pub fn read(path: &Path) -> Result<Self, SuppressionError> {
        let text = std::fs::read_to_string(path).map_err(|source| SuppressionError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, why)| SuppressionError::Invalid {
            path: path.to_owned(),
            line,
            why,
        })
    }

    /// Parses the file's text; an error is (line, why).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut patterns = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let body = line.strip_prefix("leak:").unwrap_or(line).trim();
            let parts: Vec<String> = body.split("<-").map(|p| p.trim().to_owned()).collect();
            if parts.iter().any(String::is_empty) {
                return Err((
                    index + 1,
                    format!("`{line}` has an empty part: write `function` or `inner <- outer`"),
                ));
            }
            patterns.push(Suppression {
                text: line.to_owned(),
                line: index + 1,
                parts,
            });
        }
        Ok(Self { patterns })
    }

    /// The first pattern that matches a stack, by index.
    pub fn matching(&self, frames: &[Frame]) -> Option<usize> {
        self.patterns.iter().position(|p| p.matches(frames))
    }
}

impl Suppression {
    fn matches(&self, frames: &[Frame]) -> bool {
        let n = self.parts.len();
        frames.len() >= n
            && (0..=frames.len() - n).any(|start| {
                self.parts
                    .iter()
                    .zip(&frames[start..start + n])
                    .all(|(part, frame)| frame_matches(part, frame))
            })
    }
}

/// A part matches a frame's function, its module's or file's name, or
/// their full paths.
fn frame_matches(part: &str, frame: &Frame) -> bool {
    let name = |path: &str| path.rsplit('/').next().unwrap_or(path).to_owned();
    let mut candidates = vec![frame.function.clone()];
    for path in [&frame.module, &frame.file].into_iter().flatten() {
        candidates.push(path.clone());
        candidates.push(name(path));
    }
    candidates
        .iter()
        .any(|c| glob(part.as_bytes(), c.as_bytes()))
}

/// `*` any run of characters, `?` one; the rest literal.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: Option<&str>) -> Frame {
        Frame {
            function: function.to_owned(),
            module: Some("/usr/lib/libfoo.so.1".to_owned()),
            file: file.map(str::to_owned),
            ..Frame::default()
        }
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob(b"leak_*", b"leak_site"));
        assert!(glob(b"*site", b"leak_site"));
        assert!(glob(b"l?ak*s*e", b"leak_site"));
        assert!(!glob(b"leak", b"leak_site"));
        assert!(glob(b"*", b""));
    }

    #[test]
    fn patterns_match_functions_files_modules_and_chains() {
        let text =
            "# accepted\nleak:cache_put\n\ninit_* <- main  # startup\nlibfoo.so*\nconfig.c\n";
        let s = Suppressions::parse(text).expect("parses");
        assert_eq!(s.patterns.len(), 4);
        assert_eq!(
            (s.patterns[1].text.as_str(), s.patterns[1].line),
            ("init_* <- main", 4)
        );
        let stack = [
            frame("cache_put", None),
            frame("load", Some("/src/config.c")),
        ];
        assert_eq!(s.matching(&stack), Some(0));
        let stack = [
            frame("x", None),
            frame("init_tables", None),
            frame("main", None),
        ];
        assert_eq!(s.matching(&stack), Some(1));
        // The chain must be consecutive, innermost first.
        let stack = [frame("main", None), frame("init_tables", None)];
        assert_eq!(
            s.matching(&stack[..]).map(|i| &s.patterns[i].text[..]),
            Some("libfoo.so*")
        );
        let only_file = Suppressions::parse("config.c").expect("parses");
        let stack = [Frame {
            function: "load".into(),
            file: Some("/src/config.c".into()),
            ..Frame::default()
        }];
        assert_eq!(only_file.matching(&stack), Some(0));
        assert_eq!(only_file.matching(&[Frame::default()]), None);
    }

    #[test]
    fn an_empty_part_is_an_error_with_its_line() {
        let error = Suppressions::parse("ok\nfoo <- \n").expect_err("invalid");
        assert_eq!(error.0, 2);
    }
}
