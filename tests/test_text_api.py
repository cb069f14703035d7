"""The embedded text-conditional model by id (embedded:shapes-text-ddpm) and text models in hmine.load_model."""

from __future__ import annotations

import numpy as np
import pytest

import hmine
from hmine.config import load_config

TEXT = {"template": "a {color} {shape}", "slots": {"color": ["red", "blue"], "shape": ["circle", "square"]},
        "guidance_scale": 4.0}


def test_load_model_samples_the_embedded_text_model_with_prompts_as_the_sampler():
    from hmine.models import load_model
    from hmine.prompts import TextConfig
    from hmine.sampling import Sampler

    model = hmine.load_model("embedded:shapes-text-ddpm", num_inference_steps=2, text=TEXT)
    q = model.sample([0, 3])
    assert list(q["prompt"].values) == ["a red circle", "a blue square"]
    assert q["x0"].shape == (2, 3, 32, 32) and q["h"].sizes["step"] == 2
    # the run's sampler (the sample stage's) gives the same images
    sampler = Sampler(load_model("embedded:shapes-text-ddpm"), num_inference_steps=2, text=TextConfig(**TEXT))
    np.testing.assert_allclose(q["x0"].values, sampler.sample([0, 3]).images.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"is text-conditional: give its prompts in sample\.text"):
        hmine.load_model("embedded:shapes-text-ddpm")
    with pytest.raises(ValueError, match="sample.text needs exactly one of prompts"):
        hmine.load_model("embedded:shapes-text-ddpm", text={"guidance_scale": 4.0})


def test_the_embedded_text_model_id_passes_the_preflight_and_has_its_weights_identity(tmp_path):
    from hmine.identity import model_identity, weights_fingerprint
    from hmine.models import embedded_model_path
    from hmine.preflight import check_run_inputs

    config = load_config(None, ["model.id=embedded:shapes-text-ddpm", f"output_root={tmp_path}",
                                f"sample.text={TEXT}".replace("'", '"')])
    check_run_inputs(config, ["sample"])
    folder = embedded_model_path("embedded:shapes-text-ddpm")
    assert folder.name == "shapes-text-ddpm" and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert model_identity("embedded:shapes-text-ddpm", None) == weights_fingerprint(folder) != ""
    assert model_identity("embedded:shapes-text-ddpm", None) != model_identity("embedded:shapes-ddpm", None)
    unprompted = load_config(None, ["model.id=embedded:shapes-text-ddpm", f"output_root={tmp_path}"])
    with pytest.raises(ValueError, match=r"^model\.id 'embedded:shapes-text-ddpm' is text-conditional"):
        check_run_inputs(unprompted, ["sample"])
