//! The vring type the backend runs on: the vhost-user crate's `VringRwLock`
//! plus the frontend's error eventfd (`VHOST_USER_SET_VRING_ERR`), which
//! the crate stores but does not let a backend signal.
//!
//! Signalling it is how a vhost-user device reports that it cannot go on:
//! a frontend with the lab's QEMU patch then sets DEVICE_NEEDS_RESET in the
//! device status and raises a configuration interrupt.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;

use crate::device::GuestMem;

#[derive(Clone)]
pub struct NetVring {
    inner: VringRwLock<GuestMem>,
    /// A duplicate of the error eventfd the frontend gave for this ring.
    err: Arc<Mutex<Option<File>>>,
}

impl NetVring {
    /// Signals the ring's error eventfd. `Ok(false)`: the frontend gave
    /// none (or took it back).
    pub fn signal_error(&self) -> io::Result<bool> {
        let err = self.err.lock().unwrap_or_else(|e| e.into_inner());
        match err.as_ref() {
            Some(mut fd) => fd.write_all(&1u64.to_ne_bytes()).map(|()| true),
            None => Ok(false),
        }
    }
}

impl<'a> VringStateGuard<'a, GuestMem> for NetVring {
    type G = <VringRwLock<GuestMem> as VringStateGuard<'a, GuestMem>>::G;
}

impl<'a> VringStateMutGuard<'a, GuestMem> for NetVring {
    type G = <VringRwLock<GuestMem> as VringStateMutGuard<'a, GuestMem>>::G;
}

impl VringT<GuestMem> for NetVring {
    fn new(mem: GuestMem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(NetVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            err: Arc::new(Mutex::new(None)),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        // Keep a duplicate: the crate's copy is private. A failed dup only
        // costs the error report, so the ring still works without it.
        let dup = file.as_ref().and_then(|f| f.try_clone().ok());
        *self.err.lock().unwrap_or_else(|e| e.into_inner()) = dup;
        self.inner.set_err(file)
    }
}
