"""What every guest-side test script uses: running commands (in the
remote namespace too), waiting for a condition with a deadline, and the
one exception a failed check raises."""
import os
import subprocess
import time

T0 = time.monotonic()


class Fail(Exception):
    pass


def log(msg):
    print(f"# {msg}", flush=True)


def trace(msg):
    """Progress lines with LAB_TRACE=1."""
    if os.environ.get("LAB_TRACE"):
        print(f"# [{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def sh(cmd, ns=None, check=True, timeout=600):
    """Runs cmd (in network namespace ns); its stdout, or Fail with its
    exit code and output when it fails and check is set."""
    trace(" ".join(cmd) + (f" (in {ns})" if ns else ""))
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise Fail(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def wait_for(what, cond, timeout=60.0):
    """Polls cond until it holds; Fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise Fail(f"timed out after {timeout:.0f}s waiting for {what}")
