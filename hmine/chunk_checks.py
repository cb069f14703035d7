"""Chunk checks: which done work of a store lost its chunk files or has damaged bytes.

A chunk is damaged when its file is missing, cut short, or (every array hmine writes
since the CRC32C codec) fails its checksum. A store marked done for a batch or entry
must hold whole chunks for it, in the arrays that always write their chunks (an array
whose chunks can equal the fill value is not written for them, and would read as lost:
:data:`CHUNK_CHECKED_ARRAYS`). Checks are read-only, except the ``verify`` and ``repair``
functions, which un-mark damaged work so that the stage redoes it and renew the store's
uuid so that nothing downstream trusts the old content.
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import numpy as np

from hmine.stores import COMPLETE, STORE_UUID, batch_region, done_batches


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
            if not all(chunk_intact(f, chunk_format(array)) for f in expected):
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
    "inversions.zarr": ["h", "x0", "x_T"],  # the invert stage's batches (z and residual may be all zeros)
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
                verdicts[key] = all(chunk_intact(f, chunk_format(array)) for f in files)
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
            if not all(chunk_intact(f, chunk_format(array)) for f in files):
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
                    if file.exists() and not chunk_intact(file, chunk_format(array)):
                        file.unlink()
        group.attrs[STORE_UUID] = uuid.uuid4().hex
        if COMPLETE in group.attrs:
            del group.attrs[COMPLETE]
    return damaged


def chunk_format(array) -> str:
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


def chunk_intact(file: Path, chunk_format: str) -> bool:
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
