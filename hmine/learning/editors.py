"""Learned edits as functions of h: Δh_t (one tensor per step) and the delta block f_t(h, t).

An *editor* maps (h, step index, timestep) to the change of h at that step. The two kinds
of Asyrp:

* :class:`DeltaH` — a free tensor per edited step (``--train_delta_h``), zero elsewhere;
* :class:`BlockEditor` — :class:`~hmine.learning.delta_block.DeltaBlock`'s f(h, t)
  (``--train_delta_block``), zero outside the edited steps.

The U-Net hooks of :mod:`hmine.hooks` and :mod:`hmine.branching` add a fixed ``delta``;
:class:`FunctionHook` and :class:`FunctionBranchedForward` are the same hooks with a delta
computed from h itself, scaled per row by a coefficient (an edit's strength, negative too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from hmine.branching import BranchedForward
from hmine.hooks import HSpaceHook
from hmine.learning.delta_block import DeltaBlock

DeltaFunction = Callable[[torch.Tensor], torch.Tensor]


def _scaled(delta: torch.Tensor, coefficients: torch.Tensor | None) -> torch.Tensor:
    return delta if coefficients is None else delta * coefficients.to(delta)[:, None, None, None]


class FunctionHook(HSpaceHook):
    """:class:`~hmine.hooks.HSpaceHook` passing on ``h + coefficients * delta_fn(h)`` (coefficients per row, or 1)."""

    def __init__(self, unet, position, delta_fn: DeltaFunction, coefficients: torch.Tensor | None = None):
        super().__init__(unet, position, record=False)
        self.delta_fn, self.coefficients = delta_fn, coefficients

    def _edit(self, h: torch.Tensor) -> torch.Tensor:
        return h + _scaled(self.delta_fn(h), self.coefficients).to(h.dtype)


class FunctionBranchedForward(BranchedForward):
    """:class:`~hmine.branching.BranchedForward` whose edited branch is ``h + coefficients * delta_fn(h)``."""

    def __init__(self, unet, position, delta_fn: DeltaFunction, coefficients: torch.Tensor | None = None):
        super().__init__(unet, position)
        self.delta_fn, self.coefficients = delta_fn, coefficients

    def _branch(self, h: torch.Tensor) -> torch.Tensor:
        self._batch = h.shape[0]
        return torch.cat([h, h + _scaled(self.delta_fn(h), self.coefficients).to(h.dtype)])


class DeltaH(nn.Module):
    """Asyrp's Δh_t: one trainable tensor per edited step (zero, and not trained, at the others).

    Parameters
    ----------
    h_shape : (channel, y, x)
    edit_steps : sequence of bool
        One per sampler step.
    """

    def __init__(self, h_shape: Sequence[int], edit_steps: Sequence[bool]):
        super().__init__()
        self.edit_steps = [bool(e) for e in edit_steps]
        self.delta = nn.Parameter(torch.zeros(sum(self.edit_steps), *h_shape))
        self._slot = {}
        for i, edited in enumerate(self.edit_steps):
            if edited:
                self._slot[i] = len(self._slot)

    def forward(self, h: torch.Tensor, step_index: int, timestep) -> torch.Tensor:
        if step_index not in self._slot:
            return torch.zeros_like(h)
        return self.delta[self._slot[step_index]].to(h.dtype).expand_as(h)

    def full(self) -> torch.Tensor:
        """Δh at every step (step, C, y, x), zeros outside the edited steps."""
        out = self.delta.new_zeros((len(self.edit_steps), *self.delta.shape[1:]))
        for i, slot in self._slot.items():
            out[i] = self.delta[slot]
        return out.detach().cpu()


class BlockEditor(nn.Module):
    """:class:`DeltaBlock` as an editor: f(h, t) at the edited steps, zero at the others."""

    def __init__(self, block: DeltaBlock, edit_steps: Sequence[bool]):
        super().__init__()
        self.block = block
        self.edit_steps = [bool(e) for e in edit_steps]

    def forward(self, h: torch.Tensor, step_index: int, timestep) -> torch.Tensor:
        if not self.edit_steps[step_index]:
            return torch.zeros_like(h)
        t = torch.as_tensor(timestep, device=h.device).reshape(())
        return self.block(h, t)
