//! The ivshmem server side, seen by a client speaking the protocol as QEMU
//! does (docs/specs/ivshmem-spec.rst).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use fake_gpu::client::{Driver, IvshmemClient};
use fake_gpu::layout::{reg, Command, Status, NO_PEER};
use fake_gpu::protocol::recv;
use fake_gpu::shm::SharedMemory;

#[test]
fn handshake_is_the_one_the_spec_describes() {
    let lab = start();
    let s = UnixStream::connect(lab.socket()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut msgs = Vec::new();
    for _ in 0..7 {
        let m = recv(&s).unwrap().expect("a message");
        msgs.push(m);
    }
    let values: Vec<i64> = msgs.iter().map(|m| m.value).collect();
    let fds: Vec<bool> = msgs.iter().map(|m| m.fd.is_some()).collect();
    // version, our ID (first guest: 1, the device is peer 0), shared
    // memory, the device's two vectors, our two vectors.
    assert_eq!(values, [0, 1, -1, 0, 0, 1, 1]);
    assert_eq!(fds, [false, false, true, true, true, true, true]);
    // Nothing more until something changes.
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(recv(&s).is_err(), "unexpected extra message");

    let shm_file = msgs[2].fd.take().expect("the shared memory fd");
    // SAFETY: F_GET_SEALS on a valid fd.
    let seals = unsafe { libc::fcntl(shm_file.as_raw_fd(), libc::F_GET_SEALS) };
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(seals & want, want, "size must be sealed");
    assert_eq!(seals & libc::F_SEAL_WRITE, 0, "QEMU maps it writable");
    let shm = SharedMemory::from_file(shm_file).unwrap();
    assert!(shm.size().is_power_of_two(), "PCI BARs are powers of two");
    assert_eq!(
        shm.load_u32(reg::MAGIC).unwrap(),
        u32::from_le_bytes(*b"FGPU")
    );
    wait_for("GUEST_PEER_ID", || {
        shm.load_u32(reg::GUEST_PEER_ID).unwrap() == 1
    });
}

#[test]
fn client_sees_the_device_as_peer_zero() {
    let lab = start();
    let c = IvshmemClient::connect(&lab.socket(), 2, T).unwrap();
    assert_eq!(c.id, 1);
    assert_eq!(c.peers.keys().copied().collect::<Vec<_>>(), [0]);
    assert_eq!(c.peers[&0].len(), 2);
    assert_eq!(c.vectors.len(), 2);
}

#[test]
fn disconnect_then_reconnect_gets_a_fresh_device_with_vram_kept() {
    let lab = start();
    let dev = lab.daemon.device().clone();
    let mut d = lab.driver();
    assert_eq!(d.client.id, 1);
    let c = d
        .run(
            &[
                Command::fill(1, 4096, 8192, 0x77),
                Command::checksum(2, 4096, 8192),
            ],
            T,
        )
        .unwrap();
    let crc = c[1].result;
    drop(d);
    wait_for("the server to notice the disconnect", || {
        dev.guest_id().is_none()
    });
    assert_eq!(dev.shm.load_u32(reg::GUEST_PEER_ID).unwrap(), NO_PEER);
    // Completions with no guest connected are not an error: the poll
    // still runs, interrupts are dropped.
    let mut d = lab.driver();
    assert_eq!(d.client.id, 2, "a reconnecting guest gets a new ID");
    assert_eq!(d.reg(reg::GUEST_PEER_ID), 2);
    assert_eq!(d.reg(reg::CMD_CONS), 0, "rings are reset on connect");
    let c = d.run(&[Command::checksum(3, 4096, 8192)], T).unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
    assert_eq!(c[0].index, 0);
    assert_eq!(c[0].result, crc, "VRAM survives a reconnect");
    let stats = dev.stats_json();
    assert_eq!(stats["guest_connects"], 2);
    assert_eq!(stats["guest_disconnects"], 1);
}

#[test]
fn a_second_concurrent_guest_is_refused() {
    let lab = start();
    let mut first = lab.driver();
    let second = IvshmemClient::connect(&lab.socket(), 2, T);
    assert!(second.is_err(), "second guest must be refused");
    assert_eq!(lab.daemon.device().stats.guests_refused.get(), 1);
    let c = first.run(&[Command::nop(1)], T).unwrap();
    assert_eq!(c[0].status(), Some(Status::Ok));
}

#[test]
fn interrupts_reach_the_current_guest_only() {
    let lab = start();
    let d = lab.driver();
    let old_vector = d.client.vectors[0].try_clone().unwrap();
    drop(d);
    let dev = lab.daemon.device().clone();
    wait_for("disconnect", || dev.guest_id().is_none());
    let mut d = lab.driver();
    d.run(&[Command::nop(1)], T).unwrap();
    // The first guest's vector eventfd (kept open here) saw nothing.
    let ready = {
        let mut p = libc::pollfd {
            fd: old_vector.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 0) }
    };
    assert_eq!(ready, 0);
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
    let lab = start();
    let err = fake_gpu::daemon::Daemon::start(fake_gpu::daemon::ServeOptions {
        socket: lab.socket(),
        control: None,
        device: config(),
    });
    let msg = err
        .err()
        .expect("a second daemon on a live socket")
        .to_string();
    assert!(msg.contains("listening"), "{msg}");
    let stale = lab.dir.as_path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let other = fake_gpu::daemon::Daemon::start(fake_gpu::daemon::ServeOptions {
        socket: stale.clone(),
        control: None,
        device: config(),
    })
    .unwrap();
    let d = Driver::connect(&stale, 2).unwrap();
    assert_eq!(d.client.id, 1);
    other.stop();
    assert!(!stale.exists());
}

#[test]
fn hugetlb_works_or_fails_clearly() {
    let mut cfg = config();
    cfg.hugetlb = true;
    match fake_gpu::device::Device::new(cfg) {
        Ok(dev) => assert!(dev.shm.hugetlb()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("huge pages") || msg.contains("nr_hugepages"),
                "unclear error: {msg}"
            );
        }
    }
}

#[test]
fn a_stopping_daemon_leaves_a_rebound_socket_alone() {
    let first = start();
    let socket = first.socket();
    let ctl = fake_gpu::inspect::control_path(&socket);
    std::fs::remove_file(&socket).unwrap();
    std::fs::remove_file(&ctl).unwrap();
    let second = fake_gpu::daemon::Daemon::start(fake_gpu::daemon::ServeOptions {
        socket: socket.clone(),
        control: None,
        device: config(),
    })
    .unwrap();
    first.daemon.stop();
    assert!(socket.exists() && ctl.exists());
    Driver::connect(&socket, 2).unwrap();
    second.stop();
    assert!(!socket.exists() && !ctl.exists());
}
