//! Hash field selection and symmetric input transforms
//! (docs/virtio-net-extensions.md, "Hash field selection").
//!
//! virtio-net hashes fixed fields per hash type: both IP addresses, plus
//! both ports for the TCP and UDP types. This extension lets the driver pick,
//! per hash type, which of those fields enter the Toeplitz input (what
//! ethtool's `rx-flow-hash` selects on physical NICs), and apply a symmetric
//! transform to them (ethtool's `input-xfrm`) so that both directions of a
//! flow hash alike.
//!
//! There is no feature bit for it (none is free below 64, and vhost-user
//! negotiates 64): the driver discovers it with CAP_GET, which a device that
//! does not know the class refuses.
//!
//! Commands come from the guest and are untrusted: every length, field and
//! bit is checked, and a refused command leaves the selection unchanged.

use thiserror::Error;

use crate::rss::{
    VIRTIO_NET_RSS_HASH_TYPE_IPV4, VIRTIO_NET_RSS_HASH_TYPE_IPV6, VIRTIO_NET_RSS_HASH_TYPE_IP_EX,
};
use crate::spec::*;

/// Field bits (`supported_fields`, `fields[]`).
pub const VIRTIO_NET_HASH_FIELD_SRC_IP: u16 = 1 << 0;
pub const VIRTIO_NET_HASH_FIELD_DST_IP: u16 = 1 << 1;
/// L4 header bytes 0-1: the TCP or UDP source port.
pub const VIRTIO_NET_HASH_FIELD_SRC_PORT: u16 = 1 << 2;
/// L4 header bytes 2-3: the TCP or UDP destination port.
pub const VIRTIO_NET_HASH_FIELD_DST_PORT: u16 = 1 << 3;
pub const VIRTIO_NET_HASH_FIELDS_IP: u16 =
    VIRTIO_NET_HASH_FIELD_SRC_IP | VIRTIO_NET_HASH_FIELD_DST_IP;
pub const VIRTIO_NET_HASH_FIELDS_L4: u16 =
    VIRTIO_NET_HASH_FIELD_SRC_PORT | VIRTIO_NET_HASH_FIELD_DST_PORT;
/// Every field this device can select.
pub const VIRTIO_NET_HASH_FIELDS_ALL: u16 = VIRTIO_NET_HASH_FIELDS_IP | VIRTIO_NET_HASH_FIELDS_L4;

/// Transform bits (`supported_xfrm`, `xfrm`); Linux's RXH_XFRM_* values.
pub const VIRTIO_NET_HASH_XFRM_SYM_XOR: u8 = 1 << 0;
pub const VIRTIO_NET_HASH_XFRM_SYM_OR_XOR: u8 = 1 << 1;
/// Every transform this device can apply.
pub const VIRTIO_NET_HASH_XFRM_ALL: u8 =
    VIRTIO_NET_HASH_XFRM_SYM_XOR | VIRTIO_NET_HASH_XFRM_SYM_OR_XOR;

/// Entries of `fields[]`: one per hash type, IPv4 (bit 0) to UDP_EX (bit 8).
pub const HASH_FIELDS_NTYPES: usize = 9;

/// The address-only hash types: they never hash ports.
const ADDRESS_TYPES: u32 =
    VIRTIO_NET_RSS_HASH_TYPE_IPV4 | VIRTIO_NET_RSS_HASH_TYPE_IPV6 | VIRTIO_NET_RSS_HASH_TYPE_IP_EX;

/// `struct virtio_net_hash_fields_cap`: `le16 supported_fields; u8
/// supported_xfrm; u8 reserved`.
const CAP_LEN: usize = 4;
/// `struct virtio_net_hash_fields_set`: `u8 xfrm; u8 reserved[3]; le16
/// fields[9]`.
const SET_LEN: usize = 4 + 2 * HASH_FIELDS_NTYPES;

/// How source and destination fields are combined before hashing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Xfrm {
    /// The fields as they are (the specification's behaviour).
    #[default]
    None,
    /// Both slots of a pair carry `src ^ dst`.
    SymXor,
    /// The source slot carries `src | dst`, the destination slot `src ^ dst`.
    SymOrXor,
}

impl Xfrm {
    /// The combined bytes for the source and destination slot of a pair.
    pub fn apply(self, src: u8, dst: u8) -> (u8, u8) {
        match self {
            Xfrm::None => (src, dst),
            Xfrm::SymXor => (src ^ dst, src ^ dst),
            Xfrm::SymOrXor => (src | dst, src ^ dst),
        }
    }

    fn bits(self) -> u8 {
        match self {
            Xfrm::None => 0,
            Xfrm::SymXor => VIRTIO_NET_HASH_XFRM_SYM_XOR,
            Xfrm::SymOrXor => VIRTIO_NET_HASH_XFRM_SYM_OR_XOR,
        }
    }
}

/// The fields each hash type hashes, and the transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashFields {
    fields: [u16; HASH_FIELDS_NTYPES],
    xfrm: Xfrm,
}

/// The fields of the specification: what every hash type hashes after
/// device reset and without the extension.
pub const SPEC_FIELDS: HashFields = {
    let mut fields = [VIRTIO_NET_HASH_FIELDS_ALL; HASH_FIELDS_NTYPES];
    let mut i = 0;
    while i < HASH_FIELDS_NTYPES {
        if ADDRESS_TYPES & (1 << i) != 0 {
            fields[i] = VIRTIO_NET_HASH_FIELDS_IP;
        }
        i += 1;
    }
    HashFields {
        fields,
        xfrm: Xfrm::None,
    }
};

impl Default for HashFields {
    fn default() -> Self {
        SPEC_FIELDS
    }
}

impl HashFields {
    /// The fields of the hash type whose `hash_report` value is `report`
    /// (1..=9); none for anything else.
    pub fn for_report(&self, report: u16) -> u16 {
        usize::from(report)
            .checked_sub(1)
            .and_then(|i| self.fields.get(i))
            .copied()
            .unwrap_or(0)
    }

    pub fn xfrm(&self) -> Xfrm {
        self.xfrm
    }
}

/// What the device offers (`struct virtio_net_hash_fields_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashFieldsLimits {
    pub supported_fields: u16,
    pub supported_xfrm: u8,
}

impl HashFieldsLimits {
    /// vhost-nic: the four fields of the specification, both transforms.
    pub const DEVICE: HashFieldsLimits = HashFieldsLimits {
        supported_fields: VIRTIO_NET_HASH_FIELDS_ALL,
        supported_xfrm: VIRTIO_NET_HASH_XFRM_ALL,
    };
}

/// Why a command was refused (the device answers VIRTIO_NET_ERR).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashFieldsError {
    #[error("unknown hash fields command {0}")]
    UnknownCommand(u8),
    #[error("command data is {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("no room for the {0}-byte reply")]
    NoReplyRoom(usize),
    #[error("reserved fields are not zero")]
    ReservedNotZero,
    #[error("input transform {0:#x} not supported")]
    UnsupportedXfrm(u8),
    #[error("hash type {index}: fields {fields:#x} not supported")]
    UnsupportedFields { index: usize, fields: u16 },
    #[error("hash type {index}: fields {fields:#x} are not symmetric, as the transform needs")]
    Asymmetric { index: usize, fields: u16 },
}

/// True if every selected source field comes with its destination field.
fn symmetric(fields: u16) -> bool {
    let pair = |src: u16, dst: u16| (fields & src == 0) == (fields & dst == 0);
    pair(VIRTIO_NET_HASH_FIELD_SRC_IP, VIRTIO_NET_HASH_FIELD_DST_IP)
        && pair(
            VIRTIO_NET_HASH_FIELD_SRC_PORT,
            VIRTIO_NET_HASH_FIELD_DST_PORT,
        )
}

/// Parses and validates `struct virtio_net_hash_fields_set`.
pub fn parse_set(data: &[u8], limits: &HashFieldsLimits) -> Result<HashFields, HashFieldsError> {
    let Some((&[xfrm_bits, r0, r1, r2], rest)) = data.split_first_chunk::<4>() else {
        return Err(HashFieldsError::Length {
            got: data.len(),
            expected: SET_LEN,
        });
    };
    if data.len() != SET_LEN {
        return Err(HashFieldsError::Length {
            got: data.len(),
            expected: SET_LEN,
        });
    }
    if [r0, r1, r2] != [0; 3] {
        return Err(HashFieldsError::ReservedNotZero);
    }
    let xfrm = match xfrm_bits {
        0 => Xfrm::None,
        b if b & !limits.supported_xfrm != 0 => return Err(HashFieldsError::UnsupportedXfrm(b)),
        VIRTIO_NET_HASH_XFRM_SYM_XOR => Xfrm::SymXor,
        VIRTIO_NET_HASH_XFRM_SYM_OR_XOR => Xfrm::SymOrXor,
        // More than one transform at once.
        b => return Err(HashFieldsError::UnsupportedXfrm(b)),
    };
    let mut fields = [0u16; HASH_FIELDS_NTYPES];
    for (index, (slot, raw)) in fields.iter_mut().zip(rest.chunks_exact(2)).enumerate() {
        let value = u16::from_le_bytes([raw[0], raw[1]]);
        let allowed = if ADDRESS_TYPES & (1 << index) != 0 {
            VIRTIO_NET_HASH_FIELDS_IP
        } else {
            VIRTIO_NET_HASH_FIELDS_ALL
        };
        if value & !(allowed & limits.supported_fields) != 0 {
            return Err(HashFieldsError::UnsupportedFields {
                index,
                fields: value,
            });
        }
        if xfrm != Xfrm::None && !symmetric(value) {
            return Err(HashFieldsError::Asymmetric {
                index,
                fields: value,
            });
        }
        *slot = value;
    }
    Ok(HashFields { fields, xfrm })
}

/// Executes one VIRTIO_NET_CTRL_HASH_FIELDS command. `room` is the
/// device-writable space of the command, ack included. Returns the
/// command-specific result that follows the ack (`struct
/// virtio_net_hash_fields_cap` for CAP_GET, nothing for SET); on error the
/// selection is unchanged.
pub fn execute(
    state: &mut HashFields,
    limits: &HashFieldsLimits,
    command: u8,
    data: &[u8],
    room: usize,
) -> Result<Vec<u8>, HashFieldsError> {
    match command {
        VIRTIO_NET_CTRL_HASH_FIELDS_CAP_GET => {
            if !data.is_empty() {
                return Err(HashFieldsError::Length {
                    got: data.len(),
                    expected: 0,
                });
            }
            if room < 1 + CAP_LEN {
                return Err(HashFieldsError::NoReplyRoom(CAP_LEN));
            }
            let mut reply = limits.supported_fields.to_le_bytes().to_vec();
            reply.extend_from_slice(&[limits.supported_xfrm, 0]);
            Ok(reply)
        }
        VIRTIO_NET_CTRL_HASH_FIELDS_SET => {
            *state = parse_set(data, limits)?;
            Ok(Vec::new())
        }
        other => Err(HashFieldsError::UnknownCommand(other)),
    }
}

/// `struct virtio_net_hash_fields_set` for `sel` (tests and fuzzing).
pub fn encode_set(sel: &HashFields) -> Vec<u8> {
    let mut b = vec![sel.xfrm.bits(), 0, 0, 0];
    for f in sel.fields {
        b.extend_from_slice(&f.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: HashFieldsLimits = HashFieldsLimits::DEVICE;

    fn set(xfrm: u8, fields: [u16; HASH_FIELDS_NTYPES]) -> Vec<u8> {
        let mut b = vec![xfrm, 0, 0, 0];
        for f in fields {
            b.extend_from_slice(&f.to_le_bytes());
        }
        b
    }

    fn spec() -> [u16; HASH_FIELDS_NTYPES] {
        SPEC_FIELDS.fields
    }

    #[test]
    fn spec_fields_after_reset() {
        let d = HashFields::default();
        assert_eq!(d.for_report(1), VIRTIO_NET_HASH_FIELDS_IP);
        assert_eq!(d.for_report(2), VIRTIO_NET_HASH_FIELDS_ALL);
        assert_eq!(d.for_report(4), VIRTIO_NET_HASH_FIELDS_IP);
        assert_eq!(d.for_report(6), VIRTIO_NET_HASH_FIELDS_ALL);
        assert_eq!(d.for_report(7), VIRTIO_NET_HASH_FIELDS_IP);
        assert_eq!(d.for_report(9), VIRTIO_NET_HASH_FIELDS_ALL);
        assert_eq!(d.for_report(0), 0);
        assert_eq!(d.for_report(10), 0);
        assert_eq!(d.xfrm(), Xfrm::None);
        assert_eq!(parse_set(&set(0, spec()), &L), Ok(d));
        assert_eq!(encode_set(&d), set(0, spec()));
    }

    #[test]
    fn capability() {
        let mut s = HashFields::default();
        assert_eq!(
            execute(&mut s, &L, VIRTIO_NET_CTRL_HASH_FIELDS_CAP_GET, &[], 5),
            Ok(vec![0x0f, 0, 3, 0])
        );
        for room in 0..5 {
            assert_eq!(
                execute(&mut s, &L, VIRTIO_NET_CTRL_HASH_FIELDS_CAP_GET, &[], room),
                Err(HashFieldsError::NoReplyRoom(4))
            );
        }
        assert!(matches!(
            execute(&mut s, &L, VIRTIO_NET_CTRL_HASH_FIELDS_CAP_GET, &[0], 5),
            Err(HashFieldsError::Length { .. })
        ));
        assert_eq!(
            execute(&mut s, &L, 2, &[], 5),
            Err(HashFieldsError::UnknownCommand(2))
        );
    }

    #[test]
    fn set_selects_fields_and_transform() {
        let mut s = HashFields::default();
        let mut f = spec();
        f[1] = VIRTIO_NET_HASH_FIELD_SRC_IP; // TCPv4: source address only
        f[5] = VIRTIO_NET_HASH_FIELDS_L4; // UDPv6: ports only
        f[0] = 0; // IPv4: nothing, the hash is 0
        let r = execute(&mut s, &L, VIRTIO_NET_CTRL_HASH_FIELDS_SET, &set(0, f), 1);
        assert_eq!(r, Ok(vec![]));
        assert_eq!(s.for_report(2), VIRTIO_NET_HASH_FIELD_SRC_IP);
        assert_eq!(s.for_report(6), VIRTIO_NET_HASH_FIELDS_L4);
        assert_eq!(s.for_report(1), 0);
        for (bits, x) in [
            (VIRTIO_NET_HASH_XFRM_SYM_XOR, Xfrm::SymXor),
            (VIRTIO_NET_HASH_XFRM_SYM_OR_XOR, Xfrm::SymOrXor),
        ] {
            let r = execute(
                &mut s,
                &L,
                VIRTIO_NET_CTRL_HASH_FIELDS_SET,
                &set(bits, spec()),
                1,
            );
            assert_eq!(r, Ok(vec![]));
            assert_eq!(s.xfrm(), x);
            assert_eq!(encode_set(&s), set(bits, spec()));
        }
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = HashFields::default();
        let mut f = spec();
        f[1] = VIRTIO_NET_HASH_FIELDS_IP;
        let good = set(VIRTIO_NET_HASH_XFRM_SYM_XOR, f);
        assert_eq!(
            execute(&mut s, &L, VIRTIO_NET_CTRL_HASH_FIELDS_SET, &good, 1),
            Ok(vec![])
        );
        let before = s;
        let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
        for n in 0..good.len() {
            bad.push(("truncated", good[..n].to_vec()));
        }
        let mut long = good.clone();
        long.push(0);
        bad.push(("trailing byte", long));
        for i in 1..4 {
            let mut r = good.clone();
            r[i] = 1;
            bad.push(("reserved", r));
        }
        bad.push(("both transforms", set(3, spec())));
        bad.push(("unknown transform", set(4, spec())));
        let mut a = spec();
        a[0] = VIRTIO_NET_HASH_FIELD_SRC_PORT;
        bad.push(("ports for IPv4", set(0, a)));
        let mut a = spec();
        a[6] = VIRTIO_NET_HASH_FIELDS_ALL;
        bad.push(("ports for IP_EX", set(0, a)));
        let mut a = spec();
        a[2] = 1 << 4;
        bad.push(("unknown field", set(0, a)));
        let mut a = spec();
        a[8] = 0x8000 | VIRTIO_NET_HASH_FIELDS_IP;
        bad.push(("unknown high field", set(0, a)));
        let mut a = spec();
        a[1] = VIRTIO_NET_HASH_FIELD_SRC_IP;
        bad.push(("asymmetric with xor", set(1, a)));
        let mut a = spec();
        a[4] = VIRTIO_NET_HASH_FIELDS_IP | VIRTIO_NET_HASH_FIELD_DST_PORT;
        bad.push(("asymmetric ports with or-xor", set(2, a)));
        for (what, data) in &bad {
            assert!(
                execute(&mut s, &L, VIRTIO_NET_CTRL_HASH_FIELDS_SET, data, 1).is_err(),
                "{what}: accepted"
            );
            assert_eq!(s, before, "{what}: changed the state");
        }
        // A device without transforms refuses them.
        let none = HashFieldsLimits {
            supported_xfrm: 0,
            ..L
        };
        assert_eq!(
            parse_set(&set(1, spec()), &none),
            Err(HashFieldsError::UnsupportedXfrm(1))
        );
        // Asymmetric fields are fine without a transform.
        let mut a = spec();
        a[1] = VIRTIO_NET_HASH_FIELD_DST_IP | VIRTIO_NET_HASH_FIELD_SRC_PORT;
        assert!(parse_set(&set(0, a), &L).is_ok());
    }

    #[test]
    fn control_class_needs_the_device_and_a_hash() {
        use crate::config::MacAddr;
        use crate::ctrl::{handle_command_reply, ControlState, CtrlLimits};

        let ok = VIRTIO_NET_OK as u8;
        let err = VIRTIO_NET_ERR as u8;
        let limits = |features: u64, hash_fields: bool| CtrlLimits {
            max_pairs: 4,
            features,
            split_header_buf_len: SPLIT_HEADER_BUF_LEN,
            hash_fields,
        };
        let cap = [
            VIRTIO_NET_CTRL_HASH_FIELDS,
            VIRTIO_NET_CTRL_HASH_FIELDS_CAP_GET,
        ];
        let mut f = spec();
        f[1] = VIRTIO_NET_HASH_FIELDS_IP;
        let mut cmd = vec![VIRTIO_NET_CTRL_HASH_FIELDS, VIRTIO_NET_CTRL_HASH_FIELDS_SET];
        cmd.extend(set(VIRTIO_NET_HASH_XFRM_SYM_XOR, f));
        let ctrl = bit(VIRTIO_NET_F_CTRL_VQ);
        for features in [
            ctrl | bit(VIRTIO_NET_F_RSS),
            ctrl | bit(VIRTIO_NET_F_HASH_REPORT),
        ] {
            let mut st = ControlState::new(MacAddr([2, 0, 0, 0, 0, 1]), 0);
            let l = limits(features, true);
            assert_eq!(
                handle_command_reply(&mut st, &l, &cap, 5),
                vec![ok, 0x0f, 0, 3, 0]
            );
            assert_eq!(handle_command_reply(&mut st, &l, &cap, 4), vec![err]);
            assert_eq!(handle_command_reply(&mut st, &l, &cmd, 1), vec![ok]);
            assert_eq!(st.hash_fields.xfrm(), Xfrm::SymXor);
            assert_eq!(st.hash_fields.for_report(2), VIRTIO_NET_HASH_FIELDS_IP);
            // A refused command leaves the selection as it was.
            let before = st.hash_fields;
            assert_eq!(handle_command_reply(&mut st, &l, &cmd[..10], 1), vec![err]);
            assert_eq!(st.hash_fields, before);
            // Device reset brings the spec's fields back.
            assert_eq!(
                ControlState::new(MacAddr([2, 0, 0, 0, 0, 1]), 0).hash_fields,
                SPEC_FIELDS
            );
        }
        // Refused by a device without the extension, or without a hash.
        for (features, offered) in [
            (ctrl | bit(VIRTIO_NET_F_RSS), false),
            (ctrl | bit(VIRTIO_NET_F_MQ), true),
        ] {
            let mut st = ControlState::new(MacAddr([2, 0, 0, 0, 0, 1]), 0);
            let l = limits(features, offered);
            assert_eq!(handle_command_reply(&mut st, &l, &cap, 5), vec![err]);
            assert_eq!(handle_command_reply(&mut st, &l, &cmd, 1), vec![err]);
            assert_eq!(st.hash_fields, SPEC_FIELDS);
        }
    }

    #[test]
    fn transforms_are_symmetric() {
        for x in [Xfrm::SymXor, Xfrm::SymOrXor] {
            for (a, b) in [(0u8, 0xffu8), (0x12, 0x34), (0xa5, 0x5a), (7, 7)] {
                assert_eq!(x.apply(a, b), x.apply(b, a));
            }
        }
        assert_eq!(Xfrm::None.apply(1, 2), (1, 2));
        assert_eq!(Xfrm::SymXor.apply(0x0c, 0x0a), (0x06, 0x06));
        assert_eq!(Xfrm::SymOrXor.apply(0x0c, 0x0a), (0x0e, 0x06));
    }
}
