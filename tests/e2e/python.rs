//! CPython with a forked worker: the worker's growth is found.
//!
//! The interpreter itself is run, not a `python3` shim from PATH (pyenv's
//! starts some 40 shell processes, each of which memscope follows; exec
//! following has its own test).

use crate::support::*;

const SCRIPT: &str = "\
import os
pid = os.fork()
if pid == 0:
    kept = [bytearray(200000) for _ in range(10)]
    os._exit(0)
os.waitpid(pid, 0)
print('done')
";

#[test]
fn python_forked_worker_growth_is_reported() {
    if !bpf_available() {
        return;
    }
    let (report, output) = run_command(
        "python",
        &["python3".into(), "-c".into(), SCRIPT.into()],
        &[],
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("done"));
    assert_eq!(report.target.exit_code, Some(0));
    assert_eq!(report.processes.len(), 2, "{:#?}", report.processes);
    let interpreter = &report.processes[0];
    let worker = report
        .processes
        .iter()
        .find(|p| p.ppid == Some(interpreter.pid))
        .unwrap_or_else(|| panic!("the forked worker is followed: {:#?}", report.processes));
    // 10 bytearrays of 200000 bytes (plus object headers) never freed.
    assert!(worker.growth_bytes >= 2_000_000, "{worker:#?}");
    assert!(worker.exited_s.is_some());
    assert_nothing_lost(&report);
}
