//! A vhost-user frontend doing what QEMU does for a virtio-net device, plus
//! the virtio-net driver bits the tests need (RX buffers, TX frames, control
//! commands).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::GuestAddress;

use super::driver::{wait_readable, GuestRam, Part, Used, VirtQueue};
use super::TIMEOUT;

pub const RAM_SIZE: u64 = 4 << 20;
pub const QUEUE_SIZE: u16 = 256;
pub const CTRL_QUEUE_SIZE: u16 = 64;
pub const BUF_LEN: u32 = 2048;
/// virtio_net_hdr_v1 (VERSION_1 / MRG_RXBUF, no hash report).
pub const HDR_LEN: usize = 12;

// Feature bits (virtio spec numbering).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
pub const VIRTIO_NET_F_MTU: u32 = 3;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
pub const VIRTIO_NET_F_STATUS: u32 = 16;
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
pub const VIRTIO_NET_F_MQ: u32 = 22;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;
pub const VIRTIO_NET_F_RSS: u32 = 60;

// Control queue.
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const VIRTIO_NET_CTRL_MQ_RSS_CONFIG: u8 = 1;

/// The features the test driver acks: no EVENT_IDX, so every used entry
/// is signalled and every kick is needed.
pub fn driver_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_RSS,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |f, &b| f | (1u64 << b),
    )
}

/// What stock QEMU's `-netdev vhost-user` acks for a virtio-net-pci
/// device: its list of ring and offload bits (no CTRL_VQ, MAC, STATUS:
/// QEMU keeps the control queue and the config space) plus
/// PROTOCOL_FEATURES. No EVENT_IDX, as for [`driver_features`].
pub fn stock_qemu_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
    ]
    .iter()
    .fold(
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        |f, &b| f | (1u64 << b),
    )
}

// vhost-user wire format, for messages the `vhost` frontend will not send.
pub const VHOST_USER_SET_VRING_ENABLE: u32 = 18;
pub const VHOST_USER_VERSION: u32 = 0x1;
pub const VHOST_USER_REPLY: u32 = 0x4;
pub const VHOST_USER_NEED_REPLY: u32 = 0x8;

/// One vhost-user message: header (request, flags, size) and payload.
pub fn raw_message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// SET_VRING_ENABLE with NEED_REPLY, written to `sock` directly (the
/// `vhost` frontend refuses it before SET_FEATURES); returns the ack value.
pub fn raw_vring_enable(sock: &mut UnixStream, index: usize, enable: bool) -> u64 {
    let mut payload = (index as u32).to_ne_bytes().to_vec();
    payload.extend_from_slice(&u32::from(enable).to_ne_bytes());
    let flags = VHOST_USER_VERSION | VHOST_USER_NEED_REPLY;
    sock.write_all(&raw_message(VHOST_USER_SET_VRING_ENABLE, flags, &payload))
        .expect("send SET_VRING_ENABLE");
    let mut reply = [0u8; 20];
    sock.read_exact(&mut reply)
        .expect("SET_VRING_ENABLE ack (the daemon closed the connection?)");
    let word = |i: usize| u32::from_ne_bytes(reply[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!(word(0), VHOST_USER_SET_VRING_ENABLE, "ack request code");
    assert_eq!(word(1), VHOST_USER_REPLY | VHOST_USER_VERSION, "ack flags");
    assert_eq!(word(2), 8, "ack size");
    u64::from_ne_bytes(reply[12..].try_into().unwrap())
}

pub fn rx_vring(pair: u16) -> usize {
    2 * usize::from(pair)
}

pub fn tx_vring(pair: u16) -> usize {
    2 * usize::from(pair) + 1
}

/// A received frame.
#[derive(Debug, Clone)]
pub struct Received {
    pub pair: u16,
    pub head: u16,
    pub hdr: [u8; HDR_LEN],
    pub frame: Vec<u8>,
}

impl Received {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.hdr[10], self.hdr[11]])
    }
}

/// One connected virtio-net device: the vhost-user connection, the guest
/// RAM shared with the daemon and the rings the test drives.
pub struct Nic {
    pub fe: Frontend,
    pub ram: GuestRam,
    pub pairs: u16,
    /// Vrings set up, by vring index.
    pub queues: BTreeMap<usize, VirtQueue>,
    pub offered_features: u64,
    pub queue_num: u64,
}

/// Connects to `socket`, retrying until the daemon listens on it (it binds
/// again after each disconnect).
fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}: {e}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Nic {
    /// Connects and brings the device up the way QEMU does: owner,
    /// features, protocol features, memory table, then every RX/TX ring of
    /// `pairs` pairs and the control queue.
    pub fn connect(socket: &Path, pairs: u16) -> Nic {
        // The daemon's listening socket stays open while it serves the
        // previous frontend, and a connection queued there is reset when
        // that session ends: like QEMU's reconnect, retry until a backend
        // answers.
        let deadline = Instant::now() + TIMEOUT;
        let (fe, offered_features) = loop {
            let fe = Frontend::from_stream(connect(socket), 64);
            match fe.set_owner().and_then(|()| fe.get_features()) {
                Ok(f) => break (fe, f),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "no vhost-user backend answers on {}: {e}",
                    socket.display()
                ),
            }
        };
        let mut nic = Nic {
            fe,
            ram: GuestRam::new(RAM_SIZE),
            pairs,
            queues: BTreeMap::new(),
            offered_features,
            queue_num: 0,
        };
        let wanted = driver_features();
        assert_eq!(
            nic.offered_features & wanted,
            wanted,
            "device lacks features the driver needs (offered {:#x})",
            nic.offered_features
        );
        let proto = nic
            .fe
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let need = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(proto.contains(need), "protocol features {proto:?}");
        nic.fe
            .set_protocol_features(need)
            .expect("SET_PROTOCOL_FEATURES");
        // From now on every request is acknowledged, so a request has taken
        // effect in the daemon when its call returns.
        nic.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        nic.queue_num = nic.fe.get_queue_num().expect("GET_QUEUE_NUM");
        nic.fe.set_features(wanted).expect("SET_FEATURES");
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: nic.ram.size,
            userspace_addr: nic.ram.host_addr(GuestAddress(0)),
            mmap_offset: 0,
            mmap_handle: nic.ram.fd(),
        };
        nic.fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
        for pair in 0..pairs {
            nic.add_vring(rx_vring(pair), QUEUE_SIZE);
            nic.add_vring(tx_vring(pair), QUEUE_SIZE);
        }
        nic.add_vring(nic.ctrl_vring(), CTRL_QUEUE_SIZE);
        nic
    }

    /// Connects the way stock QEMU's `-netdev vhost-user` with a
    /// virtio-net-pci device does: protocol features (REPLY_ACK), queue
    /// count, then SET_VRING_ENABLE with NEED_REPLY for `early` (vring,
    /// state) *before* SET_FEATURES, as virtio-net does when it attaches
    /// the netdev; then features without CTRL_VQ, the memory table and
    /// every RX/TX ring of `pairs`, but no control queue (QEMU keeps it)
    /// and no further ring enables: the ones sent early must hold.
    pub fn connect_like_stock_qemu(socket: &Path, pairs: u16, early: &[(usize, bool)]) -> Nic {
        let deadline = Instant::now() + TIMEOUT;
        let (fe, mut raw, offered_features) = loop {
            let stream = connect(socket);
            let raw = stream.try_clone().expect("clone vhost-user socket");
            let fe = Frontend::from_stream(stream, 64);
            match fe.get_features() {
                Ok(f) => break (fe, raw, f),
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "no vhost-user backend answers on {}: {e}",
                    socket.display()
                ),
            }
        };
        let mut nic = Nic {
            fe,
            ram: GuestRam::new(RAM_SIZE),
            pairs,
            queues: BTreeMap::new(),
            offered_features,
            queue_num: 0,
        };
        let wanted = stock_qemu_features();
        assert_eq!(nic.offered_features & wanted, wanted);
        let proto = nic
            .fe
            .get_protocol_features()
            .expect("GET_PROTOCOL_FEATURES");
        let need = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(proto.contains(need), "protocol features {proto:?}");
        nic.fe
            .set_protocol_features(need)
            .expect("SET_PROTOCOL_FEATURES");
        nic.queue_num = nic.fe.get_queue_num().expect("GET_QUEUE_NUM");
        nic.fe.set_owner().expect("SET_OWNER");
        for &(index, enable) in early {
            assert_eq!(
                raw_vring_enable(&mut raw, index, enable),
                0,
                "early SET_VRING_ENABLE {index} {enable} refused"
            );
        }
        nic.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        nic.fe.set_features(wanted).expect("SET_FEATURES");
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: nic.ram.size,
            userspace_addr: nic.ram.host_addr(GuestAddress(0)),
            mmap_offset: 0,
            mmap_handle: nic.ram.fd(),
        };
        nic.fe.set_mem_table(&[region]).expect("SET_MEM_TABLE");
        for pair in 0..pairs {
            for index in [rx_vring(pair), tx_vring(pair)] {
                let q = VirtQueue::new(&mut nic.ram, index, QUEUE_SIZE, BUF_LEN);
                nic.queues.insert(index, q);
                nic.configure_vring(index, 0);
            }
        }
        nic
    }

    pub fn ctrl_vring(&self) -> usize {
        2 * usize::from(self.pairs)
    }

    fn add_vring(&mut self, index: usize, size: u16) {
        assert!(self.replace_vring(index, size).is_none());
    }

    /// Lays out a new ring for vring `index` in fresh memory and starts it
    /// at avail index 0, as after a guest's queue reset; returns the old one.
    pub fn replace_vring(&mut self, index: usize, size: u16) -> Option<VirtQueue> {
        let q = VirtQueue::new(&mut self.ram, index, size, BUF_LEN);
        let old = self.queues.insert(index, q);
        self.start_vring(index, 0);
        old
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE for a ring laid out
    /// already, starting at avail index `base`.
    pub fn start_vring(&mut self, index: usize, base: u16) {
        self.configure_vring(index, base);
        self.fe
            .set_vring_enable(index, true)
            .expect("SET_VRING_ENABLE");
    }

    /// SET_VRING_NUM/BASE/ADDR/KICK/CALL, leaving the enable state alone.
    pub fn configure_vring(&mut self, index: usize, base: u16) {
        let q = &self.queues[&index];
        let config = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.ram.host_addr(q.desc),
            used_ring_addr: self.ram.host_addr(q.used),
            avail_ring_addr: self.ram.host_addr(q.avail),
            log_addr: None,
        };
        self.fe.set_vring_num(index, q.size).expect("SET_VRING_NUM");
        self.fe.set_vring_base(index, base).expect("SET_VRING_BASE");
        self.fe
            .set_vring_addr(index, &config)
            .expect("SET_VRING_ADDR");
        self.fe
            .set_vring_kick(index, &q.kick)
            .expect("SET_VRING_KICK");
        self.fe
            .set_vring_call(index, &q.call)
            .expect("SET_VRING_CALL");
    }

    /// GET_VRING_BASE: stops the ring and returns the next avail index the
    /// device would have used.
    pub fn stop_vring(&mut self, index: usize) -> u16 {
        let base = self.fe.get_vring_base(index).expect("GET_VRING_BASE");
        u16::try_from(base).expect("vring base fits 16 bits")
    }

    pub fn queue(&mut self, index: usize) -> &mut VirtQueue {
        self.queues
            .get_mut(&index)
            .unwrap_or_else(|| panic!("vring {index} not set up"))
    }

    pub fn rx(&mut self, pair: u16) -> &mut VirtQueue {
        self.queue(rx_vring(pair))
    }

    pub fn tx(&mut self, pair: u16) -> &mut VirtQueue {
        self.queue(tx_vring(pair))
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .fe
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .expect("GET_CONFIG");
        payload
    }

    /// Posts `n` receive buffers (one writable descriptor each) on `pair`
    /// and kicks.
    pub fn post_rx(&mut self, pair: u16, n: usize) {
        let q = self.rx(pair);
        for _ in 0..n {
            q.add_chain(&[Part::In(BUF_LEN)]);
        }
        q.kick();
    }

    /// Transmits `frame` on `pair` behind a zero virtio-net header, waiting
    /// for a free descriptor if the ring is full. Returns the head.
    pub fn send(&mut self, pair: u16, frame: &[u8]) -> u16 {
        let mut buf = vec![0u8; HDR_LEN];
        buf.extend_from_slice(frame);
        self.send_chain(pair, &[Part::Out(&buf)])
    }

    /// Posts any chain on the TX queue of `pair` and kicks.
    pub fn send_chain(&mut self, pair: u16, parts: &[Part]) -> u16 {
        let deadline = Instant::now() + TIMEOUT;
        let q = self.tx(pair);
        // Reclaim only when short of descriptors, so that callers see the
        // used entries of their chains in `completed` and `wait_tx_done`.
        while q.free_descriptors() < parts.len() {
            assert!(
                Instant::now() < deadline,
                "tx{pair}: the device does not complete transmit chains"
            );
            wait_readable(&[q.call.as_raw_fd()], deadline);
            q.poll_used();
        }
        let head = q.add_chain(parts);
        q.kick();
        head
    }

    /// Waits until every transmitted chain of `pair` is back; returns all
    /// used entries of the queue so far, in order.
    pub fn wait_tx_done(&mut self, pair: u16) -> &[Used] {
        let q = self.tx(pair);
        let n = q.in_flight();
        q.wait_used(n, TIMEOUT);
        &q.completed
    }

    /// Receive buffers the device filled on `pair` since the last call,
    /// each checked to hold a header and a frame. With `replenish`, each
    /// buffer is posted again (and the queue kicked).
    pub fn try_recv(&mut self, pair: u16, replenish: bool) -> Vec<Received> {
        let q = self.rx(pair);
        let used = q.poll_used();
        let mut out = Vec::new();
        for u in &used {
            let len = u.len as usize;
            assert!(
                len >= HDR_LEN && len <= BUF_LEN as usize,
                "rx{pair}: used length {len} for head {}",
                u.head
            );
            let bytes = q.read_slot(u.head, len);
            out.push(Received {
                pair,
                head: u.head,
                hdr: bytes[..HDR_LEN].try_into().unwrap(),
                frame: bytes[HDR_LEN..].to_vec(),
            });
        }
        if replenish && !used.is_empty() {
            for _ in &used {
                q.add_chain(&[Part::In(BUF_LEN)]);
            }
            q.kick();
        }
        out
    }

    /// Waits until `n` frames arrived across the RX queues in `pairs`.
    pub fn recv(&mut self, pairs: &[u16], n: usize, replenish: bool) -> Vec<Received> {
        let deadline = Instant::now() + TIMEOUT;
        let mut got = Vec::new();
        loop {
            for &p in pairs {
                got.extend(self.try_recv(p, replenish));
            }
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "received {} of {n} frames on rx queues {pairs:?} within {TIMEOUT:?}",
                got.len()
            );
            let fds: Vec<_> = pairs
                .iter()
                .map(|&p| self.queues[&rx_vring(p)].call.as_raw_fd())
                .collect();
            wait_readable(&fds, deadline);
        }
    }

    /// Sends one control command (class, command, data) and returns the
    /// ack byte. Like Linux: header, data and ack in separate descriptors.
    pub fn ctrl(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        let index = self.ctrl_vring();
        let q = self.queue(index);
        let hdr = [class, command];
        let head = if data.is_empty() {
            q.add_chain(&[Part::Out(&hdr), Part::In(1)])
        } else {
            q.add_chain(&[Part::Out(&hdr), Part::Out(data), Part::In(1)])
        };
        q.kick();
        let used = q.wait_used(1, TIMEOUT);
        assert_eq!(used[0].head, head, "control queue completed another chain");
        assert_eq!(used[0].len, 1, "control command ack length");
        // The ack is in the chain's last descriptor.
        let ack_id = *used[0].descs.last().unwrap();
        q.read_slot(ack_id, 1)[0]
    }
}
