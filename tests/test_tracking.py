"""Experiment tracking (`train.loggers`): TensorBoard and MLflow get metrics.jsonl's records, the
settings and the final scores, read back from the event file and the MLflow store; a resumed run
continues its tracker runs; an unknown or missing tracker is refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.interop.hf import save_hf
from slmkit.load import random_model
from slmkit.train import tracking

TINY = ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64)


def _run(tmp_path, tiny_tokenizer, loggers, steps=6, resume=False):
    from slmkit.config import load_config
    from slmkit.train.finetune import FinetuneConfig, run

    base = tmp_path / "base"
    if not base.exists():
        save_hf(random_model(TINY, seed=0), tiny_tokenizer, base)
        rows = [{"prompt": f"robot {i} is", "completion": " even" if i % 2 == 0 else " odd"} for i in range(40)]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"base": str(base), "method": "lora", "out": str(tmp_path / "exp" / "run1"), "epochs": 0,
              "data": {"train": str(tmp_path / "d.jsonl")}, "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
              "train": {"steps": steps, "micro_batch_size": 4, "seq_len": 16, "eval_every": 3, "checkpoint_every": 3,
                        "precision": "fp32", "loggers": loggers}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return run(load_config(FinetuneConfig, tmp_path / "r.yaml", []), resume=resume)


def _jsonl(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_tensorboard_and_mlflow_hold_the_runs_records(tmp_path, tiny_tokenizer, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = _run(tmp_path, tiny_tokenizer, ["tensorboard", "mlflow"])
    run = result.run_dir
    train, evals = _jsonl(run, "train"), _jsonl(run, "eval")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [r["step"] for r in train]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in train], rel=1e-6)  # float32 events
    assert [e.step for e in events.Scalars("eval/val_loss")] == [3, 6]
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow_run_id").read_text()
    got = client.get_run(run_id)
    assert got.data.params["lora.r"] == "2" and got.data.params["train.lr"] == str(1e-3)
    assert got.info.run_name == "run1" and client.get_experiment(got.info.experiment_id).name == "exp"
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [r["step"] for r in train]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in train])
    assert got.data.metrics["final/last_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert got.info.status == "FINISHED"
    # a resumed run continues the same MLflow run and TensorBoard drops what came after its checkpoint
    _run(tmp_path, tiny_tokenizer, ["tensorboard", "mlflow"], steps=9, resume=True)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, 10))


def test_unknown_or_missing_trackers_are_refused_before_work(tmp_path, tiny_tokenizer, monkeypatch):
    with pytest.raises(SlmError, match="unknown logger 'wandb' in train.loggers"):
        _run(tmp_path, tiny_tokenizer, ["wandb"])
    monkeypatch.setitem(tracking.PACKAGES, "trackio", "no_such_package_xyz")
    with pytest.raises(SlmError, match=r"trackio, which is not installed: pip install 'slmkit\[track\]'"):
        _run(tmp_path, tiny_tokenizer, ["trackio"])
    assert not (tmp_path / "exp").exists()


def test_records_become_scalars_and_settings_dotted_keys():
    assert tracking.scalars({"kind": "eval", "step": 4, "val_loss": 1.5, "note": "x"}) == (4, {"eval/val_loss": 1.5})
    assert tracking.flatten({"lora": {"r": 8, "targets": ["q_proj"]}, "out": None}) == {
        "lora.r": 8, "lora.targets": '["q_proj"]', "out": "null"}



def test_trackio_holds_the_runs_records(tmp_path, tiny_tokenizer):
    """In child processes: trackio reads $TRACKIO_DIR when it is imported."""
    pytest.importorskip("trackio")
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    _run(tmp_path, tiny_tokenizer, [], steps=1)  # writes the base model, the data and the recipe
    shutil.rmtree(tmp_path / "exp")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe.read_text().replace("loggers: []", "loggers: [trackio]").replace("steps: 1", "steps: 6"))
    done = subprocess.run([sys.executable, "-m", "slmkit.cli", "finetune", "--config", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps([r['train/loss'] for r in SQLiteStorage.get_logs('exp', 'run1') if 'train/loss' in r]))")
    logged = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(logged.stdout) == pytest.approx([r["loss"] for r in _jsonl(tmp_path / "exp" / "run1", "train")])
    assert (tmp_path / "trackio" / "exp.db").is_file()
