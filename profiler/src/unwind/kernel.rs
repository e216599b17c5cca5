//! What the kernel's unwinder is given: each object's rows once, appended
//! to `UNWIND_ROWS` and shared by every process that maps the object, and
//! each process's executable mappings in `UNWIND_PROCS`, rewritten when
//! they change.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{MAX_UNWIND_MAPPINGS, ProcessUnwind, UnwindMapping, map_names};

use super::table::ObjectTable;
use crate::process_maps::{Mapping, ProcessMaps};

/// How stacks are walked (`--unwind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnwindMode {
    /// By each object's .eh_frame rules where it has them (frame pointers
    /// where the object is built with them throughout).
    #[default]
    Auto,
    /// By frame pointers only, the kernel's own walk.
    Fp,
}

/// Objects at least this share of whose functions keep their CFA on rbp
/// are walked by frame pointer: the same frames, no rows, no search.
const FRAME_POINTER_SHARE: f32 = 0.98;

/// How one object's frames are walked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectWalk {
    /// By its rows: `len` of them from `start` in `UNWIND_ROWS`.
    Rows { start: u32, len: u32 },
    /// By frame pointer, and why.
    FramePointers(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("BPF map {0} is missing (build bug)")]
    MissingMap(&'static str),
    #[error("cannot write BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// One mapped file, as the kernel names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectKey {
    path: PathBuf,
    inode: u64,
}

struct Object {
    walk: ObjectWalk,
    /// For the bias of each of its mappings.
    table: Option<ObjectTable>,
}

/// Feeds the kernel's unwinder.
pub struct Unwinder {
    mode: UnwindMode,
    /// Rows `UNWIND_ROWS` holds, and how many are taken.
    capacity: u32,
    used: u32,
    objects: HashMap<ObjectKey, Object>,
    /// What each process was last described with.
    described: HashMap<u32, Vec<UnwindMapping>>,
    /// The last description's `generation`: each gets a new one, as the
    /// kernel's rule cache is keyed by it.
    generation: u64,
}

impl Unwinder {
    pub fn new(mode: UnwindMode, capacity: u32) -> Self {
        Self {
            mode,
            capacity,
            used: 0,
            objects: HashMap::new(),
            described: HashMap::new(),
            generation: 0,
        }
    }

    /// Describes `maps`' process to the kernel, unless it already was with
    /// the same executable mappings. Objects seen first are read and their
    /// rows loaded.
    pub fn describe(&mut self, ebpf: &mut Ebpf, maps: &ProcessMaps) -> Result<(), UnwindError> {
        if self.mode == UnwindMode::Fp {
            return Ok(());
        }
        let mut mappings = Vec::new();
        for mapping in executable_files(maps) {
            let Some(path) = mapping.path.as_deref() else {
                continue;
            };
            let key = ObjectKey {
                path: path.to_path_buf(),
                inode: mapping.inode,
            };
            if !self.objects.contains_key(&key) {
                let object = self.load_object(ebpf, maps, mapping, path)?;
                match &object.walk {
                    ObjectWalk::Rows { len, .. } => {
                        tracing::info!("unwind {}: {len} .eh_frame rows", path.display());
                    }
                    ObjectWalk::FramePointers(why) => {
                        tracing::info!("unwind {}: by frame pointer: {why}", path.display());
                    }
                }
                self.objects.insert(key.clone(), object);
            }
            let object = &self.objects[&key];
            let (rows_start, rows_len) = match object.walk {
                ObjectWalk::Rows { start, len } => (start, len),
                ObjectWalk::FramePointers(_) => (0, 0),
            };
            let bias = object
                .table
                .as_ref()
                .and_then(|table| table.bias(mapping.start, mapping.file_offset));
            let Some(bias) = bias.or((rows_len == 0).then_some(0)) else {
                continue; // no segment maps there: walked by frame pointer
            };
            mappings.push(UnwindMapping {
                start: mapping.start,
                end: mapping.end,
                bias,
                rows_start,
                rows_len,
            });
        }
        if self.described.get(&maps.pid) == Some(&mappings) {
            return Ok(());
        }
        self.generation += 1;
        let process = process_unwind(&mappings, self.generation);
        if mappings.len() > MAX_UNWIND_MAPPINGS {
            tracing::warn!(
                "pid {}: {} executable mappings, the unwinder keeps the first {MAX_UNWIND_MAPPINGS}",
                maps.pid,
                mappings.len()
            );
        }
        let name = map_names::UNWIND_PROCS;
        let map = ebpf.map_mut(name).ok_or(UnwindError::MissingMap(name))?;
        let map_error = |source| UnwindError::Map { name, source };
        let mut procs: BpfHashMap<&mut MapData, u32, ProcessUnwind> =
            BpfHashMap::try_from(map).map_err(map_error)?;
        procs.insert(maps.pid, process, 0).map_err(map_error)?;
        self.described.insert(maps.pid, mappings);
        Ok(())
    }

    /// A process that exited or exec'd: the kernel forgot it itself.
    pub fn forget(&mut self, pid: u32) {
        self.described.remove(&pid);
    }

    /// How each object read so far is walked, by path.
    pub fn objects(&self) -> Vec<(&Path, &ObjectWalk)> {
        let mut objects: Vec<_> = self
            .objects
            .iter()
            .map(|(key, object)| (key.path.as_path(), &object.walk))
            .collect();
        objects.sort_by(|a, b| a.0.cmp(b.0));
        objects
    }

    /// Rows loaded so far, of the capacity.
    pub fn rows_used(&self) -> (u32, u32) {
        (self.used, self.capacity)
    }

    fn load_object(
        &mut self,
        ebpf: &mut Ebpf,
        maps: &ProcessMaps,
        mapping: &Mapping,
        path: &Path,
    ) -> Result<Object, UnwindError> {
        let fallback = |why: String| Object {
            walk: ObjectWalk::FramePointers(why),
            table: None,
        };
        let Some(host_path) = crate::symbolize::mapped_file(maps, mapping, path) else {
            return Ok(fallback("replaced on disk since it was mapped".into()));
        };
        let table = match ObjectTable::read(&host_path) {
            Ok(table) => table,
            Err(error) => return Ok(fallback(error.to_string())),
        };
        if table.frame_pointer_share >= FRAME_POINTER_SHARE {
            return Ok(Object {
                walk: ObjectWalk::FramePointers(format!(
                    "built with frame pointers ({:.0}% of its functions)",
                    table.frame_pointer_share * 100.0
                )),
                table: Some(table),
            });
        }
        let len = table.rows.len() as u32;
        if len == 0 {
            return Ok(fallback("no unwind rows".into()));
        }
        if self.capacity - self.used < len {
            return Ok(fallback(format!(
                "{len} rows do not fit in the {} left of {} (raise --unwind-rows)",
                self.capacity - self.used,
                self.capacity
            )));
        }
        let start = self.used;
        let name = map_names::UNWIND_ROWS;
        let fd = rows_fd(ebpf)?;
        let keys: Vec<u32> = (start..start + len).collect();
        let (written, result) = crate::map_batch::update(fd, &keys, &table.rows);
        if let Err(error) = result {
            // Rows already written stay unused; the next object goes after.
            self.used += written as u32;
            return Ok(fallback(format!("cannot write {name}: {error}")));
        }
        self.used += len;
        Ok(Object {
            walk: ObjectWalk::Rows { start, len },
            table: Some(table),
        })
    }
}

fn rows_fd(ebpf: &Ebpf) -> Result<BorrowedFd<'_>, UnwindError> {
    let name = map_names::UNWIND_ROWS;
    ebpf.map(name)
        .and_then(crate::multi_uprobe::map_fd)
        .ok_or(UnwindError::MissingMap(name))
}

/// A process's executable file mappings, by start.
fn executable_files(maps: &ProcessMaps) -> impl Iterator<Item = &Mapping> {
    let mut mappings: Vec<&Mapping> = maps
        .mappings
        .iter()
        .filter(|m| m.executable && m.path.is_some())
        .collect();
    mappings.sort_by_key(|m| m.start);
    mappings.into_iter()
}

/// The kernel's form: sorted, at most `MAX_UNWIND_MAPPINGS`.
fn process_unwind(mappings: &[UnwindMapping], generation: u64) -> ProcessUnwind {
    let mut process = ProcessUnwind {
        len: 0,
        _pad: 0,
        generation,
        mappings: [UnwindMapping::default(); MAX_UNWIND_MAPPINGS],
    };
    for (slot, mapping) in process.mappings.iter_mut().zip(mappings) {
        *slot = *mapping;
        process.len += 1;
    }
    process
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(start: u64, executable: bool, path: Option<&str>) -> Mapping {
        Mapping {
            start,
            end: start + 0x1000,
            file_offset: 0,
            executable,
            path: path.map(PathBuf::from),
            inode: 1,
            replaced: false,
        }
    }

    #[test]
    fn only_executable_files_are_described_in_order() {
        let maps = ProcessMaps {
            pid: 1,
            mappings: vec![
                mapping(0x5000, true, Some("/b")),
                mapping(0x1000, true, Some("/a")),
                mapping(0x2000, false, Some("/a")),
                mapping(0x3000, true, None),
            ],
        };
        let starts: Vec<u64> = executable_files(&maps).map(|m| m.start).collect();
        assert_eq!(starts, vec![0x1000, 0x5000]);
    }

    #[test]
    fn the_kernel_form_keeps_at_most_its_capacity() {
        let many: Vec<UnwindMapping> = (0..MAX_UNWIND_MAPPINGS as u64 + 5)
            .map(|i| UnwindMapping {
                start: i * 0x1000,
                end: i * 0x1000 + 0x800,
                ..UnwindMapping::default()
            })
            .collect();
        let process = process_unwind(&many, 1);
        assert_eq!(process.len as usize, MAX_UNWIND_MAPPINGS);
        assert_eq!(process.mappings[3], many[3]);
        assert_eq!(process_unwind(&many[..2], 1).len, 2);
    }
}
