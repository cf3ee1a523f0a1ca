//! Flow filter state of the device (virtio-net "Flow filter"): groups,
//! classifiers and rules created by the driver through admin commands, and
//! the per-packet lookup that runs after MAC/VLAN filtering and before RSS.
//!
//! Semantics, as specified and as the Linux driver uses them:
//! - Groups are tried from the highest `group_priority` value to the lowest;
//!   the first group with a matching rule decides, later groups are ignored.
//! - Within a group the matching rule with the highest `rule_priority` value
//!   wins. The spec lets equal priorities be applied in any order; this
//!   device picks the lowest rule id so the result is deterministic.
//! - A classifier is an ordered list of selectors (Ethernet, then IPv4 or
//!   IPv6, then TCP or UDP), each a mask over the raw header bytes in network
//!   byte order. A rule's key has the same layout; a packet matches when its
//!   masked header bytes equal the masked key.
//!
//! Lookup never scans rules: each (group, classifier) pair keeps a hash map
//! from the masked key bytes to the rules with that key, so a packet costs one
//! key extraction and one hash lookup per classifier in use in a group.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::packet::{
    IpAddrs, ParsedPacket, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, L4,
};

/// Capability ids (device type specific range).
pub const VIRTIO_NET_FF_RESOURCE_CAP: u16 = 0x0800;
pub const VIRTIO_NET_FF_SELECTOR_CAP: u16 = 0x0801;
pub const VIRTIO_NET_FF_ACTION_CAP: u16 = 0x0802;

/// Resource object types.
pub const VIRTIO_NET_RESOURCE_OBJ_FF_GROUP: u16 = 0x0200;
pub const VIRTIO_NET_RESOURCE_OBJ_FF_CLASSIFIER: u16 = 0x0201;
pub const VIRTIO_NET_RESOURCE_OBJ_FF_RULE: u16 = 0x0202;

/// Selector types.
pub const VIRTIO_NET_FF_MASK_TYPE_ETH: u8 = 0x1;
pub const VIRTIO_NET_FF_MASK_TYPE_IPV4: u8 = 0x2;
pub const VIRTIO_NET_FF_MASK_TYPE_IPV6: u8 = 0x3;
pub const VIRTIO_NET_FF_MASK_TYPE_TCP: u8 = 0x4;
pub const VIRTIO_NET_FF_MASK_TYPE_UDP: u8 = 0x5;

/// Selector flag: any subset of a field's bits may be matched.
pub const VIRTIO_NET_FF_MASK_F_PARTIAL_MASK: u8 = 1 << 0;

/// Rule actions.
pub const VIRTIO_NET_FF_ACTION_DROP: u8 = 0x1;
pub const VIRTIO_NET_FF_ACTION_DIRECT_RX_VQ: u8 = 0x2;

/// Longest selector mask (IPv6 header).
pub const MAX_SELECTOR_LEN: usize = 40;
/// A classifier has at most one selector per layer (L2, L3, L4).
pub const MAX_SELECTORS: usize = 3;
/// Longest key: Ethernet + IPv6 + TCP.
pub const MAX_KEY_LEN: usize = ETH_HLEN + MAX_SELECTOR_LEN + 20;

/// Offsets inside the selector headers that layering depends on.
const ETH_TYPE_OFF: usize = 12;
const IPV4_PROTO_OFF: usize = 9;
const IPV6_NEXT_HDR_OFF: usize = 6;

/// Header a selector matches against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SelectorType {
    Eth,
    Ipv4,
    Ipv6,
    Tcp,
    Udp,
}

impl SelectorType {
    /// Every selector this device implements, in wire order.
    pub const ALL: [SelectorType; 5] = [
        SelectorType::Eth,
        SelectorType::Ipv4,
        SelectorType::Ipv6,
        SelectorType::Tcp,
        SelectorType::Udp,
    ];

    pub fn from_wire(t: u8) -> Option<Self> {
        match t {
            VIRTIO_NET_FF_MASK_TYPE_ETH => Some(Self::Eth),
            VIRTIO_NET_FF_MASK_TYPE_IPV4 => Some(Self::Ipv4),
            VIRTIO_NET_FF_MASK_TYPE_IPV6 => Some(Self::Ipv6),
            VIRTIO_NET_FF_MASK_TYPE_TCP => Some(Self::Tcp),
            VIRTIO_NET_FF_MASK_TYPE_UDP => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn wire(self) -> u8 {
        match self {
            Self::Eth => VIRTIO_NET_FF_MASK_TYPE_ETH,
            Self::Ipv4 => VIRTIO_NET_FF_MASK_TYPE_IPV4,
            Self::Ipv6 => VIRTIO_NET_FF_MASK_TYPE_IPV6,
            Self::Tcp => VIRTIO_NET_FF_MASK_TYPE_TCP,
            Self::Udp => VIRTIO_NET_FF_MASK_TYPE_UDP,
        }
    }

    /// Mask and key length of the selector: the fixed part of the header
    /// (IPv4 options and TCP options are not matchable).
    pub fn header_len(self) -> usize {
        match self {
            Self::Eth => ETH_HLEN,
            Self::Ipv4 => 20,
            Self::Ipv6 => 40,
            Self::Tcp => 20,
            Self::Udp => 8,
        }
    }

    /// Position in a classifier: selectors are stacked L2, L3, L4.
    fn layer(self) -> usize {
        match self {
            Self::Eth => 0,
            Self::Ipv4 | Self::Ipv6 => 1,
            Self::Tcp | Self::Udp => 2,
        }
    }

    /// Header fields as (first bit, bit count), bit 0 being the most
    /// significant bit of byte 0. Without partial masking each field is
    /// matched as a whole, so its mask bits must be all set or all clear.
    fn fields(self) -> &'static [(u16, u16)] {
        match self {
            Self::Eth => &[(0, 48), (48, 48), (96, 16)],
            // version, IHL, TOS, total length, id, flags, fragment offset,
            // TTL, protocol, checksum, source, destination.
            Self::Ipv4 => &[
                (0, 4),
                (4, 4),
                (8, 8),
                (16, 16),
                (32, 16),
                (48, 3),
                (51, 13),
                (64, 8),
                (72, 8),
                (80, 16),
                (96, 32),
                (128, 32),
            ],
            // version, traffic class, flow label, payload length, next
            // header, hop limit, source, destination.
            Self::Ipv6 => &[
                (0, 4),
                (4, 8),
                (12, 20),
                (32, 16),
                (48, 8),
                (56, 8),
                (64, 128),
                (192, 128),
            ],
            // ports, sequence, ack, data offset; the reserved bits and the
            // control bits are individual fields (as the spec says for the
            // control bits); window, checksum, urgent pointer.
            Self::Tcp => &[
                (0, 16),
                (16, 16),
                (32, 32),
                (64, 32),
                (96, 4),
                (100, 1),
                (101, 1),
                (102, 1),
                (103, 1),
                (104, 1),
                (105, 1),
                (106, 1),
                (107, 1),
                (108, 1),
                (109, 1),
                (110, 1),
                (111, 1),
                (112, 16),
                (128, 16),
                (144, 16),
            ],
            Self::Udp => &[(0, 16), (16, 16), (32, 16), (48, 16)],
        }
    }
}

impl fmt::Display for SelectorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Eth => "eth",
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        };
        f.write_str(s)
    }
}

/// A selector: header type, flags and mask. Used for the selector
/// capability (what may be matched) and inside classifiers (what is matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub ty: SelectorType,
    pub flags: u8,
    /// Fixed storage so selectors never allocate; only the first
    /// `ty.header_len()` bytes are meaningful, the rest stay zero.
    mask: [u8; MAX_SELECTOR_LEN],
}

impl Selector {
    /// Fails when the mask length is not the header length of the type.
    pub fn new(ty: SelectorType, flags: u8, mask: &[u8]) -> Result<Self, FfError> {
        if mask.len() != ty.header_len() {
            return Err(FfError::Invalid("selector length does not match its type"));
        }
        let mut m = [0u8; MAX_SELECTOR_LEN];
        m[..mask.len()].copy_from_slice(mask);
        Ok(Self { ty, flags, mask: m })
    }

    /// A selector whose mask covers every bit of the header.
    pub fn full(ty: SelectorType, flags: u8) -> Self {
        let mut m = [0u8; MAX_SELECTOR_LEN];
        m[..ty.header_len()].fill(0xff);
        Self { ty, flags, mask: m }
    }

    pub fn mask(&self) -> &[u8] {
        &self.mask[..self.ty.header_len()]
    }

    pub fn partial(&self) -> bool {
        self.flags & VIRTIO_NET_FF_MASK_F_PARTIAL_MASK != 0
    }

    /// True when every field's mask bits are either all set or all clear.
    fn whole_fields(&self) -> bool {
        let mask = self.mask();
        let bit = |i: u16| {
            let i = usize::from(i);
            mask.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
        };
        self.ty.fields().iter().all(|&(start, len)| {
            let first = bit(start);
            (start..start + len).all(|i| bit(i) == first)
        })
    }

    fn mask_subset_of(&self, cap: &Selector) -> bool {
        self.mask().iter().zip(cap.mask()).all(|(m, c)| m & !c == 0)
    }
}

/// Resource limits, both as the device advertises them and as the driver
/// sets them (VIRTIO_NET_FF_RESOURCE_CAP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FfLimits {
    pub groups: u32,
    pub classifiers: u32,
    /// Rules across all groups.
    pub rules: u32,
    pub rules_per_group: u32,
    /// Highest rule priority that may be assigned.
    pub last_rule_priority: u8,
    pub selectors_per_classifier: u8,
}

impl Default for FfLimits {
    /// Enough for ethtool ntuple use (one group, shared classifiers, many
    /// rules). Three selectors per classifier is the most this device can use
    /// (one per layer).
    fn default() -> Self {
        Self {
            groups: 16,
            classifiers: 64,
            rules: 16384,
            rules_per_group: 16384,
            last_rule_priority: 255,
            selectors_per_classifier: MAX_SELECTORS as u8,
        }
    }
}

impl FfLimits {
    /// Whether every limit is at most the corresponding one in `device`.
    pub fn within(&self, device: &FfLimits) -> bool {
        self.groups <= device.groups
            && self.classifiers <= device.classifiers
            && self.rules <= device.rules
            && self.rules_per_group <= device.rules_per_group
            && self.last_rule_priority <= device.last_rule_priority
            && self.selectors_per_classifier <= device.selectors_per_classifier
    }
}

/// How a rule's `vq_index` names its receive queue.
///
/// The spec calls the field a receive virtqueue index (receiveqN sits at
/// virtqueue 2(N-1)), but the Linux driver stores the ethtool ring number
/// (0-based receive queue) in it unchanged, so that is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VqIndexEncoding {
    /// `vq_index` is the receive queue number: 0 for receiveq1.
    #[default]
    ReceiveQueue,
    /// `vq_index` is the virtqueue index: 0 for receiveq1, 2 for receiveq2.
    Virtqueue,
}

/// What to do with a packet a rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfAction {
    Drop,
    /// Deliver to this receive queue (0-based queue pair number). The caller
    /// must still drop the packet if that queue is reset or not enabled.
    RxQueue(u16),
}

/// Kind of flow filter object, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfObject {
    Group,
    Classifier,
    Rule,
}

impl fmt::Display for FfObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Group => "group",
            Self::Classifier => "classifier",
            Self::Rule => "rule",
        })
    }
}

/// Why a flow filter operation was refused. Each maps to one admin status.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FfError {
    #[error("flow filter capabilities have not been set by the driver")]
    NotEnabled,
    #[error("{0} {1} already exists")]
    Exists(FfObject, u32),
    #[error("{0} {1} does not exist")]
    NotFound(FfObject, u32),
    #[error("referenced {0} {1} does not exist")]
    UnknownReference(FfObject, u32),
    #[error("{0} {1} is in use by rules")]
    InUse(FfObject, u32),
    #[error("flow filter objects exist; capabilities cannot change")]
    CapsBusy,
    #[error("no room for another {0}")]
    NoSpace(FfObject),
    #[error("invalid flow filter request: {0}")]
    Invalid(&'static str),
}

/// A rule as the driver described it; kept for RESOURCE_OBJ_QUERY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub group_id: u32,
    pub classifier_id: u32,
    pub priority: u8,
    pub action: u8,
    pub vq_index: u16,
    /// Selector keys, one after another, as long as the classifier's masks.
    pub key: Vec<u8>,
}

/// The bytes of one selector layer that take part in matching.
#[derive(Debug)]
struct LayerPlan {
    ty: SelectorType,
    /// Where this selector's part starts in a rule key.
    key_offset: usize,
    /// (offset in header, mask) for each header byte with a non-zero mask.
    bytes: Vec<(u8, u8)>,
}

/// Precomputed extraction for a classifier: the masked bytes are packed into
/// a compact key, so bytes the classifier ignores cost nothing per packet.
#[derive(Debug)]
struct Plan {
    layers: Vec<LayerPlan>,
    key_len: usize,
}

impl Plan {
    fn new(selectors: &[Selector]) -> Self {
        let mut key_offset = 0;
        let layers = selectors
            .iter()
            .map(|s| {
                let bytes = s
                    .mask()
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m != 0)
                    // Header offsets are below MAX_SELECTOR_LEN, so fit in u8.
                    .map(|(i, m)| (i as u8, *m))
                    .collect();
                let l = LayerPlan {
                    ty: s.ty,
                    key_offset,
                    bytes,
                };
                key_offset += s.ty.header_len();
                l
            })
            .collect();
        Self {
            layers,
            key_len: key_offset,
        }
    }

    /// Packs the masked bytes of a packet's headers into `out`; `None` when
    /// the packet lacks a header the classifier needs.
    fn extract(&self, h: &Headers<'_>, out: &mut [u8; MAX_KEY_LEN]) -> Option<usize> {
        let mut n = 0;
        for layer in &self.layers {
            let hdr = h.get(layer.ty)?;
            for &(off, m) in &layer.bytes {
                *out.get_mut(n)? = hdr.get(usize::from(off))? & m;
                n += 1;
            }
        }
        Some(n)
    }

    /// The compact form of a rule key, comparable with `extract` output.
    fn compact_key(&self, key: &[u8]) -> Option<Box<[u8]>> {
        let mut out = Vec::with_capacity(MAX_KEY_LEN);
        for layer in &self.layers {
            for &(off, m) in &layer.bytes {
                out.push(key.get(layer.key_offset + usize::from(off))? & m);
            }
        }
        Some(out.into_boxed_slice())
    }
}

/// The headers of one packet, as the selectors see them.
struct Headers<'a> {
    /// Destination, source, and the ethertype after any VLAN tags, so that
    /// tagged and untagged frames match the same IP classifiers.
    eth: Option<[u8; ETH_HLEN]>,
    ipv4: Option<&'a [u8]>,
    /// Copied so Next Header can be replaced by the protocol after the
    /// extension headers, as the IPv6 selector is defined.
    ipv6: Option<[u8; 40]>,
    tcp: Option<&'a [u8]>,
    udp: Option<&'a [u8]>,
}

impl<'a> Headers<'a> {
    fn new(frame: &'a [u8], pkt: &ParsedPacket) -> Self {
        let eth = (frame.len() >= ETH_HLEN).then(|| {
            let mut e = [0u8; ETH_HLEN];
            e[..6].copy_from_slice(&pkt.dst_mac);
            e[6..12].copy_from_slice(&pkt.src_mac);
            e[12..].copy_from_slice(&pkt.ethertype.to_be_bytes());
            e
        });
        let l3 = pkt.l3_offset;
        let ipv4 = match pkt.ip {
            Some(IpAddrs::V4 { .. }) if pkt.ethertype == ETHERTYPE_IPV4 => frame.get(l3..l3 + 20),
            _ => None,
        };
        let ipv6 = match pkt.ip {
            Some(IpAddrs::V6 { .. }) if pkt.ethertype == ETHERTYPE_IPV6 => frame
                .get(l3..l3 + 40)
                .and_then(|s| <[u8; 40]>::try_from(s).ok())
                .map(|mut h| {
                    if let Some(p) = pkt.ip_proto {
                        h[IPV6_NEXT_HDR_OFF] = p;
                    }
                    h
                }),
            _ => None,
        };
        let l4 = |len: usize| pkt.l4_offset.and_then(|o| frame.get(o..o + len));
        let (tcp, udp) = match pkt.l4 {
            L4::Tcp { .. } => (l4(20), None),
            L4::Udp { .. } => (None, l4(8)),
            L4::None => (None, None),
        };
        Self {
            eth,
            ipv4,
            ipv6,
            tcp,
            udp,
        }
    }

    fn get(&self, ty: SelectorType) -> Option<&[u8]> {
        match ty {
            SelectorType::Eth => self.eth.as_ref().map(|e| e.as_slice()),
            SelectorType::Ipv4 => self.ipv4,
            SelectorType::Ipv6 => self.ipv6.as_ref().map(|h| h.as_slice()),
            SelectorType::Tcp => self.tcp,
            SelectorType::Udp => self.udp,
        }
    }
}

#[derive(Debug)]
struct Classifier {
    selectors: Vec<Selector>,
    plan: Arc<Plan>,
    /// Rules using this classifier; it cannot change while non-zero.
    rules: u32,
}

/// A rule as stored in a lookup table.
#[derive(Debug, Clone)]
struct Entry {
    priority: u8,
    rule_id: u32,
    action: FfAction,
    hits: Arc<AtomicU64>,
}

impl Entry {
    /// Sort key: higher priority first, then lower rule id.
    fn rank(&self) -> (Reverse<u8>, u32) {
        (Reverse(self.priority), self.rule_id)
    }
}

/// The rules of one group that use one classifier, by compact key.
#[derive(Debug)]
struct Table {
    classifier_id: u32,
    plan: Arc<Plan>,
    /// Each list is sorted by `Entry::rank`, so the first entry is the one
    /// that applies.
    map: HashMap<Box<[u8]>, Vec<Entry>>,
    rules: u32,
}

#[derive(Debug)]
struct Group {
    id: u32,
    priority: u16,
    rules: u32,
    tables: Vec<Table>,
}

#[derive(Debug)]
struct Rule {
    spec: RuleSpec,
    action: FfAction,
    key: Box<[u8]>,
    hits: Arc<AtomicU64>,
}

/// A validated rule, ready to be inserted.
struct PreparedRule {
    spec: RuleSpec,
    action: FfAction,
    key: Box<[u8]>,
    plan: Arc<Plan>,
}

/// Device flow filter: capabilities, objects and lookup tables.
#[derive(Debug)]
pub struct FlowFilter {
    device_limits: FfLimits,
    device_selectors: Vec<Selector>,
    device_actions: Vec<u8>,
    vq_encoding: VqIndexEncoding,
    driver_limits: Option<FfLimits>,
    driver_selectors: Option<Vec<Selector>>,
    driver_actions: Option<Vec<u8>>,
    /// Sorted by priority, highest first: the order packets try them.
    groups: Vec<Group>,
    classifiers: HashMap<u32, Classifier>,
    rules: HashMap<u32, Rule>,
}

impl Default for FlowFilter {
    fn default() -> Self {
        Self::new(FfLimits::default())
    }
}

impl FlowFilter {
    /// The device matches any bit of every selector it supports (the lookup
    /// is a masked compare over raw header bytes), so it advertises full
    /// masks with partial masking.
    pub fn new(limits: FfLimits) -> Self {
        Self {
            device_limits: limits,
            device_selectors: SelectorType::ALL
                .iter()
                .map(|&t| Selector::full(t, VIRTIO_NET_FF_MASK_F_PARTIAL_MASK))
                .collect(),
            device_actions: vec![VIRTIO_NET_FF_ACTION_DROP, VIRTIO_NET_FF_ACTION_DIRECT_RX_VQ],
            vq_encoding: VqIndexEncoding::default(),
            driver_limits: None,
            driver_selectors: None,
            driver_actions: None,
            groups: Vec::new(),
            classifiers: HashMap::new(),
            rules: HashMap::new(),
        }
    }

    pub fn with_vq_index_encoding(mut self, encoding: VqIndexEncoding) -> Self {
        self.vq_encoding = encoding;
        self
    }

    pub fn device_limits(&self) -> &FfLimits {
        &self.device_limits
    }

    /// Selector capability, ordered by type as the spec requires.
    pub fn device_selectors(&self) -> &[Selector] {
        &self.device_selectors
    }

    /// Action capability, in increasing order.
    pub fn device_actions(&self) -> &[u8] {
        &self.device_actions
    }

    pub fn driver_limits(&self) -> Option<&FfLimits> {
        self.driver_limits.as_ref()
    }

    pub fn driver_selectors(&self) -> Option<&[Selector]> {
        self.driver_selectors.as_deref()
    }

    pub fn driver_actions(&self) -> Option<&[u8]> {
        self.driver_actions.as_deref()
    }

    /// The driver enabled flow filters: all three capabilities are set.
    pub fn enabled(&self) -> bool {
        self.driver_limits.is_some()
            && self.driver_selectors.is_some()
            && self.driver_actions.is_some()
    }

    pub fn has_objects(&self) -> bool {
        !self.groups.is_empty() || !self.classifiers.is_empty() || !self.rules.is_empty()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Device reset: objects and driver capabilities are gone.
    pub fn reset(&mut self) {
        self.groups.clear();
        self.classifiers.clear();
        self.rules.clear();
        self.driver_limits = None;
        self.driver_selectors = None;
        self.driver_actions = None;
    }

    /// Capabilities describe the objects created under them, so they only
    /// change while there are none.
    fn check_caps_settable(&self) -> Result<(), FfError> {
        if self.has_objects() {
            Err(FfError::CapsBusy)
        } else {
            Ok(())
        }
    }

    pub fn set_driver_limits(&mut self, limits: FfLimits) -> Result<(), FfError> {
        self.check_caps_settable()?;
        if !limits.within(&self.device_limits) {
            return Err(FfError::Invalid(
                "resource limit above the device capability",
            ));
        }
        self.driver_limits = Some(limits);
        Ok(())
    }

    pub fn set_driver_selectors(&mut self, selectors: Vec<Selector>) -> Result<(), FfError> {
        self.check_caps_settable()?;
        for (i, s) in selectors.iter().enumerate() {
            if selectors[..i].iter().any(|p| p.ty == s.ty) {
                return Err(FfError::Invalid("selector type listed twice"));
            }
            let cap = self
                .device_selectors
                .iter()
                .find(|c| c.ty == s.ty)
                .ok_or(FfError::Invalid("selector type not supported"))?;
            if s.flags & !cap.flags != 0 {
                return Err(FfError::Invalid("selector flag not supported"));
            }
            if !s.mask_subset_of(cap) {
                return Err(FfError::Invalid("selector mask not supported"));
            }
            if !s.partial() && !s.whole_fields() {
                return Err(FfError::Invalid(
                    "partial field mask without partial masking",
                ));
            }
        }
        self.driver_selectors = Some(selectors);
        Ok(())
    }

    pub fn set_driver_actions(&mut self, actions: Vec<u8>) -> Result<(), FfError> {
        self.check_caps_settable()?;
        for (i, a) in actions.iter().enumerate() {
            if !self.device_actions.contains(a) {
                return Err(FfError::Invalid("action not supported"));
            }
            if actions[..i].contains(a) {
                return Err(FfError::Invalid("action listed twice"));
            }
        }
        self.driver_actions = Some(actions);
        Ok(())
    }

    /// Driver limits, or `NotEnabled` if any capability is unset.
    fn limits(&self) -> Result<FfLimits, FfError> {
        match (&self.driver_limits, self.enabled()) {
            (Some(l), true) => Ok(*l),
            _ => Err(FfError::NotEnabled),
        }
    }

    fn group_index(&self, id: u32) -> Option<usize> {
        self.groups.iter().position(|g| g.id == id)
    }

    fn sort_groups(&mut self) {
        self.groups.sort_by_key(|g| Reverse(g.priority));
    }

    /// Each group has a distinct priority (the spec asks for EINVAL otherwise).
    fn check_group_priority(&self, priority: u16, except: Option<u32>) -> Result<(), FfError> {
        if self
            .groups
            .iter()
            .any(|g| g.priority == priority && Some(g.id) != except)
        {
            return Err(FfError::Invalid("another group has this priority"));
        }
        Ok(())
    }

    /// Group ids are not checked against `groups_limit`, only the number of
    /// groups is: the Linux driver sets `groups_limit` to 1 and creates its
    /// one group with id 1.
    pub fn create_group(&mut self, id: u32, priority: u16) -> Result<(), FfError> {
        let limits = self.limits()?;
        if self.group_index(id).is_some() {
            return Err(FfError::Exists(FfObject::Group, id));
        }
        self.check_group_priority(priority, None)?;
        if self.groups.len() as u64 >= u64::from(limits.groups) {
            return Err(FfError::NoSpace(FfObject::Group));
        }
        self.groups.push(Group {
            id,
            priority,
            rules: 0,
            tables: Vec::new(),
        });
        self.sort_groups();
        Ok(())
    }

    pub fn modify_group(&mut self, id: u32, priority: u16) -> Result<(), FfError> {
        self.limits()?;
        let i = self
            .group_index(id)
            .ok_or(FfError::NotFound(FfObject::Group, id))?;
        if self.groups[i].rules > 0 {
            return Err(FfError::InUse(FfObject::Group, id));
        }
        self.check_group_priority(priority, Some(id))?;
        self.groups[i].priority = priority;
        self.sort_groups();
        Ok(())
    }

    pub fn destroy_group(&mut self, id: u32) -> Result<(), FfError> {
        self.limits()?;
        let i = self
            .group_index(id)
            .ok_or(FfError::NotFound(FfObject::Group, id))?;
        if self.groups[i].rules > 0 {
            return Err(FfError::InUse(FfObject::Group, id));
        }
        self.groups.remove(i);
        Ok(())
    }

    pub fn query_group(&self, id: u32) -> Result<u16, FfError> {
        self.limits()?;
        self.groups
            .iter()
            .find(|g| g.id == id)
            .map(|g| g.priority)
            .ok_or(FfError::NotFound(FfObject::Group, id))
    }

    /// Checks a classifier against the driver's selector capability and the
    /// layering the spec requires of drivers (Ethernet, IP, transport, with
    /// the linking ethertype / protocol fields fully masked), which the
    /// lookup relies on.
    fn validate_classifier(
        &self,
        limits: &FfLimits,
        selectors: &[Selector],
    ) -> Result<(), FfError> {
        let caps = self
            .driver_selectors
            .as_deref()
            .ok_or(FfError::NotEnabled)?;
        let max = MAX_SELECTORS.min(usize::from(limits.selectors_per_classifier));
        if selectors.is_empty() || selectors.len() > max {
            return Err(FfError::Invalid("bad number of selectors"));
        }
        for (i, s) in selectors.iter().enumerate() {
            if s.ty.layer() != i {
                return Err(FfError::Invalid(
                    "selectors not ordered Ethernet, IP, transport",
                ));
            }
            let cap = caps
                .iter()
                .find(|c| c.ty == s.ty)
                .ok_or(FfError::Invalid("selector type not enabled"))?;
            if s.flags & !VIRTIO_NET_FF_MASK_F_PARTIAL_MASK != 0 || s.flags & !cap.flags != 0 {
                return Err(FfError::Invalid("selector flags not enabled"));
            }
            if !s.mask_subset_of(cap) {
                return Err(FfError::Invalid("mask outside the selector capability"));
            }
            if !cap.partial() && !s.whole_fields() {
                return Err(FfError::Invalid(
                    "partial field mask without partial masking",
                ));
            }
        }
        let full = |s: &Selector, off: usize, len: usize| {
            s.mask()
                .get(off..off + len)
                .is_some_and(|m| m.iter().all(|b| *b == 0xff))
        };
        if let (Some(eth), Some(_)) = (selectors.first(), selectors.get(1)) {
            if !full(eth, ETH_TYPE_OFF, 2) {
                return Err(FfError::Invalid("ethertype not fully masked"));
            }
        }
        if let (Some(ip), Some(_)) = (selectors.get(1), selectors.get(2)) {
            let off = match ip.ty {
                SelectorType::Ipv4 => IPV4_PROTO_OFF,
                _ => IPV6_NEXT_HDR_OFF,
            };
            if !full(ip, off, 1) {
                return Err(FfError::Invalid("IP protocol not fully masked"));
            }
        }
        Ok(())
    }

    /// Classifier ids are below the driver's `classifiers_limit`, as for any
    /// resource object.
    pub fn create_classifier(&mut self, id: u32, selectors: Vec<Selector>) -> Result<(), FfError> {
        let limits = self.limits()?;
        if self.classifiers.contains_key(&id) {
            return Err(FfError::Exists(FfObject::Classifier, id));
        }
        if id >= limits.classifiers {
            return Err(FfError::Invalid("classifier id above the limit"));
        }
        if self.classifiers.len() as u64 >= u64::from(limits.classifiers) {
            return Err(FfError::NoSpace(FfObject::Classifier));
        }
        self.validate_classifier(&limits, &selectors)?;
        let plan = Arc::new(Plan::new(&selectors));
        self.classifiers.insert(
            id,
            Classifier {
                selectors,
                plan,
                rules: 0,
            },
        );
        Ok(())
    }

    pub fn modify_classifier(&mut self, id: u32, selectors: Vec<Selector>) -> Result<(), FfError> {
        let limits = self.limits()?;
        let c = self
            .classifiers
            .get(&id)
            .ok_or(FfError::NotFound(FfObject::Classifier, id))?;
        if c.rules > 0 {
            return Err(FfError::InUse(FfObject::Classifier, id));
        }
        self.validate_classifier(&limits, &selectors)?;
        let plan = Arc::new(Plan::new(&selectors));
        self.classifiers.insert(
            id,
            Classifier {
                selectors,
                plan,
                rules: 0,
            },
        );
        Ok(())
    }

    pub fn destroy_classifier(&mut self, id: u32) -> Result<(), FfError> {
        self.limits()?;
        let c = self
            .classifiers
            .get(&id)
            .ok_or(FfError::NotFound(FfObject::Classifier, id))?;
        if c.rules > 0 {
            return Err(FfError::InUse(FfObject::Classifier, id));
        }
        self.classifiers.remove(&id);
        Ok(())
    }

    pub fn query_classifier(&self, id: u32) -> Result<&[Selector], FfError> {
        self.limits()?;
        self.classifiers
            .get(&id)
            .map(|c| c.selectors.as_slice())
            .ok_or(FfError::NotFound(FfObject::Classifier, id))
    }

    /// Validates a rule without changing anything. `replacing` is the id of
    /// the rule being modified, which does not count against the limits.
    fn prepare_rule(
        &self,
        limits: &FfLimits,
        spec: RuleSpec,
        max_queue_pairs: u16,
        replacing: Option<&Rule>,
    ) -> Result<PreparedRule, FfError> {
        let group = self
            .groups
            .iter()
            .find(|g| g.id == spec.group_id)
            .ok_or(FfError::UnknownReference(FfObject::Group, spec.group_id))?;
        let classifier =
            self.classifiers
                .get(&spec.classifier_id)
                .ok_or(FfError::UnknownReference(
                    FfObject::Classifier,
                    spec.classifier_id,
                ))?;
        if spec.priority > limits.last_rule_priority {
            return Err(FfError::Invalid("rule priority above last_rule_priority"));
        }
        let actions = self.driver_actions.as_deref().ok_or(FfError::NotEnabled)?;
        if !actions.contains(&spec.action) {
            return Err(FfError::Invalid("action not enabled"));
        }
        let action = match spec.action {
            VIRTIO_NET_FF_ACTION_DROP => FfAction::Drop,
            VIRTIO_NET_FF_ACTION_DIRECT_RX_VQ => {
                let rq = match self.vq_encoding {
                    VqIndexEncoding::ReceiveQueue => spec.vq_index,
                    VqIndexEncoding::Virtqueue if spec.vq_index % 2 == 0 => spec.vq_index / 2,
                    VqIndexEncoding::Virtqueue => {
                        return Err(FfError::Invalid("vq_index is not a receive virtqueue"))
                    }
                };
                if rq >= max_queue_pairs {
                    return Err(FfError::Invalid("receive queue out of range"));
                }
                FfAction::RxQueue(rq)
            }
            _ => return Err(FfError::Invalid("action not supported")),
        };
        if spec.key.len() != classifier.plan.key_len {
            return Err(FfError::Invalid("key length does not match the classifier"));
        }
        check_key_layering(&classifier.selectors, &spec.key)?;
        let same_group = replacing.is_some_and(|r| r.spec.group_id == spec.group_id);
        if !same_group && u64::from(group.rules) >= u64::from(limits.rules_per_group) {
            return Err(FfError::NoSpace(FfObject::Rule));
        }
        if replacing.is_none() && self.rules.len() as u64 >= u64::from(limits.rules) {
            return Err(FfError::NoSpace(FfObject::Rule));
        }
        let key = classifier
            .plan
            .compact_key(&spec.key)
            .ok_or(FfError::Invalid("key length does not match the classifier"))?;
        Ok(PreparedRule {
            spec,
            action,
            key,
            plan: Arc::clone(&classifier.plan),
        })
    }

    /// Rule ids are below the lower of `rules_limit` and
    /// `rules_per_group_limit`, as the spec requires for rules.
    fn check_rule_id(limits: &FfLimits, id: u32) -> Result<(), FfError> {
        if id >= limits.rules.min(limits.rules_per_group) {
            return Err(FfError::Invalid("rule id above the limit"));
        }
        Ok(())
    }

    /// `max_queue_pairs` is the number of receive queues the device has now;
    /// a rule directing to a queue beyond it is refused.
    pub fn create_rule(
        &mut self,
        id: u32,
        spec: RuleSpec,
        max_queue_pairs: u16,
    ) -> Result<(), FfError> {
        let limits = self.limits()?;
        if self.rules.contains_key(&id) {
            return Err(FfError::Exists(FfObject::Rule, id));
        }
        Self::check_rule_id(&limits, id)?;
        let prepared = self.prepare_rule(&limits, spec, max_queue_pairs, None)?;
        self.insert_rule(id, prepared);
        Ok(())
    }

    pub fn modify_rule(
        &mut self,
        id: u32,
        spec: RuleSpec,
        max_queue_pairs: u16,
    ) -> Result<(), FfError> {
        let limits = self.limits()?;
        let old = self
            .rules
            .get(&id)
            .ok_or(FfError::NotFound(FfObject::Rule, id))?;
        let prepared = self.prepare_rule(&limits, spec, max_queue_pairs, Some(old))?;
        self.remove_rule(id);
        self.insert_rule(id, prepared);
        Ok(())
    }

    pub fn destroy_rule(&mut self, id: u32) -> Result<(), FfError> {
        self.limits()?;
        if !self.rules.contains_key(&id) {
            return Err(FfError::NotFound(FfObject::Rule, id));
        }
        self.remove_rule(id);
        Ok(())
    }

    pub fn query_rule(&self, id: u32) -> Result<&RuleSpec, FfError> {
        self.limits()?;
        self.rules
            .get(&id)
            .map(|r| &r.spec)
            .ok_or(FfError::NotFound(FfObject::Rule, id))
    }

    /// Inserts a validated rule; its group and classifier exist.
    fn insert_rule(&mut self, id: u32, p: PreparedRule) {
        let hits = Arc::new(AtomicU64::new(0));
        let entry = Entry {
            priority: p.spec.priority,
            rule_id: id,
            action: p.action,
            hits: Arc::clone(&hits),
        };
        if let Some(c) = self.classifiers.get_mut(&p.spec.classifier_id) {
            c.rules += 1;
        }
        if let Some(g) = self.groups.iter_mut().find(|g| g.id == p.spec.group_id) {
            g.rules += 1;
            let t = match g
                .tables
                .iter()
                .position(|t| t.classifier_id == p.spec.classifier_id)
            {
                Some(i) => &mut g.tables[i],
                None => {
                    g.tables.push(Table {
                        classifier_id: p.spec.classifier_id,
                        plan: p.plan,
                        map: HashMap::new(),
                        rules: 0,
                    });
                    let last = g.tables.len() - 1;
                    &mut g.tables[last]
                }
            };
            t.rules += 1;
            let list = t.map.entry(p.key.clone()).or_default();
            let pos = list.partition_point(|e| e.rank() < entry.rank());
            list.insert(pos, entry);
        }
        self.rules.insert(
            id,
            Rule {
                spec: p.spec,
                action: p.action,
                key: p.key,
                hits,
            },
        );
    }

    fn remove_rule(&mut self, id: u32) {
        let Some(rule) = self.rules.remove(&id) else {
            return;
        };
        if let Some(c) = self.classifiers.get_mut(&rule.spec.classifier_id) {
            c.rules = c.rules.saturating_sub(1);
        }
        let Some(g) = self.groups.iter_mut().find(|g| g.id == rule.spec.group_id) else {
            return;
        };
        g.rules = g.rules.saturating_sub(1);
        let Some(ti) = g
            .tables
            .iter()
            .position(|t| t.classifier_id == rule.spec.classifier_id)
        else {
            return;
        };
        let t = &mut g.tables[ti];
        t.rules = t.rules.saturating_sub(1);
        if let Some(list) = t.map.get_mut(&rule.key) {
            list.retain(|e| e.rule_id != id);
            if list.is_empty() {
                t.map.remove(&rule.key);
            }
        }
        // Unused tables would cost a lookup per packet.
        if t.rules == 0 {
            g.tables.swap_remove(ti);
        }
    }

    /// Finds the rule that applies to a received frame, counting the hit.
    /// `None` means no rule matched and RSS / automatic steering applies.
    /// `pkt` must be `packet::parse(frame)`.
    pub fn classify(&self, frame: &[u8], pkt: &ParsedPacket) -> Option<(FfAction, u32)> {
        if self.rules.is_empty() {
            return None;
        }
        let headers = Headers::new(frame, pkt);
        let mut buf = [0u8; MAX_KEY_LEN];
        for g in &self.groups {
            let mut best: Option<&Entry> = None;
            for t in &g.tables {
                let Some(n) = t.plan.extract(&headers, &mut buf) else {
                    continue;
                };
                let Some(e) = buf
                    .get(..n)
                    .and_then(|k| t.map.get(k))
                    .and_then(|l| l.first())
                else {
                    continue;
                };
                if best.map_or(true, |b| e.rank() < b.rank()) {
                    best = Some(e);
                }
            }
            if let Some(e) = best {
                e.hits.fetch_add(1, Ordering::Relaxed);
                return Some((e.action, e.rule_id));
            }
        }
        None
    }

    /// Packets each rule has matched, in no particular order.
    pub fn rule_hits(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.rules
            .iter()
            .map(|(id, r)| (*id, r.hits.load(Ordering::Relaxed)))
    }

    pub fn rule_action(&self, id: u32) -> Option<FfAction> {
        self.rules.get(&id).map(|r| r.action)
    }
}

/// The spec requires drivers to set the ethertype key to the IP selector's
/// type and the protocol key to the transport selector's; a rule violating
/// that could never match, so it is refused.
fn check_key_layering(selectors: &[Selector], key: &[u8]) -> Result<(), FfError> {
    let ip = selectors.get(1).map(|s| s.ty);
    if let Some(ip) = ip {
        let want = match ip {
            SelectorType::Ipv4 => ETHERTYPE_IPV4,
            _ => ETHERTYPE_IPV6,
        };
        let got = key
            .get(ETH_TYPE_OFF..ETH_TYPE_OFF + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]));
        if got != Some(want) {
            return Err(FfError::Invalid(
                "ethertype key does not match the IP selector",
            ));
        }
    }
    if let (Some(ip), Some(l4)) = (ip, selectors.get(2).map(|s| s.ty)) {
        let off = ETH_HLEN
            + match ip {
                SelectorType::Ipv4 => IPV4_PROTO_OFF,
                _ => IPV6_NEXT_HDR_OFF,
            };
        let want = match l4 {
            SelectorType::Tcp => IPPROTO_TCP,
            _ => IPPROTO_UDP,
        };
        if key.get(off) != Some(&want) {
            return Err(FfError::Invalid(
                "protocol key does not match the transport selector",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::packet::{parse, ETHERTYPE_VLAN};

    pub(crate) const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    pub(crate) const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    /// Ethernet + IPv4 + TCP or UDP frame.
    pub(crate) fn frame4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let l4len = if proto == IPPROTO_TCP { 20 } else { 8 };
        let mut f = vec![0u8; 14 + 20 + l4len + 4];
        f[0..6].copy_from_slice(&MAC_A);
        f[6..12].copy_from_slice(&MAC_B);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 1] = 0x10; // TOS
        f[14 + 8] = 64;
        f[14 + 9] = proto;
        f[14 + 12..14 + 16].copy_from_slice(&src);
        f[14 + 16..14 + 20].copy_from_slice(&dst);
        let l4 = &mut f[34..];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        if proto == IPPROTO_TCP {
            l4[12] = 5 << 4;
            l4[13] = 0x02; // SYN
        } else {
            l4[4..6].copy_from_slice(&12u16.to_be_bytes());
        }
        f
    }

    /// Ethernet + IPv6 (+ one destination options header if `ext`) + L4.
    pub(crate) fn frame6(
        src: [u8; 16],
        dst: [u8; 16],
        proto: u8,
        sport: u16,
        dport: u16,
        ext: bool,
    ) -> Vec<u8> {
        let l4len = if proto == IPPROTO_TCP { 20 } else { 8 };
        let extlen = if ext { 8 } else { 0 };
        let mut f = vec![0u8; 14 + 40 + extlen + l4len];
        f[0..6].copy_from_slice(&MAC_A);
        f[6..12].copy_from_slice(&MAC_B);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[14 + 6] = if ext { 60 } else { proto };
        f[14 + 7] = 64;
        f[14 + 8..14 + 24].copy_from_slice(&src);
        f[14 + 24..14 + 40].copy_from_slice(&dst);
        if ext {
            f[54] = proto;
        }
        let l4 = &mut f[54 + extlen..];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        if proto == IPPROTO_TCP {
            l4[12] = 5 << 4;
        }
        f
    }

    fn zero(ty: SelectorType) -> Vec<u8> {
        vec![0u8; ty.header_len()]
    }

    /// Mask helper: sets `bytes` at `off` in an all-zero mask.
    fn mask(ty: SelectorType, fields: &[(usize, &[u8])]) -> Selector {
        let mut m = zero(ty);
        for (off, b) in fields {
            m[*off..*off + b.len()].copy_from_slice(b);
        }
        Selector::new(ty, 0, &m).unwrap()
    }

    fn eth_type_mask() -> Selector {
        mask(SelectorType::Eth, &[(12, &[0xff, 0xff])])
    }

    /// A flow filter with the capabilities set as the Linux driver sets them.
    pub(crate) fn enabled_ff() -> FlowFilter {
        let mut ff = FlowFilter::default();
        let limits = *ff.device_limits();
        ff.set_driver_limits(limits).unwrap();
        let sels = ff.device_selectors().to_vec();
        ff.set_driver_selectors(sels).unwrap();
        let acts = ff.device_actions().to_vec();
        ff.set_driver_actions(acts).unwrap();
        ff
    }

    /// (header offset, bytes) pairs to set in one selector's part.
    type Fields<'a> = &'a [(usize, &'a [u8])];

    fn key(parts: &[(SelectorType, Fields<'_>)]) -> Vec<u8> {
        let mut k = Vec::new();
        for (ty, fields) in parts {
            let mut h = zero(*ty);
            for (off, b) in *fields {
                h[*off..*off + b.len()].copy_from_slice(b);
            }
            k.extend_from_slice(&h);
        }
        k
    }

    fn rule(group: u32, classifier: u32, priority: u8, action: FfAction, key: Vec<u8>) -> RuleSpec {
        let (action, vq_index) = match action {
            FfAction::Drop => (VIRTIO_NET_FF_ACTION_DROP, 0),
            FfAction::RxQueue(q) => (VIRTIO_NET_FF_ACTION_DIRECT_RX_VQ, q),
        };
        RuleSpec {
            group_id: group,
            classifier_id: classifier,
            priority,
            action,
            vq_index,
            key,
        }
    }

    fn classify(ff: &FlowFilter, f: &[u8]) -> Option<(FfAction, u32)> {
        ff.classify(f, &parse(f))
    }

    /// Classifier 0: IPv4 + UDP on destination address and port.
    fn udp4_dst_classifier(ff: &mut FlowFilter, id: u32) {
        ff.create_classifier(
            id,
            vec![
                eth_type_mask(),
                mask(SelectorType::Ipv4, &[(9, &[0xff]), (16, &[0xff; 4])]),
                mask(SelectorType::Udp, &[(2, &[0xff, 0xff])]),
            ],
        )
        .unwrap();
    }

    fn udp4_dst_key(dst: [u8; 4], port: u16) -> Vec<u8> {
        key(&[
            (SelectorType::Eth, &[(12, &ETHERTYPE_IPV4.to_be_bytes())]),
            (SelectorType::Ipv4, &[(9, &[IPPROTO_UDP]), (16, &dst)]),
            (SelectorType::Udp, &[(2, &port.to_be_bytes())]),
        ])
    }

    #[test]
    fn mac_rule_and_counters() {
        let mut ff = enabled_ff();
        ff.create_group(1, 1).unwrap();
        ff.create_classifier(0, vec![mask(SelectorType::Eth, &[(0, &[0xff; 6])])])
            .unwrap();
        let k = key(&[(SelectorType::Eth, &[(0, &MAC_A)])]);
        ff.create_rule(0, rule(1, 0, 0, FfAction::RxQueue(3), k), 4)
            .unwrap();
        let f = frame4([1, 1, 1, 1], [2, 2, 2, 2], IPPROTO_TCP, 1, 2);
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(3), 0)));
        let mut other = f.clone();
        other[5] = 9;
        assert_eq!(classify(&ff, &other), None);
        assert_eq!(classify(&ff, &f[..10]), None);
        assert_eq!(ff.rule_hits().collect::<Vec<_>>(), vec![(0, 1)]);
    }

    #[test]
    fn vlan_tagged_frame_matches_ip_classifier() {
        let mut ff = enabled_ff();
        ff.create_group(0, 0).unwrap();
        udp4_dst_classifier(&mut ff, 0);
        ff.create_rule(
            0,
            rule(0, 0, 0, FfAction::Drop, udp4_dst_key([10, 0, 0, 2], 53)),
            1,
        )
        .unwrap();
        let f = frame4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_UDP, 999, 53);
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        tagged.extend_from_slice(&[0, 7]);
        tagged.extend_from_slice(&f[12..]);
        assert_eq!(classify(&ff, &f), Some((FfAction::Drop, 0)));
        assert_eq!(classify(&ff, &tagged), Some((FfAction::Drop, 0)));
    }

    #[test]
    fn ipv4_tcp_udp_matches() {
        let mut ff = enabled_ff();
        ff.create_group(0, 0).unwrap();
        // IPv4 source /24 prefix (partial mask), any protocol.
        ff.create_classifier(
            1,
            vec![
                eth_type_mask(),
                mask(SelectorType::Ipv4, &[(12, &[0xff, 0xff, 0xff, 0])]),
            ],
        )
        .unwrap();
        ff.create_rule(
            1,
            rule(
                0,
                1,
                1,
                FfAction::RxQueue(1),
                key(&[
                    (SelectorType::Eth, &[(12, &ETHERTYPE_IPV4.to_be_bytes())]),
                    // Bits outside the mask are ignored.
                    (SelectorType::Ipv4, &[(12, &[192, 168, 7, 99])]),
                ]),
            ),
            4,
        )
        .unwrap();
        // TCP destination port, higher priority than the prefix rule.
        ff.create_classifier(
            2,
            vec![
                eth_type_mask(),
                mask(SelectorType::Ipv4, &[(9, &[0xff])]),
                mask(SelectorType::Tcp, &[(2, &[0xff, 0xff])]),
            ],
        )
        .unwrap();
        ff.create_rule(
            2,
            rule(
                0,
                2,
                5,
                FfAction::RxQueue(2),
                key(&[
                    (SelectorType::Eth, &[(12, &ETHERTYPE_IPV4.to_be_bytes())]),
                    (SelectorType::Ipv4, &[(9, &[IPPROTO_TCP])]),
                    (SelectorType::Tcp, &[(2, &443u16.to_be_bytes())]),
                ]),
            ),
            4,
        )
        .unwrap();
        udp4_dst_classifier(&mut ff, 3);
        ff.create_rule(
            3,
            rule(0, 3, 5, FfAction::Drop, udp4_dst_key([8, 8, 8, 8], 53)),
            4,
        )
        .unwrap();

        let tcp443 = frame4([192, 168, 7, 1], [1, 1, 1, 1], IPPROTO_TCP, 5000, 443);
        assert_eq!(classify(&ff, &tcp443), Some((FfAction::RxQueue(2), 2)));
        let tcp80 = frame4([192, 168, 7, 1], [1, 1, 1, 1], IPPROTO_TCP, 5000, 80);
        assert_eq!(classify(&ff, &tcp80), Some((FfAction::RxQueue(1), 1)));
        let udp443 = frame4([192, 168, 8, 1], [1, 1, 1, 1], IPPROTO_UDP, 5000, 443);
        assert_eq!(classify(&ff, &udp443), None, "TCP rule must not match UDP");
        let dns = frame4([192, 168, 8, 1], [8, 8, 8, 8], IPPROTO_UDP, 5000, 53);
        assert_eq!(classify(&ff, &dns), Some((FfAction::Drop, 3)));
        // A non-first fragment has no transport header to match.
        let mut frag = dns.clone();
        frag[14 + 6] = 0x00;
        frag[14 + 7] = 0x10;
        assert_eq!(classify(&ff, &frag), None);
    }

    #[test]
    fn ipv6_matches_through_extension_headers() {
        let mut ff = enabled_ff();
        ff.create_group(0, 0).unwrap();
        ff.create_classifier(
            0,
            vec![
                eth_type_mask(),
                mask(SelectorType::Ipv6, &[(6, &[0xff]), (24, &[0xff; 16])]),
                mask(SelectorType::Tcp, &[(0, &[0xff, 0xff])]),
            ],
        )
        .unwrap();
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let k = key(&[
            (SelectorType::Eth, &[(12, &ETHERTYPE_IPV6.to_be_bytes())]),
            (SelectorType::Ipv6, &[(6, &[IPPROTO_TCP]), (24, &dst)]),
            (SelectorType::Tcp, &[(0, &1234u16.to_be_bytes())]),
        ]);
        ff.create_rule(7, rule(0, 0, 0, FfAction::RxQueue(0), k), 1)
            .unwrap();
        let plain = frame6(src, dst, IPPROTO_TCP, 1234, 80, false);
        let ext = frame6(src, dst, IPPROTO_TCP, 1234, 80, true);
        let udp = frame6(src, dst, IPPROTO_UDP, 1234, 80, false);
        assert_eq!(classify(&ff, &plain), Some((FfAction::RxQueue(0), 7)));
        assert_eq!(classify(&ff, &ext), Some((FfAction::RxQueue(0), 7)));
        assert_eq!(classify(&ff, &udp), None);
        let v4 = frame4([1, 1, 1, 1], [2, 2, 2, 2], IPPROTO_TCP, 1234, 80);
        assert_eq!(classify(&ff, &v4), None);
    }

    #[test]
    fn group_priority_order() {
        let mut ff = enabled_ff();
        // Group 10 has the higher priority value and is tried first.
        ff.create_group(5, 4).unwrap();
        ff.create_group(10, 5).unwrap();
        udp4_dst_classifier(&mut ff, 0);
        let k = udp4_dst_key([10, 0, 0, 2], 53);
        // The rule in the lower group has the higher rule priority: groups
        // still decide first.
        ff.create_rule(0, rule(5, 0, 200, FfAction::RxQueue(1), k.clone()), 4)
            .unwrap();
        ff.create_rule(1, rule(10, 0, 0, FfAction::RxQueue(2), k), 4)
            .unwrap();
        let f = frame4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_UDP, 1, 53);
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(2), 1)));
        ff.destroy_rule(1).unwrap();
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(1), 0)));
        // Changing group priorities reorders them.
        ff.destroy_rule(0).unwrap();
        ff.modify_group(5, 9).unwrap();
        assert_eq!(ff.query_group(5), Ok(9));
        assert_eq!(
            ff.create_group(11, 9),
            Err(FfError::Invalid("another group has this priority"))
        );
    }

    #[test]
    fn rule_priority_within_group() {
        let mut ff = enabled_ff();
        ff.create_group(0, 0).unwrap();
        udp4_dst_classifier(&mut ff, 0);
        ff.create_classifier(1, vec![mask(SelectorType::Eth, &[(0, &[0xff; 6])])])
            .unwrap();
        let k = udp4_dst_key([10, 0, 0, 2], 53);
        // Same key, same classifier: the higher priority value wins.
        ff.create_rule(0, rule(0, 0, 1, FfAction::RxQueue(1), k.clone()), 4)
            .unwrap();
        ff.create_rule(1, rule(0, 0, 3, FfAction::RxQueue(3), k.clone()), 4)
            .unwrap();
        // Another classifier, priority in between.
        let mk = key(&[(SelectorType::Eth, &[(0, &MAC_A)])]);
        ff.create_rule(2, rule(0, 1, 2, FfAction::RxQueue(2), mk), 4)
            .unwrap();
        let f = frame4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_UDP, 1, 53);
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(3), 1)));
        ff.destroy_rule(1).unwrap();
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(2), 2)));
        ff.destroy_rule(2).unwrap();
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(1), 0)));
        // Equal priorities: the lower rule id wins, whatever the insertion order.
        ff.create_rule(9, rule(0, 0, 1, FfAction::Drop, k.clone()), 4)
            .unwrap();
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(1), 0)));
        ff.create_rule(4, rule(0, 0, 1, FfAction::Drop, k), 4)
            .unwrap();
        ff.destroy_rule(0).unwrap();
        assert_eq!(classify(&ff, &f), Some((FfAction::Drop, 4)));
    }

    #[test]
    fn modify_rule_replaces_match() {
        let mut ff = enabled_ff();
        ff.create_group(0, 0).unwrap();
        udp4_dst_classifier(&mut ff, 0);
        ff.create_rule(
            0,
            rule(0, 0, 0, FfAction::Drop, udp4_dst_key([1, 2, 3, 4], 53)),
            2,
        )
        .unwrap();
        let spec = rule(
            0,
            0,
            0,
            FfAction::RxQueue(1),
            udp4_dst_key([1, 2, 3, 4], 54),
        );
        ff.modify_rule(0, spec.clone(), 2).unwrap();
        assert_eq!(ff.query_rule(0), Ok(&spec));
        let old = frame4([9, 9, 9, 9], [1, 2, 3, 4], IPPROTO_UDP, 1, 53);
        let new = frame4([9, 9, 9, 9], [1, 2, 3, 4], IPPROTO_UDP, 1, 54);
        assert_eq!(classify(&ff, &old), None);
        assert_eq!(classify(&ff, &new), Some((FfAction::RxQueue(1), 0)));
        // A failed modify leaves the rule alone.
        let bad = rule(
            0,
            0,
            0,
            FfAction::RxQueue(7),
            udp4_dst_key([1, 2, 3, 4], 55),
        );
        assert!(ff.modify_rule(0, bad, 2).is_err());
        assert_eq!(classify(&ff, &new), Some((FfAction::RxQueue(1), 0)));
    }

    #[test]
    fn object_validation() {
        let mut ff = FlowFilter::default();
        assert_eq!(ff.create_group(0, 0), Err(FfError::NotEnabled));
        let mut ff2 = enabled_ff();
        std::mem::swap(&mut ff, &mut ff2);

        ff.create_group(0, 0).unwrap();
        assert_eq!(
            ff.create_group(0, 1),
            Err(FfError::Exists(FfObject::Group, 0))
        );
        udp4_dst_classifier(&mut ff, 0);
        let k = udp4_dst_key([1, 2, 3, 4], 53);
        let ok = rule(0, 0, 0, FfAction::RxQueue(1), k.clone());

        // Unknown references.
        let mut r = ok.clone();
        r.group_id = 9;
        assert_eq!(
            ff.create_rule(0, r, 2),
            Err(FfError::UnknownReference(FfObject::Group, 9))
        );
        let mut r = ok.clone();
        r.classifier_id = 9;
        assert_eq!(
            ff.create_rule(0, r, 2),
            Err(FfError::UnknownReference(FfObject::Classifier, 9))
        );
        // Queue out of range.
        assert!(matches!(
            ff.create_rule(0, rule(0, 0, 0, FfAction::RxQueue(2), k.clone()), 2),
            Err(FfError::Invalid(_))
        ));
        // Key length mismatch.
        let mut r = ok.clone();
        r.key.pop();
        assert!(matches!(ff.create_rule(0, r, 2), Err(FfError::Invalid(_))));
        // Ethertype / protocol keys that contradict the selectors.
        let mut r = ok.clone();
        r.key[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        assert!(matches!(ff.create_rule(0, r, 2), Err(FfError::Invalid(_))));
        let mut r = ok.clone();
        r.key[14 + 9] = IPPROTO_TCP;
        assert!(matches!(ff.create_rule(0, r, 2), Err(FfError::Invalid(_))));
        // Unknown action.
        let mut r = ok.clone();
        r.action = 3;
        assert!(matches!(ff.create_rule(0, r, 2), Err(FfError::Invalid(_))));
        // Rule id beyond the limit.
        assert!(matches!(
            ff.create_rule(16384, ok.clone(), 2),
            Err(FfError::Invalid(_))
        ));
        assert_eq!(ff.rule_count(), 0);

        ff.create_rule(0, ok.clone(), 2).unwrap();
        assert_eq!(
            ff.create_rule(0, ok, 2),
            Err(FfError::Exists(FfObject::Rule, 0))
        );
        assert_eq!(ff.destroy_group(0), Err(FfError::InUse(FfObject::Group, 0)));
        assert_eq!(
            ff.destroy_classifier(0),
            Err(FfError::InUse(FfObject::Classifier, 0))
        );
        assert_eq!(
            ff.modify_classifier(0, vec![eth_type_mask()]),
            Err(FfError::InUse(FfObject::Classifier, 0))
        );
        assert_eq!(ff.set_driver_actions(vec![1]), Err(FfError::CapsBusy));
        ff.destroy_rule(0).unwrap();
        assert_eq!(
            ff.destroy_rule(0),
            Err(FfError::NotFound(FfObject::Rule, 0))
        );
        ff.destroy_classifier(0).unwrap();
        ff.destroy_group(0).unwrap();
        assert_eq!(
            ff.destroy_group(0),
            Err(FfError::NotFound(FfObject::Group, 0))
        );
        assert!(!ff.has_objects());
    }

    #[test]
    fn classifier_validation() {
        let mut ff = enabled_ff();
        let ip = mask(SelectorType::Ipv4, &[(16, &[0xff; 4])]);
        // Wrong order / layering.
        assert!(ff.create_classifier(0, vec![ip.clone()]).is_err());
        assert!(ff
            .create_classifier(
                0,
                vec![
                    eth_type_mask(),
                    mask(SelectorType::Udp, &[(0, &[0xff, 0xff])])
                ]
            )
            .is_err());
        // Ethertype must be fully masked under an IP selector.
        assert!(ff
            .create_classifier(
                0,
                vec![mask(SelectorType::Eth, &[(12, &[0xff, 0])]), ip.clone()]
            )
            .is_err());
        // Protocol must be fully masked under a transport selector.
        assert!(ff
            .create_classifier(
                0,
                vec![
                    eth_type_mask(),
                    ip.clone(),
                    mask(SelectorType::Udp, &[(0, &[0xff, 0xff])])
                ]
            )
            .is_err());
        assert!(ff.create_classifier(0, vec![]).is_err());
        // Id beyond classifiers_limit.
        assert!(matches!(
            ff.create_classifier(64, vec![eth_type_mask()]),
            Err(FfError::Invalid(_))
        ));
        // Unknown flag.
        let mut s = eth_type_mask();
        s.flags = 0x80;
        assert!(ff.create_classifier(0, vec![s]).is_err());
        assert!(!ff.has_objects());
        ff.create_classifier(0, vec![eth_type_mask(), ip]).unwrap();
        assert_eq!(
            ff.create_classifier(0, vec![eth_type_mask()]),
            Err(FfError::Exists(FfObject::Classifier, 0))
        );
    }

    #[test]
    fn masks_limited_by_driver_selector_cap() {
        let mut ff = FlowFilter::default();
        ff.set_driver_limits(FfLimits::default()).unwrap();
        ff.set_driver_actions(vec![VIRTIO_NET_FF_ACTION_DROP])
            .unwrap();
        // Driver enables Ethernet destination only, whole fields.
        let dst_only = mask(SelectorType::Eth, &[(0, &[0xff; 6])]);
        ff.set_driver_selectors(vec![dst_only.clone()]).unwrap();
        ff.create_group(0, 0).unwrap();
        assert!(ff
            .create_classifier(0, vec![mask(SelectorType::Eth, &[(6, &[0xff; 6])])])
            .is_err());
        // Partial mask of a field without partial masking.
        assert!(ff
            .create_classifier(0, vec![mask(SelectorType::Eth, &[(0, &[0x01])])])
            .is_err());
        ff.create_classifier(0, vec![dst_only]).unwrap();
        // Direct-to-queue was not enabled.
        let k = key(&[(SelectorType::Eth, &[(0, &MAC_A)])]);
        assert!(ff
            .create_rule(0, rule(0, 0, 0, FfAction::RxQueue(0), k.clone()), 1)
            .is_err());
        ff.create_rule(0, rule(0, 0, 0, FfAction::Drop, k), 1)
            .unwrap();
    }

    #[test]
    fn driver_caps_must_be_subset() {
        let mut ff = FlowFilter::default();
        let mut l = FfLimits::default();
        l.rules += 1;
        assert!(ff.set_driver_limits(l).is_err());
        assert!(ff.set_driver_actions(vec![3]).is_err());
        assert!(ff.set_driver_actions(vec![1, 1]).is_err());
        let e = Selector::full(SelectorType::Eth, 0);
        assert!(ff.set_driver_selectors(vec![e.clone(), e.clone()]).is_err());
        let mut flagged = e;
        flagged.flags = 0x2;
        assert!(ff.set_driver_selectors(vec![flagged]).is_err());
        assert!(!ff.enabled());
    }

    #[test]
    fn group_limit() {
        let mut ff = FlowFilter::default();
        let limits = FfLimits {
            groups: 2,
            ..FfLimits::default()
        };
        ff.set_driver_limits(limits).unwrap();
        ff.set_driver_selectors(ff.device_selectors().to_vec())
            .unwrap();
        ff.set_driver_actions(ff.device_actions().to_vec()).unwrap();
        // Ids are not bounded by groups_limit (Linux uses id 1 with limit 1).
        ff.create_group(100, 0).unwrap();
        ff.create_group(7, 1).unwrap();
        assert_eq!(
            ff.create_group(3, 2),
            Err(FfError::NoSpace(FfObject::Group))
        );
    }

    #[test]
    fn virtqueue_index_encoding() {
        let mut ff = enabled_ff().with_vq_index_encoding(VqIndexEncoding::Virtqueue);
        ff.create_group(0, 0).unwrap();
        udp4_dst_classifier(&mut ff, 0);
        let k = udp4_dst_key([1, 2, 3, 4], 53);
        // Virtqueue 3 is a transmit queue.
        let mut r = rule(0, 0, 0, FfAction::RxQueue(3), k.clone());
        assert!(ff.create_rule(0, r.clone(), 4).is_err());
        r.vq_index = 6;
        ff.create_rule(0, r, 4).unwrap();
        assert_eq!(ff.rule_action(0), Some(FfAction::RxQueue(3)));
    }

    #[test]
    fn ten_thousand_rules() {
        let mut ff = enabled_ff();
        ff.create_group(1, 1).unwrap();
        udp4_dst_classifier(&mut ff, 0);
        for i in 0..10_000u32 {
            let b = i.to_be_bytes();
            let k = udp4_dst_key([10, b[1], b[2], b[3]], 4789);
            let q = (i % 8) as u16;
            ff.create_rule(i, rule(1, 0, 0, FfAction::RxQueue(q), k), 8)
                .unwrap();
        }
        assert_eq!(ff.rule_count(), 10_000);
        for i in [0u32, 1, 4242, 9_999] {
            let b = i.to_be_bytes();
            let f = frame4([1, 1, 1, 1], [10, b[1], b[2], b[3]], IPPROTO_UDP, 7, 4789);
            assert_eq!(
                classify(&ff, &f),
                Some((FfAction::RxQueue((i % 8) as u16), i))
            );
        }
        let miss = frame4([1, 1, 1, 1], [10, 0, 0x27, 0x10], IPPROTO_UDP, 7, 4789);
        assert_eq!(classify(&ff, &miss), None);
        for i in (0..10_000u32).step_by(2) {
            ff.destroy_rule(i).unwrap();
        }
        let b = 4243u32.to_be_bytes();
        let f = frame4([1, 1, 1, 1], [10, b[1], b[2], b[3]], IPPROTO_UDP, 7, 4789);
        assert_eq!(classify(&ff, &f), Some((FfAction::RxQueue(3), 4243)));
        let hits: u64 = ff.rule_hits().map(|(_, h)| h).sum();
        // Rules 1 and 9_999 survived with one hit each, plus 4243 now.
        assert_eq!(hits, 3);
    }

    #[test]
    fn reset_clears_everything() {
        let mut ff = enabled_ff();
        ff.create_group(0, 0).unwrap();
        ff.reset();
        assert!(!ff.enabled());
        assert!(!ff.has_objects());
        assert_eq!(ff.create_group(0, 0), Err(FfError::NotEnabled));
    }
}
