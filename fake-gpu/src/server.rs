//! The ivshmem server side: accepts QEMU's ivshmem-doorbell connection,
//! hands it the BAR2 memory and the eventfds, notices when it goes away.
//!
//! fake-gpu is itself peer 0 (the first ID, which the spec gives the first
//! client): its N eventfds are the doorbells the guest rings. A guest gets
//! the next free ID from 1 up and its own N eventfds, which the device
//! writes to raise the guest's MSI-X vectors. One guest at a time: a GPU
//! belongs to one VM, and ivshmem cannot tell the device which peer rang a
//! doorbell. A second concurrent connection is closed at once (QEMU then
//! fails to realize the device with a read error).

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::device::{new_eventfd, Device, DeviceError, GuestLink};
use crate::layout::DEVICE_PEER_ID;
use crate::protocol::{send, PROTOCOL_VERSION, SHM_MESSAGE};
use crate::sys::poll;

/// How long a handshake may block on a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("sending to the new peer: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Sends the setup messages to a new client with ID `id` whose own
/// vectors are `vectors`.
pub fn handshake(
    stream: &UnixStream,
    device: &Device,
    id: u16,
    vectors: &[RawFd],
) -> Result<(), HandshakeError> {
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    send(stream, PROTOCOL_VERSION, None)?;
    send(stream, id.into(), None)?;
    send(stream, SHM_MESSAGE, Some(device.shm_file().as_raw_fd()))?;
    for fd in device.doorbells() {
        send(stream, DEVICE_PEER_ID.into(), Some(fd.as_raw_fd()))?;
    }
    for fd in vectors {
        send(stream, id.into(), Some(*fd))?;
    }
    Ok(())
}

/// Attaches a new guest, then sends it the setup messages. Attaching
/// first (which resets the rings) means the device is ready before the
/// client has its last setup message, so a driver can never race the
/// reset.
fn welcome(stream: &UnixStream, device: &Device, id: u16) -> Result<(), HandshakeError> {
    let vectors = (0..device.config.vectors)
        .map(|_| new_eventfd())
        .collect::<Result<Vec<EventFd>, _>>()?;
    let raw: Vec<RawFd> = vectors.iter().map(|e| e.as_raw_fd()).collect();
    device
        .attach_guest(GuestLink { id, vectors })
        .map_err(|e| HandshakeError::Io(io::Error::other(e)))?;
    // The link now owns the eventfds; only this thread detaches it, so the
    // raw fds stay valid while they are sent.
    let sent = handshake(stream, device, id, &raw);
    if sent.is_err() {
        device.detach_guest(id);
    }
    sent
}

struct Connected {
    stream: UnixStream,
    id: u16,
}

/// Serves the ivshmem socket until `stop` is signalled.
pub fn serve(listener: UnixListener, device: Arc<Device>, stop: &EventFd) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut guest: Option<Connected> = None;
    let mut next_id: u16 = 1;
    loop {
        let mut fds = vec![
            (stop.as_raw_fd(), libc::POLLIN),
            (listener.as_raw_fd(), libc::POLLIN),
        ];
        if let Some(g) = &guest {
            fds.push((g.stream.as_raw_fd(), libc::POLLIN | libc::POLLRDHUP));
        }
        let ready = poll(&fds, None)?;
        if ready[0] != 0 {
            return Ok(());
        }
        if ready.get(2).is_some_and(|r| *r != 0) {
            if let Some(g) = guest.as_mut() {
                if peer_gone(&mut g.stream) {
                    let id = g.id;
                    guest = None;
                    device.detach_guest(id);
                }
            }
        }
        if ready[1] != 0 {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    log::warn!("accept on the ivshmem socket: {e}");
                    continue;
                }
            };
            if let Some(g) = &guest {
                log::warn!(
                    "refusing a second ivshmem client: guest peer {} is connected",
                    g.id
                );
                device.stats.guests_refused.inc();
                continue;
            }
            let id = next_id;
            next_id = if next_id == u16::MAX { 1 } else { next_id + 1 };
            if let Err(e) = stream.set_nonblocking(false) {
                log::warn!("ivshmem client: {e}");
                continue;
            }
            match welcome(&stream, &device, id) {
                Ok(()) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("ivshmem client: {e}");
                        device.detach_guest(id);
                        continue;
                    }
                    log::info!(
                        "ivshmem client connected as peer {id} ({} vectors)",
                        device.config.vectors
                    );
                    guest = Some(Connected { stream, id });
                }
                Err(e) => log::warn!("ivshmem handshake with peer {id}: {e}"),
            }
        }
    }
}

/// Reads whatever the (nonblocking) client sent; true when it closed the
/// connection. Clients never send anything, so data is discarded.
fn peer_gone(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => log::debug!("ivshmem client sent {n} unexpected bytes"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}
