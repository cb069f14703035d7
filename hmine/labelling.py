"""Labellers: score images for attributes, one column per attribute.

A labeller has a ``name``, the tuple of ``attributes`` it scores and a
``score(images) -> DataFrame`` method taking images (n, 3, H, W) in [-1, 1] and returning
one float column per attribute, one row per image, in order. Binary attributes are
scored as probabilities in [0, 1] so that thresholds and score changes read the same
for every labeller.

* :class:`WorldLabeller` — the embedded shapes world's attribute classifier;
* :class:`hmine.clip.ClipLabeller` — CLIP zero-shot prompt pairs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def embedded_classifier_path() -> Path:
    """Folder of the shapes-world attribute classifier shipped inside the package."""
    return Path(str(resources.files("hmine") / "embedded" / "shapes-classifier"))


class WorldLabeller:
    """Scores of the shapes-world classifier: factors, class probabilities, binary attributes.

    Parameters
    ----------
    path : Path, optional
        Classifier folder (``config.json`` + ``model.safetensors``); the embedded one by default.
    batch_size : int, default=256
    device : str, default="cpu"
        Where the classifier runs (the images are moved there batch by batch).
    """

    name = "world"

    def __init__(self, path: Path | None = None, *, batch_size: int = 256, device: str = "cpu"):
        from hmine.world.classifier import load_classifier

        self.path = Path(path) if path is not None else embedded_classifier_path()
        self.model = load_classifier(self.path).to(device)
        self.batch_size = batch_size
        probe = self.score(np.zeros((1, 3, 32, 32), dtype=np.float32))
        self.attributes = tuple(probe.columns)

    def score(self, images) -> pd.DataFrame:
        from hmine.world.classifier import predict_attributes

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.asarray(images, dtype=np.float32))
        if images.shape[-2:] != (32, 32):
            raise ValueError(
                f"the shapes-world classifier scores 32x32 images, got {tuple(images.shape[-2:])}; "
                "use label.labeller: clip for other models"
            )
        table = predict_attributes(self.model, images.float(), batch_size=self.batch_size)
        return table.astype(np.float64)


def make_labeller(config, device: str = "cpu"):
    """The labeller a :class:`hmine.config.LabelConfig` asks for, on ``device`` (stages pass the model's)."""
    if config.labeller == "world":
        return WorldLabeller(config.classifier_path, batch_size=config.batch_size, device=device)
    from hmine.clip import ClipLabeller

    return ClipLabeller(
        {k: tuple(v) for k, v in config.clip_prompts.items()},
        model_id=config.clip_model_id,
        revision=config.clip_revision,
        batch_size=config.batch_size,
        device=device,
    )


def labeller_attributes(config) -> tuple[str, ...]:
    """The attribute names the labeller of a :class:`hmine.config.LabelConfig` scores.

    Cheap: the world classifier (1.4 MB) is loaded, a CLIP model is not (its attributes
    are the names of the configured prompt pairs).
    """
    if config.labeller == "world":
        return WorldLabeller(config.classifier_path).attributes
    return tuple(config.clip_prompts)


def decision_thresholds(labels: pd.DataFrame, attributes, threshold: float | str) -> dict[str, float]:
    """Per attribute, the score above which a sample counts as positive.

    ``threshold`` is ``directions.threshold``: one number for every attribute, or
    ``"median"``: each attribute's median over the run's labels (``labels``), which splits
    the samples in halves whatever the scores' calibration.
    """
    if threshold == "median":
        return {a: float(np.median(labels[a].to_numpy())) for a in attributes}
    return {a: float(threshold) for a in attributes}
