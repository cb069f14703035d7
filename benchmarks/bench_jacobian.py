"""Batched block Krylov iteration against sequential power iteration for the Jacobian directions.

All find the top-k right singular vectors of J = d eps / d h (hmine.jacobian) for the
same U-Net, x_t, timestep, k, tolerance and random start. Three rows per timestep:
``batched`` is hmine's solver; ``sequential`` is the reference algorithm (power
iteration with deflation) on the same product functions (J^T u by a vjp, J v by a vjp
of that vjp), so that their ratio is about the algorithm alone; ``published`` is the
reference algorithm with the published code's forward-mode J v, so that its ratio is
hmine's stage against the reference as released. x_t comes from a short DDIM trajectory of the model itself, started from
seeded noise. Prints a table (wall time, J and J^T products, iterations, largest
residual, top singular values), the speed-up of the batched method and the principal
angles between the batched and sequential subspaces (goal: batched >= 5x faster than
the reference).

    python benchmarks/bench_jacobian.py                        # embedded shapes DDPM, else random init
    python benchmarks/bench_jacobian.py --model PATH --k 3 --tol 1e-3 --steps 700 300
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "hmine" / "embedded" / "shapes-ddpm" / "unet"

# the embedded shapes DDPM's architecture, for when its weights are not there
EMBEDDED_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D",) * 3,
    up_block_types=("UpBlock2D",) * 3,
    add_attention=True,
    norm_num_groups=32,
)


def load_unet_and_scheduler(model: Path | None):
    """The U-Net (eval, frozen) and a DDIM scheduler; random weights if no model is found."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    path = model if model is not None else DEFAULT_MODEL
    if path.exists():
        unet = UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)
        where = str(path)
        scheduler_dirs = [path, path.parent / "scheduler", path.parent]
        found = [d for d in scheduler_dirs if (d / "scheduler_config.json").exists()]
        scheduler_config = DDPMScheduler.load_config(found[0]) if found else DDPMScheduler().config
    elif model is not None:
        raise SystemExit(f"--model {model} does not exist")
    else:
        torch.manual_seed(0)
        unet = UNet2DModel(**EMBEDDED_CONFIG)
        where = f"random init, embedded config ({DEFAULT_MODEL} not found)"
        scheduler_config = DDPMScheduler(num_train_timesteps=1000).config
    scheduler = DDIMScheduler.from_config(scheduler_config)
    return unet.eval().requires_grad_(False), scheduler, where


def noisy_images(unet, scheduler, timesteps: list[int], ddim_steps: int, seed: int):
    """x_t of one DDIM trajectory (eta=0) at the schedule timesteps nearest to ``timesteps``."""
    scheduler.set_timesteps(ddim_steps)
    schedule = [int(t) for t in scheduler.timesteps]
    wanted = {min(schedule, key=lambda s: abs(s - t)) for t in timesteps}
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    picked = {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            if int(t) in wanted:
                picked[int(t)] = x.clone()
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return picked


def timed(method, f, h0, **kwargs):
    started = time.perf_counter()
    result = method(f, h0, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a UNet2DModel folder")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=200, help="per vector for the sequential method")
    parser.add_argument("--steps", type=int, nargs="+", default=[700, 300], help="timestep values")
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--position", default="after", choices=["before", "middle", "after"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hmine.jacobian import (
        eps_of_h,
        h_at,
        jacobian_subspace,
        principal_angles_degrees,
        sequential_power_iteration,
    )

    unet, scheduler, where = load_unet_and_scheduler(args.model)
    print(f"model: {where}")
    print(
        f"k={args.k} tol={args.tol} max_iter={args.max_iter} position={args.position} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(
        "products: J^T u = vjp, J v = vjp of that vjp, one linearisation per solve "
        "(published: J v by forward mode, jvp)"
    )
    header = (
        f"{'t':>4} {'method':<11} {'wall s':>7} {'J v':>5} {'J^T u':>6} {'iters':>5} "
        f"{'conv':>5} {'max resid':>9}  top singular values"
    )
    speedups, published_speedups = [], []
    for t, x_t in sorted(noisy_images(unet, scheduler, args.steps, args.ddim_steps, args.seed).items(), reverse=True):
        f = eps_of_h(unet, x_t, t, args.position)
        h0 = h_at(unet, x_t, t, args.position)
        # warm-up: one product of each kind, so neither method pays first-call costs
        sequential_power_iteration(f, h0, 1, tol=args.tol, max_iter=1, seed=args.seed)
        jacobian_subspace(f, h0, args.k, tol=args.tol, max_iter=1, seed=args.seed)
        settings = dict(k=args.k, tol=args.tol, max_iter=args.max_iter, seed=args.seed)
        batched, batched_s = timed(jacobian_subspace, f, h0, **settings)
        sequential, sequential_s = timed(sequential_power_iteration, f, h0, **settings)
        published, published_s = timed(sequential_power_iteration, f, h0, forward_mode=True, **settings)
        print(f"\nh shape {tuple(h0.shape)}, x_t at t={t}")
        print(header)
        rows = (("batched", batched, batched_s), ("sequential", sequential, sequential_s), ("published", published, published_s))
        for name, result, seconds in rows:
            values = ", ".join(f"{s:.4f}" for s in result.singular_values.tolist())
            print(
                f"{t:>4} {name:<11} {seconds:>7.2f} {result.n_jvp:>5} {result.n_vjp:>6} "
                f"{result.iterations:>5} {str(result.converged):>5} {result.residuals.max().item():>9.2e}  {values}"
            )
        angles = principal_angles_degrees(batched.vectors, sequential.vectors)
        per_vector = [
            principal_angles_degrees(batched.vectors[i : i + 1], sequential.vectors[i : i + 1])[0]
            for i in range(args.k)
        ]
        speedups.append(sequential_s / batched_s)
        published_speedups.append(published_s / batched_s)
        batched_ms = batched_s / batched.n_jvp * 1e3
        sequential_ms = sequential_s / sequential.n_jvp * 1e3
        # the speed-up is the product of the two: fewer products, each cheaper per column
        print(
            f"speed-up (sequential / batched wall time): {speedups[-1]:.2f}x = "
            f"{sequential.n_jvp / batched.n_jvp:.2f}x fewer products x {sequential_ms / batched_ms:.2f}x less "
            f"wall time per J v + J^T u pair (batched {batched_ms:.1f} ms, sequential {sequential_ms:.1f} ms)"
        )
        print(f"speed-up against the published reference (published / batched): {published_speedups[-1]:.2f}x")
        print(
            "principal angles between the subspaces (deg): "
            + ", ".join(f"{a:.3f}" for a in angles)
            + "; angle between matching vectors (deg): "
            + ", ".join(f"{a:.3f}" for a in per_vector)
        )
    print(
        f"\nspeed-up per timestep against the reference as published: "
        f"{', '.join(f'{s:.2f}x' for s in published_speedups)} (goal >= 5x); "
        f"algorithm alone (same products): {', '.join(f'{s:.2f}x' for s in speedups)}"
    )


if __name__ == "__main__":
    main()
