"""Helpers shared by the benchmark scripts: bounded waits, nbd-proxy's status, peak memory."""

import json
import os
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


def proxy_status(ctl):
    """`nbd-proxy status --json` of a running proxy, or None."""
    out = subprocess.run([f"{BIN}/nbd-proxy", "status", "--control", ctl, "--json"],
                         capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def caught_up(ctl):
    """Everything captured is durable at the replicator and no seed or resync runs."""
    s = proxy_status(ctl)
    return s and s["link"] == "connected" and s["lag_seq"] == 0 and not s["sync_running"] \
        and s["tracking"] == "live" and s["syncs_completed"] >= 1


def peak_rss_mib(pid):
    """VmHWM of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
