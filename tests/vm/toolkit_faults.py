#!/usr/bin/env python3
"""vhost-nic's faults with the guest's driver: for each fault the host
sets it on the control socket (`ask set-KIND`), the guest runs a plain TCP
transfer (local -> remote, SHA-256 checked) and a devmem RX flow (remote ->
local, ncdevmem -v 7 into a udmabuf) at once, the host clears it (`ask
clear-KIND`), and the guest checks what its stack and driver saw. Every
wait has a deadline. Prints KTAP (toolkit_fault_KIND); names on the command
line select faults. Run by `cargo xtask toolkit` / `test`, which answers
the asks (xtask/src/toolkit.rs).
"""
import json
import os
import re
import socket
import sys
import threading
import time

import devmem_e2e as dm
import suite
from labutil import Fail, log, sh, wait_for

RESULTS = "/mnt/results"
PLAIN_BYTES = int(os.environ.get("LAB_FAULT_PLAIN_BYTES", str(8 << 20)))
DEVMEM_BYTES = int(os.environ.get("LAB_FAULT_DEVMEM_BYTES", str(4 << 20)))
# A flow that has not finished by then is a hang.
FLOW_DEADLINE = 240


def ask(name, timeout=150):
    """Has the host act (xtask/src/toolkit.rs); returns its answer."""
    done = f"{RESULTS}/ask-{name}.done"
    open(f"{RESULTS}/ask-{name}", "w").close()
    wait_for(f"the host's answer to {name}", lambda: os.path.exists(done), timeout)
    with open(done) as f:
        answer = f.read().strip()
    if answer.startswith("error"):
        raise Fail(f"host, {name}: {answer}")
    return answer


NSTAT_KEYS = ("TcpRetransSegs", "TcpInCsumErrors", "IpExtInTruncatedPkts")


def counters():
    """The guest's view, summed over both ends (root namespace and remote):
    TCP/IP MIB counters and the drivers' receive error counters."""
    c = dict.fromkeys(NSTAT_KEYS, 0)
    for ns, dev in ((None, dm.NETIF), ("remote", dm.REMOTE_IF)):
        for line in sh(["nstat", "-asz", *NSTAT_KEYS], ns=ns).splitlines():
            f = line.split()
            if len(f) >= 2 and f[0] in c:
                c[f[0]] += int(f[1])
        rx = json.loads(sh(["ip", "-j", "-s", "-s", "link", "show", dev], ns=ns))[0]["stats64"]["rx"]
        for k in ("length_errors", "errors", "dropped", "frame_errors", "crc_errors"):
            c[f"rx_{k}"] = c.get(f"rx_{k}", 0) + rx.get(k, 0)
    return c


def delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def ping_min_ms(count=5):
    """Minimum round trip to the remote end (ms)."""
    out = sh(["ping", "-c", str(count), "-i", "0.2", "-W", "10", dm.REMOTE_V4], timeout=120)
    m = re.search(r"= ([\d.]+)/", out)
    if not m:
        raise Fail(f"no rtt in ping's output: {out[-200:]}")
    return float(m.group(1))


def carrier(dev, ns=None):
    return sh(["cat", f"/sys/class/net/{dev}/carrier"], ns=ns, check=False).strip()


class Flows:
    """A plain TCP transfer and a devmem RX flow, running at once. The
    devmem flow is received by ncdevmem -v 7, or with reassemble by
    devmem_e2e.devmem_recv_all, which also takes payload that arrives in
    host memory (SCM_DEVMEM_LINEAR) and checks the whole stream's SHA-256."""

    def __init__(self, port, reassemble=False):
        self.result = {}
        self.q = dm.devmem_queue()
        self.nc = self.rx = self.srv = self.bind = self.buf = self.nic = None
        try:
            if reassemble:
                self.nic = dm.NicConfig(self.q)
                self.buf = dm.Udmabuf(16 << 20)
                self.bind = dm.Binding(self.buf, [self.q])
                self.nic.steer(port, self.q, src_port=port)
                self.srv = socket.create_server((dm.LOCAL_V4, port))
                self.srv.settimeout(120)
                self.rx = threading.Thread(target=self._devmem, daemon=True)
                self.rx.start()
            else:
                self.nc = dm.Ncdevmem(port, self.q)
        except BaseException:
            self.close()
            raise
        self.sender = dm.remote_send(port, DEVMEM_BYTES, src_port=port)
        self.plain = threading.Thread(target=self._plain, args=(port + 1,), daemon=True)
        self.plain.start()

    def _plain(self, port):
        try:
            self.result["plain"] = suite.transfer(PLAIN_BYTES, port)
        except Exception as e:
            self.result["plain_err"] = str(e)

    def _devmem(self):
        try:
            conn, _ = self.srv.accept()
            conn.settimeout(FLOW_DEADLINE)
            try:
                self.result["devmem"] = dm.devmem_recv_all(conn, self.buf, self.bind.id)
            finally:
                conn.close()
        except Exception as e:
            self.result["devmem_err"] = str(e)

    def close(self):
        if self.nc:
            self.nc.kill()
        for x in (self.srv, self.bind, self.buf):
            if x:
                x.close()
        if self.nic:
            self.nic.restore()

    def finish(self):
        """Both flows' outcome; Fail if one is incomplete, corrupt or hung."""
        t0 = time.monotonic()
        left = lambda: max(10, FLOW_DEADLINE - (time.monotonic() - t0))  # noqa: E731
        try:
            sent = dm.finish(self.sender, "devmem sender", timeout=FLOW_DEADLINE)
            if self.nc:
                got, _ = self.nc.wait(timeout=left())
                if got != DEVMEM_BYTES or sent != dm.pattern_sha(DEVMEM_BYTES):
                    raise Fail(f"devmem flow: ncdevmem validated {got} of {DEVMEM_BYTES} bytes "
                               f"(sender: {sent})")
                devmem = f"devmem {got} bytes validated by ncdevmem -v 7 on queue {self.q}"
            else:
                self.rx.join(timeout=left())
                if self.rx.is_alive():
                    raise Fail(f"devmem receiver hung: not done within {FLOW_DEADLINE}s")
                if "devmem" not in self.result:
                    raise Fail(f"devmem receiver: {self.result.get('devmem_err')}")
                got, in_dmabuf, linear = self.result["devmem"]
                if got != sent:
                    raise Fail(f"devmem flow: sent {sent}, reassembled {got}")
                devmem = (f"devmem {DEVMEM_BYTES} bytes SHA-256 equal on queue {self.q}: "
                          f"{in_dmabuf} in the dma-buf, {linear} in host memory")
                self.result["linear"] = linear
        finally:
            self.close()
        self.plain.join(timeout=left())
        if self.plain.is_alive():
            raise Fail(f"plain transfer hung: not done within {FLOW_DEADLINE}s")
        if "plain" not in self.result:
            raise Fail(f"plain transfer: {self.result.get('plain_err')}")
        return f"plain {PLAIN_BYTES} bytes SHA-256 equal, {devmem}"


PORT = [8200]


def flows(**kw):
    PORT[0] += 2
    return Flows(PORT[0], **kw)


# ---- the faults -----------------------------------------------------------------
# Each: set, flows (on), clear, check. `on` returns what to check after.

def while_on(kind, measure=None, **kw):
    """Flows that must complete while the fault is on."""
    ask(f"set-{kind}")
    try:
        before = counters()
        extra = measure() if measure else None
        f = flows(**kw)
        done = f.finish()
        after = counters()
    finally:
        host = ask(f"clear-{kind}")
    d = delta(before, after)
    log(f"{kind}: {done}; host: {host}; guest counters moved: {d}")
    return d, (extra if measure else f.result)


def completed(kind, f, before, host, when=""):
    """Waits for the flows to complete intact; logs and returns how the
    guest's counters moved since `before`."""
    done = f.finish()
    d = delta(before, counters())
    log(f"{kind}: {done}{when}; host: {host}; guest counters moved: {d}")
    return d


def outage(kind, observe=None, recover=None):
    """Flows started while the fault is on, which cannot progress until it
    is cleared (the host clears it once traffic has met it) and, with
    recover, the guest has done that; they must then complete."""
    ask(f"set-{kind}")
    try:
        before = counters()
        seen = observe() if observe else None
        f = flows()
    finally:
        host = ask(f"clear-{kind}", timeout=150)
    if recover:
        try:
            recover()
        except BaseException:
            f.close()
            raise
    return completed(kind, f, before, host, " after it was cleared"), seen


def expect(cond, what, d):
    if not cond:
        raise Fail(f"{what}; guest counters moved: {d}")


def test_rx_drop():
    d, _ = while_on("rx-drop")
    expect(d.get("TcpRetransSegs", 0) > 0, "no TCP retransmits for the dropped packets", d)


def test_rx_hold():
    d, _ = outage("rx-hold")
    # The held buffers come back with used length 0: shorter than the
    # virtio-net header, which virtio_net counts as a length error.
    expect(d.get("rx_length_errors", 0) > 0,
           "no rx length errors for the buffers returned with length 0", d)


def test_rx_delay():
    base = ping_min_ms()
    d, rtt = while_on("rx-delay", ping_min_ms)
    log(f"rx-delay: ping min rtt {base:.2f} ms before, {rtt:.2f} ms with the fault")
    # 10 ms each way (request and reply are both received by a NIC).
    expect(rtt >= 20, f"ping min rtt {rtt:.2f} ms with 10 ms receive delay on both NICs", d)


def test_rx_batch():
    base = ping_min_ms()
    d, rtt = while_on("rx-batch", ping_min_ms)
    log(f"rx-batch: ping min rtt {base:.2f} ms before, {rtt:.2f} ms with the fault")
    # A lone packet waits for the batch timer (20 ms) at each end.
    expect(rtt >= 20, f"ping min rtt {rtt:.2f} ms with lone packets published after 20 ms", d)


def test_tx_reorder():
    while_on("tx-reorder")
    log("tx-reorder: virtio_net completes transmit buffers by their token, so out-of-order "
        "completions have no guest-visible effect beyond intact data")


def test_rx_short():
    d, _ = while_on("rx-short")
    expect(d.get("rx_length_errors", 0) > 0,
           "no rx length errors for used lengths shorter than the virtio-net header", d)
    expect(d.get("TcpRetransSegs", 0) > 0, "no TCP retransmits for the lost packets", d)


def test_rx_bad_csum():
    d, _ = while_on("rx-bad-csum")
    expect(d.get("TcpInCsumErrors", 0) > 0, "no TCP checksum errors (InCsumErrors)", d)


def test_rx_no_split():
    # An unsplit packet on the devmem queue lands over the header buffer
    # (RAM) and the payload buffers: its first payload bytes reach the
    # socket as host memory (SCM_DEVMEM_LINEAR), which ncdevmem -v 7 would
    # refuse; the reassembling receiver takes them and checks the stream.
    d, res = while_on("rx-no-split", reassemble=True)
    expect(res.get("linear", 0) > 0,
           "no devmem payload arrived in host memory although packets came unsplit", d)


def bounce_links():
    """Down and up on both NICs: the driver restarts its queues and polls
    each once, as after an interrupt."""
    for ns, dev in ((None, dm.NETIF), ("remote", dm.REMOTE_IF)):
        sh(["ip", "link", "set", dev, "down"], ns=ns)
        sh(["ip", "link", "set", dev, "up"], ns=ns)
    wait_for("carrier up on both NICs", lambda: carrier(dm.NETIF) == "1" and
             carrier(dm.REMOTE_IF, "remote") == "1", 60)


def test_irq_suppress():
    # With EVENT_IDX a skipped interrupt is not sent again: the queue waits
    # until the driver polls it for another reason. Clearing the fault is
    # not enough; the links are bounced (queues restarted and polled).
    outage("irq-suppress", recover=bounce_links)
    log("irq-suppress: skipped interrupts stall the driver's queues until they are polled "
        "again (here: link down/up after the fault was cleared); the flows then completed intact")


def test_irq_duplicate():
    while_on("irq-duplicate")
    log("irq-duplicate: spurious interrupts find no work; no guest-visible counter, "
        "the flows completed intact")


def during(kind, observe):
    """Flows under way when the fault is set; the guest has the host clear
    it once it has seen its effect (observe); they must then complete."""
    f = flows()
    try:
        start = dm.link_counters()["rx_bytes"]
        wait_for("the flows under way",
                 lambda: dm.link_counters()["rx_bytes"] - start > 256 << 10, 120)
        before = counters()
        ask(f"set-{kind}")
        try:
            seen = observe()
        finally:
            host = ask(f"clear-{kind}")
    except BaseException:
        f.close()
        raise
    return completed(kind, f, before, host), seen


def test_link_down():
    def observe():
        wait_for("carrier down on both NICs", lambda: carrier(dm.NETIF) == "0" and
                 carrier(dm.REMOTE_IF, "remote") == "0", 30)
        return "down"
    # Set mid-flow: a connection attempted while the carrier is down fails
    # at once (no neighbour), established ones wait and retransmit.
    during("link-down", observe)
    wait_for("carrier up on both NICs", lambda: carrier(dm.NETIF) == "1" and
             carrier(dm.REMOTE_IF, "remote") == "1", 30)
    log("link-down: both drivers saw the carrier go (config-change interrupt) and come back; "
        "the flows set up before it completed intact")


def test_needs_reset():
    """Set on the guest's NIC only (nic0): the device signals a vring
    error, QEMU sets DEVICE_NEEDS_RESET and raises a config interrupt, and
    virtio_net resets the device and restores its settings. A plain TCP
    transfer under way at the reset must complete, and a devmem receiver
    set up before it (ncdevmem: dma-buf binding, header split, flow rule)
    must get its whole stream into the dma-buf after it, which it can only
    if the driver brought all three back."""
    PORT[0] += 2
    port = PORT[0]
    q = dm.devmem_queue()
    nc = dm.Ncdevmem(port, q)
    plain = {}

    def run_plain():
        try:
            plain["ok"] = suite.transfer(4 * PLAIN_BYTES, port + 1)
        except Exception as e:
            plain["err"] = str(e)
    try:
        since = dm.dmesg_len()
        before = counters()
        start = dm.link_counters(dm.REMOTE_IF, "remote")["rx_bytes"]
        mover = threading.Thread(target=run_plain, daemon=True)
        mover.start()
        wait_for("the plain transfer under way", lambda: dm.link_counters(
            dm.REMOTE_IF, "remote")["rx_bytes"] - start > 256 << 10, 120)
        ask("set-needs-reset")
        said = []

        def reset_finished():
            said[:] = [ln.strip() for ln in sh(["dmesg"]).splitlines()[since:]
                       if f"{dm.NETIF}: device" in ln]
            return any("device reset done" in ln or "device reset failed" in ln for ln in said)
        try:
            wait_for("virtio_net resetting the device", reset_finished, 120)
        finally:
            host = ask("clear-needs-reset")
        if not any("device needs a reset" in ln for ln in said) or \
                any("device reset failed" in ln for ln in said):
            raise Fail(f"virtio_net did not reset the device cleanly: {said}")
        wait_for("carrier up after the reset", lambda: carrier(dm.NETIF) == "1", 60)
        was_moving = "ok" not in plain
        sender = dm.remote_send(port, DEVMEM_BYTES, src_port=port)
        sent = dm.finish(sender, "devmem sender", timeout=FLOW_DEADLINE)
        got, _ = nc.wait(timeout=FLOW_DEADLINE)
        if got != DEVMEM_BYTES or sent != dm.pattern_sha(DEVMEM_BYTES):
            raise Fail(f"devmem stream after the reset: ncdevmem validated {got} of "
                       f"{DEVMEM_BYTES} bytes (sender: {sent})")
    finally:
        nc.kill()
    mover.join(timeout=FLOW_DEADLINE)
    if mover.is_alive() or "ok" not in plain:
        raise Fail(f"plain transfer across the reset: {plain.get('err', 'hung')}")
    d = delta(before, counters())
    back = {k: v for k, v in d.items() if v < 0}
    if back:
        raise Fail(f"interface counters went back across the device reset: {back}")
    log(f"needs-reset: kernel: {said}; host: {host}")
    log(f"needs-reset: plain {4 * PLAIN_BYTES} bytes SHA-256 equal "
        f"({'under way at' if was_moving else 'done before'} the reset); devmem {got} bytes "
        f"validated by ncdevmem -v 7 on queue {q}, bound before the reset and sent after it; "
        f"guest counters moved: {d}")


TESTS = [test_rx_drop, test_rx_hold, test_rx_delay, test_rx_batch, test_tx_reorder,
         test_rx_short, test_rx_bad_csum, test_rx_no_split, test_irq_suppress,
         test_irq_duplicate, test_link_down, test_needs_reset]


def main(selected):
    sh(["ethtool", "-L", dm.NETIF, "combined", str(dm.max_channels())])
    tests = [t for t in TESTS if not selected or t.__name__[5:] in selected]
    return dm.run_cases(tests, "toolkit_fault_")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
