//! Device memory TCP in the guest: the end-to-end cases of
//! tests/vm/devmem_e2e.py (part of `cargo xtask test`) and the figures of
//! `cargo xtask bench --devmem`. Both need the installed kselftests
//! (ncdevmem, the YNL library and its specs), shared read-only as for
//! `cargo xtask selftests`.

use std::time::Duration;

use crate::lab::GpuShape;
use crate::report::{self, Tally};
use crate::step::{banner, fail, Result};
use crate::{build, guest_prologue, kselftest_share, mount_kselftest, prepare_with, LabArgs};

/// Cases devmem_e2e.py runs by default.
const CASES: usize = 7;

/// The devmem cases in a guest of their own. `LAB_DEVMEM_BULK_BYTES` in
/// the environment of `cargo xtask test` sets the size of the validated
/// bulk transfer (default 1 GiB, about 30 s under TCG).
pub fn e2e(args: &LabArgs) -> Result<Tally> {
    banner("e2e", "device memory TCP (devmem RX) in the guest");
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    let p = prepare_with(args, kselftest_share(&installed))?;
    let bulk = std::env::var("LAB_DEVMEM_BULK_BYTES")
        .ok()
        .and_then(|b| b.trim().parse::<u64>().ok())
        .map(|b| format!("LAB_DEVMEM_BULK_BYTES={b} "))
        .unwrap_or_default();
    let script = format!(
        "{}{}{bulk}python3 devmem_e2e.py\n",
        guest_prologue(),
        mount_kselftest()
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(3600), false)?;
    Ok(report::guest_results(&run.output, CASES, &run.console))
}

/// One measured transfer as the guest reports it.
struct Sample {
    mode: String,
    streams: u32,
    secs: f64,
    /// Guest CPU time, all CPUs, sender and receiver (/proc/stat).
    guest_cpu: f64,
    /// CPU time of the receiving processes (wait4 of their process trees).
    rx_cpu: f64,
}

fn parse_sample(line: &str) -> Option<Sample> {
    let rest = line.strip_prefix("bench ")?;
    let mut mode = None;
    let (mut streams, mut secs, mut guest_cpu, mut rx_cpu) = (None, None, None, None);
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "mode" => mode = Some(v.to_string()),
            "streams" => streams = v.parse().ok(),
            "secs" => secs = v.parse().ok(),
            "guest_cpu" => guest_cpu = v.parse().ok(),
            "rx_cpu" => rx_cpu = v.parse().ok(),
            _ => {}
        }
    }
    Some(Sample {
        mode: mode?,
        streams: streams?,
        secs: secs?,
        guest_cpu: guest_cpu?,
        rx_cpu: rx_cpu?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `cargo xtask bench --devmem`: devmem RX (ncdevmem -v 7 into a udmabuf)
/// against plain TCP receive into host memory (nettool.py, SHA-256), both
/// from the remote namespace over the same NIC, alternating in one guest.
pub fn bench(args: &LabArgs, bytes: u64, rounds: u32, validate: bool) -> Result<()> {
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    let p = prepare_with(args, kselftest_share(&installed))?;
    banner(
        "bench",
        &format!("devmem vs plain TCP receive: {rounds} x {bytes} bytes per mode, 1 and 3 streams"),
    );
    let modes: &[&str] = if args.gpu == Some(GpuShape::Switch) {
        &["devmem", "devmem-gpu", "plain"]
    } else {
        &["devmem", "plain"]
    };
    let script = format!(
        "{}{}LAB_BENCH_MODES='{}' LAB_BENCH_VALIDATE={} python3 devmem_e2e.py bench {bytes} {rounds} 1 3\n",
        guest_prologue(),
        mount_kselftest(),
        modes.join(" "),
        u8::from(validate)
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(7200), false)?;
    let samples: Vec<Sample> = run.output.lines().filter_map(parse_sample).collect();
    if run.status != Some(0) || samples.is_empty() {
        return fail(
            "bench",
            format!(
                "the guest's benchmark failed (status {:?}, {} samples); console: {}",
                run.status,
                samples.len(),
                run.console.display()
            ),
        );
    }
    for l in run.output.lines().filter(|l| l.starts_with("# ")) {
        println!("{l}");
    }
    let gib = bytes as f64 / f64::from(1u32 << 30);
    println!(
        "accelerator: {:?}; {bytes} bytes per stream, {rounds} rounds, medians",
        p.lab.accel
    );
    println!(
        "{:<10} {:>7} {:>12} {:>22} {:>22}",
        "mode", "streams", "Mbit/s", "guest CPU-s per GiB", "receiver CPU-s per GiB"
    );
    let mut rates = std::collections::BTreeMap::new();
    for streams in [1, 3] {
        for &mode in modes {
            let s: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.mode == mode && s.streams == streams)
                .collect();
            if s.is_empty() {
                continue;
            }
            let total_gib = gib * f64::from(streams);
            let mbps = median(
                s.iter()
                    .map(|s| bytes as f64 * f64::from(streams) * 8.0 / s.secs / 1e6)
                    .collect(),
            );
            let cpu = median(s.iter().map(|s| s.guest_cpu / total_gib).collect());
            let rx = median(s.iter().map(|s| s.rx_cpu / total_gib).collect());
            println!("{mode:<10} {streams:>7} {mbps:>12.0} {cpu:>22.2} {rx:>22.2}");
            rates.insert((mode, streams), (mbps, cpu));
        }
        for (mode, baseline, what) in [
            ("devmem", "plain", "devmem / plain"),
            ("devmem-gpu", "devmem", "devmem into VRAM / into udmabuf"),
        ] {
            if let (Some(m), Some(b)) =
                (rates.get(&(mode, streams)), rates.get(&(baseline, streams)))
            {
                println!(
                    "{streams} stream(s): {what} throughput {:.2}, guest CPU per GiB {:.2}",
                    m.0 / b.0,
                    m.1 / b.1
                );
            }
        }
    }
    Ok(())
}
