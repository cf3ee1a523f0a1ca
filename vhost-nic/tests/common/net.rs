//! Frames to send and an independent Toeplitz hash to predict RSS.

/// MACs the daemon gives the first and second `--device`.
pub const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
pub const IP_A: [u8; 4] = [10, 0, 0, 1];
pub const IP_B: [u8; 4] = [10, 0, 0, 2];

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The 40-byte key of the Microsoft RSS verification suite (Linux default).
pub const DEFAULT_RSS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + `l4` (a UDP or TCP header and payload, checksum field
/// zero), with the IPv4 and L4 checksums filled in.
fn ipv4_frame(
    dst: [u8; 6],
    src: [u8; 6],
    (src_ip, dst_ip): ([u8; 4], [u8; 4]),
    proto: u8,
    mut l4: Vec<u8>,
    csum_offset: usize,
) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0x12,
        0x34,
        0x40, // DF
        0,
        64,
        proto,
        0,
        0,
    ];
    ip.extend_from_slice(&src_ip);
    ip.extend_from_slice(&dst_ip);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src_ip);
    pseudo.extend_from_slice(&dst_ip);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let c = csum_fold(csum_add(csum_add(0, &pseudo), &l4));
    l4[csum_offset..csum_offset + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// A UDP/IPv4 frame from A to B.
pub fn udp_frame(dst: [u8; 6], src: [u8; 6], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ipv4_frame(dst, src, (IP_A, IP_B), IPPROTO_UDP, l4, 6)
}

/// A TCP/IPv4 segment (ACK|PSH) from `IP_A:sport` to `IP_B:dport`.
pub fn tcp_frame(dst: [u8; 6], src: [u8; 6], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
    l4.extend_from_slice(&2000u32.to_be_bytes()); // ack
    l4.extend_from_slice(&[5 << 4, 0x18]); // data offset 5, ACK|PSH
    l4.extend_from_slice(&65535u16.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    l4.extend_from_slice(payload);
    ipv4_frame(dst, src, (IP_A, IP_B), IPPROTO_TCP, l4, 16)
}

/// The TCP source port of a frame built by `tcp_frame`.
pub fn tcp_sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

/// Toeplitz hash, bit by bit from the definition (independent of the
/// device's table-driven implementation).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let key_bit = |i: usize| (key.get(i / 8).copied().unwrap_or(0) >> (7 - i % 8)) & 1;
    let mut hash = 0u32;
    for i in 0..input.len() * 8 {
        if (input[i / 8] >> (7 - i % 8)) & 1 == 1 {
            let window = (0..32).fold(0u32, |w, b| (w << 1) | u32::from(key_bit(i + b)));
            hash ^= window;
        }
    }
    hash
}

/// The RSS hash of a TCP/IPv4 flow (hash type TCPv4): source address,
/// destination address, source port, destination port.
pub fn tcpv4_hash(key: &[u8], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> u32 {
    let mut input = Vec::with_capacity(12);
    input.extend_from_slice(&src);
    input.extend_from_slice(&dst);
    input.extend_from_slice(&sport.to_be_bytes());
    input.extend_from_slice(&dport.to_be_bytes());
    toeplitz(key, &input)
}
