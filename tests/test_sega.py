"""SEGA (issue 18, item 2) against diffusers' SemanticStableDiffusionPipeline on a tiny SD-layout model."""

from __future__ import annotations

import pytest
import torch
from tiny_sd import PROMPTS

from hmine.prompts import TextConfig
from hmine.sega import Sega, SegaConcept, sample_sega

STEPS = 6
ONE_CONCEPT = Sega(
    concepts=(SegaConcept("a blue circle", warmup_steps=1, guidance_scale=4.0, threshold=0.8),),
    momentum_scale=0.3,
    momentum_beta=0.6,
)
# two concepts warming up at different steps (steps 1-2: the first alone, normalised weights),
# one reversed and cooling down at step 5, unequal weights
TWO_CONCEPTS = Sega(
    concepts=(
        SegaConcept("green", reverse=True, warmup_steps=1, cooldown_steps=5, guidance_scale=3.0, threshold=0.9, weight=2.0),
        SegaConcept("a large square", warmup_steps=3, cooldown_steps=STEPS, guidance_scale=5.0, threshold=0.7, weight=1.0),
    ),
    momentum_scale=0.2,
    momentum_beta=0.5,
)


@pytest.fixture(scope="module")
def semantic_pipe(tiny_sd_dir):
    from diffusers import SemanticStableDiffusionPipeline

    pipe = SemanticStableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe, seeds, prompts, sega: Sega | None, guidance_scale, negative_prompt=None):
    concepts = sega.concepts if sega is not None else ()
    editing = {} if sega is None else dict(
        editing_prompt=[c.prompt for c in concepts],
        reverse_editing_direction=[c.reverse for c in concepts],
        edit_guidance_scale=[c.guidance_scale for c in concepts],
        edit_warmup_steps=[c.warmup_steps for c in concepts],
        edit_cooldown_steps=None if all(c.cooldown_steps is None for c in concepts) else [c.cooldown_steps for c in concepts],
        edit_threshold=[c.threshold for c in concepts],
        edit_momentum_scale=sega.momentum_scale,
        edit_mom_beta=sega.momentum_beta,
        edit_weights=[c.weight for c in concepts],
    )
    with torch.no_grad():
        out = pipe(
            prompt=list(prompts), negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
            guidance_scale=guidance_scale, num_inference_steps=STEPS, eta=0.0,
            generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt", **editing,
        )
    return out.images * 2 - 1


@pytest.mark.parametrize(("sega", "negative_prompt"), [(ONE_CONCEPT, "a red square"), (TWO_CONCEPTS, None)])
def test_sega_equals_semantic_stable_diffusion_pipeline(tiny_sd, semantic_pipe, sega, negative_prompt):
    from hmine.sampling import Sampler

    seeds = [21, 22, 23]
    text = TextConfig(prompts=PROMPTS, guidance_scale=6.0, negative_prompt=negative_prompt)
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=text)
    ours = sample_sega(sampler, seeds, sega)
    theirs = _pipeline_images(semantic_pipe, seeds, ours.prompts, sega, 6.0, negative_prompt)
    difference = (ours.images.clamp(-1, 1) - theirs).abs().max().item()
    assert difference <= 1e-4, difference
    # SEGA changed the images: the comparison is not between two unedited samples
    plain = sampler.sample(seeds).images
    assert (ours.images - plain).abs().max().item() > 1e-2
    assert ours.h.shape == (3, STEPS, 16, 4, 4)


def test_sega_h_is_the_conditional_branch_and_a_concept_warming_up_at_the_last_step_applies_there(tiny_sd):
    from hmine.sampling import Sampler

    text = TextConfig(prompts=PROMPTS, guidance_scale=5.0)
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=text)
    seeds = [1, 2]
    last = Sega(concepts=(SegaConcept("a blue circle", warmup_steps=STEPS - 1, guidance_scale=20.0),), momentum_scale=0.0)
    sega, plain = sample_sega(sampler, seeds, last), sampler.sample(seeds)
    # steps are 0 .. STEPS - 1 and a concept applies from step warmup_steps on: warm-up STEPS - 1 guides
    # the last step only (t = 1, a small change: 6e-4), after its h is recorded, so h is plain sampling's
    assert (sega.h - plain.h).abs().max().item() <= 1e-5
    assert (sega.images - plain.images).abs().max().item() > 1e-4


@pytest.mark.parametrize("warmup", [STEPS, 10])
def test_a_concept_warming_up_past_the_last_step_is_refused(tiny_sd, warmup):
    # at warmup_steps >= the steps (the pipeline's default 10 at 10 steps) it would never be applied
    from hmine.sampling import Sampler

    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=TextConfig(prompts=PROMPTS, guidance_scale=5.0))
    late = Sega(concepts=(ONE_CONCEPT.concepts[0], SegaConcept("a large square", warmup_steps=warmup)))
    message = (rf"^sega\.concepts\[1\]\.warmup_steps \(concept 'a large square'\) is {warmup} but the sampler's "
               rf"num_inference_steps is {STEPS}: the concept would never be applied; set warmup_steps below {STEPS}")
    with pytest.raises(ValueError, match=message) as error:
        sample_sega(sampler, [1], late)
    assert "\n" not in str(error.value)


def test_sega_is_refused_without_guidance_or_with_a_long_editing_prompt(tiny_sd):
    from hmine.sampling import Sampler

    unguided = Sampler(tiny_sd, num_inference_steps=2, text=TextConfig(prompts=["a red circle"], guidance_scale=1.0))
    with pytest.raises(ValueError, match="SEGA needs a text-conditional model with classifier-free guidance"):
        sample_sega(unguided, [0], ONE_CONCEPT)
    guided = Sampler(tiny_sd, num_inference_steps=2, text=TextConfig(prompts=["a red circle"], guidance_scale=3.0))
    with pytest.raises(ValueError, match=r"^sega\.concepts\.prompt: the prompt .* over the tokenizer's limit"):
        sample_sega(guided, [0], Sega(concepts=(SegaConcept(" ".join(["red"] * 30), warmup_steps=1),)))
    with pytest.raises(ValueError, match="threshold must lie in"):
        SegaConcept("red", threshold=1.5)


def test_sega_edits_at_signed_scales_sweep_a_concept_like_a_direction(tiny_sd):
    from hmine.sampling import Sampler
    from hmine.sega import sega_edit
    from hmine.sega_config import SegaConfig

    config = SegaConfig(concepts={"blue": {"prompt": "a blue circle", "warmup_steps": 1, "guidance_scale": 4.0,
                                           "threshold": 0.8}}, momentum_scale=0.3, momentum_beta=0.6)
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=TextConfig(prompts=PROMPTS, guidance_scale=6.0))
    seeds = [21, 22]
    plain = sampler.sample(seeds).images
    assert (sega_edit(sampler, seeds, config, "blue", 0.0).images - plain).abs().max().item() <= 1e-5
    # scale 1 is the concept as configured (ONE_CONCEPT), scale -2 the reversed concept at twice the guidance
    assert torch.equal(sega_edit(sampler, seeds, config, "blue", 1.0).images, sample_sega(sampler, seeds, ONE_CONCEPT).images)
    doubled = Sega(concepts=(SegaConcept("a blue circle", reverse=True, warmup_steps=1, guidance_scale=8.0, threshold=0.8),),
                   momentum_scale=0.3, momentum_beta=0.6)
    assert torch.equal(sega_edit(sampler, seeds, config, "blue", -2.0).images, sample_sega(sampler, seeds, doubled).images)
    with pytest.raises(KeyError, match=r"sega/red: no concept 'red'"):
        sega_edit(sampler, seeds, config, "red", 1.0)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cooldown_steps .* must be above warmup_steps"):
        SegaConfig(concepts={"x": {"prompt": "x", "warmup_steps": 3, "cooldown_steps": 2}})
