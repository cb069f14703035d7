"""Figures of issue 14's "Done means": inversion of rendered world images (CPU; docs/inversion.md).

    .venv/bin/python scripts/inversion_figures.py --run stores/demo-inversion-figures-1024 \
        --out stores/inversion-figures/figures.json

``--run`` is a demo-like run (configs/demo.yaml's sample, label and directions stages) whose
directions.zarr, samples.zarr and labels.parquet are "the demo's".

1. Reproduction max abs error of edit-friendly inversion then regeneration (scale 0) on the
   embedded model (256 rendered world images, 10 steps), a tiny random pixel U-Net and a
   tiny random latent (VQ, scaling_factor 0.5) model (8 smooth random images each).
2. DDIM inversion's reconstruction PSNR on the same 256 images at 10 and 50 steps.
3. Flip rates of the demo's probe directions (``--directions``, the demo run's
   directions.zarr) applied to the 256 inverted images, on the far side of each binary
   factor: an image the classifier scores negative (<= 0.5) on its regenerated, unedited
   image is edited at +scale, a positive one at -scale, with the demo's edit settings
   (asymmetric step, every step); the flip rate is the share whose decision changes.
   Edit-friendly and DDIM inversion both.
4. Probe directions fitted on the edit-friendly inversions' h with the images' *true*
   labels against the demo's (fitted on samples with classifier labels): the angle between
   them per step (with, for scale, the angle between the demo's probes and probes fitted
   on only its first N samples with their classifier labels), and flip rates of each set
   on the other's images and on its own (same far-side rule): the inversion-fitted probes
   on the demo's first 64 samples and on the first 64 edit-friendly inverted images, the
   demo's on its first 64 samples (its on the inverted images are 3.).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ATTRIBUTES = ["is_circle", "is_red", "is_large", "is_left", "is_top", "is_light_bg"]


def _tiny_models(folder: Path):
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel, VQModel

    def unet(size):
        torch.manual_seed(0)
        return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           norm_num_groups=4)

    pixel = folder / "tiny-pixel"
    unet(16).save_pretrained(pixel)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(pixel)
    latent = folder / "tiny-latent"
    unet(8).save_pretrained(latent / "unet")
    torch.manual_seed(2)
    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                 latent_channels=3, norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3, scaling_factor=0.5)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    vq.save_pretrained(latent / "vqvae")
    DDIMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(latent / "scheduler")
    return pixel, latent


def _smooth_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, size // 4, size // 4), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _batched_invert(sampler, images, method, batch=64, first_seed=0, **kwargs):
    """Inversions of ``images`` in batches; image k draws with seed first_seed + k (edit-friendly)."""
    from hmine.inversion import Inversion, invert

    parts = [invert(sampler, images[i:i + batch], method, **kwargs,
                    seeds=list(range(first_seed + i, first_seed + min(i + batch, len(images)))))
             for i in range(0, len(images), batch)]

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    inversion = Inversion(parts[0].method, cat("x_T"), cat("z"), parts[0].etas, parts[0].timesteps, cat("residual"),
                          cat("target"), cat("images"), cat("h"), cat("reconstruction_error"), cat("target_error"))
    return inversion


def _far_side_flips(sampler, inversion, directions, name, attribute, scale, labeller, batch=64):
    """Share of images whose decision on ``attribute`` flips when edited towards the far side."""
    from hmine.inversion.edits import edit_inverted
    from hmine.inversion.regenerate import Inversion

    before = labeller.score(inversion.images.numpy())[attribute].to_numpy() > 0.5
    flipped = []
    for i in range(0, len(before), batch):
        rows = slice(i, i + batch)
        part = Inversion(inversion.method, inversion.x_T[rows], None if inversion.z is None else inversion.z[rows],
                         inversion.etas, inversion.timesteps, None if inversion.residual is None else inversion.residual[rows],
                         images=inversion.images[rows])
        signs = np.where(before[rows], -1.0, 1.0)
        edited = edit_inverted(sampler, part, directions, name, (scale * signs)[None], asymmetric=True)[0]
        after = labeller.score(edited)[attribute].to_numpy() > 0.5
        flipped.append(after != before[rows])
    flipped = np.concatenate(flipped)
    return _flip_rates({"n_negative": int((~before).sum()), "n_positive": int(before.sum()),
                        "flipped_to_positive": int(flipped[~before].sum()), "flipped_to_negative": int(flipped[before].sum())})


def _flip_rates(counts: dict) -> dict:
    """``counts`` with the flip rates they give (None where a side has no images)."""
    neg, pos = counts["n_negative"], counts["n_positive"]
    up, down = counts["flipped_to_positive"], counts["flipped_to_negative"]
    return {"flip_rate": (up + down) / (neg + pos), "to_positive": up / neg if neg else None,
            "to_negative": down / pos if pos else None, **counts}


def _merged(earlier: dict | None, result: dict) -> dict:
    """Flip results of two sets of images as one (counts and seconds add up)."""
    if earlier is None:
        return result
    keys = ["n_negative", "n_positive", "flipped_to_positive", "flipped_to_negative"]
    merged = _flip_rates({k: earlier[k] + result[k] for k in keys})
    merged["seconds"] = round(earlier["seconds"] + result["seconds"], 1)
    return merged


def _probe_flips(sampler, inversion, directions, labeller, scale, record, save, label) -> None:
    """Far-side flips of each ``probe/<attribute>`` of ``directions`` on ``inversion``'s images into ``record``.

    Counts already in ``record`` (earlier images) are added to. ``save`` is called after each
    probe, so that a stopped run keeps the probes it finished.
    """
    for attribute in ATTRIBUTES:
        t0 = time.perf_counter()
        result = _far_side_flips(sampler, inversion, directions, f"probe/{attribute}", attribute, scale, labeller)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        record[f"probe/{attribute}"] = _merged(record.get(f"probe/{attribute}"), result)
        print(label, attribute, record[f"probe/{attribute}"], flush=True)
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("stores/inversion-figures/figures.json"))
    parser.add_argument("--run", type=Path, default=Path("stores/demo-inversion-figures-1024"),
                        help="a demo-like run directory: its directions.zarr, samples.zarr and labels.parquet")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--scale", type=float, default=20.0, help="edit scale (the demo's largest)")
    parser.add_argument("--chunk", type=int, default=64,
                        help="flips: images inverted and edited at a time; the figures are saved after each chunk")
    parser.add_argument("--first", type=int, default=0,
                        help="flips: start at this image of the n (another process can do the first ones)")
    parser.add_argument("--own-n", type=int, default=64,
                        help="fitted: images (and demo samples) each probe set is edited on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every model call")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to skip: reproduction psnr flips fitted")
    parser.add_argument("--markdown", nargs="+", type=Path, help="print these figures files as markdown tables and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    from hmine import world
    from hmine.config import LabelConfig
    from hmine.directions import fit_directions, open_directions
    from hmine.inversion import invert, psnr, regenerate_inverted
    from hmine.labelling import make_labeller
    from hmine.models import load_model
    from hmine.sampling import Sampler

    args.out.parent.mkdir(parents=True, exist_ok=True)
    figures: dict = {"n_images": args.n, "world_seed": 0, "run": str(args.run), "scale": args.scale}
    args.directions, args.samples = args.run / "directions.zarr", args.run / "samples.zarr"

    def save():  # whole files only: --markdown may read it while the run goes on
        partial = args.out.with_suffix(".partial")
        partial.write_text(json.dumps(figures, indent=2))
        partial.replace(args.out)

    model = load_model()
    batch = world.generate(args.n, 0)
    images = torch.from_numpy(batch.images)
    truth = world.binary_attributes(batch.factors)
    started = time.perf_counter()
    ef_sampler = Sampler(model, num_inference_steps=10, eta=1.0, torch_threads=args.threads)
    ddim_sampler = Sampler(model, num_inference_steps=10, eta=0.0, torch_threads=args.threads)
    # the flips section inverts its own chunks
    edit_friendly = ddim10 = None
    if not {"reproduction", "fitted"} <= set(args.skip):
        edit_friendly = _batched_invert(ef_sampler, images, "edit_friendly")
    if "psnr" not in args.skip:
        ddim10 = _batched_invert(ddim_sampler, images, "ddim")
    figures["seconds_inversions"] = round(time.perf_counter() - started, 1)

    if "reproduction" not in args.skip:
        import tempfile

        regenerated = torch.cat([regenerate_inverted(ef_sampler, inv).images for inv in [
            _slice(edit_friendly, i, i + 64) for i in range(0, args.n, 64)]])
        rep = {"embedded_256_world_images": float((regenerated - images).abs().max()),
               "embedded_residual_max": float(edit_friendly.residual_max.max()),
               "embedded_residual_median": float(edit_friendly.residual_max.median())}
        with tempfile.TemporaryDirectory() as tmp:
            pixel_dir, latent_dir = _tiny_models(Path(tmp))
            pixel = Sampler(load_model(str(pixel_dir)), num_inference_steps=10, eta=1.0)
            small = _smooth_images(8, 16)
            inv = invert(pixel, small, "edit_friendly")
            rep["tiny_pixel"] = float((regenerate_inverted(pixel, inv).images - small).abs().max())
            latent_model = load_model(str(latent_dir))
            latent = Sampler(latent_model, num_inference_steps=10, eta=1.0)
            inv = invert(latent, small, "edit_friendly")
            rep["tiny_latent_vs_decoded_target"] = float(
                (regenerate_inverted(latent, inv).images - latent_model.decode(inv.target)).abs().max())
            rep["tiny_latent_autoencoder_error"] = float((latent_model.decode(inv.target) - small).abs().max())
        figures["edit_friendly_reproduction_max_abs"] = rep
        save()
        print("reproduction", rep, flush=True)

    if "psnr" not in args.skip:
        out = {}
        for steps, inv in [(10, ddim10), (50, None)]:
            t0 = time.perf_counter()
            if inv is None:
                inv = _batched_invert(Sampler(model, num_inference_steps=steps, eta=0.0, torch_threads=args.threads), images, "ddim")
            values = psnr(inv.images, images).numpy()
            out[f"ddim_{steps}_steps"] = {
                "psnr_median": float(np.median(values)), "psnr_min": float(values.min()),
                "psnr_mean": float(values.mean()), "psnr_p10": float(np.percentile(values, 10)),
                "max_abs_error_median": float(inv.reconstruction_error.median()),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        figures["ddim_reconstruction"] = out
        save()
        print("psnr", out, flush=True)

    if {"flips", "fitted"} <= set(args.skip):
        figures["seconds_total"] = round(time.perf_counter() - started, 1)
        save()
        return
    labeller = make_labeller(LabelConfig())
    demo = open_directions(args.directions)
    if "flips" not in args.skip:
        flips = figures["demo_probe_flips_on_inverted_world_images"] = {}
        agree = {}
        figures["flips_first_image"] = args.first
        for start in range(args.first, args.n, args.chunk):
            stop = min(start + args.chunk, args.n)
            for label, method, sampler in [("edit_friendly", "edit_friendly", ef_sampler),
                                           ("ddim_10_steps", "ddim", ddim_sampler)]:
                inv = _batched_invert(sampler, images[start:stop], method, first_seed=start)
                decided = labeller.score(inv.images.numpy())
                agree[label] = agree.get(label, 0) + np.array(
                    [((decided[a].to_numpy() > 0.5) == truth[a][start:stop]).sum() for a in ATTRIBUTES])
                flips.setdefault(label, {})["reconstruction_agrees_with_truth"] = dict(
                    zip(ATTRIBUTES, (agree[label] / (stop - args.first)).tolist()))
                _probe_flips(sampler, inv, demo, labeller, args.scale, flips[label], save, label)
            figures["flips_n_images"] = stop - args.first  # every probe and method has images first..stop-1
            save()
            print("flips done on", stop, "images", flush=True)

    if "fitted" not in args.skip:
        import pandas as pd
        import xarray as xr

        ids = [f"world-{i}" for i in range(args.n)]
        h = xr.DataArray(edit_friendly.h.numpy(), dims=("sample", "step", "channel", "y", "x"),
                         coords={"sample": ids, "step": ef_sampler.timesteps.numpy()})
        labels = pd.DataFrame({a: truth[a].astype(np.float64) for a in ATTRIBUTES}, index=ids)
        fitted = fit_directions(h, labels, pca_components=2, attributes=ATTRIBUTES, regression=False, top_k=64)
        angles = {attribute: _angles(fitted, demo, f"probe/{attribute}") for attribute in ATTRIBUTES}
        figures["probe_angle_inverted_true_labels_vs_demo_degrees_per_step"] = {
            "steps": ef_sampler.timesteps.tolist(), **angles}
        # for scale: the demo's probes against probes fitted on only its first n samples
        demo_h = xr.open_zarr(args.samples, consolidated=False)["h"].isel(sample=slice(0, args.n)).astype("float32")
        demo_labels = pd.read_parquet(args.run / "labels.parquet").loc[demo_h["sample"].values, ATTRIBUTES]
        subset = fit_directions(demo_h.load(), demo_labels, pca_components=2, attributes=ATTRIBUTES, regression=False,
                                top_k=64)
        figures[f"probe_angle_first_{args.n}_samples_vs_demo_degrees_per_step"] = {
            "steps": ef_sampler.timesteps.tolist(),
            **{a: _angles(subset, demo, f"probe/{a}") for a in ATTRIBUTES}}
        save()
        print("angles", angles, figures[f"probe_angle_first_{args.n}_samples_vs_demo_degrees_per_step"], flush=True)
        own_n = figures["own_n"] = min(args.own_n, args.n)
        # the inversion-fitted probes edited onto the demo's first own_n samples (their own seeds' noise)
        samples = xr.open_zarr(args.samples, consolidated=False)
        seeds = samples["sample"].values[:own_n].tolist()
        demo_sampler = Sampler(model, num_inference_steps=10, eta=0.0, torch_threads=args.threads)
        from hmine.inversion.regenerate import Inversion
        from hmine.sampling import noise_for_seed

        draws = [noise_for_seed(s, model.sample_shape, 10) for s in seeds]
        as_inversion = Inversion("ddim", torch.stack([d[0] for d in draws]), None, [0.0] * 10, demo_sampler.timesteps,
                                 images=torch.from_numpy(np.asarray(samples["x0"].values[:own_n], dtype=np.float32)))
        figures["inversion_fitted_probe_flips_on_demo_samples"] = {}
        _probe_flips(demo_sampler, as_inversion, fitted, labeller, args.scale,
                     figures["inversion_fitted_probe_flips_on_demo_samples"], save, "fitted-on-samples")
        # each set of probes on its own images too (the demo's on the inverted images: section 3)
        figures["inversion_fitted_probe_flips_on_first_inverted_images"] = {}
        _probe_flips(ef_sampler, _slice(edit_friendly, 0, own_n), fitted, labeller, args.scale,
                     figures["inversion_fitted_probe_flips_on_first_inverted_images"], save, "fitted-on-inversions")
        figures["demo_probe_flips_on_demo_samples"] = {}
        _probe_flips(demo_sampler, as_inversion, demo, labeller, args.scale, figures["demo_probe_flips_on_demo_samples"],
                     save, "demo-on-samples")
    figures["seconds_total"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(figures, indent=2))


def markdown(paths: list[Path]) -> str:
    """The figures of one or more figures JSON files as markdown tables (docs/inversion.md)."""
    figures = {}
    for path in paths:
        one = json.loads(Path(path).read_text())
        if "demo_probe_flips_on_inverted_world_images" in one:  # its own n, not a later file's
            one.setdefault("flips_n_images", one["n_images"])
            if "demo_probe_flips_on_inverted_world_images" in figures:  # another range of images: add up
                one = _flips_of_both(figures, one)
        figures.update(one)
    out = []

    def table(header, rows):
        out.extend(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)])
        out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        out.append("")

    if "edit_friendly_reproduction_max_abs" in figures:
        rep = figures["edit_friendly_reproduction_max_abs"]
        table(["model", "max abs error (pixel units in [-1, 1])"], [
            [f"embedded, {figures['n_images']} rendered world images, 10 steps", f"{rep['embedded_256_world_images']:.2g}"],
            ["tiny random pixel U-Net, 8 images", f"{rep['tiny_pixel']:.2g}"],
            ["tiny random latent (VQ, scaling_factor 0.5), 8 images: against decode(encode(image))",
             f"{rep['tiny_latent_vs_decoded_target']:.2g}"],
            ["the same: the random autoencoder's own error", f"{rep['tiny_latent_autoencoder_error']:.2g}"],
        ])
    if "ddim_reconstruction" in figures:
        table(["DDIM inversion", "PSNR median", "min", "10th pct", "mean", "max abs error (median)"], [
            [k.replace("ddim_", "").replace("_", " "), *(f"{v[c]:.1f}" for c in ("psnr_median", "psnr_min", "psnr_p10", "psnr_mean")),
             f"{v['max_abs_error_median']:.2f}"] for k, v in figures["ddim_reconstruction"].items()])
    flips = figures.get("demo_probe_flips_on_inverted_world_images", {})
    if flips:
        methods = list(flips)
        rows = []
        for a in ATTRIBUTES:
            if all(f"probe/{a}" in flips[m] for m in methods):
                rows.append([f"probe/{a}", *(_flip_cell(flips[m][f"probe/{a}"]) for m in methods)])
        n = figures["flips_n_images"]
        images = ", ".join(f"{a}-{b - 1}" for a, b in _flip_ranges(figures))
        table([f"demo's probe, scale +-{figures.get('scale', 20):g}, {n} images ({images})", *methods], rows)
    own_n = figures.get("own_n", 64)  # files from before --own-n: 64
    figures.setdefault("inversion_fitted_probe_flips_on_first_inverted_images",
                       figures.get("inversion_fitted_probe_flips_on_first_64_inverted_images"))
    cells = [("inversion_fitted_probe_flips_on_demo_samples", f"inversion-fitted on {own_n} demo samples"),
             ("inversion_fitted_probe_flips_on_first_inverted_images", f"inversion-fitted on {own_n} inverted images"),
             ("demo_probe_flips_on_demo_samples", f"demo's on {own_n} demo samples")]
    present = [(k, label) for k, label in cells if figures.get(k)]
    if present:
        table(["probe", *(label for _, label in present)],
              [[f"probe/{a}", *(_flip_cell(figures[k].get(f"probe/{a}")) for k, _ in present)] for a in ATTRIBUTES])
    for key in sorted(k for k in figures if k.startswith("probe_angle")):
        angles = figures[key]
        table(["degrees, " + key.replace("probe_angle_", "").replace("_", " "), *(str(t) for t in angles["steps"])],
              [[a, *angles[a]] for a in ATTRIBUTES if a in angles])
    return "\n".join(out)


def _flip_ranges(figures: dict) -> list[list[int]]:
    """The [first, stop) image ranges a flips figures file (or a sum of them) covers."""
    first = figures.get("flips_first_image", 0)
    return figures.get("flips_ranges", [[first, first + figures["flips_n_images"]]])


def _flips_of_both(earlier: dict, later: dict) -> dict:
    """``later`` with its far-side flips added to ``earlier``'s (disjoint images of one world)."""
    ranges = sorted(_flip_ranges(earlier) + _flip_ranges(later))
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(f"flips files to add up must cover disjoint images, got ranges {ranges}")
    flips = {}
    for method, probes in later["demo_probe_flips_on_inverted_world_images"].items():
        before = earlier["demo_probe_flips_on_inverted_world_images"][method]
        flips[method] = {k: _merged(before[k], v) for k, v in probes.items() if k.startswith("probe/")}
    return {**later, "demo_probe_flips_on_inverted_world_images": flips, "flips_ranges": ranges,
            "flips_n_images": earlier["flips_n_images"] + later["flips_n_images"]}


def _flip_cell(result) -> str:
    """'rate (to positive / to negative)' of a far-side flip result."""
    if not result:
        return "-"

    def rate(value):
        return "-" if value is None else f"{value:.2f}"

    return f"{result['flip_rate']:.2f} ({rate(result['to_positive'])} / {rate(result['to_negative'])})"


def _angles(a, b, name) -> list[float]:
    """Degrees between direction ``name`` of two directions datasets, per step."""
    from hmine.directions import direction_by_name

    ours = direction_by_name(a, name)["direction"].values
    theirs = direction_by_name(b, name)["direction"].values
    ours, theirs = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    return [round(float(np.degrees(np.arccos(np.clip(c, -1, 1)))), 1) for c in cos]


def _slice(inversion, start, stop):
    from hmine.inversion.regenerate import Inversion

    rows = slice(start, stop)
    return Inversion(inversion.method, inversion.x_T[rows], None if inversion.z is None else inversion.z[rows],
                     inversion.etas, inversion.timesteps, None if inversion.residual is None else inversion.residual[rows],
                     images=None if inversion.images is None else inversion.images[rows])


if __name__ == "__main__":
    main()
