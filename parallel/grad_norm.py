"""The L2 norm of a list of gradients, in one pass over the grad buffer where they tile it.

megatron-core's grads for the norm are views of its contiguous grad buffer, in order, with only
alignment padding between them. torch's multi-tensor norm walks them in one launch per few
tensors, well below the memory bandwidth; one
vector_norm over the span they cover reads the same bytes at full bandwidth. Whatever lies
between the views (zero padding, or a grad left out of the norm) is subtracted as its own
squared norm, so the result is the norm of the listed tensors in every case; lists that are
not views of one storage, or whose gaps would cost more than a few percent extra reads, take
the multi-tensor norm.
"""
from __future__ import annotations

import torch

_MAX_GAP_FRACTION = 0.02


def _span_and_gaps(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """(one flat view covering all of `tensors`, the views of what lies between them), or None
    when they are not disjoint contiguous views of one storage."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    if not all(t.is_contiguous() and t.dtype == first.dtype and t.untyped_storage().data_ptr() == storage
               for t in tensors):
        return None
    ranges = sorted((t.storage_offset(), t.storage_offset() + t.numel()) for t in tensors if t.numel())
    if not ranges:
        return None
    gaps, end = [], ranges[0][0]
    for start, stop in ranges:
        if start < end:  # overlapping views: the span would count elements twice
            return None
        if start > end:
            gaps.append((end, start))
        end = stop
    begin = ranges[0][0]
    if sum(b - a for a, b in gaps) > _MAX_GAP_FRACTION * (end - begin):
        return None
    view = lambda a, b: torch.as_strided(first, (b - a,), (1,), a)  # absolute offsets into the storage
    return view(begin, end), [view(a, b) for a, b in gaps]


def l2_norm(tensors: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """‖concat(tensors)‖₂ of a non-empty list, as a 0-dim `dtype` tensor."""
    span = _span_and_gaps(tensors)
    if span is None:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, 2.0, dtype=dtype)))
    whole, gaps = span
    squares = torch.linalg.vector_norm(whole, dtype=dtype).square()
    if gaps:
        squares = squares - torch.stack(torch._foreach_norm(gaps, 2.0, dtype=dtype)).square().sum()
    return squares.clamp(min=0).sqrt()
