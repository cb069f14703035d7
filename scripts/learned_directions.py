"""Learned edits (Asyrp) against the probe and conditional directions on the embedded world (issue 15).

    python scripts/learned_directions.py prepare    # sample, label and directions stages of the config
    python scripts/learned_directions.py learn      # the learn stage: training time and peak memory
    python scripts/learned_directions.py evaluate   # flips and leakage at matched strength, held-out samples
    python scripts/learned_directions.py memory     # peak memory of one training step at 5, 10 and 20 steps

The config is configs/learned-shapes.yaml (``--config`` for another, ``--set key=value``
overrides). The learn stage trains on the run's last ``learn.n_train`` samples; the
evaluation edits the first ``--n`` (default 256), which the training never saw. Every
direction is edited with Asyrp's asymmetric step at every step, scored by the world
classifier, and read at matched strength (:mod:`hmine.strength`: the smallest scale at
which 90 % of the samples on the far side flip, and the other attributes' changed
decisions there). Probe and conditional directions are edited at scales in stds of the
data; learned ones at coefficients of the trained edit (1 = as trained): matched strength
compares them where each flips 90 %, whatever its units. Results go to
``<run>/evaluation/`` (effects.parquet, matched.csv, summary.json, strips) and stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hmine.config import load_config

STATISTICAL_SCALES = [-20.0, -10.0, 2.5, 5.0, 10.0, 20.0]
LEARNED_COEFFICIENTS = [-2.0, -1.0, 0.25, 0.5, 1.0, 2.0]
# --quick: the positive side only (the side the learned edits are trained for), three scales each
QUICK_STATISTICAL_SCALES = [5.0, 10.0, 20.0]
QUICK_LEARNED_COEFFICIENTS = [0.5, 1.0, 2.0]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def prepare(config) -> None:
    from hmine.pipeline import run_stages

    started = time.perf_counter()
    run_stages(config, ("sample", "label", "directions"))
    print(f"prepare: {time.perf_counter() - started:.1f} s")


def learn(config) -> None:
    from hmine.stages.learn import run_learn_stage
    from hmine.stages.sample import make_sampler

    make_sampler(config)  # the model in memory before the baseline: the peak below is the training's
    baseline = _peak_rss_mb()
    started = time.perf_counter()
    run_learn_stage(config)
    record = {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb_before": round(baseline, 1),
              "peak_rss_mb": round(_peak_rss_mb(), 1), "torch_threads": config.sample.torch_threads}  # fmt: skip
    out = config.run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    (out / "learn_run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


def _h_shapes(config):
    from hmine.stores import open_group

    return [tuple(open_group(config.run_dir / "samples.zarr")["h"].shape[2:])]


def _editors(config, attributes, quick: bool = False):
    """name -> ("delta", unit, scale_unit) or ("block", editor), for each attribute's directions
    (without the blocks' mean edits when ``quick``)."""
    from hmine.directions import direction_by_name, open_directions
    from hmine.learning.store import load_block_editor
    from hmine.stages.learn import block_path, learned_path

    directions, learned = open_directions(config.run_dir / "directions.zarr"), open_directions(learned_path(config))
    out = {}
    for a in attributes:
        other = [b for b in attributes if b != a][0]
        for name in (f"probe/{a}", f"conditional/mean_difference/{a}|{other}"):
            d = direction_by_name(directions, name)
            out[name] = ("delta", d["direction"].values, d["scale_unit"].values)
        for name in (f"learned/{a}",) if quick else (f"learned/{a}", f"learned-block-mean/{a}"):
            d = direction_by_name(learned, name)
            out[name] = ("delta", d["direction"].values, d["learned_scale"].values * d["scale_unit"].values)
        out[f"learned-block/{a}"] = ("block", load_block_editor(block_path(config, a)))
    return out


def _edited_images(sampler, seeds, editor, scales, edit_steps, starts) -> np.ndarray:
    """(scale, sample, ...) images of ``seeds`` edited at each scale (0 included: the unedited regeneration)."""
    from hmine.editing import delta_for
    from hmine.learning.apply import images_of, regenerate_learned
    from hmine.regeneration import regenerate

    rows_seeds = [s for _ in scales for s in seeds]
    rows_scale = [k for k in range(len(scales)) for _ in seeds]
    if editor[0] == "delta":
        deltas = torch.stack([delta_for(editor[1], editor[2], scale) for scale in scales])
        images = regenerate(sampler, rows_seeds, deltas, rows_scale, edit_steps=edit_steps, asymmetric=True, batch_size=64,
                            start_states=starts)  # fmt: skip
    else:
        coefficients = [scales[k] for k in rows_scale]
        images = regenerate_learned(sampler, rows_seeds, editor[1], coefficients, edit_steps=edit_steps, batch_size=64,
                                    start_states=starts)  # fmt: skip
    return images_of(images, len(rows_seeds)).reshape(len(scales), len(seeds), *sampler.model.sample_shape)


def evaluate(config, n: int, quick: bool = False) -> None:
    from hmine.editing import write_strip
    from hmine.effects import EFFECT_COLUMNS, _changes
    from hmine.labelling import WorldLabeller
    from hmine.stages.sample import make_sampler
    from hmine.strength import matched_strength, matched_strength_display

    sampler, labeller = make_sampler(config), WorldLabeller()
    seeds = list(range(config.sample.seed_start, config.sample.seed_start + n))
    edit_steps = [True] * sampler.num_inference_steps
    starts = {s: x for s, x in zip(seeds, torch.stack([_x_T(sampler, s) for s in seeds]))}
    attributes, rows, quality = list(config.label.attributes), [], []
    out = config.run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    # scale 0, the unedited regeneration, is the same images for every direction: made once
    zero = torch.zeros((1, sampler.num_inference_steps, *next(iter(_h_shapes(config)))))
    base = _edited_images(sampler, seeds, ("delta", zero[0], np.zeros(sampler.num_inference_steps)), [0.0], edit_steps, starts)[0]
    for name, editor in _editors(config, ["is_red", "is_circle"], quick).items():
        started = time.perf_counter()
        learned = name.startswith("learned")
        if quick:
            scales = QUICK_LEARNED_COEFFICIENTS if learned else QUICK_STATISTICAL_SCALES
        else:
            scales = LEARNED_COEFFICIENTS if learned else STATISTICAL_SCALES
        scales = [0.0, *scales]
        images = np.concatenate([base[None], _edited_images(sampler, seeds, editor, scales[1:], edit_steps, starts)])
        scores = [labeller.score(images[k]) for k in range(len(scales))]
        for k, scale in enumerate(scales):
            for a in attributes:
                change = _changes(scores[0][a].to_numpy(), scores[k][a].to_numpy(), 0.5)
                rows.append({"direction": name, "scale": scale, "attribute": a, **change})
            quality.append({"direction": name, "scale": scale, "mean_abs_pixel_change": float(np.abs(images[k] - images[0]).mean())})
        order = np.argsort(scales)
        write_strip(np.swapaxes(images[order][:, :6], 0, 1), out / f"{name.replace('/', '_').replace('|', '_')}.png", upscale=3)
        print(f"{name}: {len(scales) - 1} scales x {n} samples in {time.perf_counter() - started:.0f} s", flush=True)
    effects = pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))
    effects.to_parquet(out / "effects.parquet")
    pd.DataFrame(quality).to_csv(out / "quality.csv", index=False)
    matched = matched_strength(effects, attributes)
    matched["pixel_change"] = [_pixel_change_at(quality, d, row.scale) for (d, _), row in matched.iterrows()]
    matched.to_csv(out / "matched.csv")
    shown = matched_strength_display(matched)
    shown["pixel change"] = matched["pixel_change"].round(4)
    print(shown.to_string())


def _x_T(sampler, seed: int) -> torch.Tensor:
    from hmine.sampling import noise_for_seed

    return noise_for_seed(seed, sampler.model.sample_shape, sampler.num_inference_steps)[0]


def _pixel_change_at(quality: list[dict], direction: str, scale: float) -> float:
    """Mean |pixel change| interpolated at ``scale`` on its side (NaN when not reached)."""
    if not np.isfinite(scale):
        return float("nan")
    points = sorted((abs(q["scale"]), q["mean_abs_pixel_change"]) for q in quality
                    if q["direction"] == direction and (q["scale"] == 0 or np.sign(q["scale"]) == np.sign(scale)))  # fmt: skip
    xs, ys = zip(*points)
    return float(np.interp(abs(scale), xs, ys))


def memory(config) -> None:
    """Peak RSS of processes that each run one training step (``learn.batch_size`` trajectories) with 5, 10 or 20
    edited steps, and of one that only loads the model and classifier (0)."""
    results, batch = {}, config.learn.batch_size
    for steps in (0, 5, 10, 20):
        code = (
            "import resource, sys, torch, tempfile, pathlib\n"
            "from hmine.models import load_model\nfrom hmine.sampling import Sampler\n"
            "from hmine.learning.editors import DeltaH\nfrom hmine.learning.losses import ClassifierTarget\n"
            "from hmine.learning.train import trajectory_step_losses\nfrom hmine.labelling import WorldLabeller\n"
            f"n = {steps}\ns = Sampler(load_model(), num_inference_steps=max(n, 1), torch_threads=2)\n"
            "loss = ClassifierTarget(WorldLabeller().model, 'is_red', leakage_attributes=['is_circle', 'is_large'])\n"
            f"if n:\n    trajectory_step_losses(s, DeltaH((128, 8, 8), [True] * n), list(range({batch})), loss, [True] * n)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[steps] = round(float(out.stdout.strip().splitlines()[-1]), 1)
        print(f"{steps} edited steps, batch {batch}: peak RSS {results[steps]} MB", flush=True)
    path = config.run_dir / "evaluation"
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.json").write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["prepare", "learn", "evaluate", "memory"])
    parser.add_argument("--config", default="configs/learned-shapes.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--n", type=int, default=256, help="held-out samples to edit (the run's first)")
    parser.add_argument("--quick", action="store_true", help="evaluate: positive scales only, three per direction")
    args = parser.parse_args()
    config = load_config(Path(args.config), args.overrides)
    if args.phase == "evaluate" and args.n + config.learn.n_train > config.sample.n_samples:
        sys.exit(f"--n {args.n} + learn.n_train {config.learn.n_train} exceed sample.n_samples: the evaluation would see training samples")
    {"prepare": prepare, "learn": learn, "memory": memory}.get(args.phase, lambda c: evaluate(c, args.n, args.quick))(config)


if __name__ == "__main__":
    main()
