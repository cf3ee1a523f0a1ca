#!/usr/bin/env python3
"""The fake GPU in the lab guest: its driver (/dev/fake-gpu0, dma-bufs of
VRAM) and device memory TCP into and out of VRAM on the guest's virtio_net.

Cases (KTAP, names on the command line select them), for a guest booted
with `--gpu switch`:
  fake_gpu_engine_round_trip, fake_gpu_alloc_beyond_vram_enomem,
  fake_gpu_cpu_never_maps_vram, fake_gpu_malformed_command_reported,
  fake_gpu_free_while_bound_deferred, fake_gpu_allocs_seen_by_host,
  fake_gpu_devmem_rx_into_vram
and for `--gpu root-complex`: fake_gpu_root_complex_bind_refused.
fake_gpu_allocs_seen_by_host has the host check the device's allocation
table mid-case (toolkit_faults.ask, answered by xtask/src/fake_gpu.rs).

The demo's steps (`cargo xtask demo`), whose results the host checks:
  fake_gpu_e2e.py demo-tx BYTES      devmem TX of BYTES out of VRAM
  fake_gpu_e2e.py demo-rx BYTES LOG  ncdevmem RX of BYTES into VRAM, its
                                     per-frag log (dma-buf offsets) in LOG
"""
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import socket
import subprocess
import sys

import devmem_e2e as dm
from labutil import Fail, log, sh, wait_for
from toolkit_faults import RESULTS, ask

DEV = "/dev/fake-gpu0"
DEBUGFS = "/sys/kernel/debug/fake_gpu/fake-gpu0"


def _ioc(direction, nr, size):
    return direction << 30 | size << 16 | 0xBB << 8 | nr


# linux/fake_gpu.h
IOC_INFO = _ioc(2, 0x00, 32)
IOC_ALLOC = _ioc(3, 0x01, 32)
IOC_WRITE = _ioc(1, 0x02, 32)
IOC_READ = _ioc(1, 0x03, 32)
IOC_FILL = _ioc(1, 0x04, 24)
IOC_CHECKSUM = _ioc(3, 0x05, 32)
# linux/dma-buf.h: DMA_BUF_IOCTL_SYNC, struct dma_buf_sync { __u64 flags; }
DMA_BUF_IOCTL_SYNC = 0x40086200
DMA_BUF_SYNC_READ, DMA_BUF_SYNC_START = 1, 0


class Info(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("dma_align", ctypes.c_uint32),
                ("vram_size", ctypes.c_uint64), ("vram_free", ctypes.c_uint64),
                ("staging_size", ctypes.c_uint64)]


class Alloc(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("align", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("fd", ctypes.c_int32),
                ("vram_offset", ctypes.c_uint64)]


class Xfer(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("user_ptr", ctypes.c_uint64)]


class Fill(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int32), ("value", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class Checksum(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("offset", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("crc32c", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


def require_gpu():
    if not os.path.exists(DEV):
        raise Fail(f"no {DEV}: boot with --gpu switch|root-complex, and a guest kernel with "
                   "the series' fake GPU driver (CONFIG_FAKE_GPU=y)")


class Gpu:
    """An open /dev/fake-gpu0."""

    def __init__(self):
        require_gpu()
        self.fd = os.open(DEV, os.O_RDWR | os.O_CLOEXEC)

    def info(self):
        i = Info()
        fcntl.ioctl(self.fd, IOC_INFO, i)
        return i

    def alloc(self, size, align=0):
        return GpuBuf(self, size, align)

    def close(self):
        os.close(self.fd)


class GpuBuf:
    """A VRAM range as a dma-buf. Reading and writing go through the copy
    engine; view() gives the slicing that devmem_e2e.devmem_recv_all uses
    on a udmabuf's mapping."""

    def __init__(self, gpu, size, align=0):
        a = Alloc(size=size, align=align)
        fcntl.ioctl(gpu.fd, IOC_ALLOC, a)
        self.gpu, self.fd, self.size, self.vram_offset = gpu, a.fd, a.size, a.vram_offset

    def _xfer(self, req, offset, buf):
        x = Xfer(fd=self.fd, offset=offset, len=len(buf),
                 user_ptr=ctypes.addressof(buf))
        fcntl.ioctl(self.gpu.fd, req, x)

    def write(self, offset, data):
        self._xfer(IOC_WRITE, offset, (ctypes.c_char * len(data)).from_buffer_copy(data))

    def read(self, offset, length):
        buf = (ctypes.c_char * length)()
        self._xfer(IOC_READ, offset, buf)
        return bytes(buf)

    def fill(self, offset, length, value):
        fcntl.ioctl(self.gpu.fd, IOC_FILL, Fill(fd=self.fd, value=value, offset=offset, len=length))

    def checksum(self, offset, length):
        c = Checksum(fd=self.fd, offset=offset, len=length)
        fcntl.ioctl(self.gpu.fd, IOC_CHECKSUM, c)
        return c.crc32c

    def view(self):
        buf = self

        class View:
            def __getitem__(self, s):
                return buf.read(s.start, s.stop - s.start)
        return View()

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def crc32c(data):
    """CRC32C (Castagnoli), bitwise: for the checks here, not for speed."""
    crc = 0xffffffff
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82f63b78 & -(crc & 1))
    return crc ^ 0xffffffff


def os_error(fn):
    """Runs fn, expecting an OSError; returns its errno."""
    try:
        fn()
    except OSError as e:
        return e.errno
    raise Fail("the call succeeded; the driver should refuse it")


def name(err):
    """errno's name (EOPNOTSUPP rather than its alias ENOTSUP), OK for 0."""
    return {0: "OK", errno.EOPNOTSUPP: "EOPNOTSUPP"}.get(err) or errno.errorcode.get(err, str(err))


def refusals():
    with open(f"{DEBUGFS}/cpu_access_refused") as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def raw_command(opcode, src, dst, length, arg=0):
    """A copy engine command straight onto the ring (debugfs); returns the
    errno of its completion status (0 when it succeeded)."""
    fd = os.open(f"{DEBUGFS}/command", os.O_WRONLY)
    try:
        os.write(fd, f"{opcode} {src:#x} {dst:#x} {length:#x} {arg:#x}".encode())
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


# ---- cases -------------------------------------------------------------------------

def test_engine_round_trip():
    """Bytes written through the staging window and the copy engine come
    back unchanged (unaligned edges too); FILL and the device's CRC32C agree
    with the CPU's."""
    gpu = Gpu()
    try:
        info = gpu.info()
        log(f"fake GPU {info.version >> 16}.{info.version & 0xffff}: "
            f"{info.vram_size >> 20} MiB VRAM, {info.vram_free >> 20} MiB free, "
            f"{info.staging_size >> 10} KiB staging, DMA alignment {info.dma_align}")
        buf = gpu.alloc(8 << 20)
        try:
            data = os.urandom(3 << 20) + b"tail"
            buf.write(12345, data)
            if buf.read(12345, len(data)) != data:
                raise Fail("read back differs from what was written")
            buf.fill(0, 1 << 20, 0x5a)
            if buf.read(0, 1 << 20) != b"\x5a" * (1 << 20):
                raise Fail("FILL 0x5a did not read back as 0x5a")
            dev_crc, cpu_crc = buf.checksum(0, 64 << 10), crc32c(b"\x5a" * (64 << 10))
            if dev_crc != cpu_crc:
                raise Fail(f"device CRC32C {dev_crc:#x}, CPU {cpu_crc:#x}")
        finally:
            buf.close()
    finally:
        gpu.close()


def test_alloc_beyond_vram_enomem():
    """More than the free VRAM, or more than all of it, is ENOMEM; all the
    free VRAM at once works and comes back when freed."""
    gpu = Gpu()
    try:
        free = gpu.info().vram_free
        for size in (free + 4096, gpu.info().vram_size + (1 << 30)):
            got = os_error(lambda: gpu.alloc(size))
            if got != errno.ENOMEM:
                raise Fail(f"allocating {size} bytes ({free} free): {name(got)}, want ENOMEM")
            log(f"alloc {size} bytes with {free} free: {name(got)}")
        everything = gpu.alloc(free)
        left = gpu.info().vram_free
        got = os_error(lambda: gpu.alloc(4096))
        everything.close()
        if left != 0 or got != errno.ENOMEM:
            raise Fail(f"after allocating all {free} bytes: {left} free, next alloc {name(got)}")
        wait_for("the VRAM to be free again", lambda: gpu.info().vram_free == free, 10)
    finally:
        gpu.close()


def test_alloc_reads_zeros():
    """VRAM freed by one owner and allocated again reads as zeros: the
    driver has the copy engine clear each range it hands out, so nothing a
    previous owner (or a NIC) left there leaks."""
    gpu = Gpu()
    size = 4 << 20
    try:
        old = gpu.alloc(size)
        where = old.vram_offset
        old.fill(0, size, 0xa5)
        if old.read(size - 4096, 4096) != b"\xa5" * 4096:
            raise Fail("FILL 0xa5 did not read back as 0xa5")
        old.close()
        new = gpu.alloc(size)
        zero = gpu.alloc(size)
        try:
            if not (new.vram_offset < where + size and where < new.vram_offset + size):
                raise Fail(f"the new range {new.vram_offset:#x}+{size:#x} does not overlap the "
                           f"freed {where:#x}+{size:#x}: nothing to check")
            zero.fill(0, size, 0)
            got, want = new.checksum(0, size), zero.checksum(0, size)
            if got != want or new.read(0, 4096) != bytes(4096):
                raise Fail(f"VRAM {new.vram_offset:#x}+{size:#x}, filled with 0xa5 by its "
                           f"previous owner, reads back CRC32C {got:#x}, zeros give {want:#x}")
            log(f"VRAM {new.vram_offset:#x}+{size:#x}: 0xa5 from its previous owner, "
                f"zeros when allocated again (CRC32C {got:#x})")
        finally:
            new.close()
            zero.close()
    finally:
        gpu.close()


def test_cpu_never_maps_vram():
    """mmap of a VRAM dma-buf and CPU access to it are refused, and
    /dev/fake-gpu0 has no mapping either; the driver counts each refusal."""
    gpu = Gpu()
    buf = gpu.alloc(1 << 20)
    try:
        before = refusals()
        got = os_error(lambda: mmap.mmap(buf.fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ))
        if got != errno.EOPNOTSUPP:
            raise Fail(f"mmap of the dma-buf: {name(got)}, want EOPNOTSUPP")
        sync = (ctypes.c_uint64 * 1)(DMA_BUF_SYNC_START | DMA_BUF_SYNC_READ)
        got = os_error(lambda: fcntl.ioctl(buf.fd, DMA_BUF_IOCTL_SYNC, sync))
        if got != errno.EOPNOTSUPP:
            raise Fail(f"DMA_BUF_IOCTL_SYNC (begin_cpu_access): {name(got)}, want EOPNOTSUPP")
        got_dev = os_error(lambda: mmap.mmap(gpu.fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ))
        after = refusals()
        if after["mmap"] != before["mmap"] + 1 or \
                after["begin_cpu_access"] != before["begin_cpu_access"] + 1:
            raise Fail(f"refusal counters {before} -> {after}")
        log(f"dma-buf mmap and CPU access refused (EOPNOTSUPP), /dev/fake-gpu0 mmap {name(got_dev)}; "
            f"driver's refusals: {after}")
    finally:
        buf.close()
        gpu.close()


def test_malformed_command_reported():
    """Commands the driver would never send, put on the ring as they are:
    each comes back with the device's error status, and the engine then
    serves well-formed commands as before."""
    gpu = Gpu()
    buf = gpu.alloc(1 << 20)
    try:
        info = gpu.info()
        bad = {
            "unknown opcode 99": ((99, 0, 0, 4096), errno.EOPNOTSUPP),
            "FILL past the end of VRAM": ((1, 0, info.vram_size, 8192), errno.ERANGE),
            "FILL at an unaligned offset": ((1, 0, buf.vram_offset + 1, 4096), errno.EINVAL),
            "COPY with a length that wraps": ((2, 8192, 4096, (1 << 64) - 4096), errno.EOVERFLOW),
        }
        for what, (cmd, want) in bad.items():
            got = raw_command(*cmd)
            log(f"{what}: {name(got)}")
            if got != want:
                raise Fail(f"{what}: the device answered {name(got)}, want {name(want)}")
        if raw_command(1, 0, buf.vram_offset, 4096, 0x33) != 0:
            raise Fail("a well-formed FILL through debugfs failed after the bad ones")
        buf.fill(4096, 4096, 0x44)
        if buf.read(0, 8192) != b"\x33" * 4096 + b"\x44" * 4096:
            raise Fail("the engine did not serve well-formed commands after the bad ones")
    finally:
        buf.close()
        gpu.close()


def test_free_while_bound_deferred():
    """A dma-buf whose fd is closed while bound to a receive queue stays
    allocated (and steered traffic still lands in it) until the binding
    goes; then its VRAM is free again."""
    q, port, size, nbytes = dm.devmem_queue(), 7951, 8 << 20, 2 << 20
    gpu = Gpu()
    nic = dm.NicConfig(q)
    try:
        free = gpu.info().vram_free
        buf = gpu.alloc(size)
        bind = dm.Binding(buf, [q])
        try:
            buf.close()
            held = free - gpu.info().vram_free
            if held != size:
                raise Fail(f"fd closed while bound: {held} bytes held, want {size}")
            nic.steer(port, q)
            got = receive(port, nbytes, lambda conn: dm.devmem_count(conn, bind.id))
            if got != nbytes:
                raise Fail(f"{got} of {nbytes} bytes arrived in the dma-buf after its fd was closed")
            log(f"fd closed, binding kept: {held} bytes still allocated, "
                f"{got} bytes of a steered flow received into it")
        finally:
            bind.close()
        wait_for("the VRAM to be freed after unbind", lambda: gpu.info().vram_free == free, 30)
    finally:
        nic.restore()
        gpu.close()


def test_allocs_seen_by_host():
    """The driver tells the device (1.1) about its VRAM allocations: while
    buffers of known sizes are live the host's `fake-gpu inspect allocs`
    lists exactly them (VRAM offset, size, dma-buf inode number as id), and
    after they are freed none of them, with one free noted for each. Notes
    that contradict the table, put on the ring through debugfs, are
    refused: an overlapping allocation (EEXIST), a free of the wrong id
    (ENOENT)."""
    gpu = Gpu()
    bufs = []
    try:
        info = gpu.info()
        if info.version & 0xffff < 1:
            raise Fail(f"device {info.version >> 16}.{info.version & 0xffff} has no allocation table")
        if info.vram_free != info.vram_size:
            raise Fail(f"{info.vram_size - info.vram_free} bytes of VRAM allocated before the case")
        # Page-sized, 2 MiB aligned, and not a page multiple (rounded up).
        for size, align in ((64 << 10, 0), (1 << 20, 2 << 20), ((3 << 20) + 1, 0), (4096, 0)):
            bufs.append(gpu.alloc(size, align))
        want = [{"offset": b.vram_offset, "size": b.size, "id": os.fstat(b.fd).st_ino}
                for b in bufs]
        if bufs[2].size != (3 << 20) + 4096 or bufs[1].vram_offset % (2 << 20):
            raise Fail(f"driver's allocations: {want}")
        first = want[0]
        for what, cmd, err in (
                ("ALLOC_NOTE overlapping a live buffer",
                 (6, 0, first["offset"] + 4096, 4096, 1), errno.EEXIST),
                ("FREE_NOTE with the wrong id",
                 (7, 0, first["offset"], first["size"], first["id"] + 1), errno.ENOENT)):
            got = raw_command(*cmd)
            log(f"{what}: {name(got)}")
            if got != err:
                raise Fail(f"{what}: the device answered {name(got)}, want {name(err)}")
        with open(f"{RESULTS}/gpu-allocs.json", "w") as f:
            json.dump({"allocs": want}, f)
        log("allocated " + ", ".join(f"{a['offset']:#x}+{a['size']:#x} id {a['id']}" for a in want))
        log(f"host, live: {ask('gpu-allocs-live')}")
        for b in bufs:
            b.close()
        wait_for("the VRAM to be free", lambda: gpu.info().vram_free == info.vram_size, 10)
        log(f"host, freed: {ask('gpu-allocs-freed')}")
    finally:
        for b in bufs:
            b.close()
        gpu.close()


def receive(port, nbytes, receiver):
    """Accepts one connection on port from the remote end's pattern sender
    of nbytes; returns receiver(conn)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((dm.LOCAL_V4, port))
    srv.listen(1)
    srv.settimeout(120)
    sender = dm.remote_send(port, nbytes)
    try:
        conn, _ = srv.accept()
        conn.settimeout(300)
        try:
            got = receiver(conn)
        finally:
            conn.close()
        dm.finish(sender, "sender")
        return got
    finally:
        srv.close()
        if sender.poll() is None:
            sender.kill()


def test_devmem_rx_into_vram():
    """A flow steered to a queue bound to VRAM: every payload byte arrives in
    VRAM (read back through the copy engine, SHA-256 equal), none as linear
    data."""
    q, port, nbytes = dm.devmem_queue(), 7952, 16 << 20
    gpu = Gpu()
    nic = dm.NicConfig(q)
    buf = gpu.alloc(32 << 20)
    try:
        bind = dm.Binding(buf, [q])
        try:
            nic.steer(port, q)
            got, in_vram, linear = receive(port, nbytes,
                                           lambda c: dm.devmem_recv_all(c, buf, bind.id))
        finally:
            bind.close()
        if got != dm.pattern_sha(nbytes) or in_vram != nbytes:
            raise Fail(f"received {got} ({in_vram} in VRAM, {linear} linear), "
                       f"sent {dm.pattern_sha(nbytes)}")
        log(f"{nbytes} bytes received into VRAM, SHA-256 equal to the sent stream")
    finally:
        buf.close()
        nic.restore()
        gpu.close()


def test_root_complex_bind_refused():
    """The GPU on the root complex, the NIC behind a switch: no peer-to-peer
    path under q35, so the bind is refused with an error and the driver says
    why; the NIC keeps receiving."""
    q = dm.devmem_queue()
    gpu = Gpu()
    nic = dm.NicConfig(q)
    buf = gpu.alloc(4 << 20)
    try:
        since = dm.dmesg_len()
        err, extack = dm.bind_error(buf, [q])
        said = [ln for ln in sh(["dmesg"]).splitlines()[since:] if "refusing dma-buf importer" in ln]
        log(f"bind-rx: {name(err)} {extack}")
        if not said:
            raise Fail("the driver logged no reason for refusing the NIC")
        log(f"driver: {said[0].strip()}")
        if dm.queue_dmabufs():
            raise Fail(f"a queue reports a dma-buf after the refused bind: {dm.queue_dmabufs()}")
    finally:
        buf.close()
        nic.restore()
        gpu.close()
    dm.plain_transfer(7953, 4 << 20)


SWITCH_TESTS = [test_engine_round_trip, test_alloc_beyond_vram_enomem, test_alloc_reads_zeros,
                test_cpu_never_maps_vram,
                test_malformed_command_reported, test_free_while_bound_deferred,
                test_allocs_seen_by_host, test_devmem_rx_into_vram]
ROOT_COMPLEX_TESTS = [test_root_complex_bind_refused]


# ---- the demo's steps -----------------------------------------------------------------

def demo_tx(nbytes):
    """ncdevmem -m fake-gpu in TX mode: the payload is written into VRAM
    through the copy engine and sent from there; the remote end's SHA-256
    must match."""
    require_gpu()
    nbytes, port = int(nbytes), 7961
    payload = "".join(chr(0x21 + i % 90) for i in range(nbytes)).encode()
    want = hashlib.sha256(payload + b"\n").hexdigest()
    out_path = "/tmp/fake-gpu-demo-tx.out"
    # Into a file: a pipe read only at the end would stall the transfer.
    rx = subprocess.Popen(["ip", "netns", "exec", "remote", "socat", "-u",
                           f"TCP-LISTEN:{port},reuseaddr", f"CREATE:{out_path}"],
                          stderr=subprocess.PIPE)
    try:
        wait_for("the remote listener", lambda: dm.port_listening(port, ns="remote"))
        tx = subprocess.run([dm.NCDEVMEM, "-f", dm.NETIF, "-s", dm.REMOTE_V4, "-p", str(port),
                             "-m", "fake-gpu"], input=payload + b"\n", capture_output=True,
                            timeout=300)
        if tx.returncode != 0:
            raise Fail(f"ncdevmem TX exited {tx.returncode}: {tx.stderr.decode()[-600:]}")
        rx.wait(timeout=120)
    finally:
        if rx.poll() is None:
            rx.kill()
    with open(out_path, "rb") as f:
        out = f.read()
    got = hashlib.sha256(out).hexdigest()
    vram = re.search(r"fake-gpu: (\d+) bytes at VRAM offset (0x[0-9a-f]+)", tx.stderr.decode())
    print(f"tx: {nbytes + 1} bytes sent from VRAM"
          f"{f' (dma-buf at VRAM offset {vram.group(2)})' if vram else ''}; "
          f"remote received {len(out)} bytes, SHA-256 {'equal' if got == want else 'DIFFERENT'}",
          flush=True)
    if got != want:
        raise Fail("the remote end received other bytes than were sent")


def demo_rx(nbytes, frag_log):
    """ncdevmem -m fake-gpu -v 7 in RX mode, its full per-frag log (the
    SCM_DEVMEM_DMABUF offsets) kept in frag_log for the host to check VRAM."""
    require_gpu()
    nbytes, port = int(nbytes), 7962
    q = dm.devmem_queue()
    nc = dm.Ncdevmem(port, q, provider="fake-gpu", frag_log=frag_log)
    try:
        sent = dm.finish(dm.remote_send(port, nbytes, src_port=port), "sender")
        got, _ = nc.wait()
    finally:
        nc.kill()
    if got != nbytes or sent != dm.pattern_sha(nbytes):
        raise Fail(f"ncdevmem received {got} of {nbytes} bytes into VRAM")
    print(f"rx: {got} bytes received into VRAM on queue {q}, every byte validated "
          f"by ncdevmem -v 7; frag log: {frag_log}", flush=True)


def main(selected):
    shape = os.environ.get("LAB_GPU_SHAPE", "switch")
    tests = SWITCH_TESTS if shape == "switch" else ROOT_COMPLEX_TESTS
    # Every queue pair: the devmem queue is the last, RSS spreads the rest.
    sh(["ethtool", "-L", dm.NETIF, "combined", str(dm.max_channels())])
    return dm.run_cases([t for t in tests if not selected or t.__name__[5:] in selected],
                        "fake_gpu_")


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["demo-tx"]:
            demo_tx(*sys.argv[2:])
        elif sys.argv[1:2] == ["demo-rx"]:
            demo_rx(*sys.argv[2:])
        else:
            sys.exit(main(sys.argv[1:]))
    except Fail as e:
        sys.exit(f"fake_gpu_e2e.py: {e}")
