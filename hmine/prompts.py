"""Prompts of a text-conditional run: which prompt each seed gets, and the guidance settings.

``sample.text`` in a run config. A sample's prompt is a function of its seed alone, so
any stage that regenerates a seed (the edit stage, a notebook) conditions it as the
sample stage did, from the seed and this config:

* ``prompts: [p0, p1, ...]``: seed s gets ``prompts[s % len(prompts)]``;
* ``template: "a {size} {color} {shape}"`` with ``slots: {size: [...], color: [...], ...}``:
  every combination of slot values, in ``itertools.product`` order over the slots as
  the template names them (the last slot varies fastest), and seed s gets combination
  ``s % n_combinations``; consecutive seeds cover every combination equally often.

This module imports only pydantic and the standard library (the run config imports it).
"""

from __future__ import annotations

import itertools
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def template_slots(template: str) -> list[str]:
    """The slot names of a ``str.format`` template, in order of first appearance."""
    names = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(
                f"sample.text.template slot {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain name; write slots as {{name}}"
            )
        if field not in names:
            names.append(field)
    return names


class TextConfig(BaseModel):
    """Prompts, negative prompt and classifier-free guidance of a text-conditional model.

    The guided model output is ``uncond + guidance_scale * (cond - uncond)``, where
    ``uncond`` is the output for the negative prompt (the empty prompt when none is
    given). At ``guidance_scale`` 1 only the conditional branch is computed. Below 1
    hmine applies the same formula (0 samples from the unconditional branch alone);
    diffusers' pipelines switch guidance off at any scale <= 1 instead.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[str] | None = Field(None, min_length=1, description="seed s gets prompts[s % len(prompts)]")
    template: str | None = Field(None, description="a prompt with {slot} fields, filled from slots")
    slots: dict[str, list[str]] = Field(
        default_factory=dict, description="slot name -> its values; seed s gets combination s % n_combinations"
    )
    negative_prompt: str | None = Field(None, description="the unconditional branch's prompt (default: empty)")
    guidance_scale: float = Field(7.5, ge=0, le=1000, description="classifier-free guidance scale; 1 = no guidance")
    h_branch: Literal["conditional", "unconditional"] = Field(
        "conditional", description="whose h the sample stage records: the prompt's branch or the negative one"
    )
    edit_branches: Literal["both", "conditional", "unconditional"] = Field(
        "both", description="the guidance branches an h-space edit adds its delta in"
    )

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if (self.prompts is None) == (self.template is None):
            raise ValueError("sample.text needs exactly one of prompts (a list) and template (with slots)")
        if self.prompts is not None and self.slots:
            raise ValueError("sample.text.slots fill a template; with prompts: remove slots, or use template:")
        if self.template is not None:
            names = template_slots(self.template)
            missing = [name for name in names if name not in self.slots]
            unused = [name for name in self.slots if name not in names]
            empty = [name for name in names if name in self.slots and not self.slots[name]]
            if missing or unused or empty:
                raise ValueError(
                    f"sample.text.slots must give values for exactly the template's slots {names}: "
                    f"missing {missing}, not in the template {unused}, without values {empty}"
                )
        return self

    @model_validator(mode="after")
    def _negative_prompt_needs_guidance(self):
        if self.negative_prompt is not None and self.guidance_scale <= 1:
            raise ValueError(
                f"sample.text.negative_prompt needs sample.text.guidance_scale > 1 (got {self.guidance_scale}): "
                "at 1 it has no effect and below 1 it pulls images towards the negative prompt; "
                "raise guidance_scale or remove negative_prompt"
            )
        if self.guidance_scale == 1 and "unconditional" in (self.h_branch, self.edit_branches):
            raise ValueError(
                "at sample.text.guidance_scale 1 there is no unconditional branch: set h_branch to "
                "'conditional' and edit_branches to 'conditional' or 'both', or guidance_scale != 1"
            )
        return self

    @property
    def guided(self) -> bool:
        """Whether the unconditional branch is computed (every scale but 1)."""
        return self.guidance_scale != 1

    @property
    def slot_names(self) -> list[str]:
        return [] if self.template is None else template_slots(self.template)

    @property
    def n_prompts(self) -> int:
        """How many distinct prompt settings the seeds cycle through."""
        if self.prompts is not None:
            return len(self.prompts)
        count = 1
        for name in self.slot_names:
            count *= len(self.slots[name])
        return count

    def slot_values_for(self, seed: int) -> dict[str, str]:
        """The slot values seed ``seed`` gets (empty for a prompt list)."""
        names = self.slot_names
        if not names:
            return {}
        index = int(seed) % self.n_prompts
        values = []
        for name in reversed(names):  # the last slot varies fastest, as itertools.product
            index, position = divmod(index, len(self.slots[name]))
            values.append(self.slots[name][position])
        return dict(zip(names, reversed(values)))

    def prompt_for(self, seed: int) -> str:
        """The prompt of the sample with seed ``seed``."""
        if self.prompts is not None:
            return self.prompts[int(seed) % len(self.prompts)]
        return self.template.format(**self.slot_values_for(seed))

    def all_prompts(self) -> list[str]:
        """Every prompt the seeds cycle through, in seed order (seed s gets entry s % n)."""
        if self.prompts is not None:
            return list(self.prompts)
        names = self.slot_names
        return [self.template.format(**dict(zip(names, combo))) for combo in itertools.product(*(self.slots[n] for n in names))]
