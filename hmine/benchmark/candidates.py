"""The directions the benchmark edits with, one per (method, attribute) after matching.

Every candidate is a stored direction of ``directions.zarr`` (a unit vector per step and
its ``scale_unit``) or the random baseline, and is edited once at every benchmark scale;
:mod:`hmine.benchmark.table` then reads each one against the attribute(s) it is matched to:

* supervised methods (``mean_difference``, ``probe``, ``regression``, ``conditional``): the
  direction is about the attribute its name says (:func:`hmine.strength.direction_attribute`);
  a conditional direction's method is ``conditional/<base method>``;
* ``pca``: the first per-step components, each matched afterwards to the factor it moves most
  (:func:`hmine.benchmark.table.match_components`);
* ``jacobian/<variant>``: per-image Jacobian directions (the Jacobian stage's k-th singular or
  localised vector of each analysed sample at an analysed step t, applied at every edited step,
  as the edit stage's ``jacobian/<variant>/<k>@t<t>``), each analysed sample edited along its
  own vector, then matched to factors as PCA's components are. A singular vector's sign is
  arbitrary, so each sample's vector is turned to agree with the first analysed sample's
  (a non-negative inner product): the images' vectors then move their images the same way
  wherever the directions transfer between images, and the family is read as one direction;
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
    and ``attribute`` (None: matched later, PCA, Jacobian and random), ``unit`` (step, C, H, W)
    and ``scale_unit`` (step,).

    Per-image directions name the ``seeds`` they edit, and their ``unit`` (seed, step, C, H, W)
    and ``scale_unit`` (seed, step) hold one direction per seed; ``seeds`` None: every
    benchmarked sample, along the one direction.
    """

    name: str
    method: str
    attribute: str | None
    unit: np.ndarray
    scale_unit: np.ndarray
    seeds: tuple[int, ...] | None = None

    def step_scale_units(self) -> np.ndarray:
        """``scale_unit`` per step (step,): the largest over the seeds of a per-image direction."""
        return self.scale_unit if self.seeds is None else self.scale_unit.max(axis=0)


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
    shape = others[0].unit.shape[-4:] if shape is None else shape
    raw = np.random.default_rng(seed).standard_normal(shape)
    unit = raw / np.linalg.norm(raw.reshape(shape[0], -1), axis=1).reshape(-1, *([1] * (len(shape) - 1)))
    scale_unit = np.max([c.step_scale_units() for c in others], axis=0) if others else np.ones(shape[0])
    return Candidate(RANDOM, RANDOM, None, unit.astype(np.float32), np.asarray(scale_unit, dtype=np.float64))


def norm_per_scale(candidate: Candidate, edit_steps) -> float:
    """||delta h|| per unit of scale, as the root mean square over the edited steps (and over the
    seeds of a per-image direction) of ``scale_unit`` (the unit vectors have norm 1 at every step)."""
    edited = np.asarray(edit_steps, dtype=bool)
    return float(np.sqrt(np.mean(candidate.scale_unit[..., edited] ** 2)))


def sign_aligned(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (seed, ...) each multiplied by +-1 so its inner product with the first is >= 0."""
    flat = vectors.reshape(len(vectors), -1).astype(np.float64)
    signs = np.where(flat @ flat[0] < 0, -1.0, 1.0)
    return vectors * signs.reshape(-1, *([1] * (vectors.ndim - 1))).astype(vectors.dtype)


def jacobian_candidates(jacobian_group, run_steps, h) -> list[Candidate]:
    """Per-image Jacobian candidates (module docstring): one per variant the store holds, vector
    k and analysed step t, named ``jacobian/<variant>/<k>@t<t>`` with method ``jacobian/<variant>``.

    ``jacobian_group`` is the Jacobian stage's store, ``run_steps`` the run's timesteps and ``h``
    the samples' h (an xarray DataArray), whose spread along each image's vector sets its scale unit.
    """
    from hmine.directions import projection_std
    from hmine.per_image import VARIANT_ARRAYS, JacobianDirection

    seeds = tuple(int(s) for s in jacobian_group["sample"][...])
    analysed = [int(t) for t in jacobian_group["step"][...]]
    chosen = []
    for variant, array in VARIANT_ARRAYS.items():
        if array not in jacobian_group:
            continue
        for t in analysed:
            for k in range(jacobian_group[array].shape[2]):
                direction = JacobianDirection.parse(f"jacobian/{variant}/{k}@t{t}")
                units, _ = direction.units(jacobian_group, list(run_steps))
                units = sign_aligned(units)
                chosen.append(Candidate(direction.name, f"jacobian/{variant}", None, units,
                                        projection_std(units, h), seeds))  # fmt: skip
    return chosen
