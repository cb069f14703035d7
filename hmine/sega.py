"""SEGA: semantic guidance of a text-conditional model (Brack et al., NeurIPS 2023).

SEGA edits a text-to-image generation in the U-Net's output space, not in h: at every step
each editing concept c (a prompt) gets its own U-Net branch, and its difference to the
unconditional branch, ``s_c * sign_c * (out(x, c) - out(x, uncond))``, is kept only where
its magnitude reaches the ``threshold`` quantile of its (image, channel) map, weighted and
added to the classifier-free guidance, with momentum. This is the arithmetic of diffusers'
``SemanticStableDiffusionPipeline`` (tested equal to it), including its particulars:

* the momentum ``nu <- beta * nu + (1 - beta) * g`` is updated at every step from the
  weighted sum ``g`` of all concepts (with ``momentum_scale * nu`` added), also while
  concepts are still warming up, and ``g`` is added to the guidance only once every
  concept is past its warm-up;
* while only some concepts are past their warm-up, their guidance (without momentum) is
  added with their weights normalised to sum to 1;
* a concept past its cool-down contributes nothing (weight 0) from then on.

As in the pipeline, the guidance acts on the U-Net's output (eps for an epsilon model, v
for a v-prediction one), and needs classifier-free guidance (``guidance_scale`` != 1).
Momentum scale and beta are one pair for all concepts, as in SEGA and the pipeline. Unlike
the pipeline, :func:`sample_sega` refuses a concept whose ``warmup_steps`` is not below the
number of steps, which would never be applied (the pipeline's default 10 at 10 steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hmine.hooks import HSpaceHook
from hmine.sampling import SampleOutput, Sampler, noise_for_seed
from hmine.sega_config import check_warmup_applies
from hmine.threads import model_threads


@dataclass(frozen=True)
class SegaConcept:
    """One editing concept of SEGA (the pipeline's per-concept ``edit_*`` arguments).

    Parameters
    ----------
    prompt : str
        The editing prompt, e.g. ``"smiling, smile"``.
    reverse : bool, default=False
        Guide away from the concept (``reverse_editing_direction``).
    warmup_steps : int, default=10
        Steps (from the first) before the concept is applied (``edit_warmup_steps``).
    cooldown_steps : int or None, default=None
        The step from which it is no longer applied (``edit_cooldown_steps``); None: never stops.
    guidance_scale : float, default=5.0
        ``edit_guidance_scale``.
    threshold : float, default=0.9
        The quantile of |guidance| per (image, channel) below which it is zeroed (``edit_threshold``):
        0.9 keeps the strongest 10 % of the latent dimensions.
    weight : float, default=1.0
        The concept's weight against the others (``edit_weights``).
    """

    prompt: str
    reverse: bool = False
    warmup_steps: int = 10
    cooldown_steps: int | None = None
    guidance_scale: float = 5.0
    threshold: float = 0.9
    weight: float = 1.0

    def __post_init__(self):
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"SEGA concept {self.prompt!r}: threshold must lie in [0, 1] (a quantile), got {self.threshold}")
        if self.warmup_steps < 0 or (self.cooldown_steps is not None and self.cooldown_steps < 0):
            raise ValueError(f"SEGA concept {self.prompt!r}: warmup_steps and cooldown_steps must be >= 0")


@dataclass(frozen=True)
class Sega:
    """SEGA's concepts and its momentum (``edit_momentum_scale``, ``edit_mom_beta``)."""

    concepts: tuple[SegaConcept, ...]
    momentum_scale: float = 0.1
    momentum_beta: float = 0.4

    def __post_init__(self):
        if not self.concepts:
            raise ValueError("SEGA needs at least one concept")
        if not 0 <= self.momentum_beta <= 1:
            raise ValueError(f"SEGA momentum_beta must lie in [0, 1], got {self.momentum_beta}")


def concept_guidance(concept: SegaConcept, edit: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """One concept's thresholded guidance ``s * sign * (edit - uncond)`` at one step, (batch, C, H, W)."""
    guidance = edit - uncond
    if concept.reverse:
        guidance = guidance * -1
    guidance = guidance * concept.guidance_scale
    # per (image, channel): the threshold quantile of |guidance| over the map (in float32, as torch.quantile needs)
    level = torch.quantile(guidance.abs().flatten(start_dim=2).float(), concept.threshold, dim=2).to(guidance.dtype)
    return torch.where(guidance.abs() >= level[:, :, None, None], guidance, torch.zeros_like(guidance))


def semantic_guidance(
    sega: Sega,
    step: int,
    uncond: torch.Tensor,
    cond: torch.Tensor,
    edits: Sequence[torch.Tensor],
    momentum: torch.Tensor | None,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided U-Net output of one step with SEGA, and the new momentum.

    Parameters
    ----------
    sega : Sega
    step : int
        The step index (0 is the first, noisiest step).
    uncond, cond : Tensor of shape (batch, C, H, W)
        The unconditional and conditional branches' outputs.
    edits : sequence of Tensor of shape (batch, C, H, W)
        Each concept's branch output, in the order of ``sega.concepts``.
    momentum : Tensor or None
        The momentum after the previous step (None at the first).
    guidance_scale : float
        Classifier-free guidance scale.

    Returns
    -------
    output : Tensor of shape (batch, C, H, W)
        ``uncond + guidance_scale * (cond - uncond) + semantic guidance``.
    momentum : Tensor
    """
    guidance = guidance_scale * (cond - uncond)
    momentum = torch.zeros_like(guidance) if momentum is None else momentum
    batch = uncond.shape[0]
    weights = torch.zeros((len(edits), batch), dtype=guidance.dtype, device=guidance.device)
    per_concept = torch.zeros((len(edits), *guidance.shape), dtype=guidance.dtype, device=guidance.device)
    warm = []
    for c, (concept, edit) in enumerate(zip(sega.concepts, edits, strict=True)):
        cooldown = step + 1 if concept.cooldown_steps is None else concept.cooldown_steps
        if step >= concept.warmup_steps:
            warm.append(c)
        if step >= cooldown:
            continue  # weight and guidance stay 0
        weights[c] = concept.weight
        per_concept[c] = concept_guidance(concept, edit, uncond)
    if 0 < len(warm) < len(edits):
        # some concepts warmed up: theirs alone, weights normalised, no momentum
        chosen = torch.tensor(warm, device=guidance.device)
        part = weights.index_select(0, chosen).clamp_min(0)
        part = part / part.sum(dim=0)
        guidance = guidance + torch.einsum("cb,cbijk->bijk", part, per_concept.index_select(0, chosen))
    weights = torch.nan_to_num(weights.clamp_min(0))
    combined = torch.einsum("cb,cbijk->bijk", weights, per_concept) + sega.momentum_scale * momentum
    momentum = sega.momentum_beta * momentum + (1 - sega.momentum_beta) * combined
    if len(warm) == len(edits):
        guidance = guidance + combined
    return uncond + guidance, momentum


def sample_sega(
    sampler: Sampler,
    seeds: Sequence[int],
    sega: Sega,
    *,
    prompts: Sequence[str] | None = None,
    record_h: bool = True,
) -> SampleOutput:
    """Generate one image per seed with SEGA's concepts, on the seeds' own trajectories.

    The seeds' x_T and per-step noise, their prompts, the guidance scale, the negative
    prompt and the DDIM step are the sampler's (:class:`hmine.sampling.Sampler`), so a
    SEGA image and the sample stage's image of the same seed differ only by SEGA. Each
    step is one U-Net call of ``(2 + len(concepts)) * len(seeds)`` rows; h is that of the
    branch ``sample.text.h_branch`` names.

    Raises
    ------
    ValueError
        The sampler has no text or no classifier-free guidance, a concept's ``warmup_steps``
        is not below the sampler's ``num_inference_steps`` (the concept would never be
        applied), or an editing prompt is over the tokenizer's limit (one line naming
        ``sega.concepts``).
    """
    text = sampler.text
    if text is None or not text.config.guided:
        raise ValueError(
            "SEGA needs a text-conditional model with classifier-free guidance: set sample.text and "
            "a sample.text.guidance_scale other than 1"
        )
    for i, concept in enumerate(sega.concepts):
        check_warmup_applies(concept.warmup_steps, sampler.num_inference_steps,
                             f"sega.concepts[{i}].warmup_steps (concept {concept.prompt!r})",
                             "the sampler's num_inference_steps")  # fmt: skip
    edit_states = [text.embed(c.prompt, "sega.concepts.prompt") for c in sega.concepts]
    with model_threads(sampler.torch_threads), sampler.conditioned_on(seeds, prompts=prompts):
        out = _sample_sega(sampler, list(seeds), sega, edit_states, record_h)
    out.prompts = list(prompts) if prompts is not None else sampler.prompts_for(seeds)
    return out


@torch.inference_mode()
def _sample_sega(sampler: Sampler, seeds: list[int], sega: Sega, edit_states, record_h: bool) -> SampleOutput:
    unet = sampler.model.unet
    param = next(unet.parameters())
    rows, states = sampler._context  # (unconditional, conditional) rows of the seeds' prompts
    draws = [noise_for_seed(s, sampler.model.sample_shape, sampler.num_inference_steps) for s in seeds]
    x = torch.stack([d[0] for d in draws]).to(param)
    noise = torch.stack([d[1] for d in draws], dim=1).to(param)
    states = torch.cat([states] + [e.to(param).expand(rows, -1, -1) for e in edit_states])
    branches = 2 + len(sega.concepts)
    hs, momentum = [], None
    with HSpaceHook(unet, sampler.h_position, record=record_h) as hook:
        for i, t in enumerate(sampler.timesteps):
            t_batch = t.expand(rows * branches).to(param.device)
            out = sampler.unet_forward(torch.cat([x] * branches), t_batch, states).chunk(branches)
            guided, momentum = semantic_guidance(
                sega, i, out[0], out[1], out[2:], momentum, sampler.text.config.guidance_scale
            )
            if record_h:
                hs.append(sampler.h_rows(hook.recorded.pop()[: 2 * rows], rows))
            eps = sampler.eps(guided, t, x)
            x = sampler.step(eps, eps, int(t), x, sampler.etas[i], noise[i])
            hook.clear()
    return SampleOutput(
        images=sampler.model.decode(x),
        h=torch.stack(hs, dim=1) if record_h else None,
        timesteps=sampler.timesteps,
    )


def sega_edit(sampler: Sampler, seeds: Sequence[int], config, name, scale: float, *, record_h: bool = False) -> SampleOutput:
    """The seeds' images with SEGA concept ``name`` of ``config`` (:class:`hmine.sega_config.SegaConfig`)
    at signed edit scale ``scale`` (:meth:`~hmine.sega_config.SegaConfig.scaled`): scale 0 is the
    unedited sample, a negative scale guides away from the concept. ``name`` may also be a
    sequence of (concept, weight) pairs: all of them at once, each at signed scale weight x scale."""
    terms = [(name, 1.0)] if isinstance(name, str) else [(str(n), float(w)) for n, w in name]
    sega = Sega(
        concepts=tuple(SegaConcept(**config.scaled(n, w * scale)) for n, w in terms),
        momentum_scale=config.momentum_scale,
        momentum_beta=config.momentum_beta,
    )
    return sample_sega(sampler, seeds, sega, record_h=record_h)
