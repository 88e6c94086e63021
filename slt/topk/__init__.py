"""The exact top-k mask op: the torch path, and the CUDA kernel behind its self-check."""

from slt.topk.op import check_deferred, deferred_checks, segmented_topk_mask
from slt.topk.torch_path import reference_sort_mask, segment_offsets, topk_mask

__all__ = ["check_deferred", "deferred_checks", "reference_sort_mask", "segment_offsets",
           "segmented_topk_mask", "topk_mask"]
