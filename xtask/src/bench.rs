//! `cargo xtask bench`: TCP throughput from the guest to its "remote"
//! namespace over the vhost-nic wire, against the same transfer over QEMU's
//! own userspace virtio-net-pci on two host TAP devices joined by a host
//! bridge (no /dev/vhost-net here, so kernel vhost-net cannot be the
//! baseline). Both paths run in one guest, alternately, so they share the
//! machine's load.

use std::process::Command;
use std::time::Duration;

use crate::step::{banner, fail, Result};
use crate::{guest_prologue, prepare_with, LabArgs};

const BRIDGE: &str = "vnlbr0";
const TAPS: [&str; 2] = ["vnltap0", "vnltap1"];
pub const TAP_MACS: [&str; 2] = ["52:54:00:ab:00:01", "52:54:00:ab:00:02"];

/// Host TAP pair and bridge, removed on drop.
struct HostTaps;

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl HostTaps {
    fn create() -> Result<HostTaps> {
        let taps = HostTaps;
        taps.remove();
        let ok = ip(&["link", "add", BRIDGE, "type", "bridge"])
            && ip(&["link", "set", BRIDGE, "up"])
            && TAPS.iter().all(|t| {
                ip(&["tuntap", "add", t, "mode", "tap"])
                    && ip(&["link", "set", t, "master", BRIDGE])
                    && ip(&["link", "set", t, "up"])
            });
        if !ok {
            return fail(
                "bench",
                "cannot create the baseline TAP pair and bridge (needs root and /dev/net/tun)",
            );
        }
        Ok(taps)
    }

    fn remove(&self) {
        for t in TAPS {
            let _ = Command::new("ip")
                .args(["link", "del", t])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", BRIDGE])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for HostTaps {
    fn drop(&mut self) {
        self.remove();
    }
}

fn baseline_qemu_args() -> Vec<String> {
    let mut a = Vec::new();
    for (i, (tap, mac)) in TAPS.iter().zip(TAP_MACS).enumerate() {
        a.push("-netdev".into());
        a.push(format!(
            "tap,id=base{i},ifname={tap},script=no,downscript=no,vhost=off,queues=1"
        ));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=base{i},mac={mac},bus=pcie.0"
        ));
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(args: &LabArgs, bytes: u64, rounds: u32) -> Result<()> {
    let _taps = HostTaps::create()?;
    let p = prepare_with(args, baseline_qemu_args())?;
    banner(
        "bench",
        &format!("{rounds} x {bytes} bytes per path, alternating"),
    );
    let script = format!(
        "{prologue}\
         a=$(lab_if_by_mac {m0}); b=$(lab_if_by_mac {m1})\n\
         ip netns add base; ip link set \"$b\" netns base\n\
         ip -n base link set lo up; ip -n base addr add 198.51.100.2/24 dev \"$b\"; ip -n base link set \"$b\" up\n\
         ip addr add 198.51.100.1/24 dev \"$a\"; ip link set \"$a\" up\n\
         ping -c 2 -W 10 198.51.100.2 >/dev/null || {{ echo 'baseline path does not work'; exit 1; }}\n\
         xfer() {{ ns=$1 host=$2 port=$3\n\
           ip netns exec $ns python3 nettool.py recv $port /tmp/r.$port & rx=$!\n\
           while ! ip netns exec $ns ss -Hltn | grep -q \":$port\"; do sleep 0.1; done\n\
           s=$(date +%s.%N); python3 nettool.py send $host $port {bytes} >/dev/null || exit 1; wait $rx; e=$(date +%s.%N)\n\
           echo \"$(echo \"$e - $s\" | bc -l)\"; }}\n\
         for i in $(seq {rounds}); do\n\
           echo \"bench vhost-nic $(xfer remote $REMOTE_V4 $((7000+i)))\"\n\
           echo \"bench baseline $(xfer base 198.51.100.2 $((7100+i)))\"\n\
         done\n",
        prologue = guest_prologue(),
        m0 = TAP_MACS[0],
        m1 = TAP_MACS[1],
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(3600), false)?;
    let times = |path: &str| -> Vec<f64> {
        run.output
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("bench {path} ")))
            .filter_map(|t| t.trim().parse::<f64>().ok())
            .collect()
    };
    let (ours, base) = (times("vhost-nic"), times("baseline"));
    if ours.len() != rounds as usize || base.len() != rounds as usize {
        return fail(
            "bench",
            format!(
                "guest reported {} and {} of {rounds} transfers; console: {}",
                ours.len(),
                base.len(),
                run.console.display()
            ),
        );
    }
    let mbps = |secs: f64| bytes as f64 * 8.0 / secs / 1e6;
    let (o, b) = (mbps(median(ours.clone())), mbps(median(base.clone())));
    println!("accelerator: {:?}", p.lab.accel);
    println!("vhost-nic wire (vhost-user-device-pci): median {o:.0} Mbit/s  (runs: {ours:.2?} s)");
    println!("QEMU virtio-net-pci + TAP pair:         median {b:.0} Mbit/s  (runs: {base:.2?} s)");
    println!("ratio vhost-nic / baseline: {:.2}", o / b);
    Ok(())
}
