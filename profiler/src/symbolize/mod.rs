//! Addresses to frames, with blazesym, from cached process mappings: a
//! target that has exited can still be symbolized.

pub mod trim;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};

use crate::{
    collect::RecordedPythonStack,
    process_maps::{Mapping, ProcessMaps},
    python::{PythonRuntime, PythonSymbolizer},
    report::{Frame, Language},
};

/// The last frame of a stack cut short: the walk left the code, or the
/// kernel's depth was reached.
pub const TRUNCATED: &str = "[truncated]";

/// Symbolizes user stacks of the target's processes.
pub struct StackSymbolizer {
    symbolizer: Symbolizer,
    /// The latest mappings seen for each process.
    maps: HashMap<u32, ProcessMaps>,
    /// Process whose mappings stand in for an unknown pid (forked children
    /// share their parent's layout).
    main_pid: u32,
    /// Frames per (module host path, file offset).
    cache: HashMap<(PathBuf, u64), Vec<Frame>>,
    /// Whether a call instruction ends at (module host path, file offset).
    calls: HashMap<(PathBuf, u64), bool>,
    /// The CPython interpreter object (libpython, or the executable it is
    /// linked into) of each Python process.
    interpreters: HashMap<u32, PathBuf>,
    python: PythonSymbolizer,
}

impl StackSymbolizer {
    pub fn new(main_pid: u32) -> Self {
        Self {
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                // Demangled here, only names that are mangled (`demangle`).
                .enable_demangling(false)
                .build(),
            maps: HashMap::new(),
            main_pid,
            cache: HashMap::new(),
            calls: HashMap::new(),
            interpreters: HashMap::new(),
            python: PythonSymbolizer::default(),
        }
    }

    /// `pid` runs CPython: its stacks get Python frames.
    pub fn add_python(&mut self, pid: u32, runtime: &PythonRuntime) {
        self.interpreters.insert(pid, runtime.interpreter.clone());
        self.python.register(pid, runtime);
    }

    /// A forked child runs its parent's interpreter, at the same addresses.
    pub fn fork_python(&mut self, parent: u32, child: u32) {
        if let Some(module) = self.interpreters.get(&parent).cloned() {
            self.interpreters.insert(child, module);
            self.python.fork(parent, child);
        }
    }

    pub fn is_python(&self, pid: u32) -> bool {
        self.interpreters.contains_key(&pid)
    }

    /// After an exec: whatever ran before is gone.
    pub fn forget_python(&mut self, pid: u32) {
        self.interpreters.remove(&pid);
        self.python.forget(pid);
    }

    /// Names the frames of a Python stack now, while its process lives to
    /// be read (code objects are freed, and their addresses reused).
    pub fn resolve_python(&mut self, pid: u32, stack: &RecordedPythonStack) {
        for frame in &stack.frames {
            self.python.symbolize(pid, frame);
        }
    }

    /// Where one Python frame of `pid` is (cached once read).
    pub fn python_location(
        &mut self,
        pid: u32,
        frame: &profiler_common::PythonFrame,
    ) -> crate::python::PythonLocation {
        self.python.symbolize(pid, frame)
    }

    /// A user stack with, in a Python process, its Python frames: the
    /// native frames from the allocator up to the interpreter (a C
    /// extension's, say), then the Python frames, innermost first. The
    /// interpreter's own C frames are left out where Python frames stand
    /// for them, as in Python's tracebacks; without Python frames (startup,
    /// a thread that never ran Python) the first one stays.
    ///
    /// NB: CPython is built without frame pointers (3.8-3.14): past the
    /// first interpreter frame the kernel's walk reads garbage, so those
    /// frames are dropped, with or without a Python stack to put instead.
    pub fn symbolize_with_python(
        &mut self,
        pid: u32,
        ips: &[u64],
        python: Option<&RecordedPythonStack>,
    ) -> Vec<Frame> {
        let interpreter = self
            .interpreters
            .get(&pid)
            .or_else(|| self.interpreters.get(&self.main_pid))
            .cloned();
        let Some(interpreter) = interpreter else {
            return self.symbolize_stack(pid, ips);
        };
        let (outside, in_interpreter) = self.native_part(pid, ips, &interpreter);
        let python = python.filter(|stack| !stack.frames.is_empty());
        let kept = if python.is_some() {
            outside
        } else {
            outside + usize::from(in_interpreter)
        };
        let mut frames = self.symbolize_stack(pid, &ips[..kept]);
        if let Some(stack) = python {
            // The native part ends where the interpreter's begins: the
            // Python frames go on from there.
            if frames.last().is_some_and(|f| f.function == TRUNCATED) {
                frames.pop();
            }
            for frame in &stack.frames {
                let location = self.python.symbolize(pid, frame);
                frames.push(Frame {
                    function: location.function,
                    module: None,
                    file: Some(location.file),
                    line: location.line,
                    language: Language::Python,
                });
            }
            if stack.truncated {
                frames.push(Frame {
                    language: Language::Python,
                    ..Frame::named(&format!(
                        "[deeper than {} Python frames: outer ones not recorded]",
                        profiler_common::MAX_PYTHON_FRAMES
                    ))
                });
            }
        }
        frames
    }

    /// The trustworthy native frames of `ips`: how many lead up to the
    /// interpreter, and whether the next is inside it. The walk stops early
    /// at a frame in no file (already astray).
    fn native_part(&self, pid: u32, ips: &[u64], interpreter: &Path) -> (usize, bool) {
        let Some(maps) = self.maps(pid) else {
            return (ips.len().min(1), false);
        };
        for (i, &ip) in ips.iter().enumerate() {
            match maps
                .find(ip.saturating_sub(1))
                .and_then(|m| m.path.as_deref())
            {
                Some(path) if path == interpreter => return (i, true),
                Some(_) => {}
                None => return (i.max(1), false),
            }
        }
        (ips.len(), false)
    }

    /// Records the current mappings of `pid`; call while it is alive, again
    /// whenever it may have mapped new code.
    /// NB: a process that has exited (a zombie) shows no mappings; those
    /// must not replace what was read while it lived.
    pub fn update_maps(&mut self, maps: ProcessMaps) {
        if !maps.mappings.is_empty() {
            self.maps.insert(maps.pid, maps);
        }
    }

    pub fn maps(&self, pid: u32) -> Option<&ProcessMaps> {
        self.maps
            .get(&pid)
            .or_else(|| self.maps.get(&self.main_pid))
    }

    /// Frames for a user stack, innermost first. Every address is a return
    /// address (stacks are taken at return probes, or at a system call's
    /// exit where the first one is just past the syscall instruction): the
    /// call is the instruction before it, so look up `addr - 1`, or the line
    /// can land one past the call.
    ///
    /// A return address past the first that is in no executable mapping,
    /// or that no call instruction ends at, was not one: the frame-pointer
    /// walk went astray (a function built without frame pointers), and
    /// what it read after is data. The stack ends there with `[truncated]`,
    /// as it does at the kernel's depth.
    pub fn symbolize_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        let mut frames = Vec::new();
        for (i, &ip) in ips.iter().enumerate() {
            if ip == crate::collect::CUT_MARK && frames.last().is_some_and(is_entry_point) {
                return frames; // the loader's entry, which has no caller and no rule
            }
            if ip == crate::collect::CUT_MARK || i > 0 && !self.is_return_address(pid, ip) {
                frames.push(Frame::named(TRUNCATED));
                return frames;
            }
            frames.extend(self.symbolize_return_address(pid, ip));
        }
        if ips.len() >= profiler_common::MAX_STACK_DEPTH {
            frames.push(Frame::named(TRUNCATED));
        }
        frames
    }

    /// The mapping holding `addr` in `pid`, with the mappings it is one
    /// of (None: no mappings known). Where `pid`'s own mappings lack it,
    /// the target's stand in: a forked child's were copied from them, and
    /// one read as the child exited may have lost some already.
    fn mapping_at(&self, pid: u32, addr: u64) -> Option<Option<(&ProcessMaps, &Mapping)>> {
        let maps = self.maps(pid)?;
        let found = maps.find(addr).map(|m| (maps, m)).or_else(|| {
            let main = self
                .maps
                .get(&self.main_pid)
                .filter(|m| m.pid != maps.pid)?;
            main.find(addr).map(|m| (main, m))
        });
        Some(found)
    }

    /// Whether `return_addr` can be one: it is in executable code of
    /// `pid`, just after a call instruction, read from the mapped file
    /// (yes where there is nothing to tell: mappings unknown, anonymous
    /// code such as a JIT's, a file that cannot be read).
    fn is_return_address(&mut self, pid: u32, return_addr: u64) -> bool {
        let Some(found) = self.mapping_at(pid, return_addr.saturating_sub(1)) else {
            return true;
        };
        let Some((maps, mapping)) = found else {
            return false;
        };
        if !mapping.executable {
            return false;
        }
        let Some(path) = mapping.path.as_deref() else {
            return true;
        };
        let Some(host_path) = mapped_file(maps, mapping, path) else {
            return true;
        };
        let offset = return_addr - mapping.start + mapping.file_offset;
        let key = (host_path, offset);
        if let Some(&known) = self.calls.get(&key) {
            return known;
        }
        let follows = call_ends_at(&key.0, offset).unwrap_or(true);
        self.calls.insert(key, follows);
        follows
    }

    /// Unknown frames show the address as the stack holds it.
    fn symbolize_return_address(&mut self, pid: u32, return_addr: u64) -> Vec<Frame> {
        let addr = return_addr.saturating_sub(1);
        let unknown = || vec![unknown(return_addr, None)];
        let Some((maps, mapping)) = self.mapping_at(pid, addr).flatten() else {
            return unknown();
        };
        let Some(path) = mapping.path.clone() else {
            return unknown();
        };
        let file_offset = addr - mapping.start + mapping.file_offset;
        let Some(host_path) = mapped_file(maps, mapping, &path) else {
            let module = format!("{} (replaced on disk)", path.display());
            return vec![self::unknown(return_addr, Some(module))];
        };
        let key = (host_path.clone(), file_offset);
        if let Some(frames) = self.cache.get(&key) {
            return frames.clone();
        }
        let frames = self.symbolize_file_offset(&host_path, &path, file_offset);
        self.cache.insert(key, frames.clone());
        frames
    }

    fn symbolize_file_offset(&self, host_path: &Path, path: &Path, file_offset: u64) -> Vec<Frame> {
        let module = path.display().to_string();
        let source = Source::Elf(Elf::new(host_path));
        let symbolized = self
            .symbolizer
            .symbolize_single(&source, Input::FileOffset(file_offset));
        let Ok(Symbolized::Sym(sym)) = symbolized else {
            return vec![Frame {
                function: format!("{}+{file_offset:#x}", file_name(path)),
                module: Some(module),
                file: None,
                line: None,
                language: Language::Native,
            }];
        };
        let location = |info: Option<&blazesym::symbolize::CodeInfo<'_>>| {
            info.map(|i| (i.to_path().display().to_string(), i.line))
        };
        // blazesym lists inlined calls outermost first; emit them innermost
        // first, like the rest of the stack.
        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
        for inlined in sym.inlined.iter().rev() {
            let (file, line) = location(inlined.code_info.as_ref()).unzip();
            frames.push(Frame {
                function: demangle(&inlined.name),
                module: Some(module.clone()),
                file,
                line: line.flatten(),
                language: Language::Native,
            });
        }
        let (file, line) = location(sym.code_info.as_deref()).unzip();
        frames.push(Frame {
            function: demangle(&sym.name),
            module: Some(module),
            file,
            line: line.flatten(),
            language: Language::Native,
        });
        frames
    }
}

/// Whether an x86-64 call instruction (2 to 7 bytes: direct, through a
/// register or memory) ends at `offset` of the file at `path`; None when
/// the bytes cannot be read.
fn call_ends_at(path: &Path, offset: u64) -> Option<bool> {
    use std::os::unix::fs::FileExt as _;
    const LONGEST: u64 = 7;
    let start = offset.checked_sub(LONGEST)?;
    let mut bytes = [0u8; LONGEST as usize];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut bytes, start)
        .ok()?;
    Some(ends_with_call(&bytes))
}

/// Whether the last 2 to 7 of `bytes` decode as one call instruction.
fn ends_with_call(bytes: &[u8]) -> bool {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    (2..=bytes.len().min(7)).any(|len| {
        let code = &bytes[bytes.len() - len..];
        let instruction = Decoder::with_ip(64, code, 0, DecoderOptions::NONE).decode();
        !instruction.is_invalid()
            && instruction.len() == len
            && matches!(
                instruction.flow_control(),
                FlowControl::Call | FlowControl::IndirectCall
            )
    })
}

/// A C++ (`_Z...`) or Rust (`_R...`, legacy `_ZN...E`) symbol demangled,
/// Rust without its hash; any other name as it is: a C function named
/// `f`, `i` or `St` is not the type `float`, `int` or `std`.
pub fn demangle(name: &str) -> String {
    if !(name.starts_with("_Z") || name.starts_with("_R")) {
        return name.to_owned();
    }
    if let Ok(rust) = rustc_demangle::try_demangle(name) {
        return format!("{rust:#}");
    }
    cpp_demangle::Symbol::new(name)
        .ok()
        .and_then(|symbol| symbol.demangle().ok())
        .unwrap_or_else(|| name.to_owned())
}

/// The file to read a mapping's bytes from: the one it really maps when
/// the file on disk was replaced (read as mapped while the process lives;
/// after, the new file's bytes would be wrong ones), None if that cannot
/// be read any more.
pub(crate) fn mapped_file(
    maps: &ProcessMaps,
    mapping: &crate::process_maps::Mapping,
    path: &Path,
) -> Option<PathBuf> {
    match maps.replaced_file(path) {
        Some(mapped) => Some(mapped),
        None if mapping.replaced => None,
        None => Some(maps.host_path(path)),
    }
}

/// Where a process starts: the stack ends there whole, though the loader's
/// entry code has no unwind rule to say so.
fn is_entry_point(frame: &Frame) -> bool {
    matches!(frame.function.as_str(), "_start" | "_dl_start_user")
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn unknown(addr: u64, module: Option<String>) -> Frame {
    Frame {
        function: format!("{addr:#x}"),
        module,
        file: None,
        line: None,
        language: Language::Native,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function_for_symbolizer_test() -> u64 {
        marker_function_for_symbolizer_test as *const () as u64
    }

    #[test]
    fn symbolizes_a_function_of_this_test_binary() {
        let pid = std::process::id();
        let mut symbolizer = StackSymbolizer::new(pid);
        symbolizer.update_maps(ProcessMaps::read(pid).expect("own maps"));
        // +1: symbolize_stack takes return addresses.
        let frames = symbolizer.symbolize_stack(pid, &[marker_function_for_symbolizer_test() + 1]);
        assert!(
            frames
                .iter()
                .any(|f| f.function.ends_with("marker_function_for_symbolizer_test")),
            "{frames:?}"
        );
    }

    #[test]
    fn a_return_address_follows_a_call() {
        // call rel32; call *%rax; call *0x10(%rip); call *0x8(%rbx)
        assert!(ends_with_call(&[0x90, 0x90, 0xe8, 1, 2, 3, 4]));
        assert!(ends_with_call(&[0x90, 0x90, 0x90, 0x90, 0x90, 0xff, 0xd0]));
        assert!(ends_with_call(&[0x90, 0xff, 0x15, 0x10, 0, 0, 0]));
        assert!(ends_with_call(&[0x90, 0x90, 0x90, 0x90, 0xff, 0x53, 0x08]));
        // mov %rsp,%rbp; ret; a word of text
        assert!(!ends_with_call(&[0x90, 0x90, 0x90, 0x90, 0x48, 0x89, 0xe5]));
        assert!(!ends_with_call(&[0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xc3]));
        assert!(!ends_with_call(b"mnopqrs"));
    }

    #[test]
    fn only_mangled_names_are_demangled() {
        for plain in ["f", "i", "g", "Sa", "St", "main", "leak_site"] {
            assert_eq!(demangle(plain), plain);
        }
        assert_eq!(demangle("_Z3fooi"), "foo(int)");
        assert_eq!(
            demangle("_ZN4core3ptr13drop_in_place17h1234567890abcdefE"),
            "core::ptr::drop_in_place"
        );
        assert_eq!(demangle("_RNvCs1234_7mycrate4leak"), "mycrate::leak");
        assert_eq!(demangle("_Znotmangled!"), "_Znotmangled!");
    }

    #[test]
    fn a_walk_that_leaves_the_code_is_cut_there() {
        let pid = std::process::id();
        let mut symbolizer = StackSymbolizer::new(pid);
        symbolizer.update_maps(ProcessMaps::read(pid).expect("own maps"));
        let code = marker_function_for_symbolizer_test() + 1;
        let frames = symbolizer.symbolize_stack(pid, &[code, 0x6418_ec83_48d3_8948, code]);
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[1].function, TRUNCATED);
        let deep = vec![code; profiler_common::MAX_STACK_DEPTH];
        let frames = symbolizer.symbolize_stack(pid, &deep);
        assert_eq!(frames.last().map(|f| f.function.as_str()), Some(TRUNCATED));
    }

    #[test]
    fn unmapped_addresses_become_hex_frames() {
        let mut symbolizer = StackSymbolizer::new(1);
        symbolizer.update_maps(ProcessMaps::default());
        assert_eq!(
            symbolizer.symbolize_stack(1, &[0x1234]),
            vec![unknown(0x1234, None)]
        );
    }
}
