//! Counting results: cargo's test summaries, KTAP from the guest, and
//! checks made on the host; the closing `N passed, N failed, N skipped`.

use std::process::Command;

use crate::paths::repo_root;
use crate::step::{LabError, Result};

#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Tally {
    pub fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }

    pub fn total(&self) -> usize {
        self.passed + self.failed + self.skipped
    }

    /// Records a host-side check, printed as a KTAP-style line.
    pub fn check(&mut self, name: &str, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
            println!("ok - {name}");
        } else {
            self.failed += 1;
            println!("not ok - {name}");
            for l in why().lines() {
                println!("# {l}");
            }
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// Counts KTAP/TAP result lines (`ok N ...`, `not ok N ...`, `# SKIP`).
pub fn parse_ktap(text: &str) -> Tally {
    let mut t = Tally::default();
    for line in text.lines().map(str::trim_start) {
        let (ok, rest) = if let Some(r) = line.strip_prefix("not ok ") {
            (false, r)
        } else if let Some(r) = line.strip_prefix("ok ") {
            (true, r)
        } else {
            continue;
        };
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let skip = rest.to_ascii_uppercase().contains("# SKIP");
        match (ok, skip) {
            (_, true) => t.skipped += 1,
            (true, false) => t.passed += 1,
            (false, false) => t.failed += 1,
        }
    }
    t
}

/// Runs the workspace tests, echoing cargo's output, and sums its
/// `test result:` lines.
pub fn cargo_tests() -> Result<Tally> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args(["test", "--workspace", "--quiet"])
        .output()
        .map_err(|e| LabError::Other {
            step: "unit".into(),
            why: format!("cannot run cargo test: {e}"),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let mut t = Tally::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("test result: ") else {
            continue;
        };
        let num = |key: &str| {
            rest.split(';')
                .find_map(|p| p.trim().strip_suffix(key).map(str::trim))
                .map(|n| n.trim_start_matches(|c: char| !c.is_ascii_digit()))
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        };
        t.passed += num("passed");
        t.failed += num("failed");
        t.skipped += num("ignored");
    }
    if !out.status.success() && t.failed == 0 {
        t.failed = 1;
    }
    Ok(t)
}

/// The guest's KTAP results, with every result it did not report (it
/// crashed, hung or skipped a case) counted as failed.
pub fn guest_results(output: &str, expected: usize, console: &std::path::Path) -> Tally {
    let mut t = parse_ktap(output);
    if t.total() < expected {
        eprintln!(
            "not ok: the guest reported {} of {expected} results; console: {}",
            t.total(),
            console.display()
        );
        t.failed += expected - t.total();
    }
    t
}

/// The per-queue-pair counters of one device (nic0, nic1).
pub fn queue_stats(stats: &serde_json::Value, dev: &str) -> Vec<serde_json::Value> {
    queues(stats, dev)
}

/// A per-queue counter summed over a device's queue pairs.
pub fn device_sum(stats: &serde_json::Value, dev: &str, key: &str) -> u64 {
    queues(stats, dev)
        .iter()
        .filter_map(|q| q[key].as_u64())
        .sum()
}

fn queues(stats: &serde_json::Value, dev: &str) -> Vec<serde_json::Value> {
    stats["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["name"] == dev))
        .and_then(|d| d["queues"].as_array().cloned())
        .unwrap_or_default()
}

/// Every queue pair carried traffic: the remote NIC received and the local
/// NIC transmitted on each.
pub fn all_queues_used(stats: &serde_json::Value) -> bool {
    let rx = queues(stats, "nic1");
    let tx = queues(stats, "nic0");
    !rx.is_empty()
        && rx.iter().all(|q| q["rx_packets"].as_u64().unwrap_or(0) > 0)
        && tx.iter().all(|q| q["tx_packets"].as_u64().unwrap_or(0) > 0)
}

/// Per-queue counters of both NICs, as a table.
pub fn stats_table(stats: &serde_json::Value) -> String {
    let mut s = String::from("vhost-nic counters (per queue pair):\n");
    s.push_str(
        "  nic   q   rx_packets     rx_bytes   tx_packets     tx_bytes  rx_drops  tx_drops\n",
    );
    for dev in ["nic0", "nic1"] {
        for (i, q) in queues(stats, dev).iter().enumerate() {
            let drops = |k: &str| {
                q[k].as_object()
                    .map(|m| m.values().filter_map(|v| v.as_u64()).sum::<u64>())
                    .unwrap_or(0)
            };
            let n = |k: &str| q[k].as_u64().unwrap_or(0);
            s.push_str(&format!(
                "  {dev} {i:>3} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9}\n",
                n("rx_packets"),
                n("rx_bytes"),
                n("tx_packets"),
                n("tx_bytes"),
                drops("rx_drops"),
                drops("tx_drops")
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ktap() {
        let t = parse_ktap("TAP version 13\n1..4\nok 1 a\nnot ok 2 b\nok 3 c # SKIP no hw\n  ok 1 nested\nok - host\n");
        assert_eq!((t.passed, t.failed, t.skipped), (2, 1, 1));
        assert_eq!(t.summary(), "2 passed, 1 failed, 1 skipped");
    }

    #[test]
    fn counts_kselftest_python_ktap() {
        let out = "TAP version 13\n1..3\nok 1 ping.test_default_v4\n\
                   # Check| At ./ping.py, line 10, in test:\n\
                   not ok 2 ping.test_xdp_native_sb\n\
                   ok 3 ping.test_xdp_offload # SKIP device does not support offloaded XDP\n\
                   # Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0\n";
        let t = parse_ktap(out);
        assert_eq!((t.passed, t.failed, t.skipped), (1, 1, 1));
    }
}
