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
