"""Asyrp's delta block f_t(h, t): a small network of 1x1 convolutions with a timestep embedding.

Kwon et al. (2023) learn an h-space edit as a function of h and t rather than one free
tensor per step. hmine's ``DeltaBlock`` is, per position of h::

    f(h, t) = conv_out(SiLU(GroupNorm(conv_in(h) + time_proj(emb(t)))))

with ``conv_in`` and ``conv_out`` 1x1 convolutions C -> C, ``emb`` a fixed sinusoidal
embedding of t of size T (:func:`timestep_embedding`) and ``time_proj`` a linear map T -> C.

Asyrp's own ``DeltaBlock`` (``models/ddpm/diffusion.py`` of kwonminki/Asyrp_official) has
the same layers, but its time input is the pretrained U-Net's *learned* embedding ``temb``:
DDPM's sinusoid of width ch = 128 through the U-Net's frozen two-layer MLP (``temb.dense``)
to 4 ch = 512, passed through SiLU before ``temb_proj``. hmine's block does not reach into
the U-Net's time embedding (a hook on h sees h and t only), so it embeds t itself and T
takes the place of their 512. The parameter count is the same
formula, ``2 (C^2 + C) + (T C + C) + 2 C``: C = T = 512 (CelebA-HQ's h) gives 788,992,
their ~0.79 M; the embedded shapes model's h has C = 128, and with T = 128 that is 49,792
(:func:`block_parameter_count`).

``conv_out`` starts at zero (Asyrp's has PyTorch's default initialisation), so the untrained
block is no edit at all (the image starts where the loss's L1 term wants it, and the first
gradients reach ``conv_out`` only).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def block_parameter_count(channels: int, time_embedding_dim: int) -> int:
    """Parameters of :class:`DeltaBlock` (the formula of the module docstring)."""
    return 2 * (channels * channels + channels) + (time_embedding_dim * channels + channels) + 2 * channels


def group_count(channels: int) -> int:
    """GroupNorm groups: 32 as in diffusers' U-Nets where they divide the channels, else the largest divisor <= 32."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding (batch, dim): cos then sin of t at the frequencies max_period^(-k / half), k < half.

    Guided diffusion's ``timestep_embedding``, i.e. diffusers' ``get_timestep_embedding`` with
    ``flip_sin_to_cos=True, downscale_freq_shift=0`` (tested); DDPM's (and Asyrp's) puts the
    sines first and divides by half - 1.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class DeltaBlock(nn.Module):
    """f_t(h, t) of Asyrp (module docstring).

    Parameters
    ----------
    channels : int
        h's channels C.
    time_embedding_dim : int, default=128
        T, the size of the sinusoidal timestep embedding (even).
    """

    def __init__(self, channels: int, time_embedding_dim: int = 128):
        super().__init__()
        if time_embedding_dim % 2:
            raise ValueError(f"time_embedding_dim must be even, got {time_embedding_dim}")
        self.channels = int(channels)
        self.time_embedding_dim = int(time_embedding_dim)
        self.conv_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.time_proj = nn.Linear(time_embedding_dim, channels)
        self.norm = nn.GroupNorm(group_count(channels), channels)
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def config(self) -> dict:
        return {"channels": self.channels, "time_embedding_dim": self.time_embedding_dim}

    def forward(self, h: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The edit of h (batch, C, y, x) at ``timesteps`` (batch,) or a 0-d t for the whole batch."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(h.shape[0])
        emb = timestep_embedding(timesteps.to(h.device), self.time_embedding_dim).to(h.dtype)
        x = self.conv_in(h) + self.time_proj(emb)[:, :, None, None]
        return self.conv_out(self.act(self.norm(x)))
