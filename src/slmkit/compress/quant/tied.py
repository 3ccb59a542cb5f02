"""A tied output head kept tied through quantization: one int8 or int4 table, stored once, serves
both the head's matrix product and the embedding lookup.

Why not untie: SmolLM2's tied 49152 x 576 table is a fifth of its weights; untied, the head's
quantized copy sits beside a float embedding, and an int8 model ends 0.94x its bf16 size instead
of about half. The head owns the codes (a `QuantLinear`, saved as `lm_head.*`); `TiedEmbedding`
takes the place of `model.embed_tokens` and reads rows of the head's codes, so a checkpoint, a
GGUF file and memory hold the table once.
"""

from __future__ import annotations

import torch
from torch import nn

from slmkit.compress.quant.qlinear import QuantLinear


class TiedEmbedding(nn.Module):
    """Token ids (...) -> fp32 rows (..., C) of the quantized head's weights (the model casts them
    to its residual dtype). The head is referenced, not registered: its tensors are saved and moved
    once, under `lm_head`."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: no second copy in state_dict
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        head.keep_rows()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(input_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.head.bits}, tied to lm_head"


def tie_quantized_head(model: nn.Module) -> None:
    """After the head of a tied model became a `QuantLinear`: let the embedding read its codes."""
    if isinstance(model.lm_head, QuantLinear):
        model.model.embed_tokens = TiedEmbedding(model.lm_head)


def is_tied_quantized(model: nn.Module) -> bool:
    return isinstance(model.model.embed_tokens, TiedEmbedding)
