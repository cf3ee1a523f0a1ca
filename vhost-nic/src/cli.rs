//! Command line: one device from flags, or several with repeated `--device`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{DeviceOptions, MacAddr, OptionError, PortSpec};
use crate::fault::{FaultError, FaultSpec};

#[derive(Debug, Parser)]
#[command(
    name = "vhost-nic",
    version,
    about = "A virtio-net NIC (multi-queue, RSS, flow filter, header split, ring reset) as a vhost-user backend",
    after_help = "Examples:\n  vhost-nic --socket /tmp/nic0.sock --queues 4 --port tap:tap0\n  vhost-nic --device socket=/tmp/a.sock,port=wire:w0 --device socket=/tmp/b.sock,port=wire:w0,queues=2 --control-socket /tmp/ctl.sock\n  vhost-nic ctl --socket /tmp/ctl.sock queues",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// vhost-user socket of a single device (the daemon listens on it).
    #[arg(long, conflicts_with = "device")]
    pub socket: Option<PathBuf>,
    /// Queue pairs (1-16).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Other side of the wire: wire:NAME (joins two devices of this daemon) or tap:IFNAME.
    #[arg(long, default_value = "wire:default")]
    pub port: String,
    /// MAC address served in the config space.
    #[arg(long)]
    pub mac: Option<String>,
    /// MTU served in the config space (68-9000).
    #[arg(long, default_value_t = 1500)]
    pub mtu: u16,
    /// Largest ring size the frontend may choose (power of two).
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// Queue pairs per worker thread.
    #[arg(long, default_value_t = 1)]
    pub pairs_per_thread: usize,
    /// Do not offer the admin virtqueue (needed with frontends that cannot expose it).
    #[arg(long)]
    pub no_admin_vq: bool,
    /// Do not offer the header split extension.
    #[arg(long)]
    pub no_split_header: bool,
    /// Do not offer RSS contexts.
    #[arg(long)]
    pub no_rss_contexts: bool,
    /// Do not offer the hash field extension (per-field hash selection and
    /// symmetric transforms).
    #[arg(long)]
    pub no_hash_fields: bool,
    /// A device as KEY=VALUE,... with keys socket (required), port, queues, mac, mtu,
    /// queue-size, pairs-per-thread, admin-vq (on/off), split-header (on/off),
    /// rss-contexts (on/off), hash-fields (on/off). Repeatable.
    #[arg(long)]
    pub device: Vec<String>,
    /// Control socket (JSON lines: stats, queues, ring, fault, ...; see
    /// docs/driver-toolkit.md). `--stats-socket` is the old name.
    #[arg(long, visible_alias = "stats-socket")]
    pub control_socket: Option<PathBuf>,
    /// Inject a fault from the start, into every device or, with
    /// device=NAME, one (nic0, nic1, ... in --device order):
    /// KIND[:device=NAME,queue=Q,ratio=R,count=N,ms=M,bytes=B,limit=L], e.g.
    /// rx-drop:device=nic1,queue=0,ratio=0.1. Repeatable. Kinds: rx-drop,
    /// rx-hold, rx-delay, rx-batch, tx-reorder, rx-short, rx-bad-csum,
    /// rx-no-split, irq-suppress, irq-duplicate, link-down, needs-reset.
    #[arg(long = "fault", value_name = "SPEC", value_parser = parse_fault)]
    pub faults: Vec<StartupFault>,
    /// Start the descriptor flight recorder at once, keeping DEPTH entries
    /// per virtqueue (default 256). It is dumped to the log at exit.
    #[arg(long, value_name = "DEPTH", num_args = 0..=1, default_missing_value = "256")]
    pub trace: Option<usize>,
    /// Capture every device's traffic from the start into FILE (pcapng, a
    /// new file; one interface per device).
    #[arg(long, value_name = "FILE")]
    pub capture: Option<PathBuf>,
}

/// A `--fault`: a fault spec, and the device it is for (all when None).
#[derive(Debug, Clone)]
pub struct StartupFault {
    pub device: Option<String>,
    pub spec: FaultSpec,
}

/// `device=NAME` is taken out; the rest is a fault spec as the control
/// socket takes it.
fn parse_fault(s: &str) -> Result<StartupFault, FaultError> {
    let s = s.trim();
    let (kind, args) = s.split_once(':').unwrap_or((s, ""));
    let mut device = None;
    let mut rest = Vec::new();
    for kv in args.split(',').filter(|x| !x.is_empty()) {
        match kv.split_once('=') {
            Some(("device", name)) => device = Some(name.to_string()),
            _ => rest.push(kv),
        }
    }
    let spec = FaultSpec::parse(&format!("{kind}:{}", rest.join(",")))?;
    Ok(StartupFault { device, spec })
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to a running daemon's control socket.
    Ctl(CtlArgs),
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  vhost-nic ctl --socket /tmp/ctl.sock stats\n  vhost-nic ctl --socket /tmp/ctl.sock --device nic1 ring rx0\n  vhost-nic ctl --socket /tmp/ctl.sock fault set rx-drop:queue=0,ratio=0.1\n  vhost-nic ctl --socket /tmp/ctl.sock raw '{\"cmd\":\"queues\"}'"
)]
pub struct CtlArgs {
    /// The daemon's control socket (its --control-socket).
    #[arg(long)]
    pub socket: PathBuf,
    /// Only this device (name such as nic0, or index); default: every device.
    #[arg(long)]
    pub device: Option<String>,
    /// Print the reply as the daemon sent it (one JSON line).
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub request: CtlRequest,
}

#[derive(Debug, Subcommand)]
pub enum CtlRequest {
    /// All counters, per device and per queue.
    Stats,
    /// State of every virtqueue: sizes, addresses, indices, event-idx values.
    Queues,
    /// One virtqueue with its posted and held chains, descriptor by descriptor.
    Ring {
        /// Virtqueue index or name: rx0, tx0, rx1, ..., ctrl, admin.
        queue: String,
    },
    /// Inject, clear or list faults.
    Fault {
        #[command(subcommand)]
        action: FaultAction,
    },
    /// The descriptor flight recorder.
    Trace {
        #[command(subcommand)]
        action: TraceCmd,
    },
    /// pcapng capture of the frames the guest receives and sends.
    Capture {
        #[command(subcommand)]
        action: CaptureCmd,
    },
    /// Send a request line as is, e.g. '{"cmd":"stats"}'.
    Raw { line: String },
}

#[derive(Debug, Subcommand)]
pub enum CaptureCmd {
    /// Start writing a new pcapng file (one interface per device).
    Start {
        /// The file; it must not exist yet.
        file: PathBuf,
        /// Only this queue pair.
        #[arg(long)]
        queue: Option<u16>,
        /// rx, tx or both.
        #[arg(long, default_value = "both", value_parser = ["rx", "tx", "both"])]
        dir: String,
        /// Bytes kept of each frame (default: all).
        #[arg(long)]
        snaplen: Option<u32>,
        /// Stop after this many packets.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Stop and close the file.
    Stop,
    /// What is being captured.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum TraceCmd {
    /// Start recording.
    On {
        /// Entries kept per virtqueue (default 256).
        #[arg(long)]
        depth: Option<usize>,
    },
    /// Stop recording (what was recorded stays).
    Off,
    /// Forget what was recorded.
    Clear,
    /// Show what was recorded, oldest first.
    Dump {
        /// Only this virtqueue (index or name: rx0, tx0, ...).
        #[arg(long)]
        queue: Option<String>,
        /// Only this flow: KEY=VALUE,... with proto, src, dst, sport, dport, port.
        #[arg(long)]
        flow: Option<String>,
        /// Only the last N entries.
        #[arg(long)]
        last: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FaultAction {
    /// Set a fault: KIND[:queue=Q,ratio=R,count=N,ms=M,bytes=B,limit=L].
    Set { spec: String },
    /// Clear faults of one kind, or `all`.
    Clear {
        kind: String,
        /// Only the fault set for this queue pair.
        #[arg(long)]
        queue: Option<u16>,
    },
    /// Faults in force and how often each kind fired.
    List,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("no device: give --socket PATH, or one or more --device socket=PATH,...")]
    NoDevice,
    #[error("--device `{spec}`: {why}")]
    DeviceSpec { spec: String, why: String },
}

fn default_mac(index: usize) -> MacAddr {
    MacAddr([
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ])
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

impl Cli {
    fn base(&self, index: usize) -> Result<DeviceOptions, CliError> {
        Ok(DeviceOptions {
            name: format!("nic{index}"),
            socket: PathBuf::new(),
            mac: match &self.mac {
                Some(m) => m.parse()?,
                None => default_mac(index),
            },
            queue_pairs: self.queues,
            queue_size: self.queue_size,
            mtu: self.mtu,
            port: self.port.parse()?,
            pairs_per_thread: self.pairs_per_thread,
            admin_vq: !self.no_admin_vq,
            split_header: !self.no_split_header,
            rss_contexts: !self.no_rss_contexts,
            hash_fields: !self.no_hash_fields,
        })
    }

    /// The devices the command line asks for, validated.
    pub fn devices(&self) -> Result<Vec<DeviceOptions>, CliError> {
        if let Some(socket) = &self.socket {
            let mut o = self.base(0)?;
            o.socket = socket.clone();
            o.validate()?;
            return Ok(vec![o]);
        }
        if self.device.is_empty() {
            return Err(CliError::NoDevice);
        }
        let mut out = Vec::new();
        for (i, spec) in self.device.iter().enumerate() {
            let bad = |why: String| CliError::DeviceSpec {
                spec: spec.clone(),
                why,
            };
            let mut o = self.base(i)?;
            // Devices from --device get their own MAC unless given.
            o.mac = default_mac(i);
            let mut have_socket = false;
            for kv in spec.split(',').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| bad(format!("`{kv}` is not KEY=VALUE")))?;
                let num = |v: &str| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("{k}: `{v}` is not a number")))
                };
                match k {
                    "socket" => {
                        o.socket = PathBuf::from(v);
                        have_socket = true;
                    }
                    "name" => o.name = v.to_string(),
                    "port" => o.port = v.parse::<PortSpec>()?,
                    "mac" => o.mac = v.parse()?,
                    "queues" => o.queue_pairs = u16::try_from(num(v)?).unwrap_or(u16::MAX),
                    "mtu" => o.mtu = u16::try_from(num(v)?).unwrap_or(u16::MAX),
                    "queue-size" => o.queue_size = u16::try_from(num(v)?).unwrap_or(u16::MAX),
                    "pairs-per-thread" => o.pairs_per_thread = num(v)? as usize,
                    "admin-vq" => {
                        o.admin_vq =
                            on_off(v).ok_or_else(|| bad(format!("{k}: expected on or off")))?
                    }
                    "split-header" => {
                        o.split_header =
                            on_off(v).ok_or_else(|| bad(format!("{k}: expected on or off")))?
                    }
                    "rss-contexts" => {
                        o.rss_contexts =
                            on_off(v).ok_or_else(|| bad(format!("{k}: expected on or off")))?
                    }
                    "hash-fields" => {
                        o.hash_fields =
                            on_off(v).ok_or_else(|| bad(format!("{k}: expected on or off")))?
                    }
                    _ => return Err(bad(format!("unknown key `{k}`"))),
                }
            }
            if !have_socket {
                return Err(bad("socket=PATH is required".into()));
            }
            o.validate()?;
            out.push(o);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vhost-nic").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn single_device_from_flags() {
        let d = cli(&["--socket", "/tmp/s", "--queues", "4", "--port", "tap:tap0"])
            .devices()
            .unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].queue_pairs, 4);
        assert_eq!(d[0].port, PortSpec::Tap("tap0".into()));
    }

    #[test]
    fn several_devices() {
        let d = cli(&[
            "--device",
            "socket=/tmp/a,port=wire:w",
            "--device",
            "socket=/tmp/b,port=wire:w,queues=2,admin-vq=off",
        ])
        .devices()
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_ne!(d[0].mac, d[1].mac);
        assert_eq!(d[1].queue_pairs, 2);
        assert!(!d[1].admin_vq);
    }

    #[test]
    fn hash_fields_on_by_default() {
        let d = cli(&["--socket", "/tmp/s"]).devices().unwrap();
        assert!(d[0].hash_fields);
        let d = cli(&["--socket", "/tmp/s", "--no-hash-fields"])
            .devices()
            .unwrap();
        assert!(!d[0].hash_fields);
        let d = cli(&[
            "--device",
            "socket=/tmp/a,hash-fields=off",
            "--device",
            "socket=/tmp/b,hash-fields=on",
        ])
        .devices()
        .unwrap();
        assert!(!d[0].hash_fields && d[1].hash_fields);
        assert!(cli(&["--device", "socket=/a,hash-fields=maybe"])
            .devices()
            .is_err());
    }

    #[test]
    fn rss_contexts_on_by_default() {
        let d = cli(&["--socket", "/tmp/s"]).devices().unwrap();
        assert!(d[0].rss_contexts);
        let d = cli(&["--socket", "/tmp/s", "--no-rss-contexts"])
            .devices()
            .unwrap();
        assert!(!d[0].rss_contexts);
        let d = cli(&[
            "--device",
            "socket=/tmp/a,rss-contexts=off",
            "--device",
            "socket=/tmp/b",
        ])
        .devices()
        .unwrap();
        assert!(!d[0].rss_contexts && d[1].rss_contexts);
        let e = cli(&["--device", "socket=/a,rss-contexts=maybe"])
            .devices()
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected on or off"), "{e}");
    }

    #[test]
    fn bad_input_says_what_to_do() {
        let e = cli(&[]).devices().unwrap_err().to_string();
        assert!(e.contains("--socket"), "{e}");
        let e = cli(&["--device", "port=wire:w"])
            .devices()
            .unwrap_err()
            .to_string();
        assert!(e.contains("socket=PATH"), "{e}");
        let e = cli(&["--device", "socket=/a,queues=99"])
            .devices()
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 1 and 16"), "{e}");
        let e = cli(&["--socket", "/a", "--port", "eth:x"])
            .devices()
            .unwrap_err()
            .to_string();
        assert!(e.contains("wire:NAME"), "{e}");
        let e = cli(&["--device", "socket=/a,colour=red"])
            .devices()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key"), "{e}");
    }
}
