//! The control socket: JSON lines over a UNIX socket (docs/driver-toolkit.md).
//!
//! Each request is one line `{"cmd":"...", ...}`; each reply one line,
//! `{"ok":...}` or `{"error":"..."}`. A connection may send any number of
//! requests. The bare word `stats` (what the stats socket used to take) is
//! still answered with the counters document itself, and the connection
//! closes after it, as before. Bad requests get an error reply; lines
//! that are too long, idle connections and connections beyond the limit
//! are closed. No request can stop the daemon or reach the data path other
//! than through the device's own, locked, state.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, warn};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::backend::NetBackend;
use crate::capture::{CaptureFile, CaptureFilter};
use crate::daemon::Devices;
use crate::fault::{FaultKind, FaultSpec, FAULT_KINDS};
use crate::inspect;
use crate::spec::queue_name;
use crate::trace::FlowFilter;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Connections served at once; more are refused with an error reply.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A device by position or name.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DeviceSel {
    Index(usize),
    Name(String),
}

/// A virtqueue by global index or name (rx0, tx1, ctrl, admin).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum QueueSel {
    Index(usize),
    Name(String),
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Text,
}

/// A request. `device` picks one device; without it every device answers.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Stats {
        device: Option<DeviceSel>,
    },
    Queues {
        device: Option<DeviceSel>,
        #[serde(default)]
        format: Format,
    },
    Ring {
        queue: QueueSel,
        device: Option<DeviceSel>,
        #[serde(default)]
        format: Format,
    },
    /// `set` a fault spec, or `clear` a kind (or "all"), optionally on one
    /// `queue`; with neither, list the faults.
    Fault {
        device: Option<DeviceSel>,
        set: Option<String>,
        clear: Option<String>,
        queue: Option<u16>,
    },
    /// The flight recorder: `on` (keeping `depth` entries per queue),
    /// `off`, `clear`, or `dump` (the default) filtered by `queue` and
    /// `flow`, the `last` N entries.
    Trace {
        device: Option<DeviceSel>,
        #[serde(default)]
        action: TraceAction,
        depth: Option<usize>,
        queue: Option<QueueSel>,
        flow: Option<String>,
        last: Option<usize>,
        #[serde(default)]
        format: Format,
    },
    /// pcapng capture: `start` into a new `file` (queue pair `queue`,
    /// direction `dir`, `snaplen` bytes per frame, at most `limit`
    /// packets), `stop`, or `status` (the default).
    Capture {
        device: Option<DeviceSel>,
        #[serde(default)]
        action: CaptureAction,
        file: Option<std::path::PathBuf>,
        queue: Option<u16>,
        #[serde(default)]
        dir: Direction,
        snaplen: Option<u32>,
        limit: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaptureAction {
    Start,
    Stop,
    #[default]
    Status,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Rx,
    Tx,
    #[default]
    Both,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TraceAction {
    On,
    Off,
    Clear,
    #[default]
    Dump,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot bind control socket {path}: {err}")]
    Bind {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
}

type Reply = Result<Value, String>;

fn select<'a>(
    devices: &'a Devices,
    sel: &Option<DeviceSel>,
) -> Result<Vec<&'a Arc<NetBackend>>, String> {
    let all = &devices.backends;
    match sel {
        None => Ok(all.iter().collect()),
        Some(DeviceSel::Index(i)) => all.get(*i).map(|b| vec![b]).ok_or_else(|| {
            format!(
                "no device {i}: the daemon has {} (0 to {})",
                all.len(),
                all.len().saturating_sub(1)
            )
        }),
        Some(DeviceSel::Name(n)) => all
            .iter()
            .find(|b| &b.device().opts.name == n)
            .map(|b| vec![b])
            .ok_or_else(|| {
                let names: Vec<_> = all.iter().map(|b| b.device().opts.name.clone()).collect();
                format!("no device `{n}`; devices are {}", names.join(", "))
            }),
    }
}

fn queue_index(b: &NetBackend, q: &QueueSel) -> Result<usize, String> {
    let pairs = b.device().opts.queue_pairs;
    let n = b.device().opts.num_queues();
    let names = || {
        format!(
            "virtqueues of {} are 0 to {} (rx0, tx0, ..., ctrl, admin)",
            b.device().opts.name,
            n - 1
        )
    };
    match q {
        QueueSel::Index(i) if *i < n => Ok(*i),
        QueueSel::Index(i) => Err(format!("no virtqueue {i}: {}", names())),
        QueueSel::Name(s) => (0..n)
            .find(|&i| queue_name(i, pairs) == *s || i.to_string() == *s)
            .ok_or_else(|| format!("no virtqueue `{s}`: {}", names())),
    }
}

fn per_device(
    devices: &Devices,
    sel: &Option<DeviceSel>,
    f: impl Fn(&NetBackend) -> Result<Value, String>,
) -> Reply {
    let list = select(devices, sel)?;
    let mut out = Vec::new();
    for b in list {
        let mut v = f(b)?;
        if let Value::Object(m) = &mut v {
            m.insert("name".into(), b.device().opts.name.clone().into());
        }
        out.push(v);
    }
    Ok(json!({ "devices": out }))
}

fn render_views(
    devices: &Devices,
    sel: &Option<DeviceSel>,
    one: Option<&QueueSel>,
    chains: bool,
) -> Reply {
    let mut text = String::new();
    for b in select(devices, sel)? {
        let only = one.map(|q| queue_index(b, q)).transpose()?;
        text.push_str(&format!("{}:\n", b.device().opts.name));
        for v in b.queue_views(only, chains) {
            inspect::render(&v, &mut text);
        }
    }
    Ok(Value::String(text))
}

fn fault(
    devices: &Devices,
    sel: &Option<DeviceSel>,
    set: &Option<String>,
    clear: &Option<String>,
    queue: Option<u16>,
) -> Reply {
    let targets = select(devices, sel)?;
    match (set, clear) {
        (Some(_), Some(_)) => Err("give either `set` or `clear`, not both".into()),
        (Some(s), None) => {
            let spec = FaultSpec::parse(s).map_err(|e| e.to_string())?;
            // Check every device first, so a bad queue changes nothing.
            for b in &targets {
                if let Some(q) = spec.queue {
                    if q >= b.device().opts.queue_pairs {
                        return Err(format!(
                            "device {} has {} queue pairs: no queue {q}",
                            b.device().opts.name,
                            b.device().opts.queue_pairs
                        ));
                    }
                }
            }
            for b in &targets {
                b.device()
                    .set_fault(spec.clone())
                    .map_err(|e| e.to_string())?;
            }
            Ok(json!({ "set": s, "devices": targets.len() }))
        }
        (None, Some(c)) => {
            let kind = match c.as_str() {
                "all" => None,
                name => Some(
                    FAULT_KINDS
                        .iter()
                        .copied()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| {
                            format!("unknown fault `{name}`; give a fault kind or `all`")
                        })?,
                ),
            };
            let n: usize = targets
                .iter()
                .map(|b| b.device().clear_faults(kind, queue))
                .sum();
            Ok(json!({ "cleared": n }))
        }
        (None, None) => per_device(devices, sel, |b| Ok(b.device().faults.to_json())),
    }
}

#[allow(clippy::too_many_arguments)]
fn trace(
    devices: &Devices,
    sel: &Option<DeviceSel>,
    action: TraceAction,
    depth: Option<usize>,
    queue: &Option<QueueSel>,
    flow: &Option<String>,
    last: Option<usize>,
    format: Format,
) -> Reply {
    let filter = FlowFilter::parse(flow.as_deref().unwrap_or("")).map_err(|e| e.to_string())?;
    let targets = select(devices, sel)?;
    match action {
        TraceAction::On => {
            let mut d = 0;
            for b in &targets {
                d = b.device().tracer.enable(depth);
            }
            return Ok(json!({ "tracing": true, "depth": d }));
        }
        TraceAction::Off => {
            targets.iter().for_each(|b| b.device().tracer.disable());
            return Ok(json!({ "tracing": false }));
        }
        TraceAction::Clear => {
            targets.iter().for_each(|b| b.device().tracer.clear());
            return Ok(json!({ "cleared": true }));
        }
        TraceAction::Dump => {}
    }
    let mut text = String::new();
    let mut out = Vec::new();
    for b in targets {
        let vq = queue.as_ref().map(|q| queue_index(b, q)).transpose()?;
        let t = &b.device().tracer;
        let mut entries = t.entries(vq, &filter);
        if let Some(n) = last {
            entries.drain(..entries.len().saturating_sub(n));
        }
        if format == Format::Text {
            text.push_str(&format!(
                "{}: tracing {}, {} entries\n",
                b.device().opts.name,
                if t.on() { "on" } else { "off" },
                entries.len()
            ));
            crate::trace::render(&entries, &mut text);
        } else {
            out.push(json!({
                "name": b.device().opts.name,
                "tracing": t.on(),
                "depth": t.depth(),
                "entries": entries,
            }));
        }
    }
    Ok(if format == Format::Text {
        Value::String(text)
    } else {
        json!({ "devices": out })
    })
}

/// What `capture start` asks for.
pub struct CaptureRequest<'a> {
    pub file: Option<&'a Path>,
    pub queue: Option<u16>,
    pub dir: Direction,
    pub snaplen: Option<u32>,
    pub limit: Option<u64>,
}

/// Starts a capture of the `targets` into one new file, one interface
/// each. Used by the control socket and `--capture`.
pub fn start_capture(targets: &[&Arc<NetBackend>], req: &CaptureRequest) -> Result<Value, String> {
    let file = req
        .file
        .ok_or("capture start needs `file`: a path that does not exist yet")?;
    for b in targets {
        let d = b.device();
        if let Some(q) = req.queue {
            if q >= d.opts.queue_pairs {
                return Err(format!(
                    "device {} has {} queue pairs: no queue {q}",
                    d.opts.name, d.opts.queue_pairs
                ));
            }
        }
        if let Some((path, _, _)) = d.capture.status() {
            return Err(format!(
                "device {} is already capturing into {}; stop that capture first",
                d.opts.name,
                path.display()
            ));
        }
    }
    let names: Vec<String> = targets
        .iter()
        .map(|b| b.device().opts.name.clone())
        .collect();
    let f = Arc::new(
        CaptureFile::create(file, &names, req.limit.unwrap_or(0)).map_err(|e| e.to_string())?,
    );
    let filter = CaptureFilter {
        queue: req.queue,
        rx: req.dir != Direction::Tx,
        tx: req.dir != Direction::Rx,
        snaplen: req.snaplen.unwrap_or(0),
    };
    for (i, b) in targets.iter().enumerate() {
        b.device()
            .capture
            .start(f.clone(), u32::try_from(i).unwrap_or(u32::MAX), filter);
    }
    Ok(json!({ "file": file, "interfaces": names }))
}

fn capture(
    devices: &Devices,
    sel: &Option<DeviceSel>,
    action: CaptureAction,
    req: &CaptureRequest,
) -> Reply {
    let targets = select(devices, sel)?;
    match action {
        CaptureAction::Start => start_capture(&targets, req),
        CaptureAction::Stop => {
            let mut files = Vec::new();
            for b in &targets {
                if let Some(f) = b.device().capture.stop() {
                    let p = f.path.display().to_string();
                    if !files.iter().any(|(q, _)| *q == p) {
                        files.push((p, f.packets.load(Ordering::Relaxed)));
                    }
                }
            }
            let files: Vec<_> = files
                .into_iter()
                .map(|(file, packets)| json!({ "file": file, "packets": packets }))
                .collect();
            Ok(json!({ "stopped": files }))
        }
        CaptureAction::Status => per_device(devices, sel, |b| {
            Ok(match b.device().capture.status() {
                Some((path, packets, f)) => json!({
                    "capturing": true, "file": path, "packets": packets, "filter": f,
                }),
                None => json!({ "capturing": false }),
            })
        }),
    }
}

/// Answers one request line. The second value is false when the
/// connection is to be closed after the reply (the legacy `stats` word).
pub fn handle_line(devices: &Devices, line: &str) -> (Value, bool) {
    let line = line.trim();
    if line.is_empty() || line == "stats" {
        return (devices.stats_json(), false);
    }
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            let hint = if line.starts_with('{') {
                ""
            } else {
                "; requests are JSON lines such as {\"cmd\":\"stats\"}"
            };
            return (json!({ "error": format!("bad request: {e}{hint}") }), true);
        }
    };
    let reply = match &req {
        Request::Stats { device: None } => Ok(devices.stats_json()),
        Request::Stats { device } => select(devices, device).map(|list| {
            let names: Vec<_> = list.iter().map(|b| b.device().opts.name.clone()).collect();
            let mut all = devices.stats_json();
            if let Some(Value::Array(d)) = all.get_mut("devices") {
                d.retain(|v| {
                    v["name"]
                        .as_str()
                        .is_some_and(|n| names.iter().any(|m| m == n))
                });
            }
            all
        }),
        Request::Queues {
            device,
            format: Format::Text,
        } => render_views(devices, device, None, false),
        Request::Queues { device, .. } => per_device(devices, device, |b| {
            Ok(json!({ "queues": b.queue_views(None, false) }))
        }),
        Request::Ring {
            queue,
            device,
            format: Format::Text,
        } => render_views(devices, device, Some(queue), true),
        Request::Ring { queue, device, .. } => per_device(devices, device, |b| {
            let q = queue_index(b, queue)?;
            Ok(json!({ "queues": b.queue_views(Some(q), true) }))
        }),
        Request::Fault {
            device,
            set,
            clear,
            queue,
        } => fault(devices, device, set, clear, *queue),
        Request::Trace {
            device,
            action,
            depth,
            queue,
            flow,
            last,
            format,
        } => trace(
            devices, device, *action, *depth, queue, flow, *last, *format,
        ),
        Request::Capture {
            device,
            action,
            file,
            queue,
            dir,
            snaplen,
            limit,
        } => capture(
            devices,
            device,
            *action,
            &CaptureRequest {
                file: file.as_deref(),
                queue: *queue,
                dir: *dir,
                snaplen: *snaplen,
                limit: *limit,
            },
        ),
    };
    match reply {
        Ok(v) => (json!({ "ok": v }), true),
        Err(e) => (json!({ "error": e }), true),
    }
}

/// Reads one line of at most `max` bytes. Ok(None) at end of stream;
/// Err(true) when the line is too long, Err(false) on a read error.
fn read_line<R: BufRead>(r: &mut R, max: usize, buf: &mut Vec<u8>) -> Result<Option<()>, bool> {
    buf.clear();
    let n = r
        .by_ref()
        .take(max as u64 + 1)
        .read_until(b'\n', buf)
        .map_err(|_| false)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && buf.len() > max {
        return Err(true);
    }
    Ok(Some(()))
}

fn serve_connection(conn: UnixStream, devices: &Devices) {
    let _ = conn.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut buf = Vec::new();
    loop {
        match read_line(&mut reader, MAX_LINE, &mut buf) {
            Ok(None) | Err(false) => return,
            Err(true) => {
                let e = json!({ "error": format!("request line longer than {MAX_LINE} bytes; closing") });
                let _ = writeln!(out, "{e}");
                return;
            }
            Ok(Some(())) => {}
        }
        let (reply, keep) = match std::str::from_utf8(&buf) {
            Ok(line) => handle_line(devices, line),
            Err(_) => (json!({ "error": "request is not UTF-8" }), true),
        };
        if writeln!(out, "{reply}").is_err() || !keep {
            return;
        }
    }
}

/// Binds `path` (replacing a stale socket) and serves it on a thread.
pub fn start(path: &Path, devices: Arc<Devices>) -> Result<(), ControlError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|err| ControlError::Bind {
        path: path.to_path_buf(),
        err,
    })?;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || serve(listener, devices))
        .map_err(|err| ControlError::Bind {
            path: path.to_path_buf(),
            err,
        })?;
    Ok(())
}

fn serve(listener: UnixListener, devices: Arc<Devices>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("control socket: accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let e = json!({ "error": format!("more than {MAX_CONNECTIONS} control connections; try again later") });
            let _ = writeln!(conn, "{e}");
            continue;
        }
        let (d, a) = (devices.clone(), active.clone());
        let spawned = thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                serve_connection(conn, &d);
                a.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            debug!("control socket: cannot start a connection thread: {e}");
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Names every fault kind, for help texts.
pub fn fault_kinds() -> String {
    FAULT_KINDS
        .iter()
        .map(|k: &FaultKind| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeviceOptions, MacAddr};

    fn devices() -> Devices {
        let opt = |name: &str, last: u8| DeviceOptions {
            name: name.into(),
            socket: format!("/nonexistent/{name}.sock").into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, last]),
            queue_pairs: 2,
            ..crate::config::tests::options()
        };
        Devices::build(vec![opt("nic0", 1), opt("nic1", 2)]).unwrap()
    }

    fn ask(d: &Devices, line: &str) -> Value {
        handle_line(d, line).0
    }

    fn error(d: &Devices, line: &str) -> String {
        let v = ask(d, line);
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{line}: no error in {v}"))
            .to_string()
    }

    #[test]
    fn legacy_stats_word_and_json_stats() {
        let d = devices();
        let (v, keep) = handle_line(&d, "stats\n");
        assert!(!keep);
        assert_eq!(v["devices"][1]["name"], "nic1");
        assert!(v["devices"][0]["queues"][0]["rx_packets"].is_u64());
        let (v, keep) = handle_line(&d, r#"{"cmd":"stats"}"#);
        assert!(keep);
        assert_eq!(v["ok"]["devices"].as_array().unwrap().len(), 2);
        let v = ask(&d, r#"{"cmd":"stats","device":"nic1"}"#);
        assert_eq!(v["ok"]["devices"].as_array().unwrap().len(), 1);
        assert_eq!(v["ok"]["devices"][0]["name"], "nic1");
    }

    #[test]
    fn queues_and_ring() {
        let d = devices();
        let v = ask(&d, r#"{"cmd":"queues","device":0}"#);
        let qs = &v["ok"]["devices"][0]["queues"];
        assert_eq!(qs.as_array().unwrap().len(), 6);
        assert_eq!(qs[4]["name"], "ctrl");
        assert_eq!(qs[0]["ready"], false);
        let v = ask(&d, r#"{"cmd":"ring","queue":"tx1","device":"nic0"}"#);
        let q = &v["ok"]["devices"][0]["queues"][0];
        assert_eq!(q["index"], 3);
        assert!(q["chains"].is_array());
        let v = ask(&d, r#"{"cmd":"ring","queue":2,"format":"text"}"#);
        let text = v["ok"].as_str().unwrap();
        assert!(
            text.contains("nic0:") && text.contains("vq  2 rx1"),
            "{text}"
        );
    }

    #[test]
    fn malformed_requests_get_errors() {
        let d = devices();
        for (line, want) in [
            ("garbage", "requests are JSON lines"),
            ("{", "bad request"),
            ("[]", "bad request"),
            ("{}", "missing field `cmd`"),
            (r#"{"cmd":"reboot"}"#, "unknown variant `reboot`"),
            (r#"{"cmd":7}"#, "bad request"),
            (
                r#"{"cmd":"stats","colour":"red"}"#,
                "unknown field `colour`",
            ),
            (r#"{"cmd":"ring"}"#, "missing field `queue`"),
            (r#"{"cmd":"ring","queue":6}"#, "no virtqueue 6"),
            (r#"{"cmd":"ring","queue":-1}"#, "bad request"),
            (r#"{"cmd":"ring","queue":"rx9"}"#, "no virtqueue `rx9`"),
            (
                r#"{"cmd":"ring","queue":99999999999999999999999}"#,
                "bad request",
            ),
            (r#"{"cmd":"queues","device":5}"#, "no device 5"),
            (
                r#"{"cmd":"queues","device":"eth0"}"#,
                "devices are nic0, nic1",
            ),
            (
                r#"{"cmd":"queues","format":"xml"}"#,
                "unknown variant `xml`",
            ),
            (r#"{"cmd":"fault","set":"boom"}"#, "unknown fault"),
            (r#"{"cmd":"fault","set":"rx-drop:queue=2"}"#, "no queue 2"),
            (r#"{"cmd":"fault","set":"x","clear":"y"}"#, "not both"),
            (r#"{"cmd":"fault","clear":"boom"}"#, "unknown fault"),
            (r#"{"cmd":"fault","queue":70000}"#, "bad request"),
        ] {
            let e = error(&d, line);
            assert!(e.contains(want), "{line}: {e}");
        }
        // Still serving.
        assert!(ask(&d, r#"{"cmd":"stats"}"#)["ok"].is_object());
    }

    #[test]
    fn faults_set_list_clear() {
        let d = devices();
        let v = ask(
            &d,
            r#"{"cmd":"fault","set":"rx-drop:queue=1,ratio=0.5","device":"nic1"}"#,
        );
        assert_eq!(v["ok"]["devices"], 1);
        let v = ask(&d, r#"{"cmd":"fault"}"#);
        assert!(v["ok"]["devices"][0]["active"]
            .as_array()
            .unwrap()
            .is_empty());
        assert_eq!(v["ok"]["devices"][1]["active"][0]["kind"], "rx-drop");
        let v = ask(&d, r#"{"cmd":"fault","set":"link-down"}"#);
        assert_eq!(v["ok"]["devices"], 2);
        // Without the hooks, faults are listed but do not act.
        if crate::device::TOOLKIT_HOOKS {
            assert!(!d.backends[0].device().link_up());
        }
        let v = ask(&d, r#"{"cmd":"fault","clear":"all"}"#);
        assert_eq!(v["ok"]["cleared"], 3);
        assert!(d.backends[0].device().link_up());
        assert!(!d.backends[1].device().faults.armed());
    }

    #[test]
    fn long_lines_are_cut() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut r = std::io::Cursor::new(long);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut r, MAX_LINE, &mut buf), Err(true));
        let mut r = std::io::Cursor::new(b"{\"cmd\":\"stats\"}\nrest".to_vec());
        assert_eq!(read_line(&mut r, MAX_LINE, &mut buf), Ok(Some(())));
        assert_eq!(read_line(&mut r, MAX_LINE, &mut buf), Ok(Some(())));
        assert_eq!(buf, b"rest");
        assert_eq!(read_line(&mut r, MAX_LINE, &mut buf), Ok(None));
    }
}
