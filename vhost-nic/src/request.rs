//! Requests the device reads whole from a chain: transmit frames, control
//! and admin commands. Holds the chain's readable bytes and its writable
//! segments (for the reply), reused across chains.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

use crate::chain::{read_chain, walk_chain, ChainError, ChainLimits, Direction, Segment};
use crate::memory::{RegionClassifier, RegionKind};

#[derive(Debug, Default)]
pub struct ChainBuf {
    segs: Vec<Segment>,
    data: Vec<u8>,
}

impl ChainBuf {
    /// The readable bytes of the last chain read.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Room for a reply in the last chain's writable descriptors.
    pub fn writable_len(&self) -> usize {
        self.segs
            .iter()
            .filter(|s| s.writable)
            .map(|s| s.len as usize)
            .sum()
    }

    /// Writes `reply` into the writable descriptors, truncated to fit;
    /// returns the bytes written (the used length).
    pub fn write_response<M: GuestMemory>(
        &self,
        mem: &M,
        reply: &[u8],
    ) -> Result<usize, ChainError> {
        let mut off = 0;
        for s in self.segs.iter().filter(|s| s.writable) {
            if off >= reply.len() {
                break;
            }
            let n = (s.len as usize).min(reply.len() - off);
            mem.write_slice(&reply[off..off + n], s.addr)
                .map_err(|_| ChainError::Memory {
                    addr: s.addr.0,
                    len: n,
                })?;
            off += n;
        }
        Ok(off)
    }
}

/// Reads a TX chain (device-readable only, at most `max_bytes`) into `buf`.
/// Returns how many of its bytes came from memory other than guest RAM.
pub fn read_tx_chain<D>(
    mut chain: DescriptorChain<D>,
    regions: &RegionClassifier,
    queue_size: u16,
    buf: &mut ChainBuf,
) -> Result<u64, ChainError>
where
    D: Deref,
    D::Target: GuestMemory,
{
    read_chain(
        &mut chain,
        regions,
        ChainLimits::tx(queue_size),
        &mut buf.segs,
        &mut buf.data,
    )?;
    Ok(buf
        .segs
        .iter()
        .filter(|s| s.kind != RegionKind::Ram)
        .map(|s| u64::from(s.len))
        .sum())
}

/// Reads a command chain (readable request, then writable reply space).
/// The request is capped at `max_request` bytes.
pub fn read_request<D>(
    mut chain: DescriptorChain<D>,
    regions: &RegionClassifier,
    queue_size: u16,
    max_request: usize,
    buf: &mut ChainBuf,
) -> Result<(), ChainError>
where
    D: Deref,
    D::Target: GuestMemory,
{
    buf.segs.clear();
    buf.data.clear();
    let sum = walk_chain(
        &mut chain,
        Direction::ReadThenWrite,
        regions,
        ChainLimits::new(queue_size),
        &mut buf.segs,
    )?;
    if sum.readable > max_request as u64 {
        return Err(ChainError::LengthOverflow {
            max: max_request as u64,
        });
    }
    for s in buf.segs.iter().filter(|s| !s.writable) {
        let start = buf.data.len();
        buf.data.resize(start + s.len as usize, 0);
        chain
            .memory()
            .read_slice(&mut buf.data[start..], s.addr)
            .map_err(|_| ChainError::Memory {
                addr: s.addr.0,
                len: s.len as usize,
            })?;
    }
    Ok(())
}
