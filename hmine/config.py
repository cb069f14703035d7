"""Run configuration: YAML files validated by pydantic, one frozen model per stage.

Every model forbids unknown keys and declares its constraints on its fields, so a typo,
a wrong type or an impossible value fails before any work, with a message naming the
field. Each stage's *config hash* covers its own settings and those of every stage it
reads from, so a change invalidates exactly the stages downstream of it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hmine.benchmark.settings import BenchmarkConfig
from hmine.edit_names import term_names
from hmine.interval_config import IntervalConfig
from hmine.learning.config import LearnConfig
from hmine.prompts import TextConfig
from hmine.prompt_pairs_config import PromptPairsConfig
from hmine.sega_config import SegaConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Upper bounds on counts. They are far above any run that fits on a disk (10 million
# samples of CelebA-HQ's h at 10 steps is 6.4 TB) and keep an impossible value from
# reaching numpy or torch, where it fails late with an OverflowError or MemoryError
# after the run directory has been written.
MAX_SAMPLES = 10_000_000
MAX_BATCH = 65_536
MAX_STEPS = 10_000
# Seeds are the int64 ``sample`` coordinate of every store and seed torch's generator.
MAX_SEED = 2**63 - 1


class ModelConfig(_Frozen):
    """Which diffusion model, and where its h is read."""

    id: str = Field("embedded:shapes-ddpm", description="hub id, local folder, embedded:shapes-ddpm or embedded:shapes-text-ddpm")
    revision: str | None = None
    h_position: Literal["before", "middle", "after"] = "after"
    device: str = "cpu"
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="the U-Net's compute precision when sampling and editing: below float32 its calls run "
        "under torch.autocast (bfloat16/float16 on a GPU; docs/precision.md has the difference it makes)",
    )
    compile: bool = Field(
        False,
        description="torch.compile (inductor) the U-Net's blocks when sampling and regenerating (sample, edit and "
        "benchmark stages; the Jacobian and learn stages and inversions run eagerly); results differ from "
        "eager by float rounding only, so it is in no config hash (docs/precision.md)",
    )


class SampleConfig(_Frozen):
    """The sample stage: N images and their per-step h."""

    n_samples: int = Field(1024, ge=1, le=MAX_SAMPLES)
    seed_start: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="also the zarr chunk length along sample")
    num_inference_steps: int = Field(10, ge=1, le=MAX_STEPS)
    eta: float | list[float] = 0.0
    torch_threads: int = Field(
        2,
        ge=1,
        le=1024,
        description="torch threads of every model call; fixed because CPU kernels round differently at other "
        "counts (part of what is sampled, the same on every runner)",
    )
    h_dtype: Literal["float16", "float32"] = "float16"
    images_dtype: Literal["float16", "float32"] = "float32"
    text: TextConfig | None = Field(None, description="prompts and guidance of a text-conditional model (hmine.prompts)")

    @field_validator("eta")
    @classmethod
    def _eta_non_negative(cls, value):
        values = value if isinstance(value, list) else [value]
        if any(not 0 <= v <= 1 for v in values):
            raise ValueError("eta must be between 0 and 1 (0 = DDIM, 1 = DDPM-like)")
        return value

    @model_validator(mode="after")
    def _seeds_fit_int64(self):
        last = self.seed_start + self.n_samples - 1
        if last > MAX_SEED:
            raise ValueError(
                f"sample.seed_start + sample.n_samples - 1 is {last}, above {MAX_SEED} (seeds are stored "
                "as int64); lower sample.seed_start"
            )
        return self

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


class LabelConfig(_Frozen):
    """The label stage: which labeller scores the images, and which attributes matter."""

    labeller: Literal["world", "clip"] = "world"
    classifier_path: Path | None = Field(None, description="world classifier folder; the embedded one if unset")
    clip_model_id: str = "openai/clip-vit-base-patch32"
    clip_revision: str | None = None
    clip_prompts: dict[str, tuple[str, str]] = Field(
        default_factory=dict, description="attribute -> (positive prompt, negative prompt)"
    )
    attributes: list[str] = Field(
        default_factory=list, description="binary attributes (scores in [0, 1]) used downstream"
    )
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)

    @model_validator(mode="after")
    def _clip_needs_prompts(self):
        if self.labeller == "clip" and not self.clip_prompts:
            raise ValueError(
                "label.clip_prompts is empty; give attribute: [positive prompt, negative prompt] pairs"
            )
        if self.labeller == "clip":
            unknown = [a for a in self.attributes if a not in self.clip_prompts]
            if unknown:
                raise ValueError(f"label.attributes {unknown} have no entry in label.clip_prompts")
        return self

    @property
    def required_attributes(self) -> list[str]:
        return list(self.attributes)


class DirectionsConfig(_Frozen):
    """The direction stage: PCA, mean difference, linear probes, conditional projections, joint regression."""

    pca_components: int = Field(8, ge=1, le=MAX_BATCH)
    pca_modes: list[Literal["per_step", "all_steps"]] = ["per_step"]
    top_k: int = Field(100, ge=1, le=MAX_SAMPLES, description="samples per side for the mean difference")
    probe_C: float = Field(1.0, gt=0)
    probe_components: int | None = Field(
        16, ge=1, le=MAX_BATCH, description="probes are fitted in this many principal components per step; null = raw h"
    )
    probe_test_fraction: float = Field(0.25, gt=0, lt=1)
    threshold: float | Literal["median"] = Field(
        0.5,
        description="binarises attribute scores (score > threshold); 'median': each attribute at the median of "
        "its scores over the run's samples, for uncalibrated scores such as CLIP's prompt pairs",
    )

    @field_validator("threshold")
    @classmethod
    def _threshold_inside_scores(cls, value):
        if value != "median" and not 0 < value < 1:
            raise ValueError("threshold must lie strictly between 0 and 1, or be 'median'")
        return value
    conditional: dict[str, list[str]] | Literal["all"] = Field(
        default_factory=dict,
        description="attribute -> attributes whose directions are projected away; 'all': every attribute "
        "conditioned on all the other label.attributes",
    )
    regression: bool = Field(
        True, description="also fit regression/<attribute>: the joint ridge regression of h on all attribute scores"
    )
    regression_alpha: float = Field(
        1e-3, gt=0, le=1e12, description="ridge penalty of the regression directions (units: squared scores)"
    )
    memory_budget_gb: float = Field(4.0, gt=0, description="above this PCA runs out of core with dask")
    random_state: int = 0
    source: Literal["samples", "inversions"] = Field(
        "samples",
        description="fit on the sample stage's h and labels, or on inversions.zarr (real images, needs images:)",
    )
    inversion_labels: Literal["given", "labeller"] = Field(
        "given", description="source inversions: the images' given labels (label file, world factors) or the labeller's scores"
    )
    prompt_pairs: PromptPairsConfig | None = Field(None, description="text models: prompt_pair/<name> directions")


class EditConfig(_Frozen):
    """The edit stage: apply directions to stored samples and measure what changes."""

    directions: list[str] = Field(
        default_factory=list, description="names of directions.zarr, jacobian/..., learned/<t>, learned-block-mean/<t>, learned-block/<t>, sega/<concept>, combinations of them ('a - 0.5*b') or one global at t ('a@t500'; hmine.edit_names); empty = every supervised direction"
    )
    n_samples: int = Field(64, ge=1, le=MAX_SAMPLES, description="the first N samples of the run are edited")
    scales: list[float] = [-2.0, -1.0, 0.0, 1.0, 2.0]
    t_edit: Annotated[int, Field(ge=0, le=MAX_STEPS * 100)] | Literal["auto"] | None = Field(
        None, description="edit only steps with timestep >= t_edit; auto: Asyrp's rule (edit.interval, hmine.interval)"
    )
    t_edit_max: int | None = Field(
        None, ge=0, le=MAX_STEPS * 100, description="edit only steps with timestep <= t_edit_max; with t_edit, the window [t_edit, t_edit_max]"
    )
    t_boost: Annotated[int, Field(ge=0, le=MAX_STEPS * 100)] | Literal["auto"] | None = Field(
        None, description="quality boosting: steps with timestep < t_boost run unedited at eta edit.interval.boost_eta"
    )
    interval: IntervalConfig = IntervalConfig()  # the rule of t_edit / t_boost auto, and boosting's eta
    asymmetric: bool = False
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] | Literal["auto"] = Field(
        64,
        description="images whose eps one U-Net call computes (fixed for a whole edit store); "
        "'auto' measures the fastest on the model's device (hmine.batching)",
    )
    strip_samples: int = Field(6, ge=1, le=1024, description="samples shown per PNG strip")
    source: Literal["samples", "inversions"] = Field(
        "samples", description="edit the run's samples, or its inverted images (inversions.zarr, needs images:)"
    )
    sega: SegaConfig | None = Field(None, description="SEGA concepts edited as sega/<concept> (hmine.sega_edits)")

    @field_validator("directions")
    @classmethod
    def _directions_parse(cls, directions: list[str]) -> list[str]:
        term_names(directions)  # a malformed combination is refused in one line (hmine.edit_names); kept as written
        return directions

    @field_validator("scales")
    @classmethod
    def _scales_as_stored(cls, scales: list[float]) -> list[float]:
        # the edit store holds the sorted distinct scales and always scale 0 (the
        # originals): [1, -1] and [-1, 0, 1] are the same edits and get the same stage hash
        return sorted({float(scale) for scale in scales} | {0.0})

    @model_validator(mode="after")
    def _window_is_ordered(self):
        if isinstance(self.t_edit, int) and self.t_edit_max is not None and self.t_edit > self.t_edit_max:
            raise ValueError(
                f"edit.t_edit ({self.t_edit}) is above edit.t_edit_max ({self.t_edit_max}); "
                "the window is [t_edit, t_edit_max], so swap them"
            )
        if isinstance(self.t_boost, int) and isinstance(self.t_edit, int) and self.t_boost > self.t_edit:
            raise ValueError(
                f"edit.t_boost ({self.t_boost}) is above edit.t_edit ({self.t_edit}); boosted steps are unedited, lower t_boost"
            )
        return self


class JacobianConfig(_Frozen):
    """The Jacobian stage: per-image top singular directions of d eps / d h."""

    n_samples: int = Field(4, ge=0, le=MAX_SAMPLES, description="the first N samples get Jacobian directions")
    k: int = Field(3, ge=1, le=MAX_BATCH)
    steps: list[int] | None = Field(None, min_length=1, description="timestep values to analyse; all if unset")
    mask: Literal["none", "shape", "background", "files"] = "none"
    mask_dir: Path | None = Field(None, description="one <seed>.npy or <seed>.png per sample, for mask: files")
    tol: float = Field(1e-3, gt=0)
    max_iter: int = Field(50, ge=1, le=1_000_000)
    edit_scales: list[float] = [-1.0, 0.0, 1.0]
    localised_rank: int = Field(
        32,
        ge=0,
        le=MAX_BATCH,
        description="with a mask, also find k region-localised directions (largest share of the change of eps "
        "inside the mask) in the top-N right singular subspace of the unmasked Jacobian; 0 skips them",
    )
    edit_window: Literal["all_steps", "analysed_step"] = Field(
        "all_steps",
        description="the diagnostic edits apply the first analysed step's direction at every step "
        "('global at t') or only at that step",
    )
    batch_size: int = Field(
        8,
        ge=1,
        le=MAX_BATCH,
        description="(sample, step) pairs whose Jacobian products share one U-Net call (k columns each, "
        "localised_rank for the localised search): bounds memory; not in the stage hash, the results "
        "agree with one at a time to rounding",
    )

    @field_validator("edit_scales")
    @classmethod
    def _scales_as_used(cls, scales: list[float]) -> list[float]:
        return sorted({float(scale) for scale in scales} | {0.0})  # as EditConfig.scales

    @model_validator(mode="after")
    def _files_need_a_folder(self):
        if self.mask == "files" and self.mask_dir is None:
            raise ValueError("jacobian.mask is 'files' but jacobian.mask_dir is not set")
        if self.mask != "none" and 0 < self.localised_rank < self.k:
            raise ValueError(
                f"jacobian.localised_rank ({self.localised_rank}) is below jacobian.k ({self.k}); "
                "raise it, or set it to 0 to skip localised directions"
            )
        return self


class WorldImagesConfig(_Frozen):
    """Rendered (not sampled) images of the embedded shapes world, with their true factors as labels."""

    n: int = Field(256, ge=1, le=MAX_SAMPLES)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class ImagesConfig(_Frozen):
    """Real images to invert (the invert stage runs only when this section is set); see hmine.image_sources."""

    folder: Path | None = Field(None, description="PNG/JPEG files, recursively; ids are their paths relative to it")
    labels: Path | None = Field(None, description="CSV or parquet: a 'file' column (the image id) and numeric labels")
    resize: bool = Field(True, description="centre crop to the model's aspect ratio and resize; false refuses other sizes")
    on_bad_image: Literal["skip", "fail"] = Field(
        "fail", description="an unreadable image or one without a label row: refuse the run, or leave it out (recorded)"
    )
    world: WorldImagesConfig | None = Field(None, description="rendered shapes-world images instead of a folder")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.folder is None) == (self.world is None):
            raise ValueError("images needs exactly one of images.folder and images.world")
        if self.world is not None and self.labels is not None:
            raise ValueError("images.labels is for images.folder; images.world brings its true factors")
        return self


class InvertConfig(_Frozen):
    """The invert stage: how the images of ``images:`` are inverted (steps, h position and threads: the sample stage's)."""

    method: Literal["edit_friendly", "ddim"] = "edit_friendly"
    eta: float = Field(1.0, gt=0, le=1, description="edit_friendly: the sampler's eta at every step")
    refine: int = Field(0, ge=0, le=100, description="ddim: fixed-point refinements of eps per inverse step")
    seed_start: int = Field(0, ge=0, le=MAX_SEED, description="edit_friendly: image k draws its x_t with seed seed_start + k")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="also the zarr chunk length along sample")
    h_dtype: Literal["float16", "float32"] = "float16"


class RunnerConfig(_Frozen):
    """Where the sample stage's batches run; never part of any stage's config hash.

    ``local`` samples every batch in the calling process. ``dask`` (Prefect flows only)
    splits the batches left into shards and runs one Prefect task per shard on a Dask
    cluster through prefect-dask's DaskTaskRunner: the scheduler at ``address``, or a
    LocalCluster of ``n_workers`` single-threaded worker processes started for the stage.
    """

    kind: Literal["local", "dask"] = "local"
    address: str | None = Field(None, description="scheduler of a running Dask cluster, e.g. tcp://host:8786; null = LocalCluster")
    n_workers: int = Field(2, ge=1, le=4096, description="LocalCluster worker processes (one model each)")
    shards_per_worker: int = Field(
        4, ge=1, le=4096, description="shards (Prefect tasks, each loading the model once) per Dask worker"
    )

    @model_validator(mode="after")
    def _address_needs_dask(self):
        if self.address is not None and self.kind != "dask":
            raise ValueError("runner.address is set but runner.kind is not 'dask'")
        return self


class RunConfig(_Frozen):
    """A whole mining run: where it writes and the settings of every stage."""

    name: str = Field("run", description="the run's folder under output_root")
    output_root: Path = Path("stores")
    report_root: Path = Path("reports")
    model: ModelConfig = ModelConfig()
    sample: SampleConfig = SampleConfig()
    label: LabelConfig = LabelConfig()
    directions: DirectionsConfig = DirectionsConfig()
    edit: EditConfig = EditConfig()
    jacobian: JacobianConfig = JacobianConfig()
    images: ImagesConfig | None = None  # real images: the invert stage runs only when set
    invert: InvertConfig = InvertConfig()
    learn: LearnConfig = LearnConfig()  # learned edits (Asyrp): the learn stage runs only with targets
    benchmark: BenchmarkConfig = BenchmarkConfig()  # the ground-truth benchmark (hmine benchmark CONFIG)
    runner: RunnerConfig = RunnerConfig()  # how, not what: left out of stage_inputs

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, name: str) -> str:
        # a leading letter, digit or underscore keeps out "." and ".." (which would write
        # into output_root or its parent) and hidden folders; no separators, no spaces
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}", name):
            raise ValueError(
                "name must be one folder name of letters, digits, '_', '.' and '-' that starts with a "
                "letter, digit or '_' (at most 200 characters), e.g. celebahq-smiling"
            )
        return name

    @model_validator(mode="after")
    def _inversions_need_images(self):
        for field in ("directions", "edit"):
            if getattr(self, field).source == "inversions" and self.images is None:
                raise ValueError(f"{field}.source is 'inversions' but there is no images: section to invert")
        if self.edit.source == "inversions" and any(n.startswith("jacobian/") for n in term_names(self.edit.directions)):
            raise ValueError(
                "edit.directions names per-image Jacobian directions, which exist for samples only; "
                "with edit.source: inversions name directions of directions.zarr"
            )
        return self

    @model_validator(mode="after")
    def _reports_beside_the_stores(self):
        if self.report_root.resolve() == self.output_root.resolve():
            raise ValueError(
                "report_root is the same folder as output_root: the report would replace the run's "
                "stores; give report_root a folder of its own, e.g. reports"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.name

    def stage_hash(self, stage: str) -> str:
        """Hash of everything that determines the given stage's output (see :mod:`hmine.stages`)."""
        from hmine.stages import stage_hash

        return stage_hash(self, stage)

    def stage_inputs(self, stage: str) -> dict:
        """The stage's settings and those of every stage it reads, as hashed."""
        from hmine.stages import stage_inputs

        return stage_inputs(self, stage)


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
    return "; ".join(lines)  # one line, however many fields are wrong


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. sample.n_samples=64")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "not a YAML value"
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem}); quote it or fix its brackets") from None
    return key.strip().split("."), value


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
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or "a syntax error"
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix that line") from None
        if data is None:  # no settings at all: an empty file is a mistake, not "all defaults"
            raise ConfigError(
                f"config file {path} is empty; give at least a name: and the settings that differ from "
                "the defaults (see configs/demo.yaml)"
            )
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = data
        for key in keys[:-1]:
            if node.get(key) is None:  # absent, or an empty section ("jacobian:" with nothing under it)
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
