//! Byte sampling of stacks (`--stack-sample BYTES`): the gap, in bytes
//! allocated, to the next allocation whose stack is walked is drawn from
//! an exponential distribution of mean `BYTES`, as jemalloc's and
//! tcmalloc's heap profilers draw theirs. The distribution is memoryless,
//! so each allocation of `s` bytes is walked with probability
//! `1 - exp(-s / BYTES)`, whatever came before it; userspace scales each
//! site's figures by the inverse of that.
//!
//! Integer arithmetic only: the BPF target has no floating point.

/// `log2(1 + (i + 0.5) / 256)` in 16-bit fixed point: the fraction of a
/// logarithm from the 8 bits after a number's leading one.
const LOG2_FRACTION: [u32; 256] = log2_fraction_table();

/// ln 2 in 16-bit fixed point.
const LN_2_Q16: u64 = 45_426;

/// The bytes to the next walked allocation, for a uniform `random` and a
/// mean gap of `mean` bytes (below 2^32): `mean * -ln(u)` with
/// `u = random / 2^32`. Eight bits of `u`'s mantissa are used: a draw is
/// within 0.2% of `mean` of the exact one, and the mean gap is `mean`.
pub fn interval(random: u32, mean: u64) -> u64 {
    // u = x / 2^32 = 2^(31 - k) * 1.m / 2^32, so -log2(u) = k + 1 - log2(1.m).
    let x = random | 1;
    let k = x.leading_zeros();
    let mantissa = ((x << k) >> 23) & 0xff;
    let neg_log2 =
        (u64::from(k) + 1) * (1 << 16) - u64::from(LOG2_FRACTION[mantissa as usize & 0xff]);
    let neg_ln = (neg_log2 * LN_2_Q16) >> 16;
    ((mean.min(u64::from(u32::MAX)) * neg_ln) >> 16).max(1)
}

/// The table, by the shift-and-square binary logarithm: squaring a number
/// in [1, 2) doubles its logarithm, and a square of 2 or more is one
/// more bit of it.
const fn log2_fraction_table() -> [u32; 256] {
    const ONE: u128 = 1 << 62;
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        // 1 + (i + 0.5) / 256, in 62-bit fixed point.
        let mut y = ONE + ((2 * i as u128 + 1) << 53);
        let mut bits = 0u32;
        let mut bit = 0;
        // Two bits more than kept, then rounded.
        while bit < 18 {
            y = (y * y) >> 62;
            bits <<= 1;
            if y >= 2 * ONE {
                y >>= 1;
                bits |= 1;
            }
            bit += 1;
        }
        table[i] = (bits + 2) >> 2;
        i += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::*;

    #[test]
    fn the_table_is_the_logarithm() {
        for (i, &entry) in LOG2_FRACTION.iter().enumerate() {
            let exact = (1.0 + (i as f64 + 0.5) / 256.0).log2() * 65536.0;
            assert!(
                (f64::from(entry) - exact).abs() <= 1.0,
                "entry {i}: {entry} against {exact}"
            );
        }
    }

    #[test]
    fn each_draw_is_close_to_the_exact_quantile() {
        let mean = 1u64 << 20;
        for random in [
            1u32,
            2,
            3,
            1000,
            1 << 16,
            123_456_789,
            1 << 31,
            u32::MAX - 1,
            u32::MAX,
        ] {
            let u = f64::from(random | 1) / 4_294_967_296.0;
            let exact = -u.ln() * mean as f64;
            let drawn = interval(random, mean) as f64;
            assert!(
                (drawn - exact).abs() <= mean as f64 * 0.002 + exact * 0.0001,
                "random {random}: {drawn} against {exact}"
            );
        }
    }

    /// Over an even spread of `u`, the gaps have the exponential's mean and
    /// median.
    #[test]
    fn the_gaps_are_exponential() {
        let mean = 512 * 1024u64;
        let n = 1u32 << 16;
        let mut gaps: Vec<u64> = (0..n)
            .map(|i| interval((u64::from(i) * (1 << 16) + (1 << 15)) as u32, mean))
            .collect();
        let average = gaps.iter().sum::<u64>() as f64 / f64::from(n);
        assert!(
            (average / mean as f64 - 1.0).abs() < 0.005,
            "mean {average}"
        );
        gaps.sort_unstable();
        let median = gaps[gaps.len() / 2] as f64;
        let exact = core::f64::consts::LN_2 * mean as f64;
        assert!(
            (median / exact - 1.0).abs() < 0.005,
            "median {median} against {exact}"
        );
    }
}
