"""The directions the benchmark edits with, one per (method, attribute) after matching.

Every candidate is a stored direction of ``directions.zarr`` (a unit vector per step and
its ``scale_unit``) or the random baseline, and is edited once at every benchmark scale;
:mod:`hmine.benchmark.table` then reads each one against the attribute(s) it is matched to:

* supervised methods (``mean_difference``, ``probe``, ``regression``, ``conditional``): the
  direction is about the attribute its name says (:func:`hmine.strength.direction_attribute`);
  a conditional direction's method is ``conditional/<base method>``;
* ``pca``: the first per-step components, each matched afterwards to the factor it moves most
  (:func:`hmine.benchmark.table.match_components`);
* ``random``: one Gaussian direction (seeded), unit norm per step, read against every
  attribute. Norm-matched: its ``scale_unit`` at each step is the largest of the other
  candidates' there, so its edits span the norms ||delta h|| = |scale| * scale_unit of every
  method's, and its flip rate can be read at each method's matched norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmine.strength import direction_attribute

SUPERVISED = ("mean_difference", "probe", "regression", "conditional")
RANDOM = "random"


@dataclass(frozen=True)
class Candidate:
    """One edited direction: ``name`` as stored (``random`` for the baseline), its ``method``
    and ``attribute`` (None: matched later, PCA and random), ``unit`` (step, C, H, W) and
    ``scale_unit`` (step,)."""

    name: str
    method: str
    attribute: str | None
    unit: np.ndarray
    scale_unit: np.ndarray


def method_of(name: str, method: str) -> str:
    """``conditional/probe/is_red|is_circle`` → ``conditional/probe``; others: the stored method."""
    if method == "conditional":
        return "/".join(name.split("/")[:2])
    return method


def stored_candidates(directions, attributes, pca_components: int) -> list[Candidate]:
    """The supervised directions of ``attributes`` and the first ``pca_components`` per-step PCA ones."""
    names = [str(n) for n in directions["name"].values]
    methods = [str(m) for m in directions["method"].values]
    chosen = []
    for i, (name, method) in enumerate(zip(names, methods)):
        if method in SUPERVISED and direction_attribute(name) in attributes:
            chosen.append((i, name, method_of(name, method), direction_attribute(name)))
        elif method == "pca" and int(name.split("/")[-1]) < pca_components:
            chosen.append((i, name, "pca", None))
    units = directions["direction"].values
    scale_units = directions["scale_unit"].values
    return [
        Candidate(name, method, attribute, np.asarray(units[i], dtype=np.float32), np.asarray(scale_units[i], dtype=np.float64))
        for i, name, method, attribute in chosen
    ]


def random_candidate(others: list[Candidate], seed: int, shape: tuple[int, ...] | None = None) -> Candidate:
    """The norm-matched random direction (module docstring): a Gaussian vector per step, unit norm,
    ``scale_unit`` the largest of ``others``' at each step."""
    if not others and shape is None:
        raise ValueError("a norm-matched random direction needs other candidates to match")
    shape = others[0].unit.shape if shape is None else shape
    raw = np.random.default_rng(seed).standard_normal(shape)
    unit = raw / np.linalg.norm(raw.reshape(shape[0], -1), axis=1).reshape(-1, *([1] * (len(shape) - 1)))
    scale_unit = np.max([c.scale_unit for c in others], axis=0) if others else np.ones(shape[0])
    return Candidate(RANDOM, RANDOM, None, unit.astype(np.float32), np.asarray(scale_unit, dtype=np.float64))


def norm_per_scale(candidate: Candidate, edit_steps) -> float:
    """||delta h|| per unit of scale, as the root mean square over the edited steps of ``scale_unit``
    (the unit vectors have norm 1 at every step)."""
    edited = np.asarray(edit_steps, dtype=bool)
    return float(np.sqrt(np.mean(candidate.scale_unit[edited] ** 2)))
