//! Reads of a live process's memory with `process_vm_readv`: one system
//! call per read, no ptrace stop, and a fault in the target is an error
//! here, not a crash.

/// A read of another process's memory that did not return every byte.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot read {len} bytes at {addr:#x} in pid {pid}: {source}")]
    Read {
        pid: u32,
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("read of {len} bytes at {addr:#x} in pid {pid} stopped after {got}")]
    Short {
        pid: u32,
        addr: u64,
        len: usize,
        got: usize,
    },
}

/// The memory of process `pid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessMemory {
    pub pid: u32,
}

impl ProcessMemory {
    pub const fn new(pid: u32) -> Self {
        Self { pid }
    }

    /// Fills `buf` from `addr`, or fails: a partial read (the range ran
    /// into an unmapped page) is an error.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        let pid = self.pid;
        // SAFETY: `local` describes `buf`, which is valid for `len` bytes of
        // writes; the remote range is only read by the kernel, which checks
        // it against the target's address space.
        let got = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        match usize::try_from(got) {
            Err(_) => Err(MemoryError::Read {
                pid,
                addr,
                len,
                source: std::io::Error::last_os_error(),
            }),
            Ok(got) if got < len => Err(MemoryError::Short {
                pid,
                addr,
                len,
                got,
            }),
            Ok(_) => Ok(()),
        }
    }

    #[cfg(test)]
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut word = [0u8; 8];
        self.read(addr, &mut word)?;
        Ok(u64::from_ne_bytes(word))
    }

    /// `len` bytes at `addr`; the caller caps `len`.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut bytes = vec![0u8; len];
        self.read(addr, &mut bytes)?;
        Ok(bytes)
    }
}

/// Little helpers over a buffer read from the target, bounds-checked: an
/// offset past the buffer gives `None`.
pub fn u64_at(buf: &[u8], offset: usize) -> Option<u64> {
    let bytes = buf.get(offset..offset.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

pub fn u32_at(buf: &[u8], offset: usize) -> Option<u32> {
    let bytes = buf.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_refuses_unmapped_pages() {
        let value: u64 = 0x1122_3344_5566_7788;
        let memory = ProcessMemory::new(std::process::id());
        let addr = std::ptr::addr_of!(value) as u64;
        assert_eq!(memory.read_u64(addr).expect("own stack"), value);
        assert!(matches!(
            memory.read_u64(8),
            Err(MemoryError::Read { addr: 8, .. })
        ));
    }
}
