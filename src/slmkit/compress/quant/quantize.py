"""Quantize a model in place (`quantize_model`); rebuild quantized modules when loading a checkpoint.

Methods: int8 (per-row RTN), int4 (group-wise RTN), gptq and awq (calibrated int4). Every method
ends by swapping each chosen `nn.Linear` for an `Int8Linear`/`Int4Linear` from outside the model
(`layers.swap_linears`), so `model.py` never changes. The output head is quantized too unless
`lm_head=False`, in 8 bits by default whatever the method (`head_bits`: the head is the most
sensitive matrix, and llama.cpp's 4-bit mixes keep it at 6-8 bits too). A head tied to the
embedding stays tied (`tied.py`): one table of codes serves the head and the lookup, rounded to
nearest -- GPTQ's error feedback and AWQ's scales fit the head's inputs and would distort the
embedding rows that share them. `tie=False` unties it instead (a 4-bit head calibrated, the
embedding a float copy), and says what that costs.

A quantized checkpoint is an HF-style directory: model.safetensors (codes, scales, zeros, float
norms/embedding) and config.json with a `quantization` section that says how to rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from slmkit.compress.calibrate import (
    BlockInputs,
    LinearStats,
    check_calibration,
)
from slmkit.compress.quant.awq import (
    HEAD_SEARCH_TOKENS,
    apply_scales,
    module_output_error,
    search_clip,
    search_scales,
)
from slmkit.compress.quant.fused import fuse_shared_inputs
from slmkit.compress.quant.gptq import gptq_int4
from slmkit.compress.quant.qlinear import Int4Linear, Int8Linear
from slmkit.compress.quant.rtn import Int4Codes, quantize_int4, quantize_int8
from slmkit.compress.quant.tied import tie_quantized_head
from slmkit.errors import SlmError
from slmkit.layers import swap_linears, untie_head
from slmkit.sizing import human_bytes

METHODS = ("int8", "int4", "gptq", "awq")
GROUP_SIZES = (32, 64, 128, 256)
CALIBRATED = ("gptq", "awq")


@dataclass
class QuantConfig:
    method: str = field(default="int4", metadata={"choices": ("int8", "int4", "gptq", "awq")})
    """int8 | int4 (round-to-nearest) | gptq | awq (calibrated int4)"""
    group_size: int = field(default=128, metadata={"choices": (32, 64, 128, 256)})
    """int4 input columns per scale and zero point: 32, 64, 128 or 256"""
    pad_groups: bool = False
    """allow layers whose width is not a multiple of group_size (the last group is zero-padded)"""
    lm_head: bool = field(default=True, metadata={"flag": "--keep-lm-head", "help": "keep the output head in float"})
    """quantize the output head too (it is a fifth of SmolLM2-135M's weights and of its decode time)"""
    head_bits: int = field(default=8, metadata={"choices": (4, 8)})
    """bits of the output head (and of a tied embedding) under int4/gptq/awq: 8 (per-row int8) or 4 like the other linears"""
    tie: bool = True
    """keep a head tied to the embedding tied: one quantized table serves both (off: the head is quantized alone, calibrated, and the embedding stays a float copy)"""
    calib: str | None = None
    """calibration text file, `slm prepare` directory, or task:NAME (a built-in task's training chats, the way to calibrate a model fine-tuned for it) (default: the shared WikiText-2 valid text)"""
    calib_samples: int = 64
    """calibration windows"""
    calib_seq_len: int = 512
    """tokens per calibration window"""
    act_order: bool = False
    """GPTQ: quantize columns by decreasing activation energy"""
    damp: float = 0.01
    """GPTQ: Hessian dampening, as a share of its mean diagonal"""
    skip: list[str] = field(default_factory=list)
    """linear names (or name suffixes) to keep in float"""

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4


@dataclass
class QuantReport:
    method: str
    quantized: list[str]
    kept_float: list[str]
    linear_params: int
    float_bytes: int  # the quantized linears' weights at fp32
    quant_bytes: int  # their codes + scales + zeros

    def summary(self) -> str:
        return (f"{self.method}: {len(self.quantized)} linears quantized ({self.linear_params / 1e6:.1f}M weights, "
                f"{self.float_bytes / 2**20:.1f} MiB fp32 -> {self.quant_bytes / 2**20:.1f} MiB, "
                f"{self.float_bytes / max(self.quant_bytes, 1):.1f}x smaller); kept in float: "
                f"{', '.join(self.kept_float) or 'none'}")


def targets(model: nn.Module, cfg: QuantConfig) -> tuple[list[str], list[str]]:
    """(names to quantize, linear names kept in float), validated before any work starts."""
    if cfg.method not in METHODS:
        raise SlmError(f"quantization method '{cfg.method}' is unknown (choose from {', '.join(METHODS)})")
    if cfg.bits == 4 and cfg.group_size not in GROUP_SIZES:
        raise SlmError(f"group size {cfg.group_size} is not supported by the int4 kernel "
                       f"(choose from {', '.join(map(str, GROUP_SIZES))})")
    chosen, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        skip = (name == "lm_head" and not cfg.lm_head) or any(name == s or name.endswith("." + s) for s in cfg.skip)
        (kept if skip else chosen).append(name)
    if not chosen:
        raise SlmError("nothing to quantize: every linear is skipped")
    if cfg.bits == 4:
        _check_groups(model, chosen, cfg)
    if cfg.method in CALIBRATED:
        _check_calibratable(model, cfg)
    return chosen, kept


def _check_groups(model: nn.Module, chosen: list[str], cfg: QuantConfig) -> None:
    widths = {model.get_submodule(n).in_features for n in chosen}
    smallest = min(widths)
    if smallest < cfg.group_size:
        fitting = [g for g in GROUP_SIZES if g <= smallest]
        hint = f"use --group-size {fitting[-1]} or --method int8" if fitting else "use --method int8"
        raise SlmError(f"the model is too small for int4 group size {cfg.group_size}: a layer has only "
                       f"{smallest} inputs; {hint}")
    ragged = sorted(w for w in widths if w % cfg.group_size)
    if ragged and not cfg.pad_groups:
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        raise SlmError(f"group size {cfg.group_size} does not divide the input width {ragged[0]} of some layers; "
                       f"use --group-size {fits[-1] if fits else 32}" + " or --pad-groups (the last group of each "
                       "row is zero-padded)")


def _check_calibratable(model: nn.Module, cfg: QuantConfig) -> None:
    c = model.config
    if c.num_local_experts or c.block_repeats > 1:
        raise SlmError(f"{cfg.method} calibrates dense, unshared blocks; this model has experts or shared blocks "
                       "(use --method int4 or int8)")
    if cfg.calib_samples < 1 or cfg.calib_seq_len < 8:
        raise SlmError("calibration needs at least 1 sample of at least 8 tokens")


# ---------------------------------------------------------------------------------------------
# Quantizing a model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None = None,
                   progress: bool = True) -> QuantReport:
    """Quantize `model` (fp32 or bf16, eval mode) in place; returns what was done.

    calib_ids: (samples, seq_len) calibration tokens for gptq/awq (`slmkit.data.calibration`).
    """
    chosen, kept = targets(model, cfg)
    model.float().eval()
    tied = model.config.tie_word_embeddings and "lm_head" in chosen
    if tied and not cfg.tie:
        untie_head(model)
        size = model.lm_head.weight.numel() * 4
        print(f"untying the output head (quant.tie=false): the embedding stays a float copy, {human_bytes(size)} "
              "more than one shared quantized table")
        tied = False
    layers, inputs = [name for name in chosen if name != "lm_head"], None
    if cfg.method == "int8":
        made = {name: _int8_module(model.get_submodule(name)) for name in layers}
    elif cfg.method == "int4":
        made = {name: _int4_module(model.get_submodule(name), quantize_int4(_weight(model, name), cfg.group_size))
                for name in layers}
    else:
        made, inputs = _calibrated(model, cfg, check_calibration(model, calib_ids, cfg.method), layers, progress)
    if "lm_head" in chosen:  # last: a calibrated head reads the quantized blocks' outputs
        made["lm_head"] = _head(model, cfg, tied, inputs)
    swap_linears(model, lambda name, _linear: made.get(name))
    if tied:
        tie_quantized_head(model)
    fuse_shared_inputs(model)
    model.config.quantization = quant_section(cfg)
    return _report(model, cfg, chosen, kept)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().float()


def _int8_module(linear: nn.Linear) -> Int8Linear:
    codes, scales = quantize_int8(linear.weight.detach())
    return Int8Linear.from_codes(codes, scales, _bias(linear))


def _int4_module(linear: nn.Linear, q: Int4Codes, rows: bool = False) -> Int4Linear:
    return Int4Linear.from_codes(q.codes, q.scales, q.zeros, q.group_size, linear.in_features, _bias(linear), rows)


def _head(model: nn.Module, cfg: QuantConfig, tied: bool, inputs=None) -> nn.Module:
    """The output head: per-row int8 (the int8 method, or head_bits 8); else int4, rounded to nearest
    when tied (see the module docstring) or without calibration inputs, calibrated otherwise."""
    if cfg.bits == 8 or cfg.head_bits == 8:
        return _int8_module(model.lm_head)
    if tied or inputs is None:
        return _int4_module(model.lm_head, quantize_int4(_weight(model, "lm_head"), cfg.group_size), rows=tied)
    return _quantize_head(model, inputs, cfg)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float()



def _calibrated(model, cfg: QuantConfig, ids: torch.Tensor, chosen: list[str],
                progress: bool) -> tuple[dict[str, nn.Module], BlockInputs]:
    """GPTQ or AWQ over the blocks' linears in `chosen`; returns them and the calibration inputs,
    advanced to the final norm (for the head)."""
    inputs = BlockInputs(model, ids)
    made: dict[str, nn.Module] = {}
    layers = model.model.layers
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} ({inputs.tokens:,} calibration tokens)", unit="layer",
               disable=not progress)
    for i in bar:
        prefix = f"model.layers.{i}."
        names = [n for n in chosen if n.startswith(prefix)]
        step = _gptq_block if cfg.method == "gptq" else _awq_block
        for name, q in step(layers[i], inputs, cfg, [n[len(prefix):] for n in names]).items():
            made[prefix + name] = q
        inputs.run(layers[i], advance=True)  # the next block sees this block's quantized outputs
    return made, inputs


def _load_codes(linear: nn.Linear, q: Int4Codes) -> Int4Linear:
    """Put the dequantized weights into the float linear (so later blocks see them) and build the module."""
    linear.weight.copy_(q.dequantize().to(linear.weight.dtype))
    return _int4_module(linear, q)


def _present_groups(block: nn.Module, names: list[str]) -> list[tuple[tuple[str, ...], list[str]]]:
    """(whole input group of the block, its members being quantized) for each group with any member in `names`."""
    groups = [(group, [n for n in group if n in names]) for group in block.input_groups()]
    return [(group, present) for group, present in groups if present]


def _gptq_block(block: nn.Module, inputs, cfg: QuantConfig, names: list[str]) -> dict[str, nn.Module]:
    groups = _present_groups(block, names)
    # one tap per shared input, on the group's first linear (skipped or not, it reads the same input)
    taps = {group: LinearStats(block.get_submodule(group[0])) for group, _ in groups}
    inputs.run(block, advance=False)
    made = {}
    for group, present in groups:
        h = taps[group].close().hessian
        for name in present:
            linear = block.get_submodule(name)
            made[name] = _load_codes(linear, gptq_int4(linear.weight, h, cfg.group_size, cfg.damp, cfg.act_order))
    return made


def _awq_block(block: nn.Module, inputs, cfg: QuantConfig, names: list[str]) -> dict[str, nn.Module]:
    errors = _awq_output_errors(block, inputs)
    captured = _capture_inputs(block, inputs, [g[0] for g in block.input_groups()])
    feeders = awq_feeders(block)
    # 1) scale every group in float (the block's float output is unchanged: each 1/s is folded into
    #    its feeder), before anything is rounded: down's feeder up_proj must be scaled before it is
    #    quantized; 2) clip and round each linear against the inputs it now reads (x / s).
    reads = {}
    for group, present in _present_groups(block, names):
        x = captured[group[0]]
        if group[0] in feeders and len(present) == len(group):  # a scale must reach every reader of the input
            linears = [block.get_submodule(n) for n in group]
            error = errors[group[0]](linears) if group[0] in errors else None
            s = search_scales(x, [lin.weight for lin in linears], cfg.group_size, error)
            apply_scales(feeders[group[0]], linears, s)
            x = x / s
        reads.update({name: x for name in present})
    made = {}
    for name, x in reads.items():
        linear = block.get_submodule(name)
        if not name.endswith(("q_proj", "k_proj")):  # as in the paper: clipping q/k hurts (measured too)
            linear.weight.copy_(search_clip(x, linear.weight, cfg.group_size))
        made[name] = _load_codes(linear, quantize_int4(linear.weight, cfg.group_size))
    return made


def awq_feeders(block: nn.Module) -> dict[str, nn.Module]:
    """For each input group (by its first linear): the module whose output rows are the group's input
    columns, where AWQ folds 1/s -- none before OLMo-2's post-norm attention, none before Phi-2's
    down_proj (behind a GELU), v_proj before o_proj only when heads are not grouped."""
    groups, attn, mlp = block.input_groups(), block.self_attn, block.feed_forward
    feeders = {groups[0][0]: block.norm(0), groups[-1][0]: mlp.up_proj if mlp.gated else None}
    if block.layout != "parallel":
        feeders[groups[2][0]] = block.norm(2)
    if attn.n_heads == attn.n_kv_heads:  # v's output rows line up one-to-one with o's input columns
        feeders["self_attn.o_proj"] = attn.v_proj
    return {name: feeder for name, feeder in feeders.items() if feeder is not None}


AWQ_INSPECT_SAMPLES = 8  # calibration windows on which a q/k/v or gate/up scale is scored


def _awq_output_errors(block: nn.Module, inputs) -> dict[str, object]:
    """For the groups that read a norm's output: a maker of the error function that scores candidate
    weights on the attention output and on the MLP output (the paper's `module2inspect`; both
    branches at once in Phi-2's parallel block), from the float block's inputs to them on the
    first few calibration windows."""
    x = inputs.x[:AWQ_INSPECT_SAMPLES]  # (n, T, C)
    attn, mlp = block.self_attn, block.feed_forward
    mlp_in = []
    hook = mlp.register_forward_pre_hook(lambda _m, args: mlp_in.append(args[0]))
    try:
        block(x, inputs.layer_inputs)
    finally:
        hook.remove()
    attn_in, extra = block.normed(0, x), block.attention_inputs(inputs.layer_inputs)
    groups = block.input_groups()
    if block.layout == "parallel":
        return {groups[0][0]: lambda linears: module_output_error(
            linears, lambda: attn(attn_in, *extra) + mlp(attn_in))}
    return {groups[0][0]: lambda linears: module_output_error(linears, lambda: attn(attn_in, *extra)),
            groups[2][0]: lambda linears: module_output_error(linears, lambda: mlp(mlp_in[0]))}


def _capture_inputs(block: nn.Module, inputs, names: list[str]) -> dict[str, torch.Tensor]:
    """Run the float block once and keep what each named linear reads, (rows, K), subsampled to ~32k rows."""
    keep = max(1, inputs.tokens // 32768)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: captured[n].append(args[0].reshape(-1, args[0].shape[-1])[::keep].float()))
        for n in names]
    try:
        inputs.run(block, advance=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in captured.items()}


def _quantize_head(model, inputs, cfg: QuantConfig) -> nn.Module:
    head = model.lm_head
    if cfg.method == "gptq":
        stats = LinearStats(head)
        head(inputs.final_norm()[:: max(1, inputs.tokens // 16384)])
        h = stats.close().hessian
        return _load_codes(head, gptq_int4(head.weight, h, cfg.group_size, cfg.damp, cfg.act_order))

    # the final norm feeds only the head, so it takes the head's 1/s like input_layernorm does for q/k/v
    x = inputs.final_norm()[:: max(1, inputs.tokens // 16384)]
    s = search_scales(x, [head.weight], cfg.group_size, tokens=HEAD_SEARCH_TOKENS)
    apply_scales(model.model.norm, [head], s)
    x = x / s
    head.weight.copy_(search_clip(x, head.weight, cfg.group_size))
    return _load_codes(head, quantize_int4(head.weight, cfg.group_size))


# ---------------------------------------------------------------------------------------------
# Checkpoints and reports
# ---------------------------------------------------------------------------------------------


def quant_section(cfg: QuantConfig) -> dict:
    """What a quantized checkpoint's config records of how it was made."""
    section = {"method": cfg.method, "bits": cfg.bits, "lm_head": cfg.lm_head, "skip": list(cfg.skip)}
    if cfg.bits == 4:
        section["group_size"] = cfg.group_size
        section["head_bits"] = cfg.head_bits
    return section


def _report(model: nn.Module, cfg: QuantConfig, chosen: list[str], kept: list[str]) -> QuantReport:
    params = quant_bytes = 0
    for name in chosen:
        module = model.get_submodule(name)
        params += module.in_features * module.out_features
        quant_bytes += sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return QuantReport(cfg.method, chosen, kept, params, 4 * params, quant_bytes)


def swap_in_empty(model: nn.Module, section: dict, names: set[str]) -> None:
    """Before loading a quantized checkpoint: replace the linears it stores as codes (`names`)."""
    bits, group = section.get("bits"), section.get("group_size")
    if bits not in (4, 8) or (bits == 4 and group not in GROUP_SIZES):
        raise SlmError(f"the checkpoint's quantization section {section} is not one slmkit writes")

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if name not in names:
            return None
        bias = linear.bias is not None
        with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned or repacked
            if (section.get("head_bits", bits) if name == "lm_head" else bits) == 8:
                return Int8Linear(linear.in_features, linear.out_features, bias)
            return Int4Linear(linear.in_features, linear.out_features, group, bias)

    swap_linears(model, make)
    if model.config.tie_word_embeddings and "lm_head" in names:  # one table of codes for head and lookup
        tie_quantized_head(model)

