//! Checksum and segmentation offloads done in software.
//!
//! The guest may hand the device frames whose transport checksum is only
//! partially computed (`NEEDS_CSUM`) or that are larger than the MTU and must
//! be cut into MSS-sized segments (`gso_type` TCPV4/TCPV6/UDP_L4). When the
//! peer the frame is forwarded to accepts the same offloads, the frame goes
//! through untouched with its header; otherwise the device finishes the work
//! here, so that the peer only ever sees frames it can handle.
//!
//! Everything in the header and the frame is guest-controlled: offsets and
//! lengths are validated against the frame and against what the parser found,
//! and every failure is an [`OffloadError`], never a panic. `hdr_len` is not
//! trusted at all: header lengths are computed from the frame itself.

use thiserror::Error;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_USO6,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
};

use crate::hdr::{GsoKind, VirtioNetHdr};
use crate::packet::{
    self, IpAddrs, ParsedPacket, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_TCP, IPPROTO_UDP,
    IPV4_MIN_HLEN, IPV6_EXT_DEST_OPTS, IPV6_EXT_FRAGMENT, IPV6_EXT_HOP_BY_HOP, IPV6_EXT_ROUTING,
    IPV6_HLEN, IPV6_MAX_EXT_HEADERS, L4,
};

/// Offset of the checksum field in the TCP header.
pub const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the checksum field in the UDP header.
pub const UDP_CSUM_OFFSET: usize = 6;

/// Largest IP datagram (IPv4 total length) or IPv6 payload a GSO frame may
/// describe: every segment must fit the 16-bit length fields, and jumbograms
/// (BIG TCP) are not accepted from the guest.
pub const MAX_IP_LEN: usize = 65535;
/// Upper bound on TCP segments per GSO frame. Linux never lets the MSS go
/// below 48 bytes, i.e. at most 1366 segments for 64 KiB; the cap bounds the
/// work a guest can cause with a tiny `gso_size`.
pub const MAX_TCP_SEGMENTS: usize = 2048;
/// Upper bound on USO segments per frame, matching Linux's UDP_MAX_SEGMENTS
/// (drivers and peers reject more).
pub const MAX_UDP_SEGMENTS: usize = 128;

const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_PSH: u8 = 0x08;
const TCP_FLAG_CWR: u8 = 0x80;

/// TAP offload flags (TUNSETOFFLOAD), from linux/if_tun.h.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_USO4: u32 = 0x20;
pub const TUN_F_USO6: u32 = 0x40;

/// Why a frame's offload request could not be honoured. The frame should be
/// dropped (and counted) by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OffloadError {
    #[error(
        "checksum field at csum_start {csum_start} + csum_offset {csum_offset} \
         does not fit a {len}-byte frame"
    )]
    CsumOutOfBounds {
        csum_start: usize,
        csum_offset: usize,
        len: usize,
    },
    #[error("unknown gso_type {0:#04x}")]
    UnknownGsoType(u8),
    #[error("frame is not a GSO frame")]
    NotGso,
    #[error("legacy UDP fragmentation offload (GSO_UDP) is not supported")]
    UfoUnsupported,
    #[error("ECN bit set on non-TCP gso_type {0:#04x}")]
    EcnWithoutTcp(u8),
    #[error("gso_size is zero")]
    ZeroGsoSize,
    #[error("gso_type {kind:?} but the frame has ethertype {ethertype:#06x}")]
    NetworkMismatch { kind: GsoKind, ethertype: u16 },
    #[error("gso_type {kind:?} but the frame carries IP protocol {ip_proto}")]
    TransportMismatch { kind: GsoKind, ip_proto: u8 },
    #[error("headers of a {kind:?} frame are truncated or malformed")]
    MalformedHeaders { kind: GsoKind },
    #[error("GSO frame is an IP fragment")]
    Fragment,
    #[error("IPv6 routing header: the pseudo-header destination is unknown")]
    Ipv6RoutingHeader,
    #[error("GSO frame has no payload")]
    EmptyPayload,
    #[error("GSO frame's IP length {len} exceeds 65535")]
    TooLong { len: usize },
    #[error("GSO frame would produce {segments} segments, more than {max}")]
    TooManySegments { segments: usize, max: usize },
    #[error(
        "NEEDS_CSUM fields (start {csum_start}, offset {csum_offset}) do not \
         point at the transport checksum (start {l4_offset}, offset {expected_offset})"
    )]
    CsumFieldMismatch {
        csum_start: usize,
        csum_offset: usize,
        l4_offset: usize,
        expected_offset: usize,
    },
    #[error("malformed IPv4 header at offset {0}")]
    BadIpv4Header(usize),
}

// ---------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------

/// One's-complement sum (RFC 1071) of `data` taken as big-endian 16-bit
/// words (an odd trailing byte is padded with zero), added to `initial`.
///
/// The result is folded to 16 bits but kept in a `u32`, so it can be passed
/// back as `initial` to sum discontiguous pieces; every piece but the last
/// must then have even length. Works 8 bytes at a time with an end-around
/// carry on 64 bits, which is congruent modulo 0xffff to the 16-bit sum.
pub fn checksum_partial(data: &[u8], initial: u32) -> u32 {
    let mut acc = u64::from(initial);
    let mut add = |w: u64| {
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        add(u64::from_be_bytes(
            <[u8; 8]>::try_from(c).unwrap_or_default(),
        ));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        for (d, s) in last.iter_mut().zip(rest) {
            *d = *s;
        }
        add(u64::from_be_bytes(last));
    }
    u32::from(fold64(acc))
}

/// Folds a 64-bit one's-complement accumulator to 16 bits.
fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 0xffff.
    acc as u16
}

/// Folds a one's-complement sum to 16 bits, without inverting it.
pub fn fold(sum: u32) -> u16 {
    fold64(u64::from(sum))
}

/// The Internet checksum of `data` seeded with `initial` (a partial sum
/// such as a pseudo-header sum): the inverted folded one's-complement sum, as
/// stored in IP/TCP/UDP headers (big-endian).
pub fn internet_checksum(data: &[u8], initial: u32) -> u16 {
    !fold(checksum_partial(data, initial))
}

/// Sum of a 32-bit length as two 16-bit words.
fn len_sum(len: u32) -> u32 {
    (len >> 16) + (len & 0xffff)
}

/// Partial sum of the IPv4 pseudo-header (RFC 793/768): addresses, protocol
/// and transport length. Feed it as `initial` to [`internet_checksum`].
pub fn pseudo_header_sum_v4(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u32) -> u32 {
    let mut s = checksum_partial(&src, 0);
    s = checksum_partial(&dst, s);
    fold(s + u32::from(proto) + len_sum(l4_len)).into()
}

/// Partial sum of the IPv6 pseudo-header (RFC 8200 section 8.1).
pub fn pseudo_header_sum_v6(src: [u8; 16], dst: [u8; 16], proto: u8, l4_len: u32) -> u32 {
    let mut s = checksum_partial(&src, 0);
    s = checksum_partial(&dst, s);
    fold(s + u32::from(proto) + len_sum(l4_len)).into()
}

/// Pseudo-header sum for whichever IP version `ip` is.
pub fn pseudo_header_sum(ip: &IpAddrs, proto: u8, l4_len: u32) -> u32 {
    match *ip {
        IpAddrs::V4 { src, dst } => pseudo_header_sum_v4(src, dst, proto, l4_len),
        IpAddrs::V6 { src, dst } => pseudo_header_sum_v6(src, dst, proto, l4_len),
    }
}

fn get16(buf: &[u8], off: usize) -> Option<u16> {
    let b = buf.get(off..off.checked_add(2)?)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

fn get32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes(<[u8; 4]>::try_from(b).ok()?))
}

/// Writes a big-endian u16; offsets here were validated beforehand, so an
/// out-of-range write is silently skipped rather than panicking.
fn put16(buf: &mut [u8], off: usize, v: u16) {
    if let Some(b) = off.checked_add(2).and_then(|end| buf.get_mut(off..end)) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

fn put32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(b) = off.checked_add(4).and_then(|end| buf.get_mut(off..end)) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// Completes a `NEEDS_CSUM` checksum: sums everything from `csum_start` to
/// the end of the frame and stores the result at `csum_start + csum_offset`.
///
/// As in the virtio spec (and Linux's CHECKSUM_PARTIAL), the checksum field
/// already holds the guest's pseudo-header sum, so it is summed as part of
/// the data, not cleared. A zero result is stored as 0xffff: both mean zero
/// in one's complement, but a zero UDP checksum would mean "no checksum".
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: usize,
    csum_offset: usize,
) -> Result<(), OffloadError> {
    let field = csum_field(frame.len(), csum_start, csum_offset)?;
    let sum = frame
        .get(csum_start..)
        .map_or(0, |d| checksum_partial(d, 0));
    let csum = match !fold(sum) {
        0 => 0xffff,
        c => c,
    };
    put16(frame, field, csum);
    Ok(())
}

/// Offset of the checksum field, if it and `csum_start` lie inside the frame.
fn csum_field(len: usize, csum_start: usize, csum_offset: usize) -> Result<usize, OffloadError> {
    let err = OffloadError::CsumOutOfBounds {
        csum_start,
        csum_offset,
        len,
    };
    let field = csum_start.checked_add(csum_offset).ok_or(err)?;
    match field.checked_add(2) {
        Some(end) if end <= len => Ok(field),
        _ => Err(err),
    }
}

/// End of the IP datagram according to its own length field, which excludes
/// Ethernet padding that short frames may carry. None when the field is
/// inconsistent with the frame (or is an IPv6 jumbogram).
fn ip_end(frame: &[u8], pkt: &ParsedPacket) -> Option<usize> {
    let l3 = pkt.l3_offset;
    let end = match pkt.ip? {
        IpAddrs::V4 { .. } => l3.checked_add(usize::from(get16(frame, l3 + 2)?))?,
        IpAddrs::V6 { .. } => match get16(frame, l3 + 4)? {
            0 => return None,
            n => l3.checked_add(IPV6_HLEN + usize::from(n))?,
        },
    };
    (end <= frame.len() && end >= pkt.headers_len).then_some(end)
}

/// Whether an IPv6 header is followed by a routing header. Segments' and
/// receive checksums use the header's destination in the pseudo-header,
/// which is wrong when a routing header names a different final destination.
fn ipv6_has_routing_header(frame: &[u8], l3: usize) -> bool {
    let Some(&first) = frame.get(l3 + 6) else {
        return false;
    };
    let mut next = first;
    let mut cur = l3 + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_EXT_ROUTING => return true,
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_DEST_OPTS => {
                let (Some(&nh), Some(&len)) = (frame.get(cur), frame.get(cur + 1)) else {
                    return false;
                };
                next = nh;
                cur += (usize::from(len) + 1) * 8;
            }
            IPV6_EXT_FRAGMENT => {
                let Some(&nh) = frame.get(cur) else {
                    return false;
                };
                next = nh;
                cur += 8;
            }
            _ => return false,
        }
    }
    false
}

/// Whether the frame's TCP or UDP checksum is present and correct, i.e. the
/// device may set `DATA_VALID` when delivering it to a guest that
/// negotiated GUEST_CSUM.
///
/// Returns false whenever nothing was validated: fragments, unknown
/// transports, inconsistent IP or UDP lengths, IPv6 jumbograms or routing
/// headers, and IPv4 UDP without a checksum (zero). The guest then checks
/// the packet itself, so a false negative only costs time.
pub fn verify_l4_checksum(frame: &[u8], pkt: &ParsedPacket) -> bool {
    if pkt.is_fragment {
        return false;
    }
    let (Some(ip), Some(l4)) = (pkt.ip, pkt.l4_offset) else {
        return false;
    };
    let Some(end) = ip_end(frame, pkt) else {
        return false;
    };
    if pkt.ipv6_ext && ipv6_has_routing_header(frame, pkt.l3_offset) {
        return false;
    }
    let Some(seg) = frame.get(l4..end) else {
        return false;
    };
    let proto = match pkt.l4 {
        L4::Tcp { .. } => IPPROTO_TCP,
        L4::Udp { .. } => {
            if get16(frame, l4 + 4) != Some(seg.len() as u16) {
                return false;
            }
            if matches!(ip, IpAddrs::V4 { .. }) && get16(frame, l4 + UDP_CSUM_OFFSET) == Some(0) {
                return false;
            }
            IPPROTO_UDP
        }
        L4::None => return false,
    };
    // `seg` is at most 64 KiB + 40 bytes here, so the length fits.
    let pseudo = pseudo_header_sum(&ip, proto, seg.len() as u32);
    fold(checksum_partial(seg, pseudo)) == 0xffff
}

/// The IPv4 header at `l3_offset`, validated: version 4, IHL at least 5 and
/// the whole header inside the frame. Returns its length.
fn ipv4_header_len(frame: &[u8], l3_offset: usize) -> Result<usize, OffloadError> {
    let err = OffloadError::BadIpv4Header(l3_offset);
    let vihl = *frame.get(l3_offset).ok_or(err)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || frame.len() - l3_offset < ihl {
        return Err(err);
    }
    Ok(ihl)
}

/// Recomputes the header checksum of the IPv4 header at `l3_offset`, after
/// the device changed a field (length, id) in it.
pub fn set_ipv4_header_checksum(frame: &mut [u8], l3_offset: usize) -> Result<(), OffloadError> {
    let ihl = ipv4_header_len(frame, l3_offset)?;
    put16(frame, l3_offset + 10, 0);
    let csum = frame
        .get(l3_offset..l3_offset + ihl)
        .map_or(0, |h| internet_checksum(h, 0));
    put16(frame, l3_offset + 10, csum);
    Ok(())
}

/// Whether the IPv4 header at `l3_offset` is well formed and its checksum
/// verifies.
pub fn verify_ipv4_header_checksum(frame: &[u8], l3_offset: usize) -> bool {
    ipv4_header_len(frame, l3_offset)
        .ok()
        .and_then(|ihl| frame.get(l3_offset..l3_offset + ihl))
        .is_some_and(|h| fold(checksum_partial(h, 0)) == 0xffff)
}

// ---------------------------------------------------------------------------
// Segmentation
// ---------------------------------------------------------------------------

/// How segments' transport checksums are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsumMode {
    /// Computed in full: for peers that cannot take partial checksums.
    Full,
    /// Seeded with the pseudo-header sum and left to the peer, which is
    /// told so with `NEEDS_CSUM`: for peers that accept checksum offload but
    /// not segmentation. Saves one pass over the payload.
    Partial,
}

/// Where the headers of a validated GSO frame are and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoLayout {
    pub kind: GsoKind,
    pub ip: IpAddrs,
    pub l3_offset: usize,
    pub l4_offset: usize,
    /// Length of all headers (L2..L4), copied in front of every segment.
    pub headers_len: usize,
    /// `gso_size`: payload bytes per segment (the last may be shorter).
    pub mss: usize,
    pub payload_len: usize,
    /// ceil(payload_len / mss).
    pub segments: usize,
}

impl GsoLayout {
    fn is_tcp(&self) -> bool {
        matches!(self.kind, GsoKind::TcpV4 | GsoKind::TcpV6)
    }

    fn l4_proto(&self) -> u8 {
        if self.is_tcp() {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        }
    }

    /// Offset of the checksum field within the transport header.
    pub fn csum_offset(&self) -> usize {
        if self.is_tcp() {
            TCP_CSUM_OFFSET
        } else {
            UDP_CSUM_OFFSET
        }
    }

    /// The header that describes this frame's checksum to a peer that will
    /// complete it: `NEEDS_CSUM` at the transport checksum, no GSO.
    fn partial_csum_hdr(&self) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            csum_start: self.l4_offset as u16,
            csum_offset: self.csum_offset() as u16,
            ..Default::default()
        }
    }
}

/// Checks that `frame` is what `hdr` says it is (a TCPv4, TCPv6 or USO GSO
/// frame within limits) and locates its headers. Independent of `hdr_len`.
pub fn gso_layout(frame: &[u8], hdr: &VirtioNetHdr) -> Result<GsoLayout, OffloadError> {
    let kind = hdr
        .gso_kind()
        .ok_or(OffloadError::UnknownGsoType(hdr.gso_type))?;
    let (ethertypes, proto, max_segments): (&[u16], u8, usize) = match kind {
        GsoKind::None => return Err(OffloadError::NotGso),
        GsoKind::Udp => return Err(OffloadError::UfoUnsupported),
        GsoKind::TcpV4 => (&[ETHERTYPE_IPV4], IPPROTO_TCP, MAX_TCP_SEGMENTS),
        GsoKind::TcpV6 => (&[ETHERTYPE_IPV6], IPPROTO_TCP, MAX_TCP_SEGMENTS),
        GsoKind::UdpL4 => {
            if hdr.ecn() {
                return Err(OffloadError::EcnWithoutTcp(hdr.gso_type));
            }
            (
                &[ETHERTYPE_IPV4, ETHERTYPE_IPV6],
                IPPROTO_UDP,
                MAX_UDP_SEGMENTS,
            )
        }
    };
    if hdr.gso_size == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    let pkt = packet::parse(frame);
    if !ethertypes.contains(&pkt.ethertype) {
        return Err(OffloadError::NetworkMismatch {
            kind,
            ethertype: pkt.ethertype,
        });
    }
    let (Some(ip), Some(ip_proto)) = (pkt.ip, pkt.ip_proto) else {
        return Err(OffloadError::MalformedHeaders { kind });
    };
    if pkt.is_fragment {
        return Err(OffloadError::Fragment);
    }
    if ip_proto != proto {
        return Err(OffloadError::TransportMismatch { kind, ip_proto });
    }
    let l4_ok = match pkt.l4 {
        L4::Tcp { .. } => proto == IPPROTO_TCP,
        L4::Udp { .. } => proto == IPPROTO_UDP,
        L4::None => false,
    };
    let Some(l4_offset) = pkt.l4_offset.filter(|_| l4_ok) else {
        return Err(OffloadError::MalformedHeaders { kind });
    };
    let layout_ip_len = frame.len().saturating_sub(pkt.l3_offset);
    let ip_len = match ip {
        IpAddrs::V4 { .. } => layout_ip_len,
        IpAddrs::V6 { .. } => layout_ip_len.saturating_sub(IPV6_HLEN),
    };
    if ip_len > MAX_IP_LEN {
        return Err(OffloadError::TooLong { len: ip_len });
    }
    let mut layout = GsoLayout {
        kind,
        ip,
        l3_offset: pkt.l3_offset,
        l4_offset,
        headers_len: pkt.headers_len,
        mss: usize::from(hdr.gso_size),
        payload_len: pkt.payload_len(frame.len()),
        segments: 0,
    };
    if hdr.needs_csum()
        && (usize::from(hdr.csum_start) != l4_offset
            || usize::from(hdr.csum_offset) != layout.csum_offset())
    {
        return Err(OffloadError::CsumFieldMismatch {
            csum_start: hdr.csum_start.into(),
            csum_offset: hdr.csum_offset.into(),
            l4_offset,
            expected_offset: layout.csum_offset(),
        });
    }
    if layout.payload_len == 0 {
        return Err(OffloadError::EmptyPayload);
    }
    layout.segments = layout.payload_len.div_ceil(layout.mss);
    if layout.segments > max_segments {
        return Err(OffloadError::TooManySegments {
            segments: layout.segments,
            max: max_segments,
        });
    }
    Ok(layout)
}

/// What [`Segmenter::segment`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segmented {
    /// Number of segments passed to the callback.
    pub segments: usize,
    /// Header to forward with every segment: all zero for
    /// [`CsumMode::Full`], `NEEDS_CSUM` at the transport checksum for
    /// [`CsumMode::Partial`].
    pub hdr: VirtioNetHdr,
}

/// Software GSO with a scratch buffer reused across segments and frames, so
/// that segmenting allocates nothing once the buffer has grown to one MTU.
#[derive(Debug, Default)]
pub struct Segmenter {
    buf: Vec<u8>,
}

impl Segmenter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts a GSO frame into segments of at most `gso_size` payload bytes,
    /// each with complete, consistent headers, and passes each one to
    /// `emit` (the slice is only valid during the call).
    ///
    /// Per segment: all headers are copied; IPv4 total length, id (the
    /// original plus the segment index) and header checksum, or IPv6 payload
    /// length, are rewritten; TCP gets its sequence number advanced, FIN/PSH
    /// only on the last segment and CWR only on the first (as Linux does,
    /// whether or not the ECN bit is in `gso_type`); UDP gets its own
    /// length. The transport checksum is computed per `csum`. A frame whose
    /// payload fits one segment still has its headers fixed up and is
    /// emitted once.
    ///
    /// The frame is fully validated before the first segment is emitted, so
    /// on error nothing has been emitted.
    pub fn segment<F: FnMut(&[u8])>(
        &mut self,
        frame: &[u8],
        hdr: &VirtioNetHdr,
        csum: CsumMode,
        mut emit: F,
    ) -> Result<Segmented, OffloadError> {
        let layout = gso_layout(frame, hdr)?;
        if matches!(layout.ip, IpAddrs::V6 { .. })
            && ipv6_has_routing_header(frame, layout.l3_offset)
        {
            return Err(OffloadError::Ipv6RoutingHeader);
        }
        let malformed = OffloadError::MalformedHeaders { kind: layout.kind };
        let (headers, payload) = frame
            .split_at_checked(layout.headers_len)
            .ok_or(malformed)?;
        let l3 = layout.l3_offset;
        let l4 = layout.l4_offset;
        let ip_id = get16(frame, l3 + 4).ok_or(malformed)?;
        let seq = get32(frame, l4 + 4).ok_or(malformed)?;
        let tcp_flags = frame.get(l4 + 13).copied().ok_or(malformed)?;

        for (i, chunk) in payload.chunks(layout.mss).enumerate() {
            let last = i + 1 == layout.segments;
            let buf = &mut self.buf;
            buf.clear();
            buf.extend_from_slice(headers);
            buf.extend_from_slice(chunk);
            let len = buf.len();
            // Bounded by MAX_IP_LEN in gso_layout, so the u16 casts hold.
            match layout.ip {
                IpAddrs::V4 { .. } => {
                    put16(buf, l3 + 2, (len - l3) as u16);
                    put16(buf, l3 + 4, ip_id.wrapping_add(i as u16));
                    set_ipv4_header_checksum(buf, l3)?;
                }
                IpAddrs::V6 { .. } => put16(buf, l3 + 4, (len - l3 - IPV6_HLEN) as u16),
            }
            if layout.is_tcp() {
                put32(buf, l4 + 4, seq.wrapping_add((i * layout.mss) as u32));
                let mut flags = tcp_flags;
                if !last {
                    flags &= !(TCP_FLAG_FIN | TCP_FLAG_PSH);
                }
                if i > 0 {
                    flags &= !TCP_FLAG_CWR;
                }
                if let Some(f) = buf.get_mut(l4 + 13) {
                    *f = flags;
                }
            } else {
                put16(buf, l4 + 4, (len - l4) as u16);
            }
            let field = l4 + layout.csum_offset();
            let pseudo = pseudo_header_sum(&layout.ip, layout.l4_proto(), (len - l4) as u32);
            match csum {
                CsumMode::Partial => put16(buf, field, fold(pseudo)),
                CsumMode::Full => {
                    put16(buf, field, 0);
                    let c = buf
                        .get(l4..)
                        .map_or(0, |seg| internet_checksum(seg, pseudo));
                    put16(buf, field, if c == 0 { 0xffff } else { c });
                }
            }
            emit(buf.as_slice());
        }
        Ok(Segmented {
            segments: layout.segments,
            hdr: match csum {
                CsumMode::Full => VirtioNetHdr::default(),
                CsumMode::Partial => layout.partial_csum_hdr(),
            },
        })
    }
}

/// Segments a GSO frame into owned frames with complete checksums. For the
/// allocation-free path use [`Segmenter::segment`].
pub fn segment(frame: &[u8], hdr: &VirtioNetHdr) -> Result<Vec<Vec<u8>>, OffloadError> {
    let mut out = Vec::new();
    Segmenter::new().segment(frame, hdr, CsumMode::Full, |s| out.push(s.to_vec()))?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Transmit resolution
// ---------------------------------------------------------------------------

/// The offloads the receiver of a forwarded frame accepts in the header that
/// comes with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerOffloads {
    /// Partial checksums (`NEEDS_CSUM`). Required for any GSO pass-through.
    pub csum: bool,
    /// TCPv4 GSO.
    pub tso4: bool,
    /// TCPv6 GSO.
    pub tso6: bool,
    /// TCP GSO frames with the ECN bit (CWR set on the first segment).
    pub tso_ecn: bool,
    /// UDP_L4 GSO, over both IPv4 and IPv6.
    pub uso: bool,
}

impl PeerOffloads {
    /// No offloads: every frame is delivered complete and MTU-sized.
    pub const NONE: Self = Self {
        csum: false,
        tso4: false,
        tso6: false,
        tso_ecn: false,
        uso: false,
    };

    /// Everything: frames pass through with their header.
    pub const ALL: Self = Self {
        csum: true,
        tso4: true,
        tso6: true,
        tso_ecn: true,
        uso: true,
    };

    /// From the features a peer virtio-net driver negotiated (its receive
    /// side: GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, GUEST_USO4+6).
    pub fn from_guest_features(features: u64) -> Self {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        Self {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            tso_ecn: has(VIRTIO_NET_F_GUEST_ECN),
            uso: has(VIRTIO_NET_F_GUEST_USO4) && has(VIRTIO_NET_F_GUEST_USO6),
        }
    }

    /// From the flags given to TUNSETOFFLOAD on a TAP opened with
    /// IFF_VNET_HDR (a TAP without a vnet header accepts nothing: use
    /// [`PeerOffloads::NONE`]).
    pub fn from_tun_offloads(flags: u32) -> Self {
        Self {
            csum: flags & TUN_F_CSUM != 0,
            tso4: flags & TUN_F_TSO4 != 0,
            tso6: flags & TUN_F_TSO6 != 0,
            tso_ecn: flags & TUN_F_TSO_ECN != 0,
            uso: flags & TUN_F_USO4 != 0 && flags & TUN_F_USO6 != 0,
        }
    }

    /// Whether a GSO frame of this kind may be forwarded unsegmented. GSO
    /// implies partial checksums, so `csum` is required too.
    fn accepts_gso(&self, kind: GsoKind, ecn: bool) -> bool {
        let kind_ok = match kind {
            GsoKind::TcpV4 => self.tso4 && (!ecn || self.tso_ecn),
            GsoKind::TcpV6 => self.tso6 && (!ecn || self.tso_ecn),
            GsoKind::UdpL4 => self.uso,
            GsoKind::None | GsoKind::Udp => false,
        };
        self.csum && kind_ok
    }
}

/// What the device does with a transmitted frame for a given peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxAction {
    /// Forward the frame as is, with a sanitized header carrying the
    /// checksum and GSO requests the peer accepts.
    PassThrough,
    /// Complete the partial checksum; forward with an empty header.
    CompleteChecksum,
    /// Segment in software.
    Segment(CsumMode),
}

/// Decides from the header alone what to do with a frame for `peer`:
///
/// - no GSO, no `NEEDS_CSUM`: [`TxAction::PassThrough`];
/// - no GSO, `NEEDS_CSUM`: pass through if the peer takes partial
///   checksums, else [`TxAction::CompleteChecksum`];
/// - TCPV4/TCPV6/UDP_L4: pass through if the peer takes partial checksums
///   and that GSO kind (and ECN, when the ECN bit is set), else
///   [`TxAction::Segment`], leaving segment checksums partial when the peer
///   takes partial checksums and computing them otherwise;
/// - legacy UFO and unknown `gso_type` values are errors.
pub fn plan_tx(hdr: &VirtioNetHdr, peer: PeerOffloads) -> Result<TxAction, OffloadError> {
    let kind = hdr
        .gso_kind()
        .ok_or(OffloadError::UnknownGsoType(hdr.gso_type))?;
    Ok(match kind {
        GsoKind::None if hdr.needs_csum() && !peer.csum => TxAction::CompleteChecksum,
        GsoKind::None => TxAction::PassThrough,
        GsoKind::Udp => return Err(OffloadError::UfoUnsupported),
        _ if peer.accepts_gso(kind, hdr.ecn()) => TxAction::PassThrough,
        _ if peer.csum => TxAction::Segment(CsumMode::Partial),
        _ => TxAction::Segment(CsumMode::Full),
    })
}

/// A transmitted frame made fit for the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxOutput {
    /// One frame to forward with `hdr`.
    Single { hdr: VirtioNetHdr, frame: Vec<u8> },
    /// Segments to forward in order, each with `hdr`.
    Segments {
        hdr: VirtioNetHdr,
        frames: Vec<Vec<u8>>,
    },
}

impl TxOutput {
    /// The header to send with every frame.
    pub fn hdr(&self) -> &VirtioNetHdr {
        match self {
            Self::Single { hdr, .. } | Self::Segments { hdr, .. } => hdr,
        }
    }

    /// The frames to send, in order.
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> {
        let (single, many): (Option<&Vec<u8>>, &[Vec<u8>]) = match self {
            Self::Single { frame, .. } => (Some(frame), &[]),
            Self::Segments { frames, .. } => (None, frames),
        };
        single.into_iter().chain(many).map(Vec::as_slice)
    }
}

/// Makes a frame the guest transmitted with `hdr` acceptable to `peer`, as
/// decided by [`plan_tx`].
///
/// The header handed on is rebuilt rather than copied, so that only what the
/// peer accepts reaches it and guest-only fields do not (`DATA_VALID`, which
/// drivers must not set, header split, `num_buffers`, hash report):
///
/// - pass-through without GSO keeps `NEEDS_CSUM`, `csum_start` and
///   `csum_offset` (checked to lie inside the frame) and nothing else;
/// - pass-through with GSO is validated like segmentation, gets `hdr_len`
///   computed from the frame, and always carries `NEEDS_CSUM` at the
///   transport checksum; when the guest did not set `NEEDS_CSUM`, its
///   checksum field is seeded here with the pseudo-header sum over the whole
///   transport length, as Linux does for GSO frames;
/// - completed checksums and segments with [`CsumMode::Full`] go with an
///   all-zero header; [`CsumMode::Partial`] segments with `NEEDS_CSUM`.
pub fn resolve_tx(
    mut frame: Vec<u8>,
    hdr: &VirtioNetHdr,
    peer: PeerOffloads,
) -> Result<TxOutput, OffloadError> {
    let out_hdr = match plan_tx(hdr, peer)? {
        TxAction::CompleteChecksum => {
            complete_checksum(&mut frame, hdr.csum_start.into(), hdr.csum_offset.into())?;
            VirtioNetHdr::default()
        }
        TxAction::PassThrough if hdr.gso_kind() == Some(GsoKind::None) => {
            if hdr.needs_csum() {
                csum_field(frame.len(), hdr.csum_start.into(), hdr.csum_offset.into())?;
                VirtioNetHdr {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                    csum_start: hdr.csum_start,
                    csum_offset: hdr.csum_offset,
                    ..Default::default()
                }
            } else {
                VirtioNetHdr::default()
            }
        }
        TxAction::PassThrough => {
            let layout = gso_layout(&frame, hdr)?;
            if !hdr.needs_csum() {
                let l4_len = frame.len() - layout.l4_offset;
                let seed = pseudo_header_sum(&layout.ip, layout.l4_proto(), l4_len as u32);
                put16(
                    &mut frame,
                    layout.l4_offset + layout.csum_offset(),
                    fold(seed),
                );
            }
            VirtioNetHdr {
                gso_type: hdr.gso_type,
                gso_size: hdr.gso_size,
                hdr_len: layout.headers_len as u16,
                ..layout.partial_csum_hdr()
            }
        }
        TxAction::Segment(mode) => {
            let mut frames = Vec::new();
            let done = Segmenter::new().segment(&frame, hdr, mode, |s| frames.push(s.to_vec()))?;
            return Ok(TxOutput::Segments {
                hdr: done.hdr,
                frames,
            });
        }
    };
    Ok(TxOutput::Single {
        hdr: out_hdr,
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{ETH_HLEN, TCP_MIN_HLEN, UDP_HLEN};
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_TCPV4,
        VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
    };

    const SRC4: [u8; 4] = [192, 168, 1, 10];
    const DST4: [u8; 4] = [10, 0, 0, 2];
    const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34,
    ];
    const TCP_FLAG_ACK: u8 = 0x10;
    const SEQ: u32 = 0xffff_f000; // wraps during a 64 KiB send

    #[derive(Clone, Copy, PartialEq)]
    enum Ip {
        V4,
        V6,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Proto {
        Tcp,
        Udp,
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Ethernet + IP + TCP/UDP frame with the given payload. Length fields
    /// are filled; checksums are left zero. TCP carries a 12-byte option
    /// block so header lengths are not the minimum.
    fn build(ip: Ip, proto: Proto, data: &[u8], tcp_flags: u8) -> Vec<u8> {
        let l4_hlen = match proto {
            Proto::Tcp => TCP_MIN_HLEN + 12,
            Proto::Udp => UDP_HLEN,
        };
        let ip_hlen = match ip {
            Ip::V4 => IPV4_MIN_HLEN,
            Ip::V6 => IPV6_HLEN,
        };
        let l4 = ETH_HLEN + ip_hlen;
        let mut f = vec![0u8; l4 + l4_hlen];
        f[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        let ipp = match proto {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        };
        let l4_len = l4_hlen + data.len();
        match ip {
            Ip::V4 => {
                f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
                let h = &mut f[ETH_HLEN..];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
                h[4..6].copy_from_slice(&0xfffeu16.to_be_bytes()); // id wraps
                h[6] = 0x40; // DF
                h[8] = 64;
                h[9] = ipp;
                h[12..16].copy_from_slice(&SRC4);
                h[16..20].copy_from_slice(&DST4);
            }
            Ip::V6 => {
                f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
                let h = &mut f[ETH_HLEN..];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
                h[6] = ipp;
                h[7] = 64;
                h[8..24].copy_from_slice(&SRC6);
                h[24..40].copy_from_slice(&DST6);
            }
        }
        let t = &mut f[l4..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&443u16.to_be_bytes());
        match proto {
            Proto::Tcp => {
                t[4..8].copy_from_slice(&SEQ.to_be_bytes());
                t[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                t[12] = ((l4_hlen / 4) as u8) << 4;
                t[13] = tcp_flags;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                // NOP NOP timestamp
                t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
            }
            Proto::Udp => {
                t[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            }
        }
        if ip == Ip::V4 {
            set_ipv4_header_checksum(&mut f, ETH_HLEN).unwrap();
        }
        f.extend_from_slice(data);
        f
    }

    /// Seeds the transport checksum field with the pseudo-header sum, as a
    /// guest does before setting NEEDS_CSUM. Returns (csum_start, offset).
    fn seed(f: &mut [u8]) -> (usize, usize) {
        let p = packet::parse(f);
        let l4 = p.l4_offset.unwrap();
        let (proto, off) = if p.is_tcp() {
            (IPPROTO_TCP, TCP_CSUM_OFFSET)
        } else {
            (IPPROTO_UDP, UDP_CSUM_OFFSET)
        };
        let s = pseudo_header_sum(&p.ip.unwrap(), proto, (f.len() - l4) as u32);
        put16(f, l4 + off, fold(s));
        (l4, off)
    }

    fn gso_hdr(gso_type: u32, gso_size: u16, f: &[u8]) -> VirtioNetHdr {
        let p = packet::parse(f);
        let l4 = p.l4_offset.unwrap_or(0);
        VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: gso_type as u8,
            gso_size,
            hdr_len: 9999, // unreliable on purpose
            csum_start: l4 as u16,
            csum_offset: if p.is_tcp() { 16 } else { 6 },
            ..Default::default()
        }
    }

    fn naive_sum(data: &[u8], initial: u32) -> u32 {
        let mut s = (initial & 0xffff) + (initial >> 16);
        for w in data.chunks(2) {
            let hi = u32::from(w[0]) << 8;
            let lo = w.get(1).copied().map_or(0, u32::from);
            s += hi | lo;
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum_partial(&data, 0), 0xddf2);
        assert_eq!(internet_checksum(&data, 0), 0x220d);
        // Chaining even-length pieces gives the same sum.
        let s = checksum_partial(&data[..2], 0);
        let s = checksum_partial(&data[2..6], s);
        assert_eq!(checksum_partial(&data[6..], s), 0xddf2);
        assert_eq!(internet_checksum(&[], 0), 0xffff);
        assert_eq!(checksum_partial(&[0xab], 0), 0xab00);
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // Well-known example header whose checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        set_ipv4_header_checksum(&mut h, 0).unwrap();
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
        assert!(verify_ipv4_header_checksum(&h, 0));
        h[15] ^= 1;
        assert!(!verify_ipv4_header_checksum(&h, 0));
        assert_eq!(
            set_ipv4_header_checksum(&mut h[..19], 0),
            Err(OffloadError::BadIpv4Header(0))
        );
        assert!(set_ipv4_header_checksum(&mut h, 20).is_err());
        h[0] = 0x65;
        assert!(set_ipv4_header_checksum(&mut h, 0).is_err());
    }

    #[test]
    fn fast_sum_matches_naive() {
        let data = payload(4099);
        for start in 0..9 {
            for len in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 1001, 4090] {
                let d = &data[start..start + len];
                assert_eq!(checksum_partial(d, 0x1_2345), naive_sum(d, 0x1_2345));
            }
        }
        let ones = vec![0xffu8; 70_000];
        assert_eq!(checksum_partial(&ones, 0), naive_sum(&ones, 0));
        assert_eq!(checksum_partial(&ones, u32::MAX), naive_sum(&ones, 0xffff));
    }

    #[test]
    fn needs_csum_completion_verifies() {
        for ip in [Ip::V4, Ip::V6] {
            for proto in [Proto::Tcp, Proto::Udp] {
                for n in [0, 1, 2, 3, 100, 1401] {
                    let mut f = build(ip, proto, &payload(n), TCP_FLAG_ACK | TCP_FLAG_PSH);
                    let (start, off) = seed(&mut f);
                    let p = packet::parse(&f);
                    assert!(!verify_l4_checksum(&f, &p));
                    complete_checksum(&mut f, start, off).unwrap();
                    assert!(verify_l4_checksum(&f, &p), "{n}");
                    // Ethernet padding beyond the IP length is ignored.
                    let mut padded = f.clone();
                    padded.resize(f.len().max(60) + 4, 0xaa);
                    assert!(verify_l4_checksum(&padded, &packet::parse(&padded)));
                    // Any corruption is caught.
                    let last = f.len() - 1;
                    f[last] ^= 0x10;
                    assert!(!verify_l4_checksum(&f, &p));
                }
            }
        }
    }

    #[test]
    fn verify_rejects_what_it_cannot_check() {
        // IPv4 UDP without checksum: nothing was validated.
        let f = build(Ip::V4, Proto::Udp, &payload(10), 0);
        assert!(!verify_l4_checksum(&f, &packet::parse(&f)));
        // Inconsistent UDP length.
        let mut f = build(Ip::V6, Proto::Udp, &payload(10), 0);
        let (s, o) = seed(&mut f);
        complete_checksum(&mut f, s, o).unwrap();
        assert!(verify_l4_checksum(&f, &packet::parse(&f)));
        let mut bad = f.clone();
        put16(&mut bad, s + 4, 9);
        assert!(!verify_l4_checksum(&bad, &packet::parse(&bad)));
        // IP length beyond the frame.
        let mut bad = f.clone();
        put16(&mut bad, ETH_HLEN + 4, 500);
        assert!(!verify_l4_checksum(&bad, &packet::parse(&bad)));
        // Truncated frames never verify or panic.
        for n in 0..f.len() {
            assert!(!verify_l4_checksum(&f[..n], &packet::parse(&f[..n])));
        }
        // A parsed packet that does not belong to the frame.
        assert!(!verify_l4_checksum(&f[..20], &packet::parse(&f)));
    }

    #[test]
    fn complete_checksum_bounds() {
        let mut f = build(Ip::V4, Proto::Tcp, &payload(10), 0);
        let len = f.len();
        let oob = |csum_start, csum_offset| OffloadError::CsumOutOfBounds {
            csum_start,
            csum_offset,
            len,
        };
        assert_eq!(complete_checksum(&mut f, len + 1, 0), Err(oob(len + 1, 0)));
        assert_eq!(complete_checksum(&mut f, len, 0), Err(oob(len, 0)));
        assert_eq!(
            complete_checksum(&mut f, 34, len - 35),
            Err(oob(34, len - 35))
        );
        assert_eq!(
            complete_checksum(&mut f, 34, usize::MAX),
            Err(oob(34, usize::MAX))
        );
        assert_eq!(
            complete_checksum(&mut f, usize::MAX, 1),
            Err(oob(usize::MAX, 1))
        );
        assert_eq!(
            complete_checksum(&mut f, 65535, 65535),
            Err(oob(65535, 65535))
        );
        // The field may end exactly at the end of the frame.
        assert_eq!(complete_checksum(&mut f, 34, len - 36), Ok(()));
        assert_eq!(complete_checksum(&mut f, len - 2, 0), Ok(()));
    }

    /// Checks segments against the original GSO frame; returns them parsed.
    fn check_segments(orig: &[u8], segs: &[Vec<u8>], mss: usize, ecn_cwr: bool) {
        let op = packet::parse(orig);
        let data = &orig[op.headers_len..];
        assert_eq!(segs.len(), data.len().div_ceil(mss));
        let mut joined = Vec::new();
        let mut expect_seq = SEQ;
        let orig_flags = orig[op.l4_offset.unwrap() + 13];
        for (i, s) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let p = packet::parse(s);
            assert_eq!(p.headers_len, op.headers_len);
            let l4 = p.l4_offset.unwrap();
            let body = &s[p.headers_len..];
            assert!(!body.is_empty() && body.len() <= mss);
            assert!(last || body.len() == mss);
            joined.extend_from_slice(body);
            assert!(verify_l4_checksum(s, &p), "segment {i}");
            assert_eq!(&s[..ETH_HLEN], &orig[..ETH_HLEN]);
            match p.ip.unwrap() {
                IpAddrs::V4 { .. } => {
                    assert!(verify_ipv4_header_checksum(s, ETH_HLEN));
                    assert_eq!(get16(s, ETH_HLEN + 2), Some((s.len() - ETH_HLEN) as u16));
                    assert_eq!(
                        get16(s, ETH_HLEN + 4),
                        Some(0xfffeu16.wrapping_add(i as u16))
                    );
                    assert_eq!(s[ETH_HLEN + 6], 0x40);
                }
                IpAddrs::V6 { .. } => {
                    assert_eq!(
                        get16(s, ETH_HLEN + 4),
                        Some((s.len() - ETH_HLEN - 40) as u16)
                    );
                }
            }
            if p.is_tcp() {
                assert_eq!(get32(s, l4 + 4), Some(expect_seq));
                expect_seq = expect_seq.wrapping_add(body.len() as u32);
                let flags = s[l4 + 13];
                assert_eq!(flags & TCP_FLAG_ACK, orig_flags & TCP_FLAG_ACK);
                assert_eq!(
                    flags & TCP_FLAG_FIN != 0,
                    last && orig_flags & TCP_FLAG_FIN != 0
                );
                assert_eq!(
                    flags & TCP_FLAG_PSH != 0,
                    last && orig_flags & TCP_FLAG_PSH != 0
                );
                assert_eq!(flags & TCP_FLAG_CWR != 0, i == 0 && ecn_cwr);
                // Options are carried into every segment.
                assert_eq!(&s[l4 + 20..l4 + 32], &orig[l4 + 20..l4 + 32]);
            } else {
                assert_eq!(get16(s, l4 + 4), Some((s.len() - l4) as u16));
            }
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn tso4_64k() {
        // Largest IPv4 datagram: 65535 - 20 - 32 bytes of payload.
        let data = payload(MAX_IP_LEN - 20 - 32);
        let flags = TCP_FLAG_ACK | TCP_FLAG_PSH | TCP_FLAG_FIN;
        let mut f = build(Ip::V4, Proto::Tcp, &data, flags);
        seed(&mut f);
        let h = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448, &f);
        let segs = segment(&f, &h).unwrap();
        assert_eq!(segs.len(), 46);
        check_segments(&f, &segs, 1448, false);
    }

    #[test]
    fn tso6_64k_with_and_without_ecn() {
        let data = payload(MAX_IP_LEN - 32);
        for ecn in [false, true] {
            let mut flags = TCP_FLAG_ACK | TCP_FLAG_PSH;
            let mut gso = VIRTIO_NET_HDR_GSO_TCPV6;
            if ecn {
                flags |= TCP_FLAG_CWR;
                gso |= VIRTIO_NET_HDR_GSO_ECN;
            }
            let mut f = build(Ip::V6, Proto::Tcp, &data, flags);
            seed(&mut f);
            let h = gso_hdr(gso, 1448, &f);
            let segs = segment(&f, &h).unwrap();
            assert_eq!(segs.len(), 46);
            check_segments(&f, &segs, 1448, ecn);
        }
    }

    #[test]
    fn tso4_with_ecn_and_vlan_and_small_frames() {
        let data = payload(5000);
        let mut f = build(Ip::V4, Proto::Tcp, &data, TCP_FLAG_ACK | TCP_FLAG_CWR);
        // Insert a VLAN tag.
        f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        let h = VirtioNetHdr {
            gso_type: (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN) as u8,
            gso_size: 1000,
            ..Default::default()
        };
        let segs = segment(&f, &h).unwrap();
        assert_eq!(segs.len(), 5);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let p = packet::parse(s);
            assert_eq!(p.vlan, Some(5));
            assert!(verify_l4_checksum(s, &p));
            assert!(verify_ipv4_header_checksum(s, p.l3_offset));
            assert_eq!(s[p.l4_offset.unwrap() + 13] & TCP_FLAG_CWR != 0, i == 0);
            joined.extend_from_slice(&s[p.headers_len..]);
        }
        assert_eq!(joined, data);

        // Payload that fits one segment: emitted once with fixed headers.
        let mut f = build(Ip::V6, Proto::Tcp, &payload(100), TCP_FLAG_ACK);
        put16(&mut f, ETH_HLEN + 4, 0); // wrong length, fixed by segmentation
        let h = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1448, &f);
        let segs = segment(&f, &h).unwrap();
        assert_eq!(segs.len(), 1);
        check_segments(&f, &segs, 1448, false);
    }

    #[test]
    fn uso_v4_and_v6() {
        for ip in [Ip::V4, Ip::V6] {
            let data = payload(10_000);
            let mut f = build(ip, Proto::Udp, &data, 0);
            seed(&mut f);
            let h = gso_hdr(VIRTIO_NET_HDR_GSO_UDP_L4, 1200, &f);
            let segs = segment(&f, &h).unwrap();
            assert_eq!(segs.len(), 9);
            check_segments(&f, &segs, 1200, false);
        }
    }

    #[test]
    fn partial_mode_segments_complete_correctly() {
        for (ip, proto, gso) in [
            (Ip::V4, Proto::Tcp, VIRTIO_NET_HDR_GSO_TCPV4),
            (Ip::V6, Proto::Tcp, VIRTIO_NET_HDR_GSO_TCPV6),
            (Ip::V4, Proto::Udp, VIRTIO_NET_HDR_GSO_UDP_L4),
            (Ip::V6, Proto::Udp, VIRTIO_NET_HDR_GSO_UDP_L4),
        ] {
            let data = payload(7000);
            let f = build(ip, proto, &data, TCP_FLAG_ACK);
            let h = gso_hdr(gso, 1448, &f);
            let mut seg = Segmenter::new();
            let mut segs = Vec::new();
            let done = seg
                .segment(&f, &h, CsumMode::Partial, |s| segs.push(s.to_vec()))
                .unwrap();
            assert_eq!(done.segments, 5);
            assert!(done.hdr.needs_csum());
            assert_eq!(done.hdr.gso_kind(), Some(GsoKind::None));
            for s in &mut segs {
                assert!(!verify_l4_checksum(s, &packet::parse(s)));
                complete_checksum(s, done.hdr.csum_start.into(), done.hdr.csum_offset.into())
                    .unwrap();
            }
            check_segments(&f, &segs, 1448, false);
            // The scratch buffer is reused: a second frame gives the same result.
            let mut again = Vec::new();
            seg.segment(&f, &h, CsumMode::Partial, |s| again.push(s.to_vec()))
                .unwrap();
            assert_eq!(again.len(), 5);
        }
    }

    fn seg_err(f: &[u8], h: &VirtioNetHdr) -> OffloadError {
        let mut n = 0;
        let e = Segmenter::new()
            .segment(f, h, CsumMode::Full, |_| n += 1)
            .unwrap_err();
        assert_eq!(n, 0, "nothing is emitted on error");
        e
    }

    #[test]
    fn malformed_gso_frames_are_rejected() {
        let tcp4 = build(Ip::V4, Proto::Tcp, &payload(3000), TCP_FLAG_ACK);
        let tcp6 = build(Ip::V6, Proto::Tcp, &payload(3000), TCP_FLAG_ACK);
        let udp4 = build(Ip::V4, Proto::Udp, &payload(3000), 0);
        let h4 = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV4, 1448, &tcp4);
        let h6 = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1448, &tcp6);
        let hu = gso_hdr(VIRTIO_NET_HDR_GSO_UDP_L4, 1448, &udp4);

        let zero = VirtioNetHdr { gso_size: 0, ..h4 };
        assert_eq!(seg_err(&tcp4, &zero), OffloadError::ZeroGsoSize);

        // gso_type that does not match the frame.
        assert!(matches!(
            seg_err(&tcp6, &h4),
            OffloadError::NetworkMismatch {
                kind: GsoKind::TcpV4,
                ethertype: ETHERTYPE_IPV6
            }
        ));
        assert!(matches!(
            seg_err(&tcp4, &h6),
            OffloadError::NetworkMismatch { .. }
        ));
        let tcp_as_udp = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_UDP_L4 as u8,
            ..h4
        };
        assert_eq!(
            seg_err(&tcp4, &tcp_as_udp),
            OffloadError::TransportMismatch {
                kind: GsoKind::UdpL4,
                ip_proto: IPPROTO_TCP
            }
        );
        let udp_as_tcp = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            ..hu
        };
        assert!(matches!(
            seg_err(&udp4, &udp_as_tcp),
            OffloadError::TransportMismatch { .. }
        ));
        let mut arp = tcp4.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(matches!(
            seg_err(&arp, &h4),
            OffloadError::NetworkMismatch { .. }
        ));

        // Unsupported or unknown gso types, ECN on UDP.
        let ufo = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_UDP as u8,
            ..hu
        };
        assert_eq!(seg_err(&udp4, &ufo), OffloadError::UfoUnsupported);
        let unknown = VirtioNetHdr { gso_type: 2, ..h4 };
        assert_eq!(seg_err(&tcp4, &unknown), OffloadError::UnknownGsoType(2));
        let none = VirtioNetHdr { gso_type: 0, ..h4 };
        assert_eq!(seg_err(&tcp4, &none), OffloadError::NotGso);
        let uso_ecn = VirtioNetHdr {
            gso_type: (VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN) as u8,
            ..hu
        };
        assert!(matches!(
            seg_err(&udp4, &uso_ecn),
            OffloadError::EcnWithoutTcp(_)
        ));

        // Truncated headers, at every length up to the end of the TCP header.
        let hl = packet::parse(&tcp4).headers_len;
        for n in 0..hl {
            let e = seg_err(&tcp4[..n], &h4);
            assert!(
                matches!(
                    e,
                    OffloadError::MalformedHeaders { .. } | OffloadError::NetworkMismatch { .. }
                ),
                "{n}: {e}"
            );
        }
        for n in 0..packet::parse(&tcp6).headers_len {
            assert!(seg_err(&tcp6[..n], &h6) != OffloadError::EmptyPayload);
        }
        assert_eq!(seg_err(&tcp4[..hl], &h4), OffloadError::EmptyPayload);
        let mut bad_doff = tcp4.clone();
        bad_doff[hl - 32 + 12] = 0x20; // data offset 8 bytes
        assert!(matches!(
            seg_err(&bad_doff, &h4),
            OffloadError::MalformedHeaders { .. }
        ));

        // Fragments.
        let mut frag = tcp4.clone();
        frag[ETH_HLEN + 6] = 0x20;
        assert_eq!(seg_err(&frag, &h4), OffloadError::Fragment);

        // Too many segments.
        let tiny = VirtioNetHdr { gso_size: 1, ..h4 };
        assert_eq!(
            seg_err(&tcp4, &tiny),
            OffloadError::TooManySegments {
                segments: 3000,
                max: MAX_TCP_SEGMENTS
            }
        );
        let uso129 = VirtioNetHdr { gso_size: 23, ..hu };
        assert_eq!(
            seg_err(&udp4, &uso129),
            OffloadError::TooManySegments {
                segments: 131,
                max: MAX_UDP_SEGMENTS
            }
        );
        let uso128 = VirtioNetHdr { gso_size: 24, ..hu };
        assert_eq!(segment(&udp4, &uso128).unwrap().len(), 125);

        // Longer than an IP datagram can be.
        let big4 = build(Ip::V4, Proto::Tcp, &payload(MAX_IP_LEN - 51), TCP_FLAG_ACK);
        assert!(matches!(
            seg_err(&big4, &h4),
            OffloadError::TooLong { len: 65536 }
        ));
        let big6 = build(Ip::V6, Proto::Tcp, &payload(MAX_IP_LEN - 31), TCP_FLAG_ACK);
        assert!(matches!(seg_err(&big6, &h6), OffloadError::TooLong { .. }));

        // NEEDS_CSUM pointing somewhere else than the transport checksum.
        let wrong_off = VirtioNetHdr {
            csum_offset: 6,
            ..h4
        };
        assert!(matches!(
            seg_err(&tcp4, &wrong_off),
            OffloadError::CsumFieldMismatch { .. }
        ));
        let wrong_start = VirtioNetHdr {
            csum_start: 14,
            ..h4
        };
        assert!(matches!(
            seg_err(&tcp4, &wrong_start),
            OffloadError::CsumFieldMismatch { .. }
        ));
        // Without NEEDS_CSUM the fields are ignored.
        let no_csum = VirtioNetHdr {
            flags: 0,
            ..wrong_start
        };
        assert_eq!(segment(&tcp4, &no_csum).unwrap().len(), 3);
    }

    #[test]
    fn ipv6_extension_headers() {
        let data = payload(3000);
        let plain = build(Ip::V6, Proto::Tcp, &data, TCP_FLAG_ACK);
        // Insert an 8-byte extension header of type `ext` before TCP.
        let with_ext = |ext: u8| {
            let mut f = plain.clone();
            let l4 = ETH_HLEN + IPV6_HLEN;
            f[ETH_HLEN + 6] = ext;
            f.splice(l4..l4, [IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
            let pl = get16(&f, ETH_HLEN + 4).unwrap() + 8;
            put16(&mut f, ETH_HLEN + 4, pl);
            f
        };
        let dst_opts = with_ext(IPV6_EXT_DEST_OPTS);
        let h = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1448, &dst_opts);
        let segs = segment(&dst_opts, &h).unwrap();
        for s in &segs {
            let p = packet::parse(s);
            assert!(p.ipv6_ext);
            assert!(verify_l4_checksum(s, &p));
            assert_eq!(
                get16(s, ETH_HLEN + 4),
                Some((s.len() - ETH_HLEN - 40) as u16)
            );
        }
        let routing = with_ext(IPV6_EXT_ROUTING);
        let h = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1448, &routing);
        assert_eq!(seg_err(&routing, &h), OffloadError::Ipv6RoutingHeader);
    }

    #[test]
    fn garbage_never_panics() {
        let mut f = build(Ip::V4, Proto::Tcp, &payload(2000), TCP_FLAG_ACK);
        let mut x: u32 = 12345;
        for round in 0..3000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let pos = (x >> 8) as usize % 80;
            f[pos] = (x >> 20) as u8;
            let h = VirtioNetHdr {
                flags: (x & 3) as u8,
                gso_type: [1u8, 4, 5, 0x81, 3, 0][round % 6],
                gso_size: (x >> 16) as u16 % 3000,
                csum_start: (x >> 3) as u16 % 80,
                csum_offset: (x >> 11) as u16 % 40,
                ..Default::default()
            };
            let _ = segment(&f, &h);
            let _ = resolve_tx(f.clone(), &h, PeerOffloads::NONE);
            let _ = resolve_tx(f.clone(), &h, PeerOffloads::ALL);
            let n = (x as usize) % f.len();
            let _ = resolve_tx(f[..n].to_vec(), &h, PeerOffloads::NONE);
            let _ = verify_l4_checksum(&f[..n], &packet::parse(&f[..n]));
        }
    }

    #[test]
    fn plan_follows_peer_offloads() {
        let tso4 = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            ..Default::default()
        };
        let ecn = VirtioNetHdr {
            gso_type: tso4.gso_type | VIRTIO_NET_HDR_GSO_ECN as u8,
            ..tso4
        };
        let csum_only = PeerOffloads {
            csum: true,
            ..PeerOffloads::NONE
        };
        let no_ecn = PeerOffloads {
            tso_ecn: false,
            ..PeerOffloads::ALL
        };
        let tso_no_csum = PeerOffloads {
            csum: false,
            ..PeerOffloads::ALL
        };
        let plain = VirtioNetHdr::default();
        let partial = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            ..plain
        };
        use CsumMode::*;
        use TxAction::*;
        let cases = [
            (plain, PeerOffloads::NONE, PassThrough),
            (partial, PeerOffloads::NONE, CompleteChecksum),
            (partial, csum_only, PassThrough),
            (tso4, PeerOffloads::ALL, PassThrough),
            (tso4, PeerOffloads::NONE, Segment(Full)),
            (tso4, csum_only, Segment(Partial)),
            (tso4, tso_no_csum, Segment(Full)),
            (ecn, no_ecn, Segment(Partial)),
            (ecn, PeerOffloads::ALL, PassThrough),
        ];
        for (h, peer, want) in cases {
            assert_eq!(plan_tx(&h, peer), Ok(want), "{h:?} {peer:?}");
        }
        let ufo = VirtioNetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_UDP as u8,
            ..tso4
        };
        assert_eq!(
            plan_tx(&ufo, PeerOffloads::ALL),
            Err(OffloadError::UfoUnsupported)
        );
        let tap = PeerOffloads::from_tun_offloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4);
        assert_eq!(
            tap,
            PeerOffloads {
                csum: true,
                tso4: true,
                ..PeerOffloads::NONE
            }
        );
        let guest = PeerOffloads::from_guest_features(
            (1 << VIRTIO_NET_F_GUEST_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_TSO6)
                | (1 << VIRTIO_NET_F_GUEST_USO4)
                | (1 << VIRTIO_NET_F_GUEST_USO6),
        );
        assert_eq!(
            guest,
            PeerOffloads {
                csum: true,
                tso6: true,
                uso: true,
                ..PeerOffloads::NONE
            }
        );
    }

    #[test]
    fn resolve_tx_outputs() {
        // Non-GSO partial checksum, peer without csum: completed, zero header.
        let mut f = build(Ip::V4, Proto::Udp, &payload(300), 0);
        let (s, o) = seed(&mut f);
        let h = VirtioNetHdr {
            flags: (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8,
            csum_start: s as u16,
            csum_offset: o as u16,
            num_buffers: 7,
            hash_value: 1,
            ..Default::default()
        };
        let out = resolve_tx(f.clone(), &h, PeerOffloads::NONE).unwrap();
        assert_eq!(*out.hdr(), VirtioNetHdr::default());
        let frames: Vec<_> = out.frames().collect();
        assert_eq!(frames.len(), 1);
        assert!(verify_l4_checksum(frames[0], &packet::parse(frames[0])));

        // Same frame, peer with csum: unchanged, header keeps only NEEDS_CSUM.
        let out = resolve_tx(f.clone(), &h, PeerOffloads::ALL).unwrap();
        assert_eq!(
            out,
            TxOutput::Single {
                hdr: VirtioNetHdr {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                    csum_start: s as u16,
                    csum_offset: o as u16,
                    ..Default::default()
                },
                frame: f.clone(),
            }
        );
        // Out-of-bounds csum fields are rejected even on pass-through.
        let bad = VirtioNetHdr {
            csum_start: f.len() as u16,
            ..h
        };
        assert!(matches!(
            resolve_tx(f.clone(), &bad, PeerOffloads::ALL),
            Err(OffloadError::CsumOutOfBounds { .. })
        ));
        assert!(matches!(
            resolve_tx(f.clone(), &bad, PeerOffloads::NONE),
            Err(OffloadError::CsumOutOfBounds { .. })
        ));
        // No offload requested: DATA_VALID from the guest is dropped.
        let dv = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID as u8,
            ..Default::default()
        };
        assert_eq!(
            *resolve_tx(f.clone(), &dv, PeerOffloads::ALL).unwrap().hdr(),
            VirtioNetHdr::default()
        );

        // GSO pass-through: hdr_len recomputed, NEEDS_CSUM at the TCP checksum.
        let data = payload(4000);
        let mut t = build(Ip::V6, Proto::Tcp, &data, TCP_FLAG_ACK);
        seed(&mut t);
        let gh = gso_hdr(VIRTIO_NET_HDR_GSO_TCPV6, 1448, &t);
        let out = resolve_tx(t.clone(), &gh, PeerOffloads::ALL).unwrap();
        let want_hdr = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 as u8,
            gso_size: 1448,
            hdr_len: (ETH_HLEN + 40 + 32) as u16,
            csum_start: (ETH_HLEN + 40) as u16,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(
            out,
            TxOutput::Single {
                hdr: want_hdr,
                frame: t.clone()
            }
        );
        // Without NEEDS_CSUM from the guest, the device seeds the field.
        let mut unseeded = t.clone();
        put16(&mut unseeded, ETH_HLEN + 40 + 16, 0x1234);
        let no_csum = VirtioNetHdr { flags: 0, ..gh };
        let out = resolve_tx(unseeded, &no_csum, PeerOffloads::ALL).unwrap();
        assert_eq!(
            out,
            TxOutput::Single {
                hdr: want_hdr,
                frame: t.clone()
            }
        );

        // Peer without TSO6: segmented with full checksums.
        let peer = PeerOffloads {
            tso6: false,
            csum: false,
            ..PeerOffloads::ALL
        };
        let out = resolve_tx(t.clone(), &gh, peer).unwrap();
        assert_eq!(*out.hdr(), VirtioNetHdr::default());
        let segs: Vec<Vec<u8>> = out.frames().map(<[u8]>::to_vec).collect();
        assert_eq!(segs.len(), 3);
        check_segments(&t, &segs, 1448, false);

        // Malformed GSO frames are rejected on pass-through too.
        assert!(matches!(
            resolve_tx(t[..60].to_vec(), &gh, PeerOffloads::ALL),
            Err(OffloadError::MalformedHeaders { .. })
        ));
    }
}
