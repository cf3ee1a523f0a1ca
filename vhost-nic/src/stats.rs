//! Counters, per queue pair and per device. Workers bump them with relaxed
//! atomics; readers (the stats socket, tests) take a consistent-enough
//! snapshot without stopping traffic.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Why a packet or buffer was dropped. Each reason has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// A descriptor chain the device could not use (bad address, direction,
    /// length, loop); the buffer was returned with length 0.
    BadChain,
    /// The TX virtio-net header or its offload request was invalid.
    BadTxHeader,
    /// Packet larger than the receive buffers can take (no MRG_RXBUF).
    TooBig,
    /// Frame shorter than an Ethernet header or longer than MTU + headers.
    BadLength,
    /// Rejected by the receive filter (MAC, promiscuous, multicast modes).
    MacFilter,
    /// A flow filter rule with the drop action matched.
    FlowFilterDrop,
    /// The receive backlog of the target queue was full.
    BacklogFull,
    /// The peer (wire end or tap) could not take the packet.
    PortDown,
    /// The target receive queue is not enabled by the driver.
    QueueDisabled,
    /// Dropped on purpose by an injected fault (`rx-drop`).
    Injected,
}

pub const DROP_REASONS: [DropReason; 10] = [
    DropReason::BadChain,
    DropReason::BadTxHeader,
    DropReason::TooBig,
    DropReason::BadLength,
    DropReason::MacFilter,
    DropReason::FlowFilterDrop,
    DropReason::BacklogFull,
    DropReason::PortDown,
    DropReason::QueueDisabled,
    DropReason::Injected,
];

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Adds without a locked read-modify-write, for counters whose writers
    /// are serialized by a lock (one receive queue's counters, bumped by
    /// its worker under the vring lock): readers still see whole values,
    /// and the data path saves an atomic operation per counter per packet.
    /// Two unserialized writers could lose an update, never corrupt one.
    pub fn add_serialized(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

impl Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

#[derive(Debug, Default, Serialize)]
pub struct DropCounters {
    pub bad_chain: Counter,
    pub bad_tx_header: Counter,
    pub too_big: Counter,
    pub bad_length: Counter,
    pub mac_filter: Counter,
    pub flow_filter_drop: Counter,
    pub backlog_full: Counter,
    pub port_down: Counter,
    pub queue_disabled: Counter,
    pub injected: Counter,
}

impl DropCounters {
    pub fn count(&self, reason: DropReason) {
        self.get(reason).inc();
    }

    pub fn get(&self, reason: DropReason) -> &Counter {
        match reason {
            DropReason::BadChain => &self.bad_chain,
            DropReason::BadTxHeader => &self.bad_tx_header,
            DropReason::TooBig => &self.too_big,
            DropReason::BadLength => &self.bad_length,
            DropReason::MacFilter => &self.mac_filter,
            DropReason::FlowFilterDrop => &self.flow_filter_drop,
            DropReason::BacklogFull => &self.backlog_full,
            DropReason::PortDown => &self.port_down,
            DropReason::QueueDisabled => &self.queue_disabled,
            DropReason::Injected => &self.injected,
        }
    }

    pub fn total(&self) -> u64 {
        DROP_REASONS.iter().map(|&r| self.get(r).get()).sum()
    }
}

/// Counters of one queue pair.
#[derive(Debug, Default, Serialize)]
pub struct QueueStats {
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    /// Receive buffers (chains) used, > rx_packets with MRG_RXBUF.
    pub rx_buffers: Counter,
    pub rx_split: Counter,
    pub rx_not_split: Counter,
    /// Bytes written into guest RAM and into other memory regions (device
    /// memory such as a GPU BAR).
    pub rx_bytes_to_ram: Counter,
    pub rx_bytes_to_device_memory: Counter,
    /// Payload of split packets (after the headers) written into guest RAM
    /// and into other memory: a devmem queue shows none in RAM.
    pub rx_payload_bytes_to_ram: Counter,
    pub rx_payload_bytes_to_device_memory: Counter,
    pub rx_drops: DropCounters,
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    /// Bytes read from non-RAM regions on transmit.
    pub tx_bytes_from_device_memory: Counter,
    /// Frames the device segmented or checksummed in software for the peer.
    pub tx_sw_segmented: Counter,
    pub tx_sw_checksummed: Counter,
    pub tx_drops: DropCounters,
    /// Rounds that added used entries (each may or may not interrupt).
    pub rx_notifications: Counter,
    pub tx_notifications: Counter,
    /// Interrupts actually sent to the guest, and those the driver's
    /// EVENT_IDX or NO_INTERRUPT flag (or an injected fault) suppressed.
    pub rx_interrupts_sent: Counter,
    pub rx_interrupts_suppressed: Counter,
    pub tx_interrupts_sent: Counter,
    pub tx_interrupts_suppressed: Counter,
    /// How delivered packets were steered here: by RSS, by a flow filter
    /// rule, or automatically (no RSS configured).
    pub rx_steered_rss: Counter,
    pub rx_steered_flow_rule: Counter,
    pub rx_steered_auto: Counter,
    /// Packets delivered here after hashing (RSS or automatic steering), by
    /// `hash % RSS_HASH_BUCKETS`: the RSS hash distribution.
    pub rx_hash_buckets: [Counter; RSS_HASH_BUCKETS],
    pub ring_resets: Counter,
}

/// Buckets of the RSS hash distribution: packets by the low bits of their
/// hash, which select the indirection table entry.
pub const RSS_HASH_BUCKETS: usize = 16;

/// Device-wide counters (control and admin queues).
#[derive(Debug, Default, Serialize)]
pub struct DeviceStats {
    pub ctrl_commands: Counter,
    pub ctrl_errors: Counter,
    /// RSS context commands (VIRTNET_RSS_CTX_CTRL), included in the above.
    pub rss_ctx_commands: Counter,
    pub rss_ctx_errors: Counter,
    /// VIRTIO_NET_CTRL_HASH_FIELDS commands, and the refused ones.
    pub hash_fields_commands: Counter,
    pub hash_fields_errors: Counter,
    pub admin_commands: Counter,
    pub admin_errors: Counter,
    pub config_writes_rejected: Counter,
    pub memory_updates: Counter,
    /// Config-change notices sent to the frontend (link status changes).
    pub config_notifications: Counter,
    /// Vring errors signalled to the frontend (needs-reset), which a
    /// patched QEMU turns into DEVICE_NEEDS_RESET.
    pub vring_errors_signalled: Counter,
}

impl DeviceStats {
    /// Counts a control command by class, beyond `ctrl_commands` and
    /// `ctrl_errors`.
    pub fn count_ctrl_class(&self, request: &[u8], ok: bool) {
        let (commands, errors) = match request.first() {
            Some(&crate::spec::VIRTNET_RSS_CTX_CTRL) => {
                (&self.rss_ctx_commands, &self.rss_ctx_errors)
            }
            Some(&crate::spec::VIRTIO_NET_CTRL_HASH_FIELDS) => {
                (&self.hash_fields_commands, &self.hash_fields_errors)
            }
            _ => return,
        };
        commands.inc();
        if !ok {
            errors.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counters_by_reason() {
        let d = DropCounters::default();
        for (i, r) in DROP_REASONS.iter().enumerate() {
            for _ in 0..=i {
                d.count(*r);
            }
        }
        assert_eq!(d.get(DropReason::QueueDisabled).get(), 9);
        assert_eq!(d.total(), 55);
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["bad_chain"], 1);
    }

    #[test]
    fn rss_context_commands_counted() {
        let d = DeviceStats::default();
        d.count_ctrl_class(&[crate::spec::VIRTNET_RSS_CTX_CTRL, 1], true);
        d.count_ctrl_class(&[crate::spec::VIRTNET_RSS_CTX_CTRL, 3], false);
        d.count_ctrl_class(&[4, 1], false);
        d.count_ctrl_class(&[], false);
        assert_eq!((d.rss_ctx_commands.get(), d.rss_ctx_errors.get()), (2, 1));
        d.count_ctrl_class(&[crate::spec::VIRTIO_NET_CTRL_HASH_FIELDS, 1], false);
        assert_eq!(
            (d.hash_fields_commands.get(), d.hash_fields_errors.get()),
            (1, 1)
        );
        assert_eq!((d.rss_ctx_commands.get(), d.rss_ctx_errors.get()), (2, 1));
    }
}
