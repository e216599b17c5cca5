//! How a CPython process's objects are counted. pymalloc serves objects of
//! 512 bytes or less from its own arenas (mmap), never through malloc: by
//! default they are seen as the arenas, charged to the Python stack that
//! opened each. `--python-objects` counts them one by one:
//! - with `run`, the command runs with `PYTHONMALLOC=malloc`, so every
//!   object is a malloc call the allocator probes see. Exact on every build,
//!   Debian's LTO one included, at the cost of malloc's speed and layout in
//!   place of pymalloc's;
//! - a process started with `PYTHONMALLOC=malloc` (or `malloc_debug`) is
//!   counted the same way, `attach` included.

use crate::report::{ProcessReport, PythonObjects};

/// The variable that picks CPython's allocators, and the value memscope
/// sets for `--python-objects` with `run`.
pub const ALLOCATOR_VARIABLE: &str = "PYTHONMALLOC";
pub const ONE_BY_ONE: &str = "malloc";

/// How `pid`'s objects are counted with no probes of its own: through malloc
/// when its environment sends every object there.
pub fn counting_from_environment(pid: u32) -> PythonObjects {
    match allocator_setting(pid).as_deref() {
        Some("malloc" | "malloc_debug") => PythonObjects::Malloc,
        _ => PythonObjects::Arenas,
    }
}

/// `PYTHONMALLOC` in `pid`'s environment as it started.
fn allocator_setting(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{ALLOCATOR_VARIABLE}=");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// A warning when `--python-objects` replaced a `PYTHONMALLOC` the user had
/// set for the command.
pub fn replaced_setting() -> Option<String> {
    let value = std::env::var(ALLOCATOR_VARIABLE).ok()?;
    (value != ONE_BY_ONE && value != "malloc_debug").then(|| {
        format!(
            "--python-objects ran the command with {ALLOCATOR_VARIABLE}={ONE_BY_ONE}, not the {ALLOCATOR_VARIABLE}={value} it was given"
        )
    })
}

/// What the report says of how the Python processes' objects were counted:
/// `asked` is `--python-objects`, `started` whether memscope started the
/// command (`run`), so could choose its allocator.
pub fn counting_warning(processes: &[ProcessReport], asked: bool, started: bool) -> Option<String> {
    let by_arena: Vec<String> = processes
        .iter()
        .filter(|p| p.python_objects == Some(PythonObjects::Arenas))
        .map(|p| p.pid.to_string())
        .collect();
    if by_arena.is_empty() {
        let one_by_one = processes
            .iter()
            .any(|p| p.python_objects == Some(PythonObjects::Malloc));
        return one_by_one.then(|| {
            format!(
                "python: objects counted one by one through malloc ({ALLOCATOR_VARIABLE}={ONE_BY_ONE}): counts and bytes are exact; RSS and fragmentation are malloc's, not pymalloc's"
            )
        });
    }
    let arenas = "objects of 512 bytes or less come from CPython's arenas, counted as [mmap] sites charged to the Python stack that opened each";
    Some(match (asked, started) {
        (false, _) => format!(
            "python: {arenas}; `memscope run --python-objects` (or {ALLOCATOR_VARIABLE}={ONE_BY_ONE} in the target's environment) counts them one by one"
        ),
        (true, false) => format!(
            "python: --python-objects cannot switch the allocator of a running interpreter: in pid {} {arenas}; start it with {ALLOCATOR_VARIABLE}={ONE_BY_ONE}, or profile it with `memscope run --python-objects`",
            by_arena.join(", ")
        ),
        (true, true) => format!(
            "python: pid {} reset {ALLOCATOR_VARIABLE} in its environment: its {arenas}",
            by_arena.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, objects: Option<PythonObjects>) -> ProcessReport {
        ProcessReport {
            pid,
            python_objects: objects,
            ..Default::default()
        }
    }

    #[test]
    fn no_python_process_no_word_about_objects() {
        assert_eq!(counting_warning(&[process(1, None)], true, true), None);
    }

    #[test]
    fn arenas_by_default_say_how_to_count_one_by_one() {
        let warning = counting_warning(&[process(1, Some(PythonObjects::Arenas))], false, true)
            .expect("a word on arenas");
        assert!(warning.contains("run --python-objects"), "{warning}");
    }

    #[test]
    fn attach_cannot_switch_a_running_interpreter_and_names_it() {
        let processes = [
            process(7, Some(PythonObjects::Malloc)),
            process(8, Some(PythonObjects::Arenas)),
        ];
        let warning = counting_warning(&processes, true, false).expect("a word on pid 8");
        assert!(warning.contains("in pid 8 objects"), "{warning}");
        assert!(warning.contains("PYTHONMALLOC=malloc"), "{warning}");
    }

    #[test]
    fn one_by_one_says_the_figures_are_mallocs() {
        let warning = counting_warning(&[process(1, Some(PythonObjects::Malloc))], true, true)
            .expect("a word on malloc");
        assert!(warning.contains("exact"), "{warning}");
    }
}
