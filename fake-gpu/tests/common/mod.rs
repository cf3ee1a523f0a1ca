//! Shared by the integration tests: a device in this process on a socket
//! in a fresh temporary directory, and a guest driver connected to it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fake_gpu::client::Driver;
use fake_gpu::daemon::{Daemon, ServeOptions};
use fake_gpu::device::DeviceConfig;
use vmm_sys_util::tempdir::TempDir;

pub const T: Duration = Duration::from_secs(10);
pub const VRAM: u64 = 8 << 20;
pub const STAGING: u64 = 1 << 20;

pub struct Lab {
    pub daemon: Daemon,
    pub dir: TempDir,
}

impl Lab {
    pub fn socket(&self) -> PathBuf {
        self.daemon.socket().to_path_buf()
    }

    pub fn driver(&self) -> Driver {
        self.driver_with(2)
    }

    pub fn driver_with(&self, vectors: usize) -> Driver {
        // No waiting after the handshake: the device attaches (and resets)
        // a guest before sending its last setup message.
        Driver::connect(&self.socket(), vectors).expect("connect a guest")
    }
}

pub fn config() -> DeviceConfig {
    let mut c = DeviceConfig::new(VRAM);
    c.staging = STAGING;
    // Long enough that every test below is driven by doorbells, not polls.
    c.poll_interval = Duration::from_secs(30);
    c
}

pub fn start_with(device: DeviceConfig) -> Lab {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = TempDir::new_with_prefix("/tmp/fake-gpu-test-").expect("temp dir");
    let socket = dir.as_path().join("gpu.sock");
    let daemon = Daemon::start(ServeOptions {
        socket,
        control: None,
        device,
    })
    .expect("start the device");
    Lab { daemon, dir }
}

pub fn start() -> Lab {
    start_with(config())
}

/// Polls `cond` until true or panics after `T` (for state that changes
/// with no event to wait on, e.g. the server noticing a disconnect).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}
