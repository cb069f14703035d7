"""Stop Prefect's local server when the hmine process that started it dies.

Run as ``python -m hmine.watchdog OWNER_PID SERVER_PID`` in its own session. SIGTERM and
Ctrl-C are handled inside hmine (atexit stops the server), but a SIGKILL leaves the
uvicorn child running, holding its port, its database and any pipe it inherited
(``hmine run | tee log`` would hang). This process polls the owner and, once it is gone,
terminates the server (SIGKILL after a grace period) and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); read its state to tell
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def watch(owner_pid: int, server_pid: int, poll_seconds: float = 0.5, grace_seconds: float = 5.0) -> None:
    while _alive(server_pid):
        if not _alive(owner_pid):
            os.kill(server_pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while _alive(server_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(server_pid):
                os.kill(server_pid, signal.SIGKILL)
            return
        time.sleep(poll_seconds)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
