"""Dataset scale: the demo's sample, label and directions stages at N samples on a Dask cluster.

Issue 20's dataset-scale run. Starts a distributed ``LocalCluster`` (``--workers``
processes of one thread each), then runs the three stages against it as a user would,
one command each: ``hmine sample|label|directions configs/demo.yaml --set
sample.n_samples=N --dask ADDRESS``. As the README says for a cluster that outlives one
command, the cluster and a Prefect server belong together: the benchmark starts hmine's
quiet local Prefect server first and exports its ``PREFECT_API_URL`` to the workers and
the commands (workers that outlive a command's own temporary server keep its address, and
the next command's shards then fail to reach it). The demo's model and settings;
Jacobian, edit and report are not run. Per stage it reports:

- wall time of the command, and the stage's own seconds as the command prints them
  (the difference is process start-up, Prefect's server and the cluster connection);
- peak resident memory of each Dask worker, of the ``hmine`` process (it prepares and
  finishes the sharded stages and fits the directions: PCA's out-of-core path computes
  on the workers), and of this process (the Dask scheduler and client): RSS sampled every
  ``--interval`` seconds, plus the workers' ``ru_maxrss`` (their lifetime peak) after
  each stage as a check on the sampling;
- the 1-minute load average during the stage (the machine may be shared);

and at the end the bytes on disk per sample: ``samples.zarr``, ``labels.parquet``,
``directions.zarr`` and the whole run directory, divided by N (allocated blocks, as du).
The figures are printed as a table and written to ``<out-dir>/<run>-figures.json``.

    python benchmarks/bench_dataset_scale.py --n-samples 256          # a check, a few minutes
    nice -n 10 python benchmarks/bench_dataset_scale.py               # 20,000 samples
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sample", "label", "directions")
MiB = 2**20


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _cpu_seconds(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def _worker_peak_rss() -> int:
    """This process's peak resident set in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageFigures:
    """What one stage's command measured."""

    stage: str
    wall_s: float = 0.0
    stage_s: float | None = None
    worker_peak_rss: dict[str, int] = field(default_factory=dict)  # sampled, per worker
    worker_maxrss: dict[str, int] = field(default_factory=dict)  # ru_maxrss after the stage (lifetime)
    hmine_peak_rss: int = 0  # the hmine command's own process
    hmine_children_peak_rss: int = 0  # its children together (Prefect server, watchdog)
    scheduler_peak_rss: int = 0  # this process: scheduler and client
    load: list[float] = field(default_factory=list)  # 1-min load average samples
    hmine_cpu_s: float = 0.0  # user + system seconds of the hmine command (and its waited children)
    worker_cpu_s: dict[str, float] = field(default_factory=dict)  # user + system seconds per worker
    output: str = ""


class MemorySampler:
    """Samples the RSS of the workers, a command's process tree and this process in a thread."""

    def __init__(self, worker_pids: dict[str, int], interval: float, samples_store: Path, progress_every: float):
        import psutil

        self.samples_store, self.progress_every = samples_store, progress_every
        self._psutil = psutil
        self.workers = {address: psutil.Process(pid) for address, pid in worker_pids.items()}
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.figures: StageFigures | None = None
        self.command: subprocess.Popen | None = None

    def worker_cpu(self) -> dict[str, float]:
        """User + system CPU seconds of each worker so far."""
        return {address: sum(process.cpu_times()[:2]) for address, process in self.workers.items()}

    def _rss(self, process) -> int:
        try:
            return process.memory_info().rss
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            return 0

    def _sample(self) -> None:
        figures, psutil = self.figures, self._psutil
        for address, process in self.workers.items():
            figures.worker_peak_rss[address] = max(figures.worker_peak_rss.get(address, 0), self._rss(process))
        figures.scheduler_peak_rss = max(figures.scheduler_peak_rss, self._rss(psutil.Process()))
        figures.load.append(os.getloadavg()[0])
        if self.command is not None and self.command.poll() is None:
            try:
                main = psutil.Process(self.command.pid)
                children = main.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            figures.hmine_peak_rss = max(figures.hmine_peak_rss, self._rss(main))
            figures.hmine_children_peak_rss = max(figures.hmine_children_peak_rss, sum(self._rss(child) for child in children))

    def _loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            self._sample()
            if time.monotonic() - last >= self.progress_every:
                last = time.monotonic()
                self._progress()

    def _progress(self) -> None:
        """One line of the running stage's peaks so far (a stopped run still leaves its figures)."""
        f = self.figures
        done = ""
        if f.stage == "sample" and self.samples_store.exists():
            import zarr

            try:
                done = f" {int(zarr.open_group(self.samples_store, mode='r')['done'][...].sum()):,} samples done;"
            except Exception:  # the store is being created
                done = ""
        print(f"{time.strftime('%H:%M:%S')} {f.stage}:{done} peak RSS workers "
              f"{', '.join(_mib(v) for _, v in sorted(f.worker_peak_rss.items()))} MiB, hmine {_mib(f.hmine_peak_rss)} "
              f"MiB; load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip

    def start(self, figures: StageFigures, command: subprocess.Popen) -> None:
        self.figures, self.command = figures, command
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def stage_command(stage: str, args, address: str) -> list[str]:
    hmine = Path(sys.executable).parent / "hmine"
    overrides = [f"output_root={args.out_dir.absolute()}", f"name={args.name}", f"sample.n_samples={args.n_samples}"]
    return [str(hmine), stage, str(args.config), *(a for o in overrides for a in ("--set", o)), "--dask", address]


def stage_seconds(output: str, stage: str) -> float | None:
    """The stage's own seconds from the ``<stage>: {...}`` line ``hmine`` prints."""
    for line in output.splitlines():
        if line.startswith(f"{stage}: {{"):
            return float(ast.literal_eval(line[len(stage) + 2 :])["seconds"])
    return None


def run_stage(stage: str, args, client, sampler: MemorySampler) -> StageFigures:
    figures = StageFigures(stage)
    command = stage_command(stage, args, client.scheduler_info()["address"])
    workers_before = sampler.worker_cpu()
    children_before = _cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN))
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler.start(figures, process)
    try:
        figures.output, _ = process.communicate()
    except BaseException:  # SIGTERM or Ctrl-C: stop the command (it exits cleanly on SIGTERM), then the cluster
        process.terminate()
        process.wait(120)
        raise
    figures.wall_s = time.perf_counter() - started
    sampler.stop()
    # the command is this process's only child waited for during the stage (workers and server live on)
    figures.hmine_cpu_s = _cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN)) - children_before
    figures.worker_cpu_s = {w: t - workers_before[w] for w, t in sampler.worker_cpu().items()}
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{figures.output[-4000:]}")
    (args.out_dir / f"{args.name}-{stage}.log").write_text(figures.output)
    figures.stage_s = stage_seconds(figures.output, stage)
    figures.worker_maxrss = client.run(_worker_peak_rss)
    return figures


def disk_bytes(path: Path) -> int:
    """Allocated bytes under ``path`` (st_blocks, as ``du``)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum((Path(d) / f).stat().st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f}"


def table(results: list[StageFigures], workers: list[str]) -> str:
    head = ["stage", "wall s", "stage s", "CPU s hmine+workers", *(f"worker {i} MiB" for i in range(len(workers))), "hmine MiB",
            "scheduler MiB", "load 1-min (min-max)"]  # fmt: skip
    rows = [head]
    for r in results:
        load = f"{sum(r.load) / len(r.load):.1f} ({min(r.load):.1f}-{max(r.load):.1f})"
        stage_s = "-" if r.stage_s is None else f"{r.stage_s:,.1f}"
        cpu = f"{r.hmine_cpu_s:,.0f}+{'+'.join(f'{r.worker_cpu_s[w]:,.0f}' for w in workers)}"
        rows.append([r.stage, f"{r.wall_s:,.1f}", stage_s, cpu, *(_mib(r.worker_peak_rss.get(w, 0)) for w in workers),
                     _mib(r.hmine_peak_rss), _mib(r.scheduler_peak_rss), load])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes, one thread each")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "stores" / "bench-dataset-scale",
                        help="output_root of the run (the run is <out-dir>/dataset-scale-<N>)")  # fmt: skip
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--progress-every", type=float, default=120.0, help="seconds between progress lines")
    parser.add_argument("--resume", action="store_true",
                        help="continue an existing run (its figures then cover only the work left)")  # fmt: skip
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir.absolute()
    args.name = f"dataset-scale-{args.n_samples}"
    run_dir = args.out_dir / args.name
    if run_dir.exists() and not args.resume:
        raise SystemExit(f"{run_dir} exists: remove it, pass another --out-dir, or --resume to continue it")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)

    # a Prefect server for the cluster's lifetime, in its own home (PREFECT_API_URL reaches workers and commands)
    os.environ.setdefault("HMINE_HOME", str(args.out_dir / "hmine-home"))
    from hmine.runtime import configure_environment, start_prefect_server

    configure_environment()
    api_url = start_prefect_server()
    print(f"Prefect server {api_url}", flush=True)
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           local_directory=str(args.out_dir / "dask-scratch"))  # fmt: skip
    with cluster, Client(cluster) as client:
        worker_pids = client.run(os.getpid)
        workers = sorted(worker_pids)
        memory_limit = {w: info["memory_limit"] for w, info in client.scheduler_info()["workers"].items()}
        print(f"cluster {client.scheduler.address}: {len(workers)} workers, 1 thread each, "
              f"memory limit {_mib(min(memory_limit.values()))} MiB each", flush=True)  # fmt: skip
        sampler = MemorySampler(worker_pids, args.interval, run_dir / "samples.zarr", args.progress_every)
        results = []
        for stage in STAGES:
            results.append(run_stage(stage, args, client, sampler))
            r = results[-1]
            print(f"{stage}: {r.wall_s:,.1f} s wall, {r.stage_s} s in the stage; peak RSS workers "
                  f"{', '.join(_mib(r.worker_peak_rss[w]) for w in workers)} MiB (lifetime ru_maxrss "
                  f"{', '.join(_mib(r.worker_maxrss[w]) for w in workers)}), hmine {_mib(r.hmine_peak_rss)} MiB, "
                  f"scheduler {_mib(r.scheduler_peak_rss)} MiB; load {min(r.load):.1f}-{max(r.load):.1f}",
                  flush=True)  # fmt: skip
    sizes = {name: disk_bytes(run_dir / name) for name in ("samples.zarr", "labels.parquet", "directions.zarr")}
    sizes["run directory"] = disk_bytes(run_dir)
    print(f"\n{args.n_samples:,} samples, {args.workers} workers ({args.config.name}; sample, label, directions)")
    print(table(results, workers))
    print("\nbytes on disk: " + "; ".join(f"{k} {v / MiB:,.1f} MiB = {v / args.n_samples:,.0f} B/sample"
                                         for k, v in sizes.items()))  # fmt: skip
    print("workers' lifetime peak RSS (ru_maxrss): " + ", ".join(_mib(results[-1].worker_maxrss[w]) for w in workers)
          + " MiB")  # fmt: skip
    figures = {
        "n_samples": args.n_samples, "workers": args.workers, "config": str(args.config), "run_dir": str(run_dir),
        "stages": [{k: v for k, v in vars(r).items() if k != "output"} for r in results],
        "disk_bytes": sizes, "disk_bytes_per_sample": {k: v / args.n_samples for k, v in sizes.items()},
        "worker_memory_limit": memory_limit, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }  # fmt: skip
    (args.out_dir / f"{args.name}-figures.json").write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
