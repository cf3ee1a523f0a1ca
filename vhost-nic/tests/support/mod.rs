//! A virtio-net driver model for driving `NetDevice` without vhost-user:
//! guest memory, split virtqueues built with virtio-queue's mock module,
//! frame builders, and control / admin command encoders.
//!
//! Shared by the integration tests and the datapath benchmark; not every
//! user needs every item.
#![allow(dead_code)]

pub mod fuzz;

use std::collections::HashMap;
use std::sync::Arc;

use vhost_nic::admin::*;
use vhost_nic::config::{DeviceOptions, MacAddr, PortSpec};
use vhost_nic::device::NetDevice;
use vhost_nic::flow_filter::*;
use vhost_nic::hdr::{VirtioNetHdr, HDR_HASH_LEN, HDR_LEN};
use vhost_nic::offload::{internet_checksum, pseudo_header_sum_v4, set_ipv4_header_checksum};
use vhost_nic::packet::{ETHERTYPE_IPV4, ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP};
use vhost_nic::port::wire::Wire;
use vhost_nic::request::ChainBuf;
use vhost_nic::rx::RxWriter;
use vhost_nic::spec::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

pub const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
pub const MAC_OTHER: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0c];
pub const BROADCAST: [u8; 6] = [0xff; 6];

pub const PAIRS: u16 = 4;
pub const QSIZE: u16 = 256;
/// Guest RAM at GPA 0: rings first, then a heap for buffers.
pub const RAM_LEN: usize = 16 << 20;
const RING_STRIDE: u64 = 0x4000;
const HEAP_START: u64 = 0x10_0000;
/// Device memory (think GPU BAR above 4 GiB), backed by its own file.
pub const DEV_MEM: u64 = 0x1_0000_0000;
pub const DEV_MEM_LEN: usize = 4 << 20;

pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const W: u16 = VRING_DESC_F_WRITE as u16;
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

pub const fn features(bits: &[u32]) -> u64 {
    let mut f = 0u64;
    let mut i = 0;
    while i < bits.len() {
        f |= bit(bits[i]);
        i += 1;
    }
    f
}

/// What every test driver negotiates.
pub const BASE: u64 = features(&[
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_CTRL_VQ,
]);

pub fn options(name: &str, mac: [u8; 6]) -> DeviceOptions {
    DeviceOptions {
        name: name.into(),
        socket: format!("/nonexistent/{name}.sock").into(),
        mac: MacAddr(mac),
        queue_pairs: PAIRS,
        queue_size: QSIZE,
        mtu: 1500,
        port: PortSpec::Wire("w".into()),
        pairs_per_thread: 1,
        admin_vq: true,
        split_header: true,
        rss_contexts: true,
        hash_fields: true,
    }
}

/// Guest memory: RAM at 0 and, optionally, a device memory region backed by
/// a different file than RAM, which is how `NetDevice::set_memory` (through
/// `RegionClassifier::new`) tells device memory from RAM, as for the fds
/// QEMU hands over.
pub fn guest_memory(ram_len: usize, device_memory: bool) -> GuestMemoryMmap {
    let mut ranges = vec![(GuestAddress(0), ram_len, None)];
    if device_memory {
        let file = TempFile::new().unwrap().into_file();
        file.set_len(DEV_MEM_LEN as u64).unwrap();
        ranges.push((
            GuestAddress(DEV_MEM),
            DEV_MEM_LEN,
            Some(FileOffset::new(file, 0)),
        ));
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

/// Where the used ring of `mock` really goes.
///
/// virtio-queue 0.18's mock puts it `size` *bytes* after the start of the
/// available ring entries (`SplitQueueRing::end` counts entries, not bytes),
/// on top of the second half of the available ring: a device writing used
/// entries then corrupts heads the driver posted. The used ring is placed
/// after the available ring (and its used_event) instead.
pub fn used_ring_addr<M: vm_memory::GuestMemory>(mock: &MockSplitQueue<M>, size: u16) -> u64 {
    (mock.avail_addr().0 + 4 + 2 * u64::from(size) + 2).next_multiple_of(4)
}

/// `mock.create_queue()` with the used ring moved to [`used_ring_addr`].
pub fn create_queue<M: vm_memory::GuestMemory>(mock: &MockSplitQueue<M>, size: u16) -> Queue {
    let mut q: Queue = mock.create_queue().unwrap();
    let used = used_ring_addr(mock, size);
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q
}

/// One split virtqueue, from the driver's side.
pub struct Vq {
    mem: &'static GuestMemoryMmap,
    pub mock: MockSplitQueue<'static, GuestMemoryMmap>,
    /// The device's view, handed to `process_*`.
    pub queue: Queue,
    pub size: u16,
    used_addr: u64,
    next_desc: u16,
    avail: u16,
    used_seen: u16,
    /// Segments of each posted chain, by head.
    chains: HashMap<u16, Vec<(u64, u32)>>,
}

impl Vq {
    pub fn new(mem: &'static GuestMemoryMmap, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        let queue = create_queue(&mock, size);
        let used_addr = used_ring_addr(&mock, size);
        mem.write_slice(&[0u8; 4], GuestAddress(used_addr)).unwrap();
        Vq {
            mem,
            mock,
            queue,
            size,
            used_addr,
            next_desc: 0,
            avail: 0,
            used_seen: 0,
            chains: HashMap::new(),
        }
    }

    pub fn store_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mock.desc_table().store(i, d).unwrap();
    }

    /// Next descriptor index, round robin: the tests never have more than
    /// a ring's worth of descriptors outstanding.
    pub fn alloc_desc(&mut self) -> u16 {
        let i = self.next_desc;
        self.next_desc = (i + 1) % self.size;
        i
    }

    /// Puts `head` on the available ring and publishes the index.
    pub fn push_avail(&mut self, head: u16) {
        let slot = usize::from(self.avail % self.size);
        self.mock.avail().ring().ref_at(slot).unwrap().store(head);
        self.avail = self.avail.wrapping_add(1);
        self.mock.avail().idx().store(self.avail);
    }

    /// Publishes heads without writing descriptors (buffers recycled as
    /// they are, like a driver refilling the same pages).
    pub fn push_avail_batch(&mut self, heads: impl Iterator<Item = u16>) {
        for head in heads {
            let slot = usize::from(self.avail % self.size);
            self.mock.avail().ring().ref_at(slot).unwrap().store(head);
            self.avail = self.avail.wrapping_add(1);
        }
        self.mock.avail().idx().store(self.avail);
    }

    /// Writes the available index as is (a buggy or malicious driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.mock.avail().idx().store(idx);
    }

    /// Posts a chain of (addr, len, flags); NEXT links are added.
    pub fn post(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let idx: Vec<u16> = descs.iter().map(|_| self.alloc_desc()).collect();
        for (k, &(a, l, f)) in descs.iter().enumerate() {
            match idx.get(k + 1) {
                Some(&n) => self.store_desc(idx[k], a, l, f | NEXT, n),
                None => self.store_desc(idx[k], a, l, f, 0),
            }
        }
        self.chains
            .insert(idx[0], descs.iter().map(|&(a, l, _)| (a, l)).collect());
        self.push_avail(idx[0]);
        idx[0]
    }

    /// Records the segments of a chain built by hand (for `used_bytes`).
    pub fn remember(&mut self, head: u16, segs: &[(u64, u32)]) {
        self.chains.insert(head, segs.to_vec());
    }

    pub fn segments(&self, head: u16) -> &[(u64, u32)] {
        self.chains.get(&head).map_or(&[], |v| v.as_slice())
    }

    fn le(&self, addr: u64, n: usize) -> u64 {
        let b = read(self.mem, addr, n);
        b.iter().rev().fold(0, |acc, &x| acc << 8 | u64::from(x))
    }

    pub fn used_idx(&self) -> u16 {
        self.le(self.used_addr + 2, 2) as u16
    }

    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used_addr + 4 + 8 * u64::from(i % self.size);
        (self.le(at, 4) as u32, self.le(at + 4, 4) as u32)
    }

    /// Used entries the device added since the last call, as (head, len).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let end = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != end {
            let (id, len) = self.used_entry(self.used_seen);
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Acknowledges used entries without reading them; returns how many.
    pub fn skip_used(&mut self) -> u16 {
        let end = self.used_idx();
        let n = end.wrapping_sub(self.used_seen);
        self.used_seen = end;
        n
    }

    /// The first `len` bytes of the stream written into chain `head`.
    pub fn used_bytes(&self, head: u16, len: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let mut left = len as usize;
        for &(addr, l) in self.segments(head) {
            if left == 0 {
                break;
            }
            let n = left.min(l as usize);
            out.extend(read(self.mem, addr, n));
            left -= n;
        }
        out
    }

    /// avail_event (EVENT_IDX): the device wants a kick once the driver
    /// publishes an avail index past this.
    pub fn avail_event(&self) -> u16 {
        self.le(self.used_addr + 4 + 8 * u64::from(self.size), 2) as u16
    }

    /// Enables or disables VIRTIO_RING_F_EVENT_IDX on the device's view.
    pub fn set_event_idx(&mut self, on: bool) {
        self.queue.set_event_idx(on);
    }
}

pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A received packet, reassembled from the used ring.
#[derive(Debug, Clone)]
pub struct Received {
    pub hdr: VirtioNetHdr,
    pub frame: Vec<u8>,
    /// Chains the packet used.
    pub heads: Vec<u16>,
}

/// A bump allocator over a range, wrapping around (buffers are short-lived).
#[derive(Debug, Clone, Copy)]
struct Heap {
    start: u64,
    end: u64,
    next: u64,
}

impl Heap {
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1).next_multiple_of(64);
        assert!(len <= self.end - self.start, "allocation too large");
        if self.next + len > self.end {
            self.next = self.start;
        }
        let a = self.next;
        self.next += len;
        a
    }
}

/// One device with its driver: queues, buffers, scratch.
pub struct Nic {
    pub dev: Arc<NetDevice>,
    pub mem: &'static GuestMemoryMmap,
    pub rx: Vec<Vq>,
    pub tx: Vec<Vq>,
    pub ctrl: Vq,
    pub admin: Vq,
    pub writer: RxWriter,
    pub buf: ChainBuf,
    heap: Heap,
    dev_heap: Heap,
}

impl Nic {
    /// A device with `features` negotiated and memory set, not yet attached
    /// to a port. The memory is leaked: the mock rings borrow it for the
    /// life of the test.
    pub fn new(name: &str, mac: [u8; 6], features: u64, device_memory: bool) -> Self {
        Self::with_options(options(name, mac), features, device_memory)
    }

    pub fn with_options(opts: DeviceOptions, features: u64, device_memory: bool) -> Self {
        let pairs = opts.queue_pairs;
        let dev = Arc::new(NetDevice::new(opts).unwrap());
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(guest_memory(RAM_LEN, device_memory)));
        dev.set_acked_features(features);
        dev.set_memory(GuestMemoryAtomic::new(mem.clone()));
        let ring = |i: u64| i * RING_STRIDE;
        let rx = (0..pairs)
            .map(|p| Vq::new(mem, ring(rx_index(p) as u64), QSIZE))
            .collect();
        let tx = (0..pairs)
            .map(|p| Vq::new(mem, ring(tx_index(p) as u64), QSIZE))
            .collect();
        let ctrl = Vq::new(mem, ring(2 * u64::from(pairs)), QSIZE);
        let admin = Vq::new(mem, ring(2 * u64::from(pairs) + 1), QSIZE);
        assert!(ring(2 * u64::from(pairs) + 2) <= HEAP_START);
        Nic {
            dev,
            mem,
            rx,
            tx,
            ctrl,
            admin,
            writer: RxWriter::new(),
            buf: ChainBuf::default(),
            heap: Heap {
                start: HEAP_START,
                end: RAM_LEN as u64,
                next: HEAP_START,
            },
            dev_heap: Heap {
                start: DEV_MEM,
                end: DEV_MEM + DEV_MEM_LEN as u64,
                next: DEV_MEM,
            },
        }
    }

    pub fn alloc(&mut self, len: usize) -> u64 {
        self.heap.alloc(len as u64)
    }

    pub fn alloc_dev(&mut self, len: usize) -> u64 {
        self.dev_heap.alloc(len as u64)
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        read(self.mem, addr, len)
    }

    /// Copies `data` into a fresh buffer and returns its address.
    pub fn place(&mut self, data: &[u8]) -> u64 {
        let a = self.alloc(data.len());
        self.write(a, data);
        a
    }

    pub fn vnet_hdr_len(&self) -> usize {
        self.dev.vnet_hdr_len()
    }

    fn mrg(&self) -> bool {
        self.dev.has_feature(VIRTIO_NET_F_MRG_RXBUF)
    }

    // ---- transmit ----

    /// Posts a TX chain: virtio-net header (the negotiated size, as for
    /// receive) and frame in one buffer.
    pub fn post_tx(&mut self, pair: u16, hdr: &VirtioNetHdr, frame: &[u8]) -> u16 {
        let mut data = vec![0u8; self.vnet_hdr_len()];
        hdr.write_to(&mut data);
        data.extend_from_slice(frame);
        let a = self.place(&data);
        self.tx[usize::from(pair)].post(&[(a, data.len() as u32, 0)])
    }

    /// Runs the device's TX processing of `pair`.
    pub fn kick_tx(&mut self, pair: u16) -> bool {
        let q = &mut self.tx[usize::from(pair)];
        self.dev.process_tx(pair, &mut q.queue, &mut self.buf)
    }

    /// Transmits one frame on queue pair 0.
    pub fn send(&mut self, frame: &[u8]) {
        self.send_with(0, &VirtioNetHdr::default(), frame);
    }

    pub fn send_with(&mut self, pair: u16, hdr: &VirtioNetHdr, frame: &[u8]) {
        let head = self.post_tx(pair, hdr, frame);
        assert!(self.kick_tx(pair));
        let used = self.tx[usize::from(pair)].take_used();
        assert_eq!(used, [(head, 0)], "TX chain not returned");
    }

    // ---- receive ----

    /// Posts `n` single-buffer receive chains of `len` bytes on `pair`.
    pub fn post_rx(&mut self, pair: u16, n: usize, len: usize) {
        for _ in 0..n {
            let a = self.alloc(len);
            self.rx[usize::from(pair)].post(&[(a, len as u32, W)]);
        }
    }

    /// Posts a header-split chain: a header buffer in RAM and one payload
    /// buffer, in device memory or RAM. Returns (head, header, payload).
    pub fn post_rx_split(
        &mut self,
        pair: u16,
        hdr_len: usize,
        payload_len: usize,
        device_memory: bool,
    ) -> (u16, u64, u64) {
        let h = self.alloc(hdr_len);
        let p = if device_memory {
            self.alloc_dev(payload_len)
        } else {
            self.alloc(payload_len)
        };
        let head =
            self.rx[usize::from(pair)].post(&[(h, hdr_len as u32, W), (p, payload_len as u32, W)]);
        (head, h, p)
    }

    /// Runs the device's RX processing of `pair`.
    pub fn kick_rx(&mut self, pair: u16) -> bool {
        let q = &mut self.rx[usize::from(pair)];
        self.dev.process_rx(pair, &mut q.queue, &mut self.writer)
    }

    /// Packets delivered on `pair` since the last call (plain layout, or
    /// split layout for packets that were not split), merging buffers by
    /// num_buffers with MRG_RXBUF.
    pub fn take_rx(&mut self, pair: u16) -> Vec<Received> {
        let vnet = self.vnet_hdr_len();
        let mrg = self.mrg();
        let q = &mut self.rx[usize::from(pair)];
        let used = q.take_used();
        let mut out = Vec::new();
        let mut it = used.into_iter();
        while let Some((head, len)) = it.next() {
            let mut stream = q.used_bytes(head, len);
            assert!(stream.len() >= vnet, "used length {len} below the header");
            let hdr = VirtioNetHdr::from_bytes(&stream[..vnet]).unwrap();
            let mut heads = vec![head];
            let n = if mrg { hdr.num_buffers } else { 1 };
            assert!(n >= 1);
            for _ in 1..n {
                let (h, l) = it.next().expect("num_buffers beyond the used entries");
                stream.extend(q.used_bytes(h, l));
                heads.push(h);
            }
            out.push(Received {
                hdr,
                frame: stream[vnet..].to_vec(),
                heads,
            });
        }
        out
    }

    /// Posts `n` buffers of 2 KiB, runs RX on `pair` and returns what arrived.
    pub fn receive(&mut self, pair: u16, n: usize) -> Vec<Received> {
        self.post_rx(pair, n, 2048);
        self.kick_rx(pair);
        self.take_rx(pair)
    }

    /// Drains every queue's backlog (posting buffers as needed) and returns
    /// the frames per queue pair.
    pub fn receive_all(&mut self) -> Vec<Vec<Received>> {
        (0..self.dev.opts.queue_pairs)
            .map(|p| {
                let n = self.dev.backlog_len(p);
                if n == 0 {
                    return Vec::new();
                }
                self.receive(p, n)
            })
            .collect()
    }

    // ---- control queue ----

    /// Sends a control command as Linux lays it out (class+command, data,
    /// ack in separate descriptors) and returns the ack byte.
    pub fn ctrl(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        let hdr = self.place(&[class, command]);
        let ack = self.alloc(1);
        self.write(ack, &[0xee]);
        let mut descs = vec![(hdr, 2, 0)];
        if !data.is_empty() {
            let d = self.place(data);
            descs.push((d, data.len() as u32, 0));
        }
        descs.push((ack, 1, W));
        self.ctrl_chain(&descs);
        self.read(ack, 1)[0]
    }

    /// Posts a raw chain on the control queue and processes it; returns the
    /// used length.
    pub fn ctrl_chain(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        let head = self.ctrl.post(descs);
        assert!(self.dev.process_ctrl(&mut self.ctrl.queue, &mut self.buf));
        let used = self.ctrl.take_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head);
        used[0].1
    }

    pub fn ctrl_ok(&mut self, class: u32, command: u32, data: &[u8]) {
        let ack = self.ctrl(class as u8, command as u8, data);
        assert_eq!(ack, VIRTIO_NET_OK as u8, "control {class}/{command} failed");
    }

    // ---- admin queue ----

    /// Sends an admin command (request readable, result writable) and
    /// returns the bytes the device wrote.
    pub fn admin_raw(&mut self, request: &[u8], result_len: usize) -> Vec<u8> {
        let res = self.alloc(result_len.max(1));
        let mut descs = Vec::new();
        if !request.is_empty() {
            let req = self.place(request);
            descs.push((req, request.len() as u32, 0));
        }
        if result_len > 0 {
            descs.push((res, result_len as u32, W));
        }
        let used = self.admin_chain(&descs);
        self.read(res, used as usize)
    }

    pub fn admin_chain(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        let head = self.admin.post(descs);
        assert!(self.dev.process_admin(&mut self.admin.queue, &mut self.buf));
        let used = self.admin.take_used();
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, head);
        used[0].1
    }

    /// A self group command with a 4 KiB result buffer.
    pub fn admin(&mut self, opcode: u16, data: &[u8]) -> Vec<u8> {
        self.admin_raw(
            &admin_cmd(opcode, VIRTIO_ADMIN_GROUP_TYPE_SELF, 0, data),
            4096,
        )
    }

    pub fn admin_ok(&mut self, opcode: u16, data: &[u8]) -> Vec<u8> {
        let res = self.admin(opcode, data);
        assert_eq!(status(&res), (0, 0), "admin command {opcode:#x} failed");
        res[ADMIN_RESULT_HDR_LEN..].to_vec()
    }

    pub fn create(&mut self, ty: u16, id: u32, obj: &[u8]) -> Vec<u8> {
        let mut d = obj_hdr(ty, id);
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend_from_slice(obj);
        self.admin(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE, &d)
    }

    pub fn create_ok(&mut self, ty: u16, id: u32, obj: &[u8]) {
        let res = self.create(ty, id, obj);
        assert_eq!(status(&res), (0, 0), "creating object {ty:#x}/{id} failed");
    }

    pub fn destroy(&mut self, ty: u16, id: u32) -> Vec<u8> {
        self.admin(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY, &obj_hdr(ty, id))
    }

    /// The Linux driver's probe: command list negotiation with the SR-IOV
    /// group type, capability discovery, driver capabilities set to what
    /// the device offers (with `groups` as the group limit; Linux uses 1),
    /// then its ethtool group: id 1, priority 1.
    pub fn flow_filter_init(&mut self, groups: u32) {
        let q = admin_cmd(
            VIRTIO_ADMIN_CMD_LIST_QUERY,
            VIRTIO_ADMIN_GROUP_TYPE_SRIOV,
            0,
            &[],
        );
        let res = self.admin_raw(&q, 16);
        assert_eq!(status(&res), (0, 0));
        let list = u64::from_le_bytes(res[8..16].try_into().unwrap());
        let used = list & LINUX_CMD_BITMAP;
        let u = admin_cmd(
            VIRTIO_ADMIN_CMD_LIST_USE,
            VIRTIO_ADMIN_GROUP_TYPE_SRIOV,
            0,
            &used.to_le_bytes(),
        );
        assert_eq!(status(&self.admin_raw(&u, 8)), (0, 0));
        let caps = self.admin_ok(VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, &[]);
        for cap in [
            VIRTIO_NET_FF_RESOURCE_CAP,
            VIRTIO_NET_FF_SELECTOR_CAP,
            VIRTIO_NET_FF_ACTION_CAP,
        ] {
            let byte = caps[usize::from(cap / 8)];
            assert_eq!(byte >> (cap % 8) & 1, 1, "capability {cap:#x} not listed");
        }
        let cap_get = |nic: &mut Nic, id: u16, len: usize| {
            let mut d = id.to_le_bytes().to_vec();
            d.extend_from_slice(&[0; 6]);
            let mut v = nic.admin_ok(VIRTIO_ADMIN_CMD_DEVICE_CAP_GET, &d);
            v.truncate(len);
            v
        };
        let mut res_cap = cap_get(self, VIRTIO_NET_FF_RESOURCE_CAP, 20);
        // Selectors as Linux sizes its buffer: all five, full masks.
        let sel_len = 8 + 8 * 5 + (14 + 20 + 40 + 20 + 8);
        let sel_cap = cap_get(self, VIRTIO_NET_FF_SELECTOR_CAP, sel_len);
        let act_cap = cap_get(self, VIRTIO_NET_FF_ACTION_CAP, 10);
        res_cap[0..4].copy_from_slice(&groups.to_le_bytes());
        for (id, cap) in [
            (VIRTIO_NET_FF_RESOURCE_CAP, &res_cap),
            (VIRTIO_NET_FF_SELECTOR_CAP, &sel_cap),
            (VIRTIO_NET_FF_ACTION_CAP, &act_cap),
        ] {
            let mut d = id.to_le_bytes().to_vec();
            d.extend_from_slice(&[0; 6]);
            d.extend_from_slice(cap);
            let req = admin_cmd(
                VIRTIO_ADMIN_CMD_DRIVER_CAP_SET,
                VIRTIO_ADMIN_GROUP_TYPE_SELF,
                0,
                &d,
            );
            assert_eq!(status(&self.admin_raw(&req, 8)), (0, 0));
        }
        assert!(self.dev.admin().flow_filter().enabled());
        self.create_ok(VIRTIO_NET_RESOURCE_OBJ_FF_GROUP, 1, &1u16.to_le_bytes());
    }
}

/// Opcodes the Linux PCI transport knows (it masks LIST_QUERY with these).
pub const LINUX_CMD_BITMAP: u64 = (1 << VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY)
    | (1 << VIRTIO_ADMIN_CMD_DRIVER_CAP_SET)
    | (1 << VIRTIO_ADMIN_CMD_DEVICE_CAP_GET)
    | (1 << VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE)
    | (1 << VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY)
    | (1 << 0xe)
    | (1 << 0xf)
    | (1 << 0x10)
    | (1 << 0x11);

/// Two devices joined by a wire, A at end 0 and B at end 1.
pub fn pair(features_a: u64, features_b: u64) -> (Nic, Nic) {
    pair_with(features_a, features_b, false)
}

pub fn pair_with(features_a: u64, features_b: u64, b_device_memory: bool) -> (Nic, Nic) {
    let a = Nic::new("nic-a", MAC_A, features_a, false);
    let b = Nic::new("nic-b", MAC_B, features_b, b_device_memory);
    connect(&a, &b);
    (a, b)
}

pub fn connect(a: &Nic, b: &Nic) {
    let wire = Wire::new("w");
    let ea = wire.plug(0, &a.dev);
    let eb = wire.plug(1, &b.dev);
    a.dev.attach_port(ea);
    b.dev.attach_port(eb);
}

// ---- admin encoding ----

/// struct virtio_admin_cmd: opcode, group type, reserved, member id, data.
pub fn admin_cmd(opcode: u16, group_type: u16, member: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&opcode.to_le_bytes());
    v.extend_from_slice(&group_type.to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v.extend_from_slice(&member.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// (status, status_qualifier) of an admin result.
pub fn status(res: &[u8]) -> (u16, u16) {
    assert!(res.len() >= 4, "admin result too short: {res:?}");
    (
        u16::from_le_bytes([res[0], res[1]]),
        u16::from_le_bytes([res[2], res[3]]),
    )
}

pub fn obj_hdr(ty: u16, id: u32) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&id.to_le_bytes());
    v
}

/// struct virtio_net_resource_obj_ff_classifier.
pub fn classifier(sels: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut v = vec![sels.len() as u8, 0, 0, 0, 0, 0, 0, 0];
    for (ty, mask) in sels {
        v.extend_from_slice(&[*ty, 0, 0, 0, mask.len() as u8, 0, 0, 0]);
        v.extend_from_slice(mask);
    }
    v
}

/// struct virtio_net_resource_obj_ff_rule; `queue` None means drop.
pub fn rule(group: u32, classifier: u32, priority: u8, queue: Option<u16>, key: &[u8]) -> Vec<u8> {
    let mut v = group.to_le_bytes().to_vec();
    v.extend_from_slice(&classifier.to_le_bytes());
    let action = match queue {
        None => VIRTIO_NET_FF_ACTION_DROP,
        Some(_) => VIRTIO_NET_FF_ACTION_DIRECT_RX_VQ,
    };
    v.extend_from_slice(&[priority, key.len() as u8, action, 0]);
    v.extend_from_slice(&queue.unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(key);
    v
}

/// Which IPv4 / L4 fields a classifier matches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Match {
    pub src_ip: bool,
    pub dst_ip: bool,
    pub sport: bool,
    pub dport: bool,
}

/// Ethernet(ethertype) + IPv4(protocol, chosen addresses) + TCP or UDP
/// (chosen ports) classifier, as ethtool's ntuple rules build it.
pub fn ipv4_l4_classifier(proto: u8, m: Match) -> Vec<u8> {
    let mut eth = vec![0u8; 14];
    eth[12..14].fill(0xff);
    let mut ip = vec![0u8; 20];
    ip[9] = 0xff;
    if m.src_ip {
        ip[12..16].fill(0xff);
    }
    if m.dst_ip {
        ip[16..20].fill(0xff);
    }
    let (l4_ty, l4_len) = if proto == IPPROTO_TCP {
        (VIRTIO_NET_FF_MASK_TYPE_TCP, 20)
    } else {
        (VIRTIO_NET_FF_MASK_TYPE_UDP, 8)
    };
    let mut l4 = vec![0u8; l4_len];
    if m.sport {
        l4[0..2].fill(0xff);
    }
    if m.dport {
        l4[2..4].fill(0xff);
    }
    classifier(&[
        (VIRTIO_NET_FF_MASK_TYPE_ETH, eth),
        (VIRTIO_NET_FF_MASK_TYPE_IPV4, ip),
        (l4_ty, l4),
    ])
}

/// The key matching `flow` under [`ipv4_l4_classifier`] (fields outside the
/// mask are ignored, so the full values are given).
pub fn ipv4_l4_key(proto: u8, flow: &Flow) -> Vec<u8> {
    let mut k = vec![0u8; 14];
    k[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[9] = proto;
    ip[12..16].copy_from_slice(&flow.src);
    ip[16..20].copy_from_slice(&flow.dst);
    k.extend_from_slice(&ip);
    let mut l4 = vec![0u8; if proto == IPPROTO_TCP { 20 } else { 8 }];
    l4[0..2].copy_from_slice(&flow.sport.to_be_bytes());
    l4[2..4].copy_from_slice(&flow.dport.to_be_bytes());
    k.extend_from_slice(&l4);
    k
}

// ---- control encoding ----

/// VIRTIO_NET_CTRL_MQ_RSS_CONFIG data.
pub fn rss_config(
    hash_types: u32,
    table: &[u16],
    unclassified: u16,
    max_tx_vq: u16,
    key: &[u8],
) -> Vec<u8> {
    let mut v = hash_types.to_le_bytes().to_vec();
    v.extend_from_slice(&((table.len() as u16).wrapping_sub(1)).to_le_bytes());
    v.extend_from_slice(&unclassified.to_le_bytes());
    for q in table {
        v.extend_from_slice(&q.to_le_bytes());
    }
    v.extend_from_slice(&max_tx_vq.to_le_bytes());
    v.push(key.len() as u8);
    v.extend_from_slice(key);
    v
}

/// The table Linux installs by default: queues round robin.
pub fn round_robin_table(len: usize, queues: u16) -> Vec<u16> {
    (0..len).map(|i| (i % usize::from(queues)) as u16).collect()
}

/// VIRTIO_NET_CTRL_SPLIT_HEADER_SET data.
pub fn split_header(enable: u8, threshold: u32) -> Vec<u8> {
    let mut v = vec![enable, 0, 0, 0];
    v.extend_from_slice(&threshold.to_le_bytes());
    v
}

// ---- frames ----

/// An IPv4 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub const fn new(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        Flow {
            src,
            dst,
            sport,
            dport,
        }
    }

    /// Flow `i` of a family of distinct flows between two hosts.
    pub fn nth(i: u16) -> Self {
        Flow::new([10, 0, 0, 1], [10, 0, 0, 2], 30000 + i, 5201)
    }
}

fn payload_byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// Ethernet + IPv4 + TCP or UDP with `payload` bytes, valid IPv4 header
/// checksum and a complete transport checksum.
pub fn frame4(dst_mac: [u8; 6], proto: u8, flow: &Flow, payload: usize) -> Vec<u8> {
    let mut f = frame4_raw(dst_mac, proto, flow, payload);
    let l4_len = f.len() - ETH_HLEN - 20;
    let field = ETH_HLEN + 20 + if proto == IPPROTO_TCP { 16 } else { 6 };
    let c = internet_checksum(
        &f[ETH_HLEN + 20..],
        pseudo_header_sum_v4(flow.src, flow.dst, proto, l4_len as u32),
    );
    f[field..field + 2].copy_from_slice(&c.to_be_bytes());
    f
}

/// As [`frame4`] but with the transport checksum field holding the
/// pseudo-header sum, as a driver leaves it for NEEDS_CSUM / GSO.
pub fn frame4_partial(dst_mac: [u8; 6], proto: u8, flow: &Flow, payload: usize) -> Vec<u8> {
    let mut f = frame4_raw(dst_mac, proto, flow, payload);
    let l4_len = f.len() - ETH_HLEN - 20;
    let field = ETH_HLEN + 20 + if proto == IPPROTO_TCP { 16 } else { 6 };
    let seed = vhost_nic::offload::fold(pseudo_header_sum_v4(
        flow.src,
        flow.dst,
        proto,
        l4_len as u32,
    ));
    f[field..field + 2].copy_from_slice(&seed.to_be_bytes());
    f
}

fn frame4_raw(dst_mac: [u8; 6], proto: u8, flow: &Flow, payload: usize) -> Vec<u8> {
    let l4_hlen = if proto == IPPROTO_TCP { 20 } else { 8 };
    let mut f = vec![0u8; ETH_HLEN + 20 + l4_hlen + payload];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0xee, 0xee]);
    f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let total = (20 + l4_hlen + payload) as u16;
    {
        let ip = &mut f[ETH_HLEN..ETH_HLEN + 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&flow.src);
        ip[16..20].copy_from_slice(&flow.dst);
    }
    set_ipv4_header_checksum(&mut f, ETH_HLEN).unwrap();
    let l4 = ETH_HLEN + 20;
    f[l4..l4 + 2].copy_from_slice(&flow.sport.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&flow.dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        f[l4 + 4..l4 + 8].copy_from_slice(&0x0100_0000u32.to_be_bytes());
        f[l4 + 12] = 5 << 4;
        f[l4 + 13] = 0x18; // PSH, ACK
        f[l4 + 14..l4 + 16].copy_from_slice(&0xffffu16.to_be_bytes());
    } else {
        f[l4 + 4..l4 + 6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    }
    for (i, b) in f[l4 + l4_hlen..].iter_mut().enumerate() {
        *b = payload_byte(i);
    }
    f
}

pub fn tcp4(dst_mac: [u8; 6], flow: &Flow, payload: usize) -> Vec<u8> {
    frame4(dst_mac, IPPROTO_TCP, flow, payload)
}

pub fn udp4(dst_mac: [u8; 6], flow: &Flow, payload: usize) -> Vec<u8> {
    frame4(dst_mac, IPPROTO_UDP, flow, payload)
}

/// Header length (vnet header) the device writes on receive.
pub fn rx_hdr_len(hash_report: bool) -> usize {
    if hash_report {
        HDR_HASH_LEN
    } else {
        HDR_LEN
    }
}
