"""The store layer on its own: templates, states, chunk checks, checksums, small files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hmine.chunk_checks import damaged_batches, verify_done_chunks
from hmine.stores import (
    CONFIG_HASH,
    ArraySpec,
    StoreConfigMismatch,
    UnreadableFile,
    mark_complete,
    open_group,
    prepare_store,
    read_json,
    store_damage,
    store_state,
    table_meta,
    write_json_atomic,
    write_table,
)

N, BATCH = 6, 2


def _template(path, config_hash="a"):
    arrays = [
        ArraySpec("h", (N, 3, 4), (BATCH, 3, 4), "float32", ("sample", "c", "w")),
        ArraySpec("done", (N,), (BATCH,), "bool", ("sample",), None, False, False),
        ArraySpec("sample", (N,), (N,), "int64", ("sample",), None, None, False),
    ]
    return prepare_store(path, arrays, {CONFIG_HASH: config_hash}, {"sample": np.arange(N)})


def _written(path):
    group = _template(path)
    rng = np.random.default_rng(0)
    for start in range(0, N, BATCH):
        group["h"][start : start + BATCH] = rng.standard_normal((BATCH, 3, 4)).astype(np.float32)
        group["done"][start : start + BATCH] = True
    mark_complete(group)
    return group


def _chunk(path, name, *index):
    return path / name / "c" / "/".join(str(i) for i in index)


def test_a_store_goes_from_missing_to_partial_to_complete(tmp_path):
    path = tmp_path / "samples.zarr"
    assert store_state(path) == "missing"
    path.mkdir()
    assert store_state(path) == "debris"  # a folder without the template's mark
    _template(path)
    assert store_state(path) == "partial"
    _written(path)
    assert store_state(path) == "complete"
    np.testing.assert_array_equal(open_group(path)["sample"][...], np.arange(N))


def test_another_config_is_refused_unless_the_store_is_derived(tmp_path):
    path = tmp_path / "samples.zarr"
    _written(path)
    with pytest.raises(StoreConfigMismatch, match="another run name"):
        _template(path, config_hash="b")
    group = prepare_store(path, [ArraySpec("y", (1,), (1,), "float32", ("one",))], {CONFIG_HASH: "b"}, replace_stale=True)
    assert "h" not in group and group.attrs[CONFIG_HASH] == "b"


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped bit"])
def test_a_damaged_chunk_is_found_and_its_batch_unmarked(tmp_path, damage):
    path = tmp_path / "samples.zarr"
    group = _written(path)
    chunk = _chunk(path, "h", 1, 0, 0)
    data = bytearray(chunk.read_bytes())
    if damage == "deleted":
        chunk.unlink()
    elif damage == "truncated":
        chunk.write_bytes(bytes(data[:-7]))
    else:
        data[len(data) // 2] ^= 0x10  # same size, same Blosc header: only the checksum tells
        chunk.write_bytes(bytes(data))
    assert damaged_batches(group, path, ["h"], BATCH) == [1]
    uuid_before = group.attrs["hmine:store_uuid"]
    assert verify_done_chunks(group, path, ["h"], BATCH) == [1]
    assert not group["done"][2:4].any() and group["done"][:2].all()
    assert group.attrs["hmine:store_uuid"] != uuid_before and store_state(path) == "partial"


def test_a_flipped_bit_never_reads_as_data(tmp_path):
    path = tmp_path / "samples.zarr"
    _written(path)
    chunk = _chunk(path, "h", 0, 0, 0)
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="checksum"):
        open_group(path)["h"][0:2]


@pytest.mark.parametrize("target", ["root zarr.json", "array zarr.json", "done chunk", "coordinate chunk"])
def test_damage_outside_the_checked_arrays_makes_the_store_corrupt(tmp_path, target):
    path = tmp_path / "samples.zarr"
    _written(path)
    file = {
        "root zarr.json": path / "zarr.json",
        "array zarr.json": path / "h" / "zarr.json",
        "done chunk": _chunk(path, "done", 1),
        "coordinate chunk": _chunk(path, "sample", 0),
    }[target]
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert store_state(path) == "corrupt"
    assert str(file) in store_damage(path)
    _template(path)  # the stage's prepare writes it again from its template
    assert store_state(path) == "partial" and not open_group(path)["done"][...].any()


def test_small_json_files_are_written_whole_and_read_with_their_name(tmp_path):
    path = tmp_path / "identity.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # fails before anything is written
    assert read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["identity.json"]
    path.write_text('{"a": ')
    with pytest.raises(UnreadableFile, match="identity.json"):
        read_json(path)


def test_a_table_with_a_damaged_page_reads_as_absent(tmp_path):
    path = tmp_path / "t.parquet"
    write_table(pd.DataFrame({"score": np.linspace(0, 1, 500)}), path, {"hmine:config_hash": "a"})
    assert table_meta(path)["hmine:config_hash"] == "a"
    data = bytearray(path.read_bytes())
    data[200] ^= 0x04  # inside the first data page
    path.write_bytes(bytes(data))
    assert table_meta(path) is None


def test_the_run_log_survives_a_cut_short_line(tmp_path, caplog):
    from hmine.pipeline import append_log_record, read_log_records

    log = tmp_path / "run_log.jsonl"
    append_log_record(log, {"stage": "sample"})
    with open(log, "a") as handle:
        handle.write('{"stage": "lab')
    append_log_record(log, {"stage": "label"})
    assert [r["stage"] for r in read_log_records(log)] == ["sample", "label"]
    assert "run_log.jsonl line 2 is damaged" in caplog.text
    assert json.loads(log.read_text().splitlines()[-1]) == {"stage": "label"}
