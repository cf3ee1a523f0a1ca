//! The device: BAR2 memory, its register page, the engine, the doorbell
//! eventfds it is woken on and the guest's vector eventfds it interrupts.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::engine::{Engine, Pass};
use crate::layout::{
    self, reg, Layout, LayoutError, Opcode, CHECKSUM_CRC32C, CMD_ENTRY_SIZE, CMD_RING_ENTRIES,
    CMD_RING_OFFSET, CPL_ENTRY_SIZE, CPL_RING_ENTRIES, CPL_RING_OFFSET, DEVICE_PEER_ID, DMA_ALIGN,
    MAGIC, NO_PEER, REG_PAGE_SIZE, VECTOR_COMPLETION, VECTOR_EVENT, VERSION,
};
use crate::shm::{huge_page_size, SharedMemory, ShmError};
use crate::stats::Stats;

/// Most interrupt vectors a device may have (per peer).
pub const MAX_VECTORS: u16 = 64;

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub vram: u64,
    pub staging: u64,
    pub vectors: u16,
    pub hugetlb: bool,
    /// The engine also scans the ring this often without a doorbell.
    pub poll_interval: Duration,
}

impl DeviceConfig {
    pub fn new(vram: u64) -> DeviceConfig {
        DeviceConfig {
            vram,
            staging: 4 << 20,
            vectors: 2,
            hugetlb: false,
            poll_interval: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error("--vectors must be between 1 and {MAX_VECTORS}, not {0}")]
    Vectors(u16),
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

/// The connected guest (one QEMU ivshmem-doorbell device).
#[derive(Debug)]
pub struct GuestLink {
    pub id: u16,
    /// Writing 1 to `vectors[n]` raises the guest's MSI-X vector n.
    pub vectors: Vec<EventFd>,
}

/// A snapshot of the ring registers and the engine's own indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingState {
    pub control: u32,
    pub status: u32,
    pub cmd_prod: u32,
    pub cmd_cons: u32,
    pub cpl_prod: u32,
    pub cpl_cons: u32,
    pub reset_count: u32,
}

#[derive(Debug)]
pub struct Device {
    pub config: DeviceConfig,
    pub layout: Layout,
    pub shm: SharedMemory,
    pub stats: Stats,
    /// The device's own vector eventfds: any write wakes the engine.
    doorbells: Vec<EventFd>,
    guest: Mutex<Option<GuestLink>>,
    engine: Mutex<Engine>,
}

pub fn new_eventfd() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(DeviceError::EventFd)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises an interrupt by writing 1 to an eventfd (an `EAGAIN` means the
/// counter is already huge, i.e. the interrupt is pending anyway).
fn signal(fd: &EventFd) -> io::Result<()> {
    match fd.write(1) {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(()),
    }
}

impl Device {
    pub fn new(config: DeviceConfig) -> Result<Device, DeviceError> {
        if config.vectors == 0 || config.vectors > MAX_VECTORS {
            return Err(DeviceError::Vectors(config.vectors));
        }
        let page = if config.hugetlb {
            huge_page_size()
        } else {
            4096
        };
        let layout = Layout::new(config.vram, config.staging, page)?;
        let shm = SharedMemory::create("fake-gpu-bar2", layout.bar_size, config.hugetlb)?;
        let doorbells = (0..config.vectors)
            .map(|_| new_eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        let dev = Device {
            config,
            layout,
            shm,
            stats: Stats::default(),
            doorbells,
            guest: Mutex::new(None),
            engine: Mutex::new(Engine::default()),
        };
        dev.write_identity()?;
        {
            let mut engine = lock(&dev.engine);
            engine.reset(&dev.shm, &dev.stats)?;
        }
        Ok(dev)
    }

    /// Writes the read-only registers (the guest may have scribbled on
    /// them; the device never reads them back).
    fn write_identity(&self) -> Result<(), ShmError> {
        let s = &self.shm;
        let l = &self.layout;
        s.fill(0, REG_PAGE_SIZE, 0)?;
        s.store_u32(reg::MAGIC, MAGIC)?;
        s.store_u32(reg::VERSION, VERSION)?;
        s.store_u64(reg::BAR_SIZE, l.bar_size)?;
        s.store_u64(reg::VRAM_OFFSET, l.vram_offset)?;
        s.store_u64(reg::VRAM_SIZE, l.vram_size)?;
        s.store_u64(reg::STAGING_OFFSET, l.staging_offset)?;
        s.store_u64(reg::STAGING_SIZE, l.staging_size)?;
        s.store_u64(reg::CMD_RING_OFFSET, CMD_RING_OFFSET)?;
        s.store_u32(reg::CMD_RING_ENTRIES, CMD_RING_ENTRIES)?;
        s.store_u32(reg::CMD_ENTRY_SIZE, CMD_ENTRY_SIZE)?;
        s.store_u64(reg::CPL_RING_OFFSET, CPL_RING_OFFSET)?;
        s.store_u32(reg::CPL_RING_ENTRIES, CPL_RING_ENTRIES)?;
        s.store_u32(reg::CPL_ENTRY_SIZE, CPL_ENTRY_SIZE)?;
        s.store_u32(reg::DEVICE_PEER_ID, DEVICE_PEER_ID.into())?;
        s.store_u32(
            reg::GUEST_PEER_ID,
            self.guest_id().map_or(NO_PEER, u32::from),
        )?;
        s.store_u32(reg::NUM_VECTORS, self.config.vectors.into())?;
        s.store_u32(reg::DMA_ALIGN, DMA_ALIGN as u32)?;
        s.store_u32(reg::OPCODES, Opcode::mask())?;
        s.store_u32(reg::CHECKSUM_ALGO, CHECKSUM_CRC32C)?;
        Ok(())
    }

    pub fn doorbells(&self) -> &[EventFd] {
        &self.doorbells
    }

    pub fn shm_file(&self) -> &File {
        self.shm.file()
    }

    pub fn guest_id(&self) -> Option<u16> {
        lock(&self.guest).as_ref().map(|g| g.id)
    }

    /// A guest connected: the device is reset (the guest driver starts
    /// from a clean ring and an empty allocation table, as after a
    /// power-on) and interrupts go to it.
    pub fn attach_guest(&self, link: GuestLink) -> Result<(), ShmError> {
        let id = link.id;
        let mut engine = lock(&self.engine);
        *lock(&self.guest) = Some(link);
        self.write_identity()?;
        engine.clear_allocs();
        engine.reset(&self.shm, &self.stats)?;
        engine.publish_counters(&self.shm, &self.stats)?;
        self.stats.guest_connects.inc();
        log::info!("guest peer {id} attached");
        Ok(())
    }

    /// The guest with this ID went away; returns whether it was attached.
    /// Its allocations stay listed until the next guest attaches.
    pub fn detach_guest(&self, id: u16) -> bool {
        let _engine = lock(&self.engine);
        let mut guest = lock(&self.guest);
        if guest.as_ref().map(|g| g.id) != Some(id) {
            return false;
        }
        *guest = None;
        let _ = self.shm.store_u32(reg::GUEST_PEER_ID, NO_PEER);
        self.stats.guest_disconnects.inc();
        log::info!("guest peer {id} detached");
        true
    }

    /// Raises guest vector `vector` (falls back to vector 0 if the guest
    /// has fewer vectors).
    pub fn interrupt(&self, vector: u16) {
        let guest = lock(&self.guest);
        let Some(g) = guest.as_ref() else {
            self.stats.interrupts_dropped.inc();
            return;
        };
        let fd = g
            .vectors
            .get(usize::from(vector))
            .or_else(|| g.vectors.first());
        match fd.map(signal) {
            Some(Ok(())) => self.stats.interrupts.inc(),
            Some(Err(e)) => {
                self.stats.interrupts_dropped.inc();
                log::warn!("raising guest vector {vector}: {e}");
            }
            None => self.stats.interrupts_dropped.inc(),
        }
    }

    /// Runs the engine over the rings and raises the interrupts the pass
    /// calls for: vector 0 after completions, the event vector after a
    /// reset or ring error.
    pub fn process(&self) -> Pass {
        let pass = {
            let mut engine = lock(&self.engine);
            let pass = match engine.run(&self.shm, &self.layout, &self.stats) {
                Ok(p) => p,
                Err(e) => {
                    log::error!("engine: {e}");
                    Pass::default()
                }
            };
            if let Err(e) = engine.publish_counters(&self.shm, &self.stats) {
                log::error!("engine: {e}");
            }
            pass
        };
        let event_vector = if self.config.vectors > VECTOR_EVENT {
            VECTOR_EVENT
        } else {
            VECTOR_COMPLETION
        };
        if pass.completions > 0 {
            self.interrupt(VECTOR_COMPLETION);
        }
        if pass.event && (event_vector != VECTOR_COMPLETION || pass.completions == 0) {
            self.interrupt(event_vector);
        }
        pass
    }

    /// Drains the doorbell eventfds; returns how many were signalled.
    pub fn drain_doorbells(&self) -> usize {
        self.doorbells
            .iter()
            .filter(|fd| fd.read().is_ok_and(|n| n > 0))
            .count()
    }

    pub fn ring_state(&self) -> RingState {
        let engine = lock(&self.engine);
        let r = |o| self.shm.load_u32(o).unwrap_or(0);
        RingState {
            control: r(reg::CONTROL),
            status: engine.status(),
            cmd_prod: r(reg::CMD_PROD),
            cmd_cons: engine.cmd_cons(),
            cpl_prod: engine.cpl_prod(),
            cpl_cons: r(reg::CPL_CONS),
            reset_count: r(reg::RESET_COUNT),
        }
    }

    /// Layout and identity as JSON (the control socket's `info`).
    pub fn info_json(&self) -> Value {
        let l = &self.layout;
        json!({
            "magic": format!("{MAGIC:#010x}"),
            "version": format!("{}.{}", VERSION >> 16, VERSION & 0xffff),
            "bar_size": l.bar_size,
            "vram_offset": l.vram_offset,
            "vram_size": l.vram_size,
            "staging_offset": l.staging_offset,
            "staging_size": l.staging_size,
            "cmd_ring": {"offset": CMD_RING_OFFSET, "entries": CMD_RING_ENTRIES, "entry_size": CMD_ENTRY_SIZE},
            "cpl_ring": {"offset": CPL_RING_OFFSET, "entries": CPL_RING_ENTRIES, "entry_size": CPL_ENTRY_SIZE},
            "device_peer_id": DEVICE_PEER_ID,
            "guest_peer_id": self.guest_id(),
            "vectors": self.config.vectors,
            "hugetlb": self.shm.hugetlb(),
            "dma_align": DMA_ALIGN,
            "checksum": "crc32c",
        })
    }

    /// Counters and ring state as JSON (the control socket's `stats`).
    pub fn stats_json(&self) -> Value {
        let mut v = self.stats.to_json();
        let r = self.ring_state();
        v["ring"] = json!({
            "control": r.control,
            "status": r.status,
            "ready": r.status & layout::STATUS_READY != 0,
            "ring_error": r.status & layout::STATUS_RING_ERROR != 0,
            "cpl_full": r.status & layout::STATUS_CPL_FULL != 0,
            "cmd_prod": r.cmd_prod,
            "cmd_cons": r.cmd_cons,
            "cpl_prod": r.cpl_prod,
            "cpl_cons": r.cpl_cons,
            "reset_count": r.reset_count,
        });
        v["guest_peer_id"] = json!(self.guest_id());
        v["allocs"] = json!(lock(&self.engine).allocs().counts());
        v
    }

    /// The VRAM allocations the driver described, in VRAM order, and
    /// their counts (the control socket's `allocs`).
    pub fn allocs_json(&self) -> Value {
        let engine = lock(&self.engine);
        let t = engine.allocs();
        let mut v = json!(t.counts());
        v["allocs"] = json!(t.entries());
        v
    }

    /// Logs the counters (SIGUSR1).
    pub fn log_stats(&self) {
        log::info!("stats: {}", self.stats_json());
    }

    pub fn doorbell_raw_fds(&self) -> Vec<i32> {
        self.doorbells.iter().map(|e| e.as_raw_fd()).collect()
    }
}
