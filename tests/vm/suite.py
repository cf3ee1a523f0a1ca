#!/usr/bin/env python3
"""End-to-end tests run inside the lab guest over the emulated NICs.

Expects lab-env.sh's layout: $NETIF in the root namespace, eth-remote in
namespace "remote", joined by vhost-nic's wire. Prints KTAP. Names given on
the command line select tests. Every wait polls a condition with a
deadline; nothing sleeps and hopes.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from labutil import Fail, sh, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
NETTOOL = os.path.join(HERE, "nettool.py")
NETIF = os.environ.get("NETIF", "eth0")
REMOTE_IF = "eth-remote"
LOCAL_V4, REMOTE_V4 = os.environ["LOCAL_V4"], os.environ["REMOTE_V4"]
LOCAL_V6, REMOTE_V6 = os.environ["LOCAL_V6"], os.environ["REMOTE_V6"]
TRANSFER = int(os.environ.get("LAB_TRANSFER_BYTES", str(1 << 30)))
# The lab's tools (guest-tools/), mounted by init.sh, first on PATH.
LAB_TOOLS_BIN = "/run/lab-tools/bin"


def read(path):
    with open(path) as f:
        return f.read().strip()


def listening(pid, port):
    """Whether the network namespace of process pid has a TCP socket
    listening on port (state 0A in /proc/net/tcp and tcp6)."""
    needle = f":{port:04X} "
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if len(fields) > 3 and fields[1].endswith(needle.strip()) and fields[3] == "0A":
                        return True
        except OSError:
            return False
    return False


def transfer(nbytes, port, host=REMOTE_V4, seed=1):
    """Sends nbytes to the remote namespace; checks count and SHA-256."""
    out = f"/tmp/recv-{port}.out"
    if os.path.exists(out):
        os.unlink(out)
    rx = subprocess.Popen(["ip", "netns", "exec", "remote", "python3", NETTOOL, "recv", str(port), out])
    try:
        # ip netns exec execs the receiver, so its /proc/PID/net is the
        # remote namespace's. Many receivers starting at once under TCG on
        # a loaded host can take a while: the bound is generous.
        wait_for(f"listener on port {port}",
                 lambda: listening(rx.pid, port) or rx.poll() is not None,
                 timeout=180.0)
        if rx.poll() is not None:
            raise Fail(f"receiver on port {port} exited with {rx.returncode}")
        sent = sh(["python3", NETTOOL, "send", host, str(port), str(nbytes), str(seed)]).strip()
        rx.wait(timeout=600)
    finally:
        if rx.poll() is None:
            rx.kill()
    got = read(out)
    if got != sent:
        raise Fail(f"port {port}: sent {sent}, received {got}")
    return sent


def queue_interrupts(ns, ifname):
    """Interrupts per receive queue of a virtio NIC, from /proc/interrupts
    (vectors named virtioN-input.Q): per-queue packet counts moved out of
    ethtool -S into netlink qstats, but each queue keeps its own vector."""
    dev = os.path.basename(sh(["readlink", "-f", f"/sys/class/net/{ifname}/device"], ns=ns).strip())
    counts = {}
    for line in read("/proc/interrupts").splitlines():
        m = re.search(rf"{re.escape(dev)}-input\.(\d+)\s*$", line)
        if m:
            fields = line.split(":", 1)[1].split()
            counts[int(m.group(1))] = sum(int(f) for f in fields if f.isdigit())
    return counts


def set_channels(n):
    sh(["ethtool", "-L", NETIF, "combined", str(n)])
    sh(["ethtool", "-L", REMOTE_IF, "combined", str(n)], ns="remote")


def max_channels():
    out = sh(["ethtool", "-l", NETIF])
    m = re.search(r"Pre-set maximums:.*?Combined:\s*(\d+)", out, re.S)
    return int(m.group(1)) if m else 1


# ---- tests -----------------------------------------------------------------

def test_links_up():
    for ns, ifname in ((None, NETIF), ("remote", REMOTE_IF)):
        drv = sh(["readlink", "-f", f"/sys/class/net/{ifname}/device/driver"], ns=ns).strip()
        if not drv.endswith("virtio_net"):
            raise Fail(f"{ifname} is driven by {drv}, not virtio_net")
        wait_for(f"{ifname} carrier",
                 lambda: sh(["cat", f"/sys/class/net/{ifname}/operstate"], ns=ns).strip() == "up")


def test_lab_ethtool():
    """ethtool is the lab's (Debian 12's 6.1 is too old for the 7.3
    kselftests), in both namespaces, and speaks JSON for -g."""
    want = os.path.join(LAB_TOOLS_BIN, "ethtool")
    if shutil.which("ethtool") != want:
        raise Fail(f"ethtool on PATH is {shutil.which('ethtool')}, not {want} (PATH={os.environ.get('PATH')})")
    for ns in (None, "remote"):
        out = sh(["ethtool", "--version"], ns=ns).strip()
        m = re.fullmatch(r"ethtool version (\d+)\.(\d+)(\.\d+)?", out)
        if not m or (int(m.group(1)), int(m.group(2))) < (6, 11):
            raise Fail(f"`ethtool --version` in namespace {ns or 'root'}: {out!r}, want 6.11 or newer")
    print(f"# {out} ({want})", flush=True)
    rings = json.loads(sh(["ethtool", "--json", "-g", NETIF]))
    if not rings or rings[0].get("ifname") != NETIF or "rx" not in rings[0]:
        raise Fail(f"`ethtool --json -g {NETIF}` gave {rings}")


def test_ping_v4():
    sh(["ping", "-c", "3", "-W", "10", REMOTE_V4])


def test_ping_v6():
    wait_for("IPv6 reachability", lambda: subprocess.run(
        ["ping", "-6", "-c", "1", "-W", "2", REMOTE_V6], capture_output=True).returncode == 0, 60)
    sh(["ping", "-6", "-c", "3", "-W", "10", REMOTE_V6])


def test_tcp_transfer_checksum():
    transfer(TRANSFER, 5001)


def parallel_transfers(count, nbytes, base_port):
    """count checksummed transfers at once, one TCP flow each."""
    threads, errors = [], []
    for i in range(count):
        def run(port=base_port + i):
            try:
                transfer(nbytes, port)
            except Exception as e:  # reported below
                errors.append(str(e))
        t = threading.Thread(target=run)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    if errors:
        raise Fail("; ".join(errors))


def test_multiqueue_spread():
    n = max_channels()
    if n < 2:
        raise Fail(f"device offers {n} channel(s); the lab runs the NICs with several queue pairs")
    set_channels(n)
    before = queue_interrupts("remote", REMOTE_IF)
    # A flow's queue follows from its hash, and its source port is random:
    # 4n flows leave some queue without one in about 1 run in 25 (n = 4).
    # Rounds of them go on until every queue has had traffic (at most 4:
    # then a miss by chance is below 1 in 10^7).
    for rnd in range(4):
        parallel_transfers(4 * n, 4 << 20, 6001 + rnd * 4 * n)
        after = queue_interrupts("remote", REMOTE_IF)
        idle = [q for q in range(n) if after.get(q, 0) <= before.get(q, 0)]
        if not idle:
            return
    raise Fail(f"receive queues {idle} of {n} raised no interrupt in {4 * 4 * n} flows: "
               f"before {before}, after {after}")


def test_mtu_9000():
    try:
        sh(["ip", "link", "set", NETIF, "mtu", "9000"])
        sh(["ip", "link", "set", REMOTE_IF, "mtu", "9000"], ns="remote")
        sh(["ping", "-M", "do", "-s", "8972", "-c", "3", "-W", "10", REMOTE_V4])
        transfer(64 << 20, 5002)
    finally:
        sh(["ip", "link", "set", NETIF, "mtu", "1500"], check=False)
        sh(["ip", "link", "set", REMOTE_IF, "mtu", "1500"], ns="remote", check=False)


def test_channels_change_under_traffic():
    n = max_channels()
    result = {}

    def run():
        try:
            result["ok"] = transfer(256 << 20, 5003, seed=7)
        except Exception as e:
            result["err"] = str(e)
    t = threading.Thread(target=run)
    t.start()
    for c in [1, n, max(1, n // 2), n]:
        wait_for("traffic", lambda: t.is_alive() or result, 60)
        sh(["ethtool", "-L", NETIF, "combined", str(c)])
    t.join(timeout=900)
    if "err" in result or "ok" not in result:
        raise Fail(result.get("err", "transfer did not finish"))


def test_parallel_transfers():
    """Eight flows at once with the channel counts as they are; every one
    stalls if the device steers it to a queue the driver does not use."""
    parallel_transfers(8, 4 << 20, 6101)


TESTS = [
    test_links_up,
    test_lab_ethtool,
    test_ping_v4,
    test_ping_v6,
    test_tcp_transfer_checksum,
    test_multiqueue_spread,
    test_mtu_9000,
    test_channels_change_under_traffic,
]


# Run only when named.
EXTRA_TESTS = [test_parallel_transfers]


def main(selected):
    prefix = os.environ.get("LAB_TEST_PREFIX", "")
    if selected:
        tests = [t for t in TESTS + EXTRA_TESTS if t.__name__[5:] in selected]
    else:
        tests = TESTS
    print("TAP version 13", flush=True)
    print(f"1..{len(tests)}", flush=True)
    failed = 0
    for i, t in enumerate(tests, 1):
        name = prefix + t.__name__[5:]
        start = time.monotonic()
        try:
            t()
            print(f"ok {i} {name} # {time.monotonic() - start:.1f}s", flush=True)
        except Exception as e:
            failed += 1
            print(f"# {name}: {e}", flush=True)
            print(f"not ok {i} {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
