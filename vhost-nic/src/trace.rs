//! The descriptor flight recorder: per virtqueue, the last N chains the
//! device completed (or refused), each with its descriptors, used entries,
//! timings, header split offset and steering decision.
//!
//! Off by default; the data path then pays one relaxed atomic load per
//! queue run ([`Tracer::on`]). Dumped on demand (control socket), to the
//! log when the device meets a bad chain, and at exit.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::device::{SteerHow, SteerInfo};
use crate::inspect::ChainView;
use crate::packet::{IpAddrs, ParsedPacket, L4};

/// Entries kept per virtqueue unless asked otherwise.
pub const DEFAULT_DEPTH: usize = 256;
/// Most entries kept per virtqueue: an entry with its descriptors takes a
/// few hundred bytes, and a device has up to 34 virtqueues.
pub const MAX_DEPTH: usize = 8192;

/// A frame's 5-tuple, as far as the parser got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FlowKey {
    pub proto: Option<u8>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

impl FlowKey {
    pub fn of(p: &ParsedPacket) -> Self {
        let (src, dst) = match p.ip {
            Some(IpAddrs::V4 { src, dst }) => (Some(IpAddr::from(src)), Some(IpAddr::from(dst))),
            Some(IpAddrs::V6 { src, dst }) => (Some(IpAddr::from(src)), Some(IpAddr::from(dst))),
            None => (None, None),
        };
        let (sport, dport) = match p.l4 {
            L4::Tcp {
                src_port, dst_port, ..
            }
            | L4::Udp {
                src_port, dst_port, ..
            } => (Some(src_port), Some(dst_port)),
            _ => (None, None),
        };
        FlowKey {
            proto: p.ip_proto,
            src,
            dst,
            sport,
            dport,
        }
    }

    fn text(&self) -> String {
        let proto = match self.proto {
            Some(6) => "tcp".to_string(),
            Some(17) => "udp".to_string(),
            Some(n) => format!("proto {n}"),
            None => return "non-ip".into(),
        };
        let ep = |a: Option<IpAddr>, p: Option<u16>| match (a, p) {
            (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.to_string(),
            _ => "?".into(),
        };
        format!(
            "{proto} {} > {}",
            ep(self.src, self.sport),
            ep(self.dst, self.dport)
        )
    }
}

/// One recorded chain (or, with MRG_RXBUF, the chains of one packet).
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    pub seq: u64,
    /// Microseconds since the recorder started.
    pub t_us: u64,
    pub vq: usize,
    pub queue: String,
    /// The chains, with their descriptors (read back from the table).
    pub chains: Vec<ChainView>,
    /// `(head, len)` used entries the device published.
    pub used: Vec<(u32, u32)>,
    /// Frame length (without the virtio-net header).
    pub frame_len: usize,
    /// RX: from the frame's arrival at the device to its used entry.
    pub wait_us: Option<u64>,
    /// From taking the chain off the avail ring to the used entry.
    pub device_us: u64,
    /// Header split: length of the headers put in the header buffer.
    pub split: Option<usize>,
    pub steer: Option<SteerInfo>,
    pub flow: Option<FlowKey>,
    /// "ok", or what went wrong.
    pub outcome: String,
}

/// Selects entries in a dump.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowFilter {
    pub proto: Option<u8>,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// Either port.
    pub port: Option<u16>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("flow filter `{0}`: {1}; use KEY=VALUE,... with keys proto (tcp, udp or a number), src, dst, sport, dport, port")]
pub struct FlowFilterError(String, &'static str);

impl FlowFilter {
    pub fn parse(s: &str) -> Result<Self, FlowFilterError> {
        let mut f = FlowFilter::default();
        let bad = |why| FlowFilterError(s.to_string(), why);
        for kv in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad("not KEY=VALUE"))?;
            let port = || v.parse::<u16>().map_err(|_| bad("bad port"));
            let ip = || v.parse::<IpAddr>().map_err(|_| bad("bad IP address"));
            match k {
                "proto" => {
                    f.proto = Some(match v {
                        "tcp" => 6,
                        "udp" => 17,
                        n => n.parse().map_err(|_| bad("bad protocol"))?,
                    })
                }
                "src" => f.src = Some(ip()?),
                "dst" => f.dst = Some(ip()?),
                "sport" => f.sport = Some(port()?),
                "dport" => f.dport = Some(port()?),
                "port" => f.port = Some(port()?),
                _ => return Err(bad("unknown key")),
            }
        }
        Ok(f)
    }

    pub fn matches(&self, k: Option<&FlowKey>) -> bool {
        if *self == FlowFilter::default() {
            return true;
        }
        let Some(k) = k else {
            return false;
        };
        fn eq<T: PartialEq>(want: Option<T>, got: Option<T>) -> bool {
            want.is_none() || want == got
        }
        eq(self.proto, k.proto)
            && eq(self.src, k.src)
            && eq(self.dst, k.dst)
            && eq(self.sport, k.sport)
            && eq(self.dport, k.dport)
            && self
                .port
                .is_none_or_compat(|p| k.sport == Some(p) || k.dport == Some(p))
    }
}

/// `Option::is_none_or` for the crate's minimum Rust version.
trait IsNoneOr<T> {
    fn is_none_or_compat(&self, f: impl FnOnce(T) -> bool) -> bool;
}

impl<T: Copy> IsNoneOr<T> for Option<T> {
    fn is_none_or_compat(&self, f: impl FnOnce(T) -> bool) -> bool {
        self.map_or(true, f)
    }
}

/// The recorder of one device.
#[derive(Debug)]
pub struct Tracer {
    on: AtomicBool,
    depth: AtomicUsize,
    seq: AtomicU64,
    start: Instant,
    rings: Vec<Mutex<VecDeque<TraceEntry>>>,
    /// When the last dump to the log happened (ms since start), to keep a
    /// burst of bad chains from flooding the log.
    last_log_dump: AtomicU64,
}

impl Tracer {
    pub fn new(num_queues: usize) -> Self {
        Tracer {
            on: AtomicBool::new(false),
            depth: AtomicUsize::new(DEFAULT_DEPTH),
            seq: AtomicU64::new(0),
            start: Instant::now(),
            rings: (0..num_queues)
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            last_log_dump: AtomicU64::new(0),
        }
    }

    /// The one check the data path makes.
    #[inline]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Starts recording, keeping `depth` entries per queue (clamped to
    /// 1..=MAX_DEPTH).
    pub fn enable(&self, depth: Option<usize>) -> usize {
        let d = depth.unwrap_or(DEFAULT_DEPTH).clamp(1, MAX_DEPTH);
        self.depth.store(d, Ordering::Relaxed);
        self.on.store(true, Ordering::Release);
        d
    }

    pub fn disable(&self) {
        self.on.store(false, Ordering::Release);
    }

    pub fn clear(&self) {
        for r in &self.rings {
            r.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    pub fn micros(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX)
    }

    /// Stores `e` (its `seq` and `t_us` are filled in here).
    pub fn record(&self, mut e: TraceEntry) {
        let Some(ring) = self.rings.get(e.vq) else {
            return;
        };
        e.seq = self.seq.fetch_add(1, Ordering::Relaxed);
        e.t_us = self.micros(Instant::now());
        let depth = self.depth();
        let mut r = ring.lock().unwrap_or_else(|e| e.into_inner());
        while r.len() >= depth {
            r.pop_front();
        }
        r.push_back(e);
    }

    /// Recorded entries of `vq` (every queue with None) matching `flow`,
    /// oldest first.
    pub fn entries(&self, vq: Option<usize>, flow: &FlowFilter) -> Vec<TraceEntry> {
        let mut out: Vec<TraceEntry> = Vec::new();
        for (i, r) in self.rings.iter().enumerate() {
            if vq.is_some_and(|q| q != i) {
                continue;
            }
            let r = r.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(r.iter().filter(|e| flow.matches(e.flow.as_ref())).cloned());
        }
        out.sort_by_key(|e| e.seq);
        out
    }

    /// Whether a dump to the log is due now (at most one a second).
    pub fn log_dump_due(&self) -> bool {
        let now = self.micros(Instant::now()) / 1000;
        let last = self.last_log_dump.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1000 {
            return false;
        }
        self.last_log_dump
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// The text form of entries.
pub fn render(entries: &[TraceEntry], out: &mut String) {
    for e in entries {
        let _ = write!(
            out,
            "#{} +{}.{:06}s {} len {} used {:?} device {}us",
            e.seq,
            e.t_us / 1_000_000,
            e.t_us % 1_000_000,
            e.queue,
            e.frame_len,
            e.used,
            e.device_us
        );
        if let Some(w) = e.wait_us {
            let _ = write!(out, " wait {w}us");
        }
        if let Some(s) = e.split {
            let _ = write!(out, " split {s}");
        }
        if let Some(s) = &e.steer {
            let how = match s.how {
                SteerHow::Rss => "rss",
                SteerHow::FlowRule => "flow-rule",
                SteerHow::Auto => "auto",
            };
            let _ = write!(out, " steer {how} hash {:#010x}", s.hash);
            if let Some(r) = s.rule {
                let _ = write!(out, " rule {r}");
            }
        }
        if let Some(f) = &e.flow {
            let _ = write!(out, " {}", f.text());
        }
        let _ = writeln!(out, " {}", e.outcome);
        for c in &e.chains {
            let _ = writeln!(
                out,
                "    chain head {}{}",
                c.head,
                c.error
                    .as_ref()
                    .map_or(String::new(), |x| format!(" ERROR: {x}"))
            );
            for d in &c.descs {
                let _ = writeln!(
                    out,
                    "      {}desc {:>4} addr {:>18} len {:>6} flags {:<3} -> {}",
                    if d.indirect { "indirect " } else { "" },
                    d.index,
                    d.addr,
                    d.len,
                    d.flag_names,
                    match d.region {
                        Some(r) => format!("region {r} ({})", d.memory),
                        None => "NO REGION".into(),
                    }
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vq: usize, sport: u16) -> TraceEntry {
        TraceEntry {
            seq: 0,
            t_us: 0,
            vq,
            queue: format!("vq{vq}"),
            chains: vec![],
            used: vec![(1, 100)],
            frame_len: 88,
            wait_us: Some(5),
            device_us: 1,
            split: None,
            steer: None,
            flow: Some(FlowKey {
                proto: Some(6),
                src: Some("10.0.0.1".parse().unwrap()),
                dst: Some("10.0.0.2".parse().unwrap()),
                sport: Some(sport),
                dport: Some(80),
            }),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn bounded_per_queue_and_filtered() {
        let t = Tracer::new(2);
        assert!(!t.on());
        assert_eq!(t.enable(Some(3)), 3);
        for i in 0..5 {
            t.record(entry(0, 1000 + i));
        }
        t.record(entry(1, 2000));
        t.record(entry(7, 1)); // no such queue: ignored
        let all = t.entries(None, &FlowFilter::default());
        assert_eq!(all.len(), 4);
        assert_eq!(t.entries(Some(0), &FlowFilter::default()).len(), 3);
        let f = FlowFilter::parse("proto=tcp,sport=1004").unwrap();
        let one = t.entries(None, &f);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].seq, 4);
        let f = FlowFilter::parse("port=2000").unwrap();
        assert_eq!(t.entries(None, &f).len(), 1);
        let mut s = String::new();
        render(&one, &mut s);
        assert!(s.contains("tcp 10.0.0.1:1004 > 10.0.0.2:80 ok"), "{s}");
        t.clear();
        assert!(t.entries(None, &FlowFilter::default()).is_empty());
    }

    #[test]
    fn bad_filters() {
        for bad in ["sport", "sport=x", "src=1.2.3", "colour=red", "proto=xyz"] {
            assert!(FlowFilter::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(FlowFilter::parse("").unwrap(), FlowFilter::default());
    }
}
