//! Driver notifications around a queue run.

mod support;

use support::*;
use virtio_queue::QueueT;

#[test]
fn tx_run_leaves_notifications_on_without_event_idx() {
    // A driver without EVENT_IDX honours the used ring's NO_NOTIFY flag:
    // left set after a run, it would never kick the queue again.
    let (mut a, _b) = pair(BASE, BASE);
    a.send(&tcp4(MAC_B, &Flow::nth(0), 100));
    let flags = a.read(a.tx[0].queue.used_ring(), 2);
    assert_eq!(
        u16::from_le_bytes([flags[0], flags[1]]),
        0,
        "NO_NOTIFY left set"
    );
    // And again with more chains than one run takes.
    for _ in 0..300 {
        a.post_tx(0, &Default::default(), &tcp4(MAC_B, &Flow::nth(0), 100));
    }
    a.kick_tx(0);
    let flags = a.read(a.tx[0].queue.used_ring(), 2);
    assert_eq!(
        u16::from_le_bytes([flags[0], flags[1]]),
        0,
        "NO_NOTIFY left set"
    );
}
