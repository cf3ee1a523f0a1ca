//! vhost-nic: a virtio-net device (multi-queue, RSS, flow filter, header
//! split, ring reset) served to QEMU as a vhost-user backend.
//!
//! Layout: `device` is the NIC model and `backend` its vhost-user glue;
//! `ctrl` and `admin` execute control and admin queue commands; `rss`,
//! `flow_filter` steer received frames (`rss_ctx` keeps the additional RSS
//! contexts, `hash_fields` the hash field selection); `rx` writes them into receive
//! chains (header split included), `chain` validates descriptor chains and
//! `memory` tells RAM from device memory; `offload` does checksums and
//! segmentation in software; `port` holds the wire and TAP ends;
//! `daemon` and `cli` run it all, with `frontend_relay` between QEMU and
//! the vhost-user machinery (it holds back the ring enables stock QEMU
//! sends before the features are set). For driver authors: `control`
//! serves the control socket and `ctl` is its client; `inspect` reads
//! virtqueues for it; `fault` makes the device misbehave on purpose;
//! `trace` is the descriptor flight recorder and `capture` writes pcapng;
//! `vring` keeps each ring's error eventfd, through which the device asks
//! for a reset.

pub mod admin;
pub mod backend;
pub mod capture;
pub mod chain;
pub mod cli;
pub mod config;
pub mod control;
pub mod ctl;
pub mod ctrl;
pub mod daemon;
pub mod device;
pub mod fault;
pub mod flow_filter;
pub mod frontend_relay;
pub mod hash_fields;
pub mod hdr;
pub mod inspect;
pub mod memory;
pub mod offload;
pub mod packet;
pub mod port;
pub mod request;
pub mod rss;
pub mod rss_ctx;
pub mod rx;
pub mod spec;
pub mod stats;
pub mod trace;
pub mod vring;
