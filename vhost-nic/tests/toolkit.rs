//! The driver authors' toolkit through the `vhost-nic` binary: the control
//! socket (robust to bad clients), queue and ring views of live rings, and
//! faults set from the command line and the socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::net::*;
use common::process::Daemon;
use common::TIMEOUT;
use serde_json::Value;

fn connect(d: &Daemon) -> UnixStream {
    let s = UnixStream::connect(d.socket("stats")).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn reply(s: &UnixStream) -> Value {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply `{line}`: {e}"))
}

#[test]
fn control_socket_survives_bad_clients() {
    let mut d = Daemon::start_pair(2);
    // Several requests on one connection, bad ones among them.
    let mut s = connect(&d);
    for (req, ok) in [
        ("{\"cmd\":\"stats\"}", true),
        ("not json", false),
        ("{\"cmd\":\"format-disk\"}", false),
        ("{\"cmd\":\"ring\",\"queue\":42}", false),
        ("{\"cmd\":\"ring\",\"queue\":\"rx0\",\"device\":9}", false),
        ("{\"cmd\":\"queues\"}", true),
    ] {
        writeln!(s, "{req}").unwrap();
        let v = reply(&s);
        assert_eq!(v.get("ok").is_some(), ok, "{req}: {v}");
        assert_eq!(v.get("error").is_some(), !ok, "{req}: {v}");
    }
    // Invalid UTF-8.
    s.write_all(b"\xff\xfe\n").unwrap();
    assert!(reply(&s)["error"].as_str().unwrap().contains("UTF-8"));
    drop(s);

    // An oversized line: an error, then the connection closes.
    let mut s = connect(&d);
    let _ = s.write_all(&vec![b'x'; 200 * 1024]);
    let v = reply(&s);
    assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    drop(s);

    // Connections beyond the limit are turned away, and served again once
    // others close.
    // An answer on each held connection shows the daemon has counted it.
    let held: Vec<_> = (0..16)
        .map(|_| {
            let mut s = connect(&d);
            writeln!(s, "{{\"cmd\":\"queues\"}}").unwrap();
            assert!(reply(&s).get("ok").is_some());
            s
        })
        .collect();
    let extra = connect(&d);
    let v = reply(&extra);
    assert!(v["error"].as_str().unwrap().contains("more than 16"), "{v}");
    drop(held);
    // The daemon frees a slot when it sees the connection's end; until
    // then a refused client may also find its connection reset.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let answer = (|| {
            let mut s = UnixStream::connect(d.socket("stats")).ok()?;
            s.set_read_timeout(Some(TIMEOUT)).ok()?;
            writeln!(s, "{{\"cmd\":\"stats\"}}").ok()?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).ok()?;
            serde_json::from_str::<Value>(&line).ok()
        })();
        if answer.as_ref().is_some_and(|v| v.get("ok").is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {answer:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client that connects and hangs up at once.
    drop(connect(&d));
    assert!(d.alive());
    // The legacy word still answers with the bare counters.
    assert!(d.stats()["devices"][0]["queues"].is_array());
}

#[test]
fn ring_shows_posted_chains_and_held_buffers() {
    let d = Daemon::start_pair(2);
    let mut a = Nic::connect(&d.socket("a"), 2);
    let mut b = Nic::connect(&d.socket("b"), 2);
    b.post_rx(0, 3);
    // A frame takes one buffer: two stay posted.
    let frame = udp_frame(MAC_B, MAC_A, 4000, 5000, &[7u8; 200]);
    a.send(0, &frame);
    assert_eq!(b.recv(&[0], 1, false).len(), 1);
    let v = d.control("{\"cmd\":\"ring\",\"queue\":\"rx0\",\"device\":\"nic1\"}");
    let q = &v["ok"]["devices"][0]["queues"][0];
    assert_eq!(q["name"], "rx0", "{v}");
    assert_eq!(q["enabled"], true);
    assert_eq!(q["ready"], true);
    assert_eq!(q["avail_idx"], 3);
    assert_eq!(q["next_avail"], 1);
    assert_eq!(q["posted"], 2);
    assert_eq!(q["used_idx"], 1);
    let chains = q["chains"].as_array().unwrap();
    assert_eq!(chains.len(), 2);
    assert_eq!(chains[0]["descs"][0]["memory"], "ram");
    assert_eq!(chains[0]["descs"][0]["flag_names"], "W");

    // Hold the two posted buffers: they show as held, no longer posted.
    let v = d.control("{\"cmd\":\"fault\",\"set\":\"rx-hold:queue=0\",\"device\":\"nic1\"}");
    assert!(v.get("ok").is_some(), "{v}");
    a.send(0, &frame);
    d.wait_counter("/devices/1/faults/fired/rx-hold", 2);
    let v = d.control("{\"cmd\":\"ring\",\"queue\":0,\"device\":1}");
    let q = &v["ok"]["devices"][0]["queues"][0];
    assert_eq!(q["posted"], 0, "{v}");
    assert_eq!(q["held"].as_array().unwrap().len(), 2);
    assert_eq!(q["chains"][0]["state"], "held");
    // Clearing returns them empty.
    d.control("{\"cmd\":\"fault\",\"clear\":\"rx-hold\"}");
    let used = b.rx(0).wait_used(2, TIMEOUT);
    assert!(used.iter().all(|u| u.len == 0), "{used:?}");

    // The text form, through the CLI.
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
        .args(["ctl", "--socket"])
        .arg(d.socket("stats"))
        .args(["--device", "nic1", "ring", "rx0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("vq  0 rx0    enabled ready"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
        .args(["ctl", "--socket"])
        .arg(d.socket("stats"))
        .args(["ring", "rx7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no virtqueue `rx7`"));
}

#[test]
fn fault_from_the_command_line_and_interrupt_faults() {
    let d = Daemon::start_pair_with(1, &["--fault", "rx-drop:device=nic1,queue=0,limit=2"]);
    let mut a = Nic::connect(&d.socket("a"), 1);
    let mut b = Nic::connect(&d.socket("b"), 1);
    b.post_rx(0, 8);
    let frame = udp_frame(MAC_B, MAC_A, 4000, 5000, &[1u8; 100]);
    for _ in 0..3 {
        a.send(0, &frame);
    }
    assert_eq!(b.recv(&[0], 1, false).len(), 1);
    d.wait_counter("/devices/1/queues/0/rx_drops/injected", 2);
    d.wait_counter("/devices/1/faults/fired/rx-drop", 2);
    d.wait_counter("/devices/1/queues/0/rx_interrupts_sent", 1);
    // Only the named device has it.
    let faults = d.control("{\"cmd\":\"fault\",\"device\":\"nic0\"}");
    assert_eq!(
        faults["ok"]["devices"][0]["active"],
        serde_json::json!([]),
        "{faults}"
    );

    // Duplicate interrupts: one used update, two interrupts.
    d.control("{\"cmd\":\"fault\",\"set\":\"irq-duplicate\",\"device\":\"nic1\"}");
    a.send(0, &frame);
    assert_eq!(b.recv(&[0], 1, false).len(), 1);
    d.wait_counter("/devices/1/queues/0/rx_interrupts_sent", 3);
    // Suppressed: the frame lands but no interrupt comes.
    d.control("{\"cmd\":\"fault\",\"set\":\"irq-suppress\",\"device\":\"nic1\"}");
    a.send(0, &frame);
    d.wait_counter("/devices/1/faults/fired/irq-suppress", 1);
    assert_eq!(b.rx(0).poll_used().len(), 1, "the used entry is there");
    d.wait_counter("/devices/1/queues/0/rx_interrupts_sent", 3);
}

#[test]
fn bad_fault_on_the_command_line_says_what_to_do() {
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
        .args(["--socket", "/tmp/x.sock", "--fault", "rx-drop:ratio=7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("between 0 and 1"), "{err}");

    // A device that does not exist: an error at start-up naming the ones
    // that do.
    let sock =
        std::env::temp_dir().join(format!("vhost-nic-bad-fault-{}.sock", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--fault",
            "rx-drop:device=nic7",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_file(&sock);
    assert!(
        err.contains("no device named `nic7`; the devices are nic0"),
        "{err}"
    );
}

#[test]
fn trace_through_the_socket_and_the_cli() {
    let d = Daemon::start_pair_with(2, &["--trace", "16"]);
    let mut a = Nic::connect(&d.socket("a"), 2);
    let mut b = Nic::connect(&d.socket("b"), 2);
    b.post_rx(0, 4);
    let frame = udp_frame(MAC_B, MAC_A, 4000, 5000, &[9u8; 300]);
    a.send(0, &frame);
    assert_eq!(b.recv(&[0], 1, false).len(), 1);
    let v = d.control("{\"cmd\":\"trace\",\"device\":\"nic1\",\"queue\":\"rx0\"}");
    let dev = &v["ok"]["devices"][0];
    assert_eq!(dev["tracing"], true, "{v}");
    assert_eq!(dev["depth"], 16);
    let e = &dev["entries"][0];
    assert_eq!(e["queue"], "rx0");
    assert_eq!(e["outcome"], "ok");
    assert_eq!(e["flow"]["sport"], 4000);
    assert_eq!(e["used"][0][1], 12 + frame.len() as u64);

    // A flow that matches nothing, bad filters and actions.
    let v = d.control("{\"cmd\":\"trace\",\"flow\":\"dport=1\"}");
    assert!(v["ok"]["devices"][1]["entries"]
        .as_array()
        .unwrap()
        .is_empty());
    for (req, want) in [
        ("{\"cmd\":\"trace\",\"flow\":\"dport=x\"}", "bad port"),
        (
            "{\"cmd\":\"trace\",\"action\":\"explode\"}",
            "unknown variant",
        ),
        ("{\"cmd\":\"trace\",\"queue\":\"rx5\"}", "no virtqueue"),
    ] {
        let v = d.control(req);
        assert!(v["error"].as_str().unwrap().contains(want), "{req}: {v}");
    }

    let out = Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
        .args(["ctl", "--socket"])
        .arg(d.socket("stats"))
        .args(["trace", "dump", "--queue", "tx0", "--last", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("tx0 len 342") && text.contains("udp 10.0.0.1:4000 > 10.0.0.2:5000 ok"),
        "{text}"
    );
    assert!(d.control("{\"cmd\":\"trace\",\"action\":\"off\"}")["ok"].is_object());
    assert!(d.control("{\"cmd\":\"trace\",\"action\":\"clear\"}")["ok"].is_object());
    let v = d.control("{\"cmd\":\"trace\"}");
    assert!(v["ok"]["devices"][0]["entries"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn capture_through_the_cli() {
    let d = Daemon::start_pair(1);
    let mut a = Nic::connect(&d.socket("a"), 1);
    let mut b = Nic::connect(&d.socket("b"), 1);
    let file = d.dir.join("cap.pcapng");
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vhost-nic"))
            .args(["ctl", "--socket"])
            .arg(d.socket("stats"))
            .args(args)
            .output()
            .unwrap()
    };
    let f = file.to_str().unwrap();
    let out = ctl(&["--device", "nic1", "capture", "start", f, "--dir", "rx"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once only: the file exists now, and the device is busy.
    let out = ctl(&["--device", "nic1", "capture", "start", f]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already capturing"));
    for (req, want) in [
        ("{\"cmd\":\"capture\",\"action\":\"start\"}", "needs `file`"),
        ("{\"cmd\":\"capture\",\"action\":\"start\",\"file\":\"/nonexistent/dir/x\",\"device\":0}", "cannot create"),
        ("{\"cmd\":\"capture\",\"action\":\"start\",\"file\":\"/tmp/x\",\"queue\":3}", "no queue 3"),
        ("{\"cmd\":\"capture\",\"dir\":\"sideways\"}", "unknown variant"),
    ] {
        let v = d.control(req);
        assert!(v["error"].as_str().unwrap().contains(want), "{req}: {v}");
    }

    b.post_rx(0, 4);
    let frame = udp_frame(MAC_B, MAC_A, 4000, 5000, &[3u8; 100]);
    a.send(0, &frame);
    a.send(0, &frame);
    assert_eq!(b.recv(&[0], 2, false).len(), 2);
    let v = d.control("{\"cmd\":\"capture\",\"device\":\"nic1\"}");
    assert_eq!(v["ok"]["devices"][0]["capturing"], true, "{v}");
    d.wait_counter_json(
        "{\"cmd\":\"capture\",\"device\":\"nic1\"}",
        "/ok/devices/0/packets",
        2,
    );
    let v = d.control("{\"cmd\":\"capture\",\"action\":\"stop\"}");
    assert_eq!(v["ok"]["stopped"][0]["packets"], 2, "{v}");
    let bytes = std::fs::read(&file).unwrap();
    // Section header, one interface, two packets of 142 bytes.
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("nic1"));
    assert_eq!(text.matches("queue=rx0 hash=0x").count(), 2);
}

#[test]
fn needs_reset_signals_a_vring_error() {
    use vhost::VhostBackend;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let d = Daemon::start_pair(1);
    let mut b = Nic::connect(&d.socket("b"), 1);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    b.fe.set_vring_err(rx_vring(0), &err)
        .expect("SET_VRING_ERR");
    b.post_rx(0, 4);

    // Waits for the frontend's side of the error eventfd to count `want`.
    let wait_errors = |want: u64| {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = 0;
        while seen < want {
            match err.read() {
                Ok(n) => seen += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "{seen} vring errors, expected {want}"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("read the error eventfd: {e}"),
            }
        }
        assert_eq!(seen, want);
    };

    d.control("{\"cmd\":\"fault\",\"set\":\"needs-reset\",\"device\":\"nic1\"}");
    wait_errors(1);
    d.wait_counter("/devices/1/device/vring_errors_signalled", 1);
    // Cleared (as a device reset does) and set again: a new error, a new
    // report.
    d.control("{\"cmd\":\"fault\",\"clear\":\"needs-reset\",\"device\":\"nic1\"}");
    d.control("{\"cmd\":\"fault\",\"set\":\"needs-reset\",\"device\":\"nic1\"}");
    wait_errors(1);
    d.wait_counter("/devices/1/device/vring_errors_signalled", 2);
    d.wait_counter("/devices/1/faults/fired/needs-reset", 2);
}
