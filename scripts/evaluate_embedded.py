"""Evaluate the embedded DDPM with the embedded classifier (figures for the model cards).

For 10-step DDIM (eta=0) and 10 steps with eta=1 (``--steps`` for other lengths; eta=1 is
DDPM's ancestral sampling on the sub-sequence of timesteps), over N samples: the fraction classified
with confidence >= 0.9 for shape and for colour, and the generated factor frequencies
(including the deliberate circle/red correlation) against the training distribution.

With ``--exact-denoiser N``, the same samplers also run with the exact denoiser of N
world images (:mod:`hmine.world.denoiser`) in place of the U-Net: the frequencies any model
would give under that sampler. The gap between those and the world is the sampler's own;
the gap between the model and them is the model's.

With ``--retention``, also the shape retention of the denoiser: world images noised to
timestep t (x_t ~ q(x_t | x0)) and denoised with the remaining DDIM steps, as a confusion
matrix (rows: true shape, columns: classified shape). A denoiser that is right keeps the
shape at moderate noise, and its errors are symmetric between shapes; a bias there is
the model's, not the sampler's.

    python scripts/evaluate_embedded.py [--n 512] [--json out.json] [--model PATH] [--etas 0 1]
                                        [--exact-denoiser 20000]

``--model`` also takes a DDPM training work dir (``stores/train-*``, see
:mod:`hmine.world.training`) or one of its ``checkpoints/step-*`` folders: its EMA
weights in the shipped model's architecture and scheduler, so a run can be followed while
it trains.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def load_for_evaluation(source: str):
    """A model folder or id through the public loader, or a checkpoint's EMA in the shipped model."""
    from pathlib import Path

    from hmine.models import load_model

    from hmine.world.training import checkpoint_weights

    weights = checkpoint_weights(Path(source), "ema") if Path(source).is_dir() else None
    if weights is None:
        return load_model(source)
    model = load_model("embedded:shapes-ddpm")
    model.unet.load_state_dict(weights)  # the checkpoint's EMA
    model.unet.eval()
    return model


def frequencies(shape: np.ndarray, color: np.ndarray, continuous: dict[str, np.ndarray]) -> dict[str, float]:
    """Discrete factor frequencies, the circle/red correlation, and the binary attributes of
    the continuous factors (size, x, y, background above the middle of their range)."""
    from hmine import world

    out = {f"shape={name}": float((shape == i).mean()) for i, name in enumerate(world.SHAPES)}
    out.update({f"color={name}": float((color == i).mean()) for i, name in enumerate(world.COLORS)})
    circles = shape == 0
    out["red|circle"] = float((color[circles] == 0).mean()) if circles.any() else float("nan")
    out["red|not circle"] = float((color[~circles] == 0).mean()) if (~circles).any() else float("nan")
    binary = world.binary_attributes({"shape": shape, "color": color, **continuous})
    out.update({name: float(binary[name].mean()) for name in ("is_large", "is_left", "is_top", "is_light_bg")})
    return out


def sample_exact_denoiser(denoiser, scheduler_config, n: int, eta: float, steps: int = 10, seed: int = 0) -> np.ndarray:
    """``n`` images from diffusers' DDIM (``steps`` steps, ``eta``) driven by the exact denoiser."""
    import torch
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config, prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *denoiser.image_shape), generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(denoiser(x, t).sample, t, x, eta=eta, generator=generator).prev_sample
    return x.numpy()


def shape_retention(model, labeller, n: int, start_timesteps: list[int], steps: int = 10) -> dict:
    """Per start timestep: the confusion matrix of world images noised to it and denoised."""
    import torch
    from diffusers import DDIMScheduler

    from hmine import world

    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    batch = world.generate(n, seed=777)
    x0, truth = torch.from_numpy(batch.images), batch.factors["shape"]
    generator = torch.Generator().manual_seed(0)
    out = {}
    for start in start_timesteps:
        timesteps = [t for t in scheduler.timesteps.tolist() if t <= start]
        a = scheduler.alphas_cumprod[timesteps[0]]
        x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
        with torch.no_grad():
            for t in timesteps:
                x = scheduler.step(model.unet(x, t).sample, t, x).prev_sample
        predicted = labeller.score(x.numpy())["shape"].to_numpy().astype(int)
        confusion = np.zeros((3, 3))
        np.add.at(confusion, (truth, predicted), 1)
        out[f"t={timesteps[0]}"] = (confusion / confusion.sum(axis=1, keepdims=True)).round(3).tolist()
    return out


def main() -> None:
    from hmine import world
    from hmine.labelling import WorldLabeller
    from hmine.sampling import Sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="embedded:shapes-ddpm", help="a model folder or id, or a training work dir or checkpoint folder (its EMA)")
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--steps", type=int, default=10, help="sampler steps (the targets are stated for 10)")
    parser.add_argument("--exact-denoiser", type=int, default=None, metavar="N",
                        help="also sample with the exact denoiser of N world images (the sampler's own bias)")
    parser.add_argument("--retention", type=int, nargs="*", default=None, metavar="T",
                        help="also the shape retention from these timesteps (default 900 700 500 400 300)")
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_for_evaluation(args.model)
    load_seconds = time.perf_counter() - started
    labeller = WorldLabeller()
    truth = world.sample_factors(200_000, seed=12345)
    reference = frequencies(truth["shape"], truth["color"], {k: truth[k] for k in world.CONTINUOUS_FACTORS})
    report = {"load_seconds": round(load_seconds, 3), "steps": args.steps, "training_distribution": reference}
    exact = None
    if args.exact_denoiser:
        from hmine.world.denoiser import ExactWorldDenoiser

        exact = ExactWorldDenoiser(model.scheduler.alphas_cumprod, n_images=args.exact_denoiser)
    for eta in args.etas:
        sampler = Sampler(model, num_inference_steps=args.steps, eta=eta)
        images, batch_seconds = [], []
        for start in range(0, args.n, args.batch):
            t0 = time.perf_counter()
            images.append(sampler.sample(list(range(start, min(args.n, start + args.batch))), record_h=False).images.numpy())
            batch_seconds.append(time.perf_counter() - t0)
        table = labeller.score(np.concatenate(images))
        shape_conf = table[["p_circle", "p_square", "p_triangle"]].max(axis=1)
        color_conf = table[["p_red", "p_green", "p_blue"]].max(axis=1)
        generated = frequencies(
            table["shape"].to_numpy().astype(int), table["color"].to_numpy().astype(int),
            {k: table[k].to_numpy() for k in world.CONTINUOUS_FACTORS},
        )  # fmt: skip
        report[f"eta={eta:g}"] = {
            "n": args.n,
            "shape_confident_0.9": float((shape_conf >= 0.9).mean()),
            "color_confident_0.9": float((color_conf >= 0.9).mean()),
            "frequencies": generated,
            "max_frequency_gap_pp": float(max(abs(generated[k] - reference[k]) for k in reference) * 100),
            f"seconds_per_batch_of_{args.batch}": round(float(np.median(batch_seconds)), 3),
        }
        if exact is not None:
            exact_table = labeller.score(
                np.concatenate([
                    sample_exact_denoiser(
                        exact, model.scheduler.config, min(args.batch, args.n - start), eta, args.steps, seed=start
                    )
                    for start in range(0, args.n, args.batch)
                ])
            )  # fmt: skip
            exact_frequencies = frequencies(
                exact_table["shape"].to_numpy().astype(int), exact_table["color"].to_numpy().astype(int),
                {k: exact_table[k].to_numpy() for k in world.CONTINUOUS_FACTORS},
            )  # fmt: skip
            report[f"eta={eta:g}"]["exact_denoiser"] = {
                "n_images": args.exact_denoiser,
                "frequencies": exact_frequencies,
                "max_frequency_gap_pp": float(max(abs(exact_frequencies[k] - reference[k]) for k in reference) * 100),
                "max_gap_to_model_pp": float(max(abs(exact_frequencies[k] - generated[k]) for k in reference) * 100),
            }
    if args.retention is not None:
        report["shape_retention"] = shape_retention(model, labeller, args.n, args.retention or [900, 700, 500, 400, 300])
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
