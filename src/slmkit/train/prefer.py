"""Preference tuning recipe: `slm finetune --method dpo | orpo` on pairs of answers.

    slm finetune --method dpo --base runs/s2d-lora-merged data.train=pairs.jsonl preference.beta=0.1
    slm finetune --config configs/finetune/scitldr-dpo.yaml

Thin like the supervised recipe: the same base loading, adapters (`preference.adapter`: lora or
full), checkpoints, resume, curves and trackers, over the one training loop, with the preference
loss of `train.preference` and a validation on held-out pairs (loss, reward accuracy, margin).
DPO's reference log-probabilities are those of the model before its first step, computed once and
kept in RUN/reference_logps*.safetensors (see `train.preference`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from slmkit.config import to_dict
from slmkit.data.loader import Layout
from slmkit.data.preference import PreferenceBatches, encode_pairs
from slmkit.train import dist
from slmkit.train.adapt import FinetuneConfig, check_finetune, describe, load_base, prepare_model, publish
from slmkit.train.checkpoint import write_run_config
from slmkit.train.loop import TrainResult, train, uses_bf16
from slmkit.train.preference import preference_loss, preference_validation, reference_logps


def run(cfg: FinetuneConfig, resume: bool = False) -> TrainResult:
    resume = resume or cfg.resume
    train_pairs, val_pairs = check_finetune(cfg)  # the pairs are read and checked before the model loads
    info = dist.setup(cfg.train.device)
    loaded = load_base(cfg)
    t, tokenizer = cfg.train, loaded.tokenizer
    train_set, report = encode_pairs(train_pairs, tokenizer, t.seq_len + 1, cfg.data.overlong)
    val_set, _ = encode_pairs(val_pairs, tokenizer, t.seq_len + 1, cfg.data.overlong) if val_pairs else ([], None)
    model, files = prepare_model(cfg, loaded.model, tokenizer, info)
    layout = Layout(t.micro_batch_size, t.grad_accum, info.world)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = PreferenceBatches(train_set, layout, t.seed, pad)
    val = PreferenceBatches(val_set, layout, t.seed, pad) if val_set and t.eval_every else None
    if cfg.epochs > 0:
        t.steps = max(1, math.ceil(cfg.epochs * batches.rows_per_epoch / layout.global_batch))
    objective, beta = cfg.method, cfg.preference.beta
    if objective == "dpo":  # the reference: this model before any step (the base, or the base under a zero adapter)
        amp = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=uses_bf16(t.precision, info.device))
        run_dir = Path(cfg.out)
        for data, name in ((batches, "train"), (val, "val")):
            if data is not None:
                data.reference = reference_logps(model, data, run_dir, name, t.micro_batch_size, amp, info.is_main)
    if info.is_main:
        describe(cfg, model, report.summary(), len(val_set), t.steps)
        if not resume:
            write_run_config(cfg.out, to_dict(cfg))
    validate = preference_validation(objective, beta, val, t.micro_batch_size) if val is not None else None
    result = train(model, batches, t, cfg.out, tokenizer, loss_fn=preference_loss(objective, beta), resume=resume,
                   files=files, settings=to_dict(cfg), validate=validate)
    if info.is_main:
        publish(result.run_dir)
    return result
