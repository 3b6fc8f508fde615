"""The loss slot on GPU: megatron-core's GPTModel whose training loss goes through the fused output
layer + cross entropy (models/kernels/linear_cross_entropy.py) and never builds the logits: one
scale for every token's gradient (LM objective), or each token's own (preference objectives). Only the
real vocabulary's output rows take part (models/padded_vocab.py): the padded rows' logits never
exist, and their gradient is zero."""
from __future__ import annotations

from models.kernels.linear_cross_entropy import linear_cross_entropy, linear_token_losses
from models.padded_vocab import PaddedVocabGPTModel


class LinearCrossEntropyGPTModel(PaddedVocabGPTModel):
    """With labels and loss_mask while training: per-token losses [b, s] as megatron returns them,
    through linear_cross_entropy. Otherwise (logits, evaluation, multi-token prediction) megatron's."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None, **kwargs):
        if not (self.training and labels is not None and loss_mask is not None
                and not kwargs.get("mtp_in_postprocess")):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, loss_mask=loss_mask,
                                        **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        # hidden [s, b, h]; labels and loss_mask [b, s]; tp=1, so the weight holds every vocabulary row
        return linear_cross_entropy(hidden_states.transpose(0, 1), weight[:self.unpadded_vocab_size], labels, loss_mask)


class LinearTokenLossGPTModel(PaddedVocabGPTModel):
    """The preference objectives' loss slot: with labels and loss_mask, in training and in the
    reference/evaluation forwards, per-token losses [b, s] through linear_token_losses (each
    token's gradient its own; the logits recomputed chunk by chunk in the backward)."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, loss_mask=None, **kwargs):
        if labels is None or loss_mask is None or kwargs.get("mtp_in_postprocess"):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, loss_mask=loss_mask,
                                        **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return linear_token_losses(hidden_states.transpose(0, 1), weight[:self.unpadded_vocab_size], labels)
