//! Read-only views of a virtqueue for the control socket: addresses,
//! indices, event-idx values and the chains the driver posted, with every
//! descriptor and the memory region it lands in.
//!
//! Everything is read from guest memory with checked accesses and bounded
//! walks, so a corrupt ring shows up as an error string in the answer, never
//! as a panic or an endless loop.

use std::num::Wrapping;

use serde::Serialize;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::memory::{RegionClassifier, RegionKind};

/// At most this many chains are listed per queue; a full 1024-entry ring
/// of long chains would make an answer of megabytes.
pub const MAX_LISTED_CHAINS: usize = 256;
const DESC_SIZE: u64 = 16;

/// State of one virtqueue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    /// Global virtqueue index (rx0 = 0, tx0 = 1, ..., control, admin).
    pub index: usize,
    /// rx0, tx0, ..., ctrl, admin.
    pub name: String,
    /// Enabled by the frontend (VHOST_USER_SET_VRING_ENABLE).
    pub enabled: bool,
    /// Addresses set and the queue marked ready.
    pub ready: bool,
    pub size: u16,
    pub max_size: u16,
    pub desc_table: String,
    pub avail_ring: String,
    pub used_ring: String,
    pub event_idx: bool,
    /// The driver's avail index, as it is in memory now.
    pub avail_idx: Option<u16>,
    /// The next avail entry the device will take (the last seen avail).
    pub next_avail: u16,
    /// The used index the device publishes next.
    pub next_used: u16,
    /// The used index in memory.
    pub used_idx: Option<u16>,
    pub avail_flags: Option<u16>,
    pub used_flags: Option<u16>,
    /// With EVENT_IDX: the driver wants an interrupt once the used index
    /// passes this.
    pub used_event: Option<u16>,
    /// With EVENT_IDX: the device wants a kick once the avail index passes
    /// this.
    pub avail_event: Option<u16>,
    /// Chains posted and not yet taken by the device (avail_idx - next_avail).
    pub posted: Option<u16>,
    /// Chains the device took and has not returned (held by a fault).
    pub held: Vec<u16>,
    /// RX: frames waiting in the device for receive buffers.
    pub backlog: Option<usize>,
    /// With `ring`: the posted chains, then the held ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chains: Option<Vec<ChainView>>,
    /// More chains than listed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub chains_truncated: bool,
}

/// One descriptor chain.
#[derive(Debug, Clone, Serialize)]
pub struct ChainView {
    /// "posted" (on the avail ring) or "held" (taken by the device).
    pub state: &'static str,
    /// Position on the avail ring (free-running index), when posted.
    pub avail_pos: Option<u16>,
    pub head: u16,
    pub descs: Vec<DescView>,
    /// Why the walk stopped early, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One descriptor.
#[derive(Debug, Clone, Serialize)]
pub struct DescView {
    /// Index in its table (the indirect table for `indirect` ones).
    pub index: u16,
    /// Read through an indirect table.
    pub indirect: bool,
    pub addr: String,
    pub len: u32,
    pub flags: u16,
    /// `W` writable, `N` next, `I` indirect.
    pub flag_names: String,
    pub next: u16,
    /// Memory table region holding all of the buffer, or None: the buffer
    /// lands in no region (or straddles two), which the device refuses.
    pub region: Option<usize>,
    /// "ram", "device" or "none".
    pub memory: &'static str,
}

/// What the caller knows beyond the queue itself.
pub struct QueueMeta {
    pub index: usize,
    pub name: String,
    pub enabled: bool,
    pub held: Vec<u16>,
    pub backlog: Option<usize>,
}

fn hex(a: u64) -> String {
    format!("{a:#x}")
}

fn read_u16<M: GuestMemory>(mem: &M, addr: u64, off: u64) -> Option<u16> {
    let a = GuestAddress(addr.checked_add(off)?);
    mem.read_obj::<u16>(a).ok().map(u16::from_le)
}

/// Builds the view of `queue`; with `chains`, lists the chains too.
pub fn view<M: GuestMemory>(
    queue: &Queue,
    mem: Option<&M>,
    regions: &RegionClassifier,
    meta: QueueMeta,
    chains: bool,
) -> QueueView {
    let size = queue.size();
    let (avail, used) = (queue.avail_ring(), queue.used_ring());
    let ring_ok = queue.ready() && size > 0;
    let rd = |addr: u64, off: u64| -> Option<u16> {
        if !ring_ok {
            return None;
        }
        read_u16(mem?, addr, off)
    };
    let qs = u64::from(size);
    let avail_idx = rd(avail, 2);
    let event_idx = queue.event_idx_enabled();
    let mut v = QueueView {
        index: meta.index,
        name: meta.name,
        enabled: meta.enabled,
        ready: queue.ready(),
        size,
        max_size: queue.max_size(),
        desc_table: hex(queue.desc_table()),
        avail_ring: hex(avail),
        used_ring: hex(used),
        event_idx,
        avail_idx,
        next_avail: queue.next_avail(),
        next_used: queue.next_used(),
        used_idx: rd(used, 2),
        avail_flags: rd(avail, 0),
        used_flags: rd(used, 0),
        used_event: if event_idx {
            rd(avail, 4 + 2 * qs)
        } else {
            None
        },
        avail_event: if event_idx {
            rd(used, 4 + 8 * qs)
        } else {
            None
        },
        posted: avail_idx.map(|a| (Wrapping(a) - Wrapping(queue.next_avail())).0),
        held: meta.held,
        backlog: meta.backlog,
        chains: None,
        chains_truncated: false,
    };
    if !chains {
        return v;
    }
    let mut list = Vec::new();
    if let (Some(mem), Some(posted), true) = (mem, v.posted, ring_ok) {
        // An index more than a ring ahead is a driver bug; list one ring.
        let n = posted.min(size);
        for i in 0..n {
            if list.len() >= MAX_LISTED_CHAINS {
                v.chains_truncated = true;
                break;
            }
            let pos = (Wrapping(queue.next_avail()) + Wrapping(i)).0;
            let slot = u64::from(pos % size);
            let Some(head) = read_u16(mem, avail, 4 + 2 * slot) else {
                break;
            };
            let mut c = walk(mem, queue.desc_table(), size, head, regions);
            c.avail_pos = Some(pos);
            list.push(c);
        }
        for &head in &v.held {
            if list.len() >= MAX_LISTED_CHAINS {
                v.chains_truncated = true;
                break;
            }
            let mut c = walk(mem, queue.desc_table(), size, head, regions);
            c.state = "held";
            list.push(c);
        }
    }
    v.chains = Some(list);
    v
}

fn flag_names(flags: u16) -> String {
    let mut s = String::new();
    for (bit, c) in [
        (VRING_DESC_F_WRITE, 'W'),
        (VRING_DESC_F_NEXT, 'N'),
        (VRING_DESC_F_INDIRECT, 'I'),
    ] {
        if u32::from(flags) & bit != 0 {
            s.push(c);
        }
    }
    s
}

/// A raw descriptor: (addr, len, flags, next).
fn read_desc<M: GuestMemory>(mem: &M, table: u64, i: u16) -> Option<(u64, u32, u16, u16)> {
    let a = table.checked_add(u64::from(i) * DESC_SIZE)?;
    let mut b = [0u8; DESC_SIZE as usize];
    mem.read_slice(&mut b, GuestAddress(a)).ok()?;
    let addr = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let len = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let flags = u16::from_le_bytes([b[12], b[13]]);
    let next = u16::from_le_bytes([b[14], b[15]]);
    Some((addr, len, flags, next))
}

fn desc_view(
    regions: &RegionClassifier,
    index: u16,
    indirect: bool,
    (addr, len, flags, next): (u64, u32, u16, u16),
) -> DescView {
    let r = regions.classify(GuestAddress(addr), u64::from(len));
    DescView {
        index,
        indirect,
        addr: hex(addr),
        len,
        flags,
        flag_names: flag_names(flags),
        next,
        region: r.map(|r| r.index),
        memory: match r.map(|r| r.kind) {
            Some(RegionKind::Ram) => "ram",
            Some(RegionKind::Device) => "device",
            None => "none",
        },
    }
}

/// Walks the chain at `head` of a descriptor table of `size` entries,
/// following one level of indirection, at most `size` descriptors per
/// table (a longer walk is a loop).
pub fn walk<M: GuestMemory>(
    mem: &M,
    table: u64,
    size: u16,
    head: u16,
    regions: &RegionClassifier,
) -> ChainView {
    let mut c = ChainView {
        state: "posted",
        avail_pos: None,
        head,
        descs: Vec::new(),
        error: None,
    };
    let mut i = head;
    let mut steps = 0u32;
    loop {
        if i >= size {
            c.error = Some(format!(
                "descriptor index {i} is beyond the queue size {size}"
            ));
            break;
        }
        if steps >= u32::from(size) {
            c.error = Some(format!("more than {size} descriptors: a loop"));
            break;
        }
        steps += 1;
        let Some(d) = read_desc(mem, table, i) else {
            c.error = Some(format!("descriptor {i} is not in guest memory"));
            break;
        };
        c.descs.push(desc_view(regions, i, false, d));
        let (addr, len, flags, next) = d;
        if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
            walk_indirect(mem, addr, len, regions, &mut c);
            break;
        }
        if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
            break;
        }
        i = next;
    }
    c
}

fn walk_indirect<M: GuestMemory>(
    mem: &M,
    table: u64,
    len: u32,
    regions: &RegionClassifier,
    c: &mut ChainView,
) {
    let n = u64::from(len) / DESC_SIZE;
    if n == 0 || u64::from(len) % DESC_SIZE != 0 || n > u64::from(u16::MAX) {
        c.error = Some(format!(
            "indirect table length {len} is not a multiple of 16"
        ));
        return;
    }
    let n = n as u16;
    let mut i = 0u16;
    for _ in 0..n {
        let Some(d) = read_desc(mem, table, i) else {
            c.error = Some(format!("indirect descriptor {i} is not in guest memory"));
            return;
        };
        c.descs.push(desc_view(regions, i, true, d));
        let (_, _, flags, next) = d;
        if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
            c.error = Some("nested indirect table".into());
            return;
        }
        if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
            return;
        }
        if next >= n {
            c.error = Some(format!("indirect next {next} is beyond the table ({n})"));
            return;
        }
        i = next;
    }
    c.error = Some(format!("more than {n} indirect descriptors: a loop"));
}

/// The head index at free-running avail position `pos`.
pub fn avail_head<M: GuestMemory>(mem: &M, avail_ring: u64, size: u16, pos: u16) -> Option<u16> {
    if size == 0 {
        return None;
    }
    read_u16(mem, avail_ring, 4 + 2 * u64::from(pos % size))
}

/// The `(id, len)` used entries from free-running index `from` up to `to`
/// (exclusive), read back from the used ring.
pub fn used_entries<M: GuestMemory>(
    mem: &M,
    used_ring: u64,
    size: u16,
    from: u16,
    to: u16,
) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    if size == 0 {
        return out;
    }
    let n = (Wrapping(to) - Wrapping(from)).0.min(size);
    for k in 0..n {
        let slot = u64::from((Wrapping(from) + Wrapping(k)).0 % size);
        let Some(a) = used_ring.checked_add(4 + 8 * slot) else {
            break;
        };
        let mut b = [0u8; 8];
        if mem.read_slice(&mut b, GuestAddress(a)).is_err() {
            break;
        }
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        out.push((id, len));
    }
    out
}

/// The text form of a queue view, one line per queue and, with chains,
/// one line per descriptor.
pub fn render(v: &QueueView, out: &mut String) {
    use std::fmt::Write;
    let opt = |x: Option<u16>| x.map_or_else(|| "-".to_string(), |v| v.to_string());
    let _ = writeln!(
        out,
        "vq {:>2} {:<6} {} {} size {}/{} avail_idx {} next_avail {} posted {} used_idx {} next_used {} event_idx {} used_event {} avail_event {} avail_flags {} used_flags {} held {}{}",
        v.index,
        v.name,
        if v.enabled { "enabled" } else { "disabled" },
        if v.ready { "ready" } else { "not-ready" },
        v.size,
        v.max_size,
        opt(v.avail_idx),
        v.next_avail,
        opt(v.posted),
        opt(v.used_idx),
        v.next_used,
        if v.event_idx { "on" } else { "off" },
        opt(v.used_event),
        opt(v.avail_event),
        opt(v.avail_flags),
        opt(v.used_flags),
        v.held.len(),
        v.backlog
            .map_or(String::new(), |b| format!(" backlog {b}")),
    );
    if let Some(chains) = &v.chains {
        let _ = writeln!(
            out,
            "   desc {} avail {} used {}",
            v.desc_table, v.avail_ring, v.used_ring
        );
        for c in chains {
            let _ = writeln!(
                out,
                "   chain head {} {}{}{}",
                c.head,
                c.state,
                c.avail_pos
                    .map_or(String::new(), |p| format!(" avail[{p}]")),
                c.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ERROR: {e}"))
            );
            for d in &c.descs {
                let _ = writeln!(
                    out,
                    "     {}desc {:>4} addr {:>18} len {:>6} flags {:<3} next {:>4} -> {}",
                    if d.indirect { "indirect " } else { "" },
                    d.index,
                    d.addr,
                    d.len,
                    d.flag_names,
                    d.next,
                    match d.region {
                        Some(r) => format!("region {r} ({})", d.memory),
                        None => "NO REGION".to_string(),
                    }
                );
            }
        }
        if v.chains_truncated {
            let _ = writeln!(out, "   ... more chains not listed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn meta() -> QueueMeta {
        QueueMeta {
            index: 0,
            name: "rx0".into(),
            enabled: true,
            held: vec![],
            backlog: None,
        }
    }

    #[test]
    fn posted_chains_with_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x1_0000_0000), 0x1_0000),
        ])
        .unwrap();
        let regions =
            RegionClassifier::with_device_ranges(&mem, &[(GuestAddress(0x1_0000_0000), 1)]);
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8000, 64, W | N, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x1_0000_0000, 4096, W, 0)),
            // Lands in no region.
            RawDescriptor::from(SplitDescriptor::new(0x5000_0000, 100, W, 0)),
        ];
        mock.build_multiple_desc_chains(&descs).unwrap();
        let q: Queue = mock.create_queue().unwrap();
        let v = view(&q, Some(&mem), &regions, meta(), true);
        assert_eq!(v.avail_idx, Some(2));
        assert_eq!(v.posted, Some(2));
        let chains = v.chains.as_ref().unwrap();
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].descs.len(), 2);
        assert_eq!(chains[0].descs[0].memory, "ram");
        assert_eq!(chains[0].descs[1].memory, "device");
        assert_eq!(chains[0].descs[1].region, Some(1));
        assert_eq!(chains[1].descs[0].memory, "none");
        let mut s = String::new();
        render(&v, &mut s);
        assert!(s.contains("NO REGION"), "{s}");
        assert!(s.contains("region 1 (device)"), "{s}");
    }

    #[test]
    fn loops_and_bad_indices_end_the_walk() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let regions = RegionClassifier::new(&mem);
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 4);
        // 0 -> 1 -> 0 ...
        let table = mock.desc_table_addr().0;
        for (i, next) in [(0u64, 1u16), (1, 0)] {
            let d = RawDescriptor::from(SplitDescriptor::new(0x8000, 8, W | N, next));
            mem.write_obj(d, GuestAddress(table + 16 * i)).unwrap();
        }
        let c = walk(&mem, table, 4, 0, &regions);
        assert!(c.error.unwrap().contains("loop"));
        assert_eq!(c.descs.len(), 4);
        let c = walk(&mem, table, 4, 9, &regions);
        assert!(c.error.unwrap().contains("beyond"));
        // A table outside memory.
        let c = walk(&mem, u64::MAX - 8, 4, 0, &regions);
        assert!(c.error.unwrap().contains("not in guest memory"));
    }

    #[test]
    fn unready_queue_reads_nothing() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let q = Queue::new(256).unwrap();
        let v = view(&q, Some(&mem), &RegionClassifier::new(&mem), meta(), true);
        assert_eq!(v.avail_idx, None);
        assert!(v.chains.unwrap().is_empty());
    }
}
