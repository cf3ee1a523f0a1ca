//! The flight recorder at the device-model level: what it records for
//! delivered, dropped and refused chains, and that it records nothing
//! while off.

mod support;

use support::*;
use vhost_nic::fault::FaultSpec;
use vhost_nic::hdr::VirtioNetHdr;
use vhost_nic::trace::FlowFilter;

fn all(nic: &Nic) -> Vec<vhost_nic::trace::TraceEntry> {
    nic.dev.tracer.entries(None, &FlowFilter::default())
}

#[test]
fn off_records_nothing() {
    let (mut a, mut b) = pair(BASE, BASE);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    assert_eq!(b.receive(0, 1).len(), 1);
    assert!(all(&a).is_empty() && all(&b).is_empty());
}

#[test]
fn records_rx_and_tx_chains_with_steering() {
    let (mut a, mut b) = pair(BASE, BASE);
    a.dev.tracer.enable(Some(8));
    b.dev.tracer.enable(Some(8));
    let f = tcp4(MAC_B, &Flow::nth(3), 100);
    a.send(&f);
    let got = b.receive(0, 1);
    assert_eq!(got.len(), 1);

    let tx = all(&a);
    assert_eq!(tx.len(), 1);
    assert_eq!(tx[0].queue, "tx0");
    assert_eq!(tx[0].outcome, "ok");
    assert_eq!(tx[0].frame_len, f.len());
    assert_eq!(tx[0].chains[0].descs.len(), 1);
    assert_eq!(tx[0].chains[0].descs[0].memory, "ram");
    assert_eq!(tx[0].flow.unwrap().sport, Some(30003));

    let rx = all(&b);
    assert_eq!(rx.len(), 1);
    let e = &rx[0];
    assert_eq!(e.queue, "rx0");
    assert_eq!(
        e.used,
        [(u32::from(got[0].heads[0]), (12 + f.len()) as u32)]
    );
    assert_eq!(e.chains.len(), 1);
    assert_eq!(e.chains[0].head, got[0].heads[0]);
    assert_eq!(e.chains[0].descs[0].flag_names, "W");
    assert!(e.wait_us.is_some());
    let steer = e.steer.unwrap();
    assert_eq!(format!("{:?}", steer.how), "Auto");
    assert_eq!(e.flow.unwrap().dport, Some(5201));

    // Filter by flow; the text form.
    let f2 = tcp4(MAC_B, &Flow::nth(4), 100);
    a.send(&f2);
    b.receive(0, 1);
    let only = b
        .dev
        .tracer
        .entries(None, &FlowFilter::parse("sport=30004").unwrap());
    assert_eq!(only.len(), 1);
    let mut text = String::new();
    vhost_nic::trace::render(&only, &mut text);
    assert!(
        text.contains("rx0") && text.contains("tcp 10.0.0.1:30004 > 10.0.0.2:5201"),
        "{text}"
    );
    assert!(text.contains("-> region 0 (ram)"), "{text}");
}

#[test]
fn records_bad_chains_and_injected_drops() {
    let (mut a, mut b) = pair(BASE, BASE);
    b.dev.tracer.enable(None);
    a.dev.tracer.enable(None);
    // A receive buffer outside guest memory.
    b.rx[0].post(&[(0xdead_0000_0000, 2048, W)]);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    b.kick_rx(0);
    assert_eq!(b.rx[0].take_used().len(), 1);
    let e = all(&b);
    assert_eq!(e.len(), 1);
    assert!(e[0].outcome.starts_with("error:"), "{}", e[0].outcome);
    assert_eq!(e[0].used.len(), 1, "returned with length 0");
    assert_eq!(e[0].used[0].1, 0);
    assert_eq!(e[0].chains[0].descs[0].memory, "none");

    b.dev
        .set_fault(FaultSpec::parse("rx-drop").unwrap())
        .unwrap();
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    b.receive(0, 1);
    let e = all(&b);
    assert_eq!(e.last().unwrap().outcome, "dropped: injected (rx-drop)");

    // A TX chain the device cannot read.
    a.tx[0].post(&[(0xbeef_0000_0000, 64, 0)]);
    a.kick_tx(0);
    let e = all(&a);
    assert!(e.last().unwrap().outcome.starts_with("error:"));
    // A TX header the device refuses.
    let bad = VirtioNetHdr {
        gso_type: 0x55,
        ..Default::default()
    };
    a.post_tx(0, &bad, &tcp4(MAC_B, &Flow::nth(0), 100));
    a.kick_tx(0);
    assert_eq!(all(&a).last().unwrap().outcome, "dropped: bad_tx_header");
}

#[test]
fn depth_bounds_each_queue() {
    let (mut a, mut b) = pair(BASE, BASE);
    b.dev.tracer.enable(Some(4));
    for i in 0..10 {
        a.send(&tcp4(MAC_B, &Flow::nth(0), 100 + i));
    }
    assert_eq!(b.receive(0, 10).len(), 10);
    let e = all(&b);
    assert_eq!(e.len(), 4);
    assert_eq!(e[3].frame_len, tcp4(MAC_B, &Flow::nth(0), 109).len());
}
