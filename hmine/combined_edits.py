"""What the edit stage applies for a combination or a direction global at t (:mod:`hmine.edit_names`).

A term resolves, like any ``edit.directions`` name, to (unit, scale unit, which samples
have it): a global direction (step, channel, y, x) with (step,), a per-image Jacobian one
(sample, step, ...) with (sample, step), or a delta block's editor with scale unit None.
The edit at scale s of ``sum_i w_i term_i`` adds s * sum_i w_i * scale_unit_i * u_i, so
the combination's unit is that sum and its scale unit 1: the edit stage's delta
``s * 1 * unit`` (:func:`hmine.editing.delta_for`) is the sum of the terms' deltas. With a
delta block among the terms the result is an editor, :class:`CombinedEditor`:
h + s (sum_blocks w_b f_b(h, t) + the fixed terms' sum at the step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from hmine.edit_names import EditTerm, at_step_index


class AtStepEditor(nn.Module):
    """An editor evaluated as at step ``step_index`` (timestep ``timestep``) at every step it is called."""

    def __init__(self, editor, step_index: int, timestep):
        super().__init__()
        self.editor, self.step_index, self.timestep = editor, int(step_index), timestep

    def forward(self, h: torch.Tensor, step_index: int, timestep) -> torch.Tensor:
        return self.editor(h, self.step_index, self.timestep)


class CombinedEditor(nn.Module):
    """sum_b weight_b * editor_b(h, i, t) + fixed[i]: delta blocks with fixed (global) directions."""

    def __init__(self, editors: Sequence[tuple[float, Callable]], fixed: np.ndarray | None):
        super().__init__()
        self.weights = [float(w) for w, _ in editors]
        self.editors = nn.ModuleList([e for _, e in editors])
        self.register_buffer("fixed", None if fixed is None else torch.from_numpy(np.asarray(fixed, dtype=np.float32)))

    def forward(self, h: torch.Tensor, step_index: int, timestep) -> torch.Tensor:
        total = torch.zeros_like(h) if self.fixed is None else self.fixed[step_index].to(h).expand_as(h).clone()
        for weight, editor in zip(self.weights, self.editors):
            total = total + weight * editor(h, step_index, timestep)
        return total


def at_step(term: EditTerm, unit, scale_unit, timesteps: Sequence[int]):
    """(unit, scale unit) of ``term`` global at its step: that step's vector and scale unit at every step."""
    j = at_step_index(term, timesteps)
    if scale_unit is None:  # a delta block's editor
        if hasattr(unit, "edit_steps") and not unit.edit_steps[j]:
            raise ValueError(f"edit.directions names {term.name}@t{term.at_step}, but the delta block was trained "
                             "outside that step (learn.t_edit / learn.t_edit_max); pick a trained step")  # fmt: skip
        return AtStepEditor(unit, j, timesteps[j]), None
    unit, scale_unit = np.asarray(unit), np.asarray(scale_unit)
    if unit.ndim != 4:
        raise ValueError(f"edit.directions: {term.name}@t{term.at_step} is a per-image direction; "
                         "write jacobian/<variant>/<k>@t<step> for a Jacobian direction global at t")  # fmt: skip
    if not np.any(unit[j]) or scale_unit[j] == 0:
        raise ValueError(f"edit.directions names {term.name}@t{term.at_step}, but {term.name} is zero at that step "
                         "(a learned Δh outside its training window); pick a step it edits")  # fmt: skip
    return np.broadcast_to(unit[j], unit.shape).copy(), np.full_like(scale_unit, scale_unit[j])


def combined_unit(terms: Sequence[EditTerm], resolve: Callable[[str], tuple], timesteps: Sequence[int], text: str = "") -> tuple:
    """(unit, scale unit, has_direction) of ``terms``; ``resolve(name)`` gives a plain name's triple.

    Global and per-image terms sum to a fixed unit (scale unit 1; per image when any term
    is); with delta blocks the unit is a :class:`CombinedEditor` (scale unit None). A sample
    has the combination when it has every term.
    """
    fixed, editors, has_direction = None, [], None
    for term in terms:
        unit, scale_unit, has = resolve(term.name)
        if term.at_step is not None:
            unit, scale_unit = at_step(term, unit, scale_unit, timesteps)
        has_direction = has.copy() if has_direction is None else has_direction & has
        if scale_unit is None:
            editors.append((term.weight, unit))
            continue
        scale_unit = np.asarray(scale_unit, dtype=np.float64)
        delta = term.weight * scale_unit.reshape(*scale_unit.shape, 1, 1, 1) * np.asarray(unit, dtype=np.float64)
        fixed = delta if fixed is None else fixed + delta  # broadcasts a global term over the samples of a per-image one
    if editors:
        if fixed is not None and fixed.ndim == 5:
            raise ValueError(f"edit.directions: {text!r} combines a delta block with a per-image Jacobian direction; "
                             "combine the block with global directions only")  # fmt: skip
        return CombinedEditor(editors, fixed), None, has_direction
    return fixed.astype(np.float32), np.ones(fixed.shape[:-3], dtype=np.float64), has_direction
