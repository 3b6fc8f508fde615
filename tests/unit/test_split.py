"""data.split / data.valid_prefixes: the held-out documents are a deterministic, Megatron-style
document-level split (contiguous document ranges from the normalized weights, rounded as
megatron-core's dataset builder rounds them), disjoint from training, and the validation stream
is the same on every call; a validation stream that would repeat samples is refused."""
from __future__ import annotations

import numpy as np
import pytest
from tiny_tokenizers import train_sp

from launcher.data.indexed import IndexedDataset, IndexedDatasetWriter
from launcher.data.split import document_range, split_bookends
from launcher.data.tokenizer import load_tokenizer
from launcher.data.training_data import build_training_data

DOCS = 50
FIRST_ID = 10  # document d holds only the id FIRST_ID + d (then EOS), so a token names its document


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    tok = load_tokenizer(train_sp(d))
    with IndexedDatasetWriter(d / "docs", np.uint16) as w:
        for doc in range(DOCS):
            w.add([FIRST_ID + doc] * (20 + doc % 7) + [tok.eos_id])
        w.finalize()
    return tok, str(d / "docs")


def test_bookends_are_megatron_s():
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                        parse_and_normalize_split)
    for text in ("98,2", "98/2", "969,30,1", "90,10,0", "1,1"):
        train, valid = split_bookends(text)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(text))
        assert (train, valid) == (matrix[0], matrix[1]), text
    assert split_bookends("98,2") == split_bookends("98/2") == ((0, 0.98), (0.98, 1.0))
    assert split_bookends("100,0")[1] is None
    # megatron-core's builder: documents [int(round(begin * n)), int(round(end * n)))
    assert document_range((0.98, 1.0), 1000) == range(980, 1000)
    assert document_range((0, 0.98), 1000) == range(0, 980)
    assert document_range((0, 0.969), 33) == range(0, 32)


@pytest.mark.parametrize("bad", ["", "abc", "98,2,0,1", "0,2", "-1,2"])
def test_bad_split_is_a_value_error_naming_the_split(bad):
    with pytest.raises(ValueError, match="data.split"):
        split_bookends(bad)


def _documents(batches) -> set[int]:
    ids = set()
    for b in batches:
        for key in ("tokens", "labels"):
            ids |= {int(t) - FIRST_ID for t in b[key].flatten().tolist() if t >= FIRST_ID}
    return ids


@pytest.mark.parametrize("packing", [False, True])
def test_held_out_documents_are_disjoint_and_deterministic(data, packing):
    tok, prefix = data
    train_ends, valid_ends = split_bookends("80,20")
    kw = dict(seq_length=16, seed=3, packing=packing)
    train = build_training_data([prefix], tok, documents=train_ends, **kw)
    valid = build_training_data([prefix], tok, documents=valid_ends, **kw)
    mb = dict(dp_rank=0, dp_size=1, micro_batch_size=2, global_batch_size=4)
    seen_train = set().union(*(_documents(train.microbatches(step=s, **mb)) for s in range(40)))
    seen_valid = set().union(*(_documents(valid.microbatches(step=s, **mb)) for s in range(2)))
    assert seen_train <= set(range(0, 40)) and len(seen_train) > 30
    assert seen_valid <= set(range(40, 50)) and seen_valid
    again = build_training_data([prefix], tok, documents=valid_ends, **kw)
    for s in range(2):
        for a, b in zip(valid.microbatches(step=s, **mb), again.microbatches(step=s, **mb)):
            assert all(np.array_equal(a[k], b[k]) for k in a)


def test_distinct_samples_counts_what_the_stream_holds_before_repeating(data):
    tok, prefix = data
    valid = build_training_data([prefix], tok, seq_length=16, seed=0, documents=(0.8, 1.0))
    tokens = len(IndexedDataset(prefix).documents(40, 50).tokens)
    assert valid.distinct_samples() == (tokens - 1) // 16
    blend = build_training_data([prefix, prefix], tok, seq_length=16, seed=0, documents=(0.8, 1.0),
                                weights=[3, 1], blend_block=4)
    # the weight-3 source runs out first: it takes slots 0, 1 and 3 of every block of 4
    n = valid.distinct_samples()
    assert blend.distinct_samples() == 4 * (n // 3) + [0, 1, 3][n % 3]
