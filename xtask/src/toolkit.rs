//! The driver toolkit's checks with the guest's driver: the host acting on
//! the daemon's control socket at points the guest script asks for, and
//! what the trace and capture show of the guest's traffic.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::lab::Lab;
use crate::report::{self, Tally};
use crate::step::{banner, wait_until, Result};

/// The bash function guest scripts call to have the host act: `ask NAME`
/// creates results/ask-NAME and waits (at most 60 s) for
/// results/ask-NAME.done, which the host writes once it has answered.
pub const GUEST_ASK: &str = "ask() { touch /mnt/results/ask-$1; \
for i in $(seq 600); do [ -e /mnt/results/ask-$1.done ] && return 0; sleep 0.1; done; \
echo \"no answer to $1\"; return 1; }\n";

/// Runs `f` (a guest run) while answering the guest's `ask NAME` requests
/// with `answer(state, NAME)`, each once, in the order they come; its
/// reply is the content of results/ask-NAME.done. Names are unique within
/// a guest run (clear_asks before it). Returns
/// what `f` returned and the state.
pub fn answering<T, S: Send>(
    lab: &Lab,
    state: S,
    mut answer: impl FnMut(&mut S, &str) -> String + Send,
    f: impl FnOnce() -> T,
) -> (T, S) {
    let results = lab.run_dir.join("results");
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let mut state = state;
            // The guest's files stay (removing one the guest has just
            // created races with its open on 9p); each is answered once.
            let mut answered = std::collections::BTreeSet::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                let entries = std::fs::read_dir(&results).into_iter().flatten();
                for e in entries.flatten() {
                    let file = e.file_name().to_string_lossy().into_owned();
                    let Some(name) = file.strip_prefix("ask-") else {
                        continue;
                    };
                    if name.ends_with(".done") || !answered.insert(name.to_string()) {
                        continue;
                    }
                    let reply = answer(&mut state, name);
                    let _ = std::fs::write(results.join(format!("{file}.done")), reply);
                }
                if finished {
                    return state;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let out = f();
        done.store(true, Ordering::Release);
        let state = match server.join() {
            Ok(s) => s,
            Err(p) => std::panic::resume_unwind(p),
        };
        (out, state)
    })
}

/// Removes what earlier guest runs' asks left in the results directory.
pub fn clear_asks(lab: &Lab) {
    let results = lab.run_dir.join("results");
    for e in std::fs::read_dir(&results).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("ask-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What a trace dump of a devmem receive flow shows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DevmemTrace {
    /// Queues the flow's entries were on.
    pub queues: Vec<String>,
    /// Header-split entries whose header buffer (descriptor 0 of each
    /// chain) is RAM and whose payload descriptors are all device memory.
    pub good: usize,
    /// Header-split entries laid out otherwise, described.
    pub bad: Vec<String>,
    /// Entries not split.
    pub not_split: usize,
}

/// Reads a `trace dump` answer (JSON form): for every header-split entry,
/// descriptor 0 of each chain must be in RAM and every other descriptor in
/// device memory.
pub fn devmem_trace(dump: &serde_json::Value) -> DevmemTrace {
    let mut t = DevmemTrace::default();
    let entries = dump["ok"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["entries"].as_array())
        .flatten();
    for e in entries {
        let queue = e["queue"].as_str().unwrap_or("?").to_string();
        if !t.queues.contains(&queue) {
            t.queues.push(queue);
        }
        if e["split"].as_u64().is_none() {
            t.not_split += 1;
            continue;
        }
        let chains = e["chains"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        let layout: Vec<Vec<&str>> = chains
            .iter()
            .map(|c| {
                c["descs"]
                    .as_array()
                    .map(|ds| {
                        ds.iter()
                            .map(|d| d["memory"].as_str().unwrap_or("?"))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let ok = !layout.is_empty()
            && layout.iter().all(|descs| {
                descs.len() >= 2 && descs[0] == "ram" && descs[1..].iter().all(|m| *m == "device")
            });
        if ok {
            t.good += 1;
        } else {
            t.bad.push(format!(
                "seq {} on {}: descriptors by chain {layout:?}",
                e["seq"], e["queue"]
            ));
        }
    }
    t
}

/// Reads a pcapng file with tshark: per packet its number, interface,
/// direction (frame.p2p_dir: 0 sent, 1 received) and comment, tab-separated.
pub fn tshark_fields(file: &Path) -> std::result::Result<String, String> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(["-T", "fields"])
        .args(["-e", "frame.number", "-e", "frame.interface_name"])
        .args(["-e", "frame.p2p_dir", "-e", "frame.comment"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run tshark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tshark -r {} exited {}: {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What tshark read of a capture.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CaptureRead {
    pub packets: usize,
    /// Received packets whose comment has queue=rxN, hash=0x... and steer=.
    pub rx_annotated: usize,
    /// Sent packets whose comment has queue=txN.
    pub tx_annotated: usize,
    /// Lines that are not so, as read.
    pub bad: Vec<String>,
}

/// Checks tshark_fields' lines: every packet annotated as the capture
/// format says (received: queue, hash, steer, rule, split; sent: queue).
pub fn capture_read(fields: &str) -> CaptureRead {
    let mut c = CaptureRead::default();
    for line in fields.lines().filter(|l| !l.trim().is_empty()) {
        c.packets += 1;
        let f: Vec<&str> = line.split('\t').collect();
        let (dir, comment) = (
            f.get(2).copied().unwrap_or(""),
            f.get(3).copied().unwrap_or(""),
        );
        let keys: Vec<(&str, &str)> = comment
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let has = |k: &str, prefix: &str| {
            keys.iter()
                .any(|(key, v)| *key == k && v.starts_with(prefix) && v.len() > prefix.len())
        };
        let ok = match dir {
            "1" => {
                has("queue", "rx")
                    && has("hash", "0x")
                    && has("steer", "")
                    && has("rule", "")
                    && has("split", "")
            }
            "0" => has("queue", "tx"),
            _ => false,
        };
        match (ok, dir) {
            (true, "1") => c.rx_annotated += 1,
            (true, _) => c.tx_annotated += 1,
            (false, _) => c.bad.push(line.to_string()),
        }
    }
    c
}

/// The faults tests/vm/toolkit_faults.py injects, in its order, as the
/// host sets them (every device unless `nic0` only is given).
const FAULTS: &[(&str, &str, bool)] = &[
    ("rx-drop", "rx-drop:ratio=0.02", false),
    ("rx-hold", "rx-hold", false),
    ("rx-delay", "rx-delay:ms=10", false),
    ("rx-batch", "rx-batch:count=8,ms=20", false),
    ("tx-reorder", "tx-reorder:count=4", false),
    ("rx-short", "rx-short:bytes=100000,ratio=0.05", false),
    ("rx-bad-csum", "rx-bad-csum:ratio=0.1", false),
    ("rx-no-split", "rx-no-split:ratio=0.1", false),
    ("irq-suppress", "irq-suppress:limit=4", false),
    ("irq-duplicate", "irq-duplicate", false),
    ("link-down", "link-down", false),
    ("needs-reset", "needs-reset", true),
];

/// Sum over the devices of a `fault` list answer's `fired` count of `kind`.
fn fired(lab: &Lab, kind: &str) -> Option<u64> {
    let v = lab.control(br#"{"cmd":"fault"}"#).ok()?;
    let devs = v["ok"]["devices"].as_array()?;
    Some(
        devs.iter()
            .map(|d| d["fired"][kind].as_u64().unwrap_or(0))
            .sum(),
    )
}

/// Sum of a per-queue counter over every device (`rx_drops.port_down`:
/// `["rx_drops", "port_down"]`).
fn queue_sum(stats: &serde_json::Value, path: &[&str]) -> u64 {
    stats["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["queues"].as_array())
        .flatten()
        .map(|q| path.iter().fold(q, |v, k| &v[*k]).as_u64().unwrap_or(0))
        .sum()
}

/// Frames waiting in a device for receive buffers, over every queue.
fn backlog(lab: &Lab) -> u64 {
    let Ok(v) = lab.control(br#"{"cmd":"queues"}"#) else {
        return 0;
    };
    v["ok"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["queues"].as_array())
        .flatten()
        .map(|q| q["backlog"].as_u64().unwrap_or(0))
        .sum()
}

fn port_down_drops(lab: &Lab) -> u64 {
    lab.stats().map_or(0, |s| {
        queue_sum(&s, &["rx_drops", "port_down"]) + queue_sum(&s, &["tx_drops", "port_down"])
    })
}

/// What the host did for one fault.
#[derive(Debug, Default, Clone)]
struct FaultRun {
    set: Option<String>,
    fired_before: u64,
    fired_after: u64,
    /// What traffic met while it was on, for the outages, and whether
    /// that is what the fault must do.
    met: Option<String>,
    met_ok: Option<bool>,
    cleared: bool,
    /// needs-reset: whether the guest's device reset cleared it.
    reset_cleared: Option<bool>,
    /// needs-reset: vring errors nic0 signalled to QEMU while it was set.
    vring_errors: Option<u64>,
    vring_errors_before: u64,
    port_down_before: u64,
}

/// Vring errors nic0 has signalled to its frontend (needs-reset).
fn vring_errors_signalled(lab: &Lab) -> u64 {
    lab.stats().map_or(0, |s| {
        s["devices"][0]["device"]["vring_errors_signalled"]
            .as_u64()
            .unwrap_or(0)
    })
}

/// The host's side of one `ask`: set or clear a fault.
fn answer_fault(lab: &Lab, runs: &mut BTreeMap<String, FaultRun>, name: &str) -> String {
    let (clear, kind) = match (name.strip_prefix("set-"), name.strip_prefix("clear-")) {
        (Some(k), _) => (false, k),
        (_, Some(k)) => (true, k),
        _ => return format!("error: unknown request {name}"),
    };
    let Some(&(_, spec, nic0_only)) = FAULTS.iter().find(|f| f.0 == kind) else {
        return format!("error: unknown fault {kind}");
    };
    let run = runs.entry(kind.to_string()).or_default();
    if !clear {
        run.fired_before = fired(lab, kind).unwrap_or(0);
        run.port_down_before = port_down_drops(lab);
        run.vring_errors_before = vring_errors_signalled(lab);
        let mut req = serde_json::json!({"cmd": "fault", "set": spec});
        if nic0_only {
            req["device"] = "nic0".into();
        }
        return match lab.control(req.to_string().as_bytes()) {
            Ok(v) if v.get("ok").is_some() => {
                run.set = Some(spec.to_string());
                format!("set {spec}")
            }
            Ok(v) => format!("error: {v}"),
            Err(e) => format!("error: {e}"),
        };
    }
    let deadline = Duration::from_secs(60);
    match kind {
        "rx-hold" => {
            // Buffers taken, and frames waiting for buffers the driver
            // posted and the device keeps.
            let took = wait_until(deadline, || {
                fired(lab, kind).unwrap_or(0) > run.fired_before
            });
            let starved = took && wait_until(deadline, || backlog(lab) > 0);
            run.met = Some(format!(
                "buffers held: {took}, frames waiting for buffers: {starved}"
            ));
            run.met_ok = Some(took && starved);
        }
        "irq-suppress" => {
            // Every interrupt skipped until the limit (4) is reached, or
            // the queues have stalled before that.
            let before = run.fired_before;
            wait_until(Duration::from_secs(30), || {
                fired(lab, kind).unwrap_or(0) >= before + 4
            });
            run.met = Some(format!(
                "interrupts skipped: {}",
                fired(lab, kind).unwrap_or(0).saturating_sub(before)
            ));
        }
        "link-down" => {
            run.met = Some(format!(
                "frames dropped at the downed port: {}",
                port_down_drops(lab).saturating_sub(run.port_down_before)
            ));
        }
        "needs-reset" => {
            let active = lab.control(br#"{"cmd":"fault","device":"nic0"}"#).map(|v| {
                v["ok"]["devices"][0]["active"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|f| f["kind"] == "needs-reset"))
            });
            run.reset_cleared = active.as_ref().ok().map(|a| !a);
            run.vring_errors =
                Some(vring_errors_signalled(lab).saturating_sub(run.vring_errors_before));
        }
        _ => {}
    }
    run.fired_after = fired(lab, kind).unwrap_or(0);
    run.cleared = lab
        .control(
            serde_json::json!({"cmd": "fault", "clear": kind})
                .to_string()
                .as_bytes(),
        )
        .is_ok_and(|v| v.get("ok").is_some());
    let fired = run.fired_after - run.fired_before.min(run.fired_after);
    match run.reset_cleared {
        Some(false) => format!("fired {fired}; still active after the device reset"),
        Some(true) => format!("fired {fired}; the device reset cleared it"),
        None => format!("fired {fired}"),
    }
}

/// Each fault of FAULTS under a plain TCP transfer and a devmem RX flow
/// (tests/vm/toolkit_faults.py): the guest's cases (toolkit_fault_KIND:
/// the flows intact, completed while the fault was on or after it was
/// cleared, and the reaction the guest's stack or driver shows), and the
/// host's: each fault fired (toolkit_fault_KIND_fired). The lab must share
/// the kselftests (ncdevmem).
pub fn fault_matrix(lab: &Lab) -> Result<Tally> {
    banner(
        "e2e",
        "driver toolkit: every fault under a plain TCP and a devmem RX flow",
    );
    clear_asks(lab);
    let script = format!(
        "{}{}python3 toolkit_faults.py\n",
        crate::guest_prologue(),
        crate::mount_kselftest()
    );
    let (run, runs) = answering(
        lab,
        BTreeMap::new(),
        |runs, name| answer_fault(lab, runs, name),
        || lab.run_guest(&script, Duration::from_secs(1800), false),
    );
    // Whatever happened, the faults go.
    let _ = lab.control(br#"{"cmd":"fault","clear":"all"}"#);
    let run = run?;
    print!("{}", run.output);
    let mut t = report::guest_results(&run.output, FAULTS.len(), &run.console);
    for (kind, _, _) in FAULTS {
        let r = runs.get(*kind).cloned().unwrap_or_default();
        let mut ok = r.set.is_some()
            && r.cleared
            && r.fired_after > r.fired_before
            && r.met_ok != Some(false);
        if *kind == "needs-reset" {
            // Reported as a vring error (QEMU then sets DEVICE_NEEDS_RESET)
            // and cleared by the reset the guest's driver did.
            ok &= r.reset_cleared == Some(true) && r.vring_errors == Some(1);
        }
        let name = format!("toolkit_fault_{}_fired", kind.replace('-', "_"));
        println!(
            "# {name}: set {:?}, fired {} -> {}{}{}{}",
            r.set,
            r.fired_before,
            r.fired_after,
            r.met.as_deref().map_or(String::new(), |m| format!(", {m}")),
            r.reset_cleared.map_or(String::new(), |c| format!(
                ", cleared by the guest's device reset: {c}"
            )),
            r.vring_errors.map_or(String::new(), |n| format!(
                ", vring errors signalled to QEMU: {n}"
            )),
        );
        t.check(&name, ok, || {
            format!("{r:?}; console: {}", run.console.display())
        });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(split: Option<u64>, chains: &[&[&str]]) -> serde_json::Value {
        json!({
            "seq": 1,
            "queue": "rx3",
            "split": split,
            "chains": chains.iter().map(|c| json!({
                "descs": c.iter().map(|m| json!({"memory": m})).collect::<Vec<_>>()
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn header_in_ram_payload_in_device_memory() {
        let dump = json!({"ok": {"devices": [{"name": "nic0", "entries": [
            entry(Some(66), &[&["ram", "device"]]),
            entry(Some(66), &[&["ram", "device", "device"], &["ram", "device"]]),
            entry(None, &[&["ram", "ram"]]),
            entry(Some(66), &[&["ram", "ram"]]),
            entry(Some(66), &[&["device", "device"]]),
            entry(Some(66), &[&["ram"]]),
            entry(Some(66), &[]),
        ]}]}});
        let t = devmem_trace(&dump);
        assert_eq!((t.good, t.bad.len(), t.not_split), (2, 4, 1));
        assert_eq!(t.queues, ["rx3"]);
        assert_eq!(devmem_trace(&json!({"error": "x"})), DevmemTrace::default());
    }

    #[test]
    fn capture_comments_as_tshark_prints_them() {
        let fields = "1\tnic0\t0\tqueue=tx0\n\
            2\tnic1\t1\tqueue=rx0 hash=0x033cbe4a steer=auto rule=- split=-\n\
            3\tnic1\t1\tqueue=rx0 steer=auto rule=- split=-\n\
            4\tnic0\t0\t\n\n";
        let c = capture_read(fields);
        assert_eq!((c.packets, c.rx_annotated, c.tx_annotated), (4, 1, 1));
        assert_eq!(c.bad.len(), 2);
        assert!(c.bad[0].starts_with("3\t"));
    }
}
