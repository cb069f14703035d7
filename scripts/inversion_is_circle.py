"""Why a probe of the demo flips few inverted world images (docs/inversion.md, sections 5 and 6).

    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/inversion_is_circle.py --n 32 \
        --out stores/inversion-figures/is-circle-32.json
    nice -n 10 env OMP_NUM_THREADS=1 .venv/bin/python scripts/inversion_is_circle.py --n 32 \
        --attribute is_red --sources ddim_50_steps edit_friendly_50_steps --out stores/inversion-figures/is-red-32-50.json

On the first ``--n`` rendered world images (``world.generate(n, 0)``), inverted by each of
``--sources`` (``edit_friendly`` and ``ddim_10_steps``: 10 steps; ``<method>_<k>_steps``: k
steps, ``ddim_<k>_steps_refine_<r>``: DDIM with r fixed-point refinements per step), and on the
demo-like run's first ``--n`` samples (``samples``: from their seeds, eta 0, as the run sampled
them), each edited towards the far side of ``--attribute`` (the world classifier's decision on
the unedited image) at several scales along the run's ``<method>/<attribute>`` for each of
``--methods``, Asyrp's asymmetric step (``--symmetric``: the plain step) at every step, as
scripts/inversion_figures.py does. With k steps other than the run's 10, every step takes the
direction and scale unit of the nearest fitted timestep (900 for 980-860, 800 for 840-760, ...),
so the edit adds the same h offset per step over about as much of the trajectory.

- the far-side flip rate per scale (both ways), and the share of edited images the
  classifier leaves undecided (score between 0.1 and 0.9);
- how often the classifier's decision on each unedited (regenerated) image agrees with its
  true factor;
- where the images' h lie along the probe: per step, the mean of ``h . u / scale_unit``
  over the images of each class, each inversion's images (and the run's first 256 samples),
  so the distance an edit of scale s has to cover is read in the same units as s;
- the statistics of each source's x_T against a standard Gaussian's (std 1, lag-1 spatial
  autocorrelation 0, per-channel spatial mean with std 1/sqrt(H W), unrelated to the image):
  whether DDIM's x_T is off the sampler's starting distribution, and carries the attribute.

A strip of the first 8 images of each source at each scale of the first method is written
beside the figures (``<out>.png`` for ``edit_friendly``, ``<out>-<source>.png`` for the others:
rows images, columns scales) to look at what the classifier scores.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

SOURCE = re.compile(r"^(?P<method>edit_friendly|ddim)(_(?P<steps>\d+)_steps)?(_refine_(?P<refine>\d+))?$")


def _projections(h: np.ndarray, unit: np.ndarray, scale_unit: np.ndarray, positive: np.ndarray) -> dict:
    """Per step: the class means of h . u / scale_unit, and their gap, in the edit's scale units."""
    along = np.einsum("nschw,schw->ns", h.astype(np.float64), unit) / scale_unit[None]
    mean_pos, mean_neg = along[positive].mean(0), along[~positive].mean(0)
    return {"positive_mean": np.round(mean_pos, 2).tolist(), "negative_mean": np.round(mean_neg, 2).tolist(),
            "gap": np.round(mean_pos - mean_neg, 2).tolist(), "std_within": np.round(
                np.sqrt((((along - np.where(positive[:, None], mean_pos, mean_neg)) ** 2).mean(0))), 2).tolist()}


def _x_T_statistics(x_T: torch.Tensor, images: torch.Tensor, positive: np.ndarray) -> dict:
    """x_T against a standard Gaussian of its shape (whose values are given in brackets in the keys' docs).

    std (1), lag-1 horizontal autocorrelation (0), per channel: the std over images of the
    spatial mean times sqrt(H W) (1), the class means' difference of the spatial mean times
    sqrt(H W) (0 +- 2 / sqrt(n)) and the correlation over images of x_T's spatial mean with the
    image's (0); and each image's spatial means times sqrt(H W) (standard normal).
    """
    x = x_T.double().numpy()
    n, channels, height, width = x.shape
    root_hw = np.sqrt(height * width)
    means = x.mean((2, 3))
    centred = x - means[:, :, None, None]
    lag1 = (centred[..., 1:] * centred[..., :-1]).mean() / (centred**2).mean()
    image_means = images.double().numpy().mean((2, 3))

    def rounded(values):
        return np.round(values, 3).tolist()

    return {
        "std": round(float(x.std()), 3),
        "lag1_autocorrelation": round(float(lag1), 3),
        "channel_mean_std_x_sqrt_hw": rounded(means.std(0) * root_hw),
        "channel_mean_positive_minus_negative_x_sqrt_hw": rounded(
            (means[positive].mean(0) - means[~positive].mean(0)) * root_hw) if positive.any() and (~positive).any()
        else None,
        "channel_mean_correlation_with_image": rounded(
            [np.corrcoef(means[:, c], image_means[:, c])[0, 1] for c in range(channels)]),
        "channel_mean_x_sqrt_hw_per_image": rounded(means * root_hw),  # (image, channel), for per-image breakdowns
    }


def _on_schedule(directions, names: list[str], timesteps: np.ndarray):
    """``names`` of ``directions`` with every one of ``timesteps`` taking its nearest fitted step."""
    from hmine.directions import direction_by_name

    fitted = np.asarray(direction_by_name(directions, names[0])["step"].values)
    if np.array_equal(fitted, timesteps):
        return directions
    names_all = np.asarray(directions["name"].values).astype(str)
    picked = directions.isel(direction=[int(np.flatnonzero(names_all == n)[0]) for n in names])
    nearest = np.abs(timesteps[:, None] - fitted[None]).argmin(1)  # ties: the larger timestep (fitted descends)
    return picked.isel(step=nearest).assign_coords(step=timesteps, step_index=("step", np.arange(len(timesteps))))


def _sweep(sampler, inversion, directions, name, attribute, scales, labeller, asymmetric=True) -> dict:
    from hmine.inversion.edits import edit_inverted

    from hmine.world import BINARY_ATTRIBUTES

    decided = labeller.score(inversion.images.numpy()) > 0.5
    before = decided[attribute].to_numpy()
    others = [a for a in BINARY_ATTRIBUTES if a != attribute and a in decided.columns]
    signs = np.where(before, -1.0, 1.0)
    t0 = time.perf_counter()
    edited = edit_inverted(sampler, inversion, directions, name, np.outer(scales, signs), asymmetric=asymmetric)
    out = {"n_negative": int((~before).sum()), "n_positive": int(before.sum()), "per_scale": {}}
    for scale, images in zip(scales, edited):
        scores = labeller.score(images)
        score = scores[attribute].to_numpy()
        flipped = (score > 0.5) != before
        changed = {a: float(((scores[a].to_numpy() > 0.5) != decided[a].to_numpy()).mean()) for a in others}
        out["per_scale"][f"{scale:g}"] = {
            "flip_rate": round(float(flipped.mean()), 3),
            "to_positive": round(float(flipped[~before].mean()), 3) if (~before).any() else None,
            "to_negative": round(float(flipped[before].mean()), 3) if before.any() else None,
            "undecided": round(float(((score > 0.1) & (score < 0.9)).mean()), 3),
            # leakage: the largest share of another attribute's decisions the edit changed
            "leakage": round(max(changed.values()), 3) if changed else None,
            "leakage_attribute": max(changed, key=changed.get) if changed else None,
            "flipped": flipped.astype(int).tolist(),  # per image, for the breakdown by true factor
        }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, edited


def _source(name, model, images, run, threads):
    """(sampler, inversion, seconds) of source ``name`` on ``images`` (module doc)."""
    import xarray as xr

    from hmine.inversion import invert
    from hmine.inversion.regenerate import Inversion
    from hmine.sampling import Sampler, noise_for_seed

    t0 = time.perf_counter()
    if name == "samples":
        sampler = Sampler(model, num_inference_steps=10, eta=0.0, torch_threads=threads)
        samples = xr.open_zarr(run / "samples.zarr", consolidated=False)
        n = len(images)
        draws = [noise_for_seed(s, model.sample_shape, 10) for s in samples["sample"].values[:n].tolist()]
        inversion = Inversion("ddim", torch.stack([d[0] for d in draws]), None, [0.0] * 10, sampler.timesteps,
                              images=torch.from_numpy(np.asarray(samples["x0"].values[:n], dtype=np.float32)))
        return sampler, inversion, 0.0
    match = SOURCE.match(name)
    if match is None:
        raise SystemExit(f"--sources: unknown source {name!r}; use samples, edit_friendly[_<k>_steps] or "
                         "ddim_<k>_steps[_refine_<r>]")
    method, steps, refine = match["method"], int(match["steps"] or 10), int(match["refine"] or 0)
    sampler = Sampler(model, num_inference_steps=steps, eta=1.0 if method == "edit_friendly" else 0.0,
                      torch_threads=threads)
    if method == "edit_friendly":
        inversion = invert(sampler, images, "edit_friendly", seeds=list(range(len(images))))
    else:
        inversion = invert(sampler, images, "ddim", refine=refine)
    return sampler, inversion, round(time.perf_counter() - t0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("stores/demo-inversion-figures-1024"))
    parser.add_argument("--out", type=Path, default=Path("stores/inversion-figures/is-circle-32.json"))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--attribute", default="is_circle")
    parser.add_argument("--scales", type=float, nargs="+", default=[20.0, 40.0, 80.0])
    parser.add_argument("--sources", nargs="+", default=["edit_friendly", "samples", "ddim_10_steps"])
    parser.add_argument("--methods", nargs="+", default=["probe", "mean_difference"])
    parser.add_argument("--symmetric", action="store_true", help="the plain step instead of Asyrp's asymmetric one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", nargs="+", type=Path, help="print these figures files as markdown tables and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return

    import pandas as pd
    import xarray as xr

    from hmine import world
    from hmine.config import LabelConfig
    from hmine.directions import direction_by_name, open_directions
    from hmine.editing import write_strip
    from hmine.labelling import make_labeller
    from hmine.models import load_model

    model, labeller = load_model(), make_labeller(LabelConfig())
    demo = open_directions(args.run / "directions.zarr")
    names = [f"{method}/{args.attribute}" for method in args.methods]
    figures: dict = {"n": args.n, "attribute": args.attribute, "scales": args.scales, "run": str(args.run),
                     "asymmetric": not args.symmetric, "sources": args.sources, "methods": args.methods}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # whole files only
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps(figures, indent=2))
        partial.replace(args.out)

    rendered = world.generate(args.n, 0)
    images = torch.from_numpy(rendered.images)
    truth = world.binary_attributes(rendered.factors)[args.attribute]
    figures["world_factors"] = {k: np.asarray(v).tolist() for k, v in rendered.factors.items()}
    figures["world_shape"] = rendered.factors["shape"].tolist()  # the images' true shape index (world.SHAPES)
    probe = direction_by_name(demo, f"probe/{args.attribute}")
    figures["steps"] = probe["step"].values.tolist()
    figures["probe_accuracy"] = np.round(probe["probe_accuracy"].values, 3).tolist()
    samples = xr.open_zarr(args.run / "samples.zarr", consolidated=False)
    labels = pd.read_parquet(args.run / "labels.parquet")
    sample_positive = labels.loc[samples["sample"].values[:256], args.attribute].to_numpy() > 0.5
    along = figures["along_probe_in_scale_units"] = {"first_256_samples": _projections(
        samples["h"].isel(sample=slice(0, 256)).values, probe["direction"].values.astype(np.float64),
        probe["scale_unit"].values.astype(np.float64), sample_positive)}
    sweeps = figures["far_side_sweeps"] = {}
    agreement = figures["unedited_agrees_with_truth"] = {}
    x_T_stats = figures["x_T_statistics"] = {}
    save()
    for source in args.sources:
        sampler, inversion, seconds = _source(source, model, images, args.run, args.threads)
        directions = _on_schedule(demo, names, sampler.timesteps.numpy())
        positive = labeller.score(inversion.images.numpy())[args.attribute].to_numpy() > 0.5
        x_T_stats[source] = _x_T_statistics(inversion.x_T, inversion.images, positive)
        if source != "samples":
            agreement[source] = round(float((positive == truth).mean()), 3)
            on_steps = direction_by_name(directions, f"probe/{args.attribute}")
            along[source] = _projections(inversion.h.numpy(), on_steps["direction"].values.astype(np.float64),
                                         on_steps["scale_unit"].values.astype(np.float64), positive)
            along[source]["steps"] = sampler.timesteps.tolist()
        save()
        print(source, f"inverted in {seconds} s", json.dumps(x_T_stats[source]), flush=True)
        for name in names:
            result, edited = _sweep(sampler, inversion, directions, name, args.attribute, args.scales, labeller,
                                    asymmetric=not args.symmetric)
            sweeps.setdefault(source, {})[name] = result
            save()
            print(source, name, json.dumps({k: v["flip_rate"] for k, v in result["per_scale"].items()}), flush=True)
            if name == names[0]:
                shown = np.concatenate([inversion.images.numpy()[None, :8], edited[:, :8]])
                strip = args.out.with_suffix(".png") if source == "edit_friendly" else \
                    args.out.with_name(f"{args.out.stem}-{source}.png")
                write_strip(np.swapaxes(shown, 0, 1), strip, upscale=2)


def _sweep_cell(result: dict | None) -> str:
    """'rate (to positive / to negative)', with the leakage where it was recorded."""
    if result is None:
        return "-"

    def rate(value):
        return "-" if value is None else f"{value:.2f}"

    cell = f"{result['flip_rate']:.2f} ({rate(result['to_positive'])} / {rate(result['to_negative'])})"
    return cell if result.get("leakage") is None else f"{cell}, leakage {result['leakage']:.2f}"


def markdown(paths: list[Path]) -> str:
    """Far-side sweeps, x_T statistics and class gaps along the probe of figures files, as markdown tables."""
    out = []

    def table(header, rows):
        out.extend(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        out.append("")

    def rate(value):
        return "-" if value is None else f"{value:.2f}"

    files = [json.loads(Path(p).read_text()) for p in paths]
    scales = sorted({s for f in files for s in f["scales"]})
    n = sorted({f["n"] for f in files})

    def label(source, f):  # the number of images too where the files differ in it
        return source if len(n) == 1 else f"{source} ({f['n']} images)"

    rows = []
    for f in files:
        step = "asymmetric" if f.get("asymmetric", True) else "symmetric"
        for source, sweeps in f["far_side_sweeps"].items():
            for name, sweep in sweeps.items():
                cells = [sweep["per_scale"].get(f"{s:g}") for s in scales]
                rows.append([label(source, f), step, name, *(_sweep_cell(c) for c in cells)])
    table(["source", "step", f"direction ({'/'.join(map(str, n))} images)", *(f"{s:g}" for s in scales)], rows)
    stats = {label(source, f): (f["unedited_agrees_with_truth"].get(source), v) for f in files
             for source, v in f.get("x_T_statistics", {}).items()}
    if stats:
        table(["x_T of", "unedited agrees with truth", "std (1)", "lag-1 autocorrelation (0)",
               "channel mean std x sqrt(HW), R/G/B (1)", "positive - negative channel mean x sqrt(HW), R/G/B (0)",
               "correlation of channel mean with the image's, R/G/B (0)"],
              [[source, rate(agree), v["std"], v["lag1_autocorrelation"],
                " / ".join(f"{x:.2f}" for x in v["channel_mean_std_x_sqrt_hw"]),
                " / ".join(f"{x:.2f}" for x in v["channel_mean_positive_minus_negative_x_sqrt_hw"] or []),
                " / ".join(f"{x:.2f}" for x in v["channel_mean_correlation_with_image"])]
               for source, (agree, v) in stats.items()])
    along = {k if k == "first_256_samples" else label(k, f): v for f in files
             for k, v in f.get("along_probe_in_scale_units", {}).items()}
    shown = [900, 700, 500, 300, 100, 0]
    rows = []
    for source, v in along.items():
        steps = v.get("steps", files[0]["steps"])
        at = [steps.index(t) if t in steps else None for t in shown]
        rows.append([source, *("-" if i is None else f"{v['gap'][i]:.2f} ({v['std_within'][i]:.2f})" for i in at)])
    table(["class gap along the probe, scale units (within-class std)", *map(str, shown)], rows)
    return "\n".join(out)


if __name__ == "__main__":
    main()
