"""What the benchmarks share: the model configs at real size, and paired timing.

The machine is shared and noisy, so every benchmark times A and B interleaved in one
process (A, B, A, B, ...: drifting load hits both alike), keeps fixed costs (model
loading, store creation, warm-up) out of the timed region, and reports the median of
the paired ratios B/A with their spread (min-max).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

UNET_CONFIGS = {
    # the embedded shapes-world DDPM's architecture (hmine/embedded/shapes-ddpm)
    "embedded": dict(
        sample_size=32,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=32,
    ),
    # google/ddpm-ema-celebahq-256's architecture (113.7 M parameters, h 512 x 8 x 8),
    # random weights: the real cost
    "celebahq": dict(
        sample_size=256,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    ),
}


def add_model_arguments(parser, *, pairs: int, batch: list[int] | None = None) -> None:
    """The options every model benchmark takes: which U-Net (``--config``), where it runs,
    how many denoising steps, interleaved pairs and torch threads (and batch sizes when
    ``batch`` gives their default)."""
    parser.add_argument("--config", choices=sorted(UNET_CONFIGS), default="embedded")
    parser.add_argument("--device", default="cpu")
    if batch is not None:
        parser.add_argument("--batch", type=int, nargs="+", default=batch)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=pairs)
    parser.add_argument("--threads", type=int, default=2)


def make_model_dir(name: str, root: Path) -> Path:
    """A model folder (U-Net + DDPM scheduler, safetensors) of config ``name`` with random weights."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    folder = Path(root) / name
    UNet2DModel(in_channels=3, out_channels=3, **UNET_CONFIGS[name]).save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


def load(name: str, root: Path, device: str = "cpu"):
    """hmine's model for a benchmark config: the embedded one itself, or a random-weight folder."""
    from hmine.models import load_model

    if name == "embedded":
        return load_model(device=device)
    return load_model(str(make_model_dir(name, root)), device=device)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paired(
    a: Callable[[], object], b: Callable[[], object], pairs: int, device: str = "cpu", warmup: bool = True
) -> tuple[list[float], list[float]]:
    """Seconds of ``a`` and of ``b``, run alternately ``pairs`` times (after one untimed run each when ``warmup``)."""
    if warmup:
        a(), b()
    times_a, times_b = [], []
    for _ in range(pairs):
        for fn, times in ((a, times_a), (b, times_b)):
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - started)
    return times_a, times_b


def ratio_summary(numerator: list[float], denominator: list[float]) -> str:
    """'median (min-max)' of the paired ratios numerator / denominator."""
    ratios = [n / d for n, d in zip(numerator, denominator)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
