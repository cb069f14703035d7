"""Text-conditional sampling (issue 18, item 1) against diffusers' StableDiffusionPipeline.

A tiny random model in the Stable Diffusion folder layout (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json), saved by ``StableDiffusionPipeline`` (``tiny_sd.py``,
the session's ``tiny_sd_dir`` of conftest.py) and loaded back by path: hmine's sampler must give the pipeline's images for the same
seeds, prompts, negative prompt and guidance scale.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tiny_sd import PROMPTS

from hmine.prompts import TextConfig

STEPS = 4


@pytest.fixture(scope="module")
def reference_pipe(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_images(pipe, seeds, prompts, *, guidance_scale, negative_prompt=None, eta=0.0):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    with torch.no_grad():
        out = pipe(
            prompt=list(prompts), negative_prompt=negative, guidance_scale=guidance_scale,
            num_inference_steps=STEPS, eta=eta, generator=generators, output_type="pt",
        )
    return out.images * 2 - 1  # the pipeline's [0, 1] back to hmine's [-1, 1]


def test_the_sd_layout_loads_with_its_text_parts_and_vae(tiny_sd):
    assert type(tiny_sd.unet).__name__ == "UNet2DConditionModel"
    assert tiny_sd.text_conditional and tiny_sd.kind == "latent"
    assert type(tiny_sd.vae).__name__ == "AutoencoderKL" and tiny_sd.vqvae is None
    assert tiny_sd.sample_shape == (4, 8, 8) and tiny_sd.image_shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("guidance_scale", "negative_prompt", "eta"),
    [(7.5, None, 0.0), (4.0, "a blue circle", 0.0), (1.0, None, 0.0), (3.0, None, 1.0)],
)
def test_sampler_at_delta_zero_equals_stable_diffusion_pipeline(tiny_sd, reference_pipe, guidance_scale, negative_prompt, eta):
    from hmine.sampling import Sampler

    seeds = [11, 12, 13]
    text = TextConfig(prompts=PROMPTS, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, eta=eta, torch_threads=1, text=text)
    ours = sampler.sample(seeds)
    prompts = [text.prompt_for(s) for s in seeds]
    assert ours.prompts == prompts
    theirs = _pipeline_images(reference_pipe, seeds, prompts, guidance_scale=guidance_scale,
                              negative_prompt=negative_prompt, eta=eta)
    difference = (ours.images.clamp(-1, 1) - theirs).abs().max().item()
    assert difference <= 1e-4, difference
    assert ours.images.std() > 0.01  # not a degenerate image on which anything agrees
    if guidance_scale > 1:  # and the comparison tells guidance scales apart
        other = _pipeline_images(reference_pipe, seeds, prompts, guidance_scale=guidance_scale + 0.5,
                                 negative_prompt=negative_prompt, eta=eta)
        assert (ours.images.clamp(-1, 1) - other).abs().max().item() > 1e-3


def test_h_is_the_mid_block_output_of_the_configured_branch(tiny_sd, reference_pipe):
    from hmine.hooks import HSpaceHook
    from hmine.sampling import Sampler

    seeds, prompts = [3, 4], PROMPTS[:2]
    with HSpaceHook(reference_pipe.unet, "after") as hook:
        _pipeline_images(reference_pipe, seeds, prompts, guidance_scale=5.0)
    pipe_h = torch.stack(hook.recorded, dim=1)  # (2 * batch, step, ...): unconditional rows first
    for branch, rows in (("conditional", slice(2, 4)), ("unconditional", slice(0, 2))):
        text = TextConfig(prompts=prompts, guidance_scale=5.0, h_branch=branch)
        out = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=text).sample(seeds, prompts=prompts)
        assert out.h.shape == (2, STEPS, 16, 4, 4)
        assert (out.h - pipe_h[rows]).abs().max().item() <= 1e-5


def test_a_template_with_slots_cycles_through_every_combination():
    text = TextConfig(template="a {size} {color} circle", slots={"size": ["small", "large"], "color": ["red", "green", "blue"]})
    assert text.n_prompts == 6
    assert [text.prompt_for(s) for s in range(7)] == [
        "a small red circle", "a small green circle", "a small blue circle",
        "a large red circle", "a large green circle", "a large blue circle", "a small red circle",
    ]
    assert text.all_prompts() == [text.prompt_for(s) for s in range(6)]
    assert text.slot_values_for(4) == {"size": "large", "color": "green"}


def test_regeneration_from_the_seed_is_exact_and_edits_go_in_the_named_branches(tiny_sd):
    from hmine.sampling import Sampler

    seeds = [5, 6]

    def run(edit_branches, delta):
        text = TextConfig(prompts=PROMPTS, guidance_scale=6.0, edit_branches=edit_branches)
        return Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=text).sample(seeds, delta_h=delta)

    original = run("both", None)
    zero = torch.zeros((STEPS, 16, 4, 4))
    assert torch.equal(run("both", None).images, original.images)
    assert torch.equal(run("both", zero).images, original.images)
    delta = torch.randn((STEPS, 16, 4, 4), generator=torch.Generator().manual_seed(0))
    edited = {branches: run(branches, delta).images for branches in ("both", "conditional", "unconditional")}
    for images in edited.values():
        assert (images - original.images).abs().max() > 1e-3
    assert (edited["conditional"] - edited["unconditional"]).abs().max() > 1e-3
    # the delta in both branches is the sum of the two single-branch edits, to first order;
    # it is exactly the guided output of the both-branch h: check the first step's eps directly
    text = TextConfig(prompts=PROMPTS, guidance_scale=6.0, edit_branches="conditional")
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=text)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    t = sampler.timesteps[0].expand(2)
    from hmine.hooks import HSpaceHook

    with sampler.conditioned_on(seeds), HSpaceHook(tiny_sd.unet, "after", record=False) as hook, torch.no_grad():
        hook.delta = sampler.h_delta(delta[0], 2)
        guided = sampler.unet_output(x, t)
        cond_states = sampler.text.context(sampler.prompts_for(seeds))
        hook.delta = delta[0]
        cond = tiny_sd.unet(x, t, encoder_hidden_states=cond_states[2:]).sample
        hook.delta = None
        uncond = tiny_sd.unet(x, t, encoder_hidden_states=cond_states[:2]).sample
    assert (guided - (uncond + 6.0 * (cond - uncond))).abs().max().item() <= 1e-5


def test_sample_stage_stores_the_prompt_per_sample(tiny_sd_dir, tmp_path):
    import xarray as xr

    from hmine.config import load_config
    from hmine.models import load_model
    from hmine.sampling import Sampler
    from hmine.stages.sample import run_sample_stage

    overrides = [
        f"model.id={tiny_sd_dir}", f"output_root={tmp_path}", "name=text",
        "sample.n_samples=5", "sample.batch_size=2", f"sample.num_inference_steps={STEPS}",
        "sample.h_dtype=float32", "sample.torch_threads=1",
        f"sample.text={json.dumps({'prompts': PROMPTS, 'guidance_scale': 5.0, 'negative_prompt': 'a blue circle'})}",
    ]
    config = load_config(None, overrides)
    result = run_sample_stage(config, show_progress=False)
    ds = xr.open_zarr(result.path, consolidated=False)
    assert list(ds["prompt"].values) == [PROMPTS[s % 3] for s in range(5)]
    assert list(ds["h"].coords["prompt"].values) == list(ds["prompt"].values)
    assert ds.attrs["hmine:guidance_scale"] == 5.0 and ds.attrs["hmine:negative_prompt"] == "a blue circle"
    assert ds["x0"].shape == (5, 3, 16, 16) and ds["h"].shape == (5, STEPS, 16, 4, 4)
    out = Sampler(load_model(str(tiny_sd_dir)), num_inference_steps=STEPS, torch_threads=1,
                  text=config.sample.text).sample([2, 3])
    np.testing.assert_array_equal(ds["x0"].sel(sample=[2, 3]).values, out.images.numpy())
    np.testing.assert_array_equal(ds["h"].sel(sample=[2, 3]).values, out.h.numpy())
    # the text settings join the sample hash; edit_branches only the edit stage's
    other = load_config(None, overrides[:-1] + [f"sample.text={json.dumps({'prompts': PROMPTS, 'guidance_scale': 5.0, 'negative_prompt': 'a blue circle', 'edit_branches': 'conditional'})}"])
    assert other.stage_hash("sample") == config.stage_hash("sample")
    assert other.stage_hash("edit") != config.stage_hash("edit")


def test_a_grown_text_run_gets_the_prompts_of_its_new_seeds(tiny_sd_dir, tmp_path):
    import xarray as xr

    from hmine.config import load_config
    from hmine.stages.sample import run_sample_stage

    def config(n):
        return load_config(None, [
            f"model.id={tiny_sd_dir}", f"output_root={tmp_path}", "name=grow", f"sample.n_samples={n}",
            "sample.batch_size=2", "sample.num_inference_steps=2", "sample.torch_threads=1",
            f"sample.text={json.dumps({'prompts': PROMPTS, 'guidance_scale': 3.0})}",
        ])

    run_sample_stage(config(3), show_progress=False)
    result = run_sample_stage(config(5), show_progress=False)
    ds = xr.open_zarr(result.path, consolidated=False)
    assert list(ds["prompt"].values) == [PROMPTS[s % 3] for s in range(5)] and bool(ds["done"].all())


def test_unconditional_runs_keep_their_sample_hash():
    from hmine.config import load_config
    from hmine.stages.builtin import sample_settings

    assert "text" not in sample_settings(load_config(None, []))["sample"]


# -- bad input: one line naming the field ----------------------------------------------------


def test_a_prompt_over_the_tokenizer_limit_is_refused_naming_the_field(tiny_sd, tiny_sd_dir, tmp_path):
    from hmine.config import load_config
    from hmine.sampling import Sampler
    from hmine.stages.builtin import check_text

    long_prompt = " ".join(["red"] * 30)  # 30 word tokens + start and end, over the limit of 24
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, text=TextConfig(prompts=[long_prompt]))
    with pytest.raises(ValueError, match=r"^sample\.text\.prompts: the prompt .* is 32 tokens, over the tokenizer's limit of 24") as error:
        sampler.sample([0])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^sample\.text\.negative_prompt: .* over the tokenizer's limit"):
        Sampler(tiny_sd, text=TextConfig(prompts=["a red circle"], negative_prompt=long_prompt, guidance_scale=3))
    config = load_config(None, [f"model.id={tiny_sd_dir}", f"output_root={tmp_path}",
                                f"sample.text={json.dumps({'template': '{x} circle', 'slots': {'x': ['red', long_prompt]}})}"])
    with pytest.raises(ValueError, match=r"^sample\.text\.template: the prompt"):
        check_text(config)  # preflight: the tokenizer only, before anything is written


def test_a_missing_tokenizer_folder_is_one_line_naming_model_id(tiny_sd_dir, tmp_path):
    from hmine.models import check_model_source, load_model

    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    for call in (check_model_source, load_model):
        with pytest.raises(FileNotFoundError, match=r"^model\.id '.*no-tokenizer': .* has no tokenizer/ folder") as error:
            call(str(broken))
        assert "\n" not in str(error.value)


def test_a_negative_prompt_without_guidance_is_refused_naming_the_field(tmp_path):
    from hmine.config import ConfigError, load_config

    for scale in (0.5, 1.0):
        text = json.dumps({"prompts": ["a red circle"], "negative_prompt": "blue", "guidance_scale": scale})
        with pytest.raises(ConfigError, match=r"sample\.text\.negative_prompt needs sample\.text\.guidance_scale > 1") as error:
            load_config(None, [f"sample.text={text}"])
        assert "\n" not in str(error.value)


def test_text_and_model_must_agree(tiny_sd, tiny_pixel_model_dir):
    from hmine.models import load_model
    from hmine.sampling import Sampler

    with pytest.raises(ValueError, match=r"is text-conditional: give its prompts in sample\.text"):
        Sampler(tiny_sd)
    with pytest.raises(ValueError, match=r"sample\.text is set but model\.id .* is not text-conditional"):
        Sampler(load_model(str(tiny_pixel_model_dir)), text=TextConfig(prompts=["a red circle"]))


def test_hub_ids_of_the_sd_layout_load_every_part_through_from_pretrained(monkeypatch, tiny_sd_dir):
    """A hub id (stable-diffusion-v1-5/stable-diffusion-v1-5 for a user with a network) loads
    each part with from_pretrained, its subfolder, the revision and safetensors only."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    import hmine.models as models
    import hmine.text_models as text_models
    from hmine.models import load_model

    calls = []

    def recorder(model_class):
        real = model_class.from_pretrained.__func__

        def from_pretrained(cls, source, subfolder=None, **kwargs):
            calls.append((model_class.__name__, source, subfolder, kwargs.get("use_safetensors"), kwargs.get("revision")))
            extra = {"low_cpu_mem_usage": False} if model_class.__module__.startswith("diffusers") else {}
            return real(cls, tiny_sd_dir, subfolder=subfolder, **extra)

        return classmethod(from_pretrained)

    for model_class in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer):
        monkeypatch.setattr(model_class, "from_pretrained", recorder(model_class))
    real_config = DDIMScheduler.load_config.__func__
    monkeypatch.setattr(DDIMScheduler, "load_config",
                        classmethod(lambda cls, source, subfolder=None, **k: real_config(cls, tiny_sd_dir, subfolder=subfolder)))
    monkeypatch.setattr(models, "_unet_config", lambda source, subfolder, hub: json.loads((tiny_sd_dir / "unet" / "config.json").read_text()))
    monkeypatch.setattr(models, "_hub_layout", lambda model_id, revision: "folders")
    monkeypatch.setattr(models, "_hub_has", lambda model_id, filename, revision: filename.startswith("vae/"))
    monkeypatch.setattr(text_models, "_hub_index", lambda model_id, revision: json.loads((tiny_sd_dir / "model_index.json").read_text()))

    model = load_model("owner/sd", revision="v1")
    assert model.text_conditional and model.kind == "latent" and model.revision == "v1"
    hub = "owner/sd"
    assert calls == [
        ("UNet2DConditionModel", hub, "unet", True, "v1"), ("AutoencoderKL", hub, "vae", True, "v1"),
        ("CLIPTokenizer", hub, "tokenizer", None, "v1"), ("CLIPTextModel", hub, "text_encoder", True, "v1"),
    ]


@pytest.mark.parametrize(("asymmetric", "edit_branches"), [(False, "both"), (True, "both"), (True, "conditional")])
def test_the_edit_engine_regenerates_text_samples_as_the_sampler(tiny_sd, asymmetric, edit_branches):
    """hmine.regeneration (the edit stage's engine) conditions each row on its seed's prompt and
    adds the delta in the configured branches: its images equal the sampler's with that delta."""
    from hmine.regeneration import regenerate
    from hmine.sampling import Sampler

    text = TextConfig(prompts=PROMPTS, guidance_scale=4.0, edit_branches=edit_branches)
    sampler = Sampler(tiny_sd, num_inference_steps=STEPS, torch_threads=1, text=text)
    seeds = [7, 8, 9]
    deltas = torch.randn((2, STEPS, 16, 4, 4), generator=torch.Generator().manual_seed(3))
    delta_index = [0, 1, 1]
    edit_steps = [False, True, True, True]
    images = np.zeros((3, 3, 16, 16), dtype=np.float32)
    for rows, row_images in regenerate(sampler, seeds, deltas, delta_index, edit_steps=edit_steps,
                                       asymmetric=asymmetric, batch_size=4):
        images[rows] = row_images
    expected = sampler.sample(seeds, delta_h=deltas[delta_index], edit_steps=edit_steps, asymmetric=asymmetric).images
    assert np.abs(images - expected.numpy()).max() <= 1e-5
    assert np.abs(images - sampler.sample(seeds).images.numpy()).max() > 1e-3


def test_the_run_preflight_refuses_text_settings_that_do_not_fit_the_model(tiny_sd_dir, tiny_pixel_model_dir, tmp_path):
    """Before anything is written (hmine.preflight, as `hmine run` calls it): a text model without
    sample.text, sample.text for a model without text, an over-long negative prompt."""
    from hmine.config import load_config
    from hmine.preflight import check_run_inputs

    def config(model, text=None):
        extra = [] if text is None else [f"sample.text={json.dumps(text)}"]
        return load_config(None, [f"model.id={model}", f"output_root={tmp_path}", *extra])

    cases = [
        (config(tiny_sd_dir), r"is text-conditional: give its prompts in sample\.text"),
        (config(tiny_pixel_model_dir, {"prompts": ["red"]}), r"sample\.text is set but model\.id .* is not text-conditional"),
        (config(tiny_sd_dir, {"prompts": ["red"], "negative_prompt": " ".join(["red"] * 30), "guidance_scale": 3}),
         r"^sample\.text\.negative_prompt: the prompt .* over the tokenizer's limit of 24"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            check_run_inputs(bad, ["sample"])
        assert "\n" not in str(error.value)
    check_run_inputs(config(tiny_sd_dir, {"prompts": PROMPTS}), ["sample"])
    assert not (tmp_path / "run").exists()
