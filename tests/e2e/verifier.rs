//! Every kernel program verifies with room to spare. The verifier's budget
//! is a million instructions a program, and how many it spends on one
//! program changes between kernel releases: alloc_session went from under
//! the limit to over it with a 6.18 stable update, and memscope could load
//! nothing. A quarter of the limit leaves room for that.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use aya::programs::{Program, loaded_programs};
use memscope::{
    bpf::{self, MapCapacity},
    multi_uprobe::{self, MultiPrograms},
};

use crate::support::bpf_available;

const VERIFIER_LIMIT: u32 = 1_000_000;
const SESSION_PROGRAMS: [&str; 2] = [
    multi_uprobe::SESSION_PROGRAM,
    multi_uprobe::EMPTY_SESSION_PROGRAM,
];

#[test]
fn every_program_verifies_within_a_quarter_of_the_limit() {
    if !bpf_available() {
        return;
    }
    let since = SystemTime::now() - Duration::from_secs(1);
    let mut ebpf = bpf::load(MapCapacity::default()).expect("load memscope's BPF object");
    let _multi = multi_uprobe::supported().then(|| {
        MultiPrograms::load(&ebpf, bpf::object(), false).expect("load the multi-uprobe programs")
    });
    let _empty = multi_uprobe::supported()
        .then(|| MultiPrograms::load(&ebpf, bpf::object(), true).expect("load the empty programs"));
    let mut names = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let loaded = match program {
            Program::UProbe(p) => p.load(),
            Program::TracePoint(p) => p.load(),
            other => panic!("{name}: a program type this test does not load: {other:?}"),
        };
        // NB: the session programs are for a session link, loaded by
        // MultiPrograms above; aya's plain uprobe load of them may fail.
        match loaded {
            Ok(()) => names.push(name.to_owned()),
            Err(error) if SESSION_PROGRAMS.contains(&name) => {
                eprintln!("{name} through aya: {error}")
            }
            Err(error) => panic!("{name} failed to load: {error}"),
        }
    }
    if multi_uprobe::supported() {
        names.extend(SESSION_PROGRAMS.map(str::to_owned));
    }
    names.sort();
    names.dedup();
    // Kernel names are cut to 15 bytes.
    let short = |name: &str| name.chars().take(15).collect::<String>();
    let mut verified: BTreeMap<String, u32> = BTreeMap::new();
    for info in loaded_programs().flatten() {
        let Some(name) = info.name_as_str().map(str::to_owned) else {
            continue;
        };
        if !names.iter().any(|n| short(n) == name) || info.loaded_at().is_none_or(|at| at < since) {
            continue;
        }
        let count = info.verified_instruction_count().unwrap_or(0);
        let most = verified.entry(name).or_default();
        *most = (*most).max(count);
    }
    eprintln!("verified instructions: {verified:?}");
    for name in &names {
        let count = verified
            .get(&short(name))
            .unwrap_or_else(|| panic!("{name} is not among the loaded programs"));
        assert!(
            *count < VERIFIER_LIMIT / 4,
            "{name}: the verifier went through {count} instructions; over a quarter of its \
             limit, a kernel update may refuse it (keep loop bounds out of tracked registers)"
        );
    }
}
