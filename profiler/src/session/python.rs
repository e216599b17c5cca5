//! CPython processes of the session: each gets its interpreter's layout in
//! the kernel (so allocations carry their Python stack), and its recorded
//! stacks are named while it lives to be read.

use aya::maps::{HashMap as BpfHashMap, MapData};
use profiler_common::{PythonProcess, map_names};

use super::Session;
use crate::{attach, collect, process_maps::ProcessMaps, python, report::PythonObjects};

impl Session {
    /// Finds CPython in `pid` and gives the kernel side its layout. A
    /// version memscope cannot walk gets one warning; its stacks stay
    /// native.
    pub(super) fn discover_python(&mut self, pid: u32, maps: &ProcessMaps) {
        if !self.python_frames || self.symbolizer.is_python(pid) {
            return;
        }
        self.python_looked.insert(pid, has_libpython(maps));
        let runtime = match python::find_runtime(pid, maps) {
            Ok(Some(runtime)) => runtime,
            Ok(None) => return,
            Err(error) => {
                self.warn_once(error.to_string());
                return;
            }
        };
        if let Err(error) = set_python_process(&mut self.kernel.ebpf, pid, runtime.process) {
            self.warnings.push(format!(
                "pid {pid} runs Python {}, but its frames cannot be walked: {error}",
                runtime.version
            ));
            return;
        }
        tracing::debug!(pid, version = %runtime.version, interpreter = %runtime.interpreter.display(), "python");
        self.symbolizer.add_python(pid, &runtime);
        let mut objects = python::objects::counting_from_environment(pid);
        if objects == PythonObjects::Arenas && self.python_objects && !self.is_child {
            objects = self.probe_python_objects(pid, maps, &runtime);
        }
        if let Some(record) = self.record_mut(pid) {
            record.python = Some(runtime.version.to_string());
            record.python_objects = Some(objects);
        }
        self.stop_python_at_exit(pid, maps);
        self.stop_python_at_teardown(pid, maps, &runtime.interpreter);
    }

    /// A stop when the interpreter of a process memscope started begins
    /// to finalize: its Python stacks are named while their code objects
    /// live (a script that ends normally frees them before its `_exit`),
    /// and with `python_teardown` a window closes there.
    fn stop_python_at_teardown(
        &mut self,
        pid: u32,
        maps: &ProcessMaps,
        interpreter: &std::path::Path,
    ) {
        if !self.is_child || self.tearing_down {
            return;
        }
        match attach::attach_python_finalize(&mut self.kernel.programs(), pid, maps, interpreter) {
            Ok(Some(link)) => self.links.entry(pid).or_default().push(link),
            Ok(None) => tracing::debug!(pid, "no Py_FinalizeEx to stop at"),
            Err(error) => tracing::debug!(pid, "no stop at Py_FinalizeEx: {error}"),
        }
    }

    /// `--python-objects` with `attach`: probes on the functions behind the
    /// interpreter's object allocator, where its build has them (see
    /// `python::objects`); else its objects stay counted by arena, and the
    /// warnings say why.
    fn probe_python_objects(
        &mut self,
        pid: u32,
        maps: &ProcessMaps,
        runtime: &python::PythonRuntime,
    ) -> PythonObjects {
        match python::objects::find_object_allocator(runtime, maps) {
            Ok(allocator) => self.attach_object_probes(pid, maps, allocator),
            Err(error) => {
                self.warn_once(error.to_string());
                PythonObjects::Arenas
            }
        }
    }

    fn attach_object_probes(
        &mut self,
        pid: u32,
        maps: &ProcessMaps,
        allocator: python::objects::ObjectAllocator,
    ) -> PythonObjects {
        if self.object_allocators.get(&pid) == Some(&allocator) {
            // Probed before its exec into the same interpreter: still on.
            return PythonObjects::Probes;
        }
        if self.tearing_down {
            return PythonObjects::Arenas;
        }
        match attach::attach_python_objects(&mut self.kernel.programs(), pid, maps, &allocator) {
            Ok(Some(links)) => {
                self.links.entry(pid).or_default().extend(links);
                self.object_allocators.insert(pid, allocator);
                PythonObjects::Probes
            }
            Ok(None) => {
                self.warn_once(format!(
                    "--python-objects with attach needs multi-uprobe links (Linux 6.6+): pid {pid}'s objects are counted by arena"
                ));
                PythonObjects::Arenas
            }
            Err(error) => {
                self.warn_once(format!(
                    "pid {pid}: the object allocator in {} cannot be probed ({error}): its objects are counted by arena",
                    allocator.path.display()
                ));
                PythonObjects::Arenas
            }
        }
    }

    pub(super) fn warn_once(&mut self, warning: String) {
        if !self.warnings.contains(&warning) {
            self.warnings.push(warning);
        }
    }

    /// With `run`, a Python process of the tree (a script run by a shell,
    /// a multiprocessing worker) is stopped in `_exit` as the command
    /// itself is, so its code objects are named before they go: a short
    /// one would be gone before the next refresh. Not with `attach`: a
    /// production service's processes are never held at their exit.
    fn stop_python_at_exit(&mut self, pid: u32, maps: &ProcessMaps) {
        if !self.is_child || pid == self.pid || self.tearing_down {
            return;
        }
        // Just executed, it has not mapped its libc yet: the one it links.
        let libc = match maps.find_library("libc.so") {
            Some(libc) => Some(libc.to_path_buf()),
            None => crate::allocator::executable(pid)
                .and_then(|exe| python::startup::linked_library(pid, maps, &exe, "libc.so")),
        };
        let Some(libc) = libc else {
            return;
        };
        match attach::attach_exit_stop_at(&mut self.kernel.programs(), pid, maps, &libc) {
            Ok(Some(link)) => self.links.entry(pid).or_default().push(link),
            Ok(None) => {}
            Err(error) => tracing::debug!(pid, "no stop at exit: {error}"),
        }
    }

    /// A libpython mapped since the last look (an interpreter started by
    /// exec maps it after its first instruction) is looked at.
    pub(super) fn discover_late_python(&mut self, seen: &[(u32, ProcessMaps)]) {
        for (pid, maps) in seen {
            if !self.symbolizer.is_python(*pid)
                && has_libpython(maps)
                && self.python_looked.get(pid) != Some(&true)
            {
                self.discover_python(*pid, maps);
            }
        }
    }

    /// At exec (the process held before its first instruction): a new
    /// program, maybe another interpreter or none. One linked to a shared
    /// libpython, not mapped yet, is stopped again when that starts.
    pub(super) fn python_executed(&mut self, pid: u32, maps: &ProcessMaps) {
        self.symbolizer.forget_python(pid);
        self.python_handlers_gone(pid);
        self.python_looked.remove(&pid);
        if let Some(record) = self.record_mut(pid) {
            record.python = None;
            record.python_objects = None;
        }
        self.discover_python(pid, maps);
        if !self.python_frames || self.symbolizer.is_python(pid) || self.tearing_down {
            return;
        }
        let Some(exe) = crate::allocator::executable(pid) else {
            return;
        };
        let Some(library) = python::startup::linked_libpython(pid, maps, &exe) else {
            tracing::debug!(pid, exe = %exe.display(), "links no libpython");
            return;
        };
        match attach::attach_python_start(&mut self.kernel.programs(), pid, maps, &library) {
            Ok(Some(link)) => self.links.entry(pid).or_default().push(link),
            Ok(None) => tracing::debug!(pid, library = %library.display(), "no start to stop at"),
            Err(error) => tracing::warn!(
                "pid {pid} links {}: {error}; its Python frames start at the next look",
                library.display()
            ),
        }
    }

    /// The stop `python_executed` set up: libpython is mapped now.
    pub(super) fn python_started(&mut self, pid: u32) {
        if let Ok(maps) = ProcessMaps::read(pid) {
            self.discover_python(pid, &maps);
            self.symbolizer.update_maps(maps);
        }
    }

    /// A forked child runs its parent's interpreter (the kernel side copied
    /// its layout at the fork).
    pub(super) fn python_forked(&mut self, parent: u32, child: u32, maps: &ProcessMaps) {
        self.symbolizer.fork_python(parent, child);
        self.python_handlers_forked(parent, child);
        self.stop_python_at_exit(child, maps);
        let (version, mut objects) = self
            .processes
            .iter()
            .rev()
            .find(|p| p.pid == parent)
            .map(|p| (p.python.clone(), p.python_objects))
            .unwrap_or_default();
        // Probes are per process: a gunicorn worker gets its own.
        if let Some(allocator) = self.object_allocators.get(&parent).cloned() {
            objects = Some(self.attach_object_probes(child, maps, allocator));
        }
        if let Some(record) = self.record_mut(child) {
            record.python = version;
            record.python_objects = objects;
        }
    }

    /// Names the frames of every Python stack recorded since the last call,
    /// while their processes live: code objects are freed and their
    /// addresses reused, and an exited process cannot be read at all.
    pub(super) fn resolve_new_python_stacks(&mut self) {
        let seen = &mut self.python_stacks_seen;
        let stacks = match collect::read_python_stacks(&self.kernel.ebpf, |hash| seen.insert(hash))
        {
            Ok(stacks) => stacks,
            Err(error) => {
                tracing::warn!("{error}");
                return;
            }
        };
        for stack in stacks.values() {
            self.symbolizer.resolve_python(stack.tgid, stack);
            self.find_python_handler(stack);
        }
    }
}

fn has_libpython(maps: &ProcessMaps) -> bool {
    maps.find_library("libpython").is_some()
}

fn set_python_process(
    ebpf: &mut aya::Ebpf,
    pid: u32,
    process: PythonProcess,
) -> Result<(), aya::maps::MapError> {
    // The switch first: a process described without it would go unwalked.
    let map = ebpf
        .map_mut(map_names::CONFIG)
        .ok_or_else(|| aya::maps::MapError::InvalidName {
            name: map_names::CONFIG.into(),
        })?;
    aya::maps::Array::<&mut MapData, u32>::try_from(map)?.set(
        profiler_common::config::PYTHON,
        1,
        0,
    )?;
    insert_into(ebpf, map_names::PY_PROCS, pid, process)
}

/// Writes one entry of the kernel's hash map `name`.
pub(super) fn insert_into<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    key: K,
    value: V,
) -> Result<(), aya::maps::MapError> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })?;
    let mut entries: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
    entries.insert(key, value, 0)
}
