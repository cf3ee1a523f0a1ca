#![no_main]
//! Sequences of admin queue requests (command list, capabilities, flow
//! filter objects), optionally after the driver enabled the flow filter:
//! results fit their buffers, statuses are known, rules stay in range.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_nic_fuzz::admin_command(data);
});
