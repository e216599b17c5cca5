//! The process tree under a pid, from /proc.
//! NB: placeholder until the full module lands (same API).

/// One process of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessNode {
    pub pid: u32,
    pub ppid: u32,
    pub command: String,
    pub state: char,
}

/// Every process descended from `root`, parents before children.
pub fn descendants(root: u32) -> Vec<ProcessNode> {
    let mut all = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return all;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[..close]
            .split_once('(')
            .map(|(_, c)| c)
            .unwrap_or("")
            .to_owned();
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) else {
            continue;
        };
        all.push(ProcessNode {
            pid,
            ppid,
            command: comm,
            state,
        });
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for node in all.iter().filter(|n| n.ppid == parent) {
            frontier.push(node.pid);
            out.push(node.clone());
        }
    }
    out
}
