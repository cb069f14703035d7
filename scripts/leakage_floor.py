"""How much of the benchmark's leakage any edit of that size causes: random directions at the best rows' norms.

The benchmark (``hmine benchmark CONFIG``) reports, per attribute and side, the best
direction's leakage at matched strength: the largest share of edited samples whose decision
on another binary attribute changes. This script asks whether that leakage belongs to the
direction (entanglement) or to any change of h of that size: it edits the same samples along
``--random`` seeded Gaussian directions, norm-matched as the benchmark's own random baseline,
at the benchmark's strengths, and reads at each best row's norm ||delta h|| the share of
samples whose decision on each other attribute changes (interpolated in norm, both signs
averaged). It also reports, for the best row's own edit, the mean |change| of each continuous
factor in std next to its signed mean change: a per-sample scatter much larger than the mean
is what moves near-threshold samples across a decision boundary in both directions.

Run (after ``hmine run`` and ``hmine benchmark`` of the config)::

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/leakage_floor.py configs/demo.yaml --random 4
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd


def random_leakage(config, n_random: int) -> tuple[dict[str, pd.DataFrame], float]:
    """Each random direction's effects table (the benchmark's scales and samples) and ||delta h|| per unit of scale."""
    from hmine.benchmark.candidates import norm_per_scale, random_candidate, stored_candidates
    from hmine.benchmark.measure import edit_and_measure
    from hmine.directions import open_directions
    from hmine.editing import edit_steps_from
    from hmine.labelling import decision_thresholds, make_labeller
    from hmine.stages.directions import directions_path
    from hmine.stages.label import read_labels
    from hmine.stages.sample import make_sampler, samples_path
    from hmine.stores import open_group

    settings = config.benchmark
    samples = open_group(samples_path(config))
    seeds = samples["sample"][: settings.n_samples].tolist()
    binary = list(config.label.attributes)
    labeller = make_labeller(config.label, config.model.device)
    thresholds = decision_thresholds(read_labels(config), binary, config.directions.threshold)
    stored = stored_candidates(open_directions(directions_path(config)), binary, settings.pca_components)
    sampler = make_sampler(config, None)
    # seeds other than the benchmark's own baseline (settings.random_seed), each named apart
    randoms = [
        dataclasses.replace(random_candidate(stored, settings.random_seed + 1 + i), name=f"random-{settings.random_seed + 1 + i}")
        for i in range(n_random)
    ]
    x0 = samples["x0"][: len(seeds)]
    originals = {int(s): x0[i] for i, s in enumerate(seeds)}
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), config.edit.t_edit, config.edit.t_edit_max)
    effects, _ = edit_and_measure(
        sampler, seeds, originals, randoms, settings.scales, labeller, thresholds,
        edit_steps=edit_steps, asymmetric=config.edit.asymmetric, batch_size=settings.batch_size,
    )  # fmt: skip
    return effects, norm_per_scale(randoms[0], edit_steps)


def changed_at_norm(effects: pd.DataFrame, attribute: str, norm: float, norm_per_scale: float) -> float:
    """The share of samples whose ``attribute`` decision changes at ``norm``, interpolated in |scale|
    over each sign's edits (scale 0: none), the two signs averaged."""
    rows = effects[effects["attribute"] == attribute]
    target = norm / norm_per_scale
    rates = []
    for sign in (-1.0, 1.0):
        side = rows[np.sign(rows["scale"]) == sign].assign(scale=lambda r: r["scale"].abs()).sort_values("scale")
        scales = np.concatenate([[0.0], side["scale"].to_numpy()])
        values = np.concatenate([[0.0], side["changed_decision"].to_numpy(dtype=float)])
        rates.append(np.interp(target, scales, values) if target <= scales.max() else np.nan)
    return float(np.nanmean(rates))


def floor_table(best: pd.DataFrame, effects: dict[str, pd.DataFrame], norm_per_scale: float, binary: list[str]) -> pd.DataFrame:
    rows = []
    for _, row in best.iterrows():
        others = [b for b in binary if b != row["attribute"]]
        per_random = [
            max(changed_at_norm(table, other, float(row["norm"]), norm_per_scale) for other in others) for table in effects.values()
        ]
        rows.append({
            "attribute": row["attribute"], "side": row["side"], "direction": row["direction"],
            "norm": float(row["norm"]), "leak_decision": float(row["leak_decision"]),
            "random_leak_median": float(np.nanmedian(per_random)), "random_leak_min": float(np.nanmin(per_random)),
            "random_leak_max": float(np.nanmax(per_random)),
        })  # fmt: skip
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    from hmine.benchmark.table import best_per_attribute
    from hmine.config import load_config
    from hmine.stages.benchmark import read_benchmark

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--random", type=int, default=4, help="random directions (seeds after the benchmark's)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    best = best_per_attribute(read_benchmark(config.run_dir))
    best = best[best["reached"].astype(bool)]
    effects, per_scale = random_leakage(config, args.random)
    table = floor_table(best, effects, per_scale, list(config.label.attributes))
    print(table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
