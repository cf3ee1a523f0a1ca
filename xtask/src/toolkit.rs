//! The driver toolkit's checks with the guest's driver: the host acting on
//! the daemon's control socket at points the guest script asks for, and
//! what the trace and capture show of the guest's traffic.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::lab::Lab;

/// The bash function guest scripts call to have the host act: `ask NAME`
/// creates results/ask-NAME and waits (at most 60 s) for
/// results/ask-NAME.done, which the host writes once it has answered.
pub const GUEST_ASK: &str = "ask() { touch /mnt/results/ask-$1; \
for i in $(seq 600); do [ -e /mnt/results/ask-$1.done ] && return 0; sleep 0.1; done; \
echo \"no answer to $1\"; return 1; }\n";

/// Runs `f` (a guest run) while answering the guest's `ask NAME` requests
/// with `answer(state, NAME)`, each once, in the order they come; its
/// reply is the content of results/ask-NAME.done. Returns
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
            loop {
                let finished = done.load(Ordering::Acquire);
                let entries = std::fs::read_dir(&results).into_iter().flatten();
                for e in entries.flatten() {
                    let file = e.file_name().to_string_lossy().into_owned();
                    let Some(name) = file.strip_prefix("ask-") else {
                        continue;
                    };
                    if name.ends_with(".done") {
                        continue;
                    }
                    let _ = std::fs::remove_file(e.path());
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
