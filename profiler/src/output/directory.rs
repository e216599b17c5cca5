//! The output directory, opened once and written through its descriptor.
//!
//! memscope runs as root, usually under sudo, and writes where the user
//! pointed it, possibly a directory others can write to. Whoever else can
//! write there could plant a symlink at a name root is about to write and
//! have root truncate any file on the system through it. So each name is
//! resolved once and never through a symlink: the directory is opened with
//! O_NOFOLLOW, and every file is created inside it by descriptor under an
//! unguessable temporary name with O_EXCL|O_NOFOLLOW, then renamed into
//! place (a rename replaces a symlink at the final name, never its target).

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{self, Write as _},
    os::{
        fd::{AsFd, AsRawFd as _, FromRawFd as _},
        unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use super::OutputError;

/// A directory memscope creates, before the umask: never writable by
/// anyone but its owner.
const DIR_MODE: libc::mode_t = 0o755;
/// Every file memscope writes, before the umask.
const FILE_MODE: libc::mode_t = 0o644;

/// Who the output should belong to instead of root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

impl Owner {
    /// The user who ran `sudo memscope`, so they can read and delete what
    /// root wrote for them: SUDO_UID and SUDO_GID, when both are plain
    /// numbers and memscope runs as root. None otherwise.
    pub fn from_sudo() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        Self::from_sudo_vars(
            euid,
            std::env::var_os("SUDO_UID").as_deref(),
            std::env::var_os("SUDO_GID").as_deref(),
        )
    }

    fn from_sudo_vars(euid: libc::uid_t, uid: Option<&OsStr>, gid: Option<&OsStr>) -> Option<Self> {
        // Without root, chown could only fail; and the variables are then
        // merely inherited, not sudo's word about who is asking.
        if euid != 0 {
            return None;
        }
        // Digits only: `parse` alone would take "+5".
        let id = |value: Option<&OsStr>| {
            let text = value?.to_str()?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            text.parse().ok()
        };
        Some(Self {
            uid: id(uid)?,
            gid: id(gid)?,
        })
    }
}

/// An open output directory. Files written through it land in the
/// directory that was opened, whatever happens to its path afterwards.
#[derive(Debug)]
pub struct OutputDir {
    dir: File,
    path: PathBuf,
    owner: Option<Owner>,
}

impl OutputDir {
    /// Opens the directory `path`, creating it (mode 0755 before the umask)
    /// and its missing parents if needed. A symlink at `path` itself is an
    /// error, not followed; the parents are the user's to name and are
    /// followed as usual. With `owner`, a directory created here and every
    /// file written are given to that user (a failure is only a warning).
    pub fn create(path: &Path, owner: Option<Owner>) -> Result<Self, OutputError> {
        let (dir, created) = match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                open_or_create_in(parent, name, path)?
            }
            // `/`, `.`, or a path ending in `..`: a directory that exists,
            // and none of these names is a symlink.
            _ => (
                open_directory(path).map_err(|source| OutputError::OpenDir {
                    path: path.to_path_buf(),
                    source,
                })?,
                false,
            ),
        };
        let output = Self {
            dir,
            path: path.to_path_buf(),
            owner,
        };
        // Only what memscope created: handing over an existing directory
        // would give the user someone else's directory.
        if created {
            output.give(&output.dir, &output.path);
        }
        Ok(output)
    }

    /// Writes the file `name` in the directory: whole or not at all, since
    /// a temporary file is written and synced, then renamed over `name`.
    pub fn write_atomically(&self, name: &str, contents: &[u8]) -> Result<(), OutputError> {
        let temp = temp_name(name).map_err(|source| self.write_error(name, source))?;
        self.write_through(name, &temp, contents)
    }

    /// Creates the file `name`, empty, to be written to as things happen
    /// (alerts.jsonl): made under a temporary name and renamed into place
    /// like every other file, so it is never a file someone else put there.
    pub fn create_for_appending(&self, name: &str) -> Result<File, OutputError> {
        let error = |source| self.write_error(name, source);
        let temp = temp_name(name).map_err(error)?;
        let file = self.open_new(&temp).map_err(error)?;
        self.give(&file, &self.path.join(name));
        let name_c = c_name(OsStr::new(name)).map_err(error)?;
        let temp_c = c_name(OsStr::new(&temp)).map_err(error)?;
        let dir_fd = self.dir.as_raw_fd();
        // SAFETY: dir_fd is open, both names are NUL-terminated.
        if let Err(source) =
            check(unsafe { libc::renameat(dir_fd, temp_c.as_ptr(), dir_fd, name_c.as_ptr()) })
        {
            // SAFETY: as above; the temporary name is this call's own.
            unsafe { libc::unlinkat(dir_fd, temp_c.as_ptr(), 0) };
            return Err(error(source));
        }
        Ok(file)
    }

    /// Opens a new file in the directory. O_EXCL|O_NOFOLLOW: a file or
    /// symlink already at the name fails the open instead of being written
    /// through.
    fn open_new(&self, name: &str) -> io::Result<File> {
        let name_c = c_name(OsStr::new(name))?;
        // SAFETY: the directory's descriptor is open for as long as self,
        // name_c is NUL-terminated, and the mode is the variadic argument
        // O_CREAT reads.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name_c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                FILE_MODE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened here and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Makes the renames durable: they live in the directory's own data.
    pub fn sync(&self) -> Result<(), OutputError> {
        self.dir.sync_all().map_err(|source| OutputError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn write_through(&self, name: &str, temp: &str, contents: &[u8]) -> Result<(), OutputError> {
        let error = |source| self.write_error(name, source);
        let name_c = c_name(OsStr::new(name)).map_err(error)?;
        let temp_c = c_name(OsStr::new(temp)).map_err(error)?;
        let dir_fd = self.dir.as_raw_fd();
        let mut file = self.open_new(temp).map_err(error)?;
        let result = (|| {
            file.write_all(contents)?;
            // Before the rename: the file appears under its name already
            // the user's.
            self.give(&file, &self.path.join(name));
            file.sync_all()?;
            // SAFETY: dir_fd is open, both names are NUL-terminated.
            check(unsafe { libc::renameat(dir_fd, temp_c.as_ptr(), dir_fd, name_c.as_ptr()) })
        })();
        if result.is_err() {
            // Only reached once the open above created the temporary file,
            // so this never removes a name someone else put there.
            // SAFETY: as for renameat.
            unsafe { libc::unlinkat(dir_fd, temp_c.as_ptr(), 0) };
        }
        result.map_err(error)
    }

    /// Gives `file` to the owner, if any; failing that, the output stays
    /// root's, which is still usable, so it is only a warning.
    fn give(&self, file: &impl AsFd, path: &Path) {
        let Some(owner) = self.owner else {
            return;
        };
        if let Err(error) = std::os::unix::fs::fchown(file, Some(owner.uid), Some(owner.gid)) {
            tracing::warn!(
                "cannot give {} to uid {} gid {} (SUDO_UID/SUDO_GID): {error}; it stays owned by root",
                path.display(),
                owner.uid,
                owner.gid
            );
        }
    }

    fn write_error(&self, name: &str, source: io::Error) -> OutputError {
        OutputError::Write {
            path: self.path.join(name),
            source,
        }
    }
}

/// Creates `parent` as needed, then the directory `name` in it, and opens
/// that without following a symlink. Returns whether it was created here.
fn open_or_create_in(
    parent: &Path,
    name: &OsStr,
    path: &Path,
) -> Result<(File, bool), OutputError> {
    let create_error = |source| OutputError::CreateDir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(parent).map_err(create_error)?;
    // Everything below works relative to the parent's descriptor, so the
    // name checked is the name opened.
    let parent_dir = open_directory(parent).map_err(create_error)?;
    let name_c = c_name(name).map_err(create_error)?;
    // SAFETY: the parent's descriptor is open and name_c is NUL-terminated.
    let created =
        match check(unsafe { libc::mkdirat(parent_dir.as_raw_fd(), name_c.as_ptr(), DIR_MODE) }) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => false,
            Err(error) => return Err(create_error(error)),
        };
    // SAFETY: as for mkdirat.
    let fd = unsafe {
        libc::openat(
            parent_dir.as_raw_fd(),
            name_c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let source = io::Error::last_os_error();
        // NB: O_NOFOLLOW says ELOOP for a symlink, but ELOOP has other
        // causes; ask the file system what the name is.
        if std::fs::symlink_metadata(parent.join(name)).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(OutputError::Symlink {
                path: path.to_path_buf(),
            });
        }
        return Err(OutputError::OpenDir {
            path: path.to_path_buf(),
            source,
        });
    }
    // SAFETY: fd was just opened here and nothing else owns it.
    Ok((unsafe { File::from_raw_fd(fd) }, created))
}

fn open_directory(path: &Path) -> io::Result<File> {
    // std adds O_CLOEXEC.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
}

/// `.NAME.` and 16 random hex digits: a name nobody can plant in advance.
fn temp_name(name: &str) -> io::Result<String> {
    Ok(format!(".{name}.{:016x}", random_u64()?))
}

fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    loop {
        // SAFETY: the buffer is 8 writable bytes, its length as given.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        // getrandom never returns a short count for requests of up to 256
        // bytes; checked all the same, since the name's secrecy depends on it.
        if n.unsigned_abs() != bytes.len() {
            return Err(io::Error::other("getrandom returned too few bytes"));
        }
        return Ok(u64::from_ne_bytes(bytes));
    }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file name contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    /// A fresh, empty directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("memscope-out-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The process umask, read without changing it (umask(2) would, for
    /// every thread at once).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .expect("Umask line");
        u32::from_str_radix(line.trim(), 8).expect("octal umask")
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Check that a write replaces the whole file and leaves no temporary.
    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = scratch("replace");
        let out = OutputDir::create(&dir, None).expect("open");
        out.write_atomically("x.txt", b"first version, long")
            .expect("write");
        out.write_atomically("x.txt", b"second").expect("rewrite");
        assert_eq!(std::fs::read(dir.join("x.txt")).expect("read"), b"second");
        assert_eq!(names_in(&dir), ["x.txt"]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn missing_directory_and_parents_are_created() {
        let base = scratch("parents");
        let dir = base.join("a/b/out");
        let out = OutputDir::create(&dir, None).expect("create");
        out.write_atomically("x.txt", b"x").expect("write");
        assert_eq!(std::fs::read(dir.join("x.txt")).expect("read"), b"x");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn uncreatable_directory_is_named_in_the_error() {
        let err = OutputDir::create(Path::new("/proc/memscope-cannot-create"), None)
            .expect_err("procfs refuses mkdir");
        assert_eq!(
            err.to_string(),
            "cannot create directory /proc/memscope-cannot-create: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn symlink_at_the_output_path_is_not_followed() {
        let base = scratch("dir-symlink");
        let elsewhere = base.join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("target dir");
        let link = base.join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
        for path in [link.clone(), base.join("link/"), base.join("link/.")] {
            let err = OutputDir::create(&path, None).expect_err("symlink must not be opened");
            assert!(matches!(err, OutputError::Symlink { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!(
                    "{} is a symbolic link: memscope does not follow it, give it a directory",
                    path.display()
                )
            );
        }
        assert!(names_in(&elsewhere).is_empty());
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn symlink_at_a_final_name_is_replaced_and_its_target_untouched() {
        let base = scratch("file-symlink");
        let victim = base.join("victim");
        std::fs::write(&victim, b"victim").expect("victim");
        let dir = base.join("out");
        let out = OutputDir::create(&dir, None).expect("create");
        std::os::unix::fs::symlink(&victim, dir.join("report.json")).expect("symlink");
        out.write_atomically("report.json", b"report")
            .expect("write");
        let written = dir.join("report.json");
        assert!(
            std::fs::symlink_metadata(&written)
                .expect("stat")
                .file_type()
                .is_file()
        );
        assert_eq!(std::fs::read(&written).expect("read"), b"report");
        assert_eq!(std::fs::read(&victim).expect("read victim"), b"victim");
        assert_eq!(names_in(&dir), ["report.json"]);
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn symlink_at_the_temp_name_fails_the_write_and_its_target_untouched() {
        let base = scratch("temp-symlink");
        let victim = base.join("victim");
        std::fs::write(&victim, b"victim").expect("victim");
        let dir = base.join("out");
        let out = OutputDir::create(&dir, None).expect("create");
        std::os::unix::fs::symlink(&victim, dir.join(".x.planted")).expect("symlink");
        let err = out
            .write_through("x", ".x.planted", b"new")
            .expect_err("O_EXCL|O_NOFOLLOW refuse the symlink");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot write {}: File exists (os error 17)",
                dir.join("x").display()
            )
        );
        assert_eq!(std::fs::read(&victim).expect("read victim"), b"victim");
        // The planted name is not memscope's to remove.
        assert_eq!(names_in(&dir), [".x.planted"]);
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn temp_names_are_unpredictable() {
        let a = temp_name("report.json").expect("random");
        let b = temp_name("report.json").expect("random");
        assert!(a.starts_with(".report.json.") && a.len() == ".report.json.".len() + 16);
        assert_ne!(a, b);
    }

    #[test]
    fn files_are_0644_and_a_created_directory_0755() {
        let base = scratch("modes");
        let dir = base.join("out");
        let out = OutputDir::create(&dir, None).expect("create");
        out.write_atomically("x.txt", b"x").expect("write");
        let mode =
            |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777;
        let umask = umask();
        assert_eq!(mode(&dir), 0o755 & !umask);
        assert_eq!(mode(&dir.join("x.txt")), 0o644 & !umask);
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn sudo_user_owns_a_created_directory_and_its_files() {
        if !is_root() {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let base = scratch("owner");
        let dir = base.join("out");
        let owner = Owner {
            uid: 12345,
            gid: 12345,
        };
        let out = OutputDir::create(&dir, Some(owner)).expect("create");
        out.write_atomically("x.txt", b"x").expect("write");
        let ids = |path: &Path| {
            let m = std::fs::metadata(path).expect("stat");
            (m.uid(), m.gid())
        };
        assert_eq!(ids(&dir), (12345, 12345));
        assert_eq!(ids(&dir.join("x.txt")), (12345, 12345));
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn an_existing_directory_keeps_its_owner() {
        if !is_root() {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let dir = scratch("existing-owner");
        let owner = Owner {
            uid: 12345,
            gid: 12345,
        };
        let out = OutputDir::create(&dir, Some(owner)).expect("open");
        out.write_atomically("x.txt", b"x").expect("write");
        assert_eq!(std::fs::metadata(&dir).expect("stat").uid(), 0);
        assert_eq!(
            std::fs::metadata(dir.join("x.txt")).expect("stat").uid(),
            12345
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn sudo_owner_needs_root_and_numeric_ids() {
        let vars = |euid, uid: &str, gid: &str| {
            Owner::from_sudo_vars(euid, Some(OsStr::new(uid)), Some(OsStr::new(gid)))
        };
        assert_eq!(
            vars(0, "1000", "100"),
            Some(Owner {
                uid: 1000,
                gid: 100
            })
        );
        assert_eq!(vars(1000, "1000", "100"), None);
        assert_eq!(vars(0, "+1000", "100"), None);
        assert_eq!(vars(0, "1000", ""), None);
        assert_eq!(vars(0, "alice", "100"), None);
        assert_eq!(vars(0, "99999999999", "100"), None);
        assert_eq!(
            Owner::from_sudo_vars(0, None, Some(OsStr::new("100"))),
            None
        );
    }
}
