//! The copy engine: consumes the command ring, executes each command
//! against VRAM and the staging window, posts completions.
//!
//! Everything in shared memory is written by the guest and is treated as
//! untrusted: each command is copied out of the ring once, then validated
//! (opcode, reserved fields, alignment, overflow, range) before any byte
//! moves. The engine keeps its own copies of the indices it owns
//! (`CMD_CONS`, `CPL_PROD`) and only ever writes those registers; the
//! guest's `CMD_PROD` and `CPL_CONS` are re-read on every pass, so a
//! spurious doorbell is harmless and a missed one is recovered by the next
//! doorbell or poll.

use crate::allocs::AllocTable;
use crate::crc32c::Crc32c;
use crate::layout::{
    reg, Command, Completion, Layout, Opcode, Status, CMD_ENTRY_SIZE, CMD_RING_ENTRIES,
    CMD_RING_OFFSET, CONTROL_CLEAR_ALLOCS, CONTROL_REGION_SIZE, CONTROL_RESET, CPL_RING_ENTRIES,
    DMA_ALIGN, REG_PAGE_SIZE, STATUS_CPL_FULL, STATUS_READY, STATUS_RING_ERROR,
};
use crate::shm::{SharedMemory, ShmError};
use crate::stats::{Stats, SLOTS};

/// Bounce buffer for checksums: the engine never forms Rust references
/// into guest-shared memory, so it copies VRAM out in chunks.
const SCRATCH: usize = 1 << 20;

/// What one pass over the rings produced; the caller raises interrupts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Completion entries posted.
    pub completions: u32,
    /// A device event happened (reset done, ring error).
    pub event: bool,
}

/// The engine's private state: the indices it owns, and the VRAM
/// allocations the driver described.
#[derive(Debug)]
pub struct Engine {
    cmd_cons: u32,
    cpl_prod: u32,
    /// The bad `CMD_PROD` already reported, so it is reported only once.
    bad_prod: Option<u32>,
    stalled: bool,
    status: u32,
    resets: u32,
    scratch: Vec<u8>,
    allocs: AllocTable,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            cmd_cons: 0,
            cpl_prod: 0,
            bad_prod: None,
            stalled: false,
            status: 0,
            resets: 0,
            scratch: vec![0; SCRATCH],
            allocs: AllocTable::default(),
        }
    }
}

/// A validated range: where it starts in BAR2.
fn range(region_offset: u64, region_size: u64, off: u64, len: u64) -> Result<u64, Status> {
    if off % DMA_ALIGN != 0 || len % DMA_ALIGN != 0 {
        return Err(Status::Misaligned);
    }
    let end = off.checked_add(len).ok_or(Status::Overflow)?;
    if end > region_size {
        return Err(Status::OutOfRange);
    }
    Ok(region_offset + off)
}

impl Engine {
    pub fn cmd_cons(&self) -> u32 {
        self.cmd_cons
    }

    pub fn cpl_prod(&self) -> u32 {
        self.cpl_prod
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The VRAM allocations the driver described (ALLOC_NOTE, FREE_NOTE).
    pub fn allocs(&self) -> &AllocTable {
        &self.allocs
    }

    /// Empties the allocation table (a new guest; the driver's request).
    pub fn clear_allocs(&mut self) {
        let n = self.allocs.counts().live;
        if n > 0 {
            log::info!("forgetting {n} VRAM allocations of the previous driver");
        }
        self.allocs.clear();
    }

    fn set_status(&mut self, shm: &SharedMemory, bit: u32, on: bool) -> Result<(), ShmError> {
        let new = if on {
            self.status | bit
        } else {
            self.status & !bit
        };
        if new != self.status {
            self.status = new;
            shm.store_u32(reg::STATUS, new)?;
        }
        Ok(())
    }

    /// Ring reset: indices to zero, rings and the driver registers cleared,
    /// `STATUS` = READY, `RESET_COUNT` incremented, `CONTROL` cleared last.
    /// The allocation table is kept (see `clear_allocs`).
    pub fn reset(&mut self, shm: &SharedMemory, stats: &Stats) -> Result<(), ShmError> {
        self.cmd_cons = 0;
        self.cpl_prod = 0;
        self.bad_prod = None;
        self.stalled = false;
        self.resets = self.resets.wrapping_add(1);
        shm.fill(CMD_RING_OFFSET, CONTROL_REGION_SIZE - CMD_RING_OFFSET, 0)?;
        for r in [
            reg::CMD_PROD,
            reg::CMD_CONS,
            reg::CPL_PROD,
            reg::CPL_CONS,
            reg::RING_ERROR_PROD,
            reg::LAST_ERROR_STATUS,
            reg::LAST_ERROR_INDEX,
        ] {
            shm.store_u32(r, 0)?;
        }
        shm.store_u32(reg::RESET_COUNT, self.resets)?;
        self.status = STATUS_READY;
        shm.store_u32(reg::STATUS, self.status)?;
        shm.store_u32(reg::CONTROL, 0)?;
        stats.resets.inc();
        Ok(())
    }

    /// Writes a completion entry and publishes it (`CPL_PROD`, release).
    fn post(&mut self, shm: &SharedMemory, c: &Completion) -> Result<(), ShmError> {
        shm.write(Layout::cpl_entry_offset(self.cpl_prod), &c.encode())?;
        self.cpl_prod = self.cpl_prod.wrapping_add(1);
        shm.store_u32(reg::CPL_PROD, self.cpl_prod)
    }

    fn cpl_room(&self, shm: &SharedMemory) -> Result<bool, ShmError> {
        let cons = shm.load_u32(reg::CPL_CONS)?;
        // A CPL_CONS ahead of CPL_PROD (garbage) reads as a full ring: the
        // engine waits rather than overwrite entries the driver may not
        // have read.
        Ok(self.cpl_prod.wrapping_sub(cons) < CPL_RING_ENTRIES)
    }

    /// One pass: handles a reset request, then executes commands until the
    /// ring is empty, the producer index is invalid, or the completion ring
    /// is full.
    pub fn run(
        &mut self,
        shm: &SharedMemory,
        layout: &Layout,
        stats: &Stats,
    ) -> Result<Pass, ShmError> {
        let mut pass = Pass::default();
        let control = shm.load_u32(reg::CONTROL)?;
        if control & CONTROL_RESET != 0 {
            if control & CONTROL_CLEAR_ALLOCS != 0 {
                self.clear_allocs();
            }
            self.reset(shm, stats)?;
            pass.event = true;
        }
        loop {
            let prod = shm.load_u32(reg::CMD_PROD)?;
            let pending = prod.wrapping_sub(self.cmd_cons);
            if pending > CMD_RING_ENTRIES {
                if self.bad_prod != Some(prod) {
                    self.bad_prod = Some(prod);
                    stats.ring_errors.inc();
                    stats.errors.inc();
                    stats.by_status[Status::RingIndex as usize].inc();
                    shm.store_u32(reg::RING_ERROR_PROD, prod)?;
                    shm.store_u32(reg::LAST_ERROR_STATUS, Status::RingIndex as u32)?;
                    shm.store_u32(reg::LAST_ERROR_INDEX, prod)?;
                    self.set_status(shm, STATUS_RING_ERROR, true)?;
                    log::warn!(
                        "CMD_PROD {prod} is {pending} entries ahead of CMD_CONS {}: ring index error",
                        self.cmd_cons
                    );
                    if self.cpl_room(shm)? {
                        let c = Completion {
                            tag: 0,
                            status: Status::RingIndex as u32,
                            index: prod,
                            result: u64::from(self.cmd_cons),
                        };
                        self.post(shm, &c)?;
                        pass.completions += 1;
                    }
                    pass.event = true;
                }
                break;
            }
            if self.bad_prod.take().is_some() {
                self.set_status(shm, STATUS_RING_ERROR, false)?;
            }
            if pending == 0 {
                break;
            }
            if !self.cpl_room(shm)? {
                if !self.stalled {
                    self.stalled = true;
                    stats.cpl_stalls.inc();
                    self.set_status(shm, STATUS_CPL_FULL, true)?;
                }
                break;
            }
            if self.stalled {
                self.stalled = false;
                self.set_status(shm, STATUS_CPL_FULL, false)?;
            }
            let index = self.cmd_cons;
            let mut raw = [0u8; CMD_ENTRY_SIZE as usize];
            shm.read(Layout::cmd_entry_offset(index), &mut raw)?;
            let cmd = Command::decode(&raw);
            let (status, result, bytes) = match self.execute(shm, layout, &cmd) {
                Ok((result, bytes)) => (Status::Ok, result, bytes),
                Err(st) => (st, 0, 0),
            };
            stats.command(cmd.opcode, status as u32, bytes);
            if status != Status::Ok {
                log::debug!("command {index} {cmd:?}: {status}");
                shm.store_u32(reg::LAST_ERROR_STATUS, status as u32)?;
                shm.store_u32(reg::LAST_ERROR_INDEX, index)?;
            }
            self.post(
                shm,
                &Completion {
                    tag: cmd.tag,
                    status: status as u32,
                    index,
                    result,
                },
            )?;
            self.cmd_cons = self.cmd_cons.wrapping_add(1);
            shm.store_u32(reg::CMD_CONS, self.cmd_cons)?;
            pass.completions += 1;
        }
        Ok(pass)
    }

    /// Validates and executes one command: (result, bytes processed).
    fn execute(
        &mut self,
        shm: &SharedMemory,
        l: &Layout,
        cmd: &Command,
    ) -> Result<(u64, u64), Status> {
        let op = Opcode::from_u16(cmd.opcode).ok_or(Status::BadOpcode)?;
        if cmd.flags != 0 || cmd.reserved0 != 0 || cmd.reserved1 != [0, 0] {
            return Err(Status::BadField);
        }
        let vram = |off, len| range(l.vram_offset, l.vram_size, off, len);
        let staging = |off, len| range(l.staging_offset, l.staging_size, off, len);
        let internal = |e: ShmError| {
            log::error!("engine: {e}");
            Status::Internal
        };
        match op {
            Opcode::Nop => {
                if cmd.src != 0 || cmd.dst != 0 || cmd.len != 0 || cmd.arg != 0 {
                    return Err(Status::BadField);
                }
                Ok((0, 0))
            }
            Opcode::Fill => {
                if cmd.src != 0 {
                    return Err(Status::BadField);
                }
                let pattern = u8::try_from(cmd.arg).map_err(|_| Status::BadField)?;
                let dst = vram(cmd.dst, cmd.len)?;
                shm.fill(dst, cmd.len, pattern).map_err(internal)?;
                Ok((0, cmd.len))
            }
            Opcode::Copy | Opcode::VramToStaging | Opcode::StagingToVram => {
                if cmd.arg != 0 {
                    return Err(Status::BadField);
                }
                let (src, dst) = match op {
                    Opcode::Copy => (vram(cmd.src, cmd.len)?, vram(cmd.dst, cmd.len)?),
                    Opcode::VramToStaging => (vram(cmd.src, cmd.len)?, staging(cmd.dst, cmd.len)?),
                    _ => (staging(cmd.src, cmd.len)?, vram(cmd.dst, cmd.len)?),
                };
                shm.copy_within(src, dst, cmd.len).map_err(internal)?;
                Ok((0, cmd.len))
            }
            Opcode::Checksum => {
                if cmd.dst != 0 || cmd.arg != 0 {
                    return Err(Status::BadField);
                }
                let src = vram(cmd.src, cmd.len)?;
                let crc = checksum(shm, src, cmd.len, &mut self.scratch).map_err(internal)?;
                Ok((u64::from(crc), cmd.len))
            }
            Opcode::AllocNote | Opcode::FreeNote => {
                // The range must be a real VRAM range; nothing moves.
                if cmd.src != 0 || cmd.len == 0 {
                    return Err(Status::BadField);
                }
                vram(cmd.dst, cmd.len)?;
                if op == Opcode::AllocNote {
                    self.allocs.note_alloc(cmd.dst, cmd.len, cmd.arg)?;
                    log::debug!(
                        "VRAM allocation {:#x}+{:#x} id {}",
                        cmd.dst,
                        cmd.len,
                        cmd.arg
                    );
                } else {
                    self.allocs.note_free(cmd.dst, cmd.len, cmd.arg)?;
                    log::debug!("VRAM free {:#x}+{:#x} id {}", cmd.dst, cmd.len, cmd.arg);
                }
                Ok((0, 0))
            }
        }
    }

    /// Mirrors the counters into the register page.
    pub fn publish_counters(&self, shm: &SharedMemory, stats: &Stats) -> Result<(), ShmError> {
        for (r, c) in [
            (reg::DOORBELLS, &stats.doorbells),
            (reg::COMMANDS, &stats.commands),
            (reg::ERRORS, &stats.errors),
            (reg::BYTES, &stats.bytes),
            (reg::INTERRUPTS, &stats.interrupts),
            (reg::RING_ERRORS, &stats.ring_errors),
            (reg::CPL_STALLS, &stats.cpl_stalls),
            (reg::POLLS, &stats.polls),
        ] {
            shm.store_u64(r, c.get())?;
        }
        for i in 0..SLOTS {
            shm.store_u64(
                reg::ERRORS_BY_STATUS + 8 * i as u64,
                stats.by_status[i].get(),
            )?;
            shm.store_u64(
                reg::COMMANDS_BY_OPCODE + 8 * i as u64,
                stats.by_opcode[i].get(),
            )?;
        }
        debug_assert!(reg::COMMANDS_BY_OPCODE + 8 * SLOTS as u64 <= REG_PAGE_SIZE);
        Ok(())
    }
}

/// CRC32C of `len` bytes at `offset`, copied out through `scratch`.
pub fn checksum(
    shm: &SharedMemory,
    offset: u64,
    len: u64,
    scratch: &mut [u8],
) -> Result<u32, ShmError> {
    let mut crc = Crc32c::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(scratch.len() as u64) as usize;
        shm.read(offset + done, &mut scratch[..n])?;
        crc.update(&scratch[..n]);
        done += n as u64;
    }
    Ok(crc.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_in_documented_order() {
        assert_eq!(range(100, 64, 0, 64), Ok(100));
        assert_eq!(range(100, 64, 8, 56), Ok(108));
        assert_eq!(range(100, 64, 0, 0), Ok(100));
        assert_eq!(range(100, 64, 64, 0), Ok(164));
        assert_eq!(range(100, 64, 72, 0), Err(Status::OutOfRange));
        assert_eq!(range(100, 64, 8, 64), Err(Status::OutOfRange));
        assert_eq!(range(100, 64, 1, 8), Err(Status::Misaligned));
        assert_eq!(range(100, 64, 8, 7), Err(Status::Misaligned));
        assert_eq!(range(100, 64, u64::MAX - 7, 8), Err(Status::Overflow));
        assert_eq!(range(100, 64, 8, u64::MAX - 7), Err(Status::Overflow));
    }
}
