#!/usr/bin/env python3
"""Check a QEMU built by build-qemu.sh without booting a guest kernel.

usage: check-qemu.py QEMU_BINARY

A small vhost-user backend stub (in this file) answers the vhost-user
handshake and records every message.  QEMU's qtest accelerator plays the
guest driver: it programs the PCI function, negotiates features, starts
the device, resets one queue and enables it again.  The checks:

  - vhost-user-device-pci can be created from the command line,
  - feature bits 40 (RING_RESET) and 41 (ADMIN_VQ) reach the guest,
  - the MSI-X table has num_vqs + 1 entries,
  - num_queues / admin_queue_index / admin_queue_num in the common config,
  - a queue reset sends GET_VRING_BASE to the backend and re-enabling the
    queue sends SET_VRING_NUM/BASE/ADDR/KICK/CALL for that queue only,
  - the backend signalling a vring's error eventfd sets DEVICE_NEEDS_RESET
    in the device status, and a device reset clears it,
  - machines/q35-lab.cfg loads, SeaBIOS (from Debian's packages) runs and
    enumerates two NICs behind the PCIe switch.

Prints one line per check and 'N passed, N failed' at the end.
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LAB_CFG = os.path.join(HERE, "..", "machines", "q35-lab.cfg")

# vhost-user requests
REQ = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER",
    5: "SET_MEM_TABLE", 6: "SET_LOG_BASE", 7: "SET_LOG_FD",
    8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE",
    11: "GET_VRING_BASE", 12: "SET_VRING_KICK", 13: "SET_VRING_CALL",
    14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES",
    16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE",
    24: "GET_CONFIG", 25: "SET_CONFIG",
}
VIRTIO_NET_F_MAC = 5
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41
VHOST_USER_F_PROTOCOL_FEATURES = 30
PROTO_F_MQ = 0
PROTO_F_CONFIG = 9

NUM_VQS = 4          # rx, tx, ctrl, admin
CONFIG_SIZE = 12
DEVICE_FEATURES = ((1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_F_VERSION_1) |
                   (1 << VIRTIO_F_RING_RESET) | (1 << VIRTIO_F_ADMIN_VQ) |
                   (1 << VHOST_USER_F_PROTOCOL_FEATURES))


class Backend:
    """Minimal vhost-user back-end: answers queries, logs every request."""

    def __init__(self, path):
        self.path = path
        self.log = []
        self.lock = threading.Lock()
        # Error eventfds from SET_VRING_ERR, by vring index.
        self.err_fds = {}
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    @staticmethod
    def _recv_exact(conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _serve(self, conn):
        try:
            while True:
                hdr, anc, _, _ = conn.recvmsg(
                    12, socket.CMSG_SPACE(8 * struct.calcsize("i")))
                if not hdr:
                    return
                if len(hdr) < 12:
                    hdr += self._recv_exact(conn, 12 - len(hdr))
                fds = []
                for level, typ, data in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        n = len(data) // 4
                        fds += struct.unpack("%di" % n, data[:4 * n])
                req, flags, size = struct.unpack("<III", hdr)
                payload = self._recv_exact(conn, size) if size else b""
                self._handle(conn, req, payload)
                if req == 14 and len(fds) == 1:
                    self._keep_err_fd(payload, fds.pop())
                for fd in fds:
                    os.close(fd)
        except (EOFError, ConnectionResetError, OSError):
            return

    def _reply(self, conn, req, payload):
        conn.sendall(struct.pack("<III", req, 0x1 | 0x4, len(payload)) +
                     payload)

    def _handle(self, conn, req, payload):
        name = REQ.get(req, str(req))
        index = None
        if req in (8, 9, 10, 11, 18):
            index = struct.unpack_from("<I", payload)[0]
        elif req in (12, 13, 14):
            index = struct.unpack_from("<Q", payload)[0] & 0xff
        with self.lock:
            self.log.append((name, index))
        if req == 1:
            self._reply(conn, req, struct.pack("<Q", DEVICE_FEATURES))
        elif req == 15:
            self._reply(conn, req, struct.pack(
                "<Q", (1 << PROTO_F_MQ) | (1 << PROTO_F_CONFIG)))
        elif req == 17:
            self._reply(conn, req, struct.pack("<Q", 16))
        elif req == 11:
            self._reply(conn, req, struct.pack("<II", index, 0))
        elif req == 24:
            offset, size, flags = struct.unpack_from("<III", payload)
            self._reply(conn, req, struct.pack("<III", offset, size, flags) +
                        bytes(size))

    def _keep_err_fd(self, payload, fd):
        index = struct.unpack_from("<Q", payload)[0] & 0xff
        with self.lock:
            old = self.err_fds.pop(index, None)
            self.err_fds[index] = fd
        if old is not None:
            os.close(old)

    def signal_error(self, index):
        """Signal vring `index`'s error eventfd, as a backend that hit an
        error on that ring does.  False when QEMU gave it none."""
        with self.lock:
            fd = self.err_fds.get(index)
        if fd is None:
            return False
        os.write(fd, struct.pack("<Q", 1))
        return True

    def take_log(self):
        with self.lock:
            log, self.log = self.log, []
        return log

    def close(self):
        self.srv.close()
        with self.lock:
            fds, self.err_fds = list(self.err_fds.values()), {}
        for fd in fds:
            os.close(fd)


class QTest:
    """Speaks QEMU's qtest protocol over the process's stdin/stdout."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        while True:
            out = self.proc.stdout.readline()
            if not out:
                raise RuntimeError("QEMU exited: " + self.proc.stderr.read())
            if out.startswith("OK"):
                return out.split()[1] if len(out.split()) > 1 else None
            if out.startswith("FAIL") or out.startswith("ERR"):
                raise RuntimeError("qtest: %s -> %s" % (line, out.strip()))

    def rd(self, width, addr):
        return int(self.cmd("read%s 0x%x" % (width, addr)), 16)

    def wr(self, width, addr, val):
        self.cmd("write%s 0x%x 0x%x" % (width, addr, val))

    def cfg_addr(self, devfn, reg):
        self.cmd("outl 0xcf8 0x%x" % (0x80000000 | (devfn << 8) | (reg & ~3)))
        return 0xcfc + (reg & 3)

    def cfg_rd(self, devfn, reg, width):
        port = self.cfg_addr(devfn, reg)
        return int(self.cmd("in%s 0x%x" % (width, port)), 16)

    def cfg_wr(self, devfn, reg, width, val):
        port = self.cfg_addr(devfn, reg)
        self.cmd("out%s 0x%x 0x%x" % (width, port, val))

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print("%s: %s%s" % ("PASS" if ok else "FAIL", name,
                        (" (%s)" % detail) if detail else ""))


def qtest_checks(qemu, tmp):
    sock = os.path.join(tmp, "dut.sock")
    be = Backend(sock)
    slot = 5
    devfn = slot << 3
    argv = [qemu, "-machine", "q35", "-accel", "qtest", "-qtest", "stdio",
            "-nodefaults", "-display", "none", "-serial", "none",
            "-object", "memory-backend-memfd,id=ram,size=256M,share=on",
            "-machine", "memory-backend=ram", "-m", "256M",
            "-chardev", "socket,id=dut,path=" + sock,
            "-device", "vhost-user-device-pci,chardev=dut,virtio-id=1,"
            "num_vqs=%d,config_size=%d,addr=0x%x" % (NUM_VQS, CONFIG_SIZE,
                                                     slot)]
    qt = QTest(argv)
    try:
        vendor = qt.cfg_rd(devfn, 0, "w")
        device = qt.cfg_rd(devfn, 2, "w")
        check("vhost-user-device-pci created from -device",
              vendor == 0x1af4 and device == 0x1041,
              "%04x:%04x" % (vendor, device))

        # Map BAR4 (64-bit, modern virtio regions) and enable decoding.
        bar_base = 0xc0000000
        qt.cfg_wr(devfn, 0x20, "l", bar_base)
        qt.cfg_wr(devfn, 0x24, "l", 0)
        qt.cfg_wr(devfn, 0x04, "w", 0x6)

        common = msix_size = None
        cap = qt.cfg_rd(devfn, 0x34, "b")
        while cap:
            cap_id = qt.cfg_rd(devfn, cap, "b")
            if cap_id == 0x11:
                msix_size = (qt.cfg_rd(devfn, cap + 2, "w") & 0x7ff) + 1
            elif cap_id == 0x09 and qt.cfg_rd(devfn, cap + 3, "b") == 1:
                common = bar_base + qt.cfg_rd(devfn, cap + 8, "l")
            cap = qt.cfg_rd(devfn, cap + 1, "b")
        check("MSI-X vectors = num_vqs + 1", msix_size == NUM_VQS + 1,
              "table size %s" % msix_size)
        if common is None:
            check("virtio common config capability found", False)
            return

        qt.wr("b", common + 20, 0)                      # reset
        qt.wr("b", common + 20, 1 | 2)                  # ACK | DRIVER
        qt.wr("l", common + 0, 0)
        lo = qt.rd("l", common + 4)
        qt.wr("l", common + 0, 1)
        hi = qt.rd("l", common + 4)
        feats = lo | (hi << 32)
        check("RING_RESET and ADMIN_VQ offered to the guest",
              feats & (1 << VIRTIO_F_RING_RESET) and
              feats & (1 << VIRTIO_F_ADMIN_VQ), "features 0x%x" % feats)
        want = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_RESET) |
                (1 << VIRTIO_F_ADMIN_VQ))
        qt.wr("l", common + 8, 0)
        qt.wr("l", common + 12, want & 0xffffffff)
        qt.wr("l", common + 8, 1)
        qt.wr("l", common + 12, want >> 32)
        qt.wr("b", common + 20, 1 | 2 | 8)              # FEATURES_OK
        status = qt.rd("b", common + 20)
        check("FEATURES_OK accepted", status & 8, "status 0x%x" % status)

        numq = qt.rd("w", common + 18)
        aq_idx = qt.rd("w", common + 60)
        aq_num = qt.rd("w", common + 62)
        check("num_queues excludes the admin queue", numq == NUM_VQS - 1,
              "num_queues %d" % numq)
        check("admin_queue_index/num = last queue, 1",
              aq_idx == NUM_VQS - 1 and aq_num == 1,
              "index %d num %d" % (aq_idx, aq_num))

        def setup_queue(q):
            ring = 0x100000 + q * 0x10000
            qt.wr("w", common + 22, q)                  # queue_select
            qt.wr("w", common + 24, 64)                 # queue_size
            for off, addr in ((32, ring), (40, ring + 0x1000),
                              (48, ring + 0x2000)):
                qt.wr("l", common + off, addr)
                qt.wr("l", common + off + 4, 0)
            qt.wr("w", common + 28, 1)                  # queue_enable

        for q in range(NUM_VQS):
            setup_queue(q)
        be.take_log()
        qt.wr("b", common + 20, 1 | 2 | 8 | 4)          # DRIVER_OK
        time.sleep(0.5)
        started = be.take_log()
        kicks = sorted(i for n, i in started if n == "SET_VRING_KICK")
        check("DRIVER_OK starts all rings in the backend",
              kicks == list(range(NUM_VQS)), "kicks %s" % kicks)

        qt.wr("w", common + 22, 1)
        qt.wr("w", common + 58, 1)                      # queue_reset
        time.sleep(0.3)
        reset = be.take_log()
        check("queue reset sends GET_VRING_BASE for that ring only",
              reset == [("GET_VRING_BASE", 1)], "got %s" % reset)
        check("queue reads back reset and disabled",
              qt.rd("w", common + 58) == 0 and qt.rd("w", common + 28) == 0)

        setup_queue(1)
        time.sleep(0.3)
        restart = be.take_log()
        names = [n for n, i in restart]
        check("re-enable restarts that ring with SET_VRING_*",
              all(i == 1 for n, i in restart) and
              names[:5] == ["SET_VRING_NUM", "SET_VRING_BASE",
                            "SET_VRING_ADDR", "SET_VRING_KICK",
                            "SET_VRING_CALL"], "got %s" % restart)

        # A vring error from the backend puts the device in NEEDS_RESET.
        needs_reset = 0x40
        signalled = be.signal_error(0)
        status = qt.rd("b", common + 20)
        deadline = time.monotonic() + 10
        while (signalled and not status & needs_reset and
               time.monotonic() < deadline):
            time.sleep(0.05)
            status = qt.rd("b", common + 20)
        check("a vring error sets DEVICE_NEEDS_RESET",
              signalled and status & needs_reset,
              "error fd %s, status 0x%x" % (
                  "signalled" if signalled else "never set", status))
        qt.wr("b", common + 20, 0)                      # reset
        status = qt.rd("b", common + 20)
        check("a device reset clears DEVICE_NEEDS_RESET", status == 0,
              "status 0x%x" % status)
    finally:
        qt.close()
        be.close()


def lab_machine_checks(qemu, tmp):
    backends = []
    argv = [qemu, "-readconfig", LAB_CFG, "-accel", "tcg", "-nodefaults",
            "-display", "none", "-serial", "none", "-monitor", "stdio"]
    for nic in ("nic0", "nic1"):
        sock = os.path.join(tmp, nic + ".sock")
        backends.append(Backend(sock))
        argv += ["-chardev", "socket,id=%s,path=%s" % (nic, sock),
                 "-device", "vhost-user-device-pci,chardev=%s,virtio-id=1,"
                 "num_vqs=%d,config_size=%d,bus=sw-%s" % (nic, NUM_VQS,
                                                         CONFIG_SIZE, nic)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # Let SeaBIOS enumerate the buses, then ask the monitor.
        time.sleep(8)
        out, err = proc.communicate("info pci\nquit\n", timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        for be in backends:
            be.close()
    check("q35-lab.cfg loads", proc.returncode == 0,
          err.strip().splitlines()[-1] if err.strip() else "")
    buses = {}
    bus = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Bus"):
            bus = int(line.split()[1].rstrip(","))
        elif "1af4:1041" in line and bus is not None:
            buses.setdefault("nic", []).append(bus)
        elif "PCI bridge" in line and bus is not None:
            buses.setdefault("bridge", []).append(bus)
    nics = buses.get("nic", [])
    check("SeaBIOS enumerates two NICs behind the switch",
          len(nics) == 2 and all(b >= 3 for b in nics),
          "NICs on buses %s, bridges on %s" % (nics, buses.get("bridge")))


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    qemu = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="check-qemu.") as tmp:
        for fn in (qtest_checks, lab_machine_checks):
            try:
                fn(qemu, tmp)
            except Exception as e:  # report, keep going
                check(fn.__name__, False, repr(e))
    failed = RESULTS.count(False)
    print("%d passed, %d failed" % (len(RESULTS) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
