"""megatron-core's TransformerLayer with the two parts its spec does not name.

- `norm_chain` (models/residual_norm.py): the layer links its residual adds (ResidualAddNorm,
  named by the spec as its bias-dropout-adds) to the norms that read their sums.
- `norm_checkpoint` (models/norm_recompute.py): what serves megatron's output-discarding
  checkpoint of the norms under `train.recompute=[layernorm]`. megatron's forward creates its
  own checkpoint object at every forward and assigns it to `input_layernorm_checkpoint` /
  `pre_mlp_norm_checkpoint`; these two properties hand it back wrapped.
"""
from __future__ import annotations

from typing import Callable

from megatron.core.transformer.transformer_layer import TransformerLayer

from models.residual_norm import NormChain


class LlamaTransformerLayer(TransformerLayer):
    def __init__(self, *args, norm_chain: NormChain | None = None, norm_checkpoint: Callable | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._norm_checkpoint = norm_checkpoint
        if norm_chain is not None:
            norm_chain.add_layer(self)

    def _wrap(self, megatron_checkpoint):
        return megatron_checkpoint if self._norm_checkpoint is None else self._norm_checkpoint(megatron_checkpoint)

    @property
    def input_layernorm_checkpoint(self):
        return self._input_layernorm_checkpoint

    @input_layernorm_checkpoint.setter
    def input_layernorm_checkpoint(self, checkpoint) -> None:
        self._input_layernorm_checkpoint = self._wrap(checkpoint)

    @property
    def pre_mlp_norm_checkpoint(self):
        return self._pre_mlp_norm_checkpoint

    @pre_mlp_norm_checkpoint.setter
    def pre_mlp_norm_checkpoint(self, checkpoint) -> None:
        self._pre_mlp_norm_checkpoint = self._wrap(checkpoint)
