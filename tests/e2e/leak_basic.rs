use crate::support::*;

#[test]
fn leak_site_holds_exactly_what_it_leaked() {
    if !bpf_available() {
        return;
    }
    let (report, output) = run_fixture("leak_basic", "leak_basic", &[]);
    assert_eq!(
        figures(site(&report, "leak_site")),
        (4_096_000, 1000, 4_096_000, 1000)
    );
    // Churn: allocated and freed, nothing live.
    let churn = site(&report, "churn_site");
    assert_eq!(figures(churn), (0, 0, 640_000, 5000));
    assert_eq!((churn.free_bytes, churn.free_count), (640_000, 5000));
    let leak = &report.sites[0];
    assert_eq!(
        leak.frames[0].function, "leak_site",
        "sites sort by live bytes"
    );
    assert_eq!(leak.frames[1].function, "main");
    assert_eq!(
        leak.frames[0]
            .file
            .as_deref()
            .map(|f| f.ends_with("leak_basic.c")),
        Some(true)
    );
    assert_eq!(leak.frames[0].line, Some(9));
    assert_nothing_lost(&report);
    assert_eq!(report.completeness.unknown_frees, 0);
    assert_eq!(report.target.exit_code, Some(0));
    assert_eq!(report.schema, "memscope.report/1");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let table_line = stdout
        .lines()
        .find(|l| {
            l.ends_with(
                "leak_site <- main <- __libc_start_call_main <- __libc_start_main_impl <- ...",
            )
        })
        .unwrap_or_else(|| panic!("table names leak_site:\n{stdout}"));
    assert!(
        table_line.trim_start().starts_with("4096000 "),
        "{table_line}"
    );
}

#[test]
fn flamegraph_and_folded_stacks_show_the_leak() {
    if !bpf_available() {
        return;
    }
    let (_, _) = run_fixture("leak_basic_outputs", "leak_basic", &[]);
    let dir = output_dir_path("leak_basic_outputs");
    let folded = std::fs::read_to_string(dir.join("stacks.folded")).expect("stacks.folded");
    assert!(
        folded
            .lines()
            .any(|l| l
                == "_start;__libc_start_main_impl;__libc_start_call_main;main;leak_site 4096000"),
        "{folded}"
    );
    let svg = std::fs::read_to_string(dir.join("inuse.svg")).expect("inuse.svg");
    assert!(svg.starts_with("<?xml"), "not an SVG document");
    assert!(
        svg.contains("leak_site (4,096,000 bytes"),
        "flamegraph lacks the leak"
    );
    assert!(svg.trim_end().ends_with("</svg>"));
}

#[test]
fn json_flag_prints_the_report_on_stdout() {
    if !bpf_available() {
        return;
    }
    let (report, output) = run_fixture("leak_basic_json", "leak_basic", &["--json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The fixture's own line comes first; the JSON document follows.
    let json_start = stdout.find("{\n").expect("JSON on stdout");
    let printed = parse_report(&stdout[json_start..], "--json's stdout");
    assert_eq!(printed, report);
}

/// A saved profile re-renders without the kernel (and without root).
#[test]
fn saved_report_renders_again_without_root() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("leak_basic_saved", "leak_basic", &[]);
    let saved = output_dir_path("leak_basic_saved");
    let rendered = output_dir("leak_basic_rerendered");
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(crate::support::MEMSCOPE)
        .arg("report")
        .arg(saved.join("report.json"))
        .arg("--json")
        .output()
        .expect("memscope report runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let again = parse_report(
        &String::from_utf8_lossy(&output.stdout),
        "memscope report --json's stdout",
    );
    assert_eq!(again, report);

    let output = std::process::Command::new(crate::support::MEMSCOPE)
        .arg("report")
        .arg(&saved)
        .arg("-o")
        .arg(&rendered)
        .output()
        .expect("memscope report runs");
    assert!(output.status.success());
    assert_eq!(
        std::fs::read(rendered.join("inuse.svg")).expect("svg"),
        std::fs::read(saved.join("inuse.svg")).expect("svg"),
        "rendering is deterministic"
    );
}
