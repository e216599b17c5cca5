//! Placeholder until the benchmark lands.
pub fn run(_root: &std::path::Path, _memscope: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark is not implemented yet")
}
