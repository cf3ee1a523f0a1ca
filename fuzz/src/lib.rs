//! The fuzz harnesses. They live with the integration tests, which run them
//! on pseudo-random inputs under the stable toolchain
//! (`fuzz_harnesses_survive_pseudo_random_inputs` in vhost-nic/tests/device.rs),
//! and are shared here by path.

#[path = "../../vhost-nic/tests/support/fuzz.rs"]
mod harness;

pub use harness::{admin_command, ctrl_command, descriptor_chain, Reached};
