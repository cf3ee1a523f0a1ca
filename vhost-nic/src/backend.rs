//! The vhost-user backend trait, implemented once: it maps vhost-user
//! requests and ring kicks onto the device model in device.rs.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, info, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::{GuestMem, NetDevice};
use crate::fault::FaultKind;
use crate::inspect::{view, QueueMeta, QueueView};
use crate::request::ChainBuf;
use crate::rx::RxWriter;
use crate::spec::{queue_name, queue_role, rx_index, tx_index, QueueRole};

pub use crate::vring::NetVring;

/// Per worker thread scratch space, reused across packets.
struct WorkerScratch {
    rx: RxWriter,
    chain: ChainBuf,
}

pub struct NetBackend {
    dev: Arc<NetDevice>,
    /// For each worker thread, the global indices of its virtqueues in the
    /// order the epoll handler numbers them.
    thread_queues: Vec<Vec<usize>>,
    scratch: Vec<Mutex<WorkerScratch>>,
    /// The current connection's vrings by global index, for the control
    /// socket's queue views. Worker threads fill in theirs on their first
    /// event (the vhost-user crate does not hand them out otherwise).
    vrings: Mutex<Vec<Option<NetVring>>>,
    /// Per worker thread: its vrings are in `vrings`.
    vrings_known: Vec<AtomicBool>,
}

/// Custom epoll event ids start above the vring ids and the exit event.
fn custom_base(num_queues: usize) -> u64 {
    num_queues as u64 + 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Custom {
    /// Frames were queued for this pair's receive ring.
    Wake(u16),
    /// The port's host fd for this pair is readable.
    PortRx(u16),
}

impl NetBackend {
    pub fn new(dev: Arc<NetDevice>) -> Self {
        let pairs = dev.opts.queue_pairs;
        let per = dev.opts.pairs_per_thread.max(1) as u16;
        let mut thread_queues = Vec::new();
        let mut p = 0;
        while p < pairs {
            let end = (p + per).min(pairs);
            thread_queues.push((p..end).flat_map(|q| [rx_index(q), tx_index(q)]).collect());
            p = end;
        }
        // Control and admin queues share one thread: they change steering
        // state that the data-path threads only read.
        let mut slow = vec![2 * usize::from(pairs)];
        if dev.opts.admin_vq {
            slow.push(2 * usize::from(pairs) + 1);
        }
        thread_queues.push(slow);
        let scratch = thread_queues
            .iter()
            .map(|_| {
                Mutex::new(WorkerScratch {
                    rx: RxWriter::default(),
                    chain: ChainBuf::default(),
                })
            })
            .collect();
        let vrings_known = thread_queues
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        NetBackend {
            vrings: Mutex::new(vec![None; dev.opts.num_queues()]),
            dev,
            thread_queues,
            scratch,
            vrings_known,
        }
    }

    /// A connection ended: its vrings are gone.
    pub fn forget_vrings(&self) {
        let mut v = self.vrings.lock().unwrap_or_else(|e| e.into_inner());
        v.iter_mut().for_each(|r| *r = None);
        for k in &self.vrings_known {
            k.store(false, Ordering::Release);
        }
    }

    fn remember_vrings(&self, thread: usize, vrings: &[NetVring]) {
        let Some(globals) = self.thread_queues.get(thread) else {
            return;
        };
        let mut v = self.vrings.lock().unwrap_or_else(|e| e.into_inner());
        for (&g, vring) in globals.iter().zip(vrings) {
            if let Some(slot) = v.get_mut(g) {
                *slot = Some(vring.clone());
            }
        }
        if let Some(k) = self.vrings_known.get(thread) {
            k.store(true, Ordering::Release);
        }
    }

    /// Views of the virtqueues (all, or only `only`), with their chains
    /// if `chains`. Queues the frontend has not set up show as not ready.
    pub fn queue_views(&self, only: Option<usize>, chains: bool) -> Vec<QueueView> {
        let vrings = self
            .vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mem = self.dev.memory();
        let guard = mem.as_ref().map(|m| m.memory());
        let regions = self.dev.regions();
        let pairs = self.dev.opts.queue_pairs;
        let mut out = Vec::new();
        for (index, vring) in vrings.iter().enumerate() {
            if only.is_some_and(|o| o != index) {
                continue;
            }
            let meta = |enabled| QueueMeta {
                index,
                name: queue_name(index, pairs),
                enabled,
                held: self.dev.held_chains(index),
                backlog: match queue_role(index, pairs) {
                    Some(QueueRole::Rx(p)) => Some(self.dev.backlog_len(p)),
                    _ => None,
                },
            };
            let v = match vring {
                Some(vr) => {
                    let st = vr.get_ref();
                    view(
                        st.get_queue(),
                        guard.as_deref(),
                        &regions,
                        meta(st.is_enabled()),
                        chains,
                    )
                }
                None => {
                    // Not set up by the frontend yet: an empty queue says so.
                    let Ok(q) = virtio_queue::Queue::new(self.dev.opts.queue_size) else {
                        continue;
                    };
                    view(&q, guard.as_deref(), &regions, meta(false), chains)
                }
            };
            out.push(v);
        }
        out
    }

    pub fn device(&self) -> &Arc<NetDevice> {
        &self.dev
    }

    fn thread_of_pair(&self, pair: u16) -> Option<usize> {
        self.thread_queues
            .iter()
            .position(|qs| qs.contains(&rx_index(pair)))
    }

    fn decode_custom(&self, event: u64) -> Option<Custom> {
        let k = event.checked_sub(custom_base(self.dev.opts.num_queues()))?;
        let pair = u16::try_from(k / 2).ok()?;
        (pair < self.dev.opts.queue_pairs).then_some(if k % 2 == 0 {
            Custom::Wake(pair)
        } else {
            Custom::PortRx(pair)
        })
    }

    /// Registers each pair's wake eventfd and port fd with the epoll loop
    /// of the thread serving that pair. Called after every (re)connection,
    /// since each connection gets new worker threads.
    pub fn register_listeners(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<NetBackend>>>],
    ) -> io::Result<()> {
        let base = custom_base(self.dev.opts.num_queues());
        for pair in 0..self.dev.opts.queue_pairs {
            let Some(handler) = self.thread_of_pair(pair).and_then(|t| handlers.get(t)) else {
                continue;
            };
            if let Some(b) = self.dev.backlog(pair) {
                use std::os::fd::AsRawFd;
                handler.register_listener(
                    b.wake.as_raw_fd(),
                    EventSet::IN,
                    base + 2 * u64::from(pair),
                )?;
            }
            if let Some(fd) = self.dev.port().and_then(|p| p.rx_fd(pair)) {
                handler.register_listener(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    base + 2 * u64::from(pair) + 1,
                )?;
            }
        }
        Ok(())
    }

    fn local_vring<'a>(
        &self,
        thread: usize,
        vrings: &'a [NetVring],
        global: usize,
    ) -> Option<&'a NetVring> {
        let local = self
            .thread_queues
            .get(thread)?
            .iter()
            .position(|&q| q == global)?;
        vrings.get(local)
    }

    /// Interrupts the guest for `vring` if the driver wants it. `data` is
    /// the queue pair and direction (true: RX) of a data queue, for the
    /// counters and the interrupt faults.
    fn signal(&self, vring: &NetVring, data: Option<(u16, bool)>) {
        let counters = data.and_then(|(pair, rx)| {
            let s = self.dev.queue_stats.get(usize::from(pair))?;
            Some(if rx {
                (&s.rx_interrupts_sent, &s.rx_interrupts_suppressed)
            } else {
                (&s.tx_interrupts_sent, &s.tx_interrupts_suppressed)
            })
        });
        match vring.needs_notification() {
            Ok(true) => {
                let mut times = 1;
                if let (Some((pair, _)), true) = (data, self.dev.faults_armed()) {
                    let f = &self.dev.faults;
                    if f.fires(FaultKind::IrqSuppress, pair) {
                        times = 0;
                    } else if f.fires(FaultKind::IrqDuplicate, pair) {
                        times = 2;
                    }
                }
                if times == 0 {
                    if let Some((_, suppressed)) = counters {
                        suppressed.inc();
                    }
                }
                for _ in 0..times {
                    if let Err(e) = vring.signal_used_queue() {
                        warn!("{}: cannot signal guest: {e}", self.dev.opts.name);
                    } else if let Some((sent, _)) = counters {
                        sent.inc();
                    }
                }
            }
            Ok(false) => {
                if let Some((_, suppressed)) = counters {
                    suppressed.inc();
                }
            }
            Err(e) => debug!("{}: needs_notification: {e}", self.dev.opts.name),
        }
    }

    /// needs-reset: signals a vring's error eventfd, once, so that the
    /// frontend sets DEVICE_NEEDS_RESET. Any ring will do: the status is
    /// the device's.
    fn report_needs_reset(&self) {
        if !self.dev.faults.take_needs_reset_report() {
            return;
        }
        let vrings = self
            .vrings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let name = &self.dev.opts.name;
        for vring in vrings.iter().flatten() {
            match vring.signal_error() {
                Ok(true) => {
                    self.dev.stats.vring_errors_signalled.inc();
                    info!("{name}: needs-reset: vring error signalled to the frontend");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!("{name}: cannot signal a vring error: {e}"),
            }
        }
        info!(
            "{name}: needs-reset: the frontend gave no vring error eventfd, \
             so the driver sees only the stopped queues and the link down"
        );
    }

    fn run_rx(&self, thread: usize, vrings: &[NetVring], pair: u16, scratch: &mut WorkerScratch) {
        // Pull from a host port first so its frames reach this ring now.
        let mut port_pending = false;
        if let Some(port) = self.dev.port() {
            if port.rx_fd(pair).is_some() {
                let (woken, more) = port.receive(&self.dev, pair);
                port_pending = more;
                let mut mask = woken & !(1u32 << pair);
                while mask != 0 {
                    self.dev.wake_rx(mask.trailing_zeros() as u16);
                    mask &= mask - 1;
                }
            }
        }
        let Some(vring) = self.local_vring(thread, vrings, rx_index(pair)) else {
            return;
        };
        let used = {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
            self.dev
                .process_rx(pair, state.get_queue_mut(), &mut scratch.rx)
        };
        // The port left frames behind (edge-triggered fd): come back, but
        // only if the ring moved, else wait for the guest's next RX kick.
        if port_pending && used {
            self.dev.wake_rx(pair);
        }
        if used {
            if let Some(s) = self.dev.queue_stats.get(usize::from(pair)) {
                s.rx_notifications.inc();
            }
            self.signal(vring, Some((pair, true)));
        }
    }

    fn run_queue(
        &self,
        thread: usize,
        vrings: &[NetVring],
        global: usize,
        scratch: &mut WorkerScratch,
    ) {
        let Some(role) = queue_role(global, self.dev.opts.queue_pairs) else {
            return;
        };
        if let QueueRole::Rx(pair) = role {
            return self.run_rx(thread, vrings, pair, scratch);
        }
        let Some(vring) = self.local_vring(thread, vrings, global) else {
            return;
        };
        let used = {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return;
            }
            let q = state.get_queue_mut();
            match role {
                QueueRole::Tx(pair) => self.dev.process_tx(pair, q, &mut scratch.chain),
                QueueRole::Ctrl => self.dev.process_ctrl(q, &mut scratch.chain),
                QueueRole::Admin => self.dev.process_admin(q, &mut scratch.chain),
                QueueRole::Rx(_) => false,
            }
        };
        if used {
            let mut data = None;
            if let QueueRole::Tx(pair) = role {
                if let Some(s) = self.dev.queue_stats.get(usize::from(pair)) {
                    s.tx_notifications.inc();
                }
                data = Some((pair, false));
            }
            self.signal(vring, data);
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = NetVring;

    fn num_queues(&self) -> usize {
        self.dev.opts.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.opts.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.offered_features()
    }

    fn acked_features(&self, features: u64) {
        self.dev.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: QEMU requires it (with REPLY_ACK) of a backend that
        // offers VIRTIO_F_ACCESS_PLATFORM; the channel itself stays unused.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&self) {
        info!("{}: device reset", self.dev.opts.name);
        self.dev.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.dev.set_event_idx(enabled);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.dev
            .write_config(offset, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.dev.set_memory(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.thread_queues
            .iter()
            .map(|qs| qs.iter().fold(0u64, |m, &q| m | (1u64 << q)))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Processing holds the vring lock and completes every chain it pops
        // before releasing it, so once the frontend's GET_VRING_BASE got the
        // lock nothing is in flight: the returned avail index is exact.
        if let Some(role) = queue_role(queue_index as usize, self.dev.opts.queue_pairs) {
            debug!(
                "{}: vring {queue_index} ({role:?}) stopped",
                self.dev.opts.name
            );
            if let QueueRole::Rx(p) | QueueRole::Tx(p) = role {
                if let Some(s) = self.dev.queue_stats.get(usize::from(p)) {
                    s.ring_resets.inc();
                }
            }
            if let QueueRole::Rx(p) = role {
                self.dev.faults.ring_reset(p);
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[NetVring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN && !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let Some(scratch) = self.scratch.get(thread_id) else {
            return Ok(());
        };
        let mut scratch = scratch.lock().unwrap_or_else(|e| e.into_inner());
        if !self
            .vrings_known
            .get(thread_id)
            .is_some_and(|k| k.load(Ordering::Relaxed))
        {
            self.remember_vrings(thread_id, vrings);
        }
        if self.dev.faults_armed() && self.dev.faults.needs_reset() {
            self.report_needs_reset();
        }
        if usize::from(device_event) < vrings.len() {
            if let Some(&global) = self
                .thread_queues
                .get(thread_id)
                .and_then(|qs| qs.get(usize::from(device_event)))
            {
                self.run_queue(thread_id, vrings, global, &mut scratch);
            }
            return Ok(());
        }
        match self.decode_custom(u64::from(device_event)) {
            Some(Custom::Wake(pair)) => {
                if let Some(b) = self.dev.backlog(pair) {
                    let _ = b.wake.read();
                }
                self.run_rx(thread_id, vrings, pair, &mut scratch);
            }
            Some(Custom::PortRx(pair)) => self.run_rx(thread_id, vrings, pair, &mut scratch),
            None => debug!("{}: unknown event {device_event}", self.dev.opts.name),
        }
        Ok(())
    }
}
