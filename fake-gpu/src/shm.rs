//! The shared memory behind BAR2: a sealed memfd mapped into this process.
//!
//! The same file is mapped by QEMU (as BAR2) and written by the guest, by
//! other devices' DMA and by this process at the same time, so nothing
//! here hands out Rust references into it: data moves with raw-pointer
//! copies, ring indices with atomics, and every access is bounds-checked.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("memfd_create: {0}")]
    Create(io::Error),
    #[error(
        "memfd_create(MFD_HUGETLB): {0}; this kernel or filesystem offers no huge pages for memfd"
    )]
    HugetlbCreate(io::Error),
    #[error("sizing shared memory to {size} bytes: {err}")]
    Truncate { size: u64, err: io::Error },
    #[error("sealing shared memory: {0}")]
    Seal(io::Error),
    #[error(
        "mapping {size} bytes of huge pages failed ({err}): {pages} pages of {page_size} bytes \
         needed, {free} free; raise /proc/sys/vm/nr_hugepages"
    )]
    HugetlbMap {
        size: u64,
        page_size: u64,
        pages: u64,
        free: u64,
        err: io::Error,
    },
    #[error("mapping {size} bytes of shared memory: {err}")]
    Map { size: u64, err: io::Error },
    #[error("shared memory file: {0}")]
    Stat(io::Error),
    #[error("shared memory of {0} bytes does not fit in this address space")]
    TooBig(u64),
    #[error("range {offset:#x}+{len:#x} is outside the {size:#x}-byte shared memory")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("offset {0:#x} is not aligned for an atomic access")]
    Unaligned(u64),
}

/// Reads a field of /proc/meminfo, in bytes for "kB" fields.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let mut it = rest.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        Some(match it.next() {
            Some("kB") => n * 1024,
            _ => n,
        })
    })
}

/// The default huge page size of this machine (2 MiB when unknown).
pub fn huge_page_size() -> u64 {
    meminfo("Hugepagesize").unwrap_or(2 << 20)
}

/// Shared memory mapped read-write in this process.
#[derive(Debug)]
pub struct SharedMemory {
    base: *mut u8,
    size: u64,
    file: File,
    hugetlb: bool,
}

// SAFETY: the mapping is plain memory shared with other processes; this
// type only accesses it through raw-pointer copies and atomics, which are
// valid from any thread.
unsafe impl Send for SharedMemory {}
// SAFETY: as above; no method hands out references into the mapping.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates a memfd of `size` bytes (huge pages if `hugetlb`), seals its
    /// size (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL: QEMU maps it all and
    /// nobody may resize it under the guest) and maps it.
    pub fn create(name: &str, size: u64, hugetlb: bool) -> Result<SharedMemory, ShmError> {
        let cname = CString::new(name.replace('\0', "_")).unwrap_or_default();
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if hugetlb {
            flags |= libc::MFD_HUGETLB;
        }
        // SAFETY: cname is a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(if hugetlb {
                ShmError::HugetlbCreate(err)
            } else {
                ShmError::Create(err)
            });
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|err| ShmError::Truncate { size, err })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(ShmError::Seal(io::Error::last_os_error()));
        }
        Self::map(file, size, hugetlb)
    }

    /// Maps an existing shared memory file (the client side: the fd came
    /// from an ivshmem server).
    pub fn from_file(file: File) -> Result<SharedMemory, ShmError> {
        let size = file.metadata().map_err(ShmError::Stat)?.len();
        Self::map(file, size, false)
    }

    fn map(file: File, size: u64, hugetlb: bool) -> Result<SharedMemory, ShmError> {
        let len = usize::try_from(size).map_err(|_| ShmError::TooBig(size))?;
        if len == 0 {
            return Err(ShmError::Map {
                size,
                err: io::Error::new(io::ErrorKind::InvalidInput, "empty"),
            });
        }
        // SAFETY: a fresh shared mapping of a file we own; the result is
        // checked and the mapping is released in Drop.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            if hugetlb {
                let page_size = huge_page_size();
                return Err(ShmError::HugetlbMap {
                    size,
                    page_size,
                    pages: size.div_ceil(page_size),
                    free: meminfo("HugePages_Free").unwrap_or(0),
                    err,
                });
            }
            return Err(ShmError::Map { size, err });
        }
        Ok(SharedMemory {
            base: base.cast(),
            size,
            file,
            hugetlb,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn hugetlb(&self) -> bool {
        self.hugetlb
    }

    /// Pointer to `len` bytes at `offset`, after checking the range.
    fn at(&self, offset: u64, len: u64) -> Result<*mut u8, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {
                // SAFETY: offset < size (or len == 0 and offset <= size),
                // and size fits in usize (checked at map time).
                Ok(unsafe { self.base.add(offset as usize) })
            }
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ShmError> {
        let p = self.at(offset, buf.len() as u64)?;
        // SAFETY: the source range is inside the mapping; buf is ours.
        unsafe { ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), ShmError> {
        let p = self.at(offset, data.len() as u64)?;
        // SAFETY: the destination range is inside the mapping.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// memmove inside the mapping.
    pub fn copy_within(&self, src: u64, dst: u64, len: u64) -> Result<(), ShmError> {
        let s = self.at(src, len)?;
        let d = self.at(dst, len)?;
        // SAFETY: both ranges are inside the mapping; ptr::copy allows
        // overlap. len fits in usize because it is at most size.
        unsafe { ptr::copy(s, d, len as usize) };
        Ok(())
    }

    /// memset inside the mapping.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), ShmError> {
        let p = self.at(offset, len)?;
        // SAFETY: the range is inside the mapping.
        unsafe { ptr::write_bytes(p, byte, len as usize) };
        Ok(())
    }

    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, ShmError> {
        if offset % 4 != 0 {
            return Err(ShmError::Unaligned(offset));
        }
        let p = self.at(offset, 4)?;
        // SAFETY: in bounds, 4-byte aligned (the mapping is page aligned),
        // and AtomicU32 has the layout of u32; the mapping lives as long
        // as &self.
        Ok(unsafe { &*(p as *const AtomicU32) })
    }

    fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, ShmError> {
        if offset % 8 != 0 {
            return Err(ShmError::Unaligned(offset));
        }
        let p = self.at(offset, 8)?;
        // SAFETY: as for atomic_u32, with 8-byte alignment.
        Ok(unsafe { &*(p as *const AtomicU64) })
    }

    /// Loads a little-endian u32 register with acquire ordering.
    pub fn load_u32(&self, offset: u64) -> Result<u32, ShmError> {
        Ok(u32::from_le(
            self.atomic_u32(offset)?.load(Ordering::Acquire),
        ))
    }

    /// Stores a little-endian u32 register with release ordering.
    pub fn store_u32(&self, offset: u64, v: u32) -> Result<(), ShmError> {
        self.atomic_u32(offset)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }

    pub fn load_u64(&self, offset: u64) -> Result<u64, ShmError> {
        Ok(u64::from_le(
            self.atomic_u64(offset)?.load(Ordering::Acquire),
        ))
    }

    pub fn store_u64(&self, offset: u64, v: u64) -> Result<(), ShmError> {
        self.atomic_u64(offset)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }

    /// Touches every page so later copies measure copying, not faults.
    pub fn prefault(&self, offset: u64, len: u64) -> Result<(), ShmError> {
        let p = self.at(offset, len)?;
        let mut at = 0u64;
        while at < len {
            // SAFETY: p + at is inside the checked range; a volatile read
            // and write back of the same byte leaves the content as it was
            // unless another writer races, which prefault callers exclude.
            unsafe {
                let q = p.add(at as usize);
                ptr::write_volatile(q, ptr::read_volatile(q));
            }
            at += 4096;
        }
        Ok(())
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: base/size describe the mapping made in map().
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_seals() {
        let shm = SharedMemory::create("t", 1 << 20, false).unwrap();
        shm.write(0, b"hello").unwrap();
        let mut b = [0u8; 5];
        shm.read(0, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(shm.read((1 << 20) - 2, &mut b).is_err());
        assert!(shm.write(u64::MAX, b"x").is_err());
        assert!(shm.copy_within(0, (1 << 20) - 4, 5).is_err());
        shm.copy_within(0, 1, 5).unwrap();
        shm.read(1, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        shm.fill(0, 8, 0xaa).unwrap();
        assert_eq!(shm.load_u64(0).unwrap(), 0xaaaa_aaaa_aaaa_aaaa);
        shm.store_u32(8, 0x1234_5678).unwrap();
        assert_eq!(shm.load_u32(8).unwrap(), 0x1234_5678);
        assert!(shm.load_u32(9).is_err());
        // Size is sealed: nobody can grow or shrink the BAR.
        assert!(shm.file().set_len(2 << 20).is_err());
        assert!(shm.file().set_len(4096).is_err());
        // Another mapping of the same file sees the same bytes.
        let other = SharedMemory::from_file(shm.file().try_clone().unwrap()).unwrap();
        assert_eq!(other.size(), 1 << 20);
        assert_eq!(other.load_u32(8).unwrap(), 0x1234_5678);
    }
}
