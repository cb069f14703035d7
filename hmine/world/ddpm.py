"""The shapes world's unconditional DDPM: its U-Net, its noise schedule, its training and export.

Training runs in the one loop of :mod:`hmine.world.training` (resumable checkpoints, EMA,
learning-rate schedule, logging): this module supplies the U-Net and the loss of step
``s``, whose world images, noise and timesteps are drawn from generators seeded by
``(seed, s)``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hmine.imaging import write_image_grid
from hmine.world import renderer as world
from hmine.world.training import Schedule, Trainee, check_work_dir_config, checkpoint_weights, train_loop, warmup_cosine

logger = logging.getLogger(__name__)


class DDPMTrainConfig(BaseModel):
    """Settings of the shapes-world DDPM training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(4000, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = Field(1, ge=1)
    attention_in_mid_block: bool = True
    num_train_timesteps: int = Field(1000, ge=2)
    checkpoint_every: int = Field(100, ge=1)
    sample_every: int = Field(500, ge=1)
    log_every: int = Field(20, ge=1)
    torch_threads: int = Field(1, ge=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    grid_timestep_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "fraction of each batch whose timesteps are drawn from the grid of a "
            "grid_steps-step sampler (DDIM's 'leading' spacing: 0, T/n, 2T/n, ...) instead of "
            "uniformly; 0 is the standard DDPM objective"
        ),
    )
    grid_steps: int = Field(10, ge=1, description="the sampler step count whose timesteps grid_timestep_fraction favours")
    init_from: Path | None = Field(
        None,
        description=(
            "start from these weights (fine-tuning): the EMA weights of a training work dir's "
            "newest checkpoint (or of one checkpoint folder) or a U-Net in diffusers layout "
            "(a model folder, or its unet/ folder)"
        ),
    )


def build_unet(config: DDPMTrainConfig):
    """The shapes-world U-Net: 32x32 RGB, downsampled twice to an 8x8 bottleneck."""
    from diffusers import UNet2DModel

    n_blocks = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=world.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * n_blocks,
        up_block_types=("UpBlock2D",) * n_blocks,
        add_attention=config.attention_in_mid_block,
        norm_num_groups=min(32, min(config.block_out_channels)),
    )


def build_scheduler(config: DDPMTrainConfig):
    """The standard DDPM noise schedule (linear betas 1e-4 .. 0.02, Ho et al. 2020).

    ``clip_sample=True`` (predicted x0 clipped to [-1, 1] while sampling), as in the
    scheduler of google/ddpm-ema-celebahq-256: without it few-step DDIM on this small
    model drifts out of range (the model card has the measurement).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        prediction_type=config.prediction_type,
    )


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a fine-tune starts from: a training checkpoint's EMA, or a diffusers U-Net's weights."""
    path = Path(path)
    if path.is_dir():
        weights = checkpoint_weights(path, "ema")
        if weights is not None:
            return weights
    for folder in (path / "unet", path):
        weights = folder / "diffusion_pytorch_model.safetensors"
        if weights.is_file():
            from safetensors.torch import load_file

            return load_file(weights)
    raise FileNotFoundError(
        f"init_from {path} is neither a training checkpoint nor a diffusers U-Net folder "
        "(expected a training work dir, a checkpoints/step-* folder, or "
        "diffusion_pytorch_model.safetensors in it or in its unet/ folder)"
    )


def sampler_grid_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The timesteps a ``steps``-step DDIM sampler visits with diffusers' default 'leading' spacing."""
    return torch.arange(steps) * (num_train_timesteps // steps)


def _favour_grid_timesteps(t: torch.Tensor, config: DDPMTrainConfig, gen: torch.Generator) -> torch.Tensor:
    # Why: a small U-Net has to be right at every one of 1,000 timesteps, while the product
    # samples at 10 of them; drawing part of each batch from those 10 spends more of the
    # model's capacity where the sampler uses it. The draws come after the uniform ones, so
    # a run with fraction 0 sees exactly the batches it always did.
    on_grid = torch.rand(t.shape, generator=gen) < config.grid_timestep_fraction
    grid = sampler_grid_timesteps(config.num_train_timesteps, config.grid_steps)
    picks = grid[torch.randint(0, len(grid), t.shape, generator=gen)]
    return torch.where(on_grid, picks, t)


def ddpm_loss(unet, config: DDPMTrainConfig, alphas_cumprod: torch.Tensor, step: int) -> torch.Tensor:
    """The denoising MSE of 0-based step ``step`` (its world images, noise and timesteps)."""
    seed = config.seed * 1_000_003 + step
    x0 = torch.from_numpy(world.generate(config.batch_size, seed=seed).images)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=gen)
    if config.grid_timestep_fraction > 0:
        t = _favour_grid_timesteps(t, config, gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if config.prediction_type == "epsilon":
        target = noise
    else:  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    return F.mse_loss(unet(xt, t).sample, target)


def train_ddpm(
    config: DDPMTrainConfig, work_dir: Path, export_dir: Path | None = None, *, until_step: int | None = None
):
    """Train (or resume training) the shapes-world DDPM; return the EMA U-Net.

    Parameters
    ----------
    config : DDPMTrainConfig
    work_dir : Path
        A work dir of :mod:`hmine.world.training` (``config.json``, ``checkpoints/``,
        ``log.jsonl``, ``grid-<step>.png``); one written with a different config is refused.
    export_dir : Path, optional
        Where to write the final EMA model in diffusers layout (``unet/``, ``scheduler/``).
    until_step : int, optional
        Stop (with a checkpoint) once this step is reached, e.g. to fit a session; a
        later call with the same config continues to ``config.steps``.
    """
    torch.set_num_threads(config.torch_threads)
    check_work_dir_config(config, Path(work_dir))
    torch.manual_seed(config.seed)  # the initial weights are part of the seeded run
    unet = build_unet(config)
    if config.init_from is not None:
        unet.load_state_dict(initial_weights(Path(config.init_from)))
    scheduler = build_scheduler(config)
    trainee = Trainee(
        model=unet,
        optimizer=torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0),
        loss=lambda step: (ddpm_loss(unet, config, scheduler.alphas_cumprod, step), {}),
        # Linear warm-up, then cosine decay to 10 % of the peak by the last step.
        learning_rate_at=lambda step: warmup_cosine(
            step, peak=config.learning_rate, warmup_steps=config.warmup_steps, steps=config.steps, floor=0.1
        ),
        sample_grid=lambda ema, path: save_sample_grid(ema, scheduler, path),
    )
    schedule = Schedule(
        steps=config.steps,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        ema_decay=config.ema_decay,
        sample_every=config.sample_every,
        clip_grad_norm=1.0,
    )
    result = train_loop(trainee, schedule, Path(work_dir), until_step=until_step)
    if export_dir is not None and result.step == config.steps:
        export_ddpm(result.model, scheduler, Path(export_dir))
    return result.model


def export_ddpm(unet, scheduler, export_dir: Path) -> None:
    """Write a U-Net and its scheduler in the diffusers pipeline layout."""
    export_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(export_dir / "unet", safe_serialization=True)
    scheduler.save_pretrained(export_dir / "scheduler")
    (export_dir / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                "scheduler": ["diffusers", type(scheduler).__name__],
            },
            indent=2,
        )
    )


@torch.no_grad()
def save_sample_grid(unet, scheduler, path: Path, n: int = 64, steps: int = 10, seed: int = 0):
    """Sample ``n`` images with 10-step DDIM and save them as an 8-wide PNG grid."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    was_training = unet.training
    unet.eval()
    x = torch.randn((n, 3, world.IMAGE_SIZE, world.IMAGE_SIZE), generator=torch.Generator().manual_seed(seed))
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    unet.train(was_training)
    write_image_grid(x.numpy(), path, columns=8)
