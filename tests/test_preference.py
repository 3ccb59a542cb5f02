"""Preference tuning (`slm finetune --method dpo | orpo`): the losses equal TRL's on the same batch
(DPOTrainer; ORPOTrainer from trl.experimental), pairs are read in TRL's formats with errors naming
file, line and field, and a LoRA run trains, validates on pairs and resumes from its reference."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import yaml

from slmkit.config import ModelConfig
from slmkit.data.preference import read_preferences
from slmkit.data.sft_batches import IGNORE
from slmkit.errors import SlmError
from slmkit.interop.hf import save_hf
from slmkit.load import load, random_model
from slmkit.train.preference import answer_logps, dpo_terms, orpo_logps, orpo_terms

TINY = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)
ROWS = [{"prompt": f"robot {i} is", "chosen": " even" if i % 2 == 0 else " odd", "rejected": " a cat 42"}
        for i in range(4)]


@pytest.fixture(scope="module")
def peers(tmp_path_factory, tiny_tokenizer):
    """A tiny base saved as an HF directory, and a perturbed copy (the policy after some training)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("trl")
    root = tmp_path_factory.mktemp("pref")
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, root / "base")
    policy = random_model(TINY, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    save_hf(policy, tiny_tokenizer, root / "policy")
    return transformers, root


def _ours(root, name):
    return load(str(root / name), dtype=torch.float32).model.eval()


def _trl_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_dpo_loss_equals_trls_on_the_same_batch(peers, tmp_path):
    transformers, root = peers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = transformers.AutoModelForCausalLM.from_pretrained(str(root / "policy"), dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "base"))
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.3, report_to=[], use_cpu=True, bf16=False,
                     max_length=64)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)
    batch = _trl_batch(trainer)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
    ids, mask = batch["input_ids"], batch["completion_mask"]
    ours_batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)}
    with torch.no_grad():
        logps, _ = answer_logps(_ours(root, "policy"), ours_batch)
        ref, _ = answer_logps(_ours(root, "base"), ours_batch)
    losses, logs = dpo_terms(logps, ref, beta=0.3)
    assert abs(theirs - 0.6931) > 1e-3  # the policy differs from its reference: a loss that can disagree
    assert losses.mean().item() == pytest.approx(theirs, abs=1e-4)
    assert 0.0 <= logs["reward_accuracy"] <= 1.0


def test_orpo_loss_equals_trls_on_the_same_batch(peers, tmp_path):
    transformers, root = peers
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    policy = transformers.AutoModelForCausalLM.from_pretrained(str(root / "policy"), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "base"))
    args = ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.2, report_to=[], use_cpu=True, bf16=False,
                      max_length=64)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = _trl_batch(trainer)
    with torch.no_grad():
        theirs, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    joined = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value)
    ids, labels = joined["concatenated_input_ids"], joined["concatenated_labels"]
    real = joined["concatenated_attention_mask"][:, 1:] == 1
    ours_batch = {"input_ids": ids[:, :-1], "targets": labels[:, 1:].masked_fill(labels[:, 1:] == -100, IGNORE),
                  "all_targets": ids[:, 1:].masked_fill(~real, IGNORE)}
    with torch.no_grad():
        loss, logs = orpo_terms(*orpo_logps(_ours(root, "policy"), ours_batch), beta=0.2)
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-4)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_in_trls_formats_and_bad_rows(tmp_path):
    chat = lambda role, text: {"role": role, "content": text}  # noqa: E731
    implicit = {"chosen": [chat("user", "hi"), chat("assistant", "hello!")],
                "rejected": [chat("user", "hi"), chat("assistant", "go away")]}
    (pair,) = read_preferences(_write(tmp_path / "i.jsonl", [implicit]))
    assert pair.chosen.messages == implicit["chosen"] and pair.rejected.messages[-1]["content"] == "go away"
    conversational = {"prompt": [chat("user", "hi")], "chosen": [chat("assistant", "hello!")],
                      "rejected": [chat("assistant", "go away")]}
    assert read_preferences(_write(tmp_path / "c.jsonl", [conversational]))[0].chosen.messages == implicit["chosen"]
    cases = [
        ([{"prompt": "a", "chosen": "b", "rejected": "b"}], r"p\.jsonl:1: 'chosen' equals 'rejected'"),
        ([{"prompt": "a", "chosen": "b"}], r"p\.jsonl:1: missing 'rejected'"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, conversational], r"p\.jsonl:2: a conversational row in a "
                                                                            "file of standard rows"),
        ([{"prompt": "a", "chosen": "", "rejected": "c"}], r"p\.jsonl:1: 'chosen' must be non-empty text"),
        ([{**conversational, "chosen": [chat("user", "x")]}], r"p\.jsonl:1: 'chosen' must be the assistant's"),
    ]
    for rows, message in cases:
        with pytest.raises(SlmError, match=message):
            read_preferences(_write(tmp_path / "p.jsonl", rows))


def _recipe(tmp_path, base, method, out, steps=8, **extra):
    rows = [{"prompt": f"Is robot {i} polite? Answer:", "chosen": " yes, 42", "rejected": " no"} for i in range(40)]
    _write(tmp_path / "pairs.jsonl", rows)
    recipe = {"base": str(base), "method": method, "out": str(tmp_path / out), "epochs": 0,
              "data": {"train": str(tmp_path / "pairs.jsonl"), "val_fraction": 0.2},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "preference": {"beta": 0.5, **extra},
              "train": {"steps": steps, "micro_batch_size": 4, "seq_len": 32, "lr": 5e-3, "min_lr": 5e-4,
                        "warmup_steps": 1, "eval_every": 4, "checkpoint_every": 4, "precision": "fp32",
                        "early_stopping_patience": 0}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _finetune(recipe, resume=False):
    from slmkit.config import load_config
    from slmkit.train.finetune import FinetuneConfig, run

    return run(load_config(FinetuneConfig, recipe, []), resume=resume)


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("method, adapter", [("dpo", "lora"), ("orpo", "lora"), ("dpo", "full")])
def test_a_preference_run_trains_validates_on_pairs_and_leaves_a_model(tmp_path, tiny_tokenizer, method, adapter):
    base = tmp_path / "base"
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, base)
    result = _finetune(_recipe(tmp_path, base, method, "run", steps=16, adapter=adapter))
    run = result.run_dir
    evals = _rows(run, "eval")
    assert [e["step"] for e in evals] == [4, 8, 12, 16]
    assert {"val_loss", "val_reward_accuracy", "val_reward_margin"} <= set(evals[0]) and "val_ppl" not in evals[0]
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"]  # it learns which answer is preferred
    assert (run / ("adapter_config.json" if adapter == "lora" else "config.json")).is_file()
    assert (run / "reference_logps_train.safetensors").is_file() == (method == "dpo")
    assert load(str(run), dtype=torch.float32).model is not None


def test_a_resumed_dpo_run_repeats_the_uninterrupted_one(tmp_path, tiny_tokenizer):
    """A run stopped at its step-4 checkpoint (as after kill -9) and resumed ends like the whole run."""
    base = tmp_path / "base"
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, base)
    whole = _finetune(_recipe(tmp_path, base, "dpo", "whole", steps=8)).run_dir
    part = tmp_path / "part"
    shutil.copytree(whole, part, symlinks=True)
    (part / "last").unlink()
    (part / "last").symlink_to("checkpoints/step-0000004")
    _finetune(_recipe(tmp_path, base, "dpo", "part", steps=8), resume=True)
    loss = lambda run: {r["step"]: r["loss"] for r in _rows(run, "train")}  # noqa: E731
    assert loss(part) == loss(whole) and len(loss(part)) == 8


def test_preference_settings_are_checked_before_work(tmp_path, tiny_tokenizer):
    base = tmp_path / "base"
    save_hf(random_model(TINY, seed=0), tiny_tokenizer, base)
    recipe = _recipe(tmp_path, base, "dpo", "bad")
    text = yaml.safe_load(recipe.read_text())
    text["data"] = {"task": "symptom2disease"}
    recipe.write_text(yaml.safe_dump(text))
    with pytest.raises(SlmError, match="dpo/orpo train on a file of preference pairs"):
        _finetune(recipe)
    with pytest.raises(SlmError, match="'preference.adapter': 'dora' is not one of lora, full"):
        _finetune(_recipe(tmp_path, base, "dpo", "bad2", adapter="dora"))


def test_the_shipped_preference_recipe_parses():
    from pathlib import Path

    from slmkit.config import load_config
    from slmkit.train.adapt import FinetuneConfig

    cfg = load_config(FinetuneConfig, Path(__file__).parents[1] / "configs" / "finetune" / "scitldr-orpo.yaml", [])
    assert cfg.method == "orpo" and cfg.preference.adapter == "lora" and cfg.data.train.endswith("pairs.jsonl")
