"""The embedded text-conditional world model: captions, tokenizer, training resume, export layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hmine import world
from hmine.textworld import captions
from hmine.textworld import model as tw

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    steps=4,
    batch_size=4,
    warmup_steps=1,
    block_out_channels=(8, 16, 16),
    attention_heads=2,
    text_hidden_size=16,
    text_intermediate_size=32,
    text_layers=1,
    text_heads=2,
    checkpoint_every=1,
    sample_every=10**6,
    sample_steps=2,
    log_every=1,
    ema_snapshot_every=0,
)


def tiny_config(**changes):
    from hmine.textworld.train import TextTrainConfig

    return TextTrainConfig(**{**TINY, **changes})


def _words_of(text: str, factor: str) -> set[str]:
    return set(text.split()) & set(captions.WORDS[factor])


# -- captions ----------------------------------------------------------------------------


def test_compose_follows_the_template():
    assert captions.compose({}) == ""
    assert captions.compose({"color": "red"}) == "a red shape"
    assert captions.compose({"shape": "circle", "x": "left"}) == "a circle at the left"
    full = {"size": "large", "color": "red", "shape": "circle", "y": "top", "x": "left", "background": "dark"}
    assert captions.compose(full) == "a large red circle at the top left on a dark background"
    with pytest.raises(ValueError, match="not a word of color"):
        captions.compose({"color": "purple"})
    with pytest.raises(ValueError, match="unknown factors"):
        captions.compose({"texture": "smooth"})


def test_every_word_belongs_to_one_factor_only():
    seen: dict[str, str] = {}
    for factor, words in captions.WORDS.items():
        for word in words:
            assert word not in seen, f"{word} names both {seen[word]} and {factor}"
            assert word not in captions.FILLER_WORDS
            seen[word] = factor


def test_bins_are_the_thirds_of_each_range():
    lo, hi = captions.bin_edges("size")
    assert (lo, hi) == pytest.approx((world.SIZE_MIN + 5 / 3, world.SIZE_MIN + 10 / 3))
    assert captions.factor_bin("size", [5.0, lo - 1e-4, lo, hi - 1e-4, hi, 10.0]).tolist() == [0, 0, 1, 1, 2, 2]
    # the outer thirds lie past the world's binary thresholds, so "large" is is_large etc.
    assert captions.bin_edges("size")[1] > world.SIZE_LARGE_THRESHOLD > captions.bin_edges("size")[0]
    assert captions.bin_edges("x")[1] > world.CENTER > captions.bin_edges("x")[0]
    assert captions.bin_edges("background")[1] > world.BG_LIGHT_THRESHOLD > captions.bin_edges("background")[0]


def test_captions_name_a_seeded_random_subset_of_the_true_factors():
    factors = world.sample_factors(2000, seed=3)
    texts, named = captions.caption_batch(factors, seed=11)
    again, named_again = captions.caption_batch(factors, seed=11)
    other, _ = captions.caption_batch(factors, seed=12)
    assert texts == again and (named == named_again).all()
    assert texts != other
    words = captions.factor_words(factors)
    for i in range(200):
        for j, factor in enumerate(captions.FACTORS):
            expected = {captions.WORDS[factor][words[factor][i]]} if named[i, j] else set()
            assert _words_of(texts[i], factor) == expected, texts[i]
    # each factor named about half the time, 10 % dropped (plus the rare draws naming nothing)
    empty = np.array([t == "" for t in texts])
    assert abs(empty.mean() - (0.1 + 0.9 * 0.5**6)) < 0.025
    assert (named[empty] == False).all()  # noqa: E712
    share = named[~empty].mean(axis=0)
    assert np.all(np.abs(share - 0.5) < 0.05), share


def test_single_factor_prompts_cover_every_word():
    prompts = captions.single_factor_prompts()
    assert len(prompts) == sum(len(w) for w in captions.WORDS.values())
    assert ("color", "red", "a red shape") in prompts
    assert ("background", "dark", "a shape on a dark background") in prompts


# -- tokenizer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tw.build_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", 16)


def test_every_caption_word_is_one_token_and_prompts_pad_with_endoftext(tokenizer):
    for word in captions.vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]
    ids = tw.tokenize(tokenizer, ["a large red circle at the top left on a dark background", ""])
    assert ids.shape == (2, 16)
    assert ids[0, :14].tolist()[0] == tokenizer.bos_token_id and ids[0, 13] == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    assert ids[1].tolist() == [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 15
    # any other text still tokenizes (character by character), nothing is unknown
    other = tokenizer("zebra!", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in other and len(other) == 6


# -- training: resume, checkpoints, export ----------------------------------------------


def _checkpoint_tensors(work_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from hmine.world.training import latest_checkpoint

    folder = latest_checkpoint(work_dir)
    out = {}
    for name in ("model", "ema", "optimizer"):
        out.update({f"{name}/{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    return out


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    from hmine.textworld.train import train
    from hmine.world.training import latest_checkpoint

    config = tiny_config()
    train(config, tmp_path / "whole")
    train(config, tmp_path / "parts", until_step=2)
    assert json.loads((tmp_path / "parts" / "latest.json").read_text())["step"] == 2
    result = train(config, tmp_path / "parts")
    assert result.step == 4 and result.stopped_by is None
    _assert_same_tensors(_checkpoint_tensors(tmp_path / "whole"), _checkpoint_tensors(tmp_path / "parts"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # safetensors and JSON only: nothing to unpickle
    folder = latest_checkpoint(tmp_path / "parts")
    assert sorted(p.name for p in folder.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"
    ]  # fmt: skip
    assert len(list((tmp_path / "parts" / "checkpoints").glob("step-*"))) == config.keep_checkpoints
    # the optimizer state came back: both runs' Adam moments are non-zero and equal
    assert float(_checkpoint_tensors(tmp_path / "parts")["optimizer/state.0.exp_avg_sq"].abs().sum()) > 0


def test_a_half_written_checkpoint_is_ignored_on_resume(tmp_path):
    from hmine.textworld.train import train

    config = tiny_config(steps=3)
    train(config, tmp_path / "whole")
    train(config, tmp_path / "killed", until_step=2)
    # a kill while step 3's checkpoint was being written leaves its temporary folder
    junk = tmp_path / "killed" / "checkpoints" / ".step-000003.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\x00" * 10)
    train(config, tmp_path / "killed")
    _assert_same_tensors(_checkpoint_tensors(tmp_path / "whole"), _checkpoint_tensors(tmp_path / "killed"))


def test_sigterm_stops_the_cli_with_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    import yaml

    from hmine.textworld.train import train

    config = tiny_config(steps=400, checkpoint_every=1000)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
                                   | {"steps": 400, "checkpoint_every": 1000}))
    work = tmp_path / "cli"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hmine.textworld.train", str(path), "--work-dir", str(work)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    log = work / "log.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, output
    stopped = json.loads((work / "latest.json").read_text())["step"]
    assert 2 <= stopped < 400
    assert json.loads(log.read_text().splitlines()[-1]) == {"step": stopped, "stopped_by": "SIGTERM"}
    train(config, work, until_step=stopped + 1)
    train(config, tmp_path / "whole", until_step=stopped + 1)
    _assert_same_tensors(_checkpoint_tensors(tmp_path / "whole"), _checkpoint_tensors(work))


def test_a_work_dir_of_another_config_is_refused(tmp_path):
    from hmine.textworld.train import train

    train(tiny_config(steps=1), tmp_path)
    with pytest.raises(ValueError, match=r"another config \(differs in \['learning_rate'\]\)"):
        train(tiny_config(steps=1, learning_rate=1e-3), tmp_path)


def test_the_real_config_fits_the_package_budget():
    from hmine.textworld.train import Parts, load_config

    config = load_config(REPO / "configs" / "embedded-text-ddpm.yaml")
    parts = Parts(config, vocab_size=300)
    assert tw.count_parameters(parts) * 4 < 20e6  # float32 bytes, well under 25 MB with the card
    assert config.torch_threads == 1 and 0 < config.caption_drop_probability < 0.5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from hmine.textworld.train import train

    root = tmp_path_factory.mktemp("textworld")
    ema = train(tiny_config(steps=2), root / "work", root / "export").model
    return root / "export", ema


def test_export_is_a_stable_diffusion_layout_that_loads_back_with_safetensors(exported):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder, ema = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet"
    ]  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["vae"] == [None, None]
    weights = [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".safetensors")]
    assert sorted(p.suffix for p in weights) == [".safetensors", ".safetensors"]

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, low_cpu_mem_usage=False)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    ids = tw.tokenize(tokenizer, ["a red circle", ""])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        states = text_encoder(ids).last_hidden_state
        torch.testing.assert_close(states, ema.text_encoder(ids).last_hidden_state)
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=states).sample, ema(ids, x, t))


def test_export_loads_as_a_semantic_stable_diffusion_pipeline(exported):
    from diffusers import SemanticStableDiffusionPipeline

    folder, _ = exported
    # pixel space: the pipeline's VAE (and safety parts) are passed as None explicitly
    pipe = SemanticStableDiffusionPipeline.from_pretrained(
        folder, use_safetensors=True, vae=None, safety_checker=None, feature_extractor=None
    )
    assert pipe.vae is None and pipe.unet.config.sample_size == 32
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"


# -- devices --------------------------------------------------------------------------------
# The meta device stands for a GPU on machines without one: its tensors have shapes and a
# device but no data, so a step can be started there (and its inputs seen), not finished.


class _StopHere(Exception):
    pass


def _any_device(device, option="device"):
    return torch.device(device)  # resolve_device refuses meta, which is no compute device


def _tiny_yaml(path: Path, **changes) -> Path:
    path.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in {**TINY, **changes}.items()}))
    return path


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:.*to a meta parameter in the current model")  # loading into meta is a no-op
def test_training_resumes_a_cpu_checkpoint_onto_the_device_and_computes_its_batches_there(tmp_path, monkeypatch):
    from hmine.textworld import train as text_train
    from hmine.world import training

    config = tiny_config(steps=3)
    text_train.train(config, tmp_path, until_step=1, device="cpu")  # a checkpoint with Adam moments
    seen = {}
    real_forward = text_train.Parts.forward

    def forward(self, input_ids, x_t, t):
        seen["batch"] = {input_ids.device.type, x_t.device.type, t.device.type}
        return real_forward(self, input_ids, x_t, t)

    def step(run, step):
        seen["step"] = step
        seen["model"] = {p.device.type for p in run.trainee.model.parameters()}
        seen["ema"] = {p.device.type for p in run.ema.parameters()}
        state = run.trainee.optimizer.state.values()
        seen["moments"] = {v.device.type for entry in state for k, v in entry.items() if k != "step"}
        seen["loss"] = run.trainee.loss(step)[0].device.type
        raise _StopHere

    monkeypatch.setattr(text_train, "resolve_device", _any_device)
    monkeypatch.setattr(text_train.Parts, "forward", forward)
    monkeypatch.setattr(training._Run, "step", step)
    with pytest.raises(_StopHere):
        text_train.train(config, tmp_path, device="meta")
    assert seen == {"step": 1, "model": {"meta"}, "ema": {"meta"}, "moments": {"meta"}, "batch": {"meta"}, "loss": "meta"}


def test_the_evaluator_loads_samples_and_labels_on_the_requested_device(exported, monkeypatch):
    import hmine.labelling
    from hmine.textworld.evaluate import evaluate
    from hmine.textworld.sampling import load_folder
    from hmine.textworld.train import load_work_dir

    folder = exported[0]
    from_work_dir, _ = load_work_dir(folder.parent / "work", device="meta")
    assert {p.device.type for p in from_work_dir.unet.parameters()} == {"meta"}
    model = _load_script("evaluate_text_world").load(folder, None, torch.device("meta"))[0]
    parts = [*model.unet.parameters(), *model.text_encoder.parameters()]
    assert {p.device.type for p in parts} == {"meta"} and model.device.type == "meta"
    assert load_folder(folder).device.type == "cpu"
    seen = {}

    class Labeller:
        def __init__(self, path=None, *, batch_size=256, device="cpu"):
            seen["labeller"] = torch.device(device).type

    def forward(sample, timestep, encoder_hidden_states, **kwargs):
        seen["unet"] = {sample.device.type, encoder_hidden_states.device.type}
        raise _StopHere

    monkeypatch.setattr(hmine.labelling, "WorldLabeller", Labeller)
    monkeypatch.setattr(model.unet, "forward", forward)
    with pytest.raises(_StopHere):
        evaluate(model, 3, factors=("color",), steps=1)
    assert seen == {"labeller": "meta", "unet": {"meta"}}


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda", "--device cuda: CUDA is not available here"),
        ("gpu", "--device 'gpu' is not a torch device; use cpu, cuda, cuda:N or mps"),
        ("meta", "--device meta: not a device hmine computes on"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_in_one_line_naming_the_option(device, message, tmp_path, monkeypatch, capsys):
    from hmine.models import resolve_device
    from hmine.textworld.train import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    evaluator = _load_script("evaluate_text_world")
    config = _tiny_yaml(tmp_path / "tiny.yaml", steps=1)
    for run in (
        lambda: main([str(config), "--work-dir", str(tmp_path / "work"), "--device", device]),
        lambda: evaluator.main(["--model", str(REPO / "hmine" / "embedded" / "shapes-text-ddpm"), "--device", device]),
    ):
        assert run() == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("error: ") and message in error, error
    assert not (tmp_path / "work").exists()  # refused before anything is written
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")  # the default where a GPU is visible


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_resumes_on_the_cpu_and_its_export_samples_on_either(tmp_path):
    """Not run where there is no GPU; the tolerances allow for TF32 convolutions (unmeasured)."""
    from hmine.textworld.evaluate import evaluate
    from hmine.textworld.sampling import load_folder, sample
    from hmine.textworld.train import train

    config = tiny_config()
    on_gpu = train(config, tmp_path / "work", until_step=2, device="cuda")
    assert {p.device.type for p in on_gpu.model.parameters()} == {"cuda"}
    resumed = train(config, tmp_path / "work", tmp_path / "export", device="cpu")
    assert resumed.step == 4 and {p.device.type for p in resumed.model.parameters()} == {"cpu"}
    train(config, tmp_path / "cpu", until_step=1, device="cpu")
    first = [json.loads((tmp_path / w / "log.jsonl").read_text().splitlines()[0])["loss"] for w in ("work", "cpu")]
    assert abs(first[0] - first[1]) <= 1e-2 * first[1]  # same initial weights and batch, other kernels
    prompts = ["a red shape", "a circle", "a shape at the left"]
    images = [sample(load_folder(tmp_path / "export", device), prompts, steps=2, seed=3) for device in ("cuda", "cpu")]
    assert np.abs(images[0] - images[1]).max() < 0.05
    result = evaluate(load_folder(tmp_path / "export", "cuda"), 3, factors=("color",), steps=1)
    assert 0 <= result["single"]["color"]["agreement"] <= 1


# -- sampling and evaluation ---------------------------------------------------------------


def test_guided_sampling_is_seeded_and_independent_of_the_batch_size(exported):
    from hmine.textworld.sampling import load_folder, sample

    model = load_folder(exported[0])
    prompts = ["a red shape", "a circle", "", "a shape at the left"]
    a = sample(model, prompts, steps=2, seed=5, batch_size=4)
    b = sample(model, prompts, steps=2, seed=5, batch_size=3)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, sample(model, prompts, steps=2, seed=6))


def test_agreement_reads_classes_bins_and_sides():
    from hmine.textworld.evaluate import agreement

    table = pd.DataFrame(
        {
            "shape": [0, 1, 2], "color": [2, 2, 2],
            "size": [5.5, 7.4, 9.5], "is_large": [0.01, 0.4, 0.99],
            "x": [8.0, 16.0, 24.0], "is_left": [0.99, 0.5, 0.01],
        }
    )  # fmt: skip
    assert agreement(table, "shape", np.array([0, 1, 0]))["agree"].tolist() == [True, True, False]
    size = agreement(table, "size", np.array([0, 1, 2]))
    assert size["agree"].tolist() == [True, True, True]
    assert size["side"][[0, 2]].tolist() == [1.0, 1.0] and np.isnan(size["side"][1])
    x = agreement(table, "x", np.array([2, 1, 0]))  # named right, centre, left: the image shows left, centre, right
    assert x["agree"].tolist() == [False, True, False]
    assert x["side"][[0, 2]].tolist() == [0.0, 0.0]


def test_evaluate_reports_every_factor_and_word(exported):
    from hmine.textworld.evaluate import evaluate, format_report
    from hmine.textworld.sampling import load_folder

    result = evaluate(load_folder(exported[0]), 3, factors=("color", "size"), n_full=2, steps=1)
    assert set(result["single"]) == {"color", "size"}
    assert set(result["single"]["size"]["words"]) == {"small", "medium", "large"}
    assert all(0 <= e["agreement"] <= 1 for e in result["single"].values())
    assert set(result["full"]) == set(captions.FACTORS) | {"all_factors"}
    assert "color" in format_report(result)


# -- fine-tuning from trained weights ----------------------------------------------------


def test_init_from_starts_a_run_at_the_folders_weights_and_resumes_from_its_checkpoint(exported, tmp_path):
    from safetensors.torch import load_file

    from hmine.textworld.train import main, train

    folder, _ = exported
    expected = {f"unet.{k}": v for k, v in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    expected.update({f"text_encoder.{k}": v for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items()})
    config = tiny_config(steps=2, init_from=folder)
    train(config, tmp_path / "tuned", until_step=0)  # step 0: the initial weights, checkpointed
    start = _checkpoint_tensors(tmp_path / "tuned")
    for which in ("model", "ema"):
        mine = {k.split("/", 1)[1]: v for k, v in start.items() if k.startswith(f"{which}/")}
        _assert_same_tensors(mine, expected)
    # a seeded random start differs from the folder's weights
    scratch = tiny_config(steps=2)
    train(scratch, tmp_path / "scratch", until_step=0)
    fresh = _checkpoint_tensors(tmp_path / "scratch")
    assert not torch.equal(fresh["model/unet.conv_in.weight"], expected["unet.conv_in.weight"])
    # a work dir as the source: its newest checkpoint's EMA
    train(tiny_config(steps=2, init_from=tmp_path / "scratch"), tmp_path / "from-work-dir", until_step=0)
    _assert_same_tensors(
        {k: v for k, v in _checkpoint_tensors(tmp_path / "from-work-dir").items() if k.startswith("ema/")},
        {k: v for k, v in fresh.items() if k.startswith("ema/")},
    )
    # resuming continues from the checkpoint, not from the folder again
    train(config, tmp_path / "tuned", until_step=1)
    after_one = _checkpoint_tensors(tmp_path / "tuned")
    train(config, tmp_path / "tuned")
    whole = train(tiny_config(steps=2, init_from=folder), tmp_path / "tuned-whole")
    assert whole.step == 2
    _assert_same_tensors(_checkpoint_tensors(tmp_path / "tuned"), _checkpoint_tensors(tmp_path / "tuned-whole"))
    assert not torch.equal(after_one["model/unet.conv_in.weight"], expected["unet.conv_in.weight"])
    # the CLI option sets the config's init_from (and so the work dir's config.json)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in {**TINY, "steps": 1}.items()}))
    assert main([str(config_file), "--work-dir", str(tmp_path / "cli"), "--until-step", "0", "--init-from", str(folder)]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["init_from"] == str(folder)


def test_init_from_refuses_a_folder_without_weights_or_of_another_architecture(exported, tmp_path):
    from hmine.textworld.train import train

    with pytest.raises(FileNotFoundError, match=r"init_from .* neither an exported model folder nor a training work dir"):
        train(tiny_config(steps=1, init_from=tmp_path / "empty"), tmp_path / "a", until_step=0)
    with pytest.raises(ValueError, match=r"init_from .* does not fit this config's model"):
        train(tiny_config(steps=1, init_from=exported[0], text_hidden_size=32), tmp_path / "b", until_step=0)


def test_guided_sampling_re_derives_the_noise_from_the_clipped_x0(exported):
    """DDIM with clip_sample: the direction term's noise follows the clipped x0 (GLIDE), not the raw model output."""
    from diffusers import DDIMScheduler

    from hmine.textworld.sampling import encode_prompts, load_folder, sample

    model = load_folder(exported[0])
    assert model.scheduler.config.clip_sample
    prompts, guidance, steps, seed = ["a red shape", "a shape on a dark background"], 30.0, 3, 2
    x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
    states = torch.cat([encode_prompts(model, [""]).expand(2, -1, -1), encode_prompts(model, prompts)])
    ddim = DDIMScheduler.from_config(model.scheduler.config)
    ddim.set_timesteps(steps)
    clipped = reference = x
    with torch.no_grad():
        for t in ddim.timesteps:
            a_t = ddim.alphas_cumprod[t]
            prev = int(t) - ddim.config.num_train_timesteps // steps
            a_prev = ddim.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
            uncond, cond = model.unet(torch.cat([reference, reference]), t, encoder_hidden_states=states).sample.chunk(2)
            v = uncond + guidance * (cond - uncond)
            x0 = a_t.sqrt() * reference - (1 - a_t).sqrt() * v
            if t == ddim.timesteps[0]:
                assert float((x0.abs() > 1).float().mean()) > 0.05  # the case that matters: x0 far outside [-1, 1]
            x0 = x0.clamp(-1, 1)
            eps = (reference - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            reference = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            # diffusers' default keeps the raw model output in the direction term
            uncond, cond = model.unet(torch.cat([clipped, clipped]), t, encoder_hidden_states=states).sample.chunk(2)
            clipped = ddim.step(uncond + guidance * (cond - uncond), t, clipped).prev_sample
    ours = sample(model, prompts, guidance_scale=guidance, steps=steps, seed=seed)
    np.testing.assert_allclose(ours, reference.clamp(-1, 1).numpy(), atol=1e-5)
    assert np.abs(ours - clipped.clamp(-1, 1).numpy()).max() > 1e-2


def test_the_shipped_model_follows_colour_and_dark_prompts_at_the_evaluation_settings():
    """A regression check on the embedded weights (guidance 4, 20 DDIM steps): the raw-noise sampler gave 7 of 12 colours."""
    from hmine.labelling import WorldLabeller
    from hmine.textworld.evaluate import agreement, single_factor_plan
    from hmine.textworld.sampling import load_folder, sample

    model = load_folder(REPO / "hmine" / "embedded" / "shapes-text-ddpm")
    labeller = WorldLabeller()
    for factor, seed in (("color", 1), ("background", 5)):
        plan = single_factor_plan(factor, 12)
        table = labeller.score(sample(model, [p for _, p in plan], seed=seed))
        agree = agreement(table, factor, np.array([w for w, _ in plan]))["agree"]
        assert agree.mean() >= 11 / 12, (factor, agree.tolist())


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/learned-shapes.yaml", "configs/text-demo.yaml"])
def test_the_shipped_run_configs_pass_the_preflight_of_every_stage_they_run(path):
    """What `hmine run` checks before it touches a run directory (no weights are loaded):
    configs/text-demo.yaml's prompts fit the embedded text model's tokenizer, its SEGA
    concepts apply, its labeller scores its attributes; likewise the other shipped configs."""
    from hmine.config import load_config
    from hmine.preflight import check_run_inputs
    from hmine.stages import applicable_stage_names

    config = load_config(REPO / path)
    stages = applicable_stage_names(config)
    assert {"sample", "label", "directions", "edit"} <= set(stages)
    check_run_inputs(config, stages)
