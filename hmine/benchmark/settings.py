"""The benchmark stage's config section (pydantic and the standard library only: hmine.config imports it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

_MAX_SAMPLES = 10_000_000  # the bounds of hmine.config (not imported: hmine.config imports this module)
_MAX_BATCH = 65_536


class BenchmarkConfig(BaseModel):
    """``benchmark:``, the ground-truth benchmark of every direction method against the world's known factors.

    ``hmine benchmark CONFIG`` runs it whatever ``enabled`` says; ``enabled: true`` makes
    ``hmine run`` run it too (so do the status and report once ``benchmark.parquet`` exists).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="run the benchmark in every `hmine run` (`hmine benchmark` runs it anyway)")
    n_samples: int = Field(32, ge=2, le=_MAX_SAMPLES, description="the first N samples of the run are edited")
    scales: list[float] = Field(
        [2.5, 5.0, 10.0, 20.0, 40.0],
        description="edit strengths in std of the data along each direction; each is edited at +s and -s (the matched strength is interpolated between them)",
    )
    pca_components: int = Field(8, ge=0, le=4096, description="the first K per-step PCA components are matched to factors")
    jacobian: bool = Field(
        True,
        description="also benchmark the Jacobian stage's per-image directions, each analysed sample along its own vectors "
        "(when jacobian.n_samples > 0; the Jacobian stage must have run)",
    )
    random_seed: int = Field(0, ge=0, description="seed of the norm-matched random direction")
    batch_size: int = Field(64, ge=1, le=_MAX_BATCH, description="images whose eps one U-Net call computes")

    @field_validator("scales")
    @classmethod
    def _positive_distinct(cls, scales: list[float]) -> list[float]:
        magnitudes = sorted({abs(float(s)) for s in scales})
        if not magnitudes or magnitudes[0] == 0.0:
            raise ValueError("benchmark.scales must be non-zero strengths, e.g. [5, 10, 20, 40] (each is edited at +s and -s)")
        return magnitudes
