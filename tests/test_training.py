"""The embedded DDPM's training script on a tiny config: steps, checkpoints, resume, export."""

import json

import pytest
import torch

from hmine.models import load_model
from hmine.sampling import Sampler
from hmine.world.ddpm import DDPMTrainConfig, train_ddpm
from hmine.world.training import latest_checkpoint

TINY = dict(
    steps=3, batch_size=4, block_out_channels=(8, 16, 16), checkpoint_every=2, sample_every=3,
    log_every=1, warmup_steps=1, torch_threads=1,
)


def test_training_runs_resumes_and_exports_a_loadable_model(tmp_path):
    config = DDPMTrainConfig(**TINY)
    train_ddpm(config, tmp_path / "w0", export_dir=tmp_path / "export", until_step=2)  # stopped at 2 ...
    state = json.loads((latest_checkpoint(tmp_path / "w0") / "state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "export").exists()

    # ... resumed to step 3 equals an uninterrupted 3-step run (data and noise are seeded per step)
    resumed = train_ddpm(config, tmp_path / "w0", export_dir=tmp_path / "export")
    straight = train_ddpm(config, tmp_path / "w1")
    for a, b in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "w1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert (tmp_path / "w1" / "grid-000003.png").exists()

    model = load_model(str(tmp_path / "export"))
    assert model.scheduler.config.clip_sample and model.sample_shape == (3, 32, 32)
    assert Sampler(model, num_inference_steps=2).sample([0]).images.shape == (1, 3, 32, 32)


def test_v_prediction_fine_tune_starts_from_a_training_work_dir(tmp_path):
    base = DDPMTrainConfig(**{**TINY, "steps": 1})
    train_ddpm(base, tmp_path / "base")
    tuned = DDPMTrainConfig(**{**TINY, "steps": 1, "prediction_type": "v_prediction", "init_from": tmp_path / "base"})
    train_ddpm(tuned, tmp_path / "tuned", export_dir=tmp_path / "export")
    model = load_model(str(tmp_path / "export"))
    assert model.scheduler.config.prediction_type == "v_prediction"
    assert Sampler(model, num_inference_steps=2).sample([0]).images.shape == (1, 3, 32, 32)


def test_fine_tune_starts_from_an_exported_model_folder(tmp_path):
    from hmine.world.ddpm import initial_weights

    base = DDPMTrainConfig(**{**TINY, "steps": 1})
    exported = train_ddpm(base, tmp_path / "base", export_dir=tmp_path / "export")
    for folder in (tmp_path / "export", tmp_path / "export" / "unet"):
        weights = initial_weights(folder)
        for name, value in exported.state_dict().items():
            torch.testing.assert_close(weights[name], value)
    # a fine-tune from the folder starts exactly there: at learning rate ~0 it stays there
    still = DDPMTrainConfig(**{**TINY, "steps": 1, "learning_rate": 1e-12, "init_from": tmp_path / "export"})
    tuned = train_ddpm(still, tmp_path / "tuned")
    for a, b in zip(tuned.parameters(), exported.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint nor a diffusers U-Net folder"):
        initial_weights(tmp_path)


def test_grid_timesteps_replace_the_chosen_fraction_and_leave_fraction_zero_runs_alone(tmp_path):
    from diffusers import DDIMScheduler

    from hmine.world.ddpm import _favour_grid_timesteps, sampler_grid_timesteps

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(10)
    grid = sampler_grid_timesteps(1000, 10)
    assert sorted(grid.tolist()) == sorted(ddim.timesteps.tolist())  # the 10-step sampler's own timesteps

    uniform = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(0))
    everything = DDPMTrainConfig(grid_timestep_fraction=1.0)
    favoured = _favour_grid_timesteps(uniform, everything, torch.Generator().manual_seed(1))
    assert set(favoured.tolist()) <= set(grid.tolist()) and len(set(favoured.tolist())) == 10
    half = DDPMTrainConfig(grid_timestep_fraction=0.5)
    mixed = _favour_grid_timesteps(uniform, half, torch.Generator().manual_seed(1))
    replaced = (mixed != uniform).float().mean().item()
    assert 0.45 < replaced < 0.55  # half drawn from the grid (a pick equal to the uniform draw is rare)

    # fraction 0 draws nothing extra: a run keeps the exact batches of the plain objective
    plain = train_ddpm(DDPMTrainConfig(**{**TINY, "steps": 1}), tmp_path / "plain")
    zero = train_ddpm(DDPMTrainConfig(**{**TINY, "steps": 1, "grid_timestep_fraction": 0.0, "grid_steps": 5}), tmp_path / "zero")
    for a, b in zip(plain.parameters(), zero.parameters()):
        torch.testing.assert_close(a, b)
