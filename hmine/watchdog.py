"""Stop Prefect's local server when the hmine process that started it dies.

Run as ``python -m hmine.watchdog OWNER_PID`` in its own session, *before* the server is
started. SIGTERM and Ctrl-C are handled inside hmine (atexit stops the server), but a
SIGKILL leaves the uvicorn child running, holding its port, its database and any pipe it
inherited (``hmine run | tee log`` would hang). This process keeps a list of the owner's
Prefect-server children while the owner lives and, once it is gone, terminates them
(SIGKILL after a grace period) and exits. Watching from before the server starts closes
the window of a kill during the server's slow start-up.
"""

from __future__ import annotations

import os
import signal
import sys
import time

SERVER_MARK = b"prefect.server.api.server"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def server_children(owner_pid: int) -> set[int]:
    """PIDs of Prefect-server processes whose parent is ``owner_pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[-1].split()[1])
            if parent != owner_pid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if SERVER_MARK in cmdline.read():
                    found.add(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _stop(pids: set[int], grace_seconds: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def watch(owner_pid: int, poll_seconds: float = 0.2, grace_seconds: float = 5.0) -> None:
    servers: set[int] = set()
    while _alive(owner_pid):
        servers = {p for p in servers if _alive(p)} | server_children(owner_pid)
        time.sleep(poll_seconds)
    _stop({p for p in servers if _alive(p)}, grace_seconds)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
