"""SEGA's settings as a config section: named concepts and the momentum (see :mod:`hmine.sega`).

For the edit stage's ``sega/<concept>`` edits: an edit at signed scale s applies the
concept with ``|s|`` times its guidance scale, reversed when s < 0, so SEGA's concepts are
swept and measured like h-space directions (scale 0 is the unedited sample). This module
imports only pydantic and the standard library (the run config may import it).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SegaConceptConfig(BaseModel):
    """One SEGA concept (diffusers' ``SemanticStableDiffusionPipeline`` per-concept arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, description="the editing prompt, e.g. 'smiling, smile'")
    reverse: bool = Field(False, description="guide away from the concept (reverse_editing_direction)")
    warmup_steps: int = Field(10, ge=0, description="steps before the concept is applied (edit_warmup_steps)")
    cooldown_steps: int | None = Field(None, ge=0, description="the step from which it stops (edit_cooldown_steps); null: never")
    guidance_scale: float = Field(5.0, ge=0, le=1000, description="edit_guidance_scale at edit scale 1")
    threshold: float = Field(0.9, ge=0, le=1, description="quantile of |guidance| per channel map zeroed below (edit_threshold)")
    weight: float = Field(1.0, ge=0, description="weight against other concepts (edit_weights)")

    @model_validator(mode="after")
    def _window_is_ordered(self):
        if self.cooldown_steps is not None and self.cooldown_steps <= self.warmup_steps:
            raise ValueError(
                f"sega concept {self.prompt!r}: cooldown_steps ({self.cooldown_steps}) must be above warmup_steps "
                f"({self.warmup_steps}), or the concept is never applied"
            )
        return self


def check_warmup_applies(warmup_steps: int, num_inference_steps: int, field: str, steps_field: str) -> None:
    """Refuse a SEGA concept whose warm-up leaves it never applied (one line naming ``field``).

    The sampling loop applies a concept from step index ``warmup_steps`` on (``step >=
    warmup_steps`` in :func:`hmine.sega.semantic_guidance`, as in diffusers'
    ``SemanticStableDiffusionPipeline``) and its steps are 0 .. ``num_inference_steps`` - 1:
    a warm-up of ``num_inference_steps`` - 1 applies the concept at the last step, one of
    ``num_inference_steps`` or more never does, and the "edited" image is the unedited one.
    ``field`` and ``steps_field`` name the two settings where the caller reads them.
    """
    if warmup_steps >= num_inference_steps:
        raise ValueError(
            f"{field} is {warmup_steps} but {steps_field} is {num_inference_steps}: the concept would never be "
            f"applied; set warmup_steps below {num_inference_steps} (it must be < num_inference_steps)"
        )


class SegaConfig(BaseModel):
    """Named SEGA concepts and the momentum shared by all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concepts: dict[str, SegaConceptConfig] = Field(default_factory=dict, description="name -> concept; edits are sega/<name>")
    momentum_scale: float = Field(0.1, ge=0, le=1000, description="edit_momentum_scale")
    momentum_beta: float = Field(0.4, ge=0, le=1, description="edit_mom_beta")

    def scaled(self, name: str, scale: float) -> dict:
        """The settings of concept ``name`` at signed edit scale ``scale``: guidance ``|scale|`` times
        the concept's, reversed when ``scale`` < 0 (keyword arguments of :class:`hmine.sega.SegaConcept`)."""
        if name not in self.concepts:
            raise KeyError(f"sega/{name}: no concept {name!r} in sega.concepts (it has {sorted(self.concepts)})")
        concept = self.concepts[name].model_dump()
        concept["guidance_scale"] = abs(scale) * concept["guidance_scale"]
        concept["reverse"] = concept["reverse"] != (scale < 0)
        return concept
