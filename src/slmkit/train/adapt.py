"""What every fine-tuning recipe shares: its settings (`FinetuneConfig`), their checks before any
work, the model it trains (whole, or under LoRA/DoRA adapters, over a float or a quantized base)
and the run directory made into a model at the end. `train.finetune` (supervised) and
`train.prefer` (DPO, ORPO) are the recipes over it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmkit.adapters.lora import (
    LoraConfig,
    add_lora,
    check_rank,
    lora_layers,
    resolve_targets,
)
from slmkit.compress.quant.quantize import (
    CALIBRATED,
    QuantConfig,
    quant_section,
    quantize_model,
    targets,
)
from slmkit.config import to_dict
from slmkit.data.calibration import calibration_ids
from slmkit.data.preference import read_preferences
from slmkit.data.sft import split_rows
from slmkit.data.tasks import FinetuneData, finetune_examples
from slmkit.errors import SlmError
from slmkit.fileio import atomic_write
from slmkit.interop.hf import save_checkpoint
from slmkit.interop.peft import restore_adapter, save_adapter
from slmkit.load import load
from slmkit.presets import DEFAULT_MODEL
from slmkit.train import dist
from slmkit.train.checkpoint import HF_FILES, REQUIRED, ModelFiles
from slmkit.train.loop import TrainConfig, uses_bf16
from slmkit.train.preference import OBJECTIVES
from slmkit.train.tracking import check_loggers

METHODS = ("full", "lora", "dora", "qlora", *OBJECTIVES)
ADAPTERS = ("lora", "full")


def _train_defaults() -> TrainConfig:
    return TrainConfig(steps=0, micro_batch_size=8, seq_len=512, lr=1e-3, min_lr=1e-4, warmup_steps=10,
                       weight_decay=0.0, eval_every=25, checkpoint_every=50,
                       early_stopping_patience=3)


@dataclass
class PreferenceConfig:
    beta: float = 0.1
    """dpo: how strongly the model is held to the reference (TRL's beta); orpo: the weight of the odds-ratio term (TRL's beta, the paper's lambda)."""
    adapter: str = field(default="lora", metadata={"choices": ADAPTERS})
    """what dpo/orpo trains: lora (an adapter; DPO's reference is the base without it) or full (every weight)."""


@dataclass
class FinetuneConfig:
    base: str = DEFAULT_MODEL
    """The model to adapt: a GGUF file, an HF directory (a quantized checkpoint for qlora too) or the bundled model."""
    method: str = "lora"
    """full (every weight), lora, dora (LoRA plus a learned magnitude), qlora (LoRA over an int4/int8 base); dpo or orpo: preference tuning on pairs (data.train: prompt/chosen/rejected rows; preference.adapter)."""
    out: str = "runs/finetune"
    """Run directory; in the end it is itself a MODEL (adapter or HF directory)."""
    epochs: float = 3.0
    """Passes over the training examples; sets train.steps (0 = use train.steps as given)."""
    init_seed: int = 0
    """Seed of the adapters' initial weights."""
    data: FinetuneData = field(default_factory=FinetuneData)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(method="int4", lm_head=False))
    """qlora: how the base is quantized when it is not already (the packed weights stay frozen)."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """dpo / orpo settings"""
    train: TrainConfig = field(default_factory=_train_defaults)
    resume: bool = False
    """Continue the run in `out` from its last checkpoint (after a crash or a kill: the same steps as an uninterrupted run)."""


def check_finetune(cfg: FinetuneConfig, model=None) -> tuple[list, list]:
    """Every setting, before any work (the verb and the pipeline's dry run both call this): the
    method, the data (read and split: an unknown task or missing file fails here), and -- given the
    base's shape (a `meta` model is enough) -- the adapter's targets and rank and qlora's
    quantization. Returns the (train, validation) examples, or preference pairs for dpo/orpo."""
    if cfg.method not in METHODS:
        raise SlmError(f"unknown fine-tuning method '{cfg.method}' (choose from {', '.join(METHODS)})")
    if cfg.preference.adapter not in ADAPTERS:
        raise SlmError(f"unknown preference.adapter '{cfg.preference.adapter}' (choose from {', '.join(ADAPTERS)})")
    check_loggers(cfg.train.loggers)
    examples = preference_pairs(cfg.data) if cfg.method in OBJECTIVES else finetune_examples(cfg.data)
    if model is not None:
        check_adapter(cfg, model)
    return examples


def load_base(cfg: FinetuneConfig):
    """The base in fp32 (an adapter base folded in: training goes on top of it), or a one-line error
    when it cannot be trained on."""
    loaded = load(cfg.base, dtype=torch.float32, merge=True)
    if lora_layers(loaded.model):
        raise SlmError(f"the base '{cfg.base}' is an adapter over a quantized model; merge it first (`slm merge`)")
    if loaded.tokenizer is None:
        raise SlmError(f"the base '{cfg.base}' has no tokenizer; fine-tuning reads text")
    return loaded


def preference_pairs(data: FinetuneData) -> tuple[list, list]:
    """(train, validation) preference pairs: data.train's, and data.val's or a seeded share of them."""
    if data.task or not data.train:
        raise SlmError("dpo/orpo train on a file of preference pairs: set data.train (prompt/chosen/rejected rows) "
                       "and leave data.task empty")
    pairs = read_preferences(data.train)
    if data.val:
        return pairs, read_preferences(data.val)
    if not 0 <= data.val_fraction < 1:
        raise SlmError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    if data.val_fraction == 0:
        return pairs, []
    held, kept = split_rows(len(pairs), (data.val_fraction,), data.seed)
    return [pairs[i] for i in kept], [pairs[i] for i in held]


def adapts(cfg: FinetuneConfig) -> str:
    """What trains: the method, or for dpo/orpo its preference.adapter (lora or full)."""
    return cfg.preference.adapter if cfg.method in OBJECTIVES else cfg.method


def adapter_config(cfg: FinetuneConfig) -> LoraConfig:
    return LoraConfig(**{**to_dict(cfg.lora), "dora": cfg.lora.dora or cfg.method == "dora"})


def check_adapter(cfg: FinetuneConfig, model) -> None:
    """The adapter's targets and rank fit the base, and qlora's quantization its widths."""
    if adapts(cfg) == "full":
        return
    lora = adapter_config(cfg)
    check_rank(model, resolve_targets(model, lora.targets), lora.r)
    if cfg.method == "qlora" and not model.config.quantization:
        targets(model, cfg.quant)


def prepare_model(cfg: FinetuneConfig, model, tokenizer, info):
    """The model to train and how its checkpoints hold it: whole (full) or as an adapter."""
    quantized = bool(model.config.quantization)
    if adapts(cfg) == "full":
        if quantized:
            raise SlmError("full fine-tuning needs float weights; adapt a quantized base with method=qlora")
        return model, HF_FILES
    base = cfg.base if not Path(cfg.base).exists() else str(Path(cfg.base).resolve())
    lora = adapter_config(cfg)
    check_adapter(cfg, model)  # before quantizing: fail before work
    if cfg.method == "qlora" and info.device.type != "cpu":
        raise SlmError("qlora trains over slmkit's packed int4/int8 CPU kernels; set train.device=cpu "
                       "(on a GPU, method=lora needs no quantized base)")
    if cfg.method == "qlora" and not quantized:
        model, base = _quantized_base(cfg, model, tokenizer, info.is_main)
    elif cfg.method != "qlora" and quantized:
        raise SlmError(f"the base '{cfg.base}' is quantized: adapt it with method=qlora")
    add_lora(model, lora, torch.Generator().manual_seed(cfg.init_seed))
    if uses_bf16(cfg.train.precision, info.device):
        frozen_linears_to_bf16(model)
    files = ModelFiles(lambda m, tok, path: save_adapter(m, path, base, tok), restore_adapter,
                       ("adapter_config.json", "adapter_model.safetensors"))
    return model, files


def frozen_linears_to_bf16(model) -> None:
    """Under bf16 autocast, keep the frozen base's linear weights in bf16: autocast would round them
    to bf16 at every step anyway (it caches casts only of weights that train), so this is the same
    arithmetic with half the memory and no per-step casts. The embedding (and a head tied to it)
    stays in fp32: it sets the residual stream's precision."""
    embedding = getattr(model.model.embed_tokens, "weight", None)  # a tied quantized head has none
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and module.weight is not embedding:
            module.weight.data = module.weight.data.to(torch.bfloat16)


def _quantized_base(cfg: FinetuneConfig, model, tokenizer, is_main: bool):
    """Quantize the base once and keep it in RUN/base (the adapter's base: exact, loads fast);
    a resumed run reads it back instead of quantizing again."""
    path = Path(cfg.out) / "base"
    if (path / "config.json").is_file():
        kept = load(str(path), dtype=torch.float32).model
        if kept.config.quantization == quant_section(cfg.quant):
            return kept, str(path.resolve())
    quantize_model(model, cfg.quant, _calibration(cfg, tokenizer, model), progress=is_main)
    if is_main:
        save_checkpoint(model, tokenizer, path)
    dist.barrier()
    return model, str(path.resolve())


def _calibration(cfg: FinetuneConfig, tokenizer, model) -> torch.Tensor | None:
    q = cfg.quant
    if q.method not in CALIBRATED:
        return None
    return calibration_ids(tokenizer, q.calib, q.calib_samples, q.calib_seq_len, model.config.vocab_size)


def publish(run: Path) -> Path:
    """Copy the kept model (RUN/best, else RUN/final) to the top of the run directory, file by file
    through temporary names and its config last: a directory with a config is complete."""
    source = ((run / "best") if (run / "best").exists() else run / "final").resolve()
    for item in sorted(source.iterdir(), key=lambda p: (p.name in ("config.json", "adapter_config.json"), p.name)):
        if item.is_file() and item.name not in REQUIRED and item.suffix != ".tmp":
            atomic_write(run / item.name, lambda tmp, item=item: shutil.copyfile(item, tmp))
    return run


def describe(cfg: FinetuneConfig, model, data: str, n_val: int, steps: int) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"fine-tuning {cfg.base} ({cfg.method}): {trainable:,} trainable parameters "
          f"({trainable / max(total, 1):.2%} of {total:,} float ones)")
    print(f"training data: {data}; validation: {n_val} {'pairs' if cfg.method in OBJECTIVES else 'examples'}; "
          f"{steps} steps")


