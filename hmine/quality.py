"""Image quality of edited images: does the classifier still recognise them, and how far have they drifted?

Two figures per set of edited images, each against the unedited images of the same samples:

* **confident share** (:func:`confident_share`): the share of edited images that the
  world classifier still scores confidently, its largest class probability at least
  :data:`CONFIDENT` (0.9) on *every* class head (shape and colour). An edit that breaks the
  shape into noise lowers it long before it changes a decision.
* **Fréchet distance** (:class:`FrechetDistance`): the distance between Gaussians fitted to
  the edited and the unedited images in a feature space, FID's formula
  ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``, computed by torchmetrics'
  :class:`~torchmetrics.image.fid.FrechetInceptionDistance` with a custom feature
  extractor in place of Inception (no weights are downloaded): the world classifier's
  penultimate features (:class:`ClassifierFeatures`, its shared hidden layer, 128 values)
  or CLIP's image embeddings (:class:`ClipImageFeatures`) for real models.

With fewer images than feature dimensions the covariances are singular; the distance is
still defined (torchmetrics takes the trace of the square root through eigenvalues) but
it is noisy, so compare figures of equally many images only (the edit stage's and the
benchmark's are).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

#: The largest class probability an image must keep on every class head to count as confident.
CONFIDENT = 0.9


def confident_share(scores: pd.DataFrame, level: float = CONFIDENT) -> float:
    """The share of images whose largest class probability is >= ``level`` on every class head.

    ``scores`` is the world classifier's table (:func:`hmine.world.classifier.predict_attributes`):
    its ``p_<shape>`` and ``p_<colour>`` columns are the two heads. NaN for a table without
    them (a CLIP labeller's) or without rows.
    """
    from hmine.world import renderer as world

    heads = [[f"p_{name}" for name in world.SHAPES], [f"p_{name}" for name in world.COLORS]]
    if not len(scores) or any(column not in scores for head in heads for column in head):
        return float("nan")
    confident = np.ones(len(scores), dtype=bool)
    for head in heads:
        confident &= scores[head].to_numpy(dtype=float).max(axis=1) >= level
    return float(confident.mean())


class ClassifierFeatures(nn.Module):
    """The world classifier's penultimate features (its shared hidden layer) of images (n, 3, 32, 32) in [-1, 1].

    The features every head of :class:`hmine.world.classifier.ShapesClassifier` reads;
    float64 (n, ``hidden``).
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.hidden)  # read by torchmetrics instead of a dummy forward

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.classifier
        param = model.factor_low
        images = images.to(param.device, torch.float32)
        coordinates = model.coordinates.expand(images.shape[0], -1, -1, -1)
        return model.shared(model.features(torch.cat([images, coordinates], dim=1))).double().cpu()


class ClipImageFeatures(nn.Module):
    """CLIP's projected image embeddings of images (n, 3, H, W) in [-1, 1], through a :class:`hmine.clip.ClipLabeller`'s
    model and preprocessing; float64 (n, projection dim)."""

    def __init__(self, labeller):
        super().__init__()
        self.labeller = labeller
        self.num_features = int(labeller.model.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from hmine.clip.labeller import _projected

        model = self.labeller.model
        pixels = self.labeller.preprocess(images).to(next(model.parameters()).dtype)
        return _projected(model.get_image_features(pixel_values=pixels)).double().cpu()


class PassThrough(nn.Module):
    """Features given as they are (n, ``num_features``): a Fréchet distance of precomputed features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (n, {self.num_features}), got {tuple(features.shape)}")
        return features.double()


class FrechetDistance:
    """Fréchet distances of image sets to one reference set, in the feature space of ``extractor``.

    torchmetrics' FID with ``extractor`` as its feature network; the reference (the
    unedited images) is passed once and kept (``reset_real_features=False``), each
    :meth:`distance` call resets only the other side.

    Parameters
    ----------
    extractor : torch.nn.Module
        Images (or features, :class:`PassThrough`) -> features (n, d), with an int
        attribute ``num_features`` = d.
    batch_size : int, default=256
    """

    def __init__(self, extractor: nn.Module, batch_size: int = 256):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
        self.batch_size = int(batch_size)
        self.has_reference = False

    def _update(self, images, real: bool) -> None:
        images = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
        for start in range(0, len(images), self.batch_size):
            self.metric.update(images[start : start + self.batch_size], real=real)

    def set_reference(self, images) -> None:
        """The set every distance is taken to (at least 2 images)."""
        if len(images) < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 reference images, got {len(images)}")
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        self._update(images, real=True)
        self.has_reference = True

    def distance(self, images) -> float:
        """The Fréchet distance between ``images`` (at least 2) and the reference set."""
        if not self.has_reference:
            raise RuntimeError("set_reference(images) first")
        if len(images) < 2:
            return float("nan")
        self.metric.reset()  # the edited side only
        self._update(images, real=False)
        return float(self.metric.compute())


def frechet_distance(features_a, features_b) -> float:
    """The Fréchet distance between two sets of feature vectors (n_a, d) and (n_b, d), by torchmetrics."""
    a, b = (torch.as_tensor(np.asarray(f, dtype=np.float64)) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two feature tables (n, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    metric = FrechetDistance(PassThrough(a.shape[1]))
    metric.set_reference(a)
    return metric.distance(b)


def feature_extractor(labeller) -> nn.Module | None:
    """The feature space of a labeller's quality figures: the world classifier's penultimate
    features, CLIP's image embeddings; None for a labeller with neither (no Fréchet distance)."""
    from hmine.labelling import WorldLabeller

    if isinstance(labeller, WorldLabeller):
        return ClassifierFeatures(labeller.model)
    if hasattr(labeller, "preprocess") and hasattr(getattr(labeller, "model", None), "get_image_features"):
        return ClipImageFeatures(labeller)
    return None


class QualityMeter:
    """Quality figures of edited image sets against the unedited images of the same samples.

    ``reference(images, scores)`` once per set of samples, then ``measure(images, scores)``
    per edited set: ``{"confident_share": ..., "frechet_distance": ...}`` (NaN where the
    labeller gives no class heads or no feature space).
    """

    def __init__(self, labeller):
        extractor = feature_extractor(labeller)
        self.frechet = FrechetDistance(extractor) if extractor is not None else None

    def reference(self, images) -> None:
        """The unedited images of the next sets; with fewer than 2 there is none (distances NaN),
        never the previous set's, which belongs to other samples."""
        if self.frechet is None:
            return
        if len(images) >= 2:
            self.frechet.set_reference(images)
        else:
            self.frechet.has_reference = False

    def measure(self, images, scores: pd.DataFrame) -> dict[str, float]:
        usable = self.frechet is not None and self.frechet.has_reference
        return {
            "confident_share": confident_share(scores),
            "frechet_distance": self.frechet.distance(images) if usable else float("nan"),
        }
