"""Scores of the shapes-world classifier: the attribute table, held-out evaluation, temperature calibration.

Held-out evaluation uses seed :data:`EVALUATION_SEED` (``10**9``) and calibration
:data:`CALIBRATION_SEED`, above every training seed (:mod:`hmine.world.classifier.training`),
so neither ever sees a training image.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from hmine.world import renderer as world
from hmine.world.classifier.augmentation import degrade, tint_background
from hmine.world.classifier.network import CONTINUOUS, THRESHOLDED_ATTRIBUTES, ShapesClassifier

EVALUATION_SEED = 10**9
CALIBRATION_SEED = 10**9 + 1
# sigmoid(1.702 z) is within 0.01 of the standard normal CDF, so a temperature of
# residual_std / 1.702 makes the soft score ~P(true value is past the threshold).
_LOGISTIC_PROBIT = 1.702


def _as_image_tensor(images) -> torch.Tensor:
    images = images if torch.is_tensor(images) else torch.from_numpy(np.asarray(images, dtype=np.float32))
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, world.IMAGE_SIZE, world.IMAGE_SIZE):
        raise ValueError(f"expected images of shape (n, 3, 32, 32) in [-1, 1], got {tuple(images.shape)}")
    return images.detach().float()


def predict_attributes(model: ShapesClassifier, images, batch_size: int = 256) -> pd.DataFrame:
    """Scores of every factor and binary attribute for images (n, 3, 32, 32) in [-1, 1].

    Parameters
    ----------
    model : ShapesClassifier
        Put in eval mode (and left there).
    images : torch.Tensor or ndarray of shape (n, 3, 32, 32)
        Values in [-1, 1], as :func:`hmine.world.generate` and the DDPM produce them.
    batch_size : int, default=256

    Returns
    -------
    pandas.DataFrame
        One row per image with columns ``shape`` and ``color`` (argmax class index),
        ``p_circle``, ``p_square``, ``p_triangle``, ``p_red``, ``p_green``, ``p_blue``
        (softmax probabilities), ``size``, ``x``, ``y``, ``background`` (world units) and
        the binary attributes of :data:`hmine.world.BINARY_ATTRIBUTES` as scores in
        [0, 1]: ``is_circle`` = ``p_circle``, ``is_red`` = ``p_red``, and for the
        thresholded factors of :data:`THRESHOLDED_ATTRIBUTES`
        ``sigmoid(±(value - threshold) / temperature)`` with the model's
        ``temperatures`` (calibrated to the regression error, see
        :func:`calibrate_temperatures`), so 0.5 sits exactly on the world's threshold.
    """
    images = _as_image_tensor(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = model.factor_low.device
    shape_p, color_p, values = [], [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out = model(images[start : start + batch_size].to(device))
            shape_p.append(out["shape_logits"].softmax(-1).cpu())
            color_p.append(out["color_logits"].softmax(-1).cpu())
            values.append(model.to_world_units(out["continuous_scaled"]).cpu())
    empty = torch.zeros(0, 3)
    shape_p = torch.cat(shape_p or [empty]).double().numpy()
    color_p = torch.cat(color_p or [empty]).double().numpy()
    values = torch.cat(values or [torch.zeros(0, len(CONTINUOUS))]).double().numpy()

    table: dict[str, np.ndarray] = {"shape": shape_p.argmax(1), "color": color_p.argmax(1)}
    table.update({f"p_{name}": shape_p[:, i] for i, name in enumerate(world.SHAPES)})
    table.update({f"p_{name}": color_p[:, i] for i, name in enumerate(world.COLORS)})
    table.update({name: values[:, i] for i, name in enumerate(CONTINUOUS)})
    table["is_circle"] = table["p_circle"]
    table["is_red"] = table["p_red"]
    for name, (factor, threshold, above) in THRESHOLDED_ATTRIBUTES.items():
        z = (table[factor] - threshold) / model.temperatures[name]
        # Clipped so that exp never overflows far from the threshold.
        table[name] = 1.0 / (1.0 + np.exp(-np.clip(z if above else -z, -50.0, 50.0)))
    return pd.DataFrame(table)


def _metrics(table: pd.DataFrame, factors: dict[str, np.ndarray]) -> dict[str, float]:
    metrics = {
        "shape_accuracy": float((table["shape"].to_numpy() == factors["shape"]).mean()),
        "color_accuracy": float((table["color"].to_numpy() == factors["color"]).mean()),
    }
    for name in CONTINUOUS:
        truth = factors[name].astype(np.float64)
        residual = float(((table[name].to_numpy() - truth) ** 2).sum())
        metrics[f"{name}_r2"] = 1.0 - residual / float(((truth - truth.mean()) ** 2).sum())
        metrics[f"{name}_rmse"] = math.sqrt(residual / len(truth))
    for name, truth in world.binary_attributes(factors).items():
        metrics[f"{name}_accuracy"] = float(((table[name].to_numpy() > 0.5) == truth).mean())
    return metrics


def evaluate_classifier(
    model: ShapesClassifier, n: int = 2000, seed: int = EVALUATION_SEED, noise_std: float = 0.1
) -> dict[str, dict[str, float]]:
    """Held-out metrics on ``n`` world images of seed ``seed``.

    The default seed, :data:`EVALUATION_SEED` = ``10**9``, is above every training seed
    (those are ``seed * TRAIN_SEED_STRIDE + step`` < ``10**9``), so these images were never
    trained on.

    Returns
    -------
    dict
        ``{"clean": metrics, "noised": metrics, "tinted": metrics}``; ``noised`` scores
        the same images after :func:`degrade` (full 3x3 box blur plus Gaussian noise of
        std ``noise_std``), ``tinted`` after :func:`tint_background` (±0.3) and then
        :func:`degrade`.
        ``metrics`` has ``shape_accuracy``, ``color_accuracy``, ``<factor>_r2`` and
        ``<factor>_rmse`` for ``size``, ``x``, ``y``, ``background`` (world units), and
        ``<attribute>_accuracy`` for each binary attribute (score > 0.5 vs
        :func:`hmine.world.binary_attributes`).
    """
    batch = world.generate(n, seed=seed)
    images = torch.from_numpy(batch.images)
    tinted = degrade(tint_background(images, torch.from_numpy(batch.masks), seed), seed, noise_std)
    return {
        "clean": _metrics(predict_attributes(model, images), batch.factors),
        "noised": _metrics(predict_attributes(model, degrade(images, seed, noise_std)), batch.factors),
        "tinted": _metrics(predict_attributes(model, tinted), batch.factors),
    }


def calibrate_temperatures(
    model: ShapesClassifier, n: int = 2000, seed: int = CALIBRATION_SEED, noise_std: float = 0.1
) -> dict[str, float]:
    """Set the model's soft-score temperatures from its regression error; returns them.

    For each thresholded attribute the temperature is ``rms_error / 1.702`` of its factor,
    measured on ``n`` held-out images (seed :data:`CALIBRATION_SEED`, half clean, half
    :func:`degrade`-d), so ``sigmoid(±(value - threshold) / temperature)`` approximates the
    probability that the true factor is past the threshold under Gaussian error.
    """
    batch = world.generate(n, seed=seed)
    images = torch.from_numpy(batch.images)
    half = n // 2
    images = torch.cat([images[:half], degrade(images[half:], seed, noise_std)])
    table = predict_attributes(model, images)
    temperatures = {}
    for name, (factor, _, _) in THRESHOLDED_ATTRIBUTES.items():
        rms = float(np.sqrt(np.mean((table[factor].to_numpy() - batch.factors[factor]) ** 2)))
        temperatures[name] = max(rms / _LOGISTIC_PROBIT, 1e-6)
    model.temperatures = temperatures
    return dict(temperatures)
