"""The directions stage's prompt pairs as a config section (see :mod:`hmine.prompt_directions`).

For a text-conditional model, ``directions.prompt_pairs`` names pairs of prompts; the
directions stage samples the run's first ``n_seeds`` seeds once with each prompt of a pair
(the same x_T and per-step noise) and stores the mean change of h from the first prompt
to the second as ``prompt_pair/<name>``, in the same scale convention as every other
direction, so the edit stage edits it like the others. This module imports only pydantic
and the standard library (the run config imports it).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

# one segment of a direction name: the edit stage's names split at '/', combine with
# '+', '-' and '*', and take '@t<step>'
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")


class PromptPairsConfig(BaseModel):
    """``directions.prompt_pairs``: named (from, to) prompt pairs and the seeds they are sampled on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: dict[str, tuple[str, str]] = Field(
        min_length=1,
        description="name -> [prompt A, prompt B]: prompt_pair/<name> points from A to B "
        "(e.g. smiling: ['a photo of a face', 'a photo of a smiling face'])",
    )
    n_seeds: int = Field(64, ge=1, le=2**20, description="the run's first N seeds, each sampled with both prompts")

    @field_validator("pairs")
    @classmethod
    def _names_and_prompts(cls, pairs: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
        for name, (a, b) in pairs.items():
            if not _NAME.match(name):
                raise ValueError(
                    f"pair name {name!r} must be letters, digits, '_' or '.' (it becomes the direction prompt_pair/{name})"
                )
            if not a.strip() or not b.strip():
                raise ValueError(f"pair {name!r}: both prompts must be non-empty")
            if a == b:
                raise ValueError(f"pair {name!r}: the two prompts are the same, so the direction would be zero")
        return pairs
