"""`slm pipeline` on a tiny model: stages run in order and leave a report; a rerun of an unchanged
recipe does no work; a changed learning rate reruns fine-tuning and what follows only; kill -9
during fine-tuning and a rerun end with the same metrics as an uninterrupted run; --dry-run
refuses bad recipes before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slmkit.config import ModelConfig
from slmkit.errors import SlmError
from slmkit.infer import llamacpp
from slmkit.interop.hf import save_hf
from slmkit.load import random_model
from slmkit.pipeline.run import PipelineJob, run_pipeline

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# widths that int4 group 32 and GGUF Q8_0 blocks divide; a context long enough for a task prompt
TINY = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("base")
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, path)
    return path


def _recipe(tmp_path: Path, base_model: Path, name: str, steps: int = 24, full: bool = True, **changes) -> Path:
    """Base -> LoRA on Symptom2Disease (40 rows) -> int4 -> evaluate (4 test rows) -> export."""
    recipe = {
        "name": name, "out": str(tmp_path / name), "base": {"model": str(base_model)},
        "finetune": {"method": "lora", "epochs": 0, "data": {"task": "symptom2disease", "max_train_rows": 40,
                                                              "max_val_rows": 24},
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                     "train": {"steps": steps, "micro_batch_size": 4, "seq_len": 64, "lr": 1e-2, "min_lr": 1e-3,
                               "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 8, "log_every": 1,
                               "precision": "fp32", "early_stopping_patience": 0}},
        "evaluate": {"task_limit": 4, "general": [], "bench": None},
    }
    if full:
        recipe["quantize"] = {"quant": {"method": "int4", "group_size": 32, "lm_head": False}}
        recipe["evaluate"]["bench"] = {"prompt_tokens": 16, "new_tokens": 4, "runs": 1}
        recipe["export"] = {"gguf": {"type": "q8_0"}, "adapter_base_type": "f16", "answers": 1,
                            "check": llamacpp.available()}
    else:
        recipe["export"] = None
    for key, value in changes.items():
        recipe[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _ran(result) -> dict[str, bool]:
    return {d.kind: d.ran for d in result["stages"]}


def _task_values(result) -> dict[str, float]:
    return {r["stage"]: r["task"]["value"] for r in result["rows"] if r.get("task")}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, base_dir, data_dir):
    """The uninterrupted run of the small recipe (no quantize/export), shared by the kill test."""
    tmp = tmp_path_factory.mktemp("whole")
    recipe = _recipe(tmp, base_dir, "whole", steps=160, full=False)
    return recipe, run_pipeline(PipelineJob(recipe), log=lambda *_: None)


def test_pipeline_runs_then_skips_then_reruns_from_the_changed_stage(tmp_path, base_dir, data_dir):
    recipe = _recipe(tmp_path, base_dir, "s2d")
    first = run_pipeline(PipelineJob(recipe), log=lambda *_: None)
    root = tmp_path / "s2d"
    assert [d.kind for d in first["stages"]] == ["base", "finetune", "quantize", "evaluate", "export"]
    assert all(_ran(first).values())
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "01-base", "06-finetune", "07-quantize", "08-evaluate", "09-export", "measured", "plots"]
    stages = [r["stage"] for r in first["rows"]]
    assert stages[:3] == ["01-base", "06-finetune", "07-quantize"]
    for row in first["rows"][:3]:
        assert 0 <= row["task"]["value"] <= 1 and row["task"]["stderr"] is not None
        assert row["hallucination_rate"] is not None
        assert row["decode_tps"] > 0 and row["peak_rss_mib"] > 0 and row["params"] > 0
    export = root / "09-export"
    assert (export / "hf" / "config.json").is_file() and (export / "hf" / "README.md").is_file()
    assert (export / "s2d-q8_0.gguf").is_file() and (export / "s2d-lora.gguf").is_file()
    if llamacpp.available():  # the GGUF row: scored and timed in llama.cpp, and it answered
        assert "llama.cpp" in stages[3]
        assert first["stages"][-1].outputs["answers"][0]["final GGUF"] is not None
    assert (root / "report.html").is_file() and "06-finetune" in (root / "report.md").read_text()
    records = {p: p.stat().st_mtime_ns for p in root.glob("*/stage.json")}

    again = run_pipeline(PipelineJob(recipe), log=lambda *_: None)
    assert not any(_ran(again).values())
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/stage.json")} == records
    assert _task_values(again) == _task_values(first)

    changed = run_pipeline(PipelineJob(recipe, ["finetune.train.lr=5e-3"]), log=lambda *_: None)
    assert _ran(changed) == {"base": False, "finetune": True, "quantize": True, "evaluate": True, "export": True}
    cached = json.loads(next((root / "measured").glob("01-base-*.json")).read_text())["row"]
    assert cached["task"] == first["rows"][0]["task"]  # the base was not scored again


def test_kill_during_finetuning_then_rerun_ends_with_the_same_metrics(tmp_path, base_dir, whole):
    reference_recipe, reference = whole
    recipe = _recipe(tmp_path, base_dir, "killed", steps=160, full=False)
    metrics = tmp_path / "killed" / "06-finetune" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "pipeline", str(recipe)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 60:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the pipeline finished before it could be killed; make fine-tuning longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "06-finetune" / "stage.json").exists()
    resumed = run_pipeline(PipelineJob(recipe), log=lambda *_: None)
    assert _ran(resumed)["base"] is False and _ran(resumed)["finetune"] is True
    losses = [json.loads(line) for line in metrics.read_text().splitlines()]
    reference_losses = [json.loads(line) for line in
                        (Path(reference_recipe).parent / "whole" / "06-finetune" / "metrics.jsonl").read_text()
                        .splitlines()]
    train = {r["step"]: r["loss"] for r in losses if r.get("kind") == "train"}
    assert train == {r["step"]: r["loss"] for r in reference_losses if r.get("kind") == "train"}
    assert _task_values(resumed) == _task_values(reference)


@pytest.mark.parametrize("change, message", [
    ({"finetune": {"method": "lora", "data": {"task": "symptom2disease"}, "learning_rate": 1}}, "learning_rate"),
    ({"base": {"model": "no/such/model.gguf"}}, "no/such/model.gguf"),
    ({"quantize": {"quant": {"method": "int4", "group_size": 256}}}, "group size"),
    ({"finetune": {"method": "lora", "data": {"task": "no_such_task"}}}, "no_such_task"),
    ({"evaluate": {"task": "no_such_task", "general": []}}, "no_such_task"),
    ({"finetune": {"method": "lora", "base": "elsewhere", "data": {"task": "symptom2disease"}}}, "finetune.base"),
    ({"export": {"gguf": {"type": "q3_x"}}}, "q3_x"),
    ({"evaluate": {"stages": ["base", "prune"], "general": []}}, "evaluate.stages names prune"),
    ({"quantize": {"quant": {"method": "gptq", "group_size": 32, "calib": "task:no_such_task"}}}, "no_such_task"),
    ({"quantize": {"quant": {"method": "gptq", "group_size": 32, "calib": "no/such/calib.txt"}}}, "no/such/calib.txt"),
])
def test_dry_run_refuses_bad_recipes_before_any_work(tmp_path, base_dir, data_dir, change, message):
    recipe = _recipe(tmp_path, base_dir, "bad", **change)
    with pytest.raises(SlmError, match=message.replace(".", r"\.")):
        run_pipeline(PipelineJob(recipe, dry_run=True), log=lambda *_: None)
    assert not (tmp_path / "bad").exists()


def test_evaluate_stages_chooses_the_models_scored(tmp_path, base_dir, data_dir):
    def scored(**evaluate) -> dict[str, str]:
        recipe = _recipe(tmp_path, base_dir, "chosen")
        changes = [f"evaluate.{k}={v}" for k, v in evaluate.items()]
        plan = run_pipeline(PipelineJob(recipe, changes, dry_run=True), log=lambda *_: None)["plan"]
        return next(s.config.models for s in plan if s.kind == "evaluate")
    assert list(scored()) == ["base", "finetune", "quantize"]
    assert list(scored(stages="[base,quantize]")) == ["base", "quantize"]


def test_dry_run_prints_the_plan_and_what_is_up_to_date(tmp_path, base_dir, data_dir, whole, capsys):
    recipe, _ = whole
    plan = run_pipeline(PipelineJob(recipe, dry_run=True), log=print)["plan"]
    assert [s.kind for s in plan] == ["base", "finetune", "evaluate"] and all(s.up_to_date for s in plan)
    changed = run_pipeline(PipelineJob(recipe, ["finetune.train.lr=1e-3"], dry_run=True))["plan"]
    assert [s.up_to_date for s in changed] == [True, False, False]
    assert changed[1].estimate.seconds > 0 and changed[1].estimate.peak_bytes > 0
    out = capsys.readouterr().out
    assert "06-finetune" in out and "would run" in out


# demo.yaml runs in `make test`; the longer recipes' dry runs (tens of seconds of task data) under `make bench`
@pytest.mark.parametrize("recipe", [pytest.param(p.name, marks=[] if p.name == "demo.yaml" else [pytest.mark.slow])
                                    for p in sorted((Path(__file__).parents[1] / "configs" / "pipeline").glob("*.yaml"))])
def test_shipped_recipes_pass_the_dry_run(recipe, data_dir):
    path = Path(__file__).parents[1] / "configs" / "pipeline" / recipe
    plan = run_pipeline(PipelineJob(path, dry_run=True), log=lambda *_: None)["plan"]
    assert plan[0].kind == "base" and all(s.estimate.seconds >= 0 for s in plan)


def _jsonl(path: Path, examples) -> str:
    path.write_text("".join(json.dumps({"messages": e.messages, "label": e.label}) + "\n" for e in examples))
    return str(path)


def test_a_recipe_for_the_users_own_files(tmp_path, base_dir, data_dir):
    """finetune.data.train + evaluate.data: the user's rows are trained on and scored (slm eval --data);
    a label the training file never shows is refused before any work."""
    from slmkit.data.tasks import task_data

    s2d = task_data("symptom2disease", data_dir / "tasks")
    train = _jsonl(tmp_path / "train.jsonl", s2d.train[:40])
    labels = {e.label for e in s2d.train[:40]}
    test = _jsonl(tmp_path / "test.jsonl", [e for e in s2d.test if e.label in labels][:6])
    finetune = {"method": "lora", "epochs": 0, "data": {"train": train, "val_fraction": 0.1},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"steps": 4, "micro_batch_size": 4, "seq_len": 64, "eval_every": 0, "checkpoint_every": 4,
                          "precision": "fp32"}}
    recipe = _recipe(tmp_path, base_dir, "mine", full=False, finetune=finetune,
                     evaluate={"data": test, "general": [], "bench": None})
    result = run_pipeline(PipelineJob(recipe), log=lambda *_: None)
    rows = {r["stage"]: r["task"] for r in result["rows"]}
    assert {t["name"] for t in rows.values()} == {"file:test.jsonl"} and {t["n"] for t in rows.values()} == {6}
    unseen = _jsonl(tmp_path / "unseen.jsonl", [e for e in s2d.test if e.label not in labels][:2])
    bad = _recipe(tmp_path, base_dir, "unseen", full=False, finetune=finetune,
                  evaluate={"data": unseen, "general": [], "bench": None})
    with pytest.raises(SlmError, match=r"unseen\.jsonl:1: label '.*' never appears in the training file"):
        run_pipeline(PipelineJob(bad, dry_run=True), log=lambda *_: None)
