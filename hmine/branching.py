"""Asyrp's two eps from one U-Net call: the path up to h once, the rest for h and h + delta.

Asyrp's asymmetric step (Kwon et al. 2023, eq. 5) needs, at every edited step, the eps of
the unedited h and the eps of h + delta for the same x_t. Everything up to h (time
embedding, down blocks, and the mid block for ``after``) is the same for both, so
:class:`BranchedForward` runs it once and sends both h through the rest of the network as
one batch of twice the size: its forward hooks stack ``[h, h + delta]`` where h is taken
and repeat every batch-first tensor the later blocks receive (skip connections, time
embedding, text embeddings). A U-Net call then returns 2B rows: the unedited eps first,
the edited eps second.

On the embedded U-Net this saves the down path and mid block, about a quarter of a
forward pass, per edited step. Only :class:`~diffusers.UNet2DModel` and
:class:`~diffusers.UNet2DConditionModel` are branched (their code after the up blocks is
batch-agnostic, except the Fourier time embedding's division, which is excluded);
:func:`supports_branching` says so, and callers fall back to two passes otherwise.
"""

from __future__ import annotations

import torch

from hmine.hooks import H_POSITIONS, HPosition


def supports_branching(unet) -> bool:
    """Whether :class:`BranchedForward` can split this U-Net (see the module docstring)."""
    name = type(unet).__name__
    if name not in ("UNet2DModel", "UNet2DConditionModel"):
        return False
    if getattr(unet, "mid_block", None) is None:
        return False
    return unet.config.get("time_embedding_type", "positional") != "fourier"


def _repeat_batch(value, batch: int):
    """``value`` with every tensor whose first dimension is ``batch`` repeated twice along it."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value]) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_repeat_batch(v, batch) for v in value)
    if isinstance(value, list):
        return [_repeat_batch(v, batch) for v in value]
    if isinstance(value, dict):
        return {k: _repeat_batch(v, batch) for k, v in value.items()}
    return value


class BranchedForward:
    """Forward hooks that make one U-Net call return the eps of h and of h + ``delta``.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel`` or ``UNet2DConditionModel``
    position : {"before", "middle", "after"}
        Where h is taken (:mod:`hmine.hooks`).

    Attributes
    ----------
    delta : Tensor of shape (channel, y, x) or (batch, channel, y, x)
        Set before each call.

    Examples
    --------
    >>> with BranchedForward(unet, "after") as branched:  # doctest: +SKIP
    ...     branched.delta = delta
    ...     out = unet(x_t, t).sample  # (2B, ...): unedited rows, then edited rows
    ...     eps_original, eps_edited = out.chunk(2)
    """

    def __init__(self, unet, position: HPosition = "after"):
        if position not in H_POSITIONS:
            raise ValueError(f"h position must be one of {H_POSITIONS}, got {position!r}")
        if not supports_branching(unet):
            raise ValueError(f"{type(unet).__name__} cannot be branched at h; use two U-Net passes")
        self.unet = unet
        self.position = position
        self.delta: torch.Tensor | None = None
        self._batch: int | None = None
        self._handles: list = []

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError("BranchedForward.delta is not set")
        self._batch = h.shape[0]
        return torch.cat([h, h + self.delta.to(dtype=h.dtype, device=h.device)])

    def _branch_output(self, module, args, output):
        return self._branch(output)

    def _branch_input(self, module, args, kwargs):
        # the module that receives h also receives the time embedding: both go in doubled
        if args:
            hidden, rest = args[0], args[1:]
            branched = self._branch(hidden)
            return (branched, *_repeat_batch(rest, self._batch)), _repeat_batch(kwargs, self._batch)
        branched = self._branch(kwargs["hidden_states"])
        kwargs = _repeat_batch({k: v for k, v in kwargs.items() if k != "hidden_states"}, self._batch)
        return args, {**kwargs, "hidden_states": branched}

    def _double_inputs(self, module, args, kwargs):
        # an up block: hidden states are already doubled; skips, embeddings are not
        if self._batch is None:
            raise RuntimeError("an up block ran before h was branched")
        if args:
            return (args[0], *_repeat_batch(args[1:], self._batch)), _repeat_batch(kwargs, self._batch)
        hidden = kwargs["hidden_states"]
        kwargs = _repeat_batch({k: v for k, v in kwargs.items() if k != "hidden_states"}, self._batch)
        return args, {**kwargs, "hidden_states": hidden}

    def attach(self) -> "BranchedForward":
        if self._handles:
            raise RuntimeError("BranchedForward is already attached")
        mid = self.unet.mid_block
        if self.position == "after":
            self._handles.append(mid.register_forward_hook(self._branch_output))
        elif self.position == "before":
            self._handles.append(mid.register_forward_pre_hook(self._branch_input, with_kwargs=True))
        else:
            self._handles.append(mid.resnets[1].register_forward_pre_hook(self._branch_input, with_kwargs=True))
        for block in self.unet.up_blocks:
            self._handles.append(block.register_forward_pre_hook(self._double_inputs, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "BranchedForward":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
