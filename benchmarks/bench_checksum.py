"""Cost of the CRC32C chunk checksum on writing and reading ``samples.zarr``.

Writes and reads the ``h`` array of a samples store (float16, one chunk per batch and
step, Blosc zstd-3) with hmine's codecs (Blosc, then CRC32C) and without the checksum,
interleaved in one process, and prints the median paired ratio with its spread. Also
times the chunk check that every rerun does (``stores.damaged_batches``, which now reads
and checksums every chunk) against the old Blosc-header check.

    python benchmarks/bench_checksum.py                       # the demo's h: 1,024 x 10 x 128 x 8 x 8
    python benchmarks/bench_checksum.py --channels 512 --n 512   # CelebA-HQ's h (512 x 8 x 8)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def write_store(path: Path, h: np.ndarray, batch: int, checksum: bool) -> float:
    import zarr

    from hmine.stores import chunk_codecs

    codecs = chunk_codecs(compressed=True) if checksum else chunk_codecs(compressed=True)[:-1]
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w")
    array = group.create_array(
        "h", shape=h.shape, chunks=(batch, 1, *h.shape[2:]), dtype="float16", compressors=codecs,
        dimension_names=("sample", "step", "channel", "y", "x"),
    )
    group.create_array(
        "done", shape=(h.shape[0],), chunks=(batch,), dtype="bool", fill_value=False, dimension_names=("sample",)
    )
    started = time.perf_counter()
    for start in range(0, h.shape[0], batch):  # one batch at a time, as the sample stage writes
        array[start : start + batch] = h[start : start + batch]
    group["done"][...] = True
    return time.perf_counter() - started


def read_store(path: Path) -> float:
    import xarray as xr

    started = time.perf_counter()
    h = xr.open_zarr(path, consolidated=False)["h"]
    for step in range(h.sizes["step"]):  # one step at a time, as per-step PCA reads it
        h.isel(step=step).values
    return time.perf_counter() - started


def check_store(path: Path, batch: int) -> float:
    from hmine.chunk_checks import damaged_batches
    from hmine.stores import open_group

    group = open_group(path)
    started = time.perf_counter()
    assert damaged_batches(group, path, ["h"], batch) == []
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # smooth, correlated values like real activations compress like them (stack-notes §5)
    base = rng.standard_normal((args.n, 1, args.channels, 8, 8)).astype(np.float32)
    h = (base + 0.3 * rng.standard_normal((args.n, args.steps, args.channels, 8, 8))).astype(np.float16)
    mib = h.nbytes / 2**20
    rows = {"write": [], "read": [], "check": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain, checked = Path(tmp) / "plain.zarr", Path(tmp) / "crc.zarr"
        write_store(plain, h, args.batch, False)  # warm-up: imports, page cache
        write_store(checked, h, args.batch, True)
        for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
            a, b = write_store(plain, h, args.batch, False), write_store(checked, h, args.batch, True)
            rows["write"].append((a, b))
            a, b = read_store(plain), read_store(checked)
            rows["read"].append((a, b))
            a, b = check_store(plain, args.batch), check_store(checked, args.batch)
            rows["check"].append((a, b))
    print(f"h: {h.shape} float16, {mib:.0f} MiB; {args.repeats} interleaved repeats")
    print(f"{'operation':<10} {'blosc (s)':>10} {'blosc+crc32c (s)':>17} {'ratio (median)':>15} {'ratio range':>15}")
    for name, pairs in rows.items():
        ratios = [b / a for a, b in pairs]
        print(
            f"{name:<10} {statistics.median(a for a, _ in pairs):>10.3f} {statistics.median(b for _, b in pairs):>17.3f} "
            f"{statistics.median(ratios):>15.3f} {min(ratios):>7.3f}-{max(ratios):.3f}"
        )
    print("check: blosc = 16-byte header read per chunk; blosc+crc32c = whole chunk read and checksummed")


if __name__ == "__main__":
    main()
