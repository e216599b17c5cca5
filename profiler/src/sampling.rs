//! `--stack-sample BYTES`: every heap block is recorded with its size, so
//! totals stay exact, but only a byte sample of them has its stack walked
//! (the kernel's `sampling`: one walked every BYTES allocated, on average,
//! each block of `s` bytes with chance `p = 1 - exp(-s / BYTES)`).
//!
//! A site's figures are estimated as Go's and pprof's heap profiles are:
//! each walked block stands for `1 / p` blocks, `p` taken at the site's
//! mean block size. That is unbiased for a site of one block size. Its
//! error, at 95%, is `1.96 * s * sqrt(n * (w - 1))` bytes for `n`
//! estimated blocks of weight `w = 1 / p`: about `2 * sqrt(BYTES * live)`
//! for blocks much smaller than BYTES, nothing for blocks much larger.

use std::collections::BTreeMap;

use profiler_common::{StackKey, StackTotals, UNSAMPLED_STACK, site_class};

/// The sampling a session ran with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StackSample {
    /// The mean gap, in bytes allocated, between walked blocks.
    pub mean_bytes: u64,
}

/// z for a two-sided 95% interval.
const Z_95: f64 = 1.96;

impl StackSample {
    /// The chance a block of `size` bytes had its stack walked.
    pub fn walk_chance(&self, size: f64) -> f64 {
        -(-size / self.mean_bytes as f64).exp_m1()
    }

    /// What each walked block of a site stands for, from its figures as
    /// recorded (1 for what is not sampled: mappings).
    pub fn weight(&self, key: &StackKey, recorded: &StackTotals) -> f64 {
        if key.class != site_class::MALLOC {
            return 1.0;
        }
        let (count, bytes) = if recorded.alloc_count > 0 {
            (recorded.alloc_count, recorded.alloc_bytes)
        } else {
            (recorded.free_count, recorded.free_bytes)
        };
        if count == 0 || bytes == 0 {
            return 1.0;
        }
        1.0 / self.walk_chance(bytes as f64 / count as f64)
    }

    /// Each walked site's figures scaled by its weight; the blocks not
    /// walked (in the exact totals only) are left out.
    pub fn estimate(
        &self,
        recorded: &BTreeMap<StackKey, StackTotals>,
    ) -> BTreeMap<StackKey, StackTotals> {
        recorded
            .iter()
            .filter(|(key, _)| !is_unsampled(key))
            .map(|(key, totals)| (*key, scale(totals, self.weight(key, totals))))
            .collect()
    }

    /// The 95% error of a site's estimated live bytes, from its estimated
    /// figures (the weight is the same for all four).
    pub fn live_error(&self, alloc_count: u64, alloc_bytes: u64, live_count: u64) -> u64 {
        if alloc_count == 0 || live_count == 0 {
            return 0;
        }
        let size = alloc_bytes as f64 / alloc_count as f64;
        let weight = 1.0 / self.walk_chance(size);
        (Z_95 * size * (live_count as f64 * (weight - 1.0)).sqrt()).round() as u64
    }
}

/// Whether a key holds blocks whose stacks were not walked.
pub fn is_unsampled(key: &StackKey) -> bool {
    key.class == site_class::MALLOC && key.stack_id == UNSAMPLED_STACK
}

/// `totals` times `weight`, each figure rounded.
pub fn scale(totals: &StackTotals, weight: f64) -> StackTotals {
    let times = |x: u64| (x as f64 * weight).round() as u64;
    StackTotals::new(
        times(totals.alloc_count),
        times(totals.alloc_bytes),
        times(totals.free_count),
        times(totals.free_bytes),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(stack_id: u32) -> StackKey {
        StackKey::new(1, stack_id)
    }

    fn totals(alloc_count: u64, alloc_bytes: u64, free_count: u64, free_bytes: u64) -> StackTotals {
        StackTotals::new(alloc_count, alloc_bytes, free_count, free_bytes)
    }

    const SAMPLE: StackSample = StackSample {
        mean_bytes: 512 * 1024,
    };

    #[test]
    fn blocks_far_larger_than_the_gap_stand_for_themselves() {
        let recorded = totals(10, 10 << 30, 0, 0);
        assert_eq!(SAMPLE.weight(&key(7), &recorded), 1.0);
        assert_eq!(SAMPLE.live_error(10, 10 << 30, 10), 0);
    }

    #[test]
    fn a_small_block_stands_for_the_gap_in_bytes() {
        // 64-byte blocks: each walked one stands for about 512 KiB / 64.
        let weight = SAMPLE.weight(&key(7), &totals(3, 192, 1, 64));
        assert!(
            (weight * 64.0 / (512.0 * 1024.0) - 1.0).abs() < 1e-3,
            "{weight}"
        );
        let estimated = SAMPLE.estimate(&BTreeMap::from([(key(7), totals(3, 192, 1, 64))]));
        let t = estimated[&key(7)];
        assert!((t.alloc_bytes as f64 / (3.0 * 512.0 * 1024.0) - 1.0).abs() < 1e-3);
        assert!((t.alloc_bytes as f64 / t.alloc_count as f64 / 64.0 - 1.0).abs() < 1e-3);
    }

    #[test]
    fn unwalked_blocks_and_mappings_are_not_scaled_into_sites() {
        let mut mapping = key(9);
        mapping.class = site_class::MMAP;
        let recorded = BTreeMap::from([
            (key(UNSAMPLED_STACK), totals(1000, 64_000, 900, 57_600)),
            (mapping, totals(1, 4096, 0, 0)),
        ]);
        let estimated = SAMPLE.estimate(&recorded);
        assert_eq!(estimated.len(), 1);
        assert_eq!(estimated[&mapping], totals(1, 4096, 0, 0));
    }

    #[test]
    fn the_error_of_small_blocks_is_about_two_root_gap_times_bytes() {
        // 1 MiB live in 64-byte blocks.
        let live = 1u64 << 20;
        let error = SAMPLE.live_error(live / 64, live, live / 64) as f64;
        let rule = 1.96 * ((SAMPLE.mean_bytes * live) as f64).sqrt();
        assert!((error / rule - 1.0).abs() < 0.01, "{error} against {rule}");
    }

    proptest! {
        /// Over every size, the expected weight of a block's walk is the
        /// block: p * w = 1.
        #[test]
        fn a_walked_block_weighs_what_its_chance_misses(size in 1u64..(1 << 34)) {
            let recorded = totals(1, size, 0, 0);
            let weight = SAMPLE.weight(&key(3), &recorded);
            prop_assert!(weight >= 1.0);
            prop_assert!((SAMPLE.walk_chance(size as f64) * weight - 1.0).abs() < 1e-9);
        }
    }
}
