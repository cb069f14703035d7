"""A DDIM-family sampler with exact regeneration and h-space edits.

A sample is fully determined by (model, seed, eta schedule, number of steps): its x_T
and its per-step noise z_t come, in that order, from one ``torch.Generator`` seeded with
the sample's seed (on the CPU, so the draw does not depend on the device or on the batch
the sample lands in). Regenerating a seed with a delta on h therefore replays the same
trajectory, and only the edit differs (Haas et al. 2024, §3).

The step is DDIM's generalised update (Song et al. 2021, eq. 12), written out here so the
predicted-x0 and direction terms can take different eps (Asyrp, Kwon et al. 2023, eq. 5)::

    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    P_t     = (x_t - sqrt(1 - a_t) * eps_P) / sqrt(a_t)          # predicted x0
    D_t     = sqrt(1 - a_prev - sigma_t**2) * eps_D               # direction to x_t
    x_prev  = sqrt(a_prev) * P_t + D_t + sigma_t * z_t

eta = 0 is DDIM, eta = 1 is DDPM-like; eta may differ per step. Without edits
eps_P = eps_D = eps. When the model's scheduler config sets ``clip_sample`` (as
google/ddpm-ema-celebahq-256 does), P_t is clipped to [-1, 1] exactly as diffusers'
DDIMScheduler does. With an edit, eps_P is the edited eps; eps_D is the edited eps too,
unless ``asymmetric=True``, where it is the original eps (one extra U-Net pass per step).

A text-conditional model (:mod:`hmine.conditioning`) conditions each image on its prompt,
a function of its seed (:class:`hmine.prompts.TextConfig`), with classifier-free guidance
as diffusers' ``StableDiffusionPipeline`` computes it; the DDIM step above then takes the
guided eps. Its h is that of one guidance branch, its edits add the delta in the branches
the config names.

Every sampling call runs with one fixed torch thread count (``torch_threads``, the run's
``sample.torch_threads``; :func:`hmine.threads.model_threads`): torch's CPU kernels round
differently at different thread counts, so this is what makes a sample the same bits in
the calling process, on a Dask worker, and when the edit and Jacobian stages regenerate it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from hmine.hooks import HPosition, HSpaceHook
from hmine.models import DiffusionModel
from hmine.threads import MODEL_THREADS, model_threads

#: U-Net compute precisions (:meth:`Sampler.unet_output`).
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass
class SampleOutput:
    """What a sampling run returns.

    Attributes
    ----------
    images : Tensor of shape (batch, color, height, width)
        Final images in [-1, 1] (decoded for a latent model).
    h : Tensor of shape (batch, step, channel, y, x), or None
        h at every step, as computed before any edit.
    timesteps : Tensor of shape (step,)
    trajectory : Tensor of shape (batch, step, C, H, W), or None
        The U-Net input x_t of every step (when asked for).
    prompts : list of str, or None
        Each image's prompt (a text-conditional model only).
    """

    images: torch.Tensor
    h: torch.Tensor | None
    timesteps: torch.Tensor
    trajectory: torch.Tensor | None = None
    prompts: list[str] | None = None


def resolve_etas(eta: float | Sequence[float], num_inference_steps: int) -> list[float]:
    """One eta per step from a scalar or a per-step list (checked for length and range)."""
    etas = [float(eta)] * num_inference_steps if isinstance(eta, (int, float)) else [float(e) for e in eta]
    if len(etas) != num_inference_steps:
        raise ValueError(
            f"eta has {len(etas)} entries but num_inference_steps is {num_inference_steps}; "
            "give one eta per step or a single number"
        )
    if any(not 0 <= e <= 1 for e in etas):
        # above 1, sigma_t^2 can exceed 1 - a_prev and the DDIM direction term is undefined
        raise ValueError(f"eta must be between 0 and 1 at every step (0 = DDIM, 1 = DDPM-like), got {etas}")
    return etas


def noise_for_seed(seed: int, shape: tuple[int, ...], num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T of shape ``shape`` and per-step noise of shape (num_steps, *shape) for one seed."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = torch.randn(shape, generator=generator)
    z = torch.randn((num_steps, *shape), generator=generator)
    return x_T, z


class Sampler:
    """Batched DDIM / DDPM-like sampling with h capture and h edits.

    Parameters
    ----------
    model : DiffusionModel
    num_inference_steps : int, default=10
    eta : float or list of float, default=0.0
        0 is DDIM, 1 is DDPM-like; a list gives one eta per step.
    h_position : {"before", "middle", "after"}, default="after"
    torch_threads : int, default=hmine.threads.MODEL_THREADS
        torch intra-op threads of every model call (fixed: the results depend on it).
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        The U-Net's compute precision: below float32, every U-Net call runs under
        ``torch.autocast`` (weights, x_t and the DDIM arithmetic stay float32; h is
        recorded as computed).
    compile : bool, default=False
        Run the U-Net's blocks under ``torch.compile`` (:mod:`hmine.compiling`); the h
        hook and edits work as in eager mode. Only this sampler's calls are compiled.
    compile_backend : str or callable, default="inductor"
        The dynamo backend when ``compile`` is set.
    text : hmine.prompts.TextConfig, optional
        Prompts, negative prompt, guidance scale and branches; required for a
        text-conditional model, refused for any other.
    """

    def __init__(
        self,
        model: DiffusionModel,
        *,
        num_inference_steps: int = 10,
        eta: float | Sequence[float] = 0.0,
        h_position: HPosition = "after",
        torch_threads: int = MODEL_THREADS,
        precision: str = "float32",
        compile: bool = False,
        compile_backend="inductor",
        text=None,
    ):
        from diffusers import DDIMScheduler

        from hmine.conditioning import TextConditioning

        if model.text_conditional and text is None:
            raise ValueError(
                f"model.id {model.model_id!r} is text-conditional: give its prompts in sample.text "
                "(prompts: [...] or template: with slots:)"
            )
        self.text = TextConditioning(model, text) if text is not None else None
        self._context: tuple[int, torch.Tensor] | None = None

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}; set model.precision")
        self.precision = precision
        self.compiled = None
        if compile:
            from hmine.compiling import CompiledBlocks

            self.compiled = CompiledBlocks(model.unet, compile_backend)

        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.prediction_type = model.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"the model predicts {self.prediction_type!r}; hmine's sampler supports "
                "'epsilon' and 'v_prediction' models"
            )
        self.model = model
        self.h_position = h_position
        self.torch_threads = torch_threads
        self.etas = resolve_etas(eta, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        # DDIM's timestep spacing and alpha bookkeeping, whatever scheduler the model ships.
        self.scheduler = DDIMScheduler.from_config(model.scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps)
        self.timesteps = self.scheduler.timesteps.clone()
        self.clip_sample = bool(self.scheduler.config.get("clip_sample", False))
        self.clip_sample_range = float(self.scheduler.config.get("clip_sample_range", 1.0))
        if self.scheduler.config.get("thresholding", False):
            raise ValueError("dynamic thresholding is not supported; set thresholding=False in the scheduler config")

    def unet_output(self, x: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
        """The U-Net's (guided) output at x_t, computed at the sampler's ``precision``, in x's dtype.

        A text-conditional model is called inside :meth:`conditioned_on` the rows of ``x``.
        """
        if self.text is None:
            return self.unet_forward(x, t_batch)
        if self._context is None or self._context[0] != x.shape[0]:
            raise RuntimeError(f"call a text-conditional sampler's U-Net inside conditioned_on({x.shape[0]} rows)")
        rows, states = self._context
        branches = self.text.branches
        out = self.unet_forward(torch.cat([x] * branches), t_batch.repeat(branches), states)
        return self.text.combine(out, rows)

    def unet_forward(self, x, t_batch, encoder_hidden_states=None) -> torch.Tensor:
        """The U-Net's raw output (every row of the call, no guidance) at the sampler's precision,
        compiled when the sampler is."""
        unet = self.model.unet
        kwargs = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
        with nullcontext() if self.compiled is None else self.compiled.active():
            if self.precision == "float32":
                return unet(x, t_batch, **kwargs).sample
            with torch.autocast(device_type=x.device.type, dtype=getattr(torch, self.precision)):
                out = unet(x, t_batch, **kwargs).sample
            return out.to(x.dtype)

    def prompts_for(self, seeds: Sequence[int]) -> list[str] | None:
        """Each seed's prompt (:meth:`hmine.prompts.TextConfig.prompt_for`); None without text."""
        return None if self.text is None else [self.text.config.prompt_for(int(s)) for s in seeds]

    @contextmanager
    def conditioned_on(self, seeds: Sequence[int], *, rows: int | None = None, prompts: Sequence[str] | None = None):
        """Condition the U-Net calls inside on the seeds' prompts (or ``prompts``, one per seed).

        ``rows`` is the batch of every call inside (padded beyond the seeds); nothing
        happens for a model without text.
        """
        if self.text is None:
            if prompts is not None:
                raise ValueError(f"model.id {self.model.model_id!r} takes no prompts; sample it without prompts")
            yield
            return
        prompts = list(prompts) if prompts is not None else self.prompts_for(seeds)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds; give one prompt per seed")
        rows = len(seeds) if rows is None else rows
        param = next(self.model.unet.parameters())
        previous = self._context
        self._context = (rows, self.text.context(prompts, rows, like=param))
        try:
            yield
        finally:
            self._context = previous

    def h_delta(self, delta: torch.Tensor, rows: int) -> torch.Tensor:
        """A delta for h, (C, y, x) or (rows, C, y, x), laid out over one U-Net call's h rows."""
        return delta if self.text is None else self.text.delta_rows(delta, rows)

    def h_rows(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """The recorded h of the images (the configured guidance branch) from one call's h."""
        return h if self.text is None else self.text.branch_rows(h, rows)

    def _alphas(self, t: int) -> tuple[float, float]:
        sched = self.scheduler
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        return float(a_t), float(a_prev)

    def eps(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        """The noise prediction eps from the U-Net's output.

        For a v-prediction model (Salimans & Ho 2022), v = sqrt(a_t) eps - sqrt(1 - a_t) x0,
        so eps = sqrt(a_t) v + sqrt(1 - a_t) x_t: an affine map with x_t fixed, so the
        h-space Jacobian of eps is sqrt(a_t) times that of v.
        """
        if self.prediction_type == "epsilon":
            return model_output
        a_t, _ = self._alphas(int(t))
        return a_t**0.5 * model_output + (1 - a_t) ** 0.5 * x_t

    def eps_jacobian_scale(self, t: int) -> float:
        """d eps / d(U-Net output) at fixed x_t: 1, or sqrt(a_t) for a v-prediction model."""
        return 1.0 if self.prediction_type == "epsilon" else self._alphas(int(t))[0] ** 0.5

    def _sigma(self, t: int, eta: float) -> float:
        """sigma_t of eq. 12 (Song et al. 2021), eq. 16 for eta."""
        a_t, a_prev = self._alphas(int(t))
        return eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5

    def direction_weight(self, t: int, eta: float) -> float:
        """The weight of eps_D in the step, sqrt(1 - a_prev - sigma_t^2).

        It is 0 at the last step when the final alpha is 1 (``set_alpha_to_one``): there
        eps_D does not matter, and Asyrp's step needs no unedited eps.
        """
        _, a_prev = self._alphas(int(t))
        return (1 - a_prev - self._sigma(t, eta) ** 2) ** 0.5

    def step(self, eps_P, eps_D, t: int, x_t, eta: float, z) -> torch.Tensor:
        """One DDIM update (module docstring); ``z`` is the stored noise of this step."""
        a_t, a_prev = self._alphas(int(t))
        # 1. sigma_t of eq. 12 (Song et al. 2021), eq. 16 for eta
        sigma = self._sigma(t, eta)
        # 2. predicted x0, "P_t" in Asyrp's notation; clipped like DDIMScheduler when the
        #    model's scheduler asks for it (google/ddpm-* do), the direction keeps raw eps
        pred_x0 = (x_t - (1 - a_t) ** 0.5 * eps_P) / a_t**0.5
        if self.clip_sample:
            pred_x0 = pred_x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        # 3. direction pointing to x_t, "D_t"
        direction = self.direction_weight(t, eta) * eps_D
        x_prev = a_prev**0.5 * pred_x0 + direction
        if eta > 0:
            x_prev = x_prev + sigma * z
        return x_prev

    def sample(
        self,
        seeds: Sequence[int],
        *,
        delta_h: torch.Tensor | None = None,
        edit_steps: Sequence[bool] | None = None,
        asymmetric: bool = False,
        record_h: bool = True,
        return_trajectory: bool = False,
        prompts: Sequence[str] | None = None,
    ) -> SampleOutput:
        """Generate (or regenerate) one image per seed, at ``torch_threads`` threads (module docstring).

        Parameters
        ----------
        seeds : sequence of int
        delta_h : Tensor of shape (step, channel, y, x) or (batch, step, channel, y, x), optional
            Added to h at each edited step.
        edit_steps : sequence of bool of length step, optional
            Which steps get the edit (e.g. only t >= t_edit); all steps by default.
        asymmetric : bool, default=False
            Asyrp's step: the original eps in the direction term.
        record_h : bool, default=True
        return_trajectory : bool, default=False
        prompts : sequence of str, optional
            One prompt per seed instead of the config's (a text-conditional model only).
        """
        with model_threads(self.torch_threads), self.conditioned_on(seeds, prompts=prompts):
            out = self._sample(
                seeds,
                delta_h=delta_h,
                edit_steps=edit_steps,
                asymmetric=asymmetric,
                record_h=record_h,
                return_trajectory=return_trajectory,
            )
        out.prompts = list(prompts) if prompts is not None else self.prompts_for(seeds)
        return out

    @torch.inference_mode()
    def _sample(
        self,
        seeds: Sequence[int],
        *,
        delta_h: torch.Tensor | None = None,
        edit_steps: Sequence[bool] | None = None,
        asymmetric: bool = False,
        record_h: bool = True,
        return_trajectory: bool = False,
    ) -> SampleOutput:
        unet = self.model.unet
        param = next(unet.parameters())
        device, dtype = param.device, param.dtype
        n_steps = self.num_inference_steps
        shape = self.model.sample_shape
        draws = [noise_for_seed(s, shape, n_steps) for s in seeds]
        x = torch.stack([d[0] for d in draws]).to(device=device, dtype=dtype)
        noise = torch.stack([d[1] for d in draws], dim=1).to(device=device, dtype=dtype)
        if edit_steps is None:
            edit_steps = [True] * n_steps
        if len(edit_steps) != n_steps:
            raise ValueError(f"edit_steps has {len(edit_steps)} entries, expected {n_steps}")
        if delta_h is not None:
            delta_h = delta_h.to(device=device, dtype=dtype)
            step_axis = 0 if delta_h.ndim == 4 else 1
            if delta_h.shape[step_axis] != n_steps:
                raise ValueError(
                    f"delta_h has {delta_h.shape[step_axis]} steps, expected {n_steps}"
                )
        hs, trajectory = [], []
        with HSpaceHook(unet, self.h_position, record=record_h) as hook:
            for i, t in enumerate(self.timesteps):
                if return_trajectory:
                    trajectory.append(x)
                t_batch = t.expand(len(seeds)).to(device)
                editing = delta_h is not None and edit_steps[i]
                hook.delta = None
                eps = eps_original = None
                if not editing or asymmetric:
                    eps_original = self.eps(self.unet_output(x, t_batch), t, x)
                    if record_h:
                        hs.append(self.h_rows(hook.recorded.pop(), len(seeds)))
                if editing:
                    hook.delta = self.h_delta(delta_h[i] if delta_h.ndim == 4 else delta_h[:, i], len(seeds))
                    eps = self.eps(self.unet_output(x, t_batch), t, x)
                    hook.delta = None
                    if record_h:
                        h_edit = self.h_rows(hook.recorded.pop(), len(seeds))
                        if not asymmetric:
                            hs.append(h_edit)
                eps_P = eps if editing else eps_original
                eps_D = eps_original if (asymmetric or not editing) else eps
                x = self.step(eps_P, eps_D, int(t), x, self.etas[i], noise[i])
                hook.clear()
        images = self.model.decode(x)
        return SampleOutput(
            images=images,
            h=torch.stack(hs, dim=1) if record_h else None,
            timesteps=self.timesteps,
            trajectory=torch.stack(trajectory, dim=1) if return_trajectory else None,
        )
