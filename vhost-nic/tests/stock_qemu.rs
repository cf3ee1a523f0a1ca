//! The `vhost-nic` binary as a plain vhost-user-net backend for stock
//! QEMU (`-netdev vhost-user` + `-device virtio-net-pci`), replayed
//! without QEMU: ring enables before SET_FEATURES, features without a
//! control queue, queue pairs switched by ring enables; and a frontend
//! sending garbage, which must cost it its connection and nothing else.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use common::frontend::*;
use common::net::*;
use common::process::Daemon;
use common::TIMEOUT;
use vhost::vhost_user::VhostUserFrontend;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAIRS: u16 = 2;

/// What QEMU sends while attaching the netdev: pair 0 enabled, the other
/// pairs disabled (the driver has not asked for them).
fn attach_enables(pairs: u16) -> Vec<(usize, bool)> {
    (0..pairs)
        .flat_map(|p| [(rx_vring(p), p == 0), (tx_vring(p), p == 0)])
        .collect()
}

/// `n` TCP frames from A to B with distinct source ports (distinct flows).
fn flows(n: u16, base_port: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| tcp_frame(MAC_B, MAC_A, base_port + i, 80, &i.to_be_bytes().repeat(40)))
        .collect()
}

/// Sends `frames` from `a` and returns, per receive queue of `b`, how many
/// arrived there; every frame must arrive once, intact.
fn deliver(a: &mut Nic, b: &mut Nic, frames: &[Vec<u8>]) -> [usize; PAIRS as usize] {
    for f in frames {
        a.send(0, f);
    }
    let all: Vec<u16> = (0..PAIRS).collect();
    let got = b.recv(&all, frames.len(), true);
    assert_eq!(got.len(), frames.len(), "frames received");
    let mut left: HashSet<&Vec<u8>> = frames.iter().collect();
    let mut per_queue = [0; PAIRS as usize];
    for r in &got {
        assert!(left.remove(&r.frame), "unexpected or duplicate frame");
        per_queue[usize::from(r.pair)] += 1;
    }
    per_queue
}

#[test]
fn qemu_virtio_net_pci_order_and_queue_pairs_by_ring_enable() {
    let daemon = Daemon::start_pair(PAIRS);
    let mut a = Nic::connect(&daemon.socket("a"), PAIRS);
    // A uses both of its queue pairs, so only B's steering decides.
    assert_eq!(
        a.ctrl(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes()
        ),
        VIRTIO_NET_OK
    );
    for round in 0..2u16 {
        // A QEMU restart: the same order again on a fresh connection.
        let mut b =
            Nic::connect_like_stock_qemu(&daemon.socket("b"), PAIRS, &attach_enables(PAIRS));
        assert_eq!(b.queue_num, 6, "pairs, control and admin queue");
        let acked = daemon.stats()["devices"][1]["acked_features"]
            .as_str()
            .map(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap());
        assert_eq!(acked, Some(stock_qemu_features()), "round {round}");
        b.post_rx(0, 128);
        b.post_rx(1, 128);

        // Pair 0 works on the enables sent before SET_FEATURES alone, and
        // pair 1 is off: every flow lands on receive queue 0.
        let base = 10_000 + 1000 * round;
        assert_eq!(deliver(&mut a, &mut b, &flows(32, base)), [32, 0]);

        // `ethtool -L combined 2`: QEMU enables pair 1's rings.
        for index in [rx_vring(1), tx_vring(1)] {
            b.fe.set_vring_enable(index, true)
                .expect("SET_VRING_ENABLE");
        }
        let spread = deliver(&mut a, &mut b, &flows(64, base + 100));
        assert!(
            spread[0] > 0 && spread[1] > 0,
            "64 flows over 2 enabled pairs: {spread:?}"
        );
        // Pair 1 transmits too.
        let reply = udp_frame(MAC_A, MAC_B, 9, 9, b"from b's second pair............");
        a.post_rx(0, 4);
        a.post_rx(1, 4);
        b.send(1, &reply);
        assert!(a.recv(&[0, 1], 1, true)[0].frame == reply);

        // `ethtool -L combined 1`: back to pair 0 only.
        for index in [rx_vring(1), tx_vring(1)] {
            b.fe.set_vring_enable(index, false)
                .expect("SET_VRING_ENABLE");
        }
        assert_eq!(deliver(&mut a, &mut b, &flows(32, base + 200)), [32, 0]);
        let drops = daemon.stats()["devices"][1]["queues"].clone();
        for q in drops.as_array().unwrap() {
            let total: u64 = q["rx_drops"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum();
            assert_eq!(total, 0, "round {round}: rx drops {}", q["rx_drops"]);
        }
    }
}

/// Connects to `socket` and writes `bytes` with `fds` attached.
fn send_raw(socket: &std::path::Path, bytes: &[u8], fds: &[i32]) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.send_with_fds(&[bytes], fds).expect("send");
    s
}

/// Waits until the daemon closes `s` (EOF or reset); panics on a reply or
/// a timeout.
fn expect_closed(mut s: UnixStream, what: &str) {
    let deadline = Instant::now() + TIMEOUT;
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => panic!("{what}: the daemon answered {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => assert!(
                Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ),
                "{what}: connection still open: {e}"
            ),
        }
    }
}

#[test]
fn malformed_frontend_messages_cost_only_their_connection() {
    let daemon = Daemon::start_pair(1);
    let sock = daemon.socket("b");
    let mut enable_payload = 0u32.to_ne_bytes().to_vec();
    enable_payload.extend_from_slice(&7u32.to_ne_bytes());
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        // GET_FEATURES announcing a 4 GiB payload.
        (
            "huge payload size",
            {
                let mut m = raw_message(1, VHOST_USER_VERSION, &[]);
                m[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
                m
            },
            0,
        ),
        (
            "early SET_VRING_ENABLE with state 7",
            raw_message(
                VHOST_USER_SET_VRING_ENABLE,
                VHOST_USER_VERSION,
                &enable_payload,
            ),
            0,
        ),
        (
            "early SET_VRING_ENABLE of vring 1000",
            raw_message(
                VHOST_USER_SET_VRING_ENABLE,
                VHOST_USER_VERSION,
                &[1000u32.to_ne_bytes(), 1u32.to_ne_bytes()].concat(),
            ),
            0,
        ),
        (
            "64 descriptors on SET_VRING_KICK",
            raw_message(12, VHOST_USER_VERSION, &0u64.to_ne_bytes()),
            64,
        ),
    ];
    let (spare, _peer) = UnixStream::pair().unwrap();
    for (what, bytes, nfds) in cases {
        let fds = vec![spare.as_raw_fd(); nfds];
        expect_closed(send_raw(&sock, &bytes, &fds), what);
    }
    // Half a message, then the frontend goes away.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(&raw_message(2, VHOST_USER_VERSION, &[0; 8])[..10])
        .unwrap();
    drop(s);

    // The daemon still serves: the other device was never disturbed, and
    // this one takes the next frontend.
    let mut a = Nic::connect(&daemon.socket("a"), 1);
    let mut b = Nic::connect_like_stock_qemu(&sock, 1, &attach_enables(1));
    b.post_rx(0, 8);
    let frame = udp_frame(MAC_B, MAC_A, 1, 2, b"after the garbage, a good frame...");
    a.send(0, &frame);
    assert!(b.recv(&[0], 1, false)[0].frame == frame);
    // The device serves one connection at a time and logs why each ended
    // before it accepts the next: every refusal is in the log by now.
    let log = std::fs::read_to_string(daemon.log_path()).unwrap();
    for needle in [
        "payload (at most",
        "state is neither 0 nor 1",
        "no such vring",
        "more than 32 file descriptors",
    ] {
        assert!(log.contains(needle), "daemon log lacks `{needle}`:\n{log}");
    }
}
