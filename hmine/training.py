"""Training of the embedded default models: the shapes-world DDPM and its attribute classifier.

Training is built to span sessions on a CPU: every ``checkpoint_every`` steps the model,
its EMA copy, the optimiser state and the step counter are written atomically to
``<work_dir>/checkpoint.pt`` (tensors only, loaded with ``weights_only=True``), and a
rerun with the same config continues from there. The data and the noise of step ``s``
are drawn from generators seeded by ``(seed, s)``, so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from hmine import world
from hmine.imaging import write_image_grid

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
            "start from these weights (fine-tuning): the EMA weights of a training checkpoint "
            "(checkpoint.pt) or a U-Net in diffusers layout (a model folder, or its unet/ folder)"
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
    scheduler of google/ddpm-ema-celebahq-256: without it 10-step DDIM on this small
    model drifted out of range and diverged (measured at 1,100 training steps).
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


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a fine-tune starts from: a checkpoint's EMA, or a diffusers U-Net's weights."""
    if path.is_file():
        return torch.load(path, weights_only=True)["ema"]
    for folder in (path / "unet", path):
        weights = folder / "diffusion_pytorch_model.safetensors"
        if weights.is_file():
            from safetensors.torch import load_file

            return load_file(weights)
    raise FileNotFoundError(
        f"init_from {path} is neither a training checkpoint nor a diffusers U-Net folder "
        "(expected diffusion_pytorch_model.safetensors in it or in its unet/ folder)"
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


def _lr_at(step: int, config: DDPMTrainConfig) -> float:
    # Linear warm-up, then cosine decay to 10 % of the peak by the last step.
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return float(config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))))


def train_ddpm(
    config: DDPMTrainConfig, work_dir: Path, export_dir: Path | None = None, *, until_step: int | None = None
):
    """Train (or resume training) the shapes-world DDPM; return the EMA U-Net.

    Parameters
    ----------
    config : DDPMTrainConfig
    work_dir : Path
        Holds ``config.json``, ``checkpoint.pt``, ``log.jsonl`` and ``grid-<step>.png``.
        A work dir written with a different config is refused.
    export_dir : Path, optional
        Where to write the final EMA model in diffusers layout (``unet/``, ``scheduler/``).
    until_step : int, optional
        Stop (with a checkpoint) once this step is reached, e.g. to fit a session; a
        later call with the same config continues to ``config.steps``.
    """
    torch.set_num_threads(config.torch_threads)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "config.json"
    if config_path.exists():
        stored = DDPMTrainConfig.model_validate_json(config_path.read_text())
        if stored != config:
            raise ValueError(
                f"work_dir {work_dir} was written by a different training config; "
                "use a new work_dir or delete it to start over"
            )
    else:
        config_path.write_text(config.model_dump_json(indent=2))

    torch.manual_seed(config.seed)  # the initial weights are part of the seeded run
    unet = build_unet(config)
    if config.init_from is not None:
        unet.load_state_dict(initial_weights(Path(config.init_from)))
    ema = build_unet(config)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = build_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    start_step = 0
    ckpt_path = work_dir / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        logger.info("resumed from step %d", start_step)

    alphas_cumprod = scheduler.alphas_cumprod
    log_file = open(work_dir / "log.jsonl", "a")
    unet.train()
    t0 = time.perf_counter()
    last_step = config.steps if until_step is None else min(config.steps, until_step)
    for step in range(start_step, last_step):
        batch = world.generate(config.batch_size, seed=config.seed * 1_000_003 + step)
        x0 = torch.from_numpy(batch.images)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=gen)
        if config.grid_timestep_fraction > 0:
            t = _favour_grid_timesteps(t, config, gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        if config.prediction_type == "epsilon":
            target = noise
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = F.mse_loss(unet(xt, t).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            # EMA warm-up: a short effective horizon early keeps the EMA from lagging.
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        done = step + 1
        if done % config.log_every == 0:
            record = {
                "step": done,
                "loss": loss.item(),
                "lr": _lr_at(step, config),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            logger.info("step %d loss %.4f", done, record["loss"])
        if done % config.checkpoint_every == 0 or done in (config.steps, last_step):
            _atomic_torch_save(
                {
                    "model": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": torch.tensor(done),
                },
                ckpt_path,
            )
        if done % config.sample_every == 0 or done == config.steps:
            save_sample_grid(ema, scheduler, work_dir / f"grid-{done:06d}.png")
    log_file.close()
    ema.eval()
    if export_dir is not None and last_step == config.steps:
        export_ddpm(ema, scheduler, Path(export_dir))
    return ema


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
