"""The loss slot on GPU: megatron-core's GPTModel whose training loss goes through the fused output
layer + cross entropy (models/kernels/linear_cross_entropy.py) and never builds the logits."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel

from models.kernels.linear_cross_entropy import linear_cross_entropy


class LinearCrossEntropyGPTModel(GPTModel):
    """With labels and loss_mask while training: per-token losses [b, s] as megatron returns them,
    through linear_cross_entropy. Otherwise (logits, evaluation, multi-token prediction) megatron's."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None, **kwargs):
        if not (self.training and labels is not None and loss_mask is not None
                and not kwargs.get("mtp_in_postprocess")):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, loss_mask=loss_mask,
                                        **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        # hidden [s, b, h]; labels and loss_mask [b, s]
        return linear_cross_entropy(hidden_states.transpose(0, 1), weight, labels, loss_mask)
