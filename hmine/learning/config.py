"""The learn stage's config section (pydantic and the standard library only: hmine.config imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# the same bounds as hmine.config (not imported: hmine.config imports this module)
_MAX_SAMPLES = 10_000_000
_MAX_BATCH = 65_536
_MAX_TIMESTEP = 1_000_000


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LearnTarget(_Frozen):
    """What one learned edit is trained towards.

    ``kind: classifier`` pushes ``attribute``'s score (the world classifier's) over 0.5
    while a leakage term keeps the other attributes' scores; ``kind: clip`` follows CLIP's
    direction from the ``source`` text to the ``target`` text (Asyrp's loss).
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="the direction's name: learned/<name>")
    kind: Literal["classifier", "clip"] = "classifier"
    attribute: str | None = Field(None, description="classifier: the world classifier's attribute to turn on")
    toward: Literal["positive", "negative"] = Field(
        "positive", description="classifier: push the attribute's score above 0.5 (positive) or below it"
    )
    leakage_attributes: list[str] | None = Field(
        None, description="classifier: attributes whose scores the leakage term keeps; null = label.attributes but the own"
    )
    source: str | None = Field(None, description="clip: the source text, e.g. 'a face'")
    target: str | None = Field(None, description="clip: the target text, e.g. 'a smiling face'")
    clip_model_id: str = "openai/clip-vit-base-patch32"
    clip_revision: str | None = None
    target_weight: float = Field(1.0, ge=0, description="weight of the classifier target or CLIP directional loss")
    leakage_weight: float = Field(1.0, ge=0, description="classifier: weight of the leakage term")
    l1_weight: float = Field(0.5, ge=0, description="weight of the L1 distance of the edited to the unedited prediction of x0")

    @model_validator(mode="after")
    def _kind_has_its_fields(self):
        if self.kind == "classifier" and not self.attribute:
            raise ValueError(f"learn.targets[{self.name}]: kind classifier needs attribute (e.g. is_red)")
        if self.kind == "clip" and not (self.source and self.target):
            raise ValueError(f"learn.targets[{self.name}]: kind clip needs source and target texts")
        return self


class LearnConfig(_Frozen):
    """The learn stage: Asyrp's learned edits (a Δh per edited step, and the delta block f_t(h, t))."""

    targets: list[LearnTarget] = Field(default_factory=list, description="empty: the stage does nothing")
    delta_h: bool = Field(True, description="train Δh_t, one free direction per edited step (Asyrp's train_delta_h)")
    delta_block: bool = Field(True, description="train the delta block f_t(h, t) (Asyrp's train_delta_block)")
    n_train: int = Field(64, ge=1, le=_MAX_SAMPLES, description="train on the run's LAST n_train samples (the edit stage edits the first)")
    steps: int = Field(100, ge=1, le=1_000_000, description="optimizer steps per target and kind")
    batch_size: int = Field(8, ge=1, le=_MAX_BATCH, description="trajectories per optimizer step")
    learning_rate: float = Field(0.05, gt=0, description="Adam's learning rate for Δh_t, in units of h")
    block_learning_rate: float = Field(1e-3, gt=0, description="Adam's learning rate for the delta block")
    t_edit: int | None = Field(None, ge=0, le=_MAX_TIMESTEP, description="train only steps with timestep >= t_edit")
    t_edit_max: int | None = Field(None, ge=0, le=_MAX_TIMESTEP, description="and <= t_edit_max (Asyrp's t_0)")
    time_embedding_dim: int = Field(128, ge=2, le=4096, description="delta block: sinusoidal timestep embedding size (even)")
    checkpoint_every: int = Field(10, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="draws each step's batch of training samples")

    @model_validator(mode="after")
    def _sane(self):
        names = [t.name for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"learn.targets names must be unique; repeated: {repeated}")
        if self.targets and not (self.delta_h or self.delta_block):
            raise ValueError("learn.delta_h and learn.delta_block are both false; set one to true")
        if self.t_edit is not None and self.t_edit_max is not None and self.t_edit > self.t_edit_max:
            raise ValueError(f"learn.t_edit ({self.t_edit}) is above learn.t_edit_max ({self.t_edit_max}); swap them")
        if self.time_embedding_dim % 2:
            raise ValueError(f"learn.time_embedding_dim must be even (sines and cosines), got {self.time_embedding_dim}")
        return self
