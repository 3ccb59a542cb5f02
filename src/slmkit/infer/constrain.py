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

JSON that ends: a small model sometimes loops inside a string ("2023/2023/2023...") or adds keys
until the token budget cuts it, and a cut answer does not parse. The grammar still holds, but two
guards steer such a row toward its end. Once the last tokens repeat (a span of 1-32 tokens, over
at least 16 tokens), or the budget left is no more than what closing every open string, object
and array needs, only the allowed tokens that only close (`"`, `"}` inside a string, `}`, `]}`
outside) stay allowed, where there are any, until the row ends. An answer that ends by itself without looping is left exactly as it was.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import llguidance
import torch

from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer

FORMAT_KINDS = ("json_object", "json_schema", "choices", "lark")
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BIT = torch.arange(32, dtype=torch.int32)  # bit i of each int32 word of llguidance's mask


@dataclass(frozen=True)
class OutputFormat:
    """What the text must be: kind "json_object" (any JSON object), "json_schema" (JSON valid under
    `schema`), "choices" (exactly one of `choices`) or "lark" (a grammar in llguidance's lark
    dialect, e.g. tool calls: `slmkit.toolcalls.tool_grammar`)."""

    kind: str
    schema: dict | None = None
    choices: tuple[str, ...] = field(default_factory=tuple)
    lark: str = ""

    def __post_init__(self) -> None:
        if self.kind not in FORMAT_KINDS:
            raise SlmError(f"unknown output format '{self.kind}'; use one of {', '.join(FORMAT_KINDS)}")
        if self.kind == "json_schema" and not isinstance(self.schema, dict):
            raise SlmError("a json_schema format needs the schema as a JSON object")
        if self.kind == "choices" and (not self.choices or not all(isinstance(c, str) and c for c in self.choices)):
            raise SlmError("a choices format needs at least one non-empty label")
        if self.kind == "lark" and not self.lark:
            raise SlmError("a lark format needs its grammar")

    def grammar(self) -> str:
        """llguidance's grammar for this format."""
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.lark)
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


@functools.lru_cache(maxsize=8)
def _closer_masks(tokenizer_json: str, vocab_size: int, stop_ids: tuple[int, ...]) -> torch.Tensor:
    """(2, V) bool: the tokens that only close: `"` then nothing but `}` and `]` (inside a string),
    and nothing but `}` and `]` (outside one). `",` would close a string only to open another key."""
    ll = _ll_tokenizer(tokenizer_json, vocab_size, stop_ids)
    texts = [ll.decode_bytes([i]) for i in range(min(vocab_size, ll.vocab_size))]
    masks = torch.zeros(2, vocab_size, dtype=torch.bool)
    masks[0, :len(texts)] = torch.tensor([t[:1] == b'"' and not t[1:].strip(b"}]") for t in texts])
    masks[1, :len(texts)] = torch.tensor([bool(t) and not t.strip(b"}]") for t in texts])
    return masks


class Grammar:
    """A format compiled for one tokenizer; `matcher()` starts one sequence."""

    def __init__(self, fmt: OutputFormat, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]):
        if not stop_ids:
            raise SlmError("structured output needs a stop token to end the text with; this model has none")
        self.format, self.vocab_size = fmt, vocab_size
        key = (tokenizer.backend.to_str(), vocab_size, tuple(sorted(stop_ids)))
        self.tokenizer = _ll_tokenizer(*key)
        self.grammar = fmt.grammar()
        error = llguidance.LLMatcher.validate_grammar(self.grammar, self.tokenizer)
        if error:
            raise SlmError(f"the {fmt.kind} format cannot be compiled: {error.splitlines()[0]}")
        self.closers = _closer_masks(*key) if fmt.kind != "choices" else None  # JSON inside: guard its ending

    def matcher(self, budget: int | None = None) -> TokenMatcher:
        """A matcher for one sequence of at most `budget` new tokens (None: no budget guard)."""
        guard = JsonEnding(self.tokenizer, self.closers, budget) if self.closers is not None else None
        return TokenMatcher(llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0), self.vocab_size, guard)


class JsonEnding:
    """Steers a looping or nearly out-of-budget row toward the end of its JSON (module docstring)."""

    PERIODS, MIN_SPAN = 32, 16

    def __init__(self, tokenizer: llguidance.LLTokenizer, closers: torch.Tensor, budget: int | None):
        self.tokenizer, self.closers, self.budget = tokenizer, closers, budget
        self.tokens: list[int] = []
        self.depth, self.in_string, self.escaped = 0, False, False
        self.started: bool | None = None  # does the text open with JSON (or a tool call)? None: not yet known
        self.closing = False

    def advance(self, token: int) -> None:
        self.tokens.append(token)
        if self.started is False:  # free text (a tool grammar's text answer): nothing to guard
            return
        for byte in self.tokenizer.decode_bytes([token]):
            self._scan(chr(byte))

    def _scan(self, char: str) -> None:
        """Track how many strings, objects and arrays are open (JSON's lexical rules)."""
        if self.started is None:
            if char.isspace():
                return
            self.started = char in "{[<"  # JSON, or a tool call's opening tag
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth = max(self.depth - 1, 0)

    def steer(self, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed`, narrowed to its closing tokens when the row loops or runs out of budget."""
        self.closing = self.closing or bool(self.started and (self._short_of_budget() or self._looping()))
        if not self.closing:  # once it starts closing, a row goes on closing: the aim is its end
            return allowed
        closing = allowed & self.closers[0 if self.in_string else 1]
        return closing if bool(closing.any()) else allowed

    def _short_of_budget(self) -> bool:
        if self.budget is None:
            return False
        # a closer per open object/array; in a key: its quote, ": " and a short value; and the stop token
        needed = self.depth + (2 if self.in_string else 0) + 3
        return self.budget - len(self.tokens) <= needed

    def _looping(self) -> bool:
        t = self.tokens
        for period in range(1, self.PERIODS + 1):
            span = max(self.MIN_SPAN, 3 * period)
            if len(t) < span:
                return False
            if t[-1] == t[-1 - period] and t[-span:-period] == t[-span + period:]:
                return True
        return False


class TokenMatcher:
    """One sequence's place in the grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, guard: JsonEnding | None = None):
        self._matcher, self.vocab_size, self.guard = matcher, vocab_size, guard
        self._words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)  # the packed mask

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the text inside the grammar (only stop tokens once complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        self._raise_on_error()
        mask = ((self._words[:, None] >> _BIT) & 1).view(-1)[:self.vocab_size].bool()
        return self.guard.steer(mask) if self.guard is not None else mask

    def advance(self, token: int) -> None:
        """Consume the chosen token (it must be one `allowed()` gave)."""
        self._matcher.consume_token(token)
        self._raise_on_error()
        if self.guard is not None:
            self.guard.advance(token)

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole, valid answer."""
        return self._matcher.is_accepting()

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise SlmError(f"structured output failed: {self._matcher.get_error()}")

