//! What a process's anonymous mappings really hold: the kernel side records
//! each mapping made outside malloc as the address range `mmap` returned,
//! but a range may be only reserved (PROT_NONE, as glibc reserves its
//! thread arenas and stack guards), trimmed later (an munmap of its front,
//! tail or middle) or never touched. Read from /proc/PID/maps (which parts
//! are still mapped, with what protection) and /proc/PID/pagemap (which
//! pages are resident) while the process lives, each recorded range gets
//! its mapped, committed and resident bytes.

use std::ops::Range;

use procfs::process::{MMPermissions, MMapPath, MemoryPageFlags, PageInfo, Process};

/// Bytes of one recorded range, or of a site's ranges summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MappedBytes {
    /// Still mapped, whatever the protection.
    pub mapped: u64,
    /// Mapped readable, writable or executable: memory the process may use
    /// (the rest of `mapped` is reserved address space).
    pub committed: u64,
    /// In RAM now.
    pub resident: u64,
}

impl MappedBytes {
    pub fn add(&mut self, other: MappedBytes) {
        self.mapped += other.mapped;
        self.committed += other.committed;
        self.resident += other.resident;
    }

    /// Mapped but not committed.
    pub fn reserved(&self) -> u64 {
        self.mapped - self.committed.min(self.mapped)
    }
}

/// An anonymous private mapping of the process: its range, whether it is
/// committed, and its resident pages as ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Area {
    range: Range<u64>,
    committed: bool,
    /// The brk heap, read for the main arena (no mmap'd range is in it).
    brk: bool,
    resident: Vec<Range<u64>>,
}

/// A process's anonymous private mappings at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressSpace {
    /// Sorted by address, not overlapping.
    areas: Vec<Area>,
}

fn overlap(a: &Range<u64>, b: &Range<u64>) -> u64 {
    a.end.min(b.end).saturating_sub(a.start.max(b.start))
}

impl AddressSpace {
    /// Reads `pid`'s mappings and, for the committed anonymous ones, which
    /// pages are resident. Root reads page frame presence from pagemap.
    pub fn read(pid: u32) -> procfs::ProcResult<Self> {
        let process = Process::new(pid as i32)?;
        let maps = process.maps()?;
        let mut pagemap = process.pagemap()?;
        let page = procfs::page_size();
        let mut areas = Vec::new();
        for map in maps {
            let brk = matches!(map.pathname, MMapPath::Heap);
            let anonymous = (brk || matches!(map.pathname, MMapPath::Anonymous))
                && map.perms.contains(MMPermissions::PRIVATE);
            if !anonymous {
                continue;
            }
            let range = map.address.0..map.address.1;
            let committed = map
                .perms
                .intersects(MMPermissions::READ | MMPermissions::WRITE | MMPermissions::EXECUTE);
            let resident = if committed {
                let first = (range.start / page) as usize;
                let pages = pagemap.get_range_info(first..(range.end / page) as usize)?;
                resident_runs(range.start, page, &pages)
            } else {
                Vec::new()
            };
            areas.push(Area {
                range,
                committed,
                brk,
                resident,
            });
        }
        areas.sort_by_key(|a| a.range.start);
        Ok(Self { areas })
    }

    /// What the range `start..start + len` holds now.
    pub fn figures(&self, start: u64, len: u64) -> MappedBytes {
        let wanted = start..start.saturating_add(len);
        let first = self.areas.partition_point(|a| a.range.end <= wanted.start);
        let mut bytes = MappedBytes::default();
        for area in self.areas[first..]
            .iter()
            .take_while(|a| a.range.start < wanted.end)
        {
            let mapped = overlap(&area.range, &wanted);
            bytes.mapped += mapped;
            if area.committed {
                bytes.committed += mapped;
                bytes.resident += area
                    .resident
                    .iter()
                    .map(|r| overlap(r, &wanted))
                    .sum::<u64>();
            }
        }
        bytes
    }
}

impl AddressSpace {
    /// glibc's arena heaps: the brk heap (the main arena's) and each
    /// committed area at a 64 MiB boundary that is the head of a 64 MiB
    /// reservation (the rest PROT_NONE, or none left), with their
    /// committed ranges and resident bytes.
    pub fn glibc_heaps(&self) -> Vec<(crate::arenas::HeapKind, Range<u64>, u64)> {
        use crate::arenas::{HEAP_MAX_BYTES, HeapKind};
        let mut heaps: Vec<(HeapKind, Range<u64>, u64)> = Vec::new();
        for (i, area) in self.areas.iter().enumerate() {
            let start = area.range.start;
            let kind = if area.brk {
                HeapKind::Main
            } else {
                let len = area.range.end - start;
                let reserved_rest = self.areas.get(i + 1).is_some_and(|next| {
                    !next.committed
                        && !next.brk
                        && next.range.start == area.range.end
                        && next.range.end >= start + HEAP_MAX_BYTES
                });
                let head = area.committed
                    && start % HEAP_MAX_BYTES == 0
                    && (len == HEAP_MAX_BYTES || (len < HEAP_MAX_BYTES && reserved_rest));
                if !head {
                    continue;
                }
                HeapKind::Thread
            };
            let resident: u64 = area.resident.iter().map(|r| r.end - r.start).sum();
            // The brk heap may be split in areas (a fork's child grows it
            // with other flags): one heap.
            if let Some((HeapKind::Main, range, bytes)) = heaps.last_mut()
                && kind == HeapKind::Main
                && range.end == start
            {
                range.end = area.range.end;
                *bytes += resident;
                continue;
            }
            heaps.push((kind, area.range.clone(), resident));
        }
        heaps
    }
}

/// Anonymous mappings of one size class, as report.json's
/// `processes[].anon_mappings[]`.
#[derive(
    Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct SizeClass {
    /// Areas of at least this many bytes (and less than the next class's).
    pub min_bytes: u64,
    /// Mappings in the class.
    pub count: u64,
    /// Their mapped bytes.
    pub mapped_bytes: u64,
    /// Mapped with some access.
    pub committed_bytes: u64,
    /// In RAM.
    pub resident_bytes: u64,
}

/// The classes' lower bounds: pages, small buffers, 1 MiB (CPython's
/// arenas), 8 MiB (thread stacks), 64 MiB (arena reservations).
const SIZE_CLASSES: [u64; 5] = [0, 64 << 10, 1 << 20, 8 << 20, 64 << 20];

impl AddressSpace {
    /// The anonymous private areas (the brk heap aside) by size, the
    /// classes that have any.
    pub fn by_size(&self) -> Vec<SizeClass> {
        let mut classes: Vec<SizeClass> = SIZE_CLASSES
            .iter()
            .map(|&min_bytes| SizeClass {
                min_bytes,
                count: 0,
                mapped_bytes: 0,
                committed_bytes: 0,
                resident_bytes: 0,
            })
            .collect();
        for area in self.areas.iter().filter(|a| !a.brk) {
            let len = area.range.end - area.range.start;
            let at = SIZE_CLASSES
                .partition_point(|&min| min <= len)
                .saturating_sub(1);
            let class = &mut classes[at];
            class.count += 1;
            class.mapped_bytes += len;
            if area.committed {
                class.committed_bytes += len;
            }
            class.resident_bytes += area.resident.iter().map(|r| r.end - r.start).sum::<u64>();
        }
        classes.retain(|c| c.count > 0);
        classes
    }
}

/// The present pages of an area starting at `start`, as address ranges.
fn resident_runs(start: u64, page: u64, pages: &[PageInfo]) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (i, info) in pages.iter().enumerate() {
        let present =
            matches!(info, PageInfo::MemoryPage(flags) if flags.contains(MemoryPageFlags::PRESENT));
        if !present {
            continue;
        }
        let at = start + i as u64 * page;
        match runs.last_mut() {
            Some(run) if run.end == at => run.end = at + page,
            _ => runs.push(at..at + page),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn space() -> AddressSpace {
        AddressSpace {
            areas: vec![
                // A reserved arena head: 1 MiB committed, 2 resident pages.
                Area {
                    range: 0x10_0000..0x20_0000,
                    committed: true,
                    brk: false,
                    resident: std::iter::once(0x10_0000..0x10_2000).collect(),
                },
                Area {
                    range: 0x20_0000..0x50_0000,
                    committed: false,
                    brk: false,
                    resident: Vec::new(),
                },
            ],
        }
    }

    #[test]
    fn a_reservation_counts_only_its_committed_part() {
        let bytes = space().figures(0x10_0000, 0x40_0000);
        assert_eq!(
            bytes,
            MappedBytes {
                mapped: 0x40_0000,
                committed: 0x10_0000,
                resident: 2 * PAGE,
            }
        );
        assert_eq!(bytes.reserved(), 0x30_0000);
    }

    #[test]
    fn trimmed_parts_are_not_mapped() {
        // Recorded as 8 MiB from 0; only what the areas cover is mapped.
        let bytes = space().figures(0, 0x80_0000);
        assert_eq!(bytes.mapped, 0x40_0000);
        assert_eq!(space().figures(0x60_0000, 0x1000), MappedBytes::default());
    }

    #[test]
    fn a_range_inside_an_area_gets_its_share_of_resident_pages() {
        assert_eq!(space().figures(0x10_1000, PAGE).resident, PAGE);
    }

    #[test]
    fn arena_heaps_are_the_brk_heap_and_aligned_reservation_heads() {
        use crate::arenas::{HEAP_MAX_BYTES as MAX, HeapKind};
        let area = |range: Range<u64>, committed, brk| Area {
            resident: if committed {
                std::iter::once(range.start..range.start + PAGE).collect()
            } else {
                Vec::new()
            },
            range,
            committed,
            brk,
        };
        let space = AddressSpace {
            areas: vec![
                area(0x10_0000..0x20_0000, true, true),
                area(0x20_0000..0x30_0000, true, true),
                // A thread heap: 1 MiB committed of its 64 MiB.
                area(MAX..MAX + 0x10_0000, true, false),
                area(MAX + 0x10_0000..2 * MAX, false, false),
                // Aligned but not a reservation's head: a plain mapping.
                area(3 * MAX..3 * MAX + 0x1000, true, false),
                // A heap grown to its whole reservation.
                area(4 * MAX..5 * MAX, true, false),
            ],
        };
        assert_eq!(
            space.glibc_heaps(),
            vec![
                (HeapKind::Main, 0x10_0000..0x30_0000, 2 * PAGE),
                (HeapKind::Thread, MAX..MAX + 0x10_0000, PAGE),
                (HeapKind::Thread, 4 * MAX..5 * MAX, PAGE),
            ]
        );
    }

    #[test]
    fn areas_are_counted_by_size() {
        let classes = space().by_size();
        assert_eq!(classes.len(), 1, "{classes:?}");
        let c = &classes[0];
        assert_eq!((c.min_bytes, c.count), (1 << 20, 2));
        assert_eq!(
            (c.mapped_bytes, c.committed_bytes, c.resident_bytes),
            (0x40_0000, 0x10_0000, 2 * PAGE)
        );
    }

    #[test]
    fn present_pages_become_runs() {
        let present = PageInfo::MemoryPage(MemoryPageFlags::PRESENT);
        let absent = PageInfo::MemoryPage(MemoryPageFlags::empty());
        let runs = resident_runs(0x1000, PAGE, &[present, present, absent, present]);
        assert_eq!(runs, vec![0x1000..0x3000, 0x4000..0x5000]);
    }

    #[test]
    fn reads_this_process() {
        let page = procfs::page_size();
        // SAFETY: a fresh anonymous mapping, touched then left alone.
        let addr = unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                (4 * page) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            *(addr as *mut u8) = 1;
            addr as u64
        };
        // Presence bits are readable without privileges (frame numbers are not).
        let space = AddressSpace::read(std::process::id()).expect("own maps and pagemap");
        let bytes = space.figures(addr, 4 * page);
        assert_eq!((bytes.mapped, bytes.committed), (4 * page, 4 * page));
        assert!(bytes.resident >= page, "{bytes:?}");
    }
}
