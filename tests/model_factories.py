"""Small models of "the user's own code", for `python:tests.model_factories:NAME` references:
every kind of layer the conversion takes, tied weights, and factories that go wrong."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyTransformer(nn.Module):
    """Patch embedding (a conv), a position embedding, a class token, one post-norm
    nn.TransformerEncoderLayer (nn.MultiheadAttention inside) and a linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 16, dropout: float = 0.0,
                 kdim: int | None = None) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.pos = nn.Parameter(torch.zeros(1, 17, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=32, dropout=dropout,
                                                  batch_first=True)
        self.cross = nn.MultiheadAttention(dim, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.memory = nn.Linear(dim, kdim or dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        tokens = self.encoder(tokens)
        memory = self.memory(tokens)
        tokens = tokens + self.cross(tokens, memory, memory, need_weights=False)[0]
        return self.head(self.norm(tokens[:, 0]))


def tiny_transformer(num_classes: int = 10, dim: int = 16, dropout: float = 0.0) -> nn.Module:
    return TinyTransformer(num_classes, dim, dropout)


def separate_kv_transformer(num_classes: int = 10) -> nn.Module:
    """Cross-attention whose keys have another width: q/k/v_proj_weight, not in_proj."""
    return TinyTransformer(num_classes, kdim=12)


class ConvZoo(nn.Module):
    """Conv1d, grouped / dilated / reflect-padded Conv2d, Conv3d, BatchNorm, GroupNorm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(3, 12, 3, padding=2, dilation=2, groups=3,
                                 padding_mode="reflect")
        self.bn = nn.BatchNorm2d(12)
        self.depthwise = nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12)
        self.gn = nn.GroupNorm(3, 12)
        self.volume = nn.Conv3d(1, 2, (3, 3, 3), padding=1)
        self.line = nn.Conv1d(24, 8, 5, stride=2)
        self.head = nn.Linear(8 * 126, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.grouped(x)))
        x = torch.relu(self.gn(self.depthwise(x)))           # (B, 12, 16, 16)
        x = self.volume(x.unsqueeze(1))                      # (B, 2, 12, 16, 16)
        x = x.flatten(1, 2).flatten(2)                       # (B, 24, 256)
        return self.head(torch.relu(self.line(x)).flatten(1))


def conv_zoo(num_classes: int = 10) -> nn.Module:
    return ConvZoo(num_classes)


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight (as a language model's embedding and
    output layer do)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.encode = nn.Linear(3 * 32 * 32, 24)
        self.middle = nn.Linear(24, 24)
        self.mirror = nn.Linear(24, 24)
        self.mirror.weight = self.middle.weight
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.encode(self.flat(x)))
        return self.head(torch.relu(self.mirror(torch.relu(self.middle(h)))))


def tied(num_classes: int = 10) -> nn.Module:
    return Tied(num_classes)


def only_parameters(num_classes: int = 10) -> nn.Module:
    module = nn.Module()
    module.table = nn.Parameter(torch.zeros(num_classes))
    return module


def raises(num_classes: int = 10) -> nn.Module:
    raise ValueError("this factory always fails")


def three_outputs(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))


def no_num_classes() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


NOT_CALLABLE = 3


class Stochastic(nn.Module):
    """Randomness that is no dropout layer: attention dropout (a float inside
    nn.MultiheadAttention) and torchvision's stochastic depth."""

    def __init__(self, num_classes: int = 10) -> None:
        from torchvision.ops import StochasticDepth

        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.3, batch_first=True)
        self.depth = StochasticDepth(0.5, "row")
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.depth(self.attn(tokens, tokens, tokens, need_weights=False)[0])
        return self.head(tokens.mean(1))


def stochastic(num_classes: int = 10) -> nn.Module:
    return Stochastic(num_classes)
