//! fake-gpu: a fake PCI GPU for testing device-memory paths in a VM.
//!
//! QEMU's stock `ivshmem-doorbell` device is the PCI function; this crate is
//! its ivshmem server and, at the same time, the device behind it. BAR2 is
//! a sealed memfd holding a register page, a command ring, a completion
//! ring, a staging window and VRAM (docs/fake-gpu.md). The guest rings a
//! doorbell (an ivshmem interrupt to this process), the copy engine runs
//! the commands and raises the guest's MSI-X vector through its eventfd.
//!
//! Layout: `layout` is the programming interface (registers, entries,
//! codes); `allocs` the table of the driver's VRAM allocations; `shm` the
//! shared memory; `protocol` and `server` the ivshmem protocol; `engine`
//! executes commands and `device` ties memory, engine and interrupts
//! together; `control` and `inspect` are the host-side
//! inspection socket and its client; `daemon` runs the threads; `client`
//! is a fake QEMU plus a minimal driver (tests, benchmark); `bench` and
//! `cli` are the remaining commands.

pub mod allocs;
pub mod bench;
pub mod cli;
pub mod client;
pub mod codec;
pub mod control;
pub mod crc32c;
pub mod daemon;
pub mod device;
pub mod engine;
pub mod inspect;
pub mod layout;
pub mod protocol;
pub mod server;
pub mod shm;
pub mod stats;
pub mod sys;
