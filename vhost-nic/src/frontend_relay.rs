//! A relay between the vhost-user frontend (QEMU) and the vhost-user-backend
//! machinery, so that stock QEMU's `-netdev vhost-user` can attach.
//!
//! QEMU's virtio-net sends VHOST_USER_SET_VRING_ENABLE while it attaches a
//! vhost-user netdev (when the device is realized and at every device
//! reset), before any VHOST_USER_SET_FEATURES. The rust-vmm `vhost` crate
//! refuses SET_VRING_ENABLE until VHOST_USER_F_PROTOCOL_FEATURES has been
//! acked, and vhost-user-backend then drops the connection; libvhost-user
//! and DPDK accept the early enable.
//!
//! So the daemon accepts the frontend itself and gives the backend one end
//! of a private in-process connection ([`backend_channel`]); [`run`] copies
//! every message, with its file descriptors, between the two. Toward the
//! backend it holds back SET_VRING_ENABLE until a SET_FEATURES carrying
//! PROTOCOL_FEATURES has gone through: the requested state is recorded per
//! ring, acknowledged to the frontend itself when the frontend asked for a
//! reply (REPLY_ACK), and replayed to the backend right after that
//! SET_FEATURES. Every other message passes unchanged.
//!
//! Only control messages cross the relay: rings live in guest memory and
//! kicks and calls are eventfds handed to the backend, so the data path
//! never goes through it.
//!
//! The frontend is untrusted: a header announcing more than
//! [`MAX_PAYLOAD`] bytes, more than [`MAX_FDS`] descriptors, or a malformed
//! SET_VRING_ENABLE that the relay would have to hold ends the connection
//! with an error. Buffers are bounded and reused.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use log::{debug, info};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
    MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user message header: request, flags, payload size (u32 each, in
/// the host's byte order).
pub const HDR_LEN: usize = 12;
/// Largest payload relayed: the vhost crate's own limit, which is above the
/// largest message of the protocol (a 256-byte config read plus header).
pub const MAX_PAYLOAD: usize = MAX_MSG_SIZE;
/// Most descriptors one message may carry, as in the vhost crate.
pub const MAX_FDS: usize = MAX_ATTACHED_FD_ENTRIES;
/// Payload of SET_VRING_ENABLE: struct vhost_vring_state (index, num).
const VRING_STATE_LEN: usize = 8;

const SET_FEATURES: u32 = FrontendReq::SET_FEATURES as u32;
const SET_PROTOCOL_FEATURES: u32 = FrontendReq::SET_PROTOCOL_FEATURES as u32;
const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
const SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
/// Protocol version 1, the only one defined.
const VERSION_1: u32 = 0x1;

/// Which end of the relay a message or error belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Frontend,
    Backend,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Frontend => "frontend",
            Side::Backend => "backend",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{side}: {err}")]
    Io { side: Side, err: io::Error },
    #[error("{0} closed the connection in the middle of a message")]
    Truncated(Side),
    #[error("{side} sent a message with a {size}-byte payload (at most {MAX_PAYLOAD})")]
    TooBig { side: Side, size: u32 },
    #[error("{0} attached more than {MAX_FDS} file descriptors to a message")]
    TooManyFds(Side),
    #[error("malformed SET_VRING_ENABLE from the frontend: {0}")]
    BadVringEnable(&'static str),
    #[error("cannot set up the backend's private connection: {0}")]
    Channel(io::Error),
    #[error("another process connected to the backend's private socket")]
    ForeignConnection,
}

fn io_err(side: Side) -> impl Fn(io::Error) -> RelayError {
    move |err| RelayError::Io { side, err }
}

/// A listener for `VhostUserDaemon::start` with exactly one connection
/// queued, and the relay's end of that connection.
///
/// The listener has a random name in the abstract socket namespace (no file
/// to clean up); once the backend has accepted, check with
/// [`check_sole_connection`] and drop it.
pub fn backend_channel() -> Result<(Listener, UnixStream), RelayError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS's randomness: the name cannot be
    // guessed, so no other process can queue a connection in between.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let name = format!(
        "vhost-nic/{}/{}/{random:016x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(RelayError::Channel)?;
    let listener = UnixListener::bind_addr(&addr).map_err(RelayError::Channel)?;
    let ours = UnixStream::connect_addr(&addr).map_err(RelayError::Channel)?;
    Ok((Listener::from(listener), ours))
}

/// After the backend accepted from a [`backend_channel`] listener: fails if
/// a connection is still queued there, i.e. the backend may have accepted
/// someone else's instead of the relay's.
pub fn check_sole_connection(listener: &Listener) -> Result<(), RelayError> {
    let other = |e: vhost::vhost_user::Error| RelayError::Channel(io::Error::other(e));
    listener.set_nonblocking(true).map_err(other)?;
    match listener.accept().map_err(other)? {
        Some(_) => Err(RelayError::ForeignConnection),
        None => Ok(()),
    }
}

/// One vhost-user message with its descriptors. The payload buffer is
/// reused from message to message.
struct Message {
    hdr: [u8; HDR_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn new() -> Self {
        Message {
            hdr: [0; HDR_LEN],
            payload: Vec::with_capacity(MAX_PAYLOAD),
            fds: Vec::with_capacity(MAX_FDS),
        }
    }

    fn field(&self, i: usize) -> u32 {
        let b = &self.hdr[4 * i..4 * i + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(1)
    }

    fn size(&self) -> u32 {
        self.field(2)
    }

    /// The payload as one u64 (SET_FEATURES, SET_PROTOCOL_FEATURES).
    fn u64_payload(&self) -> Option<u64> {
        let b: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some(u64::from_ne_bytes(b))
    }

    /// Reads the next message; `Ok(false)` when the peer closed the
    /// connection between two messages.
    fn read(&mut self, sock: &UnixStream, side: Side) -> Result<bool, RelayError> {
        self.fds.clear();
        if !read_with_fds(sock, side, &mut self.hdr, &mut self.fds)? {
            return Ok(false);
        }
        let size = self.size();
        if size as usize > MAX_PAYLOAD {
            return Err(RelayError::TooBig { side, size });
        }
        self.payload.resize(size as usize, 0);
        if !read_with_fds(sock, side, &mut self.payload, &mut self.fds)? {
            return Err(RelayError::Truncated(side));
        }
        Ok(true)
    }

    fn write(&self, sock: &UnixStream, side: Side) -> Result<(), RelayError> {
        let fds: Vec<RawFd> = self.fds.iter().map(AsRawFd::as_raw_fd).collect();
        write_with_fds(sock, side, &self.hdr, &self.payload, &fds)
    }
}

/// Fills `buf` from `sock`, collecting the descriptors that come with it.
/// Returns false if the peer closed before the first byte.
fn read_with_fds(
    sock: &UnixStream,
    side: Side,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<bool, RelayError> {
    let mut got = 0;
    while got < buf.len() {
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec covers `rest`, a live, mutably borrowed part of
        // `buf`, and the kernel writes at most `rest.len()` bytes there.
        let r = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
        match r {
            Ok((n, nfds)) => {
                for &fd in raw.iter().take(nfds) {
                    // SAFETY: recvmsg just created these descriptors for this
                    // process; nothing else owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                if fds.len() > MAX_FDS {
                    return Err(RelayError::TooManyFds(side));
                }
                if n == 0 {
                    return if got == 0 {
                        Ok(false)
                    } else {
                        Err(RelayError::Truncated(side))
                    };
                }
                got += n;
            }
            Err(e) if e.errno() == libc::EINTR => {}
            // recvmsg's control buffer was too small: vmm-sys-util closed them.
            Err(e) if e.errno() == libc::ENOBUFS => return Err(RelayError::TooManyFds(side)),
            Err(e) => {
                return Err(RelayError::Io {
                    side,
                    err: e.into(),
                })
            }
        }
    }
    Ok(true)
}

/// Sends header and payload with one sendmsg carrying the descriptors, as
/// vhost-user peers expect them: with the first byte of the message.
fn write_with_fds(
    sock: &UnixStream,
    side: Side,
    hdr: &[u8],
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), RelayError> {
    let total = hdr.len() + payload.len();
    let mut sent = 0;
    let mut fds = fds;
    while sent < total {
        let (h, p) = if sent < hdr.len() {
            (&hdr[sent..], payload)
        } else {
            (&hdr[..0], &payload[sent - hdr.len()..])
        };
        match sock.send_with_fds(&[h, p], fds) {
            Ok(0) => {
                return Err(RelayError::Io {
                    side,
                    err: io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => {
                sent += n;
                fds = &[];
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => {
                return Err(RelayError::Io {
                    side,
                    err: e.into(),
                })
            }
        }
    }
    Ok(())
}

fn header(request: u32, flags: u32, size: usize) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0..4].copy_from_slice(&request.to_ne_bytes());
    h[4..8].copy_from_slice(&flags.to_ne_bytes());
    h[8..12].copy_from_slice(&(size as u32).to_ne_bytes());
    h
}

/// The frontend-to-backend state the relay keeps: what the backend would
/// accept right now, and the ring enables it has not been given yet.
struct EnableGate {
    num_queues: usize,
    /// The last SET_FEATURES carried PROTOCOL_FEATURES: the backend takes
    /// SET_VRING_ENABLE (the vhost crate checks exactly this).
    protocol_features: bool,
    /// REPLY_ACK was set by SET_PROTOCOL_FEATURES: NEED_REPLY gets an ack.
    reply_ack: bool,
    /// Ring states requested while held back, by vring index.
    held: Vec<Option<bool>>,
}

/// A well-formed SET_VRING_ENABLE.
fn parse_vring_enable(msg: &Message, num_queues: usize) -> Result<(u32, bool), RelayError> {
    let flags = msg.flags();
    if flags & VhostUserHeaderFlag::VERSION.bits() != VERSION_1 {
        return Err(RelayError::BadVringEnable("protocol version is not 1"));
    }
    if flags & VhostUserHeaderFlag::REPLY.bits() != 0 {
        return Err(RelayError::BadVringEnable("marked as a reply"));
    }
    if msg.payload.len() != VRING_STATE_LEN {
        return Err(RelayError::BadVringEnable("payload is not 8 bytes"));
    }
    let p = &msg.payload;
    let index = u32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
    let num = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
    if index as usize >= num_queues {
        return Err(RelayError::BadVringEnable("no such vring"));
    }
    match num {
        0 => Ok((index, false)),
        1 => Ok((index, true)),
        _ => Err(RelayError::BadVringEnable("state is neither 0 nor 1")),
    }
}

fn vring_enable_message(index: u32, enable: bool) -> [u8; HDR_LEN + VRING_STATE_LEN] {
    let mut m = [0u8; HDR_LEN + VRING_STATE_LEN];
    m[..HDR_LEN].copy_from_slice(&header(SET_VRING_ENABLE, VERSION_1, VRING_STATE_LEN));
    m[HDR_LEN..HDR_LEN + 4].copy_from_slice(&index.to_ne_bytes());
    m[HDR_LEN + 4..].copy_from_slice(&u32::from(enable).to_ne_bytes());
    m
}

/// Copies frontend messages to the backend until either side closes,
/// holding back early ring enables (see the module documentation).
/// `ring_state(index, enabled)` is told each ring state the backend is
/// given, before it is given; `backend_req` gets a copy of the backend
/// request channel the frontend hands over.
fn frontend_to_backend(
    frontend: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
    backend: &UnixStream,
    gate: &mut EnableGate,
    name: &str,
    ring_state: &mut dyn FnMut(u32, bool),
    backend_req: &mut dyn FnMut(OwnedFd),
) -> Result<(), RelayError> {
    let mut msg = Message::new();
    while msg.read(frontend, Side::Frontend)? {
        match msg.request() {
            SET_VRING_ENABLE if !gate.protocol_features => {
                let (index, enable) = parse_vring_enable(&msg, gate.num_queues)?;
                debug!("{name}: SET_VRING_ENABLE {index} {enable} before SET_FEATURES: held");
                if let Some(slot) = gate.held.get_mut(index as usize) {
                    *slot = Some(enable);
                }
                let need_reply = msg.flags() & VhostUserHeaderFlag::NEED_REPLY.bits() != 0;
                if need_reply && gate.reply_ack {
                    let flags = VhostUserHeaderFlag::REPLY.bits() | VERSION_1;
                    let hdr = header(SET_VRING_ENABLE, flags, 8);
                    let sock = to_frontend.lock().unwrap_or_else(|e| e.into_inner());
                    write_with_fds(&sock, Side::Frontend, &hdr, &0u64.to_ne_bytes(), &[])?;
                }
                continue;
            }
            SET_VRING_ENABLE => {
                // Malformed ones go through: the backend refuses them itself.
                if let Ok((index, enable)) = parse_vring_enable(&msg, gate.num_queues) {
                    ring_state(index, enable);
                }
            }
            SET_BACKEND_REQ_FD => {
                // The vhost crate keeps the channel but sends nothing on it;
                // the device uses this copy for config-change notices.
                if let Some(fd) = msg.fds.first().and_then(|f| f.try_clone().ok()) {
                    backend_req(fd);
                }
            }
            SET_PROTOCOL_FEATURES => {
                if let Some(v) = msg.u64_payload() {
                    gate.reply_ack = v & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
                }
            }
            _ => {}
        }
        msg.write(backend, Side::Backend)?;
        if msg.request() != SET_FEATURES {
            continue;
        }
        let Some(features) = msg.u64_payload() else {
            continue;
        };
        gate.protocol_features = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if !gate.protocol_features {
            continue;
        }
        let held: Vec<(u32, bool)> = gate
            .held
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.take().map(|e| (i as u32, e)))
            .collect();
        if !held.is_empty() {
            info!(
                "{name}: giving the backend {} ring enable(s) the frontend sent before SET_FEATURES",
                held.len()
            );
        }
        // Without NEED_REPLY: the backend answers nothing, so the frontend
        // sees exactly the replies it asked for.
        for (index, enable) in held {
            ring_state(index, enable);
            let m = vring_enable_message(index, enable);
            write_with_fds(backend, Side::Backend, &m, &[], &[])?;
        }
    }
    Ok(())
}

/// Copies backend messages (replies) to the frontend until either side
/// closes.
fn backend_to_frontend(
    backend: &UnixStream,
    to_frontend: &Mutex<UnixStream>,
) -> Result<(), RelayError> {
    let mut msg = Message::new();
    while msg.read(backend, Side::Backend)? {
        let sock = to_frontend.lock().unwrap_or_else(|e| e.into_inner());
        msg.write(&sock, Side::Frontend)?;
    }
    Ok(())
}

fn shutdown_both(a: &UnixStream, b: &UnixStream) {
    let _ = a.shutdown(std::net::Shutdown::Both);
    let _ = b.shutdown(std::net::Shutdown::Both);
}

/// Relays one frontend connection to the backend's end of a
/// [`backend_channel`] until either side closes it, then shuts both down
/// (so the backend sees the frontend leave, and the other way round).
/// `num_queues` bounds the vring indices the relay records;
/// `ring_state(index, enabled)` learns each ring state handed to the
/// backend, `backend_req` the backend request channel (a copy). A clean
/// close by either side is `Ok`.
pub fn run(
    name: &str,
    frontend: UnixStream,
    backend: UnixStream,
    num_queues: usize,
    mut ring_state: impl FnMut(u32, bool),
    mut backend_req: impl FnMut(OwnedFd),
) -> Result<(), RelayError> {
    let to_frontend = Arc::new(Mutex::new(
        frontend.try_clone().map_err(io_err(Side::Frontend))?,
    ));
    let backend_rx = backend.try_clone().map_err(io_err(Side::Backend))?;
    let replies = {
        let to_frontend = to_frontend.clone();
        let (f, b) = (
            frontend.try_clone().map_err(io_err(Side::Frontend))?,
            backend.try_clone().map_err(io_err(Side::Backend))?,
        );
        thread::Builder::new()
            .name(format!("{name}-replies"))
            .spawn(move || {
                let r = backend_to_frontend(&backend_rx, &to_frontend);
                shutdown_both(&f, &b);
                r
            })
            .map_err(RelayError::Channel)?
    };
    let mut gate = EnableGate {
        num_queues,
        protocol_features: false,
        reply_ack: false,
        held: vec![None; num_queues],
    };
    let requests = frontend_to_backend(
        &frontend,
        &to_frontend,
        &backend,
        &mut gate,
        name,
        &mut ring_state,
        &mut backend_req,
    );
    shutdown_both(&frontend, &backend);
    let replies = replies.join().unwrap_or_else(|_| {
        Err(RelayError::Channel(io::Error::other(
            "relay thread panicked",
        )))
    });
    requests.and(replies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const NEED_REPLY: u32 = 0x8;
    const REPLY: u32 = 0x4;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    const REPLY_ACK: u64 = 1 << 3;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = header(request, flags, payload.len()).to_vec();
        m.extend_from_slice(payload);
        m
    }

    fn enable(index: u32, on: bool, flags: u32) -> Vec<u8> {
        let mut p = index.to_ne_bytes().to_vec();
        p.extend_from_slice(&u32::from(on).to_ne_bytes());
        msg(SET_VRING_ENABLE, flags, &p)
    }

    fn read_msg(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; HDR_LEN];
        s.read_exact(&mut h).unwrap();
        let f = |i: usize| u32::from_ne_bytes(h[4 * i..4 * i + 4].try_into().unwrap());
        let mut p = vec![0u8; f(2) as usize];
        s.read_exact(&mut p).unwrap();
        (f(0), f(1), p)
    }

    /// A relay between two socket pairs: (frontend peer, backend peer,
    /// relay thread, ring states seen).
    struct Rig {
        fe: UnixStream,
        be: UnixStream,
        relay: thread::JoinHandle<Result<(), RelayError>>,
        states: Arc<Mutex<Vec<(u32, bool)>>>,
    }

    fn rig() -> Rig {
        let (fe, fe_relay) = UnixStream::pair().unwrap();
        let (be, be_relay) = UnixStream::pair().unwrap();
        let states = Arc::new(Mutex::new(Vec::new()));
        let s = states.clone();
        let relay = thread::spawn(move || {
            run(
                "t",
                fe_relay,
                be_relay,
                4,
                move |i, e| s.lock().unwrap().push((i, e)),
                |fd| {
                    // A copy of the backend request channel: say hello on it.
                    let s = UnixStream::from(fd);
                    let _ = (&s).write_all(b"hi");
                },
            )
        });
        for s in [&fe, &be] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
        }
        Rig {
            fe,
            be,
            relay,
            states,
        }
    }

    #[test]
    fn early_enable_is_acked_held_and_replayed() {
        let mut r = rig();
        r.fe.write_all(&msg(SET_PROTOCOL_FEATURES, 1, &REPLY_ACK.to_ne_bytes()))
            .unwrap();
        assert_eq!(read_msg(&mut r.be).0, SET_PROTOCOL_FEATURES);
        r.fe.write_all(&enable(0, true, 1 | NEED_REPLY)).unwrap();
        r.fe.write_all(&enable(3, false, 1)).unwrap();
        let (req, flags, p) = read_msg(&mut r.fe);
        assert_eq!((req, flags), (SET_VRING_ENABLE, REPLY | 1));
        assert_eq!(p, 0u64.to_ne_bytes());
        // Nothing reached the backend yet; SET_FEATURES and the replay do.
        r.fe.write_all(&msg(SET_FEATURES, 1, &PROTOCOL_FEATURES.to_ne_bytes()))
            .unwrap();
        assert_eq!(read_msg(&mut r.be).0, SET_FEATURES);
        assert_eq!(
            read_msg(&mut r.be),
            (SET_VRING_ENABLE, 1, {
                let mut v = 0u32.to_ne_bytes().to_vec();
                v.extend_from_slice(&1u32.to_ne_bytes());
                v
            })
        );
        let (req, flags, p) = read_msg(&mut r.be);
        assert_eq!(
            (req, flags, &p[..4]),
            (SET_VRING_ENABLE, 1, &3u32.to_ne_bytes()[..])
        );
        // From now on enables pass straight through, replies come back.
        r.fe.write_all(&enable(1, true, 1 | NEED_REPLY)).unwrap();
        assert_eq!(read_msg(&mut r.be).1, 1 | NEED_REPLY);
        r.be.write_all(&msg(SET_VRING_ENABLE, REPLY | 1, &0u64.to_ne_bytes()))
            .unwrap();
        assert_eq!(read_msg(&mut r.fe).1, REPLY | 1);
        assert_eq!(
            *r.states.lock().unwrap(),
            [(0, true), (3, false), (1, true)]
        );
        drop(r.fe);
        assert!(r.relay.join().unwrap().is_ok());
        let mut rest = Vec::new();
        assert_eq!(r.be.read_to_end(&mut rest).unwrap(), 0, "backend sees EOF");
    }

    #[test]
    fn no_ack_without_reply_ack() {
        let mut r = rig();
        r.fe.write_all(&enable(0, true, 1 | NEED_REPLY)).unwrap();
        r.fe.write_all(&msg(SET_FEATURES, 1, &PROTOCOL_FEATURES.to_ne_bytes()))
            .unwrap();
        assert_eq!(read_msg(&mut r.be).0, SET_FEATURES);
        assert_eq!(read_msg(&mut r.be).0, SET_VRING_ENABLE);
        drop(r.fe);
        assert!(r.relay.join().unwrap().is_ok());
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let r = rig();
        let (a, _b) = UnixStream::pair().unwrap();
        let m = msg(FrontendReq::SET_VRING_KICK as u32, 1, &0u64.to_ne_bytes());
        r.fe.send_with_fds(&[&m[..]], &[a.as_raw_fd(), a.as_raw_fd()])
            .unwrap();
        let mut buf = [0u8; HDR_LEN + 8];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers `buf`.
        let (n, nfds) = unsafe { r.be.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (HDR_LEN + 8, 2));
        assert_eq!(buf.to_vec(), m);
        for fd in &fds[..2] {
            // SAFETY: received just now, owned here.
            drop(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
        drop(r.fe);
        assert!(r.relay.join().unwrap().is_ok());
    }

    #[test]
    fn backend_request_channel_is_copied() {
        let r = rig();
        let (a, b) = UnixStream::pair().unwrap();
        let m = msg(FrontendReq::SET_BACKEND_REQ_FD as u32, 1, &[]);
        r.fe.send_with_fds(&[&m[..]], &[a.as_raw_fd()]).unwrap();
        drop(a);
        // The backend still gets the message and its descriptor.
        let mut buf = [0u8; HDR_LEN];
        let mut fds = [-1; 4];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers `buf`.
        let (n, nfds) = unsafe { r.be.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!((n, nfds), (HDR_LEN, 1));
        // SAFETY: received just now, owned here.
        drop(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        // And the relay's copy reached the callback.
        b.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut hi = [0u8; 2];
        (&b).read_exact(&mut hi).unwrap();
        assert_eq!(&hi, b"hi");
        drop(r.fe);
        assert!(r.relay.join().unwrap().is_ok());
    }

    #[test]
    fn malformed_frontend_messages_end_the_connection() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("huge size", header(1, 1, u32::MAX as usize).to_vec()),
            (
                "size over the limit",
                header(1, 1, MAX_PAYLOAD + 1).to_vec(),
            ),
            ("short enable", msg(SET_VRING_ENABLE, 1, &[0, 0, 0, 0])),
            ("enable of a vring that does not exist", enable(4, true, 1)),
            ("enable state 2", {
                let mut p = 0u32.to_ne_bytes().to_vec();
                p.extend_from_slice(&2u32.to_ne_bytes());
                msg(SET_VRING_ENABLE, 1, &p)
            }),
            ("enable as a reply", enable(0, true, REPLY | 1)),
            ("truncated message", header(1, 1, 100).to_vec()),
        ];
        for (what, bytes) in cases {
            let mut r = rig();
            r.fe.write_all(&bytes).unwrap();
            if what == "truncated message" {
                r.fe.shutdown(std::net::Shutdown::Write).unwrap();
            }
            let res = r.relay.join().unwrap();
            assert!(res.is_err(), "{what}: relay ended with {res:?}");
            let mut rest = Vec::new();
            assert_eq!(r.be.read_to_end(&mut rest).unwrap(), 0, "{what}");
            assert!(rest.is_empty(), "{what}: backend got {rest:?}");
        }
    }

    #[test]
    fn too_many_descriptors_end_the_connection() {
        let r = rig();
        let (a, _b) = UnixStream::pair().unwrap();
        let fds = vec![a.as_raw_fd(); MAX_FDS + 1];
        let m = msg(FrontendReq::SET_MEM_TABLE as u32, 1, &[0; 8]);
        r.fe.send_with_fds(&[&m[..]], &fds).unwrap();
        assert!(matches!(
            r.relay.join().unwrap(),
            Err(RelayError::TooManyFds(Side::Frontend))
        ));
    }

    #[test]
    fn backend_channel_hands_over_one_connection() {
        let (listener, mut ours) = backend_channel().unwrap();
        let theirs = listener.accept().unwrap().unwrap();
        check_sole_connection(&listener).unwrap();
        (&theirs).write_all(b"hello").unwrap();
        let mut b = [0u8; 5];
        ours.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
    }
}
