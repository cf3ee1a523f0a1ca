//! A host TAP interface in multi-queue mode with virtio-net headers: one
//! file descriptor per queue pair, so each worker reads and writes its own
//! queue and the host kernel does checksum and GSO work where it can.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use log::{debug, warn};

use super::{Port, WakeMask};
use crate::device::{NetDevice, Steered, MAX_FRAME, RX_BACKLOG_PACKETS};
use crate::hdr::{VirtioNetHdr, HDR_LEN};
use crate::offload::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_USO4, TUN_F_USO6};
use crate::spec::*;
use crate::stats::DropReason;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Frames read per wakeup, so one busy tap cannot starve its worker.
const RX_BUDGET: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are you root or CAP_NET_ADMIN?)")]
    Open(io::Error),
    #[error("cannot attach queue {queue} of tap `{name}`: {err} (the interface must not exist as a single-queue tap; delete it or let vhost-nic create it)")]
    Attach {
        name: String,
        queue: u16,
        err: io::Error,
    },
    #[error("cannot configure tap `{name}`: {err}")]
    Configure { name: String, err: io::Error },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct TapPort {
    name: String,
    queues: Vec<File>,
    /// Receive buffer per queue, reused across frames.
    bufs: Vec<Mutex<Vec<u8>>>,
}

impl TapPort {
    /// Opens (creating if needed) `name` with one queue per queue pair.
    pub fn open(name: &str, pairs: u16) -> Result<Self, TapError> {
        let mut queues = Vec::with_capacity(usize::from(pairs));
        for queue in 0..pairs {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::Open)?;
            let mut req = IfReq {
                name: [0; 16],
                flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE,
                _pad: [0; 22],
            };
            let n = name.len().min(15);
            req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
            // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq
            // matches in size and layout; the fd is ours.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
            if rc < 0 {
                return Err(TapError::Attach {
                    name: name.to_string(),
                    queue,
                    err: io::Error::last_os_error(),
                });
            }
            let hdr_len: libc::c_int = HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) };
            if rc < 0 {
                return Err(TapError::Configure {
                    name: name.to_string(),
                    err: io::Error::last_os_error(),
                });
            }
            queues.push(file);
        }
        let bufs = (0..pairs)
            .map(|_| Mutex::new(vec![0u8; HDR_LEN + MAX_FRAME]))
            .collect();
        Ok(TapPort {
            name: name.to_string(),
            queues,
            bufs,
        })
    }

    fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        let Some(q) = self.queues.first() else {
            return Ok(());
        };
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let rc = unsafe { libc::ioctl(q.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Port for TapPort {
    fn transmit(
        &self,
        _from: &NetDevice,
        pair: u16,
        frame: Vec<u8>,
        hdr: VirtioNetHdr,
        _woken: &mut WakeMask,
    ) -> Result<(), DropReason> {
        let q = self
            .queues
            .get(usize::from(pair) % self.queues.len().max(1))
            .ok_or(DropReason::PortDown)?;
        let mut h = [0u8; HDR_LEN];
        hdr.write_to(&mut h);
        let iov = [IoSlice::new(&h), IoSlice::new(&frame)];
        // SAFETY: writev reads the two buffers described by `iov`, both alive.
        let rc = unsafe {
            libc::writev(
                q.as_raw_fd(),
                iov.as_ptr() as *const libc::iovec,
                iov.len() as libc::c_int,
            )
        };
        if rc < 0 {
            debug!("tap {}: write: {}", self.name, io::Error::last_os_error());
            return Err(DropReason::PortDown);
        }
        Ok(())
    }

    fn flush(&self, _woken: WakeMask) {}

    /// The tap hands the device only what the guest accepts, so the host
    /// kernel, not the device, segments when the guest cannot take GSO.
    fn guest_offloads_changed(&self, _dev: &NetDevice, offloads: u64) {
        let on = |b: u32| offloads & bit(b) != 0;
        let mut flags = 0;
        if on(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= TUN_F_CSUM;
            if on(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= TUN_F_TSO4;
            }
            if on(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= TUN_F_TSO6;
            }
            if on(VIRTIO_NET_F_GUEST_ECN) {
                flags |= TUN_F_TSO_ECN;
            }
            if on(VIRTIO_NET_F_GUEST_USO4) && on(VIRTIO_NET_F_GUEST_USO6) {
                flags |= TUN_F_USO4 | TUN_F_USO6;
            }
        }
        if let Err(e) = self.set_offload(flags) {
            // Older kernels lack USO: retry without it.
            if self
                .set_offload(flags & !(TUN_F_USO4 | TUN_F_USO6))
                .is_err()
            {
                warn!("tap {}: TUNSETOFFLOAD {flags:#x}: {e}", self.name);
            }
        }
    }

    fn rx_fd(&self, pair: u16) -> Option<RawFd> {
        self.queues.get(usize::from(pair)).map(|f| f.as_raw_fd())
    }

    fn receive(&self, dev: &NetDevice, pair: u16) -> (WakeMask, bool) {
        let (Some(q), Some(buf)) = (
            self.queues.get(usize::from(pair)),
            self.bufs.get(usize::from(pair)),
        ) else {
            return (0, false);
        };
        let mut buf = buf.lock().unwrap_or_else(|e| e.into_inner());
        let mut woken = 0;
        for _ in 0..RX_BUDGET {
            // Leave frames in the tap's queue while this pair's backlog is
            // full: the host kernel then applies its own backpressure.
            if dev.backlog_len(pair) >= RX_BACKLOG_PACKETS / 2 {
                return (woken, true);
            }
            // SAFETY: read writes at most buf.len() bytes into buf.
            let n = unsafe { libc::read(q.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::WouldBlock {
                    debug!("tap {}: read: {err}", self.name);
                }
                return (woken, false);
            }
            let n = n as usize;
            let Some(hdr) = buf.get(..HDR_LEN).and_then(VirtioNetHdr::from_bytes) else {
                continue;
            };
            let frame = buf[HDR_LEN..n].to_vec();
            if let Steered::Queue(q) = dev.ingress(frame, hdr) {
                woken |= 1u32.checked_shl(u32::from(q)).unwrap_or(0);
            }
        }
        (woken, true)
    }

    fn describe(&self) -> String {
        format!("tap:{} ({} queues)", self.name, self.queues.len())
    }
}
