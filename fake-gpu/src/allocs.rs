//! The VRAM allocation table: what the guest driver said it allocated and
//! freed (ALLOC_NOTE and FREE_NOTE commands), so that the host can see
//! which VRAM ranges are in use. The device does not allocate anything
//! itself; it checks that the notes are consistent (no overlapping live
//! ranges, no free of a range that is not live) and keeps at most
//! [`MAX_ALLOCS`] entries, so a guest cannot make it grow without bound.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::Status;

/// Most live allocations the table holds; an ALLOC_NOTE beyond it fails
/// with `alloc_table_full`.
pub const MAX_ALLOCS: usize = 65536;

/// One live allocation, as the driver described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alloc {
    /// Offset in VRAM.
    pub offset: u64,
    pub size: u64,
    /// The driver's identifier for the object (the Linux driver passes the
    /// dma-buf's inode number).
    pub id: u64,
    /// Order of creation: 1 for the first ALLOC_NOTE the device accepted.
    pub seq: u64,
}

impl Alloc {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

/// Counts over the table's life (`created`, `freed`, `cleared`) and its
/// current state (`live`, `bytes`, `peak_bytes` since the last clear).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocCounts {
    pub live: u64,
    pub bytes: u64,
    pub peak_bytes: u64,
    pub created: u64,
    pub freed: u64,
    /// Entries dropped by clears (a new guest, or a reset that asked for it).
    pub cleared: u64,
    /// The table's capacity.
    pub max: u64,
}

#[derive(Debug)]
pub struct AllocTable {
    /// Live allocations by VRAM offset.
    live: BTreeMap<u64, Alloc>,
    cap: usize,
    counts: AllocCounts,
}

impl Default for AllocTable {
    fn default() -> Self {
        AllocTable::with_capacity(MAX_ALLOCS)
    }
}

impl AllocTable {
    /// A table that holds at most `cap` live allocations.
    pub fn with_capacity(cap: usize) -> AllocTable {
        AllocTable {
            live: BTreeMap::new(),
            cap,
            counts: AllocCounts::default(),
        }
    }

    /// Records a live allocation of `size` (> 0) bytes at `offset`. Fails
    /// with `AllocOverlap` when it overlaps a live one, `AllocTableFull`
    /// when the table is full. The range itself is checked by the caller.
    pub fn note_alloc(&mut self, offset: u64, size: u64, id: u64) -> Result<(), Status> {
        if size == 0 {
            return Err(Status::BadField);
        }
        let end = offset.checked_add(size).ok_or(Status::Overflow)?;
        // The closest live allocation starting below `end` is the only one
        // that can overlap: live ranges do not overlap each other.
        if let Some((_, a)) = self.live.range(..end).next_back() {
            if a.end() > offset {
                return Err(Status::AllocOverlap);
            }
        }
        if self.live.len() >= self.cap {
            return Err(Status::AllocTableFull);
        }
        self.counts.created += 1;
        self.live.insert(
            offset,
            Alloc {
                offset,
                size,
                id,
                seq: self.counts.created,
            },
        );
        self.counts.bytes += size;
        self.counts.peak_bytes = self.counts.peak_bytes.max(self.counts.bytes);
        Ok(())
    }

    /// Removes the live allocation that has exactly this offset, size and
    /// id; `AllocUnknown` when there is none.
    pub fn note_free(&mut self, offset: u64, size: u64, id: u64) -> Result<Alloc, Status> {
        let a = match self.live.entry(offset) {
            Entry::Occupied(e) if e.get().size == size && e.get().id == id => e.remove(),
            _ => return Err(Status::AllocUnknown),
        };
        self.counts.freed += 1;
        self.counts.bytes -= a.size;
        Ok(a)
    }

    /// Forgets every live allocation (the lifetime counts stay).
    pub fn clear(&mut self) {
        self.counts.cleared += self.live.len() as u64;
        self.live.clear();
        self.counts.bytes = 0;
        self.counts.peak_bytes = 0;
    }

    pub fn counts(&self) -> AllocCounts {
        AllocCounts {
            live: self.live.len() as u64,
            max: self.cap as u64,
            ..self.counts
        }
    }

    /// Live allocations in VRAM order.
    pub fn entries(&self) -> Vec<Alloc> {
        self.live.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_refused_neighbours_are_not() {
        let mut t = AllocTable::default();
        t.note_alloc(0x1000, 0x1000, 1).unwrap();
        t.note_alloc(0x3000, 0x2000, 2).unwrap();
        // Touching on either side is fine.
        t.note_alloc(0x2000, 0x1000, 3).unwrap();
        t.note_alloc(0, 0x1000, 4).unwrap();
        for (off, size) in [
            (0x1000, 0x1000),
            (0x1ff8, 8),
            (0, 0x6000),
            (0x4ff8, 0x10),
            (0x800, 0x1000),
        ] {
            assert_eq!(
                t.note_alloc(off, size, 9),
                Err(Status::AllocOverlap),
                "{off:#x}+{size:#x}"
            );
        }
        t.note_alloc(0x5000, 8, 5).unwrap();
        assert_eq!(t.note_alloc(0x100, 0, 9), Err(Status::BadField));
        assert_eq!(t.note_alloc(u64::MAX - 7, 16, 9), Err(Status::Overflow));
        let c = t.counts();
        assert_eq!((c.live, c.created, c.bytes), (5, 5, 0x5008));
        let offs: Vec<u64> = t.entries().iter().map(|a| a.offset).collect();
        assert_eq!(offs, [0, 0x1000, 0x2000, 0x3000, 0x5000]);
    }

    #[test]
    fn free_must_match_offset_size_and_id() {
        let mut t = AllocTable::default();
        t.note_alloc(0x1000, 0x2000, 7).unwrap();
        assert_eq!(t.note_free(0x1000, 0x2000, 8), Err(Status::AllocUnknown));
        assert_eq!(t.note_free(0x1000, 0x1000, 7), Err(Status::AllocUnknown));
        assert_eq!(t.note_free(0x2000, 0x1000, 7), Err(Status::AllocUnknown));
        assert_eq!(t.counts().live, 1);
        let a = t.note_free(0x1000, 0x2000, 7).unwrap();
        assert_eq!((a.offset, a.size, a.id, a.seq), (0x1000, 0x2000, 7, 1));
        assert_eq!(t.note_free(0x1000, 0x2000, 7), Err(Status::AllocUnknown));
        let c = t.counts();
        assert_eq!(
            (c.live, c.bytes, c.peak_bytes, c.created, c.freed),
            (0, 0, 0x2000, 1, 1)
        );
        // The range can be allocated again.
        t.note_alloc(0x1000, 0x1000, 9).unwrap();
        assert_eq!(t.entries()[0].seq, 2);
    }

    #[test]
    fn table_is_capped() {
        let mut t = AllocTable::with_capacity(3);
        for i in 0..3 {
            t.note_alloc(i * 8, 8, i).unwrap();
        }
        assert_eq!(t.note_alloc(0x100, 8, 9), Err(Status::AllocTableFull));
        // An overlap is reported as such even when full.
        assert_eq!(t.note_alloc(0, 8, 9), Err(Status::AllocOverlap));
        t.note_free(8, 8, 1).unwrap();
        t.note_alloc(0x100, 8, 9).unwrap();
        assert_eq!(t.counts().live, 3);
        // The default capacity holds MAX_ALLOCS entries and no more.
        let mut t = AllocTable::default();
        for i in 0..MAX_ALLOCS as u64 {
            t.note_alloc(i * 8, 8, i).unwrap();
        }
        assert_eq!(
            t.note_alloc(MAX_ALLOCS as u64 * 8, 8, 0),
            Err(Status::AllocTableFull)
        );
        assert_eq!(t.counts().max, MAX_ALLOCS as u64);
    }

    #[test]
    fn clear_forgets_live_entries_keeps_lifetime_counts() {
        let mut t = AllocTable::default();
        t.note_alloc(0, 0x1000, 1).unwrap();
        t.note_alloc(0x1000, 0x1000, 2).unwrap();
        t.note_free(0, 0x1000, 1).unwrap();
        t.clear();
        let c = t.counts();
        assert_eq!(
            (c.live, c.bytes, c.peak_bytes, c.created, c.freed, c.cleared),
            (0, 0, 0, 2, 1, 1)
        );
        assert!(t.entries().is_empty());
        t.note_alloc(0x1000, 0x1000, 2).unwrap();
    }
}
