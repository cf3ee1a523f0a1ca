#!/usr/bin/env python3
"""Device memory TCP (devmem RX) end to end in the lab guest.

The guest's virtio_net (with guest-kernel-patches/) binds dma-bufs to
receive queues of $NETIF; the remote namespace sends. Needs the installed
kselftests at $LAB_KSELFTEST (default /mnt/kselftest): ncdevmem and the YNL
library with its netlink specs. Prints KTAP like suite.py; names on the
command line select cases. Every wait polls a condition with a deadline.

Also the sender for the receivers here and the devmem figures:
  devmem_e2e.py send-pattern HOST PORT BYTES [SRC_PORT]
sends BYTES of the pattern `ncdevmem -v 7` validates (1..6, '\\n').
"""
import fcntl
import hashlib
import json
import mmap
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time

from labutil import Fail, log, sh, trace, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
NETTOOL = os.path.join(HERE, "nettool.py")
KSFT = os.environ.get("LAB_KSELFTEST", "/mnt/kselftest")
NCDEVMEM = os.path.join(KSFT, "drivers/net/hw/ncdevmem")
XDP_OBJ = os.path.join(KSFT, "net/lib/xdp_dummy.bpf.o")
NETIF = os.environ.get("NETIF", "eth0")
REMOTE_IF = "eth-remote"
LOCAL_V4 = os.environ.get("LOCAL_V4", "192.0.2.1")
REMOTE_V4 = os.environ.get("REMOTE_V4", "192.0.2.2")
# The bulk case (about 30 s under TCG on 2 cores).
BULK = int(os.environ.get("LAB_DEVMEM_BULK_BYTES", str(1 << 30)))
BIND_CYCLES = int(os.environ.get("LAB_DEVMEM_BIND_CYCLES", "100"))
# The last queue takes the devmem flows; RSS spreads the rest over the others.
PATTERN = bytes([1, 2, 3, 4, 5, 6, 10])

MSG_SOCK_DEVMEM = 0x2000000
SCM_DEVMEM_LINEAR, SCM_DEVMEM_DMABUF, SO_DEVMEM_DONTNEED = 78, 79, 80
UDMABUF_CREATE = 0x40187542  # _IOW('u', 0x42, struct udmabuf_create)
MFD_HUGETLB, MFD_HUGE_2MB = 0x4, 21 << 26


# ---- netlink (the kselftests' YNL library and specs) -------------------------

def ynl(family):
    if KSFT not in sys.path:
        sys.path.append(KSFT)
    from net.lib.ynl.pyynl.lib import YnlFamily  # noqa: E402
    return YnlFamily(os.path.join(KSFT, f"net/lib/specs/{family}.yaml"), schema="")


def nl_error():
    from net.lib.ynl.pyynl.lib import NlError  # noqa: E402
    return NlError


def ifindex(name=NETIF):
    return socket.if_nametoindex(name)


class Udmabuf:
    """A udmabuf over a sealed memfd, as ncdevmem's provider makes it."""

    def __init__(self, size, huge=False):
        flags = os.MFD_ALLOW_SEALING | (MFD_HUGETLB | MFD_HUGE_2MB if huge else 0)
        self.memfd = os.memfd_create("devmem-e2e", flags)
        fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        os.ftruncate(self.memfd, size)
        dev = os.open("/dev/udmabuf", os.O_RDONLY)
        try:
            # A mutable argument, so ioctl() returns the call's result (the fd).
            arg = bytearray(struct.pack("IIQQ", self.memfd, 0, 0, size))
            self.fd = fcntl.ioctl(dev, UDMABUF_CREATE, arg, True)
        finally:
            os.close(dev)
        self.size = size
        self.map = None

    def view(self):
        if self.map is None:
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        return self.map

    def close(self):
        if self.map is not None:
            self.map.close()
        os.close(self.fd)
        os.close(self.memfd)


class Binding:
    """bind-rx of a dma-buf to receive queues; closing the netlink socket unbinds."""

    def __init__(self, buf, queues, rx_page_size=None, dev=NETIF):
        self.nl = ynl("netdev")
        req = {"ifindex": ifindex(dev), "fd": buf.fd,
               "queues": [{"id": q, "type": "rx"} for q in queues]}
        if rx_page_size is not None:
            req["rx-page-size"] = rx_page_size
        try:
            self.id = self.nl.bind_rx(req)["id"]
        except BaseException:
            self.nl.close()
            raise

    def close(self):
        self.nl.close()


def bind_error(buf, queues, **kw):
    """Binds, expecting the kernel to refuse: returns (errno, extack)."""
    try:
        Binding(buf, queues, **kw).close()
    except nl_error() as e:
        return e.error, dict(e.nl_msg.extack or {})
    raise Fail(f"bind of queues {queues} {kw} succeeded; the kernel should refuse it")


def page_pools(dev=NETIF):
    nl = ynl("netdev")
    try:
        return [p for p in nl.page_pool_get({}, dump=True) if p.get("ifindex") == ifindex(dev)]
    finally:
        nl.close()


def queue_dmabufs(dev=NETIF):
    nl = ynl("netdev")
    try:
        qs = nl.queue_get({"ifindex": ifindex(dev)}, dump=True)
    finally:
        nl.close()
    return {q["id"]: q["dmabuf"] for q in qs if q.get("type") == "rx" and "dmabuf" in q}


def header_split(mode):
    """tcp-data-split over ethtool netlink ("enabled", "disabled",
    "unknown" = driver default); the host's ethtool may predate -G
    tcp-data-split."""
    nl = ynl("ethtool")
    try:
        nl.rings_set({"header": {"dev-index": ifindex()}, "tcp-data-split": mode})
    finally:
        nl.close()


def meminfo():
    """/proc/meminfo in bytes, after dropping clean caches (the 9p root's
    page cache comes and goes with what the guest happens to read)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def link_counters(dev=NETIF, ns=None):
    s = json.loads(sh(["ip", "-j", "-s", "link", "show", dev], ns=ns))[0]["stats64"]
    return {f"rx_{k}": s["rx"][k] for k in ("errors", "dropped", "over_errors", "missed")
            if k in s["rx"]} | {"rx_packets": s["rx"]["packets"], "rx_bytes": s["rx"]["bytes"]}


def cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), sum(v) - v[3] - v[4]  # total, busy (not idle or iowait)


def channels():
    out = sh(["ethtool", "-l", NETIF])
    return int(re.findall(r"Combined:\s*(\d+)", out)[-1])


def kernel_log_problems(since):
    text = sh(["dmesg"])
    lines = text.splitlines()[since:]
    bad = [ln for ln in lines if re.search(r"WARNING:|BUG[: ]|Oops|refcount_t|page_pool.*stalled|"
                                           r"can't destroy genpool|Call Trace", ln)]
    return bad


def dmesg_len():
    return len(sh(["dmesg"]).splitlines())


def port_listening(port, ns=None):
    return f":{port} " in sh(["ss", "-Hltn"], ns=ns, check=False)


# ---- NIC set-up ---------------------------------------------------------------

class NicConfig:
    """Header split on, RSS over queues [0, rss_queues), ntuple rules;
    everything undone (and checked undone) by restore()."""

    def __init__(self, rss_queues):
        self.rules = []
        header_split("enabled")
        sh(["ethtool", "-X", NETIF, "equal", str(rss_queues)])

    def steer(self, port, queue, src_port=None):
        """tcp4 rule for LOCAL_V4:port (from REMOTE_V4:src_port) to queue."""
        src = ["src-ip", REMOTE_V4, "src-port", str(src_port)] if src_port else []
        out = sh(["ethtool", "-N", NETIF, "flow-type", "tcp4", *src, "dst-ip", LOCAL_V4,
                  "dst-port", str(port), "action", str(queue)])
        m = re.search(r"ID (\d+)", out)
        if not m:
            raise Fail(f"ethtool -N printed no rule ID: {out!r}")
        self.rules.append(int(m.group(1)))
        return self.rules[-1]

    def delete(self, rule):
        sh(["ethtool", "-N", NETIF, "delete", str(rule)])
        self.rules.remove(rule)

    def restore(self):
        for r in list(self.rules):
            sh(["ethtool", "-N", NETIF, "delete", str(r)], check=False)
        self.rules = []
        sh(["ethtool", "-X", NETIF, "default"], check=False)
        header_split("unknown")


# ---- traffic --------------------------------------------------------------------

def send_pattern(host, port, nbytes, src_port=0):
    """Sends nbytes of PATTERN (what `ncdevmem -v 7` expects); prints
    "<bytes> <sha256>"."""
    nbytes, block = int(nbytes), PATTERN * ((1 << 20) // len(PATTERN))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", int(src_port)))
    sock.settimeout(600)
    sock.connect((host, int(port)))
    h, left = hashlib.sha256(), nbytes
    while left:
        chunk = block if left >= len(block) else block[:left]
        sock.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    sock.close()
    print(f"{nbytes} {h.hexdigest()}", flush=True)


def pattern_sha(nbytes):
    block, h, left = PATTERN * ((1 << 20) // len(PATTERN)), hashlib.sha256(), nbytes
    while left:
        h.update(block[:min(left, len(block))])
        left -= min(left, len(block))
    return f"{nbytes} {h.hexdigest()}"


def remote_send(port, nbytes, src_port=0):
    """Pattern sender in the remote namespace (a Popen; stdout: bytes + hash)."""
    return subprocess.Popen(["ip", "netns", "exec", "remote", "python3", os.path.abspath(__file__),
                             "send-pattern", LOCAL_V4, str(port), str(nbytes), str(src_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, what, timeout=900):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise Fail(f"{what} did not finish within {timeout}s: {err.strip()[-300:]}")
    if proc.returncode != 0:
        raise Fail(f"{what} exited {proc.returncode}: {(err or out).strip()[-600:]}")
    return out.strip()


def plain_transfer(port, nbytes, seed=3):
    """remote -> local TCP transfer into host memory, SHA-256 checked."""
    out = f"/tmp/devmem-plain-{port}.out"
    if os.path.exists(out):
        os.unlink(out)
    rx = subprocess.Popen(["python3", NETTOOL, "recv", str(port), out])
    try:
        wait_for(f"plain listener on {port}", lambda: port_listening(port))
        sent = sh(["python3", NETTOOL, "send", LOCAL_V4, str(port), str(nbytes), str(seed)],
                  ns="remote").strip()
        rx.wait(timeout=600)
    finally:
        if rx.poll() is None:
            rx.kill()
    with open(out) as f:
        got = f.read().strip()
    if got != sent:
        raise Fail(f"plain transfer on port {port}: sent {sent}, received {got}")
    return sent


class Ncdevmem:
    """ncdevmem -l (RX) with -v 7; its per-frag log is reduced to its tail
    (kept whole in frag_log if given). With config=False (-n) the caller
    sets up header split, RSS and rules. provider: its -m (udmabuf,
    fake-gpu)."""

    def __init__(self, port, queue, config=True, validate=True, buffered=True,
                 provider=None, frag_log=None):
        args = [NCDEVMEM, "-l", "-f", NETIF, "-s", LOCAL_V4, "-p", str(port),
                "-t", str(queue), "-q", "1"]
        if provider:
            args += ["-m", provider]
        if config:
            args += ["-c", REMOTE_V4]
        else:
            args += ["-n"]
        if validate:
            args += ["-v", "7"]
        # stdio buffering for its two lines per frag (stderr is unbuffered).
        pre = "stdbuf -o1M -e1M " if buffered else ""
        keep = f"tee {frag_log} | " if frag_log else ""
        script = f"{pre}{' '.join(args)} 2>&1 >/dev/null | {keep}tail -n 25; exit ${{PIPESTATUS[0]}}"
        self.port = port
        trace(script)
        # A process group of its own: kill() ends ncdevmem and tail too.
        self.proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        wait_for(f"ncdevmem listening on {port}",
                 lambda: port_listening(port) or self.proc.poll() is not None, 120)
        if self.proc.poll() is not None:
            raise Fail(f"ncdevmem exited {self.proc.returncode} before listening: "
                       f"{self.proc.stdout.read().strip()[-800:]}")

    def pid(self):
        return self.proc.pid

    def wait(self, timeout=900):
        """Exit status 0 and the bytes it received into the dma-buf."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise Fail(f"ncdevmem on {self.port} did not finish within {timeout}s: {out[-600:]}")
        totals = re.findall(r"total_received=(\d+)", out)
        if self.proc.returncode != 0:
            raise Fail(f"ncdevmem on port {self.port} exited {self.proc.returncode}: {out.strip()[-800:]}")
        return int(totals[-1]) if totals else 0, out

    def kill(self):
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        try:
            self.proc.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass


def devmem_recv_all(sock, buf, binding_id):
    """Receives a whole stream with MSG_SOCK_DEVMEM, reassembling dma-buf
    frags and linear (host memory) parts in order. Returns the bytes, and
    how many arrived in the dma-buf and how many as linear data."""
    view, h = buf.view(), hashlib.sha256()
    total = in_dmabuf = linear = 0
    cmsg_space = socket.CMSG_SPACE(24) * 256
    while True:
        data, anc, flags, _ = sock.recvmsg(1 << 16, cmsg_space, MSG_SOCK_DEVMEM)
        if not data and not anc:
            break
        pos, tokens, devmem = 0, [], False
        for level, ctype, cdata in anc:
            if level != socket.SOL_SOCKET or ctype not in (SCM_DEVMEM_LINEAR, SCM_DEVMEM_DMABUF):
                continue
            devmem = True
            off, size, token, dmabuf_id, _ = struct.unpack("QIIII", cdata[:24])
            if ctype == SCM_DEVMEM_LINEAR:
                h.update(data[pos:pos + size])
                pos += size
                linear += size
            elif ctype == SCM_DEVMEM_DMABUF:
                if dmabuf_id != binding_id:
                    raise Fail(f"frag from dma-buf {dmabuf_id}, bound {binding_id}")
                h.update(view[off:off + size])
                in_dmabuf += size
                tokens.append(token)
            total += size
        # Readable skbs come without cmsgs, copied as by a plain recv(); with
        # devmem cmsgs the return value counts the frags too, and only the
        # linear parts are in the buffer.
        if not devmem:
            h.update(data)
            linear += len(data)
            total += len(data)
        for i in range(0, len(tokens), 128):
            sock.setsockopt(socket.SOL_SOCKET, SO_DEVMEM_DONTNEED,
                            b"".join(struct.pack("II", t, 1) for t in tokens[i:i + 128]))
    return f"{total} {h.hexdigest()}", in_dmabuf, linear


def devmem_count(conn, binding_id):
    """Receives a devmem stream without reading it; returns the bytes that
    arrived in the dma-buf (linear data is an error)."""
    in_dmabuf = 0
    while True:
        data, anc, _, _ = conn.recvmsg(1 << 16, socket.CMSG_SPACE(24) * 256, MSG_SOCK_DEVMEM)
        if not data and not anc:
            return in_dmabuf
        tokens = []
        for _, ctype, cdata in anc:
            off, size, token, dmabuf_id, _ = struct.unpack("QIIII", cdata[:24])
            if ctype != SCM_DEVMEM_DMABUF or dmabuf_id != binding_id:
                raise Fail(f"a frag not in the bound dma-buf (cmsg {ctype}, dma-buf {dmabuf_id})")
            in_dmabuf += size
            tokens.append(struct.pack("II", token, 1))
        if anc:
            conn.setsockopt(socket.SOL_SOCKET, SO_DEVMEM_DONTNEED, b"".join(tokens))
        elif data:
            raise Fail(f"{len(data)} bytes arrived readable, not in the dma-buf")


def count_rx(provider, queue, port):
    """A devmem receiver that only counts (bench --no-validate): binds a
    64 MiB dma-buf (udmabuf, or fake-GPU VRAM) to queue, accepts one
    connection on port and prints total_received=N, as ncdevmem does."""
    size = 64 << 20
    if provider == "fake-gpu":
        import fake_gpu_e2e
        buf = fake_gpu_e2e.Gpu().alloc(size)
    else:
        buf = Udmabuf(size)
    bind = Binding(buf, [int(queue)])
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((LOCAL_V4, int(port)))
    srv.listen(1)
    conn, _ = srv.accept()
    total = devmem_count(conn, bind.id)
    conn.close()
    bind.close()
    print(f"total_received={total}", flush=True)


# ---- cases -------------------------------------------------------------------------

def devmem_queue():
    return channels() - 1


def test_bind_unbind_under_traffic():
    """BIND_CYCLES bind/unbind cycles of a fresh udmabuf on the last queue
    while checksummed transfers run on the others (RSS); no leaked memory,
    page pools, or receive errors."""
    q = devmem_queue()
    nic = NicConfig(q)
    stop, results, errors = threading.Event(), [], []

    def background():
        port = 7300
        while not stop.is_set():
            try:
                results.append(plain_transfer(port, 16 << 20, seed=port))
            except Exception as e:  # reported below
                errors.append(str(e))
                return
            port += 1
    try:
        # Warm-up: one cycle and one transfer, so one-time allocations are
        # in the baseline.
        buf = Udmabuf(16 << 20)
        Binding(buf, [q]).close()
        buf.close()
        plain_transfer(7299, 4 << 20)
        wait_for("no page pools with pages in flight after warm-up",
                 lambda: not [p for p in page_pools() if "detach-time" in p], 30)
        m0, c0 = meminfo(), link_counters()
        live0 = sorted(p["id"] for p in page_pools())
        t = threading.Thread(target=background)
        t.start()
        wait_for("background transfer", lambda: results or errors or port_listening(7300), 60)
        start = time.monotonic()
        for i in range(BIND_CYCLES):
            buf = Udmabuf(16 << 20)
            b = Binding(buf, [q])
            if i % 10 == 0:
                bound = queue_dmabufs()
                pools = [p for p in page_pools() if p.get("dmabuf") == b.id]
                if bound.get(q) != b.id or not pools:
                    raise Fail(f"cycle {i}: queue {q} dma-buf {bound}, pools of binding {b.id}: {pools}")
            b.close()
            buf.close()
            if errors:
                break
        cycles_s = time.monotonic() - start
        stop.set()
        t.join(timeout=900)
        if errors or not results:
            raise Fail(f"background transfer: {errors or 'none completed'}")
        if queue_dmabufs():
            raise Fail(f"queues still bound after the last unbind: {queue_dmabufs()}")
        # Pools of the unbound bindings go once the stack returns their pages.
        wait_for("no detached page pools with pages in flight",
                 lambda: not [p for p in page_pools() if "detach-time" in p], 60)
        pools = page_pools()
        if any("dmabuf" in p for p in pools):
            raise Fail(f"a dma-buf page pool outlived its binding: {pools}")
        m1, c1 = meminfo(), link_counters()
        live1 = sorted(p["id"] for p in pools)
        free_drop = (m0["MemFree"] - m1["MemFree"]) >> 20
        slab_growth = (m1["Slab"] - m0["Slab"]) >> 20
        log(f"{BIND_CYCLES} bind/unbind cycles in {cycles_s:.1f}s with {len(results)} "
            f"background transfers of 16 MiB; MemFree -{free_drop} MiB, Slab +{slab_growth} MiB; "
            f"page pools {len(live0)} -> {len(live1)}; counters {c0} -> {c1}")
        # 16 MiB pinned per cycle if bindings leaked (1.6 GiB); allow
        # 64 MiB of drift (socket buffers, page cache, per-CPU caches).
        if free_drop > 64 or slab_growth > 16:
            raise Fail(f"memory not back: MemFree dropped {free_drop} MiB, Slab grew {slab_growth} MiB")
        if len(live1) != len(live0):
            raise Fail(f"page pools for {NETIF}: {len(live0)} before, {len(live1)} after: {pools}")
        grown = {k: c1[k] - c0[k] for k in c0 if k not in ("rx_packets", "rx_bytes") and c1[k] != c0[k]}
        if grown:
            raise Fail(f"receive error counters grew: {grown}")
    finally:
        stop.set()
        nic.restore()


def test_bind_while_down():
    """Bound while the interface is down: after `up` the steered flow lands
    in the dma-buf and validates."""
    q, port, nbytes = devmem_queue(), 7401, 4 << 20
    sh(["ip", "link", "set", NETIF, "down"])
    nc = None
    try:
        # Header split, RSS, flow rule and bind all while down; ncdevmem
        # listens only once bound. (queue-get lists no queues while down.)
        nc = Ncdevmem(port, q)
        if sh(["cat", f"/sys/class/net/{NETIF}/operstate"]).strip() != "down":
            raise Fail(f"{NETIF} is not down")
        sh(["ip", "link", "set", NETIF, "up"])
        wait_for(f"{NETIF} up", lambda: sh(["cat", f"/sys/class/net/{NETIF}/operstate"]).strip() == "up")
        bound = queue_dmabufs()
        if q not in bound:
            raise Fail(f"queue {q} shows no dma-buf after up: {bound}")
        pools = [p for p in page_pools() if p.get("dmabuf") == bound[q]]
        if not pools:
            raise Fail(f"no page pool of dma-buf {bound[q]} after up: {page_pools()}")
        wait_for("remote reachable", lambda: subprocess.run(
            ["ip", "netns", "exec", "remote", "ping", "-c", "1", "-W", "1", LOCAL_V4],
            capture_output=True).returncode == 0, 60)
        sent = finish(remote_send(port, nbytes, src_port=port), "sender")
        got, _ = nc.wait()
        if got != nbytes or sent != pattern_sha(nbytes):
            raise Fail(f"ncdevmem received {got} of {nbytes} bytes into the dma-buf (sender: {sent})")
        log(f"bound while down (dma-buf {bound[q]}), up, {got} bytes validated by ncdevmem -v 7")
    finally:
        if nc:
            nc.kill()
        sh(["ip", "link", "set", NETIF, "up"], check=False)


def test_two_queues_two_dmabufs():
    """Two ncdevmem, two bindings on two queues, two flows steered by
    ntuple rules; each validates and sees only its own dma-buf's frags."""
    n = channels()
    qa, qb, nbytes = n - 2, n - 1, 4 << 20
    nic = NicConfig(qa)
    ncs = []
    try:
        ports = {7501: qa, 7502: qb}
        for port, q in ports.items():
            nic.steer(port, q, src_port=port)
            ncs.append(Ncdevmem(port, q, config=False))
        bound = queue_dmabufs()
        if not (qa in bound and qb in bound and bound[qa] != bound[qb]):
            raise Fail(f"want queues {qa} and {qb} bound to two dma-bufs: {bound}")
        senders = [remote_send(port, nbytes, src_port=port) for port in ports]
        for s in senders:
            finish(s, "sender")
        for nc in ncs:
            got, _ = nc.wait()
            if got != nbytes:
                raise Fail(f"ncdevmem on {nc.port} received {got} of {nbytes} bytes into its dma-buf")
        log(f"queues {qa}/{qb} -> dma-bufs {bound[qa]}/{bound[qb]}: {nbytes} bytes each validated")
    finally:
        for nc in ncs:
            nc.kill()
        nic.restore()


def test_unmatched_traffic_stays_readable():
    """During a devmem transfer, a plain transfer to another port of the
    same address completes with the right SHA-256, i.e. it stayed in host
    memory; the devmem flow still validates."""
    q, port, nbytes = devmem_queue(), 7601, 32 << 20
    nc = Ncdevmem(port, q)
    try:
        sender = remote_send(port, nbytes, src_port=port)
        plain = plain_transfer(7602, 16 << 20)
        finish(sender, "devmem sender")
        got, _ = nc.wait()
        if got != nbytes:
            raise Fail(f"ncdevmem received {got} of {nbytes} bytes into the dma-buf")
        log(f"plain flow on 7602 during the devmem flow: {plain.split()[0]} bytes, SHA-256 matches")
    finally:
        nc.kill()


def test_flow_rule_deleted_mid_transfer():
    """The steering rule goes away mid-transfer: the rest of the flow comes
    through RSS queues as host memory (SCM_DEVMEM_LINEAR); the stream still
    arrives whole (SHA-256 over dma-buf frags and linear parts in order),
    nothing hangs, the kernel log stays clean."""
    q, port, nbytes = devmem_queue(), 7701, 64 << 20
    nic = NicConfig(q)
    since = dmesg_len()
    buf = Udmabuf(64 << 20)
    b = Binding(buf, [q])
    srv = socket.create_server((LOCAL_V4, port))
    srv.settimeout(120)
    result = {}
    try:
        rule = nic.steer(port, q, src_port=port)
        sender = remote_send(port, nbytes, src_port=port)
        conn, _ = srv.accept()
        conn.settimeout(120)
        # Delete the rule once part of the flow has landed in the dma-buf.
        before = link_counters()["rx_bytes"]

        def deleter():
            try:
                wait_for("the flow under way", lambda: link_counters()["rx_bytes"] - before > nbytes // 4, 300)
                nic.delete(rule)
                result["deleted_at"] = time.monotonic()
            except Exception as e:
                result["err"] = str(e)
        t = threading.Thread(target=deleter)
        t.start()
        got, in_dmabuf, linear = devmem_recv_all(conn, buf, b.id)
        conn.close()
        t.join(timeout=300)
        sent = finish(sender, "sender")
        if "err" in result:
            raise Fail(result["err"])
        log(f"rule deleted mid-flow: {in_dmabuf} bytes in the dma-buf, {linear} as host memory")
        if got != sent:
            raise Fail(f"sent {sent}, reassembled {got}")
        if in_dmabuf == 0 or linear == 0:
            raise Fail(f"want part of the flow in the dma-buf and part in host memory: "
                       f"{in_dmabuf} and {linear}")
        bad = kernel_log_problems(since)
        if bad:
            raise Fail("kernel log: " + " | ".join(bad[:5]))
    finally:
        srv.close()
        b.close()
        buf.close()
        nic.restore()


def test_bad_input_refused():
    """Bad bind-rx requests get the kernel's errno and extack message, and
    the device keeps working."""
    n = channels()
    q = n - 1
    since = dmesg_len()
    seen = []

    def expect(what, want_errno, want_msg, buf, queues, **kw):
        """want_msg: in the extack message, or (no message) in the extack's
        bad-attribute annotation."""
        err, ext = bind_error(buf, queues, **kw)
        msg = ext.get("msg", "")
        shown = f'"{msg}"' if msg else f"(no message) {ext}"
        seen.append(f"{what}: {errno_name(err)} ({os.strerror(err)}), extack {shown}")
        log(seen[-1])
        if err != want_errno or want_msg not in (msg or str(ext)):
            raise Fail(f"{what}: got {errno_name(err)} {shown}, want {errno_name(want_errno)} \"{want_msg}\"")

    buf = Udmabuf(4 << 20)
    with open("/proc/sys/vm/nr_hugepages") as f:
        hp_before = int(f.read())
    try:
        header_split("enabled")
        sh(["ethtool", "-X", NETIF, "equal", str(q)])
        # The netlink layer checks queue ids against real_num_rx_queues
        # before the core's "rx queue index out of range" (ERANGE) can.
        expect("queue out of range", 22, "bad-attr", buf, [n + 5])
        expect("rx-page-size 8193", 22, "rx-page-size must be a power of 2", buf, [q],
               rx_page_size=8193)
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(hp_before + 2))
        huge = Udmabuf(2 << 20, huge=True)
        try:
            expect("rx-page-size 128 KiB", 34, "rx-page-size must be a power of 2 from 4096 to 65536",
                   huge, [q], rx_page_size=128 << 10)
        finally:
            huge.close()
        # The core's message is longer than extack's 80 characters: it
        # arrives cut (and the kernel logs "truncated extack").
        tiny = Udmabuf(4096)
        try:
            expect("dma-buf (4 KiB) smaller than one 16 KiB buffer", 22, "not aligned to niov size",
                   tiny, [q], rx_page_size=16 << 10)
        finally:
            tiny.close()
        header_split("disabled")
        expect("header split off", 22, "tcp-data-split is disabled", buf, [q])
        # XDP: virtio_net refuses XDP with header split on and header split
        # with XDP attached, so the core's header-split check answers first.
        sh(["ip", "link", "set", "dev", NETIF, "xdp", "obj", XDP_OBJ, "sec", "xdp"], timeout=120)
        try:
            try:
                header_split("enabled")
                refused = None
            except nl_error() as e:
                refused = e
            log(f"header split on with XDP attached: {refused or 'accepted'}")
            if refused is None:
                expect("XDP attached", 17, "XDP program attached", buf, [q])
            else:
                expect("XDP attached (header split refused)", 22, "tcp-data-split is disabled", buf, [q])
        finally:
            sh(["ip", "link", "set", "dev", NETIF, "xdp", "off"], timeout=120)
        if queue_dmabufs():
            raise Fail(f"a refused bind left a queue bound: {queue_dmabufs()}")
    finally:
        buf.close()
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(hp_before))
        sh(["ethtool", "-X", NETIF, "default"], check=False)
        header_split("unknown")
    sh(["ping", "-c", "3", "-W", "10", REMOTE_V4])
    plain_transfer(7801, 8 << 20)
    bad = kernel_log_problems(since)
    if bad:
        raise Fail("kernel log: " + " | ".join(bad[:5]))


def errno_name(e):
    import errno
    return errno.errorcode.get(e, str(e))


def test_bulk_validated():
    """ncdevmem -v 7 receives BULK bytes from the remote end: every byte
    validated, all of them through the dma-buf."""
    q, port = devmem_queue(), 7901
    nc = Ncdevmem(port, q)
    try:
        start = time.monotonic()
        sent = finish(remote_send(port, BULK, src_port=port), "sender", timeout=3600)
        got, _ = nc.wait(timeout=3600)
        secs = time.monotonic() - start
        if got != BULK or sent != pattern_sha(BULK):
            raise Fail(f"ncdevmem received {got} of {BULK} bytes into the dma-buf")
        log(f"{BULK} bytes validated in {secs:.1f}s ({BULK * 8 / secs / 1e6:.0f} Mbit/s)")
    finally:
        nc.kill()


# ---- figures (cargo xtask bench --devmem) ---------------------------------------

def reap(proc):
    """Output, exit status and CPU seconds (user + system, with its waited-for
    children) of a receiver."""
    out = proc.stdout.read() if proc.stdout else ""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return out, proc.returncode, ru.ru_utime + ru.ru_stime


def bench_round(mode, streams, nbytes):
    """streams flows from the remote namespace, each steered by a rule to
    its own queue among the last `streams`; devmem: ncdevmem -v 7 per queue
    (header split on, a dma-buf each); plain: nettool.py recv per flow into
    host memory (SHA-256), header split at the driver's default."""
    n = channels()
    queues = list(range(n - streams, n))
    ports = [7100 + i for i in range(streams)]
    nic = NicConfig(n - streams) if mode.startswith("devmem") else None
    if nic is None:
        sh(["ethtool", "-X", NETIF, "equal", str(n - streams)])
    rules, procs = [], []
    try:
        for port, q in zip(ports, queues):
            if nic:
                nic.steer(port, q, src_port=port)
                provider = "fake-gpu" if mode == "devmem-gpu" else "udmabuf"
                if os.environ.get("LAB_BENCH_VALIDATE", "1") == "1":
                    procs.append(Ncdevmem(port, q, config=False, provider=provider).proc)
                else:
                    procs.append(subprocess.Popen(
                        ["python3", os.path.abspath(__file__), "count-rx", provider, str(q), str(port)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        start_new_session=True))
                    wait_for(f"counting receiver on {port}", lambda p=port: port_listening(p))
            else:
                out = sh(["ethtool", "-N", NETIF, "flow-type", "tcp4", "src-ip", REMOTE_V4,
                          "src-port", str(port), "dst-ip", LOCAL_V4, "dst-port", str(port),
                          "action", str(q)])
                rules.append(re.search(r"ID (\d+)", out).group(1))
                procs.append(subprocess.Popen(["python3", NETTOOL, "recv", str(port),
                                               f"/tmp/bench-{port}.out"], stdout=subprocess.PIPE, text=True))
                wait_for(f"listener on {port}", lambda p=port: port_listening(p))
        t0, (tot0, busy0) = time.monotonic(), cpu_jiffies()
        senders = [remote_send(port, nbytes, src_port=port) for port in ports]
        for snd in senders:
            finish(snd, "sender", timeout=3600)
        rx_cpu = 0.0
        for port, proc in zip(ports, procs):
            out, rc, cpu = reap(proc)
            rx_cpu += cpu
            if rc != 0:
                raise Fail(f"{mode} receiver on {port} exited {rc}: {out.strip()[-600:]}")
            if nic:
                got = int((re.findall(r"total_received=(\d+)", out) or ["0"])[-1])
                ok = got == nbytes
            else:
                with open(f"/tmp/bench-{port}.out") as f:
                    ok = f.read().strip() == pattern_sha(nbytes)
            if not ok:
                raise Fail(f"{mode} receiver on {port}: incomplete or corrupt ({out.strip()[-300:]})")
        secs, (tot1, busy1) = time.monotonic() - t0, cpu_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        print(f"bench mode={mode} streams={streams} bytes={nbytes} secs={secs:.3f} "
              f"guest_cpu={(busy1 - busy0) / hz:.2f} rx_cpu={rx_cpu:.2f} "
              f"guest_cpu_capacity={(tot1 - tot0) / hz:.2f}", flush=True)
    finally:
        for proc in procs:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, 9)  # ncdevmem's group
                except (ProcessLookupError, PermissionError):
                    proc.kill()
        for r in rules:
            sh(["ethtool", "-N", NETIF, "delete", r], check=False)
        if nic:
            nic.restore()
        else:
            sh(["ethtool", "-X", NETIF, "default"], check=False)


def bench(nbytes, rounds, *stream_counts):
    """Alternates the modes of LAB_BENCH_MODES (default "devmem plain";
    devmem-gpu: ncdevmem's fake-GPU provider, dma-bufs of VRAM)."""
    nbytes, rounds = int(nbytes), int(rounds)
    modes = os.environ.get("LAB_BENCH_MODES", "devmem plain").split()
    sh(["ethtool", "-L", NETIF, "combined", str(max_channels())])
    log(f"{os.cpu_count()} guest CPUs; sender: devmem_e2e.py send-pattern in namespace remote; "
        f"devmem: into a udmabuf, devmem-gpu: into fake-GPU VRAM, "
        f"{'ncdevmem -v 7 (every frag read back and checked)' if os.environ.get('LAB_BENCH_VALIDATE', '1') == '1' else 'a receiver that returns the frags unread (devmem_e2e.py count-rx)'}; "
        f"plain: nettool.py recv (SHA-256)")
    for streams in (int(s) for s in stream_counts):
        if streams >= channels():
            log(f"{streams} streams: needs {streams} devmem queues and one more for RSS; "
                f"{NETIF} has {channels()}")
            continue
        for _ in range(rounds):
            for mode in modes:
                bench_round(mode, streams, nbytes)


TESTS = [
    test_bind_unbind_under_traffic,
    test_bind_while_down,
    test_two_queues_two_dmabufs,
    test_unmatched_traffic_stays_readable,
    test_flow_rule_deleted_mid_transfer,
    test_bad_input_refused,
    test_bulk_validated,
]


def max_channels():
    out = sh(["ethtool", "-l", NETIF])
    return int(re.search(r"Pre-set maximums:.*?Combined:\s*(\d+)", out, re.S).group(1))


def main(selected):
    prefix = os.environ.get("LAB_TEST_PREFIX", "devmem_")
    # Every queue pair the device has (the driver starts with one per CPU):
    # the devmem queues and RSS over the rest.
    sh(["ethtool", "-L", NETIF, "combined", str(max_channels())])
    return run_cases([t for t in TESTS if not selected or t.__name__[5:] in selected], prefix)


def run_cases(tests, prefix):
    """Runs test_* functions as KTAP cases named prefix + name; a case also
    fails on kernel warnings logged while it ran."""
    print("TAP version 13", flush=True)
    print(f"1..{len(tests)}", flush=True)
    failed = 0
    for i, t in enumerate(tests, 1):
        name = prefix + t.__name__[5:]
        start, since = time.monotonic(), dmesg_len()
        try:
            t()
            bad = kernel_log_problems(since)
            if bad:
                raise Fail("kernel log: " + " | ".join(bad[:5]))
            print(f"ok {i} {name} # {time.monotonic() - start:.1f}s", flush=True)
        except Exception as e:
            failed += 1
            for line in str(e).splitlines():
                print(f"# {name}: {line}", flush=True)
            print(f"not ok {i} {name}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["send-pattern"]:
        send_pattern(*sys.argv[2:])
    elif sys.argv[1:2] == ["bench"]:
        bench(*sys.argv[2:])
    elif sys.argv[1:2] == ["count-rx"]:
        count_rx(*sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
