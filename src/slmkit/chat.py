"""`slm chat`: an interactive conversation in the terminal, streamed token by token.

Commands: /reset (forget the conversation), /system TEXT (set the system message and reset),
/result TEXT (answer the model's last tool call), /exit (or Ctrl-D). The history is trimmed from
the oldest turn when it no longer fits the context.

With tools (`slm chat --tools tools.json`, OpenAI's tool list) the model may call them: each call is
shown as `[call NAME(ARGUMENTS) id=...]`, and `/result TEXT` sends the tool's result back.
"""

from __future__ import annotations

import sys

from slmkit.generate import TextGenerator
from slmkit.infer.sampling import SamplingParams
from slmkit.toolcalls import ToolUse, parse_calls, tool_format

HELP = "commands: /reset  /system TEXT  /result TEXT  /exit  /help"


def run_chat(gen: TextGenerator, params: SamplingParams, system: str | None, name: str = "model", read=input,
             out=sys.stdout, tools: ToolUse | None = None) -> int:
    messages = _fresh(system)
    listing = f", tools: {', '.join(t.name for t in tools.tools)}" if tools else ""
    out.write(f"chatting with {name} ({gen.context_length:,}-token context{listing}). {HELP}\n")
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
            if command == "/result":
                call_id = _open_call(messages)
                if call_id is None:
                    out.write("(no tool call is waiting for a result)\n")
                    continue
                messages.append({"role": "tool", "tool_call_id": call_id, "content": rest.strip()})
                messages = _reply(gen, messages, params, out, tools)
            elif command == "/reset":
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
        messages = _reply(gen, messages, params, out, tools)


def _fresh(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _open_call(messages: list[dict]) -> str | None:
    """The id of the last call that has no result yet."""
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    for message in reversed(messages):
        for call in reversed(message.get("tool_calls") or []):
            if call["id"] not in answered:
                return call["id"]
    return None


def _reply(gen: TextGenerator, messages: list[dict], params: SamplingParams, out,
           tools: ToolUse | None = None) -> list[dict]:
    messages, dropped = gen.fit_messages(messages, params.max_new_tokens, tools)
    if dropped:
        out.write(f"(dropped the {dropped} oldest message(s) to fit the context)\n")
    out.write("assistant> ")

    def show(_row: int, text: str) -> None:
        out.write(text)
        out.flush()

    result = gen.chat(messages, params, show, tools=tools)
    g = result.generation
    out.write(f"\n  [{result.completion_tokens} tokens, {g.decode_tokens_per_second:.1f} tokens/s]\n")
    content, calls = parse_calls(result.text, tool_format(gen.tokenizer.chat_template)) if tools else (None, [])
    if not calls:
        return [*messages, {"role": "assistant", "content": result.text}]
    for call in calls:
        out.write(f"  [call {call.name}({call.arguments}) id={call.id}]  answer with /result TEXT\n")
    return [*messages, {"role": "assistant", "content": content or "", "tool_calls": [c.openai() for c in calls]}]
