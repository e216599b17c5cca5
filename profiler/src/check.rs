//! `memscope check -- CMD`: the command run under memscope, then passed or
//! failed on its memory (`memscope::gate`), with a summary, JUnit XML and
//! GitHub Actions annotations.

use std::{
    ffi::OsString,
    io::{self, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use memscope::{
    gate::{self, Baseline, Rules, Suppressions},
    output::{self, escape::escape_control},
    session::TargetSpec,
};

use crate::cli::{GateArgs, ProfileArgs};

/// The first window's length: short, so that even a short run has the
/// windows a verdict needs; they double as the run grows (`CHECK_WINDOWS`).
const CHECK_WINDOW: Duration = Duration::from_millis(25);
/// Windows kept before they merge (and double).
const CHECK_WINDOWS: usize = 64;

pub const PASSED: u8 = 0;
pub const FAILED: u8 = 1;

pub async fn check(
    command: Vec<OsString>,
    args: ProfileArgs,
    gate: GateArgs,
) -> anyhow::Result<u8> {
    // Bad input fails before the command runs. Usage errors, as clap's
    // own: a gate on estimates would fail or pass a pull request by
    // chance, and one on nothing recorded would always pass.
    let refused = if args.stack_sample.is_some() {
        Some(
            "--stack-sample cannot be used with check: the gate needs each site's exact figures, and sampled sites are estimates",
        )
    } else if args.empty_programs {
        Some("--empty-programs cannot be used with check: its probes record nothing")
    } else {
        None
    };
    if let Some(message) = refused {
        <crate::cli::Cli as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    let suppressions = match &gate.suppress {
        Some(path) => Suppressions::read(path)?,
        None => Suppressions::default(),
    };
    let baseline = gate.baseline.as_deref().map(Baseline::read).transpose()?;
    let rules = Rules {
        max_leaked: gate.max_leaked,
        max_growth: gate.max_growth,
        max_rss: gate.max_rss,
        warmup_s: gate.warmup.map_or(0.0, |d| d.as_secs_f64()),
        tolerance: gate.tolerance,
    };
    let window = args.window.unwrap_or(CHECK_WINDOW);
    let spec = TargetSpec::Run(command);
    let profiled = crate::profile(&spec, &args, window, CHECK_WINDOWS, true).await?;
    let report = &profiled.report;
    let result = gate::evaluate(report, &rules, baseline.as_ref(), &suppressions);
    let command = report.target.command.clone();

    let mut stdout = io::stdout().lock();
    if args.json || args.format == crate::cli::Format::Json {
        let text = output::report_json(report)?;
        stdout.write_all(text.as_bytes())?;
    }
    gate::render::summary(&result, &mut stdout)?;
    match report.target.exit_code {
        Some(0) => {}
        Some(code) => writeln!(
            stdout,
            "  note: the command itself failed (exit code {code}); the memory verdict above does not count it"
        )?,
        None => writeln!(
            stdout,
            "  note: the command did not exit before memscope stopped"
        )?,
    }
    if std::env::var("GITHUB_ACTIONS").as_deref() == Ok("true") {
        let workspace = std::env::var("GITHUB_WORKSPACE").ok();
        gate::render::github_annotations(&result, workspace.as_deref(), &mut stdout)?;
    }
    stdout.flush()?;
    drop(stdout);

    if let Some(path) = &gate.junit {
        let xml = gate::render::junit(&result, &command).context("cannot make the JUnit XML")?;
        write_file(path, xml.as_bytes())?;
    }
    if let Some(path) = &gate.save_baseline {
        let taken = Baseline::of(report, rules.warmup_s, &command);
        let text = serde_json::to_string_pretty(&taken).context("cannot make the baseline")?;
        write_file(path, text.as_bytes())?;
        eprintln!(
            "memscope: wrote a baseline of {} sites to {}",
            taken.sites.len(),
            escape_control(&path.display().to_string())
        );
    }
    profiled.finish()?;
    Ok(if result.passed() { PASSED } else { FAILED })
}

/// Writes `contents` to `path` atomically (a temporary file renamed), the
/// file given to the user who ran sudo.
fn write_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = output::OutputDir::create(parent, output::Owner::from_sudo())?;
    dir.write_atomically(name, contents)?;
    Ok(())
}
