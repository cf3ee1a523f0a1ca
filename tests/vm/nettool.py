#!/usr/bin/env python3
"""TCP bulk transfer with end-to-end verification, for the lab guest.

  nettool.py recv PORT OUTFILE   accept one connection, hash what arrives,
                                 write "<bytes> <sha256>" to OUTFILE
  nettool.py send HOST PORT BYTES [SEED]
                                 send BYTES of a seeded pattern, print
                                 "<bytes> <sha256>" of what was sent
"""
import hashlib
import os
import random
import socket
import sys

BLOCK = 1 << 20
# Seconds a send or receive may stall before the transfer fails.
TIMEOUT = float(os.environ.get("NETTOOL_TIMEOUT", "600"))


def pattern(seed):
    rnd = random.Random(seed)
    return rnd.randbytes(BLOCK)


def recv(port, outfile):
    srv = socket.create_server(("::", int(port)), family=socket.AF_INET6, dualstack_ipv6=True)
    srv.settimeout(TIMEOUT)
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    h = hashlib.sha256()
    total = 0
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        h.update(view[:n])
        total += n
    with open(outfile, "w") as f:
        f.write(f"{total} {h.hexdigest()}\n")


def send(host, port, nbytes, seed=1):
    nbytes = int(nbytes)
    block = pattern(int(seed))
    h = hashlib.sha256()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    left = nbytes
    while left:
        chunk = block if left >= BLOCK else block[:left]
        sock.sendall(chunk)
        h.update(chunk)
        left -= len(chunk)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)
    sock.close()
    print(f"{nbytes} {h.hexdigest()}")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"recv": recv, "send": send}[cmd](*args)
