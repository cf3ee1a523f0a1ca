//! A cable between two devices of the same daemon: what one guest transmits
//! is received by the other, steered by the receiver's filters and RSS.

use std::sync::{Arc, OnceLock, Weak};

use super::{Port, WakeMask};
use crate::device::{NetDevice, Steered};
use crate::hdr::VirtioNetHdr;
use crate::stats::DropReason;

pub struct Wire {
    name: String,
    ends: [OnceLock<Weak<NetDevice>>; 2],
}

impl Wire {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Wire {
            name: name.to_string(),
            ends: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// Plugs `dev` into end `side` (0 or 1) and returns that end's port.
    pub fn plug(self: &Arc<Self>, side: usize, dev: &Arc<NetDevice>) -> Arc<WireEnd> {
        let side = side.min(1);
        let _ = self.ends[side].set(Arc::downgrade(dev));
        Arc::new(WireEnd {
            wire: self.clone(),
            side,
        })
    }
}

pub struct WireEnd {
    wire: Arc<Wire>,
    side: usize,
}

impl WireEnd {
    fn peer(&self) -> Option<Arc<NetDevice>> {
        self.wire.ends[1 - self.side].get()?.upgrade()
    }
}

impl Port for WireEnd {
    fn transmit(
        &self,
        _from: &NetDevice,
        _pair: u16,
        frame: Vec<u8>,
        hdr: VirtioNetHdr,
        woken: &mut WakeMask,
    ) -> Result<(), DropReason> {
        let peer = self.peer().ok_or(DropReason::PortDown)?;
        match peer.ingress(frame, hdr) {
            Steered::Queue(q) => {
                *woken |= 1u32.checked_shl(u32::from(q)).unwrap_or(0);
                Ok(())
            }
            // The receiver counted the drop on its side.
            Steered::Dropped(_) => Ok(()),
        }
    }

    fn flush(&self, woken: WakeMask) {
        if woken == 0 {
            return;
        }
        if let Some(peer) = self.peer() {
            let mut mask = woken;
            while mask != 0 {
                let q = mask.trailing_zeros() as u16;
                peer.wake_rx(q);
                mask &= mask - 1;
            }
        }
    }

    fn describe(&self) -> String {
        format!("wire:{} end {}", self.wire.name, self.side)
    }
}
