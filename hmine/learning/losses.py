"""The losses a learned edit is trained with, and S_dir, CLIP's directional similarity.

Every loss is called as ``loss(edited, original) -> (loss, parts)`` on a batch of images
(n, 3, H, W) in [-1, 1] that carry gradients (``edited``: the edited step's prediction of
x0, P_t of Asyrp) and their unedited counterparts (``original``: P_t of the same x_t
without the edit, no gradient), and returns a scalar and its named parts for the log.

The reference is the unedited prediction *at the same step*, so both terms see only what
the edit changed; Asyrp compares its CLIP term to the final original image x0 instead,
which at high t also counts the blur of P_t as part of the "edit".

* :class:`ClassifierTarget` — the embedded world: push one attribute's score across 0.5
  (binary cross-entropy towards the target side), keep the other attributes' scores
  (squared change, the leakage term) and the image (L1);
* :class:`ClipDirectional` — a text pair: Asyrp's (StyleGAN-NADA's) directional CLIP
  loss ``-log((1 + cos) / 2)`` of the image-embedding change against the text-embedding
  change, plus L1;
* :func:`directional_similarity` — S_dir per image, cos(E_I(after) - E_I(before),
  E_T(target) - E_T(source)) on L2-normalised embeddings: the mean is S_dir (not 1 - cos,
  which the DL2 reproduction printed under that name).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hmine.world.classifier.network import THRESHOLDED_ATTRIBUTES


def world_attribute_logits(classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The world classifier's binary attributes as logits: ``sigmoid(logit)`` is the score, differentiable in ``images``.

    ``is_circle`` and ``is_red`` are softmax probabilities p_k, whose logit is
    ``log p_k - log(1 - p_k) = l_k - logsumexp(l_j, j != k)``; a thresholded attribute's is
    ``±(value - threshold) / temperature``. Unlike a probability, a logit does not round
    to 0 or 1, so a loss on it has gradient however sure the classifier is.
    """
    from hmine.world import renderer as world
    from hmine.world.classifier.network import CONTINUOUS

    out = classifier(images)
    values = classifier.to_world_units(out["continuous_scaled"])

    def one_against_rest(logits: torch.Tensor, k: int) -> torch.Tensor:
        rest = torch.cat([logits[:, :k], logits[:, k + 1 :]], dim=1)
        return logits[:, k] - torch.logsumexp(rest, dim=1)

    logits = {"is_circle": one_against_rest(out["shape_logits"], world.SHAPES.index("circle")),
              "is_red": one_against_rest(out["color_logits"], world.COLORS.index("red"))}  # fmt: skip
    for name, (factor, threshold, above) in THRESHOLDED_ATTRIBUTES.items():
        z = (values[:, CONTINUOUS.index(factor)] - threshold) / classifier.temperatures[name]
        logits[name] = z if above else -z
    return logits


def world_attribute_scores(classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The world classifier's binary attribute scores, differentiable in ``images``.

    The same numbers as :func:`hmine.world.classifier.predict_attributes` (tested): the
    sigmoid of :func:`world_attribute_logits`.
    """
    return {name: torch.sigmoid(logit) for name, logit in world_attribute_logits(classifier, images).items()}


def l1_to_original(edited: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel change."""
    return (edited - original).abs().mean()


WORLD_ATTRIBUTES = ("is_circle", "is_red", *THRESHOLDED_ATTRIBUTES)  # what world_attribute_logits scores


class ClassifierTarget:
    """Turn ``attribute`` on (``toward="positive"``) or off with the world classifier; keep the rest.

    loss = target_weight * BCE(score_attribute(edited), target)   (on the logit: gradient everywhere)
         + leakage_weight * mean_b (score_b(edited) - score_b(original))^2
         + l1_weight * |edited - original|_1 (mean)
    """

    def __init__(self, classifier, attribute: str, *, toward: str = "positive", leakage_attributes=(),
                 target_weight: float = 1.0, leakage_weight: float = 1.0, l1_weight: float = 0.5):  # fmt: skip
        unknown = [a for a in (attribute, *leakage_attributes) if a not in WORLD_ATTRIBUTES]
        if unknown:
            raise ValueError(f"learn.targets: the world classifier has no attributes {unknown}; it scores {list(WORLD_ATTRIBUTES)}")
        if toward not in ("positive", "negative"):
            raise ValueError(f"toward must be 'positive' or 'negative', got {toward!r}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.attribute, self.target = attribute, 1.0 if toward == "positive" else 0.0
        self.others = [a for a in leakage_attributes if a != attribute]
        self.weights = (float(target_weight), float(leakage_weight), float(l1_weight))

    def __call__(self, edited: torch.Tensor, original: torch.Tensor):
        logits = world_attribute_logits(self.classifier, edited)
        scores = {name: torch.sigmoid(logit) for name, logit in logits.items()}
        # on the logit, not the probability: a score that rounds to 0 or 1 still gets gradient
        logit = logits[self.attribute]
        target = F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, self.target))
        if self.others:
            with torch.no_grad():
                before = world_attribute_scores(self.classifier, original)
            leakage = torch.stack([((scores[b] - before[b]) ** 2).mean() for b in self.others]).mean()
        else:
            leakage = edited.new_zeros(())
        l1 = l1_to_original(edited, original)
        w_target, w_leakage, w_l1 = self.weights
        loss = w_target * target + w_leakage * leakage + w_l1 * l1
        return loss, {"target": target.detach(), "leakage": leakage.detach(), "l1": l1.detach(),
                      "score": scores[self.attribute].detach().mean()}  # fmt: skip


class ClipEmbedder:
    """CLIP's image and text embeddings (L2-normalised), differentiable in the images.

    Parameters
    ----------
    model_id : str
        A hub id (``openai/clip-vit-base-patch32``) or a local folder with the tokenizer.
    revision : str, optional
    device : str, default="cpu"
    """

    def __init__(self, model_id: str, revision: str | None = None, device: str = "cpu"):
        from hmine.clip.loading import load_clip, load_preprocessing

        self.model, self.tokenizer = load_clip(model_id, revision)
        self.model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.preprocessing = load_preprocessing(model_id, revision, int(self.model.config.vision_config.image_size))

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings of images (n, 3, H, W) in [-1, 1] (clipped there, as a saved image is)."""
        from hmine.clip.labeller import _projected

        pixels = self.preprocessing((images.to(self.device, torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0)
        return F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Unit text embeddings (n, d)."""
        from hmine.clip.labeller import _projected

        tokens = {k: v.to(self.device) for k, v in self.tokenizer(list(texts), padding=True, return_tensors="pt").items()}
        return F.normalize(_projected(self.model.get_text_features(**tokens)).float(), dim=-1)

    def text_direction(self, source: str, target: str) -> torch.Tensor:
        """E_T(target) - E_T(source) of the unit text embeddings (d,)."""
        embedded = self.texts([source, target])
        return embedded[1] - embedded[0]


def directional_cosines(embedder: ClipEmbedder, before: torch.Tensor, after: torch.Tensor, text_direction: torch.Tensor) -> torch.Tensor:
    """Per image, cos(E_I(after) - E_I(before), text_direction); 0 where the image embedding did not move."""
    change = embedder.images(after) - embedder.images(before)
    return F.cosine_similarity(change, text_direction.to(change)[None, :], dim=-1, eps=1e-12)


def directional_similarity(embedder: ClipEmbedder, before, after, source: str, target: str) -> tuple[float, float, np.ndarray]:
    """S_dir: the mean over images of cos(E_I(after) - E_I(before), E_T(target) - E_T(source)), its std and the cosines.

    Images (n, 3, H, W) in [-1, 1], torch or numpy; embeddings L2-normalised first (as in the
    DL2 reproduction's metric, which then printed 1 - mean under the name S_dir).
    """
    before = torch.as_tensor(np.asarray(before, dtype=np.float32))
    after = torch.as_tensor(np.asarray(after, dtype=np.float32))
    with torch.no_grad():
        cosines = directional_cosines(embedder, before, after, embedder.text_direction(source, target)).double().cpu().numpy()
    return float(cosines.mean()), float(cosines.std(ddof=1)) if len(cosines) > 1 else float("nan"), cosines


class ClipDirectional:
    """Asyrp's CLIP loss for a text pair: ``-log((1 + cos) / 2)`` of the directional cosine, plus L1.

    ``(1 + cos) / 2`` is Asyrp's ``(2 - L_dir) / 2`` with L_dir = 1 - cos (StyleGAN-NADA's
    directional loss); the log makes it steeper near cos = 1.
    """

    def __init__(self, embedder: ClipEmbedder, source: str, target: str, *, target_weight: float = 1.0, l1_weight: float = 0.5):
        self.embedder = embedder
        self.direction = embedder.text_direction(source, target)
        self.weights = (float(target_weight), float(l1_weight))

    def __call__(self, edited: torch.Tensor, original: torch.Tensor):
        cosines = directional_cosines(self.embedder, original.detach(), edited, self.direction)
        directional = -torch.log(((1.0 + cosines) / 2.0).clamp_min(1e-6)).mean()
        l1 = l1_to_original(edited, original)
        loss = self.weights[0] * directional + self.weights[1] * l1
        return loss, {"directional": directional.detach(), "cos": cosines.detach().mean(), "l1": l1.detach()}
