"""Overhead of hmine's sample stage against a bare diffusers sampling loop.

Both sample the same seeds with the same U-Net (loaded once), batch size and DDIM steps;
the stage also draws each seed's noise from its own generator, records h at every step
and writes h and the images to zarr with checksums. Timed per batch, interleaved (bare
batch i, stage batch i, ...), with the fixed costs outside the timed region: model
loading, store creation, the first (warm-up) batch of each. Prints the median of the
paired ratios stage/bare with their spread (goal: <= 1.03).

    python benchmarks/bench_sample.py                                 # the embedded U-Net, batches of 16 and 64
    python benchmarks/bench_sample.py --config celebahq --device cuda --batch 16 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import add_model_arguments, load, ratio_summary, synchronize  # noqa: E402


def bare_batch(unet, scheduler, batch: int, seed: int, device: str) -> None:
    """diffusers' own DDIM loop: one x_T draw, U-Net, scheduler.step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *unet_sample_shape(unet)), generator=generator).to(device)
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t.to(device)).sample, t, x, eta=0.0).prev_sample


def unet_sample_shape(unet) -> tuple[int, int, int]:
    size = unet.config.sample_size
    return (unet.config.in_channels, size, size)


def measure(name: str, model, batch: int, steps: int, pairs: int, threads: int, root: Path, device: str):
    import torch
    from diffusers import DDIMScheduler

    from hmine.config import load_config
    from hmine.stages.sample import prepare_sample_stage, sample_batches

    config = load_config(
        None,
        [f"model.id={name}", f"output_root={root}", f"name=bench-{batch}", f"sample.n_samples={batch * (pairs + 1)}",
         f"sample.batch_size={batch}", f"sample.num_inference_steps={steps}", f"sample.torch_threads={threads}",
         f"model.device={device}"],
    )
    prepare_sample_stage(config, model=model)  # the store: a fixed cost
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    torch.set_num_threads(threads)  # the bare loop at the stage's thread count
    bare, stage = [], []
    for i in range(pairs + 1):  # batch 0 of each warms up, untimed
        synchronize(device)
        started = time.perf_counter()
        bare_batch(model.unet, scheduler, batch, i, device)
        synchronize(device)
        middle = time.perf_counter()
        sample_batches(config, [i], model=model)
        synchronize(device)
        ended = time.perf_counter()
        if i:
            bare.append(middle - started)
            stage.append(ended - middle)
    return bare, stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, pairs=8, batch=[16, 64])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = load(args.config, root, args.device)
        name = "embedded:shapes-ddpm" if args.config == "embedded" else str(root / args.config)
        print("| config | batch | steps | bare diffusers loop (s/batch, median) | hmine sample stage (s/batch, median) | ratio stage/bare, median (spread) |")
        print("|---|---|---|---|---|---|")
        for batch in args.batch:
            bare, stage = measure(name, model, batch, args.steps, args.pairs, args.threads, root, args.device)
            print(
                f"| {args.config} | {batch} | {args.steps} | {statistics.median(bare):.3f} | "
                f"{statistics.median(stage):.3f} | {ratio_summary(stage, bare)} |"
            )
    print(f"({args.pairs} interleaved pairs of batches per row, after one untimed pair; {args.threads} torch threads; device {args.device})")


if __name__ == "__main__":
    main()
