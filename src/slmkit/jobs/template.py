"""`slm template`: show what a model's chat template makes of a conversation -- the exact text the
model reads (markers, system prompt, generation prompt), its length in tokens, and with `--trained`
the characters `slm finetune` puts in the loss (each assistant reply and its end of turn)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.sft import chat_spans, check_messages
from slmkit.errors import SlmError
from slmkit.load import load_tokenizer
from slmkit.presets import DEFAULT_MODEL

# Around each trained span with --trained: brackets no chat template writes, so they stand out.
OPEN, CLOSE = "⟦", "⟧"


@dataclass
class TemplateJob:
    model: str = DEFAULT_MODEL
    """the MODEL whose chat template to render (GGUF, Hugging Face directory or preset)"""
    messages: str = ""
    """a conversation: a JSON file holding [{"role", "content"}, ...] (or a chat row {"messages": [...]}), or - for stdin"""
    system: str = ""
    """a system message to put first"""
    user: str = ""
    """a user message to add at the end"""
    generation_prompt: bool = True
    """end with the template's cue for the assistant's reply (what `slm chat` sends); off renders a finished chat"""
    trained: bool = False
    """render the finished chat and mark the characters a fine-tune trains on (assistant replies and their end of turn) with ⟦ ⟧"""


def run_template(job: TemplateJob) -> None:
    messages = conversation(job)
    tokenizer = load_tokenizer(job.model)
    if job.trained:
        text, spans = chat_spans(tokenizer, messages, job.messages or "--system/--user")
        text = mark(text, spans)
    else:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=job.generation_prompt)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    n_tokens = len(tokenizer.encode(text.replace(OPEN, "").replace(CLOSE, ""), add_special=True))
    print(f"{len(messages)} messages, {n_tokens} tokens", file=sys.stderr)


def conversation(job: TemplateJob) -> list[dict]:
    """The messages of --messages, with --system put first and --user added last."""
    given = _read_messages(job.messages) if job.messages else []
    messages = ([{"role": "system", "content": job.system}] if job.system else []) + given
    messages += [{"role": "user", "content": job.user}] if job.user else []
    if not messages:
        raise SlmError("give a conversation: --user TEXT (and --system TEXT), or --messages FILE (or - for stdin)")
    where = {"": "--system/--user", "-": "stdin"}.get(job.messages, job.messages)
    messages = check_messages(messages, where)
    if job.trained and not any(m["role"] == "assistant" for m in messages):
        raise SlmError(f"{where}: --trained needs an assistant turn (a fine-tune trains only on assistant replies)")
    return messages


def _read_messages(source: str) -> list:
    if source != "-" and not Path(source).is_file():
        raise SlmError(f"--messages '{source}' is not a file; give a JSON file of messages or - for stdin")
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SlmError(f"--messages {source}: not JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    return data.get("messages") if isinstance(data, dict) else data


def mark(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each (start, end) character span wrapped in ⟦ ⟧ (spans in order, not overlapping)."""
    out, at = [], 0
    for start, end in spans:
        out += [text[at:start], OPEN, text[start:end], CLOSE]
        at = end
    return "".join(out + [text[at:]])
