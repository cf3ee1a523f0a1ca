//! Copy-engine bandwidth against plain memcpy, in one run: a device and a
//! driver in this process, talking over a real ivshmem socket, eventfd
//! doorbells and completion interrupts, as a guest would.
//!
//! Each engine figure is wall time from publishing a command to taking its
//! completion (doorbell, wake-up, validation, the copy, the completion
//! entry, the interrupt), one command of `size` bytes at a time. memcpy is
//! `copy_from_slice` between two heap buffers of the same size. Both sides
//! are faulted in before timing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{ClientError, Driver};
use crate::daemon::{Daemon, DaemonError, ServeOptions};
use crate::device::DeviceConfig;
use crate::layout::{Command, Status};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bytes per command (and per memcpy).
    pub size: u64,
    /// Commands (and memcpys) timed per figure.
    pub iterations: u32,
    pub hugetlb: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            size: 64 << 20,
            iterations: 32,
            hugetlb: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("size must be a non-zero multiple of 4096 bytes, not {0}")]
    Size(u64),
    #[error("the engine failed a benchmark command: {0:?}")]
    Command(Option<Status>),
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub size: u64,
    pub iterations: u32,
    pub memcpy_gib_s: f64,
    pub copy_gib_s: f64,
    pub staging_to_vram_gib_s: f64,
    pub vram_to_staging_gib_s: f64,
    pub fill_gib_s: f64,
    pub checksum_gib_s: f64,
    /// copy_gib_s / memcpy_gib_s.
    pub copy_ratio: f64,
    /// Round trips per second of single NOP commands.
    pub nop_per_s: f64,
}

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / f64::from(1u32 << 30)
}

fn time_engine(drv: &mut Driver, cmd: Command, iterations: u32) -> Result<Duration, BenchError> {
    let timeout = Duration::from_secs(60);
    // One untimed run faults in whatever the command touches.
    let warm = drv.run(&[cmd], timeout)?;
    if warm[0].status != 0 {
        return Err(BenchError::Command(warm[0].status()));
    }
    let start = Instant::now();
    for _ in 0..iterations {
        let c = drv.run(&[cmd], timeout)?;
        if c[0].status != 0 {
            return Err(BenchError::Command(c[0].status()));
        }
    }
    Ok(start.elapsed())
}

fn time_memcpy(size: usize, iterations: u32) -> Duration {
    let src = vec![0x5au8; size];
    let mut dst = vec![0u8; size];
    dst.copy_from_slice(&src);
    let start = Instant::now();
    for _ in 0..iterations {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    start.elapsed()
}

pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let size = opts.size;
    if size == 0 || size % 4096 != 0 {
        return Err(BenchError::Size(size));
    }
    let it = opts.iterations.max(1);
    let socket = std::env::temp_dir().join(format!("fake-gpu-bench-{}.sock", std::process::id()));
    let mut device = DeviceConfig::new(2 * size);
    device.staging = size;
    device.hugetlb = opts.hugetlb;
    let daemon = Daemon::start(ServeOptions {
        socket: socket.clone(),
        control: Some(PathBuf::from(format!("{}.ctl", socket.display()))),
        device,
    })?;
    let mut drv = Driver::connect(daemon.socket(), 2)?;
    let bytes = size * u64::from(it);
    let fill = time_engine(&mut drv, Command::fill(1, 0, 2 * size, 0xa5), it)?;
    let copy = time_engine(&mut drv, Command::copy(2, 0, size, size), it)?;
    let v2s = time_engine(&mut drv, Command::vram_to_staging(3, 0, 0, size), it)?;
    let s2v = time_engine(&mut drv, Command::staging_to_vram(4, 0, size, size), it)?;
    let sum = time_engine(&mut drv, Command::checksum(5, 0, size), it)?;
    let nops = 2000u32;
    let nop = time_engine(&mut drv, Command::nop(6), nops)?;
    drop(drv);
    daemon.stop();
    let memcpy = time_memcpy(size as usize, it);
    let memcpy_gib_s = gib_s(bytes, memcpy);
    let copy_gib_s = gib_s(bytes, copy);
    Ok(BenchReport {
        size,
        iterations: it,
        memcpy_gib_s,
        copy_gib_s,
        staging_to_vram_gib_s: gib_s(bytes, s2v),
        vram_to_staging_gib_s: gib_s(bytes, v2s),
        fill_gib_s: gib_s(2 * bytes, fill),
        checksum_gib_s: gib_s(bytes, sum),
        copy_ratio: copy_gib_s / memcpy_gib_s.max(1e-9),
        nop_per_s: f64::from(nops) / nop.as_secs_f64().max(1e-9),
    })
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        format!(
            "fake-gpu copy engine, {} MiB per command, {} commands per figure\n\
             \x20 memcpy (host, heap to heap)   {:8.2} GiB/s\n\
             \x20 COPY   VRAM -> VRAM           {:8.2} GiB/s  ({:.2} x memcpy)\n\
             \x20 STAGING -> VRAM               {:8.2} GiB/s\n\
             \x20 VRAM -> STAGING               {:8.2} GiB/s\n\
             \x20 FILL                          {:8.2} GiB/s\n\
             \x20 CHECKSUM (CRC32C)             {:8.2} GiB/s\n\
             \x20 NOP round trips               {:8.0} /s\n",
            self.size >> 20,
            self.iterations,
            self.memcpy_gib_s,
            self.copy_gib_s,
            self.copy_ratio,
            self.staging_to_vram_gib_s,
            self.vram_to_staging_gib_s,
            self.fill_gib_s,
            self.checksum_gib_s,
            self.nop_per_s,
        )
    }
}
