"""`slm finetune` end to end on a tiny model: the run directory is a model, kill -9 resumes exactly,
early stopping keeps the best checkpoint, every method runs, data parallel matches one process,
and bad input fails in one line before any work."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from slmkit.adapters.lora import lora_layers
from slmkit.compress.quant.qlinear import Int4Linear
from slmkit.config import ModelConfig
from slmkit.interop.hf import save_hf
from slmkit.load import load, random_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("base")
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, path)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """A labelled chat file: does the robot's number end in an even digit? (answers of equal length)"""
    path = tmp_path_factory.mktemp("data") / "robots.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Answer yes or no."},
                          {"role": "user", "content": f"Is robot {i} even?"},
                          {"role": "assistant", "content": "yes" if i % 2 == 0 else "no!"}],
             "label": "yes" if i % 2 == 0 else "no"} for i in range(80)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, base: Path, data: Path, out: str, method: str = "lora", **train) -> Path:
    settings = dict(micro_batch_size=4, seq_len=48, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=5,
                    checkpoint_every=10, log_every=1, precision="fp32", early_stopping_patience=0)
    settings.update(train)
    recipe = {"base": str(base), "method": method, "out": str(tmp_path / out), "epochs": 0,
              "data": {"train": str(data)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
              "quant": {"method": "int4", "group_size": 32, "lm_head": False}, "train": {"steps": 20, **settings}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _slm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _rows(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _run(recipe: Path, *overrides: str):
    from slmkit.config import load_config
    from slmkit.train.finetune import FinetuneConfig, run

    return run(load_config(FinetuneConfig, recipe, list(overrides)))


def test_a_lora_run_directory_is_an_adapter_model(tmp_path, base_dir, chats):
    result = _run(_recipe(tmp_path, base_dir, chats, "run"))
    out = tmp_path / "run"
    assert result.state.step == 20 and {"adapter_config.json", "adapter_model.safetensors", "slmkit_adapter.json",
                                        "tokenizer.json", "loss.png", "best", "final"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    assert filecmp.cmp(out / "adapter_model.safetensors", (out / "best").resolve() / "adapter_model.safetensors",
                       shallow=False)
    assert [e["step"] for e in _rows(out, "eval")] == [5, 10, 15, 20]
    loaded = load(str(out))
    assert len(lora_layers(loaded.model)) == 14 and loaded.source.base == str(base_dir.resolve())
    generated = _slm("generate", str(out), "Is robot 3 even?", "--chat", "--max-tokens", "4", "--dtype", "float32")
    assert generated.returncode == 0, generated.stderr
    plotted = _slm("plot", str(out))
    assert plotted.returncode == 0 and "loss.png" in plotted.stdout


def test_resume_after_sigkill_repeats_the_loss_sequence_bitwise(tmp_path, base_dir, chats):
    recipe = _recipe(tmp_path, base_dir, chats, "whole", steps=240, checkpoint_every=40, eval_every=60)
    assert _slm("finetune", "--config", str(recipe)).returncode == 0
    reference = {r["step"]: r["loss"] for r in _rows(tmp_path / "whole")}
    killed = tmp_path / "killed"
    recipe = _recipe(tmp_path, base_dir, chats, "killed", steps=240, checkpoint_every=40, eval_every=60)
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "finetune", "--config", str(recipe)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").is_file() and len(_rows(killed)) >= 100:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 100 <= len(_rows(killed)) < 240
    assert not list(killed.glob("adapter_model.safetensors*"))  # nothing published from a run that did not end
    resumed = _slm("finetune", "--config", str(recipe), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again = {r["step"]: r["loss"] for r in _rows(killed)}
    assert list(again) == list(range(1, 241)) and again == reference


def test_early_stopping_keeps_the_best_checkpoint_of_an_over_long_run(tmp_path, base_dir, chats):
    result = _run(_recipe(tmp_path, base_dir, chats, "long", steps=400, lr=3e-2, min_lr=3e-2, schedule="constant",
                          eval_every=10, early_stopping_patience=3))
    out = tmp_path / "long"
    evals = _rows(out, "eval")
    best = min(evals, key=lambda r: r["val_loss"])
    assert result.stop_reason == "early_stopping" and result.state.step == best["step"] + 30
    assert (out / "best").resolve().name == f"step-{best['step']:07d}"
    assert filecmp.cmp(out / "adapter_model.safetensors", (out / "best").resolve() / "adapter_model.safetensors",
                       shallow=False)


@pytest.mark.parametrize("method", ["full", "dora", "qlora"])
def test_every_method_trains_and_leaves_a_model(tmp_path, base_dir, chats, method):
    _run(_recipe(tmp_path, base_dir, chats, method, method=method, steps=6, eval_every=3))
    out = tmp_path / method
    losses = [r["loss"] for r in _rows(out)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    loaded = load(str(out))
    if method == "full":
        assert (out / "model.safetensors").is_file() and not lora_layers(loaded.model)
    else:
        assert all(layer.dora == (method == "dora") for _, layer in lora_layers(loaded.model))
    if method == "qlora":  # the adapter's base is the quantized base kept in the run
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str((out / "base").resolve())
        assert any(isinstance(m, Int4Linear) for m in loaded.model.modules())


@pytest.mark.slow  # kept out of `make test` for its 15-minute budget; `make bench` runs it
def test_data_parallel_matches_one_process(tmp_path, base_dir, chats):
    """2 gloo ranks x micro-batch 2 == 1 process x micro-batch 4: the adapter within 1e-5."""
    from safetensors.torch import load_file

    common = dict(steps=4, eval_every=0, checkpoint_every=0, grad_accum=2, warmup_steps=2)
    single = _recipe(tmp_path, base_dir, chats, "single", micro_batch_size=4, **common)
    assert _slm("finetune", "--config", str(single)).returncode == 0
    ddp = _recipe(tmp_path, base_dir, chats, "ddp", micro_batch_size=2, **common)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "slmkit.cli", "finetune", "--config", str(ddp)],
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["method=prefix"], "unknown fine-tuning method 'prefix'"),
    (["data.task=symptom2disease"], "set exactly one of data.task"),
    (["lora.targets=[qproj]"], "unknown lora target 'qproj'"),
    (["lora.r=100"], "larger than the width"),
    (["data.overlong=error", "train.seq_len=8"], r"robots.jsonl:1 has \d+ tokens, more than the 9"),
    (["train.stpes=3"], "Did you mean: train.steps"),
])
def test_bad_settings_fail_in_one_line_before_any_work(tmp_path, base_dir, chats, overrides, message):
    done = _slm("finetune", "--config", str(_recipe(tmp_path, base_dir, chats, "bad")), *overrides)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_label_set_with_one_class_is_refused(tmp_path, base_dir):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a", "label": "a"}) + "\n" for i in range(9)))
    done = _slm("finetune", "--config", str(_recipe(tmp_path, base_dir, data, "one")))
    assert done.returncode == 2 and "one class only" in done.stderr


def test_activation_checkpointing_keeps_the_loss_sequence(tmp_path, base_dir, chats):
    """Recomputing each block in the backward pass changes memory, not arithmetic (dropout included)."""
    for name, flag in (("plain", False), ("recomputed", True)):
        _run(_recipe(tmp_path, base_dir, chats, name, steps=6, eval_every=0), f"train.activation_checkpointing={flag}",
             "lora.dropout=0.1")
    plain, recomputed = ([r["loss"] for r in _rows(tmp_path / n)] for n in ("plain", "recomputed"))
    assert len(plain) == 6 and plain == pytest.approx(recomputed, rel=0, abs=1e-6)
