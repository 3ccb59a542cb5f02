"""Fine-tuning examples: read them, render them, mask them, split them.

Three formats, one JSON object per line (or plain .txt for text):
    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
                       rendered with the model's chat template; the loss covers each assistant
                       reply and the end-of-turn token after it, nothing the user or system wrote.
                       With tools (OpenAI's fine-tuning format): {"messages": [..., {"role":
                       "assistant", "tool_calls": [...]}, {"role": "tool", "tool_call_id", "content"},
                       ...], "tools": [...]}; calls are written in the model family's own call
                       format (`slmkit.toolcalls`) and trained as assistant text
    prompt_completion  {"prompt": "...", "completion": "..."}: the loss covers the completion
                       and an end-of-sequence token
    text               {"text": "..."} or a .txt file (documents split as `slm prepare` splits
                       them): continued pretraining, the loss covers every token

Which tokens a chat trains is found from character offsets: each assistant turn's span is what
rendering the conversation up to that turn adds after rendering it up to the generation prompt,
and a token is trained when it starts inside a span. This works for any template that renders a
conversation turn by turn (ChatML, Llama 3, Zephyr...), and a template that does not is refused.

An example longer than the limit is cut (`overlong="truncate"`, counted) by dropping the middle
of its longest untrained stretch (a long input loses its middle, never the answer while the
answer fits, and the template's markers around it stay) or refused (`overlong="error"`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.data.readers import json_records, read_documents
from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer
from slmkit.toolcalls import (
    Tool,
    ToolError,
    check_tool_history,
    read_tools,
    template_messages,
    tool_format,
    writes_calls,
)

FORMATS = ("auto", "chat", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
OVERLONG = ("truncate", "error")


@dataclass
class Example:
    """One training example as written, before tokenization."""

    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    label: str | None = None  # a class, for stratified splits and label-set evaluation
    where: str = ""  # "file:line", for error messages
    references: list[str] | None = None  # acceptable answers, for evaluation (summaries have several)
    tools: list[Tool] | None = None  # the tools a chat may call

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "text" if self.text is not None else "prompt_completion"


@dataclass
class Encoded:
    ids: list[int]
    trained: list[bool]  # per token: is it a target of the loss (as the next token of the one before)
    truncated: bool = False


@dataclass
class EncodeReport:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train after truncation
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0

    def summary(self) -> str:
        cut = f", {self.truncated} cut to fit" if self.truncated else ""
        drop = f", {self.dropped} dropped (no answer left after cutting)" if self.dropped else ""
        return (f"{self.examples} examples, {self.tokens:,} tokens ({self.trained_tokens:,} trained), "
                f"longest {self.longest}{cut}{drop}")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    """Every example of a .jsonl (or .txt for the text format) file, checked row by row."""
    path = Path(path)
    if fmt not in FORMATS:
        raise SlmError(f"unknown data format '{fmt}' (choose from {', '.join(FORMATS)})")
    if not path.is_file():
        raise SlmError(f"training data '{path}' not found")
    if path.suffix == ".txt":
        if fmt not in ("auto", "text"):
            raise SlmError(f"'{path}' is plain text; it can only be used with format=text")
        return [Example(text=doc, where=f"{path}:doc{i}") for i, doc in enumerate(read_documents(path), 1)]
    if path.suffix != ".jsonl":
        raise SlmError(f"'{path}' is neither .jsonl nor .txt; write one JSON object per line")
    try:
        examples = [parse_row(row, fmt, where) for where, row in json_records(path)]
    except UnicodeDecodeError as err:
        raise SlmError(f"'{path}' is not UTF-8 text (byte {err.start}); convert it to UTF-8") from err
    if not examples:
        raise SlmError(f"'{path}' holds no examples")
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        raise SlmError(f"'{path}' mixes formats ({', '.join(sorted(kinds))}); use one per file")
    return examples


def parse_row(row: dict, fmt: str, where: str) -> Example:
    kind = fmt if fmt != "auto" else _detect(row, where)
    label = row.get("label")
    label = None if label is None else str(label)
    if kind == "chat":
        return Example(messages=_messages(row, where), label=label, where=where, tools=_tools(row, where))
    if kind == "prompt_completion":
        return Example(prompt=_text(row, "prompt", where), completion=_text(row, "completion", where, empty=False),
                       label=label, where=where)
    return Example(text=_text(row, "text", where, empty=False), label=label, where=where)


def _detect(row: dict, where: str) -> str:
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise SlmError(f"{where} has none of the known fields (messages | prompt+completion | text); "
                   f"it has: {', '.join(map(str, row)) or 'nothing'}")


def _text(row: dict, key: str, where: str, empty: bool = True) -> str:
    value = row.get(key)
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise SlmError(f"{where}: '{key}' must be {'non-empty ' if not empty else ''}text, got {value!r:.60}")
    return value


def _messages(row: dict, where: str) -> list[dict]:
    messages = check_messages(row.get("messages"), where)
    if not any(m["role"] == "assistant" for m in messages):
        raise SlmError(f"{where}: the chat has no assistant turn, so there is nothing to learn from it")
    return messages


def _tools(row: dict, where: str) -> list[Tool] | None:
    if row.get("tools") is None:
        return None
    try:
        return read_tools(row["tools"])
    except ToolError as error:
        raise SlmError(f"{where}: {error}") from None


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as [{"role", "content"}, ...] with known roles and text contents (an assistant
    turn may instead make `tool_calls`, a tool turn answers one by `tool_call_id`), or a one-line
    error naming the first bad message (other keys are dropped)."""
    if not isinstance(messages, list) or not messages:
        raise SlmError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and bool(m.get("tool_calls"))
        if not isinstance(m, dict) or m.get("role") not in ROLES or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise SlmError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": text}}"
                           " (or an assistant's \"tool_calls\")")
        kept = {"role": m["role"], "content": m.get("content") or ""}
        kept.update({k: m[k] for k in ("tool_calls", "tool_call_id") if m.get(k) is not None})
        out.append(kept)
    try:
        check_tool_history(out)
    except ToolError as error:
        raise SlmError(f"{where}: {error}") from None
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizing with loss masks
# ---------------------------------------------------------------------------------------------


def encode(example: Example, tokenizer: Tokenizer) -> Encoded:
    """Token ids and which of them are trained (see the module docstring)."""
    if example.kind == "text":
        ids = tokenizer.encode(example.text, add_special=False) + _eos(tokenizer, example)
        return Encoded(_bos(tokenizer) + ids, [False] * len(_bos(tokenizer)) + [True] * len(ids))
    if example.kind == "prompt_completion":
        text = example.prompt + example.completion
        return _from_spans(tokenizer, text, [(len(example.prompt), len(text))], _eos(tokenizer, example))
    text, spans = chat_spans(tokenizer, example.messages, example.where, example.tools)
    return _from_spans(tokenizer, text, spans)


def render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool,
                tools: list[Tool] | None = None) -> str:
    """A conversation rendered with the chat template; with tools or tool turns, in the family's
    call format (`slmkit.toolcalls.template_messages`)."""
    extra: dict = {}
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        template = tokenizer.chat_template
        messages, extra = template_messages(messages, tools, tool_format(template), writes_calls(template))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)


def chat_spans(tokenizer: Tokenizer, messages: list[dict], where: str = "",
               tools: list[Tool] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant reply (+ end of turn)."""
    if not tokenizer.chat_template:
        raise SlmError("the model has no chat template, so chat examples cannot be rendered; use the "
                       "prompt_completion or text format")
    text = render_chat(tokenizer, messages, False, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], True, tools)
        upto = render_chat(tokenizer, messages[: i + 1], False, tools)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise SlmError(f"{where}: the chat template does not render this conversation turn by turn, so the "
                           "assistant's tokens cannot be found; use the prompt_completion format")
        spans.append((len(before), len(before) + len(upto[len(before):].rstrip())))
    return text, spans


def _from_spans(tokenizer: Tokenizer, text: str, spans: list[tuple[int, int]], tail: list[int] = ()) -> Encoded:
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    trained = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
    bos = _bos(tokenizer)
    return Encoded(bos + list(encoding.ids) + list(tail), [False] * len(bos) + trained + [True] * len(tail))


def _bos(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []


def _eos(tokenizer: Tokenizer, example: Example) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise SlmError(f"{example.where}: the tokenizer has no end-of-sequence token to end a completion with")
    return [tokenizer.eos_token_id]


def fit(encoded: Encoded, limit: int, overlong: str, where: str) -> Encoded | None:
    """`encoded` cut to `limit` tokens (None when no trained token survives), or an error."""
    if len(encoded.ids) <= limit:
        return encoded
    if overlong == "error":
        raise SlmError(f"{where} has {len(encoded.ids)} tokens, more than the {limit} a sequence holds; raise "
                       "train.seq_len, shorten it, or set data.overlong=truncate")
    ids, trained = list(encoded.ids), list(encoded.trained)
    while len(ids) > limit:
        start, end = _longest_untrained(trained)
        cut = min(len(ids) - limit, end - start)
        if cut <= 0:  # the trained tokens alone are too long: keep their start
            ids, trained = ids[:limit], trained[:limit]
            break
        at = start + (end - start - cut) // 2  # from the middle: the template's markers at both ends survive
        del ids[at:at + cut], trained[at:at + cut]
    return Encoded(ids, trained, truncated=True) if any(trained[1:]) else None


def _longest_untrained(trained: list[bool]) -> tuple[int, int]:
    """[start, end) of the longest run of untrained tokens (the first token never counts: it is context)."""
    best, start = (0, 0), None
    for i, t in enumerate(trained + [True]):
        if not t and start is None:
            start = i
        elif t and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


def encode_all(examples: list[Example], tokenizer: Tokenizer, limit: int, overlong: str = "truncate"
               ) -> tuple[list[Encoded], EncodeReport]:
    """Encode every example, fitting each into `limit` tokens; one report for the lot."""
    if overlong not in OVERLONG:
        raise SlmError(f"data.overlong must be one of {', '.join(OVERLONG)}, not '{overlong}'")
    report, out = EncodeReport(), []
    for example in examples:
        fitted = fit(encode(example, tokenizer), limit, overlong, example.where)
        if fitted is None:
            report.dropped += 1
            continue
        out.append(fitted)
        report.examples += 1
        report.truncated += fitted.truncated
        report.tokens += len(fitted.ids)
        report.trained_tokens += sum(fitted.trained[1:])
        report.longest = max(report.longest, len(fitted.ids))
    if not out:
        raise SlmError("no example has a trained token left; raise train.seq_len")
    return out, report


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


@dataclass
class Split:
    train: list[int]
    val: list[int]
    test: list[int] = field(default_factory=list)


def split_rows(n: int, fractions: tuple[float, ...], seed: int, labels: list[str | None] | None = None) -> list[list[int]]:
    """Row indices split into len(fractions) + 1 parts (the last takes the rest), with a fixed seed;
    stratified when labels are given: each class is split in the same proportions."""
    if labels is not None and any(label is not None for label in labels):
        classes = sorted({str(label) for label in labels})
        if len(classes) < 2:
            raise SlmError(f"the labels have one class only ('{classes[0]}'): there is nothing to tell apart")
        groups = {c: [i for i in range(n) if str(labels[i]) == c] for c in classes}
    else:
        groups = {"": list(range(n))}
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for name, rows in groups.items():
        rows = list(rows)
        random.Random(f"{seed}:{name}").shuffle(rows)
        start = 0
        for k, fraction in enumerate(fractions):
            take = round(fraction * len(rows))
            parts[k] += rows[start:start + take]
            start += take
        parts[-1] += rows[start:]
    return [sorted(p) for p in parts]


def labels_of(examples: list[Example]) -> list[str | None] | None:
    labels = [e.label for e in examples]
    return labels if any(label is not None for label in labels) else None
