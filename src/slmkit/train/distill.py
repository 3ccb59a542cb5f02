"""Distillation recipe: a student learns from a frozen teacher's outputs (and, optionally, its layers).

    slm distill --config configs/distill/tinystories-23m.yaml [key=value ...] [--resume]

The loss is (1 - alpha) * cross-entropy on the data + alpha * T^2 * divergence(teacher || student)
(+ hidden-state and attention-relation terms with their own weights); alpha = 0 trains the same
student on the same batches from scratch, which is how `bench/distill.py` measures what the
teacher adds. The teacher runs online every step, or once ahead of training into a top-k cache
(`kd.cache=DIR`). Logit and hidden-state KD need the student's data tokenized with the teacher's
tokenizer; across tokenizers distill at the sequence level instead (`slm synth`, then pretrain).

Thin on purpose: it builds teacher, student, batches and the loss, then calls the one training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slmkit.config import ModelConfig, to_dict
from slmkit.data.loader import Layout, TokenStream, validation_batches
from slmkit.errors import SlmError
from slmkit.layers import cpu_has_native_bf16
from slmkit.load import inspect, load, resolve
from slmkit.presets import DEFAULT_MODEL, get_preset
from slmkit.tokenizer import Tokenizer, same_vocabulary
from slmkit.train import dist
from slmkit.train.checkpoint import write_run_config
from slmkit.train.kd import DIVERGENCES, HIDDEN_LOSSES, DistillLoss, KDConfig
from slmkit.train.loop import TrainConfig, TrainResult, train
from slmkit.train.pretrain import build_model
from slmkit.train.teacher_cache import Chunks, count_chunks, open_or_build


@dataclass
class DistillConfig:
    teacher: str = DEFAULT_MODEL
    """The teacher: a GGUF file, an HF directory or the bundled model."""
    teacher_precision: str = "auto"
    """fp32, bf16 or auto (bf16 where the hardware has bf16 units or a GPU, else fp32)."""
    student: str = ""
    """"" = fresh weights shaped by `model`; a preset name = fresh weights of that architecture; a GGUF/HF model = continue from its weights."""
    data: str = ""
    """Prepared data directory (`slm prepare ... --tokenizer TEACHER` for logit or hidden-state KD)."""
    max_train_tokens: int = 0
    """Use only the first N tokens of the training split (0 = all); bounds the teacher cache."""
    out: str = "runs/distill"
    """Run directory (checkpoints, metrics.jsonl, loss.png, final/)."""
    init_seed: int = 0
    """Seed of the student's random initial weights."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Student architecture when `student` is empty; vocab_size 0 = the teacher's."""
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    """Continue the run in `out` from its last checkpoint (after a crash or a kill: the same steps as an uninterrupted run)."""


def run(cfg: DistillConfig, resume: bool = False) -> TrainResult:
    resume = resume or cfg.resume
    _check(cfg)
    info = dist.setup(cfg.train.device)
    tokenizer = Tokenizer.from_dir(cfg.data)
    teacher = None  # a from-scratch run (alpha 0, no layer terms) reads only the teacher's vocabulary size
    if uses_teacher(cfg.kd):
        teacher, teacher_tokenizer = load_teacher(cfg, info.device)
        if not same_vocabulary(tokenizer, teacher_tokenizer):
            raise SlmError(_tokenizer_mismatch(cfg, tokenizer, teacher_tokenizer))
    student = build_student(cfg, tokenizer, _teacher_vocab(cfg, teacher))
    t = cfg.train
    layout = Layout(t.micro_batch_size, t.grad_accum, info.world)
    stream = TokenStream(cfg.data, "train")
    chunks = count_chunks(stream, t.seq_len, cfg.max_train_tokens)
    cache = None
    if cfg.kd.cache and cfg.kd.alpha > 0:
        identity = {"teacher": cfg.teacher, "data": stream.meta.get("fingerprint")}
        cache = open_or_build(cfg.kd.cache, teacher, stream, t.seq_len, chunks, cfg.kd.top_k, identity,
                              cfg.kd.cache_batch_size, log=print if info.is_main else lambda *_: None)
    batches = Chunks(stream, t.seq_len, layout, t.seed, chunks, cache)
    val_stream = TokenStream(cfg.data, "val")
    val = (validation_batches(val_stream, t.seq_len, t.micro_batch_size, t.eval_tokens, info.rank, info.world)
           if val_stream.size and t.eval_every else None)
    loss = DistillLoss(cfg.kd, student, teacher if uses_online_teacher(cfg.kd) else None, seed=cfg.init_seed)
    if info.is_main and not resume:
        write_run_config(cfg.out, to_dict(cfg))
    return train(student, batches, t, cfg.out, tokenizer, loss_fn=loss, val_batches=val, resume=resume,
                 extra=loss.projections if len(loss.projections) else None)


# -- teacher and student --------------------------------------------------------------------------


def uses_teacher(kd: KDConfig) -> bool:
    return kd.alpha > 0 or kd.hidden_weight > 0 or kd.attention_weight > 0


def uses_online_teacher(kd: KDConfig) -> bool:
    return kd.hidden_weight > 0 or kd.attention_weight > 0 or (kd.alpha > 0 and not kd.cache)


def load_teacher(cfg: DistillConfig, device: torch.device) -> tuple[nn.Module, Tokenizer]:
    """The teacher, frozen and in eval mode, in bf16 where that is faster."""
    if cfg.teacher_precision not in ("auto", "fp32", "bf16"):
        raise SlmError(f"teacher_precision must be auto, fp32 or bf16, not '{cfg.teacher_precision}'")
    fast_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    bf16 = cfg.teacher_precision == "bf16" or (cfg.teacher_precision == "auto" and fast_bf16)
    loaded = load(cfg.teacher, dtype=torch.bfloat16 if bf16 else torch.float32)
    if loaded.tokenizer is None:
        raise SlmError(f"the teacher '{cfg.teacher}' has no tokenizer; give a GGUF or an HF directory with one")
    teacher = loaded.model.to(device).eval().requires_grad_(False)
    return teacher, loaded.tokenizer


def _teacher_vocab(cfg: DistillConfig, teacher: nn.Module | None) -> int:
    if teacher is not None:
        return teacher.config.vocab_size

    return inspect(cfg.teacher).config.vocab_size


def build_student(cfg: DistillConfig, tokenizer: Tokenizer, teacher_vocab: int) -> nn.Module:
    """`model` with fresh weights, a preset's architecture with fresh weights, or a saved model to continue."""
    config = cfg.model
    if cfg.student:
        target = resolve(cfg.student)
        if not isinstance(target, str):
            loaded = load(cfg.student)
            if loaded.tokenizer is not None and not same_vocabulary(loaded.tokenizer, tokenizer):
                raise SlmError(f"the student '{cfg.student}' and the data '{cfg.data}' use different tokenizers")
            return loaded.model
        config = get_preset(target).config.replace(vocab_size=0)
    if config.vocab_size == 0:  # follow the teacher's rows so the two distributions line up
        config = config.replace(vocab_size=max(teacher_vocab, tokenizer.vocab_size))
    return build_model(config, tokenizer, cfg.train.seq_len, cfg.init_seed)


def _tokenizer_mismatch(cfg: DistillConfig, data_tok: Tokenizer, teacher_tok: Tokenizer) -> str:
    return (f"the data in '{cfg.data}' was tokenized with a different tokenizer ({data_tok.vocab_size} tokens) "
            f"than the teacher '{cfg.teacher}' ({teacher_tok.vocab_size} tokens). Logit and hidden-state "
            f"distillation compare the two models token by token, so they need one tokenizer: re-run "
            f"`slm prepare ... --tokenizer {cfg.teacher}`, or distill at the sequence level across tokenizers "
            f"(`slm synth` writes a teacher corpus; prepare it with the student's tokenizer and `slm pretrain`)")


def _check(cfg: DistillConfig) -> None:
    kd = cfg.kd
    if not cfg.data:
        raise SlmError("no data: set data=DIR (a directory made by `slm prepare`)")
    if not 0 <= kd.alpha <= 1:
        raise SlmError(f"kd.alpha must be in [0, 1], got {kd.alpha}")
    if kd.divergence not in DIVERGENCES:
        raise SlmError(f"unknown kd.divergence '{kd.divergence}' (choose from {', '.join(DIVERGENCES)})")
    if kd.hidden_loss not in HIDDEN_LOSSES:
        raise SlmError(f"unknown kd.hidden_loss '{kd.hidden_loss}' (choose from {', '.join(HIDDEN_LOSSES)})")
    if kd.temperature <= 0:
        raise SlmError(f"kd.temperature must be > 0, got {kd.temperature}")
    if kd.cache and kd.top_k <= 0:
        raise SlmError("a teacher cache stores the top-k tokens: set kd.top_k (e.g. 32) or kd.cache=''")
