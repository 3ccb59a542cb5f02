"""llama.cpp as a runtime: any slmkit model exported once to GGUF, then decoded by llama.cpp.

`LlamaCppEngine` has `Engine`'s interface (token ids in, `Generation`s out, the same callbacks,
grammar matchers and `SamplingParams`), so `TextGenerator`, `slm generate` and `slm chat` run on
either. llama.cpp does the forward passes through its multi-sequence batch API (one sequence id
per prompt, rows that finish leave the batch, a single prompt keeps its cache between calls and
reuses the longest shared prefix); the next token is chosen by slmkit's own sampler on llama.cpp's
logits, so penalties, logit bias, seeds and structured output behave exactly as on the torch engine.

`runtime_files` turns a MODEL argument into a GGUF file: a GGUF is used as is; anything else is
exported once (q8_0 by default) into a cache keyed by the source files' content hash, with a
checksum beside each export so a damaged file is rebuilt, never loaded.

Written over llama-cpp-python's low-level bindings rather than its `Llama` class: `Llama` decodes
one sequence at a time and samples internally, where we need several sequences per batch and our
own sampler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.fileio import file_sha256, write_json, write_text
from slmkit.infer.constrain import TokenMatcher
from slmkit.infer.embed import Embedder
from slmkit.infer.engine import Generation, TokenCallback, check_prompt, decode_rows, shared_prefix
from slmkit.infer.sampling import SamplingParams
from slmkit.interop.gguf import check_exportable, open_gguf, read_config, read_tokenizer, write_gguf
from slmkit.interop.gguf_lora import write_gguf_lora
from slmkit.interop.hf import config_to_hf, read_hf_config
from slmkit.interop.peft import is_adapter_dir, read_adapter
from slmkit.layers import cpu_flags
from slmkit.load import find_base, inspect, load, resolve
from slmkit.rope import rope_type
from slmkit.runtime import RUNTIME_GGUF_TYPES
from slmkit.tokenizer import Tokenizer

try:  # the [llamacpp] extra
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the installation
    llama_cpp = None

if llama_cpp is not None:
    @llama_cpp.llama_log_callback
    def _errors_only(level, text, _user_data):
        """llama.cpp logs every tensor and buffer as it loads; show only its errors."""
        if level >= 4 and text:  # GGML_LOG_LEVEL_ERROR
            os.write(2, text)

    llama_cpp.llama_log_set(_errors_only, ctypes.c_void_p(0))
    _SILENT_PROGRESS = llama_cpp.llama_progress_callback(lambda _progress, _user_data: True)

MISSING = "the llama.cpp engine needs llama-cpp-python: pip install -e '.[llamacpp]' (or use --engine torch)"


def available() -> bool:
    return llama_cpp is not None


def choose_engine(requested: str, spec: str, torch_only: list[str] = ()) -> str:
    """'torch' or 'llamacpp' for --engine auto|torch|llamacpp on MODEL; torch_only names options the
    user set that only the torch engine has (then auto means torch, and llamacpp is refused)."""
    if requested == "llamacpp":
        if not available():
            raise SlmError(MISSING)
        if torch_only:
            raise SlmError(f"{torch_only[0]} is a torch-engine option; drop it or use --engine torch")
        if isinstance(resolve(spec), str):
            raise SlmError(f"'{spec}' is an architecture without weights; llama.cpp needs a model file "
                           f"(use --engine torch for random weights)")
        return "llamacpp"
    if requested == "torch" or torch_only or not available():
        return "torch"
    target = resolve(spec)
    if isinstance(target, str):  # a preset: random weights, which only the torch engine makes
        return "torch"
    if isinstance(target, Path) and target.is_file():  # already a GGUF
        return "llamacpp"
    try:  # auto: llama.cpp unless the model cannot be written as GGUF llama
        check_exportable(inspect(spec).config)
    except SlmError:
        return "torch"
    return "llamacpp"


# -- the GGUF cache -------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("SLMKIT_CACHE", Path.home() / ".cache" / "slmkit")) / "llamacpp"


def source_hash(path: Path) -> str:
    """Content hash of a model file, or of the files directly inside a model directory (an adapter
    directory also hashes its base's files, which its outputs depend on)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    if path.is_dir() and is_adapter_dir(path):
        digest.update(source_hash(Path(resolve(find_base(read_adapter(path))))).encode())
    return digest.hexdigest()


@dataclass
class RuntimeFiles:
    """What llama.cpp runs for a MODEL argument."""

    gguf: Path
    config: ModelConfig
    tokenizer: Tokenizer
    lora: Path | None = None  # a llama.cpp LoRA adapter applied over `gguf`

    @property
    def file_bytes(self) -> int:
        return self.gguf.stat().st_size + (self.lora.stat().st_size if self.lora else 0)


def runtime_files(spec: str, gguf_type: str = "q8_0", progress=print) -> RuntimeFiles:
    """The GGUF file, architecture and tokenizer for running MODEL in llama.cpp.

    A GGUF is run as is; a LoRA adapter becomes a llama.cpp adapter file over its base's GGUF
    (the base's export is shared by all its adapters; DoRA and adapters of a tied head, which
    llama.cpp cannot apply, are merged and exported instead); anything else is exported once to
    `gguf_type`. Each source gets a cache entry keyed by its content hash: the export (with its
    checksum: a damaged file is rebuilt, never loaded) and the config and tokenizer as JSON,
    because reading them back from a GGUF with gguf-py takes seconds where JSON takes milliseconds."""
    if gguf_type not in RUNTIME_GGUF_TYPES:
        raise SlmError(f"--gguf-type '{gguf_type}' is not one of {', '.join(RUNTIME_GGUF_TYPES)}")
    target = resolve(spec)
    if isinstance(target, str):
        raise SlmError(f"'{spec}' is an architecture without weights; give a GGUF file or a model directory")
    entry = cache_dir() / f"{target.resolve().name}-{source_hash(target)[:16]}"
    gguf = target if target.is_file() else entry / f"model-{gguf_type}.gguf"
    export_ok = target.is_file() or _intact(gguf)  # a GGUF source has no export to check
    if not export_ok and is_adapter_dir(target):
        files = _adapter_files(spec, target, entry, gguf_type, progress)
        if files is not None:
            return files
    if not export_ok or not (entry / "tokenizer_config.json").is_file():
        _build(spec, target, entry, gguf, gguf_type, progress)
    return RuntimeFiles(gguf, read_hf_config(entry), Tokenizer.from_dir(entry))


def _adapter_files(spec: str, target: Path, entry: Path, gguf_type: str, progress) -> RuntimeFiles | None:
    """The adapter as a llama.cpp LoRA file over its base's runtime files; None when llama.cpp
    cannot apply it as an adapter."""
    lora = entry / "adapter-f32.gguf"
    if not _intact(lora) or not (entry / "tokenizer_config.json").is_file():
        progress(f"exporting the adapter {spec} for llama.cpp (once; cached in {entry})")
        loaded = load(spec, dtype=torch.float32)  # not merged: the LoRA layers are what is written
        entry.mkdir(parents=True, exist_ok=True)
        try:
            write_gguf_lora(loaded.model, lora, target.resolve().name)
        except SlmError:  # DoRA or a tied head: the caller merges and exports the whole model
            return None
        _seal(lora)
        _write_entry(entry, loaded.model.config, loaded.tokenizer, spec)
    base = runtime_files(find_base(read_adapter(target)), gguf_type, progress)
    return RuntimeFiles(base.gguf, read_hf_config(entry), Tokenizer.from_dir(entry), lora)


def gguf_kind(gguf: Path, gguf_type: str) -> str:
    """What `runtime_files` gave: 'gguf' for a GGUF run as it is, else the export's type."""
    return gguf_type if cache_dir().resolve() in gguf.resolve().parents else "gguf"


def _intact(gguf: Path) -> bool:
    checksum = gguf.with_name(gguf.name + ".sha256")
    return gguf.is_file() and checksum.is_file() and checksum.read_text().strip() == file_sha256(gguf)


def _build(spec: str, target: Path, entry: Path, gguf: Path, gguf_type: str, progress) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    if target.is_file():  # a GGUF: only its config and tokenizer, read once
        reader = open_gguf(target)
        config, tokenizer = read_config(reader), read_tokenizer(reader)
    else:
        progress(f"exporting {spec} to GGUF {gguf_type} for llama.cpp (once; cached in {entry})")
        loaded = load(spec, dtype=torch.float32, merge=True)
        try:
            write_gguf(loaded.model, loaded.tokenizer, gguf, gguf_type)
        except SlmError as error:
            raise SlmError(f"{error}. llama.cpp cannot run it: use --engine torch") from None
        _seal(gguf)
        config, tokenizer = loaded.model.config, loaded.tokenizer
    _write_entry(entry, config, tokenizer, spec)


def _seal(path: Path) -> None:
    """The checksum `_intact` compares against."""
    write_text(path.with_name(path.name + ".sha256"), file_sha256(path) + "\n")


def _write_entry(entry: Path, config: ModelConfig, tokenizer: Tokenizer | None, spec: str) -> None:
    if tokenizer is None:
        raise SlmError(f"'{spec}' has no tokenizer; text generation needs one")
    write_json(entry / "config.json", config_to_hf(config, torch.float32))
    tokenizer.save(entry)  # last: its tokenizer_config.json marks a finished entry


def default_context(config: ModelConfig, trained: int) -> int:
    """The context a llama.cpp engine gets unless asked for more: the trained one, except for LongRoPE,
    whose long factors llama.cpp applies to every position once the context exceeds the original one
    (transformers only past it), so by default the context stays where both give the same tokens."""
    if rope_type(config.rope_scaling) == "longrope":
        return min(trained, int(config.rope_scaling["original_max_position_embeddings"]))
    return trained


class LlamaCppEngine:
    def __init__(self, gguf: str | Path, config: ModelConfig, max_seq_len: int | None = None,
                 threads: int | None = None, sequences: int = 1, batch_tokens: int = 512, lora: Path | None = None):
        """gguf: the file to run; config: its architecture (`slmkit.load.inspect`); sequences: prompts
        decoded together (more are done in groups of this size); lora: a llama.cpp adapter file
        applied over `gguf` (see `RuntimeFiles`)."""
        if llama_cpp is None:
            raise SlmError(MISSING)
        llama_cpp.llama_backend_init()
        self.config, self.sequences, self.batch_tokens = config, sequences, batch_tokens
        model_params = llama_cpp.llama_model_default_params()
        model_params.progress_callback = _SILENT_PROGRESS  # llama.cpp prints a dot per tensor otherwise
        # llama.cpp's AMX buffer type (an "extra" one) crashes its worker threads on AMX CPUs (the tile
        # data permission is asked for on the main thread only: ggml-org/llama.cpp#20824, #26954); there
        # the weights stay in plain CPU buffers, everywhere else they are repacked for speed as usual
        model_params.use_extra_bufts = "amx_int8" not in cpu_flags()
        self._model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self._model:
            raise SlmError(f"llama.cpp could not load '{gguf}'")
        trained = llama_cpp.llama_model_n_ctx_train(self._model)
        self.max_seq_len = min(max_seq_len or default_context(config, trained), trained)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_seq_max = self.max_seq_len * sequences, sequences
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_threads = params.n_threads_batch = threads or torch.get_num_threads()
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise SlmError("llama.cpp could not create a context (too little memory for the context length?)")
        if lora is not None:
            self._apply_lora(lora)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self._batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)
        self.cached_tokens: list[int] = []  # what sequence 0 holds, for single-prompt prefix reuse

    @classmethod
    def for_files(cls, files: RuntimeFiles, max_seq_len: int | None = None, threads: int | None = None,
                  sequences: int = 1) -> LlamaCppEngine:
        return cls(files.gguf, files.config, max_seq_len, threads, sequences, lora=files.lora)

    def _apply_lora(self, path: Path) -> None:
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())  # freed with the model
        if not adapter:
            raise SlmError(f"llama.cpp could not load the adapter '{path}' over this model")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        if llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
            raise SlmError(f"llama.cpp could not apply the adapter '{path}'")

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    def __del__(self):
        self.close()

    def reset(self) -> None:
        self.cached_tokens = []

    def check_prompt(self, prompt: list[int]) -> None:
        check_prompt(prompt, self.max_seq_len, self.vocab_size)

    # -- generation ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams, on_token: TokenCallback | None = None,
                 matchers: list[TokenMatcher] | None = None) -> list[Generation]:
        for p in prompts:
            self.check_prompt(p)
        params.check_vocab(self.vocab_size)
        out = []
        for first in range(0, len(prompts), self.sequences):
            group = prompts[first:first + self.sequences]
            shifted = None if on_token is None else (lambda row, tok, first=first: on_token(first + row, tok))
            out += self._generate(group, params, shifted, matchers and matchers[first:first + self.sequences])
        return out

    def _generate(self, prompts, params, on_token, matchers) -> list[Generation]:
        start = time.perf_counter()
        logits = self._prefill(prompts)  # (B, V)
        prefill_s = time.perf_counter() - start
        budget = min(params.max_new_tokens, self.max_seq_len - max(len(p) for p in prompts))

        def step(feed: list[tuple[int, int, int]]) -> torch.Tensor:  # row i is sequence i
            if len(prompts) == 1:
                self.cached_tokens.append(feed[0][1])
            return self.step(feed)

        results = decode_rows(prompts, logits, params, budget, on_token, step, matchers)
        decode_s = time.perf_counter() - start - prefill_s
        for g in results:
            g.prefill_seconds, g.decode_seconds = prefill_s, decode_s
        return results

    def tail_logits(self, tokens: list[int], n: int) -> torch.Tensor:
        """(n, V) next-token logits at the last n positions of `tokens` (scoring continuations).
        Sequence 0 keeps what it holds of the longest shared prefix, so the choices of a question
        run their shared context once."""
        check_prompt(tokens, self.max_seq_len + 1, self.vocab_size)  # scoring needs no room for a new token
        keep = min(shared_prefix(self.cached_tokens, tokens), len(tokens) - n)
        if not llama_cpp.llama_memory_seq_rm(self._memory, 0, keep, -1):
            llama_cpp.llama_memory_clear(self._memory, True)
            keep = 0
        self.cached_tokens = list(tokens)
        entries = [(0, tokens[pos], pos, pos >= len(tokens) - n) for pos in range(keep, len(tokens))]
        return torch.cat([self._run(entries[i:i + self.batch_tokens])
                          for i in range(0, len(entries), self.batch_tokens)])

    @property
    def parameters(self) -> int:
        return int(llama_cpp.llama_model_n_params(self._model))

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run each prompt into its sequence (a single prompt keeps what sequence 0 already holds);
        returns the last position's logits (B, V)."""
        keep = shared_prefix(self.cached_tokens, prompts[0]) if len(prompts) == 1 else 0
        if not llama_cpp.llama_memory_seq_rm(self._memory, 0, keep, -1) or len(prompts) > 1:
            llama_cpp.llama_memory_clear(self._memory, True)
            keep = 0
        self.cached_tokens = list(prompts[0]) if len(prompts) == 1 else []
        return torch.cat(self.prefill_sequences(list(range(len(prompts))), prompts, False, keep))

    def prefill_sequences(self, seqs: list[int], prompts: list[list[int]], all_logits: bool = False,
                          start: int = 0) -> list[torch.Tensor]:
        """Several prompts, each into its own sequence, packed into as few llama_decode calls as the
        batch size allows (one call per prompt would pay llama.cpp's per-call cost each time)."""
        entries = [(seq, tok, pos, all_logits or pos == len(prompt) - 1)
                   for seq, prompt in zip(seqs, prompts) for pos, tok in enumerate(prompt) if pos >= start]
        logits = torch.cat([self._run(entries[i:i + self.batch_tokens])
                            for i in range(0, len(entries), self.batch_tokens)])
        sizes = [len(p) - start if all_logits else 1 for p in prompts]
        return list(torch.split(logits, sizes))

    def free_sequence(self, seq: int) -> None:
        """Forget everything sequence `seq` holds (a request ended)."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def trim_sequence(self, seq: int, keep: int) -> None:
        """Keep only the first `keep` positions of sequence `seq` (rejected guesses, a reused prefix)."""
        if not llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1):
            raise SlmError(f"llama.cpp could not trim sequence {seq} to {keep} tokens")

    def save_sequence(self, seq: int) -> bytes:
        """Sequence `seq`'s KV state, serialized by llama.cpp (for `load_sequence` into any sequence)."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buffer = (ctypes.c_ubyte * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq)
        return bytes(memoryview(buffer)[:written])  # one copy (slicing the ctypes array makes a list of ints)

    def load_sequence(self, seq: int, state: bytes) -> None:
        """Put a `save_sequence` state into sequence `seq` (emptied first)."""
        self.free_sequence(seq)
        buffer = (ctypes.c_ubyte * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(state), seq) == 0:
            raise SlmError(f"llama.cpp could not restore a cached prefix into sequence {seq}")

    def run(self, entries: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """llama_decode over (sequence, token, position, wants logits) entries in as few calls as the
        batch size allows, each call's rows sorted by sequence id (a batch whose sequences are out of
        order is split into many small passes: measured, 32 rows in descending order decode 3x slower);
        the logits asked for, in the entries' order (n, V)."""
        order = sorted(range(len(entries)), key=lambda i: (entries[i][0], entries[i][2]))
        logits = torch.cat([self._run([entries[i] for i in order[j:j + self.batch_tokens]])
                            for j in range(0, len(order), self.batch_tokens)])  # row r: the r-th wanted in `order`
        wanted = torch.tensor([i for i in order if entries[i][3]], dtype=torch.long)
        return logits[wanted.argsort()]  # back to the entries' order

    def step(self, feed: list[tuple[int, int, int]]) -> torch.Tensor:
        """One decode step: (sequence, token, position) per row; returns their next-token logits (n, V)."""
        return self.run([(*row, True) for row in feed])

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """llama_decode over (sequence, token, position, wants logits) entries; the logits asked for."""
        batch = self._batch
        for i, (seq, tok, pos, want) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise SlmError(f"llama.cpp failed to decode a batch (status {status}); the context may be full")
        wanted = [i for i, entry in enumerate(entries) if entry[3]]
        if not wanted:
            return torch.empty(0, self.vocab_size)
        return torch.from_numpy(np.stack([_logits_row(self._ctx, i, self.vocab_size) for i in wanted]))


class LlamaCppEmbedder(Embedder):
    """Embeddings on llama.cpp: its embeddings mode with mean pooling over each sequence's final
    hidden states (after the output norm, as slmkit's), L2-normalised here. A second context on the
    engine's loaded model, so serving and embedding share the weights. Rows are packed into one
    llama_decode while their tokens fit the context (mean pooling needs a whole sequence per pass)."""

    def __init__(self, engine: LlamaCppEngine, tokenizer, batch_size: int = 32, context: int | None = None):
        self._setup(engine.config, tokenizer, batch_size, min(context or engine.max_seq_len, engine.max_seq_len))
        self.engine = engine  # keeps the model alive
        params = llama_cpp.llama_context_default_params()
        # llama.cpp's pooling graph wants the pass's token count a multiple of its sequence count
        params.n_ctx = params.n_batch = params.n_ubatch = -(-self.context // batch_size) * batch_size
        params.n_seq_max, params.embeddings = batch_size, True
        params.kv_unified = True  # one cache for all rows of a pass (split per sequence, one row could not fill it)
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.n_threads = params.n_threads_batch = torch.get_num_threads()
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(engine._model, params)
        if not self._ctx:
            raise SlmError("llama.cpp could not create an embeddings context (too little memory?)")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.context, 0, 1)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __del__(self):
        self.close()

    def _pooled(self, rows: list[list[int]]) -> torch.Tensor:
        out, group, used = [], [], 0
        for row in rows:
            if group and used + len(row) > self.context:
                out.append(self._decode(group))
                group, used = [], 0
            group.append(row)
            used += len(row)
        out.append(self._decode(group))
        return torch.cat(out)

    def _decode(self, rows: list[list[int]]) -> torch.Tensor:
        """One llama_decode over `rows` (sequence i is row i); their pooled vectors (B, C)."""
        llama_cpp.llama_memory_clear(self._memory, True)
        batch, n = self._batch, 0
        for seq, row in enumerate(rows):
            for pos, tok in enumerate(row):
                batch.token[n], batch.pos[n], batch.n_seq_id[n], batch.logits[n] = tok, pos, 1, True
                batch.seq_id[n][0] = seq
                n += 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise SlmError(f"llama.cpp failed to embed a batch (status {status})")
        width = self.dimensions
        vectors = [np.ctypeslib.as_array(ctypes.cast(llama_cpp.llama_get_embeddings_seq(self._ctx, seq),
                                                     ctypes.POINTER(ctypes.c_float)), shape=(width,)).copy()
                   for seq in range(len(rows))]
        return torch.from_numpy(np.stack(vectors))


def _logits_row(ctx, index: int, vocab: int) -> np.ndarray:
    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(vocab,)).copy()
