"""What model.compile changes: the time of a sampling batch and its numbers, against eager.

Two samplers on one U-Net, eager and compiled (:mod:`hmine.compiling`), sample the same
seeds. The first compiled batch of each size pays the compilation; it is timed apart
("compile + first batch", and the compile cost as that minus a steady batch), as is an
untimed eager warm-up. Then batches are timed interleaved (eager, compiled, eager, ...)
and the median of the paired ratios compiled/eager is printed with its spread. The
numerical columns compare the compiled batch with the eager one: h at every step (max
abs, relative norm) and x0 (max abs); with ``--edits``, also an edit (a random delta on
h of norm ``--edit-norm`` per step, symmetric and Asyrp's asymmetric step) regenerated
both ways, beside the size of the edit itself.

    python benchmarks/bench_compile.py                        # the embedded U-Net, batches of 16 and 64
    python benchmarks/bench_compile.py --config celebahq --device cuda --batch 16 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import add_model_arguments, load, paired, ratio_summary, synchronize  # noqa: E402


def differences(eager, compiled) -> tuple[float, float, float, float]:
    """(h max abs, h relative norm, share of h's float16 values that differ, x0 max abs),
    compiled sample against eager."""
    h, h_ref = compiled.h.float(), eager.h.float()
    relative = ((h - h_ref).norm() / h_ref.norm()).item()
    stored = (h.half() != h_ref.half()).float().mean().item()  # samples.zarr keeps h as float16 by default
    return (h - h_ref).abs().max().item(), relative, stored, (compiled.images - eager.images).abs().max().item()


def edit_differences(eager, compiled, seeds, norm: float) -> list[str]:
    """Per edit kind: max abs of compiled minus eager edited images, and the edit's own max abs effect."""
    import numpy as np
    import torch

    from hmine.hooks import h_shape
    from hmine.regeneration import regenerate

    steps = eager.num_inference_steps
    delta = torch.randn((1, steps, *h_shape(eager.model.unet, eager.h_position)), generator=torch.Generator().manual_seed(0))
    delta = delta * norm / delta[0, 0].norm()
    unedited = eager.sample(seeds, record_h=False).images.numpy()
    cells = []
    for asymmetric in (False, True):
        images = [
            np.concatenate([im for _, im in regenerate(s, seeds, delta, [0] * len(seeds), edit_steps=[True] * steps,
                                                      asymmetric=asymmetric, batch_size=len(seeds))])
            for s in (eager, compiled)
        ]
        kind = "asymmetric" if asymmetric else "symmetric"
        cells.append(f"{kind}: {np.abs(images[1] - images[0]).max():.1e} (edit {np.abs(images[0] - unedited).max():.2f})")
    return cells


def main() -> None:
    from hmine.sampling import Sampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, pairs=4, batch=[16, 64])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--edits", action="store_true", help="also compare regenerated edits (at the first batch size)")
    parser.add_argument("--edit-norm", type=float, default=10.0, help="the random edit's ||delta h|| per step")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = load(args.config, Path(tmp), args.device)
    eager = Sampler(model, num_inference_steps=args.steps, torch_threads=args.threads)
    compiled = Sampler(model, num_inference_steps=args.steps, torch_threads=args.threads, compile=True,
                       compile_backend=args.backend)
    print("| config | batch | compile + first batch (s) | eager (s/batch, median) | compiled (s/batch, median) | "
          "compile cost (s) | ratio compiled/eager, median (spread) | h max abs | h relative | h float16 values changed | "
          "x0 max abs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    edits = None
    for batch in args.batch:
        seeds = list(range(batch))
        synchronize(args.device)
        started = time.perf_counter()
        out_compiled = compiled.sample(seeds)
        synchronize(args.device)
        first = time.perf_counter() - started
        out_eager = eager.sample(seeds)  # eager's warm-up
        h_abs, h_rel, h_half, x0_abs = differences(out_eager, out_compiled)
        times_eager, times_compiled = paired(lambda: eager.sample(seeds), lambda: compiled.sample(seeds), args.pairs,
                                             args.device, warmup=False)
        steady = statistics.median(times_compiled)
        print(f"| {args.config} | {batch} | {first:.1f} | {statistics.median(times_eager):.3f} | {steady:.3f} | "
              f"{first - steady:.1f} | {ratio_summary(times_compiled, times_eager)} | {h_abs:.1e} | {h_rel:.1e} | "
              f"{h_half:.2%} | {x0_abs:.1e} |", flush=True)
        if args.edits and edits is None:
            edits = edit_differences(eager, compiled, seeds, args.edit_norm)
    print(f"({args.pairs} interleaved pairs of batches per row after the compile and an eager warm-up; {args.steps} "
          f"DDIM steps; {args.threads} torch threads; backend {args.backend}; device {args.device}; load average "
          f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)")
    if edits:
        print(f"edited images at batch {args.batch[0]}, ||delta h|| = {args.edit_norm:g} per step, compiled - eager max abs: "
              + "; ".join(edits))


if __name__ == "__main__":
    main()
