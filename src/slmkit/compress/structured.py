"""Structured pruning: a smaller dense model of the same architecture (fewer neurons, heads, hidden
channels or layers), chosen from calibration activations, to be healed by distillation afterwards.

Width follows Minitron (Muralidharan et al., 2024, "Compact Language Models via Pruning and
Knowledge Distillation"): one forward pass over calibration text scores
- MLP neurons by mean |act(gate(x)) * up(x)| over tokens (the input of down_proj),
- attention heads by the mean L2 norm of each head's attention output (its slice of o_proj's
  input), summed into key/value groups so whole GQA groups can go,
- hidden channels by the mean |output| of every RMSNorm (both per block, and the final norm);
and depth follows ShortGPT (Men et al., 2024: block influence 1 - cos(block input, block output),
the lowest go) or Gromov et al. (2024, "The Unreasonable Ineffectiveness of the Deeper Layers": the
contiguous run of n layers whose input and output are closest in angle goes).

The original model is only read (its dtype is restored after the fp32 pass); `prune_structured`
returns a NEW `CausalLM` whose weights are slices of the original: rows within a head are never
touched, so RoPE is unaffected, and a tied embedding stays tied. `--params` picks the shape itself,
width over depth as Minitron recommends: MLP and hidden channels shrink (the hidden less, as it
costs more, and in multiples of the heads), heads and layers stay. This module does not read text (`slmkit.data.calibration`
does) and does not heal (`slm distill` with configs/distill/heal-*.yaml does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from slmkit.compress.calibrate import BlockInputs, LinearStats, check_calibration
from slmkit.config import ModelConfig
from slmkit.errors import SlmError, unknown_choice
from slmkit.model import CausalLM
from slmkit.sizing import count_params

LAYER_METRICS = ("block_influence", "angular")
# --params rounds to these so the result exports to GGUF q8_0 / q4_k_m (rows in 32-value blocks);
# hidden is also kept a multiple of the query heads, which transformers' LlamaConfig insists on even
# when head_dim is given (so SmolLM2's 9 heads leave hidden 576 or 288: --params then cuts the MLP).
FFN_MULTIPLE, HIDDEN_MULTIPLE = 64, 32
# A share of hidden channels removed costs about this many times the same share of MLP neurons
# before healing. SmolLM2-135M cut to 95-96M, perplexity on 2K tokens of WikiText-2 (original 33.8):
# hidden/ffn 544/896 171, 512/1024 187, 576/768 199, 480/1152 259, 448/1280 (a common factor) 350.
HIDDEN_COST = 4.0
ANGULAR_TOKENS = 1024  # hidden states kept per layer for the angular metric (a strided sample)
IMPORTANCE = ("neurons: mean |act(gate x) * up x|; heads: mean L2 of each head's output, summed per KV group; "
              "channels: mean |RMSNorm output| over all norms")


@dataclass
class StructuredConfig:
    params: str | int | None = None
    """target parameter count (e.g. 90M); the shape is chosen for you: MLP and hidden shrink, the hidden less"""
    ffn: int | None = None
    """MLP neurons to keep per layer (None = keep)"""
    heads: int | None = None
    """query heads to keep, evenly within the kept KV groups (None = keep)"""
    kv_heads: int | None = None
    """key/value heads to keep: whole GQA groups (None = keep)"""
    hidden: int | None = None
    """hidden (residual) channels to keep (None = keep)"""
    layers: int | None = None
    """layers to keep (None = keep)"""
    layer_metric: str = field(default="block_influence", metadata={"choices": LAYER_METRICS})
    """block_influence (ShortGPT: drop the layers whose output is most like their input) | angular (Gromov et al.: drop the contiguous run whose ends are closest)"""
    per_layer: bool = False
    """let each layer keep its own number of neurons and KV groups (saved as model_type slmkit: no transformers, no GGUF)"""
    refit: bool = True
    """refit down_proj (and o_proj when heads go) by least squares so the kept neurons/heads reproduce each layer's full output on the calibration activations"""
    calib: str | None = None
    """calibration text file or `slm prepare` directory"""
    calib_samples: int = 32
    """calibration windows"""
    calib_seq_len: int = 512
    """tokens per calibration window"""


@dataclass
class StructuredReport:
    params_before: int
    params_after: int
    before: ModelConfig
    after: ModelConfig
    dropped_layers: list[int]
    tokens: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        b, a = self.before, self.after
        dropped = f" (dropped {self.dropped_layers})" if self.dropped_layers else ""
        totals = (f"structured: {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M parameters "
                  f"({self.params_after / self.params_before:.1%}) from {self.tokens:,} calibration tokens")
        shape = (f"  hidden {b.hidden_size} -> {a.hidden_size}, ffn {b.intermediate_size} -> {a.intermediate_size}, "
                 f"heads {b.num_attention_heads}/{b.num_key_value_heads} -> {a.num_attention_heads}/"
                 f"{a.num_key_value_heads} (query/kv), layers {b.num_hidden_layers} -> {a.num_hidden_layers}{dropped}")
        return "\n".join([totals, shape] + [f"  note: {n}" for n in self.notes])


# ---------------------------------------------------------------------------------------------
# Targets: parse, check, search
# ---------------------------------------------------------------------------------------------


def parse_count(value: str | int) -> int:
    """'90M' / '0.09B' / '500K' / '90_000_000' / 90000000 -> an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbB]?)\s*", str(value))
    if not match:
        raise SlmError(f"--params '{value}' is not a parameter count; write e.g. 90M, 0.09B or 90000000")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match[2].lower()]
    return int(float(match[1].replace("_", "")) * scale)


def check_structured(model: CausalLM, cfg: StructuredConfig) -> ModelConfig:
    """The target architecture (uniform widths) after checking every setting, before any work."""
    c = model.config
    _check_model(model)
    if cfg.layer_metric not in LAYER_METRICS:
        raise unknown_choice("layer metric", cfg.layer_metric, list(LAYER_METRICS))
    if cfg.calib_samples < 1 or cfg.calib_seq_len < 8:
        raise SlmError("calibration needs at least 1 sample of at least 8 tokens")
    explicit = (cfg.ffn, cfg.heads, cfg.kv_heads, cfg.hidden, cfg.layers)
    if cfg.params is None and all(v is None for v in explicit):
        raise SlmError("structured pruning needs a target: --params 90M, or any of --ffn --heads --kv-heads "
                       "--hidden --layers")
    if cfg.params is not None and (cfg.ffn is not None or cfg.hidden is not None):
        raise SlmError("--params chooses --ffn and --hidden itself; give --params alone (with --heads/--kv-heads/"
                       "--layers if you like) or give the widths")
    for name, value, limit in (("ffn", cfg.ffn, c.ffn_size(0)), ("hidden", cfg.hidden, c.hidden_size),
                               ("layers", cfg.layers, c.num_hidden_layers)):
        if value is not None and not 1 <= value <= limit:
            raise SlmError(f"--{name} {value} is outside 1..{limit} (the model has {limit}); structured pruning "
                           "only removes")
    _check_family(c, cfg)
    heads, kv = _check_heads(c, cfg.heads, cfg.kv_heads)
    target = _target(c, cfg.ffn or c.ffn_size(0), heads, kv, cfg.hidden or c.hidden_size,
                     cfg.layers or c.num_hidden_layers)
    if cfg.params is not None:
        target = search_shape(c, target, parse_count(cfg.params))
    return target


def _check_model(model: CausalLM) -> None:
    c = model.config
    if c.num_local_experts or c.block_repeats > 1:
        raise SlmError("structured pruning handles dense, unshared blocks; this model has experts or shared blocks")
    if not c.is_uniform:
        raise SlmError("this model already has per-layer widths; structured pruning starts from a uniform model "
                       "(prune the original instead)")
    if c.quantization or c.lowrank:
        raise SlmError("prune the float model, then quantize or factorize it (this one is already compressed)")
    extra = [n for n, _ in model.named_parameters() if _role(n) is None]
    if extra:
        raise SlmError(f"the model has parameters structured pruning does not know ({extra[0]}); merge adapters first")


def _check_family(c: ModelConfig, cfg: StructuredConfig) -> None:
    """Cuts a family's arithmetic does not survive, refused before any work."""
    if cfg.hidden is not None and cfg.hidden < c.hidden_size and not hidden_prunable(c):
        raise SlmError(f"--hidden cannot prune a {c.model_type} model: {_HIDDEN_REASON}; prune --ffn, --heads or "
                       "--layers instead")
    if c.qk_norm == "projection" and (cfg.heads, cfg.kv_heads) != (None, None):
        raise SlmError(f"--heads/--kv-heads cannot prune a {c.model_type} model: its q/k norms normalise all heads "
                       "together, so removing a head changes the others; prune --ffn, --hidden or --layers instead")


_HIDDEN_REASON = ("removing channels rescales RMSNorm weights by sqrt(C/C'), which Gemma's 1 + w norms, Phi-2's "
                  "mean-centred LayerNorm and an embedding scaled by sqrt(hidden) do not allow")


def hidden_prunable(c: ModelConfig) -> bool:
    """Whether hidden channels can go: only under plain RMSNorms (which also rules out Gemma's
    embedding scale of sqrt(hidden), as Gemma's norms are 1 + w)."""
    return c.norm_type == "rms"


def _check_heads(c: ModelConfig, heads: int | None, kv: int | None) -> tuple[int, int]:
    """(query heads, kv heads) to keep; GQA needs whole KV groups and the same heads in each."""
    h0, k0 = c.heads(0), c.kv_heads(0)
    group = h0 // k0
    if kv is None:
        kv = k0 if heads is None or heads % k0 == 0 else None
        if kv is None:
            raise SlmError(f"--heads {heads} does not split evenly over the model's {k0} KV groups; give --kv-heads "
                           f"too (heads a multiple of kv-heads, at most {group} per group)")
    if heads is None:
        heads = kv * group
    if not 1 <= kv <= k0:
        raise SlmError(f"--kv-heads {kv} is outside 1..{k0} (the model has {k0} key/value heads)")
    if not 1 <= heads <= h0:
        raise SlmError(f"--heads {heads} is outside 1..{h0} (the model has {h0} query heads)")
    if heads % kv:
        raise SlmError(f"--heads {heads} does not split into --kv-heads {kv} groups; make heads a multiple of kv-heads")
    if heads // kv > group:
        raise SlmError(f"--heads {heads} with --kv-heads {kv} puts {heads // kv} query heads in a group, but the "
                       f"model's groups have {group}; keep more KV groups (--kv-heads {math.ceil(heads / group)})")
    return heads, kv


def _target(c: ModelConfig, ffn: int, heads: int, kv: int, hidden: int, layers: int) -> ModelConfig:
    """`c` reshaped; head_dim is written out whenever hidden // heads would no longer give it."""
    head_dim = c.head_dim
    if head_dim is None and hidden != heads * c.resolved_head_dim:
        head_dim = c.resolved_head_dim
    # per-layer lists are cut to length here; the layers actually kept are chosen after scoring
    lists = {k: getattr(c, k)[:layers] for k in ("layer_types", "no_rope_layers") if getattr(c, k) is not None}
    return c.replace(intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv, hidden_size=hidden,
                     num_hidden_layers=layers, head_dim=head_dim, **lists)


def search_shape(c: ModelConfig, fixed: ModelConfig, target: int) -> ModelConfig:
    """A uniform shape with <= `target` parameters, width over depth (Minitron): heads and layers stay as
    in `fixed`, hidden (multiples of 32 and of the heads) and ffn (of 64) shrink. Of the shapes within 2% of
    the largest count that fits, the one with the smallest weighted cut max(HIDDEN_COST x hidden cut,
    ffn cut) wins: both shrink, the hidden channels less."""
    counted = count_params(c)
    if target > counted.total:
        raise SlmError(f"--params {target / 1e6:.1f}M is more than the model's {counted.total / 1e6:.1f}M; "
                       "nothing to remove")
    if target <= counted.embedding:
        raise SlmError(f"--params {target / 1e6:.1f}M is not more than the embedding alone "
                       f"({counted.embedding / 1e6:.1f}M); give explicit --hidden/--ffn/--layers for so large a cut")
    if count_params(fixed).total <= target:
        return fixed  # fewer heads or layers already bring it under the target
    step = math.lcm(HIDDEN_MULTIPLE, fixed.heads(0))
    widths = range(c.hidden_size // step * step, 0, -step) if hidden_prunable(c) else [c.hidden_size]
    fits = [s for h in widths if (s := _widest_ffn(c, fixed, h, target))]
    if not fits:
        raise SlmError(f"--params {target / 1e6:.1f}M cannot be reached with {fixed.heads(0)} heads and "
                       f"{fixed.num_hidden_layers} layers; give fewer --layers or --heads too")
    best = max(n for n, _ in fits)
    near = [s for n, s in fits if n >= 0.98 * best]
    return min(near, key=lambda s: max(HIDDEN_COST * (1 - s.hidden_size / c.hidden_size),
                                       1 - s.ffn_size(0) / c.ffn_size(0)))


def _widest_ffn(c: ModelConfig, fixed: ModelConfig, hidden: int, target: int) -> tuple[int, ModelConfig] | None:
    """(count, shape): `hidden` wide with the largest ffn (a multiple of 64, at most the original)
    within `target`, or None.
    The count is linear in ffn, so two counts give it exactly."""
    def shape(ffn: int) -> ModelConfig:
        return _target(c, ffn, fixed.heads(0), fixed.kv_heads(0), hidden, fixed.num_hidden_layers)

    top = c.ffn_size(0) // FFN_MULTIPLE * FFN_MULTIPLE
    at_top, at_min = count_params(shape(top)).total, count_params(shape(FFN_MULTIPLE)).total
    if at_min > target:
        return None
    per_neuron = (at_top - at_min) / max(top - FFN_MULTIPLE, 1)
    ffn = min(top, FFN_MULTIPLE + int((target - at_min) / max(per_neuron, 1e-9)) // FFN_MULTIPLE * FFN_MULTIPLE)
    while (n := count_params(shape(ffn)).total) > target:  # guards float rounding; at_min fits
        ffn -= FFN_MULTIPLE
    return n, shape(ffn)


# ---------------------------------------------------------------------------------------------
# Importance: one calibration pass through the original model
# ---------------------------------------------------------------------------------------------


@dataclass
class Importance:
    neurons: list[torch.Tensor]  # per layer (F,): mean |act(gate x) * up x|
    heads: list[torch.Tensor]  # per layer (H,): mean L2 norm of the head's output
    channels: torch.Tensor  # (C,): mean |RMSNorm output|, summed over every norm
    influence: torch.Tensor  # (L,): 1 - mean cos(block input, block output)
    states: torch.Tensor  # (L+1, S, C): a strided sample of tokens' hidden states entering each layer (and the last output)
    tokens: int
    xtx: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per layer, for refit: input X^T X / rows of
    # "down_proj" (F, F) and "o_proj" (H*D, H*D); empty when no refit was asked for

    def groups(self, layer: int, kv_heads: int) -> torch.Tensor:
        """(K, G) head scores arranged by key/value group (query head h belongs to group h // G)."""
        return self.heads[layer].view(kv_heads, -1)

    def angular(self, n: int) -> torch.Tensor:
        """(L-n+1,): mean arccos(cos(x_l, x_{l+n})) / pi, the angle layers l..l+n-1 turn the states by."""
        x = self.states
        return torch.stack([torch.arccos(F.cosine_similarity(x[l], x[l + n], dim=-1).clamp(-1, 1)).mean() / math.pi
                            for l in range(x.shape[0] - n)])


class _Taps:
    """Forward hooks on one block that sum the activation magnitudes Minitron scores by."""

    def __init__(self, block, n_heads: int):
        self.neurons = self.heads = self.channels = 0.0
        self.n_heads = n_heads
        norms = {id(n): n for n in map(block.norm, range(4)) if n is not None}.values()  # Phi-2's is shared
        self.handles = [block.mlp.down_proj.register_forward_pre_hook(self._neurons),
                        block.self_attn.o_proj.register_forward_pre_hook(self._heads),
                        *(norm.register_forward_hook(self._norm) for norm in norms)]

    def _neurons(self, _module, args):
        self.neurons = self.neurons + args[0].detach().abs().float().flatten(0, -2).sum(0)  # (F,)

    def _heads(self, _module, args):
        y = args[0].detach().float()  # (B, T, H*D)
        self.heads = self.heads + y.unflatten(-1, (self.n_heads, -1)).norm(dim=-1).flatten(0, -2).sum(0)  # (H,)

    def _norm(self, _module, _args, out):
        self.channels = self.channels + out.detach().abs().float().flatten(0, -2).sum(0)  # (C,)

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def importance(model: CausalLM, ids: torch.Tensor, progress: bool = True, refit: bool = False) -> Importance:
    """Score neurons, heads, channels and layers in one pass (fp32; the model's dtype is restored);
    with `refit`, also keep the input X^T X of every down_proj and o_proj for `refit_columns`."""
    ids = check_calibration(model, ids, "structured pruning")
    dtype = next(model.parameters()).dtype
    model.float().eval()
    try:
        return _score(model, ids, progress, refit)
    finally:
        model.to(dtype)


def _score(model: CausalLM, ids: torch.Tensor, progress: bool, refit: bool) -> Importance:
    inputs = BlockInputs(model, ids)
    n_tok = inputs.tokens
    sample = torch.linspace(0, n_tok - 1, min(n_tok, ANGULAR_TOKENS)).long()  # token rows kept for `angular`
    neurons, heads, influence, states, channels, xtx = [], [], [], [], 0.0, []
    layers = model.model.layers
    for block in tqdm(layers, desc=f"importance ({n_tok:,} calibration tokens)", unit="layer", disable=not progress):
        x_in = inputs.x  # (n, T, C); `run` replaces it, so this reference keeps the block's input
        taps = _Taps(block, block.self_attn.n_heads)
        stats = {"down_proj": LinearStats(block.mlp.down_proj), "o_proj": LinearStats(block.self_attn.o_proj)} if refit else {}
        try:
            x_out = inputs.run(block, advance=True)
        finally:
            taps.close()
            for s in stats.values():
                s.close()
        if refit:
            xtx.append({name: s.xtx for name, s in stats.items()})
        neurons.append(taps.neurons / n_tok)
        heads.append(taps.heads / n_tok)
        channels = channels + taps.channels / n_tok
        influence.append(1 - F.cosine_similarity(x_in, x_out, dim=-1).mean())
        states.append(x_in.flatten(0, 1)[sample])
    states.append(inputs.x.flatten(0, 1)[sample])
    channels = channels + inputs.final_norm().abs().mean(0)
    return Importance(neurons, heads, channels, torch.stack(influence), torch.stack(states), n_tok, xtx)


def refit_columns(weight: torch.Tensor, xtx: torch.Tensor, kept: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """(N, K) weights on the kept inputs that best reproduce `weight`'s (N, F) output, in least squares
    over the calibration inputs: min E||W x - W' x_K||^2 gives W' = W G[:, K] G[K, K]^-1 with G = E[x x^T].

    Dropping a neuron is then not just losing its column: what the kept neurons' activations
    predict of it is folded into their columns (the compensation SlimGPT and FLAP add; Minitron leaves it
    to healing). G[K, K] is damped by `damp` x its mean diagonal, as GPTQ does; float64 for the solve."""
    g = xtx.double()
    gkk = g[kept][:, kept]
    gkk = gkk + damp * gkk.diagonal().mean() * torch.eye(len(kept), dtype=g.dtype)
    cross = weight.double() @ g[:, kept]  # (N, K)
    return torch.linalg.solve(gkk, cross.T).T.to(weight.dtype)  # gkk is symmetric: (gkk^-1 cross^T)^T


# ---------------------------------------------------------------------------------------------
# What to keep
# ---------------------------------------------------------------------------------------------


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order (all of them when k == len)."""
    return torch.topk(scores, k).indices.sort().values


def layers_to_drop(imp: Importance, n: int, metric: str) -> list[int]:
    """The n layers to remove: the lowest block influence, or the start of the closest-angle run."""
    if n <= 0:
        return []
    if metric == "angular":
        start = int(imp.angular(n).argmin())
        return list(range(start, start + n))
    return sorted(torch.topk(imp.influence, n, largest=False).indices.tolist())


def _heads_plan(groups: torch.Tensor, n_groups: int, per_group: int) -> torch.Tensor:
    """Query heads to keep from (K, G) scores: the best `n_groups` groups, the best `per_group` heads in each."""
    g = groups.shape[1]
    best = groups.topk(per_group, dim=1)  # the heads each group would keep, and their scores
    kept = _top(best.values.sum(1), n_groups)
    return torch.cat([kv * g + best.indices[kv].sort().values for kv in kept.tolist()])


def _allot(scores: list[torch.Tensor], budget: int, floor: int) -> list[int]:
    """Per-layer counts that sum to `budget`, by one ranking of the scores normalised by each layer's
    mean (raw magnitudes differ from layer to layer); every layer keeps at least `floor`."""
    ranked = []
    for i, s in enumerate(scores):
        s = s / s.mean().clamp_min(1e-12)
        s[torch.topk(s, floor).indices] = math.inf  # the floor is kept whatever the ranking says
        ranked.append(torch.stack([s, torch.full_like(s, i)], 1))
    ranked = torch.cat(ranked)
    chosen = ranked[torch.topk(ranked[:, 0], budget).indices, 1].long()
    return torch.bincount(chosen, minlength=len(scores)).tolist()


@dataclass
class _Plan:
    channels: torch.Tensor  # (C',) hidden channels kept
    layers: list[int]  # original indices of the blocks kept
    heads: list[torch.Tensor]  # per kept block: query heads kept
    kv: list[torch.Tensor]  # per kept block: KV heads kept
    neurons: list[torch.Tensor]  # per kept block: MLP neurons kept


def _plan(c: ModelConfig, target: ModelConfig, imp: Importance, cfg: StructuredConfig) -> _Plan:
    """Which channels, blocks, heads and neurons survive; per_layer spreads the same totals unevenly."""
    dropped = layers_to_drop(imp, c.num_hidden_layers - target.num_hidden_layers, cfg.layer_metric)
    layers = [i for i in range(c.num_hidden_layers) if i not in dropped]
    group, per_group = c.heads(0) // c.kv_heads(0), target.heads(0) // target.kv_heads(0)
    if cfg.per_layer:  # a layer keeps at least a quarter of the uniform ffn and one KV group
        groups = [imp.groups(i, c.kv_heads(0)).topk(per_group, dim=1).values.sum(1) for i in layers]  # (K,) each
        n_ffn = target.ffn_size(0)
        ffn = _allot([imp.neurons[i] for i in layers], n_ffn * len(layers), max(1, n_ffn // 4))
        kv = _allot(groups, target.kv_heads(0) * len(layers), 1)
    else:
        ffn, kv = [target.ffn_size(0)] * len(layers), [target.kv_heads(0)] * len(layers)
    heads = [_heads_plan(imp.groups(i, c.kv_heads(0)), k, per_group) for i, k in zip(layers, kv)]
    kv_kept = [h[::per_group] // group for h in heads]
    neurons = [_top(imp.neurons[i], f) for i, f in zip(layers, ffn)]
    return _Plan(_top(imp.channels, target.hidden_size), layers, heads, kv_kept, neurons)


# ---------------------------------------------------------------------------------------------
# Slicing
# ---------------------------------------------------------------------------------------------

# parameter name suffix -> which index selects its (rows, columns): c hidden channels, q query-head
# rows, kv key/value rows, f MLP neurons, None all
ROLES = {
    **{f"{norm}.{p}": ("c", None) for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                              "post_feedforward_layernorm") for p in ("weight", "bias")},
    # per-head q/k norms (D,) are the same for every head; OLMo-2's whole-projection ones are refused
    # above for head cuts, and are sliced like the projection's rows otherwise
    "self_attn.q_norm.weight": ("qn", None), "self_attn.k_norm.weight": ("kvn", None),
    "self_attn.q_proj.weight": ("q", "c"), "self_attn.q_proj.bias": ("q", None),
    "self_attn.k_proj.weight": ("kv", "c"), "self_attn.k_proj.bias": ("kv", None),
    "self_attn.v_proj.weight": ("kv", "c"), "self_attn.v_proj.bias": ("kv", None),
    "self_attn.o_proj.weight": ("c", "q"), "self_attn.o_proj.bias": ("c", None),
    "mlp.gate_proj.weight": ("f", "c"), "mlp.gate_proj.bias": ("f", None),
    "mlp.up_proj.weight": ("f", "c"), "mlp.up_proj.bias": ("f", None),
    "mlp.down_proj.weight": ("c", "f"), "mlp.down_proj.bias": ("c", None),
    "model.embed_tokens.weight": (None, "c"), "model.norm.weight": ("c", None), "model.norm.bias": ("c", None),
    "lm_head.weight": (None, "c"), "lm_head.bias": (None, None),
}


def _role(name: str) -> tuple[str | None, str | None] | None:
    key = re.sub(r"^model\.layers\.\d+\.", "", name)
    return ROLES.get(key)


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head indices -> the weight rows of those heads, each head's D rows untouched and in order."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _sliced_state(model: CausalLM, plan: _Plan, xtx: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The new model's state dict: every parameter sliced by its rows' and columns' roles.

    RMSNorm weights are scaled by sqrt(C / C'): the mean of squares is now taken over C' channels,
    and without the factor every normalised output would shrink by sqrt(C' / C) (exact when the
    removed channels are zero; on SmolLM2 at hidden 448 it took perplexity before healing from
    389 to 222, better than matching each norm's measured energy share, 234)."""
    d, hidden = model.config.resolved_head_dim, model.config.hidden_size
    norm_scale = math.sqrt(hidden / len(plan.channels))
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if (name.endswith("layernorm.weight") or name == "model.norm.weight") and len(plan.channels) < hidden:
            tensor = tensor * norm_scale
        index = {"c": plan.channels}
        if name.startswith("model.layers."):
            old = int(name.split(".")[2])
            if old not in plan.layers:
                continue
            j = plan.layers.index(old)
            index.update(q=_rows(plan.heads[j], d), kv=_rows(plan.kv[j], d), f=plan.neurons[j])
            per_head = model.config.qk_norm == "head"
            index.update(qn=torch.arange(d) if per_head else index["q"], kvn=torch.arange(d) if per_head else index["kv"])
            name = f"model.layers.{j}." + name.split(".", 3)[3]
        rows, cols = _role(name)
        if xtx and cols in ("f", "q") and name.endswith("weight") and len(index[cols]) < tensor.shape[1]:
            proj = name.rsplit(".", 2)[-2]  # down_proj (neurons) or o_proj (heads)
            tensor, cols = refit_columns(tensor, xtx[old][proj], index[cols]), None
        if rows is not None:
            tensor = tensor.index_select(0, index[rows])
        if cols is not None:
            tensor = tensor.index_select(1, index[cols])
        state[name] = tensor.detach().clone()
    return state


def _per_layer(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def _final_config(c: ModelConfig, target: ModelConfig, plan: _Plan, imp: Importance,
                  cfg: StructuredConfig) -> ModelConfig:
    heads = _per_layer([len(h) for h in plan.heads])
    kv = _per_layer([len(k) for k in plan.kv])
    ffn = _per_layer([len(n) for n in plan.neurons])
    changed = isinstance(heads, list) or target.head_dim is not None
    lists = {k: [getattr(c, k)[i] for i in plan.layers] for k in ("layer_types", "no_rope_layers")
             if getattr(c, k) is not None}  # the kept layers keep their attention type and RoPE
    out = target.replace(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                         head_dim=c.resolved_head_dim if changed else None, **lists)
    section = {"method": "structured", "params_before": count_params(c).total,
               "original": {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_key_value_heads", "num_hidden_layers")},
               "dropped_layers": [i for i in range(c.num_hidden_layers) if i not in plan.layers],
               "layer_metric": cfg.layer_metric, "per_layer": cfg.per_layer, "importance": IMPORTANCE,
               "calibration_tokens": imp.tokens, "refit": bool(imp.xtx)}
    if c.pruning:
        section["previous"] = c.pruning
    return out.replace(pruning=section)


def _notes(config: ModelConfig) -> list[str]:
    """What the new shape rules out elsewhere (nothing here is wrong for slmkit itself)."""
    if not config.is_uniform:
        return ["per-layer widths: saved as model_type 'slmkit', which transformers and GGUF export do not read"]
    notes = []
    odd = sorted(w for w in {config.hidden_size, config.ffn_size(0)} if w % 32)
    if odd:
        notes.append(f"rows of {odd} values are not a multiple of 32: GGUF q8_0/q4 export refuses (f16 works)")
    if config.hidden_size % config.heads(0) and config.model_type == "llama":
        notes.append(f"hidden {config.hidden_size} is not a multiple of {config.heads(0)} heads: transformers' "
                     "LlamaConfig refuses to load it (slmkit reads it); choose a hidden size the heads divide")
    return notes


@torch.no_grad()
def prune_structured(model: CausalLM, cfg: StructuredConfig, calib_ids: torch.Tensor,
                     progress: bool = True) -> tuple[CausalLM, StructuredReport]:
    """A new, smaller CausalLM sliced from `model` (which is left as it was), and what was done.

    calib_ids: (samples, T) token ids from `slmkit.data.calibration.calibration_ids`."""
    c = model.config
    target = check_structured(model, cfg)
    imp = importance(model, calib_ids, progress, refit=cfg.refit)
    plan = _plan(c, target, imp, cfg)
    config = _final_config(c, target, plan, imp, cfg)
    with torch.device("meta"):
        pruned = CausalLM(config)
    missing, unexpected = pruned.load_state_dict(_sliced_state(model, plan, imp.xtx), strict=False, assign=True)
    if [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings] or unexpected:
        raise SlmError(f"internal: sliced weights do not fit {missing[:3]} {unexpected[:3]}")  # a bug, not input
    pruned.tie_weights()
    pruned.reset_rope()
    pruned.eval()
    report = StructuredReport(count_params(c).total, count_params(config).total, c, config,
                              config.pruning["dropped_layers"], imp.tokens, _notes(config))
    return pruned, report
