//! virtio constants that virtio-bindings does not carry (virtio 1.2+ transport
//! bits, the admin queue) and this device's documented extensions
//! (docs/virtio-net-extensions.md).

pub use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
pub use virtio_bindings::virtio_net::*;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// A single queue can be reset and re-enabled (virtio 1.2).
pub const VIRTIO_F_RING_RESET: u32 = 40;
/// The device has an administration virtqueue (virtio 1.3).
pub const VIRTIO_F_ADMIN_VQ: u32 = 41;

/// Header split extension: feature bit, config field and control command.
pub const VIRTIO_NET_F_SPLIT_HEADER: u32 = 58;
pub const VIRTIO_NET_CTRL_SPLIT_HEADER: u8 = 0x40;
pub const VIRTIO_NET_CTRL_SPLIT_HEADER_SET: u8 = 0;

/// RSS contexts (virtio 1.4 "RSS Context"). The spec's feature bit,
/// VIRTIO_NET_F_RSS_CONTEXT (64), cannot be negotiated through vhost-user's
/// 64-bit feature word; the device offers the same facility under an alias
/// bit unassigned by virtio 1.4 and Linux. Class and commands are the spec's.
pub const VIRTIO_NET_F_RSS_CONTEXT_ALIAS: u32 = 4;
pub const VIRTNET_RSS_CTX_CTRL: u8 = 9;
pub const VIRTNET_RSS_CTX_CTRL_CAP_GET: u8 = 0;
pub const VIRTNET_RSS_CTX_CTRL_ADD: u8 = 1;
pub const VIRTNET_RSS_CTX_CTRL_MOD: u8 = 2;
pub const VIRTNET_RSS_CTX_CTRL_DEL: u8 = 3;

/// Hash field selection extension: control class and commands, no feature
/// bit (discovered by CAP_GET).
pub const VIRTIO_NET_CTRL_HASH_FIELDS: u8 = 0x41;
pub const VIRTIO_NET_CTRL_HASH_FIELDS_CAP_GET: u8 = 0;
pub const VIRTIO_NET_CTRL_HASH_FIELDS_SET: u8 = 1;

/// Offsets into struct virtio_net_config.
pub const CFG_MAC: usize = 0;
pub const CFG_STATUS: usize = 6;
pub const CFG_MAX_VQ_PAIRS: usize = 8;
pub const CFG_MTU: usize = 10;
pub const CFG_SPEED: usize = 12;
pub const CFG_DUPLEX: usize = 16;
pub const CFG_RSS_MAX_KEY_SIZE: usize = 17;
pub const CFG_RSS_MAX_INDIRECTION_LEN: usize = 18;
pub const CFG_SUPPORTED_HASH_TYPES: usize = 20;
pub const CFG_SUPPORTED_TUNNEL_TYPES: usize = 24;
pub const CFG_SPLIT_HEADER_BUF_LEN: usize = 28;
/// Config space size, including the header split field, padded to 4 bytes.
pub const CFG_SIZE: usize = 32;

/// Header buffer size the device asks for in split mode: virtio-net header
/// with hash report plus Ethernet, two VLAN tags, IPv6 with extension headers
/// and a TCP header with full options fit.
pub const SPLIT_HEADER_BUF_LEN: u16 = 256;

pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Virtqueue index layout of a virtio-net device with `max_pairs` queue pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Rx(u16),
    Tx(u16),
    Ctrl,
    Admin,
}

pub fn queue_role(index: usize, max_pairs: u16) -> Option<QueueRole> {
    let pairs = usize::from(max_pairs);
    match index {
        i if i < 2 * pairs => {
            let pair = (i / 2) as u16;
            Some(if i % 2 == 0 {
                QueueRole::Rx(pair)
            } else {
                QueueRole::Tx(pair)
            })
        }
        i if i == 2 * pairs => Some(QueueRole::Ctrl),
        i if i == 2 * pairs + 1 => Some(QueueRole::Admin),
        _ => None,
    }
}

pub const fn rx_index(pair: u16) -> usize {
    2 * pair as usize
}

pub const fn tx_index(pair: u16) -> usize {
    2 * pair as usize + 1
}

/// The name of virtqueue `index` in diagnostics: rx0, tx0, ..., ctrl, admin.
pub fn queue_name(index: usize, max_pairs: u16) -> String {
    match queue_role(index, max_pairs) {
        Some(QueueRole::Rx(p)) => format!("rx{p}"),
        Some(QueueRole::Tx(p)) => format!("tx{p}"),
        Some(QueueRole::Ctrl) => "ctrl".into(),
        Some(QueueRole::Admin) => "admin".into(),
        None => format!("vq{index}"),
    }
}
