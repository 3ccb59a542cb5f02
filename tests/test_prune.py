"""Unstructured and N:M pruning: exact sparsity, Wanda vs magnitude, SparseGPT's error update,
checkpoints, zeros kept through training, bad input and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from slmkit.compress.calibrate import LinearStats
from slmkit.compress.prune import (
    PruneConfig,
    prune_by_score,
    prune_model,
    sparsity_masks,
    wanda_score,
)
from slmkit.compress.sparsegpt import sparsegpt_prune
from slmkit.errors import SlmError
from slmkit.interop.hf import save_checkpoint, save_hf
from slmkit.load import load, random_model
from slmkit.presets import get_preset
from slmkit.train.loop import TrainConfig, train

TINY = get_preset("tiny").config
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
    x[:, :4] *= 20  # outlier channels, as in a transformer's activations
    return x


def _stats(x: torch.Tensor) -> LinearStats:
    linear = nn.Linear(x.shape[1], 1, bias=False)
    stats = LinearStats(linear)
    linear(x)
    return stats.close()


def _pruned_linears(model):
    return [(n, m.weight) for n, m in model.named_modules() if n.endswith(LINEARS)]


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7])
def test_every_row_loses_exactly_its_share(sparsity):
    w = torch.randn(16, 96)
    pruned = prune_by_score(w, w.abs(), sparsity, None)
    assert ((pruned == 0).sum(1) == int(96 * sparsity)).all()
    h = _stats(_correlated_inputs(512, 96)).hessian
    assert ((sparsegpt_prune(w, h, sparsity) == 0).sum(1) == int(96 * sparsity)).all()


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_n_m_groups_keep_at_most_n(nm):
    n, m = nm
    w = torch.randn(8, 64)
    h = _stats(_correlated_inputs(512, 64)).hessian
    for pruned in (prune_by_score(w, w.abs(), None, nm), sparsegpt_prune(w, h, nm=nm)):
        assert ((pruned.reshape(8, -1, m) != 0).sum(-1) == n).all()


def test_wanda_equals_magnitude_when_every_input_norm_is_equal():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (256, 64), generator=g).float() * 2 - 1  # +-1: every column has the same norm
    w = torch.randn(32, 64, generator=g)
    stats = _stats(x)
    assert torch.equal(prune_by_score(w, wanda_score(w, stats), 0.5, None), prune_by_score(w, w.abs(), 0.5, None))
    skewed = _stats(x * torch.linspace(0.1, 10, 64))  # unequal norms: Wanda keeps other weights
    assert not torch.equal(prune_by_score(w, wanda_score(w, skewed), 0.5, None), prune_by_score(w, w.abs(), 0.5, None))


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(nm=(2, 4))])
def test_sparsegpt_reconstructs_the_layer_better_than_magnitude_and_wanda(target):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(2048, 128)
    stats = _stats(x)
    sparsity, nm = target.get("sparsity"), target.get("nm")

    def error(pruned):
        return (x @ (pruned - w).T).pow(2).mean().item()

    magnitude = error(prune_by_score(w, w.abs(), sparsity, nm))
    wanda = error(prune_by_score(w, wanda_score(w, stats), sparsity, nm))
    sparsegpt = error(sparsegpt_prune(w, stats.hessian, sparsity or 0.0, nm))
    assert sparsegpt < wanda < magnitude, (sparsegpt, wanda, magnitude)


def _calib(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (4, 64), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_pruned_model_saves_and_loads_with_its_zeros_and_record(tmp_path, method):
    model = random_model(TINY, seed=0)
    report = prune_model(model, PruneConfig(method=method, sparsity=0.5), _calib(), progress=False)
    assert report.zeros == report.weights // 2 and report.pruned_linears == 2 * 7
    for name, weight in _pruned_linears(model):
        assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), name
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()  # head and embedding kept
    save_checkpoint(model, None, tmp_path / "p")
    back = load(str(tmp_path / "p"), dtype=torch.float32).model
    assert back.config.pruning == {"method": method, "sparsity": 0.5, "pattern": None, "linears": "attention and MLP"}
    ids = _calib(1)[:1]
    torch.testing.assert_close(back(ids), model(ids))


class OneBatch:
    def __init__(self):
        data = torch.randint(0, TINY.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
        self.data = {"input_ids": data[:, :-1], "targets": data[:, 1:]}

    def batch(self, step, micro, rank=0):
        return self.data


def test_training_a_pruned_model_keeps_its_zeros(tmp_path):
    model = random_model(TINY, seed=0)
    prune_model(model, PruneConfig(method="wanda", pattern="2:4"), _calib(), progress=False)
    before = {n: w.detach().clone() for n, w in _pruned_linears(model)}
    assert len(sparsity_masks(model)) == 14
    cfg = TrainConfig(steps=5, micro_batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=0,
                      checkpoint_every=0, precision="fp32", weight_decay=0.1)
    train(model, OneBatch(), cfg, tmp_path / "run")
    for name, weight in _pruned_linears(model):
        assert torch.equal(weight == 0, before[name] == 0), name  # the mask is exactly kept
        assert not torch.equal(weight, before[name]), name  # and the kept weights did train


def test_bad_pruning_settings_are_refused_before_any_work():
    cases = [(dict(sparsity=0.0), "outside"), (dict(sparsity=1.0), "outside"), (dict(sparsity=-0.2), "outside"),
             (dict(), "exactly one"), (dict(sparsity=0.5, pattern="2:4"), "exactly one"),
             (dict(pattern="2-4"), "not N:M"), (dict(pattern="4:2"), "0 < N < M"),
             (dict(pattern="2:5"), "does not divide"), (dict(method="obs", sparsity=0.5), "unknown pruning method")]
    for settings, match in cases:
        model = random_model(TINY, seed=0)
        with pytest.raises(SlmError, match=match):
            prune_model(model, PruneConfig(**settings), _calib(), progress=False)
    with pytest.raises(SlmError, match="another tokenizer"):
        prune_model(random_model(TINY), PruneConfig(sparsity=0.5), _calib() + TINY.vocab_size, progress=False)
    with pytest.raises(SlmError, match="experts"):
        prune_model(random_model(replace(get_preset("tiny-moe").config)), PruneConfig(sparsity=0.5), _calib(),
                    progress=False)


def slm(*args):
    return subprocess.run([sys.executable, "-m", "slmkit.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_prunes_and_refuses_bad_input_leaving_nothing(tmp_path, tiny_tokenizer):
    save_hf(random_model(replace(TINY, vocab_size=tiny_tokenizer.vocab_size), seed=0), tiny_tokenizer, tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time a little robot counted the stars, one by one. " * 200)
    done = slm("prune", str(tmp_path / "m"), "--method", "sparsegpt", "--pattern", "2:4", "--calib", str(text),
               "--calib-samples", "4", "--calib-seq-len", "64", "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "sparsegpt 2:4: 14 linears" in done.stdout and "(50.0%)" in done.stdout
    assert load(str(tmp_path / "out")).model.config.pruning["pattern"] == "2:4"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for args, match in [(("--sparsity", "1.5"), "outside (0, 1)"), (("--pattern", "3:7"), "does not divide"),
                        (("--sparsity", "0.5", "--calib", str(empty)), "is empty")]:
        bad = slm("prune", str(tmp_path / "m"), *args, "-o", str(tmp_path / "bad"))
        assert bad.returncode == 2 and match in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
