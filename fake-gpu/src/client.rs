//! The other end, for tests and the benchmark: an ivshmem client that
//! behaves like QEMU's ivshmem-doorbell device (receives the setup
//! messages, maps the shared memory, keeps the peers' eventfds), and a
//! minimal driver that uses the rings as a guest driver would.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::layout::{
    reg, Command, Completion, Layout, CMD_RING_ENTRIES, CONTROL_RESET, CPL_ENTRY_SIZE, MAGIC,
    VECTOR_COMPLETION, VERSION,
};
use crate::protocol::{recv, Message, MAX_PEER_ID, PROTOCOL_VERSION, SHM_MESSAGE};
use crate::shm::{SharedMemory, ShmError};
use crate::sys::poll;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("ivshmem socket: {0}")]
    Io(#[from] io::Error),
    #[error("ivshmem protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("peer {peer} has no vector {vector}")]
    NoVector { peer: u16, vector: u16 },
    #[error("not a fake-gpu BAR: magic {magic:#x}, version {version:#x}")]
    NotFakeGpu { magic: u32, version: u32 },
    #[error("command ring full")]
    RingFull,
}

/// A connect or disconnect notification.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer's next vector eventfd arrived.
    Connected {
        peer: u16,
        vector: usize,
    },
    Disconnected {
        peer: u16,
    },
}

/// An ivshmem client with its shared memory mapped.
pub struct IvshmemClient {
    stream: UnixStream,
    pub id: u16,
    pub shm: SharedMemory,
    /// Eventfds that interrupt other peers, by peer ID, vector order.
    pub peers: BTreeMap<u16, Vec<File>>,
    /// Eventfds this client is interrupted on, vector order.
    pub vectors: Vec<File>,
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

impl IvshmemClient {
    /// Connects and completes the setup: version, ID, shared memory, the
    /// other peers' vectors and `vectors` of its own.
    pub fn connect(path: &Path, vectors: usize, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        let next = |what: &str| -> Result<Message, ClientError> {
            recv(&stream)?.ok_or_else(|| protocol(format!("connection closed before {what}")))
        };
        let v = next("the version")?;
        if v.value != PROTOCOL_VERSION || v.fd.is_some() {
            return Err(protocol(format!("bad version message {}", v.value)));
        }
        let idm = next("the ID")?;
        if idm.fd.is_some() || !(0..=MAX_PEER_ID).contains(&idm.value) {
            return Err(protocol(format!("bad ID message {}", idm.value)));
        }
        let id = idm.value as u16;
        let mut shm = None;
        let mut peers: BTreeMap<u16, Vec<File>> = BTreeMap::new();
        let mut own = Vec::new();
        while shm.is_none() || own.len() < vectors {
            let m = next("the end of setup")?;
            match (m.value, m.fd) {
                (SHM_MESSAGE, Some(fd)) => {
                    if shm.is_some() {
                        return Err(protocol("second shared memory message"));
                    }
                    shm = Some(SharedMemory::from_file(fd)?);
                }
                (v, Some(fd)) if v == i64::from(id) => own.push(fd),
                (v, Some(fd)) if (0..=MAX_PEER_ID).contains(&v) => {
                    peers.entry(v as u16).or_default().push(fd)
                }
                (v, None) if (0..=MAX_PEER_ID).contains(&v) && v != i64::from(id) => {
                    peers.remove(&(v as u16));
                }
                (v, fd) => {
                    return Err(protocol(format!(
                        "unexpected message {v} (fd: {}) during setup",
                        fd.is_some()
                    )))
                }
            }
        }
        let shm = shm.ok_or_else(|| protocol("no shared memory"))?;
        stream.set_nonblocking(true)?;
        Ok(IvshmemClient {
            stream,
            id,
            shm,
            peers,
            vectors: own,
        })
    }

    /// Waits up to `timeout` for one connect/disconnect notification.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<PeerEvent>, ClientError> {
        let ready = poll(&[(self.stream.as_raw_fd(), libc::POLLIN)], Some(timeout))?;
        if ready[0] == 0 {
            return Ok(None);
        }
        self.stream.set_nonblocking(false)?;
        let m = recv(&self.stream);
        self.stream.set_nonblocking(true)?;
        let m = m?.ok_or_else(|| protocol("server closed the connection"))?;
        if !(0..=MAX_PEER_ID).contains(&m.value) {
            return Err(protocol(format!("bad notification {}", m.value)));
        }
        let peer = m.value as u16;
        Ok(Some(match m.fd {
            Some(fd) => {
                let v = self.peers.entry(peer).or_default();
                v.push(fd);
                PeerEvent::Connected {
                    peer,
                    vector: v.len() - 1,
                }
            }
            None => {
                self.peers.remove(&peer);
                PeerEvent::Disconnected { peer }
            }
        }))
    }

    /// Rings `peer`'s `vector` (what the guest's doorbell register write
    /// does through QEMU's ioeventfd).
    pub fn notify(&self, peer: u16, vector: u16) -> Result<(), ClientError> {
        let mut f = self
            .peers
            .get(&peer)
            .and_then(|v| v.get(usize::from(vector)))
            .ok_or(ClientError::NoVector { peer, vector })?;
        f.write_all(&1u64.to_ne_bytes())?;
        Ok(())
    }

    /// Waits up to `timeout` for an interrupt on our `vector`; consumes it.
    pub fn wait_vector(&self, vector: u16, timeout: Duration) -> Result<bool, ClientError> {
        let f = self
            .vectors
            .get(usize::from(vector))
            .ok_or(ClientError::NoVector {
                peer: self.id,
                vector,
            })?;
        let ready = poll(&[(f.as_raw_fd(), libc::POLLIN)], Some(timeout))?;
        if ready[0] == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from an eventfd into a local buffer.
        let n = unsafe { libc::read(f.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        Ok(n == 8)
    }
}

/// A minimal fake-gpu driver over an [`IvshmemClient`].
pub struct Driver {
    pub client: IvshmemClient,
    pub layout: Layout,
    device_peer: u16,
    prod: u32,
    cpl_cons: u32,
}

impl Driver {
    /// Checks the register page and takes the rings as the device left
    /// them (freshly reset after a connect).
    pub fn new(client: IvshmemClient) -> Result<Driver, ClientError> {
        let s = &client.shm;
        let magic = s.load_u32(reg::MAGIC)?;
        let version = s.load_u32(reg::VERSION)?;
        if magic != MAGIC || version >> 16 != VERSION >> 16 {
            return Err(ClientError::NotFakeGpu { magic, version });
        }
        let layout = Layout {
            bar_size: s.load_u64(reg::BAR_SIZE)?,
            staging_offset: s.load_u64(reg::STAGING_OFFSET)?,
            staging_size: s.load_u64(reg::STAGING_SIZE)?,
            vram_offset: s.load_u64(reg::VRAM_OFFSET)?,
            vram_size: s.load_u64(reg::VRAM_SIZE)?,
        };
        let device_peer = s.load_u32(reg::DEVICE_PEER_ID)? as u16;
        let prod = s.load_u32(reg::CMD_PROD)?;
        let cpl_cons = s.load_u32(reg::CPL_CONS)?;
        Ok(Driver {
            client,
            layout,
            device_peer,
            prod,
            cpl_cons,
        })
    }

    /// Connects to `path` as a guest with `vectors` vectors.
    pub fn connect(path: &Path, vectors: usize) -> Result<Driver, ClientError> {
        Driver::new(IvshmemClient::connect(
            path,
            vectors,
            Duration::from_secs(10),
        )?)
    }

    pub fn shm(&self) -> &SharedMemory {
        &self.client.shm
    }

    pub fn reg(&self, r: u64) -> u32 {
        self.shm().load_u32(r).unwrap_or(0)
    }

    pub fn reg64(&self, r: u64) -> u64 {
        self.shm().load_u64(r).unwrap_or(0)
    }

    /// Writes a command into the next ring slot (not yet published).
    pub fn push(&mut self, cmd: &Command) -> Result<u32, ClientError> {
        let cons = self.reg(reg::CMD_CONS);
        if self.prod.wrapping_sub(cons) >= CMD_RING_ENTRIES {
            return Err(ClientError::RingFull);
        }
        let index = self.prod;
        self.client
            .shm
            .write(Layout::cmd_entry_offset(index), &cmd.encode())?;
        self.prod = self.prod.wrapping_add(1);
        Ok(index)
    }

    /// Publishes the pushed commands (`CMD_PROD`, release).
    pub fn publish(&self) -> Result<(), ClientError> {
        Ok(self.shm().store_u32(reg::CMD_PROD, self.prod)?)
    }

    /// Writes any value to `CMD_PROD` (for malformed-ring tests); the
    /// driver's own producer count is left alone.
    pub fn write_cmd_prod(&self, v: u32) -> Result<(), ClientError> {
        Ok(self.shm().store_u32(reg::CMD_PROD, v)?)
    }

    pub fn doorbell(&self) -> Result<(), ClientError> {
        self.client.notify(self.device_peer, 0)
    }

    /// Pushes, publishes and rings.
    pub fn submit(&mut self, cmds: &[Command]) -> Result<(), ClientError> {
        for c in cmds {
            self.push(c)?;
        }
        self.publish()?;
        self.doorbell()
    }

    /// Completions posted and not yet taken.
    pub fn available(&self) -> u32 {
        self.reg(reg::CPL_PROD).wrapping_sub(self.cpl_cons)
    }

    /// Waits until `n` completions are available, sleeping on the
    /// completion vector; takes none.
    pub fn wait_available(&self, n: u32, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        while self.available() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout, "completions"));
            }
            self.client.wait_vector(VECTOR_COMPLETION, left)?;
        }
        Ok(())
    }

    /// Waits until `n` completions are available (sleeping on the
    /// completion vector), takes them and advances `CPL_CONS`.
    pub fn wait(&mut self, n: u32, timeout: Duration) -> Result<Vec<Completion>, ClientError> {
        self.wait_available(n, timeout)?;
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut raw = [0u8; CPL_ENTRY_SIZE as usize];
            self.client
                .shm
                .read(Layout::cpl_entry_offset(self.cpl_cons), &mut raw)?;
            out.push(Completion::decode(&raw));
            self.cpl_cons = self.cpl_cons.wrapping_add(1);
        }
        self.shm().store_u32(reg::CPL_CONS, self.cpl_cons)?;
        Ok(out)
    }

    /// Submits and waits for the commands' completions.
    pub fn run(
        &mut self,
        cmds: &[Command],
        timeout: Duration,
    ) -> Result<Vec<Completion>, ClientError> {
        self.submit(cmds)?;
        self.wait(cmds.len() as u32, timeout)
    }

    /// Requests a ring reset and waits for it (CONTROL.RESET cleared).
    pub fn reset(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.reset_with(0, timeout)
    }

    /// Requests a ring reset with more `CONTROL` bits set (e.g.
    /// `CONTROL_CLEAR_ALLOCS`) and waits for it.
    pub fn reset_with(&mut self, bits: u32, timeout: Duration) -> Result<(), ClientError> {
        let before = self.reg(reg::RESET_COUNT);
        self.shm().store_u32(reg::CONTROL, CONTROL_RESET | bits)?;
        self.doorbell()?;
        let deadline = Instant::now() + timeout;
        let event_vector = (self.client.vectors.len() > 1) as u16;
        while self.reg(reg::CONTROL) & CONTROL_RESET != 0 || self.reg(reg::RESET_COUNT) == before {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout, "ring reset"));
            }
            self.client.wait_vector(event_vector, left)?;
        }
        self.prod = 0;
        self.cpl_cons = 0;
        Ok(())
    }

    /// Offset in BAR2 of VRAM offset `off`.
    pub fn vram(&self, off: u64) -> u64 {
        self.layout.vram_offset + off
    }

    /// Offset in BAR2 of staging offset `off`.
    pub fn staging(&self, off: u64) -> u64 {
        self.layout.staging_offset + off
    }
}
