//! vhost-nic: a virtio-net device (multi-queue, RSS, flow filter, header
//! split, ring reset) served to QEMU as a vhost-user backend.

pub mod hdr;
pub mod packet;
