//! pcapng capture at the device-model level: every frame the guest gets
//! and sends lands in the file, annotated with queue, RSS hash, steering
//! and header split offset.

mod support;

use std::sync::Arc;

use support::*;
use vhost_nic::capture::{CaptureFile, CaptureFilter};
use vhost_nic::spec::*;

const OK: u8 = VIRTIO_NET_OK as u8;
const TCP_HASHES: u32 = VIRTIO_NET_RSS_HASH_TYPE_IPv4 | VIRTIO_NET_RSS_HASH_TYPE_TCPv4;

/// (interface, inbound, captured frame, comment) of every packet block.
fn packets(bytes: &[u8]) -> Vec<(u32, bool, Vec<u8>, String)> {
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut o = 0;
    while o < bytes.len() {
        let (kind, len) = (u32_at(o), u32_at(o + 4) as usize);
        if kind == 6 {
            let cap = u32_at(o + 20) as usize;
            let frame = bytes[o + 28..o + 28 + cap].to_vec();
            let mut p = o + 28 + cap.next_multiple_of(4);
            let (mut inbound, mut comment) = (false, String::new());
            loop {
                let code = u16::from_le_bytes([bytes[p], bytes[p + 1]]);
                let olen = usize::from(u16::from_le_bytes([bytes[p + 2], bytes[p + 3]]));
                let v = &bytes[p + 4..p + 4 + olen];
                match code {
                    0 => break,
                    1 => comment = String::from_utf8(v.to_vec()).unwrap(),
                    2 => inbound = v[0] & 3 == 1,
                    _ => {}
                }
                p += 4 + olen.next_multiple_of(4);
            }
            out.push((u32_at(o + 8), inbound, frame, comment));
        }
        o += len;
    }
    out
}

#[test]
fn both_directions_with_rss_and_split_notes() {
    let fb = BASE | bit(VIRTIO_NET_F_SPLIT_HEADER) | bit(VIRTIO_NET_F_RSS) | bit(VIRTIO_NET_F_MQ);
    let (mut a, mut b) = pair_with(BASE, fb, true);
    let cmd = rss_config(
        TCP_HASHES,
        &round_robin_table(128, PAIRS),
        0,
        PAIRS,
        &[0x6d; 40],
    );
    assert_eq!(
        b.ctrl(
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8,
            &cmd
        ),
        OK
    );
    assert_eq!(
        b.ctrl(
            VIRTIO_NET_CTRL_SPLIT_HEADER,
            VIRTIO_NET_CTRL_SPLIT_HEADER_SET,
            &split_header(1, 128)
        ),
        OK
    );
    let path =
        std::env::temp_dir().join(format!("vhost-nic-cap-test-{}.pcapng", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let file = Arc::new(CaptureFile::create(&path, &["a".into(), "b".into()], 0).unwrap());
    let all = CaptureFilter {
        queue: None,
        rx: true,
        tx: true,
        snaplen: 0,
    };
    a.dev.capture.start(file.clone(), 0, all);
    b.dev.capture.start(file.clone(), 1, all);

    let f = tcp4(MAC_B, &Flow::nth(1), 1000);
    a.send(&f);
    let q = (0..PAIRS).find(|&p| b.dev.backlog_len(p) == 1).unwrap();
    b.post_rx_split(q, 256, 4096, true);
    b.kick_rx(q);
    assert_eq!(b.rx[usize::from(q)].take_used().len(), 1);
    a.dev.capture.stop();
    b.dev.capture.stop();

    let got = packets(&std::fs::read(&path).unwrap());
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].0, got[0].1), (0, false));
    assert_eq!(got[0].2, f);
    assert_eq!(got[0].3, "queue=tx0");
    assert_eq!((got[1].0, got[1].1), (1, true));
    assert_eq!(got[1].2, f);
    let c = &got[1].3;
    assert!(c.starts_with(&format!("queue=rx{q} hash=0x")), "{c}");
    assert!(c.ends_with("steer=rss rule=- split=54"), "{c}");
    // The steering counters of the queue agree.
    let qs = &b.dev.queue_stats[usize::from(q)];
    assert_eq!(qs.rx_steered_rss.get(), 1);
    assert_eq!(qs.rx_steered_auto.get(), 0);
    let hash = u32::from_str_radix(&c[c.find("0x").unwrap() + 2..][..8], 16).unwrap();
    assert_eq!(qs.rx_hash_buckets[hash as usize % 16].get(), 1);
    assert_eq!(qs.rx_hash_buckets.iter().map(|c| c.get()).sum::<u64>(), 1);
    let _ = std::fs::remove_file(&path);
}
