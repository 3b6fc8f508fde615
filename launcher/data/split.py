"""`data.split`: held-out documents, the way Megatron-LM's `--split` cuts a dataset.

"98/2" (or "98,2", or "969,30,1" with a test part that nothing reads) are train, valid[, test]
weights. They are normalized and turned into book-ends of the unit interval, and each dataset's
documents [round(begin * n), round(end * n)) form that part: contiguous document ranges, the
same on every run and rank, whatever the seed (megatron-core's parse_and_normalize_split,
convert_split_vector_to_split_matrix and dataset builder). A document is wholly in one part.
"""
from __future__ import annotations

import re

Bookends = tuple[float, float]

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_SPLIT = re.compile(rf"^\s*({_NUMBER})(?:\s*[,/]\s*({_NUMBER})){{1,2}}\s*$|^\s*({_NUMBER})\s*$")


def split_bookends(split: str) -> tuple[Bookends | None, Bookends | None]:
    """(train, valid) book-ends of `split`; None for a part of weight 0. ValueError names data.split."""
    if not _SPLIT.match(str(split)):
        raise ValueError(f"data.split: {split!r} is not train,valid[,test] weights such as 98/2 or 969/30/1")
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)

    weights = [float(x) for x in re.findall(_NUMBER, str(split))]
    if sum(weights) <= 0 or weights[0] <= 0:
        raise ValueError(f"data.split: {split!r} leaves no training documents")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(str(split)))
    return matrix[0], matrix[1]


def document_range(bookends: Bookends, num_documents: int) -> range:
    """The documents of one part, rounded as megatron-core's dataset builder rounds them."""
    return range(int(round(bookends[0] * float(num_documents))), int(round(bookends[1] * float(num_documents))))
