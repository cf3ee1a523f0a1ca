//! `cargo xtask`: the lab. Builds what is missing (QEMU with the patch
//! series, the guest kernel, vhost-nic), boots a guest whose NICs are
//! served by vhost-nic, and runs tests in it.

mod bench;
mod build;
mod devmem;
mod fake_gpu;
mod lab;
mod paths;
mod report;
mod step;
mod toolkit;
mod toolkit_cost;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::build::KernelChoice;
use crate::lab::{AccelChoice, GpuShape, Lab, LabConfig, NicModel};
use crate::report::Tally;
use crate::step::{banner, LabError, Result};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "The vhost-nic lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build what is missing, boot a guest on two emulated NICs, move traffic, print a summary.
    Demo(LabArgs),
    /// Workspace tests, then the end-to-end suite in the guest.
    Test {
        #[command(flatten)]
        lab: LabArgs,
        /// Run only these parts (repeatable; default: all, in this order).
        #[arg(long, value_enum)]
        only: Vec<TestPart>,
    },
    /// An interactive guest shell with the same devices.
    Vm(LabArgs),
    /// Throughput over the vhost-nic wire against QEMU's userspace
    /// virtio-net-pci on a host TAP pair, in the same guest; with --devmem,
    /// device memory TCP receive against plain TCP receive on the same NIC;
    /// with --toolkit-off-cost, the datapath benchmark on the host with the
    /// toolkit's hooks compiled out, in and off, and on.
    Bench {
        #[command(flatten)]
        lab: LabArgs,
        /// Devmem RX (ncdevmem) vs plain TCP receive, 1 and 3 streams.
        #[arg(long)]
        devmem: bool,
        /// Bytes per transfer.
        #[arg(long, default_value_t = 512 << 20)]
        bytes: u64,
        /// Transfers per path (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Devmem receivers return the frags unread instead of running
        /// ncdevmem -v 7, which reads every frag back (a udmabuf by the CPU,
        /// VRAM through the copy engine).
        #[arg(long)]
        no_validate: bool,
        /// No guest: the datapath benchmark built without and with the
        /// toolkit's data-path hooks, run alternately --rounds times each
        /// (at least 2), with the flight recorder on for scale.
        #[arg(long, conflicts_with = "devmem")]
        toolkit_off_cost: bool,
    },
    /// The driver toolkit's guest cases alone (a capture read by tshark,
    /// every fault under a plain TCP and a devmem RX flow, bad control
    /// requests while the guest runs); `test` runs them too.
    Toolkit(LabArgs),
    /// Run upstream kselftests (paths under tools/testing/selftests) in the guest, HW mode.
    Selftests {
        #[command(flatten)]
        lab: LabArgs,
        /// e.g. drivers/net/ping.py
        #[arg(required = true)]
        paths: Vec<String>,
    },
}

/// The parts of `cargo xtask test`, each a guest (or host) run of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TestPart {
    /// cargo test --workspace.
    Unit,
    /// The guest suite, a reboot and the daemon killed mid-transfer.
    Suite,
    /// A transfer through a host TAP port.
    Tap,
    /// The NICs behind stock QEMU's virtio-net-pci.
    Stock,
    /// Device memory TCP cases (tests/vm/devmem_e2e.py).
    Devmem,
    /// The fake GPU: its cases and devmem.py on VRAM, on the switch and on
    /// the root complex.
    FakeGpu,
    /// Upstream kselftests in HW mode.
    Selftests,
}

#[derive(Args, Clone)]
struct LabArgs {
    /// A built bzImage to boot instead of building one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Your kernel source tree: the series is applied if missing and it is built with the lab config.
    #[arg(long)]
    kernel_tree: Option<PathBuf>,
    /// Accelerator.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Show the guest kernel log too.
    #[arg(long)]
    verbose: bool,
    /// Add the fake GPU (fake-gpu serve, QEMU's ivshmem-doorbell) to the
    /// machine: on the NICs' PCIe switch, or on the root complex.
    #[arg(long, value_enum)]
    gpu: Option<GpuShape>,
}

struct Prepared {
    lab: Lab,
}

fn prepare(args: &LabArgs) -> Result<Prepared> {
    prepare_with(args, Vec::new())
}

fn prepare_with(args: &LabArgs, extra_qemu_args: Vec<String>) -> Result<Prepared> {
    prepare_lab(
        args,
        extra_qemu_args,
        lab::WIRE_PORT,
        NicModel::VhostUserDevice,
    )
}

fn prepare_lab(
    args: &LabArgs,
    extra_qemu_args: Vec<String>,
    local_port: &str,
    nic_model: NicModel,
) -> Result<Prepared> {
    std::fs::create_dir_all(paths::logs_dir()).map_err(|e| LabError::Other {
        step: "setup".into(),
        why: format!("cannot create {}: {e}", paths::logs_dir().display()),
    })?;
    build::host_packages()?;
    let qemu = build::qemu()?;
    let kernel = build::kernel(&KernelChoice {
        bzimage: args.kernel.clone(),
        tree: args.kernel_tree.clone(),
    })?;
    let mut extra_qemu_args = extra_qemu_args;
    extra_qemu_args.extend(guest_tools_share(&build::guest_ethtool()?));
    let vhost_nic = build::vhost_nic()?;
    let mut lab = Lab::start(LabConfig {
        qemu,
        bzimage: kernel.bzimage,
        vhost_nic,
        verbose: args.verbose,
        extra_qemu_args,
        local_port: local_port.to_string(),
        nic_model,
        gpu: args.gpu,
    })?;
    lab.choose_accel(args.accel)?;
    Ok(Prepared { lab })
}

/// The guest's tools (build::guest_ethtool), shared read-only: the guest's
/// init mounts them on /run/lab-tools and puts their bin/ first on PATH.
fn guest_tools_share(dir: &std::path::Path) -> Vec<String> {
    vec![
        "-fsdev".to_string(),
        format!(
            "local,id=labtools,path={},security_model=none,readonly=on",
            dir.display()
        ),
        "-device".to_string(),
        "virtio-9p-pci,fsdev=labtools,mount_tag=labtools".to_string(),
    ]
}

fn repo_path(rel: &str) -> String {
    paths::repo_root().join(rel).display().to_string()
}

fn guest_prologue() -> String {
    format!(
        "set -o pipefail\nsource {}\nlab_net_setup || exit 1\ncd {}\n",
        repo_path("tests/vm/lab-env.sh"),
        repo_path("tests/vm")
    )
}

fn demo(args: &LabArgs) -> Result<()> {
    if args.gpu == Some(GpuShape::RootComplex) {
        return Err(LabError::Usage(
            "the demo moves devmem traffic through the fake GPU, which needs it on the NICs' switch: drop --gpu root-complex (try it with `cargo xtask vm --gpu root-complex`)".into(),
        ));
    }
    let args = &LabArgs {
        gpu: Some(GpuShape::Switch),
        ..args.clone()
    };
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    let p = prepare_with(args, kselftest_share(&installed))?;
    banner(
        "demo",
        "booting the guest and moving traffic over the emulated NICs and through the fake GPU",
    );
    let script = format!(
        "{}echo '--- NICs'\nip -br link show \"$NETIF\"; ip netns exec remote ip -br link show eth-remote\n\
         ethtool -l \"$NETIF\" | sed -n '/Current/,$p'\n\
         echo '--- ping'\nping -c 3 \"$REMOTE_V4\" | tail -2\nping -6 -c 3 \"$REMOTE_V6\" | tail -2\n\
         echo '--- 256 MiB TCP transfer, verified by SHA-256 on the far side'\n\
         start=$(date +%s.%N)\nLAB_TRANSFER_BYTES=268435456 python3 suite.py tcp_transfer_checksum || exit 1\n\
         end=$(date +%s.%N)\necho \"throughput: $(echo \"268435456*8/($end-$start)/1000000\" | bc -l | cut -d. -f1) Mbit/s\"\n{}",
        guest_prologue(),
        fake_gpu::demo_script()
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(1800), false)?;
    let stats = p.lab.stats()?;
    println!();
    println!("=== vhost-nic lab demo ({:?}) ===", p.lab.accel);
    if let Some(t) = run.boot_time {
        println!("boot to first command: {:.1}s", t.as_secs_f64());
    }
    println!(
        "guest run, boot to power-off: {:.1}s",
        run.elapsed.as_secs_f64()
    );
    for line in run.output.lines().filter(|l| {
        l.starts_with("throughput")
            || l.starts_with("ok ")
            || l.starts_with("tx: ")
            || l.starts_with("rx: ")
    }) {
        println!("{line}");
    }
    println!("{}", report::stats_table(&stats));
    let proof = if run.status == Some(0) {
        println!("=== devmem through fake-GPU VRAM, checked from the host ===");
        fake_gpu::demo_prove(&p.lab)
    } else {
        Ok(())
    };
    println!(
        "run directory (logs, console, QEMU config): {}",
        p.lab.run_dir.display()
    );
    if run.status != Some(0) {
        return Err(LabError::Other {
            step: "demo".into(),
            why: format!(
                "the guest command failed (status {:?}); console: {}",
                run.status,
                run.console.display()
            ),
        });
    }
    proof
}

fn test(args: &LabArgs, only: &[TestPart]) -> Result<Tally> {
    let run = |part| only.is_empty() || only.contains(&part);
    let mut tally = Tally::default();
    if run(TestPart::Unit) {
        banner("unit", "cargo test --workspace");
        tally.add(report::cargo_tests()?);
    }
    if run(TestPart::Suite) {
        tally.add(guest_suite(args)?);
    }
    if run(TestPart::Tap) {
        tally.add(tap_port_transfer(args)?);
    }
    if run(TestPart::Stock) {
        tally.add(stock_virtio_net_pci(args)?);
    }
    if run(TestPart::Devmem) {
        tally.add(devmem::e2e(args)?);
    }
    if run(TestPart::FakeGpu) {
        tally.add(fake_gpu::e2e(args)?);
    }
    if run(TestPart::Selftests) {
        banner("e2e", "upstream kselftests in HW mode");
        tally.add(selftests(args, UPSTREAM_SELFTESTS)?);
    }
    Ok(tally)
}

/// The guest suite (tests/vm/suite.py), a reboot with the daemon kept
/// running, the host's view of the queues, and the daemon killed
/// mid-transfer.
fn guest_suite(args: &LabArgs) -> Result<Tally> {
    let mut tally = Tally::default();
    // The kselftests (ncdevmem) for the toolkit's fault cases.
    build::host_packages()?;
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    let p = prepare_with(args, kselftest_share(&installed))?;
    banner("e2e", "end-to-end suite in the guest");
    let script = format!(
        "{prologue}if [ ! -f /mnt/results/phase ]; then\n  echo 1 > /mnt/results/phase\n  \
         python3 suite.py\n  touch /mnt/results/reboot\nelse\n  \
         LAB_TEST_PREFIX=after_reboot_ python3 suite.py links_up ping_v4\nfi\n",
        prologue = guest_prologue()
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(3600), true)?;
    let guest = report::parse_ktap(&run.output);
    let expected = 10;
    tally.add(guest.clone());
    if guest.total() < expected {
        eprintln!(
            "not ok: the guest reported {} of {expected} results (boots: {}); console: {}",
            guest.total(),
            run.boots,
            run.console.display()
        );
        tally.failed += expected - guest.total();
    }
    tally.check("guest_rebooted_with_daemon_running", run.boots == 2, || {
        format!("{} boots seen", run.boots)
    });
    let stats = p.lab.stats()?;
    tally.check(
        "host_counters_show_every_queue_used",
        report::all_queues_used(&stats),
        || report::stats_table(&stats),
    );
    tally.add(driver_toolkit(&p.lab)?);
    tally.add(toolkit::fault_matrix(&p.lab)?);
    let mut lab = p.lab;
    tally.add(daemon_killed_mid_transfer(&mut lab)?);
    Ok(tally)
}

/// `cargo xtask toolkit`: the driver toolkit's guest cases alone.
fn toolkit_cases(args: &LabArgs) -> Result<Tally> {
    build::host_packages()?;
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    let p = prepare_with(args, kselftest_share(&installed))?;
    let mut t = driver_toolkit(&p.lab)?;
    t.add(toolkit::fault_matrix(&p.lab)?);
    Ok(t)
}

/// Received packets the rx-drop fault dropped on one device, all queues.
fn injected_drops(stats: &serde_json::Value, dev: &str) -> u64 {
    stats["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == dev))
        .and_then(|d| d["queues"].as_array())
        .map_or(0, |qs| {
            qs.iter()
                .map(|q| q["rx_drops"]["injected"].as_u64().unwrap_or(0))
                .sum()
        })
}

/// The driver toolkit with a real driver: the receiving NIC drops 1% of
/// its packets (rx-drop, set on the control socket while the guest runs)
/// during a checksummed TCP transfer, which must arrive intact through
/// retransmits; malformed control requests sent meanwhile get errors and
/// the daemon keeps serving the guest and the socket. Then the link-down
/// fault: the guest's driver must see the carrier go and come back (a
/// config-change interrupt each way).
fn driver_toolkit(lab: &Lab) -> Result<Tally> {
    banner("e2e", "driver toolkit: faults with the guest's driver");
    // `ask NAME`: the host acts on results/NAME and answers NAME-done.
    let script = format!(
        "{}retrans() {{ awk '/^Tcp:/ {{ n++; if (n == 2) print $13 }}' /proc/net/snmp; }}\n\
         ask() {{ touch /mnt/results/$1; for i in $(seq 300); do [ -e /mnt/results/$1-done ] && return; sleep 0.2; done; echo \"no answer to $1\"; }}\n\
         carrier() {{ for i in $(seq 100); do [ \"$(ip netns exec remote cat /sys/class/net/eth-remote/carrier)\" = $1 ] && break; sleep 0.1; done; ip netns exec remote cat /sys/class/net/eth-remote/carrier; }}\n\
         ask capture-start\n\
         LAB_TEST_PREFIX=toolkit_capture_ LAB_TRANSFER_BYTES=1048576 python3 suite.py tcp_transfer_checksum\n\
         ask capture-stop\n\
         before=$(retrans)\n\
         ask rx-drop\n\
         LAB_TEST_PREFIX=toolkit_rx_drop_ LAB_TRANSFER_BYTES=33554432 python3 suite.py tcp_transfer_checksum\n\
         echo \"retrans $before $(retrans)\"\n\
         ask rx-drop-off\n\
         ask link-down\n\
         echo \"carrier-down $(carrier 0)\"\n\
         ask link-up\n\
         echo \"carrier-up $(carrier 1)\"\n\
         ping -c 1 -W 10 \"$REMOTE_V4\" >/dev/null && echo ping-after-link-up ok\n",
        guest_prologue()
    );
    let results = lab.run_dir.join("results");
    let steps = [
        "capture-start",
        "capture-stop",
        "rx-drop",
        "rx-drop-off",
        "link-down",
        "link-up",
    ];
    let capture = results.join("toolkit.pcapng");
    let _ = std::fs::remove_file(&capture);
    let capture_start = serde_json::json!({
        "cmd": "capture", "action": "start", "file": capture, "snaplen": 128, "limit": 10000,
    })
    .to_string();
    for f in steps {
        let _ = std::fs::remove_file(results.join(f));
        let _ = std::fs::remove_file(results.join(format!("{f}-done")));
    }
    let before = lab.stats()?;
    let before_drops = injected_drops(&before, "nic1");
    let guest_done = Arc::new(AtomicBool::new(false));
    let run = std::thread::scope(|s| {
        let done = guest_done.clone();
        let results = &results;
        let host = s.spawn(move || {
            let mut ok = Vec::new();
            let mut replies = Vec::new();
            for step in steps {
                let asked = step::wait_until(Duration::from_secs(900), || {
                    results.join(step).exists() || done.load(Ordering::Acquire)
                }) && results.join(step).exists();
                if !asked {
                    break;
                }
                let req: &[u8] = match step {
                    "capture-start" => capture_start.as_bytes(),
                    "capture-stop" => br#"{"cmd":"capture","action":"stop"}"#,
                    "rx-drop" => br#"{"cmd":"fault","set":"rx-drop:ratio=0.01","device":"nic1"}"#,
                    "rx-drop-off" => br#"{"cmd":"fault","clear":"rx-drop"}"#,
                    "link-down" => br#"{"cmd":"fault","set":"link-down","device":"nic1"}"#,
                    _ => br#"{"cmd":"fault","clear":"link-down"}"#,
                };
                ok.push(lab.control(req).is_ok_and(|v| v.get("ok").is_some()));
                let _ = std::fs::write(results.join(format!("{step}-done")), b"");
                if step == "rx-drop" {
                    // Malformed requests while the guest's traffic runs.
                    let oversized = vec![b'x'; 100 * 1024];
                    let bad: [&[u8]; 4] = [
                        b"garbage",
                        br#"{"cmd":"reboot"}"#,
                        br#"{"cmd":"ring","queue":999}"#,
                        &oversized,
                    ];
                    replies = bad
                        .iter()
                        .map(|r| match lab.control(r) {
                            Ok(v) => v.get("error").map_or_else(
                                || format!("no error: {v}"),
                                |e| format!("error: {}", e.as_str().unwrap_or_default()),
                            ),
                            Err(e) => format!("no reply: {e}"),
                        })
                        .collect();
                }
            }
            (ok, replies)
        });
        let run = lab.run_guest(&script, Duration::from_secs(1800), false);
        guest_done.store(true, Ordering::Release);
        let host = host.join().unwrap_or_default();
        (run, host)
    });
    let (run, (set_ok, replies)) = run;
    // Whatever happened, the faults go.
    let cleared = lab.control(br#"{"cmd":"fault","clear":"all"}"#);
    let run = run?;
    let mut t = report::parse_ktap(&run.output);
    let stats = lab.stats()?;
    let drops = injected_drops(&stats, "nic1").saturating_sub(before_drops);
    let value = |key: &str| {
        run.output
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
    };
    let retrans: Option<(u64, u64)> = value("retrans ").and_then(|v| {
        let mut w = v.split_whitespace();
        Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
    });
    let set = |i: usize| set_ok.get(i).copied().unwrap_or(false);
    let read = toolkit::tshark_fields(&capture).map(|f| (toolkit::capture_read(&f), f));
    if let Ok((c, fields)) = &read {
        println!(
            "# toolkit_capture_reads_in_tshark: tshark -r {} -T fields -e frame.number -e frame.interface_name -e frame.p2p_dir -e frame.comment: {} packets, {} received and {} sent annotated; e.g.",
            capture.display(),
            c.packets,
            c.rx_annotated,
            c.tx_annotated
        );
        let rx = fields.lines().find(|l| l.split('\t').nth(2) == Some("1"));
        let tx = fields.lines().find(|l| l.split('\t').nth(2) == Some("0"));
        for l in rx.into_iter().chain(tx) {
            println!("#   {l}");
        }
    }
    t.check(
        "toolkit_capture_reads_in_tshark",
        set(0)
            && set(1)
            && matches!(&read, Ok((c, _)) if c.rx_annotated > 0 && c.tx_annotated > 0 && c.bad.is_empty()),
        || match &read {
            Ok((c, _)) => format!(
                "capture start/stop: {set_ok:?}; {} packets, {} received and {} sent annotated; not annotated: {:?}",
                c.packets,
                c.rx_annotated,
                c.tx_annotated,
                c.bad.iter().take(5).collect::<Vec<_>>()
            ),
            Err(e) => format!("capture start/stop: {set_ok:?}; {e}"),
        },
    );
    t.check(
        "toolkit_rx_drop_fault_fired_and_tcp_retransmitted",
        set(2) && set(3) && drops > 0 && retrans.is_some_and(|(a, b)| b > a),
        || {
            format!(
                "fault set/cleared: {set_ok:?}, injected drops on nic1: {drops}, guest TCP retransmits (before, after): {retrans:?}; console: {}",
                run.console.display()
            )
        },
    );
    t.check(
        "toolkit_malformed_requests_get_errors_daemon_serves",
        replies.len() == 4
            && replies.iter().all(|r| r.starts_with("error: "))
            && matches!(&cleared, Ok(v) if v.get("ok").is_some())
            && lab
                .control(br#"{"cmd":"queues"}"#)
                .is_ok_and(|v| v.get("ok").is_some()),
        || format!("replies: {replies:?}, clear: {cleared:?}"),
    );
    let (down, up) = (value("carrier-down "), value("carrier-up "));
    t.check(
        "toolkit_link_down_fault_reaches_the_driver",
        set(4)
            && set(5)
            && down.as_deref() == Some("0")
            && up.as_deref() == Some("1")
            && value("ping-after-link-up").is_some(),
        || {
            format!(
                "fault set/cleared: {set_ok:?}, guest carrier while down: {down:?}, after: {up:?}; console: {}",
                run.console.display()
            )
        },
    );
    Ok(t)
}

/// The daemon dies while the guest sends: the guest's transfer must end
/// with an error within its deadline and the guest must still shut down;
/// nothing may hang.
fn daemon_killed_mid_transfer(lab: &mut Lab) -> Result<Tally> {
    banner("e2e", "vhost-nic killed in the middle of a transfer");
    let script = format!(
        "{}NETTOOL_TIMEOUT=30 ip netns exec remote python3 nettool.py recv 5009 /tmp/out >/dev/null 2>&1 &\n\
         while ! ip netns exec remote ss -Hltn | grep -q ':5009'; do sleep 0.1; done\n\
         touch /mnt/results/killme\n\
         NETTOOL_TIMEOUT=30 timeout 120 python3 nettool.py send \"$REMOTE_V4\" 5009 100000000000\n\
         echo \"transfer-exit $?\"\n\
         kill $(jobs -p) 2>/dev/null; wait\n",
        guest_prologue()
    );
    let killme = lab.run_dir.join("results/killme");
    let _ = std::fs::remove_file(&killme);
    let pid = lab.daemon_pid();
    let guest_done = Arc::new(AtomicBool::new(false));
    let done = guest_done.clone();
    let killer = std::thread::spawn(move || {
        let asked = step::wait_until(Duration::from_secs(900), || {
            killme.exists() || done.load(Ordering::Acquire)
        }) && killme.exists();
        if let (true, Some(pid)) = (asked, pid) {
            // Let the transfer get going before the daemon dies.
            std::thread::sleep(Duration::from_secs(2));
            // SAFETY: kill() on the daemon this process started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        asked
    });
    let run = lab.run_guest(&script, Duration::from_secs(1200), false);
    guest_done.store(true, Ordering::Release);
    let killed = killer.join().unwrap_or(false);
    let run = run?;
    lab.stop_daemon(libc::SIGKILL);
    let mut t = Tally::default();
    let exit = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("transfer-exit "))
        .and_then(|s| s.trim().parse::<i32>().ok());
    t.check(
        "daemon_killed_transfer_fails_cleanly",
        killed && matches!(exit, Some(e) if e != 0 && e != 124),
        || format!("daemon killed: {killed}, sender exit: {exit:?} (124 = hung until timeout)"),
    );
    t.check(
        "daemon_killed_guest_still_shuts_down",
        run.status.is_some(),
        || format!("guest did not finish; console: {}", run.console.display()),
    );
    Ok(t)
}

/// Where the guest mounts the installed kselftests (a read-only 9p share).
pub(crate) const GUEST_KSELFTEST_DIR: &str = "/mnt/kselftest";

/// The TAP port: the guest's first NIC is served through a host TAP device,
/// which the test moves into a network namespace of its own (a test host on
/// this machine); a checksummed transfer from the guest must arrive intact.
fn tap_port_transfer(args: &LabArgs) -> Result<Tally> {
    const NETNS: &str = "vnl-taphost";
    const TAP: &str = "vnltap0";
    const HOST_IP: &str = "192.0.2.99";
    const PORT: &str = "5600";
    const BYTES: &str = "67108864";
    banner("e2e", "TAP port: guest -> host TAP in a test namespace");
    let ip = |a: &[&str]| {
        std::process::Command::new("ip")
            .args(a)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    ip(&["netns", "del", NETNS]);
    if !ip(&["netns", "add", NETNS]) {
        return step::fail("tap", "cannot create a network namespace (needs root)");
    }
    struct Netns;
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", NETNS])
                .status();
        }
    }
    let _netns = Netns;
    let p = prepare_lab(
        args,
        Vec::new(),
        &format!("tap:{TAP}"),
        NicModel::VhostUserDevice,
    )?;
    let cidr = format!("{HOST_IP}/24");
    let ok = ip(&["link", "set", TAP, "netns", NETNS])
        && ip(&["-n", NETNS, "addr", "add", &cidr, "dev", TAP])
        && ip(&["-n", NETNS, "link", "set", TAP, "up"]);
    if !ok {
        return step::fail("tap", format!("cannot move {TAP} into namespace {NETNS}"));
    }
    let out = p.lab.run_dir.join("tap-recv.out");
    let mut rx = std::process::Command::new("ip")
        .args(["netns", "exec", NETNS, "python3"])
        .arg(paths::repo_root().join("tests/vm/nettool.py"))
        .args(["recv", PORT])
        .arg(&out)
        .env("NETTOOL_TIMEOUT", "300")
        .spawn()
        .map_err(|e| LabError::Other {
            step: "tap".into(),
            why: format!("cannot start the receiver: {e}"),
        })?;
    let script = format!(
        "{}for i in $(seq 60); do ping -c 1 -W 1 {HOST_IP} >/dev/null && break; done\n\
         echo \"tap-sent $(python3 nettool.py send {HOST_IP} {PORT} {BYTES})\"\n",
        guest_prologue()
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(900), false);
    if !step::wait_until(Duration::from_secs(10), || {
        matches!(rx.try_wait(), Ok(Some(_)))
    }) {
        let _ = rx.kill();
    }
    let _ = rx.wait();
    let run = run?;
    let sent = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("tap-sent "))
        .map(str::trim)
        .unwrap_or("")
        .to_string();
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    let mut t = Tally::default();
    t.check(
        "tap_port_transfer_checksum",
        !sent.is_empty() && got.trim() == sent,
        || {
            format!(
                "sent `{sent}`, received `{}`; console: {}",
                got.trim(),
                run.console.display()
            )
        },
    );
    Ok(t)
}

/// Serves the guest's requests for host counter snapshots while `f` runs:
/// the guest creates results/snap-LABEL.req and waits for
/// results/snap-LABEL.json, written once the counters are taken. Returns
/// what `f` returned and the snapshots by label.
fn with_host_snapshots<T>(
    lab: &Lab,
    f: impl FnOnce() -> T,
) -> (T, BTreeMap<String, serde_json::Value>) {
    let results = lab.run_dir.join("results");
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let mut snaps = BTreeMap::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                let entries = std::fs::read_dir(&results).into_iter().flatten();
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Some(label) = name
                        .strip_prefix("snap-")
                        .and_then(|n| n.strip_suffix(".req"))
                    else {
                        continue;
                    };
                    let stats = lab
                        .stats()
                        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
                    let _ = std::fs::write(
                        results.join(format!("snap-{label}.json")),
                        stats.to_string(),
                    );
                    let _ = std::fs::remove_file(e.path());
                    snaps.insert(label.to_string(), stats);
                }
                if finished {
                    return snaps;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let out = f();
        done.store(true, Ordering::Release);
        (out, server.join().unwrap_or_default())
    })
}

/// Per queue pair packet counter `key` of lab device `dev` in a snapshot.
fn queue_counters(stats: &serde_json::Value, dev: &str, key: &str) -> Vec<u64> {
    stats["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == dev))
        .and_then(|d| d["queues"].as_array())
        .map(|qs| qs.iter().map(|q| q[key].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default()
}

/// vhost-nic behind stock QEMU: both lab NICs are QEMU's own
/// virtio-net-pci with a `-netdev vhost-user` on the daemon's sockets (QEMU
/// keeps the control queue; `ethtool -L` reaches vhost-nic as ring
/// enables). Checksummed transfers, every queue pair used once the guest
/// enables them all, only pair 0 once it goes back to one, and traffic
/// again after a guest reboot.
fn stock_virtio_net_pci(args: &LabArgs) -> Result<Tally> {
    const PREFIX: &str = "stock_virtio_net_pci_";
    banner(
        "e2e",
        "vhost-nic behind stock QEMU virtio-net-pci + -netdev vhost-user",
    );
    let p = prepare_lab(args, Vec::new(), lab::WIRE_PORT, NicModel::VirtioNetPci)?;
    let script = format!(
        "{prologue}snap() {{ touch /mnt/results/snap-$1.req\n\
         for i in $(seq 600); do [ -f /mnt/results/snap-$1.json ] && return 0; sleep 0.1; done\n\
         echo \"no host snapshot $1\"; return 1; }}\n\
         combined() {{ ethtool -l \"$1\" | awk '/Combined:/ {{print $2}}' | xargs; }}\n\
         if [ -f /mnt/results/phase ]; then\n\
         LAB_TEST_PREFIX={PREFIX}after_reboot_ python3 suite.py links_up ping_v4 parallel_transfers\n\
         exit\n\
         fi\n\
         echo 1 > /mnt/results/phase\n\
         echo \"channels-at-boot $(combined $NETIF)\"\n\
         LAB_TRANSFER_BYTES=67108864 LAB_TEST_PREFIX={PREFIX} python3 suite.py links_up ping_v4 ping_v6 \
         tcp_transfer_checksum multiqueue_spread channels_change_under_traffic\n\
         ethtool -L $NETIF combined {pairs} && ip netns exec remote ethtool -L eth-remote combined {pairs}\n\
         snap all-pairs || exit 1\n\
         ethtool -L $NETIF combined 1 && ip netns exec remote ethtool -L eth-remote combined 1\n\
         echo \"channels-one-pair $(combined $NETIF)\"\n\
         snap one-pair-before || exit 1\n\
         LAB_TEST_PREFIX={PREFIX}one_pair_ python3 suite.py parallel_transfers\n\
         snap one-pair-after || exit 1\n\
         touch /mnt/results/reboot\n",
        prologue = guest_prologue(),
        pairs = lab::QUEUE_PAIRS,
    );
    let (run, snaps) = with_host_snapshots(&p.lab, || {
        p.lab.run_guest(&script, Duration::from_secs(1800), true)
    });
    let run = run?;
    let mut t = report::guest_results(&run.output, 10, &run.console);
    let line = |prefix: &str| {
        run.output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    // ethtool -l: "maximum current".
    let at_boot = line("channels-at-boot ");
    let one = line("channels-one-pair ");
    let max = lab::QUEUE_PAIRS.to_string();
    t.check(
        &format!("{PREFIX}ethtool_channels"),
        at_boot.split(' ').next() == Some(max.as_str()) && one == format!("{max} 1"),
        || {
            format!(
                "ethtool -l combined (maximum current): at boot `{at_boot}`, after -L 1 `{one}`; want {max} and 1"
            )
        },
    );
    // A guest reboot: QEMU resets the device and enables rings with the
    // features of the previous driver still set, then the new driver starts.
    t.check(&format!("{PREFIX}guest_rebooted"), run.boots == 2, || {
        format!(
            "{} boots seen; console: {}",
            run.boots,
            run.console.display()
        )
    });
    let none = serde_json::Value::Null;
    let all = snaps.get("all-pairs").unwrap_or(&none);
    if let Some(f) = all["devices"][0]["acked_features"].as_str() {
        println!("# {PREFIX}: features QEMU acked for the vhost-user netdev: {f}");
    }
    t.check(
        &format!("{PREFIX}every_queue_pair_used"),
        report::all_queues_used(all),
        || report::stats_table(all),
    );
    let (before, after) = (
        snaps.get("one-pair-before").unwrap_or(&none),
        snaps.get("one-pair-after").unwrap_or(&none),
    );
    let delta = |dev: &str, key: &str| -> Vec<u64> {
        let (b, a) = (
            queue_counters(before, dev, key),
            queue_counters(after, dev, key),
        );
        a.iter()
            .zip(b.iter().chain(std::iter::repeat(&0)))
            .map(|(a, b)| a.saturating_sub(*b))
            .collect()
    };
    let (rx, tx) = (delta("nic1", "rx_packets"), delta("nic0", "tx_packets"));
    let only_pair0 = |d: &[u64]| {
        d.len() == usize::from(lab::QUEUE_PAIRS) && d[0] > 0 && d[1..].iter().all(|&n| n == 0)
    };
    t.check(
        &format!("{PREFIX}one_pair_after_ethtool_L"),
        only_pair0(&rx) && only_pair0(&tx),
        || format!("packets per queue pair during the transfers on one pair: nic1 rx {rx:?}, nic0 tx {tx:?}"),
    );
    Ok(t)
}

/// Upstream kselftests `cargo xtask test` runs: device statistics, header
/// split, queue management, ntuple flow steering, the RSS configuration API
/// (per-field hashing and symmetric transforms come from the device's hash
/// field extension) and device memory TCP.
/// drivers/net/ping.py passes too (`cargo xtask selftests
/// drivers/net/ping.py`) but its native XDP multi-buffer case has timed out
/// once in four TCG runs, so it stays out of the gating suite until that is
/// understood.
const UPSTREAM_SELFTESTS: &[&str] = &[
    "drivers/net/stats.py",
    "drivers/net/hds.py",
    "drivers/net/queues.py",
    "drivers/net/hw/ntuple.py",
    "drivers/net/hw/rss_api.py",
    "drivers/net/hw/devmem.py",
];

/// QEMU arguments sharing the installed kselftests read-only (tag kselftest).
fn kselftest_share(installed: &std::path::Path) -> Vec<String> {
    vec![
        "-fsdev".to_string(),
        format!(
            "local,id=kselftest,path={},security_model=none,readonly=on",
            installed.display()
        ),
        "-device".to_string(),
        "virtio-9p-pci,fsdev=kselftest,mount_tag=kselftest".to_string(),
    ]
}

/// Guest commands mounting that share on GUEST_KSELFTEST_DIR.
fn mount_kselftest() -> String {
    format!(
        "mkdir -p {dir} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro kselftest {dir} || exit 1\n",
        dir = GUEST_KSELFTEST_DIR
    )
}

fn selftests<S: AsRef<str>>(args: &LabArgs, tests: &[S]) -> Result<Tally> {
    let tests: Vec<String> = tests.iter().map(|t| t.as_ref().to_string()).collect();
    // Built from the same source as the kernel: --kernel-tree, else the
    // pinned Debian source (also with --kernel, which only skips the kernel
    // build).
    build::host_packages()?;
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    for t in &tests {
        let path = installed.join(t);
        if !path.is_file() || t.starts_with('/') || t.contains("..") {
            return Err(LabError::Usage(format!(
                "{t}: not an installed kselftest (not in {}; paths are relative to tools/testing/selftests, e.g. drivers/net/ping.py)",
                installed.display()
            )));
        }
    }
    let p = prepare_with(args, kselftest_share(&installed))?;
    banner("selftests", &tests.join(" "));
    let mut script = format!("{}{}", guest_prologue(), mount_kselftest());
    for t in &tests {
        let (dir, file) = t.rsplit_once('/').unwrap_or((".", t.as_str()));
        // Each test in a subshell, from its own directory, as
        // run_kselftest.sh does; the environment comes from lab_net_setup.
        script.push_str(&format!(
            "(cd {GUEST_KSELFTEST_DIR}/{dir} && exec ./{file})
"
        ));
    }
    let run = p.lab.run_guest(&script, Duration::from_secs(3600), false)?;
    print!("{}", run.output);
    let mut tally = report::parse_ktap(&run.output);
    if run.status.is_none() {
        eprintln!(
            "not ok: the guest did not finish; console: {}",
            run.console.display()
        );
        tally.failed += 1;
    }
    Ok(tally)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Demo(a) => demo(a).map(|()| None),
        Cmd::Test { lab, only } => test(lab, only).map(Some),
        Cmd::Vm(a) => prepare(a).and_then(|p| {
            eprintln!(
                "guest shell: run `source {} && lab_net_setup` for the lab network; `poweroff -f` to leave",
                repo_path("tests/vm/lab-env.sh")
            );
            p.lab.interactive()
        })
        .map(|()| None),
        Cmd::Selftests { lab, paths } => selftests(lab, paths).map(Some),
        Cmd::Toolkit(a) => toolkit_cases(a).map(Some),
        Cmd::Bench {
            toolkit_off_cost: true,
            rounds,
            ..
        } => toolkit_cost::run(*rounds).map(|()| None),
        Cmd::Bench {
            lab,
            devmem: true,
            bytes,
            rounds,
            no_validate,
            ..
        } => devmem::bench(lab, *bytes, *rounds, !no_validate).map(|()| None),
        Cmd::Bench {
            lab, bytes, rounds, ..
        } => bench::run(lab, *bytes, *rounds).map(|()| None),
    };
    match result {
        Ok(Some(tally)) => {
            println!("{}", tally.summary());
            if tally.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
