"""Per-image directions named in ``edit.directions``: the Jacobian stage's vectors as edits.

``jacobian/<variant>/<k>`` applies each analysed sample's own k-th vector of each analysed
step at that step, ``jacobian/<variant>/<k>@t<step>`` the vector of step ``step`` at every
step. Only the samples the Jacobian stage analysed have such a direction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

JACOBIAN_PREFIX = "jacobian/"
VARIANT_ARRAYS = {"masked": "vectors", "localised": "localised_vectors"}
_NAME = re.compile(r"^jacobian/(?P<variant>[a-z]+)/(?P<k>\d+)(?:@t(?P<step>\d+))?$")


@dataclass(frozen=True)
class JacobianDirection:
    """A per-image Jacobian direction named in ``edit.directions``.

    ``jacobian/<variant>/<k>`` applies each analysed step's k-th vector (0-based) at that
    step only ("per step"; steps the stage did not analyse are not edited), and
    ``jacobian/<variant>/<k>@t<step>`` applies the vector of the analysed step ``step`` at
    every step ("global at t"). ``variant`` is ``masked`` (the top singular vectors of the
    possibly masked Jacobian, the store's ``vectors``) or ``localised``.
    """

    name: str
    variant: str
    k: int
    at_step: int | None

    @classmethod
    def parse(cls, name: str) -> JacobianDirection:
        match = _NAME.match(name)
        if match is None or match["variant"] not in VARIANT_ARRAYS:
            raise ValueError(
                f"edit.directions: {name!r} is not a Jacobian direction; write jacobian/<variant>/<k> "
                f"(per step) or jacobian/<variant>/<k>@t<step> (global at t), variant one of "
                f"{sorted(VARIANT_ARRAYS)}, e.g. jacobian/localised/0@t100"
            )
        return cls(name, match["variant"], int(match["k"]), None if match["step"] is None else int(match["step"]))

    def check_against(self, group) -> None:
        """Refuse, naming the fix, a direction that ``jacobian.zarr`` (a zarr group) does not hold."""
        array = VARIANT_ARRAYS[self.variant]
        if array not in group:
            raise ValueError(
                f"edit.directions names {self.name!r}, but jacobian.zarr has no {self.variant} directions; "
                "localised ones need jacobian.mask and jacobian.localised_rank > 0"
            )
        k = group[array].shape[2]
        if self.k >= k:
            raise ValueError(f"edit.directions names {self.name!r}, but jacobian.zarr holds k={k} directions per step (0..{k - 1})")
        steps = [int(t) for t in group["step"][...]]
        if self.at_step is not None and self.at_step not in steps:
            raise ValueError(f"edit.directions names {self.name!r}, but the Jacobian stage analysed the steps {steps}")

    def units(self, group, run_steps: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per analysed sample, unit vectors (sample, run step, channel, y, x) and their seeds.

        Per step: the vector of each analysed step at that step, zero at the others.
        Global at t: the vector of step t at every step.
        """
        vectors = group[VARIANT_ARRAYS[self.variant]]  # (sample, analysed step, k, channel, y, x)
        analysed = [int(t) for t in group["step"][...]]
        seeds = np.asarray(group["sample"][...])
        units = np.zeros((len(seeds), len(run_steps), *vectors.shape[3:]), dtype=np.float32)
        if self.at_step is not None:
            units[:] = np.asarray(vectors[:, analysed.index(self.at_step), self.k])[:, None]
        else:
            for j, t in enumerate(analysed):
                units[:, run_steps.index(t)] = np.asarray(vectors[:, j, self.k])
        return units, seeds


def per_image_units(name, jacobian_group, run_steps, h, all_seeds):
    """For a Jacobian direction: units (seed, step, ...), scale units (seed, step) and which
    of ``all_seeds`` have one, each indexed like ``all_seeds``; None for any other direction."""
    from hmine.directions import projection_std

    if not name.startswith(JACOBIAN_PREFIX):
        return None
    units, analysed_seeds = JacobianDirection.parse(name).units(jacobian_group, run_steps)
    scale_units = projection_std(units, h)  # the std of the data along each image's vector, per step
    position = {int(seed): i for i, seed in enumerate(analysed_seeds)}
    all_units = np.zeros((len(all_seeds), *units.shape[1:]), dtype=np.float32)
    all_scale_units = np.zeros((len(all_seeds), units.shape[1]), dtype=np.float64)
    has_direction = np.zeros(len(all_seeds), dtype=bool)
    for i, seed in enumerate(all_seeds):
        if int(seed) in position:
            all_units[i], all_scale_units[i] = units[position[int(seed)]], scale_units[position[int(seed)]]
            has_direction[i] = True
    return all_units, all_scale_units, has_direction
