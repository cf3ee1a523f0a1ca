#![no_main]
//! Arbitrary descriptor tables and available rings in a small guest memory,
//! consumed as TX, control, admin and RX queues of a device looped back to
//! itself: every stage returns, nothing panics.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_nic_fuzz::descriptor_chain(data);
});
