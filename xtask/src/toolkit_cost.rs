//! `cargo xtask bench --toolkit-off-cost`: what the driver toolkit's hooks
//! cost on the data path when trace, capture and faults are all off.
//!
//! The datapath benchmark (vhost-nic/benches/datapath.rs) is built twice:
//! without the `toolkit-hooks` feature, where every hook check is a
//! constant false and compiles away ("out"), and as shipped, with the
//! checks in and everything off ("off"). The shipped build also runs with
//! the flight recorder on ("on"), for scale. The runs of all builds rotate
//! (out out' out'' off on, out' out'' off on out, ...) so that load from
//! elsewhere on the machine falls on each alike. Per configuration the
//! median over the runs is reported, and the A/A spread: how far apart
//! single runs of the same build are.
//!
//! Both builds use one codegen unit. With the default 16, how the crate's
//! functions fall into units decides whether vm-memory's guest memory
//! copies are inlined into the receive path, and that alone moves the
//! packet rate by up to 30% between builds of nearly the same code (perf
//! shows the time in vm-memory's slice iterator in one build and not in
//! the other), which would swamp what the hooks cost.
//!
//! Even then, where the linker puts the same code moves the rate a little,
//! and run-to-run spread does not show that. So the hooks-out code is
//! built twice more with another crate metadata (`-C metadata`), which
//! changes symbol names and so the addresses of the same code ("out'",
//! "out''", in their own target directories). Their distance from "out"
//! is the layout noise: a difference between off and out within it cannot
//! be told from moving the same code around. Both are medians over runs,
//! so the verdict compares off/out with it; the A/A spread (fastest over
//! slowest single run) is printed for scale.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::paths::repo_root;
use crate::step::{banner, fail, Result};

const STEP: &str = "bench --toolkit-off-cost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Hooks compiled out.
    Out,
    /// Hooks compiled out, the same code at other addresses (1 or 2).
    OutMoved(u8),
    /// Hooks compiled in, toolkit off.
    Off,
    /// Hooks compiled in, flight recorder on.
    On,
}

const VARIANTS: [Variant; 5] = [
    Variant::Out,
    Variant::OutMoved(1),
    Variant::OutMoved(2),
    Variant::Off,
    Variant::On,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Out => "out",
            Variant::OutMoved(1) => "out'",
            Variant::OutMoved(_) => "out''",
            Variant::Off => "off",
            Variant::On => "on",
        }
    }

    fn slot(self) -> usize {
        VARIANTS.iter().position(|&x| x == self).unwrap_or(0)
    }
}

/// One configuration of the benchmark: frame length, split, flow rules.
type Case = (u32, String, u32);

/// Builds the datapath benchmark with or without the hooks and, with
/// `moved`, another crate metadata in its own target directory (the same
/// code at other addresses); returns the binary.
fn build(hooks: bool, moved: Option<u8>) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root())
        .env("CARGO_PROFILE_BENCH_CODEGEN_UNITS", "1");
    if let Some(n) = moved {
        // The workspace sets no RUSTFLAGS, so this adds the one flag.
        cmd.env("RUSTFLAGS", format!("-C metadata=layout-{n}")).env(
            "CARGO_TARGET_DIR",
            repo_root().join(format!("target/toolkit-cost-layout-{n}")),
        );
    }
    cmd.args([
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
            "building the datapath benchmark, toolkit hooks {}{}",
            if hooks { "in" } else { "out" },
            moved.map_or(String::new(), |n| format!(", layout {n}"))
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
    let with_hooks = build(true, None)?;
    let without = build(false, None)?;
    let moved = [build(false, Some(1))?, build(false, Some(2))?];
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
    let mut cases: Vec<(Case, [Vec<f64>; VARIANTS.len()])> = Vec::new();
    for (i, &v) in order.iter().enumerate() {
        let started = std::time::Instant::now();
        let exe = match v {
            Variant::Out => &without,
            Variant::OutMoved(1) => &moved[0],
            Variant::OutMoved(_) => &moved[1],
            Variant::Off | Variant::On => &with_hooks,
        };
        let results = run_once(exe, v == Variant::On)?;
        eprintln!(
            "    run {}/{}: {} ({:.0} s)",
            i + 1,
            order.len(),
            v.name(),
            started.elapsed().as_secs_f64()
        );
        let slot = v.slot();
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
    println!("  out:  toolkit hooks compiled out (vhost-nic --no-default-features)");
    println!("  off:  hooks compiled in, trace, capture and faults off (the default build)");
    println!("  on:   the default build with the flight recorder on");
    println!("  A/A:  the larger spread of out's and off's runs (fastest over slowest, minus 1)");
    println!("  move: the same code as out at other addresses (out', out''): the larger distance of their medians from out's");
    println!("  diff: noise when off/out is within move of 1 (medians against medians; A/A, a spread of single runs, is shown for scale)");
    println!();
    println!(
        "{:>5} {:>5} {:>5}  {:>8} {:>8} {:>8}  {:>6} {:>6} {:>6}  {:>8}",
        "frame",
        "split",
        "rules",
        "out Mpps",
        "off Mpps",
        "off/out",
        "A/A",
        "move",
        "diff",
        "on/out"
    );
    let mut sums = Sums::default();
    for ((frame, split, rules), rates) in &cases {
        let med = |v: Variant| median(rates[v.slot()].clone());
        let m_out = med(Variant::Out);
        let ratio = med(Variant::Off) / m_out;
        let on = med(Variant::On) / m_out;
        let moved = [1, 2]
            .map(|n| (med(Variant::OutMoved(n)) / m_out - 1.0).abs())
            .into_iter()
            .fold(0.0, f64::max);
        let aa = spread(&rates[Variant::Out.slot()]).max(spread(&rates[Variant::Off.slot()]));
        let within = (ratio - 1.0).abs() <= moved;
        let verdict = match (within, ratio < 1.0) {
            (true, _) => "noise",
            (false, true) => "slower",
            (false, false) => "faster",
        };
        sums.add(ratio, on, aa, moved, within);
        println!(
            "{frame:>5} {split:>5} {rules:>5}  {m_out:>8.3} {:>8.3} {ratio:>8.3}  {:>5.1}% {:>5.1}% {verdict:>6}  {on:>8.2}",
            med(Variant::Off),
            aa * 100.0,
            moved * 100.0,
        );
    }
    println!();
    sums.print();
    println!();
    println!("runs (Mpps, in run order):");
    for ((frame, split, rules), rates) in &cases {
        let runs: Vec<String> = VARIANTS
            .iter()
            .map(|v| {
                let r: Vec<String> = rates[v.slot()].iter().map(|r| format!("{r:.3}")).collect();
                format!("{} [{}]", v.name(), r.join(" "))
            })
            .collect();
        println!("  {frame:>4} {split:>3} {rules:>5}  {}", runs.join("  "));
    }
    Ok(())
}

/// The summary over all cases.
#[derive(Default)]
struct Sums {
    cases: usize,
    log_off: f64,
    log_on: f64,
    log_move: f64,
    below: usize,
    within_noise: usize,
    worst_aa: f64,
    worst_move: f64,
}

impl Sums {
    fn add(&mut self, off: f64, on: f64, aa: f64, moved: f64, within_noise: bool) {
        self.cases += 1;
        self.log_off += off.ln();
        self.log_on += on.ln();
        self.log_move += (1.0 + moved).ln();
        self.below += usize::from(off < 1.0);
        self.within_noise += usize::from(within_noise);
        self.worst_aa = self.worst_aa.max(aa);
        self.worst_move = self.worst_move.max(moved);
    }

    fn print(&self) {
        let n = self.cases.max(1) as f64;
        println!(
            "geometric mean off/out {:.3} (below 1 in {} of {} cases, within noise in {}), on/out {:.2}",
            (self.log_off / n).exp(),
            self.below,
            self.cases,
            self.within_noise,
            (self.log_on / n).exp()
        );
        println!(
            "noise: largest A/A spread {:.1}%; moving the same code: {:.1}% on average, {:.1}% at most",
            self.worst_aa * 100.0,
            ((self.log_move / n).exp() - 1.0) * 100.0,
            self.worst_move * 100.0
        );
    }
}
