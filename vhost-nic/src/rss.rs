//! Receive-side scaling and hash reporting (virtio 1.2+, "Hash calculation
//! for incoming packets" and "Receive-side scaling (RSS)").
//!
//! The guest programs a Toeplitz key, the enabled hash types and (for RSS) an
//! indirection table through the control queue. For every received frame the
//! device hashes a fixed selection of header fields, reports the hash in
//! `virtio_net_hdr_v1_hash` and, with RSS, picks the receive queue from the
//! indirection table.
//!
//! Control commands come from the guest and are untrusted: parsing validates
//! every field against the device limits and never panics. The per-packet
//! path (`compute_hash`, `RssConfig::select_queue`) does not allocate.
//!
//! Simplification: for the `_EX` hash types the spec hashes the home address
//! (destination options header) and the routing header type 2 address instead
//! of the source and destination addresses when those options are present.
//! The frame parser does not extract them, so the `_EX` types always use the
//! IPv6 source and destination addresses; this is exact for every packet that
//! carries neither option (everything but Mobile IPv6 traffic).

use thiserror::Error;

use crate::hash_fields::{
    HashFields, Xfrm, SPEC_FIELDS, VIRTIO_NET_HASH_FIELD_DST_IP, VIRTIO_NET_HASH_FIELD_DST_PORT,
    VIRTIO_NET_HASH_FIELD_SRC_IP, VIRTIO_NET_HASH_FIELD_SRC_PORT,
};
use crate::packet::{IpAddrs, ParsedPacket, L4};

/// Control class and commands that carry the configurations parsed here.
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
pub const VIRTIO_NET_CTRL_MQ_RSS_CONFIG: u8 = 1;
pub const VIRTIO_NET_CTRL_MQ_HASH_CONFIG: u8 = 2;

/// Hash type bits (`hash_types`, `supported_hash_types`).
pub const VIRTIO_NET_RSS_HASH_TYPE_IPV4: u32 = 1 << 0;
pub const VIRTIO_NET_RSS_HASH_TYPE_TCPV4: u32 = 1 << 1;
pub const VIRTIO_NET_RSS_HASH_TYPE_UDPV4: u32 = 1 << 2;
pub const VIRTIO_NET_RSS_HASH_TYPE_IPV6: u32 = 1 << 3;
pub const VIRTIO_NET_RSS_HASH_TYPE_TCPV6: u32 = 1 << 4;
pub const VIRTIO_NET_RSS_HASH_TYPE_UDPV6: u32 = 1 << 5;
pub const VIRTIO_NET_RSS_HASH_TYPE_IP_EX: u32 = 1 << 6;
pub const VIRTIO_NET_RSS_HASH_TYPE_TCP_EX: u32 = 1 << 7;
pub const VIRTIO_NET_RSS_HASH_TYPE_UDP_EX: u32 = 1 << 8;
/// Every hash type this implementation can compute.
pub const VIRTIO_NET_RSS_HASH_TYPE_ALL: u32 = 0x1ff;

/// `hash_report` values; `HASH_TYPE_X == 1 << (HASH_REPORT_X - 1)`.
pub const VIRTIO_NET_HASH_REPORT_NONE: u16 = 0;
pub const VIRTIO_NET_HASH_REPORT_IPV4: u16 = 1;
pub const VIRTIO_NET_HASH_REPORT_TCPV4: u16 = 2;
pub const VIRTIO_NET_HASH_REPORT_UDPV4: u16 = 3;
pub const VIRTIO_NET_HASH_REPORT_IPV6: u16 = 4;
pub const VIRTIO_NET_HASH_REPORT_TCPV6: u16 = 5;
pub const VIRTIO_NET_HASH_REPORT_UDPV6: u16 = 6;
pub const VIRTIO_NET_HASH_REPORT_IPV6_EX: u16 = 7;
pub const VIRTIO_NET_HASH_REPORT_TCPV6_EX: u16 = 8;
pub const VIRTIO_NET_HASH_REPORT_UDPV6_EX: u16 = 9;

/// Largest key the device can hold (`rss_max_key_size`).
pub const RSS_MAX_KEY_SIZE: usize = 40;
/// Longest hash input: IPv6 source + destination address + two ports.
pub const RSS_MAX_INPUT_LEN: usize = 36;

/// Bit 15 of an `rss_rq_id`, which must be zero.
const RQ_ID_RESERVED: u16 = 0x8000;

/// Toeplitz hash of `input` under `key`.
///
/// Key bits past the end of `key` count as zero, so short keys are accepted
/// (the spec does not require a minimum key length). Works bit by bit with a
/// sliding 64-bit key window; use [`ToeplitzKey`] when hashing many inputs
/// under the same key.
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let key_byte = |i: usize| u64::from(key.get(i).copied().unwrap_or(0));
    // Invariant: the top 32 bits of `window` are the key bits starting at the
    // input bit being processed.
    let mut window = (0..8).fold(0u64, |w, i| (w << 8) | key_byte(i));
    let mut result = 0u32;
    for (i, &byte) in input.iter().enumerate() {
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                result ^= (window >> 32) as u32;
            }
            window <<= 1;
        }
        window |= key_byte(i + 8);
    }
    result
}

/// A Toeplitz key with its lookup tables: entry `[pos][byte]` is the hash
/// contribution of `byte` at input position `pos`, so hashing costs one
/// lookup and one XOR per input byte. Built once per configuration command.
#[derive(Clone)]
pub struct ToeplitzKey {
    key: [u8; RSS_MAX_KEY_SIZE],
    len: usize,
    table: Box<[[u32; 256]]>,
}

impl ToeplitzKey {
    /// Precomputes the tables for `key`; rejects keys longer than
    /// [`RSS_MAX_KEY_SIZE`]. Short keys are zero-padded (see [`toeplitz`]).
    pub fn new(key: &[u8]) -> Result<Self, RssError> {
        let mut stored = [0u8; RSS_MAX_KEY_SIZE];
        let dst = stored.get_mut(..key.len()).ok_or(RssError::KeyTooLong {
            len: key.len(),
            max: RSS_MAX_KEY_SIZE,
        })?;
        dst.copy_from_slice(key);
        let table = (0..RSS_MAX_INPUT_LEN)
            .map(|pos| {
                // Key bits from bit 8 * pos on; padding past the key is zero.
                let w = (pos..pos + 8).fold(0u64, |w, i| {
                    (w << 8) | u64::from(stored.get(i).copied().unwrap_or(0))
                });
                let mut row = [0u32; 256];
                for v in 1..256usize {
                    // Reuse the entry without the lowest set bit, then add
                    // that bit's window (bit 0 of v is the last input bit).
                    let low = v & v.wrapping_neg();
                    let shift = 7 - low.trailing_zeros();
                    row[v] = row[v ^ low] ^ ((w << shift) >> 32) as u32;
                }
                row
            })
            .collect();
        Ok(ToeplitzKey {
            key: stored,
            len: key.len(),
            table,
        })
    }

    /// The key bytes as configured.
    pub fn key(&self) -> &[u8] {
        self.key.get(..self.len).unwrap_or(&[])
    }

    /// Toeplitz hash of `input`; equal to `toeplitz(self.key(), input)`.
    pub fn hash(&self, input: &[u8]) -> u32 {
        if input.len() > self.table.len() {
            return toeplitz(self.key(), input);
        }
        input
            .iter()
            .zip(self.table.iter())
            .fold(0, |h, (&b, row)| h ^ row[usize::from(b)])
    }
}

impl Default for ToeplitzKey {
    /// The empty key: what the device uses before the guest configures one.
    fn default() -> Self {
        ToeplitzKey {
            key: [0; RSS_MAX_KEY_SIZE],
            len: 0,
            table: vec![[0u32; 256]; RSS_MAX_INPUT_LEN].into_boxed_slice(),
        }
    }
}

impl PartialEq for ToeplitzKey {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for ToeplitzKey {}

impl std::fmt::Debug for ToeplitzKey {
    /// Prints the key only: the tables are derived from it and large.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToeplitzKey")
            .field("key", &self.key())
            .finish()
    }
}

/// Fixed buffer for the hash input, so hashing does not allocate.
struct HashInput {
    buf: [u8; RSS_MAX_INPUT_LEN],
    len: usize,
}

impl HashInput {
    fn new() -> Self {
        HashInput {
            buf: [0; RSS_MAX_INPUT_LEN],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn as_slice(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    /// Appends the selected fields of a source/destination pair, combined
    /// by `xfrm`. `src` and `dst` have the same length.
    fn push_pair(&mut self, src: &[u8], dst: &[u8], take: (bool, bool), xfrm: Xfrm) {
        if xfrm == Xfrm::None {
            if take.0 {
                self.push(src);
            }
            if take.1 {
                self.push(dst);
            }
            return;
        }
        if take.0 {
            for (&s, &d) in src.iter().zip(dst) {
                self.push(&[xfrm.apply(s, d).0]);
            }
        }
        if take.1 {
            for (&s, &d) in src.iter().zip(dst) {
                self.push(&[xfrm.apply(s, d).1]);
            }
        }
    }
}

/// Picks the hash fields per the spec's rules: whether the ports are hashed
/// too, and the report value. `None` when no enabled type applies.
fn classify(hash_types: u32, pkt: &ParsedPacket) -> Option<(bool, u16)> {
    let enabled = |t: u32| hash_types & t != 0;
    // Fragments hash on addresses only: later fragments carry no ports, and
    // the first one must land with them.
    let (tcp, udp) = match pkt.l4 {
        _ if pkt.is_fragment => (false, false),
        L4::Tcp { .. } => (true, false),
        L4::Udp { .. } => (false, true),
        L4::None => (false, false),
    };
    match pkt.ip? {
        IpAddrs::V4 { .. } => {
            if tcp && enabled(VIRTIO_NET_RSS_HASH_TYPE_TCPV4) {
                Some((true, VIRTIO_NET_HASH_REPORT_TCPV4))
            } else if udp && enabled(VIRTIO_NET_RSS_HASH_TYPE_UDPV4) {
                Some((true, VIRTIO_NET_HASH_REPORT_UDPV4))
            } else if enabled(VIRTIO_NET_RSS_HASH_TYPE_IPV4) {
                Some((false, VIRTIO_NET_HASH_REPORT_IPV4))
            } else {
                None
            }
        }
        IpAddrs::V6 { .. } => {
            // The _EX types apply only to packets with extension headers;
            // otherwise (or when none is enabled) the plain IPv6 rules apply
            // with the extension headers skipped. QEMU also applies _EX to
            // packets without extension headers; this follows the spec text.
            if pkt.ipv6_ext {
                if tcp && enabled(VIRTIO_NET_RSS_HASH_TYPE_TCP_EX) {
                    return Some((true, VIRTIO_NET_HASH_REPORT_TCPV6_EX));
                } else if udp && enabled(VIRTIO_NET_RSS_HASH_TYPE_UDP_EX) {
                    return Some((true, VIRTIO_NET_HASH_REPORT_UDPV6_EX));
                } else if enabled(VIRTIO_NET_RSS_HASH_TYPE_IP_EX) {
                    return Some((false, VIRTIO_NET_HASH_REPORT_IPV6_EX));
                }
            }
            if tcp && enabled(VIRTIO_NET_RSS_HASH_TYPE_TCPV6) {
                Some((true, VIRTIO_NET_HASH_REPORT_TCPV6))
            } else if udp && enabled(VIRTIO_NET_RSS_HASH_TYPE_UDPV6) {
                Some((true, VIRTIO_NET_HASH_REPORT_UDPV6))
            } else if enabled(VIRTIO_NET_RSS_HASH_TYPE_IPV6) {
                Some((false, VIRTIO_NET_HASH_REPORT_IPV6))
            } else {
                None
            }
        }
    }
}

/// Hash and `hash_report` of a packet under the enabled `hash_types`, or
/// `None` when no enabled type applies (the packet is "unclassified").
///
/// The input is source address, destination address, then source and
/// destination port when the type includes ports, all in network order.
pub fn compute_hash(
    cfg_key: &ToeplitzKey,
    hash_types: u32,
    pkt: &ParsedPacket,
) -> Option<(u32, u16)> {
    compute_hash_with(cfg_key, hash_types, &SPEC_FIELDS, pkt)
}

/// [`compute_hash`] with the hash field extension: the type is chosen as
/// the spec says, then only the fields `sel` selects for it enter the input
/// (in the same order), combined by its transform.
pub fn compute_hash_with(
    cfg_key: &ToeplitzKey,
    hash_types: u32,
    sel: &HashFields,
    pkt: &ParsedPacket,
) -> Option<(u32, u16)> {
    let (with_ports, report) = classify(hash_types, pkt)?;
    let fields = sel.for_report(report);
    let xfrm = sel.xfrm();
    let take = |s: u16, d: u16| (fields & s != 0, fields & d != 0);
    let ip = take(VIRTIO_NET_HASH_FIELD_SRC_IP, VIRTIO_NET_HASH_FIELD_DST_IP);
    let mut input = HashInput::new();
    match pkt.ip? {
        IpAddrs::V4 { src, dst } => input.push_pair(&src, &dst, ip, xfrm),
        // _EX simplification: see the module documentation.
        IpAddrs::V6 { src, dst } => input.push_pair(&src, &dst, ip, xfrm),
    }
    if with_ports {
        let (sport, dport) = pkt.ports()?;
        input.push_pair(
            &sport.to_be_bytes(),
            &dport.to_be_bytes(),
            take(
                VIRTIO_NET_HASH_FIELD_SRC_PORT,
                VIRTIO_NET_HASH_FIELD_DST_PORT,
            ),
            xfrm,
        );
    }
    Some((cfg_key.hash(input.as_slice()), report))
}

/// What the device offers, against which guest configurations are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssLimits {
    /// `rss_max_key_size`; values above [`RSS_MAX_KEY_SIZE`] count as that.
    pub max_key_size: u8,
    /// `rss_max_indirection_table_length`.
    pub max_indirection_len: u16,
    /// `supported_hash_types`.
    pub supported_hash_types: u32,
    /// `max_virtqueue_pairs`: receive queues are `0..num_queue_pairs`.
    pub num_queue_pairs: u16,
}

/// Why a configuration command was rejected (the device answers
/// VIRTIO_NET_ERR and keeps the previous configuration).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RssError {
    #[error("command data truncated: need {need} bytes, got {got}")]
    Truncated { need: usize, got: usize },
    #[error("command data has {extra} trailing bytes")]
    TrailingBytes { extra: usize },
    #[error("hash types {0:#x} not supported by the device")]
    UnsupportedHashTypes(u32),
    #[error("indirection table length {0} is not a power of two")]
    TableLengthNotPowerOfTwo(u32),
    #[error("indirection table length {len} exceeds the maximum {max}")]
    TableTooLong { len: u32, max: u16 },
    #[error("indirection table entry {index} names invalid receive queue id {value:#x}")]
    InvalidTableEntry { index: usize, value: u16 },
    #[error("unclassified_queue names invalid receive queue id {0:#x}")]
    InvalidUnclassifiedQueue(u16),
    #[error("max_tx_vq {value} not in 1..={max}")]
    InvalidMaxTxVq { value: u16, max: u16 },
    #[error("hash key length {len} exceeds the maximum {max}")]
    KeyTooLong { len: usize, max: usize },
    #[error("hash types enabled without a hash key")]
    MissingKey,
    #[error("reserved fields are not zero")]
    ReservedNotZero,
}

/// Bounds-checked little-endian reader over command data.
struct Reader<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], RssError> {
        let need = self.off.saturating_add(n);
        let b = self.buf.get(self.off..need).ok_or(RssError::Truncated {
            need,
            got: self.buf.len(),
        })?;
        self.off = need;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, RssError> {
        let b = self.bytes(1)?;
        Ok(b.first().copied().unwrap_or(0))
    }

    fn le16(&mut self) -> Result<u16, RssError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn le32(&mut self) -> Result<u32, RssError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    /// Linux sizes the command with `struct_size()` of a trailer struct,
    /// which counts the struct's tail padding, so up to `MAX_TAIL_PADDING`
    /// extra bytes follow the key; anything longer is refused.
    fn finish(&self) -> Result<(), RssError> {
        match self.buf.len().saturating_sub(self.off) {
            extra if extra <= MAX_TAIL_PADDING => Ok(()),
            extra => Err(RssError::TrailingBytes { extra }),
        }
    }
}

fn check_hash_types(hash_types: u32, limits: &RssLimits) -> Result<(), RssError> {
    let unsupported = hash_types & !(limits.supported_hash_types & VIRTIO_NET_RSS_HASH_TYPE_ALL);
    if unsupported != 0 {
        return Err(RssError::UnsupportedHashTypes(unsupported));
    }
    Ok(())
}

/// Bytes of structure padding tolerated after the key.
const MAX_TAIL_PADDING: usize = 7;

/// Reads `u8 hash_key_length; u8 hash_key_data[]`, the common tail of both
/// commands, and checks nothing but padding follows it.
fn read_key(r: &mut Reader, hash_types: u32, limits: &RssLimits) -> Result<ToeplitzKey, RssError> {
    let len = usize::from(r.u8()?);
    let max = usize::from(limits.max_key_size).min(RSS_MAX_KEY_SIZE);
    if len > max {
        return Err(RssError::KeyTooLong { len, max });
    }
    if len == 0 && hash_types != 0 {
        return Err(RssError::MissingKey);
    }
    let key = r.bytes(len)?;
    r.finish()?;
    ToeplitzKey::new(key)
}

/// Decodes an `rss_rq_id`: bits 1..16 of a receive virtqueue index. Since
/// receiveqN+1 is virtqueue 2N, the value is the 0-based receive queue (pair)
/// number, the same numbering the Linux driver writes.
fn rq_id(value: u16, limits: &RssLimits) -> Option<u16> {
    (value & RQ_ID_RESERVED == 0 && value < limits.num_queue_pairs).then_some(value)
}

/// Parsed VIRTIO_NET_CTRL_MQ_RSS_CONFIG: hash parameters plus steering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RssConfig {
    hash_types: u32,
    /// Receive queue numbers (0-based pairs); length is a power of two.
    indirection_table: Vec<u16>,
    mask: u32,
    unclassified_queue: u16,
    max_tx_vq: u16,
    key: ToeplitzKey,
}

/// Where a received packet goes, and what to report in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssDecision {
    /// Receive queue number (0-based; virtqueue index `2 * queue`).
    pub queue: u16,
    /// The hash, or 0 when none was calculated.
    pub hash_value: u32,
    /// `VIRTIO_NET_HASH_REPORT_*`; `NONE` for unclassified packets.
    pub hash_report: u16,
}

/// Parses and validates the command data of VIRTIO_NET_CTRL_MQ_RSS_CONFIG.
pub fn parse_rss_config(buf: &[u8], limits: &RssLimits) -> Result<RssConfig, RssError> {
    let mut r = Reader { buf, off: 0 };
    let hash_types = r.le32()?;
    check_hash_types(hash_types, limits)?;
    let mask = r.le16()?;
    let len = u32::from(mask) + 1;
    if !len.is_power_of_two() {
        return Err(RssError::TableLengthNotPowerOfTwo(len));
    }
    if len > u32::from(limits.max_indirection_len) {
        return Err(RssError::TableTooLong {
            len,
            max: limits.max_indirection_len,
        });
    }
    let raw = r.le16()?;
    let unclassified_queue = rq_id(raw, limits).ok_or(RssError::InvalidUnclassifiedQueue(raw))?;
    let table_bytes = r.bytes(usize::from(mask) * 2 + 2)?;
    let indirection_table = table_bytes
        .chunks_exact(2)
        .enumerate()
        .map(|(index, c)| {
            let value = u16::from_le_bytes(c.try_into().unwrap_or_default());
            rq_id(value, limits).ok_or(RssError::InvalidTableEntry { index, value })
        })
        .collect::<Result<Vec<u16>, RssError>>()?;
    let max_tx_vq = r.le16()?;
    if max_tx_vq == 0 || max_tx_vq > limits.num_queue_pairs {
        return Err(RssError::InvalidMaxTxVq {
            value: max_tx_vq,
            max: limits.num_queue_pairs,
        });
    }
    let key = read_key(&mut r, hash_types, limits)?;
    Ok(RssConfig {
        hash_types,
        indirection_table,
        mask: u32::from(mask),
        unclassified_queue,
        max_tx_vq,
        key,
    })
}

impl RssConfig {
    pub fn hash_types(&self) -> u32 {
        self.hash_types
    }

    /// Receive queue numbers (0-based), `indirection_table_mask + 1` entries.
    pub fn indirection_table(&self) -> &[u16] {
        &self.indirection_table
    }

    pub fn unclassified_queue(&self) -> u16 {
        self.unclassified_queue
    }

    /// Number of transmit queues the driver may use (transmitq1..max_tx_vq).
    pub fn max_tx_vq(&self) -> u16 {
        self.max_tx_vq
    }

    pub fn key(&self) -> &ToeplitzKey {
        &self.key
    }

    /// Hash and report for `pkt` under this configuration.
    pub fn hash(&self, pkt: &ParsedPacket) -> Option<(u32, u16)> {
        self.hash_with(&SPEC_FIELDS, pkt)
    }

    /// [`RssConfig::hash`] on the fields `sel` selects.
    pub fn hash_with(&self, sel: &HashFields, pkt: &ParsedPacket) -> Option<(u32, u16)> {
        compute_hash_with(&self.key, self.hash_types, sel, pkt)
    }

    /// The spec's RSS processing: hashed packets go to
    /// `indirection_table[hash & mask]`, the rest to `unclassified_queue`.
    /// Dropping packets for a queue under reset is up to the caller.
    pub fn select_queue(&self, pkt: &ParsedPacket) -> RssDecision {
        self.select_queue_with(&SPEC_FIELDS, pkt)
    }

    /// [`RssConfig::select_queue`], hashing the fields `sel` selects.
    pub fn select_queue_with(&self, sel: &HashFields, pkt: &ParsedPacket) -> RssDecision {
        match self.hash_with(sel, pkt) {
            Some((hash_value, hash_report)) => RssDecision {
                queue: self
                    .indirection_table
                    .get((hash_value & self.mask) as usize)
                    .copied()
                    .unwrap_or(self.unclassified_queue),
                hash_value,
                hash_report,
            },
            None => RssDecision {
                queue: self.unclassified_queue,
                hash_value: 0,
                hash_report: VIRTIO_NET_HASH_REPORT_NONE,
            },
        }
    }
}

/// Parsed VIRTIO_NET_CTRL_MQ_HASH_CONFIG: hash reporting without steering.
/// The default (all types disabled) is the state after device reset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashConfig {
    pub hash_types: u32,
    pub key: ToeplitzKey,
}

impl HashConfig {
    /// Hash and report for `pkt`, `None` when no enabled type applies.
    pub fn hash(&self, pkt: &ParsedPacket) -> Option<(u32, u16)> {
        self.hash_with(&SPEC_FIELDS, pkt)
    }

    /// [`HashConfig::hash`] on the fields `sel` selects.
    pub fn hash_with(&self, sel: &HashFields, pkt: &ParsedPacket) -> Option<(u32, u16)> {
        compute_hash_with(&self.key, self.hash_types, sel, pkt)
    }
}

/// Parses and validates the command data of VIRTIO_NET_CTRL_MQ_HASH_CONFIG.
/// `reserved` must be zero per the spec (Linux sends zeroes there: its RSS
/// layout with a one-entry table, queue 0 and `max_tx_vq` 0).
pub fn parse_hash_config(buf: &[u8], limits: &RssLimits) -> Result<HashConfig, RssError> {
    let mut r = Reader { buf, off: 0 };
    let hash_types = r.le32()?;
    check_hash_types(hash_types, limits)?;
    if r.bytes(8)?.iter().any(|&b| b != 0) {
        return Err(RssError::ReservedNotZero);
    }
    let key = read_key(&mut r, hash_types, limits)?;
    Ok(HashConfig { hash_types, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_TCP, IPPROTO_UDP};

    const MS_KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    const ALL: u32 = VIRTIO_NET_RSS_HASH_TYPE_ALL;
    const V4: u32 = VIRTIO_NET_RSS_HASH_TYPE_IPV4
        | VIRTIO_NET_RSS_HASH_TYPE_TCPV4
        | VIRTIO_NET_RSS_HASH_TYPE_UDPV4;
    const V6: u32 = VIRTIO_NET_RSS_HASH_TYPE_IPV6
        | VIRTIO_NET_RSS_HASH_TYPE_TCPV6
        | VIRTIO_NET_RSS_HASH_TYPE_UDPV6;

    /// (source, sport, destination, dport, address-only hash, with-ports
    /// hash) from Microsoft's "Verifying the RSS Hash Calculation".
    type MsVector<A> = (A, u16, A, u16, u32, u32);

    const MS_V4: [MsVector<[u8; 4]>; 5] = [
        (
            [66, 9, 149, 187],
            2794,
            [161, 142, 100, 80],
            1766,
            0x323e8fc2,
            0x51ccc178,
        ),
        (
            [199, 92, 111, 2],
            14230,
            [65, 69, 140, 83],
            4739,
            0xd718262a,
            0xc626b0ea,
        ),
        (
            [24, 19, 198, 95],
            12898,
            [12, 22, 207, 184],
            38024,
            0xd2d0a5de,
            0x5c2b394a,
        ),
        (
            [38, 27, 205, 30],
            48228,
            [209, 142, 163, 6],
            2217,
            0x82989176,
            0xafc7327f,
        ),
        (
            [153, 39, 163, 191],
            44251,
            [202, 188, 127, 2],
            1303,
            0x5d1809c5,
            0x10e828a2,
        ),
    ];

    fn v6(groups: [u16; 8]) -> [u8; 16] {
        let mut a = [0u8; 16];
        for (c, g) in a.chunks_exact_mut(2).zip(groups) {
            c.copy_from_slice(&g.to_be_bytes());
        }
        a
    }

    fn ms_v6() -> [MsVector<[u8; 16]>; 3] {
        [
            (
                v6([0x3ffe, 0x2501, 0x200, 0x1fff, 0, 0, 0, 7]),
                2794,
                v6([0x3ffe, 0x2501, 0x200, 3, 0, 0, 0, 1]),
                1766,
                0x2cc18cd5,
                0x40207d3d,
            ),
            (
                v6([0x3ffe, 0x501, 8, 0, 0x260, 0x97ff, 0xfe40, 0xefab]),
                14230,
                v6([0xff02, 0, 0, 0, 0, 0, 0, 1]),
                4739,
                0x0f0c461c,
                0xdde51bbf,
            ),
            (
                v6([0x3ffe, 0x1900, 0x4545, 3, 0x200, 0xf8ff, 0xfe21, 0x67cf]),
                44251,
                v6([0xfe80, 0, 0, 0, 0x200, 0xf8ff, 0xfe21, 0x67cf]),
                38024,
                0x4b61e985,
                0x02d1feef,
            ),
        ]
    }

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        if proto == IPPROTO_TCP {
            h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            h.extend_from_slice(&8u16.to_be_bytes());
            h.extend_from_slice(&[0, 0]);
        }
        h
    }

    /// Ethernet + IPv4 (no options) + TCP/UDP; `frag` is the flags/offset word.
    fn frame4(proto: u8, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, frag: u16) -> Vec<u8> {
        let l4 = l4(proto, sport, dport);
        let mut f = eth(ETHERTYPE_IPV4);
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&l4);
        f
    }

    /// Ethernet + IPv6, optionally with an 8-byte destination options
    /// header (PadN only), + TCP/UDP.
    fn frame6(
        proto: u8,
        src: [u8; 16],
        sport: u16,
        dst: [u8; 16],
        dport: u16,
        ext: bool,
    ) -> Vec<u8> {
        let mut payload = Vec::new();
        if ext {
            payload.extend_from_slice(&[proto, 0, 1, 4, 0, 0, 0, 0]);
        }
        payload.extend_from_slice(&l4(proto, sport, dport));
        let mut f = eth(ETHERTYPE_IPV6);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[if ext { 60 } else { proto }, 64]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&payload);
        f
    }

    fn key() -> ToeplitzKey {
        ToeplitzKey::new(&MS_KEY).unwrap()
    }

    #[test]
    fn constants_match_bindings() {
        use virtio_bindings::virtio_net as b;
        assert_eq!(
            VIRTIO_NET_RSS_HASH_TYPE_IPV4,
            b::VIRTIO_NET_RSS_HASH_TYPE_IPv4
        );
        assert_eq!(
            VIRTIO_NET_RSS_HASH_TYPE_UDP_EX,
            b::VIRTIO_NET_RSS_HASH_TYPE_UDP_EX
        );
        assert_eq!(
            u32::from(VIRTIO_NET_HASH_REPORT_TCPV6),
            b::VIRTIO_NET_HASH_REPORT_TCPv6
        );
        assert_eq!(
            u32::from(VIRTIO_NET_HASH_REPORT_UDPV6_EX),
            b::VIRTIO_NET_HASH_REPORT_UDPv6_EX
        );
        assert_eq!(
            u32::from(VIRTIO_NET_CTRL_MQ_RSS_CONFIG),
            b::VIRTIO_NET_CTRL_MQ_RSS_CONFIG
        );
        assert_eq!(
            u32::from(VIRTIO_NET_CTRL_MQ_HASH_CONFIG),
            b::VIRTIO_NET_CTRL_MQ_HASH_CONFIG
        );
        for r in 1..=9u16 {
            assert!(VIRTIO_NET_RSS_HASH_TYPE_ALL & (1 << (r - 1)) != 0);
        }
    }

    #[test]
    fn microsoft_ipv4_vectors() {
        let k = key();
        for (src, sport, dst, dport, ip_hash, tcp_hash) in MS_V4 {
            let tcp = packet::parse(&frame4(IPPROTO_TCP, src, sport, dst, dport, 0));
            assert_eq!(
                compute_hash(&k, ALL, &tcp),
                Some((tcp_hash, VIRTIO_NET_HASH_REPORT_TCPV4))
            );
            assert_eq!(
                compute_hash(
                    &k,
                    VIRTIO_NET_RSS_HASH_TYPE_IPV4 | VIRTIO_NET_RSS_HASH_TYPE_UDPV4,
                    &tcp
                ),
                Some((ip_hash, VIRTIO_NET_HASH_REPORT_IPV4))
            );
            let udp = packet::parse(&frame4(IPPROTO_UDP, src, sport, dst, dport, 0));
            assert_eq!(
                compute_hash(&k, ALL, &udp),
                Some((tcp_hash, VIRTIO_NET_HASH_REPORT_UDPV4))
            );
            // The table-driven and the bitwise implementation agree.
            let mut input = src.to_vec();
            input.extend_from_slice(&dst);
            assert_eq!(toeplitz(&MS_KEY, &input), ip_hash);
            input.extend_from_slice(&sport.to_be_bytes());
            input.extend_from_slice(&dport.to_be_bytes());
            assert_eq!(toeplitz(&MS_KEY, &input), tcp_hash);
        }
    }

    #[test]
    fn microsoft_ipv6_vectors() {
        let k = key();
        for (src, sport, dst, dport, ip_hash, tcp_hash) in ms_v6() {
            let tcp = packet::parse(&frame6(IPPROTO_TCP, src, sport, dst, dport, false));
            assert_eq!(
                compute_hash(&k, ALL, &tcp),
                Some((tcp_hash, VIRTIO_NET_HASH_REPORT_TCPV6))
            );
            assert_eq!(
                compute_hash(&k, VIRTIO_NET_RSS_HASH_TYPE_IPV6, &tcp),
                Some((ip_hash, VIRTIO_NET_HASH_REPORT_IPV6))
            );
            let udp = packet::parse(&frame6(IPPROTO_UDP, src, sport, dst, dport, false));
            assert_eq!(
                compute_hash(&k, V6, &udp),
                Some((tcp_hash, VIRTIO_NET_HASH_REPORT_UDPV6))
            );
            // IPv4 types never apply to IPv6 and vice versa.
            assert_eq!(compute_hash(&k, V4, &tcp), None);
        }
        let (src, sport, dst, dport, _, _) = MS_V4[0];
        let tcp4 = packet::parse(&frame4(IPPROTO_TCP, src, sport, dst, dport, 0));
        assert_eq!(
            compute_hash(&k, V6 | VIRTIO_NET_RSS_HASH_TYPE_IP_EX, &tcp4),
            None
        );
    }

    #[test]
    fn ipv6_extension_header_rules() {
        let k = key();
        let (src, sport, dst, dport, ip_hash, tcp_hash) = ms_v6()[0];
        let ext = packet::parse(&frame6(IPPROTO_TCP, src, sport, dst, dport, true));
        assert!(ext.ipv6_ext);
        // No home address / type 2 routing header: _EX hashes the plain fields.
        assert_eq!(
            compute_hash(&k, ALL, &ext),
            Some((tcp_hash, VIRTIO_NET_HASH_REPORT_TCPV6_EX))
        );
        // IP_EX comes before the plain TCPv6 rule for packets with extensions.
        assert_eq!(
            compute_hash(
                &k,
                VIRTIO_NET_RSS_HASH_TYPE_IP_EX | VIRTIO_NET_RSS_HASH_TYPE_TCPV6,
                &ext
            ),
            Some((ip_hash, VIRTIO_NET_HASH_REPORT_IPV6_EX))
        );
        // No _EX type enabled: extension headers are skipped.
        assert_eq!(
            compute_hash(&k, V6, &ext),
            Some((tcp_hash, VIRTIO_NET_HASH_REPORT_TCPV6))
        );
        let udp = packet::parse(&frame6(IPPROTO_UDP, src, sport, dst, dport, true));
        assert_eq!(
            compute_hash(&k, ALL, &udp),
            Some((tcp_hash, VIRTIO_NET_HASH_REPORT_UDPV6_EX))
        );
        // _EX types do not apply to packets without extension headers.
        let plain = packet::parse(&frame6(IPPROTO_TCP, src, sport, dst, dport, false));
        let ex_only = VIRTIO_NET_RSS_HASH_TYPE_IP_EX | VIRTIO_NET_RSS_HASH_TYPE_TCP_EX;
        assert_eq!(compute_hash(&k, ex_only, &plain), None);
    }

    #[test]
    fn fragments_and_non_ip() {
        let k = key();
        let (src, sport, dst, dport, ip_hash, _) = MS_V4[0];
        for frag in [0x2000, 0x0010, 0x2010] {
            let p = packet::parse(&frame4(IPPROTO_TCP, src, sport, dst, dport, frag));
            assert!(p.is_fragment);
            assert_eq!(
                compute_hash(&k, ALL, &p),
                Some((ip_hash, VIRTIO_NET_HASH_REPORT_IPV4))
            );
            assert_eq!(compute_hash(&k, VIRTIO_NET_RSS_HASH_TYPE_TCPV4, &p), None);
        }
        let mut arp = eth(0x0806);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(compute_hash(&k, ALL, &packet::parse(&arp)), None);
        assert_eq!(compute_hash(&k, ALL, &packet::parse(&[])), None);
        // Truncated TCP header: the address-only type still applies.
        let f = frame4(IPPROTO_TCP, src, sport, dst, dport, 0);
        let p = packet::parse(&f[..f.len() - 4]);
        assert_eq!(
            compute_hash(&k, ALL, &p),
            Some((ip_hash, VIRTIO_NET_HASH_REPORT_IPV4))
        );
    }

    /// `HashFields` from a `struct virtio_net_hash_fields_set`: `xfrm` and
    /// every type's fields as in the spec except `(report, fields)`.
    fn fields(xfrm: u8, changes: &[(u16, u16)]) -> HashFields {
        use crate::hash_fields::*;
        let mut f: Vec<u16> = (1..=9).map(|r| SPEC_FIELDS.for_report(r)).collect();
        for &(report, sel) in changes {
            f[usize::from(report) - 1] = sel;
        }
        let mut b = vec![xfrm, 0, 0, 0];
        for v in f {
            b.extend_from_slice(&v.to_le_bytes());
        }
        parse_set(&b, &HashFieldsLimits::DEVICE).unwrap()
    }

    #[test]
    fn selected_fields_known_values() {
        use crate::hash_fields::*;
        let k = key();
        let (src, sport, dst, dport, ip_hash, tcp_hash) = MS_V4[0];
        let tcp = packet::parse(&frame4(IPPROTO_TCP, src, sport, dst, dport, 0));
        let tcp4 = VIRTIO_NET_HASH_REPORT_TCPV4;
        // The spec's fields, selected explicitly, give the spec's hash.
        assert_eq!(
            compute_hash_with(&k, ALL, &fields(0, &[]), &tcp),
            Some((tcp_hash, tcp4))
        );
        // Addresses only, with the TCPv4 type still the one reported.
        let ip_only = fields(0, &[(tcp4, VIRTIO_NET_HASH_FIELDS_IP)]);
        assert_eq!(
            compute_hash_with(&k, ALL, &ip_only, &tcp),
            Some((ip_hash, tcp4))
        );
        // Values from an independent Toeplitz implementation.
        let src_only = fields(0, &[(tcp4, VIRTIO_NET_HASH_FIELD_SRC_IP)]);
        assert_eq!(
            compute_hash_with(&k, ALL, &src_only, &tcp),
            Some((0x0e48_b9de, tcp4))
        );
        let dst_dport = fields(
            0,
            &[(
                tcp4,
                VIRTIO_NET_HASH_FIELD_DST_IP | VIRTIO_NET_HASH_FIELD_DST_PORT,
            )],
        );
        assert_eq!(
            compute_hash_with(&k, ALL, &dst_dport, &tcp),
            Some((0xc354_3096, tcp4))
        );
        let xor = fields(VIRTIO_NET_HASH_XFRM_SYM_XOR, &[]);
        assert_eq!(
            compute_hash_with(&k, ALL, &xor, &tcp),
            Some((0xac2b_58ca, tcp4))
        );
        let or_xor = fields(VIRTIO_NET_HASH_XFRM_SYM_OR_XOR, &[]);
        assert_eq!(
            compute_hash_with(&k, ALL, &or_xor, &tcp),
            Some((0xa655_24fa, tcp4))
        );
        // No field: an empty input hashes to 0.
        let none = fields(0, &[(tcp4, 0)]);
        assert_eq!(compute_hash_with(&k, ALL, &none, &tcp), Some((0, tcp4)));
        // A selection for TCPv4 leaves UDPv4 alone.
        let udp = packet::parse(&frame4(IPPROTO_UDP, src, sport, dst, dport, 0));
        assert_eq!(
            compute_hash_with(&k, ALL, &src_only, &udp),
            Some((tcp_hash, VIRTIO_NET_HASH_REPORT_UDPV4))
        );
        // Fragments take the IPv4 type and its fields.
        let frag = packet::parse(&frame4(IPPROTO_TCP, src, sport, dst, dport, 0x2000));
        assert_eq!(
            compute_hash_with(&k, ALL, &src_only, &frag),
            Some((ip_hash, VIRTIO_NET_HASH_REPORT_IPV4))
        );
        // The configurations hash with the selection they are given.
        let cfg = parse_rss_config(&rss_buf(V4 | V6, &table4(), 0, 4, &MS_KEY), &limits()).unwrap();
        assert_eq!(cfg.hash_with(&src_only, &tcp), Some((0x0e48_b9de, tcp4)));
        assert_eq!(cfg.select_queue_with(&none, &tcp).queue, table4()[0]);
        assert_eq!(
            cfg.select_queue_with(&SPEC_FIELDS, &tcp),
            cfg.select_queue(&tcp)
        );
    }

    #[test]
    fn symmetric_transforms_hash_both_directions_alike() {
        use crate::hash_fields::*;
        let k = key();
        let ip_only = |r: u16| (r, VIRTIO_NET_HASH_FIELDS_IP);
        for xfrm in [
            VIRTIO_NET_HASH_XFRM_SYM_XOR,
            VIRTIO_NET_HASH_XFRM_SYM_OR_XOR,
        ] {
            let sels = [
                fields(xfrm, &[]),
                fields(
                    xfrm,
                    &[
                        ip_only(VIRTIO_NET_HASH_REPORT_TCPV4),
                        ip_only(VIRTIO_NET_HASH_REPORT_UDPV6),
                    ],
                ),
                fields(
                    xfrm,
                    &[(VIRTIO_NET_HASH_REPORT_TCPV6, VIRTIO_NET_HASH_FIELDS_L4)],
                ),
            ];
            for sel in &sels {
                for proto in [IPPROTO_TCP, IPPROTO_UDP] {
                    for (src, sport, dst, dport, _, _) in MS_V4 {
                        let there = packet::parse(&frame4(proto, src, sport, dst, dport, 0));
                        let back = packet::parse(&frame4(proto, dst, dport, src, sport, 0));
                        let h = compute_hash_with(&k, ALL, sel, &there);
                        assert!(h.is_some());
                        assert_eq!(h, compute_hash_with(&k, ALL, sel, &back));
                    }
                    for (src, sport, dst, dport, _, _) in ms_v6() {
                        let there = packet::parse(&frame6(proto, src, sport, dst, dport, false));
                        let back = packet::parse(&frame6(proto, dst, dport, src, sport, false));
                        let h = compute_hash_with(&k, ALL, sel, &there);
                        assert!(h.is_some());
                        assert_eq!(h, compute_hash_with(&k, ALL, sel, &back));
                    }
                }
            }
        }
        // Without a transform the two directions differ.
        let (src, sport, dst, dport, _, _) = MS_V4[1];
        let there = packet::parse(&frame4(IPPROTO_TCP, src, sport, dst, dport, 0));
        let back = packet::parse(&frame4(IPPROTO_TCP, dst, dport, src, sport, 0));
        assert_ne!(compute_hash(&k, ALL, &there), compute_hash(&k, ALL, &back));
        // The transformed input, hashed bit by bit, is what the device hashes.
        let x: Vec<u8> = src.iter().zip(dst).map(|(a, b)| a ^ b).collect();
        let p = (sport ^ dport).to_be_bytes();
        let o: Vec<u8> = src.iter().zip(dst).map(|(a, b)| a | b).collect();
        let po = (sport | dport).to_be_bytes();
        let xor_input = [&x[..], &x, &p, &p].concat();
        let or_xor_input = [&o[..], &x, &po, &p].concat();
        assert_eq!(
            compute_hash_with(&k, ALL, &fields(VIRTIO_NET_HASH_XFRM_SYM_XOR, &[]), &there),
            Some((toeplitz(&MS_KEY, &xor_input), VIRTIO_NET_HASH_REPORT_TCPV4))
        );
        assert_eq!(
            compute_hash_with(
                &k,
                ALL,
                &fields(VIRTIO_NET_HASH_XFRM_SYM_OR_XOR, &[]),
                &there
            ),
            Some((
                toeplitz(&MS_KEY, &or_xor_input),
                VIRTIO_NET_HASH_REPORT_TCPV4
            ))
        );
    }

    #[test]
    fn table_matches_bitwise_for_any_key_length() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for key_len in [0usize, 1, 4, 13, 39, 40] {
            let raw: Vec<u8> = (0..key_len).map(|_| next() as u8).collect();
            let k = ToeplitzKey::new(&raw).unwrap();
            assert_eq!(k.key(), &raw[..]);
            for input_len in [0usize, 1, 8, 12, 35, 36, 50] {
                let input: Vec<u8> = (0..input_len).map(|_| next() as u8).collect();
                assert_eq!(
                    k.hash(&input),
                    toeplitz(&raw, &input),
                    "key {key_len} input {input_len}"
                );
            }
        }
        assert_eq!(ToeplitzKey::default(), ToeplitzKey::new(&[]).unwrap());
        assert!(matches!(
            ToeplitzKey::new(&[0; 41]),
            Err(RssError::KeyTooLong { len: 41, max: 40 })
        ));
    }

    fn limits() -> RssLimits {
        RssLimits {
            max_key_size: 40,
            max_indirection_len: 128,
            supported_hash_types: V4 | V6,
            num_queue_pairs: 4,
        }
    }

    fn rss_buf(
        hash_types: u32,
        table: &[u16],
        unclassified: u16,
        max_tx_vq: u16,
        key: &[u8],
    ) -> Vec<u8> {
        let mut b = hash_types.to_le_bytes().to_vec();
        b.extend_from_slice(&(table.len() as u16).wrapping_sub(1).to_le_bytes());
        b.extend_from_slice(&unclassified.to_le_bytes());
        for e in table {
            b.extend_from_slice(&e.to_le_bytes());
        }
        b.extend_from_slice(&max_tx_vq.to_le_bytes());
        b.push(key.len() as u8);
        b.extend_from_slice(key);
        b
    }

    fn table4() -> Vec<u16> {
        (0..128).map(|i| i % 4).collect()
    }

    #[test]
    fn parses_valid_rss_config() {
        let buf = rss_buf(V4 | V6, &table4(), 3, 4, &MS_KEY);
        let cfg = parse_rss_config(&buf, &limits()).unwrap();
        assert_eq!(cfg.hash_types(), V4 | V6);
        assert_eq!(cfg.indirection_table(), &table4()[..]);
        assert_eq!(cfg.unclassified_queue(), 3);
        assert_eq!(cfg.max_tx_vq(), 4);
        assert_eq!(cfg.key().key(), &MS_KEY[..]);
        // Hashing disabled: no key needed, everything is unclassified.
        let off = parse_rss_config(&rss_buf(0, &[0], 2, 1, &[]), &limits()).unwrap();
        let p = packet::parse(&frame4(IPPROTO_TCP, [1, 2, 3, 4], 1, [5, 6, 7, 8], 2, 0));
        assert_eq!(
            off.select_queue(&p),
            RssDecision {
                queue: 2,
                hash_value: 0,
                hash_report: VIRTIO_NET_HASH_REPORT_NONE
            }
        );
    }

    #[test]
    fn rejects_malformed_rss_configs() {
        let l = limits();
        let parse = |b: Vec<u8>| parse_rss_config(&b, &l);
        let t = table4();
        let mut bad_entry = t.clone();
        bad_entry[77] = 4;
        assert_eq!(
            parse(rss_buf(V4, &bad_entry, 0, 4, &MS_KEY)),
            Err(RssError::InvalidTableEntry {
                index: 77,
                value: 4
            })
        );
        bad_entry[77] = 0x8001; // reserved bit 15 set
        assert_eq!(
            parse(rss_buf(V4, &bad_entry, 0, 4, &MS_KEY)),
            Err(RssError::InvalidTableEntry {
                index: 77,
                value: 0x8001
            })
        );
        assert_eq!(
            parse(rss_buf(V4, &t, 4, 4, &MS_KEY)),
            Err(RssError::InvalidUnclassifiedQueue(4))
        );
        assert_eq!(
            parse(rss_buf(V4, &[0, 1, 2], 0, 4, &MS_KEY)),
            Err(RssError::TableLengthNotPowerOfTwo(3))
        );
        assert_eq!(
            parse(rss_buf(V4, &[0; 256], 0, 4, &MS_KEY)),
            Err(RssError::TableTooLong { len: 256, max: 128 })
        );
        // mask 0xffff: a 65536-entry table, no overflow.
        let mut huge = rss_buf(V4, &[0], 0, 4, &MS_KEY);
        huge[4..6].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(
            parse(huge),
            Err(RssError::TableTooLong {
                len: 65536,
                max: 128
            })
        );
        assert_eq!(
            parse(rss_buf(V4, &t, 0, 4, &[7; 41])),
            Err(RssError::KeyTooLong { len: 41, max: 40 })
        );
        let small_key = RssLimits {
            max_key_size: 16,
            ..l
        };
        assert_eq!(
            parse_rss_config(&rss_buf(V4, &t, 0, 4, &MS_KEY), &small_key),
            Err(RssError::KeyTooLong { len: 40, max: 16 })
        );
        assert_eq!(parse(rss_buf(V4, &t, 0, 4, &[])), Err(RssError::MissingKey));
        assert_eq!(
            parse(rss_buf(
                V4 | VIRTIO_NET_RSS_HASH_TYPE_TCP_EX,
                &t,
                0,
                4,
                &MS_KEY
            )),
            Err(RssError::UnsupportedHashTypes(
                VIRTIO_NET_RSS_HASH_TYPE_TCP_EX
            ))
        );
        assert_eq!(
            parse(rss_buf(1 << 9, &t, 0, 4, &MS_KEY)),
            Err(RssError::UnsupportedHashTypes(1 << 9))
        );
        assert_eq!(
            parse(rss_buf(V4, &t, 0, 0, &MS_KEY)),
            Err(RssError::InvalidMaxTxVq { value: 0, max: 4 })
        );
        assert_eq!(
            parse(rss_buf(V4, &t, 0, 5, &MS_KEY)),
            Err(RssError::InvalidMaxTxVq { value: 5, max: 4 })
        );
        let good = rss_buf(V4, &t, 0, 4, &MS_KEY);
        for n in 0..good.len() {
            assert!(
                matches!(parse(good[..n].to_vec()), Err(RssError::Truncated { got, .. }) if got == n),
                "prefix {n}"
            );
        }
        // One byte of tail padding, as Linux 7.3 sends, is accepted.
        let mut padded = good.clone();
        padded.push(0);
        assert!(parse(padded).is_ok());
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert_eq!(parse(trailing), Err(RssError::TrailingBytes { extra: 8 }));
        assert!(parse(good).is_ok());
    }

    #[test]
    fn hash_config() {
        let l = limits();
        let mut buf = V6.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 8]);
        buf.push(40);
        buf.extend_from_slice(&MS_KEY);
        let cfg = parse_hash_config(&buf, &l).unwrap();
        assert_eq!(cfg.hash_types, V6);
        let (src, sport, dst, dport, _, tcp_hash) = ms_v6()[1];
        let p = packet::parse(&frame6(IPPROTO_TCP, src, sport, dst, dport, false));
        assert_eq!(cfg.hash(&p), Some((tcp_hash, VIRTIO_NET_HASH_REPORT_TCPV6)));
        assert_eq!(HashConfig::default().hash(&p), None);

        for n in 0..buf.len() {
            assert!(matches!(
                parse_hash_config(&buf[..n], &l),
                Err(RssError::Truncated { .. })
            ));
        }
        let mut reserved = buf.clone();
        reserved[10] = 1;
        assert_eq!(
            parse_hash_config(&reserved, &l),
            Err(RssError::ReservedNotZero)
        );
        let mut trailing = buf.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert_eq!(
            parse_hash_config(&trailing, &l),
            Err(RssError::TrailingBytes { extra: 8 })
        );
        let mut ex = buf.clone();
        ex[0..4].copy_from_slice(&(V6 | VIRTIO_NET_RSS_HASH_TYPE_IP_EX).to_le_bytes());
        assert_eq!(
            parse_hash_config(&ex, &l),
            Err(RssError::UnsupportedHashTypes(
                VIRTIO_NET_RSS_HASH_TYPE_IP_EX
            ))
        );
        let mut nokey = V6.to_le_bytes().to_vec();
        nokey.extend_from_slice(&[0; 9]);
        assert_eq!(parse_hash_config(&nokey, &l), Err(RssError::MissingKey));
        nokey[0..4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_hash_config(&nokey, &l), Ok(HashConfig::default()));
    }

    #[test]
    fn spreads_flows_over_all_queues() {
        let cfg = parse_rss_config(&rss_buf(V4 | V6, &table4(), 0, 4, &MS_KEY), &limits()).unwrap();
        let mut counts = [0usize; 4];
        let flows = 4000;
        for i in 0..flows {
            let src = [10, 0, (i >> 8) as u8, i as u8];
            let sport = 1024 + (i as u16).wrapping_mul(7);
            let p = packet::parse(&frame4(IPPROTO_TCP, src, sport, [192, 168, 1, 1], 443, 0));
            let d = cfg.select_queue(&p);
            assert_eq!(d.hash_report, VIRTIO_NET_HASH_REPORT_TCPV4);
            assert_eq!(d.queue, table4()[(d.hash_value & 127) as usize]);
            counts[usize::from(d.queue)] += 1;
        }
        for c in counts {
            assert!(c > flows / 4 * 3 / 4, "unbalanced: {counts:?}");
        }
        // The same flow always lands on the same queue.
        let p = packet::parse(&frame4(IPPROTO_UDP, [1, 1, 1, 1], 5, [2, 2, 2, 2], 6, 0));
        assert_eq!(cfg.select_queue(&p), cfg.select_queue(&p));
    }
}
