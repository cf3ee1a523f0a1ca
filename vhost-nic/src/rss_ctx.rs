//! RSS contexts (virtio 1.4, "RSS Context"), negotiated through
//! VIRTIO_NET_F_RSS_CONTEXT_ALIAS (docs/virtio-net-extensions.md).
//!
//! Besides the default RSS configuration (VIRTIO_NET_CTRL_MQ_RSS_CONFIG) the
//! driver may add up to `max_rss_contexts` further configurations, each with
//! its own hash types, key and indirection table, identified by
//! `rss_ctx_id` 1..=`max_rss_contexts`.
//!
//! The virtio 1.4 flow filter has no action that directs a packet to an RSS
//! context, so contexts do not steer packets: the device validates and keeps
//! them (as parsed [`RssConfig`]s, ready for `select_queue`) so that a
//! steering action can use them once one exists.
//!
//! Commands come from the guest and are untrusted: every length and field is
//! checked, a refused command leaves the contexts unchanged, and the memory
//! held is bounded by `max_rss_contexts` configurations.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::rss::{self, RssConfig, RssError, RssLimits};
use crate::spec::*;

/// `struct virtnet_rss_ctx_add_modify`: `le16 rss_ctx_id; u8 reserved[6];`
/// then `struct virtio_net_rss_config`.
const ADD_MODIFY_HDR_LEN: usize = 8;

/// Why a context command was refused (the device answers VIRTIO_NET_ERR).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RssCtxError {
    #[error("unknown RSS context command {0}")]
    UnknownCommand(u8),
    #[error("command data is {got} bytes, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("command data truncated: {0} bytes")]
    Truncated(usize),
    #[error("rss_ctx_id {id} not in 1..={max}")]
    IdOutOfRange { id: u16, max: u16 },
    #[error("RSS context {0} already exists")]
    Exists(u16),
    #[error("RSS context {0} does not exist")]
    Missing(u16),
    #[error("receive queue {queue} not below the {active} queue pairs in use")]
    QueueNotInUse { queue: u16, active: u16 },
    #[error("no room for the {0}-byte reply")]
    NoReplyRoom(usize),
    #[error(transparent)]
    Config(#[from] RssError),
}

/// The RSS contexts the driver added, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RssContexts {
    contexts: BTreeMap<u16, RssConfig>,
}

impl RssContexts {
    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.contexts.len()
    }

    /// The configuration of context `id`.
    pub fn get(&self, id: u16) -> Option<&RssConfig> {
        self.contexts.get(&id)
    }

    /// All contexts, in increasing id order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &RssConfig)> {
        self.contexts.iter().map(|(&id, c)| (id, c))
    }
}

/// What a context command is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssCtxLimits {
    /// `max_rss_contexts`: ids are 1..=max_contexts.
    pub max_contexts: u16,
    /// The device's RSS limits (key size, table length, hash types,
    /// `max_virtqueue_pairs`).
    pub rss: RssLimits,
    /// Queue pairs the driver uses: table entries and `unclassified_queue`
    /// must name one of them.
    pub active_pairs: u16,
}

fn ctx_id(data: &[u8], limits: &RssCtxLimits) -> Result<u16, RssCtxError> {
    let raw = data.get(..2).ok_or(RssCtxError::Truncated(data.len()))?;
    let id = u16::from_le_bytes([raw[0], raw[1]]);
    if id == 0 || id > limits.max_contexts {
        return Err(RssCtxError::IdOutOfRange {
            id,
            max: limits.max_contexts,
        });
    }
    Ok(id)
}

/// Parses `struct virtnet_rss_ctx_add_modify`. `reserved` is ignored, as
/// the spec says; `rss` is validated like VIRTIO_NET_CTRL_MQ_RSS_CONFIG,
/// and its queues must be among those in use. `max_tx_vq` is checked but
/// has no effect: transmit queues belong to the default configuration.
pub fn parse_add_modify(
    data: &[u8],
    limits: &RssCtxLimits,
) -> Result<(u16, RssConfig), RssCtxError> {
    let id = ctx_id(data, limits)?;
    let body = data
        .get(ADD_MODIFY_HDR_LEN..)
        .ok_or(RssCtxError::Truncated(data.len()))?;
    let cfg = rss::parse_rss_config(body, &limits.rss)?;
    let active = limits.active_pairs;
    let not_in_use = std::iter::once(cfg.unclassified_queue())
        .chain(cfg.indirection_table().iter().copied())
        .find(|&q| q >= active);
    if let Some(queue) = not_in_use {
        return Err(RssCtxError::QueueNotInUse { queue, active });
    }
    Ok((id, cfg))
}

/// Executes one VIRTNET_RSS_CTX_CTRL command. `room` is the device-writable
/// space of the command, ack included. Returns the command-specific result
/// that follows the ack (`struct virtnet_rss_ctx_cap` for CAP_GET, nothing
/// otherwise); on error the contexts are unchanged.
pub fn execute(
    contexts: &mut RssContexts,
    limits: &RssCtxLimits,
    command: u8,
    data: &[u8],
    room: usize,
) -> Result<Vec<u8>, RssCtxError> {
    match command {
        VIRTNET_RSS_CTX_CTRL_CAP_GET => {
            if !data.is_empty() {
                return Err(RssCtxError::Length {
                    got: data.len(),
                    expected: 0,
                });
            }
            let reply = limits.max_contexts.to_le_bytes().to_vec();
            // The ack byte, then the result.
            if room < 1 + reply.len() {
                return Err(RssCtxError::NoReplyRoom(reply.len()));
            }
            Ok(reply)
        }
        VIRTNET_RSS_CTX_CTRL_ADD => {
            let (id, cfg) = parse_add_modify(data, limits)?;
            if contexts.contexts.contains_key(&id) {
                return Err(RssCtxError::Exists(id));
            }
            contexts.contexts.insert(id, cfg);
            Ok(Vec::new())
        }
        VIRTNET_RSS_CTX_CTRL_MOD => {
            let (id, cfg) = parse_add_modify(data, limits)?;
            let slot = contexts
                .contexts
                .get_mut(&id)
                .ok_or(RssCtxError::Missing(id))?;
            *slot = cfg;
            Ok(Vec::new())
        }
        VIRTNET_RSS_CTX_CTRL_DEL => {
            if data.len() != 2 {
                return Err(RssCtxError::Length {
                    got: data.len(),
                    expected: 2,
                });
            }
            let id = ctx_id(data, limits)?;
            contexts
                .contexts
                .remove(&id)
                .ok_or(RssCtxError::Missing(id))?;
            Ok(Vec::new())
        }
        other => Err(RssCtxError::UnknownCommand(other)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rss::VIRTIO_NET_RSS_HASH_TYPE_ALL;

    const KEY: [u8; 40] = [0x6d; 40];

    pub(crate) fn limits() -> RssCtxLimits {
        RssCtxLimits {
            max_contexts: 15,
            rss: RssLimits {
                max_key_size: 40,
                max_indirection_len: 128,
                supported_hash_types: VIRTIO_NET_RSS_HASH_TYPE_ALL,
                num_queue_pairs: 8,
            },
            active_pairs: 4,
        }
    }

    /// `struct virtio_net_rss_config` with the given table and key.
    pub(crate) fn rss_config(table: &[u16], key: &[u8], max_tx_vq: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x3fu32.to_le_bytes());
        b.extend_from_slice(&(table.len() as u16).wrapping_sub(1).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        for q in table {
            b.extend_from_slice(&q.to_le_bytes());
        }
        b.extend_from_slice(&max_tx_vq.to_le_bytes());
        b.push(key.len() as u8);
        b.extend_from_slice(key);
        b
    }

    /// `struct virtnet_rss_ctx_add_modify`.
    pub(crate) fn add_modify(id: u16, table: &[u16], key: &[u8]) -> Vec<u8> {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 6]);
        b.extend(rss_config(table, key, 4));
        b
    }

    fn run(c: &mut RssContexts, command: u8, data: &[u8]) -> Result<Vec<u8>, RssCtxError> {
        execute(c, &limits(), command, data, 3)
    }

    #[test]
    fn capability() {
        let mut c = RssContexts::default();
        assert_eq!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_CAP_GET, &[]),
            Ok(vec![15, 0])
        );
        assert!(matches!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_CAP_GET, &[0]),
            Err(RssCtxError::Length { .. })
        ));
        // No room for the two bytes and the ack.
        for room in 0..3 {
            assert_eq!(
                execute(&mut c, &limits(), VIRTNET_RSS_CTX_CTRL_CAP_GET, &[], room),
                Err(RssCtxError::NoReplyRoom(2))
            );
        }
    }

    #[test]
    fn add_modify_delete() {
        let mut c = RssContexts::default();
        let add = add_modify(1, &[0, 1, 2, 3], &KEY);
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add), Ok(vec![]));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(1).unwrap().indirection_table(), &[0, 1, 2, 3]);
        assert_eq!(c.get(1).unwrap().key().key(), &KEY);
        // Adding it again fails and changes nothing.
        let again = add_modify(1, &[3], &KEY);
        assert_eq!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &again),
            Err(RssCtxError::Exists(1))
        );
        assert_eq!(c.get(1).unwrap().indirection_table(), &[0, 1, 2, 3]);
        // The highest id, with a short key.
        let add15 = add_modify(15, &[2, 3], &KEY[..16]);
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add15), Ok(vec![]));
        assert_eq!(c.iter().map(|(id, _)| id).collect::<Vec<_>>(), [1, 15]);
        // Modify replaces the whole configuration of one context.
        let m = add_modify(1, &[3; 8], &KEY[..8]);
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_MOD, &m), Ok(vec![]));
        assert_eq!(c.get(1).unwrap().indirection_table(), &[3; 8]);
        assert_eq!(c.get(1).unwrap().key().key(), &KEY[..8]);
        assert_eq!(c.get(15).unwrap().indirection_table(), &[2, 3]);
        // Modify and delete of a missing id fail.
        let m2 = add_modify(2, &[0], &KEY);
        assert_eq!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_MOD, &m2),
            Err(RssCtxError::Missing(2))
        );
        assert_eq!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_DEL, &2u16.to_le_bytes()),
            Err(RssCtxError::Missing(2))
        );
        assert_eq!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_DEL, &1u16.to_le_bytes()),
            Ok(vec![])
        );
        assert_eq!(
            run(&mut c, VIRTNET_RSS_CTX_CTRL_DEL, &1u16.to_le_bytes()),
            Err(RssCtxError::Missing(1))
        );
        assert_eq!(c.len(), 1);
        // An id freed can be added again.
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add), Ok(vec![]));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn reserved_bytes_are_ignored() {
        let mut c = RssContexts::default();
        let mut add = add_modify(3, &[1], &KEY);
        add[2..8].copy_from_slice(&[0xff; 6]);
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add), Ok(vec![]));
    }

    #[test]
    fn ids_out_of_range() {
        let mut c = RssContexts::default();
        for id in [0u16, 16, 0x8001, u16::MAX] {
            let add = add_modify(id, &[0], &KEY);
            for cmd in [VIRTNET_RSS_CTX_CTRL_ADD, VIRTNET_RSS_CTX_CTRL_MOD] {
                assert!(
                    matches!(
                        run(&mut c, cmd, &add),
                        Err(RssCtxError::IdOutOfRange { .. })
                    ),
                    "id {id} cmd {cmd}"
                );
            }
            assert!(matches!(
                run(&mut c, VIRTNET_RSS_CTX_CTRL_DEL, &id.to_le_bytes()),
                Err(RssCtxError::IdOutOfRange { .. })
            ));
        }
        assert!(c.is_empty());
    }

    #[test]
    fn malformed_configurations() {
        let mut c = RssContexts::default();
        let good = add_modify(2, &[0, 1, 2, 3], &KEY);
        assert!(parse_add_modify(&good, &limits()).is_ok());
        let mut bad: Vec<(&str, Vec<u8>)> = vec![
            // Queue 4 is not in use (4 pairs active of 8).
            ("entry not in use", add_modify(2, &[0, 4], &KEY)),
            ("entry beyond the device", add_modify(2, &[0, 9], &KEY)),
            ("entry with bit 15", add_modify(2, &[0x8000], &KEY)),
            ("table of 3", add_modify(2, &[0, 1, 2], &KEY)),
            ("table of 256", add_modify(2, &[0; 256], &KEY)),
            ("key of 41", add_modify(2, &[0], &[1; 41])),
            ("no key with hash types", add_modify(2, &[0], &[])),
        ];
        let mut t = good.clone();
        t.truncate(good.len() - 1);
        bad.push(("key truncated", t));
        let mut t = good.clone();
        t.extend_from_slice(&[0; 8]);
        bad.push(("trailing bytes", t));
        let mut t = good.clone();
        t[8..12].copy_from_slice(&0x200u32.to_le_bytes());
        bad.push(("unsupported hash type", t));
        let mut t = good.clone();
        t[12..14].copy_from_slice(&0xffffu16.to_le_bytes());
        bad.push(("mask 0xffff", t));
        let mut t = good.clone();
        t[14..16].copy_from_slice(&5u16.to_le_bytes());
        bad.push(("unclassified not in use", t));
        let tx = 8 + 8 + 8;
        let mut t = good.clone();
        t[tx..tx + 2].copy_from_slice(&0u16.to_le_bytes());
        bad.push(("max_tx_vq 0", t));
        let mut t = good.clone();
        t[tx..tx + 2].copy_from_slice(&9u16.to_le_bytes());
        bad.push(("max_tx_vq 9", t));
        for n in 0..good.len() {
            bad.push(("truncated", good[..n].to_vec()));
        }
        for (what, data) in &bad {
            for cmd in [VIRTNET_RSS_CTX_CTRL_ADD, VIRTNET_RSS_CTX_CTRL_MOD] {
                assert!(run(&mut c, cmd, data).is_err(), "{what}: accepted");
            }
        }
        assert!(c.is_empty());
        // A refused modify keeps the context as it was.
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &good), Ok(vec![]));
        let before = c.clone();
        for (what, data) in &bad {
            assert!(
                run(&mut c, VIRTNET_RSS_CTX_CTRL_MOD, data).is_err(),
                "{what}: accepted"
            );
        }
        assert_eq!(c, before);
        // Delete wants exactly the id.
        for d in [&[][..], &[2], &[2, 0, 0]] {
            assert!(matches!(
                run(&mut c, VIRTNET_RSS_CTX_CTRL_DEL, d),
                Err(RssCtxError::Length { .. })
            ));
        }
        assert_eq!(run(&mut c, 4, &[]), Err(RssCtxError::UnknownCommand(4)));
        assert_eq!(c, before);
    }

    #[test]
    fn contexts_steer_within_their_table() {
        let mut c = RssContexts::default();
        let add = add_modify(5, &[2, 3], &KEY);
        assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add), Ok(vec![]));
        let mut f = vec![0u8; 54];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[23] = 6;
        f[46] = 5 << 4;
        for sport in 0..64u16 {
            f[34..36].copy_from_slice(&sport.to_be_bytes());
            let q = c
                .get(5)
                .unwrap()
                .select_queue(&crate::packet::parse(&f))
                .queue;
            assert!(q == 2 || q == 3);
        }
    }

    #[test]
    fn bounded() {
        let mut c = RssContexts::default();
        for id in 1..=15 {
            let add = add_modify(id, &[0; 128], &KEY);
            assert_eq!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add), Ok(vec![]));
        }
        let add = add_modify(16, &[0], &KEY);
        assert!(run(&mut c, VIRTNET_RSS_CTX_CTRL_ADD, &add).is_err());
        assert_eq!(c.len(), 15);
    }
}
