//! End-to-end tests of `NetDevice` driven through mock virtqueues, the way
//! a virtio-net driver would use it, without vhost-user: two devices joined
//! by a wire, frames sent on one's TX queue and received on the other's RX
//! queues, control and admin commands through their queues.

mod support;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use support::fuzz;
use support::*;
use vhost_nic::admin::*;
use vhost_nic::config::SUPPORTED_HASH_TYPES;
use vhost_nic::device::{NetDevice, DEFAULT_RSS_KEY};
use vhost_nic::flow_filter::*;
use vhost_nic::hdr::{VirtioNetHdr, HDR_LEN, VIRTIO_NET_HDR_F_SPLIT};
use vhost_nic::memory::RegionKind;
use vhost_nic::offload::{complete_checksum, verify_ipv4_header_checksum, verify_l4_checksum};
use vhost_nic::packet::{parse, ParsedPacket, ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP};
use vhost_nic::rss::{compute_hash, parse_rss_config, RssConfig, RssLimits, ToeplitzKey};
use vhost_nic::rx::SplitParams;
use vhost_nic::spec::*;
use vhost_nic::stats::DropReason;
use vm_memory::GuestAddress;

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;
const MQ: u8 = VIRTIO_NET_CTRL_MQ as u8;
const RSS_CONFIG: u8 = VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8;
const PAIRS_SET: u8 = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
const SPLIT: u8 = VIRTIO_NET_CTRL_SPLIT_HEADER;
const SPLIT_SET: u8 = VIRTIO_NET_CTRL_SPLIT_HEADER_SET;
const TCP_HASHES: u32 =
    VIRTIO_NET_RSS_HASH_TYPE_IPv4 | VIRTIO_NET_RSS_HASH_TYPE_TCPv4 | VIRTIO_NET_RSS_HASH_TYPE_UDPv4;

const GROUP: u16 = VIRTIO_NET_RESOURCE_OBJ_FF_GROUP;
const CLASSIFIER: u16 = VIRTIO_NET_RESOURCE_OBJ_FF_CLASSIFIER;
const RULE: u16 = VIRTIO_NET_RESOURCE_OBJ_FF_RULE;
const ALL_FIELDS: Match = Match {
    src_ip: true,
    dst_ip: true,
    sport: true,
    dport: true,
};

/// Runs `f` under a watchdog: a device loop that spins must fail the test
/// run (the watchdog aborts the process), not hang it.
fn within<T>(secs: u64, f: impl FnOnce() -> T) -> T {
    let (done, wait) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(Duration::from_secs(secs)) {
            eprintln!("device processing did not return within {secs} s; aborting");
            std::process::abort();
        }
    });
    let v = f();
    drop(done);
    watchdog.join().unwrap();
    v
}

/// (address, length, flags) of a descriptor.
type Desc = (u64, u32, u16);

fn rx_drops(nic: &Nic, pair: u16, r: DropReason) -> u64 {
    nic.dev.queue_stats[usize::from(pair)].rx_drops.get(r).get()
}

fn tx_drops(nic: &Nic, pair: u16, r: DropReason) -> u64 {
    nic.dev.queue_stats[usize::from(pair)].tx_drops.get(r).get()
}

/// A frame A sends and B receives intact on queue 0.
fn assert_forwards(a: &mut Nic, b: &mut Nic, payload: usize) {
    let f = tcp4(MAC_B, &Flow::nth(999), payload);
    a.send(&f);
    let got = b.receive(0, 1);
    assert_eq!(got.len(), 1, "device stopped forwarding");
    assert_eq!(got[0].frame, f);
}

fn rss_limits() -> RssLimits {
    RssLimits {
        max_key_size: 40,
        max_indirection_len: 128,
        supported_hash_types: SUPPORTED_HASH_TYPES,
        num_queue_pairs: PAIRS,
    }
}

fn test_key() -> Vec<u8> {
    (0..40u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect()
}

/// Configures RSS on `nic` (4 queues, round robin table) and returns the
/// configuration the device parsed, to predict its choices.
fn configure_rss(nic: &mut Nic, hash_types: u32, unclassified: u16) -> RssConfig {
    let cmd = rss_config(
        hash_types,
        &round_robin_table(128, PAIRS),
        unclassified,
        PAIRS,
        &test_key(),
    );
    assert_eq!(nic.ctrl(MQ, RSS_CONFIG, &cmd), OK);
    parse_rss_config(&cmd, &rss_limits()).unwrap()
}

// ---------------------------------------------------------------------------
// Features and config space
// ---------------------------------------------------------------------------

#[test]
fn feature_negotiation_drops_unoffered_bits() {
    let mut opts = options("plain", MAC_A);
    opts.admin_vq = false;
    opts.split_header = false;
    let dev = NetDevice::new(opts).unwrap();
    let offered = dev.offered_features();
    let unoffered = [
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_CTRL_VLAN,
        VIRTIO_NET_F_GUEST_ANNOUNCE,
        VIRTIO_F_ADMIN_VQ,
        VIRTIO_NET_F_SPLIT_HEADER,
        63,
    ];
    for b in unoffered {
        assert_eq!(offered & bit(b), 0, "bit {b} is offered");
    }
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_RSS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_F_RING_RESET,
    ] {
        assert_ne!(offered & bit(b), 0, "bit {b} not offered");
    }

    let wanted = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_GUEST_CSUM);
    let junk = unoffered.iter().fold(0u64, |acc, &b| acc | bit(b));
    dev.set_acked_features(wanted | junk);
    assert_eq!(dev.acked_features(), wanted);
    assert!(unoffered.iter().all(|&b| !dev.has_feature(b)));
    // The receive offloads follow the negotiated GUEST_* bits.
    assert_eq!(dev.control().guest_offloads, bit(VIRTIO_NET_F_GUEST_CSUM));
    assert!(dev.receive_offloads().csum && !dev.receive_offloads().tso4);

    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features(), offered);
    dev.reset();
    assert_eq!(dev.acked_features(), 0);

    // The admin queue and header split are offered only when enabled.
    let full = NetDevice::new(options("full", MAC_B)).unwrap();
    full.set_acked_features(u64::MAX);
    assert!(full.has_feature(VIRTIO_F_ADMIN_VQ));
    assert!(full.has_feature(VIRTIO_NET_F_SPLIT_HEADER));
}

#[test]
fn config_space_reads() {
    let dev = NetDevice::new(options("cfg", MAC_A)).unwrap();
    let c = dev.read_config(0, CFG_SIZE as u32);
    assert_eq!(c.len(), CFG_SIZE);
    assert_eq!(&c[CFG_MAC..CFG_MAC + 6], &MAC_A);
    let le16 = |o: usize| u16::from_le_bytes([c[o], c[o + 1]]);
    assert_eq!(le16(CFG_STATUS), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(le16(CFG_MAX_VQ_PAIRS), PAIRS);
    assert_eq!(le16(CFG_MTU), 1500);
    assert_eq!(c[CFG_RSS_MAX_KEY_SIZE], 40);
    assert_eq!(le16(CFG_RSS_MAX_INDIRECTION_LEN), 128);
    assert_eq!(
        u32::from_le_bytes(
            c[CFG_SUPPORTED_HASH_TYPES..CFG_SUPPORTED_HASH_TYPES + 4]
                .try_into()
                .unwrap()
        ),
        SUPPORTED_HASH_TYPES
    );
    assert_eq!(le16(CFG_SPLIT_HEADER_BUF_LEN), SPLIT_HEADER_BUF_LEN);

    // Partial reads, up to the last byte.
    assert_eq!(
        dev.read_config(CFG_MAX_VQ_PAIRS as u32, 2),
        PAIRS.to_le_bytes()
    );
    assert_eq!(dev.read_config(CFG_SIZE as u32 - 1, 1).len(), 1);
    assert_eq!(dev.read_config(0, 0), Vec::<u8>::new());
    // Out of range: empty answers, never a panic.
    for (off, len) in [
        (CFG_SIZE as u32, 1),
        (CFG_SIZE as u32 - 2, 4),
        (30, 4),
        (0, CFG_SIZE as u32 + 1),
        (u32::MAX, 1),
        (1, u32::MAX),
        (u32::MAX, u32::MAX),
    ] {
        assert!(dev.read_config(off, len).is_empty(), "read {off}+{len}");
    }

    dev.set_link(false);
    assert_eq!(dev.read_config(CFG_STATUS as u32, 2), [0, 0]);

    // Without header split the field reads as zero.
    let mut opts = options("nosplit", MAC_A);
    opts.split_header = false;
    let dev = NetDevice::new(opts).unwrap();
    assert_eq!(dev.read_config(CFG_SPLIT_HEADER_BUF_LEN as u32, 2), [0, 0]);
}

#[test]
fn config_space_mac_writable_only_without_ctrl_mac_addr() {
    let mut nic = Nic::new("cfgw", MAC_A, BASE, false);
    let dev = nic.dev.clone();
    dev.write_config(0, &MAC_OTHER).unwrap();
    assert_eq!(dev.read_config(0, 6), MAC_OTHER);
    assert_eq!(dev.control().mac.0, MAC_OTHER);
    // Part of the MAC.
    dev.write_config(4, &[0xaa, 0xbb]).unwrap();
    assert_eq!(dev.read_config(4, 2), [0xaa, 0xbb]);
    // Anything beyond the MAC is read only, including writes straddling it.
    let rejected = || dev.stats.config_writes_rejected.get();
    for (off, data) in [
        (CFG_STATUS as u32, &[0u8, 0][..]),
        (4, &[1, 2, 3, 4][..]),
        (CFG_MTU as u32, &[0x10, 0][..]),
        (u32::MAX, &[1][..]),
    ] {
        let before = rejected();
        assert!(dev.write_config(off, data).is_err(), "write at {off}");
        assert_eq!(rejected(), before + 1);
    }
    assert_eq!(dev.read_config(CFG_MTU as u32, 2), 1500u16.to_le_bytes());
    // Control MAC commands need CTRL_MAC_ADDR.
    assert_eq!(
        nic.ctrl(
            VIRTIO_NET_CTRL_MAC as u8,
            VIRTIO_NET_CTRL_MAC_ADDR_SET as u8,
            &MAC_B
        ),
        ERR
    );

    // With CTRL_MAC_ADDR the MAC changes through the control queue only.
    dev.set_acked_features(BASE | bit(VIRTIO_NET_F_CTRL_MAC_ADDR));
    let mac = dev.read_config(0, 6);
    assert!(dev.write_config(0, &MAC_B).is_err());
    assert_eq!(dev.read_config(0, 6), mac);
    nic.ctrl_ok(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &MAC_B);
    assert_eq!(dev.read_config(0, 6), MAC_B);
    // A multicast address is refused.
    let mut multicast = MAC_B;
    multicast[0] |= 1;
    assert_eq!(
        nic.ctrl(
            VIRTIO_NET_CTRL_MAC as u8,
            VIRTIO_NET_CTRL_MAC_ADDR_SET as u8,
            &multicast
        ),
        ERR
    );
    assert_eq!(dev.read_config(0, 6), MAC_B);
}

// ---------------------------------------------------------------------------
// Multiqueue, RSS, flow filter
// ---------------------------------------------------------------------------

/// The queue automatic steering picks before RSS is configured.
fn auto_queue(frame: &[u8], active: u16) -> u16 {
    let key = ToeplitzKey::new(&DEFAULT_RSS_KEY).unwrap();
    let hash = compute_hash(&key, SUPPORTED_HASH_TYPES, &parse(frame)).map_or(0, |(h, _)| h);
    (hash % u32::from(active)) as u16
}

#[test]
fn mq_enabled_by_control_command() {
    let (mut a, mut b) = pair(BASE, BASE | bit(VIRTIO_NET_F_MQ));
    let frames: Vec<Vec<u8>> = (0..48).map(|i| tcp4(MAC_B, &Flow::nth(i), 64)).collect();
    // One queue pair until the driver asks for more.
    for f in &frames {
        a.send(f);
    }
    assert_eq!(b.dev.backlog_len(0), frames.len());
    let got = b.receive_all();
    assert_eq!(got[0].len(), frames.len());

    for bad in [vec![0, 0], vec![5, 0], vec![4], vec![4, 0, 0]] {
        assert_eq!(b.ctrl(MQ, PAIRS_SET, &bad), ERR, "VQ_PAIRS_SET {bad:?}");
    }
    assert_eq!(b.dev.control().active_pairs, 1);
    b.ctrl_ok(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        &PAIRS.to_le_bytes(),
    );
    assert_eq!(b.dev.control().active_pairs, PAIRS);

    for f in &frames {
        a.send(f);
    }
    let got = b.receive_all();
    for (q, rx) in got.iter().enumerate() {
        assert!(!rx.is_empty(), "queue {q} got nothing");
        for r in rx {
            assert_eq!(auto_queue(&r.frame, PAIRS), q as u16);
            assert!(frames.contains(&r.frame));
        }
    }
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), frames.len());

    // A driver without MQ cannot change the number of pairs.
    assert_eq!(a.ctrl(MQ, PAIRS_SET, &2u16.to_le_bytes()), ERR);
}

#[test]
fn rss_spreads_over_four_queues_with_hash_report() {
    let fb = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_RSS) | bit(VIRTIO_NET_F_HASH_REPORT);
    let (mut a, mut b) = pair(BASE, fb);
    let cfg = configure_rss(&mut b, TCP_HASHES, 2);
    assert_eq!(b.dev.control().active_pairs, PAIRS);
    assert_eq!(b.vnet_hdr_len(), 20);

    let mut frames: Vec<Vec<u8>> = (0..64).map(|i| tcp4(MAC_B, &Flow::nth(i), 100)).collect();
    frames.extend((0..16).map(|i| udp4(MAC_B, &Flow::nth(100 + i), 100)));
    // Not IP: unclassified.
    let mut arp = vec![0u8; 42];
    arp[0..6].copy_from_slice(&BROADCAST);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    frames.push(arp.clone());
    for f in &frames {
        a.send(f);
    }
    let got = b.receive_all();
    let mut seen = 0;
    for (q, rx) in got.iter().enumerate() {
        assert!(!rx.is_empty(), "queue {q} got nothing");
        for r in rx {
            let d = cfg.select_queue(&parse(&r.frame));
            assert_eq!(d.queue, q as u16);
            assert_eq!(r.hdr.hash_value, d.hash_value);
            assert_eq!(r.hdr.hash_report, d.hash_report);
            let p = parse(&r.frame);
            let want = if p.is_tcp() {
                VIRTIO_NET_HASH_REPORT_TCPv4
            } else if p.is_udp() {
                VIRTIO_NET_HASH_REPORT_UDPv4
            } else {
                VIRTIO_NET_HASH_REPORT_NONE
            };
            assert_eq!(u32::from(r.hdr.hash_report), want);
            seen += 1;
        }
    }
    assert_eq!(seen, frames.len());
    assert!(got[2].iter().any(|r| r.frame == arp));

    // With HASH_REPORT the driver's TX header has the hash fields too.
    let back = udp4(MAC_A, &Flow::nth(7), 300);
    b.send(&back);
    assert_eq!(a.receive(0, 1)[0].frame, back);

    // VQ_PAIRS_SET replaces RSS with automatic steering.
    b.ctrl_ok(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        &2u16.to_le_bytes(),
    );
    assert!(b.dev.control().rss.is_none());
    for f in &frames[..16] {
        a.send(f);
    }
    let got = b.receive_all();
    assert_eq!(got[0].len() + got[1].len(), 16);
}

#[test]
fn symmetric_hash_fields_steer_both_directions_to_one_queue() {
    use vhost_nic::hash_fields::*;
    let fb = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_RSS) | bit(VIRTIO_NET_F_HASH_REPORT);
    let (mut a, mut b) = pair(BASE, fb);
    let cfg = configure_rss(&mut b, TCP_HASHES, 0);
    let flows: Vec<Flow> = (0..32).map(Flow::nth).collect();
    let reversed = |f: &Flow| Flow::new(f.dst, f.src, f.dport, f.sport);
    // Per received frame: (queue, hash) of the flow and of its reverse.
    let steer = |a: &mut Nic, b: &mut Nic| -> Vec<((u16, u32), (u16, u32))> {
        let mut out = Vec::new();
        for f in &flows {
            let mut got = Vec::new();
            for flow in [*f, reversed(f)] {
                a.send(&tcp4(MAC_B, &flow, 10));
                let rx = b.receive_all();
                let (q, r) = rx
                    .iter()
                    .enumerate()
                    .find_map(|(q, r)| r.first().map(|r| (q as u16, r.clone())))
                    .unwrap();
                assert_eq!(u32::from(r.hdr.hash_report), VIRTIO_NET_HASH_REPORT_TCPv4);
                got.push((q, r.hdr.hash_value));
            }
            out.push((got[0], got[1]));
        }
        out
    };
    // The spec's fields: the directions of a flow hash apart.
    let plain = steer(&mut a, &mut b);
    assert!(plain.iter().all(|(x, y)| x.1 != y.1));
    for (i, f) in flows.iter().enumerate() {
        let d = cfg.select_queue(&parse(&tcp4(MAC_B, f, 10)));
        assert_eq!(plain[i].0, (d.queue, d.hash_value));
    }

    let mut set = encode_set(&SPEC_FIELDS);
    set[0] = VIRTIO_NET_HASH_XFRM_SYM_XOR;
    let fields_class = u32::from(VIRTIO_NET_CTRL_HASH_FIELDS);
    b.ctrl_ok(
        fields_class,
        u32::from(VIRTIO_NET_CTRL_HASH_FIELDS_SET),
        &set,
    );
    let sym = steer(&mut a, &mut b);
    assert!(sym.iter().all(|(x, y)| x == y), "{sym:?}");
    let queues: std::collections::BTreeSet<u16> = sym.iter().map(|(x, _)| x.0).collect();
    assert!(
        queues.len() > 1,
        "symmetric hashing spread nothing: {queues:?}"
    );

    // An asymmetric selection is refused with the transform on, and changes
    // nothing.
    // fields[1] (TCPv4) is at byte 6.
    set[6..8].copy_from_slice(&VIRTIO_NET_HASH_FIELD_SRC_IP.to_le_bytes());
    assert_eq!(
        b.ctrl(
            VIRTIO_NET_CTRL_HASH_FIELDS,
            VIRTIO_NET_CTRL_HASH_FIELDS_SET,
            &set
        ),
        ERR
    );
    assert_eq!(steer(&mut a, &mut b), sym);
    assert_eq!(b.dev.stats.hash_fields_commands.get(), 2);
    assert_eq!(b.dev.stats.hash_fields_errors.get(), 1);

    // Without the transform, the source address alone: flows differing in
    // ports only share a hash.
    set[0] = 0;
    b.ctrl_ok(
        fields_class,
        u32::from(VIRTIO_NET_CTRL_HASH_FIELDS_SET),
        &set,
    );
    let src_only = steer(&mut a, &mut b);
    assert!(src_only.iter().all(|(x, _)| *x == src_only[0].0));
    assert!(src_only.iter().all(|(x, y)| x.1 != y.1));
}

/// A flow RSS sends to a queue other than `not`.
fn flow_not_on(cfg: &RssConfig, not: u16) -> Flow {
    (0..)
        .map(Flow::nth)
        .find(|f| cfg.select_queue(&parse(&tcp4(MAC_B, f, 0))).queue != not)
        .unwrap()
}

#[test]
fn flow_filter_steers_a_flow_and_drops_another() {
    let fb = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_RSS) | bit(VIRTIO_F_ADMIN_VQ);
    let (mut a, mut b) = pair(BASE, fb);
    let cfg = configure_rss(&mut b, TCP_HASHES, 0);
    b.flow_filter_init(1);

    // ethtool -U flow-type tcp4 src-ip .. dst-ip .. src-port .. dst-port .. action 3
    let target = flow_not_on(&cfg, 3);
    b.create_ok(CLASSIFIER, 0, &ipv4_l4_classifier(IPPROTO_TCP, ALL_FIELDS));
    b.create_ok(
        RULE,
        0,
        &rule(1, 0, 0, Some(3), &ipv4_l4_key(IPPROTO_TCP, &target)),
    );
    // ethtool -U flow-type udp4 dst-port 53 action -1
    let dns = Flow::new([10, 0, 0, 1], [10, 0, 0, 2], 5353, 53);
    let by_dport = Match {
        dport: true,
        ..Match::default()
    };
    b.create_ok(CLASSIFIER, 1, &ipv4_l4_classifier(IPPROTO_UDP, by_dport));
    b.create_ok(
        RULE,
        1,
        &rule(1, 1, 0, None, &ipv4_l4_key(IPPROTO_UDP, &dns)),
    );

    let target_frames: Vec<Vec<u8>> = (0..8).map(|i| tcp4(MAC_B, &target, 10 + i)).collect();
    let others: Vec<Vec<u8>> = (1000..1040)
        .map(|i| tcp4(MAC_B, &Flow::nth(i), 100))
        .chain((0..4).map(|i| udp4(MAC_B, &Flow::nth(2000 + i), 100)))
        .collect();
    for (i, f) in others.iter().enumerate() {
        a.send(f);
        if let Some(t) = target_frames.get(i) {
            a.send(t);
        }
        if i < 4 {
            let src = Flow::new(dns.src, dns.dst, 6000 + i as u16, 53);
            a.send(&udp4(MAC_B, &src, 40));
        }
    }
    let got = b.receive_all();
    let on3: Vec<&Vec<u8>> = got[3].iter().map(|r| &r.frame).collect();
    for t in &target_frames {
        assert!(on3.contains(&t), "flow filter did not steer to queue 3");
    }
    for (q, rx) in got.iter().enumerate() {
        for r in rx.iter().filter(|r| !target_frames.contains(&r.frame)) {
            assert!(others.contains(&r.frame));
            assert_eq!(
                cfg.select_queue(&parse(&r.frame)).queue,
                q as u16,
                "not RSS"
            );
        }
    }
    let delivered: usize = got.iter().map(Vec::len).sum();
    assert_eq!(delivered, target_frames.len() + others.len());
    assert_eq!(rx_drops(&b, 0, DropReason::FlowFilterDrop), 4);
    let hits: std::collections::HashMap<u32, u64> =
        b.dev.admin().flow_filter().rule_hits().collect();
    assert_eq!((hits[&0], hits[&1]), (8, 4));

    // Without the rule the flow follows RSS again.
    assert_eq!(status(&b.destroy(RULE, 0)), (0, 0));
    a.send(&target_frames[0]);
    let q = cfg.select_queue(&parse(&target_frames[0])).queue;
    assert_eq!(b.dev.backlog_len(q), 1);
    assert_eq!(b.receive(q, 1)[0].frame, target_frames[0]);
}

#[test]
fn flow_filter_groups_by_priority_rules_by_priority() {
    let fb = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_F_ADMIN_VQ);
    let (mut a, mut b) = pair(BASE, fb);
    b.ctrl_ok(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        &PAIRS.to_le_bytes(),
    );
    b.flow_filter_init(4);
    // Group 1 (priority 1) exists; 2 gets priority 10, 3 priority 5.
    b.create_ok(GROUP, 2, &10u16.to_le_bytes());
    b.create_ok(GROUP, 3, &5u16.to_le_bytes());
    let dup = b.create(GROUP, 4, &5u16.to_le_bytes());
    assert_eq!(
        status(&dup),
        (
            VIRTIO_ADMIN_STATUS_EINVAL,
            VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD
        )
    );
    let port_only = Match {
        dport: true,
        ..Match::default()
    };
    let ip_only = Match {
        dst_ip: true,
        ..Match::default()
    };
    b.create_ok(CLASSIFIER, 0, &ipv4_l4_classifier(IPPROTO_TCP, port_only));
    b.create_ok(CLASSIFIER, 1, &ipv4_l4_classifier(IPPROTO_TCP, ip_only));

    let x = Flow::new([10, 0, 0, 1], [10, 0, 0, 2], 1111, 7000);
    let y = Flow::new([10, 0, 0, 1], [10, 0, 0, 9], 2222, 7001);
    let kx = ipv4_l4_key(IPPROTO_TCP, &x);
    let ky = ipv4_l4_key(IPPROTO_TCP, &y);
    let fx = tcp4(MAC_B, &x, 20);
    let fy = tcp4(MAC_B, &y, 20);
    let queue_of = |a: &mut Nic, b: &mut Nic, f: &[u8]| {
        a.send(f);
        let q = (0..PAIRS)
            .find(|&q| b.dev.backlog_len(q) == 1)
            .expect("not delivered");
        assert_eq!(b.receive(q, 1)[0].frame, f);
        q
    };

    // Group 1: x by port to queue 1.
    b.create_ok(RULE, 0, &rule(1, 0, 0, Some(1), &kx));
    assert_eq!(queue_of(&mut a, &mut b, &fx), 1);
    // Group 3 (priority 5) beats group 1 (priority 1).
    b.create_ok(RULE, 1, &rule(3, 0, 0, Some(3), &kx));
    assert_eq!(queue_of(&mut a, &mut b, &fx), 3);
    // Group 2 (priority 10) beats both, even with a low rule priority.
    b.create_ok(RULE, 2, &rule(2, 1, 0, Some(2), &kx));
    assert_eq!(queue_of(&mut a, &mut b, &fx), 2);
    assert_eq!(status(&b.destroy(RULE, 2)), (0, 0));
    assert_eq!(queue_of(&mut a, &mut b, &fx), 3);

    // Within group 1: y matches a port rule (priority 1) and an address
    // rule (priority 7); the higher rule priority wins.
    b.create_ok(RULE, 3, &rule(1, 0, 1, Some(1), &ky));
    b.create_ok(RULE, 4, &rule(1, 1, 7, Some(0), &ky));
    assert_eq!(queue_of(&mut a, &mut b, &fy), 0);
    assert_eq!(status(&b.destroy(RULE, 4)), (0, 0));
    assert_eq!(queue_of(&mut a, &mut b, &fy), 1);

    // A group with rules cannot be re-prioritised or destroyed.
    let mut d = obj_hdr(GROUP, 3);
    d.extend_from_slice(&0u64.to_le_bytes());
    d.extend_from_slice(&20u16.to_le_bytes());
    let res = b.admin(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY, &d);
    // MODIFY is not in Linux's command list.
    assert_eq!(
        status(&res),
        (
            VIRTIO_ADMIN_STATUS_EINVAL,
            VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE
        )
    );
    assert_eq!(status(&b.destroy(GROUP, 3)).0, VIRTIO_ADMIN_STATUS_EBUSY);
    // Emptied, it can go, and x falls back to group 1.
    assert_eq!(status(&b.destroy(RULE, 1)), (0, 0));
    assert_eq!(status(&b.destroy(GROUP, 3)), (0, 0));
    assert_eq!(queue_of(&mut a, &mut b, &fx), 1);
}

// ---------------------------------------------------------------------------
// Header split
// ---------------------------------------------------------------------------

#[test]
fn header_split_end_to_end_with_device_memory() {
    let fb = BASE | bit(VIRTIO_NET_F_SPLIT_HEADER);
    let (mut a, mut b) = pair_with(BASE, fb, true);
    let regions = b.dev.regions();
    assert_eq!(
        regions.kind(GuestAddress(0x1000), 64),
        Some(RegionKind::Ram)
    );
    assert_eq!(
        regions.kind(GuestAddress(DEV_MEM), 64),
        Some(RegionKind::Device)
    );
    let dev = b.dev.clone();
    let stats = &dev.queue_stats[0];
    let buf_len = b.dev.read_config(CFG_SPLIT_HEADER_BUF_LEN as u32, 2);
    let hb_len = usize::from(u16::from_le_bytes([buf_len[0], buf_len[1]]));
    assert_eq!(hb_len, 256);

    // Malformed enables are refused and change nothing.
    for bad in [
        split_header(2, 0),
        vec![1, 1, 0, 0, 0, 0, 0, 0],
        vec![1, 0, 0, 0],
        vec![1, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_eq!(b.ctrl(SPLIT, SPLIT_SET, &bad), ERR, "{bad:?}");
    }
    assert_eq!(b.dev.control().split, None);
    assert_eq!(b.ctrl(SPLIT, SPLIT_SET, &split_header(1, 128)), OK);
    assert_eq!(
        b.dev.control().split,
        Some(SplitParams {
            hdr_buf_len: 256,
            threshold: 128
        })
    );
    // A device without the feature negotiated refuses the command.
    assert_eq!(a.ctrl(SPLIT, SPLIT_SET, &split_header(1, 128)), ERR);

    // TCP with 1000 bytes of payload: split.
    let flow = Flow::nth(7);
    let f = tcp4(MAC_B, &flow, 1000);
    let (head, hb, pb) = b.post_rx_split(0, hb_len, 4096, true);
    b.write(hb, &[0xaa; 256]);
    a.send(&f);
    b.kick_rx(0);
    assert_eq!(b.rx[0].take_used(), [(head, (HDR_LEN + 54 + 1000) as u32)]);
    let h = VirtioNetHdr::from_bytes(&b.read(hb, HDR_LEN)).unwrap();
    assert_ne!(h.flags & VIRTIO_NET_HDR_F_SPLIT, 0);
    assert_eq!((h.hdr_len, h.num_buffers), (54, 1));
    assert_eq!(b.read(hb + HDR_LEN as u64, 54), f[..54]);
    assert!(b.read(hb + 66, 256 - 66).iter().all(|&x| x == 0xaa));
    assert_eq!(b.read(pb, 1000), f[54..]);
    assert_eq!(stats.rx_split.get(), 1);
    assert_eq!(stats.rx_bytes_to_device_memory.get(), 1000);
    assert_eq!(stats.rx_bytes_to_ram.get(), 66);

    // Payload up to the threshold: not split; the stream fills the header
    // buffer first.
    let small = tcp4(MAC_B, &flow, 128);
    let (head, hb, _) = b.post_rx_split(0, hb_len, 4096, true);
    a.send(&small);
    b.kick_rx(0);
    assert_eq!(
        b.rx[0].take_used(),
        [(head, (HDR_LEN + small.len()) as u32)]
    );
    let h = VirtioNetHdr::from_bytes(&b.read(hb, HDR_LEN)).unwrap();
    assert_eq!(h.flags & VIRTIO_NET_HDR_F_SPLIT, 0);
    assert_eq!(b.read(hb + HDR_LEN as u64, small.len()), small);

    // UDP is never split: 256 bytes in the header buffer, the rest in the
    // payload buffer.
    let u = udp4(MAC_B, &flow, 1000);
    let (head, hb, pb) = b.post_rx_split(0, hb_len, 4096, true);
    a.send(&u);
    b.kick_rx(0);
    let total = HDR_LEN + u.len();
    assert_eq!(b.rx[0].take_used(), [(head, total as u32)]);
    let mut stream = b.read(hb, 256);
    stream.extend(b.read(pb, total - 256));
    assert_eq!(stream[HDR_LEN..], u[..]);
    assert_eq!(stream[0] & VIRTIO_NET_HDR_F_SPLIT, 0);
    assert_eq!(stats.rx_not_split.get(), 2);
    assert_eq!(
        stats.rx_bytes_to_device_memory.get(),
        1000 + (total - 256) as u64
    );

    // Payload buffers in RAM: nothing more lands in device memory.
    let dev_bytes = stats.rx_bytes_to_device_memory.get();
    let ram_bytes = stats.rx_bytes_to_ram.get();
    let (_, _, pb) = b.post_rx_split(0, hb_len, 4096, false);
    a.send(&f);
    b.kick_rx(0);
    assert_eq!(b.rx[0].take_used().len(), 1);
    assert_eq!(b.read(pb, 1000), f[54..]);
    assert_eq!(stats.rx_bytes_to_device_memory.get(), dev_bytes);
    assert_eq!(stats.rx_bytes_to_ram.get(), ram_bytes + 66 + 1000);

    // Split-layout chain errors: header buffer below split_header_buf_len,
    // no payload descriptor. Each is returned empty and counted.
    let bad_chain = || dev.queue_stats[0].rx_drops.bad_chain.get();
    for descs in [
        vec![(0x20_0000, 128, W), (DEV_MEM + 0x8000, 4096, W)],
        vec![(0x20_0000, 4096, W)],
    ] {
        let before = bad_chain();
        let head = b.rx[0].post(&descs);
        a.send(&f);
        b.kick_rx(0);
        assert_eq!(b.rx[0].take_used(), [(head, 0)]);
        assert_eq!(bad_chain(), before + 1);
    }

    // Split off: plain layout again.
    assert_eq!(b.ctrl(SPLIT, SPLIT_SET, &split_header(0, 0)), OK);
    let got = {
        a.send(&f);
        b.receive(0, 1)
    };
    assert_eq!(got[0].frame, f);
    assert_eq!(got[0].hdr.flags & VIRTIO_NET_HDR_F_SPLIT, 0);
    assert_eq!(stats.rx_split.get(), 2);
}

// ---------------------------------------------------------------------------
// Offloads: software segmentation and GSO pass-through
// ---------------------------------------------------------------------------

const MSS: usize = 1460;
/// IPv4 total length 65535: the largest TSO frame.
const TSO_PAYLOAD: usize = 65535 - 40;

fn tso_frame() -> (VirtioNetHdr, Vec<u8>) {
    let f = frame4_partial(MAC_B, IPPROTO_TCP, &Flow::nth(42), TSO_PAYLOAD);
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: MSS as u16,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    (hdr, f)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

#[test]
fn tso_frame_segmented_for_receiver_without_guest_tso() {
    let fa = BASE | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    let (mut a, mut b) = pair(fa, BASE);
    let (hdr, f) = tso_frame();
    assert_eq!(f.len(), 14 + 65535);
    a.send_with(0, &hdr, &f);
    let segments = TSO_PAYLOAD.div_ceil(MSS);
    assert_eq!(b.dev.backlog_len(0), segments);
    assert_eq!(b.dev.queue_stats[0].tx_sw_segmented.get(), 1);

    let got = b.receive(0, segments);
    assert_eq!(got.len(), segments);
    let seq0 = be32(&f[38..]);
    let mut payload = Vec::new();
    for (i, r) in got.iter().enumerate() {
        let s = &r.frame;
        // Complete frames: no offload flags, MTU sized.
        assert_eq!((r.hdr.flags, r.hdr.gso_type), (0, 0));
        assert!(s.len() <= 1514);
        let p: ParsedPacket = parse(s);
        assert!(
            verify_ipv4_header_checksum(s, ETH_HLEN),
            "segment {i}: IP checksum"
        );
        assert!(verify_l4_checksum(s, &p), "segment {i}: TCP checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([s[16], s[17]])),
            s.len() - 14
        );
        assert_eq!(be32(&s[38..]), seq0.wrapping_add((i * MSS) as u32));
        assert_eq!(p.ports(), Some((30042, 5201)));
        if i + 1 < segments {
            assert_eq!(s.len(), 54 + MSS);
            assert_eq!(s[47] & 0x08, 0, "PSH only on the last segment");
        }
        payload.extend_from_slice(&s[54..]);
    }
    assert_eq!(payload, f[54..]);
    assert_eq!(got.last().unwrap().frame[47] & 0x08, 0x08);
}

#[test]
fn tso_frame_passed_through_to_receiver_with_guest_tso() {
    let fa = BASE | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    let fb = BASE
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_MRG_RXBUF);
    let (mut a, mut b) = pair(fa, fb);
    let (hdr, f) = tso_frame();
    a.send_with(0, &hdr, &f);
    assert_eq!(b.dev.backlog_len(0), 1);
    b.post_rx(0, 40, 2048);
    b.kick_rx(0);
    let got = b.take_rx(0);
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(r.hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4 as u8);
    assert_eq!(usize::from(r.hdr.gso_size), MSS);
    assert_eq!(r.hdr.hdr_len, 54);
    assert_ne!(r.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
    assert_eq!((r.hdr.csum_start, r.hdr.csum_offset), (34, 16));
    assert_eq!(
        usize::from(r.hdr.num_buffers),
        (HDR_LEN + f.len()).div_ceil(2048)
    );
    assert_eq!(r.frame, f);
    // The partial checksum completes to a valid one.
    let mut g = r.frame.clone();
    complete_checksum(&mut g, 34, 16).unwrap();
    assert!(verify_l4_checksum(&g, &parse(&g)));
    assert_eq!(b.dev.queue_stats[0].tx_sw_segmented.get(), 0);

    // GUEST_CSUM without GUEST_TSO4: segments with partial checksums.
    b.dev
        .set_acked_features(BASE | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_MRG_RXBUF));
    a.send_with(0, &hdr, &f);
    let n = TSO_PAYLOAD.div_ceil(MSS);
    let got = b.receive(0, n);
    assert_eq!(got.len(), n);
    for r in &got {
        assert_eq!(r.hdr.gso_type, 0);
        assert_ne!(r.hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
        let mut g = r.frame.clone();
        complete_checksum(&mut g, r.hdr.csum_start.into(), r.hdr.csum_offset.into()).unwrap();
        assert!(verify_l4_checksum(&g, &parse(&g)));
    }
}

/// Devmem TCP TX: headers in RAM, payload in device memory the guest
/// exported (a dma-buf), which the driver never reads. The device reads the
/// payload, checksums and segments it, and counts the bytes it read from
/// outside RAM.
#[test]
fn tx_payload_from_device_memory_segmented_and_counted() {
    let fa = BASE | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    let mut a = Nic::new("nic-a", MAC_A, fa, true);
    let mut b = Nic::new("nic-b", MAC_B, BASE, false);
    connect(&a, &b);
    assert_eq!(
        a.dev.regions().kind(GuestAddress(DEV_MEM), 4096),
        Some(RegionKind::Device)
    );
    let dev = a.dev.clone();
    let stats = &dev.queue_stats[0];

    // 3 full segments and a short one, payload in two device memory
    // descriptors split at a page boundary, as net_iov frags are.
    let payload = 3 * MSS + 100;
    let f = frame4_partial(MAC_B, IPPROTO_TCP, &Flow::nth(5), payload);
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: MSS as u16,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    let mut head = vec![0u8; a.vnet_hdr_len()];
    hdr.write_to(&mut head);
    head.extend_from_slice(&f[..54]);
    let h = a.place(&head);
    let p0 = a.alloc_dev(4096);
    let p1 = a.alloc_dev(4096);
    a.write(p0, &f[54..54 + 4096]);
    a.write(p1, &f[54 + 4096..]);
    let id = a.tx[0].post(&[
        (h, head.len() as u32, 0),
        (p0, 4096, 0),
        (p1, (payload - 4096) as u32, 0),
    ]);
    assert!(a.kick_tx(0));
    assert_eq!(a.tx[0].take_used(), [(id, 0)]);
    assert_eq!(stats.tx_packets.get(), 1);
    assert_eq!(stats.tx_bytes.get(), f.len() as u64);
    assert_eq!(stats.tx_bytes_from_device_memory.get(), payload as u64);
    // Segmented toward the peer, which has no GUEST_TSO4.
    assert_eq!(b.dev.queue_stats[0].tx_sw_segmented.get(), 1);

    let got = b.receive(0, 4);
    assert_eq!(got.len(), 4);
    let mut out = Vec::new();
    for (i, r) in got.iter().enumerate() {
        let s = &r.frame;
        assert!(verify_ipv4_header_checksum(s, ETH_HLEN), "segment {i}");
        assert!(verify_l4_checksum(s, &parse(s)), "segment {i}");
        out.extend_from_slice(&s[54..]);
    }
    assert_eq!(out, f[54..]);

    // All of it in RAM: the device memory counter does not move.
    a.send_with(0, &hdr, &f);
    assert_eq!(stats.tx_packets.get(), 2);
    assert_eq!(stats.tx_bytes_from_device_memory.get(), payload as u64);
    assert_eq!(b.receive(0, 4).len(), 4);
}

#[test]
fn rings_wrap_around() {
    // Indices wrap the 256-entry rings several times, one packet at a time
    // and in bursts of a ring's worth.
    let (mut a, mut b) = pair(BASE, BASE | bit(VIRTIO_NET_F_MRG_RXBUF));
    for i in 0..700u16 {
        let f = udp4(MAC_B, &Flow::nth(i), usize::from(i % 1400));
        a.send(&f);
        let got = b.receive(0, 1);
        assert_eq!(got.len(), 1, "packet {i}");
        assert_eq!(got[0].frame, f, "packet {i}");
    }
    for round in 0..3u16 {
        let frames: Vec<Vec<u8>> = (0..QSIZE)
            .map(|i| tcp4(MAC_B, &Flow::nth(round * 1000 + i), 100))
            .collect();
        for f in &frames {
            a.post_tx(0, &VirtioNetHdr::default(), f);
        }
        a.kick_tx(0);
        assert_eq!(a.tx[0].take_used().len(), usize::from(QSIZE));
        let got = b.receive(0, usize::from(QSIZE));
        let got: Vec<Vec<u8>> = got.into_iter().map(|r| r.frame).collect();
        assert_eq!(got, frames);
    }
}

// ---------------------------------------------------------------------------
// Wire and receive filter
// ---------------------------------------------------------------------------

#[test]
fn wire_forwards_both_directions() {
    let (mut a, mut b) = pair(BASE | bit(VIRTIO_NET_F_MQ), BASE);
    let ab = tcp4(MAC_B, &Flow::nth(1), 300);
    let ba = udp4(MAC_A, &Flow::nth(2), 700);
    a.send(&ab);
    b.send(&ba);
    assert_eq!(b.receive(0, 1)[0].frame, ab);
    assert_eq!(a.receive(0, 1)[0].frame, ba);
    // Any TX queue pair of the sender.
    a.ctrl_ok(
        VIRTIO_NET_CTRL_MQ,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
        &PAIRS.to_le_bytes(),
    );
    a.send_with(3, &VirtioNetHdr::default(), &ab);
    assert_eq!(b.receive(0, 1)[0].frame, ab);

    let (qa, qb) = (&a.dev.queue_stats, &b.dev.queue_stats);
    assert_eq!(qa[0].tx_packets.get() + qa[3].tx_packets.get(), 2);
    assert_eq!(qa[3].tx_bytes.get(), ab.len() as u64);
    assert_eq!(qb[0].rx_packets.get(), 2);
    assert_eq!(qb[0].rx_bytes.get(), 2 * ab.len() as u64);
    assert_eq!(qb[0].tx_packets.get(), 1);
    assert_eq!(qa[0].rx_packets.get(), 1);

    // Sender link down: dropped at the sender.
    a.dev.set_link(false);
    a.send(&ab);
    assert_eq!(tx_drops(&a, 0, DropReason::PortDown), 1);
    assert_eq!(b.dev.backlog_len(0), 0);
    a.dev.set_link(true);
    // Receiver not ready (features not acked) or link down: dropped there.
    b.dev.set_acked_features(0);
    a.send(&ab);
    b.dev.set_acked_features(BASE);
    b.dev.set_link(false);
    a.send(&ab);
    b.dev.set_link(true);
    assert_eq!(rx_drops(&b, 0, DropReason::PortDown), 2);
    assert_forwards(&mut a, &mut b, 10);
    // Oversized for the MTU without GSO.
    a.send(&tcp4(MAC_B, &Flow::nth(3), 1600));
    assert_eq!(rx_drops(&b, 0, DropReason::BadLength), 1);
    assert_forwards(&mut a, &mut b, 1500 - 40);
}

#[test]
fn mac_filter_drops_frames_for_other_addresses() {
    let fb = BASE | bit(VIRTIO_NET_F_CTRL_RX) | bit(VIRTIO_NET_F_CTRL_RX_EXTRA);
    let (mut a, mut b) = pair(BASE, fb);
    let flow = Flow::nth(5);
    let to = |mac: [u8; 6]| tcp4(mac, &flow, 32);
    let multicast = [0x01, 0, 0x5e, 0, 0, 0x42];
    let delivered = |a: &mut Nic, b: &mut Nic, mac: [u8; 6]| {
        a.send(&to(mac));
        let got = b.receive(0, 1);
        got.len() == 1 && got[0].frame == to(mac)
    };
    // Promiscuous after reset, as QEMU's model.
    assert!(delivered(&mut a, &mut b, MAC_OTHER));
    let rx = VIRTIO_NET_CTRL_RX;
    b.ctrl_ok(rx, VIRTIO_NET_CTRL_RX_PROMISC, &[0]);
    let mac_filter = |b: &Nic| rx_drops(b, 0, DropReason::MacFilter);
    assert!(delivered(&mut a, &mut b, MAC_B));
    assert!(!delivered(&mut a, &mut b, MAC_OTHER));
    assert_eq!(mac_filter(&b), 1);
    assert!(delivered(&mut a, &mut b, BROADCAST));
    assert!(!delivered(&mut a, &mut b, multicast));
    assert_eq!(mac_filter(&b), 2);
    b.ctrl_ok(rx, VIRTIO_NET_CTRL_RX_ALLMULTI, &[1]);
    assert!(delivered(&mut a, &mut b, multicast));
    b.ctrl_ok(rx, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]);
    assert!(!delivered(&mut a, &mut b, BROADCAST));
    assert_eq!(mac_filter(&b), 3);

    // An extra unicast address through the MAC table.
    let mut table = 1u32.to_le_bytes().to_vec();
    table.extend_from_slice(&MAC_OTHER);
    table.extend_from_slice(&0u32.to_le_bytes());
    b.ctrl_ok(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &table);
    assert!(delivered(&mut a, &mut b, MAC_OTHER));
    b.ctrl_ok(rx, VIRTIO_NET_CTRL_RX_NOUNI, &[1]);
    assert!(!delivered(&mut a, &mut b, MAC_B));
    assert_eq!(mac_filter(&b), 4);

    // Malformed receive mode commands.
    for data in [vec![2u8], vec![], vec![0, 0]] {
        assert_eq!(
            b.ctrl(rx as u8, VIRTIO_NET_CTRL_RX_PROMISC as u8, &data),
            ERR
        );
    }
    // Without CTRL_RX the class does not exist.
    assert_eq!(
        a.ctrl(rx as u8, VIRTIO_NET_CTRL_RX_PROMISC as u8, &[0]),
        ERR
    );
    // Promiscuous again: everything passes.
    b.ctrl_ok(rx, VIRTIO_NET_CTRL_RX_PROMISC, &[1]);
    assert!(delivered(&mut a, &mut b, MAC_OTHER));
}

// ---------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------

#[test]
fn malformed_tx_chains_are_returned_counted_and_skipped() {
    let fa = BASE | bit(VIRTIO_RING_F_INDIRECT_DESC);
    let (mut a, mut b) = pair(fa, BASE);
    let good = a.place(&[0u8; 200]);
    let bad_chain = |a: &Nic| tx_drops(a, 0, DropReason::BadChain);
    let bad_hdr = |a: &Nic| tx_drops(a, 0, DropReason::BadTxHeader);

    // Each case: build the chain, check it comes back with length 0, the
    // drop is counted once, and a good frame still goes through.
    let mut case = |a: &mut Nic, name: &str, build: &dyn Fn(&mut Nic) -> u16, hdr_error: bool| {
        let (c0, h0) = (bad_chain(a), bad_hdr(a));
        let head = build(a);
        a.kick_tx(0);
        let used = a.tx[0].take_used();
        assert_eq!(used, [(head, 0)], "{name}: chain not returned");
        if hdr_error {
            assert_eq!((bad_chain(a), bad_hdr(a)), (c0, h0 + 1), "{name}");
        } else {
            assert_eq!((bad_chain(a), bad_hdr(a)), (c0 + 1, h0), "{name}");
        }
        assert_forwards(a, &mut b, 100);
    };

    case(
        &mut a,
        "out of range",
        &|a| a.tx[0].post(&[(RAM_LEN as u64 + 0x1000, 100, 0)]),
        false,
    );
    case(
        &mut a,
        "crosses end of RAM",
        &|a| a.tx[0].post(&[(RAM_LEN as u64 - 10, 100, 0)]),
        false,
    );
    case(
        &mut a,
        "address wraps",
        &|a| a.tx[0].post(&[(u64::MAX - 10, 100, 0)]),
        false,
    );
    case(
        &mut a,
        "zero length",
        &|a| a.tx[0].post(&[(good, 12, 0), (good, 0, 0)]),
        false,
    );
    case(
        &mut a,
        "writable",
        &|a| a.tx[0].post(&[(good, 12, 0), (good, 100, W)]),
        false,
    );
    case(
        &mut a,
        "too long",
        &|a| a.tx[0].post(&[(good, 40_000, 0), (good, 40_000, 0)]),
        false,
    );
    case(
        &mut a,
        "descriptor loop",
        &|a| {
            let q = &mut a.tx[0];
            let (i, j) = (q.alloc_desc(), q.alloc_desc());
            q.store_desc(i, good, 50, NEXT, j);
            q.store_desc(j, good, 50, NEXT, i);
            q.push_avail(i);
            i
        },
        false,
    );
    case(
        &mut a,
        "next beyond the table",
        &|a| {
            let q = &mut a.tx[0];
            let i = q.alloc_desc();
            q.store_desc(i, good, 50, NEXT, QSIZE + 7);
            q.push_avail(i);
            i
        },
        false,
    );
    case(
        &mut a,
        "indirect table of odd size",
        &|a| a.tx[0].post(&[(good, 24, INDIRECT)]),
        false,
    );
    case(
        &mut a,
        "nested indirect",
        &|a| {
            // An indirect table whose entry is itself indirect.
            let table = a.alloc(32);
            let mut t = Vec::new();
            t.extend_from_slice(&good.to_le_bytes());
            t.extend_from_slice(&16u32.to_le_bytes());
            t.extend_from_slice(&INDIRECT.to_le_bytes());
            t.extend_from_slice(&0u16.to_le_bytes());
            a.write(table, &t);
            a.tx[0].post(&[(table, 16, INDIRECT)])
        },
        false,
    );
    case(
        &mut a,
        "shorter than the header",
        &|a| a.tx[0].post(&[(good, 8, 0)]),
        true,
    );
    case(
        &mut a,
        "header without Ethernet",
        &|a| a.tx[0].post(&[(good, (HDR_LEN + 10) as u32, 0)]),
        true,
    );
    case(
        &mut a,
        "unknown gso_type",
        &|a| {
            let h = VirtioNetHdr {
                gso_type: 7,
                ..Default::default()
            };
            a.post_tx(0, &h, &tcp4(MAC_B, &Flow::nth(1), 100))
        },
        true,
    );

    // Head index beyond the queue: nothing to return it to.
    let c0 = bad_chain(&a);
    a.tx[0].push_avail(QSIZE + 5);
    a.kick_tx(0);
    assert!(a.tx[0].take_used().is_empty());
    assert_eq!(bad_chain(&a), c0 + 1);
    assert_forwards(&mut a, &mut b, 100);

    // A GSO request the receiver's offload engine rejects (zero gso_size)
    // is dropped and counted on the receiving side.
    let h = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        gso_size: 0,
        csum_start: 34,
        csum_offset: 16,
        ..Default::default()
    };
    a.send_with(0, &h, &tcp4(MAC_B, &Flow::nth(1), 3000));
    assert_eq!(rx_drops(&b, 0, DropReason::BadTxHeader), 1);
    assert_eq!(b.dev.backlog_len(0), 0);
    assert_forwards(&mut a, &mut b, 100);
}

#[test]
fn malformed_rx_chains_are_returned_counted_and_skipped() {
    let (mut a, mut b) = pair(BASE, BASE);
    let f = tcp4(MAC_B, &Flow::nth(3), 1000);
    let buf = b.alloc(4096);
    let bad_chain = |b: &Nic| rx_drops(b, 0, DropReason::BadChain);

    let cases: Vec<(&str, Vec<Desc>)> = vec![
        ("device-readable", vec![(buf, 2048, 0)]),
        (
            "readable after writable",
            vec![(buf, 12, W), (buf + 64, 2048, 0)],
        ),
        ("out of range", vec![(RAM_LEN as u64 + 4096, 2048, W)]),
        ("zero length", vec![(buf, 0, W)]),
        ("smaller than the header", vec![(buf, 8, W)]),
    ];
    for (name, descs) in cases {
        let before = bad_chain(&b);
        let head = b.rx[0].post(&descs);
        a.send(&f);
        b.kick_rx(0);
        assert_eq!(b.rx[0].take_used(), [(head, 0)], "{name}");
        assert_eq!(bad_chain(&b), before + 1, "{name}");
        assert_eq!(b.dev.backlog_len(0), 0, "{name}: packet kept");
        assert_forwards(&mut a, &mut b, 100);
    }

    // A loop in the descriptor table.
    let before = bad_chain(&b);
    let q = &mut b.rx[0];
    let (i, j) = (q.alloc_desc(), q.alloc_desc());
    q.store_desc(i, buf, 1024, W | NEXT, j);
    q.store_desc(j, buf + 1024, 1024, W | NEXT, i);
    q.push_avail(i);
    a.send(&f);
    b.kick_rx(0);
    assert_eq!(b.rx[0].take_used(), [(i, 0)]);
    assert_eq!(bad_chain(&b), before + 1);
    assert_forwards(&mut a, &mut b, 100);

    // Too small for the packet without MRG_RXBUF: dropped, but the buffer
    // stays for the next (smaller) packet.
    b.post_rx(0, 1, 512);
    a.send(&f);
    b.kick_rx(0);
    assert_eq!(rx_drops(&b, 0, DropReason::TooBig), 1);
    assert!(b.rx[0].take_used().is_empty());
    let small = tcp4(MAC_B, &Flow::nth(4), 100);
    a.send(&small);
    b.kick_rx(0);
    let got = b.take_rx(0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, small);

    // No buffers: the packet waits in the backlog.
    a.send(&f);
    assert!(!b.kick_rx(0));
    assert_eq!(b.dev.backlog_len(0), 1);
    assert_eq!(b.receive(0, 1)[0].frame, f);
}

#[test]
fn malformed_control_commands_are_refused_and_counted() {
    let fb = BASE
        | bit(VIRTIO_NET_F_MQ)
        | bit(VIRTIO_NET_F_RSS)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
    let (mut a, mut b) = pair(BASE, fb);
    let cfg = configure_rss(&mut b, TCP_HASHES, 1);
    let snapshot = |b: &Nic| {
        let c = b.dev.control();
        format!("{:?} {:?} {}", c.rss, c.split, c.active_pairs)
    };
    let state = snapshot(&b);
    let errors = |b: &Nic| b.dev.stats.ctrl_errors.get();
    let table = round_robin_table(128, PAIRS);
    let key = test_key();
    let good = rss_config(TCP_HASHES, &table, 0, PAIRS, &key);

    let mut bad_rss: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..10].to_vec()),
        (
            "trailing bytes beyond padding",
            [&good[..], &[0; 8]].concat(),
        ),
        (
            "table length 3",
            rss_config(TCP_HASHES, &[0, 1, 2], 0, PAIRS, &key),
        ),
        (
            "table longer than 128",
            rss_config(TCP_HASHES, &round_robin_table(256, PAIRS), 0, PAIRS, &key),
        ),
        ("queue 4 in table", {
            let mut t = table.clone();
            t[17] = PAIRS;
            rss_config(TCP_HASHES, &t, 0, PAIRS, &key)
        }),
        ("reserved bit in table", {
            let mut t = table.clone();
            t[3] = 0x8001;
            rss_config(TCP_HASHES, &t, 0, PAIRS, &key)
        }),
        (
            "unclassified 4",
            rss_config(TCP_HASHES, &table, PAIRS, PAIRS, &key),
        ),
        ("max_tx_vq 0", rss_config(TCP_HASHES, &table, 0, 0, &key)),
        (
            "max_tx_vq 5",
            rss_config(TCP_HASHES, &table, 0, PAIRS + 1, &key),
        ),
        (
            "key of 41 bytes",
            rss_config(TCP_HASHES, &table, 0, PAIRS, &[7; 41]),
        ),
        ("no key", rss_config(TCP_HASHES, &table, 0, PAIRS, &[])),
        (
            "unsupported hash type",
            rss_config(VIRTIO_NET_RSS_HASH_TYPE_IP_EX, &table, 0, PAIRS, &key),
        ),
        ("empty", Vec::new()),
    ];
    // A key length byte claiming more than is there.
    let mut short_key = good.clone();
    short_key.truncate(good.len() - 5);
    bad_rss.push(("key cut short", short_key));
    for (name, data) in &bad_rss {
        let before = errors(&b);
        assert_eq!(b.ctrl(MQ, RSS_CONFIG, data), ERR, "{name}");
        assert_eq!(errors(&b), before + 1, "{name}");
        assert_eq!(snapshot(&b), state, "{name} changed the state");
    }

    let other: Vec<(&str, u8, u8, Vec<u8>)> = vec![
        ("unknown class", 0x7f, 0, vec![1]),
        ("unknown MQ command", MQ, 9, vec![0, 0]),
        ("hash config without HASH_REPORT", MQ, 2, vec![0; 5]),
        ("guest offloads without the feature", 5, 0, vec![0; 8]),
        ("announce without the feature", 3, 0, vec![]),
        (
            "MAC table entry count overflows",
            1,
            0,
            u32::MAX.to_le_bytes().to_vec(),
        ),
        (
            "MAC table trailing bytes",
            1,
            0,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 9],
        ),
        ("MAC address too short", 1, 1, vec![0x52, 0x54, 0]),
        (
            "split header without the feature",
            SPLIT,
            SPLIT_SET,
            split_header(1, 0),
        ),
    ];
    for (name, class, cmd, data) in &other {
        let before = errors(&b);
        assert_eq!(b.ctrl(*class, *cmd, data), ERR, "{name}");
        assert_eq!(errors(&b), before + 1, "{name}");
        assert_eq!(snapshot(&b), state, "{name} changed the state");
    }

    // Truncated commands: no command byte, or nothing readable at all.
    let ack = b.alloc(1);
    let class_only = b.place(&[MQ]);
    let before = errors(&b);
    assert_eq!(b.ctrl_chain(&[(class_only, 1, 0), (ack, 1, W)]), 1);
    assert_eq!(b.read(ack, 1)[0], ERR);
    assert_eq!(b.ctrl_chain(&[(ack, 1, W)]), 1);
    assert_eq!(b.read(ack, 1)[0], ERR);
    assert_eq!(errors(&b), before + 2);

    // Chains the device cannot use: returned with length 0 and counted.
    let hdr = b.place(&[MQ, PAIRS_SET, 2, 0]);
    for (name, descs) in [
        ("readable after writable", vec![(ack, 1, W), (hdr, 4, 0)]),
        (
            "ack out of range",
            vec![(hdr, 4, 0), (RAM_LEN as u64, 1, W)],
        ),
        ("zero length", vec![(hdr, 0, 0), (ack, 1, W)]),
        ("request above 64 KiB", vec![(hdr, 70_000, 0), (ack, 1, W)]),
    ] {
        let before = errors(&b);
        assert_eq!(b.ctrl_chain(&descs), 0, "{name}");
        assert_eq!(errors(&b), before + 1, "{name}");
    }
    assert_eq!(snapshot(&b), state);
    // Without an ack buffer the command runs but nothing is written back.
    assert_eq!(b.ctrl_chain(&[(hdr, 4, 0)]), 0);
    assert_eq!(b.dev.control().active_pairs, 2);

    // Still steering and taking commands.
    let f = tcp4(MAC_B, &Flow::nth(9), 100);
    a.send(&f);
    let q = (0..PAIRS).find(|&q| b.dev.backlog_len(q) == 1).unwrap();
    assert!(q < 2);
    assert_eq!(b.receive(q, 1)[0].frame, f);
    // With the byte of tail padding Linux sends.
    assert_eq!(b.ctrl(MQ, RSS_CONFIG, &[&good[..], &[0]].concat()), OK);
    a.send(&f);
    let q = usize::from(cfg.select_queue(&parse(&f)).queue);
    assert_eq!(b.receive_all()[q].len(), 1);
}

#[test]
fn malformed_admin_commands_get_status_codes_and_are_counted() {
    let fb = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_F_ADMIN_VQ);
    let (mut a, mut b) = pair(BASE, fb);
    let errors = |b: &Nic| b.dev.stats.admin_errors.get();
    let einval = VIRTIO_ADMIN_STATUS_EINVAL;
    let opcode_q = VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE;
    let field_q = VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD;
    let expect = |b: &mut Nic, name: &str, req: Vec<u8>, want: (u16, u16)| {
        let before = errors(b);
        let res = b.admin_raw(&req, 64);
        assert_eq!(status(&res), want, "{name}");
        assert_eq!(errors(b), before + 1, "{name}");
    };
    let self_cmd = |op: u16, data: &[u8]| admin_cmd(op, VIRTIO_ADMIN_GROUP_TYPE_SELF, 0, data);
    let cap_get = |id: u16| {
        let mut d = id.to_le_bytes().to_vec();
        d.extend_from_slice(&[0; 6]);
        self_cmd(VIRTIO_ADMIN_CMD_DEVICE_CAP_GET, &d)
    };
    let create_req = |ty: u16, id: u32, obj: &[u8]| {
        let mut d = obj_hdr(ty, id);
        d.extend_from_slice(&0u64.to_le_bytes());
        d.extend_from_slice(obj);
        self_cmd(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE, &d)
    };

    // Before LIST_USE only the list commands exist.
    expect(
        &mut b,
        "cap get before LIST_USE",
        cap_get(VIRTIO_NET_FF_RESOURCE_CAP),
        (einval, opcode_q),
    );
    // After LIST_USE but before the driver capabilities: flow filter
    // objects are not enabled.
    let all = SUPPORTED_ADMIN_CMDS.to_le_bytes();
    let u = admin_cmd(
        VIRTIO_ADMIN_CMD_LIST_USE,
        VIRTIO_ADMIN_GROUP_TYPE_SELF,
        0,
        &all,
    );
    assert_eq!(status(&b.admin_raw(&u, 8)), (0, 0));
    expect(
        &mut b,
        "object before caps",
        create_req(GROUP, 1, &1u16.to_le_bytes()),
        (einval, opcode_q),
    );
    // LIST_USE with an unsupported opcode.
    let bad_list = (SUPPORTED_ADMIN_CMDS | 1 << 20).to_le_bytes();
    expect(
        &mut b,
        "LIST_USE unsupported",
        admin_cmd(
            VIRTIO_ADMIN_CMD_LIST_USE,
            VIRTIO_ADMIN_GROUP_TYPE_SELF,
            0,
            &bad_list,
        ),
        (einval, field_q),
    );
    b.dev.reset();
    b.dev.set_acked_features(fb);
    b.flow_filter_init(4);

    expect(
        &mut b,
        "unknown opcode",
        self_cmd(0x3f, &[]),
        (einval, opcode_q),
    );
    expect(
        &mut b,
        "opcode 0xffff",
        self_cmd(0xffff, &[]),
        (einval, opcode_q),
    );
    expect(
        &mut b,
        "unknown group type",
        admin_cmd(VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, 5, 0, &[]),
        (einval, VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP),
    );
    expect(
        &mut b,
        "SR-IOV group for a self command",
        admin_cmd(
            VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY,
            VIRTIO_ADMIN_GROUP_TYPE_SRIOV,
            0,
            &[],
        ),
        (einval, VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP),
    );
    expect(
        &mut b,
        "member id",
        admin_cmd(
            VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY,
            VIRTIO_ADMIN_GROUP_TYPE_SELF,
            7,
            &[],
        ),
        (einval, VIRTIO_ADMIN_STATUS_Q_INVALID_MEMBER),
    );
    expect(
        &mut b,
        "unknown capability",
        cap_get(0x1234),
        (VIRTIO_ADMIN_STATUS_ENXIO, field_q),
    );
    expect(
        &mut b,
        "unknown object type",
        create_req(0x300, 0, &[]),
        (einval, field_q),
    );
    // Linux's LIST_USE dropped the list commands.
    expect(&mut b, "empty request", Vec::new(), (einval, opcode_q));

    let exists = (VIRTIO_ADMIN_STATUS_EEXIST, field_q);
    let enxio = (VIRTIO_ADMIN_STATUS_ENXIO, field_q);
    expect(
        &mut b,
        "duplicate group id",
        create_req(GROUP, 1, &9u16.to_le_bytes()),
        exists,
    );
    let tcp = ipv4_l4_classifier(IPPROTO_TCP, ALL_FIELDS);
    b.create_ok(CLASSIFIER, 0, &tcp);
    expect(
        &mut b,
        "duplicate classifier id",
        create_req(CLASSIFIER, 0, &tcp),
        exists,
    );
    expect(
        &mut b,
        "classifier id above limit",
        create_req(CLASSIFIER, 64, &tcp),
        (einval, field_q),
    );
    let bad_order = classifier(&[(VIRTIO_NET_FF_MASK_TYPE_TCP, vec![0xff; 20])]);
    expect(
        &mut b,
        "selectors out of order",
        create_req(CLASSIFIER, 1, &bad_order),
        (einval, field_q),
    );
    expect(
        &mut b,
        "no selectors",
        create_req(CLASSIFIER, 1, &[0; 8]),
        (einval, field_q),
    );

    let flow = Flow::nth(77);
    let key = ipv4_l4_key(IPPROTO_TCP, &flow);
    b.create_ok(RULE, 0, &rule(1, 0, 0, Some(2), &key));
    expect(
        &mut b,
        "duplicate rule id",
        create_req(RULE, 0, &rule(1, 0, 0, Some(1), &key)),
        exists,
    );
    expect(
        &mut b,
        "queue out of range",
        create_req(RULE, 1, &rule(1, 0, 0, Some(PAIRS), &key)),
        (einval, field_q),
    );
    expect(
        &mut b,
        "unknown group",
        create_req(RULE, 1, &rule(9, 0, 0, Some(1), &key)),
        enxio,
    );
    expect(
        &mut b,
        "unknown classifier",
        create_req(RULE, 1, &rule(1, 9, 0, Some(1), &key)),
        enxio,
    );
    expect(
        &mut b,
        "key length",
        create_req(RULE, 1, &rule(1, 0, 0, Some(1), &key[..20])),
        (einval, field_q),
    );
    expect(
        &mut b,
        "rule id above limit",
        create_req(RULE, 1 << 20, &rule(1, 0, 0, Some(1), &key)),
        (einval, field_q),
    );
    let destroy =
        |ty: u16, id: u32| self_cmd(VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY, &obj_hdr(ty, id));
    expect(&mut b, "destroy unknown rule", destroy(RULE, 99), enxio);
    let busy = (
        VIRTIO_ADMIN_STATUS_EBUSY,
        VIRTIO_ADMIN_STATUS_Q_INVALID_COMMAND,
    );
    expect(
        &mut b,
        "destroy classifier in use",
        destroy(CLASSIFIER, 0),
        busy,
    );
    let mut caps = VIRTIO_NET_FF_ACTION_CAP.to_le_bytes().to_vec();
    caps.extend_from_slice(&[0; 6]);
    caps.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, VIRTIO_NET_FF_ACTION_DROP]);
    expect(
        &mut b,
        "caps while objects exist",
        self_cmd(VIRTIO_ADMIN_CMD_DRIVER_CAP_SET, &caps),
        busy,
    );

    // A result buffer shorter than the result: truncated, not an error.
    let res = b.admin_raw(&self_cmd(VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, &[]), 4);
    assert_eq!(res, [0, 0, 0, 0]);
    // Chains the device cannot use: returned with length 0, counted.
    let req = b.place(&self_cmd(VIRTIO_ADMIN_CMD_CAP_ID_LIST_QUERY, &[]));
    let res = b.alloc(64);
    for (name, descs) in [
        ("readable after writable", vec![(res, 64, W), (req, 24, 0)]),
        (
            "result out of range",
            vec![(req, 24, 0), (RAM_LEN as u64 - 8, 64, W)],
        ),
        ("zero length", vec![(req, 0, 0), (res, 64, W)]),
    ] {
        let before = errors(&b);
        assert_eq!(b.admin_chain(&descs), 0, "{name}");
        assert_eq!(errors(&b), before + 1, "{name}");
    }

    // The rule created before all this still steers.
    a.send(&tcp4(MAC_B, &flow, 10));
    assert_eq!(b.dev.backlog_len(2), 1);
    assert_eq!(b.dev.admin().flow_filter().rule_count(), 1);
    assert_eq!(status(&b.destroy(RULE, 0)), (0, 0));
    assert_eq!(status(&b.destroy(CLASSIFIER, 0)), (0, 0));
}

// ---------------------------------------------------------------------------
// Queue processing loops terminate whatever the driver does
// ---------------------------------------------------------------------------

#[test]
fn starved_mergeable_rx_with_event_idx_returns() {
    let fb = BASE | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX);
    let (mut a, mut b) = pair(BASE, fb);
    b.dev.set_event_idx(true);
    b.rx[0].set_event_idx(true);
    // One 1 KiB buffer for a packet that needs two.
    b.post_rx(0, 1, 1024);
    let f = tcp4(MAC_B, &Flow::nth(1), 1400);
    a.send(&f);
    within(20, || b.kick_rx(0));
    assert_eq!(b.dev.backlog_len(0), 1);
    assert!(b.rx[0].take_used().is_empty());
    // The kick is armed past the buffer already posted, so the driver's
    // next post notifies the device.
    assert_eq!(b.rx[0].avail_event(), 1);
    // The second buffer completes it.
    b.post_rx(0, 1, 1024);
    b.kick_rx(0);
    let got = b.take_rx(0);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].frame, f);
    assert_eq!(got[0].hdr.num_buffers, 2);
}

#[test]
fn bogus_avail_index_with_event_idx_returns() {
    let fa = BASE | bit(VIRTIO_RING_F_EVENT_IDX);
    let (mut a, mut b) = pair(fa, fa);
    a.dev.set_event_idx(true);
    b.dev.set_event_idx(true);
    // The driver claims more entries than the ring holds.
    a.tx[0].set_event_idx(true);
    a.tx[0].set_avail_idx(QSIZE + 10);
    b.rx[0].set_event_idx(true);
    b.rx[0].set_avail_idx(QSIZE + 10);
    b.ctrl.set_event_idx(true);
    b.ctrl.set_avail_idx(QSIZE + 1);
    b.admin.set_event_idx(true);
    b.admin.set_avail_idx(QSIZE + 1);
    // A frame waiting in B's backlog.
    b.dev
        .ingress(tcp4(MAC_B, &Flow::nth(1), 10), VirtioNetHdr::default());
    within(20, || {
        assert!(!a.kick_tx(0));
        assert!(!b.kick_rx(0));
        assert!(!b.dev.process_ctrl(&mut b.ctrl.queue, &mut b.buf));
        assert!(!b.dev.process_admin(&mut b.admin.queue, &mut b.buf));
    });
    assert_eq!(b.dev.backlog_len(0), 1);
    // Once the driver fixes its index the queues work again.
    a.tx[0].set_avail_idx(0);
    b.rx[0].set_avail_idx(0);
    assert_eq!(b.receive(0, 1).len(), 1);
    assert_forwards(&mut a, &mut b, 64);
}

// ---------------------------------------------------------------------------
// The fuzz harnesses, on pseudo-random inputs
// ---------------------------------------------------------------------------

/// xorshift64*: tiny, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }

    /// Flips a few bytes, sometimes.
    fn mutate(&mut self, v: &mut Vec<u8>) {
        match self.below(4) {
            0 if !v.is_empty() => {
                for _ in 0..=self.below(3) {
                    let i = self.below(v.len() as u64) as usize;
                    v[i] = self.byte();
                }
            }
            1 => v.truncate(self.below(v.len() as u64 + 1) as usize),
            _ => {}
        }
    }
}

/// Length-prefixed records, as the harnesses split their input.
fn push_record(out: &mut Vec<u8>, rec: &[u8]) {
    let n = rec.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&rec[..n]);
}

fn gen_ctrl(r: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..=r.below(6) {
        let mut cmd = match r.below(8) {
            0 => {
                let len = r.pick(&[1usize, 2, 4, 8, 16, 32, 128, 3]);
                let t: Vec<u16> = (0..len).map(|_| r.below(5) as u16).collect();
                let key_len = r.pick(&[0, 40, 41, 20]);
                let key = r.bytes(key_len);
                let random = r.next() as u32;
                let hash = r.pick(&[TCP_HASHES, SUPPORTED_HASH_TYPES, 0, random]);
                let mut c = vec![MQ, r.pick(&[1, 2])];
                c.extend(rss_config(
                    hash,
                    &t,
                    r.below(5) as u16,
                    r.below(6) as u16,
                    &key,
                ));
                c
            }
            1 => {
                let mut c = vec![1, 0];
                for _ in 0..2 {
                    let n = r.below(4) as u32;
                    c.extend_from_slice(&n.to_le_bytes());
                    c.extend(r.bytes(n as usize * 6));
                }
                c
            }
            2 => {
                let mut c = vec![SPLIT, 0];
                c.extend(split_header(r.below(3) as u8, r.next() as u32));
                c
            }
            3 if r.below(2) == 0 => {
                let mut c = vec![VIRTIO_NET_CTRL_HASH_FIELDS, r.below(3) as u8];
                if c[1] == VIRTIO_NET_CTRL_HASH_FIELDS_SET {
                    c.push(r.pick(&[0u8, 1, 2, 3]));
                    c.extend_from_slice(&[0; 3]);
                    for _ in 0..9 {
                        let f = r.pick(&[3u16, 15, 1, 0, 12, 16]);
                        c.extend_from_slice(&f.to_le_bytes());
                    }
                }
                c
            }
            3 => vec![0, r.below(7) as u8, r.below(3) as u8],
            4 => {
                let mut c = vec![5, 0];
                c.extend_from_slice(&(r.next() & 0x3c7_0080).to_le_bytes());
                c
            }
            5 => vec![MQ, 0, r.below(6) as u8, 0],
            6 => {
                let mut c = vec![1, 1];
                c.extend(r.bytes(6));
                c
            }
            _ => r.some_bytes(24),
        };
        r.mutate(&mut cmd);
        push_record(&mut out, &cmd);
    }
    out
}

/// Admin inputs that mostly make sense: ids from small sets, classifiers
/// with a fixed protocol per id so rules can match them, queues mostly in
/// range; a few mutated.
fn gen_admin(r: &mut Rng) -> Vec<u8> {
    let mut mode = r.byte();
    if r.below(4) != 0 {
        mode |= 1;
    }
    let pairs = 1 + u64::from(mode >> 4);
    let mut out = vec![mode];
    let proto_of = |c: u32| if c < 2 { IPPROTO_TCP } else { IPPROTO_UDP };
    for _ in 0..=r.below(24) {
        let opcode = match r.below(20) {
            0..=9 => VIRTIO_ADMIN_CMD_RESOURCE_OBJ_CREATE,
            10..=13 => VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY,
            14 => VIRTIO_ADMIN_CMD_RESOURCE_OBJ_QUERY,
            15 => VIRTIO_ADMIN_CMD_RESOURCE_OBJ_MODIFY,
            _ => r.pick(&[0u16, 1, 7, 8, 9, 0x3f]),
        };
        let group_type = if r.below(16) == 0 { 1 } else { 0 };
        let member = if r.below(32) == 0 { 1 } else { 0 };
        let data = match opcode {
            8 | 9 => {
                let mut d = (0x800 + r.below(4) as u16).to_le_bytes().to_vec();
                d.extend_from_slice(&[0; 6]);
                d.extend(r.some_bytes(40));
                d
            }
            0xa..=0xd => {
                let ty = r.pick(&[GROUP, CLASSIFIER, RULE, RULE, RULE]);
                let id = match ty {
                    GROUP => 1 + r.below(3) as u32,
                    CLASSIFIER => r.below(4) as u32,
                    _ => r.below(8) as u32,
                };
                let mut d = obj_hdr(ty, id);
                if opcode != VIRTIO_ADMIN_CMD_RESOURCE_OBJ_DESTROY {
                    d.extend_from_slice(&0u64.to_le_bytes());
                }
                match ty {
                    GROUP => d.extend_from_slice(&(r.below(8) as u16).to_le_bytes()),
                    CLASSIFIER => {
                        let m = if id % 2 == 0 {
                            ALL_FIELDS
                        } else {
                            Match {
                                dport: true,
                                ..Match::default()
                            }
                        };
                        d.extend(ipv4_l4_classifier(proto_of(id), m));
                    }
                    _ => {
                        let c = r.below(4) as u32;
                        let flow = Flow::nth(r.below(4) as u16);
                        let q = match r.below(8) {
                            0 => None,
                            1 => Some(r.below(18) as u16),
                            _ => Some(r.below(pairs) as u16),
                        };
                        let group = 1 + r.below(3) as u32;
                        let prio = r.below(8) as u8;
                        d.extend(rule(group, c, prio, q, &ipv4_l4_key(proto_of(c), &flow)));
                    }
                }
                d
            }
            1 => r.next().to_le_bytes().to_vec(),
            _ => r.some_bytes(8),
        };
        let mut req = admin_cmd(opcode, group_type, member, &data);
        if r.below(8) == 0 {
            r.mutate(&mut req);
        }
        let mut rec = vec![r.pick(&[0u8, 1, 2, 4, 16, 64, 200])];
        rec.extend(req);
        push_record(&mut out, &rec);
    }
    out
}

fn gen_descriptors(r: &mut Rng) -> Vec<u8> {
    let cfg = r.byte();
    let size = 1usize << (cfg & 7);
    let mut out = vec![cfg, r.byte()];
    out.extend_from_slice(&(r.below(u64::from(size as u16) + 3) as u16).to_le_bytes());
    out.push(r.byte());
    for _ in 0..size {
        // Address mostly in the data area, short lengths, flags and next
        // indices that form chains.
        let sel = if r.below(4) == 0 {
            r.byte()
        } else {
            r.below(3) as u8
        };
        out.push(sel);
        out.extend_from_slice(&(r.below(0x3000) as u16).to_le_bytes());
        out.extend_from_slice(&(r.below(2200) as u16).to_le_bytes());
        let flags = if r.below(8) == 0 {
            r.byte()
        } else {
            r.below(4) as u8
        };
        out.push(flags);
        out.push(r.below(size as u64 + 1) as u8);
    }
    for _ in 0..size {
        out.push(r.below(size as u64 + 2) as u8);
    }
    // The data area: mostly zero (so headers are plain), some frames, noise.
    let mut blob = vec![0u8; 0x3000];
    for _ in 0..r.below(6) {
        let at = r.below(0x2f00) as usize;
        let f = tcp4(MAC_A, &Flow::nth(r.below(8) as u16), r.below(200) as usize);
        let n = f.len().min(blob.len() - at - HDR_LEN);
        blob[at + HDR_LEN..at + HDR_LEN + n].copy_from_slice(&f[..n]);
    }
    for _ in 0..r.below(64) {
        let i = r.below(blob.len() as u64) as usize;
        blob[i] = r.byte();
    }
    out.extend(blob);
    out
}

#[test]
fn fuzz_harnesses_survive_pseudo_random_inputs() {
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ctrl = fuzz::Reached::default();
    let mut admin = fuzz::Reached::default();
    let mut chains = fuzz::Reached::default();
    within(600, || {
        for _ in 0..4000 {
            ctrl += fuzz::ctrl_command(&gen_ctrl(&mut r));
        }
        for _ in 0..4000 {
            admin += fuzz::admin_command(&gen_admin(&mut r));
        }
        for _ in 0..2000 {
            chains += fuzz::descriptor_chain(&gen_descriptors(&mut r));
        }
        // Raw noise too.
        for _ in 0..500 {
            let n = r.below(600) as usize;
            let v = r.bytes(n);
            fuzz::ctrl_command(&v);
            fuzz::admin_command(&v);
            fuzz::descriptor_chain(&v);
        }
    });
    eprintln!("ctrl {ctrl:?}\nadmin {admin:?}\nchains {chains:?}");
    // The generated inputs get past validation, not only into it.
    assert!(ctrl.accepted > 1000, "{ctrl:?}");
    assert!(admin.accepted > 4000 && admin.rules > 100, "{admin:?}");
    assert!(
        chains.tx_packets > 500 && chains.rx_packets > 500,
        "{chains:?}"
    );
    assert!(chains.dropped > 500, "{chains:?}");
}
