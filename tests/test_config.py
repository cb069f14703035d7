import pytest

from hmine.config import ConfigError, RunConfig, load_config


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_round_trip(tmp_path):
    config = load_config(_write(tmp_path, "name: x\nsample:\n  n_samples: 8\n"))
    assert config.sample.n_samples == 8 and config.model.h_position == "after"
    assert RunConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    "text, field",
    [
        ("sample:\n  n_sampels: 3\n", "sample.n_sampels"),
        ("sample:\n  n_samples: 0\n", "sample.n_samples"),
        ("sample:\n  n_samples: many\n", "sample.n_samples"),
        ("sample:\n  num_inference_steps: 0\n", "sample.num_inference_steps"),
        ("model:\n  h_position: inside\n", "model.h_position"),
        ("sample:\n  eta: -1\n", "sample.eta"),
        ("sample:\n  eta: 2\n", "sample.eta"),
        ("colour: red\n", "colour"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert f"'{field}'" in str(info.value)


def test_eta_list_must_match_steps(tmp_path):
    with pytest.raises(ConfigError, match="one eta per step"):
        load_config(_write(tmp_path, "sample:\n  num_inference_steps: 3\n  eta: [0, 1]\n"))


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, "name: x\n")
    config = load_config(path, ["sample.n_samples=16", "model.h_position=before"])
    assert config.sample.n_samples == 16 and config.model.h_position == "before"
    with pytest.raises(ConfigError, match="sample.batch_size"):
        load_config(path, ["sample.batch_size=-2"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["sample.batch_size"])


def test_stage_hash_ignores_device_but_not_settings(tmp_path):
    base = load_config(None)
    assert base.stage_hash("sample") == load_config(None, ["model.device=cuda"]).stage_hash("sample")
    assert base.stage_hash("sample") != load_config(None, ["sample.eta=1.0"]).stage_hash("sample")


def test_local_model_weights_are_part_of_the_sample_hash(tmp_path, tiny_pixel_model_dir):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_pixel_model_dir, copy)
    config = load_config(None, [f"model.id={copy}"])
    before = config.stage_hash("sample")
    assert before == load_config(None, [f"model.id={copy}"]).stage_hash("sample")
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # retrained weights: same config, other content
    weights.write_bytes(bytes(data))
    assert load_config(None, [f"model.id={copy}"]).stage_hash("sample") != before


def test_runner_section_is_validated_and_never_hashed(tmp_path):
    config = load_config(_write(tmp_path, "runner:\n  kind: dask\n  address: tcp://10.0.0.1:8786\n  n_workers: 4\n"))
    assert config.runner.kind == "dask" and config.runner.address == "tcp://10.0.0.1:8786"
    assert RunConfig.model_validate_json(config.model_dump_json()) == config
    base = load_config(None)
    for stage in ("sample", "label", "directions", "edit", "jacobian"):
        assert config.stage_hash(stage) == base.stage_hash(stage)
        assert "runner" not in config.stage_inputs(stage)
    for text, field in [
        ("runner:\n  workers: 4\n", "runner.workers"),
        ("runner:\n  kind: slurm\n", "runner.kind"),
        ("runner:\n  n_workers: 0\n", "runner.n_workers"),
        ("runner:\n  address: tcp://h:8786\n", "runner"),  # an address needs kind: dask
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(_write(tmp_path, text))
        assert f"'{field}'" in str(info.value)


def test_edit_scales_are_stored_sorted_distinct_and_with_zero_so_equal_edits_hash_equal():
    a = load_config(None, ["edit.scales=[2, -2, 2]", "jacobian.edit_scales=[1, -1]"])
    b = load_config(None, ["edit.scales=[-2, 0, 2]", "jacobian.edit_scales=[-1, 0, 1]"])
    assert a.edit.scales == [-2.0, 0.0, 2.0] and a.jacobian.edit_scales == [-1.0, 0.0, 1.0]
    assert a.stage_hash("edit") == b.stage_hash("edit") and a.stage_hash("jacobian") == b.stage_hash("jacobian")
    assert load_config(None, ["edit.scales=[3]"]).stage_hash("edit") != a.stage_hash("edit")


def test_reports_may_not_share_the_stores_folder():
    with pytest.raises(ConfigError, match="report_root is the same folder as output_root"):
        load_config(None, ["output_root=stores", "report_root=./stores"])


def test_set_into_an_empty_section_and_an_empty_jacobian_step_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("jacobian:\n")
    assert load_config(path, ["jacobian.k=2"]).jacobian.k == 2
    with pytest.raises(ConfigError, match="jacobian.steps"):
        load_config(None, ["jacobian.steps=[]"])


def test_localised_rank_must_cover_k_or_be_zero():
    with pytest.raises(ConfigError, match=r"jacobian.localised_rank \(2\) is below jacobian.k \(3\)"):
        load_config(None, ["jacobian.k=3", "jacobian.localised_rank=2", "jacobian.mask=shape"])
    assert load_config(None, ["jacobian.k=3", "jacobian.localised_rank=0"]).jacobian.localised_rank == 0
    assert load_config(None, ["jacobian.k=40"]).jacobian.k == 40  # no mask: nothing to localise
    with pytest.raises(ConfigError, match="localised_rank"):
        load_config(None, ["jacobian.k=40", "jacobian.mask=shape"])
    with pytest.raises(ConfigError, match="jacobian.edit_window"):
        load_config(None, ["jacobian.edit_window=first_step"])
