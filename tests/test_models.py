import json

import pytest

from hmine.models import load_model
from hmine.sampling import Sampler


def test_load_pixel_model_from_a_local_folder(tiny_pixel_model_dir):
    model = load_model(str(tiny_pixel_model_dir))
    assert model.kind == "pixel" and model.revision == "local"
    assert model.sample_shape == (3, 16, 16)
    assert not any(p.requires_grad for p in model.unet.parameters())
    out = Sampler(model, num_inference_steps=2).sample([0, 1])
    assert out.images.shape == (2, 3, 16, 16)


def test_load_latent_model_decodes_through_the_vqvae(tiny_latent_model_dir):
    model = load_model(str(tiny_latent_model_dir))
    assert model.kind == "latent"
    out = Sampler(model, num_inference_steps=2).sample([3])
    # 8x8 latents, one upsampling in the VQ decoder -> 16x16 images
    assert out.images.shape == (1, 3, 16, 16)
    assert out.h.shape[:2] == (1, 2)


def test_missing_model_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(str(tmp_path / "nope" / "x" / "y"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_corrupt_model_folder_is_a_clear_error(tmp_path, tiny_pixel_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    with pytest.raises(ValueError, match="corrupt"):
        load_model(str(broken))


def test_latent_images_match_diffusers_ldm_pipeline(tiny_scaled_latent_model_dir):
    """x0 is divided by the autoencoder's scaling_factor before decoding, as LDMPipeline does."""
    import numpy as np
    import torch
    from diffusers import LDMPipeline

    model = load_model(str(tiny_scaled_latent_model_dir))
    assert model.vqvae.config.scaling_factor == 0.5
    seed, steps = 7, 3
    ours = Sampler(model, num_inference_steps=steps).sample([seed], record_h=False).images

    pipe = LDMPipeline.from_pretrained(tiny_scaled_latent_model_dir)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        batch_size=1, generator=torch.Generator().manual_seed(seed), eta=0.0,
        num_inference_steps=steps, output_type="np",
    ).images  # (1, H, W, 3) in [0, 1]: (image / 2 + 0.5).clamp(0, 1)

    ours_01 = (ours.permute(0, 2, 3, 1).numpy() + 1) / 2
    assert ours_01.shape == reference.shape
    np.testing.assert_allclose(ours_01, reference, atol=1e-5)
