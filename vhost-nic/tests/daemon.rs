//! End to end: the `vhost-nic` binary with two devices joined by a wire,
//! driven through its vhost-user sockets the way QEMU drives it, with the
//! test acting as both guests' virtio-net drivers on rings in shared memory.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::driver::Part;
use common::frontend::*;
use common::net::*;
use common::process::Daemon;
use common::TIMEOUT;
use vm_memory::Bytes;

const PAIRS: u16 = 2;
const RSS_HASH_TYPE_IPV4: u32 = 1 << 0;
const RSS_HASH_TYPE_TCPV4: u32 = 1 << 1;

/// The daemon plus a connected, fully set up frontend for each device.
fn setup() -> (Daemon, Nic, Nic) {
    let daemon = Daemon::start_pair(PAIRS);
    let a = Nic::connect(&daemon.socket("a"), PAIRS);
    let b = Nic::connect(&daemon.socket("b"), PAIRS);
    (daemon, a, b)
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// struct virtio_net_rss_config.
fn rss_config(hash_types: u32, table: &[u16], max_tx_vq: u16, key: &[u8]) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&hash_types.to_le_bytes());
    c.extend_from_slice(&(table.len() as u16 - 1).to_le_bytes());
    c.extend_from_slice(&0u16.to_le_bytes()); // unclassified queue
    for q in table {
        c.extend_from_slice(&q.to_le_bytes());
    }
    c.extend_from_slice(&max_tx_vq.to_le_bytes());
    c.push(key.len() as u8);
    c.extend_from_slice(key);
    c
}

/// 128 entries alternating between receive queues 0 and 1.
fn alternating_table() -> Vec<u16> {
    (0..128).map(|i| i % 2).collect()
}

/// Where RSS with `table` and the default key sends a TCP frame from
/// A's `sport` to B's `dport`.
fn rss_queue(table: &[u16], sport: u16, dport: u16) -> u16 {
    let hash = tcpv4_hash(&DEFAULT_RSS_KEY, IP_A, IP_B, sport, dport);
    table[hash as usize & (table.len() - 1)]
}

fn configure_rss(b: &mut Nic, table: &[u16]) {
    let cfg = rss_config(
        RSS_HASH_TYPE_TCPV4 | RSS_HASH_TYPE_IPV4,
        table,
        PAIRS,
        &DEFAULT_RSS_KEY,
    );
    assert_eq!(
        b.ctrl(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, &cfg),
        VIRTIO_NET_OK,
        "RSS_CONFIG refused"
    );
}

const NO_HDR_NUM_BUFFERS_1: [u8; HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

#[test]
fn config_space_and_negotiation() {
    let (daemon, mut a, mut b) = setup();
    for (nic, mac) in [(&mut a, MAC_A), (&mut b, MAC_B)] {
        // Two pairs, the control queue and the admin queue.
        assert_eq!(nic.queue_num, 6);
        let c = nic.config(0, 24);
        assert_eq!(c.len(), 24);
        assert_eq!(c[0..6], mac, "mac");
        assert_eq!(le16(&c, 6) & 1, 1, "VIRTIO_NET_S_LINK_UP");
        assert_eq!(le16(&c, 8), 2, "max_virtqueue_pairs");
        assert_eq!(le16(&c, 10), 1500, "mtu");
        assert_eq!(c[17], 40, "rss_max_key_size");
        assert_eq!(le16(&c, 18), 128, "rss_max_indirection_table_length");
        let hash_types = le32(&c, 20);
        let want = RSS_HASH_TYPE_IPV4 | RSS_HASH_TYPE_TCPV4;
        assert_eq!(
            hash_types & want,
            want,
            "supported_hash_types {hash_types:#x}"
        );
        // A read of one field at an offset gets the same bytes.
        assert_eq!(nic.config(6, 2), c[6..8]);
        assert_eq!(nic.config(0, 6), c[0..6]);
    }
    let stats = daemon.stats();
    for dev in 0..2 {
        let acked = stats["devices"][dev]["acked_features"].as_str().unwrap();
        let acked = u64::from_str_radix(acked.trim_start_matches("0x"), 16).unwrap();
        assert_eq!(acked, driver_features(), "device {dev} acked features");
    }
}

#[test]
fn frame_crosses_the_wire_byte_exact() {
    let (daemon, mut a, mut b) = setup();
    b.post_rx(0, 8);
    b.post_rx(1, 8);
    let payload: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let frame = udp_frame(MAC_B, MAC_A, 4000, 5000, &payload);
    let head = a.send(0, &frame);

    let got = b.recv(&[0], 1, false);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].hdr, NO_HDR_NUM_BUFFERS_1, "virtio-net header");
    assert_eq!(got[0].num_buffers(), 1);
    assert!(got[0].frame == frame, "frame differs from what A sent");
    // One active pair until the driver says otherwise: nothing on rx1.
    assert_eq!(b.rx(1).device_used_idx(), 0);
    let tx: Vec<_> = a.wait_tx_done(0).iter().map(|u| (u.head, u.len)).collect();
    assert_eq!(tx, [(head, 0)], "tx used entries");

    // And back.
    a.post_rx(0, 4);
    let reply = udp_frame(
        MAC_A,
        MAC_B,
        5000,
        4000,
        b"pong, padded to a minimum size frame",
    );
    b.send(0, &reply);
    let got = a.recv(&[0], 1, false);
    assert_eq!(got[0].hdr, NO_HDR_NUM_BUFFERS_1);
    assert!(got[0].frame == reply);

    daemon.wait_counter("/devices/0/queues/0/tx_packets", 1);
    daemon.wait_counter("/devices/1/queues/0/rx_packets", 1);
    daemon.wait_counter("/devices/1/queues/0/tx_packets", 1);
    daemon.wait_counter("/devices/0/queues/0/rx_packets", 1);
    daemon.wait_counter("/devices/1/queues/0/rx_bytes", frame.len() as u64);
}

#[test]
fn control_queue_acks_and_refuses() {
    let (daemon, mut a, mut b) = setup();
    let mq = VIRTIO_NET_CTRL_MQ;
    assert_eq!(
        b.ctrl(mq, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
        VIRTIO_NET_OK
    );
    assert_eq!(daemon.counter("/devices/1/active_pairs"), 2);

    let refused: [(u8, u8, &[u8], &str); 6] = [
        (
            mq,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &99u16.to_le_bytes(),
            "99 pairs",
        ),
        (
            mq,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &0u16.to_le_bytes(),
            "0 pairs",
        ),
        (
            mq,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &[2],
            "truncated pair count",
        ),
        (mq, 0x55, &[], "unknown MQ command"),
        (0x77, 0, &[1, 2, 3], "unknown class"),
        (
            mq,
            VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
            &[3, 0, 0],
            "truncated RSS config",
        ),
    ];
    for (class, command, data, what) in refused {
        assert_eq!(b.ctrl(class, command, data), VIRTIO_NET_ERR, "{what}");
    }
    // Refused commands changed nothing.
    assert_eq!(daemon.counter("/devices/1/active_pairs"), 2);
    assert_eq!(daemon.counter("/devices/1/device/ctrl_commands"), 7);
    assert_eq!(daemon.counter("/devices/1/device/ctrl_errors"), 6);

    // Still forwarding, now over both receive queues.
    b.post_rx(0, 32);
    b.post_rx(1, 32);
    let frames: Vec<_> = (0..16)
        .map(|i| udp_frame(MAC_B, MAC_A, 6000 + i, 53, &[i as u8; 64]))
        .collect();
    for f in &frames {
        a.send(0, f);
    }
    let got = b.recv(&[0, 1], frames.len(), false);
    assert_eq!(got.len(), frames.len());
    let mut left: HashSet<Vec<u8>> = frames.into_iter().collect();
    for r in got {
        assert_eq!(r.hdr, NO_HDR_NUM_BUFFERS_1);
        assert!(left.remove(&r.frame), "unexpected or duplicate frame");
    }
    // And the control queue still answers.
    assert_eq!(
        b.ctrl(mq, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &1u16.to_le_bytes()),
        VIRTIO_NET_OK
    );
    assert_eq!(daemon.counter("/devices/1/active_pairs"), 1);
}

#[test]
fn rss_spreads_flows_over_both_queues() {
    // The hash of the Microsoft verification suite, so the prediction
    // below is the spec's Toeplitz hash.
    assert_eq!(
        tcpv4_hash(
            &DEFAULT_RSS_KEY,
            [66, 9, 149, 187],
            [161, 142, 100, 80],
            2794,
            1766
        ),
        0x51cc_c178
    );
    let (daemon, mut a, mut b) = setup();
    let table = alternating_table();
    configure_rss(&mut b, &table);
    assert_eq!(daemon.counter("/devices/1/active_pairs"), 2);
    // A transmits on both of its queues.
    assert_eq!(
        a.ctrl(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes()
        ),
        VIRTIO_NET_OK
    );
    b.post_rx(0, 128);
    b.post_rx(1, 128);

    const N: u16 = 300;
    let frames: Vec<_> = (0..N)
        .map(|i| tcp_frame(MAC_B, MAC_A, 10_000 + i, 80, &i.to_be_bytes().repeat(50)))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        a.send(i as u16 % 2, f);
    }
    let got = b.recv(&[0, 1], usize::from(N), true);
    assert_eq!(got.len(), usize::from(N));

    let mut per_queue = [0u64; 2];
    let mut seen = HashSet::new();
    for r in &got {
        let sport = tcp_sport(&r.frame);
        let i = usize::from(sport - 10_000);
        assert!(seen.insert(i), "frame {i} received twice");
        assert!(r.frame == frames[i], "frame {i} differs");
        assert_eq!(r.hdr, NO_HDR_NUM_BUFFERS_1, "frame {i} header");
        let want = rss_queue(&table, sport, 80);
        assert_eq!(r.pair, want, "frame from port {sport}: RSS picks rx{want}");
        per_queue[usize::from(r.pair)] += 1;
    }
    assert!(
        per_queue[0] > 0 && per_queue[1] > 0,
        "one queue got everything: {per_queue:?}"
    );

    daemon.wait_counter("/devices/1/queues/0/rx_packets", per_queue[0]);
    daemon.wait_counter("/devices/1/queues/1/rx_packets", per_queue[1]);
    daemon.wait_counter("/devices/0/queues/0/tx_packets", u64::from(N / 2));
    daemon.wait_counter("/devices/0/queues/1/tx_packets", u64::from(N / 2));
    let stats = daemon.stats();
    for q in 0..2 {
        let drops = &stats["devices"][1]["queues"][q]["rx_drops"];
        let total: u64 = drops
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(total, 0, "rx{q} drops: {drops}");
    }
}

#[test]
fn ring_reset_loses_and_repeats_nothing() {
    let (daemon, mut a, mut b) = setup();
    let table = alternating_table();
    configure_rss(&mut b, &table);
    b.post_rx(0, 64);
    b.post_rx(1, 64);

    let sport = |seq: u16| 20_000 + seq;
    let frame = |seq: u16| {
        tcp_frame(
            MAC_B,
            MAC_A,
            sport(seq),
            443,
            &seq.to_be_bytes().repeat(100),
        )
    };
    let queue_of = |seq: u16| rss_queue(&table, sport(seq), 443);
    let mut received = Vec::new();

    // Traffic on both queues.
    for seq in 0..40 {
        a.send(0, &frame(seq));
    }
    received.extend(b.recv(&[0, 1], 40, true));

    // Stop rx1 with frames still arriving.
    for seq in 40..80 {
        a.send(0, &frame(seq));
    }
    let rx1 = rx_vring(1);
    let base = b.stop_vring(rx1);
    // Whatever the device completed before the stop is in the used ring;
    // the base it returned must match it exactly: one more and a chain
    // would be skipped, one less and it would be completed twice.
    received.extend(b.try_recv(1, false));
    let used_at_stop = b.rx(1).device_used_idx();
    assert_eq!(
        base, used_at_stop,
        "GET_VRING_BASE returned {base} but {used_at_stop} chains were completed"
    );
    assert_eq!(usize::from(base), b.rx(1).completed.len());

    // While rx1 is stopped rx0 keeps receiving, and rx1's frames wait.
    for seq in 80..100 {
        a.send(0, &frame(seq));
    }
    let want0 = (0..100).filter(|&s| queue_of(s) == 0).count();
    let have0 = received.iter().filter(|r| r.pair == 0).count();
    received.extend(b.recv(&[0], want0 - have0, true));
    assert_eq!(
        b.rx(1).device_used_idx(),
        base,
        "the device used a stopped ring"
    );

    // Same rings again, from the returned base, and the driver kicks.
    b.start_vring(rx1, base);
    b.rx(1).kick();
    for seq in 100..140 {
        a.send(0, &frame(seq));
    }
    let left = 140 - received.len();
    received.extend(b.recv(&[0, 1], left, true));

    // Every frame exactly once, on its queue, intact.
    let mut by_seq = BTreeMap::new();
    for r in &received {
        let seq = tcp_sport(&r.frame) - 20_000;
        assert!(by_seq.insert(seq, r.pair).is_none(), "frame {seq} twice");
        assert!(r.frame == frame(seq), "frame {seq} differs");
        assert_eq!(r.pair, queue_of(seq), "frame {seq} on the wrong queue");
    }
    assert_eq!(by_seq.len(), 140);
    let on1 = by_seq.values().filter(|&&q| q == 1).count();
    assert!(
        on1 > usize::from(base),
        "no frame arrived on rx1 after the restart"
    );

    // Every chain completed once, in the order it was posted, none skipped.
    for pair in 0..2 {
        let q = b.rx(pair);
        let posted = &q.posted;
        let completed: Vec<u16> = q.completed.iter().map(|u| u.head).collect();
        assert!(completed.len() <= posted.len());
        assert_eq!(
            completed,
            posted[..completed.len()],
            "rx{pair}: completion order differs from posting order"
        );
        assert_eq!(q.in_flight(), posted.len() - completed.len());
    }
    assert_eq!(b.rx(1).completed.len(), on1);

    daemon.wait_counter("/devices/1/queues/1/ring_resets", 1);
    daemon.wait_counter("/devices/1/queues/0/ring_resets", 0);
    daemon.wait_counter("/devices/1/queues/1/rx_packets", on1 as u64);
    daemon.wait_counter("/devices/1/queues/0/rx_packets", (140 - on1) as u64);
}

#[test]
fn ring_reset_onto_fresh_rings() {
    // A guest's virtio 1.2 queue reset: the driver frees the ring and sets
    // up a new one elsewhere, and the frontend starts it at index 0.
    let (daemon, mut a, mut b) = setup();
    let table = alternating_table();
    configure_rss(&mut b, &table);
    b.post_rx(0, 64);
    b.post_rx(1, 64);
    let sport = |seq: u16| 30_000 + seq;
    let frame = |seq: u16| tcp_frame(MAC_B, MAC_A, sport(seq), 22, &[seq as u8; 500]);
    let queue_of = |seq: u16| rss_queue(&table, sport(seq), 22);

    for seq in 0..40 {
        a.send(0, &frame(seq));
    }
    let mut received = b.recv(&[0, 1], 40, true);
    let base = b.stop_vring(rx_vring(1));
    assert_eq!(base, b.rx(1).device_used_idx());
    let old = b.replace_vring(rx_vring(1), QUEUE_SIZE).unwrap();
    b.post_rx(1, 64);

    for seq in 40..100 {
        a.send(0, &frame(seq));
    }
    received.extend(b.recv(&[0, 1], 60, true));
    assert_eq!(
        old.device_used_idx(),
        base,
        "the device wrote to the old ring"
    );

    let mut seen = HashSet::new();
    for r in &received {
        let seq = tcp_sport(&r.frame) - 30_000;
        assert!(seen.insert(seq), "frame {seq} twice");
        assert!(r.frame == frame(seq), "frame {seq} differs");
        assert_eq!(r.pair, queue_of(seq), "frame {seq} on the wrong queue");
    }
    assert_eq!(seen.len(), 100);
    let q = b.rx(1);
    let completed: Vec<u16> = q.completed.iter().map(|u| u.head).collect();
    assert_eq!(completed, q.posted[..completed.len()]);
    let on1_after = (40..100).filter(|&s| queue_of(s) == 1).count();
    assert_eq!(completed.len(), on1_after);
    daemon.wait_counter("/devices/1/queues/1/ring_resets", 1);
}

#[test]
fn bad_descriptors_are_returned_and_counted() {
    let (daemon, mut a, mut b) = setup();

    // Transmit chains the device must not read: outside guest memory,
    // straddling its end, and device-writable.
    let outside = a.send_chain(
        0,
        &[Part::Raw {
            addr: 1 << 32,
            len: 100,
            flags: 0,
        }],
    );
    let straddling = a.send_chain(
        0,
        &[Part::Raw {
            addr: RAM_SIZE - 16,
            len: 64,
            flags: 0,
        }],
    );
    let writable = a.send_chain(0, &[Part::In(100)]);
    let used = a.wait_tx_done(0);
    let got: Vec<_> = used.iter().map(|u| (u.head, u.len)).collect();
    assert_eq!(got, [(outside, 0), (straddling, 0), (writable, 0)]);
    daemon.wait_counter("/devices/0/queues/0/tx_drops/bad_chain", 3);
    assert_eq!(daemon.counter("/devices/0/queues/0/tx_packets"), 0);

    // A read-only receive buffer: returned with length 0, packet dropped,
    // and the buffer left alone.
    let scratch = b.ram.alloc(u64::from(BUF_LEN), 4096);
    let bad = b.rx(0).add_chain(&[Part::Raw {
        addr: scratch.0,
        len: BUF_LEN,
        flags: 0,
    }]);
    b.post_rx(0, 8);
    let dropped = udp_frame(MAC_B, MAC_A, 1, 2, b"lands in a read-only buffer");
    a.send(0, &dropped);
    let used = b.rx(0).wait_used(1, TIMEOUT);
    assert_eq!((used[0].head, used[0].len), (bad, 0));
    daemon.wait_counter("/devices/1/queues/0/rx_drops/bad_chain", 1);
    let mut untouched = vec![1u8; BUF_LEN as usize];
    b.ram.mem.read_slice(&mut untouched, scratch).unwrap();
    assert!(
        untouched.iter().all(|&x| x == 0),
        "read-only buffer written"
    );

    // Valid frames keep flowing, in order, into the following buffers.
    let frames: Vec<_> = (0..5)
        .map(|i| udp_frame(MAC_B, MAC_A, 100 + i, 200, &[0xa0 + i as u8; 300]))
        .collect();
    for f in &frames {
        a.send(0, f);
    }
    let got = b.recv(&[0], frames.len(), false);
    for (r, f) in got.iter().zip(&frames) {
        assert!(r.frame == *f, "frame after the bad buffer differs");
        assert_eq!(r.hdr, NO_HDR_NUM_BUFFERS_1);
    }
    assert_eq!(got.len(), frames.len());
    daemon.wait_counter("/devices/1/queues/0/rx_packets", 5);
    daemon.wait_counter("/devices/0/queues/0/tx_packets", 6);
    assert_eq!(daemon.counter("/devices/1/queues/0/rx_drops/bad_chain"), 1);
}

#[test]
fn frontend_reconnects() {
    let (daemon, mut a, mut b) = setup();
    a.post_rx(0, 32);
    b.post_rx(0, 32);
    let to_b = udp_frame(MAC_B, MAC_A, 7, 7, b"to b, first connection...........");
    a.send(0, &to_b);
    assert!(b.recv(&[0], 1, false)[0].frame == to_b);
    // State the next connection must not inherit.
    assert_eq!(
        b.ctrl(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes()
        ),
        VIRTIO_NET_OK
    );

    for round in 0..2u8 {
        // The guest of B goes away; A keeps transmitting meanwhile.
        drop(b);
        let lost = udp_frame(MAC_B, MAC_A, 8, 8, b"sent while b is away.............");
        a.send(0, &lost);
        a.wait_tx_done(0);

        b = Nic::connect(&daemon.socket("b"), PAIRS);
        assert_eq!(
            daemon.counter("/devices/1/active_pairs"),
            1,
            "the new connection starts from a reset device"
        );
        b.post_rx(0, 32);
        let to_b = udp_frame(MAC_B, MAC_A, 9, 9, &[round; 200]);
        a.send(0, &to_b);
        let got = b.recv(&[0], 1, false);
        assert!(got[0].frame == to_b, "round {round}: wrong frame on B");
        let to_a = udp_frame(MAC_A, MAC_B, 9, 9, &[round ^ 0xff; 200]);
        b.send(0, &to_a);
        let got = a.recv(&[0], 1, true);
        assert!(got[0].frame == to_a, "round {round}: wrong frame on A");
    }
    // A's connection was never disturbed.
    assert!(daemon.counter("/devices/0/queues/0/tx_packets") >= 5);
}
