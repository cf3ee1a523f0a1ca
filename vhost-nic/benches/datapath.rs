//! Per-packet cost of the datapath, driven through mock virtqueues: TX on
//! device A (chain validation and copy), the wire, receive steering on B
//! (receive filter, flow filter, RSS), and the RX write into B's buffers.
//!
//! Frames of 64 and 1500 bytes, with and without header split, with no flow
//! rules, one rule, and 10 000 rules installed through the admin queue (then
//! every frame hits one). With no rules the device skips the flow filter;
//! with any it does one hashed lookup per classifier in use, so 10 000 rules
//! must cost the same as one.
//!
//! Run with `cargo bench -p vhost-nic --bench datapath`. Driver-side work
//! (publishing ring indices) is included and small: buffers are posted once
//! and recycled, as a driver refilling the same pages would.
//!
//! Options: `--quick` (a few batches per configuration, to check that it
//! runs), `--trace` (the flight recorder on in both devices), `--tsv` (one
//! `case` line per configuration for scripts). `cargo xtask bench
//! --toolkit-off-cost` runs this built with and without the toolkit's
//! hooks (`--no-default-features`) to measure what they cost when off.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;
use vhost_nic::flow_filter::{
    VIRTIO_NET_RESOURCE_OBJ_FF_CLASSIFIER, VIRTIO_NET_RESOURCE_OBJ_FF_RULE,
};
use vhost_nic::hdr::{VirtioNetHdr, HDR_LEN};
use vhost_nic::packet::IPPROTO_TCP;
use vhost_nic::spec::*;

/// Packets per TX kick; also the receive slots per queue.
const BATCH: u16 = 128;
/// Distinct flows in the traffic.
const FLOWS: u16 = 64;
const RULES: u32 = 10_000;
const ROUNDS: usize = 8;
const ROUND_TIME: Duration = Duration::from_millis(250);
const RX_BUF: u32 = 2048;

struct Bench {
    a: Nic,
    b: Nic,
    /// Head of each receive slot (the same on every queue).
    rx_heads: Vec<u16>,
}

fn all_fields() -> Match {
    Match {
        src_ip: true,
        dst_ip: true,
        sport: true,
        dport: true,
    }
}

impl Bench {
    fn new(frame_len: usize, split: bool, rules: u32) -> Self {
        let fa = BASE;
        let mut fb = BASE | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_RSS) | bit(VIRTIO_F_ADMIN_VQ);
        if split {
            fb |= bit(VIRTIO_NET_F_SPLIT_HEADER);
        }
        let (mut a, mut b) = pair(fa, fb);
        let hashes = VIRTIO_NET_RSS_HASH_TYPE_IPv4
            | VIRTIO_NET_RSS_HASH_TYPE_TCPv4
            | VIRTIO_NET_RSS_HASH_TYPE_UDPv4;
        let key: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(73) ^ 0x3c).collect();
        let cfg = rss_config(hashes, &round_robin_table(128, PAIRS), 0, PAIRS, &key);
        b.ctrl_ok(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, &cfg);
        if split {
            b.ctrl_ok(
                u32::from(VIRTIO_NET_CTRL_SPLIT_HEADER),
                u32::from(VIRTIO_NET_CTRL_SPLIT_HEADER_SET),
                &split_header(1, 0),
            );
        }
        if rules > 0 {
            b.flow_filter_init(1);
            b.create_ok(
                VIRTIO_NET_RESOURCE_OBJ_FF_CLASSIFIER,
                0,
                &ipv4_l4_classifier(IPPROTO_TCP, all_fields()),
            );
            for i in 0..rules {
                let flow = Flow::nth(i as u16);
                let q = (i % u32::from(PAIRS)) as u16;
                b.create_ok(
                    VIRTIO_NET_RESOURCE_OBJ_FF_RULE,
                    i,
                    &rule(1, 0, 0, Some(q), &ipv4_l4_key(IPPROTO_TCP, &flow)),
                );
            }
            assert_eq!(b.dev.admin().flow_filter().rule_count(), rules as usize);
        }

        // TX slots on A: descriptor k holds header + frame of flow k % FLOWS.
        let payload = frame_len - 54;
        for k in 0..BATCH {
            let frame = tcp4(MAC_B, &Flow::nth(k % FLOWS), payload);
            assert_eq!(frame.len(), frame_len);
            let mut data = vec![0u8; HDR_LEN];
            VirtioNetHdr::default().write_to(&mut data);
            data.extend_from_slice(&frame);
            let addr = a.place(&data);
            a.tx[0].store_desc(k, addr, data.len() as u32, 0, 0);
        }

        // RX slots on every queue of B: one buffer, or a 256-byte header
        // buffer plus a payload buffer.
        let mut rx_heads = Vec::new();
        for q in 0..usize::from(PAIRS) {
            for j in 0..BATCH {
                if split {
                    let (h, p) = (b.alloc(256), b.alloc(RX_BUF as usize));
                    let (d0, d1) = (2 * j, 2 * j + 1);
                    b.rx[q].store_desc(d0, h, 256, W | NEXT, d1);
                    b.rx[q].store_desc(d1, p, RX_BUF, W, 0);
                    if q == 0 {
                        rx_heads.push(d0);
                    }
                } else {
                    let p = b.alloc(RX_BUF as usize);
                    b.rx[q].store_desc(j, p, RX_BUF, W, 0);
                    if q == 0 {
                        rx_heads.push(j);
                    }
                }
            }
        }
        Bench { a, b, rx_heads }
    }

    /// One batch: BATCH frames through A's TX, the wire, B's steering and
    /// B's receive queues.
    fn batch(&mut self) {
        let tx = &mut self.a.tx[0];
        tx.push_avail_batch(0..BATCH);
        self.a.kick_tx(0);
        assert_eq!(self.a.tx[0].skip_used(), BATCH);
        let mut received = 0;
        for q in 0..PAIRS {
            let n = self.b.dev.backlog_len(q);
            if n == 0 {
                continue;
            }
            let rx = &mut self.b.rx[usize::from(q)];
            rx.push_avail_batch(self.rx_heads[..n].iter().copied());
            self.b.kick_rx(q);
            received += self.b.rx[usize::from(q)].skip_used();
        }
        assert_eq!(received, BATCH, "packets lost");
    }

    fn warm_up(&mut self) {
        for _ in 0..50 {
            self.batch();
        }
    }

    /// Nanoseconds per packet over one timed round.
    fn timed_round(&mut self) -> f64 {
        let start = Instant::now();
        let mut packets = 0u64;
        while start.elapsed() < ROUND_TIME {
            for _ in 0..16 {
                self.batch();
            }
            packets += 16 * u64::from(BATCH);
        }
        start.elapsed().as_nanos() as f64 / packets as f64
    }

    /// Sanity: everything delivered, nothing dropped, rules hit.
    fn check(&self, split: bool, rules: u32) {
        let (mut rx, mut split_packets) = (0, 0);
        for s in &self.b.dev.queue_stats {
            assert_eq!(s.rx_drops.total(), 0);
            rx += s.rx_packets.get();
            split_packets += s.rx_split.get();
        }
        assert_eq!(split_packets, if split { rx } else { 0 });
        let tx = self.a.dev.queue_stats[0].tx_packets.get();
        assert_eq!(rx, tx);
        if rules == RULES {
            let hits: u64 = self
                .b
                .dev
                .admin()
                .flow_filter()
                .rule_hits()
                .map(|(_, h)| h)
                .sum();
            assert_eq!(hits, rx, "every frame should hit a rule");
        }
    }
}

fn main() {
    env_logger::init();
    // `--quick`: a few batches per configuration, to check that it runs.
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let (quick, trace, tsv) = (flag("--quick"), flag("--trace"), flag("--tsv"));
    if trace && !vhost_nic::device::TOOLKIT_HOOKS {
        eprintln!("--trace needs the toolkit-hooks feature");
        std::process::exit(2);
    }
    let started = Instant::now();
    println!(
        "datapath: TX on A -> wire -> steering on B (RSS over {PAIRS} queues) -> RX on B, \
         {BATCH} packets per kick, {FLOWS} TCP flows; toolkit hooks {}, trace {}",
        if vhost_nic::device::TOOLKIT_HOOKS {
            "compiled in"
        } else {
            "compiled out"
        },
        if trace { "on" } else { "off" },
    );
    println!();
    println!(
        "{:>6}  {:>6}  {:>6}  {:>8}  {:>10}",
        "frame", "split", "rules", "Mpps", "ns/packet"
    );
    let mut ratios = Vec::new();
    for frame_len in [64usize, 1500] {
        for split in [false, true] {
            let rule_counts = [0u32, 1, RULES];
            let mut benches: Vec<Bench> = rule_counts
                .iter()
                .map(|&rules| Bench::new(frame_len, split, rules))
                .collect();
            if trace {
                for bench in &benches {
                    bench.a.dev.tracer.enable(None);
                    bench.b.dev.tracer.enable(None);
                }
            }
            if quick {
                for (bench, &rules) in benches.iter_mut().zip(&rule_counts) {
                    for _ in 0..4 {
                        bench.batch();
                    }
                    bench.check(split, rules);
                    println!("{frame_len:>6}  {split:>6}  {rules:>6}  runs");
                }
                continue;
            }
            // Rounds interleave the configurations and each keeps its best,
            // so load from elsewhere on the machine does not favour one.
            benches.iter_mut().for_each(Bench::warm_up);
            let mut ns = [f64::MAX; 3];
            for _ in 0..ROUNDS {
                for (best, bench) in ns.iter_mut().zip(&mut benches) {
                    *best = best.min(bench.timed_round());
                }
            }
            for ((bench, &rules), ns) in benches.iter().zip(&rule_counts).zip(ns) {
                bench.check(split, rules);
                println!(
                    "{:>6}  {:>6}  {:>6}  {:>8.2}  {:>10.0}",
                    frame_len,
                    if split { "on" } else { "off" },
                    rules,
                    1e3 / ns,
                    ns
                );
                if tsv {
                    println!(
                        "case\t{frame_len}\t{}\t{rules}\t{ns:.3}",
                        if split { "on" } else { "off" }
                    );
                }
            }
            ratios.push((frame_len, split, ns[2] / ns[0], ns[2] / ns[1]));
        }
    }
    println!();
    println!("{RULES} flow rules relative to 0 rules (no lookup at all) and to 1 rule (one hashed lookup):");
    for (frame_len, split, vs0, vs1) in ratios {
        println!(
            "  {frame_len:>4} B, split {:<3}  vs 0: {vs0:.2}x   vs 1: {vs1:.2}x",
            if split { "on" } else { "off" }
        );
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
}
