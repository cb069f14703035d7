"""Growing a run against a fresh run of the final size (issue 20, item 2).

The demo's sample, label and directions settings on the embedded shapes-world model:
a run of N/2 samples is grown to N (``sample.n_samples`` raised, the same run name) and
compared with a fresh run of N samples: samples.zarr (every array) and labels.parquet
bit for bit, the directions' unit vectors by their largest elementwise difference and
angle. Times per stage; the stages of the grow and of the fresh run are interleaved
(one pair per stage: the machine is shared, drifting load hits both alike).

    python benchmarks/bench_grow.py                  # 512 -> 1,024
    python benchmarks/bench_grow.py --n 512          # 256 -> 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sample", "label", "directions")


def config_for(root: Path, name: str, n: int):
    from hmine.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", [f"output_root={root}", f"name={name}", f"sample.n_samples={n}"])


def run_stage(stage: str, config) -> float:
    from hmine.stages.directions import run_directions_stage
    from hmine.stages.label import run_label_stage
    from hmine.stages.sample import run_sample_stage

    started = time.perf_counter()
    if stage == "sample":
        run_sample_stage(config, show_progress=False)
    elif stage == "label":
        run_label_stage(config, show_progress=False)
    else:
        run_directions_stage(config)
    return time.perf_counter() - started


def compare(grown, fresh) -> dict:
    """Bitwise equality of samples and labels; the directions' largest differences."""
    import numpy as np
    import pandas as pd
    import xarray as xr

    from hmine.stages.directions import directions_path
    from hmine.stages.label import labels_path
    from hmine.stores import open_group

    a, b = open_group(grown.run_dir / "samples.zarr"), open_group(fresh.run_dir / "samples.zarr")
    samples_equal = sorted(a.array_keys()) == sorted(b.array_keys()) and all(
        a[k].chunks == b[k].chunks and np.array_equal(a[k][...], b[k][...]) for k in b.array_keys()
    )
    la, lb = pd.read_parquet(labels_path(grown)), pd.read_parquet(labels_path(fresh))
    labels_equal = la.index.equals(lb.index) and la.columns.equals(lb.columns) and bool(
        (la.to_numpy() == lb.to_numpy()).all()
    )
    da = xr.open_zarr(directions_path(grown), consolidated=False)
    db = xr.open_zarr(directions_path(fresh), consolidated=False)
    assert list(da["name"].values) == list(db["name"].values)
    u, v = da["direction"].values.astype(np.float64), db["direction"].values.astype(np.float64)
    u, v = u.reshape(*u.shape[:2], -1), v.reshape(*v.shape[:2], -1)  # (direction, step, D)
    cos = (u * v).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    angles = np.degrees(np.arccos(np.clip(np.abs(cos), 0.0, 1.0)))
    return {
        "samples_bitwise": bool(samples_equal),
        "labels_bitwise": bool(labels_equal),
        "directions": int(u.shape[0]),
        "direction_max_abs_diff": float(np.abs(u - v).max()),
        "direction_max_angle_deg": float(np.nanmax(angles)),
        "scale_unit_max_rel_diff": float(
            np.abs(da["scale_unit"].values - db["scale_unit"].values).max() / np.abs(db["scale_unit"].values).max()
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="final sample count (the run grows from n/2)")
    parser.add_argument("--root", type=Path, default=None, help="where the runs go (default: a temp dir)")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="hmine-bench-grow-"))
    small, grown, fresh = config_for(root, "grown", args.n // 2), config_for(root, "grown", args.n), config_for(root, "fresh", args.n)
    times: dict[str, dict[str, float]] = {"initial": {}, "grow": {}, "fresh": {}}
    for stage in STAGES:  # the run that is grown later (its time is what a grow saves)
        times["initial"][stage] = run_stage(stage, small)
    for i, stage in enumerate(STAGES):  # interleaved, the order alternating per stage
        order = (("grow", grown), ("fresh", fresh)) if i % 2 == 0 else (("fresh", fresh), ("grow", grown))
        for kind, config in order:
            times[kind][stage] = run_stage(stage, config)
            print(f"{kind:>7} {stage:<10} {times[kind][stage]:7.1f} s", flush=True)
    result = {"n_initial": args.n // 2, "n_final": args.n, "seconds": times, **compare(grown, fresh),
              "totals": {kind: sum(t.values()) for kind, t in times.items()}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
