//! The control socket: JSON lines for reading VRAM from the host while the
//! guest runs. One request object per line, one reply object per line;
//! every reply has `"ok": true|false` and, when false, `"error"`.
//!
//! Requests (`region` is `vram` (default), `staging` or `bar`; offsets are
//! relative to the region):
//! - `{"cmd":"info"}`: layout, peer IDs, vectors.
//! - `{"cmd":"stats"}`: counters by opcode and status, bytes, ring state,
//!   allocation counts.
//! - `{"cmd":"allocs"}`: the VRAM allocations the guest driver described
//!   (ALLOC_NOTE, FREE_NOTE) in `allocs`, with their counts.
//! - `{"cmd":"read","offset":N,"len":N,"encoding":"base64"|"hex"}`: bytes
//!   (at most [`MAX_READ`] per request) in `data`.
//! - `{"cmd":"checksum","offset":N,"len":N}`: CRC32C in `crc32c`.
//! - `{"cmd":"compare","offset":N,"file":"/abs/path","file_offset":N,"len":N}`:
//!   compares the range with a file the daemon can read (`len` defaults to
//!   the rest of the file): `equal`, `compared`, `differing_bytes`,
//!   `first_difference` (region offset or null).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::codec::{base64_encode, hex_encode};
use crate::device::Device;
use crate::engine::checksum;
use crate::layout::Region;
use crate::sys::poll;

/// Largest `read` reply, in bytes of data.
pub const MAX_READ: u64 = 16 << 20;
/// Longest request line.
const MAX_LINE: u64 = 64 * 1024;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(300);
const CHUNK: usize = 1 << 20;

fn default_region() -> Region {
    Region::Vram
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    #[default]
    Base64,
    Hex,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Info,
    Stats,
    Allocs,
    Read {
        #[serde(default = "default_region")]
        region: Region,
        offset: u64,
        len: u64,
        #[serde(default)]
        encoding: Encoding,
    },
    Checksum {
        #[serde(default = "default_region")]
        region: Region,
        offset: u64,
        len: u64,
    },
    Compare {
        #[serde(default = "default_region")]
        region: Region,
        offset: u64,
        #[serde(default)]
        len: Option<u64>,
        file: PathBuf,
        #[serde(default)]
        file_offset: u64,
    },
}

/// A range of a region, checked: its offset in BAR2.
fn span(device: &Device, region: Region, offset: u64, len: u64) -> Result<u64, String> {
    let (base, size) = region.span(&device.layout);
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(base + offset),
        _ => Err(format!(
            "range {offset:#x}+{len:#x} is outside {region:?} ({size:#x} bytes)"
        )),
    }
}

fn compare(
    device: &Device,
    region: Region,
    offset: u64,
    len: Option<u64>,
    file: &PathBuf,
    file_offset: u64,
) -> Result<Value, String> {
    let mut f = File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let flen = f
        .metadata()
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    let avail = flen.checked_sub(file_offset).ok_or_else(|| {
        format!(
            "file_offset {file_offset} is past the end of {} ({flen} bytes)",
            file.display()
        )
    })?;
    let len = len.unwrap_or(avail);
    if len > avail {
        return Err(format!(
            "{} has only {avail} bytes from offset {file_offset}, {len} asked",
            file.display()
        ));
    }
    let at = span(device, region, offset, len)?;
    f.seek(SeekFrom::Start(file_offset))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut a = vec![0u8; CHUNK];
    let mut b = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut first = None;
    let mut differing = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        device
            .shm
            .read(at + done, &mut a[..n])
            .map_err(|e| e.to_string())?;
        f.read_exact(&mut b[..n])
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if a[..n] != b[..n] {
            for (i, (x, y)) in a[..n].iter().zip(&b[..n]).enumerate() {
                if x != y {
                    differing += 1;
                    first.get_or_insert(offset + done + i as u64);
                }
            }
        }
        done += n as u64;
    }
    Ok(json!({
        "equal": differing == 0,
        "compared": len,
        "differing_bytes": differing,
        "first_difference": first,
    }))
}

/// Answers one request line.
pub fn handle(device: &Device, line: &str) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let result = match req {
        Request::Info => Ok(device.info_json()),
        Request::Stats => Ok(device.stats_json()),
        Request::Allocs => Ok(device.allocs_json()),
        Request::Read {
            region,
            offset,
            len,
            encoding,
        } => {
            if len > MAX_READ {
                Err(format!(
                    "read of {len} bytes: at most {MAX_READ} per request"
                ))
            } else {
                span(device, region, offset, len).and_then(|at| {
                    let mut buf = vec![0u8; len as usize];
                    device.shm.read(at, &mut buf).map_err(|e| e.to_string())?;
                    let data = match encoding {
                        Encoding::Base64 => base64_encode(&buf),
                        Encoding::Hex => hex_encode(&buf),
                    };
                    Ok(json!({"len": len, "data": data}))
                })
            }
        }
        Request::Checksum {
            region,
            offset,
            len,
        } => span(device, region, offset, len).and_then(|at| {
            let mut scratch = vec![0u8; CHUNK];
            let crc = checksum(&device.shm, at, len, &mut scratch).map_err(|e| e.to_string())?;
            Ok(json!({"len": len, "crc32c": crc}))
        }),
        Request::Compare {
            region,
            offset,
            len,
            file,
            file_offset,
        } => compare(device, region, offset, len, &file, file_offset),
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn serve_conn(device: Arc<Device>, stream: UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            writeln!(
                out,
                "{}",
                json!({"ok": false, "error": "request line too long"})
            )?;
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let reply = handle(&device, line);
        writeln!(out, "{reply}")?;
    }
}

/// Serves the control socket until `stop` is signalled; each connection
/// gets its own thread.
pub fn serve(listener: UnixListener, device: Arc<Device>, stop: &EventFd) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    loop {
        let ready = poll(
            &[
                (stop.as_raw_fd(), libc::POLLIN),
                (listener.as_raw_fd(), libc::POLLIN),
            ],
            None,
        )?;
        if ready[0] != 0 {
            return Ok(());
        }
        if ready[1] == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                let d = device.clone();
                thread::Builder::new()
                    .name("fake-gpu-ctl".into())
                    .spawn(move || {
                        if let Err(e) = serve_conn(d, stream) {
                            log::debug!("control connection: {e}");
                        }
                    })?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => log::warn!("accept on the control socket: {e}"),
        }
    }
}
