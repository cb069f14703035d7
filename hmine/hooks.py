"""h-space access by forward hooks on an unmodified diffusers U-Net.

h is the U-Net bottleneck (Kwon et al. 2023; Haas et al. 2024). Three positions:

``before``
    the input of ``unet.mid_block`` (the output of the last down block);
``middle``
    inside the mid block, the input of its second resnet (``mid_block.resnets[1]``),
    i.e. after the first resnet and, where there is one, the mid-block attention;
``after`` (default)
    the output of ``unet.mid_block``.

One mechanism, :class:`HSpaceHook`, both records h and edits it: while the hook is
attached, every U-Net forward records the h it computed (before any edit) and, when
``delta`` is set, passes ``h + delta`` on instead; when ``replacement`` is set it passes
that tensor on instead, which makes h an explicit input (used by the Jacobian stage).
"""

from __future__ import annotations

from typing import Literal

import torch

HPosition = Literal["before", "middle", "after"]
H_POSITIONS: tuple[str, ...] = ("before", "middle", "after")


class HSpaceHook:
    """Record and edit h at one position of a U-Net's mid block.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel`` or ``UNet2DConditionModel``
    position : {"before", "middle", "after"}, default="after"
    record : bool, default=True
        Keep every h computed while attached in :attr:`recorded` (detached).

    Attributes
    ----------
    recorded : list of Tensor of shape (batch, channel, y, x)
        h of every forward since attach or :meth:`clear`, in call order.
    delta : Tensor of shape (channel, y, x) or (batch, channel, y, x), or None
        Added to h on every forward while set.
    replacement : Tensor of shape (batch, channel, y, x), or None
        Passed on instead of h while set (takes precedence over ``delta``).

    Examples
    --------
    >>> with HSpaceHook(unet, "after") as hook:  # doctest: +SKIP
    ...     eps = unet(x_t, t).sample
    ...     h = hook.recorded[-1]
    """

    def __init__(self, unet, position: HPosition = "after", *, record: bool = True):
        if position not in H_POSITIONS:
            raise ValueError(
                f"h position must be one of {H_POSITIONS}, got {position!r}; "
                "set model.h_position to 'before', 'middle' or 'after'"
            )
        if getattr(unet, "mid_block", None) is None:
            raise ValueError(
                f"{type(unet).__name__} has no mid_block, so it has no h-space bottleneck"
            )
        if position == "middle" and len(getattr(unet.mid_block, "resnets", [])) < 2:
            raise ValueError("h position 'middle' needs a mid block with two resnets")
        self.unet = unet
        self.position = position
        self.record = record
        self.recorded: list[torch.Tensor] = []
        self.delta: torch.Tensor | None = None
        self.replacement: torch.Tensor | None = None
        self._handle = None

    # -- the edit shared by all positions -------------------------------------------
    def _edit(self, h: torch.Tensor) -> torch.Tensor | None:
        if self.record:
            self.recorded.append(h.detach())
        if self.replacement is not None:
            return self.replacement
        if self.delta is not None:
            return h + self.delta.to(dtype=h.dtype, device=h.device)
        return None  # keep h unchanged

    def _post_hook(self, module, args, output):
        return self._edit(output)

    def _pre_hook(self, module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
            edited = self._edit(hidden)
            return None if edited is None else ((edited, *rest), kwargs)
        edited = self._edit(kwargs["hidden_states"])
        return None if edited is None else (args, {**kwargs, "hidden_states": edited})

    # -- attach / detach ------------------------------------------------------------
    def attach(self) -> "HSpaceHook":
        if self._handle is not None:
            raise RuntimeError("HSpaceHook is already attached")
        mid = self.unet.mid_block
        if self.position == "after":
            self._handle = mid.register_forward_hook(self._post_hook)
        elif self.position == "before":
            self._handle = mid.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self._handle = mid.resnets[1].register_forward_pre_hook(
                self._pre_hook, with_kwargs=True
            )
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        self.recorded.clear()

    def __enter__(self) -> "HSpaceHook":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def h_shape(unet, position: HPosition = "after") -> tuple[int, int, int]:
    """(channel, y, x) of h, found by one dummy forward at batch 1."""
    config = unet.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    param = next(unet.parameters())
    x = torch.zeros((1, config.in_channels, *size), dtype=param.dtype, device=param.device)
    kwargs = {}
    if config.get("cross_attention_dim") is not None:  # a UNet2DConditionModel: one token of zero text
        width = config.cross_attention_dim
        width = width[-1] if isinstance(width, (list, tuple)) else width
        kwargs["encoder_hidden_states"] = torch.zeros((1, 1, width), dtype=param.dtype, device=param.device)
    with torch.inference_mode(), HSpaceHook(unet, position) as hook:
        unet(x, torch.tensor([0], device=param.device), **kwargs)
    return tuple(hook.recorded[0].shape[1:])
