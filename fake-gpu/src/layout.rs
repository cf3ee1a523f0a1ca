//! BAR2 layout: the register page, the two rings, the staging window and
//! VRAM; the command and completion entry formats; opcodes and status
//! codes. docs/fake-gpu.md is the prose version of this file and the two
//! must agree.
//!
//! Everything here is little-endian. Offsets are from the start of BAR2
//! (which is also the start of the shared memory file).

use std::fmt;

/// `MAGIC` register value: the bytes "FGPU" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FGPU");
/// `VERSION` register value: major in bits 31..16, minor in bits 15..0.
pub const VERSION: u32 = 0x0001_0001;

/// The register page.
pub const REG_PAGE_SIZE: u64 = 0x1000;
/// The command ring follows the register page.
pub const CMD_RING_OFFSET: u64 = 0x1000;
pub const CMD_RING_ENTRIES: u32 = 256;
pub const CMD_ENTRY_SIZE: u32 = 64;
/// The completion ring follows the command ring.
pub const CPL_RING_OFFSET: u64 = CMD_RING_OFFSET + CMD_RING_ENTRIES as u64 * CMD_ENTRY_SIZE as u64;
pub const CPL_RING_ENTRIES: u32 = 256;
pub const CPL_ENTRY_SIZE: u32 = 32;
/// Register page, rings and reserved space up to the staging window.
pub const CONTROL_REGION_SIZE: u64 = 0x1_0000;
/// The staging window starts right after the control region.
pub const STAGING_OFFSET: u64 = CONTROL_REGION_SIZE;
/// VRAM starts at the first multiple of this after the staging window.
pub const VRAM_ALIGN: u64 = 2 << 20;
/// Offsets and lengths in commands must be multiples of this.
pub const DMA_ALIGN: u64 = 8;
/// Sizes given for VRAM and staging must be multiples of this.
pub const SIZE_GRANULE: u64 = 4096;
/// Largest BAR2 the device builds (QEMU maps all of it).
pub const MAX_BAR_SIZE: u64 = 1 << 40;
/// The device's own ivshmem peer ID: the target of doorbell writes.
pub const DEVICE_PEER_ID: u16 = 0;
/// `GUEST_PEER_ID` when no guest is connected.
pub const NO_PEER: u32 = 0xffff_ffff;
/// `CHECKSUM_ALGO` value for CRC32C (Castagnoli).
pub const CHECKSUM_CRC32C: u32 = 1;

/// Guest interrupt vector for command completions.
pub const VECTOR_COMPLETION: u16 = 0;
/// Guest interrupt vector for device events (reset done, ring error) when
/// the device has at least two vectors; else they use vector 0.
pub const VECTOR_EVENT: u16 = 1;

// The rings sit between the register page and the staging window, and
// their sizes divide 2^32 so free-running u32 indices wrap cleanly.
const _: () = {
    assert!(CMD_RING_OFFSET >= REG_PAGE_SIZE);
    assert!(reg::END <= REG_PAGE_SIZE);
    assert!(CPL_RING_OFFSET + (CPL_RING_ENTRIES * CPL_ENTRY_SIZE) as u64 <= CONTROL_REGION_SIZE);
    assert!(CMD_RING_ENTRIES.is_power_of_two() && CPL_RING_ENTRIES.is_power_of_two());
};

/// Register offsets in the register page.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const BAR_SIZE: u64 = 0x008;
    pub const VRAM_OFFSET: u64 = 0x010;
    pub const VRAM_SIZE: u64 = 0x018;
    pub const STAGING_OFFSET: u64 = 0x020;
    pub const STAGING_SIZE: u64 = 0x028;
    pub const CMD_RING_OFFSET: u64 = 0x030;
    pub const CMD_RING_ENTRIES: u64 = 0x038;
    pub const CMD_ENTRY_SIZE: u64 = 0x03c;
    pub const CPL_RING_OFFSET: u64 = 0x040;
    pub const CPL_RING_ENTRIES: u64 = 0x048;
    pub const CPL_ENTRY_SIZE: u64 = 0x04c;
    pub const DEVICE_PEER_ID: u64 = 0x050;
    pub const GUEST_PEER_ID: u64 = 0x054;
    pub const NUM_VECTORS: u64 = 0x058;
    pub const DMA_ALIGN: u64 = 0x05c;
    pub const OPCODES: u64 = 0x060;
    pub const CHECKSUM_ALGO: u64 = 0x064;

    pub const CONTROL: u64 = 0x080;
    pub const STATUS: u64 = 0x084;
    pub const CMD_PROD: u64 = 0x088;
    pub const CMD_CONS: u64 = 0x08c;
    pub const CPL_PROD: u64 = 0x090;
    pub const CPL_CONS: u64 = 0x094;
    pub const RESET_COUNT: u64 = 0x098;
    pub const RING_ERROR_PROD: u64 = 0x09c;
    pub const LAST_ERROR_STATUS: u64 = 0x0a0;
    pub const LAST_ERROR_INDEX: u64 = 0x0a4;

    pub const DOORBELLS: u64 = 0x100;
    pub const COMMANDS: u64 = 0x108;
    pub const ERRORS: u64 = 0x110;
    pub const BYTES: u64 = 0x118;
    pub const INTERRUPTS: u64 = 0x120;
    pub const RING_ERRORS: u64 = 0x128;
    pub const CPL_STALLS: u64 = 0x130;
    pub const POLLS: u64 = 0x138;
    /// 16 u64 counters, one per status code (index = code).
    pub const ERRORS_BY_STATUS: u64 = 0x180;
    /// 16 u64 counters, one per opcode (index = opcode).
    pub const COMMANDS_BY_OPCODE: u64 = 0x200;
    /// First reserved byte of the register page.
    pub const END: u64 = 0x280;
}

/// `CONTROL` bit: the driver asks for a ring reset; the device clears it
/// when done.
pub const CONTROL_RESET: u32 = 1 << 0;
/// `CONTROL` bit, with `CONTROL_RESET`: the reset also empties the VRAM
/// allocation table (a driver starting from scratch). Ignored alone.
pub const CONTROL_CLEAR_ALLOCS: u32 = 1 << 1;
/// `STATUS` bit: the device is serving the rings.
pub const STATUS_READY: u32 = 1 << 0;
/// `STATUS` bit: `CMD_PROD` is more than a ring ahead of `CMD_CONS`.
pub const STATUS_RING_ERROR: u32 = 1 << 1;
/// `STATUS` bit: the engine waits for room in the completion ring.
pub const STATUS_CPL_FULL: u32 = 1 << 2;

/// Command opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    Nop = 0,
    Fill = 1,
    Copy = 2,
    VramToStaging = 3,
    StagingToVram = 4,
    Checksum = 5,
    AllocNote = 6,
    FreeNote = 7,
}

pub const OPCODES: [Opcode; 8] = [
    Opcode::Nop,
    Opcode::Fill,
    Opcode::Copy,
    Opcode::VramToStaging,
    Opcode::StagingToVram,
    Opcode::Checksum,
    Opcode::AllocNote,
    Opcode::FreeNote,
];

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Opcode> {
        OPCODES.iter().copied().find(|o| *o as u16 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Opcode::Nop => "nop",
            Opcode::Fill => "fill",
            Opcode::Copy => "copy",
            Opcode::VramToStaging => "vram_to_staging",
            Opcode::StagingToVram => "staging_to_vram",
            Opcode::Checksum => "checksum",
            Opcode::AllocNote => "alloc_note",
            Opcode::FreeNote => "free_note",
        }
    }

    /// The `OPCODES` register: bit n set when opcode n is supported.
    pub fn mask() -> u32 {
        OPCODES.iter().fold(0, |m, o| m | 1 << (*o as u16))
    }
}

/// Completion status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    /// Unknown opcode.
    BadOpcode = 1,
    /// A reserved field, `flags`, or an argument not used by the opcode is
    /// not zero, or the FILL pattern does not fit in a byte.
    BadField = 2,
    /// An offset or length is not a multiple of `DMA_ALIGN`.
    Misaligned = 3,
    /// offset + length overflows 64 bits.
    Overflow = 4,
    /// The range does not lie inside its region (VRAM or staging).
    OutOfRange = 5,
    /// `CMD_PROD` was more than a ring ahead of `CMD_CONS`; the entry does
    /// not belong to a command (`index` = the bad `CMD_PROD`, `tag` = 0).
    RingIndex = 6,
    /// The device failed to touch its own memory (should never happen).
    Internal = 7,
    /// ALLOC_NOTE: the range overlaps a live allocation.
    AllocOverlap = 8,
    /// FREE_NOTE: no live allocation has this offset, size and id.
    AllocUnknown = 9,
    /// ALLOC_NOTE: the allocation table holds `MAX_ALLOCS` entries already.
    AllocTableFull = 10,
}

pub const STATUSES: [Status; 11] = [
    Status::Ok,
    Status::BadOpcode,
    Status::BadField,
    Status::Misaligned,
    Status::Overflow,
    Status::OutOfRange,
    Status::RingIndex,
    Status::Internal,
    Status::AllocOverlap,
    Status::AllocUnknown,
    Status::AllocTableFull,
];

impl Status {
    pub fn from_u32(v: u32) -> Option<Status> {
        STATUSES.iter().copied().find(|s| *s as u32 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadOpcode => "bad_opcode",
            Status::BadField => "bad_field",
            Status::Misaligned => "misaligned",
            Status::Overflow => "overflow",
            Status::OutOfRange => "out_of_range",
            Status::RingIndex => "ring_index",
            Status::Internal => "internal",
            Status::AllocOverlap => "alloc_overlap",
            Status::AllocUnknown => "alloc_unknown",
            Status::AllocTableFull => "alloc_table_full",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A command ring entry (64 bytes):
///
/// ```text
///  0 u16 opcode   2 u16 flags (0)   4 u32 reserved (0)
///  8 u64 tag     16 u64 src        24 u64 dst
/// 32 u64 len     40 u64 arg        48 u64 reserved[2] (0)
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    pub opcode: u16,
    pub flags: u16,
    pub reserved0: u32,
    pub tag: u64,
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub arg: u64,
    pub reserved1: [u64; 2],
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Command {
    pub fn nop(tag: u64) -> Command {
        Command {
            opcode: Opcode::Nop as u16,
            tag,
            ..Default::default()
        }
    }

    pub fn fill(tag: u64, dst: u64, len: u64, pattern: u8) -> Command {
        Command {
            opcode: Opcode::Fill as u16,
            tag,
            dst,
            len,
            arg: pattern.into(),
            ..Default::default()
        }
    }

    pub fn copy(tag: u64, src: u64, dst: u64, len: u64) -> Command {
        Command {
            opcode: Opcode::Copy as u16,
            tag,
            src,
            dst,
            len,
            ..Default::default()
        }
    }

    pub fn vram_to_staging(tag: u64, src: u64, dst: u64, len: u64) -> Command {
        Command {
            opcode: Opcode::VramToStaging as u16,
            ..Command::copy(tag, src, dst, len)
        }
    }

    pub fn staging_to_vram(tag: u64, src: u64, dst: u64, len: u64) -> Command {
        Command {
            opcode: Opcode::StagingToVram as u16,
            ..Command::copy(tag, src, dst, len)
        }
    }

    pub fn checksum(tag: u64, src: u64, len: u64) -> Command {
        Command {
            opcode: Opcode::Checksum as u16,
            tag,
            src,
            len,
            ..Default::default()
        }
    }

    /// ALLOC_NOTE: the driver allocated `len` bytes of VRAM at `dst` for
    /// its object `id`.
    pub fn alloc_note(tag: u64, dst: u64, len: u64, id: u64) -> Command {
        Command {
            opcode: Opcode::AllocNote as u16,
            tag,
            dst,
            len,
            arg: id,
            ..Default::default()
        }
    }

    /// FREE_NOTE: the driver freed the allocation ALLOC_NOTE described.
    pub fn free_note(tag: u64, dst: u64, len: u64, id: u64) -> Command {
        Command {
            opcode: Opcode::FreeNote as u16,
            ..Command::alloc_note(tag, dst, len, id)
        }
    }

    pub fn encode(&self) -> [u8; CMD_ENTRY_SIZE as usize] {
        let mut b = [0u8; CMD_ENTRY_SIZE as usize];
        b[0..2].copy_from_slice(&self.opcode.to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.reserved0.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.src.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.arg.to_le_bytes());
        b[48..56].copy_from_slice(&self.reserved1[0].to_le_bytes());
        b[56..64].copy_from_slice(&self.reserved1[1].to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; CMD_ENTRY_SIZE as usize]) -> Command {
        Command {
            opcode: le_u16(b, 0),
            flags: le_u16(b, 2),
            reserved0: le_u32(b, 4),
            tag: le_u64(b, 8),
            src: le_u64(b, 16),
            dst: le_u64(b, 24),
            len: le_u64(b, 32),
            arg: le_u64(b, 40),
            reserved1: [le_u64(b, 48), le_u64(b, 56)],
        }
    }
}

/// A completion ring entry (32 bytes):
///
/// ```text
///  0 u64 tag   8 u32 status   12 u32 index   16 u64 result   24 u64 reserved (0)
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub status: u32,
    pub index: u32,
    pub result: u64,
}

impl Completion {
    pub fn encode(&self) -> [u8; CPL_ENTRY_SIZE as usize] {
        let mut b = [0u8; CPL_ENTRY_SIZE as usize];
        b[0..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.index.to_le_bytes());
        b[16..24].copy_from_slice(&self.result.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; CPL_ENTRY_SIZE as usize]) -> Completion {
        Completion {
            tag: le_u64(b, 0),
            status: le_u32(b, 8),
            index: le_u32(b, 12),
            result: le_u64(b, 16),
        }
    }

    pub fn status(&self) -> Option<Status> {
        Status::from_u32(self.status)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("VRAM size must be at least {} bytes", SIZE_GRANULE)]
    VramZero,
    #[error("{what} size {size} is not a multiple of {granule} bytes")]
    Granule {
        what: &'static str,
        size: u64,
        granule: u64,
    },
    #[error(
        "BAR2 would exceed {} bytes (VRAM {vram} + staging {staging})",
        MAX_BAR_SIZE
    )]
    TooBig { vram: u64, staging: u64 },
}

/// Where things are in BAR2, fixed when the device is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub bar_size: u64,
    pub staging_offset: u64,
    pub staging_size: u64,
    pub vram_offset: u64,
    pub vram_size: u64,
}

impl Layout {
    /// Computes BAR2 for `vram` bytes of VRAM and `staging` bytes of staging
    /// window. `page` is the page size of the backing memory (4 KiB, or the
    /// huge page size): BAR2 is a power of two (QEMU requires it of every
    /// PCI BAR) and a multiple of `page`.
    pub fn new(vram: u64, staging: u64, page: u64) -> Result<Layout, LayoutError> {
        if vram == 0 {
            return Err(LayoutError::VramZero);
        }
        for (what, size) in [("VRAM", vram), ("staging", staging)] {
            if size % SIZE_GRANULE != 0 {
                return Err(LayoutError::Granule {
                    what,
                    size,
                    granule: SIZE_GRANULE,
                });
            }
        }
        let too_big = LayoutError::TooBig { vram, staging };
        let staging_end = STAGING_OFFSET.checked_add(staging).ok_or(too_big.clone())?;
        let vram_offset = staging_end
            .checked_next_multiple_of(VRAM_ALIGN)
            .ok_or(too_big.clone())?;
        let end = vram_offset.checked_add(vram).ok_or(too_big.clone())?;
        let bar_size = end
            .checked_next_power_of_two()
            .ok_or(too_big.clone())?
            .max(page.max(1).next_power_of_two());
        if bar_size > MAX_BAR_SIZE {
            return Err(too_big);
        }
        Ok(Layout {
            bar_size,
            staging_offset: STAGING_OFFSET,
            staging_size: staging,
            vram_offset,
            vram_size: vram,
        })
    }

    pub fn cmd_entry_offset(index: u32) -> u64 {
        CMD_RING_OFFSET + u64::from(index % CMD_RING_ENTRIES) * u64::from(CMD_ENTRY_SIZE)
    }

    pub fn cpl_entry_offset(index: u32) -> u64 {
        CPL_RING_OFFSET + u64::from(index % CPL_RING_ENTRIES) * u64::from(CPL_ENTRY_SIZE)
    }
}

/// A region of BAR2 that the host-side inspection API can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Region {
    Vram,
    Staging,
    Bar,
}

impl Region {
    /// (offset in BAR2, size) of the region.
    pub fn span(self, layout: &Layout) -> (u64, u64) {
        match self {
            Region::Vram => (layout.vram_offset, layout.vram_size),
            Region::Staging => (layout.staging_offset, layout.staging_size),
            Region::Bar => (0, layout.bar_size),
        }
    }
}

impl std::str::FromStr for Region {
    type Err = String;

    fn from_str(s: &str) -> Result<Region, String> {
        match s {
            "vram" => Ok(Region::Vram),
            "staging" => Ok(Region::Staging),
            "bar" => Ok(Region::Bar),
            _ => Err(format!("unknown region `{s}`: vram, staging or bar")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_power_of_two_and_aligned() {
        let l = Layout::new(64 << 20, 4 << 20, 4096).unwrap();
        assert_eq!(l.staging_offset, 0x1_0000);
        assert_eq!(l.vram_offset, 6 << 20);
        assert_eq!(l.bar_size, 128 << 20);
        let l = Layout::new(62 << 20, 1 << 20, 4096).unwrap();
        assert_eq!(l.vram_offset, 2 << 20);
        assert_eq!(l.bar_size, 64 << 20);
        let l = Layout::new(4096, 0, 2 << 20).unwrap();
        assert_eq!(l.vram_offset, 2 << 20);
        assert_eq!(l.bar_size, 4 << 20);
        let l = Layout::new(4096, 0, 1 << 30).unwrap();
        assert_eq!(l.bar_size, 1 << 30);
    }

    #[test]
    fn layout_rejects_bad_sizes() {
        assert_eq!(Layout::new(0, 0, 4096), Err(LayoutError::VramZero));
        assert!(matches!(
            Layout::new(4097, 0, 4096),
            Err(LayoutError::Granule { what: "VRAM", .. })
        ));
        assert!(matches!(
            Layout::new(4096, 100, 4096),
            Err(LayoutError::Granule {
                what: "staging",
                ..
            })
        ));
        assert!(matches!(
            Layout::new(u64::MAX - 4095, 0, 4096),
            Err(LayoutError::TooBig { .. })
        ));
        assert!(matches!(
            Layout::new(1 << 40, 0, 4096),
            Err(LayoutError::TooBig { .. })
        ));
    }

    #[test]
    fn entries_round_trip() {
        let c = Command {
            opcode: 5,
            flags: 1,
            reserved0: 2,
            tag: 3,
            src: 4,
            dst: 5,
            len: 6,
            arg: 7,
            reserved1: [8, 9],
        };
        assert_eq!(Command::decode(&c.encode()), c);
        let p = Completion {
            tag: u64::MAX,
            status: 6,
            index: 7,
            result: 8,
        };
        assert_eq!(Completion::decode(&p.encode()), p);
        assert_eq!(&MAGIC.to_le_bytes(), b"FGPU");
        assert_eq!(Opcode::mask(), 0xff);
    }
}
