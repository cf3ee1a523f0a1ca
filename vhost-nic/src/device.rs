//! The NIC itself: negotiated state, receive steering, per-queue backlogs
//! and the queue processing loops. The vhost-user glue (backend.rs) and the
//! ports call into this; nothing here knows about sockets.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::Instant;

use log::{debug, warn};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::admin::AdminDevice;
use crate::capture::{Capture, PacketNote};
use crate::config::DeviceOptions;
use crate::ctrl::{self, ControlState, CtrlLimits, GUEST_OFFLOAD_BITS};
use crate::fault::{ActiveFault, FaultKind, FaultSpec, Faults};
use crate::hdr::{VirtioNetHdr, HDR_HASH_LEN, HDR_LEN};
use crate::inspect;
use crate::memory::RegionClassifier;
use crate::offload::{self, PeerOffloads};
use crate::packet::{self, ParsedPacket, ETH_HLEN};
use crate::port::Port;
use crate::request::{self, ChainBuf};
use crate::rss;
use crate::rx::{RxDrop, RxLayout, RxOutcome, RxPacket, RxReport, RxWriter};
use crate::spec::*;
use crate::stats::{Counter, DeviceStats, DropReason, QueueStats, RSS_HASH_BUCKETS};
use crate::trace::{FlowFilter, FlowKey, TraceEntry, Tracer};

pub type GuestMemoryMmapB = GuestMemoryMmap<()>;
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmapB>;

/// Packets waiting per receive queue before the device drops (a NIC's RX
/// FIFO); bounds memory whatever the peer sends.
pub const RX_BACKLOG_PACKETS: usize = 1024;
/// Largest frame the device accepts from the guest or a port: 64 KiB of GSO
/// payload plus headers.
pub const MAX_FRAME: usize = 65536 + 256;
/// Largest control or admin request the device reads.
pub const MAX_CTRL_REQUEST: usize = 64 * 1024;
/// Chains handled per queue per wakeup, so one busy queue cannot starve
/// the others served by the same worker.
pub const BUDGET: usize = 256;

/// Whether the driver toolkit's data-path hooks are compiled in. Without
/// the `toolkit-hooks` feature every hook check below is a constant false
/// and the compiler drops what it guards: the device as if the toolkit did
/// not exist, the baseline its off cost is measured against.
pub const TOOLKIT_HOOKS: bool = cfg!(feature = "toolkit-hooks");

/// A frame accepted by steering, waiting for receive buffers.
#[derive(Debug)]
pub struct PendingRx {
    pub frame: Vec<u8>,
    pub hdr: VirtioNetHdr,
    pub parsed: ParsedPacket,
    pub steer: SteerInfo,
    /// Per-packet faults were rolled already (a packet waiting for
    /// buffers is not faulted twice).
    pub faulted: bool,
    /// When the frame reached the device (only while tracing).
    pub arrived: Option<Instant>,
}

/// Why a received frame went to its queue, kept for traces and captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SteerInfo {
    pub how: SteerHow,
    /// The hash steering computed (0 when none was).
    pub hash: u32,
    /// The flow filter rule that matched, if any.
    pub rule: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SteerHow {
    Rss,
    FlowRule,
    Auto,
}

/// The receive side of one queue pair as seen from other threads.
pub struct RxBacklog {
    pending: Mutex<VecDeque<PendingRx>>,
    /// Wakes the worker serving this queue pair.
    pub wake: EventFd,
}

/// Where steering sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steered {
    Queue(u16),
    Dropped(DropReason),
}

pub struct NetDevice {
    pub opts: DeviceOptions,
    offered: u64,
    acked: AtomicU64,
    event_idx: AtomicBool,
    mem: RwLock<Option<GuestMem>>,
    regions: RwLock<Arc<RegionClassifier>>,
    control: RwLock<ControlState>,
    admin: RwLock<AdminDevice>,
    link_up: AtomicBool,
    /// Vrings the frontend enabled (VHOST_USER_SET_VRING_ENABLE), one bit
    /// per vring index. Without a control queue this is how the driver's
    /// queue pair count reaches the device.
    vrings_enabled: AtomicU64,
    backlogs: Vec<RxBacklog>,
    port: OnceLock<Arc<dyn Port>>,
    /// Key used for automatic steering before the driver configures RSS.
    default_rss_key: rss::ToeplitzKey,
    pub queue_stats: Vec<QueueStats>,
    pub stats: DeviceStats,
    pub faults: Faults,
    pub tracer: Tracer,
    pub capture: Capture,
    /// The frontend's backend request channel (VHOST_USER_SET_BACKEND_REQ_FD),
    /// for config-change notices.
    backend_channel: Mutex<Option<std::os::unix::net::UnixStream>>,
}

impl NetDevice {
    pub fn new(opts: DeviceOptions) -> std::io::Result<Self> {
        let pairs = usize::from(opts.queue_pairs);
        let mut backlogs = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            backlogs.push(RxBacklog {
                pending: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK)?,
            });
        }
        Ok(NetDevice {
            offered: opts.offered_features(),
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            regions: RwLock::new(Arc::new(RegionClassifier::default())),
            control: RwLock::new(ControlState::new(opts.mac, 0)),
            admin: RwLock::new(AdminDevice::new(crate::flow_filter::FfLimits::default())),
            link_up: AtomicBool::new(true),
            vrings_enabled: AtomicU64::new(0),
            backlogs,
            port: OnceLock::new(),
            default_rss_key: rss::ToeplitzKey::new(&DEFAULT_RSS_KEY)
                .map_err(std::io::Error::other)?,
            queue_stats: (0..pairs).map(|_| QueueStats::default()).collect(),
            stats: DeviceStats::default(),
            faults: Faults::new(opts.queue_pairs),
            tracer: Tracer::new(opts.num_queues()),
            capture: Capture::default(),
            backend_channel: Mutex::new(None),
            opts,
        })
    }

    /// The data path's check for the flight recorder (see TOOLKIT_HOOKS).
    #[inline]
    fn tracing(&self) -> bool {
        TOOLKIT_HOOKS && self.tracer.on()
    }

    /// The data path's check for a packet capture.
    #[inline]
    fn capturing(&self) -> bool {
        TOOLKIT_HOOKS && self.capture.on()
    }

    /// The data path's check for injected faults.
    #[inline]
    pub fn faults_armed(&self) -> bool {
        TOOLKIT_HOOKS && self.faults.armed()
    }

    /// Whether any of trace, capture and faults is on. The queue loops
    /// check this once per run and otherwise take their instance without
    /// the hooks, the same code as a build without the toolkit-hooks
    /// feature: checks in the loop, even never taken, changed what the
    /// compiler inlined there and cost 2-3% of the packet rate.
    #[inline]
    fn toolkit_active(&self) -> bool {
        self.tracing() || self.capturing() || self.faults_armed()
    }

    /// Connects the device to its port; done once, after both ends of a
    /// wire exist.
    pub fn attach_port(&self, port: Arc<dyn Port>) {
        if self.port.set(port).is_err() {
            warn!("{}: port attached twice, keeping the first", self.opts.name);
        }
    }

    pub fn port(&self) -> Option<&Arc<dyn Port>> {
        self.port.get()
    }

    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    pub fn acked_features(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    pub fn has_feature(&self, b: u32) -> bool {
        self.acked_features() & bit(b) != 0
    }

    /// The driver's feature choice. Bits the device did not offer are
    /// ignored (the vhost-user frontend already refuses them).
    ///
    /// Frontends send the features each time a driver starts the device
    /// (QEMU: at DRIVER_OK), so this also starts a fresh driver session:
    /// control and admin state go back to their reset values. That is the
    /// device reset a driver reload expects, without VHOST_USER_RESET_DEVICE,
    /// which QEMU's vhost-user-net follows with ring enables before the
    /// features are set again.
    pub fn set_acked_features(&self, features: u64) {
        let features = features & self.offered;
        self.reset();
        self.acked.store(features, Ordering::Release);
        // Without PROTOCOL_FEATURES the frontend never enables rings: the
        // backend enables them all now (vhost-user "ring states").
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.vrings_enabled.store(u64::MAX, Ordering::Release);
        }
        let mut c = self.control.write().unwrap_or_else(|e| e.into_inner());
        c.guest_offloads = features & GUEST_OFFLOAD_BITS;
        if let Some(port) = self.port.get() {
            port.guest_offloads_changed(self, c.guest_offloads);
        }
    }

    /// The frontend enabled or disabled vring `index`.
    pub fn set_vring_enabled(&self, index: u32, enabled: bool) {
        let Some(b) = 1u64.checked_shl(index) else {
            return;
        };
        if enabled {
            self.vrings_enabled.fetch_or(b, Ordering::AcqRel);
        } else {
            self.vrings_enabled.fetch_and(!b, Ordering::AcqRel);
        }
        debug!("{}: vring {index} enabled: {enabled}", self.opts.name);
    }

    /// A new frontend connection: every vring starts disabled.
    pub fn clear_vring_states(&self) {
        self.vrings_enabled.store(0, Ordering::Release);
    }

    /// Queue pairs whose receive vring is enabled, one bit per pair.
    pub fn enabled_rx_pairs(&self) -> u32 {
        let rings = self.vrings_enabled.load(Ordering::Acquire);
        (0..self.opts.queue_pairs)
            .filter(|&p| rings & (1u64 << rx_index(p)) != 0)
            .fold(0u32, |m, p| m | (1 << p))
    }

    /// The receive queue for a frame with `hash` when nothing else steers
    /// it. With a control queue the driver said how many pairs it uses;
    /// without one (stock QEMU's virtio-net-pci keeps the control queue and
    /// turns `ethtool -L` into ring enables) the enabled receive rings are
    /// the pairs in use.
    fn automatic_queue(&self, hash: u32, control: &ControlState) -> u16 {
        if self.has_feature(VIRTIO_NET_F_CTRL_VQ) {
            return (hash % u32::from(control.active_pairs.max(1))) as u16;
        }
        let mut pairs = self.enabled_rx_pairs();
        if pairs == 0 {
            return 0;
        }
        for _ in 0..hash % pairs.count_ones() {
            pairs &= pairs - 1;
        }
        pairs.trailing_zeros() as u16
    }

    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// Device reset: back to the state after power-on, keeping the options.
    pub fn reset(&self) {
        self.acked.store(0, Ordering::Release);
        *self.control.write().unwrap_or_else(|e| e.into_inner()) =
            ControlState::new(self.opts.mac, 0);
        *self.admin.write().unwrap_or_else(|e| e.into_inner()) =
            AdminDevice::new(crate::flow_filter::FfLimits::default());
        for b in &self.backlogs {
            b.pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        self.faults.device_reset();
    }

    /// Receive chains of virtqueue `index` that the device holds (rx-hold).
    pub fn held_chains(&self, index: usize) -> Vec<u16> {
        match queue_role(index, self.opts.queue_pairs) {
            Some(QueueRole::Rx(p)) => self.faults.held(p),
            _ => Vec::new(),
        }
    }

    /// Sets a fault (see fault.rs) and applies its immediate effects.
    pub fn set_fault(&self, spec: FaultSpec) -> Result<(), crate::fault::FaultError> {
        let link = self.link_up();
        self.faults.set(spec, self.opts.queue_pairs)?;
        self.link_changed(link);
        self.wake_all_rx();
        Ok(())
    }

    /// Clears faults; held chains go back and delayed packets out on the
    /// next receive run, which this starts.
    pub fn clear_faults(&self, kind: Option<FaultKind>, queue: Option<u16>) -> usize {
        let link = self.link_up();
        let n = self.faults.clear(kind, queue);
        self.link_changed(link);
        self.wake_all_rx();
        n
    }

    /// The link status in the config space moved from `before`: tell the
    /// driver, as a NIC raises a config interrupt.
    fn link_changed(&self, before: bool) {
        if self.link_up() != before && !self.notify_config() {
            debug!(
                "{}: no backend channel: the driver sees the link change when it next reads the config space",
                self.opts.name
            );
        }
    }

    /// The frontend's backend request channel, or None when it goes.
    pub fn set_backend_channel(&self, channel: Option<std::os::unix::net::UnixStream>) {
        *self
            .backend_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = channel;
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no reply asked): the
    /// frontend raises a config interrupt. False without a channel or when
    /// the send fails.
    pub fn notify_config(&self) -> bool {
        use std::io::Write;
        const CONFIG_CHANGE_MSG: u32 = 2;
        const VERSION_1: u32 = 1;
        let mut msg = [0u8; 12];
        msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_ne_bytes());
        msg[4..8].copy_from_slice(&VERSION_1.to_ne_bytes());
        let ch = self
            .backend_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(sock) = ch.as_ref() else {
            return false;
        };
        let _ = sock.set_write_timeout(Some(std::time::Duration::from_secs(1)));
        match (&*sock).write_all(&msg) {
            Ok(()) => {
                self.stats.config_notifications.inc();
                true
            }
            Err(e) => {
                warn!(
                    "{}: cannot send a config-change notice: {e}",
                    self.opts.name
                );
                false
            }
        }
    }

    fn wake_all_rx(&self) {
        for p in 0..self.opts.queue_pairs {
            self.wake_rx(p);
        }
    }

    pub fn set_memory(&self, mem: GuestMem) {
        let classifier = RegionClassifier::new(&*mem.memory());
        *self.regions.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(classifier);
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.stats.memory_updates.inc();
    }

    pub fn memory(&self) -> Option<GuestMem> {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn regions(&self) -> Arc<RegionClassifier> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn control(&self) -> RwLockReadGuard<'_, ControlState> {
        self.control.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn admin(&self) -> RwLockReadGuard<'_, AdminDevice> {
        self.admin.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn link_up(&self) -> bool {
        self.link_up_with::<true>()
    }

    /// link_up, ignoring the link faults unless HOOKS (the data path asks
    /// once per frame).
    #[inline]
    fn link_up_with<const HOOKS: bool>(&self) -> bool {
        // One check of the faults when none is set (each of the fault
        // queries would check `armed` again).
        self.link_up.load(Ordering::Acquire)
            && !(HOOKS && self.faults_armed() && self.fault_link_down())
    }

    /// link-down or needs-reset is set.
    #[cold]
    #[inline(never)]
    fn fault_link_down(&self) -> bool {
        self.faults.link_down() || self.faults.needs_reset()
    }

    pub fn set_link(&self, up: bool) {
        self.link_up.store(up, Ordering::Release);
    }

    /// Config space bytes `offset..offset+size`; out-of-range reads get an
    /// empty answer, which the frontend reports as an error.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mac = self.control().mac;
        let space = self.opts.config_space(mac, self.link_up());
        let (start, len) = (offset as usize, size as usize);
        match start.checked_add(len) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// Config writes: only the MAC is writable, and only for drivers
    /// without CTRL_MAC_ADDR (legacy behaviour the spec keeps).
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigWriteError> {
        let start = offset as usize;
        let end = start.checked_add(data.len()).ok_or(ConfigWriteError)?;
        if end > CFG_MAC + 6 || self.has_feature(VIRTIO_NET_F_CTRL_MAC_ADDR) {
            self.stats.config_writes_rejected.inc();
            return Err(ConfigWriteError);
        }
        let mut c = self.control.write().unwrap_or_else(|e| e.into_inner());
        c.mac.0[start..end].copy_from_slice(data);
        Ok(())
    }

    /// Frames waiting for receive buffers on `pair`.
    pub fn backlog_len(&self, pair: u16) -> usize {
        self.backlogs.get(usize::from(pair)).map_or(0, |b| {
            b.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
        })
    }

    pub fn backlog(&self, pair: u16) -> Option<&RxBacklog> {
        self.backlogs.get(usize::from(pair))
    }

    pub fn vnet_hdr_len(&self) -> usize {
        if self.has_feature(VIRTIO_NET_F_HASH_REPORT) {
            HDR_HASH_LEN
        } else {
            HDR_LEN
        }
    }

    /// What the guest accepts in received frames, for the sender to decide
    /// whether to complete checksums and segment in software.
    pub fn receive_offloads(&self) -> PeerOffloads {
        PeerOffloads::from_guest_features(self.control().guest_offloads)
    }

    /// Receive steering for one frame arriving from the port: receive
    /// filter, then flow filter, then RSS (or automatic steering), as the
    /// virtio spec orders them. Frames the guest cannot take as they are
    /// (offloads it did not enable) are completed or segmented here. Returns
    /// the queue woken, without signalling it: the caller batches wakeups.
    pub fn ingress(&self, frame: Vec<u8>, hdr: VirtioNetHdr) -> Steered {
        let q0 = &self.queue_stats[0];
        if !self.link_up() || self.acked_features() & bit(VIRTIO_F_VERSION_1) == 0 {
            q0.rx_drops.count(DropReason::PortDown);
            return Steered::Dropped(DropReason::PortDown);
        }
        let max_plain = usize::from(self.opts.mtu) + ETH_HLEN + 8;
        let gso = hdr.gso_type != 0;
        if frame.len() < ETH_HLEN || frame.len() > if gso { MAX_FRAME } else { max_plain } {
            q0.rx_drops.count(DropReason::BadLength);
            return Steered::Dropped(DropReason::BadLength);
        }
        let parsed = packet::parse(&frame);
        let control = self.control();
        if !control.accepts(&parsed.dst_mac) {
            q0.rx_drops.count(DropReason::MacFilter);
            return Steered::Dropped(DropReason::MacFilter);
        }
        let mut hdr_out = VirtioNetHdr {
            num_buffers: 0,
            hash_value: 0,
            hash_report: 0,
            ..hdr
        };
        let mut queue = None;
        let mut steer = SteerInfo {
            how: SteerHow::Auto,
            hash: 0,
            rule: None,
        };
        if let Some((action, rule)) = self.admin().flow_filter().classify(&frame, &parsed) {
            steer.rule = Some(rule);
            match action {
                crate::flow_filter::FfAction::Drop => {
                    q0.rx_drops.count(DropReason::FlowFilterDrop);
                    return Steered::Dropped(DropReason::FlowFilterDrop);
                }
                crate::flow_filter::FfAction::RxQueue(q) if q < self.opts.queue_pairs => {
                    steer.how = SteerHow::FlowRule;
                    queue = Some(q)
                }
                crate::flow_filter::FfAction::RxQueue(_) => {}
            }
        }
        let report = self.has_feature(VIRTIO_NET_F_HASH_REPORT);
        if let Some(rss) = &control.rss {
            let d = rss.select_queue_with(&control.hash_fields, &parsed);
            steer.hash = d.hash_value;
            if queue.is_none() {
                steer.how = SteerHow::Rss;
            }
            queue = queue.or(Some(d.queue));
            if report {
                hdr_out.hash_value = d.hash_value;
                hdr_out.hash_report = d.hash_report;
            }
        } else {
            if report {
                if let Some((hash, report)) = control
                    .hash_only
                    .as_ref()
                    .and_then(|h| h.hash_with(&control.hash_fields, &parsed))
                {
                    hdr_out.hash_value = hash;
                    hdr_out.hash_report = report;
                }
            }
            if queue.is_none() {
                let hash = rss::compute_hash(
                    &self.default_rss_key,
                    crate::config::SUPPORTED_HASH_TYPES,
                    &parsed,
                )
                .map_or(0, |(h, _)| h);
                steer.hash = hash;
                queue = Some(self.automatic_queue(hash, &control));
            }
        }
        let q = queue.unwrap_or(0);
        // From the guard already held: a second read lock here could wait
        // behind a queued writer (the control thread) and never return.
        let peer = PeerOffloads::from_guest_features(control.guest_offloads);
        drop(control);
        let Some(backlog) = self.backlogs.get(usize::from(q)) else {
            q0.rx_drops.count(DropReason::QueueDisabled);
            return Steered::Dropped(DropReason::QueueDisabled);
        };
        let stats = &self.queue_stats[usize::from(q)];
        let arrived = self.tracing().then(Instant::now);
        let mut pending = backlog.pending.lock().unwrap_or_else(|e| e.into_inner());
        let mut push = |frame: Vec<u8>, hdr: VirtioNetHdr, parsed: ParsedPacket| {
            if pending.len() >= RX_BACKLOG_PACKETS {
                stats.rx_drops.count(DropReason::BacklogFull);
                return;
            }
            pending.push_back(PendingRx {
                frame,
                hdr,
                parsed,
                steer,
                faulted: false,
                arrived,
            });
        };
        match offload::resolve_tx(frame, &hdr_out, peer) {
            Ok(offload::TxOutput::Single { hdr: h, frame }) => {
                if hdr_out.needs_csum() && !h.needs_csum() {
                    stats.tx_sw_checksummed.inc();
                }
                // Steering parsed the frame as it arrived; a completed
                // checksum does not move any header.
                push(frame, with_hash(h, &hdr_out), parsed);
            }
            Ok(offload::TxOutput::Segments { hdr: h, frames }) => {
                stats.tx_sw_segmented.inc();
                for frame in frames {
                    let parsed = packet::parse(&frame);
                    push(frame, with_hash(h, &hdr_out), parsed);
                }
            }
            Err(e) => {
                debug!("{}: frame dropped: {e}", self.opts.name);
                stats.rx_drops.count(DropReason::BadTxHeader);
                return Steered::Dropped(DropReason::BadTxHeader);
            }
        }
        Steered::Queue(q)
    }

    /// Wakes the worker of `pair` to move its backlog into the ring.
    pub fn wake_rx(&self, pair: u16) {
        if let Some(b) = self.backlogs.get(usize::from(pair)) {
            if let Err(e) = b.wake.write(1) {
                warn!("{}: cannot wake rx queue {pair}: {e}", self.opts.name);
            }
        }
    }

    fn rx_layout(&self) -> RxLayout {
        RxLayout {
            mrg_rxbuf: self.has_feature(VIRTIO_NET_F_MRG_RXBUF),
            vnet_hdr_len: self.vnet_hdr_len(),
            split: if self.has_feature(VIRTIO_NET_F_SPLIT_HEADER) {
                self.control().split
            } else {
                None
            },
        }
    }

    /// Moves backlog frames of `pair` into its receive ring. Returns true if
    /// the used ring changed (the caller signals the guest).
    pub fn process_rx(&self, pair: u16, queue: &mut Queue, writer: &mut RxWriter) -> bool {
        if self.toolkit_active() {
            self.process_rx_hooked(pair, queue, writer)
        } else {
            self.rx_queue::<false>(pair, queue, writer)
        }
    }

    #[cold]
    #[inline(never)]
    fn process_rx_hooked(&self, pair: u16, queue: &mut Queue, writer: &mut RxWriter) -> bool {
        self.rx_queue::<true>(pair, queue, writer)
    }

    /// process_rx, with the toolkit's hooks (HOOKS) or without them.
    fn rx_queue<const HOOKS: bool>(
        &self,
        pair: u16,
        queue: &mut Queue,
        writer: &mut RxWriter,
    ) -> bool {
        let Some(mem) = self.memory() else {
            return false;
        };
        let mem = mem.memory();
        let (Some(backlog), Some(stats)) = (
            self.backlogs.get(usize::from(pair)),
            self.queue_stats.get(usize::from(pair)),
        ) else {
            return false;
        };
        let regions = self.regions();
        let layout = self.rx_layout();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut used = false;
        let tracing = HOOKS && self.tracing();
        let capturing = HOOKS && self.capturing();
        let faults = if HOOKS && self.faults_armed() {
            if self.faults.needs_reset() {
                return false;
            }
            used |= self.hold_rx_chains(pair, queue, &mem);
            if self.rx_held_back(pair, backlog) {
                return used;
            }
            Some(RxFaults::new(&self.faults, pair, layout.split.is_some()))
        } else {
            None
        };
        loop {
            // The driver's avail index before this round (see below).
            let posted = queue.avail_idx(&*mem, Ordering::Acquire).ok();
            let mut delivered = 0;
            let mut starved = false;
            let mut tally = RxTally::default();
            while delivered < BUDGET {
                let Some(mut pkt) = backlog
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front()
                else {
                    break;
                };
                if let Some(f) = &faults {
                    if f.apply(&self.faults, &mut pkt, writer) {
                        stats.rx_drops.count(DropReason::Injected);
                        if tracing {
                            let mut e = self.rx_trace_entry(pair, &pkt, 0);
                            e.outcome = "dropped: injected (rx-drop)".into();
                            self.tracer.record(e);
                        }
                        continue;
                    }
                }
                let before =
                    tracing.then(|| (queue.next_avail(), queue.next_used(), Instant::now()));
                let rx = RxPacket {
                    frame: &pkt.frame,
                    hdr: pkt.hdr,
                    parsed: &pkt.parsed,
                };
                let outcome = writer.write_packet::<_, HOOKS>(queue, &*mem, &regions, &layout, &rx);
                if let Some(f) = &faults {
                    f.delivered(
                        &self.faults,
                        writer,
                        matches!(outcome, RxOutcome::Delivered(_)),
                    );
                }
                if let Some(before) = before {
                    self.trace_rx(pair, queue, &mem, &regions, &pkt, &outcome, before);
                }
                match outcome {
                    RxOutcome::Delivered(r) => {
                        if capturing {
                            let note = PacketNote {
                                steer: Some(pkt.steer),
                                split: r.split.then_some(r.split_hdr_len),
                            };
                            self.capture.packet(pair, true, &pkt.frame, note);
                        }
                        used = true;
                        delivered += 1;
                        tally.count(&pkt, &r, layout.split.is_some());
                    }
                    RxOutcome::NoBuffers => {
                        backlog
                            .pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_front(pkt);
                        starved = true;
                        break;
                    }
                    RxOutcome::Dropped(d) => {
                        let reason = match d {
                            RxDrop::BadChain { returned, .. } => {
                                used |= returned > 0;
                                DropReason::BadChain
                            }
                            RxDrop::TooBig { .. } => DropReason::TooBig,
                            RxDrop::UsedRing(_) => DropReason::BadChain,
                        };
                        stats.rx_drops.count(reason);
                    }
                }
            }
            // Before the caller signals the guest, so the counters cover
            // every packet the driver can see.
            tally.flush(stats);
            if !starved {
                break;
            }
            // Out of buffers: ask for a kick, then look once more so a
            // buffer posted in between is not missed.
            if !event_idx {
                let _ = queue.enable_notification(&*mem);
                break;
            }
            // The packet that did not fit left next_avail behind buffers the
            // driver already posted, so arm the kick at the avail index as it
            // is now (the driver's next post must notify), and go round again
            // only if the index moved since this round started: a merged
            // packet can need more buffers than there are, and a bogus index
            // hands out none, so retrying while entries are pending would spin.
            let resume = queue.next_avail();
            if let Ok(now) = queue.avail_idx(&*mem, Ordering::Acquire) {
                queue.set_next_avail(now.0);
            }
            let _ = queue.enable_notification(&*mem);
            queue.set_next_avail(resume);
            if queue.avail_idx(&*mem, Ordering::Acquire).ok() == posted {
                break;
            }
        }
        if capturing {
            self.capture.flush();
        }
        used
    }

    // The toolkit's work on the data path. Only the loop instances with
    // hooks call it (see toolkit_active); out of line, it keeps them small.

    /// Takes the entry boxed, as the TX loop holds it: moved out of the box
    /// there, the whole entry went through the loop's stack frame, in the
    /// instance without hooks too.
    #[cold]
    #[inline(never)]
    fn record_trace(&self, e: Box<TraceEntry>) {
        self.tracer.record(*e);
    }

    /// tx-reorder: how many chains of this run of `pair` to complete in
    /// reverse, if it fires.
    #[cold]
    #[inline(never)]
    fn tx_reorder(&self, pair: u16) -> Option<usize> {
        self.faults
            .find(FaultKind::TxReorder, pair)
            .filter(|f| self.faults.fire(f))
            .map(|f| f.spec.count.max(2) as usize)
    }

    /// A transmitted chain the device could not read: its trace entry, and
    /// the queue's recent history to the log.
    #[cold]
    #[inline(never)]
    fn trace_tx_error(&self, pair: u16, mut e: Box<TraceEntry>, error: &dyn std::fmt::Display) {
        e.outcome = format!("error: {error}");
        let why = e.outcome.clone();
        self.record_trace(e);
        self.dump_trace_on_error(tx_index(pair), &why);
    }

    /// A trace entry for a transmitted chain, before the device reads it.
    #[cold]
    #[inline(never)]
    fn tx_trace_entry<Q: QueueT>(
        &self,
        pair: u16,
        mem: &GuestMemoryMmapB,
        queue: &Q,
        head: u16,
        regions: &RegionClassifier,
    ) -> Box<TraceEntry> {
        let t0 = Instant::now();
        let view = inspect::walk(mem, queue.desc_table(), queue.size(), head, regions);
        Box::new(TraceEntry {
            seq: 0,
            t_us: 0,
            vq: tx_index(pair),
            queue: format!("tx{pair}"),
            chains: vec![view],
            used: vec![(u32::from(head), 0)],
            frame_len: 0,
            wait_us: None,
            device_us: u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
            split: None,
            steer: None,
            flow: None,
            outcome: "ok".into(),
        })
    }

    /// A trace entry for a received packet, without chains yet.
    #[cold]
    #[inline(never)]
    fn rx_trace_entry(&self, pair: u16, pkt: &PendingRx, device_us: u64) -> TraceEntry {
        TraceEntry {
            seq: 0,
            t_us: 0,
            vq: rx_index(pair),
            queue: format!("rx{pair}"),
            chains: Vec::new(),
            used: Vec::new(),
            frame_len: pkt.frame.len(),
            wait_us: pkt
                .arrived
                .map(|t| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)),
            device_us,
            split: None,
            steer: Some(pkt.steer),
            flow: Some(FlowKey::of(&pkt.parsed)),
            outcome: "ok".into(),
        }
    }

    /// Records what one write of `pkt` into the ring did: the chains it
    /// took (read back from the avail ring) and the used entries it wrote.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn trace_rx(
        &self,
        pair: u16,
        queue: &Queue,
        mem: &GuestMemoryMmapB,
        regions: &RegionClassifier,
        pkt: &PendingRx,
        outcome: &RxOutcome,
        (avail_before, used_before, t0): (u16, u16, Instant),
    ) {
        let device_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut e = self.rx_trace_entry(pair, pkt, device_us);
        match outcome {
            RxOutcome::NoBuffers => return,
            RxOutcome::Delivered(r) => e.split = r.split.then_some(r.split_hdr_len),
            RxOutcome::Dropped(RxDrop::TooBig { len, capacity }) => {
                e.outcome = format!("dropped: too big ({len} bytes, {capacity} in the buffers)")
            }
            RxOutcome::Dropped(RxDrop::BadChain { error, .. }) => {
                e.outcome = format!("error: {error}")
            }
            RxOutcome::Dropped(RxDrop::UsedRing(err)) => {
                e.outcome = format!("error: used ring: {err}")
            }
        }
        let size = queue.size();
        let taken = std::num::Wrapping(queue.next_avail()) - std::num::Wrapping(avail_before);
        for k in 0..taken.0.min(size) {
            let pos = (std::num::Wrapping(avail_before) + std::num::Wrapping(k)).0;
            if let Some(head) = inspect::avail_head(mem, queue.avail_ring(), size, pos) {
                e.chains
                    .push(inspect::walk(mem, queue.desc_table(), size, head, regions));
            }
        }
        e.used =
            inspect::used_entries(mem, queue.used_ring(), size, used_before, queue.next_used());
        let failed = matches!(
            outcome,
            RxOutcome::Dropped(RxDrop::BadChain { .. } | RxDrop::UsedRing(_))
        );
        let why = e.outcome.clone();
        self.tracer.record(e);
        if failed {
            self.dump_trace_on_error(rx_index(pair), &why);
        }
    }

    /// A device error while tracing: the queue's recent history goes to
    /// the log (at most once a second).
    #[cold]
    #[inline(never)]
    fn dump_trace_on_error(&self, vq: usize, why: &str) {
        if !self.tracing() || !self.tracer.log_dump_due() {
            return;
        }
        let entries = self.tracer.entries(Some(vq), &FlowFilter::default());
        let start = entries.len().saturating_sub(32);
        let mut text = String::new();
        crate::trace::render(&entries[start..], &mut text);
        warn!(
            "{}: {} on vq {vq}; its last {} trace entries:\n{text}",
            self.opts.name,
            why,
            entries.len() - start
        );
    }

    /// rx-hold: takes chains from the ring up to the fault's count and
    /// keeps them; once the fault is gone, returns them with length 0.
    /// Returns true if the used ring changed.
    #[cold]
    #[inline(never)]
    fn hold_rx_chains(&self, pair: u16, queue: &mut Queue, mem: &GuestMemoryMmapB) -> bool {
        let fault = self.faults.find(FaultKind::RxHold, pair);
        let Some(mut held) = self.faults.held_mut(pair) else {
            return false;
        };
        match fault {
            Some(f) => {
                let size = queue.size();
                while held.len() < f.spec.count as usize && held.len() < usize::from(size) {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    held.push(chain.head_index());
                    self.faults.count(&f);
                }
                false
            }
            None if held.is_empty() => false,
            None => {
                for head in held.drain(..) {
                    let _ = queue.add_used(mem, head, 0);
                }
                drop(held);
                self.faults.rearm();
                true
            }
        }
    }

    /// rx-delay and rx-batch: whether the backlog of `pair` waits now. A
    /// timer wakes the queue when the wait is over.
    #[cold]
    #[inline(never)]
    fn rx_held_back(&self, pair: u16, backlog: &RxBacklog) -> bool {
        let (fault, batch) = match (
            self.faults.find(FaultKind::RxDelay, pair),
            self.faults.find(FaultKind::RxBatch, pair),
        ) {
            (Some(f), _) => (f, usize::MAX),
            (None, Some(f)) => {
                let n = f.spec.count as usize;
                (f, n)
            }
            (None, None) => return false,
        };
        let waiting = backlog
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        let Some(mut release) = self.faults.release_at(pair) else {
            return false;
        };
        if waiting == 0 {
            return false;
        }
        if waiting >= batch.min(RX_BACKLOG_PACKETS) {
            *release = None;
            return false;
        }
        let now = std::time::Instant::now();
        match *release {
            Some(t) if now < t => true,
            Some(_) => {
                *release = None;
                false
            }
            None => {
                if !self.faults.roll(&fault) {
                    return false;
                }
                self.faults.count(&fault);
                let wait = std::time::Duration::from_millis(fault.spec.ms);
                *release = Some(now + wait);
                match backlog.wake.try_clone() {
                    Ok(wake) => {
                        let spawned =
                            std::thread::Builder::new()
                                .name("rx-delay".into())
                                .spawn(move || {
                                    std::thread::sleep(wait);
                                    let _ = wake.write(1);
                                });
                        if spawned.is_err() {
                            *release = None;
                            return false;
                        }
                    }
                    Err(_) => {
                        *release = None;
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Transmits every chain on the TX queue of `pair` through the port.
    /// Returns true if the used ring changed.
    pub fn process_tx<Q: QueueT>(&self, pair: u16, queue: &mut Q, buf: &mut ChainBuf) -> bool {
        if self.toolkit_active() {
            self.process_tx_hooked(pair, queue, buf)
        } else {
            self.tx_queue::<Q, false>(pair, queue, buf)
        }
    }

    #[cold]
    #[inline(never)]
    fn process_tx_hooked<Q: QueueT>(&self, pair: u16, queue: &mut Q, buf: &mut ChainBuf) -> bool {
        self.tx_queue::<Q, true>(pair, queue, buf)
    }

    /// process_tx, with the toolkit's hooks (HOOKS) or without them.
    fn tx_queue<Q: QueueT, const HOOKS: bool>(
        &self,
        pair: u16,
        queue: &mut Q,
        buf: &mut ChainBuf,
    ) -> bool {
        let Some(mem) = self.memory() else {
            return false;
        };
        let mem = mem.memory();
        let Some(stats) = self.queue_stats.get(usize::from(pair)) else {
            return false;
        };
        let regions = self.regions();
        // The driver uses one header size for both directions: with
        // HASH_REPORT, TX headers carry the (unused) hash fields too.
        let hdr_len = self.vnet_hdr_len();
        let port = self.port.get().cloned();
        let mut used = false;
        let mut woken: u32 = 0;
        let mut reorder = None;
        if HOOKS && self.faults_armed() {
            if self.faults.needs_reset() {
                return false;
            }
            reorder = self.tx_reorder(pair);
        }
        let mut deferred: Vec<u16> = Vec::new();
        let tracing = HOOKS && self.tracing();
        let capturing = HOOKS && self.capturing();
        // The entry of the chain being handled, recorded when the next one
        // starts (each early exit below notes its outcome first).
        let mut entry: Option<Box<TraceEntry>> = None;
        loop {
            let _ = queue.disable_notification(&*mem);
            let posted = queue.avail_idx(&*mem, Ordering::Acquire).ok();
            let mut n = 0;
            let mut tally = TxTally::default();
            while n < BUDGET {
                let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                n += 1;
                let head = chain.head_index();
                if let Some(e) = entry.take() {
                    self.record_trace(e);
                }
                if tracing {
                    entry = Some(self.tx_trace_entry(pair, &mem, queue, head, &regions));
                }
                let res = request::read_tx_chain(chain, &regions, queue.size(), buf);
                // A chain that cannot be read is counted once, below.
                if let Some(window) = reorder {
                    deferred.push(head);
                    if deferred.len() >= window {
                        complete_reversed(queue, &mem, &mut deferred);
                    }
                } else if queue.add_used(&*mem, head, 0).is_err() && res.is_ok() {
                    stats.tx_drops.count(DropReason::BadChain);
                }
                used = true;
                let device_bytes = match res {
                    Ok(device_bytes) => device_bytes,
                    Err(e) => {
                        debug!("{}: tx{pair}: bad chain: {e}", self.opts.name);
                        stats.tx_drops.count(DropReason::BadChain);
                        if let Some(t) = entry.take() {
                            self.trace_tx_error(pair, t, &e);
                        }
                        continue;
                    }
                };
                let data = buf.data();
                let Some(hdr) = VirtioNetHdr::from_bytes(data.get(..hdr_len).unwrap_or(&[])) else {
                    stats.tx_drops.count(DropReason::BadTxHeader);
                    note(&mut entry, "dropped: bad_tx_header");
                    continue;
                };
                if hdr.gso_kind().is_none() || data.len() < hdr_len + ETH_HLEN {
                    stats.tx_drops.count(DropReason::BadTxHeader);
                    note(&mut entry, "dropped: bad_tx_header");
                    continue;
                }
                let frame = data[hdr_len..].to_vec();
                if let Some(e) = entry.as_mut() {
                    trace_tx_frame(e, &frame);
                }
                if capturing {
                    self.capture
                        .packet(pair, false, &frame, PacketNote::default());
                }
                tally.packets += 1;
                tally.bytes += frame.len() as u64;
                tally.device_bytes += device_bytes;
                let hdr = VirtioNetHdr {
                    num_buffers: 0,
                    hash_value: 0,
                    hash_report: 0,
                    ..hdr
                };
                match &port {
                    Some(p) if self.link_up_with::<HOOKS>() => {
                        if let Err(reason) = p.transmit(self, pair, frame, hdr, &mut woken) {
                            stats.tx_drops.count(reason);
                            note_drop(&mut entry, reason);
                        }
                    }
                    _ => {
                        stats.tx_drops.count(DropReason::PortDown);
                        note(&mut entry, "dropped: port_down");
                    }
                }
            }
            tally.flush(stats);
            if let Some(e) = entry.take() {
                self.record_trace(e);
            }
            if !deferred.is_empty() {
                complete_reversed(queue, &mem, &mut deferred);
            }
            // Notifications back on (without EVENT_IDX that clears the used
            // ring's NO_NOTIFY flag, which such a driver honours), then round
            // again if the driver posted meanwhile. Entries pending but not
            // handed out (an avail index more than a ring ahead) must not
            // keep the loop going: only a moved index does.
            if n < BUDGET
                && !(matches!(queue.enable_notification(&*mem), Ok(true))
                    && queue.avail_idx(&*mem, Ordering::Acquire).ok() != posted)
            {
                break;
            }
            if n == BUDGET {
                // Let the other queues of this worker run; a kick is
                // pending on the eventfd only if notifications are on, so
                // re-arm them and come back through the loop.
                if !matches!(queue.enable_notification(&*mem), Ok(true)) {
                    break;
                }
            }
        }
        if let Some(p) = &port {
            p.flush(woken);
        }
        if capturing {
            self.capture.flush();
        }
        used
    }

    /// Executes every request on the control queue.
    pub fn process_ctrl<Q: QueueT>(&self, queue: &mut Q, buf: &mut ChainBuf) -> bool {
        let stats = (&self.stats.ctrl_commands, &self.stats.ctrl_errors);
        self.serve_commands(queue, buf, "control", stats, |request, room| {
            let limits = CtrlLimits {
                max_pairs: self.opts.queue_pairs,
                features: self.acked_features(),
                split_header_buf_len: SPLIT_HEADER_BUF_LEN,
                hash_fields: self.opts.hash_fields,
            };
            let mut c = self.control.write().unwrap_or_else(|e| e.into_inner());
            let before = c.guest_offloads;
            let reply = ctrl::handle_command_reply(&mut c, &limits, request, room);
            let ok = reply.last() == Some(&(VIRTIO_NET_OK as u8));
            self.stats.count_ctrl_class(request, ok);
            if c.guest_offloads != before {
                if let Some(port) = self.port.get() {
                    port.guest_offloads_changed(self, c.guest_offloads);
                }
            }
            (reply, ok)
        })
    }

    /// Executes every request on the admin queue (flow filter objects).
    pub fn process_admin<Q: QueueT>(&self, queue: &mut Q, buf: &mut ChainBuf) -> bool {
        let stats = (&self.stats.admin_commands, &self.stats.admin_errors);
        self.serve_commands(queue, buf, "admin", stats, |request, room| {
            let result = self
                .admin
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .handle(request, room, self.opts.queue_pairs);
            let ok = result.get(..2) == Some(&[0, 0]);
            (result, ok)
        })
    }

    /// Runs `exec(request, reply_room)` on every chain of a command queue
    /// and writes its reply into the chain's writable part. `exec` returns
    /// the reply and whether the command succeeded. Returns true if the used
    /// ring changed.
    fn serve_commands<Q: QueueT>(
        &self,
        queue: &mut Q,
        buf: &mut ChainBuf,
        what: &str,
        (commands, errors): (&Counter, &Counter),
        mut exec: impl FnMut(&[u8], usize) -> (Vec<u8>, bool),
    ) -> bool {
        if self.faults_armed() && self.faults.needs_reset() {
            return false;
        }
        let Some(mem) = self.memory() else {
            return false;
        };
        let mem = mem.memory();
        let regions = self.regions();
        let mut used = false;
        while let Some(chain) = next_request(queue, &mem) {
            let head = chain.head_index();
            let read = request::read_request(chain, &regions, queue.size(), MAX_CTRL_REQUEST, buf);
            let len = match read {
                Ok(()) => {
                    commands.inc();
                    let (reply, ok) = exec(buf.data(), buf.writable_len());
                    if !ok {
                        errors.inc();
                        debug!(
                            "{}: {what} command {:02x?} refused",
                            self.opts.name,
                            buf.data().get(..4)
                        );
                    }
                    buf.write_response(&*mem, &reply).unwrap_or(0)
                }
                Err(e) => {
                    debug!("{}: bad {what} chain: {e}", self.opts.name);
                    errors.inc();
                    0
                }
            };
            let _ = queue.add_used(&*mem, head, len as u32);
            used = true;
        }
        used
    }
}

/// A transmitted frame, for the trace entry of its chain.
#[cold]
#[inline(never)]
fn trace_tx_frame(e: &mut TraceEntry, frame: &[u8]) {
    e.frame_len = frame.len();
    e.flow = Some(FlowKey::of(&packet::parse(frame)));
}

/// A dropped chain's outcome in its trace entry, if it has one.
#[cold]
#[inline(never)]
fn note(entry: &mut Option<Box<TraceEntry>>, what: &'static str) {
    if let Some(e) = entry.as_mut() {
        e.outcome = what.to_string();
    }
}

/// The same for a drop the port reported.
#[cold]
#[inline(never)]
fn note_drop(entry: &mut Option<Box<TraceEntry>>, reason: DropReason) {
    if let Some(e) = entry.as_mut() {
        e.outcome = format!("dropped: {reason:?}");
    }
}

/// Counts of one round of process_tx, added to the queue's counters once
/// per round rather than with three atomic additions per packet.
#[derive(Default)]
struct TxTally {
    packets: u64,
    bytes: u64,
    device_bytes: u64,
}

impl TxTally {
    fn flush(&mut self, stats: &QueueStats) {
        if self.packets != 0 {
            stats.tx_packets.add(self.packets);
            stats.tx_bytes.add(self.bytes);
            stats.tx_bytes_from_device_memory.add(self.device_bytes);
        }
        *self = TxTally::default();
    }
}

/// Counts of the packets delivered in one round of process_rx, added to
/// the queue's counters once per round: a dozen counters (and a hash
/// bucket) per packet otherwise each cost a load and a store of shared
/// memory.
#[derive(Default)]
struct RxTally {
    packets: u64,
    bytes: u64,
    buffers: u64,
    bytes_to_ram: u64,
    bytes_to_device_memory: u64,
    payload_bytes_to_ram: u64,
    payload_bytes_to_device_memory: u64,
    split: u64,
    not_split: u64,
    steered_rss: u64,
    steered_flow_rule: u64,
    steered_auto: u64,
    hash_buckets: [u64; RSS_HASH_BUCKETS],
}

impl RxTally {
    /// One delivered packet; `split_on`: header split is configured.
    #[inline]
    fn count(&mut self, pkt: &PendingRx, r: &RxReport, split_on: bool) {
        let steer = &pkt.steer;
        self.packets += 1;
        self.bytes += pkt.frame.len() as u64;
        self.buffers += u64::from(r.buffers);
        self.bytes_to_ram += r.ram_bytes;
        self.bytes_to_device_memory += r.device_bytes;
        self.payload_bytes_to_ram += r.payload_ram_bytes;
        self.payload_bytes_to_device_memory += r.payload_device_bytes;
        if split_on {
            if r.split {
                self.split += 1;
            } else {
                self.not_split += 1;
            }
        }
        match steer.how {
            SteerHow::Rss => self.steered_rss += 1,
            SteerHow::FlowRule => self.steered_flow_rule += 1,
            SteerHow::Auto => self.steered_auto += 1,
        }
        if steer.how != SteerHow::FlowRule {
            self.hash_buckets[steer.hash as usize % RSS_HASH_BUCKETS] += 1;
        }
    }

    /// Adds the round's counts to the queue's counters. One writer per
    /// queue: its worker, under the vring lock (see
    /// Counter::add_serialized).
    fn flush(&mut self, stats: &QueueStats) {
        if self.packets == 0 {
            return;
        }
        let add = |c: &Counter, n: u64| {
            if n != 0 {
                c.add_serialized(n);
            }
        };
        add(&stats.rx_packets, self.packets);
        add(&stats.rx_bytes, self.bytes);
        add(&stats.rx_buffers, self.buffers);
        add(&stats.rx_bytes_to_ram, self.bytes_to_ram);
        add(
            &stats.rx_bytes_to_device_memory,
            self.bytes_to_device_memory,
        );
        add(&stats.rx_payload_bytes_to_ram, self.payload_bytes_to_ram);
        add(
            &stats.rx_payload_bytes_to_device_memory,
            self.payload_bytes_to_device_memory,
        );
        add(&stats.rx_split, self.split);
        add(&stats.rx_not_split, self.not_split);
        add(&stats.rx_steered_rss, self.steered_rss);
        add(&stats.rx_steered_flow_rule, self.steered_flow_rule);
        add(&stats.rx_steered_auto, self.steered_auto);
        for (c, &n) in stats.rx_hash_buckets.iter().zip(&self.hash_buckets) {
            add(c, n);
        }
        *self = RxTally::default();
    }
}

/// tx-reorder: completes the deferred chains, last first.
#[cold]
#[inline(never)]
fn complete_reversed<Q: QueueT>(queue: &mut Q, mem: &GuestMemoryMmapB, deferred: &mut Vec<u16>) {
    for head in deferred.drain(..).rev() {
        let _ = queue.add_used(mem, head, 0);
    }
}

/// The per-packet receive faults of one queue run, looked up once.
struct RxFaults {
    drop: Option<Arc<ActiveFault>>,
    short: Option<Arc<ActiveFault>>,
    no_split: Option<Arc<ActiveFault>>,
    bad_csum: Option<Arc<ActiveFault>>,
}

impl RxFaults {
    fn new(faults: &Faults, pair: u16, split: bool) -> Self {
        RxFaults {
            drop: faults.find(FaultKind::RxDrop, pair),
            short: faults.find(FaultKind::RxShort, pair),
            no_split: faults.find(FaultKind::RxNoSplit, pair).filter(|_| split),
            bad_csum: faults.find(FaultKind::RxBadCsum, pair),
        }
    }

    /// Rolls the faults for `pkt`; true: drop it. Effects that only show
    /// once the packet is written are set up in `writer` and counted by
    /// [`RxFaults::delivered`].
    fn apply(&self, faults: &Faults, pkt: &mut PendingRx, writer: &mut RxWriter) -> bool {
        if !pkt.faulted {
            pkt.faulted = true;
            if self.drop.as_ref().is_some_and(|f| faults.fire(f)) {
                return true;
            }
            if let Some(f) = &self.bad_csum {
                if faults.roll(f)
                    && crate::fault::corrupt_checksum(&mut pkt.frame, &pkt.parsed, &mut pkt.hdr)
                {
                    faults.count(f);
                }
            }
        }
        writer.fault_short_by = self
            .short
            .as_ref()
            .filter(|f| faults.roll(f))
            .map_or(0, |f| f.spec.bytes);
        writer.fault_no_split = self.no_split.as_ref().is_some_and(|f| faults.roll(f));
        false
    }

    fn delivered(&self, faults: &Faults, writer: &mut RxWriter, delivered: bool) {
        if delivered {
            if let (Some(f), true) = (&self.short, writer.fault_short_by > 0) {
                faults.count(f);
            }
            if let (Some(f), true) = (&self.no_split, writer.fault_no_split) {
                faults.count(f);
            }
        }
        writer.fault_short_by = 0;
        writer.fault_no_split = false;
    }
}

/// Pops the next command chain. When the ring is empty, notifications are
/// re-armed (with EVENT_IDX this moves avail_event, without which the driver
/// would never kick again) and the ring checked once more, so a command
/// posted in between is not left waiting.
fn next_request<'a, Q: QueueT>(
    queue: &mut Q,
    mem: &'a GuestMemoryMmapB,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmapB>> {
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        _ => None,
    }
}

/// The offload module rebuilds headers for the receiver; keep the hash
/// steering computed.
fn with_hash(h: VirtioNetHdr, from: &VirtioNetHdr) -> VirtioNetHdr {
    VirtioNetHdr {
        hash_value: from.hash_value,
        hash_report: from.hash_report,
        ..h
    }
}

#[derive(Debug, thiserror::Error)]
#[error("config write outside the writable MAC field")]
pub struct ConfigWriteError;

/// The key Linux and most NICs use by default (also the key of the
/// Microsoft RSS verification suite).
pub const DEFAULT_RSS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];
