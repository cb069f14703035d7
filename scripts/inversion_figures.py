"""Figures of issue 14's "Done means": inversion of rendered world images (CPU, ~15 min on 2 busy cores).

    .venv/bin/python scripts/inversion_figures.py --out stores/inversion-figures/figures.json

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
   them per step, and the flip rate of the inversion-fitted directions on the demo's first
   64 samples (same far-side rule).
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


def _batched_invert(sampler, images, method, batch=64, **kwargs):
    from hmine.inversion import Inversion, invert

    parts = [invert(sampler, images[i:i + batch], method, seeds=list(range(i, min(i + batch, len(images)))), **kwargs)
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
    return {
        "flip_rate": float(flipped.mean()),
        "to_positive": float(flipped[~before].mean()) if (~before).any() else None,
        "to_negative": float(flipped[before].mean()) if before.any() else None,
        "n_negative": int((~before).sum()),
        "n_positive": int(before.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("stores/inversion-figures/figures.json"))
    parser.add_argument("--directions", type=Path, default=Path("stores/demo-baseline-45607a4/directions.zarr"))
    parser.add_argument("--samples", type=Path, default=Path("stores/demo-baseline-45607a4/samples.zarr"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--scale", type=float, default=20.0, help="edit scale (the demo's largest)")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to skip: reproduction psnr flips fitted")
    args = parser.parse_args()
    from hmine import world
    from hmine.config import LabelConfig
    from hmine.directions import fit_directions, open_directions
    from hmine.inversion import invert, psnr, regenerate_inverted
    from hmine.labelling import make_labeller
    from hmine.models import load_model
    from hmine.sampling import Sampler

    args.out.parent.mkdir(parents=True, exist_ok=True)
    figures: dict = {"n_images": args.n, "world_seed": 0}

    def save():
        args.out.write_text(json.dumps(figures, indent=2))

    model = load_model()
    batch = world.generate(args.n, 0)
    images = torch.from_numpy(batch.images)
    truth = world.binary_attributes(batch.factors)
    started = time.perf_counter()
    ef_sampler = Sampler(model, num_inference_steps=10, eta=1.0, torch_threads=2)
    ddim_sampler = Sampler(model, num_inference_steps=10, eta=0.0, torch_threads=2)
    edit_friendly = _batched_invert(ef_sampler, images, "edit_friendly")
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
                inv = _batched_invert(Sampler(model, num_inference_steps=steps, eta=0.0, torch_threads=2), images, "ddim")
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

    labeller = make_labeller(LabelConfig())
    demo = open_directions(args.directions)
    if "flips" not in args.skip:
        flips = {}
        for label, inv, sampler in [("edit_friendly", edit_friendly, ef_sampler), ("ddim_10_steps", ddim10, ddim_sampler)]:
            decided = labeller.score(inv.images.numpy())
            flips[label] = {"reconstruction_agrees_with_truth": {
                a: float(((decided[a].to_numpy() > 0.5) == truth[a]).mean()) for a in ATTRIBUTES}}
            for attribute in ATTRIBUTES:
                t0 = time.perf_counter()
                result = _far_side_flips(sampler, inv, demo, f"probe/{attribute}", attribute, args.scale, labeller)
                result["seconds"] = round(time.perf_counter() - t0, 1)
                flips[label][f"probe/{attribute}"] = result
                print(label, attribute, result, flush=True)
                figures["demo_probe_flips_on_inverted_world_images"] = flips
                save()

    if "fitted" not in args.skip:
        import pandas as pd
        import xarray as xr

        ids = [f"world-{i}" for i in range(args.n)]
        h = xr.DataArray(edit_friendly.h.numpy(), dims=("sample", "step", "channel", "y", "x"),
                         coords={"sample": ids, "step": ef_sampler.timesteps.numpy()})
        labels = pd.DataFrame({a: truth[a].astype(np.float64) for a in ATTRIBUTES}, index=ids)
        fitted = fit_directions(h, labels, pca_components=2, attributes=ATTRIBUTES, regression=False, top_k=64)
        from hmine.directions import direction_by_name

        angles = {}
        for attribute in ATTRIBUTES:
            ours = direction_by_name(fitted, f"probe/{attribute}")["direction"].values.reshape(10, -1)
            theirs = direction_by_name(demo, f"probe/{attribute}")["direction"].values.reshape(10, -1)
            cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
            angles[attribute] = [round(float(np.degrees(np.arccos(np.clip(c, -1, 1)))), 1) for c in cos]
        figures["probe_angle_inverted_true_labels_vs_demo_degrees_per_step"] = {
            "steps": ef_sampler.timesteps.tolist(), **angles}
        save()
        print("angles", angles, flush=True)
        # the inversion-fitted probes edited onto the demo's first 64 samples (their own seeds' noise)
        samples = xr.open_zarr(args.samples, consolidated=False)
        seeds = samples["sample"].values[:64].tolist()
        demo_sampler = Sampler(model, num_inference_steps=10, eta=0.0, torch_threads=2)
        from hmine.inversion.regenerate import Inversion
        from hmine.sampling import noise_for_seed

        draws = [noise_for_seed(s, model.sample_shape, 10) for s in seeds]
        as_inversion = Inversion("ddim", torch.stack([d[0] for d in draws]), None, [0.0] * 10, demo_sampler.timesteps,
                                 images=torch.from_numpy(np.asarray(samples["x0"].values[:64], dtype=np.float32)))
        on_samples = {}
        for attribute in ATTRIBUTES:
            on_samples[f"probe/{attribute}"] = _far_side_flips(
                demo_sampler, as_inversion, fitted, f"probe/{attribute}", attribute, args.scale, labeller)
            print("fitted-on-samples", attribute, on_samples[f"probe/{attribute}"], flush=True)
            figures["inversion_fitted_probe_flips_on_demo_samples"] = on_samples
            save()
    figures["seconds_total"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(figures, indent=2))


def _slice(inversion, start, stop):
    from hmine.inversion.regenerate import Inversion

    rows = slice(start, stop)
    return Inversion(inversion.method, inversion.x_T[rows], None if inversion.z is None else inversion.z[rows],
                     inversion.etas, inversion.timesteps, None if inversion.residual is None else inversion.residual[rows])


if __name__ == "__main__":
    main()
