"""Knowledge-distillation losses: logits, hidden states and attention relations.

Logit KD compares the student's next-token distribution with the teacher's at every position whose
target is not IGNORE. Both are softened by a temperature T and the divergence is multiplied by T^2
(Hinton et al.), so its gradients keep their size as T changes. The teacher is either dense logits
(B, T, V) or a sparse `TopK` (its k most likely tokens, e.g. read from a teacher cache): then both
distributions are renormalised over those k tokens, which makes every divergence exactly zero when
the student equals the teacher.

Hidden-state KD matches chosen student layers to teacher layers through a learned linear projection
(widths may differ); both sides are RMS-normalised first, because the residual streams of two models
differ in scale by orders of magnitude. Attention transfer follows MiniLM-v2: the self-relations
softmax(X X^T / sqrt(d)) of the queries, keys and values of one layer, split into R relation heads
so that models with different head counts can be compared. They are taken before RoPE.

`DistillLoss` combines the terms as the training loop's loss function (configured by `KDConfig`);
`Taps` records module outputs during the forward passes it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import gcd

import torch
import torch.nn.functional as F
from torch import nn

from slmkit.errors import SlmError
from slmkit.train.losses import IGNORE

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
HIDDEN_LOSSES = ("mse", "cosine")


@dataclass
class TopK:
    """A sparse teacher: its k most likely next tokens and their log-probabilities at T = 1."""

    indices: torch.Tensor  # (B, T, k) int64
    logprobs: torch.Tensor  # (B, T, k) float


def topk_logprobs(logits: torch.Tensor, k: int) -> TopK:
    """The k largest log-probabilities of `logits` (B, T, V), computed in fp32."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    values, indices = logprobs.topk(k, dim=-1, sorted=True)
    return TopK(indices, values)


def divergence(kind: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence (N,) between log-distributions (N, S) over the same support.

    forward_kl = KL(teacher || student) (mass-covering); reverse_kl = KL(student || teacher)
    (mode-seeking); jsd = generalized Jensen-Shannon with mixture m = beta*teacher + (1-beta)*student
    (beta = 0.5 is the symmetric JSD; GKD, Agarwal et al. 2024).
    """
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise SlmError(f"jsd_beta must be in (0, 1), got {beta}")
        mixture = torch.logsumexp(torch.stack([teacher_logp + torch.log(torch.tensor(beta)),
                                               student_logp + torch.log(torch.tensor(1 - beta))]), dim=0)
        return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)
    raise SlmError(f"unknown divergence '{kind}' (choose from {', '.join(DIVERGENCES)})")


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dimension; p = 0 entries contribute 0."""
    return F.kl_div(q_logp, p_logp, log_target=True, reduction="none").sum(-1)


def logit_kd(student_logits: torch.Tensor, teacher: torch.Tensor | TopK, targets: torch.Tensor,
             kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
             student_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Mean T^2-scaled divergence over the positions whose target is not IGNORE.

    student_logits (B, T, Vs); teacher (B, T, Vt) logits or TopK; targets (B, T). Vocabularies are
    compared over the shared first min(Vs, Vt) ids (embedding rows past the tokenizer are padding).
    A sparse teacher is compared over k + 1 outcomes: its k tokens and one bucket for the rest of
    the vocabulary, for both models. The bucket matters: without it the student is only told how to
    share out whatever mass it puts on the k tokens, not to put its mass there (measured: KD then
    trains worse than no KD). Temperature softens these k + 1 outcomes, which is exact at T = 1.
    `student_logp` is log_softmax(student_logits) when the caller already has it (one vocabulary-wide
    pass per step instead of two).
    """
    if temperature <= 0:
        raise SlmError(f"temperature must be > 0, got {temperature}")
    if isinstance(teacher, TopK):
        s_full = F.log_softmax(student_logits.float(), dim=-1) if student_logp is None else student_logp  # (B, T, V)
        t_logp = _bucketed(teacher.logprobs.float(), temperature)  # (B, T, k + 1)
        s_logp = _bucketed(s_full.gather(-1, teacher.indices.long()), temperature)
    else:
        vocab = min(student_logits.shape[-1], teacher.shape[-1])
        t_logp = F.log_softmax(_soften(teacher[..., :vocab].float(), temperature), dim=-1)  # (B, T, V)
        s_logp = F.log_softmax(_soften(student_logits[..., :vocab].float(), temperature), dim=-1)
    keep = (targets != IGNORE).float()  # (B, T)
    per_position = divergence(kind, t_logp, s_logp, beta)  # (B, T)
    return (per_position * keep).sum() / keep.sum().clamp(min=1) * temperature ** 2


def _bucketed(top_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., k) log-probs of k tokens -> (..., k + 1) log-probs with the remaining mass as one outcome."""
    mass = torch.logsumexp(top_logp, dim=-1, keepdim=True).exp().clamp(max=1 - 1e-6)
    logp = torch.cat([top_logp, torch.log1p(-mass)], dim=-1)
    return F.log_softmax(logp / temperature, dim=-1) if temperature != 1 else logp


def _soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1 else logits / temperature


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def hidden_kd(student_h: torch.Tensor, teacher_h: torch.Tensor, projection: nn.Module, kind: str = "mse",
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between projection(student_h) (B, T, Ds -> Dt) and teacher_h (B, T, Dt), both RMS-normalised."""
    s = rms_normalize(projection(student_h.float()))
    t = rms_normalize(teacher_h)
    if kind == "mse":
        per_position = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_position = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise SlmError(f"unknown hidden_loss '{kind}' (choose from {', '.join(HIDDEN_LOSSES)})")
    if mask is None:
        return per_position.mean()
    return (per_position * mask).sum() / mask.sum().clamp(min=1)


def self_relation_logp(x: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) per relation head under a causal mask: (B, T, D) -> (B, R, T, T)."""
    b, t, d = x.shape
    if d % heads:
        raise SlmError(f"relation_heads {heads} does not divide width {d}; choose a divisor of both models' widths")
    xr = x.float().view(b, t, heads, d // heads).transpose(1, 2)  # (B, R, T, d_r)
    scores = xr @ xr.transpose(-1, -2) / (d // heads) ** 0.5  # (B, R, T, T)
    future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return F.log_softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def relation_kd(student_parts: list[torch.Tensor], teacher_parts: list[torch.Tensor], heads: int) -> torch.Tensor:
    """MiniLM-v2 relation transfer: mean KL(teacher || student) of the self-relations of each part (q, k, v)."""
    total = 0.0
    for s, t in zip(student_parts, teacher_parts):
        t_logp, s_logp = self_relation_logp(t, heads), self_relation_logp(s, heads)
        # masked (future) entries are -inf on both sides: zero them before the KL so 0 * inf is not nan
        future = torch.isinf(t_logp)
        kl = F.kl_div(s_logp.masked_fill(future, 0), t_logp.masked_fill(future, 0), log_target=True,
                      reduction="none").masked_fill(future, 0)
        total = total + kl.sum(-1).mean()
    return total / len(student_parts)


class Taps:
    """Record the outputs of named submodules during forward passes (forward hooks)."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise SlmError(f"no module named {missing[0]} in the model")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return record

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.outputs[name]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class KDConfig:
    alpha: float = 0.5
    """Weight of the distillation loss; hard-label cross-entropy gets 1 - alpha (0 = no teacher, from scratch)."""
    divergence: str = "forward_kl"
    """forward_kl (mass-covering), reverse_kl (mode-seeking) or jsd (generalized Jensen-Shannon)."""
    temperature: float = 2.0
    """Softens both distributions; the divergence is multiplied by temperature^2."""
    jsd_beta: float = 0.5
    """jsd only: mixture weight of the teacher (0.5 = symmetric JSD)."""
    top_k: int = 0
    """0 = the teacher's whole distribution; k > 0 = its k most likely tokens only (less memory; a cache needs it)."""
    cache: str = ""
    """Directory of a teacher top-k cache, built on first use and reused after; "" = run the teacher every step."""
    cache_batch_size: int = 8
    """Chunks per teacher forward pass while building the cache."""
    hidden_weight: float = 0.0
    """Weight of hidden-state distillation (0 = off; needs the online teacher)."""
    hidden_loss: str = "mse"
    """mse or cosine, between RMS-normalised projected student and teacher hidden states."""
    hidden_layers: list[str] = field(default_factory=list)
    """"student:teacher" layer pairs (0-based, negative from the end); [] = every student layer, spread evenly."""
    attention_weight: float = 0.0
    """Weight of MiniLM-v2 attention-relation transfer (q-q, k-k, v-v) at attention_layer (0 = off)."""
    attention_layer: str = "-1:-1"
    """"student:teacher" layer pair for attention-relation transfer."""
    relation_heads: int = 0
    """Relation heads for attention transfer (0 = the largest of 8, 4, 2, 1 dividing every width)."""


# -- the loss -------------------------------------------------------------------------------------


def layer_pairs(specs: list[str], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Parse "s:t" pairs (negative = from the end); [] = each student layer to its proportional teacher layer."""
    if not specs:
        return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]
    pairs = []
    for spec in specs:
        try:
            s, t = (int(x) for x in spec.split(":"))
        except ValueError:
            raise SlmError(f"a layer pair is 'student:teacher', e.g. '3:15', not '{spec}'") from None
        if not (-student_layers <= s < student_layers and -teacher_layers <= t < teacher_layers):
            raise SlmError(f"layer pair '{spec}' is out of range ({student_layers} student, {teacher_layers} teacher layers)")
        pairs.append((s % student_layers, t % teacher_layers))
    return pairs


class DistillLoss:
    """loss_fn for the training loop: (student forward, batch) -> (loss, logs)."""

    def __init__(self, kd: KDConfig, student: nn.Module, teacher: nn.Module | None, seed: int = 0):
        self.kd, self.teacher = kd, teacher
        self.projections = nn.ModuleDict()  # learned student -> teacher width maps (trained, not saved in the model)
        self.student_taps = self.teacher_taps = None
        names_s, names_t = [], []
        s_layers, t_layers = student.config.num_hidden_layers, (teacher.config.num_hidden_layers if teacher else 0)
        if kd.hidden_weight > 0:
            self.hidden_pairs = layer_pairs(kd.hidden_layers, s_layers, t_layers)
            for s, t in self.hidden_pairs:
                names_s.append(f"model.layers.{s}")
                names_t.append(f"model.layers.{t}")
                self.projections[f"s{s}_t{t}"] = _projection(student.config.hidden_size, teacher.config.hidden_size,
                                                             seed + len(self.projections))
        if kd.attention_weight > 0:
            (s, t), = layer_pairs([kd.attention_layer], s_layers, t_layers)
            self.relation_names = ([f"model.layers.{s}.self_attn.{p}_proj" for p in "qkv"],
                                   [f"model.layers.{t}.self_attn.{p}_proj" for p in "qkv"])
            names_s += self.relation_names[0]
            names_t += self.relation_names[1]
            self.heads = kd.relation_heads or _relation_heads(student, teacher, s, t)
        if names_s:
            self.student_taps, self.teacher_taps = Taps(student, names_s), Taps(teacher, names_t)

    def __call__(self, forward, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        kd, targets = self.kd, batch["targets"]
        logits = forward(batch["input_ids"])  # (B, T, V)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V), shared by the CE and sparse KD terms
        ce = F.nll_loss(logp.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss, logs = (1 - kd.alpha) * ce, {"ce": ce.item()}
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(batch["input_ids"])
        if kd.alpha > 0:
            if "teacher_indices" in batch:
                target = TopK(batch["teacher_indices"], batch["teacher_logprobs"])
            else:
                target = topk_logprobs(teacher_logits, kd.top_k) if kd.top_k else teacher_logits
            term = logit_kd(logits, target, targets, kd.divergence, kd.temperature, kd.jsd_beta, student_logp=logp)
            loss, logs["kd"] = loss + kd.alpha * term, term.item()
        if kd.hidden_weight > 0:
            term = sum(hidden_kd(self.student_taps[f"model.layers.{s}"], self.teacher_taps[f"model.layers.{t}"],
                                 self.projections[f"s{s}_t{t}"], kd.hidden_loss) for s, t in self.hidden_pairs)
            term = term / len(self.hidden_pairs)
            loss, logs["hidden"] = loss + kd.hidden_weight * term, term.item()
        if kd.attention_weight > 0:
            s_names, t_names = self.relation_names
            term = relation_kd([self.student_taps[n] for n in s_names], [self.teacher_taps[n] for n in t_names],
                               self.heads)
            loss, logs["attention"] = loss + kd.attention_weight * term, term.item()
        return loss, logs


def _projection(d_in: int, d_out: int, seed: int) -> nn.Linear:
    """A student -> teacher width map with seeded weights (equal on every rank and in every rerun)."""
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.normal_(layer.weight, std=d_in ** -0.5, generator=torch.Generator().manual_seed(seed))
    return layer


def _relation_heads(student: nn.Module, teacher: nn.Module, s: int, t: int) -> int:
    widths = [m.out_features for model, i in ((student, s), (teacher, t))
              for m in (getattr(model.model.layers[i].self_attn, f"{p}_proj") for p in "qkv")]
    common = 0
    for w in widths:
        common = gcd(common, w)
    return next(r for r in (8, 4, 2, 1) if common % r == 0)
