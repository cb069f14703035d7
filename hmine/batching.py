"""The U-Net batch size for a device: a fixed number, or ``"auto"``, measured.

On a CPU a U-Net call is fastest per image at a moderate batch (the embedded model: 64
beats 16 and 128 on two cores); on a GPU larger batches pay until memory runs out. A
stage that regenerates images with :mod:`hmine.regeneration` fixes one batch size for
its whole output (a row's result depends on the call's batch shape, not on its
neighbours), so an ``"auto"`` choice is made once, recorded in the output's attributes
and reused when the stage resumes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from hmine.sampling import Sampler
from hmine.threads import model_threads

logger = logging.getLogger(__name__)

#: Batch sizes tried by ``"auto"``: at least 8 (below, CPU kernels change with the batch size).
AUTO_CANDIDATES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)


def _seconds_per_image(sampler: Sampler, batch: int, repeats: int) -> float:
    unet = sampler.model.unet
    param = next(unet.parameters())
    x = torch.randn((batch, *sampler.model.sample_shape), generator=torch.Generator().manual_seed(0)).to(param)
    t = sampler.timesteps[len(sampler.timesteps) // 2].expand(batch).to(param.device)
    best = float("inf")
    with torch.inference_mode():
        unet(x, t)  # warm-up: kernel selection and allocation are not the steady cost
        for _ in range(repeats):
            if param.device.type == "cuda":
                torch.cuda.synchronize(param.device)
            started = time.perf_counter()
            unet(x, t)
            if param.device.type == "cuda":
                torch.cuda.synchronize(param.device)
            best = min(best, time.perf_counter() - started)
    return best / batch


def choose_batch_size(sampler: Sampler, candidates: Sequence[int] = AUTO_CANDIDATES, repeats: int = 2) -> int:
    """The candidate batch size with the least U-Net time per image on the sampler's device.

    Stops at the first candidate that runs out of memory, and once two larger candidates
    in a row are slower per image than the best so far.
    """
    best_batch, best_time, worse = None, float("inf"), 0
    with model_threads(sampler.torch_threads):
        for batch in sorted(candidates):
            try:
                per_image = _seconds_per_image(sampler, batch, repeats)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                break
            logger.info("U-Net batch %d: %.2f ms per image", batch, per_image * 1e3)
            if per_image < best_time:
                best_batch, best_time, worse = batch, per_image, 0
            else:
                worse += 1
                if worse == 2:
                    break
    if best_batch is None:
        raise RuntimeError(f"no U-Net batch size among {list(candidates)} fits in the device's memory")
    return best_batch
