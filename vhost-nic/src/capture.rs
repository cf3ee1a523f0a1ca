//! Packet capture to pcapng: the frames the guest receives and sends, one
//! interface per device, each packet with its direction (epb_flags) and a
//! comment naming the queue, RSS hash, steering, flow rule and header split
//! offset, e.g. `queue=rx1 hash=0x91a21f9b steer=rss rule=- split=54`.
//!
//! Off by default; the data path then pays one relaxed atomic load per
//! queue run. The file is only ever created new (an existing file is not
//! overwritten), and writes are buffered and flushed after each queue run.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::device::{SteerHow, SteerInfo};

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const EPB: u32 = 6;
const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const EPB_FLAGS: u16 = 2;
const LINKTYPE_ETHERNET: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot create capture file {path}: {err} (the file must not exist yet)")]
    Create { path: PathBuf, err: std::io::Error },
    #[error("cannot write capture file {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
}

/// Which packets a device captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CaptureFilter {
    /// Queue pair; None: all.
    pub queue: Option<u16>,
    pub rx: bool,
    pub tx: bool,
    /// Bytes kept of each frame; 0: all.
    pub snaplen: u32,
}

/// One open pcapng file, shared by the devices writing into it.
#[derive(Debug)]
pub struct CaptureFile {
    pub path: PathBuf,
    out: Mutex<BufWriter<File>>,
    pub packets: AtomicU64,
    /// Stop after this many packets (0: no limit).
    limit: u64,
    /// A write failed: the capture stops (the data path never waits on it).
    failed: AtomicBool,
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn option(buf: &mut Vec<u8>, code: u16, value: &[u8]) {
    buf.extend_from_slice(&code.to_le_bytes());
    // Options longer than 64 KiB cannot be written; callers keep them short.
    buf.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
    let n = value.len().min(usize::from(u16::MAX));
    buf.extend_from_slice(&value[..n]);
    buf.extend(std::iter::repeat(0).take(pad4(n)));
}

/// Wraps `body` into a block of `kind`.
fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    // 12 bytes of framing; body is padded by its builder.
    let total = u32::try_from(body.len() + 12).unwrap_or(u32::MAX);
    let mut b = Vec::with_capacity(body.len() + 12);
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&total.to_le_bytes());
    b
}

impl CaptureFile {
    /// Creates `path` with one interface per name in `interfaces`.
    pub fn create(path: &Path, interfaces: &[String], limit: u64) -> Result<Self, CaptureError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|err| CaptureError::Create {
                path: path.to_path_buf(),
                err,
            })?;
        let mut out = BufWriter::new(file);
        let mut shb = Vec::new();
        shb.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
        shb.extend_from_slice(&1u16.to_le_bytes());
        shb.extend_from_slice(&0u16.to_le_bytes());
        shb.extend_from_slice(&(-1i64).to_le_bytes());
        option(&mut shb, SHB_USERAPPL, b"vhost-nic");
        option(&mut shb, OPT_END, &[]);
        let mut bytes = block(SHB, &shb);
        for name in interfaces {
            let mut idb = Vec::new();
            idb.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
            idb.extend_from_slice(&0u16.to_le_bytes());
            idb.extend_from_slice(&0u32.to_le_bytes());
            option(&mut idb, IF_NAME, name.as_bytes());
            option(&mut idb, OPT_END, &[]);
            bytes.extend(block(IDB, &idb));
        }
        let werr = |err| CaptureError::Write {
            path: path.to_path_buf(),
            err,
        };
        out.write_all(&bytes).map_err(werr)?;
        out.flush().map_err(werr)?;
        Ok(CaptureFile {
            path: path.to_path_buf(),
            out: Mutex::new(out),
            packets: AtomicU64::new(0),
            limit,
            failed: AtomicBool::new(false),
        })
    }

    fn write_packet(&self, iface: u32, inbound: bool, frame: &[u8], snaplen: u32, comment: &str) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        if self.limit > 0 && self.packets.load(Ordering::Relaxed) >= self.limit {
            return;
        }
        let cap = match snaplen {
            0 => frame.len(),
            n => frame.len().min(n as usize),
        };
        let us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut epb = Vec::with_capacity(cap + 64 + comment.len());
        epb.extend_from_slice(&iface.to_le_bytes());
        epb.extend_from_slice(&((us >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(us as u32).to_le_bytes());
        // Frames are at most MAX_FRAME bytes, far below 4 GiB.
        epb.extend_from_slice(&u32::try_from(cap).unwrap_or(u32::MAX).to_le_bytes());
        epb.extend_from_slice(&u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes());
        epb.extend_from_slice(&frame[..cap]);
        epb.extend(std::iter::repeat(0).take(pad4(cap)));
        let dir: u32 = if inbound { 1 } else { 2 };
        option(&mut epb, EPB_FLAGS, &dir.to_le_bytes());
        option(&mut epb, OPT_COMMENT, comment.as_bytes());
        option(&mut epb, OPT_END, &[]);
        let b = block(EPB, &epb);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.write_all(&b).is_err() {
            self.failed.store(true, Ordering::Relaxed);
            log::warn!(
                "capture {}: write failed; capture stopped",
                self.path.display()
            );
            return;
        }
        self.packets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if out.flush().is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
    }
}

/// The capture state of one device.
#[derive(Debug, Default)]
pub struct Capture {
    on: AtomicBool,
    target: RwLock<Option<(Arc<CaptureFile>, u32, CaptureFilter)>>,
}

/// What a captured packet is annotated with.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketNote {
    pub steer: Option<SteerInfo>,
    /// Header split: length of the headers in the header buffer.
    pub split: Option<usize>,
}

impl Capture {
    /// The one check the data path makes.
    #[inline]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Starts writing into `file` as interface `iface`.
    pub fn start(&self, file: Arc<CaptureFile>, iface: u32, filter: CaptureFilter) {
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = Some((file, iface, filter));
        self.on.store(true, Ordering::Release);
    }

    /// Stops; returns the file it wrote into, flushed.
    pub fn stop(&self) -> Option<Arc<CaptureFile>> {
        self.on.store(false, Ordering::Release);
        let t = self
            .target
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        t.map(|(f, _, _)| {
            f.flush();
            f
        })
    }

    /// The file, interface and filter in use.
    pub fn status(&self) -> Option<(PathBuf, u64, CaptureFilter)> {
        self.target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(f, _, flt)| (f.path.clone(), f.packets.load(Ordering::Relaxed), *flt))
    }

    /// Records one frame of queue pair `pair`, if the filter takes it.
    pub fn packet(&self, pair: u16, inbound: bool, frame: &[u8], note: PacketNote) {
        let t = self.target.read().unwrap_or_else(|e| e.into_inner());
        let Some((file, iface, f)) = t.as_ref() else {
            return;
        };
        if f.queue.is_some_and(|q| q != pair) || !(if inbound { f.rx } else { f.tx }) {
            return;
        }
        let comment = comment(pair, inbound, &note);
        file.write_packet(*iface, inbound, frame, f.snaplen, &comment);
    }

    /// Flushes buffered packets (after a queue run).
    pub fn flush(&self) {
        if let Some((file, _, _)) = self
            .target
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            file.flush();
        }
    }
}

fn comment(pair: u16, inbound: bool, note: &PacketNote) -> String {
    let dir = if inbound { "rx" } else { "tx" };
    let mut s = format!("queue={dir}{pair}");
    if let Some(st) = &note.steer {
        let how = match st.how {
            SteerHow::Rss => "rss",
            SteerHow::FlowRule => "flow-rule",
            SteerHow::Auto => "auto",
        };
        s.push_str(&format!(" hash={:#010x} steer={how}", st.hash));
        match st.rule {
            Some(r) => s.push_str(&format!(" rule={r}")),
            None => s.push_str(" rule=-"),
        }
    }
    if inbound {
        match note.split {
            Some(n) => s.push_str(&format!(" split={n}")),
            None => s.push_str(" split=-"),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vhost-nic-cap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    #[test]
    fn blocks_are_well_formed() {
        let p = tmp("blocks");
        let f = Arc::new(CaptureFile::create(&p, &["nic0".into(), "nic1".into()], 0).unwrap());
        let c = Capture::default();
        assert!(!c.on());
        c.start(
            f.clone(),
            1,
            CaptureFilter {
                queue: None,
                rx: true,
                tx: false,
                snaplen: 0,
            },
        );
        let note = PacketNote {
            steer: Some(SteerInfo {
                how: SteerHow::Rss,
                hash: 0xabcd,
                rule: Some(3),
            }),
            split: Some(54),
        };
        c.packet(1, true, &[0x11; 61], note);
        c.packet(1, false, &[0x22; 60], note); // TX not selected
        c.stop();
        let b = std::fs::read(&p).unwrap();
        // Walk the blocks: each total length is repeated at its end.
        let mut o = 0;
        let mut kinds = Vec::new();
        while o < b.len() {
            let (kind, len) = (u32_at(&b, o), u32_at(&b, o + 4) as usize);
            assert_eq!(len % 4, 0);
            assert_eq!(u32_at(&b, o + len - 4) as usize, len);
            kinds.push(kind);
            if kind == EPB {
                assert_eq!(u32_at(&b, o + 8), 1, "interface");
                assert_eq!(u32_at(&b, o + 20), 61);
                let text = String::from_utf8_lossy(&b[o..o + len]);
                assert!(
                    text.contains("queue=rx1 hash=0x0000abcd steer=rss rule=3 split=54"),
                    "{text}"
                );
            }
            o += len;
        }
        assert_eq!(kinds, [SHB, IDB, IDB, EPB]);
        assert_eq!(f.packets.load(Ordering::Relaxed), 1);
        // Never overwrites.
        assert!(CaptureFile::create(&p, &[], 0).is_err());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn limit_and_snaplen() {
        let p = tmp("limit");
        let f = Arc::new(CaptureFile::create(&p, &["nic0".into()], 2).unwrap());
        let c = Capture::default();
        let all = CaptureFilter {
            queue: Some(0),
            rx: true,
            tx: true,
            snaplen: 20,
        };
        c.start(f.clone(), 0, all);
        for _ in 0..5 {
            c.packet(0, false, &[0; 100], PacketNote::default());
        }
        c.packet(1, false, &[0; 100], PacketNote::default());
        c.stop();
        assert_eq!(f.packets.load(Ordering::Relaxed), 2);
        let len = std::fs::metadata(&p).unwrap().len();
        // Two EPBs of 20 captured bytes each, not 100.
        assert!(len < 400, "{len}");
        let _ = std::fs::remove_file(&p);
    }
}
