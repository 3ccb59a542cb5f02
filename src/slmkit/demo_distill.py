"""The demo's distillation step: a ~7M-parameter student learns from SmolLM2 in a few minutes.

It prepares the shared TinyStories sample with SmolLM2's tokenizer (a no-op when already done),
caches the teacher's top-32 next tokens over 256 chunks of 64 tokens (reused on later runs), trains
the student for 200 steps with logit KD, and compares teacher and student: parameters, weight
size, decode speed and validation perplexity. Everything lands in runs/demo/.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from slmkit.card import console
from slmkit.config import ModelConfig
from slmkit.data.loader import TokenStream, validation_batches
from slmkit.data.shared import shared_data_dir
from slmkit.presets import DEFAULT_MODEL
from slmkit.sizing import human_bytes, human_count
from slmkit.train.distill import DistillConfig, KDConfig, load_teacher, run
from slmkit.train.loop import TrainConfig, evaluate

WORK = Path("runs/demo")
STUDENT = ModelConfig(vocab_size=0, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)


def demo_config() -> DistillConfig:
    return DistillConfig(
        teacher=DEFAULT_MODEL, data=str(WORK / "tinystories-smollm2"), out=str(WORK / "student"),
        max_train_tokens=256 * 64, model=STUDENT,
        kd=KDConfig(alpha=0.9, temperature=1.0, top_k=32, cache=str(WORK / "teacher-cache")),
        train=TrainConfig(steps=200, micro_batch_size=4, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                          eval_every=100, eval_tokens=4096, checkpoint_every=0))


def distill_step() -> None:
    root = shared_data_dir()
    if root is None:
        console.print("[yellow]skipped: no shared data (../shared/data or $SLMKIT_DATA_DIR)[/]")
        return
    from slmkit.data.prepare import PrepareConfig, prepare

    cfg = demo_config()
    prepare(PrepareConfig(inputs=[str(root / "corpus" / "tinystories")], out=cfg.data), log=lambda *_: None)
    shutil.rmtree(cfg.out, ignore_errors=True)
    started = time.perf_counter()
    run(cfg)
    console.print(f"distilled in {time.perf_counter() - started:.0f}s (teacher cache included on the first run)")
    compare(cfg)


def compare(cfg: DistillConfig) -> None:
    from rich.table import Table

    from slmkit.load import load

    teacher, tokenizer = load_teacher(cfg, torch.device("cpu"))
    student = load(str(Path(cfg.out) / "final")).model.eval()
    val = validation_batches(TokenStream(cfg.data, "val"), cfg.train.seq_len, 8, cfg.train.eval_tokens)
    table = Table(title="teacher vs distilled student (TinyStories validation split)")
    for column in ("model", "parameters", "fp32 weights", "decode tok/s", "val perplexity"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, model in (("SmolLM2-135M teacher", teacher), ("distilled student", student)):
        params = sum(p.numel() for p in model.parameters())
        table.add_row(name, human_count(params), human_bytes(4 * params), f"{decode_speed(model, tokenizer):.1f}",
                      f"{math.exp(evaluate(model, model, val)):.2f}")
    console.print(table)
    sample = _greedy(student, tokenizer, "Once upon a time", 40)
    console.print(f"[bold]student>[/] Once upon a time{sample}")


def decode_speed(model, tokenizer, new_tokens: int = 48) -> float:
    from slmkit.infer.engine import Engine
    from slmkit.infer.sampling import SamplingParams

    engine = Engine(model, 256)
    ids = tokenizer.encode("Once upon a time")
    engine.generate([ids], SamplingParams(max_new_tokens=4))  # warm-up
    result = engine.generate([ids], SamplingParams(max_new_tokens=new_tokens))[0]
    return result.decode_tokens_per_second


def _greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    from slmkit.generate import TextGenerator
    from slmkit.infer.sampling import SamplingParams

    return TextGenerator(model, tokenizer).complete([prompt], SamplingParams(max_new_tokens=new_tokens))[0].text
