//! Host-side inspection of a running device through its control socket:
//! the library behind `fake-gpu inspect`, usable from tests.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::allocs::{Alloc, AllocCounts};
use crate::codec::base64_decode;
use crate::control::MAX_READ;
use crate::layout::Region;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("control socket {path}: {err}")]
    Connect { path: PathBuf, err: io::Error },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("control socket closed the connection")]
    Closed,
    #[error("bad reply from the control socket: {0}")]
    BadReply(String),
    #[error("{0}")]
    Device(String),
}

/// The control socket that goes with an ivshmem socket: `PATH.ctl` (a path
/// already ending in `.ctl` is taken as it is).
pub fn control_path(socket: &Path) -> PathBuf {
    if socket.extension().is_some_and(|e| e == "ctl") {
        return socket.to_path_buf();
    }
    let mut s = socket.as_os_str().to_os_string();
    s.push(".ctl");
    PathBuf::from(s)
}

/// Layout and identity of a device.
#[derive(Debug, Clone, Deserialize)]
pub struct Info {
    pub bar_size: u64,
    pub vram_offset: u64,
    pub vram_size: u64,
    pub staging_offset: u64,
    pub staging_size: u64,
    pub device_peer_id: u16,
    pub guest_peer_id: Option<u16>,
    pub vectors: u16,
    pub hugetlb: bool,
}

/// Result of comparing a range with a file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Comparison {
    pub equal: bool,
    pub compared: u64,
    pub differing_bytes: u64,
    /// Offset in the region of the first differing byte.
    pub first_difference: Option<u64>,
}

/// The VRAM allocations the guest driver described, and their counts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Allocs {
    /// Live allocations in VRAM order.
    pub allocs: Vec<Alloc>,
    #[serde(flatten)]
    pub counts: AllocCounts,
}

/// A connection to a device's control socket.
pub struct Inspector {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    chunk: u64,
}

impl Inspector {
    /// Connects to the control socket of the device serving `socket` (the
    /// ivshmem socket path, or the `.ctl` path itself).
    pub fn connect(socket: &Path) -> Result<Inspector, InspectError> {
        let path = control_path(socket);
        let writer = UnixStream::connect(&path).map_err(|err| InspectError::Connect {
            path: path.clone(),
            err,
        })?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Inspector {
            writer,
            reader,
            chunk: MAX_READ,
        })
    }

    /// Bytes per `read` request (1 to 16 MiB; 16 MiB by default).
    pub fn set_chunk(&mut self, bytes: u64) {
        self.chunk = bytes.clamp(1, MAX_READ);
    }

    /// Sends one request object, returns the reply (errors as `Err`).
    pub fn request(&mut self, req: &Value) -> Result<Value, InspectError> {
        writeln!(self.writer, "{req}")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(InspectError::Closed);
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| InspectError::BadReply(e.to_string()))?;
        if v["ok"] != json!(true) {
            let msg = v["error"].as_str().unwrap_or("request failed").to_string();
            return Err(InspectError::Device(msg));
        }
        Ok(v)
    }

    pub fn info(&mut self) -> Result<Info, InspectError> {
        let v = self.request(&json!({"cmd": "info"}))?;
        serde_json::from_value(v).map_err(|e| InspectError::BadReply(e.to_string()))
    }

    /// Counters and ring state, as the daemon reports them.
    pub fn stats(&mut self) -> Result<Value, InspectError> {
        self.request(&json!({"cmd": "stats"}))
    }

    /// The live VRAM allocations and their counts.
    pub fn allocs(&mut self) -> Result<Allocs, InspectError> {
        let v = self.request(&json!({"cmd": "allocs"}))?;
        serde_json::from_value(v).map_err(|e| InspectError::BadReply(e.to_string()))
    }

    /// Reads `len` bytes at `offset` of `region` (in requests of at most
    /// the chunk size).
    pub fn read(&mut self, region: Region, offset: u64, len: u64) -> Result<Vec<u8>, InspectError> {
        let mut out = Vec::new();
        self.read_with(region, offset, len, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// Streams `len` bytes at `offset` of `region` into `w`.
    pub fn dump(
        &mut self,
        region: Region,
        offset: u64,
        len: u64,
        w: &mut dyn Write,
    ) -> Result<(), InspectError> {
        self.read_with(region, offset, len, |chunk| w.write_all(chunk))
    }

    fn read_with(
        &mut self,
        region: Region,
        offset: u64,
        len: u64,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), InspectError> {
        let mut done = 0u64;
        loop {
            let n = (len - done).min(self.chunk);
            let at = offset
                .checked_add(done)
                .ok_or_else(|| InspectError::Device("offset overflows".into()))?;
            let v = self.request(&json!({
                "cmd": "read", "region": region, "offset": at, "len": n, "encoding": "base64"
            }))?;
            let data = v["data"]
                .as_str()
                .and_then(base64_decode)
                .ok_or_else(|| InspectError::BadReply("read: no base64 data".into()))?;
            if data.len() as u64 != n {
                return Err(InspectError::BadReply(format!(
                    "read: {} bytes instead of {n}",
                    data.len()
                )));
            }
            sink(&data)?;
            done += n;
            if done >= len {
                return Ok(());
            }
        }
    }

    /// CRC32C of a range, computed by the daemon.
    pub fn checksum(&mut self, region: Region, offset: u64, len: u64) -> Result<u32, InspectError> {
        let v = self.request(&json!({
            "cmd": "checksum", "region": region, "offset": offset, "len": len
        }))?;
        v["crc32c"]
            .as_u64()
            .and_then(|c| u32::try_from(c).ok())
            .ok_or_else(|| InspectError::BadReply("checksum: no crc32c".into()))
    }

    /// Compares a range with `file` from `file_offset` (`len` = the rest of
    /// the file when `None`). The daemon reads the file, so the path is
    /// made absolute here.
    pub fn compare(
        &mut self,
        region: Region,
        offset: u64,
        len: Option<u64>,
        file: &Path,
        file_offset: u64,
    ) -> Result<Comparison, InspectError> {
        let file = std::path::absolute(file)?;
        let v = self.request(&json!({
            "cmd": "compare", "region": region, "offset": offset, "len": len,
            "file": file, "file_offset": file_offset
        }))?;
        serde_json::from_value(v).map_err(|e| InspectError::BadReply(e.to_string()))
    }
}

/// Formats bytes as a classic hex dump, offsets starting at `base`.
pub fn hexdump(base: u64, data: &[u8]) -> String {
    let mut s = String::new();
    for (i, line) in data.chunks(16).enumerate() {
        s.push_str(&format!("{:012x}  ", base + 16 * i as u64));
        for j in 0..16 {
            match line.get(j) {
                Some(b) => s.push_str(&format!("{b:02x} ")),
                None => s.push_str("   "),
            }
            if j == 7 {
                s.push(' ');
            }
        }
        s.push_str(" |");
        for b in line {
            s.push(if b.is_ascii_graphic() || *b == b' ' {
                *b as char
            } else {
                '.'
            });
        }
        s.push_str("|\n");
    }
    s
}
