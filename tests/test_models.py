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


def test_pickle_weights_beside_an_unrelated_safetensors_are_refused_unread(tmp_path, tiny_pixel_model_dir, monkeypatch):
    """Only diffusion_pytorch_model.safetensors (or its shard index) counts: a pickle is never opened."""
    import pickle
    import shutil

    import torch
    from safetensors.torch import save_file

    from hmine.models import check_model_source

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "scheduler_config.json"):
        shutil.copy(tiny_pixel_model_dir / name, folder / name)
    torch.save(load_model(str(tiny_pixel_model_dir)).unet.state_dict(), folder / "diffusion_pytorch_model.bin")
    save_file({"unrelated": torch.zeros(2)}, str(folder / "other.safetensors"))

    unpickled = []

    def refuse(*args, **kwargs):
        unpickled.append(args[:1])
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    expected = rf"model.id .*{folder.name}.* has no diffusion_pytorch_model.safetensors.*save_pretrained\(safe_serialization=True\)"
    with pytest.raises(FileNotFoundError, match=expected) as refused:
        check_model_source(str(folder))
    assert "\n" not in str(refused.value) and "diffusion_pytorch_model.bin" in str(refused.value)
    with pytest.raises(FileNotFoundError, match=expected):
        load_model(str(folder))
    assert unpickled == []


def test_sharded_safetensors_load_and_a_pickle_shard_is_refused(tmp_path, tiny_latent_model_dir, monkeypatch):
    """diffusers prefers the shard index; every shard it names must be a readable safetensors file."""
    import shutil

    import torch
    from diffusers import VQModel

    from hmine.models import WEIGHTS_INDEX_NAME, check_model_source

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_latent_model_dir, folder)
    vqvae = VQModel.from_pretrained(tiny_latent_model_dir / "vqvae")
    shutil.rmtree(folder / "vqvae")
    vqvae.save_pretrained(folder / "vqvae", max_shard_size="20KB")
    index = folder / "vqvae" / WEIGHTS_INDEX_NAME
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1 and not (folder / "vqvae" / "diffusion_pytorch_model.safetensors").exists()
    assert check_model_source(str(folder))["sample_size"] == 8
    model = load_model(str(folder))
    for name, value in vqvae.state_dict().items():
        torch.testing.assert_close(model.vqvae.state_dict()[name], value)

    # an index that names a pickle shard would send diffusers to torch.load: refused first
    shard = sorted(shards)[0]
    torch.save({}, folder / "vqvae" / "shard.bin")
    index.write_text(index.read_text().replace(shard, "shard.bin"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    for check in (check_model_source, load_model):
        with pytest.raises(ValueError, match=r"model.id .*vqvae.*index.json must name safetensors shards.*shard\.bin"):
            check(str(folder))


def test_hub_ids_load_safetensors_only(monkeypatch, tiny_latent_model_dir):
    """The hub path passes use_safetensors=True (and the revision) to every model part."""
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    import hmine.models as models

    calls = []

    def recorder(model_class):
        real = model_class.from_pretrained.__func__

        def from_pretrained(cls, source, subfolder=None, **kwargs):
            calls.append((model_class.__name__, source, subfolder, kwargs.get("use_safetensors"), kwargs.get("revision")))
            return real(cls, tiny_latent_model_dir, subfolder=subfolder, low_cpu_mem_usage=False)

        return classmethod(from_pretrained)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", recorder(UNet2DModel))
    monkeypatch.setattr(VQModel, "from_pretrained", recorder(VQModel))
    real_config = DDIMScheduler.load_config.__func__
    monkeypatch.setattr(DDIMScheduler, "load_config",
                        classmethod(lambda cls, source, subfolder=None, **k: real_config(cls, tiny_latent_model_dir, subfolder=subfolder)))
    monkeypatch.setattr(models, "_unet_config", lambda source, subfolder, hub: UNet2DModel.load_config(tiny_latent_model_dir, subfolder=subfolder))
    monkeypatch.setattr(models, "_hub_layout", lambda model_id, revision: "folders")
    monkeypatch.setattr(models, "_hub_has", lambda model_id, filename, revision: filename.startswith("vqvae/"))

    model = load_model("owner/ldm", revision="v1")
    assert model.kind == "latent" and model.revision == "v1"
    assert calls == [("UNet2DModel", "owner/ldm", "unet", True, "v1"), ("VQModel", "owner/ldm", "vqvae", True, "v1")]
