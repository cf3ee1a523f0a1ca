//! Per-device options (from the command line) and the virtio-net config
//! space the device serves through VHOST_USER_GET_CONFIG.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::spec::*;

pub const MAX_QUEUE_PAIRS: u16 = 16;
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 9000;
pub const RSS_MAX_KEY_SIZE: u8 = 40;
pub const RSS_MAX_INDIRECTION_LEN: u16 = 128;
/// RSS contexts besides the default configuration (`max_rss_contexts`):
/// ids 1..=15, so that with the default context they make 16, the table
/// count of common NICs.
pub const RSS_MAX_CONTEXTS: u16 = 15;
/// Every hash type of the spec except the _EX variants, which need IPv6
/// home-address and routing-header parsing the device does not do.
pub const SUPPORTED_HASH_TYPES: u32 = VIRTIO_NET_RSS_HASH_TYPE_IPv4
    | VIRTIO_NET_RSS_HASH_TYPE_TCPv4
    | VIRTIO_NET_RSS_HASH_TYPE_UDPv4
    | VIRTIO_NET_RSS_HASH_TYPE_IPv6
    | VIRTIO_NET_RSS_HASH_TYPE_TCPv6
    | VIRTIO_NET_RSS_HASH_TYPE_UDPv6;

/// What is on the other side of the device's wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// Joined back to back with the other device of the daemon naming the same wire.
    Wire(String),
    /// A host TAP interface (multi-queue, with virtio-net headers).
    Tap(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("port `{0}`: expected wire:NAME or tap:IFNAME")]
    Port(String),
    #[error("MAC address `{0}`: expected six hex bytes like 52:54:00:12:34:56")]
    Mac(String),
    #[error("MAC address {0} is multicast; a NIC's address must be unicast (first byte even)")]
    MulticastMac(String),
    #[error("--queues {0}: must be between 1 and {MAX_QUEUE_PAIRS}")]
    Queues(u16),
    #[error("--mtu {0}: must be between {MIN_MTU} and {MAX_MTU}")]
    Mtu(u16),
    #[error("--queue-size {0}: must be a power of two between 64 and 32768")]
    QueueSize(u16),
    #[error("--pairs-per-thread {0}: must be between 1 and the number of queue pairs")]
    PairsPerThread(usize),
    #[error("tap interface name `{0}` is empty or longer than 15 bytes")]
    TapName(String),
    #[error("wire `{0}` is used by {1} devices; a wire joins exactly two")]
    WireEnds(String, usize),
}

impl FromStr for PortSpec {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("wire", name)) if !name.is_empty() => Ok(PortSpec::Wire(name.to_string())),
            Some(("tap", name)) if !name.is_empty() && name.len() <= 15 => {
                Ok(PortSpec::Tap(name.to_string()))
            }
            Some(("tap", name)) => Err(OptionError::TapName(name.to_string())),
            _ => Err(OptionError::Port(s.to_string())),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Wire(n) => write!(f, "wire:{n}"),
            PortSpec::Tap(n) => write!(f, "tap:{n}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = OptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || OptionError::Mac(s.to_string());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in mac.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        if mac[0] & 1 == 1 {
            return Err(OptionError::MulticastMac(s.to_string()));
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Everything that defines one emulated NIC.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub name: String,
    pub socket: PathBuf,
    pub mac: MacAddr,
    pub queue_pairs: u16,
    pub queue_size: u16,
    pub mtu: u16,
    pub port: PortSpec,
    /// Queue pairs served by one worker thread.
    pub pairs_per_thread: usize,
    /// Offer the administration virtqueue (flow filter). Needs a frontend
    /// that exposes it (the patched vhost-user-device-pci).
    pub admin_vq: bool,
    /// Offer the header split extension.
    pub split_header: bool,
    /// Offer RSS contexts (VIRTIO_NET_F_RSS_CONTEXT_ALIAS).
    pub rss_contexts: bool,
    /// Offer the hash field extension (VIRTIO_NET_CTRL_HASH_FIELDS).
    pub hash_fields: bool,
}

impl DeviceOptions {
    pub fn validate(&self) -> Result<(), OptionError> {
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(OptionError::Queues(self.queue_pairs));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(OptionError::Mtu(self.mtu));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 64 {
            return Err(OptionError::QueueSize(self.queue_size));
        }
        if self.pairs_per_thread == 0 || self.pairs_per_thread > usize::from(self.queue_pairs) {
            return Err(OptionError::PairsPerThread(self.pairs_per_thread));
        }
        Ok(())
    }

    /// Number of virtqueues: the pairs, the control queue and, when offered,
    /// the admin queue.
    pub fn num_queues(&self) -> usize {
        2 * usize::from(self.queue_pairs) + 1 + usize::from(self.admin_vq)
    }

    /// Feature bits the device offers. Offloads are offered for every port:
    /// the wire and the tap both accept partial checksums and GSO frames, and
    /// the device completes them in software for a peer that cannot.
    pub fn offered_features(&self) -> u64 {
        let mut f = [
            VIRTIO_F_VERSION_1,
            // Descriptors carry DMA addresses of the transport. Without a
            // vIOMMU these are guest-physical and QEMU does not pass the bit
            // on in SET_FEATURES; the guest then maps buffers through the
            // DMA API of the PCI function, which memory providers (devmem
            // TCP) require. With a vIOMMU QEMU would need IOTLB support,
            // which the device does not offer (no PROTOCOL_F_IOMMU), so it
            // refuses to start instead of translating wrongly.
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_F_RING_RESET,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_USO,
            VIRTIO_NET_F_GUEST_USO4,
            VIRTIO_NET_F_GUEST_USO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_RX_EXTRA,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
            VIRTIO_NET_F_RSS,
            VIRTIO_NET_F_HASH_REPORT,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | bit(b));
        if self.admin_vq {
            f |= bit(VIRTIO_F_ADMIN_VQ);
        }
        if self.split_header {
            f |= bit(VIRTIO_NET_F_SPLIT_HEADER);
        }
        if self.rss_contexts {
            f |= bit(VIRTIO_NET_F_RSS_CONTEXT_ALIAS);
        }
        f | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The config space as the driver reads it.
    pub fn config_space(&self, mac: MacAddr, link_up: bool) -> [u8; CFG_SIZE] {
        let mut c = [0u8; CFG_SIZE];
        c[CFG_MAC..CFG_MAC + 6].copy_from_slice(&mac.0);
        let status = if link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[CFG_STATUS..CFG_STATUS + 2].copy_from_slice(&status.to_le_bytes());
        c[CFG_MAX_VQ_PAIRS..CFG_MAX_VQ_PAIRS + 2].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[CFG_MTU..CFG_MTU + 2].copy_from_slice(&self.mtu.to_le_bytes());
        // Speed unknown (0xffffffff) and duplex unknown (0xff), as the spec allows.
        c[CFG_SPEED..CFG_SPEED + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        c[CFG_DUPLEX] = 0xff;
        c[CFG_RSS_MAX_KEY_SIZE] = RSS_MAX_KEY_SIZE;
        c[CFG_RSS_MAX_INDIRECTION_LEN..CFG_RSS_MAX_INDIRECTION_LEN + 2]
            .copy_from_slice(&RSS_MAX_INDIRECTION_LEN.to_le_bytes());
        c[CFG_SUPPORTED_HASH_TYPES..CFG_SUPPORTED_HASH_TYPES + 4]
            .copy_from_slice(&SUPPORTED_HASH_TYPES.to_le_bytes());
        if self.split_header {
            c[CFG_SPLIT_HEADER_BUF_LEN..CFG_SPLIT_HEADER_BUF_LEN + 2]
                .copy_from_slice(&SPLIT_HEADER_BUF_LEN.to_le_bytes());
        }
        c
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn options() -> DeviceOptions {
        DeviceOptions {
            name: "nic0".into(),
            socket: "/tmp/nic0.sock".into(),
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            queue_pairs: 4,
            queue_size: 256,
            mtu: 1500,
            port: PortSpec::Wire("w".into()),
            pairs_per_thread: 1,
            admin_vq: true,
            split_header: true,
            rss_contexts: true,
            hash_fields: true,
        }
    }

    #[test]
    fn parses_ports_and_macs() {
        assert_eq!("wire:a".parse(), Ok(PortSpec::Wire("a".into())));
        assert_eq!("tap:tap0".parse(), Ok(PortSpec::Tap("tap0".into())));
        assert!("tap:".parse::<PortSpec>().is_err());
        assert!("tap:0123456789abcdef".parse::<PortSpec>().is_err());
        assert!("foo:bar".parse::<PortSpec>().is_err());
        assert!("wire".parse::<PortSpec>().is_err());
        assert_eq!(
            "52:54:00:aa:bb:cc".parse(),
            Ok(MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]))
        );
        assert!("52:54:00:aa:bb".parse::<MacAddr>().is_err());
        assert!("52:54:00:aa:bb:cc:dd".parse::<MacAddr>().is_err());
        assert!("zz:54:00:aa:bb:cc".parse::<MacAddr>().is_err());
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(OptionError::MulticastMac(_))
        ));
    }

    #[test]
    fn validates_ranges() {
        let mut o = options();
        assert!(o.validate().is_ok());
        o.queue_pairs = 17;
        assert_eq!(o.validate(), Err(OptionError::Queues(17)));
        o.queue_pairs = 4;
        o.mtu = 9001;
        assert_eq!(o.validate(), Err(OptionError::Mtu(9001)));
        o.mtu = 9000;
        o.queue_size = 100;
        assert!(o.validate().is_err());
        o.queue_size = 1024;
        o.pairs_per_thread = 5;
        assert!(o.validate().is_err());
    }

    #[test]
    fn config_space_layout() {
        let o = options();
        let c = o.config_space(o.mac, true);
        assert_eq!(&c[0..6], &o.mac.0);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 4);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        assert_eq!(c[17], 40);
        assert_eq!(u16::from_le_bytes([c[18], c[19]]), 128);
        assert_eq!(u16::from_le_bytes([c[28], c[29]]), 256);
        assert_eq!(o.num_queues(), 10);
        let f = o.offered_features();
        assert!(f & bit(VIRTIO_F_ADMIN_VQ) != 0 && f & bit(VIRTIO_NET_F_SPLIT_HEADER) != 0);
        assert!(f & bit(VIRTIO_NET_F_RSS_CONTEXT_ALIAS) != 0);
    }

    #[test]
    fn rss_context_alias_bit_is_free() {
        // Bit 4 is unassigned by virtio 1.4 and Linux: without the alias no
        // feature the device offers uses it.
        let mut o = options();
        o.rss_contexts = false;
        assert_eq!(
            o.offered_features() & bit(VIRTIO_NET_F_RSS_CONTEXT_ALIAS),
            0
        );
    }
}
