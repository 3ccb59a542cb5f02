"""The training loop: schedules, batches, overfitting, checkpoints, exact resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slmkit.config import ModelConfig
from slmkit.data.loader import Layout, RandomWindows, TokenStream
from slmkit.errors import SlmError
from slmkit.model import CausalLM
from slmkit.train.loop import TrainConfig, train
from slmkit.train.optim import lr_at, param_groups

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _recipe(tmp_path: Path, data: Path, out: str, **train) -> Path:
    """A pretrain YAML for a ~40k-parameter model on the 512-token story data."""
    import yaml

    settings = dict(steps=40, micro_batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                    eval_every=10, eval_tokens=2048, checkpoint_every=10, log_every=1, precision="fp32")
    settings.update(train)
    recipe = {"data": str(data), "out": str(tmp_path / out), "model": {**TINY, "vocab_size": 0}, "train": settings}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _slm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


# -- pieces ---------------------------------------------------------------------------------------


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    wsd = dict(kw, schedule="wsd", decay_fraction=0.2)
    assert lr_at(80, **wsd) == 1.0 and lr_at(99, **wsd) == pytest.approx(1 - 0.9 * 11 / 22)
    assert lr_at(50, **dict(kw, schedule="constant")) == 1.0
    with pytest.raises(SlmError, match="unknown schedule"):
        lr_at(0, **dict(kw, schedule="linear"))


def test_no_weight_decay_on_norms_and_biases():
    model = CausalLM(ModelConfig(**TINY, attention_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_global_batch_is_the_same_however_it_is_split(story_data):
    stream = TokenStream(story_data, "train")
    whole = RandomWindows(stream, 16, Layout(micro_batch=8, grad_accum=1), seed=3)
    split = RandomWindows(stream, 16, Layout(micro_batch=2, grad_accum=2, world=2), seed=3)
    rows = [split.batch(5, micro, rank)["input_ids"] for micro in range(2) for rank in range(2)]
    got = sorted(map(tuple, torch.cat(rows).tolist()))
    assert got == sorted(map(tuple, whole.batch(5, 0)["input_ids"].tolist()))
    assert not torch.equal(whole.batch(5, 0)["input_ids"], whole.batch(6, 0)["input_ids"])
    batch = whole.batch(5, 0)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])


def test_corpus_smaller_than_one_batch_is_refused(story_data):
    with pytest.raises(SlmError, match="fewer than one global batch"):
        RandomWindows(TokenStream(story_data, "train"), 64, Layout(micro_batch=10_000, grad_accum=1), seed=0)


class OneBatch:
    """The same batch at every step: a model must be able to memorise it."""

    def __init__(self, seed=0):
        gen = torch.Generator().manual_seed(seed)
        data = torch.randint(0, 512, (4, 17), generator=gen)
        self.data = {"input_ids": data[:, :-1], "targets": data[:, 1:]}

    def batch(self, step, micro, rank=0):
        return self.data


def test_tiny_model_overfits_one_batch(tmp_path):
    model = CausalLM(ModelConfig(**TINY))
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=150, micro_batch_size=4, seq_len=16, lr=1e-2, min_lr=1e-3, warmup_steps=10,
                      weight_decay=0.0, eval_every=0, checkpoint_every=0, precision="fp32")
    train(model, OneBatch(), cfg, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert losses[1] > 6.0 and losses[150] < 0.1 * losses[1]


# -- the pretrain recipe, end to end -------------------------------------------------------------


def test_pretrain_run_directory_is_a_loadable_model(tmp_path, story_data):
    from slmkit.config import load_config
    from slmkit.load import load
    from slmkit.train.pretrain import PretrainConfig, run

    result = run(load_config(PretrainConfig, _recipe(tmp_path, story_data, "run")))
    out = tmp_path / "run"
    assert result.state.step == 40 and result.stop_reason == "steps"
    assert {"config.yaml", "metrics.jsonl", "loss.png", "final", "last", "best"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "checkpoints").iterdir())) <= 3  # two kept plus the best
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [10, 20, 30, 40] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    losses = _losses(out)
    assert sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5])
    loaded = load(str(out / "final"))
    ids = torch.tensor([loaded.tokenizer.encode("Once upon a time")])
    assert loaded.model(ids).shape == (1, ids.shape[1], 512)
    generated = _slm("generate", str(out / "final"), "Once upon a time", "--max-tokens", "8", "--dtype", "float32")
    assert generated.returncode == 0, generated.stderr
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "final"))
    with torch.no_grad():
        assert (hf(ids).logits - loaded.model(ids)).abs().max() < 1e-4


def test_resume_after_sigkill_repeats_the_loss_sequence_bitwise(tmp_path, story_data):
    recipe = _recipe(tmp_path, story_data, "whole", steps=300, checkpoint_every=50, eval_every=100)
    assert _slm("pretrain", "--config", str(recipe)).returncode == 0
    reference = _losses(tmp_path / "whole")

    killed = tmp_path / "killed"
    recipe = _recipe(tmp_path, story_data, "killed", steps=300, checkpoint_every=50, eval_every=100)
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "pretrain", "--config", str(recipe)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").is_file() and max(_losses(killed), default=0) >= 130:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged_before = max(_losses(killed))
    assert 130 <= logged_before < 300
    resumed = _slm("pretrain", "--config", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    again = _losses(killed)
    assert list(again) == list(range(1, 301))
    assert again == reference  # every step, before and after the kill, bit for bit


def test_resume_refuses_corrupt_checkpoints_and_changed_settings(tmp_path, story_data):
    recipe = _recipe(tmp_path, story_data, "run", steps=20)
    assert _slm("pretrain", "--config", str(recipe)).returncode == 0
    again = _slm("pretrain", "--config", str(recipe))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    changed = _slm("pretrain", "--config", str(recipe), "--resume", "train.seq_len=16")
    assert changed.returncode == 2 and "seq_len 32 -> 16" in changed.stderr
    weights = (tmp_path / "run" / "last").resolve() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    corrupt = _slm("pretrain", "--config", str(recipe), "--resume", "train.steps=30")
    assert corrupt.returncode == 2 and "is corrupt" in corrupt.stderr and str(weights.parent.name) in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


def test_bad_config_is_refused_before_any_work(tmp_path, story_data):
    recipe = _recipe(tmp_path, story_data, "run")
    unknown = _slm("pretrain", "--config", str(recipe), "train.stpes=3")
    assert unknown.returncode == 2 and "Did you mean: train.steps" in unknown.stderr
    wrong = _slm("pretrain", "--config", str(recipe), "train.lr=fast")
    assert wrong.returncode == 2 and "train.lr" in wrong.stderr
    small = _slm("pretrain", "--config", str(recipe), "train.micro_batch_size=100000")
    assert small.returncode == 2 and "fewer than one global batch" in small.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_early_stopping_on_a_validation_plateau(tmp_path, story_data):
    from slmkit.config import load_config
    from slmkit.train.pretrain import PretrainConfig, run

    # lr=0 after warmup: the model stops changing, so validation stops improving.
    recipe = _recipe(tmp_path, story_data, "run", steps=200, warmup_steps=0, lr=1e-12, min_lr=1e-12,
                     schedule="constant", eval_every=5, early_stopping_patience=2, early_stopping_min_delta=1e-3)
    result = run(load_config(PretrainConfig, recipe))
    assert result.stop_reason == "early_stopping" and result.state.step == 15


def test_data_parallel_matches_one_process(tmp_path, story_data):
    """2 gloo ranks x micro-batch 2 == 1 process x micro-batch 4, parameters within 1e-5."""
    from safetensors.torch import load_file

    common = dict(steps=4, eval_every=0, checkpoint_every=0, grad_accum=2, warmup_steps=2)
    single = _recipe(tmp_path, story_data, "single", micro_batch_size=4, **common)
    assert _slm("pretrain", "--config", str(single)).returncode == 0
    ddp = _recipe(tmp_path, story_data, "ddp", micro_batch_size=2, **common)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "slmkit.cli", "pretrain", "--config", str(ddp)],
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    start = CausalLM(ModelConfig(**TINY))
    start.init_weights(torch.Generator().manual_seed(0))
    moved = max((a[k] - start.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-3, "training must have changed the weights"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
