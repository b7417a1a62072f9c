"""Helpers shared by the benchmark scripts: bounded waits, nbd-proxy's status, peak memory and
CPU time of a process, a cold page cache for the files a run uses, a minimal QMP client."""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def wait(cond, what, timeout_s):
    """Polls cond() until it returns something true; exits with a message after timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def proxy_status(ctl, bin_dir=BIN):
    """`nbd-proxy status --json` of a running proxy (asked with `bin_dir`'s nbd-proxy), or None."""
    out = subprocess.run([f"{bin_dir}/nbd-proxy", "status", "--control", ctl, "--json"],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def caught_up(ctl, bin_dir=BIN):
    """Everything captured is durable at the replicator and no seed or resync runs."""
    s = proxy_status(ctl, bin_dir)
    return s and s["link"] == "connected" and s["lag_seq"] == 0 and not s["sync_running"] \
        and s["tracking"] == "live" and s["syncs_completed"] >= 1


def peak_rss_mib(pid):
    """VmHWM of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of proc(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def files_in(paths):
    """Every regular file of `paths` (files, or directories walked)."""
    for top in paths:
        if os.path.isfile(top):
            yield top
        else:
            yield from (os.path.join(d, n) for d, _, names in os.walk(top) for n in names)


def fsync_files(paths, drop=False):
    """fsyncs every file of `paths` (with `drop`, then POSIX_FADV_DONTNEED); returns the
    seconds it took."""
    t0 = time.monotonic()
    for path in files_in(paths):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile (a segment retired), or not ours to open
        try:
            os.fsync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return time.monotonic() - t0


def cold_cache(paths):
    """fsync, then POSIX_FADV_DONTNEED, every regular file in `paths` (files, or directories
    walked), so that each starts from an empty page cache. Why it matters: a file whose pages
    sit in the page cache in large folios (freshly written by dd or cp, or read by a seed) makes
    4k writes several times slower for any server on this machine's kernel."""
    fsync_files(paths, drop=True)


def warm_cache(paths):
    """Reads every file in `paths` once, so that reads find all of it in the page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(4 << 20):
                pass


def free_port():
    """A free TCP port on loopback (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(addr):
    """True when something accepts TCP connections at HOST:PORT."""
    host, port = addr.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


class Qmp:
    """A QMP monitor over a unix socket: the greeting, qmp_capabilities, then commands."""

    def __init__(self, path, timeout_s=30):
        self.sock = wait(lambda: _connect_unix(path), f"QMP at {path}", timeout_s)
        self.sock.settimeout(timeout_s)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP closed the connection")
        return json.loads(line)

    def cmd(self, name, **args):
        """Runs a command; its "return" value (events that arrive meanwhile are skipped)."""
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")

    def close(self):
        self.file.close()
        self.sock.close()


def _connect_unix(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return s
    except OSError:
        s.close()
        return None
