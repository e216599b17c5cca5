//! The embedded kernel programs, loaded with the map sizes asked for.

use aya::{Ebpf, EbpfLoader};
use profiler_common::{
    CALL_SLOTS_LEN, FRONT_BUCKETS, FRONT_WAYS, FrontBucket, MAX_HASHED_CALLS, MAX_STACK_DEPTH,
    STACK_TOTALS_PER_STACK, UNWOUND_STACK_BIT, UnwindRow, UnwoundStack, map_names,
};

/// The BPF object built by build.rs from profiler-ebpf.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memscope"));

/// memscope's BPF object, for loaders other than aya's (`multi_uprobe`).
pub fn object() -> &'static [u8] {
    BPF_OBJECT
}

/// Kernel memory per live block or mapping: the hash element (48 B
/// header, 16 B key, 48 B value) and bpf_mem_alloc's 8 B header, in its
/// 128 B size class (memlock of the map with 1M blocks live: 135.5 MB,
/// its buckets included).
pub const LIVE_BLOCK_BYTES: u64 = 128;

/// Capacities of the kernel maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    /// Live allocations tracked at once (`--max-live`).
    pub max_live: u32,
    /// Distinct user stacks (`--max-stacks`), of each kind: walked by
    /// frame pointer, and unwound by the .eh_frame rules.
    pub max_stacks: u32,
    /// Unwind rows for every object unwound (`--unwind-rows`).
    pub unwind_rows: u32,
    /// Threads' call slots (`CALL_SLOTS_LEN`; fewer only to test the
    /// hashed calls of threads whose slot is taken, hidden `--call-slots`).
    pub call_slots: u32,
    /// The front table's buckets at most (`FRONT_BUCKETS`; fewer only to
    /// test blocks whose bucket is full, hidden `--front-buckets`).
    pub front_buckets: u32,
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self {
            max_live: profiler_common::DEFAULT_MAX_LIVE,
            max_stacks: profiler_common::DEFAULT_MAX_STACKS,
            unwind_rows: profiler_common::DEFAULT_UNWIND_ROWS,
            call_slots: CALL_SLOTS_LEN,
            front_buckets: FRONT_BUCKETS,
        }
    }
}

impl MapCapacity {
    /// The front table's buckets: a power of two, their slots at most a
    /// sixteenth of `--max-live` (so a small `--max-live` stays the limit
    /// it says), at least one.
    pub fn front_buckets(&self) -> u32 {
        let most = (self.max_live / (16 * FRONT_WAYS as u32)).max(1);
        let most = 1 << most.ilog2();
        self.front_buckets.min(most).max(1)
    }

    /// `LIVE`'s entries: `--max-live` less the front table's slots.
    pub fn hashed_live(&self) -> u32 {
        self.max_live
            .saturating_sub(self.front_buckets() * FRONT_WAYS as u32)
            .max(1)
    }

    /// The front table's kernel memory, allocated at load.
    pub fn front_bytes(&self) -> u64 {
        u64::from(self.front_buckets()) * size_of::<FrontBucket>() as u64
    }

    /// Kernel memory the maps reserve (hash maps are preallocated), an
    /// estimate from the kernel's per-element layout.
    pub fn reserved_bytes(&self) -> u64 {
        // struct htab_elem header, plus key and value rounded to 8 bytes.
        const HTAB_ELEM: u64 = 48;
        let totals =
            u64::from(self.max_stacks) * u64::from(STACK_TOTALS_PER_STACK) * (HTAB_ELEM + 24 + 32);
        // struct stack_map_bucket header plus the frames, one bucket per
        // entry rounded up to a power of two.
        let stacks =
            u64::from(self.max_stacks.next_power_of_two()) * (16 + 8 * MAX_STACK_DEPTH as u64);
        // The threads' call slots (an array: 8 B owner, 32 B call), and the
        // hash map for threads whose slot is taken.
        let in_flight = u64::from(self.call_slots) * (8 + 32)
            + u64::from(MAX_HASHED_CALLS) * (HTAB_ELEM + 8 + 32);
        // The live map's buckets (16 B each) are allocated at load; its
        // elements as blocks become live.
        let live_buckets = u64::from(self.hashed_live().next_power_of_two()) * 16;
        totals + stacks + in_flight + live_buckets + self.front_bytes() + self.unwind_rows_bytes()
    }

    /// At most, the live blocks' map (not preallocated: it grows with the
    /// live set, `LIVE_BLOCK_BYTES` a block, up to `--max-live`).
    pub fn live_bytes_at_most(&self) -> u64 {
        u64::from(self.hashed_live()) * LIVE_BLOCK_BYTES
    }

    /// The unwind rows' array, preallocated.
    pub fn unwind_rows_bytes(&self) -> u64 {
        u64::from(self.unwind_rows) * size_of::<UnwindRow>() as u64
    }

    /// At most, the unwound stacks (not preallocated: taken as stacks are
    /// recorded).
    pub fn unwound_stacks_bytes(&self) -> u64 {
        const HTAB_ELEM: u64 = 48;
        u64::from(self.max_stacks) * (HTAB_ELEM + 8 + size_of::<UnwoundStack>() as u64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("BPF is not permitted: run memscope as root ({0})")]
    NotPermitted(#[source] aya::EbpfError),
    #[error(
        "cannot load memscope's BPF programs: {0}; is BPF enabled in this kernel (CONFIG_BPF_SYSCALL)?"
    )]
    Unavailable(#[source] aya::EbpfError),
    #[error("invalid map size: {0}")]
    Capacity(String),
    #[error("cannot configure memscope's BPF programs: {0}")]
    Config(String),
}

/// Loads the BPF object into the kernel (maps created; programs are loaded
/// by `attach`).
pub fn load(capacity: MapCapacity) -> Result<Ebpf, LoadError> {
    if !(1..=FRONT_BUCKETS).contains(&capacity.front_buckets)
        || !capacity.front_buckets.is_power_of_two()
    {
        return Err(LoadError::Capacity(format!(
            "--front-buckets must be a power of two from 1 to {FRONT_BUCKETS}"
        )));
    }
    if !(1..=CALL_SLOTS_LEN).contains(&capacity.call_slots) {
        return Err(LoadError::Capacity(format!(
            "--call-slots must be 1 to {CALL_SLOTS_LEN}"
        )));
    }
    if capacity.max_live == 0 || capacity.max_stacks == 0 || capacity.unwind_rows == 0 {
        return Err(LoadError::Capacity(
            "--max-live, --max-stacks and --unwind-rows must be at least 1".into(),
        ));
    }
    // Unwound stacks' ids have the top bit set; the kernel's stack ids
    // must stay below it.
    if capacity.max_stacks >= UNWOUND_STACK_BIT {
        return Err(LoadError::Capacity(format!(
            "--max-stacks must be below {UNWOUND_STACK_BIT}"
        )));
    }
    raise_memlock_limit();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::LIVE, capacity.hashed_live())
        .map_max_entries(map_names::FRONT, capacity.front_buckets())
        .map_max_entries(map_names::STACKS, capacity.max_stacks)
        // Not preallocated: kernel memory only for the stacks recorded.
        .map_max_entries(map_names::PY_STACKS, capacity.max_stacks)
        .map_max_entries(map_names::UNWOUND, capacity.max_stacks)
        .map_max_entries(map_names::UNWIND_ROWS, capacity.unwind_rows)
        .map_max_entries(map_names::CALL_SLOTS, capacity.call_slots)
        .map_max_entries(
            map_names::STACK_TOTALS,
            capacity.max_stacks.saturating_mul(STACK_TOTALS_PER_STACK),
        )
        .load(BPF_OBJECT)
        .map_err(|error| {
            if is_permission_error(&error) {
                LoadError::NotPermitted(error)
            } else {
                LoadError::Unavailable(error)
            }
        })?;
    set_config(
        &mut ebpf,
        profiler_common::config::FRONT_MASK,
        capacity.front_buckets() - 1,
    )?;
    Ok(ebpf)
}

fn is_permission_error(error: &aya::EbpfError) -> bool {
    let text = format!("{error:?}");
    text.contains("code: 1,")
        || text.contains("PermissionDenied")
        || text.contains("Operation not permitted")
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the
/// memory cgroup. Raising it is harmless either way.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid struct; failure only matters on old kernels.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

/// Walks the stacks of a byte sample of heap blocks only, one every
/// `mean_bytes` allocated on average (see `sampling`).
pub fn set_stack_sample(ebpf: &mut Ebpf, mean_bytes: u64) -> Result<(), LoadError> {
    let mean = u32::try_from(mean_bytes)
        .ok()
        .filter(|&mean| mean > 0)
        .ok_or_else(|| LoadError::Config("--stack-sample must be 1 byte to 4 GiB".into()))?;
    set_config(ebpf, profiler_common::config::STACK_SAMPLE, mean)
}

/// Writes one slot of the programs' `CONFIG`.
fn set_config(ebpf: &mut Ebpf, slot: u32, value: u32) -> Result<(), LoadError> {
    let map = ebpf
        .map_mut(map_names::CONFIG)
        .ok_or_else(|| LoadError::Config(format!("BPF map {} is missing", map_names::CONFIG)))?;
    let mut config: aya::maps::Array<&mut aya::maps::MapData, u32> =
        aya::maps::Array::try_from(map).map_err(|e| LoadError::Config(e.to_string()))?;
    config
        .set(slot, value, 0)
        .map_err(|e| LoadError::Config(format!("cannot set config slot {slot}: {e}")))
}

#[cfg(test)]
mod tests {
    use profiler_common::{FRONT_BUCKETS, FRONT_WAYS, front_bucket};
    use proptest::prelude::*;

    use super::MapCapacity;

    fn with_live(max_live: u32) -> MapCapacity {
        MapCapacity {
            max_live,
            ..MapCapacity::default()
        }
    }

    #[test]
    fn the_default_front_table_is_full_size() {
        let capacity = MapCapacity::default();
        assert_eq!(capacity.front_buckets(), FRONT_BUCKETS);
        assert_eq!(capacity.hashed_live(), (1 << 20) - (1 << 16));
        assert_eq!(capacity.front_bytes(), 4 << 20);
    }

    #[test]
    fn a_small_max_live_keeps_its_limit() {
        // 1000 / 16 = 62 slots at most: 8 buckets of 4.
        let capacity = with_live(1000);
        assert_eq!(capacity.front_buckets(), 8);
        assert_eq!(capacity.hashed_live(), 968);
        assert_eq!(with_live(1).front_buckets(), 1);
        assert_eq!(with_live(1).hashed_live(), 1);
    }

    /// Heap blocks are 16-byte aligned and close together, and forked
    /// workers hold the same addresses: neither may crowd a bucket.
    #[test]
    fn blocks_spread_over_the_buckets() {
        let mask = FRONT_BUCKETS - 1;
        let mut load = vec![0u32; FRONT_BUCKETS as usize];
        for i in 0..u64::from(FRONT_BUCKETS) * 4 {
            load[front_bucket(4242, 0x5555_5555_0000 + 16 * i, mask) as usize] += 1;
        }
        assert!(load.iter().all(|&n| n <= 8), "{:?}", load.iter().max());
        let workers: std::collections::HashSet<u32> = (1000..1100)
            .map(|tgid| front_bucket(tgid, 0x5555_5555_0000, mask))
            .collect();
        assert!(workers.len() >= 95, "{}", workers.len());
    }

    proptest! {
        #[test]
        fn front_and_live_map_share_max_live(max_live in 64u32..=1 << 24, asked in 0u32..=14) {
            let capacity = MapCapacity { front_buckets: 1 << asked, ..with_live(max_live) };
            let buckets = capacity.front_buckets();
            prop_assert!(buckets.is_power_of_two() && buckets <= 1 << asked);
            let slots = buckets * FRONT_WAYS as u32;
            prop_assert!(slots <= max_live / 16);
            prop_assert_eq!(capacity.hashed_live() + slots, max_live);
        }

        #[test]
        fn a_block_hashes_within_the_table(tgid: u32, addr: u64, bits in 0u32..=14) {
            let mask = (1u32 << bits) - 1;
            prop_assert!(front_bucket(tgid, addr, mask) <= mask);
        }
    }
}
