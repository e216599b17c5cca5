//! An mmapable BPF array mapped into memscope: userspace changes its
//! values with the same atomic instructions the kernel programs use.

use std::{os::fd::AsRawFd as _, ptr::NonNull};

use aya::Ebpf;

#[derive(Debug, thiserror::Error)]
pub enum SharedArrayError {
    #[error("BPF map {0} is missing (build bug)")]
    Missing(&'static str),
    #[error("cannot map {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// An mmapable array of `len` `T`s mapped into memscope, so userspace
/// changes it with the same atomic instructions the kernel programs use.
pub struct SharedArray<T> {
    values: NonNull<T>,
    len: usize,
    bytes: usize,
}

impl<T> SharedArray<T> {
    pub fn map(ebpf: &Ebpf, name: &'static str, len: usize) -> Result<Self, SharedArrayError> {
        let fd = ebpf
            .map(name)
            .and_then(crate::multi_uprobe::map_fd)
            .ok_or(SharedArrayError::Missing(name))?;
        // SAFETY: plain syscall.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (len * std::mem::size_of::<T>()).div_ceil(page).max(1) * page;
        // SAFETY: maps the array's values (an mmapable array: BPF_F_MMAPABLE);
        // the pointer is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SharedArrayError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        let values = NonNull::new(ptr.cast()).ok_or(SharedArrayError::Missing(name))?;
        Ok(Self { values, len, bytes })
    }

    pub fn count(&self) -> usize {
        self.len
    }

    pub fn get(&self, index: usize) -> *mut T {
        debug_assert!(index < self.len);
        // SAFETY: within the mapping (callers index below `len`).
        unsafe { self.values.as_ptr().add(index % self.len) }
    }
}

impl<T> Drop for SharedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.values.as_ptr().cast(), self.bytes) };
    }
}
