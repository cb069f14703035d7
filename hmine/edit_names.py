"""The names of ``edit.directions``: one direction, one taken at a step, or a weighted sum.

An entry of ``edit.directions`` is

* a direction's name: ``probe/is_red``, ``learned/smile``, ``learned-block/smile``,
  ``jacobian/localised/0``, ``sega/glasses`` (edited as before);
* a direction *global at t*: ``probe/is_red@t500`` applies the vector (and the scale unit)
  of the step whose timestep is 500 at every edited step, as ``jacobian/<v>/<k>@t<step>``
  does for a Jacobian direction (whose ``@t`` stays part of its name); a delta block
  (``learned-block/smile@t500``) is evaluated with the time input of t = 500 at every
  edited step. To edit *only* at one step, set ``edit.t_edit = edit.t_edit_max = t``;
* a combination, terms joined by `` + `` or `` - `` (spaces around the operator: names
  hold ``-``), each an optional weight ``<number>*`` and a direction, e.g.
  ``probe/is_red - 0.5*pca/0`` or ``learned-block/smile + 0.5*probe/is_young@t500``. At
  edit scale s the combination adds s * sum_i w_i * scale_unit_i * u_i to h (a delta
  block's term: s * w_i * f(h, t)), so each term keeps its own scale unit (std of the data
  along it; 1 for the trained strength of a learned edit).

SEGA concepts are sampled again with their guidance rather than added to h: they combine
only with each other, ``sega/glasses + 0.5*sega/smile`` sampling with both concepts at once,
each at |s w| times its guidance (:mod:`hmine.sega_edits`), and have no step. This module
imports only the standard library (the run config imports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JACOBIAN_PREFIX = "jacobian/"  # hmine.per_image's (imported here it would load numpy into the config)
SEGA_PREFIX = "sega/"  # hmine.sega_edits'
_OPERATOR = re.compile(r"\s+([+-])\s+")
_TERM = re.compile(r"^(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*\*\s*)?(?P<name>[^\s*@+]+?)(?:@t(?P<step>[0-9]+))?$")
_EXAMPLE = "e.g. 'probe/is_red - 0.5*pca/0' (spaces around + and -) or 'probe/is_red@t500' (global at t = 500)"


@dataclass(frozen=True)
class EditTerm:
    """One weighted direction of an edit; ``at_step``: the timestep whose vector is used at every step."""

    name: str
    weight: float = 1.0
    at_step: int | None = None


def parse_edit(text: str) -> list[EditTerm]:
    """The terms of an ``edit.directions`` entry (module docstring).

    Raises
    ------
    ValueError
        One line naming ``edit.directions``, the entry and the syntax.
    """
    body = str(text).strip()
    sign = 1.0
    if body[:1] in "+-" and body[1:2].strip():  # a leading sign: '-0.5*a + b'
        sign, body = (-1.0 if body[0] == "-" else 1.0), body[1:]
    pieces = _OPERATOR.split(body)  # term, op, term, op, ...
    signs = [sign] + [-1.0 if op == "-" else 1.0 for op in pieces[1::2]]
    terms = []
    for term_sign, piece in zip(signs, pieces[0::2]):
        match = _TERM.match(piece.strip())
        if match is None or not piece.strip():
            raise ValueError(f"edit.directions: {text!r} is not a direction or a combination of directions; write {_EXAMPLE}")
        name, step = match["name"], match["step"]
        weight = term_sign * (1.0 if match["weight"] is None else float(match["weight"]))
        if name.startswith(JACOBIAN_PREFIX):  # its @t<step> is its own (hmine.per_image.JacobianDirection)
            name, step = name + ("" if step is None else f"@t{step}"), None
        terms.append(EditTerm(name, weight, None if step is None else int(step)))
    sega = [t.name.startswith(SEGA_PREFIX) for t in terms]
    if any(sega) and (not all(sega) or any(t.at_step is not None for t in terms)):
        raise ValueError(f"edit.directions: {text!r} combines a SEGA concept with h-space directions or takes it at a "
                         "step; a SEGA concept is sampled again with its guidance, not added to h: combine SEGA "
                         "concepts only with each other ('sega/a + 0.5*sega/b')")  # fmt: skip
    return terms


def is_plain(text: str) -> bool:
    """Whether the entry is one direction's name as it is (no weight, step or combination)."""
    terms = parse_edit(text)
    return len(terms) == 1 and terms[0] == EditTerm(str(text))


def term_names(entries) -> list[str]:
    """The directions the entries of ``edit.directions`` name, each once, in order."""
    return list(dict.fromkeys(term.name for entry in entries for term in parse_edit(entry)))


def at_step_index(term: EditTerm, timesteps) -> int:
    """The index among the sampler's ``timesteps`` of the step ``term`` is taken at (``name@t<step>``).

    Raises
    ------
    ValueError
        One line naming ``edit.directions`` and the term: its step is not one of ``timesteps``.
    """
    steps = [int(t) for t in timesteps]
    if term.at_step not in steps:
        raise ValueError(f"edit.directions names {term.name}@t{term.at_step}, but {term.at_step} is not one of the "
                         f"sampler's timesteps {steps}; pick one of them")  # fmt: skip
    return steps.index(term.at_step)


def check_at_steps(entries, timesteps) -> None:
    """Refuse, in one line, a direction global at a t that is not one of the sampler's timesteps."""
    for entry in entries:
        for term in parse_edit(entry):
            if term.at_step is not None:
                at_step_index(term, timesteps)
