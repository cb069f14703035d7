"""One fixed torch thread setting for every model call, so results do not depend on the runner.

torch's CPU kernels give different float32 results at different intra-op thread counts
(measured on torch 2.13.0+cpu, AVX-512, with the embedded model):

* **SiLU** (and sigmoid, GELU): each thread's range ends in a scalar tail of fewer than
  two 16-float vectors, computed with ``std::exp`` rather than the vectorised exp. The two
  disagree by up to 1 ulp on 4.4 % of inputs, so at 3, 5, 6, 7 or 12 threads (ranges not
  a multiple of 32 elements) a few values per activation change; 2, 4, 8 and 16 threads
  split the embedded model's activations evenly and agree with 1.
* **Conv2d** (oneDNN) and **Linear** (MKL sgemm): at small batches (1 to 5 images) the
  kernels block and reduce differently with 2 or more threads than with 1; 13 of the
  embedded U-Net's 36 convolutions and 6 of its 17 linear layers change, and 95 % of the
  U-Net's output differs at batch 1, at 2 threads as at 8.

So results depend on the thread count, and Dask's nanny starts its workers with
``OMP_NUM_THREADS=1`` while a local process gets one thread per core: h differed in 0.66 %
of its float16 values and x0 in most of its values between the two. Every model call in
hmine's sampler therefore runs under :func:`model_threads` with one fixed count, the
run's ``sample.torch_threads`` (default :data:`MODEL_THREADS`): local, on a Dask worker
(whatever its nanny set), in the edit and Jacobian stages' regeneration. The count is
part of the sample stage's config hash, since it is part of what the samples are. More
threads speed up each call on an idle machine: sampling one demo batch (64 images, 10
steps) took 3.01 s at 2 threads against 5.01 s at 1 on 2 idle cores (median of 5
interleaved rounds, ratio 0.60, 0.54-0.66); more processes (``--dask local`` with
``runner.n_workers``) add parallelism across batches.

Bit-identity holds on one kind of CPU with one torch build: oneDNN and MKL choose their
kernels by instruction set (AVX-512, AVX2, ...), so workers on other CPU types can still
differ from the local machine in the last bits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

MODEL_THREADS = 2
"""The default torch intra-op threads of every model call in hmine's sampler (``sample.torch_threads``)."""


@contextmanager
def model_threads(n: int = MODEL_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's setting.

    ``torch.set_num_threads`` sets OpenMP's and MKL's thread counts for the calling thread
    (and the default for threads that have not run torch yet), so nesting and concurrent
    Dask task threads are safe.
    """
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
