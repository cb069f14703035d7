"""Overhead of hmine's sample stage against a bare diffusers sampling loop.

Both sample the same number of images with the same U-Net, batch size and DDIM steps;
the stage also records h at every step and writes h and the images to zarr. Prints a
table and the overhead ratio (goal: <= 1.03 at batch 16).

    python benchmarks/bench_sample.py                      # embedded-size U-Net, random weights
    python benchmarks/bench_sample.py --config celebahq    # the CelebA-HQ 256 U-Net config (slow on CPU)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

CONFIGS = {
    "embedded": dict(
        sample_size=32,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=32,
    ),
    # google/ddpm-ema-celebahq-256 architecture, random weights: the real cost
    "celebahq": dict(
        sample_size=256,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
}


def make_model_dir(name: str, root: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(in_channels=3, out_channels=3, **CONFIGS[name]).save_pretrained(root / name)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / name)
    return root / name


def bare_loop(model_dir: Path, n: int, batch: int, steps: int) -> float:
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(model_dir).eval()
    scheduler = DDIMScheduler.from_pretrained(model_dir)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, batch):
            x = torch.randn(min(batch, n - start), 3, size, size)
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return time.perf_counter() - started


def hmine_stage(model_dir: Path, n: int, batch: int, steps: int, root: Path) -> float:
    from hmine.config import load_config
    from hmine.models import load_model
    from hmine.stages.sample import run_sample_stage

    config = load_config(
        None,
        [f"model.id={model_dir}", f"output_root={root}", f"name=bench-{time.time_ns()}",
         f"sample.n_samples={n}", f"sample.batch_size={batch}", f"sample.num_inference_steps={steps}"],
    )
    model = load_model(str(model_dir))
    started = time.perf_counter()
    run_sample_stage(config, model=model, show_progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="embedded")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model_dir(args.config, root)
        bare, ours = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both
            bare.append(bare_loop(model_dir, args.n, args.batch, args.steps))
            ours.append(hmine_stage(model_dir, args.n, args.batch, args.steps, root))
    b, o = min(bare), min(ours)
    print("| config | n | batch | steps | bare diffusers loop (s) | hmine sample stage (s) | overhead ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.config} | {args.n} | {args.batch} | {args.steps} | {b:.2f} | {o:.2f} | {o / b:.3f} |")
    print(f"(best of {args.repeats}; all runs: bare {[round(x, 2) for x in bare]}, hmine {[round(x, 2) for x in ours]})")


if __name__ == "__main__":
    main()
