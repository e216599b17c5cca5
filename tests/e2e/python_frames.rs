//! Python frames in allocation stacks, on every CPython of the machine:
//! Debian's python3.11 (libpython linked into a non-PIE executable) and
//! pyenv's 3.8-3.13 (shared libpython, mapped only after the exec).
//! Scripts under tests/fixtures/python keep known blocks from known lines,
//! marked `# NAME`; every figure is exact.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use memscope::report::{Frame, Language, PythonObjects, Report, Site};

use crate::support::*;

/// Every CPython this machine kind has. Debian's 3.11 and pyenv's 3.12 and
/// 3.13 must be there; the others run where present.
fn interpreters() -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let debian = PathBuf::from("/usr/bin/python3.11");
    assert!(debian.exists(), "Debian's python3.11 is missing");
    found.push(("debian-3.11".to_owned(), debian));
    for (version, required) in [
        ("3.8", false),
        ("3.9", false),
        ("3.10", false),
        ("3.11", false),
        ("3.12", true),
        ("3.13", true),
    ] {
        let exe = std::fs::read_dir("/root/.pyenv/versions")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.strip_prefix(version)
                    .is_some_and(|rest| rest.starts_with('.'))
            })
            .map(|entry| entry.path().join(format!("bin/python{version}")))
            .find(|exe| exe.exists());
        match exe {
            Some(exe) => found.push((format!("pyenv-{version}"), exe)),
            None => assert!(!required, "pyenv's python{version} is missing"),
        }
    }
    let names: Vec<&str> = found.iter().map(|(name, _)| name.as_str()).collect();
    eprintln!("python interpreters: {}", names.join(", "));
    found
}

fn script(name: &str) -> PathBuf {
    workspace_file(&format!("tests/fixtures/python/{name}"))
}

/// The line of `script` marked `# MARK`.
fn line_of(script: &Path, mark: &str) -> u32 {
    let text = std::fs::read_to_string(script).expect("fixture script");
    let tag = format!("# {mark}");
    text.lines()
        .position(|line| line.trim_end().ends_with(&tag))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("{} has no line marked {tag}", script.display()))
}

fn run_python(test: &str, interpreter: &Path, script: &Path) -> Report {
    let (report, output) = run_command(
        test,
        &[interpreter.into(), script.into()],
        &["--per-process"],
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("done"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    report
}

fn is_python(frame: &Frame, function: &str, script: &Path, line: u32) -> bool {
    frame.language == Language::Python
        && frame.function == function
        && frame.file.as_deref() == Some(&*script.to_string_lossy())
        && frame.line == Some(line)
}

/// The one site whose first frame is `function` at `script:line`.
fn python_site<'a>(report: &'a Report, function: &str, script: &Path, line: u32) -> &'a Site {
    let sites: Vec<&Site> = report
        .sites
        .iter()
        .filter(|s| {
            s.frames
                .first()
                .is_some_and(|f| is_python(f, function, script, line))
        })
        .collect();
    assert_eq!(
        sites.len(),
        1,
        "one site at {function} ({}:{line}); processes: {:?}; sites: {:#?}",
        script.display(),
        report
            .processes
            .iter()
            .map(|p| (&p.command, &p.note))
            .collect::<Vec<_>>(),
        report
            .sites
            .iter()
            .take(12)
            .map(|s| s
                .frames
                .iter()
                .take(3)
                .map(Frame::label)
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    sites[0]
}

fn assert_walked_everything(report: &Report, name: &str) {
    let c = &report.completeness;
    assert_eq!(
        (c.python_stack_errors, c.python_stacks_full, c.map_full),
        (0, 0, 0),
        "{name}: {c:?}"
    );
    assert!(
        report.processes[0].python.is_some(),
        "{name}: the interpreter was found: {:?}",
        report.processes[0]
    );
}

#[test]
fn leak_here_is_named_by_function_file_and_line_on_every_interpreter() {
    if !bpf_available() {
        return;
    }
    let script = script("leak_here.py");
    let line = line_of(&script, "LEAK");
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-leak-{name}"), &interpreter, &script);
        assert_walked_everything(&report, &name);
        let site = python_site(&report, "leak_here", &script, line);
        assert_eq!(
            (site.live_count, site.live_bytes),
            (20, 20 * ((1 << 20) + 1)),
            "{name}: {site:#?}"
        );
        // Below leak_here: the module that called it, nothing native.
        let second = &site.frames[1];
        assert_eq!(
            (second.function.as_str(), second.language),
            ("<module>", Language::Python),
            "{name}: {site:#?}"
        );
        assert_eq!(site.frames.len(), 2, "{name}: {site:#?}");
        eprintln!("{name}: leak_here exact");
    }
}

/// A script that ends normally: its interpreter frees its code objects
/// at teardown, before the `_exit` stop, so its frames are named at the
/// stop on `Py_FinalizeEx`.
#[test]
fn a_script_that_ends_normally_has_its_frames_named() {
    if !bpf_available() {
        return;
    }
    let script = script("normal_exit.py");
    let line = line_of(&script, "ALLOC");
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-normal-exit-{name}"), &interpreter, &script);
        assert_walked_everything(&report, &name);
        let site = python_site(&report, "grow", &script, line);
        assert_eq!(
            (site.alloc_count, site.alloc_bytes),
            (5, 5 * 100_001),
            "{name}: {site:#?}"
        );
        assert_eq!(site.frames[1].function, "<module>", "{name}: {site:#?}");
    }
}

/// With `--stack-sample` the blocks walked are named as in exact mode, and
/// the site's estimate is within its stated error.
#[test]
fn a_sampled_python_leak_keeps_its_frames_within_its_error() {
    if !bpf_available() {
        return;
    }
    let script = script("leak_here.py");
    let line = line_of(&script, "LEAK");
    let (report, _) = run_command(
        "py-leak-sampled",
        &["/usr/bin/python3.11".into(), script.clone().into()],
        &["--stack-sample", "64KB"],
    );
    assert_walked_everything(&report, "sampled");
    let sampling = report.sampling.expect("sampled");
    assert!(
        sampling.walked_count < report.totals.alloc_count / 10,
        "{sampling:?}"
    );
    assert!(report.totals.live_bytes >= 20 << 20, "{:?}", report.totals);
    let site = python_site(&report, "leak_here", &script, line);
    assert_eq!(site.frames[1].function, "<module>", "{site:#?}");
    // 1 MiB blocks at a 64 KiB gap: each is walked but with odds of 1 in
    // 9 million, so the estimate is the truth to its rounding, while the
    // interpreter's small blocks are seldom walked.
    let error = site.live_bytes_error.expect("an error");
    let truth = 20 * ((1u64 << 20) + 1);
    assert!(
        site.live_bytes.abs_diff(truth) as f64 <= 2.5 * error as f64 + 16.0,
        "{} against {truth}, error {error}",
        site.live_bytes
    );
}

#[test]
fn two_threads_leaking_from_two_functions_are_told_apart() {
    if !bpf_available() {
        return;
    }
    let script = script("two_threads.py");
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-threads-{name}"), &interpreter, &script);
        assert_walked_everything(&report, &name);
        for (function, mark) in [("first_worker", "FIRST"), ("second_worker", "SECOND")] {
            let site = python_site(&report, function, &script, line_of(&script, mark));
            assert_eq!(
                (site.live_count, site.live_bytes),
                (10, 10 * ((256 << 10) + 1)),
                "{name} {function}: {site:#?}"
            );
        }
    }
}

#[test]
fn recursion_past_the_frame_limit_keeps_the_innermost_frames_and_is_counted() {
    if !bpf_available() {
        return;
    }
    let script = script("deep.py");
    let line = line_of(&script, "DEEP");
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-deep-{name}"), &interpreter, &script);
        let site = python_site(&report, "deep", &script, line);
        assert_eq!(
            (site.live_count, site.live_bytes),
            (5, 5 * ((1 << 20) + 1)),
            "{name}: {site:#?}"
        );
        // 64 frames of `deep`, then the note that outer ones are missing;
        // never a frame that is not there.
        let kept = profiler_common::MAX_PYTHON_FRAMES;
        assert_eq!(site.frames.len(), kept + 1, "{name}: {site:#?}");
        assert!(
            site.frames[..kept].iter().all(|f| f.function == "deep"),
            "{name}: {site:#?}"
        );
        assert!(
            site.frames[kept]
                .function
                .contains("outer ones not recorded"),
            "{name}: {site:#?}"
        );
        assert!(
            report.completeness.python_truncated >= 5,
            "{name}: {:?}",
            report.completeness
        );
    }
}

#[test]
fn an_asyncio_handler_shows_its_coroutine_chain() {
    if !bpf_available() {
        return;
    }
    let script = script("coroutines.py");
    let (load, awaited) = (line_of(&script, "CORO"), line_of(&script, "AWAIT"));
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-coro-{name}"), &interpreter, &script);
        assert_walked_everything(&report, &name);
        let site = python_site(&report, "load_payload", &script, load);
        assert_eq!(
            (site.live_count, site.live_bytes),
            (8, 8 * ((512 << 10) + 1)),
            "{name}: {site:#?}"
        );
        assert!(
            is_python(&site.frames[1], "handle_request", &script, awaited),
            "{name}: {site:#?}"
        );
    }
}

#[test]
fn small_objects_are_attributed_to_the_function_whose_arenas_hold_them() {
    if !bpf_available() {
        return;
    }
    let script = script("small_objects.py");
    let line = line_of(&script, "SMALL");
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-small-{name}"), &interpreter, &script);
        assert_walked_everything(&report, &name);
        // pymalloc's arenas are mapped outside malloc; those opened while
        // keep_small ran are charged to it.
        let arenas: u64 = report
            .sites
            .iter()
            .filter(|s| s.kind == memscope::report::SiteKind::Mmap)
            .filter(|s| {
                s.frames
                    .iter()
                    .any(|f| is_python(f, "keep_small", &script, line))
            })
            .map(|s| s.live_bytes)
            .sum();
        // 100000 dicts of at least 48 bytes each.
        assert!(arenas >= 100_000 * 48, "{name}: {arenas} bytes");
        assert_eq!(
            report.processes[0].python_objects,
            Some(PythonObjects::Arenas),
            "{name}"
        );
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("--python-objects")),
            "{name}: the arenas are said, and how to count one by one: {:?}",
            report.warnings
        );
        eprintln!("{name}: keep_small holds {arenas} bytes of arenas");
    }
}

#[test]
fn python_objects_counts_each_small_object_exactly() {
    if !bpf_available() {
        return;
    }
    let script = script("small_objects.py");
    let line = line_of(&script, "SMALL");
    for (name, interpreter) in interpreters() {
        let (report, output) = run_command(
            &format!("py-objects-{name}"),
            &[interpreter.into(), script.clone().into()],
            &["--per-process", "--python-objects"],
        );
        // "done SIZE": sys.getsizeof({}), the bytes of one empty dict.
        let stdout = String::from_utf8_lossy(&output.stdout);
        let size: u64 = stdout
            .lines()
            .find_map(|line| line.strip_prefix("done "))
            .and_then(|size| size.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {stdout}"));
        assert_walked_everything(&report, &name);
        let site = python_site(&report, "keep_small", &script, line);
        assert_eq!(
            (site.kind, site.live_count, site.live_bytes),
            (memscope::report::SiteKind::Malloc, 100_000, 100_000 * size),
            "{name}: {site:#?}"
        );
        assert_eq!(
            report.processes[0].python_objects,
            Some(PythonObjects::Malloc),
            "{name}"
        );
        // No arena: every object went through malloc.
        assert!(
            !report
                .sites
                .iter()
                .any(|s| s.kind == memscope::report::SiteKind::Mmap
                    && s.frames
                        .iter()
                        .any(|f| is_python(f, "keep_small", &script, line))),
            "{name}"
        );
        eprintln!("{name}: 100000 dicts of {size} bytes, exact");
    }
}

#[test]
fn python_objects_with_attach_probes_the_object_allocator_where_the_build_has_one() {
    if !bpf_available() {
        return;
    }
    let script = script("small_objects.py");
    let line = line_of(&script, "SMALL");
    for (name, interpreter) in interpreters() {
        let (report, size) = attach_small_objects(
            &format!("py-attach-objects-{name}"),
            &interpreter,
            &script,
            &["--python-objects"],
        );
        let objects = report.processes[0].python_objects;
        if name == "debian-3.11" {
            // Its LTO build inlines pymalloc where it is called: no
            // function to probe, and the report says so and what to do.
            assert_eq!(objects, Some(PythonObjects::Arenas), "{name}");
            assert!(
                report
                    .warnings
                    .iter()
                    .any(|w| w.contains("inlines pymalloc") && w.contains("run --python-objects")),
                "{name}: {:?}",
                report.warnings
            );
            continue;
        }
        assert_eq!(objects, Some(PythonObjects::Probes), "{name}");
        let site = python_site(&report, "keep_small", &script, line);
        assert_eq!(
            (site.live_count, site.live_bytes, site.alloc_count),
            (100_000, 100_000 * size, 100_000),
            "{name}: {site:#?}"
        );
        let c = &report.completeness;
        assert_eq!(
            (c.missed_returns, c.live_map_full, c.in_flight_full),
            (0, 0, 0),
            "{name}: {c:?}"
        );
        eprintln!("{name}: attached, 100000 dicts of {size} bytes, exact");
    }
}

/// Runs small_objects.py --wait under `interpreter`, attaches memscope
/// with `args` before keep_small starts, and ends memscope (Ctrl-C) once it
/// is done, while the interpreter still runs (its code objects are read).
/// Returns the report and the size of one dict.
fn attach_small_objects(
    test: &str,
    interpreter: &Path,
    script: &Path,
    args: &[&str],
) -> (Report, u64) {
    let mut target = Command::new(interpreter)
        .arg(script)
        .arg("--wait")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut target_out = BufReader::new(target.stdout.take().expect("stdout"));
    let mut line = String::new();
    target_out.read_line(&mut line).expect("handshake");
    assert_eq!(line, "ready\n");
    let dir = output_dir(test);
    let mut memscope = Command::new(MEMSCOPE)
        .arg("attach")
        .arg("-o")
        .arg(&dir)
        .args(args)
        .arg(target.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("memscope starts");
    let mut memscope_err = BufReader::new(memscope.stderr.take().expect("stderr"));
    let mut banner = String::new();
    memscope_err.read_line(&mut banner).expect("banner");
    assert!(banner.starts_with("memscope: profiling pid"), "{banner}");
    let mut stdin = target.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").expect("start keep_small");
    line.clear();
    target_out.read_line(&mut line).expect("done");
    let size = line
        .strip_prefix("done ")
        .and_then(|size| size.trim().parse().ok())
        .unwrap_or_else(|| panic!("{test}: {line}"));
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(memscope.id() as i32, libc::SIGINT) };
    let status = memscope.wait().expect("memscope exits");
    assert!(status.success(), "{test}: memscope failed: {status}");
    drop(stdin);
    assert!(target.wait().expect("python exits").success());
    (read_report(&dir), size)
}

#[test]
fn python_reached_through_a_shell_env_or_the_pyenv_shim_is_walked() {
    if !bpf_available() {
        return;
    }
    let script = script("leak_here.py");
    let line = line_of(&script, "LEAK");
    let script_arg = script.to_string_lossy().into_owned();
    let pyenv_312 = interpreters()
        .into_iter()
        .find(|(name, _)| name == "pyenv-3.12")
        .map(|(_, exe)| exe)
        .expect("pyenv's 3.12");
    let shim = Path::new("/root/.pyenv/shims/python3");
    let mut commands: Vec<(&str, Vec<String>)> = vec![
        // dash forks the interpreter: a child of the command, not the
        // command itself, stopped at its own exit to be read.
        (
            "sh -c",
            vec![
                "sh".into(),
                "-c".into(),
                format!("/usr/bin/python3.11 {script_arg}"),
            ],
        ),
        // env executes a shared-libpython interpreter in place.
        (
            "env",
            vec![
                "env".into(),
                pyenv_312.to_string_lossy().into_owned(),
                script_arg.clone(),
            ],
        ),
    ];
    // .../versions/3.12.1/bin/python3.12 -> 3.12.1
    let version = pyenv_312
        .ancestors()
        .nth(2)
        .and_then(Path::file_name)
        .map(|v| v.to_string_lossy().into_owned())
        .expect("a pyenv version directory");
    if shim.exists() {
        // pyenv's shim: bash scripts that end in an exec of the interpreter.
        commands.push((
            "pyenv shim",
            vec![
                "env".into(),
                format!("PYENV_VERSION={version}"),
                shim.to_string_lossy().into_owned(),
                script_arg.clone(),
            ],
        ));
    }
    for (name, command) in commands {
        let argv: Vec<std::ffi::OsString> = command.iter().map(Into::into).collect();
        let (report, output) =
            run_command(&format!("py-via-{}", name.replace(' ', "-")), &argv, &[]);
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("done"),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let site = python_site(&report, "leak_here", &script, line);
        assert_eq!(
            (site.live_count, site.live_bytes),
            (20, 20 * ((1 << 20) + 1)),
            "{name}: {site:#?}"
        );
        eprintln!("{name}: leak_here exact");
    }
}

#[test]
fn a_thread_that_released_the_gil_gets_its_own_python_stack() {
    if !bpf_available() {
        return;
    }
    let script = script("gil_released.py");
    let line = line_of(&script, "NOGIL");
    for (name, interpreter) in interpreters() {
        let report = run_python(&format!("py-gil-{name}"), &interpreter, &script);
        assert_walked_everything(&report, &name);
        // malloc is called by libffi, in the thread that let the GIL go
        // while the main thread spins holding it: the native frames lead
        // to that thread's Python stack, not the GIL holder's.
        let sites: Vec<&Site> = report
            .sites
            .iter()
            .filter(|s| {
                s.frames
                    .iter()
                    .any(|f| is_python(f, "allocate_without_gil", &script, line))
            })
            .collect();
        assert_eq!(sites.len(), 1, "{name}: {sites:#?}");
        let site = sites[0];
        assert_eq!(
            (site.live_count, site.live_bytes),
            (10, 10 * 300_000),
            "{name}: {site:#?}"
        );
        // libffi's frame leads, unless the kernel's native walk failed
        // (counted): then the Python stack stands alone (see build_report).
        if report.completeness.stack_errors == 0 {
            assert_eq!(
                site.frames[0].language,
                Language::Native,
                "{name}: {site:#?}"
            );
        }
        assert!(
            site.frames.iter().all(|f| f.function != "spin"),
            "{name}: {site:#?}"
        );
    }
}
