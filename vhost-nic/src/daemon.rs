//! Serving devices: one vhost-user socket per device, ports wired up, the
//! control socket, and clean shutdown.

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use log::{info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::NetBackend;
use crate::cli::StartupFault;
use crate::config::{DeviceOptions, OptionError, PortSpec};
use crate::device::NetDevice;
use crate::frontend_relay::{self, RelayError};
use crate::port::tap::{TapError, TapPort};
use crate::port::wire::Wire;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("two devices use socket {0}; give each device its own --socket")]
    DuplicateSocket(PathBuf),
    #[error("cannot create device {name}: {err}")]
    Device { name: String, err: std::io::Error },
    #[error("cannot listen on vhost-user socket {path}: {err}")]
    Socket { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// A bad --fault or --capture.
    #[error("{0}")]
    Fault(String),
}

/// The devices of one daemon, wired to their ports.
pub struct Devices {
    pub backends: Vec<Arc<NetBackend>>,
}

impl Devices {
    pub fn build(opts: Vec<DeviceOptions>) -> Result<Self, DaemonError> {
        let mut sockets = HashMap::new();
        let mut wires: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, o) in opts.iter().enumerate() {
            o.validate()?;
            if sockets.insert(o.socket.clone(), i).is_some() {
                return Err(DaemonError::DuplicateSocket(o.socket.clone()));
            }
            if let PortSpec::Wire(name) = &o.port {
                wires.entry(name.clone()).or_default().push(i);
            }
        }
        if let Some((name, ends)) = wires.iter().find(|(_, v)| v.len() > 2) {
            return Err(OptionError::WireEnds(name.clone(), ends.len()).into());
        }
        let mut devices = Vec::new();
        for o in opts {
            let name = o.name.clone();
            let dev = NetDevice::new(o).map_err(|err| DaemonError::Device { name, err })?;
            devices.push(Arc::new(dev));
        }
        let mut wire_objs: HashMap<String, Arc<Wire>> = HashMap::new();
        for dev in &devices {
            match &dev.opts.port {
                PortSpec::Wire(name) => {
                    let wire = wire_objs
                        .entry(name.clone())
                        .or_insert_with(|| Wire::new(name));
                    let side = usize::from(Arc::strong_count(wire) > 1);
                    let end = wire.plug(side, dev);
                    dev.attach_port(end);
                }
                PortSpec::Tap(ifname) => {
                    let tap = TapPort::open(ifname, dev.opts.queue_pairs)?;
                    dev.attach_port(Arc::new(tap));
                }
            }
        }
        Ok(Devices {
            backends: devices
                .into_iter()
                .map(|d| Arc::new(NetBackend::new(d)))
                .collect(),
        })
    }

    /// All counters as one JSON document.
    pub fn stats_json(&self) -> serde_json::Value {
        let devices: Vec<_> = self
            .backends
            .iter()
            .map(|b| {
                let d = b.device();
                serde_json::json!({
                    "name": d.opts.name,
                    "socket": d.opts.socket,
                    "port": d.port().map(|p| p.describe()),
                    "acked_features": format!("{:#x}", d.acked_features()),
                    "active_pairs": d.control().active_pairs,
                    "device": device_counters(d),
                    "queues": d.queue_stats,
                    "link_up": d.link_up(),
                    "faults": d.faults.to_json(),
                    "flow_rules": d.admin().flow_filter().rule_hits().map(|(id, hits)| serde_json::json!({"rule": id, "hits": hits})).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({ "devices": devices })
    }
}

/// The device-wide counters, plus the RSS hash distribution summed over
/// the queues (an even spread means the hash input varies as it should).
fn device_counters(d: &NetDevice) -> serde_json::Value {
    let mut v = serde_json::to_value(&d.stats).unwrap_or_default();
    let mut buckets = [0u64; crate::stats::RSS_HASH_BUCKETS];
    for q in &d.queue_stats {
        for (b, c) in buckets.iter_mut().zip(&q.rx_hash_buckets) {
            *b += c.get();
        }
    }
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("rss_hash_buckets".into(), serde_json::json!(buckets));
    }
    v
}

/// Why one frontend connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot start the vhost-user backend: {0}")]
    Start(vhost_user_backend::Error),
    #[error("{0}")]
    Backend(vhost_user_backend::Error),
    #[error("cannot register event listeners: {0}")]
    Listeners(std::io::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// Serves one device's socket until `stop` is set: each frontend connection
/// gets fresh worker threads; a disconnect resets the device and waits for
/// the next connection (QEMU restarts, guest reboots keep the daemon).
fn serve_device(backend: Arc<NetBackend>, listener: UnixListener, stop: Arc<AtomicBool>) {
    let name = backend.device().opts.name.clone();
    let socket = backend.device().opts.socket.clone();
    while !stop.load(Ordering::Acquire) {
        info!("{name}: waiting for a frontend on {}", socket.display());
        let frontend = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("{name}: accept: {e}");
                // Out of descriptors, say: do not spin.
                thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        backend.device().clear_vring_states();
        match serve_connection(&backend, frontend) {
            Ok(()) => info!("{name}: frontend disconnected"),
            Err(e) => warn!("{name}: connection ended: {e}"),
        }
        backend.forget_vrings();
        backend.device().set_backend_channel(None);
        backend.device().reset();
        backend.device().clear_vring_states();
    }
}

/// One frontend connection: a fresh vhost-user backend (worker threads
/// included) behind the front-end relay, until either side closes.
fn serve_connection(backend: &Arc<NetBackend>, frontend: UnixStream) -> Result<(), SessionError> {
    let dev = backend.device().clone();
    let name = dev.opts.name.clone();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new(name.clone(), backend.clone(), mem).map_err(SessionError::Start)?;
    let handlers = daemon.get_epoll_handlers();
    let result = (|| {
        backend
            .register_listeners(&handlers)
            .map_err(SessionError::Listeners)?;
        let (mut listener, relay_end) = frontend_relay::backend_channel()?;
        daemon.start(&mut listener).map_err(SessionError::Start)?;
        if let Err(e) = frontend_relay::check_sole_connection(&listener) {
            daemon.request_shutdown();
            let _ = daemon.wait();
            return Err(e.into());
        }
        drop(listener);
        let relayed = frontend_relay::run(
            &name,
            frontend,
            relay_end,
            dev.opts.num_queues(),
            |index, enabled| dev.set_vring_enabled(index, enabled),
            |fd| dev.set_backend_channel(Some(UnixStream::from(fd))),
        );
        // The relay closed the backend's connection: its thread ends now.
        let served = daemon.wait();
        relayed?;
        match served {
            // A frontend that leaves mid-message is a normal end too.
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => Ok(()),
            other => other.map_err(SessionError::Backend),
        }
    })();
    // The worker threads of this connection's backend exit.
    for h in &handlers {
        h.send_exit_event();
    }
    result
}

/// Runs the daemon until SIGINT/SIGTERM. SIGUSR1 logs the counters.
pub fn run(
    opts: Vec<DeviceOptions>,
    control_socket: Option<&Path>,
    faults: &[StartupFault],
    trace: Option<usize>,
    capture: Option<&Path>,
) -> Result<(), DaemonError> {
    let devices = Arc::new(Devices::build(opts)?);
    if let Some(depth) = trace {
        for b in &devices.backends {
            b.device().tracer.enable(Some(depth));
        }
    }
    for f in faults {
        let mut found = false;
        for b in &devices.backends {
            let name = &b.device().opts.name;
            if f.device.as_ref().is_some_and(|d| d != name) {
                continue;
            }
            found = true;
            b.device()
                .set_fault(f.spec.clone())
                .map_err(|e| DaemonError::Fault(format!("--fault for {name}: {e}")))?;
        }
        if let (false, Some(d)) = (found, &f.device) {
            let names: Vec<_> = devices
                .backends
                .iter()
                .map(|b| b.device().opts.name.as_str())
                .collect();
            return Err(DaemonError::Fault(format!(
                "--fault: no device named `{d}`; the devices are {}",
                names.join(", ")
            )));
        }
    }
    if let Some(file) = capture {
        let all: Vec<_> = devices.backends.iter().collect();
        let req = crate::control::CaptureRequest {
            file: Some(file),
            queue: None,
            dir: crate::control::Direction::Both,
            snaplen: None,
            limit: None,
        };
        crate::control::start_capture(&all, &req).map_err(DaemonError::Fault)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(path) = control_socket {
        crate::control::start(path, devices.clone())?;
    }
    // Every socket is bound before any is served, so a bad path fails the
    // start instead of leaving one device silently unserved.
    let mut listeners = Vec::new();
    for b in &devices.backends {
        let path = &b.device().opts.socket;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|err| DaemonError::Socket {
            path: path.clone(),
            err,
        })?;
        listeners.push(listener);
    }
    for (b, listener) in devices.backends.iter().zip(listeners) {
        info!(
            "{}: {} queue pairs, mac {}, port {}, socket {}",
            b.device().opts.name,
            b.device().opts.queue_pairs,
            b.device().opts.mac,
            b.device().port().map_or_else(String::new, |p| p.describe()),
            b.device().opts.socket.display()
        );
        let (b, s) = (b.clone(), stop.clone());
        let name = b.device().opts.name.clone();
        // Named for top -H: this thread also relays the frontend's requests.
        thread::Builder::new()
            .name(format!("{name}-serve"))
            .spawn(move || serve_device(b, listener, s))
            .map_err(|err| DaemonError::Device { name, err })?;
    }
    let signals = Mutex::new(
        signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGUSR1,
        ])
        .map_err(|err| DaemonError::Device {
            name: "signals".into(),
            err,
        })?,
    );
    let mut signals = signals.lock().unwrap_or_else(|e| e.into_inner());
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGUSR1 {
            info!("stats: {}", devices.stats_json());
            continue;
        }
        info!("signal {sig}: shutting down");
        stop.store(true, Ordering::Release);
        break;
    }
    info!("final stats: {}", devices.stats_json());
    for b in &devices.backends {
        if let Some(f) = b.device().capture.stop() {
            info!(
                "{}: capture {} closed, {} packets",
                b.device().opts.name,
                f.path.display(),
                f.packets.load(Ordering::Relaxed)
            );
        }
    }
    for b in &devices.backends {
        let d = b.device();
        let entries = d.tracer.entries(None, &crate::trace::FlowFilter::default());
        if !entries.is_empty() {
            let mut text = String::new();
            crate::trace::render(&entries, &mut text);
            info!(
                "{}: trace at exit, {} entries:\n{text}",
                d.opts.name,
                entries.len()
            );
        }
    }
    for b in &devices.backends {
        let _ = std::fs::remove_file(&b.device().opts.socket);
    }
    if let Some(path) = control_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
