//! The virtio-net header that precedes every packet on the rings
//! (struct virtio_net_hdr_v1, optionally followed by the hash report fields).

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};

/// Size of virtio_net_hdr_v1 (VERSION_1 or MRG_RXBUF negotiated).
pub const HDR_LEN: usize = 12;
/// Size of virtio_net_hdr_v1_hash (HASH_REPORT negotiated).
pub const HDR_HASH_LEN: usize = 20;

/// Header split extension: set in `flags` when the device split the packet;
/// `hdr_len` then holds the length of the L2..L4 headers placed in the
/// header buffer right after this header. See docs/virtio-net-extensions.md.
pub const VIRTIO_NET_HDR_F_SPLIT: u8 = 0x10;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
    pub hash_value: u32,
    pub hash_report: u16,
}

/// GSO kinds the device understands, without the ECN bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    None,
    TcpV4,
    TcpV6,
    /// Legacy UFO.
    Udp,
    /// USO.
    UdpL4,
}

impl VirtioNetHdr {
    /// Decodes the header from its little-endian wire form; `buf` must hold
    /// at least `HDR_LEN` bytes (hash fields are read when present).
    pub fn from_bytes(buf: &[u8]) -> Option<Self> {
        if buf.len() < HDR_LEN {
            return None;
        }
        let le16 = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
        let mut h = VirtioNetHdr {
            flags: buf[0],
            gso_type: buf[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
            ..Default::default()
        };
        if buf.len() >= HDR_HASH_LEN {
            h.hash_value = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
            h.hash_report = le16(16);
        }
        Some(h)
    }

    /// Encodes into `out`, whose length (HDR_LEN or HDR_HASH_LEN) selects
    /// whether the hash fields are written.
    pub fn write_to(&self, out: &mut [u8]) {
        let mut full = [0u8; HDR_HASH_LEN];
        full[0] = self.flags;
        full[1] = self.gso_type;
        full[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        full[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        full[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        full[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        full[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        full[12..16].copy_from_slice(&self.hash_value.to_le_bytes());
        full[16..18].copy_from_slice(&self.hash_report.to_le_bytes());
        let n = out.len().min(HDR_HASH_LEN);
        out[..n].copy_from_slice(&full[..n]);
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0
    }

    pub fn data_valid(&self) -> bool {
        self.flags & VIRTIO_NET_HDR_F_DATA_VALID as u8 != 0
    }

    pub fn ecn(&self) -> bool {
        self.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0
    }

    /// The GSO kind, or None for an unknown gso_type value.
    pub fn gso_kind(&self) -> Option<GsoKind> {
        match u32::from(self.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
            VIRTIO_NET_HDR_GSO_NONE => Some(GsoKind::None),
            VIRTIO_NET_HDR_GSO_TCPV4 => Some(GsoKind::TcpV4),
            VIRTIO_NET_HDR_GSO_TCPV6 => Some(GsoKind::TcpV6),
            VIRTIO_NET_HDR_GSO_UDP => Some(GsoKind::Udp),
            VIRTIO_NET_HDR_GSO_UDP_L4 => Some(GsoKind::UdpL4),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_and_without_hash() {
        let h = VirtioNetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
            hash_value: 0xdead_beef,
            hash_report: 2,
        };
        let mut b = [0u8; HDR_HASH_LEN];
        h.write_to(&mut b);
        assert_eq!(VirtioNetHdr::from_bytes(&b), Some(h));
        let mut s = [0u8; HDR_LEN];
        h.write_to(&mut s);
        let back = VirtioNetHdr::from_bytes(&s).unwrap();
        assert_eq!(back.hash_value, 0);
        assert_eq!(back.gso_kind(), Some(GsoKind::TcpV6));
        assert!(VirtioNetHdr::from_bytes(&s[..11]).is_none());
    }
}
