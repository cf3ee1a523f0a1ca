//! The control virtqueue: receive filtering, MAC addresses, multiqueue and
//! RSS configuration, RSS contexts, guest offloads, and the header split
//! and hash field extensions.
//!
//! Commands arrive from the guest as `class, command, data`; the device
//! answers with one ack byte, followed by a command-specific result for
//! the few commands that have one. Anything malformed gets VIRTIO_NET_ERR
//! and leaves the state unchanged.

use crate::config::{
    MacAddr, MAX_QUEUE_PAIRS, RSS_MAX_CONTEXTS, RSS_MAX_INDIRECTION_LEN, RSS_MAX_KEY_SIZE,
};
use crate::hash_fields::{self, HashFields, HashFieldsLimits};
use crate::rss::{self, HashConfig, RssConfig, RssLimits};
use crate::rss_ctx::{self, RssContexts, RssCtxLimits};
use crate::rx::SplitParams;
use crate::spec::*;

/// Largest MAC filter table the device keeps; a longer table turns the
/// corresponding "all" mode on, as QEMU's device model does.
pub const MAC_TABLE_MAX: usize = 64;

/// Driver-visible state that control commands change.
#[derive(Debug, Clone)]
pub struct ControlState {
    pub mac: MacAddr,
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
    pub uni_macs: Vec<[u8; 6]>,
    pub multi_macs: Vec<[u8; 6]>,
    /// Queue pairs the driver uses (VQ_PAIRS_SET or RSS max_tx_vq).
    pub active_pairs: u16,
    /// RSS steering, when configured with VIRTIO_NET_CTRL_MQ_RSS_CONFIG.
    pub rss: Option<RssConfig>,
    /// Hash reporting without steering (VIRTIO_NET_CTRL_MQ_HASH_CONFIG).
    pub hash_only: Option<HashConfig>,
    /// VIRTIO_NET_F_GUEST_* offloads currently enabled.
    pub guest_offloads: u64,
    pub split: Option<SplitParams>,
    /// RSS contexts besides the default configuration (VIRTNET_RSS_CTX_CTRL).
    pub rss_contexts: RssContexts,
    /// Fields hashed per hash type, and the input transform
    /// (VIRTIO_NET_CTRL_HASH_FIELDS), for `rss` and `hash_only`.
    pub hash_fields: HashFields,
}

impl ControlState {
    /// The state after device reset: promiscuous like QEMU's model, so that
    /// a driver without CTRL_RX receives everything; one queue pair.
    pub fn new(mac: MacAddr, guest_offloads: u64) -> Self {
        ControlState {
            mac,
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            uni_macs: Vec::new(),
            multi_macs: Vec::new(),
            active_pairs: 1,
            rss: None,
            hash_only: None,
            guest_offloads,
            split: None,
            rss_contexts: RssContexts::default(),
            hash_fields: HashFields::default(),
        }
    }

    /// The receive filter: may a frame with this destination MAC be delivered?
    pub fn accepts(&self, dst: &[u8; 6]) -> bool {
        if self.promisc {
            return true;
        }
        if dst == &[0xff; 6] {
            return !self.nobcast;
        }
        if dst[0] & 1 == 1 {
            if self.nomulti {
                return false;
            }
            return self.allmulti || self.multi_macs.contains(dst);
        }
        if self.nouni {
            return false;
        }
        self.alluni || dst == &self.mac.0 || self.uni_macs.contains(dst)
    }
}

/// Limits the control handler validates against.
#[derive(Debug, Clone, Copy)]
pub struct CtrlLimits {
    pub max_pairs: u16,
    /// Negotiated features: commands for features not negotiated fail.
    pub features: u64,
    pub split_header_buf_len: u16,
    /// The device offers the hash field extension (it has no feature bit).
    pub hash_fields: bool,
}

fn has(features: u64, b: u32) -> bool {
    features & bit(b) != 0
}

/// The VIRTIO_NET_F_GUEST_* bits a driver may toggle with GUEST_OFFLOADS_SET.
pub const GUEST_OFFLOAD_BITS: u64 = bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_GUEST_USO4)
    | bit(VIRTIO_NET_F_GUEST_USO6);

/// Executes one control command (`class`, `command`, `data`), returning the
/// ack byte (VIRTIO_NET_OK or VIRTIO_NET_ERR). For commands without reply
/// data.
pub fn handle_command(state: &mut ControlState, limits: &CtrlLimits, request: &[u8]) -> u8 {
    let reply = handle_command_reply(state, limits, request, 1);
    reply.last().copied().unwrap_or(VIRTIO_NET_ERR as u8)
}

/// Executes one control command (`class`, `command`, `data`) whose chain
/// has `room` device-writable bytes, and returns what the device writes
/// there: the ack byte, then the command-specific result if the command has
/// one and succeeded (`struct virtio_net_ctrl`: `ack` is followed by
/// `command-specific-result`).
pub fn handle_command_reply(
    state: &mut ControlState,
    limits: &CtrlLimits,
    request: &[u8],
    room: usize,
) -> Vec<u8> {
    let f = limits.features;
    let reply = match request {
        [class, command, data @ ..]
            if *class == VIRTNET_RSS_CTX_CTRL
                && has(f, VIRTIO_NET_F_RSS_CONTEXT_ALIAS)
                && has(f, VIRTIO_NET_F_RSS) =>
        {
            let ctx_limits = RssCtxLimits {
                max_contexts: RSS_MAX_CONTEXTS,
                rss: rss_limits(limits),
                active_pairs: state.active_pairs,
            };
            rss_ctx::execute(&mut state.rss_contexts, &ctx_limits, *command, data, room)
                .map_err(|e| log::debug!("RSS context command {command}: {e}"))
                .ok()
        }
        // Without a feature bit: known when the device offers it and the
        // driver negotiated a hash (RSS or hash reports).
        [class, command, data @ ..]
            if *class == VIRTIO_NET_CTRL_HASH_FIELDS
                && limits.hash_fields
                && (has(f, VIRTIO_NET_F_RSS) || has(f, VIRTIO_NET_F_HASH_REPORT)) =>
        {
            hash_fields::execute(
                &mut state.hash_fields,
                &HashFieldsLimits::DEVICE,
                *command,
                data,
                room,
            )
            .map_err(|e| log::debug!("hash fields command {command}: {e}"))
            .ok()
        }
        [class, command, data @ ..] => {
            execute(state, limits, *class, *command, data).map(|()| Vec::new())
        }
        _ => None,
    };
    match reply {
        Some(result) => {
            let mut v = Vec::with_capacity(1 + result.len());
            v.push(VIRTIO_NET_OK as u8);
            v.extend(result);
            v
        }
        None => vec![VIRTIO_NET_ERR as u8],
    }
}

fn rss_limits(limits: &CtrlLimits) -> RssLimits {
    RssLimits {
        max_key_size: RSS_MAX_KEY_SIZE,
        max_indirection_len: RSS_MAX_INDIRECTION_LEN,
        supported_hash_types: crate::config::SUPPORTED_HASH_TYPES,
        num_queue_pairs: limits.max_pairs,
    }
}

fn execute(
    state: &mut ControlState,
    limits: &CtrlLimits,
    class: u8,
    command: u8,
    data: &[u8],
) -> Option<()> {
    let f = limits.features;
    match u32::from(class) {
        VIRTIO_NET_CTRL_RX if has(f, VIRTIO_NET_F_CTRL_RX) => rx_mode(state, f, command, data),
        VIRTIO_NET_CTRL_MAC => mac_command(state, f, command, data),
        VIRTIO_NET_CTRL_MQ => mq_command(state, limits, command, data),
        VIRTIO_NET_CTRL_GUEST_OFFLOADS
            if has(f, VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
                && u32::from(command) == VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET =>
        {
            let offloads = u64::from_le_bytes(data.try_into().ok()?);
            // Only offloads that were negotiated may be enabled.
            if offloads & !(f & GUEST_OFFLOAD_BITS) != 0 {
                return None;
            }
            state.guest_offloads = offloads;
            Some(())
        }
        VIRTIO_NET_CTRL_ANNOUNCE
            if has(f, VIRTIO_NET_F_GUEST_ANNOUNCE)
                && u32::from(command) == VIRTIO_NET_CTRL_ANNOUNCE_ACK =>
        {
            data.is_empty().then_some(())
        }
        _ if class == VIRTIO_NET_CTRL_SPLIT_HEADER
            && has(f, VIRTIO_NET_F_SPLIT_HEADER)
            && command == VIRTIO_NET_CTRL_SPLIT_HEADER_SET =>
        {
            split_header(state, limits, data)
        }
        _ => None,
    }
}

fn rx_mode(state: &mut ControlState, f: u64, command: u8, data: &[u8]) -> Option<()> {
    let on = match data {
        [0] => false,
        [1] => true,
        _ => return None,
    };
    let extra = has(f, VIRTIO_NET_F_CTRL_RX_EXTRA);
    match u32::from(command) {
        VIRTIO_NET_CTRL_RX_PROMISC => state.promisc = on,
        VIRTIO_NET_CTRL_RX_ALLMULTI => state.allmulti = on,
        VIRTIO_NET_CTRL_RX_ALLUNI if extra => state.alluni = on,
        VIRTIO_NET_CTRL_RX_NOMULTI if extra => state.nomulti = on,
        VIRTIO_NET_CTRL_RX_NOUNI if extra => state.nouni = on,
        VIRTIO_NET_CTRL_RX_NOBCAST if extra => state.nobcast = on,
        _ => return None,
    }
    Some(())
}

/// Parses one `le32 entries; u8 macs[entries][6]` table, returning it and
/// the rest of the buffer.
fn mac_table(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let entries = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let len = entries.checked_mul(6)?;
    let body = data.get(4..4usize.checked_add(len)?)?;
    let macs = body
        .chunks_exact(6)
        .filter_map(|c| c.try_into().ok())
        .collect();
    Some((macs, &data[4 + len..]))
}

fn mac_command(state: &mut ControlState, f: u64, command: u8, data: &[u8]) -> Option<()> {
    match u32::from(command) {
        VIRTIO_NET_CTRL_MAC_ADDR_SET if has(f, VIRTIO_NET_F_CTRL_MAC_ADDR) => {
            let mac: [u8; 6] = data.try_into().ok()?;
            if mac[0] & 1 == 1 {
                return None;
            }
            state.mac = MacAddr(mac);
            Some(())
        }
        VIRTIO_NET_CTRL_MAC_TABLE_SET if has(f, VIRTIO_NET_F_CTRL_RX) => {
            let (uni, rest) = mac_table(data)?;
            let (multi, rest) = mac_table(rest)?;
            if !rest.is_empty() {
                return None;
            }
            // An oversized table is legal: fall back to accepting the whole
            // class rather than silently filtering addresses out.
            state.alluni = uni.len() > MAC_TABLE_MAX;
            state.allmulti = state.allmulti || multi.len() > MAC_TABLE_MAX;
            state.uni_macs = if state.alluni { Vec::new() } else { uni };
            state.multi_macs = if multi.len() > MAC_TABLE_MAX {
                Vec::new()
            } else {
                multi
            };
            Some(())
        }
        _ => None,
    }
}

fn mq_command(
    state: &mut ControlState,
    limits: &CtrlLimits,
    command: u8,
    data: &[u8],
) -> Option<()> {
    let f = limits.features;
    let rss_limits = rss_limits(limits);
    match u32::from(command) {
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET if has(f, VIRTIO_NET_F_MQ) => {
            let pairs = u16::from_le_bytes(data.try_into().ok()?);
            if pairs == 0 || pairs > limits.max_pairs || pairs > MAX_QUEUE_PAIRS {
                return None;
            }
            // "The driver MUST NOT send the command
            // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET when the device has
            // successfully configured at least one RSS context."
            if !state.rss_contexts.is_empty() {
                return None;
            }
            state.active_pairs = pairs;
            // Automatic steering replaces RSS (virtio spec: the last of
            // VQ_PAIRS_SET and RSS_CONFIG wins).
            state.rss = None;
            Some(())
        }
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG if has(f, VIRTIO_NET_F_RSS) => {
            let cfg = rss::parse_rss_config(data, &rss_limits).ok()?;
            state.active_pairs = cfg.max_tx_vq();
            state.rss = Some(cfg);
            Some(())
        }
        VIRTIO_NET_CTRL_MQ_HASH_CONFIG if has(f, VIRTIO_NET_F_HASH_REPORT) => {
            let cfg = rss::parse_hash_config(data, &rss_limits).ok()?;
            state.hash_only = Some(cfg);
            Some(())
        }
        _ => None,
    }
}

fn split_header(state: &mut ControlState, limits: &CtrlLimits, data: &[u8]) -> Option<()> {
    let [enable, 0, 0, 0, t0, t1, t2, t3] = *data else {
        return None;
    };
    let threshold = u32::from_le_bytes([t0, t1, t2, t3]);
    state.split = match enable {
        0 => None,
        1 => Some(SplitParams {
            hdr_buf_len: usize::from(limits.split_header_buf_len),
            threshold,
        }),
        _ => return None,
    };
    Some(())
}
