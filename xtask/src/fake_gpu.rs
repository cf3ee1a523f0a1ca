//! The fake GPU in the lab: its end-to-end cases (tests/vm/fake_gpu_e2e.py
//! and upstream devmem.py on VRAM, part of `cargo xtask test`) and the
//! demo's devmem TX and RX through VRAM, proven from the host with
//! `fake-gpu inspect` and vhost-nic's counters.

use std::process::Command;
use std::time::Duration;

use crate::lab::{GpuShape, Lab};
use crate::report::{self, Tally};
use crate::step::{banner, LabError, Result};
use crate::{
    build, guest_prologue, kselftest_share, mount_kselftest, prepare_with, toolkit, LabArgs,
};

/// The pattern `ncdevmem -v 7` checks: byte i of the stream is PATTERN[i % 7].
const PATTERN: [u8; 7] = [1, 2, 3, 4, 5, 6, 10];

/// Cases fake_gpu_e2e.py runs on each machine shape.
const SWITCH_CASES: usize = 7;
const ROOT_COMPLEX_CASES: usize = 1;

/// Upstream devmem.py's cases, run again with ncdevmem's fake-GPU provider.
const DEVMEM_PY_CASES: usize = 5;

/// The frags reported last, which nothing can have overwritten since: the
/// demo requires each of their bytes in VRAM.
const CHECKED_TAIL_FRAGS: usize = 256;

fn with_gpu(args: &LabArgs, shape: GpuShape) -> LabArgs {
    LabArgs {
        gpu: Some(shape),
        ..args.clone()
    }
}

/// What the guest's asks had the host do in the switch run.
#[derive(Default)]
struct Asked {
    /// The devmem RX flow's trace (`trace-devmem-rx`).
    dumps: Option<(Result<serde_json::Value>, String)>,
    /// fake_gpu_allocs_seen_by_host: the allocation table's counts when
    /// the guest's buffers were live (`gpu-allocs-live`), and the outcome
    /// of each of the two checks.
    allocs_at_live: Option<AllocCounts>,
    allocs: Vec<(&'static str, std::result::Result<String, String>)>,
}

/// `cargo xtask test`'s fake GPU part: a guest with the GPU on the NICs'
/// switch (driver cases, devmem RX into VRAM, upstream devmem.py on the
/// fake-GPU provider, the engine's error counters and the driver's VRAM
/// allocations seen from the host), then one with the GPU on the root
/// complex (the bind is refused).
pub fn e2e(args: &LabArgs) -> Result<Tally> {
    let installed = build::selftests(args.kernel_tree.as_deref())?;
    let mut tally = Tally::default();

    banner("e2e", "fake GPU on the NICs' PCIe switch");
    let p = prepare_with(
        &with_gpu(args, GpuShape::Switch),
        kselftest_share(&installed),
    )?;
    // The flight recorder runs on the guest's NIC from the start; the guest
    // asks for the dump once fake_gpu_e2e.py's devmem RX into VRAM is over.
    let traced = p.lab.control(
        format!(r#"{{"cmd":"trace","action":"on","depth":{TRACE_DEPTH},"device":"nic0"}}"#)
            .as_bytes(),
    );
    toolkit::clear_asks(&p.lab);
    let script = format!(
        "{}{}{}python3 fake_gpu_e2e.py\n\
         ask trace-devmem-rx\n\
         (cd {}/drivers/net/hw && NCDEVMEM_PROVIDER=fake-gpu ./devmem.py)\n",
        guest_prologue(),
        mount_kselftest(),
        toolkit::GUEST_ASK,
        crate::GUEST_KSELFTEST_DIR
    );
    let (run, asked) = toolkit::answering(
        &p.lab,
        Asked::default(),
        |asked, name| match name {
            "trace-devmem-rx" => {
                asked.dumps = Some(trace_devmem_flow(&p.lab));
                String::new()
            }
            ALLOCS_LIVE => {
                let r = allocs_live(&p.lab, &mut asked.allocs_at_live);
                asked.allocs.push((ALLOCS_LIVE, r.clone()));
                r.unwrap_or_else(|e| format!("error: {e}"))
            }
            ALLOCS_FREED => {
                let r = allocs_freed(&p.lab, asked.allocs_at_live);
                asked.allocs.push((ALLOCS_FREED, r.clone()));
                r.unwrap_or_else(|e| format!("error: {e}"))
            }
            _ => format!("error: unknown request {name}"),
        },
        || p.lab.run_guest(&script, Duration::from_secs(3600), false),
    );
    let run = run?;
    print!("{}", run.output);
    tally.add(report::guest_results(
        &run.output,
        SWITCH_CASES + DEVMEM_PY_CASES,
        &run.console,
    ));
    check_devmem_trace(&mut tally, &traced, asked.dumps);
    for (name, r) in &asked.allocs {
        match r {
            Ok(what) => println!("# fake_gpu_host_sees_guest_allocs: {name}: {what}"),
            Err(e) => println!("# fake_gpu_host_sees_guest_allocs: {name}: {e}"),
        }
    }
    let asks: Vec<&str> = asked.allocs.iter().map(|(n, _)| *n).collect();
    tally.check(
        "fake_gpu_host_sees_guest_allocs",
        asks == [ALLOCS_LIVE, ALLOCS_FREED] && asked.allocs.iter().all(|(_, r)| r.is_ok()),
        || format!("the guest's asks and the host's checks: {:?}", asked.allocs),
    );
    let stats = inspect_json(&p.lab, "stats")?;
    let errors = stats["errors"].as_u64().unwrap_or(0);
    tally.check("fake_gpu_host_counts_engine_errors", errors >= 4, || {
        format!(
            "fake-gpu inspect stats: {errors} engine errors after 4 malformed commands: {stats}"
        )
    });
    let rx_vram = report::device_sum(&p.lab.stats()?, "nic0", "rx_payload_bytes_to_device_memory");
    tally.check("fake_gpu_nic_wrote_payload_to_vram", rx_vram > 0, || {
        "vhost-nic counted no payload bytes written to device memory".into()
    });
    drop(p);

    banner("e2e", "fake GPU on the root complex");
    let p = prepare_with(
        &with_gpu(args, GpuShape::RootComplex),
        kselftest_share(&installed),
    )?;
    let script = format!(
        "{}{}LAB_GPU_SHAPE=root-complex python3 fake_gpu_e2e.py\n",
        guest_prologue(),
        mount_kselftest()
    );
    let run = p.lab.run_guest(&script, Duration::from_secs(1800), false)?;
    print!("{}", run.output);
    tally.add(report::guest_results(
        &run.output,
        ROOT_COMPLEX_CASES,
        &run.console,
    ));
    Ok(tally)
}

/// Entries the flight recorder keeps per virtqueue in the e2e run: the
/// last of the devmem flow's packets on its queue.
const TRACE_DEPTH: u32 = 1024;

/// The TCP port fake_gpu_e2e.py's devmem_rx_into_vram case receives on.
const DEVMEM_RX_PORT: u16 = 7952;

/// The trace of the devmem RX flow on nic0, JSON and the last two entries
/// as text; the recorder is turned off after.
fn trace_devmem_flow(lab: &Lab) -> (Result<serde_json::Value>, String) {
    let req = |format: &str, last: &str| {
        format!(
            r#"{{"cmd":"trace","action":"dump","device":"nic0","flow":"proto=tcp,dport={DEVMEM_RX_PORT}","format":"{format}"{last}}}"#
        )
    };
    let json = lab.control(req("json", "").as_bytes());
    let text = lab
        .control(req("text", r#","last":2"#).as_bytes())
        .map(|v| {
            v["ok"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_string)
        })
        .unwrap_or_else(|e| e.to_string());
    let _ = lab.control(br#"{"cmd":"trace","action":"off"}"#);
    (json, text)
}

/// toolkit_trace_devmem_payload_in_vram: the trace of the devmem flow
/// shows every header-split packet's header buffer in RAM and its payload
/// buffers in device memory (the VRAM region of the memory table).
fn check_devmem_trace(
    tally: &mut Tally,
    traced: &Result<serde_json::Value>,
    dumps: Option<(Result<serde_json::Value>, String)>,
) {
    const NAME: &str = "toolkit_trace_devmem_payload_in_vram";
    let on = matches!(traced, Ok(v) if v.get("ok").is_some());
    let Some((Ok(dump), text)) = dumps else {
        tally.check(NAME, false, || {
            format!("no trace dump: trace on {traced:?}; the guest never asked, or the dump failed")
        });
        return;
    };
    let t = toolkit::devmem_trace(&dump);
    println!(
        "# {NAME}: flow dport {DEVMEM_RX_PORT} on {:?}: {} split entries header RAM / payload device memory, {} laid out otherwise, {} not split; the last two:",
        t.queues,
        t.good,
        t.bad.len(),
        t.not_split
    );
    for l in text.lines() {
        println!("#   {l}");
    }
    tally.check(
        NAME,
        on && t.queues.len() == 1 && t.good > 0 && t.bad.is_empty(),
        || {
            format!(
                "trace on: {traced:?}; queues {:?}; otherwise laid out: {:?}",
                t.queues,
                t.bad.iter().take(5).collect::<Vec<_>>()
            )
        },
    );
}

/// The asks of fake_gpu_e2e.py's allocs_seen_by_host, and the file in
/// which the guest lists its buffers (JSON: `{"allocs": [{"offset",
/// "size", "id"}]}`, VRAM offsets and dma-buf inode numbers).
const ALLOCS_LIVE: &str = "gpu-allocs-live";
const ALLOCS_FREED: &str = "gpu-allocs-freed";
const ALLOCS_FILE: &str = "gpu-allocs.json";

/// The allocation table's counts as `fake-gpu inspect allocs` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AllocCounts {
    live: u64,
    bytes: u64,
    created: u64,
    freed: u64,
}

/// An allocation: (VRAM offset, size, id).
type Entry = (u64, u64, u64);

/// (offset, size, id) of each allocation in a JSON list, sorted.
fn alloc_list(v: &serde_json::Value) -> std::result::Result<Vec<Entry>, String> {
    let list = v.as_array().ok_or_else(|| format!("not a list: {v}"))?;
    let mut out = list
        .iter()
        .map(|a| {
            let n = |k: &str| a[k].as_u64().ok_or_else(|| format!("no {k} in {a}"));
            Ok((n("offset")?, n("size")?, n("id")?))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    out.sort_unstable();
    Ok(out)
}

/// The device's table (`fake-gpu inspect allocs`): its entries and counts.
fn device_allocs(lab: &Lab) -> std::result::Result<(Vec<Entry>, AllocCounts), String> {
    let v = inspect_json(lab, "allocs").map_err(|e| e.to_string())?;
    let n = |k: &str| v[k].as_u64().ok_or_else(|| format!("no {k} in {v}"));
    let counts = AllocCounts {
        live: n("live")?,
        bytes: n("bytes")?,
        created: n("created")?,
        freed: n("freed")?,
    };
    Ok((alloc_list(&v["allocs"])?, counts))
}

/// What the guest says it allocated.
fn guest_allocs(lab: &Lab) -> std::result::Result<Vec<Entry>, String> {
    let path = lab.run_dir.join("results").join(ALLOCS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    alloc_list(&v["allocs"])
}

fn show(list: &[Entry]) -> String {
    list.iter()
        .map(|(o, s, id)| format!("{o:#x}+{s:#x} id {id}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `gpu-allocs-live`: the device lists exactly the guest's buffers (no
/// other allocation is live at that point of the run).
fn allocs_live(
    lab: &Lab,
    at_live: &mut Option<AllocCounts>,
) -> std::result::Result<String, String> {
    let want = guest_allocs(lab)?;
    let (got, counts) = device_allocs(lab)?;
    if got != want {
        return Err(format!(
            "the device lists [{}], the guest allocated [{}]",
            show(&got),
            show(&want)
        ));
    }
    let bytes: u64 = want.iter().map(|a| a.1).sum();
    if counts.live != want.len() as u64 || counts.bytes != bytes {
        return Err(format!(
            "counts {counts:?}: want {} live, {bytes} bytes",
            want.len()
        ));
    }
    *at_live = Some(counts);
    Ok(format!(
        "the device lists the {} live allocations: {}",
        want.len(),
        show(&got)
    ))
}

/// `gpu-allocs-freed`: after the guest freed its buffers the table is
/// empty, and exactly that many frees (no allocation) were noted since.
fn allocs_freed(lab: &Lab, at_live: Option<AllocCounts>) -> std::result::Result<String, String> {
    let at = at_live.ok_or("no successful gpu-allocs-live check before")?;
    let freed = guest_allocs(lab)?;
    let (got, counts) = device_allocs(lab)?;
    if !got.is_empty() || counts.live != 0 || counts.bytes != 0 {
        return Err(format!(
            "still listed after the guest freed everything: [{}] ({counts:?})",
            show(&got)
        ));
    }
    let n = freed.len() as u64;
    if counts.created != at.created || counts.freed != at.freed + n {
        return Err(format!(
            "counts {at:?} -> {counts:?}: want {n} frees and no allocation"
        ));
    }
    Ok(format!(
        "none listed; {n} frees noted (created {}, freed {})",
        counts.created, counts.freed
    ))
}

/// `fake-gpu inspect --socket RUN_DIR/gpu.sock OP...`, its stdout.
fn inspect(lab: &Lab, op: &[&str]) -> Result<String> {
    let mut c = Command::new(lab.fake_gpu_bin());
    c.arg("inspect")
        .arg("--socket")
        .arg(lab.gpu_socket())
        .args(op);
    let out = c.output().map_err(|e| LabError::Other {
        step: "fake-gpu inspect".into(),
        why: format!("cannot run {}: {e}", lab.fake_gpu_bin().display()),
    })?;
    if !out.status.success() {
        return Err(LabError::Other {
            step: "fake-gpu inspect".into(),
            why: format!(
                "{:?} failed: {}",
                c,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn inspect_json(lab: &Lab, op: &str) -> Result<serde_json::Value> {
    let text = inspect(lab, &[op])?;
    serde_json::from_str(&text).map_err(|e| LabError::Other {
        step: "fake-gpu inspect".into(),
        why: format!("bad `{op}` reply `{text}`: {e}"),
    })
}

/// The demo's guest steps: devmem TX of a 4 MiB payload out of VRAM, then
/// devmem RX of 16 MiB into VRAM with ncdevmem's frag log kept (RX last, so
/// that nothing reuses its VRAM before the host looks).
pub fn demo_script() -> String {
    format!(
        "{}echo '--- devmem TCP TX out of fake-GPU VRAM (ncdevmem -m fake-gpu)'\n\
         python3 fake_gpu_e2e.py demo-tx 4194304 || exit 1\n\
         echo '--- devmem TCP RX into fake-GPU VRAM (ncdevmem -m fake-gpu -v 7)'\n\
         python3 fake_gpu_e2e.py demo-rx 16777216 /mnt/results/{DEMO_FRAG_LOG} || exit 1\n",
        mount_kselftest()
    )
}

const DEMO_FRAG_LOG: &str = "gpu-rx-frags.log";

/// One SCM_DEVMEM_DMABUF frag as ncdevmem printed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frag {
    /// Offset in the dma-buf.
    offset: u64,
    size: u64,
    /// Offset of its first byte in the TCP stream.
    stream_pos: u64,
}

/// What ncdevmem's RX log says: where its dma-buf is in VRAM, how big, and
/// every frag in arrival order.
#[derive(Debug, Default, PartialEq, Eq)]
struct FragLog {
    vram_offset: u64,
    dmabuf_size: u64,
    frags: Vec<Frag>,
    /// SCM_DEVMEM_LINEAR cmsgs: payload that arrived in host memory.
    linear: usize,
}

fn field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let v = rest.split(|c: char| c == ',' || c.is_whitespace()).next()?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn parse_frag_log(text: &str) -> std::result::Result<FragLog, String> {
    let mut log = FragLog::default();
    let mut have_buf = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("fake-gpu: ") {
            log.dmabuf_size = field(rest, "").ok_or_else(|| format!("bad line `{line}`"))?;
            log.vram_offset =
                field(rest, "VRAM offset ").ok_or_else(|| format!("bad line `{line}`"))?;
            have_buf = true;
        } else if line.starts_with("received frag_page=") {
            let (offset, size, total) = (
                field(line, "frag_offset="),
                field(line, "frag_size="),
                field(line, "total_received="),
            );
            let (Some(offset), Some(size), Some(total)) = (offset, size, total) else {
                return Err(format!("bad frag line `{line}`"));
            };
            let stream_pos = total
                .checked_sub(size)
                .ok_or_else(|| format!("frag larger than the total: `{line}`"))?;
            log.frags.push(Frag {
                offset,
                size,
                stream_pos,
            });
        } else if line.starts_with("SCM_DEVMEM_LINEAR") {
            log.linear += 1;
        }
    }
    if !have_buf {
        return Err(
            "no `fake-gpu: N bytes at VRAM offset X` line: was ncdevmem run with -m fake-gpu?"
                .into(),
        );
    }
    Ok(log)
}

/// Compares the dma-buf's bytes (`vram`, dumped from the host) with what
/// the frags say each byte must hold: the stream's pattern byte of the last
/// frag that covered it. Returns (bytes checked, mismatching bytes) over all
/// frags, and the same over the last `tail` frags.
fn check_frags(
    log: &FragLog,
    vram: &[u8],
    tail: usize,
) -> std::result::Result<[(u64, u64); 2], String> {
    let n = log.frags.len();
    let mut all = (0u64, 0u64);
    let mut last = (0u64, 0u64);
    // Latest writer first: a byte is judged by the last frag that covered it.
    let mut seen = vec![false; vram.len()];
    for (i, f) in log.frags.iter().enumerate().rev() {
        let end = f
            .offset
            .checked_add(f.size)
            .filter(|&e| e <= vram.len() as u64);
        let Some(end) = end else {
            return Err(format!(
                "frag at {:#x}+{} lies outside the {}-byte dma-buf",
                f.offset, f.size, log.dmabuf_size
            ));
        };
        for (k, off) in (f.offset..end).enumerate() {
            let off = off as usize;
            if std::mem::replace(&mut seen[off], true) {
                continue;
            }
            let want = PATTERN[((f.stream_pos + k as u64) % PATTERN.len() as u64) as usize];
            let bad = u64::from(vram[off] != want);
            all = (all.0 + 1, all.1 + bad);
            if i + tail >= n {
                last = (last.0 + 1, last.1 + bad);
            }
        }
    }
    Ok([all, last])
}

/// The host's proof of the demo's RX: `fake-gpu inspect` dumps the dma-buf
/// from VRAM and every frag the guest reported is checked at its offset;
/// vhost-nic's counters show the payload went to device memory, none to
/// guest RAM, on the devmem queue.
pub fn demo_prove(lab: &Lab) -> Result<()> {
    let fail = |why: String| LabError::Other {
        step: "demo: fake-gpu proof".into(),
        why,
    };
    let results = lab.run_dir.join("results");
    let text = std::fs::read_to_string(results.join(DEMO_FRAG_LOG))
        .map_err(|e| fail(format!("no frag log from the guest: {e}")))?;
    let log = parse_frag_log(&text).map_err(fail)?;
    let dump = results.join("vram-rx-dmabuf.bin");
    let (off, size) = (
        format!("{:#x}", log.vram_offset),
        log.dmabuf_size.to_string(),
    );
    let dump_s = dump.to_string_lossy().into_owned();
    let cmd = ["dump", off.as_str(), size.as_str(), "-o", dump_s.as_str()];
    println!(
        "$ fake-gpu inspect --socket {} {}",
        lab.gpu_socket().display(),
        cmd.join(" ")
    );
    inspect(lab, &cmd)?;
    let vram = std::fs::read(&dump).map_err(|e| fail(format!("{}: {e}", dump.display())))?;
    let [all, last] = check_frags(&log, &vram, CHECKED_TAIL_FRAGS).map_err(fail)?;
    let payload: u64 = log.frags.iter().map(|f| f.size).sum();
    println!(
        "VRAM {:#x}+{}: {} frags ({payload} payload bytes) reported by the guest's SCM_DEVMEM_DMABUF cmsgs;",
        log.vram_offset,
        log.dmabuf_size,
        log.frags.len()
    );
    println!(
        "  last {CHECKED_TAIL_FRAGS} frags: {} of {} bytes found at their reported offsets",
        last.0 - last.1,
        last.0
    );
    println!(
        "  all frags, latest write per offset: {} of {} bytes match",
        all.0 - all.1,
        all.0
    );
    if log.linear > 0 {
        return Err(fail(format!(
            "{} SCM_DEVMEM_LINEAR frags: payload arrived in host memory",
            log.linear
        )));
    }
    if last.0 == 0 || last.1 > 0 {
        return Err(fail(format!(
            "{} of the last frags' {} bytes differ in VRAM from the stream",
            last.1, last.0
        )));
    }
    let stats = lab.stats()?;
    println!(
        "vhost-nic, nic0 receive queues (payload = bytes after the headers of split packets):"
    );
    println!("  q  payload->VRAM  payload->RAM  bytes->RAM  bytes->VRAM");
    let mut to_vram = 0;
    for (i, q) in report::queue_stats(&stats, "nic0").iter().enumerate() {
        let n = |k: &str| q[k].as_u64().unwrap_or(0);
        println!(
            "  {i} {:>14} {:>13} {:>11} {:>12}",
            n("rx_payload_bytes_to_device_memory"),
            n("rx_payload_bytes_to_ram"),
            n("rx_bytes_to_ram"),
            n("rx_bytes_to_device_memory")
        );
        if n("rx_payload_bytes_to_device_memory") > 0 {
            to_vram += 1;
            if n("rx_payload_bytes_to_ram") != 0 {
                return Err(fail(format!(
                    "queue {i} wrote payload to VRAM and {} payload bytes to guest RAM",
                    n("rx_payload_bytes_to_ram")
                )));
            }
            if n("rx_payload_bytes_to_device_memory") < payload {
                return Err(fail(format!(
                    "queue {i} wrote {} payload bytes to VRAM, the guest received {payload}",
                    n("rx_payload_bytes_to_device_memory")
                )));
            }
        }
    }
    if to_vram != 1 {
        return Err(fail(format!(
            "{to_vram} queues wrote payload into VRAM, expected the one devmem queue"
        )));
    }
    let tx_vram = report::device_sum(&stats, "nic0", "tx_bytes_from_device_memory");
    println!("  transmit: {tx_vram} bytes read from VRAM (devmem TX)");
    if tx_vram < 4 << 20 {
        return Err(fail(format!(
            "vhost-nic read {tx_vram} bytes from device memory on transmit, the guest sent 4 MiB from VRAM"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "fake-gpu: 65536 bytes at VRAM offset 0x200000\n\
        received frag_page=0, in_page_offset=0, frag_offset=0, frag_size=7, token=1, total_received=7, dmabuf_id=3\n\
        received frag_page=1, in_page_offset=0, frag_offset=4096, frag_size=5, token=2, total_received=12, dmabuf_id=3\n\
        received frag_page=0, in_page_offset=2, frag_offset=2, frag_size=3, token=3, total_received=15, dmabuf_id=3\n";

    #[test]
    fn parses_ncdevmem_frag_log() {
        let log = parse_frag_log(LOG).unwrap();
        assert_eq!(
            (log.vram_offset, log.dmabuf_size, log.linear),
            (0x200000, 65536, 0)
        );
        assert_eq!(
            log.frags,
            [
                Frag {
                    offset: 0,
                    size: 7,
                    stream_pos: 0
                },
                Frag {
                    offset: 4096,
                    size: 5,
                    stream_pos: 7
                },
                Frag {
                    offset: 2,
                    size: 3,
                    stream_pos: 12
                },
            ]
        );
        assert!(parse_frag_log("received frag_page=0\n").is_err());
    }

    #[test]
    fn later_frags_win_and_mismatches_count() {
        let log = parse_frag_log(LOG).unwrap();
        let mut vram = vec![0u8; 65536];
        // Frag 0 at 0..7 (stream 0..7), overwritten at 2..5 by frag 2
        // (stream 12..15), frag 1 at 4096..4101 (stream 7..12).
        vram[..7].copy_from_slice(&[1, 2, 6, 10, 1, 6, 10]);
        vram[4096..4101].copy_from_slice(&[1, 2, 3, 4, 5]);
        assert_eq!(check_frags(&log, &vram, 1).unwrap(), [(12, 0), (3, 0)]);
        vram[4096] = 9;
        assert_eq!(check_frags(&log, &vram, 1).unwrap(), [(12, 1), (3, 0)]);
        assert_eq!(check_frags(&log, &vram, 2).unwrap(), [(12, 1), (8, 1)]);
        assert!(check_frags(&log, &vram[..4098], 1).is_err());
    }
}
