//! The `memscope` command: parses arguments and drives the library.

mod check;
mod cli;
mod exit_code;

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser as _;
use memscope::{
    output::{self, escape::escape_control},
    session::{Session, SessionOptions, StopReason, TargetSpec},
    units::format_bytes,
};

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Command::Watchdog {
        map_id,
        memscope_pid,
        budget_ns,
    } = cli.command
    {
        return match memscope::watchdog::run(map_id, memscope_pid, budget_ns) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("memscope watchdog: {error}");
                ExitCode::from(exit_code::FAILURE)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("memscope: cannot start the async runtime: {error}");
            return ExitCode::from(exit_code::FAILURE);
        }
    };
    // `check`'s codes are its verdict's: any error of its own is 2.
    let checking = matches!(cli.command, Command::Check { .. });
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("memscope: {}", one_line(&error));
            ExitCode::from(if checking {
                exit_code::CHECK_ERROR
            } else {
                exit_code::for_error(&error)
            })
        }
    }
}

/// The error and its causes on one line, each said once: library errors
/// already name their cause in their own message.
fn one_line(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMSCOPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let (spec, args) = match cli.command {
        Command::Run { profile, command } => (TargetSpec::Run(command), profile),
        Command::Attach { profile, pid } => (TargetSpec::Attach(pid), profile),
        Command::Check {
            profile,
            gate,
            command,
        } => return check::check(command, profile, gate).await,
        Command::Report {
            path,
            output,
            json,
            format,
            top,
        } => {
            let format = format.with_json(json);
            return show_saved_report(&path, output.as_deref(), format, top).map(|()| 0);
        }
        Command::Diff {
            base,
            new,
            output,
            metric,
            format,
            top,
        } => return diff(&base, &new, output.as_deref(), metric.into(), format, top).map(|()| 0),
        Command::Mark { pid } => return mark(pid).map(|()| 0),
        Command::Watchdog { .. } => return Ok(0),
    };
    let window = args.window.unwrap_or(memscope::session::DEFAULT_WINDOW);
    let profiled = profile(&spec, &args, window, memscope::timeline::MAX_WINDOWS, false).await?;
    print_result(&profiled.report, args.format.with_json(args.json), args.top)?;
    profiled.finish()?;
    Ok(0)
}

/// A finished profile: its report, where it was written (or why not).
struct Profiled {
    report: memscope::report::Report,
    reason: StopReason,
    dir: PathBuf,
    written: Result<(), memscope::output::OutputError>,
    /// `--pprof-push`: its URL, and how many window profiles went out.
    pushed: Option<(String, Result<u64, output::push::PushError>)>,
}

impl Profiled {
    /// Says what was written, or fails on what could not be.
    fn finish(self) -> anyhow::Result<()> {
        let dir = self.dir;
        self.written
            .with_context(|| format!("cannot write the report to {}", dir.display()))?;
        eprintln!(
            "memscope: {}; wrote {} to {}",
            describe(self.reason),
            output::FILES.join(", "),
            dir.display()
        );
        if let Some((url, pushed)) = self.pushed {
            eprintln!("memscope: pushed {} window profiles to {url}", pushed?);
        }
        Ok(())
    }
}

/// Profiles `spec` until the session ends and writes its outputs.
async fn profile(
    spec: &TargetSpec,
    args: &cli::ProfileArgs,
    window: std::time::Duration,
    max_windows: usize,
    python_teardown: bool,
) -> anyhow::Result<Profiled> {
    let options = SessionOptions {
        capacity: args.capacity(),
        duration: args.duration,
        follow_children: !args.no_children,
        per_process_sites: args.per_process,
        follow_mode: args.follow_mode(),
        python_frames: !args.no_python_frames,
        unwind: args.unwind,
        python_objects: args.python_objects,
        python_teardown,
        window,
        max_windows,
        requests: args
            .request_fn
            .clone()
            .map(|function| memscope::session::RequestOptions {
                function,
                keep_after: args.keep_after,
            }),
        hold_budget: args.hold_budget(spec),
        stack_sample: args
            .stack_sample
            .map(|mean_bytes| memscope::sampling::StackSample { mean_bytes }),
        empty_programs: args.empty_programs,
    };
    if let Some(url) = &args.alert_webhook {
        memscope::alert::check_webhook(url)?;
    }
    let push = args
        .pprof_push
        .as_deref()
        .map(output::push::PprofPush::parse)
        .transpose()?;
    let mut session = Session::start(spec, &options)?;
    let push_url = push.as_ref().map(|p| p.url().to_owned());
    if let Some(push) = push {
        session.set_push(push);
    }
    // The command line and library path are the target's to choose; escaped,
    // they cannot send escape sequences to the terminal of root running this.
    eprintln!(
        "memscope: profiling pid {} ({}); {} probes on {}; kernel maps reserve {} (and {} B a live block, up to {}); Ctrl-C to stop",
        session.pid(),
        escape_control(session.command()),
        session.probes().len(),
        session
            .probes()
            .first()
            .map(|p| escape_control(&p.library.display().to_string()).into_owned())
            .unwrap_or_default(),
        format_bytes(session.reserved_bytes()),
        memscope::bpf::LIVE_BLOCK_BYTES,
        format_bytes(session.live_bytes_at_most()),
    );
    session.announce_requests();
    for probe in session.probes() {
        tracing::info!(
            "{}: entry probe at +{} ({}){}",
            probe.function,
            probe.entry_offset,
            if probe.emulated {
                "emulated"
            } else {
                "single-stepped"
            },
            if probe.return_probe {
                ", return probe"
            } else {
                ""
            }
        );
    }
    let dir = args
        .output
        .clone()
        .unwrap_or_else(|| default_output_dir(session.pid()));
    // Opened now: alerts.jsonl is written while the session runs. If it
    // cannot be, the profile is still taken and the table printed: the
    // error is the end's.
    let out = match output::OutputDir::create(&dir, output::Owner::from_sudo()) {
        Ok(out) => Some(out),
        Err(error) => {
            eprintln!("memscope: {error}: alerts go to stderr only");
            None
        }
    };
    session.set_alerts(
        alert_rules(args, session.pid()),
        alert_sinks(args, out.as_ref())?,
    );
    if io::stderr().is_terminal() {
        session.show_status();
    }
    let reason = session.wait(options.duration).await?;
    let ended = std::time::Instant::now();
    let report = session.report()?;
    tracing::info!("report built in {:?}", ended.elapsed());
    let pushed = push_url.zip(session.finish_pushes());
    // The table first: if the files cannot be written, it is all the user gets.
    let written = match &out {
        Some(out) => output::write_into(out, &report),
        None => output::write_all(&dir, &report),
    };
    Ok(Profiled {
        report,
        reason,
        dir,
        written,
        pushed,
    })
}

fn alert_rules(args: &cli::ProfileArgs, pid: u32) -> memscope::alert::AlertRules {
    let memory_limit = match args.memory_limit {
        Some(bytes) => Some(memscope::alert::limit::MemoryLimit {
            bytes,
            source: "--memory-limit".into(),
        }),
        None => memscope::alert::limit::of_process(pid),
    };
    memscope::alert::AlertRules {
        // With requests, growth is a request's: 50MB unless given.
        growth_per_window: args.alert_growth.filter(|_| args.request_fn.is_none()),
        growth_per_request: args.request_fn.as_ref().map(|_| {
            args.alert_growth
                .unwrap_or(memscope::alert::DEFAULT_REQUEST_GROWTH)
        }),
        rss_levels: args.alert_rss,
        memory_limit,
    }
}

fn alert_sinks(
    args: &cli::ProfileArgs,
    out: Option<&output::OutputDir>,
) -> anyhow::Result<Vec<Box<dyn memscope::alert::Sink>>> {
    use memscope::alert::{ExecSink, JsonLinesSink, StderrSink, WebhookSink};
    // The file before the line: whoever sees an alert on stderr finds it
    // in alerts.jsonl already.
    let mut sinks: Vec<Box<dyn memscope::alert::Sink>> = Vec::new();
    if let Some(out) = out {
        match out.create_for_appending(output::ALERTS_JSONL) {
            Ok(file) => sinks.push(Box::new(JsonLinesSink::new(file))),
            Err(error) => eprintln!("memscope: {error}: alerts go to stderr only"),
        }
    }
    sinks.push(Box::new(StderrSink));
    if let Some(url) = &args.alert_webhook {
        sinks.push(Box::new(WebhookSink::new(url)?));
    }
    if let Some(command) = &args.alert_exec {
        sinks.push(Box::new(ExecSink::new(command.clone())));
    }
    Ok(sinks)
}

/// `memscope mark`: SIGUSR2 to the running sessions.
fn mark(pid: Option<u32>) -> anyhow::Result<()> {
    let marked = memscope::mark::mark_sessions(pid)?;
    let pids: Vec<String> = marked.iter().map(u32::to_string).collect();
    eprintln!("memscope: closed the current window of {}", pids.join(", "));
    Ok(())
}

fn describe(reason: StopReason) -> &'static str {
    match reason {
        StopReason::TargetExited => "target exited",
        StopReason::Interrupted => "interrupted",
        StopReason::Terminated => "terminated",
        StopReason::HungUp => "hung up",
        StopReason::DurationElapsed => "duration elapsed",
    }
}

/// `memscope report`: a saved profile, re-rendered without the kernel.
fn show_saved_report(
    path: &Path,
    output: Option<&Path>,
    format: cli::Format,
    top: usize,
) -> anyhow::Result<()> {
    let report = memscope::report::saved::load(path)?;
    if let Some(dir) = output {
        output::write_all(dir, &report)
            .with_context(|| format!("cannot write to {}", dir.display()))?;
    }
    print_result(&report, format, top)
}

/// `memscope diff`: two saved profiles compared.
fn diff(
    base: &Path,
    new: &Path,
    svg: Option<&Path>,
    metric: memscope::diff::Metric,
    format: cli::DiffFormat,
    top: usize,
) -> anyhow::Result<()> {
    let diff = memscope::diff::ProfileDiff::compare(
        &memscope::report::saved::load(base)?,
        &memscope::report::saved::load(new)?,
        metric,
    );
    if let Some(path) = svg {
        let bytes = output::diff::render_svg(&diff)?;
        output::write_file(path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut stdout = io::stdout().lock();
    let result = match format {
        cli::DiffFormat::Json => serde_json::to_string_pretty(&diff)
            .map_err(io::Error::other)
            .and_then(|text| writeln!(stdout, "{text}")),
        cli::DiffFormat::Table => output::diff::render_table(&diff, top, &mut stdout),
    };
    finish_stdout(result, &mut stdout)
}

/// Prints the table or the JSON; a closed pipe (`| head`) is a normal end.
fn print_result(
    report: &memscope::report::Report,
    format: cli::Format,
    top: usize,
) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    let result = match format {
        cli::Format::Json => output::report_json(report)
            .map_err(io::Error::other)
            .and_then(|text| stdout.write_all(text.as_bytes())),
        cli::Format::Folded => stdout.write_all(output::folded::render(report).as_bytes()),
        cli::Format::Pprof => output::pprof::render(report)
            .map_err(io::Error::other)
            .and_then(|bytes| stdout.write_all(&bytes)),
        cli::Format::Table => output::table::render(report, top, &mut stdout),
    };
    finish_stdout(result, &mut stdout)
}

/// Flushes stdout after `result`; a closed pipe (`| head`) is a normal end.
fn finish_stdout(result: io::Result<()>, stdout: &mut impl io::Write) -> anyhow::Result<()> {
    match result.and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => {
            Err(error).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

/// `memscope-<pid>-<UTC date and time>` in the current directory.
fn default_output_dir(pid: u32) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from(format!("memscope-{pid}-{}", utc_timestamp(secs)))
}

/// `YYYYmmdd-HHMMSS` in UTC, from Unix seconds (civil-from-days).
fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "19700101-000000");
        assert_eq!(utc_timestamp(951_782_400 + 3723), "20000229-010203");
    }
}
