//! Runs a device: the ivshmem server thread, the engine thread and the
//! control socket thread, until stopped.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vmm_sys_util::eventfd::EventFd;

use crate::device::{new_eventfd, Device, DeviceConfig, DeviceError};
use crate::inspect::control_path;
use crate::sys::{bind_unix, poll};

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The ivshmem server socket QEMU's chardev connects to.
    pub socket: PathBuf,
    /// The control socket; `SOCKET.ctl` when not given.
    pub control: Option<PathBuf>,
    pub device: DeviceConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("socket {path}: {err}")]
    Socket { path: PathBuf, err: io::Error },
    #[error("starting a thread: {0}")]
    Thread(io::Error),
    #[error("signals: {0}")]
    Signals(io::Error),
}

/// A running device. Dropping it stops the threads and removes the sockets.
pub struct Daemon {
    device: Arc<Device>,
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    socket: PathBuf,
    control: PathBuf,
    /// (dev, inode) of the socket files as bound, so a daemon stopping
    /// never removes a socket another daemon has since bound at the path.
    bound: Vec<(PathBuf, Option<(u64, u64)>)>,
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn socket_err(path: &Path) -> impl FnOnce(io::Error) -> DaemonError + '_ {
    move |err| DaemonError::Socket {
        path: path.to_path_buf(),
        err,
    }
}

fn engine_loop(device: Arc<Device>, stop: Arc<EventFd>) {
    let mut fds = vec![(stop.as_raw_fd(), libc::POLLIN)];
    fds.extend(
        device
            .doorbell_raw_fds()
            .into_iter()
            .map(|fd| (fd, libc::POLLIN)),
    );
    let interval = device.config.poll_interval;
    loop {
        let ready = match poll(&fds, Some(interval)) {
            Ok(r) => r,
            Err(e) => {
                log::error!("engine: poll: {e}");
                return;
            }
        };
        if ready[0] != 0 {
            return;
        }
        if ready[1..].iter().any(|r| *r != 0) {
            device.drain_doorbells();
            device.stats.doorbells.inc();
        } else {
            device.stats.polls.inc();
        }
        device.process();
    }
}

impl Daemon {
    pub fn start(opts: ServeOptions) -> Result<Daemon, DaemonError> {
        let device = Arc::new(Device::new(opts.device.clone())?);
        let control = opts.control.unwrap_or_else(|| control_path(&opts.socket));
        let listener = bind_unix(&opts.socket).map_err(socket_err(&opts.socket))?;
        let ctl_listener = bind_unix(&control).map_err(socket_err(&control))?;
        // The control socket can read any file the daemon can (compare):
        // keep it to the owner.
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_err(&control))?;
        let stop = Arc::new(new_eventfd()?);
        let mut daemon = Daemon {
            device: device.clone(),
            stop: stop.clone(),
            threads: Vec::new(),
            socket: opts.socket.clone(),
            control: control.clone(),
            bound: [&opts.socket, &control]
                .into_iter()
                .map(|p| (p.clone(), file_id(p)))
                .collect(),
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(DaemonError::Thread)
        };
        let (d, s) = (device.clone(), stop.clone());
        daemon.threads.push(spawn(
            "fake-gpu-ivshmem",
            Box::new(move || {
                if let Err(e) = crate::server::serve(listener, d, &s) {
                    log::error!("ivshmem server: {e}");
                }
            }),
        )?);
        let (d, s) = (device.clone(), stop.clone());
        daemon.threads.push(spawn(
            "fake-gpu-engine",
            Box::new(move || engine_loop(d, s)),
        )?);
        let (d, s) = (device.clone(), stop.clone());
        daemon.threads.push(spawn(
            "fake-gpu-control",
            Box::new(move || {
                if let Err(e) = crate::control::serve(ctl_listener, d, &s) {
                    log::error!("control socket: {e}");
                }
            }),
        )?);
        let l = &device.layout;
        log::info!(
            "fake-gpu: BAR2 {} MiB{} (staging {:#x}+{:#x}, VRAM {:#x}+{:#x}), {} vectors, \
             ivshmem socket {}, control socket {}",
            l.bar_size >> 20,
            if device.shm.hugetlb() { " hugetlb" } else { "" },
            l.staging_offset,
            l.staging_size,
            l.vram_offset,
            l.vram_size,
            device.config.vectors,
            opts.socket.display(),
            control.display()
        );
        let unused = l.bar_size - (l.vram_offset + l.vram_size);
        if unused >= l.bar_size / 4 {
            log::info!(
                "{} MiB of BAR2 is unused (BAR sizes are powers of two): --vram {}M would fill it",
                unused >> 20,
                (l.vram_size + unused) >> 20
            );
        }
        Ok(daemon)
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// Stops the threads and removes the socket files.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for (path, id) in &self.bound {
            if id.is_some() && file_id(path) == *id {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `fake-gpu serve`: runs until SIGINT or SIGTERM; SIGUSR1 logs the
/// counters.
pub fn run(opts: ServeOptions) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])
        .map_err(DaemonError::Signals)?;
    let daemon = Daemon::start(opts)?;
    for sig in signals.forever() {
        if sig == SIGUSR1 {
            daemon.device().log_stats();
            continue;
        }
        log::info!("signal {sig}: stopping");
        break;
    }
    daemon.device().log_stats();
    daemon.stop();
    Ok(())
}
