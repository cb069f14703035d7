"""Training an editor through Asyrp's asymmetric reverse process, in hmine's one training loop.

One optimizer step (Kwon et al. 2023, ``run_training``, batched):

1. draw ``batch_size`` of the training seeds with a generator seeded by (seed, step);
2. run each seed's unedited trajectory (its own x_T and noise, :mod:`hmine.sampling`) up
   to the first edited step, without gradients;
3. at every edited step, from t_0 (the window's top) down to t_edit: the unedited eps and
   the edited eps (h + the editor's change) at the same x_t, their predictions of x0
   P_t^orig and P_t^edit, the loss of (P_t^edit, P_t^orig) (:mod:`hmine.learning.losses`),
   and its backward pass right away; then Asyrp's asymmetric step (edited eps in P_t, the
   original in the direction term) gives the next x_t, detached as Asyrp's ``xt_next.detach()``;
4. one optimizer step on the gradients summed over the steps (Asyrp steps per timestep).

**Memory.** Gradients flow through one step only, and each step's loss is backpropagated as
soon as it is computed, so at most one U-Net step's graph (for the batch) is held, however
many steps are edited: peak memory does not grow with the number of steps.

**Resumable.** :func:`hmine.world.training.train_loop` runs the steps: checkpoints in
safetensors + JSON, and since a step's batch and noise depend only on (seed, step), a run
resumed from a checkpoint computes what an uninterrupted one would (tested bit for bit).
The loop backpropagates the loss it is given; the per-step gradients are already summed
when the loss returns, so it returns a carrier whose gradient is exactly that sum
(:func:`_gradient_carrier`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hmine.learning.editors import FunctionHook
from hmine.regeneration import first_edited_step, unedited_states
from hmine.sampling import Sampler
from hmine.threads import model_threads

logger = logging.getLogger(__name__)

LossFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def predicted_x0(sampler: Sampler, eps: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """P_t = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), clipped as the sampler's step clips it."""
    a_t = float(sampler.scheduler.alphas_cumprod[int(t)])
    pred = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return pred.clamp(-sampler.clip_sample_range, sampler.clip_sample_range) if sampler.clip_sample else pred


def decoded(model, x0: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of a prediction of x0, with gradients: ``DiffusionModel.decode_with_grad``
    (any autoencoder, its scaling and shift factors, as the saved images are decoded)."""
    return model.decode_with_grad(x0)


def trajectory_step_losses(sampler: Sampler, editor, seeds: Sequence[int], loss_fn: LossFunction, edit_steps: Sequence[bool]):
    """Steps 2-3 of the module docstring for ``seeds``: backpropagates each edited step's loss / n_steps.

    Returns the mean loss over the edited steps (a float) and the means of its parts.
    """
    param = next(sampler.model.unet.parameters())
    first = first_edited_step(edit_steps)
    last = max(i for i, e in enumerate(edit_steps) if e)
    n_edited = last - first + 1
    x = unedited_states(sampler, [int(s) for s in seeds], first, len(seeds)).to(param).clone()
    from hmine.sampling import noise_for_seed

    noise = torch.stack([noise_for_seed(int(s), sampler.model.sample_shape, sampler.num_inference_steps)[1] for s in seeds], dim=1)
    noise = noise.to(param)
    total, parts = 0.0, {}
    for i in range(first, last + 1):
        t = sampler.timesteps[i]
        t_batch = t.expand(x.shape[0]).to(x.device)
        with torch.no_grad():
            eps_original = sampler.eps(sampler.unet_output(x, t_batch), t, x)
        with FunctionHook(sampler.model.unet, sampler.h_position, lambda h: editor(h, i, t)):
            eps = sampler.eps(sampler.unet_output(x, t_batch), t, x)
        with torch.no_grad():
            original = decoded(sampler.model, predicted_x0(sampler, eps_original, t, x))
        loss, step_parts = loss_fn(decoded(sampler.model, predicted_x0(sampler, eps, t, x)), original)
        (loss / n_edited).backward()  # frees this step's graph
        total += float(loss.detach()) / n_edited
        for key, value in step_parts.items():
            parts[key] = parts.get(key, 0.0) + float(value) / n_edited
        asymmetric = sampler.direction_weight(int(t), sampler.etas[i]) != 0.0
        with torch.no_grad():
            x = sampler.step(eps.detach(), eps_original if asymmetric else eps.detach(), int(t), x, sampler.etas[i], noise[i])
    return total, parts


def _gradient_carrier(parameters: list[torch.nn.Parameter], value: float) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient is the parameters' current ``.grad`` (which it clears).

    d/dp sum(p * g) = g exactly (1.0 * g), so the loop's backward restores the summed
    per-step gradients bit for bit.
    """
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in parameters]
    for p in parameters:
        p.grad = None
    surrogate = sum((p * g).sum() for p, g in zip(parameters, grads))
    return surrogate - surrogate.detach() + value


def batch_seeds(train_seeds: Sequence[int], batch_size: int, seed: int, step: int) -> list[int]:
    """The training seeds of optimizer step ``step``: drawn without replacement by a generator seeded (seed, step)."""
    rng = np.random.default_rng([int(seed), int(step)])
    size = min(batch_size, len(train_seeds))
    return [int(s) for s in rng.choice(np.asarray(train_seeds, dtype=np.int64), size=size, replace=False)]


def train_editor(
    sampler: Sampler,
    editor: torch.nn.Module,
    loss_fn: LossFunction,
    train_seeds: Sequence[int],
    edit_steps: Sequence[bool],
    work_dir: Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    checkpoint_every: int = 10,
    until_step: int | None = None,
    handle_signals: bool = False,
):
    """Train ``editor`` with Adam in ``work_dir`` (resuming from its newest checkpoint).

    ``work_dir`` must hold the run's ``config.json`` already
    (:func:`hmine.world.training.check_work_dir_config`). Returns
    :class:`hmine.world.training.TrainResult` (the editor in eval mode).
    """
    from hmine.world.training import Schedule, Trainee, train_loop

    sampler.model.unet.requires_grad_(False)
    editor.to(next(sampler.model.unet.parameters()).device)
    parameters = [p for p in editor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)

    def loss(step: int):
        optimizer.zero_grad(set_to_none=True)  # the loop zeroes after this call: the last step's gradients are still here
        seeds = batch_seeds(train_seeds, batch_size, seed, step)
        value, parts = trajectory_step_losses(sampler, editor, seeds, loss_fn, edit_steps)
        return _gradient_carrier(parameters, value), {k: torch.tensor(v) for k, v in parts.items()}

    trainee = Trainee(model=editor, optimizer=optimizer, loss=loss, learning_rate_at=lambda step: learning_rate)
    schedule = Schedule(steps=steps, checkpoint_every=checkpoint_every, log_every=1, keep_checkpoints=2)
    with model_threads(sampler.torch_threads):
        return train_loop(trainee, schedule, Path(work_dir), until_step=until_step, handle_signals=handle_signals)
