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
    pub inode: u64,
    /// The file at `path` is no longer the one mapped: deleted, or
    /// replaced (a package upgrade renames a new libc over the old one).
    /// It can then only be read through /proc/PID/map_files.
    pub replaced: bool,
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
        use std::os::unix::fs::MetadataExt as _;
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|source| MapsError { pid, source })?;
        let mut maps = Self::parse(pid, &text);
        let mut on_disk = std::collections::HashMap::new();
        for mapping in &mut maps.mappings {
            let Some(path) = &mapping.path else {
                continue;
            };
            let inode = *on_disk.entry(path.clone()).or_insert_with(|| {
                std::fs::metadata(maps_root(pid, path))
                    .map(|m| m.ino())
                    .ok()
            });
            // NB: only another file at the path counts: a stat that fails
            // may just mean the process exited meanwhile.
            mapping.replaced |= inode.is_some_and(|inode| inode != mapping.inode);
        }
        Ok(maps)
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
    /// the file it really maps through `/proc/PID/map_files` when the one
    /// on disk was replaced, else through `/proc/PID/root` while it lives
    /// (it may be in a container), else the path itself.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        if let Some(mapped) = self.replaced_file(path) {
            return mapped;
        }
        through_root(self.pid, path)
    }

    /// For a file replaced on disk since it was mapped: the mapped one,
    /// through /proc/PID/map_files, while the process lives.
    pub fn replaced_file(&self, path: &Path) -> Option<PathBuf> {
        let mapping = self
            .mappings
            .iter()
            .find(|m| m.replaced && m.path.as_deref() == Some(path))?;
        let mapped = PathBuf::from(format!(
            "/proc/{}/map_files/{:x}-{:x}",
            self.pid, mapping.start, mapping.end
        ));
        mapped.exists().then_some(mapped)
    }
}

/// `path` as process `pid` sees it (through its root, for a container)
/// while that resolves, else `path` itself.
pub fn through_root(pid: u32, path: &Path) -> PathBuf {
    let via_root = maps_root(pid, path);
    if via_root.exists() {
        via_root
    } else {
        path.to_path_buf()
    }
}

fn maps_root(pid: u32, path: &Path) -> PathBuf {
    Path::new("/proc")
        .join(pid.to_string())
        .join("root")
        .join(path.strip_prefix("/").unwrap_or(path))
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
    let deleted = path.ends_with(" (deleted)");
    let path = (inode != "0" && path.starts_with('/'))
        .then(|| PathBuf::from(path.trim_end_matches(" (deleted)")));
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        file_offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        path,
        inode: inode.parse().ok()?,
        replaced: deleted,
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
        assert!(maps.mappings[4].replaced && !maps.mappings[3].replaced);
        assert_eq!(maps.mappings[3].inode, 2097);
    }

    #[test]
    fn a_file_replaced_on_disk_is_read_through_map_files() {
        let dir = std::env::temp_dir().join(format!("memscope-maps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let lib = dir.join("lib.so");
        std::fs::write(&lib, b"old").expect("write");
        let file = std::fs::File::open(&lib).expect("open");
        // SAFETY: a fresh read-only private mapping of a file we hold open.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // An upgrade: a new file renamed over the mapped one.
        let new = dir.join("lib.so.new");
        std::fs::write(&new, b"new").expect("write");
        std::fs::rename(&new, &lib).expect("rename");
        let maps = ProcessMaps::read(std::process::id()).expect("own maps");
        let host = maps.host_path(&lib);
        assert!(
            host.starts_with(format!("/proc/{}/map_files", std::process::id())),
            "{}",
            host.display()
        );
        assert_eq!(std::fs::read(&host).expect("read mapped"), b"old");
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(addr, 3) };
        std::fs::remove_dir_all(&dir).expect("cleanup");
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
