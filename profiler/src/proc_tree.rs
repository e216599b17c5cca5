//! The processes descended from a target, read from /proc.
//!
//! Every /proc/PID/stat is scanned for its parent, rather than read from
//! /proc/PID/task/*/children, which needs CONFIG_PROC_CHILDREN.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::target;

/// One process of a target's tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessNode {
    pub pid: u32,
    pub ppid: u32,
    /// The command line, space-joined, or the comm when it has none.
    pub command: String,
    /// The state letter of /proc/PID/stat: R, S, D, T, Z...
    pub state: char,
}

/// What /proc/PID/stat says of a process now, or None once it is gone.
fn stat(pid: u32) -> Option<procfs::process::Stat> {
    procfs::process::Process::new(i32::try_from(pid).ok()?)
        .ok()?
        .stat()
        .ok()
}

/// The state letter of process `pid` (R, S, D, T, Z...).
pub fn state(pid: u32) -> Option<char> {
    stat(pid).map(|stat| stat.state)
}

/// Whether `pid` is exiting or gone: its mappings are being torn down, so
/// what /proc/PID/maps says of it may be partial.
pub fn exiting(pid: u32) -> bool {
    const PF_EXITING: u32 = 0x4;
    stat(pid).is_none_or(|stat| stat.flags & PF_EXITING != 0 || stat.state == 'Z')
}

/// Who `pid` is: its start time (clock ticks since boot) and its parent.
/// A pid is soon another process's once its own has exited (a fork storm
/// wraps pid_max in seconds): this tells the two apart.
pub fn identity(pid: u32) -> Option<(u64, u32)> {
    stat(pid).and_then(|stat| Some((stat.starttime, u32::try_from(stat.ppid).ok()?)))
}

/// Every process descended from `root`, parents before children (breadth
/// first, siblings by pid), `root` itself left out. Processes that exit
/// during the scan are left out too.
pub fn descendants(root: u32) -> Vec<ProcessNode> {
    // Only processes: /proc lists thread group leaders, not other threads,
    // and a thread's children have the process as their parent anyway.
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let stats = processes.filter_map(|process| {
        // procfs parses the comm from the last ')', so a comm holding
        // spaces or parentheses cannot shift the fields after it.
        let stat = process.ok()?.stat().ok()?;
        Some((
            u32::try_from(stat.pid).ok()?,
            u32::try_from(stat.ppid).ok()?,
            stat.state,
        ))
    });
    tree_below(root, stats)
        .into_iter()
        .map(|(pid, ppid, state)| ProcessNode {
            pid,
            ppid,
            command: target::command_line(pid),
            state,
        })
        .collect()
}

/// The (pid, ppid, state) below `root`, breadth first, siblings by pid.
fn tree_below(
    root: u32,
    processes: impl IntoIterator<Item = (u32, u32, char)>,
) -> Vec<(u32, u32, char)> {
    let mut children: HashMap<u32, Vec<(u32, u32, char)>> = HashMap::new();
    for process in processes {
        children.entry(process.1).or_default().push(process);
    }
    for siblings in children.values_mut() {
        siblings.sort_unstable();
    }
    let mut below = Vec::new();
    // A process is visited once even if a torn scan shows a cycle (a pid
    // reused between two reads).
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(parent) = queue.pop_front() {
        for &child in children.get(&parent).into_iter().flatten() {
            if seen.insert(child.0) {
                below.push(child);
                queue.push_back(child.0);
            }
        }
    }
    below
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        os::unix::process::CommandExt as _,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use super::*;

    #[test]
    fn tree_below_lists_parents_before_children_and_leaves_out_the_rest() {
        let processes = [
            (1, 0, 'S'),
            (10, 1, 'S'),
            (30, 20, 'S'),
            (20, 10, 'S'),
            (11, 10, 'R'),
            (21, 11, 'Z'),
            (99, 1, 'S'),
        ];
        assert_eq!(
            tree_below(10, processes),
            vec![(11, 10, 'R'), (20, 10, 'S'), (21, 11, 'Z'), (30, 20, 'S')]
        );
        assert_eq!(tree_below(30, processes), vec![]);
    }

    #[test]
    fn tree_below_survives_a_cycle_from_a_torn_scan() {
        assert_eq!(tree_below(5, [(5, 6, 'S'), (6, 5, 'S')]), vec![(6, 5, 'S')]);
    }

    /// A shell tree started by a test, killed whole (its process group)
    /// when the test ends, passed or not.
    struct Tree {
        shell: Child,
    }

    impl Tree {
        /// Runs `script` under `sh -c` and waits until it prints "ready".
        fn start(script: &str) -> Self {
            let mut shell = Command::new("sh")
                .args(["-c", script])
                .stdout(Stdio::piped())
                .process_group(0)
                .spawn()
                .expect("sh runs");
            let stdout = shell.stdout.take().expect("stdout piped");
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("sh writes");
            assert_eq!(line, "ready\n");
            Self { shell }
        }

        fn pid(&self) -> u32 {
            self.shell.id()
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            // SAFETY: plain syscall on the process group we created.
            unsafe { libc::kill(-(self.shell.id() as i32), libc::SIGKILL) };
            let _ = self.shell.wait();
        }
    }

    /// The descendants once they run the `expected` commands and sleep:
    /// "ready" is printed after the forks, not after the execs.
    fn descendants_once_executed(root: u32, expected: &[&str]) -> Vec<ProcessNode> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = descendants(root);
            let commands: Vec<&str> = found.iter().map(|p| p.command.as_str()).collect();
            let settled = commands == expected && found.iter().all(|p| p.state == 'S');
            if settled || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn descendants_finds_the_children_of_a_shell() {
        let tree = Tree::start("sleep 30 & sleep 31 & echo ready; wait");
        let sh = tree.pid();
        let found = descendants_once_executed(sh, &["sleep 30", "sleep 31"]);
        let summary: Vec<(u32, &str)> =
            found.iter().map(|p| (p.ppid, p.command.as_str())).collect();
        assert_eq!(summary, vec![(sh, "sleep 30"), (sh, "sleep 31")]);
        assert!(found.iter().all(|p| p.state == 'S'), "{found:?}");
        assert!(found[0].pid < found[1].pid, "siblings by pid: {found:?}");
    }

    #[test]
    fn descendants_finds_grandchildren_after_their_parents() {
        let tree = Tree::start("sh -c 'sleep 30 & sleep 31 & echo ready; wait' & wait");
        let outer = tree.pid();
        let found = descendants_once_executed(
            outer,
            &[
                "sh -c sleep 30 & sleep 31 & echo ready; wait",
                "sleep 30",
                "sleep 31",
            ],
        );
        assert_eq!(found.len(), 3, "{found:?}");
        let inner = found[0].pid;
        let summary: Vec<(u32, &str)> =
            found.iter().map(|p| (p.ppid, p.command.as_str())).collect();
        assert_eq!(
            summary,
            vec![
                (outer, "sh -c sleep 30 & sleep 31 & echo ready; wait"),
                (inner, "sleep 30"),
                (inner, "sleep 31"),
            ]
        );
    }

    #[test]
    fn a_comm_with_spaces_and_parentheses_keeps_its_parent() {
        // comm is the name exec'd: a symlink to sleep named like stat's
        // own punctuation.
        let dir = std::env::temp_dir().join(format!("memscope-proc-tree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let odd = dir.join("a) S 1 (b");
        let _ = std::fs::remove_file(&odd);
        std::os::unix::fs::symlink("/bin/sleep", &odd).expect("symlink");
        let tree = Tree::start(&format!("'{}' 30 & echo ready; wait", odd.display()));
        let sh = tree.pid();
        let found = descendants_once_executed(sh, &[&format!("{} 30", odd.display())]);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].ppid, found[0].state), (sh, 'S'));
        let comm =
            std::fs::read_to_string(format!("/proc/{}/comm", found[0].pid)).expect("still running");
        assert_eq!(comm, "a) S 1 (b\n");
    }
}
