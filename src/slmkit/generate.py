"""Text in, text out: tokenization, chat templates, stop strings and streaming over the engine.

`TextGenerator` is what the CLI (and later the server) talks to. It turns text into token ids,
runs `Engine`, and turns ids back into text incrementally: a multi-byte character split across
tokens is held back until complete, and text that might be the start of a stop string is held
back until it is clear it is not, so a stream never shows a stop string or half a character.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from slmkit.config import ModelConfig
from slmkit.data.sft import render_chat
from slmkit.errors import SlmError
from slmkit.infer.constrain import Grammar, OutputFormat
from slmkit.infer.engine import Engine, Generation
from slmkit.infer.sampling import SamplingParams
from slmkit.infer.speculate import Drafter
from slmkit.model import CausalLM
from slmkit.tokenizer import Tokenizer
from slmkit.toolcalls import ToolUse, tool_format, tool_grammar

# on_text(row, new_text) for streaming.
TextCallback = Callable[[int, str], None]


def stop_token_ids(config: ModelConfig, tokenizer: Tokenizer) -> list[int]:
    """The tokens that end a generation: the model's end-of-sequence ids and the tokenizer's."""
    ids = set(config.eos_ids())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


class TextStream:
    """Incremental detokenizer with stop strings for one sequence."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far (complete characters only)
        self.emitted = 0  # how much of `text` has been handed out
        self.stopped = False
        self._prefix, self._read = 0, 0  # token window, as in vLLM's detokenizer

    def push(self, token: int) -> str:
        """Add a token; returns the text that may be shown now (possibly empty)."""
        if self.stopped:  # nothing after a stop string counts
            return ""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix:self._read])
        after = self.tokenizer.decode(self.tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
        return self._release()

    def _release(self) -> str:
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        end = len(self.text) if self.stopped else len(self.text) - self._held_back()
        out = self.text[self.emitted:max(end, self.emitted)]
        self.emitted += len(out)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])), default=0)

    def finish(self) -> str:
        """The rest of the text once generation has ended (nothing more is held back)."""
        self.stopped = True
        return self._release()


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    generation: Generation

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class TextGenerator:
    def __init__(self, model: CausalLM | None, tokenizer: Tokenizer, max_seq_len: int | None = None,
                 compile: bool = False, drafter: Drafter | None = None, draft_tokens: int = 4, engine=None):
        """drafter: decode speculatively (`slmkit.infer.speculate`; same text, fewer passes).
        engine: another runtime with Engine's `generate` (e.g. `LlamaCppEngine`); then `model` is unused."""
        if tokenizer is None:
            raise SlmError("this model has no tokenizer; text generation needs one (load a GGUF or an HF "
                           "directory with tokenizer.json)")
        self.tokenizer = tokenizer
        self.engine = engine or Engine(model, max_seq_len, compile=compile, drafter=drafter, draft_tokens=draft_tokens)
        self.config: ModelConfig = self.engine.config

    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    def stop_ids(self) -> list[int]:
        return stop_token_ids(self.config, self.tokenizer)

    def encode_prompt(self, text: str, max_new_tokens: int, truncate: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text)
        room = self.context_length - min(max_new_tokens, self.context_length - 1)
        if len(ids) > room:
            if not truncate:
                raise SlmError(f"the prompt has {len(ids)} tokens, more than the {room} that fit in the "
                               f"{self.context_length}-token context with {max_new_tokens} new tokens; "
                               "shorten it, lower max tokens, or pass --truncate to keep its end")
            ids = ids[-room:]
        return ids

    def complete(self, prompts: list[str], params: SamplingParams, on_text: TextCallback | None = None,
                 truncate: bool = False, output_format: OutputFormat | None = None) -> list[Completion]:
        """Continue each prompt; the model's end-of-sequence tokens stop it as well as `params.stop`.

        output_format: the text must be JSON (optionally valid under a schema) or one of a set of labels."""
        params = replace(params, stop_token_ids=sorted({*params.stop_token_ids, *self.stop_ids()}))
        grammar = self.grammar(output_format, params.stop_token_ids) if output_format else None
        ids = [self.encode_prompt(p, params.max_new_tokens, truncate) for p in prompts]
        streams = [TextStream(self.tokenizer, list(params.stop)) for _ in prompts]

        def on_token(row: int, token: int) -> bool:
            piece = streams[row].push(token)
            if piece and on_text:
                on_text(row, piece)
            return streams[row].stopped

        matchers = [grammar.matcher(params.max_new_tokens) for _ in prompts] if grammar else None
        results = self.engine.generate(ids, params, on_token, matchers)
        out = []
        for row, (stream, gen) in enumerate(zip(streams, results)):
            rest = stream.finish()
            if rest and on_text:
                on_text(row, rest)
            out.append(Completion(stream.text, gen.tokens, gen.finish_reason, gen.prompt_tokens, gen))
        return out

    def grammar(self, output_format: OutputFormat, stop_ids: list[int]) -> Grammar:
        """The format compiled for this model's tokens (an SlmError naming the problem if it cannot be)."""
        return Grammar(output_format, self.tokenizer, self.config.vocab_size, stop_ids)

    def chat(self, messages: list[dict], params: SamplingParams, on_text: TextCallback | None = None,
             output_format: OutputFormat | None = None, tools: ToolUse | None = None) -> Completion:
        """One assistant reply to `messages`, rendered with the model's chat template; with `tools`
        the model may call them (read the calls with `slmkit.toolcalls.parse_calls`)."""
        prompt = render_chat(self.tokenizer, messages, True, tools and tools.tools)
        if tools:
            if output_format is not None:
                raise SlmError("give either tools or an output format, not both")
            output_format = tool_output_format(self.tokenizer, tools)
        return self.complete([prompt], params, on_text, output_format=output_format)[0]

    def fit_messages(self, messages: list[dict], max_new_tokens: int,
                     tools: ToolUse | None = None) -> tuple[list[dict], int]:
        """Drop the oldest turns (never the system prompt or the last message) until the prompt fits.

        Returns the messages kept and how many were dropped.
        """
        kept = list(messages)
        dropped = 0
        budget = self.context_length - max_new_tokens
        while True:
            rendered = render_chat(self.tokenizer, kept, True, tools and tools.tools)
            if len(self.tokenizer.encode(rendered)) <= budget:
                return kept, dropped
            first = 1 if kept and kept[0]["role"] == "system" else 0
            if len(kept) - first <= 1:
                raise SlmError("the last message alone does not fit in the context; shorten it")
            del kept[first]
            dropped += 1


def tool_output_format(tokenizer: Tokenizer, use: ToolUse) -> OutputFormat:
    """The grammar of an answer that may (or must) call `use.tools`, in the model family's call format;
    a `<tool_call>` that is a special token of the vocabulary is asked for as that token."""
    special = {tok.content: i for i, tok in tokenizer.backend.get_added_tokens_decoder().items() if tok.special}
    lark = tool_grammar(use.tools, use.choice, tool_format(tokenizer.chat_template), use.parallel, special)
    return OutputFormat("lark", lark=lark)
