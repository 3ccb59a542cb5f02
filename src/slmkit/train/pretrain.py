"""Pretraining recipe: a randomly initialised model learns next-token prediction on prepared shards.

    slm pretrain --config configs/pretrain/tinystories-10m.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 -m slmkit.cli pretrain --config ...      (data parallel)

Thin on purpose: it builds the model, the batch source and the validation batches, then calls the
one training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slmkit.config import ModelConfig, to_dict
from slmkit.data.loader import Layout, RandomWindows, TokenStream, validation_batches
from slmkit.errors import SlmError
from slmkit.model import CausalLM
from slmkit.tokenizer import Tokenizer
from slmkit.train import dist
from slmkit.train.checkpoint import write_run_config
from slmkit.train.loop import TrainConfig, TrainResult, train


@dataclass
class PretrainConfig:
    data: str = ""
    """Prepared data directory (the output of `slm prepare`)."""
    out: str = "runs/pretrain"
    """Run directory: checkpoints, metrics.jsonl, loss.png, final/."""
    init_seed: int = 0
    """Seed of the random initial weights."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (HF field names); vocab_size 0 means the tokenizer's vocabulary size."""
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False
    """Continue the run in `out` from its last checkpoint (after a crash or a kill: the same steps as an uninterrupted run)."""


def build_model(config: ModelConfig, tokenizer: Tokenizer, seq_len: int, init_seed: int) -> CausalLM:
    """A randomly initialised model for `tokenizer` (vocab_size 0 = the tokenizer's size)."""
    if config.vocab_size == 0:
        config = config.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise SlmError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                       f"{config.vocab_size}; set model.vocab_size=0 to follow the tokenizer")
    if seq_len > config.max_position_embeddings:
        raise SlmError(f"train.seq_len {seq_len} exceeds model.max_position_embeddings "
                       f"{config.max_position_embeddings}")
    config = config.replace(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = CausalLM(config)
    model.init_weights(torch.Generator().manual_seed(init_seed))
    return model


def run(cfg: PretrainConfig, resume: bool = False) -> TrainResult:
    resume = resume or cfg.resume
    if not cfg.data:
        raise SlmError("no data: set data=DIR (a directory made by `slm prepare`)")
    info = dist.setup(cfg.train.device)
    tokenizer = Tokenizer.from_dir(cfg.data)
    model = build_model(cfg.model, tokenizer, cfg.train.seq_len, cfg.init_seed)
    t = cfg.train
    layout = Layout(t.micro_batch_size, t.grad_accum, info.world)
    batches = RandomWindows(TokenStream(cfg.data, "train"), t.seq_len, layout, t.seed)
    val_stream = TokenStream(cfg.data, "val")
    val = (validation_batches(val_stream, t.seq_len, t.micro_batch_size, t.eval_tokens, info.rank, info.world)
           if val_stream.size and t.eval_every else None)
    if info.is_main and not resume:
        write_run_config(cfg.out, to_dict(cfg))
    return train(model, batches, t, cfg.out, tokenizer, val_batches=val, resume=resume)
