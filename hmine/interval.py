"""Asyrp's editing interval chosen from distances, and its quality boosting.

Asyrp (Kwon et al. 2023, ``set_t_edit_t_addnoise``) edits only where the edit still changes
content and adds noise back where it restores detail:

* **t_edit** is the smallest timestep t at which the prediction of x0 at t, P_t, is at least
  a threshold away from the final image x0 (the mean over images of LPIPS(x0, P_t) in
  Asyrp, threshold 0.33 times the cosine of the two texts): above it P_t is still vague, so
  changing it changes content; below it P_t already is the image, and an edit there only
  touches details. Steps with timestep >= t_edit are edited.
* **t_boost** is the smallest timestep at which the noisy x_t is a threshold away from x0
  (LPIPS(x0, x_t) >= 1.2 in Asyrp's CelebA scripts). The steps below it run with eta 1
  (DDPM-like: fresh noise) and no edit, "quality boosting": the stochastic steps repair
  the detail the deterministic edited trajectory lost.

**The distance** (:func:`distance_curves`). LPIPS needs its network weights, which hmine does
not have offline. Its substitute is a distance in the labeller's feature space
(:func:`hmine.quality.feature_extractor`: the world classifier's penultimate features on the
embedded world, CLIP's image embeddings for real models), which, like LPIPS, compares what a
trained network sees rather than pixels, and is the space the quality figures
(:mod:`hmine.quality`) already use; ``edit.interval.distance: pixels`` takes the mean
absolute pixel difference instead. Either is divided by the mean distance between two
different samples' x0, so the thresholds read the same for any feature space: 1 is as far
as another image of the model. The curves are measured on the unedited trajectories of the
run's first ``edit.interval.n_samples`` seeds; P_t and x_t of a latent model are decoded.

**Boosting** (:func:`with_boosting`). The boosted steps get ``edit.interval.boost_eta``
(a copy of the sampler with those etas) and *fresh* per-step noise (:class:`BoostedNoise`),
drawn from a generator seeded by the row's key (its seed) on a stream of its own, so a
boosted image is still a function of its seed, and differs from the sample's own per-step
noise (which a DDIM run drew but never used). At ``boost_eta`` 0, or when no step lies
below t_boost, nothing changes, bit for bit (tested). Boosted steps are never edited.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hmine.sampling import Sampler
from hmine.threads import model_threads

#: The seed stream of boosting's fresh noise (a row's seed and this seed its generator).
BOOST_STREAM = 0xB0057


@dataclass
class DistanceCurves:
    """Mean relative distances to x0 per sampler step (module docstring).

    ``to_prediction[i]``: mean d(x0, P_t) / unit at ``timesteps[i]``; ``to_state[i]``:
    mean d(x0, x_t) / unit; ``unit``: the mean distance between two different samples' x0.
    """

    timesteps: np.ndarray
    to_prediction: np.ndarray
    to_state: np.ndarray
    unit: float

    def as_json(self) -> dict:
        return {"timesteps": [int(t) for t in self.timesteps], "to_prediction": self.to_prediction.tolist(),
                "to_state": self.to_state.tolist(), "unit": self.unit}  # fmt: skip


def first_timestep_reaching(timesteps: Sequence[int], distances: Sequence[float], threshold: float) -> int | None:
    """The smallest timestep whose distance is >= ``threshold`` (Asyrp scans t upwards); None: none is."""
    for t, d in sorted(zip((int(t) for t in timesteps), distances)):
        if d >= threshold:
            return t
    return None


def pixel_embedding(images: torch.Tensor) -> torch.Tensor:
    """Images as flat float64 vectors (``distance: pixels``)."""
    return images.reshape(images.shape[0], -1).double().cpu()


def pixel_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of flat images, per row."""
    return (a - b).abs().mean(dim=1)


def feature_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of feature vectors, per row."""
    return torch.linalg.vector_norm(a - b, dim=1)


def _between_samples(final: torch.Tensor, distance) -> float:
    """The mean distance over every pair of different rows."""
    n = final.shape[0]
    a, b = torch.triu_indices(n, n, offset=1)
    return float(distance(final[a], final[b]).mean())


@torch.inference_mode()
def _trajectory_embeddings(sampler: Sampler, seeds: list[int], embed) -> tuple[list, list, torch.Tensor]:
    """Embeddings of P_t and x_t at every step (decoded) and of the final x0, for unedited ``seeds``."""
    from hmine.learning.train import predicted_x0
    from hmine.sampling import noise_for_seed

    param = next(sampler.model.unet.parameters())
    draws = [noise_for_seed(s, sampler.model.sample_shape, sampler.num_inference_steps) for s in seeds]
    x = torch.stack([d[0] for d in draws]).to(param)
    noise = torch.stack([d[1] for d in draws], dim=1).to(param)
    predictions, states = [], []
    with model_threads(sampler.torch_threads), sampler.conditioned_on(seeds):
        for i, t in enumerate(sampler.timesteps):
            eps = sampler.eps(sampler.unet_output(x, t.expand(len(seeds)).to(param.device)), t, x)
            predictions.append(embed(sampler.model.decode(predicted_x0(sampler, eps, t, x)).float()))
            states.append(embed(sampler.model.decode(x).float()))
            x = sampler.step(eps, eps, int(t), x, sampler.etas[i], noise[i])
        final = embed(sampler.model.decode(x).float())
    return predictions, states, final


def distance_curves(sampler: Sampler, seeds: Sequence[int], embed: Callable, distance: Callable) -> DistanceCurves:
    """The relative distances of P_t and x_t to x0 at every step, averaged over ``seeds`` (at least 2).

    ``embed`` maps images (n, 3, H, W) in [-1, 1] to vectors (n, d); ``distance`` gives the
    distance of two such tables row by row.
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise ValueError(f"the distance curves need at least 2 samples, got {len(seeds)}; raise edit.interval.n_samples")
    predictions, states, final = _trajectory_embeddings(sampler, seeds, embed)
    unit = _between_samples(final, distance)
    if not unit > 0:
        raise ValueError("the samples' x0 are all alike in this distance; use edit.interval.distance: pixels")
    return DistanceCurves(
        timesteps=np.array([int(t) for t in sampler.timesteps]),
        to_prediction=np.array([float(distance(final, p).mean()) / unit for p in predictions]),
        to_state=np.array([float(distance(final, s).mean()) / unit for s in states]),
        unit=unit,
    )


def chosen_timestep(curves: DistanceCurves, which: str, threshold: float, field: str) -> int:
    """Asyrp's rule on one curve (``to_prediction`` for t_edit, ``to_state`` for t_boost)."""
    distances = getattr(curves, which)
    chosen = first_timestep_reaching(curves.timesteps, distances, threshold)
    if chosen is None:
        raise ValueError(
            f"edit.{field} is auto but no step's distance reaches edit.interval.{field.replace('t_', '')}_threshold "
            f"{threshold} (largest {float(np.max(distances)):.3f}); lower the threshold or give edit.{field} a number"
        )
    return chosen


def boosted_steps(timesteps: Sequence[int], t_boost: int | None) -> list[bool]:
    """Which steps quality boosting changes: those with timestep < ``t_boost`` (none for None)."""
    return [t_boost is not None and int(t) < t_boost for t in timesteps]


def boost_noise(key: int, shape: tuple[int, ...], num_steps: int) -> torch.Tensor:
    """Fresh per-step noise (num_steps, *shape) of one row, a function of its key (seed) only."""
    state = np.random.SeedSequence([int(key), BOOST_STREAM]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randn((num_steps, *shape), generator=generator)


class BoostedNoise:
    """A trajectory source (:mod:`hmine.regeneration`) whose boosted steps get :func:`boost_noise`.

    x_T, the other steps' noise and the residual are ``source``'s.
    """

    def __init__(self, source, boosted: Sequence[bool], shape: tuple[int, ...]):
        self.source = source
        self.boosted = torch.tensor([bool(b) for b in boosted])
        self.shape = tuple(shape)

    def __call__(self, keys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x_T, noise = self.source(keys)
        fresh = torch.stack([boost_noise(int(k), self.shape, len(self.boosted)) for k in keys], dim=1)
        noise = torch.where(self.boosted.reshape(-1, *[1] * (noise.ndim - 1)), fresh.to(noise), noise)
        return x_T, noise

    def residual(self, keys: Sequence[int]) -> torch.Tensor | None:
        return self.source.residual(keys)


def with_boosting(sampler: Sampler, noise_source, t_boost: int | None, eta: float) -> tuple[Sampler, object]:
    """A sampler whose steps below ``t_boost`` have ``eta``, and a noise source with fresh noise there.

    ``noise_source`` None is the seeds' own (:class:`hmine.regeneration.SeedNoise`). With no
    step below ``t_boost`` both come back unchanged.
    """
    from hmine.regeneration import SeedNoise

    boosted = boosted_steps(sampler.timesteps.tolist(), t_boost)
    if not any(boosted):
        return sampler, noise_source
    boosting = copy.copy(sampler)  # shares the model; only the etas differ
    boosting.etas = [float(eta) if b else e for b, e in zip(boosted, sampler.etas)]
    source = SeedNoise(sampler) if noise_source is None else noise_source
    return boosting, BoostedNoise(source, boosted, sampler.model.sample_shape)


@dataclass
class EditInterval:
    """The edit stage's resolved interval: numbers for ``auto``, the edited steps, the curves measured."""

    t_edit: int | None
    t_boost: int | None
    edit_steps: list[bool]
    curves: DistanceCurves | None = None

    def as_json(self) -> dict:
        curves = None if self.curves is None else self.curves.as_json()
        return {"t_edit": self.t_edit, "t_boost": self.t_boost, "curves": curves}


def embedding_for(distance: str, labeller) -> tuple[Callable, Callable]:
    """``embed`` and ``distance`` of ``edit.interval.distance`` (module docstring)."""
    if distance == "pixels":
        return pixel_embedding, pixel_distance
    from hmine.quality import feature_extractor

    extractor = feature_extractor(labeller) if labeller is not None else None
    if extractor is None:
        raise ValueError(
            f"edit.interval.distance is 'features' but the labeller {type(labeller).__name__} has no feature "
            "space (the world classifier and CLIP have); set edit.interval.distance: pixels"
        )
    return extractor, feature_distance


def resolve_interval(sampler: Sampler, edit, seeds: Sequence[int], labeller=None) -> EditInterval:
    """The edited steps of an edit config section ``edit``: its window, ``auto`` resolved, boosted steps left out.

    ``seeds``: the samples whose trajectories measure the distances (only read for ``auto``);
    ``labeller``: whose feature space ``distance: features`` uses.
    """
    from hmine.editing import edit_steps_from

    rule, curves = edit.interval, None
    if "auto" in (edit.t_edit, edit.t_boost):
        curves = distance_curves(sampler, list(seeds)[: rule.n_samples], *embedding_for(rule.distance, labeller))
    t_edit = chosen_timestep(curves, "to_prediction", rule.edit_threshold, "t_edit") if edit.t_edit == "auto" else edit.t_edit
    t_boost = chosen_timestep(curves, "to_state", rule.boost_threshold, "t_boost") if edit.t_boost == "auto" else edit.t_boost
    timesteps = sampler.timesteps.tolist()
    window = edit_steps_from(timesteps, t_edit, edit.t_edit_max)
    edit_steps = [w and not b for w, b in zip(window, boosted_steps(timesteps, t_boost))]
    if not any(edit_steps):
        raise ValueError(
            f"every step of the edit window [{t_edit}, {edit.t_edit_max}] lies below t_boost={t_boost}, and boosted "
            "steps are unedited; lower edit.t_boost (or edit.interval.boost_threshold) or raise edit.t_edit"
        )
    return EditInterval(t_edit, t_boost, edit_steps, curves)


def unedited_images(sampler: Sampler, keys: Sequence[int], batch_size: int, noise_source=None) -> np.ndarray:
    """Each row's unedited final image in [-1, 1] (n, 3, H, W), as :func:`hmine.regeneration.regenerate`
    makes it (the residual of an inversion added): the scale-0 images of a boosted edit."""
    from hmine.regeneration import unedited_states

    param = next(sampler.model.unet.parameters())
    images = []
    for start in range(0, len(keys), batch_size):
        chunk = [int(k) for k in keys[start : start + batch_size]]
        x = unedited_states(sampler, chunk, sampler.num_inference_steps, batch_size, noise_source).to(param)
        residual = None if noise_source is None else noise_source.residual(chunk)
        if residual is not None:
            x = x + residual.to(param)
        with torch.inference_mode(), model_threads(sampler.torch_threads):
            images.append(sampler.model.decode(x).float().cpu().numpy())
    return np.concatenate(images) if images else np.empty((0,))
