"""The edit stage's regeneration (hmine.regeneration) against the algorithm it replaced.

The same work for both: one direction at every scale on the first ``--n-samples``
samples, Asyrp's asymmetric step at every step (the demo's edit settings).

- **old**: per scale, 0 included, the sample stage's whole batch of ``--batch`` seeds
  regenerated with :func:`hmine.editing.regenerate_with_delta` (two U-Net passes per
  asymmetric step), as the edit stage did up to 2026-12-02;
- **new**: the rows (scale != 0, sample) through :func:`hmine.regeneration.regenerate` at
  U-Net batch ``--batch`` (scale 0 is the stored image, not recomputed).

Interleaved old/new pairs, one direction each; prints the median paired speed-up with
its spread, and checks that both give the same images.

    python benchmarks/bench_edit.py                         # embedded model, 64 and 16 samples
    python benchmarks/bench_edit.py --config celebahq --device cuda --n-samples 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load, paired, ratio_summary  # noqa: E402

DEMO_SCALES = (-20.0, -10.0, -5.0, 0.0, 5.0, 10.0, 20.0)


def main() -> None:
    import numpy as np
    import torch

    from hmine.editing import delta_for, edit_steps_from, regenerate_with_delta
    from hmine.hooks import h_shape
    from hmine.regeneration import regenerate, unedited_states
    from hmine.sampling import Sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["embedded", "celebahq"], default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-samples", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--batch", type=int, default=64, help="the sample stage's batch and the U-Net batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = load(args.config, Path(tmp), args.device)
    sampler = Sampler(model, num_inference_steps=args.steps, torch_threads=args.threads)
    shape = h_shape(model.unet)
    generator = torch.Generator().manual_seed(0)
    unit = torch.randn((args.steps, *shape), generator=generator)
    unit = (unit / unit.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)).numpy()
    scale_unit = np.full(args.steps, 0.05 * float(np.sqrt(np.prod(shape))), dtype=np.float32)  # about the demo's h scale
    scales = DEMO_SCALES
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), None, None)
    seeds_batch = list(range(args.batch))

    rows = []
    for n in args.n_samples:
        results = {}

        def old():
            images = []
            for scale in scales:
                delta = delta_for(unit, scale_unit, scale)
                images.append(regenerate_with_delta(sampler, seeds_batch, delta, asymmetric=True)[:n])
            results["old"] = np.stack(images)

        def new():
            seeds = seeds_batch[:n]
            starts = dict(zip(seeds, unedited_states(sampler, seeds, 0, args.batch)))
            edited = [s for s in scales if s != 0.0]
            deltas = torch.stack([delta_for(unit, scale_unit, s) for s in edited])
            index = [k for k in range(len(edited)) for _ in seeds]
            out = {}
            for done, images in regenerate(
                sampler, seeds * len(edited), deltas, index, edit_steps=edit_steps, asymmetric=True,
                batch_size=args.batch, start_states=starts,
            ):
                out.update(zip(done.tolist(), images))
            results["new"] = np.stack([out[r] for r in range(len(out))]).reshape(len(edited), n, *images.shape[1:])

        times_old, times_new = paired(old, new, args.pairs, args.device, warmup=False)
        expected = np.delete(results["old"], scales.index(0.0), axis=0)
        difference = float(np.abs(expected - results["new"]).max())
        rows.append((n, times_old, times_new, difference))

    print("| config | edit.n_samples | batch | old (s, median) | new (s, median) | speed-up old/new, median (spread) | max abs image difference |")
    print("|---|---|---|---|---|---|---|")
    for n, times_old, times_new, difference in rows:
        print(
            f"| {args.config} | {n} | {args.batch} | {np.median(times_old):.1f} | {np.median(times_new):.1f} | "
            f"{ratio_summary(times_old, times_new)} | {difference:.1e} |"
        )
    print(f"({args.pairs} interleaved pairs, one direction x {len(scales)} scales each, {args.steps} steps, "
          f"asymmetric, {args.threads} torch threads, device {args.device})")


if __name__ == "__main__":
    main()
