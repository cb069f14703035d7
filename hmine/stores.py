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

:func:`verify_done_chunks` checks on every rerun that the chunk files of batches marked
done exist and decode; a batch whose chunk was deleted or truncated is un-marked (and the
store gets a new uuid, so cached downstream results keyed on it are invalidated), then
redone instead of being read as fill values.
"""

from __future__ import annotations

import datetime as _dt
import itertools
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
    from hmine.config import config_hash as hash_of

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
    :func:`damaged_entries` find it without decoding.
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
    any array not in :data:`CHUNK_CHECKED_ARRAYS`) that fails its checksum.

    The large arrays' chunks are checked per batch or entry by :func:`damaged_batches`
    and :func:`damaged_entries`, which redo only what was lost. Damage here has no such
    unit of work, so the whole store is written again; the small arrays are a tiny share
    of a store's bytes, so random damage lands here rarely. zarr writes every metadata
    and chunk file atomically, so none of this is ever left by a crash: it is damage
    from outside (a disk, a copy, a hand).
    """
    import zarr

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
        chunk_format = _chunk_format(array)
        if chunk_format != "crc32c":
            continue  # stores from before the checksum: their small arrays go unchecked
        for file in sorted((path / name / "c").rglob("*")) if (path / name / "c").exists() else []:
            if file.is_file() and not _chunk_intact(file, chunk_format):
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


def _create_array(group, spec: ArraySpec, coords: dict[str, np.ndarray] | None) -> None:
    array = group.create_array(
        spec.name,
        shape=spec.shape,
        chunks=spec.chunks,
        dtype=spec.dtype,
        compressors=_compressors(spec),
        dimension_names=spec.dims,
        fill_value=spec.fill_value,
        attributes=spec.attrs or {},
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


def verify_done_chunks(group, path: Path, arrays: list[str], batch_size: int) -> list[int]:
    """Find batches marked done whose chunk files are missing or truncated; un-mark them.

    A chunk is damaged when its file is missing or shorter than its Blosc header says.
    Returns the list of damaged batch indices. When any is found the store's uuid is
    renewed and the complete mark removed, so nothing downstream trusts the old content.
    """
    damaged = damaged_batches(group, path, arrays, batch_size)
    n = group["done"].shape[0]
    if damaged:
        for batch in damaged:
            group["done"][batch_region(batch, batch_size, n)] = False
        group.attrs[STORE_UUID] = uuid.uuid4().hex
        if COMPLETE in group.attrs:
            del group.attrs[COMPLETE]
    return damaged


def damaged_batches(group, path: Path, arrays: list[str], batch_size: int) -> list[int]:
    """Batches marked done whose chunk files (of ``arrays``) are missing or truncated; read-only."""
    path = Path(path)
    n = group["done"].shape[0]
    if any(name not in group for name in arrays):  # an array's folder lost: every done batch with it
        return [batch for batch, is_done in enumerate(done_batches(group, batch_size)) if is_done]
    damaged: list[int] = []
    for batch, is_done in enumerate(done_batches(group, batch_size)):
        if not is_done:
            continue
        region = batch_region(batch, batch_size, n)
        for name in arrays:
            array = group[name]
            expected = _chunk_files_under(path / name, array, (region.start // array.chunks[0],))
            if not all(_chunk_intact(f, _chunk_format(array)) for f in expected):
                damaged.append(batch)
                break
    return damaged


# Per store, the arrays whose chunk files are checked for loss on rerun. Only arrays whose
# written chunks never equal their fill value belong here: zarr does not write such chunks
# (write_empty_chunks=False), so they would read as lost. Hence the Jacobian's unit vectors
# and iteration counts (>= 1), not its singular values, which are 0 for an empty mask.
CHUNK_CHECKED_ARRAYS = {
    "samples.zarr": ["h", "x0"],
    "edits.zarr": ["images"],
    "jacobian.zarr": ["vectors", "iterations"],  # plus localised_vectors: hmine.stages.jacobian.checked_arrays
    "directions.zarr": ["direction"],  # written whole, with empty chunks too
}
# Arrays that some stores check per entry beside those above (the Jacobian store's
# localised vectors, present only with a mask): left to the entry checks by store_damage.
CHUNK_CHECKED_PER_ENTRY = {"localised_vectors"}


def damaged_entries(group, path: Path, arrays: list[str]) -> list[tuple[int, ...]]:
    """Entries of ``done`` marked True whose chunk files (of ``arrays``) are missing or truncated.

    For stores whose unit of work is an entry of an n-d ``done`` array (a direction of the
    edit store, a (sample, step) pair of the Jacobian store): each array in ``arrays``
    has ``done``'s dims first, so an entry's data lies in the chunk row at its index
    (several entries share a chunk when the chunks are larger than one). Read-only.
    Only arrays whose chunks never equal their fill value belong in ``arrays``: zarr
    does not write such chunks, and they would read as missing. An array of ``arrays``
    that the store does not hold at all (its folder lost) damages every done entry: pass
    only the arrays the store must have (e.g. :func:`hmine.stages.jacobian.checked_arrays`).
    """
    path = Path(path)
    done_array = group["done"]
    done = np.asarray(done_array[...], dtype=bool)
    if any(name not in group for name in arrays):
        return [tuple(int(i) for i in entry) for entry in zip(*np.nonzero(done))]
    looked_up = {name: group[name] for name in arrays}
    done_dims = tuple(done_array.metadata.dimension_names or ())
    for name, array in looked_up.items():
        leading = tuple(array.metadata.dimension_names or ())[: done.ndim]
        if done_dims and leading != done_dims:
            raise ValueError(f"{path / name} has leading dims {leading}, not done's {done_dims}")
    damaged: list[tuple[int, ...]] = []
    verdicts: dict[tuple[str, tuple[int, ...]], bool] = {}
    for entry in zip(*np.nonzero(done)):
        entry = tuple(int(i) for i in entry)
        for name, array in looked_up.items():
            lead = tuple(i // c for i, c in zip(entry, array.chunks))
            key = (name, lead)
            if key not in verdicts:
                files = _chunk_files_under(path / name, array, lead)
                verdicts[key] = all(_chunk_intact(f, _chunk_format(array)) for f in files)
            if not verdicts[key]:
                damaged.append(entry)
                break
    return damaged


def all_chunks_intact(path: Path, arrays: list[str]) -> bool:
    """Whether every chunk file of ``arrays`` in the store at ``path`` exists and is whole.

    For stores written in one go (no ``done`` array), e.g. the direction store: any lost
    chunk means the store must be written again. Read-only.
    """
    import zarr

    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    for name in arrays:
        array = group[name]
        grid_first = -(-array.shape[0] // array.chunks[0]) if array.ndim else 1
        for first in range(grid_first):
            lead = (first,) if array.ndim else ()
            files = _chunk_files_under(path / name, array, lead)
            if not all(_chunk_intact(f, _chunk_format(array)) for f in files):
                return False
    return True


def repair_damaged_entries(group, path: Path, arrays: list[str]) -> list[tuple[int, ...]]:
    """:func:`damaged_entries`, un-marked so the stage redoes them; the store's uuid is renewed.

    The damaged chunk files are removed: a stage that rewrites a chunk in parts (e.g. in
    sampling batches smaller than the chunk) makes zarr read the chunk first, and a
    truncated one would fail to decode.
    """
    path = Path(path)
    damaged = damaged_entries(group, path, arrays)
    if damaged:
        done = group["done"]
        for entry in damaged:
            done[entry] = False
            for name in (name for name in arrays if name in group):
                array = group[name]
                lead = tuple(i // c for i, c in zip(entry, array.chunks))
                for file in _chunk_files_under(path / name, array, lead):
                    if file.exists() and not _chunk_intact(file, _chunk_format(array)):
                        file.unlink()
        group.attrs[STORE_UUID] = uuid.uuid4().hex
        if COMPLETE in group.attrs:
            del group.attrs[COMPLETE]
    return damaged


def _chunk_format(array) -> str:
    """How a chunk file of ``array`` can be checked without decoding it.

    ``"crc32c"``: it ends with the CRC32C of the bytes before (every array hmine writes);
    ``"blosc"``: a single Blosc frame, whose header gives its size (stores written before
    the checksum); ``"plain"``: only its existence and a non-zero size can be checked.
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    codecs = tuple(array.compressors)
    if codecs and isinstance(codecs[-1], Crc32cCodec):
        return "crc32c"
    if len(codecs) == 1 and isinstance(codecs[0], BloscCodec):
        return "blosc"
    return "plain"


def _chunk_intact(file: Path, chunk_format: str) -> bool:
    """A chunk file exists and is whole: its checksum matches (``crc32c``), it is as long as
    its Blosc header says (``blosc``: a stat and a 16-byte read), or it is not empty.

    Checking the CRC reads the whole file (about 1 GB/s with google-crc32c's C code),
    which catches what the size cannot: flipped bytes in a chunk of the right length.
    """
    try:
        if chunk_format == "crc32c":
            data = file.read_bytes()
        else:
            size = file.stat().st_size
            if chunk_format == "plain":
                return size > 0
            with open(file, "rb") as handle:
                header = handle.read(16)
    except OSError:
        return False
    if chunk_format == "crc32c":
        import google_crc32c

        return len(data) >= 4 and google_crc32c.value(data[:-4]).to_bytes(4, "little") == data[-4:]
    return len(header) == 16 and int.from_bytes(header[12:16], "little") == size


def _chunk_files_under(array_dir: Path, array, lead: tuple[int, ...]) -> list[Path]:
    """Chunk files whose leading chunk indices are ``lead`` (all chunks of the other dims)."""
    grid = [-(-s // c) for s, c in zip(array.shape, array.chunks)]
    return [
        array_dir / "c" / "/".join(str(i) for i in (*lead, *rest))
        for rest in itertools.product(*[range(g) for g in grid[len(lead) :]])
    ]


def mark_complete(group) -> None:
    group.attrs[COMPLETE] = True


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
