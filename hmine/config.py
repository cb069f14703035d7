"""Run configuration: YAML files validated by pydantic, one frozen model per stage.

Every model forbids unknown keys and declares its constraints on its fields, so a typo,
a wrong type or an impossible value fails before any work, with a message naming the
field. Each stage's *config hash* covers its own settings and those of every stage it
reads from, so a change invalidates exactly the stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Frozen):
    """Which diffusion model, and where its h is read."""

    id: str = Field("embedded:shapes-ddpm", description="hub id, local folder or embedded:shapes-ddpm")
    revision: str | None = None
    h_position: Literal["before", "middle", "after"] = "after"
    device: str = "cpu"


class SampleConfig(_Frozen):
    """The sample stage: N images and their per-step h."""

    n_samples: int = Field(1024, ge=1)
    seed_start: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1, description="also the zarr chunk length along sample")
    num_inference_steps: int = Field(10, ge=1)
    eta: float | list[float] = 0.0
    h_dtype: Literal["float16", "float32"] = "float16"
    images_dtype: Literal["float16", "float32"] = "float32"

    @field_validator("eta")
    @classmethod
    def _eta_non_negative(cls, value):
        values = value if isinstance(value, list) else [value]
        if any(v < 0 for v in values):
            raise ValueError("eta must be >= 0 (0 = DDIM, 1 = DDPM-like)")
        return value

    @model_validator(mode="after")
    def _one_eta_per_step(self):
        if isinstance(self.eta, list) and len(self.eta) != self.num_inference_steps:
            raise ValueError(
                f"sample.eta has {len(self.eta)} entries but sample.num_inference_steps is "
                f"{self.num_inference_steps}; give one eta per step or a single number"
            )
        return self

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed_start, self.seed_start + self.n_samples))


class RunConfig(_Frozen):
    """A whole mining run: where it writes and the settings of every stage."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    output_root: Path = Path("stores")
    report_root: Path = Path("reports")
    model: ModelConfig = ModelConfig()
    sample: SampleConfig = SampleConfig()

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.name

    def stage_hash(self, stage: str) -> str:
        """Hash of everything that determines the given stage's output."""
        return config_hash(self.stage_inputs(stage))

    def stage_inputs(self, stage: str) -> dict:
        model = self.model.model_dump(mode="json", exclude={"device"})
        if stage == "sample":
            return {"model": model, "sample": self.sample.model_dump(mode="json")}
        raise KeyError(f"unknown stage {stage!r}")


def config_hash(payload: dict) -> str:
    """A short, stable hash of a JSON-able dict (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{field}'; remove it or check its spelling")
        else:
            value = item.get("input")
            lines.append(f"{source}: field '{field}': {item['msg']} (got {value!r})")
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. sample.n_samples=64")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides and validate it.

    Raises
    ------
    ConfigError
        Naming the offending field, for unknown keys, wrong types and impossible values.
    """
    source = str(path) if path is not None else "defaults"
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
