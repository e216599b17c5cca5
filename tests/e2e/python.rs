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
    let interpreter = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 on PATH");
    let interpreter = String::from_utf8_lossy(&interpreter.stdout)
        .trim()
        .to_owned();
    let (report, output) = run_command(
        "python",
        &[interpreter.into(), "-c".into(), SCRIPT.into()],
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
    // CPython is built without frame pointers: some stack walks fail (and
    // are counted); no allocation is lost.
    let c = &report.completeness;
    assert_eq!(
        (c.map_full, c.missed_returns, c.lost_children),
        (0, 0, 0),
        "{c:?}"
    );
}
