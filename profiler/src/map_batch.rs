//! Reading a whole BPF hash map in chunks (`BPF_MAP_LOOKUP_BATCH`, Linux
//! 5.6+) and writing many entries at once (`BPF_MAP_UPDATE_BATCH`), which
//! aya 0.14 does not wrap. Walking it key by key costs two
//! system calls per entry: about 10 s for a million live blocks here, where
//! chunks of 4096 take a fraction of a second.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya::Pod;

/// Entries asked for per call; a hash bucket holding more than this makes
/// the kernel ask for more room (ENOSPC), and the chunk grows.
const CHUNK: usize = 4096;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` with every entry of the hash map behind `fd`. The kernel
/// changes the map meanwhile: an entry is as of the chunk that held it.
pub fn for_each<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    mut each: impl FnMut(&K, &V),
) -> std::io::Result<()> {
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The position tokens: a bucket index for hash maps, 4 bytes; room
    // for 8.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        // SAFETY: K and V are Pod (any bit pattern is valid).
        keys.resize(chunk, unsafe { std::mem::zeroed() });
        // SAFETY: as above.
        values.resize(chunk, unsafe { std::mem::zeroed() });
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut position as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and
        // values, and at the two tokens, all alive across the call.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let error = (result < 0).then(std::io::Error::last_os_error);
        match error.as_ref().and_then(std::io::Error::raw_os_error) {
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(error.unwrap_or_else(std::io::Error::last_os_error)),
        }
        for i in 0..attr.count as usize {
            each(&keys[i], &values[i]);
        }
        if error.is_some() {
            return Ok(()); // ENOENT: the last chunk
        }
        position = next;
        first = false;
    }
}

/// Writes `keys[i]` to `values[i]` in the map behind `fd`, as many as fit
/// in one call per chunk. Returns how many were written: on an error (the
/// map is full) the rest are not, and the error is returned with the count.
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, std::io::Result<()>) {
    let mut done = 0;
    while done < keys.len().min(values.len()) {
        let count = (keys.len().min(values.len()) - done).min(CHUNK);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: count as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at `count` keys and values, alive
        // across the call; the kernel only reads them.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        // On an error the kernel says in `count` how many it wrote.
        done += (attr.count as usize).min(count);
        if result < 0 {
            return (done, Err(std::io::Error::last_os_error()));
        }
    }
    (done, Ok(()))
}
