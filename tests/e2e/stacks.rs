//! Stacks and names that are never wrong: no word of data printed as a
//! frame, no plain C name demangled into a type.

use crate::support::*;

/// Check that a walk led astray by a frame pointer aimed at data ends at
/// the last real frame with `[truncated]` (counted in completeness, said
/// in a warning that does not advise --max-stacks), and that C functions
/// named `f` and `g` keep their names.
#[test]
fn a_stack_is_cut_where_the_walk_leaves_the_code_and_c_names_stay_plain() {
    if !bpf_available() {
        return;
    }
    let (report, _) = run_fixture("broken_stack", "broken_stack", &[]);
    fn chain(s: &memscope::report::Site) -> Vec<&str> {
        s.frames.iter().map(|f| f.function.as_str()).collect()
    }
    let astray = site(&report, "astray");
    assert_eq!(chain(astray), ["astray", "[truncated]"]);
    assert_eq!(figures(astray), (300, 1, 300, 1));
    let mk: Vec<Vec<&str>> = report
        .sites
        .iter()
        .filter(|s| s.frames[0].function == "mk")
        .map(|s| chain(s)[..3].to_vec())
        .collect();
    assert!(mk.contains(&vec!["mk", "f", "main"]), "{mk:?}");
    assert!(mk.contains(&vec!["mk", "g", "main"]), "{mk:?}");
    for s in &report.sites {
        assert!(
            !s.frames.iter().any(|f| f.function.starts_with("0x")),
            "a frame outside every mapping: {:?}",
            chain(s)
        );
    }
    assert!(
        report.completeness.truncated_stacks >= 1,
        "{:?}",
        report.completeness
    );
    let warning = report
        .warnings
        .iter()
        .find(|w| w.contains("end with [truncated]"))
        .expect("a warning for the truncated stacks");
    assert!(!warning.contains("--max-stacks"), "{warning}");
    assert!(
        !report.completeness.lost_anything(),
        "{:?}",
        report.completeness
    );
}
