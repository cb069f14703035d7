"""The directions stage's fit at dataset scale: wall time and peak memory against the budget.

A synthetic samples store with the layout of ``samples.zarr`` (hmine's store layer:
``h`` (sample, step, channel, y, x) float16 in chunks of one batch and one step, with the
``sample``, ``step`` and ``step_index`` coordinates; h 512 x 8 x 8 = 32,768 features by
default, 10 steps) and 6 attribute score columns, each with a planted direction per step
(h = 10 shared factors with stds 30 x 0.9^i + 8 x latent_a x d_a,t + unit noise, all along
random orthonormal axes per step; score_a = sigmoid(2 latent_a)).
Each fit runs in a child process, as the directions stage calls it
(``xr.open_zarr(...)["h"]`` then ``fit_directions`` with ``DirectionsConfig``'s defaults
and ``memory_budget_gb``), and reports its wall time and peak RSS (``VmHWM``) against
the budget, and its resident set after the imports and before the fit.

``--before TREE`` runs another checkout's hmine (``PYTHONPATH``), e.g. the commit before a
change from ``git worktree add --detach /tmp/old-directions <commit>``, on the same store
before this checkout's, prints both rows, then the angles between the two fits'
directions (max over steps) and their probes' held-out accuracies. ``--tree`` runs only
that checkout; with ``--save`` a fit's directions go to an ``.npz`` that
``--compare A B`` compares.

    python benchmarks/bench_directions.py --n 5000 20000 --before /tmp/old-directions
    python benchmarks/bench_directions.py --n 2000 --tree /tmp/old-directions --save /tmp/d-old-2000.npz
    python benchmarks/bench_directions.py --compare /tmp/d-old-2000.npz /tmp/d-new-2000.npz
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

ATTRIBUTES = ("a0", "a1", "a2", "a3", "a4", "a5")
SIGNAL = 8.0  # h moves this far (in noise stds) per unit of an attribute's latent
#: stds of the 10 shared factors: a decaying spectrum whose top 16 axes (with the 6
#: attributes') lie above the noise bulk's edge, (1 + sqrt(features / N))^2 in variance
STRUCTURE_STDS = 30.0 * 0.9 ** np.arange(10)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def write_store(root: Path, n: int, steps: int, spatial: tuple[int, int, int], batch: int, seed: int = 0) -> Path:
    """``root/samples.zarr`` and ``root/labels.parquet`` with planted attribute directions (skipped when present)."""
    import pandas as pd

    from hmine.stores import ArraySpec, mark_complete, prepare_store

    path = root / "samples.zarr"
    labels_path = root / "labels.parquet"
    if labels_path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    d = int(np.prod(spatial))
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((n, len(ATTRIBUTES)))
    k = len(ATTRIBUTES) + len(STRUCTURE_STDS)
    axes = np.stack([np.linalg.qr(rng.standard_normal((d, k)))[0].T for _ in range(steps)]).astype(np.float32)
    directions, structure = axes[:, : len(ATTRIBUTES)], axes[:, len(ATTRIBUTES) :] * STRUCTURE_STDS[:, None]
    arrays = [
        ArraySpec("h", (n, steps, *spatial), (batch, 1, *spatial), "float16", ("sample", "step", "channel", "y", "x"),
                  {"long_name": "synthetic h", "units": "1", "coordinates": "step_index"}),
        ArraySpec("sample", (n,), (n,), "int64", ("sample",), {"long_name": "seed"}, None, False),
        ArraySpec("step", (steps,), (steps,), "int64", ("step",), {"long_name": "timestep"}, None, False),
        ArraySpec("step_index", (steps,), (steps,), "int64", ("step",), {"long_name": "step index"}, None, False),
    ]  # fmt: skip
    coords = {
        "sample": np.arange(n, dtype=np.int64),
        "step": np.linspace(900, 0, steps).astype(np.int64),
        "step_index": np.arange(steps, dtype=np.int64),
    }
    group = prepare_store(path, arrays, {"hmine:config_hash": f"bench-{n}-{steps}-{d}"}, coords)
    started = time.perf_counter()
    for start in range(0, n, batch):
        rows = slice(start, min(start + batch, n))
        m = rows.stop - rows.start
        block = np.empty((m, steps, d), dtype=np.float16)
        for t in range(steps):
            factors = rng.standard_normal((m, len(STRUCTURE_STDS)), dtype=np.float32)
            values = rng.standard_normal((m, d), dtype=np.float32)
            values += factors @ structure[t]
            values += SIGNAL * latents[rows].astype(np.float32) @ directions[t]
            block[:, t] = values
        group["h"][rows] = block.reshape(m, steps, *spatial)
    mark_complete(group)
    scores = 1 / (1 + np.exp(-2 * latents))
    pd.DataFrame(scores, columns=list(ATTRIBUTES), index=pd.Index(coords["sample"], name="seed")).to_parquet(labels_path)
    print(f"wrote {path} ({n} x {steps} x {d}) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def fit_child(root: Path, budget_gb: float, save: str | None) -> None:
    """In this (child) process: the stage's fit; print one JSON line of its figures."""
    import pandas as pd
    import xarray as xr

    import hmine
    from hmine.config import DirectionsConfig
    from hmine.directions import fit_directions

    c = DirectionsConfig(memory_budget_gb=budget_gb)
    labels = pd.read_parquet(root / "labels.parquet")
    rss_before = _status_kib("VmRSS")
    started = time.perf_counter()
    h = xr.open_zarr(root / "samples.zarr", consolidated=False)["h"]
    ds = fit_directions(
        h, labels, pca_components=c.pca_components, pca_modes=list(c.pca_modes), attributes=list(labels.columns),
        top_k=c.top_k, probe_C=c.probe_C, probe_components=c.probe_components, conditional=dict(c.conditional),
        memory_budget_bytes=int(c.memory_budget_gb * 2**30), random_state=c.random_state, threshold=c.threshold,
        probe_test_fraction=c.probe_test_fraction, regression=c.regression, regression_alpha=c.regression_alpha,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    figures = {
        "seconds": seconds,
        # CPU seconds of the fit's process (imports included): on a shared machine, wall time
        # measures the neighbours as much as the fit
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "rss_before_fit_bytes": rss_before * 1024,
        "budget_bytes": int(c.memory_budget_gb * 2**30),
        "pca_solvers": ds.attrs.get("hmine:pca_solvers", ""),
        "directions_path": ds.attrs.get("hmine:directions_path", "(not recorded)"),
        "hmine": str(Path(hmine.__file__).parent.parent),
        "load_average": os.getloadavg()[0],
    }
    if save:
        np.savez(save, names=ds["name"].values.astype(str), direction=ds["direction"].values,
                 probe_accuracy=ds["probe_accuracy"].values, scale_unit=ds["scale_unit"].values)  # fmt: skip
    print("RESULT " + json.dumps(figures), flush=True)


def run_fit(root: Path, budget_gb: float, tree: str | None, threads: int, save: str | None) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))  # fmt: skip
    if tree:
        env["PYTHONPATH"] = str(tree)
    command = [sys.executable, __file__, "--child", str(root), "--budget-gb", str(budget_gb)]
    if save:
        command += ["--save", save]
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/")
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"fit failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def compare(a: str, b: str) -> None:
    """Angles (degrees) between two saved fits' directions, per direction, max over steps; probe accuracies."""
    first, second = np.load(a), np.load(b)
    names = list(first["names"])
    assert names == list(second["names"]), "the two fits have different directions"
    print(f"{'direction':<34} {'max angle deg':>14} {'median deg':>11}  held-out accuracy (mean over steps) A -> B")
    for i, name in enumerate(names):
        u, v = first["direction"][i], second["direction"][i]
        u, v = u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1)
        # unit per step; PCA axes have no sign, so the angle is between the lines
        degrees = np.degrees(2 * np.arcsin(np.linalg.norm(u - np.sign(np.sum(u * v, axis=1))[:, None] * v, axis=1) / 2))
        accuracy = ""
        if np.isfinite(first["probe_accuracy"][i]).all():
            accuracy = f"{np.mean(first['probe_accuracy'][i]):.4f} -> {np.mean(second['probe_accuracy'][i]):.4f}"
        print(f"{name:<34} {degrees.max():>14.2e} {np.median(degrees):>11.2e}  {accuracy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", nargs="*", type=int, default=[2000, 8000], help="samples")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--spatial", default="512x8x8", help="channel x y x x of h")
    parser.add_argument("--batch", type=int, default=64, help="samples per chunk (the sample stage's batch)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench-directions"), help="stores go to ROOT/n<N>/")
    parser.add_argument("--budget-gb", type=float, default=4.0, help="directions.memory_budget_gb")
    parser.add_argument("--tree", help="another checkout whose hmine to run (PYTHONPATH)")
    parser.add_argument("--before", help="run this checkout's hmine first (the code before), then this one's, and compare")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads of the fit")
    parser.add_argument("--save", help="save the directions to this .npz (one N only)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fit_child(args.child, args.budget_gb, args.save)
        return
    if args.compare:
        compare(*args.compare)
        return
    spatial = tuple(int(v) for v in args.spatial.lower().split("x"))
    print(f"steps={args.steps} h={args.spatial} budget={args.budget_gb} GiB threads={args.threads} "
          f"code={args.tree or ('before: ' + args.before + ', after: this checkout' if args.before else 'this checkout')}")  # fmt: skip
    print(f"{'N':>7} {'code':>7} {'wall s':>8} {'CPU s':>8} {'peak RSS GiB':>13} {'x budget':>9} {'RSS before fit GiB':>19} "
          f"{'load avg':>9}  paths")  # fmt: skip
    for n in args.n:
        root = args.root / f"n{n}"
        write_store(root, n, args.steps, spatial, args.batch)
        runs = [("before", args.before), ("after", None)] if args.before else [("", args.tree)]
        for label, tree in runs:
            save = str(root / f"{label}.npz") if label else args.save
            r = run_fit(root, args.budget_gb, tree, args.threads, save)
            print(
                f"{n:>7} {label or '-':>7} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {r['peak_rss_bytes'] / 2**30:>13.2f} "
                f"{r['peak_rss_bytes'] / r['budget_bytes']:>9.2f} {r['rss_before_fit_bytes'] / 2**30:>19.2f} "
                f"{r['load_average']:>9.1f}  {r['pca_solvers']}; {r['directions_path']} [{r['hmine']}]",
                flush=True,
            )  # fmt: skip
        if args.before:
            compare(str(root / "before.npz"), str(root / "after.npz"))


if __name__ == "__main__":
    main()
