#![no_main]
//! Control queue commands (class, command, data records) against a device
//! with every feature negotiated: acks are OK or ERR, a refused command
//! leaves the state unchanged, steering stays within the queues.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_nic_fuzz::ctrl_command(data);
});
