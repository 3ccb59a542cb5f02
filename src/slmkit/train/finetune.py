"""Fine-tuning recipe: adapt a model to a task or a domain (full, LoRA, DoRA or QLoRA); dpo and
orpo go to the preference recipe (`train.prefer`).

    slm finetune --config configs/finetune/symptom2disease-lora.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m slmkit.cli finetune --config ...      (data parallel)

Thin on purpose: it loads the base, wraps it (adapters, or a quantized base under adapters),
encodes the examples with their loss masks, and calls the one training loop. The run directory
ends up being a MODEL itself: the best checkpoint (by validation loss, else the last) is copied to
its top, an adapter directory in PEFT's format for lora/dora/qlora, an HF directory for full, so
`slm chat RUN`, `slm eval RUN` and `slm serve name=RUN` use it directly.
"""

from __future__ import annotations

import math

from slmkit.config import to_dict
from slmkit.data.loader import Layout
from slmkit.data.sft import encode_all
from slmkit.data.sft_batches import ExampleBatches, validation_batches
from slmkit.train import dist
from slmkit.train.adapt import FinetuneConfig, check_finetune, describe, load_base, prepare_model, publish
from slmkit.train.checkpoint import write_run_config
from slmkit.train.loop import TrainResult, train
from slmkit.train.losses import masked_lm_loss
from slmkit.train.prefer import run as run_preference
from slmkit.train.preference import OBJECTIVES


def run(cfg: FinetuneConfig, resume: bool = False) -> TrainResult:
    if cfg.method in OBJECTIVES:
        return run_preference(cfg, resume)
    resume = resume or cfg.resume
    train_examples, val_examples = check_finetune(cfg)  # bad settings and data fail before the model loads
    info = dist.setup(cfg.train.device)
    loaded = load_base(cfg)
    t, tokenizer = cfg.train, loaded.tokenizer
    train_set, report = encode_all(train_examples, tokenizer, t.seq_len + 1, cfg.data.overlong)
    val_set, _ = encode_all(val_examples, tokenizer, t.seq_len + 1, cfg.data.overlong) if val_examples else ([], None)
    model, files = prepare_model(cfg, loaded.model, tokenizer, info)
    layout = Layout(t.micro_batch_size, t.grad_accum, info.world)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = ExampleBatches(train_set, t.seq_len, layout, t.seed, cfg.data.packing, pad)
    if cfg.epochs > 0:
        t.steps = max(1, math.ceil(cfg.epochs * batches.rows_per_epoch / layout.global_batch))
    val = validation_batches(val_set, t.micro_batch_size, pad, info.rank, info.world) if val_set and t.eval_every else None
    if info.is_main:
        describe(cfg, model, report.summary(), len(val_set), t.steps)
        if not resume:
            write_run_config(cfg.out, to_dict(cfg))
    result = train(model, batches, t, cfg.out, tokenizer, loss_fn=masked_lm_loss, val_batches=val, resume=resume,
                   files=files, settings=to_dict(cfg))
    if info.is_main:
        publish(result.run_dir)
    return result


