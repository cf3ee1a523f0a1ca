//! RSS contexts (VIRTNET_RSS_CTX_CTRL under VIRTIO_NET_F_RSS_CONTEXT_ALIAS)
//! through the control queue, laid out as the Linux driver sends them.

mod support;

use support::fuzz;
use support::*;
use vhost_nic::config::{RSS_MAX_CONTEXTS, SUPPORTED_HASH_TYPES};
use vhost_nic::spec::*;

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;
const MQ: u8 = VIRTIO_NET_CTRL_MQ as u8;
const RSS_CONFIG: u8 = VIRTIO_NET_CTRL_MQ_RSS_CONFIG as u8;
const PAIRS_SET: u8 = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
const CTX: u8 = VIRTNET_RSS_CTX_CTRL;
const CAP_GET: u8 = VIRTNET_RSS_CTX_CTRL_CAP_GET;
const ADD: u8 = VIRTNET_RSS_CTX_CTRL_ADD;
const MOD: u8 = VIRTNET_RSS_CTX_CTRL_MOD;
const DEL: u8 = VIRTNET_RSS_CTX_CTRL_DEL;

const RSS_FEATURES: u64 = BASE | features(&[VIRTIO_NET_F_MQ, VIRTIO_NET_F_RSS]);
const CTX_FEATURES: u64 = RSS_FEATURES | features(&[VIRTIO_NET_F_RSS_CONTEXT_ALIAS]);

fn key() -> Vec<u8> {
    (0..40u8).map(|i| i.wrapping_mul(29) ^ 0xa5).collect()
}

/// `struct virtnet_rss_ctx_add_modify` as Linux builds it.
fn add_modify(id: u16, table: &[u16], max_tx_vq: u16) -> Vec<u8> {
    let mut v = id.to_le_bytes().to_vec();
    v.extend_from_slice(&[0; 6]);
    v.extend(rss_config(
        SUPPORTED_HASH_TYPES,
        table,
        0,
        max_tx_vq,
        &key(),
    ));
    v
}

/// A device with all four queue pairs in use through RSS.
fn nic(features: u64) -> Nic {
    let mut nic = Nic::new("ctx", MAC_A, features, false);
    let cmd = rss_config(
        SUPPORTED_HASH_TYPES,
        &round_robin_table(128, PAIRS),
        0,
        PAIRS,
        &key(),
    );
    assert_eq!(nic.ctrl(MQ, RSS_CONFIG, &cmd), OK);
    nic
}

/// VIRTNET_RSS_CTX_CTRL_CAP_GET with Linux's layout: header, then the ack
/// and the device-writable `virtnet_rss_ctx_cap` in separate descriptors.
/// Returns (max_rss_contexts as written, ack, used length).
fn cap_get(nic: &mut Nic) -> (u16, u8, u32) {
    let hdr = nic.place(&[CTX, CAP_GET]);
    let ack = nic.alloc(1);
    nic.write(ack, &[0xee]);
    let cap = nic.alloc(2);
    nic.write(cap, &[0xee, 0xee]);
    let used = nic.ctrl_chain(&[(hdr, 2, 0), (ack, 1, W), (cap, 2, W)]);
    let c = nic.read(cap, 2);
    (u16::from_le_bytes([c[0], c[1]]), nic.read(ack, 1)[0], used)
}

#[test]
fn capability_through_the_queue() {
    let mut nic = nic(CTX_FEATURES);
    assert_eq!(cap_get(&mut nic), (RSS_MAX_CONTEXTS, OK, 3));
    // Without room for the capability the command fails.
    assert_eq!(nic.ctrl(CTX, CAP_GET, &[]), ERR);
    assert_eq!(nic.dev.stats.rss_ctx_commands.get(), 2);
    assert_eq!(nic.dev.stats.rss_ctx_errors.get(), 1);
}

#[test]
fn add_modify_delete_through_the_queue() {
    let mut nic = nic(CTX_FEATURES);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(1, &[1; 128], PAIRS)), OK);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(1, &[2; 128], PAIRS)), ERR);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(15, &[2, 3], PAIRS)), OK);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(16, &[2, 3], PAIRS)), ERR);
    {
        let c = nic.dev.control();
        assert_eq!(c.rss_contexts.len(), 2);
        assert_eq!(
            c.rss_contexts.get(1).unwrap().indirection_table(),
            &[1; 128]
        );
        // The default configuration is untouched.
        assert_eq!(
            c.rss.as_ref().unwrap().indirection_table(),
            &round_robin_table(128, PAIRS)[..]
        );
        assert_eq!(c.active_pairs, PAIRS);
    }
    assert_eq!(nic.ctrl(CTX, MOD, &add_modify(1, &[0, 1], PAIRS)), OK);
    assert_eq!(nic.ctrl(CTX, MOD, &add_modify(2, &[0, 1], PAIRS)), ERR);
    assert_eq!(
        nic.dev
            .control()
            .rss_contexts
            .get(1)
            .unwrap()
            .indirection_table(),
        &[0, 1]
    );
    assert_eq!(nic.ctrl(CTX, DEL, &1u16.to_le_bytes()), OK);
    assert_eq!(nic.ctrl(CTX, DEL, &1u16.to_le_bytes()), ERR);
    assert_eq!(nic.ctrl(CTX, DEL, &15u16.to_le_bytes()), OK);
    assert!(nic.dev.control().rss_contexts.is_empty());
    assert_eq!(nic.dev.stats.rss_ctx_commands.get(), 9);
    assert_eq!(nic.dev.stats.rss_ctx_errors.get(), 4);
}

#[test]
fn table_entries_must_be_queues_in_use() {
    let mut nic = nic(CTX_FEATURES);
    // The driver goes down to two queue pairs.
    let cmd = rss_config(
        SUPPORTED_HASH_TYPES,
        &round_robin_table(128, 2),
        0,
        2,
        &key(),
    );
    assert_eq!(nic.ctrl(MQ, RSS_CONFIG, &cmd), OK);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(1, &[0, 2], 2)), ERR);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(1, &[0, 1], 2)), OK);
    assert_eq!(nic.ctrl(CTX, MOD, &add_modify(1, &[3], 2)), ERR);
}

#[test]
fn commands_need_the_features() {
    // RSS without the alias, the alias without RSS.
    for f in [
        RSS_FEATURES,
        BASE | features(&[VIRTIO_NET_F_MQ, VIRTIO_NET_F_RSS_CONTEXT_ALIAS]),
    ] {
        let mut nic = Nic::new("ctx", MAC_A, f, false);
        assert_eq!(cap_get(&mut nic).1, ERR);
        assert_eq!(nic.ctrl(CTX, ADD, &add_modify(1, &[0], 1)), ERR);
    }
    // A device started with rss-contexts=off does not offer the alias.
    let mut opts = options("off", MAC_A);
    opts.rss_contexts = false;
    assert_eq!(
        opts.offered_features() & bit(VIRTIO_NET_F_RSS_CONTEXT_ALIAS),
        0
    );
    let mut nic = Nic::with_options(opts, CTX_FEATURES, false);
    assert_eq!(
        nic.dev.acked_features() & bit(VIRTIO_NET_F_RSS_CONTEXT_ALIAS),
        0
    );
    assert_eq!(cap_get(&mut nic).1, ERR);
}

#[test]
fn no_vq_pairs_set_while_contexts_exist() {
    let mut nic = nic(CTX_FEATURES);
    assert_eq!(nic.ctrl(MQ, PAIRS_SET, &2u16.to_le_bytes()), OK);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(3, &[0, 1], 2)), OK);
    assert_eq!(nic.ctrl(MQ, PAIRS_SET, &1u16.to_le_bytes()), ERR);
    assert_eq!(nic.dev.control().active_pairs, 2);
    // RSS_CONFIG still carries the queue pair count.
    let cmd = rss_config(SUPPORTED_HASH_TYPES, &[0, 1, 2], 0, 3, &key());
    assert_eq!(nic.ctrl(MQ, RSS_CONFIG, &cmd), ERR, "table of 3");
    let cmd = rss_config(SUPPORTED_HASH_TYPES, &[0, 1, 2, 0], 0, 3, &key());
    assert_eq!(nic.ctrl(MQ, RSS_CONFIG, &cmd), OK);
    assert_eq!(nic.dev.control().active_pairs, 3);
    assert_eq!(nic.ctrl(CTX, DEL, &3u16.to_le_bytes()), OK);
    assert_eq!(nic.ctrl(MQ, PAIRS_SET, &1u16.to_le_bytes()), OK);
}

#[test]
fn reset_clears_contexts() {
    let mut nic = nic(CTX_FEATURES);
    assert_eq!(nic.ctrl(CTX, ADD, &add_modify(7, &[3], PAIRS)), OK);
    nic.dev.reset();
    nic.dev.set_acked_features(CTX_FEATURES);
    assert!(nic.dev.control().rss_contexts.is_empty());
    assert_eq!(nic.ctrl(CTX, DEL, &7u16.to_le_bytes()), ERR);
}

/// xorshift64*, for reproducible pseudo-random commands.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Records for the control fuzz harness: RSS contexts commands, mostly
/// well-formed, with a default RSS configuration and VQ_PAIRS_SET mixed in.
fn gen_ctx_commands(r: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..=r.below(8) {
        let mut cmd = match r.below(10) {
            0 => vec![CTX, CAP_GET],
            1 => {
                let mut c = vec![MQ, RSS_CONFIG];
                let pairs = 1 + r.below(u64::from(PAIRS)) as u16;
                c.extend(rss_config(SUPPORTED_HASH_TYPES, &[0; 4], 0, pairs, &key()));
                c
            }
            2 => {
                let mut c = vec![MQ, PAIRS_SET];
                c.extend_from_slice(&(1 + r.below(5) as u16).to_le_bytes());
                c
            }
            3 | 4 => {
                let mut c = vec![CTX, DEL];
                c.extend_from_slice(&(r.below(18) as u16).to_le_bytes());
                c
            }
            _ => {
                let len = [1usize, 2, 4, 8, 16, 32, 3][r.below(7) as usize];
                let table: Vec<u16> = (0..len).map(|_| r.below(5) as u16).collect();
                let mut c = vec![CTX, [ADD, MOD][r.below(2) as usize]];
                c.extend(add_modify(
                    r.below(18) as u16,
                    &table,
                    1 + r.below(5) as u16,
                ));
                c
            }
        };
        // Sometimes damage it.
        match r.below(8) {
            0 => cmd.truncate(r.below(cmd.len() as u64) as usize),
            1 => {
                let i = r.below(cmd.len() as u64) as usize;
                cmd[i] ^= 1 << r.below(8);
            }
            _ => {}
        }
        out.push(cmd.len().min(255) as u8);
        out.extend_from_slice(&cmd);
    }
    out
}

#[test]
fn fuzz_harness_reaches_rss_contexts() {
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let mut reached = fuzz::Reached::default();
    for _ in 0..3000 {
        reached += fuzz::ctrl_command(&gen_ctx_commands(&mut r));
    }
    assert!(reached.accepted > 3000, "{reached:?}");
}
