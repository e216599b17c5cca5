//! Stacks of code built without frame pointers, walked in the kernel by
//! each object's .eh_frame rules: the same chains, lines included, as the
//! same code built with frame pointers; C++ through operator new, Rust in
//! release mode, and Debian's own redis-server.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use memscope::report::{Report, Site};

use crate::support::*;

fn built(name: &str, status: std::io::Result<std::process::ExitStatus>) -> PathBuf {
    assert!(
        status.expect("the compiler runs").success(),
        "{name} does not build"
    );
    scratch().join(name)
}

/// tests/fixtures/unwind_chain.c at -O2, with or without frame pointers,
/// built as `name` (one per test: tests run in parallel).
fn chain_fixture(name: &str, frame_pointers: bool) -> PathBuf {
    let flags: &[&str] = if frame_pointers {
        &["-O2"]
    } else {
        &["-O2", "-fomit-frame-pointer"]
    };
    let source = workspace_file("tests/fixtures/unwind_chain.c");
    built(name, compile_c(&source, &scratch().join(name), flags))
}

fn chain(site: &Site) -> Vec<(&str, Option<u32>)> {
    site.frames
        .iter()
        .map(|f| (f.function.as_str(), f.line))
        .collect()
}

fn names(site: &Site) -> Vec<&str> {
    site.frames.iter().map(|f| f.function.as_str()).collect()
}

/// No frame outside every mapping, none cut short.
fn assert_every_frame_is_real(report: &Report) {
    for site in &report.sites {
        assert!(
            !site
                .frames
                .iter()
                .any(|f| f.function.starts_with("0x") || f.function == "[truncated]"),
            "{:?}",
            names(site)
        );
    }
}

const LIBC_START: [&str; 3] = ["__libc_start_call_main", "__libc_start_main_impl", "_start"];

#[test]
fn code_without_frame_pointers_gives_the_chains_it_has_with_them() {
    if !bpf_available() {
        return;
    }
    let mut chains = Vec::new();
    for frame_pointers in [true, false] {
        let fixture = chain_fixture(&format!("unwind_chain-{frame_pointers}"), frame_pointers);
        let test = format!("unwind_chain_{frame_pointers}");
        let (report, _) = run_command(&test, &[fixture.into_os_string()], &[]);
        let leak = site(&report, "leaf_alloc");
        assert_eq!(figures(leak), (100_000, 100, 100_000, 100));
        let mut expected = vec![
            "leaf_alloc",
            "big_frame",
            "with_alloca",
            "recurse",
            "recurse",
            "recurse",
            "recurse",
            "main",
        ];
        expected.extend(LIBC_START);
        assert_eq!(names(leak), expected, "frame pointers: {frame_pointers}");
        // The lines of the calls, in the fixture.
        assert_eq!(
            chain(leak)[..4],
            [
                ("leaf_alloc", Some(19)),
                ("big_frame", Some(27)),
                ("with_alloca", Some(35)),
                ("recurse", Some(41)),
            ]
        );
        // Taken at the system call: libc's wrapper is unwound too.
        let mapped = site(&report, "map_pages");
        assert_eq!(figures(mapped), (655_360, 10, 655_360, 10));
        let mut expected = vec!["map_pages", "main"];
        expected.extend(LIBC_START);
        assert_eq!(names(mapped), expected);
        assert_every_frame_is_real(&report);
        assert_nothing_lost(&report);
        let owned: Vec<(String, Option<u32>)> = chain(leak)
            .iter()
            .map(|&(f, l)| (f.to_owned(), l))
            .collect();
        chains.push(owned);
    }
    assert_eq!(chains[0], chains[1], "with and without frame pointers");

    // The kernel's frame-pointer walk on the same binary loses the callers:
    // the unwinder is what finds them.
    let (report, _) = run_command(
        "unwind_chain_fp_walk",
        &[scratch().join("unwind_chain-false").into_os_string()],
        &["--unwind", "fp"],
    );
    let leak = site(&report, "leaf_alloc");
    assert_eq!(figures(leak), (100_000, 100, 100_000, 100));
    assert!(!names(leak).contains(&"with_alloca"), "{:?}", names(leak));
}

/// Kills a server when dropped, however the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a file when dropped, however the test ends.
struct Installed(PathBuf);

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(output.status.success(), "{program} {args:?} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A stripped binary is named from its separate debug file under
/// /usr/lib/debug/.build-id (where Debian's -dbgsym packages put them);
/// without one, the report says which object had no symbols.
#[test]
fn a_stripped_binary_is_named_from_its_build_id_debug_file() {
    if !bpf_available() {
        return;
    }
    let fixture = chain_fixture("unwind_chain-unstripped", false);
    let stripped = scratch().join("unwind_chain-stripped");
    let debug = scratch().join("unwind_chain-stripped.debug");
    run_tool(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            fixture.as_os_str(),
            debug.as_os_str(),
        ],
    );
    run_tool(
        "strip",
        &[
            "--strip-all".as_ref(),
            "-o".as_ref(),
            stripped.as_os_str(),
            fixture.as_os_str(),
        ],
    );
    // As Debian's dh_strip leaves its binaries: a debug link by name, the
    // file itself only under the build id.
    let mut link = std::ffi::OsString::from("--add-gnu-debuglink=");
    link.push(&debug);
    run_tool("objcopy", &[link.as_os_str(), stripped.as_os_str()]);
    let notes = run_tool("readelf", &["-n".as_ref(), stripped.as_os_str()]);
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("gcc gives the fixture a build id")
        .to_owned();
    let installed = PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &build_id[..2],
        &build_id[2..]
    ));
    std::fs::create_dir_all(installed.parent().expect("a directory")).expect("debug dir");
    std::fs::copy(&debug, &installed).expect("debug file installed");
    std::fs::remove_file(&debug).expect("only the installed debug file is left");
    let guard = Installed(installed);

    let (report, _) = run_command("unwind_stripped", &[stripped.clone().into_os_string()], &[]);
    let leak = site(&report, "leaf_alloc");
    assert_eq!(
        names(leak)[..4],
        ["leaf_alloc", "big_frame", "with_alloca", "recurse"]
    );
    assert_eq!(leak.frames[0].line, Some(19));
    assert!(
        !report.warnings.iter().any(|w| w.contains("no symbols")),
        "{:?}",
        report.warnings
    );

    drop(guard);
    let (report, _) = run_command(
        "unwind_stripped_bare",
        &[stripped.clone().into_os_string()],
        &[],
    );
    let top = &report
        .sites
        .iter()
        .find(|s| s.live_count == 100)
        .expect("the leak")
        .frames[0];
    assert!(
        top.function.starts_with("unwind_chain-stripped+0x"),
        "{top:?}"
    );
    let warning = report
        .warnings
        .iter()
        .find(|w| w.contains("no symbols"))
        .expect("a warning for the object without symbols");
    assert!(
        warning.contains(&stripped.display().to_string()),
        "{warning}"
    );
}

#[test]
fn cpp_through_operator_new_names_its_callers() {
    if !bpf_available() {
        return;
    }
    let out = scratch().join("unwind_new-nofp");
    let status = Command::new("g++")
        .args([
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg("-o")
        .arg(&out)
        .arg(workspace_file("tests/fixtures/unwind_new.cpp"))
        .status();
    let fixture = built("unwind_new-nofp", status);
    let (report, _) = run_command("unwind_new", &[fixture.into_os_string()], &[]);
    let grow = site(&report, "Cache::grow()");
    assert_eq!(figures(grow), (200_000, 50, 200_000, 50));
    let mut expected = vec!["Cache::grow()", "fill(Cache&, int)", "main"];
    expected.extend(LIBC_START);
    assert_eq!(names(grow), expected);
    assert_eq!(grow.frames[1].line, Some(23));
}

#[test]
fn rust_in_release_mode_names_its_leaking_function_and_callers() {
    if !bpf_available() {
        return;
    }
    let out = scratch().join("rust_leak-release");
    let status = Command::new("rustc")
        .args(["-C", "opt-level=2", "-C", "force-frame-pointers=no", "-g"])
        .arg("-o")
        .arg(&out)
        .arg(workspace_file("tests/fixtures/rust_leak.rs"))
        .status();
    let fixture = built("rust_leak-release", status);
    let (report, _) = run_command("rust_release", &[fixture.into_os_string()], &[]);
    let leak = site(&report, "rust_leak::leak_vectors");
    assert_eq!(figures(leak), (600_000, 200, 600_000, 200));
    let names = names(leak);
    assert_eq!(names[1], "rust_leak::main");
    assert!(names.contains(&"std::rt::lang_start_internal"), "{names:?}");
    assert_eq!(names[names.len() - 3..], LIBC_START);
    assert_every_frame_is_real(&report);
}

/// Debian's redis-server, built without frame pointers, under
/// redis-benchmark: every frame is in a mapping, and the sites are redis's
/// own allocation paths.
#[test]
fn debian_redis_under_load_has_no_garbage_frames() {
    if !bpf_available() {
        return;
    }
    let port = 16_379;
    let redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs (cargo xtask setup installs it)"),
    );
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis does not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = output_dir("unwind_redis");
    let (mut memscope, _said) = attach_memscope(redis.0.id(), &dir, &["-d", "8s"]);
    let benchmark = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-n",
            "4000",
            "-q",
            "-t",
            "set,get,lpush",
        ])
        .output()
        .expect("redis-benchmark runs");
    eprintln!("{}", String::from_utf8_lossy(&benchmark.stdout));
    assert!(benchmark.status.success());
    assert!(memscope.wait().expect("memscope exits").success());
    drop(redis);
    let report = read_report(&dir);
    assert_no_frame_outside_mappings(&report);
    // jemalloc's malloc and free start with instructions the kernel would
    // single-step (35 us a pair here): every probe must sit on one it
    // emulates.
    let probes: Vec<(&str, u64, bool)> = report
        .probes
        .iter()
        .map(|p| (p.function.as_str(), p.entry_offset, p.emulated))
        .collect();
    assert!(probes.iter().all(|p| p.2), "{probes:?}");
    assert!(probes.contains(&("malloc", 7, true)), "{probes:?}");
    assert!(probes.contains(&("free", 48, true)), "{probes:?}");
    let sites: Vec<Vec<&str>> = report.sites.iter().map(names).collect();
    // SET's value objects, from the command through redis's allocator.
    assert!(
        sites.iter().any(|s| s.len() > 3
            && s[0] == "zmalloc"
            && s[1] == "createEmbeddedStringObject"
            && s.contains(&"processInputBuffer")),
        "{sites:#?}"
    );
    for site in sites.iter().take(5) {
        assert!(
            ["zmalloc", "zcalloc", "zrealloc", "ztrycalloc"]
                .iter()
                .any(|z| site[0].starts_with(z)),
            "a top site not in redis's allocator: {site:?}"
        );
    }
    assert_eq!(report.completeness.stack_errors, 0);
}

fn assert_no_frame_outside_mappings(report: &Report) {
    for site in &report.sites {
        assert!(
            !site.frames.iter().any(|f| f.function.starts_with("0x")),
            "{:?}",
            names(site)
        );
    }
}
