"""Why the demo's probe/is_circle flips few inverted world images (docs/inversion.md, section 3).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/inversion_is_circle.py --n 32 \
        --out stores/inversion-figures/is-circle-32.json

On the first ``--n`` rendered world images (``world.generate(n, 0)``), inverted edit-friendly
and with DDIM (10 steps), and on the demo-like run's first ``--n`` samples (from their seeds,
eta 0, as the run sampled them), each edited towards the far side of ``--attribute``
(the world classifier's decision on the unedited image) at several scales along the run's
``probe/<attribute>`` and ``mean_difference/<attribute>``, Asyrp's asymmetric step at every
step, as scripts/inversion_figures.py does:

- the far-side flip rate per scale (both ways), and the share of edited images the
  classifier leaves undecided (score between 0.1 and 0.9);
- where the images' h lie along the probe: per step, the mean of ``h . u / scale_unit``
  over the images of each class, inverted images against the run's first 256 samples, so
  the distance an edit of scale s has to cover is read in the same units as s.

A strip of the first 8 edit-friendly inverted images at each scale of the probe is written
beside the figures (``<out>.png``: rows images, columns scales) to look at what the
classifier scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _projections(h: np.ndarray, unit: np.ndarray, scale_unit: np.ndarray, positive: np.ndarray) -> dict:
    """Per step: the class means of h . u / scale_unit, and their gap, in the edit's scale units."""
    along = np.einsum("nschw,schw->ns", h.astype(np.float64), unit) / scale_unit[None]
    mean_pos, mean_neg = along[positive].mean(0), along[~positive].mean(0)
    return {"positive_mean": np.round(mean_pos, 2).tolist(), "negative_mean": np.round(mean_neg, 2).tolist(),
            "gap": np.round(mean_pos - mean_neg, 2).tolist(), "std_within": np.round(
                np.sqrt((((along - np.where(positive[:, None], mean_pos, mean_neg)) ** 2).mean(0))), 2).tolist()}


def _sweep(sampler, inversion, directions, name, attribute, scales, labeller) -> dict:
    from hmine.inversion.edits import edit_inverted

    before = labeller.score(inversion.images.numpy())[attribute].to_numpy() > 0.5
    signs = np.where(before, -1.0, 1.0)
    t0 = time.perf_counter()
    edited = edit_inverted(sampler, inversion, directions, name, np.outer(scales, signs), asymmetric=True)
    out = {"n_negative": int((~before).sum()), "n_positive": int(before.sum()), "per_scale": {}}
    for scale, images in zip(scales, edited):
        score = labeller.score(images)[attribute].to_numpy()
        flipped = (score > 0.5) != before
        out["per_scale"][f"{scale:g}"] = {
            "flip_rate": round(float(flipped.mean()), 3),
            "to_positive": round(float(flipped[~before].mean()), 3) if (~before).any() else None,
            "to_negative": round(float(flipped[before].mean()), 3) if before.any() else None,
            "undecided": round(float(((score > 0.1) & (score < 0.9)).mean()), 3),
            "flipped": flipped.astype(int).tolist(),  # per image, for the breakdown by true factor
        }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, edited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("stores/demo-inversion-figures-1024"))
    parser.add_argument("--out", type=Path, default=Path("stores/inversion-figures/is-circle-32.json"))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--attribute", default="is_circle")
    parser.add_argument("--scales", type=float, nargs="+", default=[20.0, 40.0, 80.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import xarray as xr

    from hmine import world
    from hmine.config import LabelConfig
    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import write_strip
    from hmine.inversion import invert
    from hmine.inversion.regenerate import Inversion
    from hmine.labelling import make_labeller
    from hmine.models import load_model
    from hmine.sampling import Sampler, noise_for_seed

    model, labeller = load_model(), make_labeller(LabelConfig())
    demo = open_directions(args.run / "directions.zarr")
    figures: dict = {"n": args.n, "attribute": args.attribute, "scales": args.scales, "run": str(args.run)}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # whole files only
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps(figures, indent=2))
        partial.replace(args.out)

    ef_sampler = Sampler(model, num_inference_steps=10, eta=1.0, torch_threads=args.threads)
    ddim_sampler = Sampler(model, num_inference_steps=10, eta=0.0, torch_threads=args.threads)
    rendered = world.generate(args.n, 0)
    images = torch.from_numpy(rendered.images)
    figures["world_shape"] = rendered.factors["shape"].tolist()  # the images' true shape index (world.SHAPES)
    ef = invert(ef_sampler, images, "edit_friendly", seeds=list(range(args.n)))
    samples = xr.open_zarr(args.run / "samples.zarr", consolidated=False)
    seeds = samples["sample"].values[: args.n].tolist()
    draws = [noise_for_seed(s, model.sample_shape, 10) for s in seeds]
    as_inversion = Inversion("ddim", torch.stack([d[0] for d in draws]), None, [0.0] * 10, ddim_sampler.timesteps,
                             images=torch.from_numpy(np.asarray(samples["x0"].values[: args.n], dtype=np.float32)))

    probe = direction_by_name(demo, f"probe/{args.attribute}")
    unit, scale_unit = probe["direction"].values.astype(np.float64), probe["scale_unit"].values.astype(np.float64)
    ef_positive = labeller.score(ef.images.numpy())[args.attribute].to_numpy() > 0.5
    sample_h = samples["h"].isel(sample=slice(0, 256)).values
    labels = __import__("pandas").read_parquet(args.run / "labels.parquet")
    sample_positive = labels.loc[samples["sample"].values[:256], args.attribute].to_numpy() > 0.5
    figures["steps"] = ef_sampler.timesteps.tolist()
    figures["probe_accuracy"] = np.round(probe["probe_accuracy"].values, 3).tolist()
    figures["along_probe_in_scale_units"] = {
        "edit_friendly_inverted": _projections(ef.h.numpy(), unit, scale_unit, ef_positive),
        "first_256_samples": _projections(sample_h, unit, scale_unit, sample_positive)}
    save()
    print(json.dumps(figures["along_probe_in_scale_units"]), flush=True)

    sweeps = figures["far_side_sweeps"] = {}
    ddim = None
    for source in ["edit_friendly", "samples", "ddim_10_steps"]:
        if source == "ddim_10_steps":
            ddim = invert(ddim_sampler, images, "ddim")
        inversion, sampler = {"edit_friendly": (ef, ef_sampler), "samples": (as_inversion, ddim_sampler),
                              "ddim_10_steps": (ddim, ddim_sampler)}[source]
        for method in ["probe", "mean_difference"]:
            name = f"{method}/{args.attribute}"
            result, edited = _sweep(sampler, inversion, demo, name, args.attribute, args.scales, labeller)
            sweeps.setdefault(source, {})[name] = result
            save()
            print(source, name, json.dumps(result), flush=True)
            if source == "edit_friendly" and method == "probe":
                shown = np.concatenate([inversion.images.numpy()[None, :8], edited[:, :8]])
                write_strip(np.swapaxes(shown, 0, 1), args.out.with_suffix(".png"), upscale=2)


if __name__ == "__main__":
    main()
