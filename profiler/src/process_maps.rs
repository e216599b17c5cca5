//! A process's memory mappings (`/proc/PID/maps`), cached so that addresses
//! can be symbolized after the process has exited.

use std::path::{Path, PathBuf};

/// One file-backed or anonymous mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset of `start` in the mapped file.
    pub file_offset: u64,
    pub executable: bool,
    /// The mapped file as the process sees it; `None` for anonymous memory
    /// and pseudo-files like `[heap]`.
    pub path: Option<PathBuf>,
}

/// The mappings of one process at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessMaps {
    pub pid: u32,
    pub mappings: Vec<Mapping>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read /proc/{pid}/maps: {source}")]
pub struct MapsError {
    pub pid: u32,
    #[source]
    pub source: std::io::Error,
}

impl ProcessMaps {
    pub fn read(pid: u32) -> Result<Self, MapsError> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|source| MapsError { pid, source })?;
        Ok(Self::parse(pid, &text))
    }

    /// Parses the text of `/proc/PID/maps`; malformed lines are skipped.
    pub fn parse(pid: u32, text: &str) -> Self {
        let mappings = text.lines().filter_map(parse_line).collect();
        Self { pid, mappings }
    }

    /// The mapping holding `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        self.mappings
            .iter()
            .find(|m| m.start <= addr && addr < m.end)
    }

    /// The first mapped file whose name starts with `prefix` (`libc.so`).
    pub fn find_library(&self, prefix: &str) -> Option<&Path> {
        self.mappings.iter().find_map(|m| {
            let path = m.path.as_deref()?;
            let name = path.file_name()?.to_str()?;
            name.starts_with(prefix).then_some(path)
        })
    }

    /// A path through which this process's file can be opened from here:
    /// through `/proc/PID/root` while it lives (it may be in a container),
    /// else the path itself.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        let via_root = Path::new("/proc")
            .join(self.pid.to_string())
            .join("root")
            .join(path.strip_prefix("/").unwrap_or(path));
        if via_root.exists() {
            via_root
        } else {
            path.to_path_buf()
        }
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // address perms offset dev inode pathname
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().map(str::trim).unwrap_or("");
    let (start, end) = range.split_once('-')?;
    let path = (inode != "0" && path.starts_with('/'))
        .then(|| PathBuf::from(path.trim_end_matches(" (deleted)")));
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d4c0a00000-55d4c0a01000 r--p 00000000 fe:01 1311                       /usr/bin/leaky
55d4c0a01000-55d4c0a02000 r-xp 00001000 fe:01 1311                       /usr/bin/leaky
55d4c1e6e000-55d4c1e8f000 rw-p 00000000 00:00 0                          [heap]
7f3a1c028000-7f3a1c17d000 r-xp 00028000 fe:01 2097                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a1c200000-7f3a1c201000 r-xp 00000000 fe:01 4242                       /tmp/gone.so (deleted)
";

    #[test]
    fn parses_file_and_anonymous_mappings() {
        let maps = ProcessMaps::parse(7, SAMPLE);
        assert_eq!(maps.mappings.len(), 5);
        let text = &maps.mappings[1];
        assert_eq!(
            (text.start, text.end, text.file_offset, text.executable),
            (0x55d4c0a01000, 0x55d4c0a02000, 0x1000, true)
        );
        assert_eq!(maps.mappings[2].path, None);
        assert_eq!(
            maps.mappings[4].path.as_deref(),
            Some(Path::new("/tmp/gone.so"))
        );
    }

    #[test]
    fn finds_mapping_and_library() {
        let maps = ProcessMaps::parse(7, SAMPLE);
        let m = maps.find(0x7f3a1c028010).expect("libc text");
        assert_eq!(m.file_offset, 0x28000);
        assert_eq!(maps.find(0x1000), None);
        assert_eq!(
            maps.find_library("libc.so"),
            Some(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
    }
}
