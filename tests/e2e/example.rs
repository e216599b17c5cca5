//! The README's demo: examples/leaky-server leaks exactly what it says.

use std::path::Path;

use crate::support::*;

#[test]
fn leaky_server_example_leak_is_found_to_the_byte() {
    if !bpf_available() {
        return;
    }
    let server = Path::new(env!("CARGO_TARGET_TMPDIR")).join("example-leaky-server");
    let status = compile_c(
        &workspace_file("examples/leaky-server/leaky-server.c"),
        &server,
        &[],
    )
    .expect("gcc runs");
    assert!(status.success());
    let (report, output) = run_command("example", &[server.into_os_string()], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("leaked 3276800 bytes from cache_report_result"),
        "{stdout}"
    );
    let leak = site(&report, "cache_report_result");
    assert_eq!(figures(leak), (3_276_800, 50, 3_276_800, 50));
    assert_eq!(report.sites[0].frames[0].function, "cache_report_result");
    assert_eq!(
        report.totals.live_bytes, 3_276_800,
        "only the leak stays live"
    );
    assert_nothing_lost(&report);
}
