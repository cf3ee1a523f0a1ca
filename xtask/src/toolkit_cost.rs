//! `cargo xtask bench --toolkit-off-cost`: what the driver toolkit's hooks
//! cost on the data path when trace, capture and faults are all off.
//!
//! The datapath benchmark (vhost-nic/benches/datapath.rs) is built twice:
//! without the `toolkit-hooks` feature, where every hook check is a
//! constant false and compiles away ("out"), and as shipped, with the
//! checks in and everything off ("off"). The shipped build also runs with
//! the flight recorder on ("on"), for scale. The three runs rotate (out
//! off on, off on out, on out off, ...) so that load from elsewhere on the
//! machine falls on each alike. Per configuration the median over the runs
//! is reported, and the A/A spread: how far apart runs of the same build
//! are, the noise the off/out ratio must be read against.
//!
//! Both builds use one codegen unit. With the default 16, how the crate's
//! functions fall into units decides whether vm-memory's guest memory
//! copies are inlined into the receive path, and that alone moves the
//! packet rate by up to 30% between builds of nearly the same code (perf
//! shows the time in vm-memory's slice iterator in one build and not in
//! the other), which would swamp what the hooks cost.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::paths::repo_root;
use crate::step::{banner, fail, Result};

const STEP: &str = "bench --toolkit-off-cost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Hooks compiled out.
    Out,
    /// Hooks compiled in, toolkit off.
    Off,
    /// Hooks compiled in, flight recorder on.
    On,
}

const VARIANTS: [Variant; 3] = [Variant::Out, Variant::Off, Variant::On];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Out => "out",
            Variant::Off => "off",
            Variant::On => "on",
        }
    }
}

/// One configuration of the benchmark: frame length, split, flow rules.
type Case = (u32, String, u32);

/// Builds the datapath benchmark with or without the hooks; returns the
/// binary.
fn build(hooks: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .env("CARGO_PROFILE_BENCH_CODEGEN_UNITS", "1")
        .args([
            "bench",
            "-p",
            "vhost-nic",
            "--bench",
            "datapath",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]);
    if !hooks {
        cmd.arg("--no-default-features");
    }
    banner(
        STEP,
        &format!(
            "building the datapath benchmark, toolkit hooks {}",
            if hooks { "in" } else { "out" }
        ),
    );
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .or_else(|e| fail(STEP, format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return fail(STEP, format!("cargo bench --no-run: {}", out.status));
    }
    // The executable of the `datapath` bench target, from cargo's JSON
    // messages (its file name carries a hash that depends on the features).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exe = stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "datapath")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from));
    match exe {
        Some(p) => Ok(p),
        None => fail(STEP, "cargo named no datapath benchmark executable"),
    }
}

/// Runs the benchmark once; nanoseconds per packet for each case.
fn run_once(exe: &PathBuf, trace: bool) -> Result<Vec<(Case, f64)>> {
    let mut cmd = Command::new(exe);
    cmd.arg("--tsv");
    if trace {
        cmd.arg("--trace");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .or_else(|e| fail(STEP, format!("cannot run {}: {e}", exe.display())))?;
    if !out.status.success() {
        return fail(STEP, format!("{}: {}", exe.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cases: Vec<(Case, f64)> = stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.strip_prefix("case\t")?.split('\t').collect();
            let [frame, split, rules, ns] = f.as_slice() else {
                return None;
            };
            Some((
                (frame.parse().ok()?, split.to_string(), rules.parse().ok()?),
                ns.parse().ok()?,
            ))
        })
        .collect();
    if cases.is_empty() {
        return fail(STEP, format!("{} printed no cases", exe.display()));
    }
    Ok(cases)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Largest over smallest, minus one: how far apart the runs of one build
/// are (0 with one run).
fn spread(v: &[f64]) -> f64 {
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    if v.is_empty() {
        0.0
    } else {
        max / min - 1.0
    }
}

pub fn run(runs: u32) -> Result<()> {
    let runs = runs.max(2);
    let with_hooks = build(true)?;
    let without = build(false)?;
    let order: Vec<Variant> = (0..runs as usize)
        .flat_map(|r| (0..VARIANTS.len()).map(move |k| VARIANTS[(r + k) % VARIANTS.len()]))
        .collect();
    banner(
        STEP,
        &format!(
            "{} benchmark runs, in this order: {}",
            order.len(),
            order.iter().map(|v| v.name()).collect::<Vec<_>>().join(" ")
        ),
    );
    // Per case: the packet rates (Mpps) of each variant's runs.
    let mut cases: Vec<(Case, [Vec<f64>; 3])> = Vec::new();
    for (i, &v) in order.iter().enumerate() {
        let started = std::time::Instant::now();
        let exe = if v == Variant::Out {
            &without
        } else {
            &with_hooks
        };
        let results = run_once(exe, v == Variant::On)?;
        eprintln!(
            "    run {}/{}: {} ({:.0} s)",
            i + 1,
            order.len(),
            v.name(),
            started.elapsed().as_secs_f64()
        );
        let slot = VARIANTS.iter().position(|&x| x == v).unwrap_or(0);
        for (case, ns) in results {
            let k = match cases.iter().position(|(c, _)| *c == case) {
                Some(k) => k,
                None => {
                    cases.push((case, Default::default()));
                    cases.len() - 1
                }
            };
            cases[k].1[slot].push(1e3 / ns);
        }
    }

    println!();
    println!(
        "Toolkit off cost: datapath benchmark, {runs} runs per build, order rotated; Mpps is the median of the runs"
    );
    println!("  out: toolkit hooks compiled out (vhost-nic --no-default-features)");
    println!("  off: hooks compiled in, trace, capture and faults off (the default build)");
    println!("  on:  the default build with the flight recorder on");
    println!("  A/A: the larger of the two builds' spreads (fastest run over slowest run of one build, minus 1)");
    println!("  diff: noise when off/out is within the A/A spread of 1");
    println!();
    println!(
        "{:>5} {:>5} {:>5}  {:>8} {:>8} {:>8}  {:>7} {:>6}  {:>8}",
        "frame", "split", "rules", "out Mpps", "off Mpps", "off/out", "A/A", "diff", "on/out"
    );
    let (mut log_ratio, mut log_on, mut worst_aa) = (0.0, 0.0, 0.0f64);
    let mut below = 0;
    for ((frame, split, rules), rates) in &cases {
        let [out, off, on] = rates;
        let (m_out, m_off, m_on) = (median(out.clone()), median(off.clone()), median(on.clone()));
        let ratio = m_off / m_out;
        below += usize::from(ratio < 1.0);
        let aa = spread(out).max(spread(off));
        worst_aa = worst_aa.max(aa);
        log_ratio += ratio.ln();
        log_on += (m_on / m_out).ln();
        let verdict = if (ratio - 1.0).abs() <= aa {
            "noise"
        } else if ratio < 1.0 {
            "slower"
        } else {
            "faster"
        };
        println!(
            "{frame:>5} {split:>5} {rules:>5}  {m_out:>8.3} {m_off:>8.3} {ratio:>8.3}  {:>6.1}% {verdict:>6}  {:>8.2}",
            aa * 100.0,
            m_on / m_out
        );
    }
    let n = cases.len() as f64;
    println!();
    println!(
        "geometric mean off/out {:.3} (off below out in {below} of {} cases), largest A/A spread {:.1}%, geometric mean on/out {:.2}",
        (log_ratio / n).exp(),
        cases.len(),
        worst_aa * 100.0,
        (log_on / n).exp()
    );
    println!();
    println!("runs (Mpps, in run order):");
    for ((frame, split, rules), rates) in &cases {
        let fmt = |v: &Vec<f64>| {
            v.iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "  {frame:>4} {split:>3} {rules:>5}  out [{}]  off [{}]  on [{}]",
            fmt(&rates[0]),
            fmt(&rates[1]),
            fmt(&rates[2])
        );
    }
    Ok(())
}
