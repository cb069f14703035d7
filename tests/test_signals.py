"""Signals against a Prefect-backed run: no local server may outlive hmine.

These start real `hmine` processes with Prefect (one temporary server each), so they
are the slowest tests; they share one run so that the cost is paid twice, not more.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # starts hmine processes or whole runs


def _children_servers(home: str) -> list[int]:
    """PIDs of Prefect servers whose environment points at this test's HMINE_HOME."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"prefect.server.api.server" not in cmdline:
                continue
            environ = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if home.encode() in environ:
            found.append(int(pid))
    return found


def _start(config_file, home, tmp_path, new_session=False):
    env = {**os.environ, "HMINE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)
    return subprocess.Popen(
        [sys.executable, "-m", "hmine.cli", "sample", str(config_file)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=new_session,  # its own process group, as a terminal's foreground job
    )


def _wait_for_server(proc, home, timeout=150):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if _children_servers(str(home)):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def slow_config(tmp_path, tiny_pixel_model_dir):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"name: sig\noutput_root: {tmp_path / 'stores'}\nmodel:\n  id: {tiny_pixel_model_dir}\n"
        "sample:\n  n_samples: 5000\n  batch_size: 2\n  num_inference_steps: 10\n"
    )
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_prefect_server_outlives_a_signalled_run(slow_config, tmp_path, sig):
    home = tmp_path / f"home-{sig.name}"
    proc = _start(slow_config, home, tmp_path)
    assert _wait_for_server(proc, home), "the run never started its Prefect server"
    # SIGKILL right away lands during the server's start-up, the hardest moment;
    # SIGTERM a little later lands while flows run
    time.sleep(0.5 if sig == signal.SIGKILL else 3)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
    deadline = time.time() + 30
    while _children_servers(str(home)) and time.time() < deadline:
        time.sleep(0.2)
    leftover = _children_servers(str(home))
    for pid in leftover:  # do not leak into the rest of the session if this fails
        os.kill(pid, signal.SIGKILL)
    assert leftover == []


def test_ctrl_c_in_a_terminal_stops_the_run_in_one_line_and_its_server_with_it(slow_config, tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group, the server too if it
    shares the group: then hmine retried the dead API for over a minute, in tracebacks."""
    home = tmp_path / "home-ctrl-c"
    proc = _start(slow_config, home, tmp_path, new_session=True)
    assert _wait_for_server(proc, home), "the run never started its Prefect server"
    samples = tmp_path / "stores" / "sig" / "samples.zarr" / "x0" / "c"
    deadline = time.time() + 120
    while not (samples.exists() and any(samples.iterdir())) and time.time() < deadline:
        time.sleep(0.2)  # Ctrl-C while batches are being sampled
    started = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert time.time() - started < 30
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted by SIGINT")
    deadline = time.time() + 30
    while _children_servers(str(home)) and time.time() < deadline:
        time.sleep(0.2)
    leftover = _children_servers(str(home))
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert leftover == []
