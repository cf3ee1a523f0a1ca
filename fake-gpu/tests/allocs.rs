//! The VRAM allocation table driven through the ring: ALLOC_NOTE and
//! FREE_NOTE validation, what resets and guests do to the table, and what
//! the host sees through the control socket and `fake-gpu inspect`.

mod common;

use std::process::Command as Process;

use common::*;
use fake_gpu::allocs::{Alloc, MAX_ALLOCS};
use fake_gpu::inspect::Inspector;
use fake_gpu::layout::{
    reg, Command, Completion, Opcode, Status, CMD_RING_ENTRIES, CONTROL_CLEAR_ALLOCS, VERSION,
};

const BIN: &str = env!("CARGO_BIN_EXE_fake-gpu");

fn statuses(c: &[Completion]) -> Vec<Option<Status>> {
    c.iter().map(Completion::status).collect()
}

#[test]
fn device_advertises_the_notes() {
    let lab = start();
    let d = lab.driver();
    let ops = d.reg(reg::OPCODES);
    assert_ne!(ops & 1 << Opcode::AllocNote as u32, 0);
    assert_ne!(ops & 1 << Opcode::FreeNote as u32, 0);
    assert_eq!(d.reg(reg::VERSION), VERSION);
    assert_eq!(VERSION, 0x0001_0001);
}

#[test]
fn notes_are_validated_like_every_command() {
    let lab = start();
    let mut d = lab.driver();
    let with = |f: &dyn Fn(&mut Command)| {
        let mut c = Command::alloc_note(0, 0x1000, 0x1000, 1);
        f(&mut c);
        c
    };
    let cases: Vec<(Command, Status)> = vec![
        (with(&|c| c.src = 8), Status::BadField),
        (with(&|c| c.len = 0), Status::BadField),
        (with(&|c| c.flags = 1), Status::BadField),
        (with(&|c| c.reserved0 = 1), Status::BadField),
        (with(&|c| c.reserved1[0] = 1), Status::BadField),
        (with(&|c| c.dst = 0x1004), Status::Misaligned),
        (with(&|c| c.len = 0x1001), Status::Misaligned),
        (with(&|c| c.dst = u64::MAX - 7), Status::Overflow),
        (with(&|c| c.dst = VRAM), Status::OutOfRange),
        (with(&|c| c.len = VRAM), Status::OutOfRange),
        (Command::free_note(0, 0x1000, 0, 1), Status::BadField),
        (Command::free_note(0, VRAM, 8, 1), Status::OutOfRange),
    ];
    let cmds: Vec<Command> = cases.iter().map(|(c, _)| *c).collect();
    let got = d.run(&cmds, T).unwrap();
    for (i, (c, (cmd, want))) in got.iter().zip(&cases).enumerate() {
        assert_eq!(c.status(), Some(*want), "case {i}: {cmd:?}");
    }
    let dev = lab.daemon.device();
    let a = dev.allocs_json();
    assert_eq!(a["live"], 0);
    assert_eq!(a["created"], 0);
    assert_eq!(a["allocs"], serde_json::json!([]));
}

#[test]
fn overlaps_and_unknown_frees_are_refused() {
    let lab = start();
    let mut d = lab.driver();
    let c = d
        .run(
            &[
                Command::alloc_note(1, 0x10000, 0x4000, 100),
                Command::alloc_note(2, 0x20000, 0x1000, 200),
                // Overlaps 100 at its end, and at its start.
                Command::alloc_note(3, 0x13000, 0x2000, 300),
                Command::alloc_note(4, 0xf000, 0x1008, 300),
                // Covers both.
                Command::alloc_note(5, 0, 0x40000, 300),
                // Adjacent on both sides of 100: fine.
                Command::alloc_note(6, 0x14000, 0x1000, 400),
                Command::alloc_note(7, 0xf000, 0x1000, 500),
                // Frees: wrong id, wrong size, wrong offset, never allocated.
                Command::free_note(8, 0x10000, 0x4000, 101),
                Command::free_note(9, 0x10000, 0x2000, 100),
                Command::free_note(10, 0x10008, 0x4000, 100),
                Command::free_note(11, 0x30000, 0x1000, 600),
                Command::free_note(12, 0x20000, 0x1000, 200),
                // Twice.
                Command::free_note(13, 0x20000, 0x1000, 200),
            ],
            T,
        )
        .unwrap();
    use Status::*;
    assert_eq!(
        statuses(&c),
        [
            Ok,
            Ok,
            AllocOverlap,
            AllocOverlap,
            AllocOverlap,
            Ok,
            Ok,
            AllocUnknown,
            AllocUnknown,
            AllocUnknown,
            AllocUnknown,
            Ok,
            AllocUnknown
        ]
        .map(Some)
    );
    assert!(c.iter().all(|c| c.result == 0));
    assert_eq!(d.reg(reg::LAST_ERROR_STATUS), AllocUnknown as u32);
    let dev = lab.daemon.device();
    let a = dev.allocs_json();
    let live: Vec<Alloc> = serde_json::from_value(a["allocs"].clone()).unwrap();
    let got: Vec<(u64, u64, u64)> = live.iter().map(|a| (a.offset, a.size, a.id)).collect();
    assert_eq!(
        got,
        [
            (0xf000, 0x1000, 500),
            (0x10000, 0x4000, 100),
            (0x14000, 0x1000, 400)
        ]
    );
    assert_eq!(a["created"], 4);
    assert_eq!(a["freed"], 1);
    assert_eq!(a["bytes"], 0x6000);
    assert_eq!(a["peak_bytes"], 0x7000);
    let s = dev.stats_json();
    assert_eq!(s["completions_by_status"]["alloc_overlap"], 3);
    assert_eq!(s["completions_by_status"]["alloc_unknown"], 5);
    assert_eq!(s["commands_by_opcode"]["alloc_note"], 7);
    assert_eq!(s["commands_by_opcode"]["free_note"], 6);
    assert_eq!(s["allocs"]["live"], 3);
    // Notes move no bytes.
    assert_eq!(s["bytes"], 0);
    assert_eq!(d.reg64(reg::ERRORS_BY_STATUS + 8 * AllocUnknown as u64), 5);
}

#[test]
fn the_table_is_capped_and_the_engine_goes_on() {
    let lab = start();
    let mut d = lab.driver();
    let batch = u64::from(CMD_RING_ENTRIES);
    let mut tag = 0u64;
    while tag < MAX_ALLOCS as u64 {
        let cmds: Vec<Command> = (tag..tag + batch)
            .map(|i| Command::alloc_note(i, i * 8, 8, i))
            .collect();
        let c = d.run(&cmds, T).unwrap();
        assert!(c.iter().all(|c| c.status() == Some(Status::Ok)));
        tag += batch;
    }
    let over = MAX_ALLOCS as u64 * 8;
    let c = d
        .run(
            &[
                Command::alloc_note(1, over, 8, 1),
                Command::free_note(2, 0, 8, 0),
                Command::alloc_note(3, over, 8, 1),
                Command::fill(4, over + 8, 8, 1),
            ],
            T,
        )
        .unwrap();
    assert_eq!(
        statuses(&c),
        [Status::AllocTableFull, Status::Ok, Status::Ok, Status::Ok].map(Some)
    );
    let s = lab.daemon.device().stats_json();
    assert_eq!(s["allocs"]["live"], MAX_ALLOCS as u64);
    assert_eq!(s["allocs"]["max"], MAX_ALLOCS as u64);
    assert_eq!(s["completions_by_status"]["alloc_table_full"], 1);
}

#[test]
fn ring_reset_keeps_the_table_unless_asked_and_a_new_guest_clears_it() {
    let lab = start();
    let dev = lab.daemon.device();
    let mut d = lab.driver();
    let c = d
        .run(
            &[
                Command::alloc_note(1, 0, 0x1000, 1),
                Command::alloc_note(2, 0x1000, 0x1000, 2),
            ],
            T,
        )
        .unwrap();
    assert!(c.iter().all(|c| c.status() == Some(Status::Ok)));
    d.reset(T).unwrap();
    assert_eq!(dev.allocs_json()["live"], 2);
    // The driver frees what it allocated before the reset.
    let c = d.run(&[Command::free_note(1, 0, 0x1000, 1)], T).unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
    // A reset with CLEAR_ALLOCS forgets the rest.
    d.reset_with(CONTROL_CLEAR_ALLOCS, T).unwrap();
    let a = dev.allocs_json();
    assert_eq!(
        (a["live"].as_u64(), a["cleared"].as_u64()),
        (Some(0), Some(1))
    );
    // CLEAR_ALLOCS without RESET does nothing.
    let c = d.run(&[Command::alloc_note(1, 0, 0x1000, 3)], T).unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
    dev.shm
        .store_u32(reg::CONTROL, CONTROL_CLEAR_ALLOCS)
        .unwrap();
    d.run(&[Command::nop(2)], T).unwrap();
    assert_eq!(dev.allocs_json()["live"], 1);
    // The guest goes: its allocations stay listed.
    drop(d);
    wait_for("the disconnect", || dev.guest_id().is_none());
    assert_eq!(dev.allocs_json()["live"], 1);
    // A new guest starts with an empty table.
    let mut d = lab.driver();
    let a = dev.allocs_json();
    assert_eq!(
        (a["live"].as_u64(), a["cleared"].as_u64()),
        (Some(0), Some(2))
    );
    assert_eq!(a["created"], 3);
    let c = d.run(&[Command::alloc_note(1, 0, 0x1000, 4)], T).unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
}

#[test]
fn host_sees_the_allocations_through_the_control_socket() {
    let lab = start();
    let mut d = lab.driver();
    let mut ins = Inspector::connect(&lab.socket()).unwrap();
    let empty = ins.allocs().unwrap();
    assert!(empty.allocs.is_empty());
    assert_eq!(empty.counts.max, MAX_ALLOCS as u64);
    let c = d
        .run(
            &[
                Command::alloc_note(1, 0x200000, 0x100000, 77),
                Command::alloc_note(2, 0x1000, 0x3000, 78),
            ],
            T,
        )
        .unwrap();
    assert!(c.iter().all(|c| c.status() == Some(Status::Ok)));
    let a = ins.allocs().unwrap();
    assert_eq!(
        a.allocs,
        [
            Alloc {
                offset: 0x1000,
                size: 0x3000,
                id: 78,
                seq: 2
            },
            Alloc {
                offset: 0x200000,
                size: 0x100000,
                id: 77,
                seq: 1
            },
        ]
    );
    assert_eq!((a.counts.live, a.counts.bytes), (2, 0x103000));
    assert_eq!(ins.stats().unwrap()["allocs"]["bytes"], 0x103000);

    let run = |args: &[&str]| {
        let out = Process::new(BIN)
            .arg("inspect")
            .arg("--socket")
            .arg(lab.socket())
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let v = run(&["allocs"]);
    assert_eq!(v["allocs"][0]["offset"], 0x1000);
    assert_eq!(v["allocs"][1]["id"], 77);
    assert_eq!(v["live"], 2);
    let c = d
        .run(&[Command::free_note(3, 0x200000, 0x100000, 77)], T)
        .unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
    let v = run(&["allocs"]);
    assert_eq!(v["allocs"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        (
            v["created"].as_u64(),
            v["freed"].as_u64(),
            v["peak_bytes"].as_u64()
        ),
        (Some(2), Some(1), Some(0x103000))
    );
    let v = run(&["stats"]);
    assert_eq!(v["allocs"]["live"], 1);
    assert_eq!(v["allocs"]["bytes"], 0x3000);
    assert_eq!(v["commands_by_opcode"]["free_note"], 1);
}
