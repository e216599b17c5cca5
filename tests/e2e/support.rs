//! Builds fixtures and runs memscope on them.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    sync::OnceLock,
    sync::mpsc,
    time::Duration,
};

use memscope::report::{Report, Site};

pub const MEMSCOPE: &str = env!("CARGO_BIN_EXE_memscope");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Whether BPF tests can run: root is needed. Under CI=true its absence
/// fails the test instead of skipping it.
pub fn bpf_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "BPF tests need root and CI=true forbids skipping them"
        );
        eprintln!("SKIPPED: BPF tests need root (run `sudo cargo xtask test`)");
    }
    root
}

static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Compiles tests/fixtures/NAME.c (see `compile_c`) or NAME.rs (frame
/// pointers, no optimization) once per test run and returns the executable.
pub fn fixture(name: &str) -> PathBuf {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let source_dir = workspace().join("tests/fixtures");
    let out = scratch().join(format!("fixture-{name}"));
    let c_source = source_dir.join(format!("{name}.c"));
    let status = if c_source.exists() {
        compile_c(&c_source, &out, &[])
    } else {
        Command::new("rustc")
            .args([
                "-C",
                "force-frame-pointers=yes",
                "-C",
                "opt-level=0",
                "-g",
                "-o",
            ])
            .arg(&out)
            .arg(source_dir.join(format!("{name}.rs")))
            .status()
    };
    assert!(
        status.expect("compiler runs").success(),
        "fixture {name} does not build"
    );
    built.insert(name.to_owned(), out.clone());
    out
}

/// Builds a C program the way fixtures are built: -O0 and
/// -fno-builtin-malloc so gcc keeps every allocation, frame pointers so the
/// kernel can walk the stack, warnings as errors.
pub fn compile_c(
    source: &Path,
    out: &Path,
    extra: &[&str],
) -> std::io::Result<std::process::ExitStatus> {
    Command::new("gcc")
        .args([
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-builtin-malloc",
            "-pthread",
        ])
        .args(["-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(source)
        .status()
}

/// A file of the workspace.
pub fn workspace_file(path: &str) -> PathBuf {
    workspace().join(path)
}

/// A fresh output directory for one test.
pub fn output_dir(test: &str) -> PathBuf {
    let dir = scratch().join(format!("out-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Where `output_dir(test)` put a test's outputs, left as they are.
pub fn output_dir_path(test: &str) -> PathBuf {
    scratch().join(format!("out-{test}"))
}

pub fn read_report(dir: &Path) -> Report {
    let path = dir.join("report.json");
    let text = std::fs::read_to_string(&path).expect("report.json written");
    parse_report(&text, &path.display().to_string())
}

/// A report as memscope wrote it (`what` names where from), checked
/// against docs/report.schema.json before it is read.
pub fn parse_report(text: &str, what: &str) -> Report {
    let json: serde_json::Value = serde_json::from_str(text).expect("report.json parses");
    assert_valid_report(&json, what);
    serde_json::from_value(json).expect("report.json reads as a Report")
}

/// Fails with the validator's messages, each with the path of the value
/// at fault, when `report` does not match docs/report.schema.json.
pub fn assert_valid_report(report: &serde_json::Value, what: &str) {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let path = workspace_file(memscope::report::SCHEMA_FILE);
        let text = std::fs::read_to_string(&path).expect("docs/report.schema.json");
        let schema = serde_json::from_str(&text).expect("docs/report.schema.json parses");
        jsonschema::draft202012::new(&schema).expect("docs/report.schema.json is a JSON Schema")
    });
    let errors: Vec<String> = validator
        .iter_errors(report)
        .map(|e| {
            let at = e.instance_path().as_str();
            let at = if at.is_empty() { "(the top level)" } else { at };
            format!("  {at}: {e} (schema: {})", e.schema_path().as_str())
        })
        .collect();
    // The first few say what is wrong; a broken type can fail thousands.
    const SHOWN: usize = 20;
    let more = match errors.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!("\n  and {n} more"),
    };
    assert!(
        errors.is_empty(),
        "{what} does not match {}:\n{}{more}",
        memscope::report::SCHEMA_FILE,
        errors[..errors.len().min(SHOWN)].join("\n")
    );
}

/// `memscope run -o DIR -- FIXTURE`; asserts success and returns the report.
pub fn run_fixture(test: &str, fixture_name: &str, extra_args: &[&str]) -> (Report, Output) {
    run_command(test, &[fixture(fixture_name).into_os_string()], extra_args)
}

/// `memscope run -o DIR EXTRA_ARGS -- COMMAND`; asserts success and returns
/// the report.
pub fn run_command(
    test: &str,
    command: &[std::ffi::OsString],
    extra_args: &[&str],
) -> (Report, Output) {
    let dir = output_dir(test);
    let output = Command::new(MEMSCOPE)
        .arg("run")
        .arg("-o")
        .arg(&dir)
        .args(extra_args)
        .arg("--")
        .args(command)
        // Kept beside the report, at debug level: a failure under load
        // is told by its timings.
        .env("MEMSCOPE_LOG", "memscope=debug")
        .output()
        .expect("memscope runs");
    std::fs::write(dir.join("stderr.log"), &output.stderr).ok();
    assert!(
        output.status.success(),
        "memscope failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (read_report(&dir), output)
}

/// The one site whose innermost frame is `function`.
pub fn site<'a>(report: &'a Report, function: &str) -> &'a Site {
    let matches: Vec<&Site> = report
        .sites
        .iter()
        .filter(|s| s.frames.first().is_some_and(|f| f.function == function))
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "expected one site at {function}, sites: {:#?}",
        report
            .sites
            .iter()
            .map(|s| &s.frames[0].function)
            .collect::<Vec<_>>()
    );
    matches[0]
}

/// (live bytes, live count, alloc bytes, alloc count) of a site.
pub fn figures(site: &Site) -> (u64, u64, u64, u64) {
    (
        site.live_bytes,
        site.live_count,
        site.alloc_bytes,
        site.alloc_count,
    )
}

pub fn assert_nothing_lost(report: &Report) {
    let c = &report.completeness;
    assert_eq!(
        (c.map_full, c.stack_errors, c.missed_returns),
        (0, 0, 0),
        "loss: {c:?}"
    );
}

/// Lines of a child's stream, as they come.
pub fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("| {line}");
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

pub fn wait_for(
    lines: &mpsc::Receiver<String>,
    wanted: impl Fn(&str) -> bool,
    what: &str,
) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if wanted(&line) => return line,
            Ok(_) => {}
            Err(error) => panic!("no {what}: {error}"),
        }
    }
}

/// `memscope attach ARGS -o DIR PID`, its stderr's lines, once it has said
/// its banner (the probes are on).
pub fn attach_memscope(
    pid: u32,
    dir: &Path,
    args: &[&str],
) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut memscope = Command::new(MEMSCOPE)
        .arg("attach")
        .args(args)
        .arg("-o")
        .arg(dir)
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("memscope starts");
    let said = lines(memscope.stderr.take().expect("stderr"));
    wait_for(
        &said,
        |l| l.starts_with("memscope: profiling pid"),
        "the banner",
    );
    (memscope, said)
}

/// Asserts a figure is within 1% of what /proc says.
pub fn assert_near(ours: u64, theirs: u64, what: &str) {
    assert!(
        ours.abs_diff(theirs) * 100 <= theirs,
        "{what}: {ours} reported, {theirs} in /proc"
    );
}

/// A finished command's stderr, for assertion messages.
pub fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A plain-HTTP server on a free local port that answers every request
/// with `status`: its URL, and each request's line and body as they come.
pub fn http_receiver(status: &'static str) -> (String, mpsc::Receiver<(String, Vec<u8>)>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            reader.read_line(&mut request_line).expect("request line");
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).expect("header");
                if header.trim().is_empty() {
                    break;
                }
                if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().expect("length");
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).expect("body");
            let mut stream = reader.into_inner();
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            if tx.send((request_line.trim().to_owned(), body)).is_err() {
                return;
            }
        }
    });
    (url, rx)
}

/// A gzipped pprof profile, decoded.
pub fn pprof_of(gzipped: &[u8]) -> memscope::output::pprof::Profile {
    use prost::Message as _;
    use std::io::Read as _;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gzipped)
        .read_to_end(&mut bytes)
        .expect("gzip");
    memscope::output::pprof::Profile::decode(bytes.as_slice()).expect("a pprof profile")
}

/// The four values (alloc_objects, alloc_space, inuse_objects,
/// inuse_space) of the samples whose innermost frame is `function`, summed.
pub fn sample_values(profile: &memscope::output::pprof::Profile, function: &str) -> [i64; 4] {
    let name = |index: i64| profile.string_table[index as usize].as_str();
    let innermost = |id: u64| {
        let location = profile.location.iter().find(|l| l.id == id)?;
        let line = location.line.first()?;
        let f = profile.function.iter().find(|f| f.id == line.function_id)?;
        Some(name(f.name))
    };
    let mut sum = [0; 4];
    for sample in &profile.sample {
        if sample.location_id.first().and_then(|id| innermost(*id)) == Some(function) {
            for (into, value) in sum.iter_mut().zip(&sample.value) {
                *into += value;
            }
        }
    }
    sum
}

/// `memscope ARGS` exits 2 (a usage error) and says `expected`.
pub fn assert_usage_error(args: &[&str], expected: &str) {
    let output = Command::new(MEMSCOPE).args(args).output().expect("runs");
    assert_eq!(output.status.code(), Some(2), "{}", stderr_of(&output));
    assert!(
        stderr_of(&output).contains(expected),
        "{}",
        stderr_of(&output)
    );
}
