//! The copy engine driven through the ring by a fake guest: doorbell via
//! the device's eventfd, completion interrupt via the guest's eventfd.

mod common;

use std::time::Duration;

use common::*;
use fake_gpu::crc32c::crc32c;
use fake_gpu::layout::{
    reg, Command, Status, CMD_RING_ENTRIES, CPL_RING_ENTRIES, STATUS_CPL_FULL, STATUS_READY,
    STATUS_RING_ERROR,
};

fn read(d: &fake_gpu::client::Driver, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.shm().read(at, &mut b).unwrap();
    b
}

fn ok(c: &fake_gpu::layout::Completion) {
    assert_eq!(c.status(), Some(Status::Ok), "{c:?}");
}

#[test]
fn register_page_describes_the_bar() {
    let lab = start();
    let d = lab.driver();
    assert_eq!(d.reg(reg::MAGIC), u32::from_le_bytes(*b"FGPU"));
    assert_eq!(d.reg64(reg::BAR_SIZE), d.shm().size());
    assert!(d.shm().size().is_power_of_two());
    assert_eq!(d.reg64(reg::VRAM_SIZE), VRAM);
    assert_eq!(d.reg64(reg::STAGING_SIZE), STAGING);
    assert_eq!(d.reg64(reg::VRAM_OFFSET) % (2 << 20), 0);
    assert_eq!(d.reg(reg::GUEST_PEER_ID), u32::from(d.client.id));
    assert_eq!(d.reg(reg::DEVICE_PEER_ID), 0);
    assert_eq!(d.reg(reg::NUM_VECTORS), 2);
    assert_eq!(d.reg(reg::STATUS), STATUS_READY);
    assert_eq!(d.reg(reg::CMD_RING_ENTRIES), CMD_RING_ENTRIES);
}

#[test]
fn every_opcode_does_its_job() {
    let lab = start();
    let mut d = lab.driver();
    let data = pattern(64 * 1024, 1);
    d.shm().write(d.staging(4096), &data).unwrap();
    let n = data.len() as u64;
    let c = d
        .run(
            &[
                Command::nop(1),
                Command::fill(2, 0, 1 << 20, 0x5a),
                Command::staging_to_vram(3, 4096, 2 << 20, n),
                Command::copy(4, 2 << 20, 3 << 20, n),
                Command::vram_to_staging(5, 3 << 20, 512 * 1024, n),
                Command::checksum(6, 3 << 20, n),
                Command::checksum(7, 0, 1 << 20),
            ],
            T,
        )
        .unwrap();
    assert_eq!(c.len(), 7);
    for (i, c) in c.iter().enumerate() {
        ok(c);
        assert_eq!(c.tag, i as u64 + 1);
        assert_eq!(c.index, i as u32);
    }
    assert_eq!(read(&d, d.vram(0), 1 << 20), vec![0x5a; 1 << 20]);
    assert_eq!(read(&d, d.vram(2 << 20), data.len()), data);
    assert_eq!(read(&d, d.vram(3 << 20), data.len()), data);
    assert_eq!(read(&d, d.staging(512 * 1024), data.len()), data);
    assert_eq!(c[5].result, u64::from(crc32c(&data)));
    assert_eq!(c[6].result, u64::from(crc32c(&vec![0x5a; 1 << 20])));
    // Bytes just outside the ranges are untouched.
    assert_eq!(read(&d, d.vram(1 << 20), 8), vec![0; 8]);
    assert_eq!(read(&d, d.vram((2 << 20) + n), 8), vec![0; 8]);
    let stats = lab.daemon.device().stats_json();
    assert_eq!(stats["commands"], 7);
    assert_eq!(stats["errors"], 0);
    assert_eq!(stats["commands_by_opcode"]["checksum"], 2);
    assert_eq!(
        stats["bytes_by_opcode"]["fill"],
        serde_json::json!(1u64 << 20)
    );
    assert!(stats["interrupts"].as_u64().unwrap() >= 1);
    assert_eq!(d.reg64(reg::COMMANDS), 7);
}

#[test]
fn overlapping_copy_moves_like_memmove() {
    let lab = start();
    let mut d = lab.driver();
    let data = pattern(4096, 2);
    d.shm().write(d.vram(0), &data).unwrap();
    ok(&d.run(&[Command::copy(1, 0, 64, 4096)], T).unwrap()[0]);
    assert_eq!(read(&d, d.vram(64), 4096), data);
    ok(&d.run(&[Command::copy(2, 64, 0, 4096)], T).unwrap()[0]);
    assert_eq!(read(&d, d.vram(0), 4096), data);
}

#[test]
fn malformed_commands_complete_with_errors_and_the_engine_goes_on() {
    let lab = start();
    let mut d = lab.driver();
    let vram = VRAM;
    let staging = STAGING;
    let mut flags = Command::nop(0);
    flags.flags = 1;
    let mut reserved0 = Command::nop(0);
    reserved0.reserved0 = 7;
    let mut reserved1 = Command::copy(0, 0, 8, 8);
    reserved1.reserved1[1] = 1;
    let mut bad_op = Command::nop(0);
    bad_op.opcode = 99;
    let mut nop_len = Command::nop(0);
    nop_len.len = 8;
    let mut fill_src = Command::fill(0, 0, 8, 1);
    fill_src.src = 8;
    let cases: Vec<(Command, Status)> = vec![
        (bad_op, Status::BadOpcode),
        (flags, Status::BadField),
        (reserved0, Status::BadField),
        (reserved1, Status::BadField),
        (nop_len, Status::BadField),
        (fill_src, Status::BadField),
        (
            Command {
                arg: 0x100,
                ..Command::fill(0, 0, 8, 0)
            },
            Status::BadField,
        ),
        (
            Command {
                dst: 8,
                ..Command::checksum(0, 0, 8)
            },
            Status::BadField,
        ),
        (Command::fill(0, 1, 8, 0), Status::Misaligned),
        (Command::fill(0, 0, 7, 0), Status::Misaligned),
        (Command::copy(0, 0, 4, 8), Status::Misaligned),
        (Command::fill(0, u64::MAX - 7, 16, 0), Status::Overflow),
        (Command::copy(0, 8, 0, u64::MAX - 7), Status::Overflow),
        (Command::checksum(0, 0, !7), Status::OutOfRange),
        (Command::fill(0, vram, 8, 0), Status::OutOfRange),
        (Command::fill(0, vram - 8, 16, 0), Status::OutOfRange),
        (Command::copy(0, 0, vram - 8, 16), Status::OutOfRange),
        (
            Command::vram_to_staging(0, 0, staging, 8),
            Status::OutOfRange,
        ),
        (
            Command::staging_to_vram(0, staging - 8, 0, 16),
            Status::OutOfRange,
        ),
        // A staging offset is not a VRAM offset: VRAM-sized staging reads fail.
        (
            Command::staging_to_vram(0, 0, 0, staging + 8),
            Status::OutOfRange,
        ),
        (Command::checksum(0, vram, 8), Status::OutOfRange),
    ];
    let cmds: Vec<Command> = cases
        .iter()
        .enumerate()
        .map(|(i, (c, _))| Command {
            tag: i as u64,
            ..*c
        })
        .collect();
    d.shm().fill(d.vram(vram - 64), 64, 0xee).unwrap();
    let got = d.run(&cmds, T).unwrap();
    for (i, (c, (cmd, want))) in got.iter().zip(&cases).enumerate() {
        assert_eq!(c.tag, i as u64);
        assert_eq!(c.status(), Some(*want), "case {i}: {cmd:?}");
        assert_eq!(c.result, 0);
    }
    // Nothing was written by the rejected commands.
    assert_eq!(read(&d, d.vram(vram - 64), 64), vec![0xee; 64]);
    assert_eq!(read(&d, d.vram(0), 64), vec![0; 64]);
    assert_eq!(d.reg(reg::LAST_ERROR_STATUS), Status::OutOfRange as u32);
    assert_eq!(d.reg(reg::LAST_ERROR_INDEX), cases.len() as u32 - 1);
    // The engine keeps working.
    let c = d.run(&[Command::fill(99, 0, 64, 0x11)], T).unwrap();
    ok(&c[0]);
    assert_eq!(read(&d, d.vram(0), 64), vec![0x11; 64]);
    let stats = lab.daemon.device().stats_json();
    assert_eq!(stats["errors"], cases.len() as u64);
    assert_eq!(stats["completions_by_status"]["out_of_range"], 8);
    assert_eq!(stats["completions_by_status"]["bad_opcode"], 1);
    assert_eq!(stats["commands_by_opcode"]["other"], 1);
    assert_eq!(d.reg64(reg::ERRORS), cases.len() as u64);
    assert_eq!(
        d.reg64(reg::ERRORS_BY_STATUS + 8 * Status::Misaligned as u64),
        3
    );
}

#[test]
fn producer_index_beyond_the_ring_is_reported_once_then_recovered() {
    let lab = start();
    let mut d = lab.driver();
    ok(&d.run(&[Command::nop(1)], T).unwrap()[0]);
    let bad = 1 + CMD_RING_ENTRIES + 1;
    d.write_cmd_prod(bad).unwrap();
    d.doorbell().unwrap();
    let c = d.wait(1, T).unwrap();
    assert_eq!(c[0].status(), Some(Status::RingIndex));
    assert_eq!(c[0].index, bad);
    assert_eq!(c[0].tag, 0);
    assert_eq!(c[0].result, 1, "CMD_CONS at the time");
    assert_ne!(d.reg(reg::STATUS) & STATUS_RING_ERROR, 0);
    assert_eq!(d.reg(reg::RING_ERROR_PROD), bad);
    // Ringing again with the same bad index adds no completion.
    d.doorbell().unwrap();
    d.doorbell().unwrap();
    assert!(d.wait_available(1, Duration::from_millis(300)).is_err());
    // A producer index behind the consumer is just as bad (it reads as
    // almost 2^32 ahead).
    d.write_cmd_prod(0).unwrap();
    d.doorbell().unwrap();
    let c = d.wait(1, T).unwrap();
    assert_eq!(c[0].status(), Some(Status::RingIndex));
    assert_eq!(c[0].index, 0);
    // The driver puts the right value back: the engine resumes.
    let c = d.run(&[Command::fill(5, 0, 8, 3)], T).unwrap();
    ok(&c[0]);
    assert_eq!(c[0].index, 1);
    assert_eq!(d.reg(reg::STATUS) & STATUS_RING_ERROR, 0);
    assert_eq!(lab.daemon.device().stats.ring_errors.get(), 2);
}

#[test]
fn ring_wraps_many_times() {
    let lab = start();
    let mut d = lab.driver();
    let mut tag = 0u64;
    for round in 0..12u32 {
        let n = if round % 3 == 0 { CMD_RING_ENTRIES } else { 97 };
        let cmds: Vec<Command> = (0..n)
            .map(|i| {
                tag += 1;
                Command::fill(tag, u64::from(i % 64) * 8, 8, round as u8)
            })
            .collect();
        let c = d.run(&cmds, T).unwrap();
        for (c, cmd) in c.iter().zip(&cmds) {
            ok(c);
            assert_eq!(c.tag, cmd.tag);
        }
    }
    assert_eq!(lab.daemon.device().stats.commands.get(), tag);
    assert_eq!(d.reg(reg::CMD_CONS), tag as u32);
}

#[test]
fn full_completion_ring_stalls_the_engine_until_the_driver_consumes() {
    let lab = start();
    let mut d = lab.driver();
    let first: Vec<Command> = (0..CPL_RING_ENTRIES)
        .map(|i| Command::nop(i.into()))
        .collect();
    d.submit(&first).unwrap();
    d.wait_available(CPL_RING_ENTRIES, T).unwrap();
    // The completion ring is full and the driver has taken nothing: more
    // commands wait in the command ring.
    d.submit(&[Command::nop(1000), Command::nop(1001)]).unwrap();
    wait_for("the engine to report a full completion ring", || {
        d.reg(reg::STATUS) & STATUS_CPL_FULL != 0
    });
    assert_eq!(d.available(), CPL_RING_ENTRIES);
    assert_eq!(d.reg(reg::CMD_CONS), CPL_RING_ENTRIES);
    let c = d.wait(CPL_RING_ENTRIES, T).unwrap();
    assert_eq!(c.last().unwrap().tag, u64::from(CPL_RING_ENTRIES - 1));
    // Room again: the next doorbell lets the two waiting commands through.
    d.doorbell().unwrap();
    let c = d.wait(2, T).unwrap();
    assert_eq!((c[0].tag, c[1].tag), (1000, 1001));
    assert_eq!(d.reg(reg::STATUS) & STATUS_CPL_FULL, 0);
    assert_eq!(lab.daemon.device().stats.cpl_stalls.get(), 1);
}

#[test]
fn spurious_doorbells_are_harmless() {
    let lab = start();
    let mut d = lab.driver();
    for _ in 0..20 {
        d.doorbell().unwrap();
    }
    assert!(d.wait_available(1, Duration::from_millis(200)).is_err());
    ok(&d.run(&[Command::nop(1)], T).unwrap()[0]);
    let stats = lab.daemon.device().stats_json();
    assert_eq!(stats["commands"], 1);
    assert_eq!(stats["errors"], 0);
    assert!(stats["doorbells"].as_u64().unwrap() >= 2);
}

#[test]
fn missed_doorbell_is_recovered_by_the_poll() {
    let mut cfg = config();
    cfg.poll_interval = Duration::from_millis(20);
    let lab = start_with(cfg);
    let mut d = lab.driver();
    d.push(&Command::fill(7, 0, 8, 9)).unwrap();
    d.publish().unwrap();
    // No doorbell: the completion interrupt still comes.
    let c = d.wait(1, T).unwrap();
    ok(&c[0]);
    assert_eq!(c[0].tag, 7);
    assert!(lab.daemon.device().stats.polls.get() >= 1);
}

#[test]
fn driver_reset_clears_the_rings() {
    let lab = start();
    let mut d = lab.driver();
    d.run(&[Command::nop(1), Command::nop(2), Command::nop(3)], T)
        .unwrap();
    let before = d.reg(reg::RESET_COUNT);
    d.reset(T).unwrap();
    assert_eq!(d.reg(reg::RESET_COUNT), before + 1);
    assert_eq!(d.reg(reg::CMD_CONS), 0);
    assert_eq!(d.reg(reg::CPL_PROD), 0);
    assert_eq!(d.reg(reg::STATUS), STATUS_READY);
    let c = d.run(&[Command::nop(4)], T).unwrap();
    assert_eq!((c[0].tag, c[0].index), (4, 0));
}

#[test]
fn one_vector_device_signals_everything_on_vector_zero() {
    let mut cfg = config();
    cfg.vectors = 1;
    let lab = start_with(cfg);
    let mut d = lab.driver_with(1);
    assert_eq!(d.client.vectors.len(), 1);
    d.reset(T).unwrap();
    ok(&d.run(&[Command::nop(1)], T).unwrap()[0]);
}

#[test]
fn random_commands_never_hurt_the_engine() {
    let lab = start();
    let mut d = lab.driver();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let pick = |r: u64, small: u64| match r % 4 {
        0 => (r % small) & !7,
        1 => r,
        2 => u64::MAX - (r % 64),
        _ => (r % (2 * small)) & !7,
    };
    for round in 0..20 {
        let cmds: Vec<Command> = (0..100)
            .map(|i| Command {
                opcode: (next() % 8) as u16,
                flags: if next() % 16 == 0 { 1 } else { 0 },
                reserved0: 0,
                tag: round * 1000 + i,
                src: pick(next(), VRAM),
                dst: pick(next(), VRAM),
                len: pick(next(), 1 << 16),
                arg: if next() % 2 == 0 {
                    next() % 256
                } else {
                    next()
                },
                reserved1: [0, if next() % 32 == 0 { 1 } else { 0 }],
            })
            .collect();
        let c = d.run(&cmds, T).unwrap();
        for (c, cmd) in c.iter().zip(&cmds) {
            assert_eq!(c.tag, cmd.tag);
            assert!(c.status().is_some(), "unknown status {}", c.status);
        }
    }
    let stats = lab.daemon.device().stats_json();
    assert_eq!(stats["commands"], 2000);
    assert!(stats["errors"].as_u64().unwrap() > 0);
    assert_eq!(stats["completions_by_status"]["internal"], 0);
    ok(&d.run(&[Command::nop(1)], T).unwrap()[0]);
}
