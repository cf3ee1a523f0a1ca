//! Validation of descriptor chains before the device touches their buffers.
//!
//! Chains come from the guest and are untrusted. virtio-queue's
//! [`DescriptorChain`] iterator bounds the walk (at most queue-size
//! descriptors per table, at most one indirect table, total length below
//! 2^32) but reports every problem the same way: it simply stops. A chain
//! that stops on a descriptor that still has `VIRTQ_DESC_F_NEXT` set was cut
//! short, and the walker turns that into an error instead of using a
//! truncated chain. Everything else (ranges, lengths, directions) is checked
//! here, so that the RX and TX paths only ever see well-formed segments.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::hdr::HDR_HASH_LEN;
use crate::memory::{RegionClassifier, RegionKind};
use crate::packet::ETH_HLEN;

/// Largest TX chain accepted: a 64 KiB GSO packet (IP total length 65535)
/// with Ethernet, two VLAN tags and the largest virtio-net header.
pub const TX_MAX_CHAIN_BYTES: u64 = (HDR_HASH_LEN + ETH_HLEN + 8 + 65_535) as u64;

/// Which descriptor directions a queue accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Receive queues: every descriptor device-writable.
    DeviceWritable,
    /// Transmit queues: device-readable only. virtio-net TX chains carry no
    /// writable part (nothing is reported back but the used entry), so a
    /// writable descriptor is a driver bug and is rejected rather than
    /// skipped. Non-emptiness follows from the chain having a descriptor.
    DeviceReadable,
    /// Control queue: readable descriptors followed by writable ones.
    ReadThenWrite,
}

/// A piece of a descriptor that lies in a single memory region. A
/// descriptor crossing a region boundary yields one segment per region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
    pub kind: RegionKind,
    /// Position of the descriptor within the chain (0 = first).
    pub desc: u16,
    /// Region index in the [`RegionClassifier`], for diagnostics.
    pub region: usize,
}

/// Bounds applied on top of what virtio-queue enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainLimits {
    /// Maximum number of descriptors, indirect ones included.
    pub max_descs: u16,
    /// Maximum sum of descriptor lengths.
    pub max_bytes: u64,
}

impl ChainLimits {
    /// The virtio limits: no chain longer than the queue size ("A driver
    /// MUST NOT create a descriptor chain longer than the Queue Size") and
    /// no more than 2^32 - 1 bytes.
    pub fn new(queue_size: u16) -> Self {
        ChainLimits {
            max_descs: queue_size,
            max_bytes: u64::from(u32::MAX),
        }
    }

    /// TX chains additionally stop at [`TX_MAX_CHAIN_BYTES`], bounding the
    /// copy per packet.
    pub fn tx(queue_size: u16) -> Self {
        ChainLimits {
            max_descs: queue_size,
            max_bytes: TX_MAX_CHAIN_BYTES,
        }
    }
}

/// What a successful walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainSummary {
    pub head: u16,
    /// Number of descriptors.
    pub descs: u16,
    /// Total length of the device-readable descriptors.
    pub readable: u64,
    /// Total length of the device-writable descriptors.
    pub writable: u64,
}

/// Why a chain was refused. Descriptor `index` values are positions within
/// the chain, not descriptor-table indices.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// virtio-queue yielded nothing: the head index is beyond the queue
    /// size, or the head is an indirect descriptor whose table is empty,
    /// not a multiple of 16 bytes, larger than 65535 entries or unreadable.
    #[error("descriptor chain yields no descriptor (bad head index or indirect table)")]
    NoDescriptors,
    #[error("descriptor {index}: {len:#x} bytes at {addr:#x} are not inside guest memory")]
    OutOfRange { index: u16, addr: u64, len: u32 },
    #[error("descriptor {index} has length 0")]
    ZeroLength { index: u16 },
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable { index: u16 },
    #[error(
        "descriptor {index} has the wrong direction for this queue (device-writable: {writable})"
    )]
    WrongDirection { index: u16, writable: bool },
    /// The descriptor limit (the queue size) was reached: a loop in the
    /// descriptor table, or a chain longer than the queue.
    #[error("descriptor chain is longer than {max} descriptors (loop or overlong chain)")]
    TooLong { max: u16 },
    /// virtio-queue stopped at a descriptor that has NEXT set: a loop or
    /// overlong chain inside an indirect table, a next index beyond the
    /// table, a nested indirect descriptor, an unreadable descriptor, or a
    /// total length of 2^32 bytes or more.
    #[error("descriptor chain is cut short after {descs} descriptors (loop, bad next index, nested indirect table, or over 4 GiB)")]
    Unterminated { descs: u16 },
    #[error("descriptor chain carries more than {max} bytes")]
    LengthOverflow { max: u64 },
    /// RX: the buffer that must take the virtio-net header (and, with
    /// header split, the protocol headers) is too small.
    #[error("header buffer of {len} bytes is smaller than the required {min}")]
    HeaderBufferTooSmall { len: u64, min: u64 },
    /// RX with header split: the chain has no descriptor after the header
    /// buffer.
    #[error("header-split chain has no payload descriptor")]
    NoPayloadBuffer,
    /// Access to a validated range failed anyway (memory table changed?).
    #[error("guest memory access of {len:#x} bytes at {addr:#x} failed")]
    Memory { addr: u64, len: usize },
}

/// Walks `chain`, checking every descriptor, and appends its segments to
/// `out` (a buffer reused across chains, so steady state does not
/// allocate). On error `out` is restored to its previous length.
pub fn walk_chain<D>(
    chain: &mut DescriptorChain<D>,
    dir: Direction,
    regions: &RegionClassifier,
    limits: ChainLimits,
    out: &mut Vec<Segment>,
) -> Result<ChainSummary, ChainError>
where
    D: Deref,
    D::Target: GuestMemory,
{
    let start = out.len();
    let res = walk_inner(chain, dir, regions, limits, out);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

fn walk_inner<D>(
    chain: &mut DescriptorChain<D>,
    dir: Direction,
    regions: &RegionClassifier,
    limits: ChainLimits,
    out: &mut Vec<Segment>,
) -> Result<ChainSummary, ChainError>
where
    D: Deref,
    D::Target: GuestMemory,
{
    let mut sum = ChainSummary {
        head: chain.head_index(),
        descs: 0,
        readable: 0,
        writable: 0,
    };
    let mut seen_writable = false;
    let mut last_has_next = false;
    while let Some(desc) = chain.next() {
        if sum.descs >= limits.max_descs {
            return Err(ChainError::TooLong {
                max: limits.max_descs,
            });
        }
        let index = sum.descs;
        sum.descs += 1;
        last_has_next = desc.has_next();
        let (addr, len, writable) = (desc.addr(), desc.len(), desc.is_write_only());
        if len == 0 {
            return Err(ChainError::ZeroLength { index });
        }
        if !writable && seen_writable {
            return Err(ChainError::ReadableAfterWritable { index });
        }
        let allowed = match dir {
            Direction::DeviceWritable => writable,
            Direction::DeviceReadable => !writable,
            Direction::ReadThenWrite => true,
        };
        if !allowed {
            return Err(ChainError::WrongDirection { index, writable });
        }
        seen_writable |= writable;
        let total = sum.readable + sum.writable + u64::from(len);
        if total > limits.max_bytes {
            return Err(ChainError::LengthOverflow {
                max: limits.max_bytes,
            });
        }
        if writable {
            sum.writable += u64::from(len);
        } else {
            sum.readable += u64::from(len);
        }
        let out_of_range = ChainError::OutOfRange {
            index,
            addr: addr.raw_value(),
            len,
        };
        let perm = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let Ok(ulen) = usize::try_from(len) else {
            return Err(out_of_range);
        };
        if !GuestMemory::check_range(chain.memory(), addr, ulen, perm) {
            return Err(out_of_range);
        }
        push_segments(regions, addr, len, writable, index, out).ok_or(out_of_range)?;
    }
    if sum.descs == 0 {
        return Err(ChainError::NoDescriptors);
    }
    if last_has_next {
        return Err(if sum.descs >= limits.max_descs {
            ChainError::TooLong {
                max: limits.max_descs,
            }
        } else {
            ChainError::Unterminated { descs: sum.descs }
        });
    }
    Ok(sum)
}

/// Splits one descriptor at region boundaries; None if some byte is not
/// covered by the classifier.
fn push_segments(
    regions: &RegionClassifier,
    addr: GuestAddress,
    len: u32,
    writable: bool,
    desc: u16,
    out: &mut Vec<Segment>,
) -> Option<()> {
    let mut a = addr.raw_value();
    let mut left = u64::from(len);
    while left > 0 {
        let r = regions.find(GuestAddress(a))?;
        let n = left.min(r.end().checked_sub(a)?);
        if n == 0 {
            return None;
        }
        out.push(Segment {
            addr: GuestAddress(a),
            len: u32::try_from(n).ok()?,
            writable,
            kind: r.kind,
            desc,
            region: r.index,
        });
        left -= n;
        a = a.checked_add(n)?;
    }
    Some(())
}

/// TX helper: validates a device-readable chain and copies its bytes into
/// `data` (cleared first; capacity is kept across packets). `segs` is
/// scratch space. Chains longer than `limits.max_bytes` fail with
/// [`ChainError::LengthOverflow`] before anything is copied.
pub fn read_chain<D>(
    chain: &mut DescriptorChain<D>,
    regions: &RegionClassifier,
    limits: ChainLimits,
    segs: &mut Vec<Segment>,
    data: &mut Vec<u8>,
) -> Result<ChainSummary, ChainError>
where
    D: Deref,
    D::Target: GuestMemory,
{
    segs.clear();
    data.clear();
    let sum = walk_chain(chain, Direction::DeviceReadable, regions, limits, segs)?;
    let total = usize::try_from(sum.readable).map_err(|_| ChainError::LengthOverflow {
        max: limits.max_bytes,
    })?;
    data.resize(total, 0);
    let mut off = 0usize;
    for s in segs.iter() {
        let len = s.len as usize;
        let mem_err = ChainError::Memory {
            addr: s.addr.raw_value(),
            len,
        };
        let dst = data.get_mut(off..off + len).ok_or(mem_err.clone())?;
        chain
            .memory()
            .read_slice(dst, s.addr)
            .map_err(|_| mem_err)?;
        off += len;
    }
    Ok(sum)
}

/// RX helper for header-split chains: checks the layout (descriptor 0 is
/// the header buffer, at least `hdr_buf_len` bytes; at least one payload
/// descriptor follows) and returns the header buffer's length. `segs` are
/// the segments of one chain as produced by [`walk_chain`].
pub fn split_header_len(segs: &[Segment], hdr_buf_len: u64) -> Result<u64, ChainError> {
    let hdr: u64 = segs
        .iter()
        .take_while(|s| s.desc == 0)
        .map(|s| u64::from(s.len))
        .sum();
    if hdr < hdr_buf_len {
        return Err(ChainError::HeaderBufferTooSmall {
            len: hdr,
            min: hdr_buf_len,
        });
    }
    if !segs.iter().any(|s| s.desc > 0) {
        return Err(ChainError::NoPayloadBuffer);
    }
    Ok(hdr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    const QSIZE: u16 = 16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .unwrap()
    }

    /// Stores `descs` at table index 0.. and offers head 0.
    fn offer(vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, u16, u16)]) {
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
            vq.desc_table().store(i as u16, d).unwrap();
        }
        let idx = vq.avail().idx().load();
        vq.avail()
            .ring()
            .ref_at(usize::from(idx % QSIZE))
            .unwrap()
            .store(0);
        vq.avail().idx().store(idx.wrapping_add(1));
    }

    fn walk(
        m: &GuestMemoryMmap,
        descs: &[(u64, u32, u16, u16)],
        dir: Direction,
        regions: &RegionClassifier,
    ) -> Result<(ChainSummary, Vec<Segment>), ChainError> {
        let vq = MockSplitQueue::new(m, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        offer(&vq, descs);
        let mut chain = q.pop_descriptor_chain(m).unwrap();
        let mut out = vec![];
        walk_chain(&mut chain, dir, regions, ChainLimits::new(QSIZE), &mut out).map(|s| (s, out))
    }

    #[test]
    fn splits_segments_at_region_boundaries() {
        let m = mem();
        let regions =
            RegionClassifier::with_device_ranges(&m, &[(GuestAddress(0x10_0000), 0x10_0000)]);
        let (sum, segs) = walk(
            &m,
            &[
                (0xf_f000, 0x2000, WRITE | NEXT, 1),
                (0x8000, 0x100, WRITE, 0),
            ],
            Direction::DeviceWritable,
            &regions,
        )
        .unwrap();
        assert_eq!((sum.descs, sum.writable, sum.readable), (2, 0x2100, 0));
        let v: Vec<_> = segs
            .iter()
            .map(|s| (s.addr.0, s.len, s.kind, s.desc))
            .collect();
        assert_eq!(
            v,
            [
                (0xf_f000, 0x1000, RegionKind::Ram, 0),
                (0x10_0000, 0x1000, RegionKind::Device, 0),
                (0x8000, 0x100, RegionKind::Ram, 1)
            ]
        );
    }

    #[test]
    fn rejects_bad_descriptors() {
        let m = mem();
        let r = RegionClassifier::new(&m);
        let rx = Direction::DeviceWritable;
        let e = |d: &[(u64, u32, u16, u16)], dir| walk(&m, d, dir, &r).unwrap_err();
        assert_eq!(
            e(&[(0x1f_ff00, 0x200, WRITE, 0)], rx),
            ChainError::OutOfRange {
                index: 0,
                addr: 0x1f_ff00,
                len: 0x200
            }
        );
        assert!(matches!(
            e(&[(u64::MAX - 4, 0x10, WRITE, 0)], rx),
            ChainError::OutOfRange { .. }
        ));
        assert_eq!(
            e(
                &[(0x8000, 0x10, WRITE | NEXT, 1), (0x9000, 0, WRITE, 0)],
                rx
            ),
            ChainError::ZeroLength { index: 1 }
        );
        assert_eq!(
            e(&[(0x8000, 0x10, 0, 0)], rx),
            ChainError::WrongDirection {
                index: 0,
                writable: false
            }
        );
        assert_eq!(
            e(
                &[(0x8000, 0x10, WRITE | NEXT, 1), (0x9000, 0x10, 0, 0)],
                Direction::ReadThenWrite
            ),
            ChainError::ReadableAfterWritable { index: 1 }
        );
        assert_eq!(
            e(
                &[(0x8000, 0x10, NEXT, 1), (0x9000, 0x10, WRITE, 0)],
                Direction::DeviceReadable
            ),
            ChainError::WrongDirection {
                index: 1,
                writable: true
            }
        );
        // 0 -> 1 -> 0 -> ...: virtio-queue stops after QSIZE descriptors.
        assert_eq!(
            e(
                &[
                    (0x8000, 0x10, WRITE | NEXT, 1),
                    (0x9000, 0x10, WRITE | NEXT, 0)
                ],
                rx
            ),
            ChainError::TooLong { max: QSIZE }
        );
        // Next index beyond the table.
        assert_eq!(
            e(&[(0x8000, 0x10, WRITE | NEXT, 200)], rx),
            ChainError::Unterminated { descs: 1 }
        );
        // Indirect table of 20 bytes (not a multiple of 16).
        assert_eq!(
            e(&[(0x4_0000, 20, VRING_DESC_F_INDIRECT as u16, 0)], rx),
            ChainError::NoDescriptors
        );
    }

    #[test]
    fn indirect_loops_and_nesting_end_in_errors() {
        let m = mem();
        let r = RegionClassifier::new(&m);
        let table = GuestAddress(0x4_0000);
        let put = |i: u64, a: u64, l: u32, f: u16, n: u16| {
            m.write_obj(
                RawDescriptor::from(SplitDescriptor::new(a, l, f, n)),
                table.unchecked_add(16 * i),
            )
            .unwrap();
        };
        // A loop inside a 4-entry indirect table.
        put(0, 0x8000, 0x10, WRITE | NEXT, 1);
        put(1, 0x9000, 0x10, WRITE | NEXT, 0);
        let ind = VRING_DESC_F_INDIRECT as u16;
        let err = walk(&m, &[(table.0, 64, ind, 0)], Direction::DeviceWritable, &r).unwrap_err();
        assert_eq!(err, ChainError::Unterminated { descs: 4 });
        // A nested indirect descriptor.
        put(1, 0x5_0000, 16, ind, 0);
        let err = walk(&m, &[(table.0, 32, ind, 0)], Direction::DeviceWritable, &r).unwrap_err();
        assert_eq!(err, ChainError::Unterminated { descs: 1 });
        // A well-formed table.
        put(1, 0x9000, 0x20, WRITE, 0);
        let (sum, _) = walk(&m, &[(table.0, 32, ind, 0)], Direction::DeviceWritable, &r).unwrap();
        assert_eq!((sum.descs, sum.writable), (2, 0x30));
    }

    #[test]
    fn read_chain_copies_and_caps() {
        let m = mem();
        let r = RegionClassifier::new(&m);
        m.write_slice(&[1, 2, 3], GuestAddress(0x8000)).unwrap();
        m.write_slice(&[4, 5], GuestAddress(0x9000)).unwrap();
        let vq = MockSplitQueue::new(&m, QSIZE);
        let mut q: Queue = vq.create_queue().unwrap();
        offer(&vq, &[(0x8000, 3, NEXT, 1), (0x9000, 2, 0, 0)]);
        let mut chain = q.pop_descriptor_chain(&m).unwrap();
        let (mut segs, mut data) = (vec![], vec![]);
        let sum = read_chain(&mut chain, &r, ChainLimits::tx(QSIZE), &mut segs, &mut data).unwrap();
        assert_eq!((sum.readable, data.as_slice()), (5, &[1u8, 2, 3, 4, 5][..]));

        offer(&vq, &[(0x8000, 0x8000, NEXT, 1), (0x1_0000, 0x8100, 0, 0)]);
        let mut chain = q.pop_descriptor_chain(&m).unwrap();
        let err = read_chain(&mut chain, &r, ChainLimits::tx(QSIZE), &mut segs, &mut data);
        assert_eq!(
            err,
            Err(ChainError::LengthOverflow {
                max: TX_MAX_CHAIN_BYTES
            })
        );
    }

    #[test]
    fn split_layout_checks() {
        let seg = |desc, len| Segment {
            addr: GuestAddress(0),
            len,
            writable: true,
            kind: RegionKind::Ram,
            desc,
            region: 0,
        };
        assert_eq!(
            split_header_len(&[seg(0, 200), seg(0, 56), seg(1, 10)], 256),
            Ok(256)
        );
        assert_eq!(
            split_header_len(&[seg(0, 128), seg(1, 10)], 256),
            Err(ChainError::HeaderBufferTooSmall { len: 128, min: 256 })
        );
        assert_eq!(
            split_header_len(&[seg(0, 256)], 256),
            Err(ChainError::NoPayloadBuffer)
        );
    }
}
