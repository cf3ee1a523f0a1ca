//! Parsing of Ethernet frames into the fields that steering, header split and
//! offloads look at.
//!
//! Frames come from the guest or from the host network and are untrusted: the
//! parser never panics, never reads past the slice and stops at the first
//! header it cannot make sense of, reporting how far it got.

pub const ETH_HLEN: usize = 14;
pub const ETH_ALEN: usize = 6;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const ETHERTYPE_QINQ: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;

/// IPv6 extension headers the parser walks through to find the transport
/// header (hop-by-hop, routing, fragment, destination options).
pub const IPV6_EXT_HOP_BY_HOP: u8 = 0;
pub const IPV6_EXT_ROUTING: u8 = 43;
pub const IPV6_EXT_FRAGMENT: u8 = 44;
pub const IPV6_EXT_DEST_OPTS: u8 = 60;
/// Bounds the walk so a crafted chain of extension headers costs little.
pub const IPV6_MAX_EXT_HEADERS: usize = 8;

/// Source and destination address of the network header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpAddrs {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// The transport header, when the parser reached one it understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    None,
    Tcp {
        src_port: u16,
        dst_port: u16,
        /// TCP header length including options (data offset * 4).
        header_len: usize,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
}

/// What the device learned about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedPacket {
    pub dst_mac: [u8; ETH_ALEN],
    pub src_mac: [u8; ETH_ALEN],
    /// Ethertype after any VLAN tags.
    pub ethertype: u16,
    /// VLAN id of the outermost tag, if tagged.
    pub vlan: Option<u16>,
    /// Offset of the network header (after Ethernet and VLAN tags).
    pub l3_offset: usize,
    pub ip: Option<IpAddrs>,
    /// Transport protocol number after IPv6 extension headers.
    pub ip_proto: Option<u8>,
    /// A fragment (IPv4 MF or non-zero offset, IPv6 fragment header): the
    /// ports are not available, or belong to the first fragment only.
    pub is_fragment: bool,
    /// IPv6 carried extension headers before the transport header.
    pub ipv6_ext: bool,
    /// Offset of the transport header, when known.
    pub l4_offset: Option<usize>,
    pub l4: L4,
    /// Length of L2..L4 headers: where the payload starts. For frames whose
    /// transport header was not understood, this is where parsing stopped.
    pub headers_len: usize,
}

impl ParsedPacket {
    /// Transport payload length (bytes after `headers_len`), given the frame length.
    pub fn payload_len(&self, frame_len: usize) -> usize {
        frame_len.saturating_sub(self.headers_len)
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.l4, L4::Tcp { .. })
    }

    pub fn is_udp(&self) -> bool {
        matches!(self.l4, L4::Udp { .. })
    }

    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4 {
            L4::Tcp {
                src_port, dst_port, ..
            }
            | L4::Udp { src_port, dst_port } => Some((src_port, dst_port)),
            L4::None => None,
        }
    }

    pub fn is_multicast(&self) -> bool {
        self.dst_mac[0] & 1 == 1
    }

    pub fn is_broadcast(&self) -> bool {
        self.dst_mac == [0xff; ETH_ALEN]
    }
}

fn be16(buf: &[u8], off: usize) -> Option<u16> {
    let b = buf.get(off..off + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn array<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off + N)?.try_into().ok()
}

/// Parses an Ethernet frame. Frames shorter than an Ethernet header give a
/// packet with zeroed addresses and `headers_len` equal to the frame length.
pub fn parse(frame: &[u8]) -> ParsedPacket {
    let mut p = ParsedPacket {
        dst_mac: [0; ETH_ALEN],
        src_mac: [0; ETH_ALEN],
        ethertype: 0,
        vlan: None,
        l3_offset: frame.len().min(ETH_HLEN),
        ip: None,
        ip_proto: None,
        is_fragment: false,
        ipv6_ext: false,
        l4_offset: None,
        l4: L4::None,
        headers_len: frame.len().min(ETH_HLEN),
    };
    let (Some(dst), Some(src), Some(mut ethertype)) = (
        array::<ETH_ALEN>(frame, 0),
        array::<ETH_ALEN>(frame, ETH_ALEN),
        be16(frame, 12),
    ) else {
        return p;
    };
    p.dst_mac = dst;
    p.src_mac = src;
    let mut off = ETH_HLEN;
    // At most two tags (802.1ad outer + 802.1Q inner).
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        let (Some(tci), Some(inner)) = (be16(frame, off), be16(frame, off + 2)) else {
            p.ethertype = ethertype;
            p.l3_offset = frame.len();
            p.headers_len = frame.len();
            return p;
        };
        p.vlan.get_or_insert(tci & 0x0fff);
        ethertype = inner;
        off += 4;
    }
    p.ethertype = ethertype;
    p.l3_offset = off;
    p.headers_len = off;
    let l4_off = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(frame, off, &mut p),
        ETHERTYPE_IPV6 => parse_ipv6(frame, off, &mut p),
        _ => None,
    };
    let Some(l4_off) = l4_off else {
        return p;
    };
    p.headers_len = l4_off;
    if p.is_fragment {
        return p;
    }
    match p.ip_proto {
        Some(IPPROTO_TCP) => {
            let (Some(sport), Some(dport), Some(&doff)) = (
                be16(frame, l4_off),
                be16(frame, l4_off + 2),
                frame.get(l4_off + 12),
            ) else {
                return p;
            };
            let hlen = usize::from(doff >> 4) * 4;
            if hlen < TCP_MIN_HLEN || l4_off + hlen > frame.len() {
                return p;
            }
            p.l4_offset = Some(l4_off);
            p.l4 = L4::Tcp {
                src_port: sport,
                dst_port: dport,
                header_len: hlen,
            };
            p.headers_len = l4_off + hlen;
        }
        Some(IPPROTO_UDP) => {
            let (Some(sport), Some(dport)) = (be16(frame, l4_off), be16(frame, l4_off + 2)) else {
                return p;
            };
            if l4_off + UDP_HLEN > frame.len() {
                return p;
            }
            p.l4_offset = Some(l4_off);
            p.l4 = L4::Udp {
                src_port: sport,
                dst_port: dport,
            };
            p.headers_len = l4_off + UDP_HLEN;
        }
        _ => {}
    }
    p
}

/// Returns the transport header offset.
fn parse_ipv4(frame: &[u8], off: usize, p: &mut ParsedPacket) -> Option<usize> {
    let vihl = *frame.get(off)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < IPV4_MIN_HLEN || off + ihl > frame.len() {
        return None;
    }
    let frag = be16(frame, off + 6)?;
    p.is_fragment = frag & 0x3fff != 0;
    p.ip_proto = Some(frame[off + 9]);
    p.ip = Some(IpAddrs::V4 {
        src: array(frame, off + 12)?,
        dst: array(frame, off + 16)?,
    });
    Some(off + ihl)
}

fn parse_ipv6(frame: &[u8], off: usize, p: &mut ParsedPacket) -> Option<usize> {
    if frame.get(off)? >> 4 != 6 || off + IPV6_HLEN > frame.len() {
        return None;
    }
    p.ip = Some(IpAddrs::V6 {
        src: array(frame, off + 8)?,
        dst: array(frame, off + 24)?,
    });
    let mut next = frame[off + 6];
    let mut cur = off + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS => {
                p.ipv6_ext = true;
                let nh = *frame.get(cur)?;
                let len = (usize::from(*frame.get(cur + 1)?) + 1) * 8;
                next = nh;
                cur += len;
            }
            IPV6_EXT_FRAGMENT => {
                p.ipv6_ext = true;
                let nh = *frame.get(cur)?;
                let frag = be16(frame, cur + 2)?;
                // Offset or more-fragments set: not a whole datagram.
                if frag & 0xfff9 != 0 {
                    p.is_fragment = true;
                }
                next = nh;
                cur += 8;
            }
            proto => {
                p.ip_proto = Some(proto);
                return (cur <= frame.len()).then_some(cur);
            }
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds an Ethernet + IPv4 + TCP frame with `payload` bytes of payload.
    pub(crate) fn tcp4_frame(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        payload: usize,
    ) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN + 20 + 20 + payload];
        f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let ip = &mut f[ETH_HLEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = IPPROTO_TCP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let tcp = &mut ip[20..];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[12] = 5 << 4;
        f
    }

    #[test]
    fn parses_tcp4() {
        let f = tcp4_frame([10, 0, 0, 1], [10, 0, 0, 2], 1234, 80, 100);
        let p = parse(&f);
        assert_eq!(p.ethertype, ETHERTYPE_IPV4);
        assert_eq!(
            p.ip,
            Some(IpAddrs::V4 {
                src: [10, 0, 0, 1],
                dst: [10, 0, 0, 2]
            })
        );
        assert_eq!(p.ports(), Some((1234, 80)));
        assert_eq!(p.headers_len, 54);
        assert_eq!(p.payload_len(f.len()), 100);
    }

    #[test]
    fn parses_vlan_udp6_with_ext_header() {
        let mut f = vec![0u8; 18 + 40 + 8 + 8 + 10];
        f[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f[14..16].copy_from_slice(&0x0064u16.to_be_bytes());
        f[16..18].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[18] = 0x60;
        f[18 + 6] = IPV6_EXT_DEST_OPTS;
        f[18 + 40] = IPPROTO_UDP; // next header of the option header
        f[18 + 41] = 0; // 8 bytes
        f[18 + 48..18 + 50].copy_from_slice(&53u16.to_be_bytes());
        f[18 + 50..18 + 52].copy_from_slice(&5353u16.to_be_bytes());
        let p = parse(&f);
        assert_eq!(p.vlan, Some(100));
        assert!(p.ipv6_ext);
        assert_eq!(p.ports(), Some((53, 5353)));
        assert_eq!(p.headers_len, 18 + 40 + 8 + 8);
    }

    #[test]
    fn truncated_and_garbage_never_panic() {
        let f = tcp4_frame([1, 2, 3, 4], [5, 6, 7, 8], 1, 2, 0);
        for n in 0..f.len() {
            let p = parse(&f[..n]);
            assert!(p.headers_len <= n);
        }
        let mut bad = f.clone();
        bad[ETH_HLEN] = 0x4f; // IHL 60 bytes, longer than the frame
        assert_eq!(parse(&bad).l4, L4::None);
        let mut frag = f.clone();
        frag[ETH_HLEN + 6] = 0x20; // MF
        let p = parse(&frag);
        assert!(p.is_fragment);
        assert_eq!(p.ports(), None);
    }
}
