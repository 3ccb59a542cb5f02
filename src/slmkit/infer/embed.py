"""Text embeddings from a causal model: the final hidden states (after the last norm, as Hugging
Face's `last_hidden_state`), mean-pooled over each text's tokens and L2-normalised.

Texts are tokenized without special tokens (a BOS is added where the tokenizer adds one), sorted by
length and run `batch_size` at a time, right-padded: a causal model's real tokens never see the
padding after them, so a text's vector does not depend on its batch (up to BLAS rounding, far
below 1e-4). A text longer than the context is refused with the limit, never cut silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slmkit.errors import SlmError


@dataclass
class Embeddings:
    vectors: torch.Tensor  # (N, C) float32, unit length
    tokens: list[int]  # each text's token count


class Embedder:
    """Embeddings on slmkit's PyTorch model; `slmkit.infer.llamacpp.LlamaCppEmbedder` gives the same
    vectors from a GGUF on llama.cpp (only `_pooled` differs)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, context: int | None = None):
        self.model = model.eval()
        self._setup(model.config, tokenizer, batch_size, context or model.config.max_position_embeddings)

    def _setup(self, config, tokenizer, batch_size: int, context: int) -> None:
        if tokenizer is None:
            raise SlmError("this model has no tokenizer; embeddings read text")
        self.config, self.tokenizer, self.batch_size = config, tokenizer, batch_size
        self.context = min(context, config.max_position_embeddings)

    @property
    def dimensions(self) -> int:
        return self.config.hidden_size

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (checked by `check` when embedded)."""
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.add_bos and self.tokenizer.bos_token_id is not None else []
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text:  # a BOS alone would embed nothing of the text
                raise SlmError(f"input {i} is empty; every text to embed needs at least one character")
            out.append(bos + self.tokenizer.encode(text, add_special=False))
        return out

    def embed(self, texts: list[str], progress=None) -> Embeddings:
        return self.embed_ids(self.encode(texts), progress)

    def check(self, ids: list[list[int]]) -> None:
        """Token id lists that can be embedded: at least one, none empty, each within the context and the
        vocabulary; else an SlmError naming the first bad input."""
        if not ids:
            raise SlmError("no input to embed: give at least one text")
        for i, row in enumerate(ids):
            if not row:
                raise SlmError(f"input {i} is empty; every text to embed needs at least one token")
            if len(row) > self.context:
                raise SlmError(f"input {i} has {len(row)} tokens; the model's context holds {self.context}: shorten it")
            vocab = self.config.vocab_size
            if not all(0 <= t < vocab for t in row):
                raise SlmError(f"input {i}: token ids must be in [0, {vocab})")

    def embed_ids(self, ids: list[list[int]], progress=None) -> Embeddings:
        """Vectors of token id lists (checked first)."""
        self.check(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        vectors = torch.zeros(len(ids), self.dimensions)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            vectors[chunk] = torch.nn.functional.normalize(self._pooled([ids[i] for i in chunk]), dim=-1)
            if progress is not None:
                progress(len(chunk))
        return Embeddings(vectors, [len(x) for x in ids])

    @torch.inference_mode()
    def _pooled(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, C) float32: each row's final hidden states, averaged over its tokens."""
        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        hidden = self.model.final_hidden(batch.to(device)).float()  # (B, T, C)
        mask = mask.to(device)[..., None]
        return ((hidden * mask).sum(1) / mask.sum(1)).cpu()  # the mean over real tokens
