//! What `memscope check` says: a one-screen summary, GitHub Actions
//! annotations, and JUnit XML (one test case per check and per failing
//! site).

use std::io::{self, Write};

use quick_junit::{NonSuccessKind, Report as Junit, TestCase, TestCaseStatus, TestSuite};

use super::{Failure, GateResult};
use crate::output::escape::escape_control;

/// The summary, for a terminal or a CI log.
pub fn summary(result: &GateResult, out: &mut impl Write) -> io::Result<()> {
    let failed = result
        .outcomes
        .iter()
        .filter(|o| !o.failures.is_empty())
        .count();
    if failed == 0 {
        writeln!(
            out,
            "memscope check: PASSED ({} checks)",
            result.outcomes.len()
        )?;
    } else {
        writeln!(
            out,
            "memscope check: FAILED ({failed} of {} checks)",
            result.outcomes.len()
        )?;
    }
    for outcome in &result.outcomes {
        let word = if outcome.failures.is_empty() {
            "ok  "
        } else {
            "FAIL"
        };
        writeln!(out, "  {word} {}: {}", outcome.name, outcome.summary)?;
        for failure in &outcome.failures {
            let at = failure
                .site
                .as_ref()
                .and_then(|s| s.location.as_ref())
                .map(|(file, line)| format!(" [{}:{line}]", short_path(file)))
                .unwrap_or_default();
            writeln!(out, "       {}{at}", escape_control(&failure.message))?;
        }
    }
    for s in &result.suppressions {
        if s.sites.is_empty() {
            writeln!(
                out,
                "  unused suppression (line {}): {}",
                s.line,
                escape_control(&s.pattern)
            )?;
        } else {
            let bytes: u64 = s.sites.iter().map(|site| site.bytes).sum();
            writeln!(
                out,
                "  suppressed by `{}` (line {}): {} sites, {}",
                escape_control(&s.pattern),
                s.line,
                s.sites.len(),
                crate::units::format_bytes(bytes)
            )?;
        }
    }
    for note in &result.notes {
        writeln!(out, "  note: {note}")?;
    }
    Ok(())
}

/// The last two components of a path: enough to find the file.
fn short_path(path: &str) -> String {
    let parts: Vec<&str> = path.rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// `::error` workflow commands, one per failure, at its source line when
/// it has one (relative to `workspace`, GITHUB_WORKSPACE, when under it).
pub fn github_annotations(
    result: &GateResult,
    workspace: Option<&str>,
    out: &mut impl Write,
) -> io::Result<()> {
    for failure in result.failures() {
        let location = failure.site.as_ref().and_then(|s| s.location.as_ref());
        let mut properties = String::new();
        if let Some((file, line)) = location {
            let file = workspace
                .and_then(|w| file.strip_prefix(w.trim_end_matches('/')))
                .map(|f| f.trim_start_matches('/'))
                .unwrap_or(file);
            properties = format!("file={},line={line},", escape_property(file));
        }
        writeln!(
            out,
            "::error {properties}title=memscope check::{}",
            escape_data(&failure.message)
        )?;
    }
    Ok(())
}

/// GitHub's escaping of a command's message.
fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// ... and of a property's value.
fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

/// The JUnit XML: a suite `memscope check`, a case per check (failed when
/// it found anything) and a case per failing site.
pub fn junit(result: &GateResult, command: &str) -> Result<String, quick_junit::SerializeError> {
    let mut suite = TestSuite::new("memscope check");
    for outcome in &result.outcomes {
        let mut case = TestCase::new(outcome.name.as_str(), status(&outcome.failures));
        case.set_classname(command);
        case.set_system_out(outcome.summary.as_str());
        suite.add_test_case(case);
        for failure in &outcome.failures {
            let Some(site) = &failure.site else {
                continue;
            };
            let name = format!("{}: {}", outcome.name, site.chain);
            let mut case = TestCase::new(name, status(std::slice::from_ref(failure)));
            case.set_classname(command);
            suite.add_test_case(case);
        }
    }
    let mut report = Junit::new("memscope");
    report.add_test_suite(suite);
    report.to_string()
}

fn status(failures: &[Failure]) -> TestCaseStatus {
    if failures.is_empty() {
        return TestCaseStatus::success();
    }
    let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
    let messages: Vec<&str> = failures.iter().map(|f| f.message.as_str()).collect();
    status.set_message(messages[0]);
    status.set_type("memory");
    status.set_description(messages.join("\n"));
    status
}
