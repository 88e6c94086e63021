"""Masked Conv2d / Linear layers: frozen random weights, a source mask, learnable scores.

Weights and scores are stored compactly, one entry per *source* edge (`src_idx` holds
their flat positions in ascending order), so a sparse source costs memory and top-k work
in proportion to its edges, and non-source edges can never enter a ticket.

A layer does not pick its own mask: the owning `SltNetwork` asks the scorer for every
layer's effective compact weights once per forward (global top-k needs all layers at
once) and hands them to the layers through `effective_src`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedLayer(nn.Module):
    """Common state of the masked layers; subclasses only apply the weight."""

    def __init__(self, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.numel = math.prod(self.weight_shape)
        self.fan_in = self.numel // self.weight_shape[0]
        # Not persistent: weights and source are regenerated from seeds, never checkpointed.
        self.register_buffer("weight_src", torch.zeros(0), persistent=False)
        self.register_buffer("src_idx", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_parameter("scores", None)
        self.searched = True
        self.dense_source = False
        self.effective_src: Tensor | None = None
        self.init_args = ("kaiming_normal", 1.0)  # weight init and its density scale

    @property
    def n_source(self) -> int:
        return int(self.src_idx.numel())

    def set_source(self, weight: Tensor, source_mask: Tensor, searched: bool) -> None:
        """Install the frozen weights and the source mask (both of `weight_shape`)."""
        if {tuple(weight.shape), tuple(source_mask.shape)} != {self.weight_shape}:
            raise ValueError(f"expected weight and mask of shape {self.weight_shape}")
        idx = source_mask.reshape(-1).nonzero().squeeze(1)
        self.src_idx = idx
        self.weight_src = weight.reshape(-1)[idx].contiguous()
        self.dense_source = idx.numel() == self.numel
        self.searched = searched
        self.effective_src = None

    def source_mask(self) -> Tensor:
        """Boolean mask of the source edges, in the weight's shape."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.src_idx.device)
        mask[self.src_idx] = True
        return mask.view(self.weight_shape)

    def expand(self, compact: Tensor) -> Tensor:
        """Scatter a per-source-edge tensor into the full weight shape (zeros elsewhere)."""
        if self.dense_source:
            return compact.view(self.weight_shape)
        full = compact.new_zeros(self.numel).scatter(0, self.src_idx, compact)
        return full.view(self.weight_shape)

    def weight(self) -> Tensor:
        if not self.searched:  # dense, frozen layer: read the buffer (follows .to(device))
            return self.expand(self.weight_src)
        if self.effective_src is None:
            raise RuntimeError("masked layer used before its network set the effective weights")
        return self.expand(self.effective_src)

    def extra_repr(self) -> str:
        return (
            f"shape={self.weight_shape}, source={self.n_source}/{self.numel}, "
            f"searched={self.searched}"
        )


class MaskedConv2d(MaskedLayer):
    """Conv2d without bias whose weight is the masked frozen random weight."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size))
        self.stride = stride
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), None, self.stride, self.padding)


class MaskedLinear(MaskedLayer):
    """Linear without bias whose weight is the masked frozen random weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__((out_features, in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())


def non_affine_bn(channels: int, affine: bool = False, dims: int = 2) -> nn.Module:
    """BatchNorm with no learned scale/shift by default: only scores are learned."""
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(channels, affine=affine)


def masked_layers(module: nn.Module) -> list[MaskedLayer]:
    """The masked layers of a model in registration order (= forward order for our models)."""
    return [m for m in module.modules() if isinstance(m, MaskedLayer)]


class WeightSlot(MaskedLayer):
    """A weight of the user's own module (a model reference) made a masked layer.

    The module keeps its own forward: before each forward pass the network puts the
    effective weight back where the module reads it (`install`), as a plain tensor
    attribute that shadows this slot (registered under the parameter's own name, so the
    layer is named like the parameter it replaced, e.g. `blocks.0.attn.qkv.weight`).
    Every owner of a tied weight reads the same tensor: it is searched once.
    """

    def __init__(self, weight_shape: tuple[int, ...], targets: list[tuple[nn.Module, str]]):
        super().__init__(weight_shape)
        # plain list, not registered: the owners contain this slot, not the other way round
        self.targets = targets

    def install(self) -> None:
        """Make the owners read this layer's current effective (or dense frozen) weight."""
        weight = self.weight()
        for owner, attr in self.targets:
            owner.__dict__[attr] = weight

    def release(self) -> Tensor:
        """Remove the installed tensors and return the weight (for `to_module`)."""
        weight = self.weight().detach().clone()
        for owner, attr in self.targets:
            owner.__dict__.pop(attr, None)
        return weight
