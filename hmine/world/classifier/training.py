"""Training of the shapes-world classifier in the one loop of :mod:`hmine.world.training`.

Training images are fresh world images with noise, blur, contrast/brightness jitter and
tinted backgrounds (:mod:`hmine.world.classifier.augmentation`), and draw colour
independently of shape (the world itself makes circles red 80 % of the time), so neither
head can use one as evidence for the other: colour is read from pixels, and so is shape.

Seeds
-----
Training step ``s`` of a run with ``seed`` draws its world images (and its augmentation)
from seed ``seed * TRAIN_SEED_STRIDE + s``; with ``seed`` in [0, 99] and fewer than
``TRAIN_SEED_STRIDE`` steps every training seed is below ``10**9``, the smallest seed
evaluation and calibration use (:mod:`hmine.world.classifier.scoring`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hmine.world import renderer as world
from hmine.world.classifier.augmentation import augment
from hmine.world.classifier.network import ShapesClassifier
from hmine.world.classifier.persistence import save_classifier
from hmine.world.classifier.scoring import calibrate_temperatures
from hmine.world.training import Schedule, Trainee, check_work_dir_config, train_loop, warmup_cosine

TRAIN_SEED_STRIDE = 10_000_000


class ClassifierTrainConfig(BaseModel):
    """Settings of a shapes-world classifier training run.

    Step ``s`` trains on ``batch_size`` fresh world images of seed
    ``seed * TRAIN_SEED_STRIDE + s`` (augmented with a generator of the same seed), so a
    run is deterministic and resuming it replays exactly what an uninterrupted run does.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(2000, ge=1, lt=TRAIN_SEED_STRIDE, description="optimizer steps in all")
    batch_size: int = Field(128, ge=1, description="fresh world images per step")
    learning_rate: float = Field(2e-3, gt=0, description="AdamW peak learning rate")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up, then cosine decay to 0")
    weight_decay: float = Field(1e-4, ge=0)
    regression_weight: float = Field(10.0, ge=0, description="weight of the MSE of the scaled continuous factors")
    seed: int = Field(7, ge=0, le=99, description="model init and data seeds; training seeds stay below 10**9")
    width: int = Field(32, ge=4, description="channels of the first stage (x2, x4 in the next)")
    squeeze: int = Field(32, ge=1, description="channels of the 4x4 map before flattening")
    hidden: int = Field(128, ge=1, description="width of the shared fully connected layer")
    noise_max: float = Field(0.15, ge=0, description="additive Gaussian noise std drawn in [0, noise_max]")
    blur_probability: float = Field(0.5, ge=0, le=1, description="probability of a random-strength 3x3 box blur")
    contrast_jitter: float = Field(0.1, ge=0, lt=1, description="contrast factor drawn in 1 ± contrast_jitter")
    brightness_jitter: float = Field(0.1, ge=0, description="brightness offset drawn in ± brightness_jitter")
    tint_probability: float = Field(0.5, ge=0, le=1, description="probability of a coloured (tinted) background")
    tint_max: float = Field(0.35, ge=0, description="background tint per channel in ± tint_max, zero channel mean")
    independent_color: bool = Field(True, description="draw colour independently of shape (the world correlates them)")
    checkpoint_every: int = Field(250, ge=1, description="steps between checkpoints (and one at the end)")
    log_every: int = Field(25, ge=1, description="steps between log.jsonl records")
    calibration_images: int = Field(2000, ge=0, description="held-out images to calibrate soft-score temperatures on at export (0: keep defaults)")
    torch_threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _warmup_fits(self) -> ClassifierTrainConfig:
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self

    def step_seed(self, step: int) -> int:
        """World and augmentation seed of 0-based training step ``step``."""
        return self.seed * TRAIN_SEED_STRIDE + step

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
        return warmup_cosine(step, peak=self.learning_rate, warmup_steps=self.warmup_steps, steps=self.steps)


def training_batch(config: ClassifierTrainConfig, step: int) -> world.WorldBatch:
    """The (unaugmented) world images of 0-based training step ``step``."""
    seed = config.step_seed(step)
    factors = world.sample_factors(config.batch_size, seed=seed)
    if config.independent_color:
        # Uniform colour for every shape: with the world's circle/red correlation a red
        # blob would be evidence for "circle" and the shape head could lean on it.
        factors["color"] = np.random.default_rng([seed, 1]).integers(0, len(world.COLORS), config.batch_size)
    return world.render(factors)


def _training_loss(model: ShapesClassifier, batch: world.WorldBatch, config: ClassifierTrainConfig, seed: int):
    generator = torch.Generator().manual_seed(seed)
    images, background = augment(
        torch.from_numpy(batch.images),
        torch.from_numpy(batch.factors["background"]),
        torch.from_numpy(batch.masks),
        generator,
        noise_max=config.noise_max,
        blur_probability=config.blur_probability,
        contrast_jitter=config.contrast_jitter,
        brightness_jitter=config.brightness_jitter,
        tint_probability=config.tint_probability,
        tint_max=config.tint_max,
    )
    factors = {**batch.factors, "background": background.numpy()}
    out = model(images)
    parts = {
        "shape_ce": F.cross_entropy(out["shape_logits"], torch.from_numpy(batch.factors["shape"])),
        "color_ce": F.cross_entropy(out["color_logits"], torch.from_numpy(batch.factors["color"])),
        "regression_mse": F.mse_loss(out["continuous_scaled"], model.scale_targets(factors)),
    }
    loss = parts["shape_ce"] + parts["color_ce"] + config.regression_weight * parts["regression_mse"]
    return loss, parts


def train_classifier(
    config: ClassifierTrainConfig,
    work_dir: Path,
    export_dir: Path | None = None,
    until_step: int | None = None,
) -> ShapesClassifier:
    """Train the classifier, resuming from ``work_dir``'s newest checkpoint if there is one.

    Parameters
    ----------
    config : ClassifierTrainConfig
    work_dir : Path
        A work dir of :mod:`hmine.world.training`: ``config.json`` (a run refuses a
        work_dir of another config), ``checkpoints/`` (every ``checkpoint_every`` steps
        and at the end) and ``log.jsonl`` (step, loss and its parts, learning rate, seconds).
    export_dir : Path, optional
        When training reaches ``config.steps``, the model is exported here with
        :func:`save_classifier` after calibrating its soft-score temperatures.
    until_step : int, optional
        Stop (with a checkpoint) at this step instead of ``config.steps``; a later call
        continues from there.

    Returns
    -------
    ShapesClassifier
        In eval mode.
    """
    torch.set_num_threads(config.torch_threads)
    check_work_dir_config(config, Path(work_dir))
    torch.manual_seed(config.seed)  # the initial weights
    model = ShapesClassifier(width=config.width, squeeze=config.squeeze, hidden=config.hidden)
    trainee = Trainee(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay),
        loss=lambda step: _training_loss(model, training_batch(config, step), config, config.step_seed(step)),
        learning_rate_at=config.learning_rate_at,
    )
    schedule = Schedule(steps=config.steps, checkpoint_every=config.checkpoint_every, log_every=config.log_every)
    result = train_loop(trainee, schedule, Path(work_dir), until_step=until_step)
    if export_dir is not None and result.step == config.steps:
        if config.calibration_images > 0:
            calibrate_temperatures(model, n=config.calibration_images)
        save_classifier(model, Path(export_dir))
    return model
