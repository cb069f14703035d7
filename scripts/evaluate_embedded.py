"""Evaluate the embedded DDPM with the embedded classifier (figures for the model cards).

For 10-step DDIM (eta=0) and 10 steps with eta=1, over N samples: the fraction classified
with confidence >= 0.9 for shape and for colour, and the generated factor frequencies
(including the deliberate circle/red correlation) against the training distribution.

    python scripts/evaluate_embedded.py [--n 512] [--json out.json] [--model PATH] [--etas 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def frequencies(shape: np.ndarray, color: np.ndarray) -> dict[str, float]:
    from hmine import world

    out = {f"shape={name}": float((shape == i).mean()) for i, name in enumerate(world.SHAPES)}
    out.update({f"color={name}": float((color == i).mean()) for i, name in enumerate(world.COLORS)})
    circles = shape == 0
    out["red|circle"] = float((color[circles] == 0).mean()) if circles.any() else float("nan")
    out["red|not circle"] = float((color[~circles] == 0).mean()) if (~circles).any() else float("nan")
    return out


def main() -> None:
    from hmine import world
    from hmine.labelling import WorldLabeller
    from hmine.models import load_model
    from hmine.sampling import Sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="embedded:shapes-ddpm", help="a model folder (e.g. an exported checkpoint)")
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0])
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_model(args.model)
    load_seconds = time.perf_counter() - started
    labeller = WorldLabeller()
    truth = world.sample_factors(200_000, seed=12345)
    reference = frequencies(truth["shape"], truth["color"])
    report = {"load_seconds": round(load_seconds, 3), "training_distribution": reference}
    for eta in args.etas:
        sampler = Sampler(model, num_inference_steps=10, eta=eta)
        images, batch_seconds = [], []
        for start in range(0, args.n, args.batch):
            t0 = time.perf_counter()
            images.append(sampler.sample(list(range(start, min(args.n, start + args.batch))), record_h=False).images.numpy())
            batch_seconds.append(time.perf_counter() - t0)
        table = labeller.score(np.concatenate(images))
        shape_conf = table[["p_circle", "p_square", "p_triangle"]].max(axis=1)
        color_conf = table[["p_red", "p_green", "p_blue"]].max(axis=1)
        generated = frequencies(table["shape"].to_numpy(), table["color"].to_numpy())
        report[f"eta={eta:g}"] = {
            "n": args.n,
            "shape_confident_0.9": float((shape_conf >= 0.9).mean()),
            "color_confident_0.9": float((color_conf >= 0.9).mean()),
            "frequencies": generated,
            "max_frequency_gap_pp": float(max(abs(generated[k] - reference[k]) for k in reference) * 100),
            f"seconds_per_batch_of_{args.batch}": round(float(np.median(batch_seconds)), 3),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
