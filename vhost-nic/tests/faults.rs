//! Injected faults at the device-model level: each mode driven through
//! mock virtqueues, checking what the driver sees and that the fault was
//! counted. Interrupt faults act in the vhost-user glue and are covered by
//! the daemon tests.

mod support;

use std::time::{Duration, Instant};

use support::*;
use vhost_nic::fault::{FaultKind, FaultSpec};
use vhost_nic::hdr::{VirtioNetHdr, HDR_LEN, VIRTIO_NET_HDR_F_SPLIT};
use vhost_nic::offload::verify_l4_checksum;
use vhost_nic::packet::parse;
use vhost_nic::spec::*;
use vhost_nic::stats::DropReason;

const OK: u8 = VIRTIO_NET_OK as u8;

fn set(nic: &Nic, spec: &str) {
    nic.dev.set_fault(FaultSpec::parse(spec).unwrap()).unwrap();
}

fn fired(nic: &Nic, kind: &str) -> u64 {
    nic.dev.faults.to_json()["fired"][kind].as_u64().unwrap()
}

#[test]
fn rx_drop_drops_a_fraction_and_counts() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "rx-drop:queue=0,ratio=0.5");
    for i in 0..200 {
        a.send(&tcp4(MAC_B, &Flow::nth(0), 100 + i));
    }
    let got = b.receive(0, 200);
    let dropped = b.dev.queue_stats[0]
        .rx_drops
        .get(DropReason::Injected)
        .get();
    assert_eq!(got.len() as u64 + dropped, 200);
    assert!((50..150).contains(&dropped), "{dropped}");
    assert_eq!(fired(&b, "rx-drop"), dropped);
    // Cleared: everything arrives again.
    b.dev.clear_faults(None, None);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    assert_eq!(b.receive(0, 1).len(), 1);
}

#[test]
fn rx_hold_starves_the_queue_then_returns_the_buffers() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "rx-hold:queue=0,count=3");
    b.post_rx(0, 3, 2048);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    assert!(!b.kick_rx(0));
    assert_eq!(b.dev.faults.held(0).len(), 3);
    assert_eq!(b.dev.held_chains(rx_index(0)).len(), 3);
    assert_eq!(b.dev.backlog_len(0), 1, "the packet waits for buffers");
    assert_eq!(fired(&b, "rx-hold"), 3);
    // More buffers than the fault holds get used.
    let got = b.receive(0, 1);
    assert_eq!(got.len(), 1);
    b.dev.clear_faults(Some(FaultKind::RxHold), None);
    assert!(b.kick_rx(0));
    let used = b.rx[0].take_used();
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    assert!(!b.dev.faults.armed());
}

#[test]
fn rx_short_cuts_the_used_length() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "rx-short:queue=0,bytes=10,limit=1");
    let f = tcp4(MAC_B, &Flow::nth(0), 100);
    a.send(&f);
    a.send(&f);
    b.post_rx(0, 2, 2048);
    b.kick_rx(0);
    let used = b.rx[0].take_used();
    assert_eq!(used[0].1 as usize, HDR_LEN + f.len() - 10);
    assert_eq!(used[1].1 as usize, HDR_LEN + f.len(), "limit=1");
    assert_eq!(fired(&b, "rx-short"), 1);
}

#[test]
fn rx_bad_csum_breaks_the_checksum() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "rx-bad-csum");
    let f = tcp4(MAC_B, &Flow::nth(0), 100);
    assert!(verify_l4_checksum(&f, &parse(&f)));
    a.send(&f);
    let got = b.receive(0, 1);
    assert_eq!(got.len(), 1);
    assert!(!verify_l4_checksum(&got[0].frame, &parse(&got[0].frame)));
    assert_eq!(got[0].hdr.flags, 0, "no DATA_VALID, no NEEDS_CSUM");
    assert_eq!(fired(&b, "rx-bad-csum"), 1);
}

#[test]
fn rx_no_split_delivers_unsplit() {
    let fb = BASE | bit(VIRTIO_NET_F_SPLIT_HEADER);
    let (mut a, mut b) = pair_with(BASE, fb, true);
    assert_eq!(
        b.ctrl(
            VIRTIO_NET_CTRL_SPLIT_HEADER,
            VIRTIO_NET_CTRL_SPLIT_HEADER_SET,
            &split_header(1, 128)
        ),
        OK
    );
    set(&b, "rx-no-split:queue=0");
    let f = tcp4(MAC_B, &Flow::nth(0), 1000);
    let (_, hb, _) = b.post_rx_split(0, 256, 4096, true);
    a.send(&f);
    b.kick_rx(0);
    assert_eq!(b.rx[0].take_used().len(), 1);
    let h = VirtioNetHdr::from_bytes(&b.read(hb, HDR_LEN)).unwrap();
    assert_eq!(h.flags & VIRTIO_NET_HDR_F_SPLIT, 0);
    assert_eq!(b.dev.queue_stats[0].rx_not_split.get(), 1);
    assert_eq!(fired(&b, "rx-no-split"), 1);
}

#[test]
fn tx_reorder_completes_in_reverse() {
    let (mut a, _b) = pair(BASE, BASE);
    set(&a, "tx-reorder:queue=0,count=3");
    let f = tcp4(MAC_B, &Flow::nth(0), 100);
    let heads: Vec<u16> = (0..3)
        .map(|_| a.post_tx(0, &VirtioNetHdr::default(), &f))
        .collect();
    assert!(a.kick_tx(0));
    let used: Vec<u16> = a.tx[0].take_used().iter().map(|u| u.0).collect();
    let mut rev = heads.clone();
    rev.reverse();
    assert_eq!(used, rev);
    assert_eq!(fired(&a, "tx-reorder"), 1);
}

#[test]
fn rx_batch_waits_for_a_full_batch_or_the_timer() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "rx-batch:queue=0,count=3,ms=50");
    b.post_rx(0, 8, 2048);
    let f = tcp4(MAC_B, &Flow::nth(0), 100);
    a.send(&f);
    a.send(&f);
    assert!(!b.kick_rx(0), "two of three: held back");
    a.send(&f);
    assert!(b.kick_rx(0));
    assert_eq!(b.take_rx(0).len(), 3);
    // One packet goes out once the wait is over.
    a.send(&f);
    assert!(!b.kick_rx(0));
    let start = Instant::now();
    while !b.kick_rx(0) {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(start.elapsed() >= Duration::from_millis(40));
    assert_eq!(b.take_rx(0).len(), 1);
    assert_eq!(fired(&b, "rx-batch"), 2);
}

#[test]
fn rx_delay_holds_packets_back() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "rx-delay:ms=30");
    b.post_rx(0, 4, 2048);
    let start = Instant::now();
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    while !b.kick_rx(0) {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(start.elapsed() >= Duration::from_millis(25));
    assert_eq!(b.take_rx(0).len(), 1);
}

#[test]
fn needs_reset_stops_every_queue_until_reset() {
    let (mut a, mut b) = pair(BASE, BASE);
    set(&b, "needs-reset");
    assert!(!b.dev.link_up());
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    assert!(b.receive(0, 1).is_empty());
    let f = tcp4(MAC_A, &Flow::nth(0), 100);
    b.post_tx(0, &VirtioNetHdr::default(), &f);
    assert!(!b.kick_tx(0), "TX stopped");
    assert_eq!(fired(&b, "needs-reset"), 1);
    // The driver resets the device.
    b.dev.set_acked_features(BASE);
    assert!(b.dev.link_up());
    assert!(b.kick_tx(0));
}

#[test]
fn link_down_drops_and_shows_in_config() {
    let (mut a, mut b) = pair(BASE, BASE);
    // The frontend's backend request channel gets a config-change notice
    // each time the link changes.
    let (mine, frontend) = std::os::unix::net::UnixStream::pair().unwrap();
    frontend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    b.dev.set_backend_channel(Some(mine));
    let notice = || {
        use std::io::Read;
        let mut m = [0u8; 12];
        (&frontend).read_exact(&mut m).unwrap();
        m
    };
    set(&b, "link-down");
    let mut want = [0u8; 12];
    want[0] = 2; // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
    want[4] = 1; // version 1, no reply asked
    assert_eq!(notice(), want);
    let status = |n: &Nic| n.dev.read_config(CFG_STATUS as u32, 2)[0];
    assert_eq!(status(&b) & 1, 0);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    assert_eq!(
        b.dev.queue_stats[0]
            .rx_drops
            .get(DropReason::PortDown)
            .get(),
        1
    );
    b.dev.clear_faults(Some(FaultKind::LinkDown), None);
    assert_eq!(status(&b) & 1, 1);
    assert_eq!(notice(), want);
    assert_eq!(b.dev.stats.config_notifications.get(), 2);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    assert_eq!(b.receive(0, 1).len(), 1);
}

#[test]
fn faults_on_garbage_rings_do_not_panic() {
    // Every fault at once, on rings full of chains pointing outside memory.
    let (mut a, mut b) = pair(BASE, BASE);
    for s in [
        "rx-short:bytes=100000",
        "rx-bad-csum",
        "rx-hold:count=2",
        "tx-reorder:count=2",
        "rx-drop:ratio=0.3",
    ] {
        set(&b, s);
        set(&a, s);
    }
    for i in 0..8u64 {
        b.rx[0].post(&[(0xdead_0000_0000 + i, 2048, W)]);
        a.tx[0].post(&[(0xbeef_0000_0000 + i, 64, 0)]);
    }
    b.post_rx(0, 4, 2048);
    for _ in 0..4 {
        a.post_tx(
            0,
            &VirtioNetHdr::default(),
            &tcp4(MAC_B, &Flow::nth(0), 100),
        );
    }
    a.kick_tx(0);
    b.kick_rx(0);
    b.dev.clear_faults(None, None);
    a.dev.clear_faults(None, None);
    b.kick_rx(0);
    a.kick_tx(0);
}
