"""Process set-up shared by the CLI and the flows: quiet offline Prefect, threads, run locks.

Prefect's settings must be in the environment before ``prefect`` is imported, so
:func:`configure_environment` runs first thing in every CLI command.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import signal
import sys
from pathlib import Path

# Quiet, offline, local Prefect: no analytics, no UI, no background services, a startup
# timeout that survives a cold SQLite migration on 2 busy cores (stack-notes §2).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "[]",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}


def hmine_home() -> Path:
    """Where hmine keeps Prefect's database and cached results (``$HMINE_HOME`` or ./.hmine)."""
    return Path(os.environ.get("HMINE_HOME", ".hmine")).resolve()


def configure_environment() -> None:
    """Set quiet Prefect defaults and thread settings; the user's own variables win.

    With ``PREFECT_API_URL`` set (a server of the user's), the ``hmine`` loggers' records
    from inside a flow run are sent to it (``PREFECT_LOGGING_EXTRA_LOGGERS=hmine``);
    hmine's own temporary server gets none.
    """
    if os.environ.get("PREFECT_API_URL"):
        # the user's own server (a scheduled deployment's too): hmine's logs go there, like
        # Prefect's; records outside a flow run (the command line's own) stay local
        os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "hmine")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
        os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "true")
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # only the setting: the folder is made by ensure_prefect_home when Prefect is about to
    # be used, so `hmine --help`, `hmine status` or a refused config leave no ./.hmine behind
    os.environ.setdefault("PREFECT_HOME", str(hmine_home() / "prefect"))
    # Spinning OpenMP threads under contention made torch 5-10x slower (stack-notes §0.2).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # dask.distributed logs every cluster start and stop at INFO; Dask reads this at import
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def ensure_prefect_home() -> Path:
    """Create ``$PREFECT_HOME`` (with its parents) before Prefect is imported or started.

    Prefect creates its home without parents and fails on a fresh ``HMINE_HOME``.
    """
    home = Path(os.environ.get("PREFECT_HOME") or hmine_home() / "prefect")
    home.mkdir(parents=True, exist_ok=True)
    return home


@functools.cache
def software_record() -> dict:
    """What every store records about the software that wrote it (once per process).

    ``hmine:versions``: JSON of the versions of hmine, torch, diffusers, transformers,
    the CUDA runtime torch was built with (``none`` for a CPU build) and Python;
    ``hmine:source_dirty``: whether hmine's source tree had uncommitted changes
    (``"unknown"`` outside a git checkout).
    """
    import json
    import platform
    import subprocess
    from importlib import metadata

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    import torch

    versions = {p: version(p) for p in ("hmine", "torch", "diffusers", "transformers")}
    versions["cuda"] = torch.version.cuda or "none"
    versions["python"] = platform.python_version()
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                             capture_output=True, text=True, timeout=10)
        dirty = bool(out.stdout.strip()) if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        dirty = "unknown"
    return {"hmine:versions": json.dumps(versions, sort_keys=True), "hmine:source_dirty": dirty}


class Interrupted(BaseException):
    """The run was stopped by SIGINT or SIGTERM; its stores keep every batch written.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in a stage
    or in Prefect's engine swallows it; ``hmine`` prints one line and exits 128 + signal.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; every batch written so far is kept - "
            "rerun the same command to resume"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_cleanly_on_signals() -> None:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` in the main thread.

    Raising (instead of dying) lets ``finally`` blocks release the run lock and atexit
    handlers stop Prefect's local server; without it the uvicorn child outlives a
    terminated run (stack-notes §7). The server itself runs in a session of its own
    (:func:`start_prefect_server`), so a terminal's Ctrl-C, sent to the whole foreground
    process group, reaches hmine only: the server stays up until hmine has finished
    talking to it and stops it at exit.
    """

    def handler(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def start_prefect_server() -> str:
    """Start Prefect's local server now, guarded by a watchdog; return its API URL.

    Starting it here, rather than lazily inside the first flow, lets hmine know the
    server's PID and hand it to :mod:`hmine.watchdog`, which stops the server if this
    process is killed with SIGKILL. Normal exits and SIGTERM stop it through Prefect's
    own atexit handler.
    """
    import subprocess

    ensure_prefect_home()
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class ServerInItsOwnSession(SubprocessASGIServer):
        """Prefect's temporary server, out of the terminal's process group.

        Ctrl-C in a terminal signals every process of the foreground group; a server in
        that group died with hmine's own Ctrl-C, and hmine then retried the dead API for
        over a minute with a screen of connection tracebacks.
        """

        def _run_uvicorn_command(self):
            popen = subprocess.Popen
            # Prefect builds the command line and environment; only the session differs.
            # Patched for this one call, while no other thread of hmine starts processes.
            subprocess.Popen = functools.partial(popen, start_new_session=True)
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    # the watchdog first, so that a kill during the server's start-up is covered too
    subprocess.Popen(
        [sys.executable, "-m", "hmine.watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = ServerInItsOwnSession()
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")))
    os.environ["PREFECT_API_URL"] = server.api_url
    # settings are read once at import; make the running process see the URL too
    temporary_settings({PREFECT_API_URL: server.api_url}).__enter__()
    return server.api_url


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory, released by the OS when the holder dies.

    ``flock`` locks belong to the open file, so a killed process (even by SIGKILL)
    never holds the lock forever; the PID written inside is only for the message.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise RunLocked(
                    f"run directory {self.path.parent} is in use by process {holder}; "
                    "wait for it to finish or stop it, then rerun"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
