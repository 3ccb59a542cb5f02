"""Structured output: the model may only write text that a format accepts.

A format (any JSON object, JSON that validates against a JSON Schema, or one of a fixed set of
labels) is compiled by llguidance into a grammar over the model's own tokens. Each sequence gets a
`TokenMatcher` that, before every sampling step, gives the tokens that keep the text inside the
grammar (the sampler masks the rest to -inf, under greedy and sampling alike) and then consumes
the token that was chosen. When the grammar is complete the only allowed tokens are the stop
tokens, so a generation that ends by itself always parses.

llguidance is used rather than written: its earley parser with lexer-level token tries computes a
mask for a 49k vocabulary in well under a millisecond, and it implements JSON Schema (types, enums,
required and additional properties, nested objects and arrays, string formats, lengths, ranges)
the way OpenAI's and llama.cpp's structured outputs do.

JSON is written compactly (", " and ": " separators, no free whitespace): with flexible whitespace
a small model can spend its whole budget on newlines.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import llguidance
import torch

from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer

FORMAT_KINDS = ("json_object", "json_schema", "choices")
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BIT = torch.arange(32, dtype=torch.int32)  # bit i of each int32 word of llguidance's mask


@dataclass(frozen=True)
class OutputFormat:
    """What the text must be: kind "json_object" (any JSON object), "json_schema" (JSON valid under
    `schema`) or "choices" (exactly one of `choices`)."""

    kind: str
    schema: dict | None = None
    choices: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise SlmError(f"unknown output format '{self.kind}'; use one of {', '.join(FORMAT_KINDS)}")
        if self.kind == "json_schema" and not isinstance(self.schema, dict):
            raise SlmError("a json_schema format needs the schema as a JSON object")
        if self.kind == "choices" and (not self.choices or not all(isinstance(c, str) and c for c in self.choices)):
            raise SlmError("a choices format needs at least one non-empty label")

    def grammar(self) -> str:
        """llguidance's grammar for this format."""
        if self.kind == "choices":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choices))
        schema = self.schema if self.kind == "json_schema" else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_LAYOUT)
        except ValueError as error:
            raise SlmError(f"the JSON schema cannot be used: {error}") from None


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer_json: str, vocab_size: int, stop_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer (~0.5 s to build, so cached per tokenizer, vocabulary and stops)."""
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(stop_ids))


class Grammar:
    """A format compiled for one tokenizer; `matcher()` starts one sequence."""

    def __init__(self, fmt: OutputFormat, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]):
        if not stop_ids:
            raise SlmError("structured output needs a stop token to end the text with; this model has none")
        self.format, self.vocab_size = fmt, vocab_size
        self.tokenizer = _ll_tokenizer(tokenizer.backend.to_str(), vocab_size, tuple(sorted(stop_ids)))
        self.grammar = fmt.grammar()
        error = llguidance.LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        if error:
            raise SlmError(f"the {fmt.kind} format cannot be compiled: {error.splitlines()[0]}")

    def matcher(self) -> TokenMatcher:
        return TokenMatcher(llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0), self.vocab_size)


class TokenMatcher:
    """One sequence's place in the grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size
        self._words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)  # the packed mask

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the text inside the grammar (only stop tokens once complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        self._raise_on_error()
        return ((self._words[:, None] >> _BIT) & 1).view(-1)[:self.vocab_size].bool()

    def advance(self, token: int) -> None:
        """Consume the chosen token (it must be one `allowed()` gave)."""
        self._matcher.consume_token(token)
        self._raise_on_error()

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole, valid answer."""
        return self._matcher.is_accepting()

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise SlmError(f"structured output failed: {self._matcher.get_error()}")

