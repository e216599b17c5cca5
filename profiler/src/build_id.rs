//! The GNU build ids of the objects a report's frames come from, so a
//! profile can be symbolized again or matched to its build elsewhere (pprof
//! mappings carry them; debuginfod and Pyroscope look objects up by them).

use std::{collections::BTreeSet, fs::File, path::Path};

use object::Object as _;

use crate::report::{Language, Module, Report, Site};

/// The report's native modules, each with its build id where the file (as
/// the target sees it, through `/proc/PID/root` while it lives) has one.
pub fn modules(report: &Report, pid: u32) -> Vec<Module> {
    native_paths(&report.sites)
        .into_iter()
        .map(|path| Module {
            path: path.to_owned(),
            build_id: read(&crate::process_maps::through_root(pid, Path::new(path))),
        })
        .collect()
}

/// The files the sites' native frames come from.
pub fn native_paths(sites: &[Site]) -> BTreeSet<&str> {
    sites
        .iter()
        .flat_map(|site| &site.frames)
        .filter(|frame| frame.language == Language::Native)
        .filter_map(|frame| frame.module.as_deref())
        .filter(|module| module.starts_with('/'))
        .collect()
}

/// The build id of the ELF file at `path`, as lowercase hex.
pub fn read(path: &Path) -> Option<String> {
    let file = File::open(path).ok()?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_has_the_build_id_its_debug_file_is_named_by() {
        let maps = crate::process_maps::ProcessMaps::read(std::process::id()).expect("own maps");
        let libc = maps
            .find_library("libc.so")
            .expect("test binary links libc");
        let id = read(libc).expect("Debian's libc has a build id");
        assert_eq!(id.len(), 40, "{id}");
        // libc6-dbg (cargo xtask setup) installs its symbols by that id.
        let debug = Path::new("/usr/lib/debug/.build-id")
            .join(&id[..2])
            .join(format!("{}.debug", &id[2..]));
        assert!(debug.exists(), "{}", debug.display());
        assert_eq!(read(Path::new("/nonexistent")), None);
    }
}
