"""ExecuTorch export: one `.pte` program that ExecuTorch's runtime runs on Android, iOS and embedded
Linux, with its weights lowered to the XNNPACK backend, and the tokenizer beside it.

Why a graph of our own and not ExecuTorch's `export_llama`: that script exports ExecuTorch's own
Llama definition from a converted checkpoint, one family at a time. Our `model.py` already runs every
family slmkit loads, so we trace it (torch.export) with two changes made here from outside: each
attention gets a static KV cache (buffers of `max_seq_len` slots that the program mutates in place)
and RoPE tables picked at export time. Where ExecuTorch's custom ops load, the cache is written by
`llama::update_cache` and attention is `llama::custom_sdpa`, which reads only the filled slots;
layers the custom kernel cannot express (a sliding window, Gemma 2's score soft cap) attend through
plain SDPA over the whole cache under a position mask. Weights are quantized with ExecuTorch's own
TorchAO recipe (`extension.llm.export.quantize`): `8da4w` is int8 dynamic activations x int4 weights
in groups (XNNPACK's qd8-f32-qb4w kernels) with a 4-bit embedding table, `int8` is int8 dynamic
activations x int8 per-channel weights with an 8-bit embedding (the recipe's weight-only int8, "8w",
lowers wrong in executorch 1.5.1: max |d log p| 2455 against 0.004 eager, measured), `fp32` keeps
the weights.

The program's `forward(tokens (1, T) int64, input_pos (1,) int64) -> logits (1, V)` of the last
token, with T dynamic (a whole prompt in one call), and the constant methods ExecuTorch's LLM runner
reads (`get_max_seq_len`, `get_vocab_size`, `get_bos_id`, `get_eos_ids`, `use_kv_cache`,
`enable_dynamic_shape`, ...), so `TextLLMRunner(OUT.pte, OUT_tokenizer/tokenizer.json)` runs it as
it runs ExecuTorch's own exports.

Files: OUT.pte and the directory OUT_tokenizer/ beside it (`interop.phone`).
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.phone import check_target, put_in_place, traced_refusal, write_sidecar
from slmkit.model import Attention, CausalLM, LayerInputs
from slmkit.rope import apply_rope, rope_cos_sin

EXECUTORCH_PRECISIONS = ("8da4w", "int8", "fp32")
INSTALL = "pip install -e '.[executorch]'"
# ExecuTorch's recipe names for each precision: (linear config, embedding config)
RECIPES = {"8da4w": ("8da4w", "4w"), "int8": ("8da8w", "8w"), "fp32": (None, None)}
DEFAULT_MAX_SEQ_LEN = 1024


def executorch_missing() -> str | None:
    """One line naming the install command when the exporter's packages are missing."""
    for module in ("executorch", "torchao"):
        if importlib.util.find_spec(module) is None:
            return f"ExecuTorch export and runs need executorch and torchao ({module} is missing): {INSTALL}"
    return None


def check_executorch_target(out: str | Path, force: bool) -> None:
    """What can be refused before a model is loaded: a wrong name, an existing OUT, a missing extra."""
    check_target(out, ".pte", force, "an ExecuTorch program")
    missing = executorch_missing()
    if missing:
        raise SlmError(missing)


# ---------------------------------------------------------------------------------------------
# The exported module: static KV cache per attention, logits of the last token
# ---------------------------------------------------------------------------------------------


class StaticCacheAttention(nn.Module):
    """An `Attention` with its own static cache, for tracing: keys and values (1, L, K, D) written at
    the slots [start, start+T) and attended over. Called by the block exactly as the attention it
    replaces; mask/is_causal/kv are unused (the cache and the positions say everything)."""

    def __init__(self, attn: Attention, max_seq_len: int, dtype: torch.dtype, window: int | None,
                 custom_ops: bool):
        super().__init__()
        self.attn, self.window = attn, window
        shape = (1, max_seq_len, attn.n_kv_heads, attn.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        # ExecuTorch's kernel has neither a window nor a soft cap: those layers take the plain path
        self.custom = custom_ops and window is None and attn.softcap is None

    def forward(self, x, cos, sin, mask, is_causal, kv, start):
        a = self.attn
        b, t, _ = x.shape
        q = a._heads(x, a.q_proj, "q_norm", a.n_heads)  # (1, H, T, D)
        k = a._heads(x, a.k_proj, "k_norm", a.n_kv_heads)  # (1, K, T, D)
        v = a.v_proj(x).view(b, t, a.n_kv_heads, a.head_dim)  # (1, T, K, D)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (1, T, H|K, D): the cache's layout
        if self.custom:
            torch.ops.llama.update_cache(k, self.k_cache, start)
            torch.ops.llama.update_cache(v, self.v_cache, start)
            y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0.0, True, a.scale)
        else:
            y = self._plain(q, k, v, start, t)
        return a.o_proj(y.reshape(b, t, -1))

    def _plain(self, q, k, v, start, t):
        """Index-copy into the cache and attend over all L slots under a mask of positions."""
        a = self.attn
        slots = torch.arange(t, device=q.device) + start  # (T,)
        self.k_cache.index_copy_(1, slots, k)
        self.v_cache.index_copy_(1, slots, v)
        keys = torch.arange(self.k_cache.shape[1], device=q.device)  # (L,)
        allowed = keys[None, :] <= slots[:, None]  # (T, L)
        if self.window is not None:
            allowed = allowed & (slots[:, None] - keys[None, :] < self.window)
        groups = a.n_heads // a.n_kv_heads
        kc, vc = (c.transpose(1, 2).repeat_interleave(groups, dim=1) for c in (self.k_cache, self.v_cache))
        scale = a.scale or a.head_dim ** -0.5
        scores = (q.transpose(1, 2) @ kc.transpose(-1, -2)) * scale  # (1, H, T, L)
        if a.softcap is not None:
            scores = torch.tanh(scores / a.softcap) * a.softcap
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (scores.softmax(-1) @ vc).transpose(1, 2)  # (1, T, H, D)


class StaticCacheLM(nn.Module):
    """What is traced: `forward(tokens (1, T), input_pos (1,)) -> logits (1, V)` of the last token,
    every attention of `model` given a static cache of `max_seq_len` slots (the model is changed in
    place: export a copy you no longer need)."""

    def __init__(self, model: CausalLM, max_seq_len: int, custom_ops: bool):
        super().__init__()
        self.lm, self.max_seq_len = model, max_seq_len
        for block in model.model.layers:
            window = model.config.sliding_window if block.sliding else None
            block.self_attn = StaticCacheAttention(block.self_attn, max_seq_len, model.dtype, window, custom_ops)
        # RoPE tables fixed now (LongRoPE's short one: a longer cache is refused), so no branch on positions
        self.magnitudes = {}
        for kind, table in model.rotary.items():
            self.register_buffer(f"inv_freq_{kind}", table.inv_freq.clone(), persistent=False)
            self.magnitudes[kind] = table.magnitude
        model.rotary = nn.ModuleDict()  # its key "global" is a Python keyword, which torch.fx's code cannot name

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        start = input_pos[0].item()  # a symbolic int in the program: the slot of tokens[0]
        torch._check(start >= 0)
        torch._check(start + t <= self.max_seq_len)
        positions = (torch.arange(t, device=tokens.device) + input_pos).unsqueeze(0)  # (1, T)
        x = self.lm.embed(tokens)  # (1, T, C)
        rope = {kind: rope_cos_sin(getattr(self, f"inv_freq_{kind}"), positions, x.dtype, magnitude)
                for kind, magnitude in self.magnitudes.items()}
        inputs = LayerInputs(rope, {False: (None, False), True: (None, False)})  # the caches mask themselves
        for block in self.lm.model.layers:
            x = block(x, inputs, None, start)
        return self.lm.head(x[:, -1])  # (1, V)


def load_custom_ops() -> bool:
    """Register ExecuTorch's LLM ops (llama::update_cache, llama::custom_sdpa) with torch for tracing;
    False where the wheel has no such library (the plain path is used then)."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    except (ImportError, AssertionError, OSError, RuntimeError):
        return False
    return hasattr(torch.ops.llama, "custom_sdpa") and hasattr(torch.ops.llama, "update_cache")


def load_custom_ops_library() -> None:
    """Load the custom ops' library (their kernels, for the runtime) without the Python module that
    wraps it, which imports the exporter (see `infer.executorch_runtime.load_method`)."""
    spec = importlib.util.find_spec("executorch.extension.llm.custom_ops")
    libraries = sorted(Path(spec.submodule_search_locations[0]).glob("**/*custom_ops_aot_lib.*")) if spec else []
    if libraries and not hasattr(torch.ops.llama, "custom_sdpa"):
        torch.ops.load_library(str(libraries[0]))


def runner_metadata(config: ModelConfig, tokenizer, max_seq_len: int, custom: bool) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (export_llama's names)."""
    eos = sorted(set(config.eos_ids()) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    meta = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len, "get_vocab_size": config.vocab_size,
            "get_n_layers": config.num_hidden_layers, "use_kv_cache": True, "use_sdpa_with_kv_cache": custom,
            "enable_dynamic_shape": True, "get_eos_ids": eos}
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    if bos is not None:
        meta["get_bos_id"] = bos
    return meta


def program_bytes(model: CausalLM, tokenizer, max_seq_len: int, precision: str, log=print) -> bytes:
    """Trace, quantize and lower `model` (a float model it consumes) to an ExecuTorch program."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation warnings say nothing a user can act on
        return _lower(model, tokenizer, max_seq_len, precision, log)


def _lower(model: CausalLM, tokenizer, max_seq_len: int, precision: str, log) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackDynamicallyQuantizedPartitioner,
        XnnpackPartitioner,
    )
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from executorch.extension.llm.export.quantize import quantize_model_

    custom = load_custom_ops()
    model = model.float().eval()
    meta = runner_metadata(model.config, tokenizer, max_seq_len, custom)
    module = StaticCacheLM(model, max_seq_len, custom).eval()
    linear, embedding = RECIPES[precision]
    if linear or embedding:
        log(f"quantizing with ExecuTorch's TorchAO recipe: linears {linear}, embedding {embedding}...")
        quantize_model_(module.lm, qlinear_config=linear, qembedding_config=embedding, skip_incompatible_shapes=True)
    example = (torch.tensor([[1, 2, 3]], dtype=torch.long), torch.tensor([0], dtype=torch.long))
    dynamic = ({1: torch.export.Dim("tokens", min=1, max=max_seq_len)}, None)
    log(f"tracing with torch.export (static KV cache of {max_seq_len} tokens, "
        f"{'ExecuTorch custom SDPA' if custom else 'plain SDPA'})...")
    with torch.no_grad():
        exported = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
    log("lowering to XNNPACK (ExecuTorch's passes run over the whole graph: minutes for a 135M model)...")
    edge = to_edge_transform_and_lower(
        exported, partitioner=[XnnpackDynamicallyQuantizedPartitioner(), XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False), constant_methods=meta)
    program = edge.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    return program.buffer


def write_executorch(model: CausalLM, tokenizer, out: str | Path, precision: str = "8da4w",
                     max_seq_len: int = DEFAULT_MAX_SEQ_LEN, force: bool = False, log=print) -> Path:
    """Write `model` (a plain model: no adapter layers, no factorized linears; consumed) as OUT.pte and
    OUT_tokenizer/; both appear whole or not at all."""
    if precision not in EXECUTORCH_PRECISIONS:
        raise SlmError(f"ExecuTorch precision '{precision}' is unknown (choose from {', '.join(EXECUTORCH_PRECISIONS)})")
    check_executorch_target(out, force)
    refusal = traced_refusal(model.config, max_seq_len)
    if refusal:
        raise SlmError(f"this model cannot be written for ExecuTorch: {refusal}")
    if tokenizer is None:
        raise SlmError("the model has no tokenizer; ExecuTorch's runner needs one beside the program")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="executorch-", dir=out.parent) as work:
        side, program = Path(work) / "side", Path(work) / "program.pte"
        write_sidecar(side, tokenizer, model.config, {"runtime": "executorch", "precision": precision,
                                                      "max_seq_len": max_seq_len})
        program.write_bytes(program_bytes(model, tokenizer, max_seq_len, precision, log))
        put_in_place(side, program, out)
    return out
