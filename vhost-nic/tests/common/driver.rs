//! The guest side of split virtqueues, written from the driver's point of
//! view: guest RAM is a memfd shared with the daemon, the test lays out the
//! rings in it, posts descriptor chains, kicks, and collects used entries.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap as Mmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub type GuestMemoryMmap = Mmap<()>;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Guest RAM: a memfd mapped in this process at guest physical address 0,
/// and handed to the daemon with SET_MEM_TABLE.
pub struct GuestRam {
    pub mem: Arc<GuestMemoryMmap>,
    file: File,
    pub size: u64,
    next_free: u64,
}

impl GuestRam {
    pub fn new(size: u64) -> Self {
        // SAFETY: memfd_create with a valid NUL-terminated name; the
        // returned fd is checked and then owned by `file`.
        let fd = unsafe { libc::memfd_create(c"vhost-nic-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).expect("ftruncate guest RAM");
        let map_file = file.try_clone().expect("dup memfd");
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(map_file, 0)),
        )])
        .expect("map guest RAM");
        GuestRam {
            mem: Arc::new(mem),
            file,
            size,
            // Keep page 0 unused, like real guests, so address 0 is never a
            // legitimate buffer.
            next_free: 4096,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Address of the mapping in this process: the "QEMU virtual address"
    /// the vhost-user messages carry.
    pub fn host_addr(&self, gpa: GuestAddress) -> u64 {
        self.mem
            .get_host_address(gpa)
            .expect("address in guest RAM") as u64
    }

    /// Bump allocator for rings and buffers.
    pub fn alloc(&mut self, len: u64, align: u64) -> GuestAddress {
        let start = self.next_free.div_ceil(align) * align;
        let end = start + len;
        assert!(
            end <= self.size,
            "guest RAM exhausted ({end:#x} > {:#x})",
            self.size
        );
        self.next_free = end;
        GuestAddress(start)
    }
}

/// One piece of a descriptor chain to post.
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// Device-readable buffer holding these bytes (in the descriptor's slot).
    Out(&'a [u8]),
    /// Device-writable buffer of this many bytes (in the descriptor's slot).
    In(u32),
    /// A descriptor exactly as given (for malformed chains); NEXT is added
    /// when another part follows.
    Raw { addr: u64, len: u32, flags: u16 },
}

/// A used ring entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
    /// The chain's descriptor ids, head first.
    pub descs: Vec<u16>,
}

/// A split virtqueue driven by the test. Every descriptor index owns a
/// fixed buffer slot of `buf_len` bytes, so a chain's buffers are the slots
/// of its descriptors.
pub struct VirtQueue {
    mem: Arc<GuestMemoryMmap>,
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    bufs: GuestAddress,
    pub buf_len: u32,
    free: Vec<u16>,
    /// Chains the device has not completed yet: head -> descriptor ids.
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
    /// Heads in the order they were made available.
    pub posted: Vec<u16>,
    /// Used entries in the order the device produced them.
    pub completed: Vec<Used>,
}

impl VirtQueue {
    pub fn new(ram: &mut GuestRam, index: usize, size: u16, buf_len: u32) -> Self {
        let n = u64::from(size);
        let desc = ram.alloc(16 * n, 16);
        let avail = ram.alloc(6 + 2 * n, 2);
        let used = ram.alloc(6 + 8 * n, 4);
        let bufs = ram.alloc(n * u64::from(buf_len), 4096);
        VirtQueue {
            mem: ram.mem.clone(),
            index,
            size,
            desc,
            avail,
            used,
            bufs,
            buf_len,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
            call: EventFd::new(EFD_NONBLOCK).expect("call eventfd"),
            posted: Vec::new(),
            completed: Vec::new(),
        }
    }

    /// The buffer slot of descriptor `id`.
    pub fn slot(&self, id: u16) -> GuestAddress {
        GuestAddress(self.bufs.0 + u64::from(id) * u64::from(self.buf_len))
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The used index as the device last published it.
    pub fn device_used_idx(&self) -> u16 {
        self.mem
            .load(self.used.unchecked_add(2), Ordering::Acquire)
            .expect("read used idx")
    }

    /// The avail index the driver published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Posts a chain and makes it available (no kick). Panics when the ring
    /// lacks descriptors; callers reclaim or wait first.
    pub fn add_chain(&mut self, parts: &[Part]) -> u16 {
        assert!(!parts.is_empty());
        assert!(
            self.free.len() >= parts.len(),
            "queue {}: {} descriptors needed, {} free",
            self.index,
            parts.len(),
            self.free.len()
        );
        let ids: Vec<u16> = (0..parts.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, (part, &id)) in parts.iter().zip(&ids).enumerate() {
            let (addr, len, mut flags) = match *part {
                Part::Out(data) => {
                    assert!(data.len() <= self.buf_len as usize, "buffer too large");
                    self.mem
                        .write_slice(data, self.slot(id))
                        .expect("write buffer");
                    (self.slot(id).0, data.len() as u32, 0)
                }
                Part::In(len) => {
                    assert!(len <= self.buf_len, "buffer too large");
                    (self.slot(id).0, len, VIRTQ_DESC_F_WRITE)
                }
                Part::Raw { addr, len, flags } => (addr, len, flags & !VIRTQ_DESC_F_NEXT),
            };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < ids.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write_slice(&d, self.desc.unchecked_add(16 * u64::from(id)))
                .expect("write descriptor");
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))
            .expect("write avail ring");
        // Descriptors and ring entry before the index that publishes them.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                self.avail.unchecked_add(2),
                Ordering::Release,
            )
            .expect("write avail idx");
        fence(Ordering::SeqCst);
        self.in_flight.insert(head, ids);
        self.posted.push(head);
        head
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    /// Collects the used entries published since the last call and frees
    /// their descriptors. Panics on an entry for a chain that is not in
    /// flight: the device completed a chain twice or invented one.
    pub fn poll_used(&mut self) -> Vec<Used> {
        let idx = self.device_used_idx();
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = u64::from(self.last_used % self.size);
            let elem = self.used.unchecked_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(elem).expect("read used elem");
            let len: u32 = self
                .mem
                .read_obj(elem.unchecked_add(4))
                .expect("read used len");
            let head = u16::try_from(id)
                .ok()
                .filter(|&h| h < self.size)
                .unwrap_or_else(|| panic!("queue {}: used id {id} out of range", self.index));
            let ids = self.in_flight.remove(&head).unwrap_or_else(|| {
                panic!(
                    "queue {}: device completed head {head} which is not in flight \
                     (completed twice?)",
                    self.index
                )
            });
            self.free.extend(ids.iter().rev());
            let u = Used {
                head,
                len,
                descs: ids,
            };
            self.completed.push(u.clone());
            out.push(u);
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits until `n` more used entries arrived.
    pub fn wait_used(&mut self, n: usize, timeout: Duration) -> Vec<Used> {
        let deadline = Instant::now() + timeout;
        let mut got = self.poll_used();
        while got.len() < n {
            assert!(
                Instant::now() < deadline,
                "queue {}: {} of {n} used entries after {timeout:?} (avail {}, device used idx {})",
                self.index,
                got.len(),
                self.avail_idx,
                self.device_used_idx()
            );
            wait_readable(&[self.call.as_raw_fd()], deadline);
            got.extend(self.poll_used());
        }
        got
    }

    /// Bytes of descriptor `id`'s slot.
    pub fn read_slot(&self, id: u16, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, self.slot(id))
            .expect("read buffer");
        buf
    }
}

/// Blocks until one of `fds` is readable, `deadline` passes, or 20 ms go
/// by (the caller re-checks the rings either way, so a notification the
/// device decided not to send cannot stall the test), then drains them.
pub fn wait_readable(fds: &[RawFd], deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.min(Duration::from_millis(20)).as_millis() as libc::c_int;
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    for p in &pfds {
        if p.revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into v from an eventfd we own.
            unsafe { libc::read(p.fd, (&mut v as *mut u64).cast(), 8) };
        }
    }
}
