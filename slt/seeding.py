"""Named random streams: every draw in slt comes from a CPU generator seeded by its purpose.

Hashing the keys (rather than e.g. seed * k + epoch) keeps streams of nearby keys unrelated,
accepts negative or huge seeds, and is stable across processes, platforms and versions.
CPU generators make weights, masks and data order identical on every device.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from any keys, e.g. ('weights', run_seed, layer_index)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*keys: object) -> torch.Generator:
    """A CPU generator for the stream named by `keys`."""
    return torch.Generator().manual_seed(derive_seed(*keys))
