"""hmine.learning: the delta block, the losses and S_dir, training through Asyrp's process, applying the result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hmine import world
from hmine.editing import edit_steps_from
from hmine.hooks import h_shape
from hmine.learning.apply import images_of, regenerate_learned
from hmine.learning.config import LearnConfig
from hmine.learning.delta_block import DeltaBlock, block_parameter_count
from hmine.learning.editors import BlockEditor, DeltaH
from hmine.learning.losses import ClassifierTarget, ClipDirectional, ClipEmbedder, directional_similarity, world_attribute_scores
from hmine.learning.train import train_editor
from hmine.models import load_model
from hmine.regeneration import regenerate
from hmine.sampling import Sampler
from hmine.world.training import check_work_dir_config


def _work(tmp_path, name):
    work = tmp_path / name
    check_work_dir_config(LearnConfig(), work)
    return work


@pytest.mark.parametrize(("channels", "time_dim", "expected"), [(512, 512, 788_992), (128, 128, 49_792), (16, 8, 720)])
def test_delta_block_shape_and_parameter_count(channels, time_dim, expected):
    torch.manual_seed(0)
    block = DeltaBlock(channels, time_dim)
    assert block_parameter_count(channels, time_dim) == expected  # Asyrp's ~0.79 M at C = T = 512
    assert sum(p.numel() for p in block.parameters()) == expected
    h = torch.randn(3, channels, 4, 4)
    out = block(h, torch.tensor([999, 500, 0]))
    assert out.shape == h.shape
    assert torch.count_nonzero(out) == 0  # conv_out starts at zero: the untrained block edits nothing
    torch.nn.init.normal_(block.conv_out.weight)
    edited = block(h, torch.tensor(500))  # one t for the whole batch
    assert edited.shape == h.shape and edited.abs().max() > 0
    # the edit depends on t, and on each image's own h alone (GroupNorm is per image)
    assert not torch.allclose(block(h, torch.tensor([999, 999, 999])), block(h, torch.tensor([0, 0, 0])))
    torch.testing.assert_close(block(h[1:2], torch.tensor(500)), edited[1:2])


def test_world_attribute_scores_equal_the_labellers_and_carry_gradients():
    from hmine.labelling import WorldLabeller

    labeller = WorldLabeller()
    images = torch.from_numpy(world.generate(12, seed=5).images).requires_grad_(True)
    scores = world_attribute_scores(labeller.model, images)
    table = labeller.score(images.detach())
    for name, value in scores.items():
        np.testing.assert_allclose(value.detach().numpy(), table[name].to_numpy(), atol=1e-6)
    scores["is_red"].sum().backward()
    assert images.grad is not None and images.grad.abs().max() > 0


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's published normalisation, not hmine's copy
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _hand_clip(clip_dir, texts, *image_sets):
    """Unit text and image embeddings (float64 numpy) by transformers' CLIPModel alone: the reference for hmine's CLIP code.

    32x32 images need no resize or crop: (x + 1) / 2, then CLIP's mean/std.
    """
    from transformers import AutoTokenizer, CLIPModel

    model, tokenizer = CLIPModel.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    as_array = lambda out: (out if torch.is_tensor(out) else out.pooler_output).numpy().astype(np.float64)  # noqa: E731
    mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    with torch.no_grad():
        text = as_array(model.get_text_features(**tokenizer(list(texts), padding=True, return_tensors="pt")))
        images = [as_array(model.get_image_features(pixel_values=((torch.as_tensor(np.asarray(x)) + 1) / 2 - mean) / std))
                  for x in image_sets]  # fmt: skip
    return unit(text), *(unit(e) for e in images)


def _hand_cosines(text, e_before, e_after):
    d_image, d_text = e_after - e_before, text[1] - text[0]
    return d_image @ d_text / (np.linalg.norm(d_image, axis=1) * np.linalg.norm(d_text))


def test_s_dir_is_the_mean_cosine_of_the_embedding_changes(tiny_clip_dir):
    """S_dir against a hand computation with CLIPModel's own features and numpy."""
    embedder = ClipEmbedder(str(tiny_clip_dir))
    rng = np.random.default_rng(0)
    before = rng.uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    after = np.clip(before + rng.normal(0, 0.5, before.shape), -1, 1).astype(np.float32)
    mean, std, cosines = directional_similarity(embedder, before, after, "a photo of a face", "a photo of a smiling face")

    hand = _hand_cosines(*_hand_clip(tiny_clip_dir, ["a photo of a face", "a photo of a smiling face"], before, after))
    np.testing.assert_allclose(cosines, hand, atol=1e-5)
    assert mean == pytest.approx(hand.mean(), abs=1e-5) and std == pytest.approx(hand.std(ddof=1), abs=1e-5)
    # swapping source and target flips every cosine: S_dir is a cosine, not 1 - cos
    _, _, swapped = directional_similarity(embedder, before, after, "a photo of a smiling face", "a photo of a face")
    np.testing.assert_allclose(swapped, -cosines, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_sampler(tiny_pixel_model_dir):
    return Sampler(load_model(str(tiny_pixel_model_dir)), num_inference_steps=4, eta=1.0, torch_threads=1)


def test_delta_h_applied_as_an_editor_equals_regenerate_with_its_delta(tiny_sampler):
    edit_steps = edit_steps_from(tiny_sampler.timesteps.tolist(), 300, None)
    editor = DeltaH(h_shape(tiny_sampler.model.unet), edit_steps)
    with torch.no_grad():
        editor.delta.normal_(generator=torch.Generator().manual_seed(1))
    seeds, coefficients = [0, 1, 2, 0, 1, 2], [1.0, 1.0, 1.0, -2.0, -2.0, 0.5]
    learned = images_of(regenerate_learned(tiny_sampler, seeds, editor, coefficients, edit_steps=edit_steps, batch_size=4), 6)
    deltas = torch.stack([c * editor.full() for c in (1.0, -2.0, 0.5)])
    plain = images_of(regenerate(tiny_sampler, seeds, deltas, [0, 0, 0, 1, 1, 2], edit_steps=edit_steps, asymmetric=True,
                                 batch_size=4), 6)  # fmt: skip
    np.testing.assert_array_equal(learned, plain)
    unedited = images_of(regenerate_learned(tiny_sampler, [0, 1], editor, [0.0, 0.0], edit_steps=edit_steps, batch_size=4), 2)
    np.testing.assert_array_equal(unedited, tiny_sampler.sample([0, 1], record_h=False).images.numpy())


def _clip_training(sampler, tiny_clip_dir, kind, work, steps, until_step=None):
    embedder = ClipEmbedder(str(tiny_clip_dir))
    loss = ClipDirectional(embedder, "a photo of a face", "a photo of a smiling face", l1_weight=0.1)
    edit_steps = [True] * sampler.num_inference_steps
    torch.manual_seed(0)
    shape = h_shape(sampler.model.unet)
    editor = DeltaH(shape, edit_steps) if kind == "delta_h" else BlockEditor(DeltaBlock(shape[0], 8), edit_steps)
    # four training seeds and a batch of four: every step sees the same images, so the loss can only fall by learning
    return train_editor(sampler, editor, loss, [3, 4, 5, 6], edit_steps, work, steps=steps, batch_size=4,
                        learning_rate=0.05 if kind == "delta_h" else 0.01, checkpoint_every=2, until_step=until_step)  # fmt: skip


def _losses(work):
    return [r["loss"] for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("kind", ["delta_h", "delta_block"])
def test_the_clip_path_trains_and_a_resumed_run_equals_an_uninterrupted_one(tiny_sampler, tiny_clip_dir, tmp_path, kind):
    whole = _clip_training(tiny_sampler, tiny_clip_dir, kind, _work(tmp_path, "whole"), steps=6)
    losses = _losses(tmp_path / "whole")
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert whole.step == 6

    stopped = _clip_training(tiny_sampler, tiny_clip_dir, kind, _work(tmp_path, "resumed"), steps=6, until_step=3)
    assert stopped.step == 3
    resumed = _clip_training(tiny_sampler, tiny_clip_dir, kind, tmp_path / "resumed", steps=6)  # a fresh editor and optimizer
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert _losses(tmp_path / "resumed") == losses
    files = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("*/*"))
    assert files and all(f.endswith((".safetensors", ".json")) for f in files)  # no pickle


def test_the_classifier_target_turns_an_attribute_on_in_the_embedded_model(tmp_path):
    sampler = Sampler(load_model(), num_inference_steps=5, eta=0.0, torch_threads=1)
    from hmine.labelling import WorldLabeller

    labeller = WorldLabeller()
    seeds = [1, 2, 3, 4]
    before = labeller.score(sampler.sample(seeds, record_h=False).images)
    loss = ClassifierTarget(labeller.model, "is_red", leakage_attributes=["is_circle", "is_large"], l1_weight=0.1)
    edit_steps = [True] * 5
    editor = DeltaH(h_shape(sampler.model.unet), edit_steps)
    result = train_editor(sampler, editor, loss, seeds, edit_steps, _work(tmp_path, "w"), steps=8, batch_size=4, learning_rate=0.3)
    records = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["target"] < records[0]["target"] and records[-1]["loss"] < records[0]["loss"], records
    after = labeller.score(images_of(regenerate_learned(sampler, seeds, result.model, [1.0] * 4, edit_steps=edit_steps, batch_size=8), 4))
    assert after["is_red"].mean() > before["is_red"].mean() + 0.1, (before["is_red"], after["is_red"])


def test_learn_config_refuses_what_cannot_be_trained():
    from pydantic import ValidationError

    from hmine.learning.config import LearnTarget

    with pytest.raises(ValidationError, match="needs attribute"):
        LearnTarget(name="x", kind="classifier")
    with pytest.raises(ValidationError, match="needs source and target"):
        LearnTarget(name="x", kind="clip", source="a face")
    with pytest.raises(ValidationError, match="unique"):
        LearnConfig(targets=[LearnTarget(name="x", attribute="is_red"), LearnTarget(name="x", attribute="is_red")])
    with pytest.raises(ValueError, match="no attributes"):
        ClassifierTarget(torch.nn.Identity(), "is_purple")


def test_the_clip_loss_is_minus_log_of_half_one_plus_the_directional_cosine(tiny_clip_dir):
    """The loss against -log((1 + cos) / 2) with the cosines computed by CLIPModel and numpy alone."""
    embedder = ClipEmbedder(str(tiny_clip_dir))
    loss = ClipDirectional(embedder, "a face", "a smiling face", target_weight=1.0, l1_weight=0.0)
    rng = np.random.default_rng(1)
    original = torch.from_numpy(rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32))
    edited = (original + 0.3 * torch.from_numpy(rng.normal(size=original.shape).astype(np.float32))).clamp(-1, 1)
    value, parts = loss(edited, original)
    cos = _hand_cosines(*_hand_clip(tiny_clip_dir, ["a face", "a smiling face"], original.numpy(), edited.numpy()))
    assert float(value) == pytest.approx(float(-np.log((1 + cos) / 2).mean()), rel=1e-5)
    assert float(parts["cos"]) == pytest.approx(float(cos.mean()), abs=1e-5)
    weighted = ClipDirectional(embedder, "a face", "a smiling face", target_weight=2.0, l1_weight=0.5)(edited, original)[0]
    l1 = float(np.abs(edited.numpy().astype(np.float64) - original.numpy()).mean())
    assert float(weighted) == pytest.approx(2.0 * float(-np.log((1 + cos) / 2).mean()) + 0.5 * l1, rel=1e-5)


def test_the_timestep_embedding_is_diffusers_cos_first_sinusoid():
    """The embedding the delta block docstring names: diffusers' get_timestep_embedding(flip_sin_to_cos, no shift)."""
    from diffusers.models.embeddings import get_timestep_embedding

    from hmine.learning.delta_block import timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    expected = get_timestep_embedding(t, 16, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 16), expected, rtol=1e-6, atol=1e-6)


def _clamped_and_free(scores, attribute):
    """Indices of images whose score the old clamp to [1e-6, 1 - 1e-6] saturated (near 0, near 1), and of moderate scores.

    Moderate: in [1e-3, 1 - 1e-3], where a float32 score keeps enough digits for a -log(1 - s) reference.
    """
    s = scores[attribute].detach().double()
    low, high = torch.nonzero(s < 1e-6).flatten(), torch.nonzero(s > 1 - 1e-6).flatten()
    free = torch.nonzero((s > 1e-3) & (s < 1 - 1e-3)).flatten()
    return low, high, free


@pytest.mark.parametrize("attribute", ["is_red", "is_circle", "is_large", "is_light_bg"])
def test_the_classifier_target_gives_gradient_to_saturated_scores_and_equals_bce_elsewhere(attribute):
    """A score the old probability clamp saturated still gets gradient (BCE on logits); elsewhere the value is -log s."""
    from hmine.labelling import WorldLabeller

    classifier = WorldLabeller().model
    drawn = torch.from_numpy(world.generate(64, seed=5).images)
    blend = torch.linspace(0, 1, 32)[:, None, None, None]  # blends of two images: scores between the sure ones
    images = torch.cat([drawn, blend * drawn[:32] + (1 - blend) * drawn[32:]])
    with torch.no_grad():
        scores = world_attribute_scores(classifier, images)
    low, high, free = _clamped_and_free(scores, attribute)
    assert len(low) + len(high) > 0 and len(free) > 0  # both cases occur on these images
    for rows, toward in ((low, "positive"), (high, "negative")):
        if not len(rows):
            continue
        edited = images[rows].clone().requires_grad_(True)
        loss, _ = ClassifierTarget(classifier, attribute, toward=toward, l1_weight=0.0)(edited, images[rows])
        loss.backward()
        per_image = edited.grad.abs().flatten(1).amax(1)
        assert bool((per_image > 0).all()), (toward, per_image)
    for toward in ("positive", "negative"):
        value, parts = ClassifierTarget(classifier, attribute, toward=toward, l1_weight=0.0)(images[free], images[free])
        s = scores[attribute][free].double()
        reference = -(s.log() if toward == "positive" else (1 - s).log()).mean()
        assert float(parts["target"]) == pytest.approx(float(reference), rel=1e-4, abs=1e-6)
        assert float(value) == pytest.approx(float(reference), rel=1e-4, abs=1e-6)


def _tiny_kl_model(shift_factor):
    from diffusers import AutoencoderKL

    from hmine.models import DiffusionModel

    torch.manual_seed(3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=0.3, shift_factor=shift_factor)  # fmt: skip
    return DiffusionModel(unet=None, scheduler=None, vqvae=None, model_id="tiny-kl", revision="local", vae=vae), vae


@pytest.mark.parametrize("shift_factor", [None, 0.25])
def test_the_training_decode_is_the_models_decode_with_gradients_for_a_vae(shift_factor):
    """Stable Diffusion's AutoencoderKL (model.vae), its scaling and shift factors: the images the sampler would save."""
    from hmine.learning.train import decoded

    model, vae = _tiny_kl_model(shift_factor)
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    images = decoded(model, x0)
    with torch.no_grad():  # by hand: diffusers' StableDiffusionPipeline's latents / scaling_factor (+ shift_factor)
        hand = vae.decode(x0 / 0.3 + (shift_factor or 0.0)).sample.clamp(-1, 1)
    torch.testing.assert_close(images.detach(), hand)
    torch.testing.assert_close(images.detach(), model.decode(x0.detach()))
    images.sum().backward()
    assert x0.grad is not None and x0.grad.abs().max() > 0


def test_the_training_decode_is_the_models_decode_with_gradients_for_a_scaled_vq_model(tiny_scaled_latent_model_dir):
    from hmine.learning.train import decoded

    model = load_model(str(tiny_scaled_latent_model_dir))
    x0 = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    images = decoded(model, x0)
    torch.testing.assert_close(images.detach(), model.decode(x0.detach()))
    images.sum().backward()
    assert x0.grad is not None and x0.grad.abs().max() > 0


class _NoiseWithResidual:
    """The seeds' own x_T and noise, and a residual added after the last step (as an edit-friendly inversion has)."""

    def __init__(self, sampler):
        from hmine.regeneration import SeedNoise

        self.seed_noise = SeedNoise(sampler)
        self.shape = sampler.model.sample_shape

    def __call__(self, keys):
        return self.seed_noise(keys)

    def residual(self, keys):
        return torch.stack([torch.full(self.shape, 0.01 * (k + 1)) for k in keys])


def test_regenerate_learned_adds_the_noise_sources_residual_as_regenerate_does(tiny_sampler):
    edit_steps = edit_steps_from(tiny_sampler.timesteps.tolist(), 300, None)
    editor = DeltaH(h_shape(tiny_sampler.model.unet), edit_steps)
    with torch.no_grad():
        editor.delta.normal_(generator=torch.Generator().manual_seed(2))
    source = _NoiseWithResidual(tiny_sampler)
    seeds, coefficients = [0, 1, 2], [1.0, -1.0, 0.0]
    learned = images_of(regenerate_learned(tiny_sampler, seeds, editor, coefficients, edit_steps=edit_steps, batch_size=4,
                                           noise_source=source), 3)  # fmt: skip
    deltas = torch.stack([c * editor.full() for c in coefficients])
    plain = images_of(regenerate(tiny_sampler, seeds, deltas, [0, 1, 2], edit_steps=edit_steps, asymmetric=True, batch_size=4,
                                 noise_source=source), 3)  # fmt: skip
    np.testing.assert_array_equal(learned, plain)


def test_block_mean_delta_streams_h_by_step_and_sample_batch():
    """A lazy (dask) h gives the in-memory result; only one step of one sample batch is read at a time."""
    import dask.array as da
    import xarray as xr

    from hmine.learning.store import block_mean_delta

    torch.manual_seed(0)
    block = DeltaBlock(8, 4)
    torch.nn.init.normal_(block.conv_out.weight)
    editor = BlockEditor(block, [True, False, True])
    h = np.random.default_rng(0).normal(size=(7, 3, 8, 2, 2)).astype(np.float32)
    timesteps = [900, 500, 100]
    with torch.no_grad():
        expected = np.stack([editor(torch.from_numpy(h[:, i]), i, t).double().mean(0).numpy() for i, t in enumerate(timesteps)])
    read = []

    def recorded(block_values, block_info=None):
        read.append(block_info[0]["array-location"][:2])
        return block_values

    lazy = da.from_array(h, chunks=(1, 1, 8, 2, 2)).map_blocks(recorded, dtype=h.dtype)
    streamed = block_mean_delta(editor, xr.DataArray(lazy, dims=("sample", "step", "channel", "y", "x")), timesteps, batch_size=3)
    np.testing.assert_allclose(streamed, expected, rtol=1e-6, atol=1e-7)
    assert not streamed[1].any()  # zero off the window, and that step's h is never read
    assert {steps for _, steps in read} == {(0, 1), (2, 3)}  # one step at a time, the edited ones only
    assert sorted(samples for samples, _ in read) == sorted([(k, k + 1) for k in range(7)] * 2)  # each sample once per step
