"""What model.precision changes: h, images and directions under autocast, against float32.

Samples the same seeds at float32 and at each lower precision, then compares: h
(relative error per step), the images, the top-8 per-step principal subspace of h (the
largest principal angle, exact SVD) and each attribute's mean-difference direction
(top-k vs bottom-k by the world labeller's float32 scores; the angle per step); and the
time of a sampling batch, interleaved (median paired ratio with its spread).

    python benchmarks/bench_precision.py                                   # CPU: bfloat16
    python benchmarks/bench_precision.py --device cuda --precision bfloat16 float16 --config celebahq
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load, paired, ratio_summary  # noqa: E402


def largest_angle(a, b) -> float:
    """Degrees: the largest principal angle between the row spaces of a and b (orthonormal rows)."""
    import numpy as np

    cosines = np.linalg.svd(a @ b.T, compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))


def main() -> None:
    import numpy as np

    from hmine.labelling import WorldLabeller
    from hmine.sampling import Sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["embedded", "celebahq"], default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["bfloat16"])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = load(args.config, Path(tmp), args.device)

    def sample_all(sampler):
        hs, images = [], []
        for start in range(0, args.n, args.batch):
            out = sampler.sample(list(range(start, min(start + args.batch, args.n))))
            hs.append(out.h.float().cpu().numpy())
            images.append(out.images.float().cpu().numpy())
        return np.concatenate(hs), np.concatenate(images)

    full = Sampler(model, num_inference_steps=args.steps)
    h32, x32 = sample_all(full)
    flat32 = h32.reshape(args.n, args.steps, -1).astype(np.float64)
    attributes = {}
    if args.config == "embedded":
        scores = WorldLabeller().score(x32)
        attributes = {a: scores[a].to_numpy() for a in ("is_circle", "is_red", "is_large", "is_left", "is_top", "is_light_bg")}

    def pca_basis(flat, t):
        centred = flat[:, t] - flat[:, t].mean(axis=0)
        return np.linalg.svd(centred, full_matrices=False)[2][:8]

    def mean_difference(flat, t, score):
        order = np.argsort(score, kind="stable")
        v = flat[order[-args.top_k :], t].mean(axis=0) - flat[order[: args.top_k], t].mean(axis=0)
        return v / np.linalg.norm(v)

    print("| precision | h relative error (median over steps, max) | image max abs diff | image mean abs diff | "
          "top-8 PCA subspace, largest angle (max over steps) | mean-difference angle (max over attributes and steps) | "
          "time of a batch, low/float32 median (spread) |")
    print("|---|---|---|---|---|---|---|")
    for precision in args.precision:
        low = Sampler(model, num_inference_steps=args.steps, precision=precision)
        h, x = sample_all(low)
        flat = h.reshape(args.n, args.steps, -1).astype(np.float64)
        relative = [np.linalg.norm(flat[:, t] - flat32[:, t]) / np.linalg.norm(flat32[:, t]) for t in range(args.steps)]
        pca_angles = [largest_angle(pca_basis(flat, t), pca_basis(flat32, t)) for t in range(args.steps)]
        md_angles = [
            float(np.degrees(np.arccos(np.clip(mean_difference(flat, t, s) @ mean_difference(flat32, t, s), -1, 1))))
            for s in attributes.values() for t in range(args.steps)
        ]
        seeds = list(range(args.batch))
        times_full, times_low = paired(lambda: full.sample(seeds), lambda: low.sample(seeds), args.pairs, args.device)
        print(
            f"| {precision} | {np.median(relative):.2e}, {max(relative):.2e} | {np.abs(x - x32).max():.3f} | "
            f"{np.abs(x - x32).mean():.4f} | {max(pca_angles):.2f}° | "
            f"{(f'{max(md_angles):.2f}°' if md_angles else 'n/a')} | {ratio_summary(times_low, times_full)} |"
        )
    print(f"({args.config}, {args.n} samples, {args.steps} steps, batch {args.batch}, device {args.device}; "
          f"mean differences with top_k={args.top_k} by the float32 images' scores)")


if __name__ == "__main__":
    main()
