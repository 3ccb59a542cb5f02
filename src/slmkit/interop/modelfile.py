"""An Ollama `Modelfile` for a GGUF export: FROM the model file, ADAPTER for a LoRA, TEMPLATE (a Go
template) for the chat template, SYSTEM for a template's default system message, PARAMETER stop
for each stop token. `ollama create NAME -f DIR/Modelfile` then serves the model as it was trained.

Ollama's TEMPLATE is a Go template over `.System`, `.Messages` (`.Role`, `.Content`, `.ToolCalls`)
and `.Tools`, which no general translation from Jinja produces; we recognise the chat formats that
families use (ChatML: SmolLM, Qwen; Llama 3; Gemma; Phi-3) by their markers and write Ollama's
equivalent template, as Ollama's own library does. A template of another format is left to Ollama,
which reads the GGUF's `tokenizer.chat_template` itself; the Modelfile says so in a comment.
"""

from __future__ import annotations

import json
import re

CHATML = '''{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}'''
LLAMA3 = '''{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- if and (ne .Role "assistant") $last }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}'''
GEMMA = '''{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}'''
PHI3 = '''{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|{{ .Role }}|>
{{ .Content }}{{ if not $last }}<|end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|end|>
<|assistant|>
{{ end }}
{{- end }}'''
FORMATS = {"chatml": ("<|im_start|>", CHATML), "llama3": ("<|start_header_id|>", LLAMA3),
           "gemma": ("<start_of_turn>", GEMMA), "phi3": ("<|assistant|>", PHI3)}
# A default system message written into the template, ChatML style (SmolLM2's, Qwen2.5's)
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]+?)<\|im_end\|>")


def chat_format(chat_template: str | None) -> str | None:
    """chatml | llama3 | gemma | phi3, or None for a format we do not write a Go template for."""
    template = chat_template or ""
    return next((name for name, (marker, _) in FORMATS.items() if marker in template), None)


def default_system(chat_template: str | None) -> str | None:
    """The system message a template adds when the conversation has none (e.g. SmolLM2's)."""
    match = _DEFAULT_SYSTEM.search(chat_template or "")
    return match.group(1).replace("\\n", "\n") if match else None


def modelfile(gguf_name: str, chat_template: str | None, stops: list[str], adapter_name: str | None = None,
              source: str = "") -> str:
    """The Modelfile text; file names are relative to the Modelfile's directory."""
    lines = [f"# written by slmkit{f' from {source}' if source else ''}; run: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    kind = chat_format(chat_template)
    if kind:
        lines.append(f'TEMPLATE """{FORMATS[kind][1]}"""')
        if system := default_system(chat_template):
            lines.append(f'SYSTEM """{system}"""')
    elif chat_template:
        lines.append("# no TEMPLATE: Ollama reads the chat template stored in the GGUF file")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops) if stop]
    return "\n".join(lines) + "\n"
