//! Fault injection: make the device misbehave on purpose, per queue pair,
//! so driver authors can exercise their error paths.
//!
//! Faults are set from the command line (`--fault`) or the control socket
//! (`fault set`), as `KIND[:KEY=VALUE,...]`. With none set the data path
//! pays one relaxed atomic load per queue run ([`Faults::armed`]). Every
//! fault counts how often it fired. A fault only ever changes what the
//! device does within the rules it already enforces (lengths are clamped,
//! chains it holds are returned), so it cannot make the device panic or
//! touch memory outside the guest's buffers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::Serialize;

use crate::stats::Counter;

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Drop a fraction (`ratio`) of received packets.
    RxDrop,
    /// Take `count` receive buffers from the ring and keep them
    /// (starvation); they go back (length 0) when the fault is cleared.
    RxHold,
    /// Hold received packets back `ms` milliseconds before they reach the
    /// used ring.
    RxDelay,
    /// Publish received packets only in batches of `count` (or after `ms`).
    RxBatch,
    /// Complete transmit buffers out of order: each run's chains (up to
    /// `count` at a time) go to the used ring in reverse.
    TxReorder,
    /// Report used lengths `bytes` shorter than what was written.
    RxShort,
    /// Deliver packets with a wrong checksum and no DATA_VALID flag.
    RxBadCsum,
    /// Deliver packets unsplit although header split would split them.
    RxNoSplit,
    /// Skip interrupts the device would send (RX and TX of the pair).
    IrqSuppress,
    /// Send every interrupt twice.
    IrqDuplicate,
    /// Take the link down (config space status) until cleared.
    LinkDown,
    /// Stop processing every queue, as a device that needs a reset; the
    /// next device reset (driver reload) clears it.
    NeedsReset,
}

pub const FAULT_KINDS: [FaultKind; 12] = [
    FaultKind::RxDrop,
    FaultKind::RxHold,
    FaultKind::RxDelay,
    FaultKind::RxBatch,
    FaultKind::TxReorder,
    FaultKind::RxShort,
    FaultKind::RxBadCsum,
    FaultKind::RxNoSplit,
    FaultKind::IrqSuppress,
    FaultKind::IrqDuplicate,
    FaultKind::LinkDown,
    FaultKind::NeedsReset,
];

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RxDrop => "rx-drop",
            FaultKind::RxHold => "rx-hold",
            FaultKind::RxDelay => "rx-delay",
            FaultKind::RxBatch => "rx-batch",
            FaultKind::TxReorder => "tx-reorder",
            FaultKind::RxShort => "rx-short",
            FaultKind::RxBadCsum => "rx-bad-csum",
            FaultKind::RxNoSplit => "rx-no-split",
            FaultKind::IrqSuppress => "irq-suppress",
            FaultKind::IrqDuplicate => "irq-duplicate",
            FaultKind::LinkDown => "link-down",
            FaultKind::NeedsReset => "needs-reset",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        FAULT_KINDS.iter().copied().find(|k| k.name() == s)
    }

    /// Faults of the whole device (no `queue`).
    pub fn device_wide(self) -> bool {
        matches!(self, FaultKind::LinkDown | FaultKind::NeedsReset)
    }

    fn index(self) -> usize {
        FAULT_KINDS.iter().position(|&k| k == self).unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultError {
    #[error("unknown fault `{0}`; one of: rx-drop, rx-hold, rx-delay, rx-batch, tx-reorder, rx-short, rx-bad-csum, rx-no-split, irq-suppress, irq-duplicate, link-down, needs-reset")]
    UnknownKind(String),
    #[error("fault {kind}: `{kv}` is not KEY=VALUE")]
    NotKeyValue { kind: &'static str, kv: String },
    #[error("fault {kind}: unknown key `{key}`; keys are queue, ratio, count, ms, bytes, limit")]
    UnknownKey { kind: &'static str, key: String },
    #[error("fault {kind}: {key}=`{value}` {why}")]
    BadValue {
        kind: &'static str,
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("fault {kind} applies to the whole device: drop queue=")]
    QueueNotAllowed { kind: &'static str },
    #[error("fault {kind}: queue {queue} does not exist (the device has {pairs} queue pairs)")]
    NoSuchQueue {
        kind: &'static str,
        queue: u16,
        pairs: u16,
    },
}

/// One fault as asked for: `KIND[:queue=Q,ratio=R,count=N,ms=M,bytes=B,limit=L]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// Queue pair; None: every pair.
    pub queue: Option<u16>,
    /// Probability that the fault fires at each opportunity (0..=1).
    pub ratio: f64,
    /// rx-hold: buffers held; rx-batch: packets per batch; tx-reorder:
    /// chains reversed at a time.
    pub count: u32,
    /// rx-delay: the delay; rx-batch: the longest wait for a batch.
    pub ms: u64,
    /// rx-short: bytes cut from the used length.
    pub bytes: u32,
    /// Stop firing after this many times.
    pub limit: Option<u64>,
}

impl FaultSpec {
    pub fn parse(s: &str) -> Result<Self, FaultError> {
        let s = s.trim();
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let kind =
            FaultKind::from_name(name).ok_or_else(|| FaultError::UnknownKind(name.into()))?;
        let k = kind.name();
        let mut spec = FaultSpec {
            kind,
            queue: None,
            ratio: 1.0,
            count: match kind {
                FaultKind::RxHold => u32::MAX,
                FaultKind::RxBatch => 8,
                FaultKind::TxReorder => 4,
                _ => 0,
            },
            ms: match kind {
                FaultKind::RxDelay => 10,
                FaultKind::RxBatch => 100,
                _ => 0,
            },
            bytes: 1,
            limit: None,
        };
        for kv in args.split(',').filter(|x| !x.is_empty()) {
            let (key, value) = kv.split_once('=').ok_or_else(|| FaultError::NotKeyValue {
                kind: k,
                kv: kv.into(),
            })?;
            let bad = |key: &'static str, why: &'static str| FaultError::BadValue {
                kind: k,
                key,
                value: value.into(),
                why,
            };
            match key {
                "queue" => {
                    if kind.device_wide() {
                        return Err(FaultError::QueueNotAllowed { kind: k });
                    }
                    spec.queue = Some(
                        value
                            .parse()
                            .map_err(|_| bad("queue", "is not a queue pair number"))?,
                    )
                }
                "ratio" => {
                    let r: f64 = value.parse().map_err(|_| bad("ratio", "is not a number"))?;
                    if !(0.0..=1.0).contains(&r) {
                        return Err(bad("ratio", "must be between 0 and 1"));
                    }
                    spec.ratio = r;
                }
                "count" => {
                    spec.count = value
                        .parse()
                        .ok()
                        .filter(|&c| c > 0)
                        .ok_or_else(|| bad("count", "must be a number above 0"))?
                }
                "ms" => {
                    spec.ms = value
                        .parse()
                        .ok()
                        .filter(|&m| m <= 60_000)
                        .ok_or_else(|| bad("ms", "must be 0 to 60000"))?
                }
                "bytes" => {
                    spec.bytes = value
                        .parse()
                        .ok()
                        .filter(|&b| b > 0)
                        .ok_or_else(|| bad("bytes", "must be a number above 0"))?
                }
                "limit" => {
                    spec.limit = Some(value.parse().map_err(|_| bad("limit", "is not a number"))?)
                }
                other => {
                    return Err(FaultError::UnknownKey {
                        kind: k,
                        key: other.into(),
                    })
                }
            }
        }
        Ok(spec)
    }

    fn applies_to(&self, kind: FaultKind, pair: u16) -> bool {
        self.kind == kind && self.queue.map_or(true, |q| q == pair)
    }
}

/// A fault in force, with its own count.
#[derive(Debug, Serialize)]
pub struct ActiveFault {
    #[serde(flatten)]
    pub spec: FaultSpec,
    pub fired: Counter,
}

/// The fault state of one device.
#[derive(Debug)]
pub struct Faults {
    armed: AtomicBool,
    active: RwLock<Vec<Arc<ActiveFault>>>,
    /// Times each kind fired, over the device's life.
    fired: [Counter; FAULT_KINDS.len()],
    rng: AtomicU64,
    /// Receive chains held by rx-hold, per queue pair.
    held: Vec<Mutex<Vec<u16>>>,
    /// rx-delay / rx-batch: when the packets held back go out, per pair.
    release_at: Vec<Mutex<Option<Instant>>>,
    needs_reset: AtomicBool,
    /// The current needs-reset was reported to the frontend.
    needs_reset_reported: AtomicBool,
}

impl Faults {
    pub fn new(pairs: u16) -> Self {
        Faults {
            armed: AtomicBool::new(false),
            active: RwLock::new(Vec::new()),
            fired: Default::default(),
            rng: AtomicU64::new(0x853c_49e6_748f_ea9b),
            held: (0..pairs).map(|_| Mutex::new(Vec::new())).collect(),
            release_at: (0..pairs).map(|_| Mutex::new(None)).collect(),
            needs_reset: AtomicBool::new(false),
            needs_reset_reported: AtomicBool::new(false),
        }
    }

    /// Whether any fault is set: the one check the data path makes when
    /// none is.
    #[inline]
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Adds `spec` (replacing a fault of the same kind and queue).
    pub fn set(&self, spec: FaultSpec, pairs: u16) -> Result<(), FaultError> {
        if let Some(q) = spec.queue {
            if q >= pairs {
                return Err(FaultError::NoSuchQueue {
                    kind: spec.kind.name(),
                    queue: q,
                    pairs,
                });
            }
        }
        if spec.kind == FaultKind::NeedsReset {
            self.needs_reset_reported.store(false, Ordering::Release);
            self.needs_reset.store(true, Ordering::Release);
        }
        let mut a = self.active.write().unwrap_or_else(|e| e.into_inner());
        a.retain(|f| !(f.spec.kind == spec.kind && f.spec.queue == spec.queue));
        let f = Arc::new(ActiveFault {
            spec,
            fired: Counter::default(),
        });
        // Device-wide faults act once, when set.
        if f.spec.kind.device_wide() {
            self.count(&f);
        }
        a.push(f);
        self.armed.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes the faults of `kind` (all with None) on `queue` (every
    /// queue with None). Returns how many.
    pub fn clear(&self, kind: Option<FaultKind>, queue: Option<u16>) -> usize {
        let mut a = self.active.write().unwrap_or_else(|e| e.into_inner());
        let before = a.len();
        a.retain(|f| {
            !(kind.map_or(true, |k| f.spec.kind == k)
                && queue.map_or(true, |q| f.spec.queue == Some(q)))
        });
        if !a.iter().any(|f| f.spec.kind == FaultKind::NeedsReset) {
            self.needs_reset.store(false, Ordering::Release);
        }
        let n = before - a.len();
        drop(a);
        self.rearm();
        n
    }

    /// Recomputes `armed`: chains still held are returned by the next
    /// receive run, which needs `armed` to look at them.
    pub fn rearm(&self) {
        let a = self.active.read().unwrap_or_else(|e| e.into_inner());
        let held = self
            .held
            .iter()
            .any(|h| !h.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        self.armed.store(!a.is_empty() || held, Ordering::Release);
    }

    /// Device reset: needs-reset ends, held chains are forgotten (the
    /// rings they came from are gone); other faults stay set.
    pub fn device_reset(&self) {
        for h in &self.held {
            h.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        for r in &self.release_at {
            *r.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.clear(Some(FaultKind::NeedsReset), None);
    }

    /// A ring of `pair` was reset: the chains held from it are gone.
    pub fn ring_reset(&self, pair: u16) {
        if let Some(h) = self.held.get(usize::from(pair)) {
            h.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.armed() && self.needs_reset.load(Ordering::Acquire)
    }

    /// True once per needs-reset: the caller then reports it to the
    /// frontend (a vring error).
    pub fn take_needs_reset_report(&self) -> bool {
        self.needs_reset() && !self.needs_reset_reported.swap(true, Ordering::AcqRel)
    }

    pub fn link_down(&self) -> bool {
        self.armed() && self.find(FaultKind::LinkDown, 0).is_some()
    }

    /// The fault of `kind` in force for `pair`, if any.
    pub fn find(&self, kind: FaultKind, pair: u16) -> Option<Arc<ActiveFault>> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|f| f.spec.applies_to(kind, pair))
            .cloned()
    }

    /// Rolls the dice for `f`: true (and counted) when it fires now.
    pub fn fire(&self, f: &ActiveFault) -> bool {
        let hit = self.roll(f);
        if hit {
            self.count(f);
        }
        hit
    }

    /// Whether `f` fires now, without counting it (for faults whose effect
    /// is only known later; see [`Faults::count`]).
    pub fn roll(&self, f: &ActiveFault) -> bool {
        if f.spec.limit.is_some_and(|l| f.fired.get() >= l) {
            return false;
        }
        if f.spec.ratio < 1.0 {
            // splitmix64: cheap, lock-free, good enough for sampling.
            let mut z = self
                .rng
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
                .wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            if u >= f.spec.ratio {
                return false;
            }
        }
        true
    }

    /// Counts one firing of `f`.
    pub fn count(&self, f: &ActiveFault) {
        f.fired.inc();
        self.fired[f.spec.kind.index()].inc();
    }

    /// Finds the fault and fires it: the common case in one call.
    pub fn fires(&self, kind: FaultKind, pair: u16) -> bool {
        self.find(kind, pair).is_some_and(|f| self.fire(&f))
    }

    pub fn held(&self, pair: u16) -> Vec<u16> {
        self.held
            .get(usize::from(pair))
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// The held chains of `pair`, for the caller to use.
    pub fn held_mut(&self, pair: u16) -> Option<std::sync::MutexGuard<'_, Vec<u16>>> {
        self.held
            .get(usize::from(pair))
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn release_at(&self, pair: u16) -> Option<std::sync::MutexGuard<'_, Option<Instant>>> {
        self.release_at
            .get(usize::from(pair))
            .map(|h| h.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The chains of `pair` that rx-hold still holds, to be returned now.
    pub fn take_held(&self, pair: u16) -> Vec<u16> {
        self.held_mut(pair)
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    /// The faults in force and the totals by kind, for the control socket.
    pub fn to_json(&self) -> serde_json::Value {
        let active: Vec<_> = self
            .active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| serde_json::to_value(&**f).unwrap_or_default())
            .collect();
        let fired: serde_json::Map<_, _> = FAULT_KINDS
            .iter()
            .map(|k| (k.name().to_string(), self.fired[k.index()].get().into()))
            .collect();
        serde_json::json!({ "active": active, "fired": fired })
    }
}

/// rx-bad-csum: makes the frame's checksum wrong and tells the driver to
/// check it (no DATA_VALID, no NEEDS_CSUM). The transport checksum for TCP
/// and UDP, else the IPv4 header checksum. Returns false for frames it
/// leaves alone (GSO, no checksum to break).
pub fn corrupt_checksum(
    frame: &mut [u8],
    parsed: &crate::packet::ParsedPacket,
    hdr: &mut crate::hdr::VirtioNetHdr,
) -> bool {
    if hdr.gso_type != 0 || parsed.is_fragment {
        return false;
    }
    let off = match (parsed.ip_proto, parsed.l4_offset) {
        (Some(crate::packet::IPPROTO_TCP), Some(l4)) => l4 + 16,
        (Some(crate::packet::IPPROTO_UDP), Some(l4)) => l4 + 6,
        _ if parsed.ethertype == 0x0800 => parsed.l3_offset + 10,
        _ => return false,
    };
    let Some(field) = frame.get_mut(off..off + 2) else {
        return false;
    };
    field[0] ^= 0x55;
    field[1] ^= 0xaa;
    hdr.flags &= !((virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID
        | virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM) as u8);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        let s = FaultSpec::parse("rx-drop:queue=1,ratio=0.25").unwrap();
        assert_eq!(
            (s.kind, s.queue, s.ratio),
            (FaultKind::RxDrop, Some(1), 0.25)
        );
        let s = FaultSpec::parse("rx-hold:count=3").unwrap();
        assert_eq!((s.queue, s.count), (None, 3));
        assert_eq!(
            FaultSpec::parse("link-down").unwrap().kind,
            FaultKind::LinkDown
        );
        for (bad, want) in [
            ("rx-explode", "unknown fault"),
            ("rx-drop:ratio=2", "between 0 and 1"),
            ("rx-drop:ratio=x", "not a number"),
            ("rx-drop:queue", "KEY=VALUE"),
            ("rx-drop:colour=red", "unknown key"),
            ("rx-hold:count=0", "above 0"),
            ("link-down:queue=0", "whole device"),
            ("rx-delay:ms=999999", "0 to 60000"),
        ] {
            let e = FaultSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn ratio_and_limit() {
        let f = Faults::new(2);
        assert!(!f.armed());
        f.set(FaultSpec::parse("rx-drop:ratio=0.5").unwrap(), 2)
            .unwrap();
        assert!(f.armed());
        let fired = (0..10_000)
            .filter(|_| f.fires(FaultKind::RxDrop, 1))
            .count();
        assert!((4000..6000).contains(&fired), "{fired}");
        f.set(FaultSpec::parse("rx-drop:queue=0,limit=3").unwrap(), 2)
            .unwrap();
        // The queue-specific fault was added after the all-queue one; the
        // first match wins, so remove the latter to see the limit.
        f.clear(Some(FaultKind::RxDrop), None);
        f.set(FaultSpec::parse("rx-drop:queue=0,limit=3").unwrap(), 2)
            .unwrap();
        let fired = (0..10).filter(|_| f.fires(FaultKind::RxDrop, 0)).count();
        assert_eq!(fired, 3);
        assert!(!f.fires(FaultKind::RxDrop, 1));
        let j = f.to_json();
        assert_eq!(j["active"][0]["fired"], 3);
        assert!(j["fired"]["rx-drop"].as_u64().unwrap() >= 4003);
        assert_eq!(f.clear(None, None), 1);
        assert!(!f.armed());
    }

    #[test]
    fn bad_queue_refused_and_needs_reset_cleared_by_reset() {
        let f = Faults::new(2);
        let e = f
            .set(FaultSpec::parse("rx-drop:queue=2").unwrap(), 2)
            .unwrap_err();
        assert!(e.to_string().contains("2 queue pairs"));
        f.set(FaultSpec::parse("needs-reset").unwrap(), 2).unwrap();
        assert!(f.needs_reset());
        f.device_reset();
        assert!(!f.needs_reset());
        assert!(!f.armed());
    }
}
