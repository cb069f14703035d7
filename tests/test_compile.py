"""model.compile: the sampler's U-Net blocks under torch.compile, hooks and edits as in eager mode.

The plumbing is checked with dynamo's ``aot_eager`` backend (it traces and runs the
graphs with eager kernels, so results equal eager ones bit for bit and a compile takes
seconds); inductor's numerics are measured by benchmarks/bench_compile.py
(docs/precision.md).
"""

from __future__ import annotations

import pytest
import torch

from hmine.config import load_config
from hmine.hooks import h_shape
from hmine.models import load_model
from hmine.sampling import Sampler

STEPS = 3


def _sampler(model_dir, compile_backend=None, position="after"):
    # a model of its own: compiling attaches dynamo state to the blocks
    model = load_model(str(model_dir))
    if compile_backend is None:
        return Sampler(model, num_inference_steps=STEPS, h_position=position)
    return Sampler(model, num_inference_steps=STEPS, h_position=position, compile=True, compile_backend=compile_backend)


def test_compiled_sampling_and_edits_run_compiled_graphs_and_match_eager(tiny_pixel_model_dir):
    from hmine.regeneration import regenerate

    graphs = []

    def backend(graph, example_inputs):  # eager, noting every graph dynamo hands over
        graphs.append(graph)
        return torch._dynamo.lookup_backend("eager")(graph, example_inputs)

    eager = _sampler(tiny_pixel_model_dir, position="middle")
    compiled = _sampler(tiny_pixel_model_dir, backend, position="middle")
    seeds = list(range(4))
    delta = torch.randn((STEPS, *h_shape(eager.model.unet, "middle")), generator=torch.Generator().manual_seed(0))

    plain, plain_eager = compiled.sample(seeds), eager.sample(seeds)
    assert graphs and min(compiled.compiled.graph_runs) == STEPS  # every block ran compiled at every step
    torch.testing.assert_close(plain.h, plain_eager.h, rtol=0, atol=1e-6)  # the hook recorded h under compile
    torch.testing.assert_close(plain.images, plain_eager.images, rtol=0, atol=1e-6)

    edited = compiled.sample(seeds, delta_h=delta).images
    torch.testing.assert_close(edited, eager.sample(seeds, delta_h=delta).images, rtol=0, atol=1e-6)
    assert (edited - plain.images).abs().max() > 0.1  # the delta reached the compiled up path
    # Asyrp's branched step: pre-hooks on the compiled up blocks double their inputs
    rows = [regenerate(s, seeds, delta[None], [0] * 4, edit_steps=[True] * STEPS, asymmetric=True, batch_size=4)
            for s in (compiled, eager)]
    (_, images), (_, images_eager) = (next(r) for r in rows)
    torch.testing.assert_close(torch.from_numpy(images), torch.from_numpy(images_eager), rtol=0, atol=1e-6)

    # the U-Net itself is untouched: a call outside the sampler runs no compiled graph
    runs = list(compiled.compiled.graph_runs)
    with torch.inference_mode():
        compiled.model.unet(plain.images, torch.tensor([10]))
    assert compiled.compiled.graph_runs == runs


def test_a_block_that_falls_back_to_eager_is_an_error(tiny_pixel_model_dir):
    sampler = _sampler(tiny_pixel_model_dir, "eager")
    # with room for one compiled entry per block, another batch size is past dynamo's
    # recompile limit: every block would run eagerly
    sampler.compiled.recompile_limit = 1
    sampler.sample([0])
    with pytest.raises(RuntimeError, match=r"^model.compile: down_blocks.0, .*up_blocks.1 ran eagerly .*set model.compile: false$"):
        sampler.sample([0, 1])


def test_compile_is_off_by_default_in_no_hash_and_only_where_asked(tiny_pixel_model_dir, tmp_path):
    from hmine.config import ConfigError
    from hmine.stages.sample import make_sampler

    default = load_config("configs/demo.yaml")
    on = load_config("configs/demo.yaml", ["model.compile=true"])
    assert default.model.compile is False and on.model.compile is True
    stages = ("sample", "label", "directions", "jacobian", "edit", "learn", "invert", "benchmark")
    assert [on.stage_hash(s) for s in stages] == [default.stage_hash(s) for s in stages]
    with pytest.raises(ConfigError, match=r"^defaults: field 'model.compile': .*\(got 'fast'\)$"):
        load_config(None, ["model.compile=fast"])

    config = load_config(None, [f"model.id={tiny_pixel_model_dir}", "model.compile=true", f"output_root={tmp_path}"])
    assert make_sampler(config, compiled=True).compiled is not None  # sample, edit, benchmark stages
    assert make_sampler(config).compiled is None  # Jacobian and learn stages: torch.func / autograd, eager


def test_resuming_a_store_with_the_other_compile_setting_is_refused(tiny_pixel_model_dir, tmp_path, caplog):
    from hmine.stages.sample import prepare_sample_stage, run_sample_stage, sample_batches
    from hmine.stores import StoreConfigMismatch, open_group

    settings = [f"model.id={tiny_pixel_model_dir}", f"output_root={tmp_path}", "name=c", "sample.n_samples=4",
                "sample.batch_size=2", "sample.num_inference_steps=2"]
    eager = load_config(None, settings)
    prepare_sample_stage(eager)
    sample_batches(eager, [0])
    assert open_group(eager.run_dir / "samples.zarr").attrs["hmine:compiled"] is False
    with pytest.raises(StoreConfigMismatch, match=r"begun with model.compile: false: .*resume it with model.compile: false"):
        run_sample_stage(load_config(None, [*settings, "model.compile=true"]), show_progress=False)
    assert open_group(eager.run_dir / "samples.zarr")["done"][...].tolist() == [True, True, False, False]
    assert run_sample_stage(eager, show_progress=False).computed == 1  # set back: it resumes
    # complete: kept as computed (the setting is in no hash), and the log says how it was computed
    with caplog.at_level("INFO", logger="hmine.stages.sample"):
        assert run_sample_stage(load_config(None, [*settings, "model.compile=true"]), show_progress=False).computed == 0
    assert "is complete, nothing to do (computed with model.compile: false, kept: compiling" in caplog.text


def test_a_text_conditional_model_compiles_with_its_guidance_and_edit_branches(tiny_sd_dir):
    from hmine.prompts import TextConfig

    text = TextConfig(prompts=["a red circle", "a blue square"], guidance_scale=6.0, edit_branches="conditional")
    samplers = [
        Sampler(load_model(str(tiny_sd_dir)), num_inference_steps=STEPS, torch_threads=1, text=text, **compile)
        for compile in ({}, {"compile": True, "compile_backend": "eager"})
    ]
    delta = torch.randn((STEPS, *h_shape(samplers[0].model.unet)), generator=torch.Generator().manual_seed(0))
    eager, compiled = (s.sample([5, 6], delta_h=delta) for s in samplers)
    assert min(samplers[1].compiled.graph_runs) == STEPS  # cross-attention blocks included
    torch.testing.assert_close(compiled.h, eager.h, rtol=0, atol=1e-6)
    torch.testing.assert_close(compiled.images, eager.images, rtol=0, atol=1e-6)
