//! Classification of guest-physical ranges by the memory region that backs
//! them.
//!
//! The vhost-user memory table holds guest RAM and, with header split, may
//! also hold other memory the guest exports to the device, such as a GPU BAR
//! handed over as a dma-buf fd. Receive payload buffers may live in either.
//! Delivery does not depend on the kind (both are plain mmaps for us); the
//! kind feeds statistics and diagnostics, so the lookup must be cheap enough
//! to run for every descriptor.

use std::os::unix::fs::MetadataExt;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// What backs a guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// Guest RAM.
    Ram,
    /// Any other region of the memory table (device memory such as a BAR).
    Device,
}

/// One region of the memory table, as the classifier sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Position of the region in the memory table (sorted by address).
    pub index: usize,
    pub base: GuestAddress,
    pub len: u64,
    pub kind: RegionKind,
}

impl RegionInfo {
    /// Exclusive end address; saturates so a region ending at 2^64 stays sane.
    pub fn end(&self) -> u64 {
        self.base.raw_value().saturating_add(self.len)
    }

    fn contains(&self, addr: u64) -> bool {
        addr >= self.base.raw_value() && addr - self.base.raw_value() < self.len
    }
}

/// Identity of the file behind a region: (st_dev, st_ino).
type FileId = (u64, u64);

/// Maps guest-physical addresses to the region (and its kind) that holds them.
///
/// Rebuild it whenever the memory table changes (VHOST_USER_SET_MEM_TABLE,
/// ADD/REM_MEM_REG); it is a snapshot.
#[derive(Debug, Clone, Default)]
pub struct RegionClassifier {
    /// Sorted by base, non-overlapping (the memory table guarantees it).
    regions: Vec<RegionInfo>,
}

impl RegionClassifier {
    /// Classifies the regions of `mem`.
    ///
    /// RAM is the region containing GPA 0 (or the lowest region when nothing
    /// maps GPA 0) together with every region backed by the same file: QEMU
    /// maps all of a RAM backend from one file, split into several table
    /// entries (below and above the PCI hole), while exported device memory
    /// comes from a different fd. Anonymous regions (no file, as in unit
    /// tests) count as RAM. A region whose file cannot be identified is
    /// Device unless it holds GPA 0.
    ///
    /// RAM in separate backends (several NUMA nodes, hot-plugged DIMMs) is
    /// reported as Device; this only skews the statistics.
    pub fn new<M: GuestMemoryBackend>(mem: &M) -> Self {
        Self::with_device_ranges(mem, &[])
    }

    /// Like [`RegionClassifier::new`], then marks every region overlapping
    /// one of `device` (start, length) as Device. Lets tests and callers that
    /// know the layout (e.g. from the VMM) override the file heuristic.
    pub fn with_device_ranges<M: GuestMemoryBackend>(
        mem: &M,
        device: &[(GuestAddress, u64)],
    ) -> Self {
        let file_id = |r: &M::R| -> Option<FileId> {
            let meta = r.file_offset()?.file().metadata().ok()?;
            Some((meta.dev(), meta.ino()))
        };
        let reference = mem
            .find_region(GuestAddress(0))
            .or_else(|| mem.iter().min_by_key(|r| r.start_addr()));
        let ram_file = reference.and_then(file_id);
        let ref_base = reference.map(|r| r.start_addr());

        let mut regions: Vec<RegionInfo> = mem
            .iter()
            .filter(|r| r.len() > 0)
            .map(|r| {
                let kind = if Some(r.start_addr()) == ref_base || r.file_offset().is_none() {
                    RegionKind::Ram
                } else {
                    match (ram_file, file_id(r)) {
                        (Some(a), Some(b)) if a == b => RegionKind::Ram,
                        _ => RegionKind::Device,
                    }
                };
                RegionInfo {
                    index: 0,
                    base: r.start_addr(),
                    len: r.len(),
                    kind,
                }
            })
            .collect();
        regions.sort_by_key(|r| r.base);
        for (i, r) in regions.iter_mut().enumerate() {
            r.index = i;
            let overlaps = device.iter().any(|&(start, len)| {
                let s = start.raw_value();
                let e = s.saturating_add(len);
                len > 0 && s < r.end() && r.base.raw_value() < e
            });
            if overlaps {
                r.kind = RegionKind::Device;
            }
        }
        RegionClassifier { regions }
    }

    /// Builds a classifier from explicit (base, length, kind) triples, for
    /// memory types that are not a [`GuestMemoryBackend`] or for tests.
    /// Empty and overlapping entries are dropped (the later one loses).
    pub fn from_ranges(ranges: &[(GuestAddress, u64, RegionKind)]) -> Self {
        let mut regions: Vec<RegionInfo> = ranges
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(base, len, kind)| RegionInfo {
                index: 0,
                base,
                len,
                kind,
            })
            .collect();
        regions.sort_by_key(|r| r.base);
        let mut end = 0u64;
        let mut first = true;
        regions.retain(|r| {
            let keep = first || r.base.raw_value() >= end;
            if keep {
                end = r.end();
                first = false;
            }
            keep
        });
        for (i, r) in regions.iter_mut().enumerate() {
            r.index = i;
        }
        RegionClassifier { regions }
    }

    /// All regions, sorted by base address.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// The region containing `addr`: a binary search, O(log regions).
    pub fn find(&self, addr: GuestAddress) -> Option<&RegionInfo> {
        let a = addr.raw_value();
        let i = self.regions.partition_point(|r| r.base.raw_value() <= a);
        let r = self.regions.get(i.checked_sub(1)?)?;
        r.contains(a).then_some(r)
    }

    /// The region holding all of `[addr, addr + len)`, or None when the range
    /// is empty, wraps, or is not inside a single region.
    pub fn classify(&self, addr: GuestAddress, len: u64) -> Option<&RegionInfo> {
        let last = addr.raw_value().checked_add(len.checked_sub(1)?)?;
        let r = self.find(addr)?;
        r.contains(last).then_some(r)
    }

    /// Kind of the memory holding all of `[addr, addr + len)`.
    pub fn kind(&self, addr: GuestAddress, len: u64) -> Option<RegionKind> {
        self.classify(addr, len).map(|r| r.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn anonymous_regions_are_ram_unless_marked() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10_0000), 0x10000),
            (GuestAddress(0x20_0000), 0x10000),
        ])
        .unwrap();
        let c = RegionClassifier::new(&mem);
        assert!(c.regions().iter().all(|r| r.kind == RegionKind::Ram));

        let c = RegionClassifier::with_device_ranges(&mem, &[(GuestAddress(0x10_8000), 1)]);
        let kinds: Vec<_> = c.regions().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [RegionKind::Ram, RegionKind::Device, RegionKind::Ram]
        );
        let r = c.classify(GuestAddress(0x10_0010), 0x100).unwrap();
        assert_eq!((r.index, r.base), (1, GuestAddress(0x10_0000)));
        assert_eq!(c.kind(GuestAddress(0xfff0), 0x10), Some(RegionKind::Ram));
        // Crossing the end of a region, holes, empty and wrapping ranges.
        assert_eq!(c.kind(GuestAddress(0xfff0), 0x11), None);
        assert_eq!(c.kind(GuestAddress(0x1_0000), 1), None);
        assert_eq!(c.kind(GuestAddress(0), 0), None);
        assert_eq!(c.kind(GuestAddress(u64::MAX), 2), None);
        assert!(c.find(GuestAddress(0x30_0000)).is_none());
    }

    #[test]
    fn file_identity_decides_ram() {
        let ram = TempFile::new().unwrap().into_file();
        ram.set_len(0x40000).unwrap();
        let bar = TempFile::new().unwrap().into_file();
        bar.set_len(0x10000).unwrap();
        // The same RAM file mapped twice (below and above a hole), through
        // different fds as vhost-user hands them over.
        let ram_dup = ram.try_clone().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
            (GuestAddress(0), 0x10000, Some(FileOffset::new(ram, 0))),
            (
                GuestAddress(0x1_0000_0000),
                0x10000,
                Some(FileOffset::new(ram_dup, 0x10000)),
            ),
            (
                GuestAddress(0x2_0000_0000),
                0x10000,
                Some(FileOffset::new(bar, 0)),
            ),
        ])
        .unwrap();
        let c = RegionClassifier::new(&mem);
        let kinds: Vec<_> = c.regions().iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [RegionKind::Ram, RegionKind::Ram, RegionKind::Device]
        );
        assert_eq!(
            c.kind(GuestAddress(0x2_0000_0100), 16),
            Some(RegionKind::Device)
        );
    }

    #[test]
    fn explicit_ranges_drop_overlaps() {
        let c = RegionClassifier::from_ranges(&[
            (GuestAddress(0x1000), 0x1000, RegionKind::Device),
            (GuestAddress(0), 0x1000, RegionKind::Ram),
            (GuestAddress(0x1800), 0x1000, RegionKind::Ram),
            (GuestAddress(0x3000), 0, RegionKind::Ram),
        ]);
        assert_eq!(c.regions().len(), 2);
        assert_eq!(c.kind(GuestAddress(0x1fff), 1), Some(RegionKind::Device));
    }
}
