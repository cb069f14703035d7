"""Zarr stores as the contract between stages: templates, chunk-aligned regions, done-marks.

The life of a store (pangeo-forge's pattern):

1. :func:`prepare_store` creates the template — every array with its dims, chunks and
   attributes, the stage's config hash and a fresh ``hmine:store_uuid`` — and only then
   sets ``hmine:initialised``. A folder without that mark is debris of a crash during
   creation and is recreated. A store written by another config is refused.
2. The stage writes one chunk-aligned region per batch, data first, then the batch's
   entries of the ``done`` array. zarr's local store writes each chunk file atomically
   (temp file + rename), so a kill at any moment loses at most the batch in flight.
3. ``hmine:complete`` is set last, after every batch is done.
4. A store may grow along its first axis (a run asked for more samples):
   :func:`begin_growth` takes the complete mark away and sets the new identity in one
   attribute write, :func:`finish_growth` resizes the arrays (same chunks) and rewrites
   the coordinates; the new rows are then written as in 2 and the store marked as in 3.

:func:`hmine.chunk_checks.verify_done_chunks` checks on every rerun that the chunk files of batches marked
done exist and decode; a batch whose chunk was deleted or truncated is un-marked (and the
store gets a new uuid, so cached downstream results keyed on it are invalidated), then
redone instead of being read as fill values.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import hmine

COMPLETE = "hmine:complete"
INITIALISED = "hmine:initialised"
# What a store is made for, compared when it is reopened: the stage's input identity
# (hmine.stages.input_identity), which for the sample stage is its config hash.
CONFIG_HASH = "hmine:config_hash"
# The hash of the stage's settings (and its upstream stages') alone, for `hmine status`.
STAGE_HASH = "hmine:stage_hash"
STORE_UUID = "hmine:store_uuid"


class StoreConfigMismatch(RuntimeError):
    """A store at the target path was written by a different config."""


COMPILED = "hmine:compiled"  # whether a store's rows were computed under model.compile
DEVICE = "hmine:device"  # what a store's rows were computed on (hmine.models.device_identity)


def check_same_device(current: str, attrs, path: Path, device_setting: str, rows: str = "batches",
                      otherwise: str = "use another run name") -> None:  # fmt: skip
    """Refuse to add ``rows`` computed on ``current`` (a :func:`hmine.models.device_identity`)
    to a store begun on another device.

    ``model.device`` is in no config hash (a run may move to a GPU between runs), but CPU
    and GPU kernels round differently: rows from both would mix two numerics in one store.
    A store that records no device (written before hmine recorded it) is resumed.
    """
    recorded = attrs.get(DEVICE)
    if recorded is not None and recorded != current:
        raise StoreConfigMismatch(
            f"{path} was begun on {recorded}, not {current} (model.device={device_setting}): "
            f"its {rows} would mix two devices' numerics; resume it on {recorded}, or {otherwise}"
        )


def check_same_compile(compiled: bool, attrs, path: Path, rows: str = "batches",
                       otherwise: str = "use another run name") -> None:  # fmt: skip
    """Refuse to add ``rows`` computed compiled (``compiled``) to a store begun eagerly, or the reverse.

    Like the device: ``model.compile`` is in no config hash, but compiled and eager kernels
    round differently. Every store whose rows a stage resumes records ``hmine:compiled``
    when it is created (the sample and edit stages); one that records nothing is resumed.
    """
    recorded = attrs.get(COMPILED)
    if recorded is not None and recorded != compiled:
        raise StoreConfigMismatch(
            f"{path} was begun with model.compile: {str(recorded).lower()}: its {rows} would mix compiled and "
            f"eager numerics; resume it with model.compile: {str(recorded).lower()}, or {otherwise}"
        )


def kept_compile_note(compiled: bool, attrs) -> str:
    """For the log line of a complete store kept as it is: the other ``model.compile`` it was
    computed with, if so (not recomputed: the setting changes float rounding only, no hash)."""
    recorded = attrs.get(COMPILED)
    if recorded is None or recorded == compiled:
        return ""
    return f" (computed with model.compile: {str(recorded).lower()}, kept: compiling changes float rounding only)"


class UnreadableFile(ValueError):
    """A small metadata file (JSON) that exists but cannot be parsed: damage, named."""


# --------------------------------------------------------------------------------------
# Small files: written whole or not at all
# --------------------------------------------------------------------------------------


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file, fsync and rename.

    A kill or a full disk at any moment leaves either the old file or the new one, never a
    half-written one; the fsync before the rename keeps that true across a power loss.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value, **dumps_kwargs) -> None:
    """:func:`write_bytes_atomic` of ``json.dumps(value)``."""
    write_bytes_atomic(path, json.dumps(value, **dumps_kwargs).encode())


def read_json(path: Path):
    """The JSON value in ``path``; :class:`UnreadableFile` naming the file if it does not parse.

    FileNotFoundError (and other OS errors) pass through unchanged: a missing file is
    absence, an unparseable one is damage.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFile(f"{path} is damaged (not valid JSON: {error})") from None


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store template."""

    name: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    attrs: dict | None = None
    fill_value: object = None
    compressed: bool = True


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(hmine.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_attrs(stage_config: dict, config_hash: str, extra: dict | None = None) -> dict:
    """Namespaced provenance attributes every store carries."""
    from hmine.identity import config_hash as hash_of

    attrs = {
        CONFIG_HASH: config_hash,
        "hmine:input_identity": config_hash,
        STAGE_HASH: hash_of(stage_config),
        "hmine:version": hmine.__version__,
        "hmine:git_sha": _git_sha(),
        "hmine:stage_config": json.dumps(stage_config, sort_keys=True),
        "hmine:created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    attrs.update(extra or {})
    return attrs


def chunk_codecs(compressed: bool = True) -> list:
    """The bytes-to-bytes codecs of every hmine array: Blosc (optional), then a CRC32C.

    The checksum (zarr v3's ``crc32c`` codec, 4 bytes per chunk) makes any damage to a
    chunk's bytes fail on read instead of decoding to other values, and lets
    the chunk checks (:mod:`hmine.chunk_checks`) find it without decoding.
    """
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

    blosc = [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle)] if compressed else []
    return [*blosc, Crc32cCodec()]


def _compressors(spec: ArraySpec):
    return chunk_codecs(spec.compressed)


def open_group(path: Path, mode: str = "r"):
    import zarr

    return zarr.open_group(str(path), mode=mode)


def store_state(path: Path) -> str:
    """``missing``, ``debris`` (crashed during creation), ``corrupt`` (see
    :func:`store_damage`), ``partial`` or ``complete``.

    Debris and corrupt stores are removed and written again by the stage that owns them.
    """
    path = Path(path)
    if not (path / "zarr.json").exists():
        return "debris" if path.exists() else "missing"
    if store_damage(path) is not None:
        return "corrupt"
    attrs = open_group(path).attrs
    if attrs.get(COMPLETE):
        return "complete"  # stores written whole (then marked) have no template stage
    return "partial" if attrs.get(INITIALISED) else "debris"


def store_damage(path: Path) -> str | None:
    """What makes a store unusable as a whole, or None: a metadata file (``zarr.json``)
    that does not parse, or a chunk of a small array (``done``, coordinates, statistics:
    any array not in :data:`hmine.chunk_checks.CHUNK_CHECKED_ARRAYS`) that fails its checksum.

    The large arrays' chunks are checked per batch or entry by
    :func:`hmine.chunk_checks.damaged_batches` and :func:`~hmine.chunk_checks.damaged_entries`, which redo only what was lost. Damage here has no such
    unit of work, so the whole store is written again; the small arrays are a tiny share
    of a store's bytes, so random damage lands here rarely. zarr writes every metadata
    and chunk file atomically, so none of this is ever left by a crash: it is damage
    from outside (a disk, a copy, a hand).
    """
    import zarr

    from hmine.chunk_checks import (
        CHUNK_CHECKED_ARRAYS,
        CHUNK_CHECKED_PER_ENTRY,
        chunk_format,
        chunk_intact,
    )

    path = Path(path)
    for meta in sorted(path.glob("*/zarr.json")) + [path / "zarr.json"]:
        try:
            read_json(meta)
        except UnreadableFile as error:
            return str(error)
        except OSError:
            continue
    group = zarr.open_group(str(path), mode="r")
    skip = set(CHUNK_CHECKED_ARRAYS.get(path.name, ())) | CHUNK_CHECKED_PER_ENTRY
    for name in sorted(group.array_keys()):
        if name in skip:
            continue
        array = group[name]
        kind = chunk_format(array)
        if kind != "crc32c":
            continue  # stores from before the checksum: their small arrays go unchecked
        for file in sorted((path / name / "c").rglob("*")) if (path / name / "c").exists() else []:
            if file.is_file() and not chunk_intact(file, kind):
                return f"{file} fails its checksum (damaged)"
    return None


def prepare_store(
    path: Path,
    arrays: list[ArraySpec],
    attrs: dict,
    coords: dict[str, np.ndarray] | None = None,
    *,
    replace_stale: bool = False,
):
    """Create the store template, or reopen a compatible one; return the zarr group.

    ``attrs`` must hold ``hmine:config_hash``. A store at ``path`` with another config
    hash raises :class:`StoreConfigMismatch`, unless ``replace_stale`` — for stores derived
    from others, which a changed config must invalidate and recompute — in which case it
    is removed and created anew. Debris of a crashed creation is removed. Coordinate
    arrays in ``coords`` are written with the template.
    """
    path = Path(path)
    state = store_state(path)
    if state in ("debris", "corrupt"):
        shutil.rmtree(path)
    elif state in ("partial", "complete"):
        group = open_group(path, mode="r+")
        found = group.attrs.get(CONFIG_HASH)
        if found != attrs[CONFIG_HASH] and replace_stale:
            shutil.rmtree(path)
            return prepare_store(path, arrays, attrs, coords)
        if found != attrs[CONFIG_HASH]:
            raise StoreConfigMismatch(
                f"{path} was written by config {found}, not {attrs[CONFIG_HASH]}; "
                "use another run name (name: in the config) or delete the store to start over"
            )
        # an array whose folder was lost comes back empty (its done entries read as damaged
        # and are redone); everything else is kept
        for spec in arrays:
            if spec.name not in group:
                _create_array(group, spec, coords)
        return group
    import zarr

    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w", attributes={**attrs, STORE_UUID: uuid.uuid4().hex})
    for spec in arrays:
        _create_array(group, spec, coords)
    group.attrs[INITIALISED] = True
    return group


def _create_array(group, spec: ArraySpec, coords: dict[str, np.ndarray] | None, overwrite: bool = False) -> None:
    array = group.create_array(
        spec.name,
        shape=spec.shape,
        chunks=spec.chunks,
        dtype=spec.dtype,
        compressors=_compressors(spec),
        dimension_names=spec.dims,
        fill_value=spec.fill_value,
        attributes=spec.attrs or {},
        overwrite=overwrite,
    )
    if coords and spec.name in coords:
        array[...] = coords[spec.name]


def done_batches(group, batch_size: int) -> np.ndarray:
    """Boolean per batch: every sample of the batch is marked done."""
    done = group["done"][...]
    n_batches = -(-len(done) // batch_size)
    return np.array([done[b * batch_size : (b + 1) * batch_size].all() for b in range(n_batches)])


def batch_region(batch: int, batch_size: int, n: int) -> slice:
    """The sample slice of a batch; regions line up with chunks by construction."""
    start = batch * batch_size
    if start >= n:
        raise IndexError(f"batch {batch} starts at {start}, past the {n} samples")
    return slice(start, min(n, start + batch_size))


def mark_complete(group) -> None:
    group.attrs[COMPLETE] = True


# --------------------------------------------------------------------------------------
# Growing a store along its first axis (a run asked for more samples)
# --------------------------------------------------------------------------------------

# The row count a store is being grown to, set until every array has it: a store that
# carries it is partial and its growth is finished (:func:`finish_growth`) before work.
GROWING = "hmine:growing"
# The stores a grown store was grown from, oldest first: [{uuid, n_samples, unchanged,
# grown}]; ``unchanged`` rows of that store keep their bits in this one (a stage that
# read it may keep what it computed from them, hmine.stages.label).
LINEAGE = "hmine:lineage"


def begin_growth(group, n: int, attrs: dict, lineage_entry: dict) -> None:
    """Step 1 of growing a store to ``n`` rows: one atomic write of its attributes.

    The write takes the complete mark away, sets the grown store's identity (``attrs``:
    its config hash, input identity, stage config) and a new uuid, appends
    ``lineage_entry`` to :data:`LINEAGE` and sets :data:`GROWING` to ``n``. A kill before
    it leaves the store as it was; after it, a partial store whose growth
    :func:`finish_growth` completes on the next run. Nothing downstream trusts it until
    it is marked complete again (a partial store has no uuid to key on).
    """
    current = group.attrs.asdict()
    current.pop(COMPLETE, None)
    lineage = [*current.get(LINEAGE, []), lineage_entry]
    group.attrs.put({**current, **attrs, STORE_UUID: uuid.uuid4().hex, LINEAGE: lineage, GROWING: int(n)})


def finish_growth(group, per_row: tuple[str, ...], rewritten: tuple[tuple[ArraySpec, np.ndarray], ...]) -> None:
    """Step 2 of growing a store: resize, rewrite the coordinates, drop :data:`GROWING`.

    Every array in ``per_row`` is resized along its first axis to the :data:`GROWING`
    row count with its chunks unchanged (the new rows read as fill values: their
    done-marks are False); each ``(spec, values)`` in ``rewritten`` (a coordinate, one
    chunk as in a fresh store) is written anew whole unless it already holds exactly
    that. Each step is idempotent and each metadata or chunk write atomic, so a kill
    anywhere is finished by calling this again.
    """
    n = int(group.attrs[GROWING])
    for name in per_row:
        if name not in group:  # an array whose folder was lost: its stage makes it anew at the new size
            continue
        array = group[name]
        if array.shape[0] != n:
            array.resize((n, *array.shape[1:]))
    for spec, values in rewritten:
        array = group[spec.name] if spec.name in group else None
        same = (array is not None and array.shape == spec.shape and array.chunks == spec.chunks
                and np.array_equal(array[...], values))
        if not same:
            _create_array(group, spec, {spec.name: values}, overwrite=True)
    del group.attrs[GROWING]


def store_uuid(path: Path) -> str | None:
    """The uuid of a complete store, None otherwise (used in downstream cache keys)."""
    if store_state(path) != "complete":
        return None
    return open_group(path).attrs.get(STORE_UUID)


# --------------------------------------------------------------------------------------
# Tables (parquet): written whole, atomically, with hmine metadata in the schema
# --------------------------------------------------------------------------------------

_TABLE_META_KEY = b"hmine"


def write_table(frame, path: Path, meta: dict) -> None:
    """Write a DataFrame to parquet via a temp file and rename, with ``meta`` in its schema.

    A reader never sees a half-written table: the file either does not exist yet or is
    complete, and its metadata says which config and upstream store produced it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame)
    metadata = dict(table.schema.metadata or {})
    metadata[_TABLE_META_KEY] = json.dumps({**meta, COMPLETE: True}).encode()
    table = table.replace_schema_metadata(metadata)
    tmp = path.with_name(path.name + ".tmp")
    # page checksums: damaged bytes fail the read (table_meta) instead of reading as data
    pq.write_table(table, tmp, write_page_checksum=True)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def table_meta(path: Path) -> dict | None:
    """hmine metadata of a parquet table, or None if it is missing or unreadable.

    The whole table is read with its page checksums verified (tables are small: one row
    per sample or per edit), so a damaged table counts as absent and is written again.
    """
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_table(path, page_checksum_verification=True).schema.metadata or {}
        raw = metadata.get(_TABLE_META_KEY)
        return json.loads(raw) if raw else None
    except (OSError, ValueError):  # pyarrow's errors derive from these; so does JSONDecodeError
        return None
