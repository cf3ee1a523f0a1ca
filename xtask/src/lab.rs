//! One lab run: vhost-nic serving two NICs joined by its wire, and a QEMU
//! guest booted on them with the host's root filesystem. Every process
//! started here is stopped when the `Lab` is dropped.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::paths::{cache_dir, repo_root};
use crate::step::{banner, fail, wait_until, LabError, Result};

/// Queue pairs per lab NIC.
pub const QUEUE_PAIRS: u16 = 4;
pub const LOCAL_MAC: &str = "52:54:00:12:34:56";
pub const REMOTE_MAC: &str = "52:54:00:12:34:57";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when a probe boot proves it runs this guest, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// How QEMU attaches the vhost-nic devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicModel {
    /// The patched generic vhost-user-device-pci: the whole virtio-net
    /// device (control and admin queues, config space) is vhost-nic's.
    VhostUserDevice,
    /// Stock QEMU's virtio-net-pci with a vhost-user netdev: QEMU keeps the
    /// control queue and config space, vhost-nic serves the queue pairs.
    VirtioNetPci,
}

impl NicModel {
    fn template(self) -> &'static str {
        match self {
            NicModel::VhostUserDevice => "qemu-configs/machines/lab-devices.cfg.in",
            NicModel::VirtioNetPci => "qemu-configs/machines/lab-devices-virtio-net-pci.cfg.in",
        }
    }
}

/// A guest that has not started its init by then never will: QEMU that
/// cannot attach a vhost-user device, say, retries the connection forever
/// before the guest boots. Boots take seconds even under loaded TCG.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

pub struct LabConfig {
    pub qemu: PathBuf,
    pub bzimage: PathBuf,
    pub vhost_nic: PathBuf,
    pub verbose: bool,
    /// More QEMU arguments (the benchmark's baseline NICs).
    pub extra_qemu_args: Vec<String>,
    /// vhost-nic port of the first NIC; the second is always on the wire.
    pub local_port: String,
    pub nic_model: NicModel,
    /// The fake GPU, and where (None: no GPU).
    pub gpu: Option<GpuShape>,
}

/// The default: both NICs on vhost-nic's in-process wire.
pub const WIRE_PORT: &str = "wire:lab";

/// Where the fake GPU sits (`--gpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuShape {
    /// On a downstream port of the NICs' PCIe switch: peer-to-peer DMA
    /// through the switch.
    Switch,
    /// On the root complex, no common bridge with the NICs.
    RootComplex,
}

impl GpuShape {
    fn bus(self) -> &'static str {
        match self {
            GpuShape::Switch => "sw-gpu",
            GpuShape::RootComplex => "pcie.0",
        }
    }
}

/// The fake GPU's VRAM: with the default 4 MiB staging window, a 1 GiB BAR.
const GPU_VRAM: &str = "1018M";

pub struct Lab {
    cfg: LabConfig,
    pub run_dir: PathBuf,
    daemon: Option<Child>,
    gpu: Option<Child>,
    pub accel: Accel,
}

/// How a guest command ended.
pub struct GuestRun {
    /// Exit status of the guest command (None: it never finished).
    pub status: Option<i32>,
    pub output: String,
    pub boots: usize,
    /// From QEMU start to the guest command starting (first boot).
    pub boot_time: Option<Duration>,
    pub elapsed: Duration,
    pub console: PathBuf,
}

fn results_dir(run: &Path) -> PathBuf {
    run.join("results")
}

impl Lab {
    /// Creates the run directory, writes the QEMU device config, and starts
    /// vhost-nic.
    pub fn start(cfg: LabConfig) -> Result<Lab> {
        let run_dir = cache_dir().join("runs").join(format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ));
        fs::create_dir_all(results_dir(&run_dir)).map_err(|e| LabError::Other {
            step: "lab".into(),
            why: format!("cannot create {}: {e}", run_dir.display()),
        })?;
        let template = repo_root().join(cfg.nic_model.template());
        let text = fs::read_to_string(&template).map_err(|e| LabError::Other {
            step: "lab".into(),
            why: format!("cannot read {}: {e}", template.display()),
        })?;
        let text = text
            .replace("@RUN_DIR@", &run_dir.to_string_lossy())
            .replace("@NUM_VQS@", &(2 * QUEUE_PAIRS + 2).to_string())
            .replace("@QUEUE_PAIRS@", &QUEUE_PAIRS.to_string())
            .replace("@VECTORS@", &(2 * QUEUE_PAIRS + 2).to_string())
            .replace("@LOCAL_MAC@", LOCAL_MAC)
            .replace("@REMOTE_MAC@", REMOTE_MAC);
        let gpu_shape = cfg.gpu;
        let mut text = text;
        if let Some(shape) = gpu_shape {
            let template = repo_root().join("qemu-configs/machines/lab-gpu.cfg.in");
            let gpu = fs::read_to_string(&template).map_err(|e| LabError::Other {
                step: "lab".into(),
                why: format!("cannot read {}: {e}", template.display()),
            })?;
            text.push('\n');
            text.push_str(
                &gpu.replace("@RUN_DIR@", &run_dir.to_string_lossy())
                    .replace("@GPU_BUS@", shape.bus()),
            );
        }
        write_file(&run_dir.join("lab-devices.cfg"), &text)?;
        let mut lab = Lab {
            cfg,
            run_dir,
            daemon: None,
            gpu: None,
            accel: Accel::Tcg,
        };
        lab.start_daemon()?;
        if let Some(shape) = gpu_shape {
            lab.start_gpu(shape)?;
        }
        Ok(lab)
    }

    /// Starts `fake-gpu serve` on the run's gpu.sock (control: gpu.sock.ctl,
    /// for `fake-gpu inspect --socket RUN_DIR/gpu.sock`).
    fn start_gpu(&mut self, shape: GpuShape) -> Result<()> {
        banner(
            "fake-gpu",
            &format!("starting the GPU ({GPU_VRAM} VRAM, on {})", shape.bus()),
        );
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build
            .current_dir(repo_root())
            .args(["build", "--release", "--quiet", "-p", "fake-gpu"]);
        match build.status() {
            Ok(s) if s.success() => {}
            other => return fail("fake-gpu", format!("cargo build -p fake-gpu: {other:?}")),
        }
        let bin = self.fake_gpu_bin();
        let log =
            fs::File::create(self.run_dir.join("fake-gpu.log")).map_err(|e| LabError::Other {
                step: "fake-gpu".into(),
                why: e.to_string(),
            })?;
        let log2 = log.try_clone().map_err(|e| LabError::Other {
            step: "fake-gpu".into(),
            why: e.to_string(),
        })?;
        let sock = self.sock("gpu.sock");
        let child = Command::new(&bin)
            .args(["serve", "--vram", GPU_VRAM, "--socket"])
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| LabError::Other {
                step: "fake-gpu".into(),
                why: format!("cannot start {}: {e}", bin.display()),
            })?;
        self.gpu = Some(child);
        if !wait_until(Duration::from_secs(20), || sock.exists()) {
            return fail(
                "fake-gpu",
                format!(
                    "socket did not appear within 20 s; log: {}",
                    self.run_dir.join("fake-gpu.log").display()
                ),
            );
        }
        Ok(())
    }

    /// The fake-gpu binary, built next to vhost-nic.
    pub fn fake_gpu_bin(&self) -> PathBuf {
        self.cfg
            .vhost_nic
            .parent()
            .map(|d| d.join("fake-gpu"))
            .unwrap_or_else(|| PathBuf::from("fake-gpu"))
    }

    /// The fake GPU's ivshmem socket (`fake-gpu inspect --socket`).
    pub fn gpu_socket(&self) -> PathBuf {
        self.sock("gpu.sock")
    }

    fn sock(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    pub fn start_daemon(&mut self) -> Result<()> {
        banner(
            "vhost-nic",
            &format!(
                "starting two NICs (ports {} and {WIRE_PORT})",
                self.cfg.local_port
            ),
        );
        let log =
            fs::File::create(self.run_dir.join("vhost-nic.log")).map_err(|e| LabError::Other {
                step: "vhost-nic".into(),
                why: e.to_string(),
            })?;
        let log2 = log.try_clone().map_err(|e| LabError::Other {
            step: "vhost-nic".into(),
            why: e.to_string(),
        })?;
        let dev = |n: &str, mac: &str, port: &str| {
            format!(
                "socket={},name={n},port={port},queues={QUEUE_PAIRS},mac={mac},mtu=9000",
                self.sock(&format!("{n}.sock")).display()
            )
        };
        let child = Command::new(&self.cfg.vhost_nic)
            .arg("--device")
            .arg(dev("nic0", LOCAL_MAC, &self.cfg.local_port))
            .arg("--device")
            .arg(dev("nic1", REMOTE_MAC, WIRE_PORT))
            .arg("--stats-socket")
            .arg(self.sock("stats.sock"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| LabError::Other {
                step: "vhost-nic".into(),
                why: format!("cannot start {}: {e}", self.cfg.vhost_nic.display()),
            })?;
        self.daemon = Some(child);
        let socks = ["nic0.sock", "nic1.sock", "stats.sock"].map(|s| self.sock(s));
        if !wait_until(Duration::from_secs(20), || socks.iter().all(|s| s.exists())) {
            return fail(
                "vhost-nic",
                format!(
                    "sockets did not appear within 20 s; log: {}",
                    self.run_dir.join("vhost-nic.log").display()
                ),
            );
        }
        Ok(())
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// Stops the daemon with SIGTERM (SIGKILL after 10 s).
    pub fn stop_daemon(&mut self, signal: i32) {
        if let Some(mut child) = self.daemon.take() {
            stop_child(&mut child, signal);
        }
    }

    /// One request line on the daemon's control socket and its reply
    /// (docs/driver-toolkit.md).
    pub fn control(&self, request: &[u8]) -> Result<serde_json::Value> {
        let s = UnixStream::connect(self.sock("stats.sock")).map_err(|e| LabError::Other {
            step: "control".into(),
            why: format!("cannot connect to the control socket: {e}"),
        })?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = (&s).write_all(request);
        let _ = (&s).write_all(b"\n");
        let mut line = String::new();
        let _ = BufReader::new(&s).read_line(&mut line);
        serde_json::from_str(&line).map_err(|e| LabError::Other {
            step: "control".into(),
            why: format!("bad control reply `{line}`: {e}"),
        })
    }

    /// The daemon's counters (the stats socket's JSON).
    pub fn stats(&self) -> Result<serde_json::Value> {
        let mut s = UnixStream::connect(self.sock("stats.sock")).map_err(|e| LabError::Other {
            step: "stats".into(),
            why: format!("cannot connect to the stats socket: {e}"),
        })?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(b"stats\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        serde_json::from_str(&text).map_err(|e| LabError::Other {
            step: "stats".into(),
            why: format!("bad stats reply `{text}`: {e}"),
        })
    }

    fn qemu_command(&self, accel: Accel, console: Option<&Path>, allow_reboot: bool) -> Command {
        let mut c = Command::new(&self.cfg.qemu);
        let init = repo_root().join("tests/vm/init.sh");
        let append = format!(
            "console=ttyS0 root=/dev/root rootfstype=9p \
             rootflags=trans=virtio,version=9p2000.L,msize=262144,cache=loose ro \
             init={} panic=-1 oops=panic net.ifnames=0 {}",
            init.display(),
            if self.cfg.verbose { "" } else { "quiet" }
        );
        c.arg("-readconfig")
            .arg(repo_root().join("qemu-configs/machines/q35-lab.cfg"))
            .arg("-readconfig")
            .arg(self.run_dir.join("lab-devices.cfg"))
            .args([
                "-smp",
                "2",
                "-nodefaults",
                "-display",
                "none",
                "-no-user-config",
            ])
            .arg("-kernel")
            .arg(&self.cfg.bzimage)
            .arg("-append")
            .arg(append);
        match accel {
            Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => c.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
        };
        match console {
            Some(path) => c.arg("-serial").arg(format!("file:{}", path.display())),
            None => c.args(["-serial", "mon:stdio"]),
        };
        if !allow_reboot {
            c.arg("-no-reboot");
        }
        c.args(&self.cfg.extra_qemu_args);
        c
    }

    /// Decides KVM or TCG: KVM only if /dev/kvm opens and a probe boot of
    /// this guest reaches its init.
    pub fn choose_accel(&mut self, choice: AccelChoice) -> Result<Accel> {
        self.accel = match choice {
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Auto => {
                let usable = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if usable && self.probe_kvm() {
                    Accel::Kvm
                } else {
                    eprintln!(
                        "notice: using TCG (multi-threaded): {}",
                        if usable {
                            "/dev/kvm opens but a probe boot failed (e.g. a PVM hypervisor such as kvm_pvm cannot run an unmodified guest)"
                        } else {
                            "/dev/kvm is not usable here"
                        }
                    );
                    Accel::Tcg
                }
            }
        };
        Ok(self.accel)
    }

    fn probe_kvm(&mut self) -> bool {
        banner("accel", "probing whether KVM runs this guest");
        let saved = self.accel;
        self.accel = Accel::Kvm;
        let ok = self
            .run_guest("echo kvm-probe-ok", Duration::from_secs(90), false)
            .map(|r| r.status == Some(0) && r.output.contains("kvm-probe-ok"))
            .unwrap_or(false);
        self.accel = saved;
        ok
    }

    /// Boots the guest, runs `script` (bash) in it, waits for power-off.
    /// With `allow_reboot` the script may leave results/reboot behind to be
    /// run again after a guest reboot.
    pub fn run_guest(
        &self,
        script: &str,
        timeout: Duration,
        allow_reboot: bool,
    ) -> Result<GuestRun> {
        let results = results_dir(&self.run_dir);
        for f in ["cmd", "output", "status", "reboot", "phase"] {
            let _ = fs::remove_file(results.join(f));
        }
        write_file(&results.join("cmd"), script)?;
        let console = self.run_dir.join("console.log");
        // QEMU appends to an existing file; each boot gets a fresh log.
        let _ = fs::remove_file(&console);
        let mut child = self
            .qemu_command(self.accel, Some(&console), allow_reboot)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(self.run_dir.join("qemu.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .map_err(|e| LabError::Other {
                step: "boot".into(),
                why: format!("cannot start {}: {e}", self.cfg.qemu.display()),
            })?;
        let start = Instant::now();
        let mut follow = ConsoleFollower::new(&console, self.cfg.verbose);
        let mut boot_time = None;
        let mut boots = 0;
        let finished = loop {
            for line in follow.poll() {
                if line.starts_with("lab-guest: boot") {
                    boots += 1;
                    boot_time.get_or_insert(start.elapsed());
                }
            }
            match child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) => {}
                Err(_) => break true,
            }
            if start.elapsed() > timeout {
                break false;
            }
            if boots == 0 && start.elapsed() > BOOT_DEADLINE {
                eprintln!(
                    "guest did not reach its init within {}s; QEMU's log: {}",
                    BOOT_DEADLINE.as_secs(),
                    self.run_dir.join("qemu.log").display()
                );
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for _ in follow.poll() {}
        if !finished {
            stop_child(&mut child, libc::SIGTERM);
        }
        let status = fs::read_to_string(results.join("status"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let output = fs::read_to_string(results.join("output")).unwrap_or_default();
        if !finished {
            eprintln!(
                "guest did not finish within {}s; console: {}",
                timeout.as_secs(),
                console.display()
            );
        }
        Ok(GuestRun {
            status,
            output,
            boots,
            boot_time,
            elapsed: start.elapsed(),
            console,
        })
    }

    /// Interactive guest on this terminal.
    pub fn interactive(&self) -> Result<()> {
        let _ = fs::remove_file(results_dir(&self.run_dir).join("cmd"));
        let status = self
            .qemu_command(self.accel, None, false)
            .status()
            .map_err(|e| LabError::Other {
                step: "vm".into(),
                why: format!("cannot start {}: {e}", self.cfg.qemu.display()),
            })?;
        if !status.success() {
            return fail("vm", format!("QEMU exited with {status}"));
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_daemon(libc::SIGTERM);
        if let Some(mut child) = self.gpu.take() {
            stop_child(&mut child, libc::SIGTERM);
        }
    }
}

fn stop_child(child: &mut Child, signal: i32) {
    // SAFETY: kill() on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| LabError::Other {
        step: "lab".into(),
        why: format!("cannot write {}: {e}", path.display()),
    })
}

/// Follows the guest console file as it grows, echoing the guest's own
/// output (and the kernel log when verbose).
struct ConsoleFollower {
    path: PathBuf,
    pos: u64,
    partial: String,
    verbose: bool,
}

impl ConsoleFollower {
    fn new(path: &Path, verbose: bool) -> Self {
        ConsoleFollower {
            path: path.to_path_buf(),
            pos: 0,
            partial: String::new(),
            verbose,
        }
    }

    fn poll(&mut self) -> Vec<String> {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let mut reader = BufReader::new(&mut f);
        let _ = reader.read_to_end(&mut buf);
        self.pos += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut lines = Vec::new();
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = line.trim_end().to_string();
            let kernel = line.starts_with('[') && line.contains(']');
            if self.verbose || !kernel {
                eprintln!("  guest| {line}");
            }
            lines.push(line);
        }
        let _ = reader.lines();
        lines
    }
}
