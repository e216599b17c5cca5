//! Tests against the real interpreters: each one runs a fixture that prints
//! what CPython itself knows about its current frame (code object, f_lasti,
//! f_lineno, thread state, thread pointer) and waits; the test finds the
//! interpreter, walks the frames exactly as the BPF side will, and
//! symbolizes them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use profiler_common::{NO_OFFSET, PYTHON_FRAME_READ, PythonFrame, PythonProcess, python_flags};

use super::{
    PythonLocation, PythonSymbolizer, find_runtime,
    memory::{ProcessMemory, u32_at, u64_at},
    offsets::{self, FRAME_OWNED_BY_CSTACK},
};
use crate::process_maps::ProcessMaps;

/// Innermost frame first: `𠀀` (a 4-byte-kind name) called by `函数`
/// (2-byte kind), called by `Outer.Inner.méthode` (1-byte kind, and a
/// qualname that is not the name), called by the module.
const FIXTURE: &str = r#"import ctypes, json, sys

def 𠀀():
    frame = sys._getframe()
    code = frame.f_code
    lasti, lineno = frame.f_lasti, frame.f_lineno  # PROBE
    libc = ctypes.CDLL(None)
    libc.pthread_self.restype = ctypes.c_void_p
    ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
    print(json.dumps({
        "pid": __import__("os").getpid(),
        "version": list(sys.version_info[:3]),
        "code": id(code),
        "lasti": lasti,
        "lineno": lineno,
        "firstlineno": code.co_firstlineno,
        "basicsize": type(code).__basicsize__,
        "none": id(None),
        "thread_pointer": libc.pthread_self(),
        "tstate": ctypes.pythonapi.PyThreadState_Get(),
    }), flush=True)
    sys.stdin.readline()  # WAIT

def 函数():
    return 𠀀()  # CALL_INNER

class Outer:
    class Inner:
        def méthode(self):
            return 函数()  # CALL_FUNCTION

Outer.Inner().méthode()  # CALL_METHOD
"#;

/// The fixture's line holding `marker`.
fn line_of(marker: &str) -> u32 {
    let index = FIXTURE
        .lines()
        .position(|l| l.ends_with(marker))
        .expect("marker in fixture");
    u32::try_from(index + 1).expect("small fixture")
}

#[derive(serde::Deserialize, Debug, Default)]
struct Printed {
    pid: u32,
    version: (u8, u8, u8),
    code: u64,
    lasti: i64,
    lineno: u32,
    firstlineno: u32,
    basicsize: u32,
    none: u64,
    thread_pointer: u64,
    tstate: u64,
}

/// A running fixture; killed when dropped, whatever the test did.
struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    printed: Printed,
    script: PathBuf,
}

impl Fixture {
    fn start(python: &Path) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "memscope-python-{}-{}",
            std::process::id(),
            python.to_string_lossy().replace('/', "_")
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let script = dir.join("fixture.py");
        std::fs::write(&script, FIXTURE).expect("write fixture");
        let mut child = Command::new(python)
            .arg(&script)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("fixture handshake");
        let printed = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: bad handshake {line:?}: {e}", python.display()));
        Self {
            child,
            stdin,
            printed,
            script,
        }
    }

    /// Lets the fixture return from its wait and exit.
    fn finish(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            stdin.write_all(b"\n").expect("release fixture");
        }
        let status = self.child.wait().expect("wait fixture");
        assert!(status.success(), "fixture exited with {status}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.script.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The frames of the thread whose thread pointer is `fsbase`, walked as
/// the BPF program does (see `PythonProcess`), innermost first.
fn walk(memory: &ProcessMemory, p: &PythonProcess, fsbase: u64) -> Vec<PythonFrame> {
    let mut tss = [0u8; 8];
    memory.read(p.tss_addr, &mut tss).expect("read Py_tss_t");
    let (initialized, key) = (u32_at(&tss, 0), u32_at(&tss, 4));
    assert_eq!(initialized, Some(1), "autoTSSkey initialized");
    let key = u64::from(key.expect("key"));
    assert!(key < 32, "key {key} is in glibc's first block");
    let tstate = memory
        .read_u64(fsbase + u64::from(p.tsd_offset) + key * 16 + 8)
        .expect("pthread_getspecific");
    let mut frame = memory
        .read_u64(tstate + u64::from(p.tstate_frame))
        .expect("tstate frame");
    if p.cframe_frame != NO_OFFSET {
        frame = memory
            .read_u64(frame + u64::from(p.cframe_frame))
            .expect("cframe current_frame");
    }
    let mut frames = Vec::new();
    let mut buf = [0u8; PYTHON_FRAME_READ];
    while frame != 0 && frames.len() < profiler_common::MAX_PYTHON_FRAMES {
        memory.read(frame, &mut buf).expect("read frame");
        let field = |offset: u16| usize::from(offset);
        let code = u64_at(&buf, field(p.frame_code)).expect("code");
        let back = u64_at(&buf, field(p.frame_back)).expect("back");
        let shim = p.frame_owner != NO_OFFSET && buf[field(p.frame_owner)] == FRAME_OWNED_BY_CSTACK;
        if !shim && code != p.none_addr {
            let instr = if p.flags & python_flags::INSTR_POINTER != 0 {
                let pointer = u64_at(&buf, field(p.frame_instr)).expect("instr");
                u32::try_from(pointer.wrapping_sub(code)).expect("instr in the code object")
            } else {
                u32_at(&buf, field(p.frame_instr)).expect("f_lasti")
            };
            let mut firstlineno = [0u8; 4];
            memory
                .read(code + u64::from(p.code_firstlineno), &mut firstlineno)
                .expect("co_firstlineno");
            frames.push(PythonFrame {
                code,
                instr,
                firstlineno: u32::from_ne_bytes(firstlineno),
            });
        }
        frame = back;
    }
    frames
}

fn location(function: &str, file: &Path, line: u32) -> PythonLocation {
    PythonLocation {
        function: function.to_string(),
        file: file.display().to_string(),
        line: Some(line),
    }
}

/// Check that `python` is found, its thread state and frames are reached
/// the way the BPF walk reaches them, and its frames symbolize to the
/// names, file and lines CPython gives them.
fn check_interpreter(python: &Path) {
    let mut fixture = Fixture::start(python);
    let printed = std::mem::take(&mut fixture.printed);
    let printed = &printed;
    let (major, minor, _) = printed.version;
    let what = format!("{} ({major}.{minor})", python.display());
    let pid = printed.pid;
    let maps = ProcessMaps::read(pid).expect("fixture maps");
    let runtime = find_runtime(pid, &maps)
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .unwrap_or_else(|| panic!("{what}: no runtime found"));
    assert_eq!(
        (runtime.version.major, runtime.version.minor),
        (major, minor),
        "{what}"
    );
    if minor >= 11 {
        assert_eq!(
            runtime.version.micro,
            Some(printed.version.2),
            "{what}: Py_Version"
        );
    }
    let p = runtime.process;
    assert_eq!(p.version, (u32::from(major) << 8) | u32::from(minor));
    assert_eq!(p.none_addr, printed.none, "{what}: _Py_NoneStruct");
    // 3.13's offsets come from _Py_DebugOffsets: they must agree with the
    // table measured from the headers (and the other versions' tables are
    // pinned by the walk below).
    let table = offsets::for_minor(minor).expect("supported minor");
    assert_eq!(runtime.code.offsets, table.code, "{what}: code offsets");
    assert_eq!(
        (
            p.tstate_frame,
            p.cframe_frame,
            p.frame_code,
            p.frame_back,
            p.frame_instr,
            p.frame_owner
        ),
        (
            table.tstate_frame,
            table.cframe_frame,
            table.frame_code,
            table.frame_back,
            table.frame_instr,
            table.frame_owner
        ),
        "{what}: frame offsets"
    );
    for offset in [p.frame_code, p.frame_back, p.frame_instr, p.frame_owner] {
        assert!(offset == NO_OFFSET || usize::from(offset) + 8 <= PYTHON_FRAME_READ);
    }
    // The BPF walk reads a frame as words.
    for offset in [p.frame_code, p.frame_back, p.frame_instr] {
        assert_eq!(offset % 8, 0, "{what}: frame offset {offset} not 8-aligned");
    }
    if let Some(start) = runtime.code.offsets.code_adaptive {
        assert_eq!(u32::from(start), printed.basicsize, "{what}: tp_basicsize");
    }

    let memory = ProcessMemory::new(pid);
    let mut tss = [0u8; 8];
    memory.read(p.tss_addr, &mut tss).expect("read Py_tss_t");
    let key = u64::from(u32_at(&tss, 4).expect("key"));
    assert_eq!(u32_at(&tss, 0), Some(1), "{what}: autoTSSkey initialized");
    assert!(key < 32, "{what}: key {key}");
    let tstate = memory
        .read_u64(printed.thread_pointer + u64::from(p.tsd_offset) + key * 16 + 8)
        .expect("tsd slot");
    assert_eq!(
        tstate, printed.tstate,
        "{what}: pthread_getspecific(autoTSSkey)"
    );

    let frames = walk(&memory, &p, printed.thread_pointer);
    assert_eq!(frames.len(), 4, "{what}: {frames:x?}");
    assert_eq!(
        frames[0].code, printed.code,
        "{what}: innermost code object"
    );
    assert_eq!(frames[0].firstlineno, printed.firstlineno, "{what}");

    let mut symbolizer = PythonSymbolizer::new();
    symbolizer.register(pid, &runtime);
    let script = fixture.script.clone();
    let file = script.as_path();
    let qualified = |qualname: &'static str, name: &'static str| {
        if minor >= 11 { qualname } else { name }
    };
    let expected = [
        location("𠀀", file, line_of("# WAIT")),
        location("函数", file, line_of("# CALL_INNER")),
        location(
            qualified("Outer.Inner.méthode", "méthode"),
            file,
            line_of("# CALL_FUNCTION"),
        ),
        location("<module>", file, line_of("# CALL_METHOD")),
    ];
    let walked: Vec<_> = frames
        .iter()
        .map(|f| symbolizer.symbolize(pid, f))
        .collect();
    assert_eq!(walked, expected, "{what}: the walked stack");

    // The frame as it was when the fixture printed f_lasti: f_lasti is in
    // bytes from 3.11 (the walk records the pointer's offset from the code
    // object) and in 3.8/3.9, in code units in 3.10.
    let instr = match minor {
        11.. => i64::from(printed.basicsize) + printed.lasti,
        10 => printed.lasti / 2,
        _ => printed.lasti,
    };
    let probe = PythonFrame {
        code: printed.code,
        instr: u32::try_from(instr).expect("instr"),
        firstlineno: printed.firstlineno,
    };
    assert_eq!(printed.lineno, line_of("# PROBE"), "{what}");
    assert_eq!(
        symbolizer.symbolize(pid, &probe),
        location("𠀀", file, printed.lineno),
        "{what}: the printed frame"
    );

    // The same address with another firstlineno: the code object there is
    // not the frame's.
    let stale = PythonFrame {
        firstlineno: printed.firstlineno + 1,
        ..probe
    };
    let unknown = PythonLocation {
        function: format!("<unknown code {:#x}>", printed.code),
        file: "<unknown>".to_string(),
        line: None,
    };
    assert_eq!(symbolizer.symbolize(pid, &stale), unknown, "{what}: stale");
    // Not a code object at all.
    let not_code = PythonFrame {
        code: printed.none,
        ..probe
    };
    assert_eq!(
        symbolizer.symbolize(pid, &not_code).function,
        format!("<unknown code {:#x}>", printed.none)
    );

    // A forked child shares the parent's code objects: its frames are
    // named from the parent's cache (this "child" does not exist).
    let child = u32::MAX - 1;
    symbolizer.fork(pid, child);
    assert_eq!(
        symbolizer.symbolize(child, &frames[2]),
        expected[2],
        "{what}: fork"
    );

    fixture.finish();
    // Gone: what was read is still named, the rest is unknown.
    assert_eq!(
        symbolizer.symbolize(pid, &frames[1]),
        expected[1],
        "{what}: after exit"
    );
    let uncached = PythonFrame {
        code: printed.code + 16,
        ..probe
    };
    assert_eq!(symbolizer.symbolize(pid, &uncached).line, None);
    symbolizer.forget(pid);
    assert!(!symbolizer.is_registered(pid));
    assert_eq!(symbolizer.symbolize(pid, &frames[1]).line, None);
    eprintln!("python frames checked on {what}");
}

const DEBIAN_PYTHON: &str = "/usr/bin/python3.11";
const PYENV: &str = "/root/.pyenv/versions";

/// pyenv's `3.<minor>.*` interpreters, sorted.
fn pyenv(minor: u8) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(PYENV)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix(&format!("3.{minor}."))?;
            rest.chars().all(|c| c.is_ascii_digit()).then_some(())?;
            let python = Path::new(PYENV)
                .join(&name)
                .join(format!("bin/python3.{minor}"));
            python.exists().then_some(python)
        })
        .collect();
    found.sort();
    found
}

#[test]
fn debian_python3_11_frames_are_found_walked_and_symbolized() {
    assert!(
        Path::new(DEBIAN_PYTHON).exists(),
        "{DEBIAN_PYTHON} is required"
    );
    check_interpreter(Path::new(DEBIAN_PYTHON));
}

#[test]
fn pyenv_python3_12_frames_are_found_walked_and_symbolized() {
    let found = pyenv(12);
    assert!(!found.is_empty(), "pyenv 3.12 is required under {PYENV}");
    found.iter().for_each(|p| check_interpreter(p));
}

#[test]
fn pyenv_python3_13_frames_are_found_walked_and_symbolized() {
    let found = pyenv(13);
    assert!(!found.is_empty(), "pyenv 3.13 is required under {PYENV}");
    found.iter().for_each(|p| check_interpreter(p));
}

/// 3.8-3.11 under pyenv, where present.
#[test]
fn other_pyenv_python_frames_are_found_walked_and_symbolized() {
    let mut ran = Vec::new();
    for minor in 8..=11 {
        for python in pyenv(minor) {
            check_interpreter(&python);
            ran.push(python.display().to_string());
        }
    }
    eprintln!("ran on: {ran:?}");
}

#[test]
fn old_pythons_are_refused_with_a_message() {
    for minor in [6u8, 7] {
        for python in pyenv(minor) {
            let mut child = Command::new(&python)
                .args([
                    "-c",
                    "import sys; print(1, flush=True); sys.stdin.readline()",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start old python");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("stdout"))
                .read_line(&mut line)
                .expect("handshake");
            let pid = child.id();
            let maps = ProcessMaps::read(pid).expect("maps");
            let result = find_runtime(pid, &maps);
            let _ = child.kill();
            let _ = child.wait();
            let message = result.expect_err("3.7- is refused").to_string();
            assert!(
                message.starts_with(&format!("python 3.{minor}"))
                    && message.ends_with(
                        "frames of this version cannot be walked yet; stacks stay native"
                    ),
                "{message}"
            );
            eprintln!("refused {}: {message}", python.display());
        }
    }
}
