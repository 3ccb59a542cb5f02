"""`slm chat`: an interactive conversation in the terminal, streamed token by token.

Commands: /reset (forget the conversation), /system TEXT (set the system message and reset),
/exit (or Ctrl-D). The history is trimmed from the oldest turn when it no longer fits the context.
"""

from __future__ import annotations

import sys

from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams

HELP = "commands: /reset  /system TEXT  /exit  /help"


def run_chat(gen: TextGenerator, params: SamplingParams, system: str | None, name: str = "model", read=input,
             out=sys.stdout) -> int:
    messages = _fresh(system)
    out.write(f"chatting with {name} ({gen.context_length:,}-token context). {HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command == "/exit":
                return 0
            if command == "/reset":
                messages = _fresh(system)
                out.write("(conversation reset)\n")
            elif command == "/system":
                system = rest.strip() or None
                messages = _fresh(system)
                out.write(f"(system message {'set' if system else 'cleared'}; conversation reset)\n")
            else:
                out.write(f"{HELP}\n")
            continue
        messages.append({"role": "user", "content": line})
        messages = _reply(gen, messages, params, out)


def _fresh(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _reply(gen: TextGenerator, messages: list[dict], params: SamplingParams, out) -> list[dict]:
    messages, dropped = gen.fit_messages(messages, params.max_new_tokens)
    if dropped:
        out.write(f"(dropped the {dropped} oldest message(s) to fit the context)\n")
    out.write("assistant> ")

    def show(_row: int, text: str) -> None:
        out.write(text)
        out.flush()

    result = gen.chat(messages, params, show)
    g = result.generation
    out.write(f"\n  [{result.completion_tokens} tokens, {g.decode_tokens_per_second:.1f} tokens/s]\n")
    return [*messages, {"role": "assistant", "content": result.text}]
