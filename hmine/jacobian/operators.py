"""f(h) = M ⊙ ε_θ(x_t, t; h) as a function of h alone, and its Jacobian-vector products.

:func:`eps_of_h` builds f for one image (eq. 1 of :mod:`hmine.jacobian`), :func:`h_at`
the point h0 where its Jacobian is taken, and ``_products`` J v and Jᵀ u from one
linearisation of f. Forward-mode AD needs the plain attention path
(:func:`use_math_attention`), and every solver leaves any caller's ``inference_mode``
(``_with_autodiff``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch.func import functional_call, jvp, vjp

from hmine.hooks import HPosition, HSpaceHook

HFunction = Callable[[torch.Tensor], torch.Tensor]


def use_math_attention(unet):
    """Switch every diffusers ``Attention`` module of ``unet`` to ``AttnProcessor()``.

    Forward-mode AD (``torch.func.jvp``) is not implemented for the fused
    scaled-dot-product attention kernel on CPU; the plain "math" processor computes
    the same attention with ordinary matmuls and softmax, which forward AD supports.
    ``UNet2DModel`` has no ``set_attn_processor``, so the modules are switched one by
    one. Idempotent: modules already on ``AttnProcessor`` are left alone.

    Parameters
    ----------
    unet : torch.nn.Module
        A diffusers U-Net (or any module containing ``Attention`` modules).

    Returns
    -------
    unet : torch.nn.Module
        The same module, switched in place.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in unet.modules():
        if isinstance(module, Attention) and type(module.processor) is not AttnProcessor:
            module.set_processor(AttnProcessor())
    return unet


@contextlib.contextmanager
def _autodiff_allowed() -> Iterator[None]:
    """Leave any caller's ``inference_mode``/``no_grad`` so that AD can linearise f."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _with_autodiff(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _autodiff_allowed():
            return function(*args, **kwargs)

    return wrapper


def _timestep_tensor(t, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.numel() != 1:
        raise ValueError(f"t must be one timestep, got a tensor of shape {tuple(t.shape)}")
    return t.reshape(1)


def _single_image(x_t: torch.Tensor) -> torch.Tensor:
    if x_t.ndim == 3:
        x_t = x_t[None]
    if x_t.ndim != 4 or x_t.shape[0] != 1:
        raise ValueError(
            f"x_t must be one image of shape (1, C, H, W), got shape {tuple(x_t.shape)}; "
            "build one f per image"
        )
    with torch.inference_mode(False):
        return x_t.detach().clone()  # a plain (not inference-mode) copy autograd may save


def h_at(unet, x_t: torch.Tensor, t, position: HPosition = "after") -> torch.Tensor:
    """h0: the bottleneck the U-Net computes for ``x_t`` at timestep ``t``.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel``
    x_t : Tensor of shape (1, C, H, W)
        One noisy image of the trajectory.
    t : int or Tensor with one element
        Its timestep.
    position : {"before", "middle", "after"}, default="after"
        Where h is read (see :mod:`hmine.hooks`).

    Returns
    -------
    h0 : Tensor of shape (channel, y, x)
        Detached; the point at which :func:`eps_of_h`'s Jacobian is taken.
    """
    x_t = _single_image(x_t)
    with torch.no_grad(), HSpaceHook(unet, position, record=True) as hook:
        unet(x_t, _timestep_tensor(t, x_t.device))
    return hook.recorded[0][0].clone()


def eps_of_h(
    unet,
    x_t: torch.Tensor,
    t,
    position: HPosition = "after",
    mask: torch.Tensor | None = None,
) -> HFunction:
    """Build f(h) = M ⊙ ε_θ(x_t, t; h) (eq. 1) for one image, with h an explicit input.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel``
        In eval mode. Its attention is switched to the math path in place
        (:func:`use_math_attention`) so that forward-mode AD works.
    x_t : Tensor of shape (1, C, H, W)
        One noisy image; fixed (not differentiated).
    t : int or Tensor with one element
        Its timestep.
    position : {"before", "middle", "after"}, default="after"
        Where h is replaced (see :mod:`hmine.hooks`).
    mask : Tensor of shape (1, 1 or C, H, W), (1 or C, H, W) or (H, W), optional
        Pixel weights M, broadcast over channels; None means no mask.

    Returns
    -------
    f : callable
        Maps h of shape (channel, y, x) to the masked noise prediction of shape
        (C, H, W). The U-Net's parameters enter as constants (detached copies passed
        through ``torch.func.functional_call``), so only h is differentiated; f works
        under ``torch.func.jvp``, ``vjp``, ``vmap`` and ``jacrev``.
    """
    if unet.training:
        raise ValueError("eps_of_h needs the U-Net in eval mode; call unet.eval() first")
    use_math_attention(unet)
    x_t = _single_image(x_t)
    timestep = _timestep_tensor(t, x_t.device)
    mask = _checked_mask(mask, x_t, rows=1)
    rows = EpsOfHRows(unet, x_t, timestep, position, mask)

    def f(h: torch.Tensor) -> torch.Tensor:
        return rows(h[None])[0]

    return f


def _checked_mask(mask, x_t: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``mask`` as a (rows, 1 or C, H, W) tensor on x_t's device and dtype, or None."""
    if mask is None:
        return None
    with torch.inference_mode(False):
        mask = torch.as_tensor(mask).detach().clone().to(device=x_t.device, dtype=x_t.dtype)
    while mask.ndim < 4:
        mask = mask[None]
    try:
        torch.broadcast_shapes(mask.shape, x_t.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to x_t of shape "
            f"{tuple(x_t.shape)}; give it shape ({rows}, 1 or C, H, W)"
        ) from None
    if mask.shape[0] != rows:
        raise ValueError(f"mask must hold {'one image' if rows == 1 else f'{rows} images'}, got shape {tuple(mask.shape)}")
    return mask


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """``F.group_norm`` from mean, variance and elementwise ops, each with a vmap batch rule."""
    groups = x.reshape(x.shape[0], num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    variance = groups.var(-1, unbiased=False, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(variance + eps)).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


@contextlib.contextmanager
def _composite_group_norm() -> Iterator[None]:
    """``torch.nn.GroupNorm`` computed by :func:`_group_norm` while f is traced.

    The pullback of a batch of images under ``vmap`` failed in the native group norm's
    backward on some architectures (seen with torch 2.13 on the CPU for CelebA-HQ's
    U-Net, also at toy width: "NYI: querying is_contiguous inside of vmap for
    memory_format other than torch.contiguous_format"); the composite's backward has no
    such query. Same values to rounding.
    """
    native = torch.nn.functional.group_norm
    torch.nn.functional.group_norm = _group_norm  # nn.GroupNorm.forward calls F.group_norm
    try:
        yield
    finally:
        torch.nn.functional.group_norm = native


class EpsOfHRows:
    """F(H) = M ⊙ ε_θ(X_t, t; H) for a batch of images at once, row r being image r's f (eq. 1).

    Built by :func:`eps_of_h_rows`. The U-Net treats the rows of a batch independently
    (its normalisation is per image, in eval mode), so F's Jacobian is block-diagonal:
    one pullback of F at H0 gives every row's Jᵀ u at once, and one vjp of it every
    row's J v. :meth:`subset` is F of some rows only, for when the others are done.
    """

    def __init__(self, unet, x_t: torch.Tensor, timesteps: torch.Tensor, position: HPosition, mask: torch.Tensor | None):
        self.unet, self.x_t, self.timesteps, self.position, self.mask = unet, x_t, timesteps, position, mask
        # the model's parameters and buffers as constants: no autograd graph for them
        self._frozen = {name: p.detach() for name, p in unet.named_parameters()}
        self._frozen.update({name: b.detach() for name, b in unet.named_buffers()})
        self._hook = HSpaceHook(unet, position, record=False)

    def __len__(self) -> int:
        return self.x_t.shape[0]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        # h replaces the bottleneck at `position`; the down path sees only x_t
        self._hook.replacement = h
        try:
            with self._hook, _composite_group_norm():
                eps = functional_call(self.unet, self._frozen, (self.x_t, self.timesteps)).sample
        finally:
            self._hook.replacement = None
        if self.mask is not None:
            eps = self.mask * eps  # eq. 1, M broadcast over channels
        return eps

    def subset(self, rows) -> "EpsOfHRows":
        """F of the images ``rows`` (indices into this batch), in that order."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.x_t.device)
        mask = None if self.mask is None else self.mask[index]
        return EpsOfHRows(self.unet, self.x_t[index], self.timesteps[index], self.position, mask)


def eps_of_h_rows(unet, x_t: torch.Tensor, t, position: HPosition = "after", mask: torch.Tensor | None = None) -> EpsOfHRows:
    """Build F(H) = M ⊙ ε_θ(X_t, t; H) for a batch of images, with H an explicit input.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel``
        In eval mode; its attention is switched to the math path (:func:`use_math_attention`).
    x_t : Tensor of shape (n, C, H, W)
        n noisy images; fixed (not differentiated).
    t : int, or Tensor with one element or of shape (n,)
        Their timestep, one for all or one per image.
    position : {"before", "middle", "after"}, default="after"
    mask : Tensor of shape (n, 1 or C, H, W), optional
        Pixel weights per image; None means no mask.

    Returns
    -------
    F : EpsOfHRows
        Maps H of shape (n, channel, y, x) to the masked noise predictions of shape
        (n, C, H, W); row r is :func:`eps_of_h` of image r. Works under
        ``torch.func.vjp`` and ``vmap`` like :func:`eps_of_h`'s f.
    """
    if unet.training:
        raise ValueError("eps_of_h_rows needs the U-Net in eval mode; call unet.eval() first")
    use_math_attention(unet)
    if x_t.ndim != 4:
        raise ValueError(f"x_t must be a batch of images of shape (n, C, H, W), got shape {tuple(x_t.shape)}")
    with torch.inference_mode(False):
        x_t = x_t.detach().clone()  # a plain (not inference-mode) copy autograd may save
    timesteps = torch.as_tensor(t, device=x_t.device).reshape(-1)
    if timesteps.numel() == 1:
        timesteps = timesteps.expand(x_t.shape[0])
    if timesteps.shape != (x_t.shape[0],):
        raise ValueError(f"t must be one timestep or one per image ({x_t.shape[0]}), got {timesteps.numel()}")
    with torch.inference_mode(False):
        timesteps = timesteps.clone()
    return EpsOfHRows(unet, x_t, timesteps, position, _checked_mask(mask, x_t, rows=x_t.shape[0]))


def _products(f: HFunction, h0: torch.Tensor, forward_mode: bool = False):
    """J·v and Jᵀ·u, both from one reverse-mode linearisation of f at h0 (built here, once).

    Jᵀ u is the pullback of f at h0. J v is the pullback of that pullback: u ↦ Jᵀ u is
    linear, so its own vector-Jacobian product with v is J v (the "double-vjp" trick).
    This reverse-over-reverse J v costs less than forward mode's ``jvp`` (measured on
    the shapes U-Net, one thread: 19 ms against 44 ms for one column, 15 against 20
    per column for three under ``vmap``), because ``jvp`` recomputes the whole U-Net
    forward and carries a tangent through every op, while the double vjp only
    replays the graphs of the up path already built. Both products run under
    ``no_grad``, so they build no graph of their own, and both accept one column or,
    under ``vmap``, a stack of them. ``forward_mode=True`` computes J v with ``jvp``
    instead, as the published code does (kept for the baseline's faithful timing).
    """
    with torch.enable_grad():
        image, pullback = vjp(f, h0)
        # graph of u ↦ Jᵀ u (built with grad enabled), at any u: it is linear
        _, pullback_of_pullback = vjp(lambda output: pullback(output)[0], torch.zeros_like(image))

    def jacobian_times(direction: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if forward_mode:
                return jvp(f, (h0,), (direction,))[1]  # J v, forward mode
            return pullback_of_pullback(direction)[0]  # J v

    def jacobian_transpose_times(output: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pullback(output)[0]  # Jᵀ u

    return jacobian_times, jacobian_transpose_times


def _as_h(rows: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    return rows.to(dtype=h0.dtype).reshape(rows.shape[0], *h0.shape)
