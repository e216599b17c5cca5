//! Reads of a live process's memory through its `/proc/PID/mem`, opened
//! once: one system call per read, no ptrace stop, and a fault in the
//! target is an error here, not a crash.
//!
//! NB: not `process_vm_readv` by pid: the descriptor is bound to the
//! process's address space when opened, so once it exits, reads fail
//! instead of reading whichever new process got its pid (a fork-heavy host
//! reuses pids within milliseconds).

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
#[derive(Clone, Debug)]
pub struct ProcessMemory {
    pub pid: u32,
    /// None when it could not be opened (the process is gone): every read
    /// fails then.
    mem: Option<std::sync::Arc<std::fs::File>>,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
            .ok()
            .map(std::sync::Arc::new);
        Self { pid, mem }
    }

    /// Fills `buf` from `addr`, or fails: a partial read (the range ran
    /// into an unmapped page) is an error.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.is_empty() {
            return Ok(());
        }
        use std::os::unix::fs::FileExt as _;
        let len = buf.len();
        let pid = self.pid;
        let read_error = |source| MemoryError::Read {
            pid,
            addr,
            len,
            source,
        };
        let mem = self
            .mem
            .as_ref()
            .ok_or_else(|| read_error(std::io::ErrorKind::NotFound.into()))?;
        let mut got = 0;
        while got < len {
            match mem.read_at(&mut buf[got..], addr + got as u64) {
                Ok(0) => {
                    return Err(MemoryError::Short {
                        pid,
                        addr,
                        len,
                        got,
                    });
                }
                Ok(n) => got += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(read_error(error)),
            }
        }
        Ok(())
    }

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
