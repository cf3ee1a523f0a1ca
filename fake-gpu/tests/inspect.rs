//! Host-side inspection while a guest drives the engine: the library API
//! and the `fake-gpu` binary (inspect, serve).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command as Process, Stdio};

use common::*;
use fake_gpu::client::Driver;
use fake_gpu::crc32c::crc32c;
use fake_gpu::inspect::{control_path, InspectError, Inspector};
use fake_gpu::layout::{Command, Region, Status};

const BIN: &str = env!("CARGO_BIN_EXE_fake-gpu");

#[test]
fn inspector_reads_what_the_engine_wrote() {
    let lab = start();
    let mut d = lab.driver();
    let data = pattern(256 * 1024, 3);
    d.shm().write(d.staging(0), &data).unwrap();
    let c = d
        .run(
            &[
                Command::fill(1, 0, 4096, 0xc3),
                Command::staging_to_vram(2, 0, 1 << 20, data.len() as u64),
                Command::checksum(3, 1 << 20, data.len() as u64),
            ],
            T,
        )
        .unwrap();
    assert!(c.iter().all(|c| c.status() == Some(Status::Ok)));

    let mut ins = Inspector::connect(&lab.socket()).unwrap();
    let info = ins.info().unwrap();
    assert_eq!(info.vram_size, VRAM);
    assert_eq!(info.guest_peer_id, Some(d.client.id));
    assert_eq!(info.device_peer_id, 0);
    assert_eq!(info.vram_offset, d.layout.vram_offset);

    assert_eq!(ins.read(Region::Vram, 0, 4096).unwrap(), vec![0xc3; 4096]);
    assert_eq!(
        ins.read(Region::Vram, 1 << 20, data.len() as u64).unwrap(),
        data
    );
    assert_eq!(ins.read(Region::Staging, 0, 100).unwrap(), data[..100]);
    let crc = ins
        .checksum(Region::Vram, 1 << 20, data.len() as u64)
        .unwrap();
    assert_eq!(crc, crc32c(&data));
    assert_eq!(u64::from(crc), c[2].result, "engine and inspector agree");

    let file = lab.dir.as_path().join("expected.bin");
    std::fs::write(&file, &data).unwrap();
    let cmp = ins.compare(Region::Vram, 1 << 20, None, &file, 0).unwrap();
    assert!(cmp.equal);
    assert_eq!(cmp.compared, data.len() as u64);
    let mut changed = data.clone();
    changed[1000] ^= 1;
    changed[2000] ^= 1;
    std::fs::write(&file, &changed).unwrap();
    let cmp = ins.compare(Region::Vram, 1 << 20, None, &file, 0).unwrap();
    assert!(!cmp.equal);
    assert_eq!(cmp.first_difference, Some((1 << 20) + 1000));
    assert_eq!(cmp.differing_bytes, 2);
    // Part of the file, from an offset.
    let cmp = ins
        .compare(Region::Vram, (1 << 20) + 4096, Some(4096), &file, 4096)
        .unwrap();
    assert!(cmp.equal);

    let stats = ins.stats().unwrap();
    assert_eq!(stats["commands_by_opcode"]["fill"], 1);
    assert_eq!(stats["commands_by_opcode"]["staging_to_vram"], 1);
    assert_eq!(stats["completions_by_status"]["ok"], 3);
    assert_eq!(stats["ring"]["cmd_cons"], 3);
    assert_eq!(stats["ring"]["cpl_prod"], 3);
    assert_eq!(stats["ring"]["ready"], true);
}

#[test]
fn inspector_rejects_bad_requests_and_keeps_serving() {
    let lab = start();
    let mut ins = Inspector::connect(&lab.socket()).unwrap();
    let err = |r: Result<Vec<u8>, InspectError>| r.expect_err("an error").to_string();
    assert!(err(ins.read(Region::Vram, VRAM - 8, 16)).contains("outside"));
    assert!(err(ins.read(Region::Vram, u64::MAX, 2)).contains("outside"));
    assert!(ins.checksum(Region::Staging, 0, STAGING + 1).is_err());
    let missing = lab.dir.as_path().join("missing.bin");
    assert!(ins.compare(Region::Vram, 0, None, &missing, 0).is_err());
    let short = lab.dir.as_path().join("short.bin");
    std::fs::write(&short, [0u8; 10]).unwrap();
    assert!(ins.compare(Region::Vram, 0, Some(11), &short, 0).is_err());
    assert!(ins.compare(Region::Vram, 0, None, &short, 11).is_err());

    // Raw protocol: garbage lines get an error reply, not a hang up.
    let mut s = UnixStream::connect(control_path(&lab.socket())).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for bad in [
        "not json",
        "{}",
        r#"{"cmd":"launch"}"#,
        r#"{"cmd":"read","offset":-1,"len":1}"#,
        r#"{"cmd":"read","offset":0,"len":99999999999}"#,
        r#"{"cmd":"read","region":"gtt","offset":0,"len":1}"#,
    ] {
        writeln!(s, "{bad}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], false, "{bad} -> {line}");
        assert!(v["error"].is_string());
    }
    writeln!(
        s,
        r#"{{"cmd":"read","region":"bar","offset":0,"len":4,"encoding":"hex"}}"#
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["data"], "46475055", "the magic, FGPU");
}

#[test]
fn reads_larger_than_one_request_are_split() {
    let lab = start();
    let mut d = lab.driver();
    let c = d
        .run(
            &[
                Command::fill(1, 0, 1 << 20, 0x01),
                Command::fill(2, 40_000, 8, 0x02),
            ],
            T,
        )
        .unwrap();
    assert!(c.iter().all(|c| c.status() == Some(Status::Ok)));
    let mut ins = Inspector::connect(&lab.socket()).unwrap();
    ins.set_chunk(4096 + 8);
    let got = ins.read(Region::Vram, 8, 100_000).unwrap();
    assert_eq!(got.len(), 100_000);
    assert_eq!(got[40_000 - 8 - 1], 1);
    assert_eq!(&got[40_000 - 8..40_000], &[2; 8]);
    assert_eq!(got[40_000], 1);
    let mut out = Vec::new();
    ins.dump(Region::Vram, 0, 1 << 20, &mut out).unwrap();
    assert_eq!(out.len(), 1 << 20);
    assert_eq!(ins.stats().unwrap()["ring"]["cmd_cons"], 2);
}

#[test]
fn inspect_command_line() {
    let lab = start();
    let d = lab.driver();
    let data = pattern(8192, 4);
    d.shm().write(d.vram(0x2000), &data).unwrap();
    let file = lab.dir.as_path().join("data.bin");
    std::fs::write(&file, &data).unwrap();
    let sock = lab.socket();
    let run = |args: &[&str]| {
        let out = Process::new(BIN)
            .arg("inspect")
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["checksum", "0x2000", "8K"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("{:08x}", crc32c(&data))), "{out}");
    let f = file.to_str().unwrap();
    let (code, out, _) = run(&["compare", "0x2000", "8K", f]);
    assert_eq!((code, out.trim()), (Some(0), "equal: 8192 bytes"));
    let (code, out, _) = run(&["compare", "0x2001", "8000", f]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("differ:"), "{out}");
    let (code, out, _) = run(&["read", "0x2000", "32"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 2);
    assert!(out.starts_with("000000002000  "), "{out}");
    let dump = lab.dir.as_path().join("dump.bin");
    let (code, _, _) = run(&["dump", "0x2000", "8K", "-o", dump.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert_eq!(std::fs::read(&dump).unwrap(), data);
    let (code, out, _) = run(&["stats"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["ring"].is_object());
    let (code, _, err) = run(&["read", "0", "1T"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("outside"), "{err}");
    drop(d);
}

/// Kills the child if the test fails before stopping it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn serve_command_line_runs_and_stops_on_sigterm() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/fake-gpu-test-").unwrap();
    let sock = dir.as_path().join("gpu.sock");
    let mut child = KillOnDrop(Some(
        Process::new(BIN)
            .args(["serve", "--vram", "4M", "--staging", "64K", "--socket"])
            .arg(&sock)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    wait_for("the control socket", || control_path(&sock).exists());
    let mut d = Driver::connect(&sock, 2).unwrap();
    let c = d.run(&[Command::fill(1, 0, 4 << 20, 0xab)], T).unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
    let mut ins = Inspector::connect(&sock).unwrap();
    assert_eq!(ins.read(Region::Vram, (4 << 20) - 8, 8).unwrap(), [0xab; 8]);
    let child = child.0.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("connected as peer 1"), "{log}");
    assert!(!sock.exists() && !control_path(&sock).exists());
}

#[test]
fn serve_rejects_bad_arguments_clearly() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/fake-gpu-test-").unwrap();
    let sock = dir.as_path().join("gpu.sock");
    let sock = sock.to_str().unwrap();
    for (args, want) in [
        (vec!["--vram", "64X"], "invalid size"),
        (vec!["--vram", "5000"], "multiple of 4096"),
        (vec!["--vram", "0"], "VRAM size must be at least"),
        (vec!["--vram", "64M", "--vectors", "0"], "--vectors"),
        (
            vec!["--vram", "64M", "--staging", "100"],
            "staging size 100",
        ),
        (vec!["--vram", "1T"], "BAR2 would exceed"),
    ] {
        let out = Process::new(BIN)
            .args(["serve", "--socket", sock])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
