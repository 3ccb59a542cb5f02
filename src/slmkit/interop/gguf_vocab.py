"""The vocabulary inside a GGUF file, both ways: byte-level BPE (`tokenizer.ggml.model = gpt2`) and
SentencePiece (`llama`), with special ids, BOS/EOS flags and the chat template.

What llama.cpp needs (src/llama-vocab.cpp): the token list as long as the embedding (padded with
unused `[PAD{i}]`), unique strings, for `gpt2` the merges and a `pre` it knows, for `llama` the
scores (it merges the adjacent pair whose piece scores highest) and types, with all 256 `<0xNN>`
byte pieces for byte fallback, and `add_space_prefix` (Gemma: false). Building the `tokenizers`
objects is `slmkit.tokenizer`'s job; this module only reads and writes the fields.
"""

from __future__ import annotations

import json

from slmkit.errors import SlmError
from slmkit.tokenizer import Tokenizer

KINDS = ("gpt2", "llama")


def field(reader, key: str, default=None):
    """A metadata value of a `GgufContents` (or of a `gguf.GGUFReader`, whose fields wrap their values)."""
    found = reader.fields.get(key)
    if found is None:
        return default
    return found.contents() if hasattr(found, "contents") else found


def read_tokenizer(reader) -> Tokenizer | None:
    kind = field(reader, "tokenizer.ggml.model")
    if kind is None:
        return None
    if kind not in KINDS:
        raise SlmError(f"GGUF tokenizer '{kind}' is not supported (slmkit reads byte-level BPE 'gpt2' and "
                       "SentencePiece 'llama')")
    special = {
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),  # llama.cpp's defaults
        "add_eos": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "chat_template": field(reader, "tokenizer.chat_template"),
    }
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    if kind == "llama":
        return Tokenizer.from_spm_vocab(tokens, field(reader, "tokenizer.ggml.scores"), types,
                                        bool(field(reader, "tokenizer.ggml.add_space_prefix", True)), **special)
    return Tokenizer.from_vocab(tokens, field(reader, "tokenizer.ggml.merges", []), types,
                                field(reader, "tokenizer.ggml.pre", "default"), **special)


def write_tokenizer(writer, tok: Tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp reads it; the token list is padded to the embedding rows."""
    if tok.vocab_size > vocab_size:
        raise SlmError(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} embeddings")
    spm = tok.spm_vocab()
    if spm is not None:
        _write_spm(writer, *spm, vocab_size)
    else:
        _write_bpe(writer, tok, vocab_size)
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _write_spm(writer, tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool,
               vocab_size: int) -> None:
    pad = vocab_size - len(tokens)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in set(tokens)]
    if missing:  # llama.cpp falls back to these for any character the vocabulary lacks, and crashes without
        raise SlmError(f"the SentencePiece vocabulary lacks byte pieces ({missing[0]}, ...), which llama.cpp needs")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)])
    writer.add_token_scores([float(s) for s in scores] + [-1000.0] * pad)
    writer.add_token_types(list(types) + [5] * pad)
    writer.add_add_space_prefix(add_space_prefix)


def _write_bpe(writer, tok: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE: tokens as byte-level strings, merges in rank order, an explicit `pre`."""
    if tok.pre is None:
        raise SlmError("the tokenizer's pre-tokenizer is not one llama.cpp knows; cannot write GGUF")
    data = json.loads(tok.backend.to_str())
    tokens = [""] * vocab_size
    types = [5] * vocab_size  # 5 = unused
    for token, i in data["model"]["vocab"].items():
        tokens[i], types[i] = token, 1
    for added in data.get("added_tokens", []):
        tokens[added["id"]], types[added["id"]] = added["content"], 3 if added["special"] else 4
    tokens = [t or f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
