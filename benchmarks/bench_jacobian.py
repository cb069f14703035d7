"""Jacobian directions: several samples at once against one at a time, and the algorithms.

All find the top-k right singular vectors of J = d eps / d h (hmine.jacobian) with the
same U-Net, x_t, timestep, k, tolerance and seeded random start. Methods are timed as
interleaved pairs A, B, A, B, ... in one process after one untimed run of each
(``benchmarks/common.py``); printed are the best and median seconds of each and the
median of the paired ratios with its spread (min-max).

``--compare samples`` (default): the Jacobian stage's work for ``--samples`` images of a
DDIM trajectory at one step,

- **one at a time**: :func:`hmine.jacobian.jacobian_subspace` per image (the stage up to
  2026-12-02);
- **batched**: :func:`hmine.jacobian.jacobian_subspaces`, every image's Krylov block in
  one U-Net call, converged images dropping out (the stage now, ``jacobian.batch_size``);

with the largest principal angle between the two results per image (goal: < 0.01 deg).
``--rank R`` times the localised search instead (k = R per image, as the stage's
``jacobian.localised_rank``).

``--compare algorithms``: one image; block Krylov (hmine's solver) against power iteration
with deflation on the same products (``sequential``), and against it with the published
code's forward-mode J v (``published``).

    python benchmarks/bench_jacobian.py                                  # embedded model, 8 samples
    python benchmarks/bench_jacobian.py --compare algorithms --step 700
    python benchmarks/bench_jacobian.py --config celebahq --device cuda  # for a GPU (random weights)
    python benchmarks/bench_jacobian.py --config celebahq --samples 2 --ddim-steps 1 --pairs 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load, paired, ratio_summary  # noqa: E402


def trajectory_points(model, n: int, step: int, ddim_steps: int, position: str, threads: int):
    """x_t (n, C, H, W), h0 (n, c, y, x) and t of ``n`` seeded DDIM trajectories at the step nearest ``step``."""
    from hmine.sampling import Sampler

    sampler = Sampler(model, num_inference_steps=ddim_steps, h_position=position, torch_threads=threads)
    index = min(range(ddim_steps), key=lambda i: abs(int(sampler.timesteps[i]) - step))
    out = sampler.sample(list(range(n)), return_trajectory=True)
    return out.trajectory[:, index].clone(), out.h[:, index].float().clone(), int(sampler.timesteps[index])


def times_line(name: str, seconds: list[float]) -> str:
    return f"{name:<13} best {min(seconds):8.3f} s  median {statistics.median(seconds):8.3f} s  ({len(seconds)} runs)"


def with_cpu_time(fn, seconds: list[float]):
    """``fn`` that also appends the CPU seconds of this process it took to ``seconds``."""

    def call():
        started = time.process_time()
        fn()
        seconds.append(time.process_time() - started)

    return call


def compare_samples(args, model, x_t, h0, t) -> None:
    import torch

    from hmine.jacobian import (
        eps_of_h,
        eps_of_h_rows,
        jacobian_subspace,
        jacobian_subspaces,
        localised_directions,
        localised_directions_batch,
        principal_angles_degrees,
    )

    unet, n = model.unet, len(h0)
    seeds = list(range(n))
    settings = dict(tol=args.tol, max_iter=args.max_iter)
    masks = None
    if args.rank:  # the left half of the image: any fixed region does for the cost
        masks = torch.zeros(n, 1, *x_t.shape[-2:], dtype=x_t.dtype, device=x_t.device)
        masks[..., : x_t.shape[-1] // 2] = 1.0
    results = {}

    def one_at_a_time():
        out = []
        for r in range(n):
            f = eps_of_h(unet, x_t[r : r + 1], t, args.position)
            if args.rank:
                out.append(localised_directions(f, h0[r], masks[r : r + 1], k=args.k, rank=args.rank, seed=r, **settings))
            else:
                out.append(jacobian_subspace(f, h0[r], k=args.k, seed=r, **settings))
        results["one"] = out

    def batched():
        f = eps_of_h_rows(unet, x_t, t, args.position)
        if args.rank:
            results["batched"] = localised_directions_batch(f, h0, masks, k=args.k, rank=args.rank, seeds=seeds, **settings)
        else:
            results["batched"] = jacobian_subspaces(f, h0, k=args.k, seeds=seeds, **settings)

    what = f"localised search (rank {args.rank}, k {args.k})" if args.rank else f"top-{args.k} subspace"
    print(f"{what} of {n} samples at t={t}, tol={args.tol}, max_iter={args.max_iter}")
    memory = {}
    for name, fn in (("one", one_at_a_time), ("batched", batched)):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            fn()
            memory[name] = torch.cuda.max_memory_allocated() / 2**30
    cpu = {"one": [], "batched": []}
    times_one, times_batched = paired(
        with_cpu_time(one_at_a_time, cpu["one"]),
        with_cpu_time(batched, cpu["batched"]),
        args.pairs,
        args.device,
        warmup=not memory,
    )
    print(times_line("one at a time", times_one))
    print(times_line("batched", times_batched))
    if memory:
        print(f"peak GPU memory: one at a time {memory['one']:.2f} GiB, batched {memory['batched']:.2f} GiB")
    print(f"speed-up, batched over one at a time (median of paired ratios, min-max): {ratio_summary(times_one, times_batched)}")
    # on a shared CPU the wall time waits for other processes; the process's CPU seconds do not
    cpu_one, cpu_batched = cpu["one"][-args.pairs :], cpu["batched"][-args.pairs :]
    print(
        f"CPU seconds of this process (all threads), median: one at a time {statistics.median(cpu_one):.3f}, "
        f"batched {statistics.median(cpu_batched):.3f}; paired ratio {ratio_summary(cpu_one, cpu_batched)}"
    )
    angles, iterations = [], []
    for one, many in zip(results["one"], results["batched"]):
        angles.append(float(principal_angles_degrees(one.vectors, many.vectors).max()))
        space_one = one.search_space if args.rank else one
        space_many = many.search_space if args.rank else many
        iterations.append((space_one.iterations, space_many.iterations, space_many.converged))
    print("iterations per sample (one at a time, batched, converged): " + ", ".join(f"{a}/{b}/{c}" for a, b, c in iterations))
    print(f"largest principal angle between the two results, per sample (deg): {', '.join(f'{a:.2e}' for a in angles)}")
    print(f"max over samples: {max(angles):.2e} deg (goal < 0.01)")


def compare_algorithms(args, model, x_t, h0, t) -> None:
    from hmine.jacobian import eps_of_h, jacobian_subspace, principal_angles_degrees, sequential_power_iteration

    f = eps_of_h(model.unet, x_t[:1], t, args.position)
    settings = dict(k=args.k, tol=args.tol, max_iter=args.max_iter, seed=0)
    results = {}

    def run(name, method, **extra):
        def call():
            results[name] = method(f, h0[0], **settings, **extra)

        return call

    krylov = run("block Krylov", jacobian_subspace)
    print(f"one image at t={t}, k={args.k}, tol={args.tol}, max_iter={args.max_iter} (per vector for power iteration)")
    for name, extra in (("sequential", {}), ("published", {"forward_mode": True})):
        times_krylov, times_other = paired(krylov, run(name, sequential_power_iteration, **extra), args.pairs, args.device)
        print(times_line("block Krylov", times_krylov))
        print(times_line(name, times_other))
        print(
            f"speed-up, block Krylov over {name} (median of paired ratios, min-max): {ratio_summary(times_other, times_krylov)}"
        )
    for name, result in results.items():
        values = ", ".join(f"{s:.4f}" for s in result.singular_values.tolist())
        print(
            f"{name:<13} J v {result.n_jvp:>4}  J^T u {result.n_vjp:>4}  iterations {result.iterations:>4}  "
            f"converged {result.converged}  max residual {result.residuals.max().item():.2e}  sigma {values}"
        )
    angles = principal_angles_degrees(results["block Krylov"].vectors, results["sequential"].vectors)
    print("principal angles, block Krylov vs sequential (deg): " + ", ".join(f"{a:.3f}" for a in angles))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["embedded", "celebahq"], default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare", choices=["samples", "algorithms"], default="samples")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rank", type=int, default=0, help="time the localised search of this rank instead")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=50)
    parser.add_argument("--step", type=int, default=100, help="timestep value (the nearest of the schedule)")
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--position", default="after", choices=["before", "middle", "after"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = load(args.config, Path(tmp), args.device)
    model.unet.eval().requires_grad_(False)
    x_t, h0, t = trajectory_points(model, args.samples, args.step, args.ddim_steps, args.position, args.threads)
    torch.set_num_threads(args.threads)  # the sampler restores the caller's threads
    print(
        f"config {args.config} on {args.device}, h {tuple(h0.shape[1:])}, threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {args.pairs} interleaved pairs after one untimed run of each"
    )
    print(f"load average before (1, 5, 15 min; {os.cpu_count()} CPUs): {load_average()}")
    if args.compare == "samples":
        compare_samples(args, model, x_t, h0, t)
    else:
        compare_algorithms(args, model, x_t, h0, t)
    print(f"load average after: {load_average()}")  # the machine may be shared: how busy it was


def load_average() -> str:
    return ", ".join(f"{load:.2f}" for load in os.getloadavg())


if __name__ == "__main__":
    main()
