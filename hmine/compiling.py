"""Optional ``torch.compile`` of the sampler's U-Net (``model.compile``), block by block.

h is read and edited by forward hooks on the mid block (:mod:`hmine.hooks`), and Asyrp's
branched step adds pre-hooks on the up blocks (:mod:`hmine.branching`); both are attached
and detached around U-Net calls. ``torch.compile`` of the whole U-Net traces the hooks
present when it compiles and, by dynamo's default (``skip_nnmodule_hook_guards``), does
not guard on them: a hook attached later is silently not called (torch 2.13: the h hook
attached after compiling recorded nothing). So only the ``forward`` of the blocks is
compiled: the down blocks, the mid block's resnets and attentions, the up blocks. Every
module's ``__call__``, which runs its hooks, stays eager, and so do the mid block's own
forward, the time embedding and the input and output convolutions. h and its edits then
pass between compiled graphs exactly as in eager mode.

The compiled forwards are installed only for the duration of a call through
:meth:`CompiledBlocks.active` (the sampler's :meth:`~hmine.sampling.Sampler.unet_forward`),
so anything else that calls the same U-Net, the Jacobian stage's ``torch.func``
transforms in particular, runs it eagerly.

Every compiled graph is wrapped to count its runs, so a U-Net call in which a block ran
none (dynamo fell back to eager, e.g. past its recompile limit) is an error, not a silent
slowdown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

#: The dynamo backend of ``model.compile: true``.
DEFAULT_BACKEND = "inductor"


def compiled_modules(unet) -> list[torch.nn.Module]:
    """The modules whose ``forward`` is compiled: down blocks, mid-block resnets and attentions, up blocks.

    None of them is a module hmine hooks whose forward contains another hooked module:
    the hooks sit on the mid block (eager), on ``mid_block.resnets[1]`` and on the up
    blocks, whose ``__call__`` stays eager.
    """
    mid = unet.mid_block
    inner = [m for m in (*(getattr(mid, "attentions", None) or []), *mid.resnets) if m is not None]
    return [*unet.down_blocks, *inner, *unet.up_blocks]


class CompiledBlocks:
    """Compiled forwards of a U-Net's blocks (module docstring), active inside :meth:`active`.

    Parameters
    ----------
    unet : diffusers ``UNet2DModel`` or ``UNet2DConditionModel``
    backend : str or callable, default="inductor"
        A dynamo backend (``torch.compile(backend=...)``).

    Attributes
    ----------
    graph_runs : list of int
        How many compiled graphs of each of :func:`compiled_modules` have run.
    """

    def __init__(self, unet, backend: str | Callable = DEFAULT_BACKEND):
        if getattr(unet, "mid_block", None) is None or not hasattr(unet, "up_blocks"):
            raise ValueError(f"model.compile: {type(unet).__name__} has no mid and up blocks to compile; "
                             "set model.compile: false")
        self.unet = unet
        self.backend = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self.modules = compiled_modules(unet)
        self.graph_runs = [0] * len(self.modules)
        # Blocks of one class share one code object, and dynamo's recompile limit (8) counts
        # the compiled entries of a code object: CelebA-HQ's 5 DownBlock2D, each compiled for
        # a fixed and then a dynamic batch and for another input layout, would exceed it and
        # run eagerly. So each block's compile keeps its own entries (isolate_recompiles),
        # with this limit (dynamo's default) on them.
        self.recompile_limit = 8
        self._forwards: list[Callable] | None = None

    def _counting(self, index: int) -> Callable:
        def backend(graph, example_inputs):
            compiled = self.backend(graph, example_inputs)

            def run(*args):
                self.graph_runs[index] += 1
                return compiled(*args)

            return run

        return backend

    def _compile(self) -> list[Callable]:
        # the class's forward bound to the module: the installed attribute must not call itself
        return [
            torch.compile(type(module).forward.__get__(module), backend=self._counting(i), isolate_recompiles=True,
                          recompile_limit=self.recompile_limit)
            for i, module in enumerate(self.modules)
        ]

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the U-Net's blocks compiled inside; raise if a block called ran no compiled graph."""
        if self._forwards is None:
            self._forwards = self._compile()
        before = list(self.graph_runs)
        for module, forward in zip(self.modules, self._forwards):
            module.forward = forward
        try:
            yield
        finally:
            for module in self.modules:
                del module.forward  # back to the class's forward
        eager = [i for i, (b, a) in enumerate(zip(before, self.graph_runs)) if a == b]
        if eager:
            names = dict((m, n) for n, m in self.unet.named_modules())
            raise RuntimeError(
                f"model.compile: {', '.join(names[self.modules[i]] for i in eager)} ran eagerly (dynamo fell "
                "back, e.g. past its recompile limit); set model.compile: false"
            )
