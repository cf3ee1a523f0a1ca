//! The other side of the device's wire: where transmitted frames go and
//! where received frames come from.

pub mod tap;
pub mod wire;

use crate::device::NetDevice;
use crate::hdr::VirtioNetHdr;
use crate::stats::DropReason;

/// Bitmask of receive queue pairs to wake once a transmit batch is done.
pub type WakeMask = u32;

pub trait Port: Send + Sync {
    /// Sends one frame the guest transmitted on queue pair `pair`. Receive
    /// queues of the peer that got frames are added to `woken`; `flush`
    /// wakes them once per batch.
    fn transmit(
        &self,
        from: &NetDevice,
        pair: u16,
        frame: Vec<u8>,
        hdr: VirtioNetHdr,
        woken: &mut WakeMask,
    ) -> Result<(), DropReason>;

    /// Wakes the peer queues collected in a batch.
    fn flush(&self, woken: WakeMask);

    /// The guest changed which offloads it accepts on receive.
    fn guest_offloads_changed(&self, _dev: &NetDevice, _offloads: u64) {}

    /// Host file descriptor carrying frames toward queue pair `pair`, for
    /// ports that receive from the host (TAP); the worker of that pair polls it.
    fn rx_fd(&self, _pair: u16) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Reads what is pending on `rx_fd(pair)` into the device's receive
    /// steering. Returns the queues to wake and whether frames were left
    /// behind (budget or backlog limit) so the caller comes back.
    fn receive(&self, _dev: &NetDevice, _pair: u16) -> (WakeMask, bool) {
        (0, false)
    }

    fn describe(&self) -> String;
}
