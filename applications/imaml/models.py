"""Models for few-shot learning, used in functional form.

Two networks:

* :class:`Conv4` — the conv4 of the MAML / iMAML papers for 28×28 Omniglot: four blocks of
  ``conv 3×3, 64 filters, stride 2, padding 1 → BatchNorm (batch statistics, no running
  statistics) → ReLU`` (28 → 14 → 7 → 4 → 2), then a linear head to ``ways`` logits.
* :class:`SineMLP` — the 1-40-40-1 ReLU MLP of the sinusoid regression toy problem.

The meta-learners never hold a module's parameters as state. They keep parameters as a
``dict[str, Tensor]`` (a *tree* for :mod:`bilevel`) and call the network through
:func:`torch.func.functional_call`, so the same code runs per task, under
``torch.func.grad`` and under ``torch.func.vmap`` across tasks. :class:`FunctionalModel`
bundles the module with that call.

BatchNorm always normalises with the statistics of the batch it sees (``track_running_stats
=False``): there are no buffers to carry between tasks, so a task's forward pass depends only
on its own images and the parameters — which is what makes the per-task inner problem a
well-defined function of ``φ``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

__all__ = ["Conv4", "FunctionalModel", "SineMLP", "UnfoldConv2d", "build_model"]

Params = dict[str, Tensor]


class UnfoldConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same result) computed as im2col + matmul.

    Used for the first block only (one input channel, and the images need no gradient, so
    the slow ``col2im`` backward never runs). Under ``torch.func.vmap`` with per-task weights
    PyTorch lowers a convolution to a grouped convolution; for a single input channel the
    matmul form is faster on CPU. Deeper blocks keep the native convolution, whose backward
    beats ``col2im``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.groups != 1 or self.dilation != (1, 1) or isinstance(self.padding, str):
            return super().forward(x)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw) = self.stride, self.padding
        cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # n, c·kh·kw, L
        out = torch.matmul(self.weight.reshape(self.out_channels, -1), cols)
        if self.bias is not None:
            out = out + self.bias[:, None]
        ho = (h + 2 * ph - kh) // sh + 1
        wo = (w + 2 * pw - kw) // sw + 1
        return out.reshape(n, self.out_channels, ho, wo)


class Conv4(nn.Module):
    """Four stride-2 conv blocks and a linear head (64 filters: 112k parameters for 5 ways)."""

    def __init__(
        self,
        ways: int,
        *,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        zero_head: bool = False,
    ) -> None:
        super().__init__()
        if ways < 2:
            raise ValueError(f"ways must be >= 2, got {ways}")
        layers: list[nn.Module] = []
        channels = in_channels
        size = image_size
        for block in range(4):
            conv = UnfoldConv2d if block == 0 and in_channels == 1 else nn.Conv2d
            layers += [
                conv(channels, hidden, 3, stride=2, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=False),
                nn.ReLU(),
            ]
            channels = hidden
            size = (size + 1) // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * size * size, ways)
        if zero_head:
            # Zero logits at θ: every class starts symmetric, so the meta-learned
            # initialisation cannot prefer a label index that tasks assign at random.
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class SineMLP(nn.Module):
    """1-40-40-1 ReLU MLP for sinusoid regression."""

    def __init__(self, hidden: int = 40) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FunctionalModel:
    """A module used as a pure function ``(params, x) -> output``.

    ``params`` is a dict of tensors with the module's parameter names (see
    :meth:`init_params`); buffers (none for the models here) are held fixed. The call goes
    through :func:`torch.func.functional_call`, so it composes with ``torch.func.grad``,
    ``jvp`` and ``vmap``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.buffers: Params = {k: v.detach() for k, v in module.named_buffers()}

    def init_params(
        self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Params:
        """Fresh leaf tensors holding the module's initial parameters."""
        return {
            k: v.detach().to(dtype=dtype, device=device).clone()
            for k, v in self.module.named_parameters()
        }

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        if self.buffers:
            return functional_call(self.module, (dict(params), self.buffers), (x,))
        return functional_call(self.module, dict(params), (x,))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def build_model(
    kind: str, *, ways: int = 5, seed: int = 0, zero_head: bool = False, hidden: int = 64
) -> FunctionalModel:
    """``"conv4"`` (classification into ``ways``, ``hidden`` filters) or ``"mlp"`` (sinusoids,
    40 hidden units), seeded init."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if kind == "conv4":
            module: nn.Module = Conv4(ways, hidden=hidden, zero_head=zero_head)
        elif kind == "mlp":
            module = SineMLP()
        else:
            raise ValueError(f"unknown model {kind!r}; expected 'conv4' or 'mlp'")
    finally:
        torch.random.set_rng_state(generator_state)
    return FunctionalModel(module)


def conv4_output_size(image_size: int = 28) -> int:
    """Spatial side after four stride-2 blocks (28 → 2)."""
    size = image_size
    for _ in range(4):
        size = math.ceil(size / 2)
    return size
