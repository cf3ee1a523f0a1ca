//! The ivshmem client-server protocol (QEMU docs/specs/ivshmem-spec.rst):
//! the server sends 8-byte little-endian signed numbers, each possibly with
//! one file descriptor (SCM_RIGHTS). Nothing flows from client to server.
//!
//! On connect: the protocol version (0, no fd); the client's ID (no fd);
//! -1 with the shared memory fd; for every other peer its ID N times, each
//! with the eventfd that interrupts that peer's vector 0..N-1; the client's
//! own ID N times with the eventfds it receives its interrupts on. Later: a
//! peer ID with an fd (connect, one message per vector) or without one
//! (disconnect).

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const PROTOCOL_VERSION: i64 = 0;
/// The message that carries the shared memory fd.
pub const SHM_MESSAGE: i64 = -1;
/// IDs are 16 bits: the doorbell register has 16 bits for them.
pub const MAX_PEER_ID: i64 = 65535;

/// Sends one message, with `fd` attached if given.
pub fn send(stream: &UnixStream, value: i64, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = value.to_le_bytes();
    let sent = match fd {
        Some(fd) => stream.send_with_fd(&bytes[..], fd),
        None => stream.send_with_fds::<&[u8]>(&[&bytes[..]], &[]),
    }
    .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write of an ivshmem message",
        ));
    }
    Ok(())
}

/// One message received by a client.
#[derive(Debug)]
pub struct Message {
    pub value: i64,
    pub fd: Option<File>,
}

/// Receives one message (exactly 8 bytes; the fd, if any, arrives with
/// them). `Ok(None)` on orderly end of stream before a message starts.
pub fn recv(stream: &UnixStream) -> io::Result<Option<Message>> {
    let mut buf = [0u8; 8];
    let mut got = 0usize;
    let mut fd = None;
    while got < buf.len() {
        let (n, f) = stream
            .recv_with_fd(&mut buf[got..])
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if n == 0 {
            if got == 0 && f.is_none() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "ivshmem message cut short",
            ));
        }
        if let Some(f) = f {
            if fd.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "two fds in one ivshmem message",
                ));
            }
            fd = Some(f);
        }
        got += n;
    }
    Ok(Some(Message {
        value: i64::from_le_bytes(buf),
        fd,
    }))
}
