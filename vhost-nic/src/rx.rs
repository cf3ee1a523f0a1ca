//! The receive path: writes one packet into the guest's receive buffers.
//!
//! Handles plain virtio-net layout (header and frame contiguous, optionally
//! merged over several chains with VIRTIO_NET_F_MRG_RXBUF) and the header
//! split extension (VIRTIO_NET_F_SPLIT_HEADER, see
//! docs/virtio-net-extensions.md), where each chain is a header buffer plus
//! payload buffers that may live outside guest RAM.
//!
//! A packet is written in two phases. First enough chains are taken from
//! the avail ring and validated, without touching guest memory; if the ring
//! runs dry the avail index is rolled back and the caller retries later.
//! Then the frame is copied, the virtio-net header (with the final
//! num_buffers) is written, and all used entries are published together.
//! Notifying the guest is left to the caller, which batches it.

use std::num::Wrapping;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::chain::{self, ChainError, ChainLimits, Direction, Segment};
use crate::hdr::{VirtioNetHdr, HDR_HASH_LEN, VIRTIO_NET_HDR_F_SPLIT};
use crate::memory::{RegionClassifier, RegionKind};
use crate::packet::ParsedPacket;

/// Size of one used ring element (le32 id, le32 len).
const USED_ELEM_LEN: u64 = 8;
/// Offset of the ring in the used ring structure (le16 flags, le16 idx).
const USED_RING_OFFSET: u64 = 4;

/// How receive buffers are laid out, from the negotiated features and the
/// split-header control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxLayout {
    /// VIRTIO_NET_F_MRG_RXBUF negotiated.
    pub mrg_rxbuf: bool,
    /// Size of the virtio-net header: 12 (VERSION_1), 20 (HASH_REPORT) or
    /// 10 (legacy without MRG_RXBUF). Values above 20 are treated as 20.
    pub vnet_hdr_len: usize,
    /// Header split mode is on (feature negotiated and enabled by command).
    pub split: Option<SplitParams>,
}

/// Parameters of header split mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitParams {
    /// `split_header_buf_len` from the config space: the minimum header
    /// buffer size, and the most the device writes into it. Must be at least
    /// `vnet_hdr_len`.
    pub hdr_buf_len: usize,
    /// TCP payload length up to which packets are not split.
    pub threshold: u32,
}

/// A packet to deliver.
#[derive(Debug, Clone, Copy)]
pub struct RxPacket<'a> {
    /// The Ethernet frame (for GSO packets, the whole super-packet).
    pub frame: &'a [u8],
    /// The virtio-net header to deliver; `num_buffers`, and with header
    /// split `flags`/`hdr_len`, are filled in by the writer.
    pub hdr: VirtioNetHdr,
    /// `packet::parse(frame)`.
    pub parsed: &'a ParsedPacket,
}

/// Result of [`RxWriter::write_packet`].
#[derive(Debug)]
pub enum RxOutcome {
    /// The packet is in the guest's buffers and on the used ring.
    Delivered(RxReport),
    /// Not enough buffers on the avail ring. Nothing was consumed: keep the
    /// packet and retry on the next RX kick.
    NoBuffers,
    /// The packet was dropped; see [`RxDrop`].
    Dropped(RxDrop),
}

impl RxOutcome {
    /// Whether entries were added to the used ring (the caller then decides
    /// whether to notify the guest).
    pub fn used_added(&self) -> bool {
        match self {
            RxOutcome::Delivered(_) => true,
            RxOutcome::Dropped(RxDrop::BadChain { returned, .. }) => *returned > 0,
            RxOutcome::Dropped(RxDrop::UsedRing(_)) => true,
            _ => false,
        }
    }
}

/// What a delivered packet took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxReport {
    /// Chains used (num_buffers with MRG_RXBUF).
    pub buffers: u16,
    /// Bytes written: virtio-net header plus frame.
    pub bytes: usize,
    /// The packet was split.
    pub split: bool,
    /// Length of the L2..L4 headers placed in the header buffer (0 when not
    /// split).
    pub split_hdr_len: usize,
    /// Bytes that landed in guest RAM.
    pub ram_bytes: u64,
    /// Bytes that landed in other memory (device memory such as a GPU BAR).
    pub device_bytes: u64,
    /// Of a split packet, the payload (the bytes after the headers) that
    /// landed in guest RAM and in other memory; 0 when not split. Devmem
    /// flows must show no payload in RAM.
    pub payload_ram_bytes: u64,
    pub payload_device_bytes: u64,
}

/// Why a packet was dropped.
#[derive(Debug)]
pub enum RxDrop {
    /// A chain taken for this packet is malformed. All chains taken for the
    /// packet (`returned` of them; a chain whose head index is beyond the
    /// queue size cannot be) went back to the used ring with length 0, which
    /// the Linux driver counts as a length error and recycles.
    BadChain { error: ChainError, returned: u16 },
    /// The packet does not fit: without MRG_RXBUF, into the next chain;
    /// with it, into a full ring. Nothing was consumed, so the buffers serve
    /// the next packet instead of the ring stalling on this one.
    TooBig { len: usize, capacity: u64 },
    /// Writing the used ring failed (the ring address is not in guest
    /// memory); the queue is unusable until the driver resets it.
    UsedRing(virtio_queue::Error),
}

/// Counters, cumulative over the writer's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxStats {
    pub packets: u64,
    pub bytes: u64,
    pub buffers: u64,
    pub split_packets: u64,
    pub ram_bytes: u64,
    pub device_bytes: u64,
    pub no_buffers: u64,
    pub too_big: u64,
    /// Packets dropped because of a malformed chain.
    pub bad_chain_drops: u64,
    /// Chains returned with length 0.
    pub chains_returned_empty: u64,
    pub used_ring_errors: u64,
}

/// A chain taken for the current packet.
#[derive(Debug, Clone, Copy)]
struct TakenChain {
    head: u16,
    /// Bytes of the packet stream it receives.
    len: u64,
}

/// A run of guest memory receiving bytes of the packet stream (virtio-net
/// header followed by the frame), in stream order.
#[derive(Debug, Clone, Copy)]
struct Piece {
    addr: GuestAddress,
    len: u32,
    kind: RegionKind,
}

/// Writes packets into receive queues. Holds scratch buffers reused across
/// packets so that steady-state delivery does not allocate; use one per
/// queue (or per worker thread).
#[derive(Debug, Default)]
pub struct RxWriter {
    /// Injected faults for the next packet (see fault.rs): cut the last
    /// used length by this many bytes; deliver it unsplit.
    pub fault_short_by: u32,
    pub fault_no_split: bool,
    segs: Vec<Segment>,
    chains: Vec<TakenChain>,
    pieces: Vec<Piece>,
    used: Vec<(u16, u32)>,
    stats: RxStats,
}

impl RxWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> &RxStats {
        &self.stats
    }

    /// Delivers `pkt` into `queue`. See the module documentation for the
    /// phases and [`RxOutcome`] for the results. Never notifies the guest.
    /// With HOOKS, the injected faults above apply (see
    /// NetDevice::toolkit_active for why they are a parameter).
    pub fn write_packet<M: GuestMemory, const HOOKS: bool>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        regions: &RegionClassifier,
        layout: &RxLayout,
        pkt: &RxPacket,
    ) -> RxOutcome {
        self.segs.clear();
        self.chains.clear();
        self.pieces.clear();
        self.used.clear();

        let vnet = layout.vnet_hdr_len.min(HDR_HASH_LEN);
        let need = vnet.saturating_add(pkt.frame.len());
        let split_hdr = if HOOKS && self.fault_no_split {
            None
        } else {
            split_headers_len(layout, pkt, vnet)
        };
        let saved_avail = queue.next_avail();
        let limits = ChainLimits::new(queue.size());
        let max_chains = if layout.mrg_rxbuf {
            usize::from(queue.size())
        } else {
            1
        };

        // Phase 1: take and validate chains until the packet fits.
        let mut have = 0u64;
        // At least one chain, even for a (degenerate) empty stream.
        while have < need as u64 || self.chains.is_empty() {
            if self.chains.len() >= max_chains {
                queue.set_next_avail(saved_avail);
                self.stats.too_big += 1;
                return RxOutcome::Dropped(RxDrop::TooBig {
                    len: need,
                    capacity: have,
                });
            }
            let Some(mut desc_chain) = queue.pop_descriptor_chain(mem) else {
                queue.set_next_avail(saved_avail);
                self.stats.no_buffers += 1;
                return RxOutcome::NoBuffers;
            };
            let head = desc_chain.head_index();
            let remaining = need as u64 - have;
            self.segs.clear();
            let taken = chain::walk_chain(
                &mut desc_chain,
                Direction::DeviceWritable,
                regions,
                limits,
                &mut self.segs,
            )
            .and_then(|_| self.plan_chain(layout, vnet, split_hdr, remaining));
            match taken {
                Ok(len) => {
                    self.chains.push(TakenChain { head, len });
                    have += len;
                }
                Err(error) => {
                    self.chains.push(TakenChain { head, len: 0 });
                    return self.return_chains(queue, mem, error);
                }
            }
        }

        // Phase 2: frame first, header last, then the used entries.
        let mut hdr = pkt.hdr;
        hdr.num_buffers = if layout.mrg_rxbuf {
            // max_chains bounds the count by the queue size.
            u16::try_from(self.chains.len()).unwrap_or(u16::MAX)
        } else {
            1
        };
        match split_hdr {
            Some(hl) => {
                hdr.flags |= VIRTIO_NET_HDR_F_SPLIT;
                hdr.hdr_len = u16::try_from(hl).unwrap_or(u16::MAX);
            }
            None => hdr.flags &= !VIRTIO_NET_HDR_F_SPLIT,
        }
        let mut hdr_bytes = [0u8; HDR_HASH_LEN];
        let hdr_bytes = &mut hdr_bytes[..vnet];
        hdr.write_to(hdr_bytes);
        if let Err(error) = self
            .write_stream(mem, vnet, pkt.frame)
            .and_then(|_| self.write_stream(mem, 0, hdr_bytes))
        {
            for c in &mut self.chains {
                c.len = 0;
            }
            return self.return_chains(queue, mem, error);
        }

        let size = queue.size();
        for c in &self.chains {
            // A chain carries less than 2^32 bytes (virtio-queue stops the
            // walk before), so the conversion cannot fail.
            let len = u32::try_from(c.len).unwrap_or(u32::MAX);
            if c.head < size {
                self.used.push((c.head, len));
            }
        }
        if HOOKS && self.fault_short_by > 0 {
            if let Some(last) = self.used.last_mut() {
                last.1 = last.1.saturating_sub(self.fault_short_by);
            }
        }
        if let Err(e) = publish_used(queue, mem, &self.used) {
            self.stats.used_ring_errors += 1;
            return RxOutcome::Dropped(RxDrop::UsedRing(e));
        }

        let (mut ram, mut device) = (0u64, 0u64);
        let (mut payload_ram, mut payload_device) = (0u64, 0u64);
        // The pieces are in stream order: virtio-net header, then the frame.
        let payload_start = split_hdr.map(|hl| (vnet + hl) as u64);
        let mut pos = 0u64;
        for p in &self.pieces {
            let len = u64::from(p.len);
            let payload =
                payload_start.map_or(0, |start| (pos + len).saturating_sub(start.max(pos)));
            match p.kind {
                RegionKind::Ram => {
                    ram += len;
                    payload_ram += payload;
                }
                RegionKind::Device => {
                    device += len;
                    payload_device += payload;
                }
            }
            pos += len;
        }
        let report = RxReport {
            buffers: u16::try_from(self.chains.len()).unwrap_or(u16::MAX),
            bytes: need,
            split: split_hdr.is_some(),
            split_hdr_len: split_hdr.unwrap_or(0),
            ram_bytes: ram,
            device_bytes: device,
            payload_ram_bytes: payload_ram,
            payload_device_bytes: payload_device,
        };
        let s = &mut self.stats;
        s.packets += 1;
        s.bytes += need as u64;
        s.buffers += self.chains.len() as u64;
        s.split_packets += u64::from(report.split);
        s.ram_bytes += ram;
        s.device_bytes += device;
        RxOutcome::Delivered(report)
    }

    /// Decides which parts of the chain just walked (`self.segs`) receive
    /// stream bytes, appends them to `self.pieces`, and returns how many
    /// bytes the chain takes (at most `remaining`).
    fn plan_chain(
        &mut self,
        layout: &RxLayout,
        vnet: usize,
        split_hdr: Option<usize>,
        remaining: u64,
    ) -> Result<u64, ChainError> {
        let first = self.chains.is_empty();
        let segs = &self.segs;
        let pieces = &mut self.pieces;
        let mut left = remaining;
        let mut take = |s: &Segment, cap: &mut u64| {
            let n = u64::from(s.len).min(left).min(*cap);
            if n > 0 {
                pieces.push(Piece {
                    addr: s.addr,
                    // n <= s.len, a u32.
                    len: u32::try_from(n).unwrap_or(s.len),
                    kind: s.kind,
                });
                left -= n;
                *cap -= n;
            }
        };
        match layout.split {
            None => {
                let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                if first && total < vnet as u64 {
                    return Err(ChainError::HeaderBufferTooSmall {
                        len: total,
                        min: vnet as u64,
                    });
                }
                let mut cap = u64::MAX;
                for s in segs {
                    take(s, &mut cap);
                }
            }
            Some(sp) => {
                let hdr_buf_len = sp.hdr_buf_len as u64;
                let hdr_desc_len = chain::split_header_len(segs, hdr_buf_len)?;
                // Only the first chain of a packet gets anything in its
                // header buffer: the virtio-net header plus the protocol
                // headers when split, else the start of the stream, up to
                // split_header_buf_len bytes.
                let mut hdr_cap = match (first, split_hdr) {
                    (false, _) => 0,
                    (true, Some(hl)) => (vnet + hl) as u64,
                    (true, None) => hdr_desc_len.min(hdr_buf_len),
                };
                let mut cap = u64::MAX;
                for s in segs {
                    if s.desc == 0 {
                        take(s, &mut hdr_cap);
                    } else {
                        take(s, &mut cap);
                    }
                }
            }
        }
        Ok(remaining - left)
    }

    /// Writes `data` at offset `off` of the packet stream, as laid out by
    /// `self.pieces`.
    fn write_stream<M: GuestMemory>(
        &self,
        mem: &M,
        off: usize,
        data: &[u8],
    ) -> Result<(), ChainError> {
        let end = off.saturating_add(data.len());
        let mut pos = 0usize;
        for p in &self.pieces {
            let p_end = pos + p.len as usize;
            let (s, e) = (pos.max(off), p_end.min(end));
            if s < e {
                let src = data.get(s - off..e - off).ok_or(ChainError::Memory {
                    addr: p.addr.raw_value(),
                    len: e - s,
                })?;
                let dst = p
                    .addr
                    .checked_add((s - pos) as u64)
                    .ok_or(ChainError::Memory {
                        addr: p.addr.raw_value(),
                        len: e - s,
                    })?;
                mem.write_slice(src, dst).map_err(|_| ChainError::Memory {
                    addr: dst.raw_value(),
                    len: e - s,
                })?;
            }
            if p_end >= end {
                break;
            }
            pos = p_end;
        }
        Ok(())
    }

    /// Drops the packet: every chain taken so far goes back to the used ring
    /// with length 0, and the avail ring keeps moving.
    fn return_chains<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        error: ChainError,
    ) -> RxOutcome {
        log::debug!("rx: dropping packet, bad receive chain: {error}");
        let size = queue.size();
        self.used.clear();
        self.used.extend(
            self.chains
                .iter()
                .filter(|c| c.head < size)
                .map(|c| (c.head, 0)),
        );
        self.stats.bad_chain_drops += 1;
        if let Err(e) = publish_used(queue, mem, &self.used) {
            self.stats.used_ring_errors += 1;
            return RxOutcome::Dropped(RxDrop::UsedRing(e));
        }
        self.stats.chains_returned_empty += self.used.len() as u64;
        RxOutcome::Dropped(RxDrop::BadChain {
            error,
            // At most queue-size chains are taken per packet.
            returned: u16::try_from(self.used.len()).unwrap_or(u16::MAX),
        })
    }
}

/// Length of the L2..L4 headers when the packet is to be split, else None.
fn split_headers_len(layout: &RxLayout, pkt: &RxPacket, vnet: usize) -> Option<usize> {
    let sp = layout.split.as_ref()?;
    let p = pkt.parsed;
    // parse() only reports TCP for unfragmented IPv4/IPv6 packets whose
    // whole TCP header is in the frame.
    if !p.is_tcp() || p.is_fragment || p.ip.is_none() {
        return None;
    }
    let hl = p.headers_len;
    let payload = pkt.frame.len().checked_sub(hl)?;
    if payload as u64 <= u64::from(sp.threshold) {
        return None;
    }
    if vnet.checked_add(hl)? > sp.hdr_buf_len {
        return None;
    }
    u16::try_from(hl).ok()?;
    Some(hl)
}

/// Adds `used` (head, len) entries to the used ring so that the driver sees
/// them all at once.
///
/// `Queue::add_used` publishes the used index after every entry. For a
/// merged packet that would let the driver see the first buffer, read
/// num_buffers and find the rest missing (Linux drops the packet as a
/// length error). So all but the last entry are written straight into the
/// ring, and `add_used` for the last one publishes the index once. Calling
/// `add_used` again for the last entry, with next_used rewound, rewrites
/// identical bytes and stores the same index (invisible to the driver) but
/// keeps the queue's count of added entries, which drives EVENT_IDX
/// notification decisions, exact.
fn publish_used<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    used: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    if size == 0 {
        return Err(virtio_queue::Error::InvalidSize);
    }
    let base = Wrapping(queue.next_used());
    let ring = GuestAddress(queue.used_ring());
    let mut pos = base;
    for &(head, len) in rest {
        let slot = u64::from(pos.0 % size);
        let addr = ring
            .checked_add(USED_RING_OFFSET + slot * USED_ELEM_LEN)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; USED_ELEM_LEN as usize];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, addr)
            .map_err(virtio_queue::Error::GuestMemory)?;
        pos += Wrapping(1);
    }
    for _ in 0..used.len() {
        queue.set_next_used(pos.0);
        queue.add_used(mem, last_head, last_len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{parse, tests::tcp4_frame, IPPROTO_UDP};
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const QSIZE: u16 = 64;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    /// Guest RAM at 0 (rings, header buffers, indirect tables).
    const RAM_LEN: usize = 0x40_0000;
    /// Device memory (think GPU BAR above 4 GiB) for payload buffers.
    const DEV: u64 = 0x1_0000_0000;
    const DEV_LEN: usize = 0x40_0000;
    const HB: u64 = 0x10_0000;
    const TABLES: u64 = 0x30_0000;
    const HDR_BUF: usize = 256;

    fn hb(i: u64) -> u64 {
        HB + i * 0x1000
    }

    fn pb(i: u64) -> u64 {
        DEV + i * 0x1000
    }

    fn memory() -> (GuestMemoryMmap, RegionClassifier) {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), RAM_LEN),
            (GuestAddress(DEV), DEV_LEN),
        ])
        .unwrap();
        let regions = RegionClassifier::with_device_ranges(&mem, &[(GuestAddress(DEV), 1)]);
        (mem, regions)
    }

    /// The driver side: posts chains, reads the used ring.
    struct Driver<'a> {
        mem: &'a GuestMemoryMmap,
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        next_desc: u16,
        avail: u16,
    }

    impl<'a> Driver<'a> {
        fn new(mem: &'a GuestMemoryMmap) -> Self {
            Driver {
                mem,
                vq: MockSplitQueue::new(mem, QSIZE),
                next_desc: 0,
                avail: 0,
            }
        }

        fn queue(&self) -> Queue {
            self.vq.create_queue().unwrap()
        }

        fn alloc(&mut self) -> u16 {
            let i = self.next_desc;
            self.next_desc = (i + 1) % QSIZE;
            i
        }

        fn store(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.vq.desc_table().store(i, d).unwrap();
        }

        fn push(&mut self, head: u16) {
            let slot = usize::from(self.avail % QSIZE);
            self.vq.avail().ring().ref_at(slot).unwrap().store(head);
            self.avail = self.avail.wrapping_add(1);
            self.vq.avail().idx().store(self.avail);
        }

        /// Posts a chain of (addr, len, flags); NEXT links are added.
        fn post(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
            let idx: Vec<u16> = descs.iter().map(|_| self.alloc()).collect();
            for (k, &(a, l, f)) in descs.iter().enumerate() {
                match idx.get(k + 1) {
                    Some(&n) => self.store(idx[k], a, l, f | NEXT, n),
                    None => self.store(idx[k], a, l, f, 0),
                }
            }
            self.push(idx[0]);
            idx[0]
        }

        /// Posts a split-layout chain: header buffer `i` plus payload `i`.
        fn post_split(&mut self, i: u64, payload: u32) -> u16 {
            self.post(&[(hb(i), HDR_BUF as u32, W), (pb(i), payload, W)])
        }

        fn used_idx(&self) -> u16 {
            self.vq.used().idx().load()
        }

        /// (id, len) of used entry `i`.
        fn used(&self, i: u16) -> (u32, u32) {
            let e = self
                .vq
                .used()
                .ring()
                .ref_at(usize::from(i % QSIZE))
                .unwrap()
                .load();
            (e.id(), e.len())
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }

        fn fill(&self, addr: u64, len: usize, byte: u8) {
            self.mem
                .write_slice(&vec![byte; len], GuestAddress(addr))
                .unwrap();
        }

        fn hdr(&self, addr: u64) -> VirtioNetHdr {
            VirtioNetHdr::from_bytes(&self.read(addr, 12)).unwrap()
        }
    }

    /// Ethernet/IPv4/TCP frame with a recognisable payload.
    fn tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = tcp4_frame([10, 0, 0, 1], [10, 0, 0, 2], 40000, 80, payload);
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        f
    }

    fn udp_frame(payload: usize) -> Vec<u8> {
        // Reuse the TCP builder: the 20 "TCP" bytes become UDP header + data.
        let mut f = tcp_frame(payload + 12);
        f[14 + 9] = IPPROTO_UDP;
        f
    }

    const PLAIN: RxLayout = RxLayout {
        mrg_rxbuf: false,
        vnet_hdr_len: 12,
        split: None,
    };
    const MRG: RxLayout = RxLayout {
        mrg_rxbuf: true,
        ..PLAIN
    };
    const SPLIT: RxLayout = RxLayout {
        split: Some(SplitParams {
            hdr_buf_len: HDR_BUF,
            threshold: 128,
        }),
        ..PLAIN
    };
    const SPLIT_MRG: RxLayout = RxLayout {
        mrg_rxbuf: true,
        ..SPLIT
    };

    struct Rx<'a> {
        w: RxWriter,
        q: Queue,
        mem: &'a GuestMemoryMmap,
        regions: &'a RegionClassifier,
    }

    impl Rx<'_> {
        fn send(&mut self, layout: &RxLayout, frame: &[u8], hdr: VirtioNetHdr) -> RxOutcome {
            let parsed = parse(frame);
            let pkt = RxPacket {
                frame,
                hdr,
                parsed: &parsed,
            };
            self.w
                .write_packet::<_, true>(&mut self.q, self.mem, self.regions, layout, &pkt)
        }

        fn deliver(&mut self, layout: &RxLayout, frame: &[u8]) -> RxReport {
            match self.send(layout, frame, VirtioNetHdr::default()) {
                RxOutcome::Delivered(r) => r,
                other => panic!("not delivered: {other:?}"),
            }
        }
    }

    fn rx<'a>(d: &Driver<'a>, regions: &'a RegionClassifier) -> Rx<'a> {
        Rx {
            w: RxWriter::new(),
            q: d.queue(),
            mem: d.mem,
            regions,
        }
    }

    #[test]
    fn plain_packet_in_one_chain() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        let head = d.post(&[(hb(0), 12, W), (pb(0), 2048, W)]);
        let mut rx = rx(&d, &regions);
        let f = tcp_frame(100);
        let r = rx.deliver(&PLAIN, &f);
        assert_eq!(r.buffers, 1);
        assert_eq!(
            (r.bytes, r.split, r.ram_bytes, r.device_bytes),
            (166, false, 12, 154)
        );
        let h = d.hdr(hb(0));
        assert_eq!((h.num_buffers, h.flags), (1, 0));
        assert_eq!(d.read(pb(0), f.len()), f);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0), (u32::from(head), 166));
    }

    #[test]
    fn mergeable_across_three_chains_published_at_once() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        let heads: Vec<u16> = (0..4).map(|i| d.post(&[(hb(i), 1200, W)])).collect();
        let mut rx = rx(&d, &regions);
        rx.q.set_event_idx(true);
        // used_event = 0: the driver wants an interrupt once entry 0 is used.
        let used_event = d.vq.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
        mem.write_obj(0u16, used_event).unwrap();

        let f = tcp_frame(3000 - 54);
        let r = rx.deliver(&MRG, &f);
        assert_eq!((r.buffers, r.bytes), (3, 3012));
        assert_eq!(d.hdr(hb(0)).num_buffers, 3);
        let mut got = d.read(hb(0) + 12, 1188);
        got.extend(d.read(hb(1), 1200));
        got.extend(d.read(hb(2), 612));
        assert_eq!(got, f);
        assert_eq!(d.used_idx(), 3);
        let used: Vec<_> = (0..3).map(|i| d.used(i)).collect();
        let want: Vec<_> = heads[..3]
            .iter()
            .zip([1200, 1200, 612])
            .map(|(&h, l)| (u32::from(h), l))
            .collect();
        assert_eq!(used, want);
        assert_eq!(rx.q.next_avail(), 3);
        assert_eq!(rx.q.next_used(), 3);
        // All three entries count for EVENT_IDX, so the interrupt is due.
        assert!(rx.q.needs_notification(&mem).unwrap());
    }

    #[test]
    fn split_packet_headers_in_ram_payload_in_device_memory() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        d.fill(hb(0), HDR_BUF, 0xaa);
        let head = d.post_split(0, 4096);
        // Second chain: the payload spans two payload descriptors.
        d.fill(hb(1), HDR_BUF, 0xaa);
        let head2 = d.post(&[(hb(1), 300, W), (hb(2), 512, W), (pb(1), 4096, W)]);
        let mut rx = rx(&d, &regions);

        let f = tcp_frame(1000);
        let r = rx.deliver(&SPLIT, &f);
        assert_eq!((r.split, r.split_hdr_len, r.buffers), (true, 54, 1));
        assert_eq!((r.ram_bytes, r.device_bytes), (66, 1000));
        assert_eq!((r.payload_ram_bytes, r.payload_device_bytes), (0, 1000));
        let h = d.hdr(hb(0));
        assert_eq!(h.flags, VIRTIO_NET_HDR_F_SPLIT);
        assert_eq!((h.hdr_len, h.num_buffers), (54, 1));
        assert_eq!(d.read(hb(0) + 12, 54), f[..54]);
        assert!(d.read(hb(0) + 66, HDR_BUF - 66).iter().all(|&b| b == 0xaa));
        assert_eq!(d.read(pb(0), 1000), f[54..]);
        assert_eq!(d.used(0), (u32::from(head), 12 + 54 + 1000));

        let r = rx.deliver(&SPLIT, &f);
        assert_eq!((r.ram_bytes, r.device_bytes), (66 + 512, 488));
        assert_eq!((r.payload_ram_bytes, r.payload_device_bytes), (512, 488));
        assert_eq!(d.read(hb(1) + 12, 54), f[..54]);
        assert_eq!(d.read(hb(2), 512), f[54..54 + 512]);
        assert_eq!(d.read(pb(1), 488), f[54 + 512..]);
        assert_eq!(d.used(1), (u32::from(head2), 1066));
    }

    #[test]
    fn split_mergeable_64k_gso_packet() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        let heads: Vec<u16> = (0..20)
            .map(|i| {
                d.fill(hb(i), HDR_BUF, 0xaa);
                d.post_split(i, 4096)
            })
            .collect();
        let mut rx = rx(&d, &regions);
        let f = tcp_frame(65000);
        let gso = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        let RxOutcome::Delivered(r) = rx.send(&SPLIT_MRG, &f, gso) else {
            panic!("not delivered");
        };
        // 65000 = 15 * 4096 + 3560
        assert_eq!((r.buffers, r.split, r.split_hdr_len), (16, true, 54));
        assert_eq!((r.ram_bytes, r.device_bytes), (66, 65000));
        let h = d.hdr(hb(0));
        assert_eq!(
            h,
            VirtioNetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 | VIRTIO_NET_HDR_F_SPLIT,
                num_buffers: 16,
                ..gso
            }
        );
        assert_eq!(d.read(hb(0) + 12, 54), f[..54]);
        let mut payload = vec![];
        for i in 0..16u16 {
            let (id, len) = d.used(i);
            assert_eq!(id, u32::from(heads[usize::from(i)]));
            let want = match i {
                0 => 66 + 4096,
                15 => 3560,
                _ => 4096,
            };
            assert_eq!(len, want);
            payload.extend(d.read(pb(u64::from(i)), if i == 15 { 3560 } else { 4096 }));
            if i > 0 {
                // Continuation chains: header buffer untouched.
                assert!(d.read(hb(u64::from(i)), HDR_BUF).iter().all(|&b| b == 0xaa));
            }
        }
        assert_eq!(payload, f[54..]);
        assert_eq!((d.used_idx(), rx.q.next_avail()), (16, 16));
        assert_eq!(rx.w.stats().split_packets, 1);
    }

    #[test]
    fn small_tcp_udp_and_oversized_headers_are_not_split() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        for i in 0..3 {
            d.fill(pb(i), 64, 0xaa);
            d.post_split(i, 4096);
        }
        let mut rx = rx(&d, &regions);

        // TCP payload at the threshold: contiguous from the header buffer.
        let f = tcp_frame(128);
        let r = rx.deliver(&SPLIT, &f);
        assert!(!r.split);
        assert_eq!(d.hdr(hb(0)).flags & VIRTIO_NET_HDR_F_SPLIT, 0);
        assert_eq!(d.read(hb(0) + 12, f.len()), f);
        assert!(d.read(pb(0), 64).iter().all(|&b| b == 0xaa));
        assert_eq!(d.used(0).1, 12 + 182);

        // UDP: header buffer filled up to split_header_buf_len, the rest
        // continues at offset 0 of the payload buffer.
        let f = udp_frame(1000);
        let r = rx.deliver(&SPLIT, &f);
        assert!(!r.split);
        // Not split: no payload is counted, wherever the bytes went.
        assert_eq!((r.payload_ram_bytes, r.payload_device_bytes), (0, 0));
        assert_eq!(d.read(hb(1) + 12, HDR_BUF - 12), f[..HDR_BUF - 12]);
        assert_eq!(d.read(pb(1), f.len() + 12 - HDR_BUF), f[HDR_BUF - 12..]);
        assert_eq!(d.used(1).1 as usize, 12 + f.len());

        // Headers that do not fit the (smaller) header buffer.
        let small = RxLayout {
            split: Some(SplitParams {
                hdr_buf_len: 64,
                threshold: 0,
            }),
            ..PLAIN
        };
        let f = tcp_frame(1000);
        let r = rx.deliver(&small, &f);
        assert!(!r.split);
        assert_eq!(d.read(hb(2) + 12, 52), f[..52]);
        assert_eq!(d.read(pb(2), f.len() - 52), f[52..]);
    }

    #[test]
    fn no_buffers_rolls_back_and_retry_succeeds() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        let first = d.post(&[(hb(0), 1000, W)]);
        let mut rx = rx(&d, &regions);
        let f = tcp_frame(3000);
        assert!(matches!(
            rx.send(&MRG, &f, VirtioNetHdr::default()),
            RxOutcome::NoBuffers
        ));
        assert_eq!((rx.q.next_avail(), d.used_idx()), (0, 0));
        assert_eq!(rx.w.stats().no_buffers, 1);

        d.post(&[(hb(1), 1000, W)]);
        d.post(&[(hb(2), 2000, W)]);
        let r = rx.deliver(&MRG, &f);
        assert_eq!(r.buffers, 3);
        assert_eq!(d.used(0), (u32::from(first), 1000));
        assert_eq!(d.used(2).1, 3012 + 54 - 2000);
    }

    #[test]
    fn too_big_without_mrg_leaves_chain_available() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        let head = d.post(&[(hb(0), 1000, W)]);
        let mut rx = rx(&d, &regions);
        let big = tcp_frame(3000);
        let out = rx.send(&PLAIN, &big, VirtioNetHdr::default());
        assert!(matches!(
            out,
            RxOutcome::Dropped(RxDrop::TooBig {
                len: 3066,
                capacity: 1000
            })
        ));
        assert!(!out.used_added());
        assert_eq!((rx.q.next_avail(), d.used_idx()), (0, 0));
        let r = rx.deliver(&PLAIN, &tcp_frame(100));
        assert_eq!(r.buffers, 1);
        assert_eq!(d.used(0), (u32::from(head), 166));
    }

    /// Ways to post a broken chain; each returns the expected error.
    type Breaker = fn(&mut Driver) -> ChainError;

    fn indirect_table(d: &mut Driver, entries: &[(u64, u32, u16, u16)], len: u32) {
        for (k, &(a, l, f, n)) in entries.iter().enumerate() {
            let desc = RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
            d.mem
                .write_obj(desc, GuestAddress(TABLES + 16 * k as u64))
                .unwrap();
        }
        let h = d.alloc();
        d.store(h, TABLES, len, INDIRECT, 0);
        d.push(h);
    }

    fn breakers() -> Vec<(&'static str, RxLayout, Breaker)> {
        vec![
            ("out of range", PLAIN, |d| {
                d.post(&[(hb(0), 12, W), (0x5000_0000, 4096, W)]);
                ChainError::OutOfRange {
                    index: 1,
                    addr: 0x5000_0000,
                    len: 4096,
                }
            }),
            ("crosses end of device memory", PLAIN, |d| {
                d.post(&[(DEV + DEV_LEN as u64 - 16, 4096, W)]);
                ChainError::OutOfRange {
                    index: 0,
                    addr: DEV + DEV_LEN as u64 - 16,
                    len: 4096,
                }
            }),
            ("zero length", PLAIN, |d| {
                d.post(&[(hb(0), 12, W), (pb(0), 0, W)]);
                ChainError::ZeroLength { index: 1 }
            }),
            ("read-only", PLAIN, |d| {
                d.post(&[(hb(0), 2048, 0)]);
                ChainError::WrongDirection {
                    index: 0,
                    writable: false,
                }
            }),
            ("readable after writable", PLAIN, |d| {
                d.post(&[(hb(0), 12, W), (pb(0), 2048, 0)]);
                ChainError::ReadableAfterWritable { index: 1 }
            }),
            ("shorter than the virtio-net header", PLAIN, |d| {
                d.post(&[(hb(0), 8, W)]);
                ChainError::HeaderBufferTooSmall { len: 8, min: 12 }
            }),
            ("small header buffer", SPLIT, |d| {
                d.post(&[(hb(0), 128, W), (pb(0), 4096, W)]);
                ChainError::HeaderBufferTooSmall { len: 128, min: 256 }
            }),
            ("no payload descriptor", SPLIT, |d| {
                d.post(&[(hb(0), 4096, W)]);
                ChainError::NoPayloadBuffer
            }),
            ("descriptor loop", PLAIN, |d| {
                let (a, b) = (d.alloc(), d.alloc());
                d.store(a, hb(0), 8, W | NEXT, b);
                d.store(b, hb(1), 8, W | NEXT, a);
                d.push(a);
                ChainError::TooLong { max: QSIZE }
            }),
            ("next index beyond the table", PLAIN, |d| {
                let a = d.alloc();
                d.store(a, hb(0), 2048, W | NEXT, QSIZE + 3);
                d.push(a);
                ChainError::Unterminated { descs: 1 }
            }),
            ("head index beyond the table", PLAIN, |d| {
                d.push(QSIZE + 7);
                ChainError::NoDescriptors
            }),
            ("indirect table of odd length", PLAIN, |d| {
                indirect_table(d, &[(hb(0), 2048, W, 0)], 20);
                ChainError::NoDescriptors
            }),
            ("indirect table outside memory", PLAIN, |d| {
                let h = d.alloc();
                d.store(h, 0x5000_0000, 32, INDIRECT, 0);
                d.push(h);
                ChainError::NoDescriptors
            }),
            ("nested indirect table", PLAIN, |d| {
                indirect_table(
                    d,
                    &[(hb(0), 12, W | NEXT, 1), (TABLES, 16, INDIRECT, 0)],
                    32,
                );
                ChainError::Unterminated { descs: 1 }
            }),
            ("loop inside an indirect table", PLAIN, |d| {
                indirect_table(d, &[(hb(0), 12, W | NEXT, 1), (pb(0), 12, W | NEXT, 0)], 32);
                ChainError::Unterminated { descs: 2 }
            }),
            ("readable descriptor in an indirect table", PLAIN, |d| {
                indirect_table(d, &[(hb(0), 12, W | NEXT, 1), (pb(0), 2048, 0, 0)], 32);
                ChainError::ReadableAfterWritable { index: 1 }
            }),
        ]
    }

    #[test]
    fn malformed_chains_are_returned_empty_and_the_queue_keeps_working() {
        let (mem, regions) = memory();
        let f = tcp_frame(1000);
        for (name, layout, brk) in breakers() {
            let mut d = Driver::new(&mem);
            let mut rx = rx(&d, &regions);
            let want = brk(&mut d);
            let bad_head_in_range = d.vq.avail().ring().ref_at(0).unwrap().load() < QSIZE;
            let good = d.post_split(9, 4096);

            let out = rx.send(&layout, &f, VirtioNetHdr::default());
            let returned = u16::from(bad_head_in_range);
            match &out {
                RxOutcome::Dropped(RxDrop::BadChain { error, returned: n }) => {
                    assert_eq!((error, *n), (&want, returned), "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
            assert_eq!(out.used_added(), bad_head_in_range, "{name}");
            assert_eq!(d.used_idx(), returned, "{name}");
            if bad_head_in_range {
                assert_eq!(d.used(0).1, 0, "{name}");
            }
            assert_eq!(rx.w.stats().bad_chain_drops, 1, "{name}");

            let r = rx.deliver(&layout, &f);
            assert_eq!(r.bytes, 12 + f.len(), "{name}");
            assert_eq!(
                d.used(returned),
                (u32::from(good), 12 + f.len() as u32),
                "{name}"
            );
        }
    }

    #[test]
    fn bad_continuation_chain_returns_every_chain_of_the_packet() {
        let (mem, regions) = memory();
        let mut d = Driver::new(&mem);
        let a = d.post(&[(hb(0), 1000, W)]);
        let b = d.post(&[(hb(1), 1000, 0)]);
        let c = d.post(&[(hb(2), 4096, W)]);
        let mut rx = rx(&d, &regions);
        let f = tcp_frame(3000);
        let out = rx.send(&MRG, &f, VirtioNetHdr::default());
        assert!(matches!(
            out,
            RxOutcome::Dropped(RxDrop::BadChain { returned: 2, .. })
        ));
        assert_eq!(d.used_idx(), 2);
        assert_eq!(
            (d.used(0), d.used(1)),
            ((u32::from(a), 0), (u32::from(b), 0))
        );
        assert_eq!(rx.w.stats().chains_returned_empty, 2);
        let r = rx.deliver(&MRG, &f);
        assert_eq!(r.buffers, 1);
        assert_eq!(d.used(2), (u32::from(c), 3066));
    }
}
